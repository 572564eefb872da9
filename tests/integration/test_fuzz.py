"""Property-based fuzzing of the sandbox boundary (hypothesis), bounded in time for CI.

(a) Every host function the runtime links (``HOST_FUNCTIONS``: the canonical ABI lowering
    of every WIT function) is called from inside a real ``Processor.process`` call with
    random core arguments: pointers (in memory, at its edge, far outside), lengths, handles
    (the frame's, dropped ones, unknown ones), enum cases, floats (NaN, ±inf). Each call must
    either succeed or fail as a clean processor error: ``process`` returns the input frame,
    ``last_error`` says what happened, nothing raises out of ``process``, nothing hangs, and
    a failed call leaves no mat behind.
(b) Random bytes, in random chunkings, as a vision server's streamed reply to the real
    ``ollama`` processor (``wasm/ollama.wasm``): the processor never traps, never disables,
    and the video goes on (every frame comes back).

The examples are derandomized (the same in every CI run; ``HYPOTHESIS_SEED``-free) and
counted so that this file runs in well under 60 s; ``VISION_HOST_FUZZ_EXAMPLES=N`` scales
part (a) up for a longer local run.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from guest_call import BUMP_REALLOC
from reply_server import ReplyServer
from vision_host.runtime import NetworkPolicy, SandboxLimits
from vision_host.runtime.engine import Runtime
from vision_host.runtime.linking import HOST_FUNCTIONS

OLLAMA_WASM = REPO / "wasm" / "ollama.wasm"
FUNCTIONS = sorted(HOST_FUNCTIONS)
EXAMPLES = int(os.environ.get("VISION_HOST_FUZZ_EXAMPLES", "3000"))
_WAT = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}
_LOAD = {"i": ("i32.load", 0), "I": ("i64.load", 0), "f": ("f32.load", 0), "F": ("f64.load", 0)}
#: Guest address of the argument slots (8 bytes each) the fuzzer writes before each call.
ARGS_AT = 64
#: Where the driver's bump allocator starts (reset before every call).
HEAP_AT = 4096
PAGES = 4
MEMORY = PAGES * 65536


def fuzz_driver() -> bytes:
    """A processor importing every host function. ``process`` calls the one whose index is
    in the exported global ``which`` with core arguments read from the 8-byte slots at
    :data:`ARGS_AT` (written by the test), drops its result and returns the frame. It has a
    bump ``cabi_realloc`` (heap reset by the test through the ``heap`` global) that traps
    when memory cannot grow."""
    imports, wrappers, names = [], [], []
    for i, key in enumerate(FUNCTIONS):
        spec = HOST_FUNCTIONS[key]
        params = " ".join(_WAT[c] for c in spec.params)
        results = " ".join(_WAT[c] for c in spec.results)
        sig = (f"(param {params})" if params else "") + (f" (result {results})" if results else "")
        imports.append(f'(import "{spec.module}" "{spec.name}" (func $h{i} {sig}))')
        loads = " ".join(f"({_LOAD[c][0]} (i32.const {ARGS_AT + 8 * j}))" for j, c in enumerate(spec.params))
        call = f"(call $h{i} {loads})"
        wrappers.append(f"(func $w{i} {'(drop ' + call + ')' if spec.results else call})")
        names.append(f"$w{i}")
    return wasmtime.wat2wasm(f"""
(module
  {' '.join(imports)}
  (type $void (func))
  (memory (export "memory") {PAGES})
  (table {len(names)} funcref)
  (elem (i32.const 0) {' '.join(names)})
  (global $which (export "which") (mut i32) (i32.const 0))
  (global $heap (export "heap") (mut i32) (i32.const {HEAP_AT}))
  {BUMP_REALLOC}
  {' '.join(wrappers)}
  (func (export "process") (param i32) (result i32)
    (call_indirect (type $void) (global.get $which))
    (local.get 0))
)""")


# -- (a) random core arguments into every host function -----------------------------------
FRAME = "frame"          # placeholder for the handle of the frame being processed
DROPPED = "dropped"      # a handle that existed and was dropped


def _i32():
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, -1, 0x7FFF_FFFF, -0x8000_0000, FRAME, FRAME, DROPPED]),
        st.integers(0, 64),                                        # small: lengths, enum cases, handles
        st.integers(0, MEMORY + 64),                               # pointers into (and just past) memory
        st.integers(MEMORY - 64, MEMORY + 8),                      # at the edge of memory
        st.integers(-0x8000_0000, 0x7FFF_FFFF),                    # anything
    )


def _f32():
    return st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, 1.0, -1.0, 3.0, 255.0, 1e9]))


_ARG = {"i": _i32(), "I": st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 1 << 33),
                                    st.sampled_from([0, 1, -1])),
        "f": _f32(), "F": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.5]))}


@st.composite
def host_calls(draw):
    """(function index, core arguments) for one random host call."""
    index = draw(st.integers(0, len(FUNCTIONS) - 1))
    spec = HOST_FUNCTIONS[FUNCTIONS[index]]
    args = [draw(_ARG[c]) for c in spec.params]
    fill = draw(st.binary(max_size=256))                            # what memory holds at the heap
    return index, args, fill


class _Fuzzer:
    """One runtime and driver processor, rebuilt when its memory has grown large."""

    def __init__(self):
        self.wasm = fuzz_driver()
        # The hard cap on one call (host functions included) is lower than the default, so
        # a host function looping on absurd sizes shows up as a timeout, not a stuck test.
        self.runtime = Runtime({}, NetworkPolicy(), SandboxLimits(
            call_hard_timeout_ms=500, memory_limit_bytes=64 * 1024 * 1024, max_consecutive_failures=1 << 30,
            max_live_mats=256))
        self.frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        self.processor = None
        self.new_processor()

    def new_processor(self):
        if self.processor is not None:
            self.processor.close()
        self.processor = self.runtime.load_bytes(self.wasm, "fuzz")
        self.processor.ctx.mats.insert(np.zeros((2, 2, 3), np.uint8))     # handle 1 …
        self.processor.ctx.mats.discard(1)                                 # … dropped

    def call(self, index: int, args: list, fill: bytes):
        p = self.processor
        if p.memory_bytes > 32 * 1024 * 1024 or len(p.ctx.mats) > 128:
            self.new_processor()
            p = self.processor
        frame_handle = p.ctx.mats._next           # the handle `process` will give the frame
        spec = HOST_FUNCTIONS[FUNCTIONS[index]]
        raw = bytearray()
        for c, a in zip(spec.params, args):
            a = frame_handle if a == FRAME else 1 if a == DROPPED else a
            fmt = {"i": "<i", "I": "<q", "f": "<f", "F": "<d"}[c]
            if c == "i":
                a = ((a + 0x8000_0000) & 0xFFFF_FFFF) - 0x8000_0000
            import struct
            try:
                raw += struct.pack(fmt, a).ljust(8, b"\0")
            except OverflowError:                 # a double beyond f32: store ±inf
                raw += struct.pack(fmt, float("inf") if a > 0 else float("-inf")).ljust(8, b"\0")
        mem = p.ctx.memory
        mem.write(ARGS_AT, bytes(raw))
        mem.write(HEAP_AT, fill)
        p.exports["which"].set_value(p.store, index)
        p.exports["heap"].set_value(p.store, HEAP_AT + 512)
        p.last_error = None
        errors_before, mats_before = p.stats.errors, len(p.ctx.mats)
        started = time.perf_counter()
        out = p.process(self.frame)               # must never raise
        elapsed = time.perf_counter() - started
        assert not p.disabled
        assert elapsed < 5.0, f"{FUNCTIONS[index]} took {elapsed:.1f} s"
        if p.stats.errors > errors_before:         # a clean failure: frame back, a sentence, no new mats
            assert out is self.frame
            assert isinstance(p.last_error, str) and p.last_error
            assert len(p.ctx.mats) == mats_before, (FUNCTIONS[index], p.last_error)
        else:
            assert isinstance(out, np.ndarray) and out.ndim >= 2
        return out

    def close(self):
        self.processor.close()
        self.runtime.close()


@pytest.fixture(scope="module")
def fuzzer():
    f = _Fuzzer()
    yield f
    f.close()


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(call=host_calls())
def test_random_arguments_into_every_host_function_fail_cleanly(fuzzer, call):
    """Random pointers, lengths, handles and numbers into every host function, from inside
    ``process``: success or a clean processor error, never a host crash, hang or mat leak."""
    fuzzer.call(*call)


def test_every_host_function_is_reached_with_the_frame_and_with_garbage(fuzzer):
    """Deterministic sweep: each of the host functions once with the frame handle and small
    numbers, once with out-of-bounds pointers (the fuzz above samples; this covers all)."""
    for index, key in enumerate(FUNCTIONS):
        spec = HOST_FUNCTIONS[key]
        fuzzer.call(index, [FRAME if c == "i" and j == 0 else 1 if c in "iI" else 1.0
                            for j, c in enumerate(spec.params)], b"\x01" * 64)
        fuzzer.call(index, [MEMORY - 2 if c == "i" else -1 if c == "I" else float("nan")
                            for c in spec.params], b"\xff" * 64)


# -- (b) random bytes as the vision server's reply to the ollama processor ------------------
@pytest.fixture(scope="module")
def scripted():
    server = ReplyServer()
    yield server
    server.stop()


_PIECES = [b'{"response":"', b'","done":false}\n', b'{"done":true}\n', b'{"error":"', b'"}\n', b"\n", b"\\",
           b"\\u", b"\\ud800", b"\xff", b"\xc3", b"\xe2\x82", b'"', b"{", b"}", b"[", b"]", b"null", b"1e999",
           b"data: ", b"[DONE]", b"<html>", b"\x00", b"\r\n"]


@st.composite
def replies(draw):
    """(status, chunks): NDJSON-ish fragments and raw bytes, cut at random places."""
    status = draw(st.sampled_from([200, 200, 200, 200, 404, 500, 503, 301, 204]))
    parts = draw(st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=64),
                                    st.text(max_size=32).map(lambda s: s.encode())), max_size=24))
    body = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    chunks, last = [], 0
    for cut in cuts + [len(body)]:
        chunks.append(body[last:cut])
        last = cut
    return status, chunks


@pytest.fixture(scope="module")
def ollama(scripted):
    cfg = {"ollama-url": scripted.url, "ollama-interval-ms": "0", "ollama-timeout-ms": "1000"}
    runtime = Runtime(cfg, NetworkPolicy.from_config(cfg), SandboxLimits(), None)
    yield runtime, runtime.load(OLLAMA_WASM)
    runtime.close()


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(reply=replies())
def test_random_server_replies_never_trap_the_ollama_processor(scripted, ollama, reply, real_frame):
    """Random bytes and chunkings as the streamed reply: the processor reads each through
    to its end (or gives up on it) without trapping, and every frame comes back."""
    runtime, p = ollama
    scripted.status, scripted.chunks = reply
    frame = real_frame[:120, :160].copy()
    # Requests run one at a time: once as many have ended as had started when the script was
    # set, plus one, a request that read this reply has ended.
    wanted = runtime.fetch_stats.started + 1
    finished = lambda: runtime.fetch_stats.completed + runtime.fetch_stats.failed   # noqa: E731
    served = scripted.served
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        out = p.process(frame)
        assert isinstance(out, np.ndarray) and out.shape == frame.shape
        if finished() >= wanted and scripted.served > served:
            break
        time.sleep(0.002)
    else:
        raise AssertionError("the reply was not read through in 3 s")
    assert p.stats.errors == 0, p.last_error
    assert not p.disabled
    assert p.ctx.fetch.in_flight <= 1
    assert len(p.ctx.mats) == 0


# -- (c) the in-wasm mat accessors against the host's own, on random programs ---------------
# A processor runs a random program of mat accesses and mat-changing host calls inside ONE
# `process` call (so the helper's copies stay live across operations), once with the
# accessors served inside wasm (runtime/accessors.py) and once with every call in Python.
# Results, errors and the mats at the end must be the same.
_OPS = [  # (import name, core params, result, kind of the extra value)
    *[(f"[method]mat.get-{ty}-at{s}", "i" * (4 if s else 3), "f" if ty == "float" else "i", None)
      for s in ("", "3") for ty in ("uchar", "int", "float")],
    *[(f"[method]mat.set-{ty}-at{s}", "i" * (4 if s else 3) + ("f" if ty == "float" else "i"), "",
       "f" if ty == "float" else "i") for s in ("", "3") for ty in ("uchar", "int", "float")],
    *[(f"[method]mat.{m}", "i", "i", None) for m in ("cols", "rows", "mattype", "elemsize", "empty", "step")],
    ("[method]mat.add-uchar", "ii", "", "i"),
    ("[method]mat.multiply-float", "if", "", "f"),
    ("[method]mat.copy-to", "ii", "", None),
    ("[method]mat.clone", "i", "i", None),
    ("[method]mat.close", "i", "", None),
    ("[resource-drop]mat", "i", "", None),
    ("[method]mat.region", "iiiii", "i", None),
    ("debug", "ii", "", None),                 # a host call that touches no mat
]
_PROGRAM_AT, _RESULTS_AT, _OP_BYTES = 1024, 16384, 32


def _accessor_program_driver() -> bytes:
    """A processor whose ``process`` runs the ``n`` operations at ``_PROGRAM_AT`` (32 bytes
    each: op index, four i32 arguments, an i32 and an f32 value), storing each result (or 1
    for none) and a done mark at ``_RESULTS_AT`` + 8·k."""
    imports, wrappers, names = [], [], []
    for i, (name, params, result, _) in enumerate(_OPS):
        module_name = "wasmvision:platform/logging" if name == "debug" else "wasm:cv/mat"
        sig = (f"(param {' '.join(_WAT[c] for c in params)})" if params else "") + \
              (f" (result {_WAT[result]})" if result else "")
        imports.append(f'(import "{module_name}" "{name}" (func $h{i} {sig}))')
        args, ints = [], 0
        for c in params:
            if c == "f":
                args.append("(f32.load offset=24 (local.get $p))")
            elif ints < 4:
                args.append(f"(i32.load offset={4 + 4 * ints} (local.get $p))")
                ints += 1
            else:
                args.append("(i32.load offset=20 (local.get $p))")
        if name == "debug":
            args = ["(i32.const 8)", "(i32.const 5)"]
        call = f"(call $h{i} {' '.join(args)})"
        store = (f"(f32.store (local.get $r) {call})" if result == "f" else
                 f"(i32.store (local.get $r) {call})" if result else f"{call} (i32.store (local.get $r) (i32.const 1))")
        wrappers.append(f"(func $w{i} (param $p i32) (param $r i32) {store} (i32.store offset=4 (local.get $r) (i32.const 1)))")
        names.append(f"$w{i}")
    return wasmtime.wat2wasm(f"""
(module
  {' '.join(imports)}
  (type $op (func (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "probe")
  (table {len(names)} funcref)
  (elem (i32.const 0) {' '.join(names)})
  (global $n (export "n") (mut i32) (i32.const 0))
  {' '.join(wrappers)}
  (func (export "process") (param $f i32) (result i32) (local $k i32) (local $p i32)
    (block $end (loop $next
      (br_if $end (i32.ge_u (local.get $k) (global.get $n)))
      (local.set $p (i32.add (i32.const {_PROGRAM_AT}) (i32.mul (local.get $k) (i32.const {_OP_BYTES}))))
      (call_indirect (type $op) (local.get $p) (i32.add (i32.const {_RESULTS_AT}) (i32.mul (local.get $k) (i32.const 8)))
                     (i32.load (local.get $p)))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br $next)))
    (local.get $f)))""")


def _accessor_mats() -> list[np.ndarray]:
    """Mats of every depth and layout the accessors meet (inserted as handles 1, 2, …)."""
    import cv2
    rng = np.random.default_rng(7)
    specials = np.array([np.nan, np.inf, -np.inf, 254.5, 255.5, -0.5, 0.5, 1.5, 2.5, -1e20, 1e20, 3e9, -3e9,
                         2147483647.5, 65535.5, -129.5, 127.5, 0.0, -0.0, 1e-40])
    u8 = rng.integers(0, 256, (12, 10, 3), np.uint8)
    f32 = rng.choice(specials, (6, 5)).astype(np.float32)
    f64 = rng.choice(specials, (3, 3, 2)).astype(np.float64)
    readonly = rng.integers(0, 256, (4, 4), np.uint8)
    readonly.flags.writeable = False
    wide = rng.integers(0, 256, (2, 70_000), np.uint8)
    big = rng.integers(0, 256, (160, 160, 3), np.uint8)            # 75 KiB: two windows
    return [u8, f32, rng.integers(-32768, 32768, (4, 3, 2), np.int16), rng.integers(-128, 128, (5, 4), np.int8),
            rng.integers(0, 65536, (3, 4, 2), np.uint16),
            rng.choice([0, 1, -1, 255, 256, -2**31, 2**31 - 1, 70000], (4, 4)).astype(np.int32), f64,
            rng.random((3, 3)).astype(np.float16), u8[2:7, 3:8], readonly,
            cv2.Mat(rng.random((1, 2, 3, 4)).astype(np.float32), wrap_channels=False), np.empty((0, 0), np.uint8),
            wide[:, :66_000], rng.integers(0, 256, 5, np.uint8), big, big[10:150, 20:140]]


_FRAME_SHAPE = (48, 64, 3)


def _dims(shape: tuple) -> tuple[int, int, int, int, int]:
    """(rows, elements per row, d0, d1, inner) of a mat of ``shape``, as cv._flat_index(3) see it."""
    size = int(np.prod(shape)) if shape else 1
    n0 = shape[0] if shape else 1
    d1 = shape[1] if len(shape) > 1 else 1
    return n0, size // n0 if n0 else 0, n0, d1, size // (n0 * d1) if n0 and d1 else 0


@st.composite
def accessor_programs(draw):
    """Programs of 1–60 operations, mostly on live mats with indexes inside them (so copies
    stay live across operations), sometimes past an edge, on a dropped or unknown handle."""
    mats = _accessor_mats()
    shapes = [a.shape for a in mats] + [_FRAME_SHAPE]
    # mats every access works on (the others: empty, 1-D, read-only) and the frame
    benign = [h for h, a in enumerate(mats, 1) if a.size and a.ndim > 1 and a.flags.writeable] + [len(shapes)]
    wild = st.sampled_from([0xFFFF_FFFF, 0x8000_0000, 70_000, 1_000])
    accesses = [k for k, o in enumerate(_OPS) if "-at" in o[0] or o[0].split(".")[-1] in
                ("cols", "rows", "mattype", "elemsize", "empty", "step")]
    changes = [k for k, o in enumerate(_OPS) if k not in accesses and o[0] not in ("[method]mat.close",
                                                                                    "[resource-drop]mat")]
    ends = [k for k, o in enumerate(_OPS) if o[0] in ("[method]mat.close", "[resource-drop]mat")]
    ops = []
    for _ in range(draw(st.integers(1, 60))):
        rare = draw(st.integers(0, 49))                             # 0: an op that may end the program
        op = draw(st.sampled_from(ends if rare == 0 else changes if rare < 8 else accesses))
        name = _OPS[op][0]
        h = draw(st.sampled_from(benign)) if draw(st.integers(0, 29)) else draw(st.one_of(
            st.integers(1, len(shapes) + 4), st.sampled_from([0, 0xFFFF_FFFF])))
        n0, rowlen, d0, d1, inner = _dims(shapes[h - 1]) if h <= len(shapes) else (4, 4, 4, 2, 2)
        edge = draw(st.integers(0, 39)) == 0                       # one in 40: anywhere
        if edge:
            ints = [h] + [draw(st.one_of(st.integers(0, 400), wild)) for _ in range(3)]
        elif name.endswith("at3"):
            ints = [h, draw(st.integers(0, max(d0 - 1, 0))), draw(st.integers(0, max(d1 - 1, 0))),
                    draw(st.integers(0, max(inner - 1, 0)))]
        else:   # on a continuous mat a column may run on into the next rows
            ints = [h, draw(st.integers(0, max(n0 - 1, 0))), draw(st.integers(0, max(rowlen - 1, 0))), 0]
        if name in ("[method]mat.copy-to", "[method]mat.region"):
            ints[1] = draw(st.integers(1, len(shapes) + 3)) if name == "[method]mat.copy-to" else ints[1]
        value_i = draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(0, 300)))
        value_f = draw(_f32())
        ops.append((op, ints, value_i, value_f))
    return ops


def _run_program(processor, ops) -> tuple:
    """Run ``ops`` in one process call on fresh copies of the mats; returns (results,
    last_error, mats after) where results are (done, value) per operation."""
    import struct
    mats = processor.ctx.mats
    mats._objects.clear()
    mats._next = 1
    for a in _accessor_mats():
        mats.insert(a)
    frame = (np.arange(np.prod(_FRAME_SHAPE), dtype=np.uint32) % 251).reshape(_FRAME_SHAPE).astype(np.uint8)
    program = b"".join(struct.pack("<iIIIIif4x", op, *(x & 0xFFFF_FFFF for x in ints), vi, vf)
                       for op, ints, vi, vf in ops)
    mem = processor.ctx.memory
    mem.write(_PROGRAM_AT, program)
    mem.write(_RESULTS_AT, bytes(8 * len(ops)))
    processor.exports["n"].set_value(processor.store, len(ops))
    processor.last_error = None
    processor.process(frame)
    raw = mem.read(_RESULTS_AT, 8 * len(ops))
    results = []
    for k, (op, *_rest) in enumerate(ops):
        value, done = struct.unpack_from("<4si", raw, 8 * k)
        if _OPS[op][2] == "f":
            v = struct.unpack("<f", value)[0]
            results.append((done, "nan" if v != v else v))
        else:
            results.append((done, struct.unpack("<i", value)[0]))
    after = {h: a for h, a in mats._objects.items()}
    return results, processor.last_error, after, frame


@pytest.fixture(scope="module")
def accessor_pair():
    wasm = _accessor_program_driver()
    limits = SandboxLimits(max_consecutive_failures=1 << 30, max_live_mats=256)
    served = Runtime({}, NetworkPolicy(), limits)
    host = Runtime({}, NetworkPolicy(), limits, wasm_accessors=False)
    a, b = served.load_bytes(wasm, "served"), host.load_bytes(wasm, "host")
    assert a.ctx.accessors is not None and b.ctx.accessors is None
    yield a, b
    served.close()
    host.close()


def _same_mat(x, y) -> bool:
    if type(x) is not type(y) or x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))


@pytest.mark.slow
@settings(max_examples=max(EXAMPLES // 10, 300), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(ops=accessor_programs())
def test_in_wasm_accessors_do_what_the_host_does(accessor_pair, ops):
    """Random programs of reads, writes (every depth, views, read-only and N-d mats, indexes
    in and out of bounds, unknown and dropped handles) mixed with host calls that read,
    change, replace or drop mats: the same results, the same error, the same mats."""
    served, host = accessor_pair
    got, error, mats, frame = _run_program(served, ops)
    want, want_error, want_mats, want_frame = _run_program(host, ops)
    assert got == want
    assert error == want_error
    assert mats.keys() == want_mats.keys()
    for h in mats:
        assert _same_mat(mats[h], want_mats[h]), (h, mats[h], want_mats[h])
    assert np.array_equal(frame, want_frame)
