"""Call host functions through the real wasm boundary with Python values.

:class:`Guest` loads a small driver processor that imports chosen host functions and
re-exports each as ``call:<module>#<name>``; :meth:`Guest.call` lowers Python values the way
a guest's bindings would (strings, lists and records written into guest memory, parameters
spilled to memory past 16 flat values, a return area for results wider than one value),
calls the export, and lifts the result back.

This is a second, deliberately independent implementation of the canonical ABI's layouts
(``CanonicalABI.md``), written only from the WIT type model, so the tests cross-check
:mod:`vision_host.runtime.canon` instead of reusing it.

Python values: records are tuples in field order (results come back as namedtuples with
``-`` → ``_``), enums are case indexes, resources are int handles, ``list<u8>`` is bytes.
A ``result`` that comes back ``err`` raises :class:`GuestErr`.
"""

from __future__ import annotations

import collections
import struct

import wasmtime

from conftest import REPO
from vision_host.runtime import Runtime
from vision_host.runtime.linking import HOST_FUNCTIONS
from vision_host.runtime.wit import EnumT, FlagsT, Handle, ListT, OptionT, Prim, RecordT, ResultT, TupleT, parse_dir

WIT = parse_dir(REPO / "wasm" / "wit")
FUNCTIONS = {(fn.interface, fn.import_name): fn for iface in WIT.values() for fn in iface.functions.values()}

_WAT = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}
_PRIM = {"bool": ("<B", 1), "u8": ("<B", 1), "s8": ("<b", 1), "u16": ("<H", 2), "s16": ("<h", 2),
         "u32": ("<I", 4), "s32": ("<i", 4), "char": ("<I", 4), "u64": ("<Q", 8), "s64": ("<q", 8),
         "f32": ("<f", 4), "f64": ("<d", 8)}
_FLAT = {"u64": "I", "s64": "I", "f32": "f", "f64": "F"}


class GuestErr(Exception):
    """The ``err`` case of a host function's ``result``; ``.value`` is its payload."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


#: A bump ``cabi_realloc`` over the global ``$heap`` that grows memory as far as an allocation
#: needs and traps when it cannot (or when the end would wrap around); alignment 0 counts as 1.
BUMP_REALLOC = """(func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32) (local $end i32)
    (if (i32.eqz (local.get 2)) (then (local.set 2 (i32.const 1))))
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get 2))))
    (local.set $end (i32.add (local.get $p) (local.get 3)))
    (if (i32.lt_u (local.get $end) (local.get $p)) (then unreachable))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end)
                                                  (i32.mul (memory.size) (i32.const 65536)))
                                          (i32.const 65535)) (i32.const 16))) (i32.const -1))
              (then unreachable))))
    (global.set $heap (local.get $end))
    (local.get $p))"""


def driver_bytes(functions) -> bytes:
    """A driver processor for ``functions`` ((module, name) pairs) with a bump allocator that
    grows memory as far as an allocation needs."""
    imports, wrappers = [], []
    for i, key in enumerate(functions):
        spec = HOST_FUNCTIONS[key]
        params = " ".join(_WAT[c] for c in spec.params)
        results = " ".join(_WAT[c] for c in spec.results)
        sig = (f"(param {params})" if params else "") + (f" (result {results})" if results else "")
        imports.append(f'(import "{spec.module}" "{spec.name}" (func $h{i} {sig}))')
        args = " ".join(f"(local.get {j})" for j in range(len(spec.params)))
        wrappers.append(f'(func (export "call:{spec.module}#{spec.name}") {sig} (call $h{i} {args}))')
    return wasmtime.wat2wasm(f"""
(module
  {' '.join(imports)}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  {BUMP_REALLOC}
  (func (export "process") (param i32) (result i32) (local.get 0))
  {' '.join(wrappers)}
)""")


# -- layouts ------------------------------------------------------------------------------------
def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _cases(t):
    if isinstance(t, EnumT):
        return [None] * len(t.cases)
    if isinstance(t, OptionT):
        return [None, t.elem]
    if isinstance(t, ResultT):
        return [t.ok, t.err]
    return [c for _, c in t.cases]


def _disc_size(n: int) -> int:
    return 1 if n <= 256 else 2 if n <= 65536 else 4


def _fields(t):
    return [f for _, f in t.fields] if isinstance(t, RecordT) else list(t.elems)


def size_align(t) -> tuple[int, int]:
    if isinstance(t, Prim):
        if t.name == "string":
            return 8, 4
        size = _PRIM[t.name][1]
        return size, size
    if isinstance(t, ListT):
        return 8, 4
    if isinstance(t, Handle):
        return 4, 4
    if isinstance(t, (RecordT, TupleT)):
        off, al = 0, 1
        for f in _fields(t):
            s, a = size_align(f)
            off = _align(off, a) + s
            al = max(al, a)
        return _align(off, al), al
    if isinstance(t, FlagsT):
        n = len(t.flags)
        return (1, 1) if n <= 8 else (2, 2) if n <= 16 else (4 * -(-n // 32), 4)
    cases = _cases(t)
    d = _disc_size(len(cases))
    pa = max([size_align(c)[1] for c in cases if c is not None], default=1)
    ps = max([size_align(c)[0] for c in cases if c is not None], default=0)
    al = max(d, pa)
    return _align(_align(d, pa) + ps, al), al


def flatten(t) -> str:
    if isinstance(t, Prim):
        return "ii" if t.name == "string" else _FLAT.get(t.name, "i")
    if isinstance(t, ListT):
        return "ii"
    if isinstance(t, Handle):
        return "i"
    if isinstance(t, (RecordT, TupleT)):
        return "".join(flatten(f) for f in _fields(t))
    if isinstance(t, FlagsT):
        return "i" * max(1, -(-len(t.flags) // 32))
    joined = ""
    for c in _cases(t):
        if c is None:
            continue
        for k, v in enumerate(flatten(c)):
            if k >= len(joined):
                joined += v
            elif joined[k] != v:
                joined = joined[:k] + ("i" if {joined[k], v} == {"i", "f"} else "I") + joined[k + 1:]
    return "i" + joined


# -- the guest ---------------------------------------------------------------------------------
class Guest:
    """A loaded driver processor for ``functions`` in ``runtime``."""

    def __init__(self, runtime: Runtime, functions):
        self.processor = runtime.load_bytes(driver_bytes(functions), "driver")
        self.store = self.processor.store
        self.ctx = self.processor.ctx
        self.mem = self.ctx.memory
        self.mats = self.ctx.mats
        self._records: dict[int, type] = {}

    # memory helpers
    def alloc(self, size: int, align: int) -> int:
        return self.mem.alloc(max(size, 1), align)

    def _record_type(self, t):
        made = self._records.get(id(t))
        if made is None:
            made = collections.namedtuple(t.name.replace("-", "_"), [n.replace("-", "_") for n, _ in t.fields],
                                          rename=True)
            self._records[id(t)] = made
        return made

    def store_value(self, t, v, addr: int) -> None:
        if isinstance(t, Prim):
            if t.name == "string":
                data = v.encode() if isinstance(v, str) else bytes(v)
                ptr = self.alloc(len(data), 1)
                self.mem.write(ptr, data)
                self.mem.write(addr, struct.pack("<II", ptr, len(data)))
            else:
                fmt = _PRIM[t.name][0]
                self.mem.write(addr, struct.pack(fmt, ord(v) if t.name == "char" else
                                                 (1 if v else 0) if t.name == "bool" else v))
        elif isinstance(t, ListT):
            es, ea = size_align(t.elem)
            items = bytes(v) if isinstance(v, (bytes, bytearray)) else list(v)
            ptr = self.alloc(es * len(items), ea)
            if isinstance(items, bytes):
                self.mem.write(ptr, items)
            else:
                for k, item in enumerate(items):
                    self.store_value(t.elem, item, ptr + k * es)
            self.mem.write(addr, struct.pack("<II", ptr, len(items)))
        elif isinstance(t, Handle):
            self.mem.write(addr, struct.pack("<I", v))
        elif isinstance(t, (RecordT, TupleT)):
            off = 0
            for f, fv in zip(_fields(t), v, strict=True):
                s, a = size_align(f)
                off = _align(off, a)
                self.store_value(f, fv, addr + off)
                off += s
        elif isinstance(t, EnumT):
            self.mem.write(addr, int(v).to_bytes(_disc_size(len(t.cases)), "little"))
        else:
            raise NotImplementedError(f"storing {t!r}")

    def lower(self, t, v) -> list:
        """Flat core values of ``v`` (strings and lists written into guest memory)."""
        if isinstance(t, Prim) and t.name != "string":
            return [float(v)] if t.name in ("f32", "f64") else [ord(v) if t.name == "char" else int(v)]
        if isinstance(t, (Prim, ListT)):
            tmp = self.alloc(8, 4)
            self.store_value(t, v, tmp)
            return list(struct.unpack("<ii", self.mem.read(tmp, 8)))
        if isinstance(t, Handle):
            return [int(v)]
        if isinstance(t, (RecordT, TupleT)):
            out = []
            for f, fv in zip(_fields(t), v, strict=True):
                out += self.lower(f, fv)
            return out
        if isinstance(t, EnumT):
            return [int(v)]
        raise NotImplementedError(f"lowering {t!r}")

    def load(self, t, addr: int):
        if isinstance(t, Prim):
            if t.name == "string":
                ptr, n = struct.unpack("<II", self.mem.read(addr, 8))
                return self.mem.read(ptr, n).decode()
            fmt, size = _PRIM[t.name]
            v = struct.unpack(fmt, self.mem.read(addr, size))[0]
            return bool(v) if t.name == "bool" else chr(v) if t.name == "char" else v
        if isinstance(t, ListT):
            ptr, n = struct.unpack("<II", self.mem.read(addr, 8))
            if isinstance(t.elem, Prim) and t.elem.name == "u8":
                return self.mem.read(ptr, n)
            es = size_align(t.elem)[0]
            return [self.load(t.elem, ptr + k * es) for k in range(n)]
        if isinstance(t, Handle):
            return struct.unpack("<I", self.mem.read(addr, 4))[0]
        if isinstance(t, (RecordT, TupleT)):
            off, values = 0, []
            for f in _fields(t):
                s, a = size_align(f)
                off = _align(off, a)
                values.append(self.load(f, addr + off))
                off += s
            return self._record_type(t)(*values) if isinstance(t, RecordT) else tuple(values)
        cases = _cases(t)
        d = _disc_size(len(cases))
        index = int.from_bytes(self.mem.read(addr, d), "little")
        if isinstance(t, EnumT):
            return index
        payload_at = addr + _align(d, max([size_align(c)[1] for c in cases if c is not None], default=1))
        case = cases[index]
        payload = self.load(case, payload_at) if case is not None else None
        if isinstance(t, ResultT):
            if index == 1:
                raise GuestErr(payload)
            return payload
        if isinstance(t, OptionT):
            return payload if index else None
        return index, payload

    def lift_one(self, t, v):
        """A result that fits in one core value."""
        if isinstance(t, Prim):
            if t.name == "bool":
                return v != 0
            if t.name in ("f32", "f64"):
                return v
            fmt, size = _PRIM[t.name]
            return struct.unpack(fmt, (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))[0]
        if isinstance(t, (Handle, EnumT)):
            return v & 0xFFFF_FFFF
        raise NotImplementedError(f"lifting {t!r} from one value")

    # calling
    def call(self, module: str, name: str, *values):
        """Call ``module#name`` with Python ``values``; returns the lifted result."""
        fn = FUNCTIONS[(module, name)]
        spec = HOST_FUNCTIONS[(module, name)]
        assert len(values) == len(fn.params), f"{name} takes {len(fn.params)} parameters"
        flat_params = "".join(flatten(t) for _, t in fn.params)
        if len(flat_params) > 16:
            record = TupleT(tuple(t for _, t in fn.params))
            size, align = size_align(record)
            ptr = self.alloc(size, align)
            self.store_value(record, values, ptr)
            args = [ptr]
        else:
            args = []
            for (_, t), v in zip(fn.params, values):
                args += self.lower(t, v)
        flat_result = flatten(fn.result) if fn.result is not None else ""
        retptr = None
        if len(flat_result) > 1:
            size, align = size_align(fn.result)
            retptr = self.alloc(size, align)
            args.append(retptr)
        assert spec.params == ("i" if len(flat_params) > 16 else flat_params) + ("i" if retptr else ""), \
            f"{name}: this helper's lowering disagrees with the host's core signature"
        out = self.processor.exports[f"call:{module}#{name}"](self.store, *args)
        if fn.result is None:
            return None
        if retptr is not None:
            return self.load(fn.result, retptr)
        return self.lift_one(fn.result, out)

    def new_mat(self, array) -> int:
        """Put ``array`` in the instance's mat table (as the host does with a frame)."""
        return self.mats.insert(array)
