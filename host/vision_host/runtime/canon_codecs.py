"""The canonical ABI's values, host side: one :class:`Codec` per WIT type, which knows the
type's flattening into core values, its size and alignment in guest memory, and how to lift
it from and lower it into either (used by :mod:`.canon`, which builds the host functions).

Source: the component model's ``CanonicalABI.md`` (flattening, sizes and alignments,
variant discriminants, ``join`` of case payloads).

Python values at the boundary:

Python values at the boundary:

=====================  ===========================================================
WIT                    Python
=====================  ===========================================================
bool, integers, floats ``bool``, ``int``, ``float``
char, string           ``str`` (a result may also be UTF-8 ``bytes``)
list<u8>               ``bytes`` (a result may be any bytes-like object)
list<T>                ``list`` (a result of numbers may be a numpy array)
record                 a namedtuple (fields in WIT order, ``-`` → ``_``); any sequence
                       in field order is accepted as a result
tuple<…>               ``tuple``
enum                   ``int`` case index (an ``IntEnum`` is fine)
flags                  ``int`` bit mask
variant                ``(case index, payload or None)``
option<T>              ``None`` or the value
result<T, E>           a parameter: ``(0, ok)`` or ``(1, err)``; a return value: the ok
                       value, or raise :class:`.canon.ErrResult` with the err value
own<R>, borrow<R>      ``int`` handle; a returned ``own<R>`` that is not an ``int`` is
                       put into the caller's table for ``R`` and its new handle returned

Every violation (pointer or length outside memory, invalid UTF-8 or char, an enum or
variant case that does not exist, an unknown handle) raises :class:`~.abi.AbiError`, which
traps the processor's call; the host never crashes.
"""

from __future__ import annotations

import collections
import ctypes
import keyword
import struct
from typing import Callable

import numpy as np

from .abi import AbiError
from .wit import EnumT, FlagsT, Handle, ListT, OptionT, Prim, RecordT, ResultT, TupleT, VariantT

__all__ = ["Codec", "codec", "direct_form", "flat_lifter", "tuple_codec"]


def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def _to_i32(v: int) -> int:
    v &= 0xFFFF_FFFF
    return v - 0x1_0000_0000 if v & 0x8000_0000 else v


def _to_i64(v: int) -> int:
    v &= 0xFFFF_FFFF_FFFF_FFFF
    return v - 0x1_0000_0000_0000_0000 if v & 0x8000_0000_0000_0000 else v


class Codec:
    """Canonical-ABI layout and conversions of one WIT type.

    ``flat`` is its flattening (letters of :data:`.canon.VALTYPES`); ``size``/``align`` its
    in-memory layout in bytes. ``lift_flat`` reads ``len(flat)`` values of ``args`` from
    index ``i``; ``load``/``store`` read/write at ``offset`` of a buffer already copied from
    (or about to be copied to) guest memory; ``lower_flat`` appends core values to ``out``.
    """

    flat: str = ""
    size: int = 0
    align: int = 1

    def lift_flat(self, cx, args, i):
        raise NotImplementedError

    def load(self, cx, buf, off):
        raise NotImplementedError

    def store(self, cx, buf, off, value) -> None:
        raise NotImplementedError

    def lower_flat(self, cx, value, out: list) -> None:
        raise NotImplementedError


class _Int(Codec):
    _FORMATS = {"u8": ("B", 8, False), "s8": ("b", 8, True), "u16": ("H", 16, False), "s16": ("h", 16, True),
                "u32": ("I", 32, False), "s32": ("i", 32, True), "u64": ("Q", 64, False), "s64": ("q", 64, True)}

    def __init__(self, name: str):
        fmt, bits, signed = self._FORMATS[name]
        self.name = name
        self.struct = struct.Struct("<" + fmt)
        self.size = self.align = bits // 8
        self.flat = "I" if bits == 64 else "i"
        self.mask = (1 << bits) - 1
        self.sign = 1 << (bits - 1) if signed else 0

    def convert(self, v: int) -> int:
        v = int(v) & self.mask
        return v - (self.sign << 1) if self.sign and v & self.sign else v

    def lift_flat(self, cx, args, i):
        return self.convert(args[i]), i + 1

    def load(self, cx, buf, off):
        return self.struct.unpack_from(buf, off)[0]

    def store(self, cx, buf, off, value):
        self.struct.pack_into(buf, off, self.convert(value))

    def lower_flat(self, cx, value, out):
        out.append(_to_i64(value) if self.flat == "I" else _to_i32(value))


class _Bool(Codec):
    flat, size, align = "i", 1, 1

    def lift_flat(self, cx, args, i):
        return args[i] != 0, i + 1

    def load(self, cx, buf, off):
        return buf[off] != 0

    def store(self, cx, buf, off, value):
        buf[off] = 1 if value else 0

    def lower_flat(self, cx, value, out):
        out.append(1 if value else 0)


class _Float(Codec):
    def __init__(self, name: str):
        self.name = name
        self.struct = struct.Struct("<f" if name == "f32" else "<d")
        self.size = self.align = self.struct.size
        self.flat = "f" if name == "f32" else "F"

    def lift_flat(self, cx, args, i):
        return float(args[i]), i + 1

    def load(self, cx, buf, off):
        return self.struct.unpack_from(buf, off)[0]

    def store(self, cx, buf, off, value):
        self.struct.pack_into(buf, off, float(value))

    def lower_flat(self, cx, value, out):
        out.append(float(value))


class _Char(_Int):
    def __init__(self):
        super().__init__("u32")

    def _char(self, code: int) -> str:
        if code >= 0x110000 or 0xD800 <= code <= 0xDFFF:
            raise AbiError(f"{code:#x} is not a Unicode scalar value")
        return chr(code)

    def lift_flat(self, cx, args, i):
        return self._char(args[i] & 0xFFFF_FFFF), i + 1

    def load(self, cx, buf, off):
        return self._char(super().load(cx, buf, off))

    def store(self, cx, buf, off, value):
        super().store(cx, buf, off, ord(value))

    def lower_flat(self, cx, value, out):
        out.append(ord(value))


_PTR_LEN = struct.Struct("<II")


class _String(Codec):
    flat, size, align = "ii", 8, 4

    def lift_flat(self, cx, args, i):
        return cx.memory.read_str(args[i] & 0xFFFF_FFFF, args[i + 1] & 0xFFFF_FFFF), i + 2

    def load(self, cx, buf, off):
        return cx.memory.read_str(*_PTR_LEN.unpack_from(buf, off))

    def _put(self, cx, value):
        data = value if isinstance(value, (bytes, bytearray)) else str(value).encode("utf-8")
        return cx.memory.lower_bytes(data)

    def store(self, cx, buf, off, value):
        _PTR_LEN.pack_into(buf, off, *self._put(cx, value))

    def lower_flat(self, cx, value, out):
        out.extend(_to_i32(v) for v in self._put(cx, value))


#: numpy dtypes of list elements that can be copied as one block.
_BLOCK_DTYPES = {"u8": "<u1", "s8": "<i1", "u16": "<u2", "s16": "<i2", "u32": "<u4", "s32": "<i4",
                 "u64": "<u8", "s64": "<i8", "f32": "<f4", "f64": "<f8"}


class _List(Codec):
    flat, size, align = "ii", 8, 4

    def __init__(self, elem: Codec, block_dtype: str | None):
        self.elem = elem
        self.block = np.dtype(block_dtype) if block_dtype else None
        self.is_bytes = block_dtype == "<u1"

    def _lift(self, cx, ptr, n):
        ptr &= 0xFFFF_FFFF
        n &= 0xFFFF_FFFF
        esize = self.elem.size
        if n and ptr % self.elem.align:
            raise AbiError(f"list at {ptr} is not aligned to {self.elem.align}")
        if n * esize > cx.memory.size:
            raise AbiError(f"list of {n} elements at {ptr} is larger than guest memory")
        data = cx.memory.read(ptr, n * esize)
        if self.is_bytes:
            return data
        if self.block is not None:
            return np.frombuffer(data, self.block).tolist()
        return [self.elem.load(cx, data, k * esize) for k in range(n)]

    def lift_flat(self, cx, args, i):
        return self._lift(cx, args[i], args[i + 1]), i + 2

    def load(self, cx, buf, off):
        return self._lift(cx, *_PTR_LEN.unpack_from(buf, off))

    def _put(self, cx, value):
        """Copy ``value`` into a fresh guest allocation; returns (ptr, element count)."""
        esize = self.elem.size
        if self.block is not None:
            if isinstance(value, np.ndarray):
                data = np.ascontiguousarray(value, self.block).tobytes()
            elif isinstance(value, (bytes, bytearray, memoryview)):
                data = bytes(value)
            else:
                data = np.asarray(value, self.block).tobytes()
        else:
            items = list(value)
            buf = bytearray(len(items) * esize)
            for k, item in enumerate(items):
                self.elem.store(cx, buf, k * esize, item)
            data = bytes(buf)
        ptr = cx.memory.alloc(len(data), self.elem.align) if data else self.elem.align
        cx.memory.write(ptr, data)
        return ptr, len(data) // esize

    def store(self, cx, buf, off, value):
        _PTR_LEN.pack_into(buf, off, *self._put(cx, value))

    def lower_flat(self, cx, value, out):
        out.extend(_to_i32(v) for v in self._put(cx, value))


class _Record(Codec):
    def __init__(self, name: str, fields: list[tuple[str, Codec]], tuple_type=None):
        self.fields = [c for _, c in fields]
        offset, align = 0, 1
        self.offsets = []
        for c in self.fields:
            offset = _align(offset, c.align)
            self.offsets.append(offset)
            offset += c.size
            align = max(align, c.align)
        self.align = align
        self.size = _align(offset, align)
        self.flat = "".join(c.flat for c in self.fields)
        self.make = tuple_type or (lambda *values: tuple(values))

    def lift_flat(self, cx, args, i):
        values = []
        for c in self.fields:
            v, i = c.lift_flat(cx, args, i)
            values.append(v)
        return self.make(*values), i

    def load(self, cx, buf, off):
        return self.make(*(c.load(cx, buf, off + o) for c, o in zip(self.fields, self.offsets)))

    def store(self, cx, buf, off, value):
        if len(value) != len(self.fields):
            raise TypeError(f"a record of {len(self.fields)} fields was returned as {value!r}")
        for c, o, v in zip(self.fields, self.offsets, value):
            c.store(cx, buf, off + o, v)

    def lower_flat(self, cx, value, out):
        for c, v in zip(self.fields, value):
            c.lower_flat(cx, v, out)


def _join(a: str, b: str) -> str:
    if a == b:
        return a
    if {a, b} == {"i", "f"}:
        return "i"
    return "I"


_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")


def _coerce_in(value, have: str, want: str):
    """A flat value of joined type ``have`` reinterpreted as the case's own type ``want``."""
    if have == want:
        return value
    if want == "f":
        return _F32.unpack(_I32.pack(_to_i32(value)))[0]
    if want == "F":
        return _F64.unpack(_I64.pack(_to_i64(value)))[0]
    return value      # i32 carried in an i64


def _coerce_out(value, have: str, want: str):
    if have == want:
        return value
    if have == "f":
        value = _I32.unpack(_F32.pack(value))[0]
    elif have == "F":
        value = _I64.unpack(_F64.pack(value))[0]
    return value


class _Variant(Codec):
    """Variants, and enum, option and result as their special cases."""

    def __init__(self, name: str, cases: list[Codec | None], kind: str):
        self.name = name
        self.cases = cases
        self.kind = kind    # "variant", "enum", "option", "result"
        n = len(cases)
        self.disc = _Int("u8" if n <= 1 << 8 else "u16" if n <= 1 << 16 else "u32")
        payload_align = max([c.align for c in cases if c is not None], default=1)
        self.align = max(self.disc.size, payload_align)
        self.payload_offset = _align(self.disc.size, payload_align)
        self.size = _align(self.payload_offset + max([c.size for c in cases if c is not None], default=0),
                           self.align)
        joined = ""
        for c in cases:
            if c is None:
                continue
            for k, t in enumerate(c.flat):
                joined = joined + t if k >= len(joined) else joined[:k] + _join(joined[k], t) + joined[k + 1:]
        self.joined = joined
        self.flat = "i" + joined

    def _case(self, index: int) -> Codec | None:
        if not 0 <= index < len(self.cases):
            raise AbiError(f"{self.name}: case {index} does not exist (it has {len(self.cases)})")
        return self.cases[index]

    def _value(self, index, payload):
        if self.kind == "enum":
            return index
        if self.kind == "option":
            return payload if index else None
        return index, payload

    def lift_flat(self, cx, args, i):
        index = args[i] & 0xFFFF_FFFF
        case = self._case(index)
        payload = None
        if case is not None:
            vals = [_coerce_in(args[i + 1 + k], self.joined[k], t) for k, t in enumerate(case.flat)]
            payload, _ = case.lift_flat(cx, vals, 0)
        return self._value(index, payload), i + 1 + len(self.joined)

    def load(self, cx, buf, off):
        index = self.disc.load(cx, buf, off)
        case = self._case(index)
        payload = case.load(cx, buf, off + self.payload_offset) if case is not None else None
        return self._value(index, payload)

    def _split(self, value):
        """(case index, payload) of a Python value."""
        if self.kind == "enum":
            return int(value), None
        if self.kind == "option":
            return (0, None) if value is None else (1, value)
        return value

    def store(self, cx, buf, off, value):
        index, payload = self._split(value)
        self.disc.store(cx, buf, off, index)
        case = self.cases[index] if 0 <= index < len(self.cases) else None
        if case is not None:
            case.store(cx, buf, off + self.payload_offset, payload)

    def lower_flat(self, cx, value, out):
        index, payload = self._split(value)
        out.append(index)
        case = self.cases[index] if 0 <= index < len(self.cases) else None
        vals: list = []
        if case is not None:
            case.lower_flat(cx, payload, vals)
        for k, t in enumerate(self.joined):
            out.append(_coerce_out(vals[k], case.flat[k], t) if k < len(vals) else (0.0 if t in "fF" else 0))


class _Flags(Codec):
    def __init__(self, n: int):
        self.words = (n + 31) // 32
        self.int = _Int("u8" if n <= 8 else "u16" if n <= 16 else "u32")
        self.size = 0 if n == 0 else self.int.size if n <= 16 else 4 * self.words
        self.align = 1 if n == 0 else self.int.align
        self.flat = "i" * self.words

    def lift_flat(self, cx, args, i):
        value = 0
        for k in range(self.words):
            value |= (args[i + k] & 0xFFFF_FFFF) << (32 * k)
        return value, i + self.words

    def load(self, cx, buf, off):
        if self.size <= 2:
            return self.int.load(cx, buf, off) if self.size else 0
        return sum(struct.unpack_from("<I", buf, off + 4 * k)[0] << (32 * k) for k in range(self.words))

    def store(self, cx, buf, off, value):
        if self.size <= 2:
            if self.size:
                self.int.store(cx, buf, off, value)
            return
        for k in range(self.words):
            struct.pack_into("<I", buf, off + 4 * k, (value >> (32 * k)) & 0xFFFF_FFFF)

    def lower_flat(self, cx, value, out):
        out.extend(_to_i32(value >> (32 * k)) for k in range(self.words))


class _Handle(_Int):
    def __init__(self, handle: Handle):
        super().__init__("u32")
        self.resource = handle.resource.key

    def _handle(self, cx, value) -> int:
        if isinstance(value, (int, np.integer)):
            return int(value)
        return cx.table(self.resource).insert(value)

    def store(self, cx, buf, off, value):
        super().store(cx, buf, off, self._handle(cx, value))

    def lower_flat(self, cx, value, out):
        out.append(_to_i32(self._handle(cx, value)))


_CODECS: dict[tuple, Codec] = {}


def _field_name(name: str) -> str:
    name = name.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


def codec(ty) -> Codec | None:
    """The :class:`Codec` of a resolved WIT type (None for ``_``), cached per type."""
    if ty is None:
        return None
    key = _type_key(ty)
    found = _CODECS.get(key)
    if found is not None:
        return found
    if isinstance(ty, Prim):
        name = ty.name
        made = (_Bool() if name == "bool" else _Float(name) if name in ("f32", "f64") else _Char()
                if name == "char" else _String() if name == "string" else _Int(name))
    elif isinstance(ty, ListT):
        elem = ty.elem
        block = _BLOCK_DTYPES.get(elem.name) if isinstance(elem, Prim) else None
        made = _List(codec(elem), block)
    elif isinstance(ty, RecordT):
        tuple_type = collections.namedtuple(_field_name(ty.name).replace("_", ""),
                                            [_field_name(n) for n, _ in ty.fields], rename=True)
        made = _Record(ty.name, [(n, codec(t)) for n, t in ty.fields], tuple_type)
    elif isinstance(ty, TupleT):
        made = _Record("tuple", [(str(k), codec(t)) for k, t in enumerate(ty.elems)])
    elif isinstance(ty, EnumT):
        made = _Variant(ty.name, [None] * len(ty.cases), "enum")
    elif isinstance(ty, VariantT):
        made = _Variant(ty.name, [codec(t) for _, t in ty.cases], "variant")
    elif isinstance(ty, OptionT):
        made = _Variant("option", [None, codec(ty.elem)], "option")
    elif isinstance(ty, ResultT):
        made = _Variant("result", [codec(ty.ok), codec(ty.err)], "result")
    elif isinstance(ty, FlagsT):
        made = _Flags(len(ty.flags))
    elif isinstance(ty, Handle):
        made = _Handle(ty)
    else:
        raise TypeError(f"no canonical-ABI codec for {ty!r}")
    _CODECS[key] = made
    return made


def _type_key(ty):
    if isinstance(ty, Prim):
        return ("prim", ty.name)
    if isinstance(ty, (ListT, OptionT)):
        return (type(ty).__name__, _type_key(ty.elem))
    if isinstance(ty, ResultT):
        return ("result", _type_key(ty.ok), _type_key(ty.err))
    if isinstance(ty, TupleT):
        return ("tuple",) + tuple(_type_key(e) for e in ty.elems)
    if isinstance(ty, Handle):
        return ("handle", ty.resource.key, ty.own)
    # Named types by structure, not identity: the WIT is parsed more than once, and a cache
    # keyed by id() could hand a dead type's codec to a new object at the same address.
    if isinstance(ty, RecordT):
        return ("record", ty.name) + tuple((n, _type_key(t)) for n, t in ty.fields)
    if isinstance(ty, EnumT):
        return ("enum", ty.name, len(ty.cases))
    if isinstance(ty, FlagsT):
        return ("flags", ty.name, len(ty.flags))
    if isinstance(ty, VariantT):
        return ("variant", ty.name) + tuple((n, _type_key(t)) for n, t in ty.cases)
    if ty is None:
        return None
    raise TypeError(f"no canonical-ABI codec for {ty!r}")


def tuple_codec(codecs: list[Codec]) -> Codec:
    """The codec of a tuple of ``codecs`` (how parameters spilled to memory are laid out)."""
    return _Record("tuple", [(str(k), c) for k, c in enumerate(codecs)])


def _lift_expr(c: Codec, i: int, ns: dict) -> tuple[str, int]:
    """Python source that lifts ``c`` from the flat core values ``a[i]…`` (``cx`` the
    instance context), with the objects it names put in ``ns``; and the next flat index.
    What it computes is ``c.lift_flat(cx, a, i)``, inlined where that is plain arithmetic."""
    kind = type(c)
    if kind in (_Int, _Handle):
        if c.sign:
            return f"(((a[{i}] & {c.mask}) ^ {c.sign}) - {c.sign})", i + 1
        return f"(a[{i}] & {c.mask})", i + 1
    if kind is _Float:
        return f"float(a[{i}])", i + 1
    if kind is _Bool:
        return f"(a[{i}] != 0)", i + 1
    if kind is _String:
        return f"cx.memory.read_str(a[{i}] & 4294967295, a[{i + 1}] & 4294967295)", i + 2
    name = f"c{len(ns)}"
    ns[name] = c
    if kind is _Record:
        fields = []
        for f in c.fields:
            expr, i = _lift_expr(f, i, ns)
            fields.append(expr)
        return f"{name}.make({', '.join(fields)})", i
    if kind is _List:
        return f"{name}._lift(cx, a[{i}], a[{i + 1}])", i + 2
    if kind is _Variant and c.kind == "enum":      # a case index in range is the value itself
        return f"(a[{i}] if 0 <= a[{i}] < {len(c.cases)} else {name}.lift_flat(cx, a, {i})[0])", i + 1
    return f"{name}.lift_flat(cx, a, {i})[0]", i + len(c.flat)


def flat_lifter(params: list[Codec]) -> Callable:
    """``lift(cx, a)``: the tuple of Python values of ``params`` lifted from their flat core
    values ``a`` (as each codec's ``lift_flat`` would, in one generated function)."""
    ns: dict = {}
    exprs, i = [], 0
    for c in params:
        expr, i = _lift_expr(c, i, ns)
        exprs.append(expr)
    source = f"def lift(cx, a):\n    return ({''.join(e + ', ' for e in exprs)})\n"
    exec(compile(source, "<canonical-abi lift>", "exec"), ns)   # noqa: S102 - source built above from codecs
    return ns["lift"]



#: ctypes types of WIT scalars that a raw core slot can be read as directly (little-endian:
#: the low bytes of an i32 slot are its u8).
_SCALAR_CTYPES = {"u8": ctypes.c_uint8, "s8": ctypes.c_int8, "u16": ctypes.c_uint16, "s16": ctypes.c_int16,
                  "u32": ctypes.c_uint32, "s32": ctypes.c_int32, "u64": ctypes.c_uint64, "s64": ctypes.c_int64,
                  "f32": ctypes.c_float, "f64": ctypes.c_double}


def _scalar_ctype(c: Codec | None):
    """The ctypes type a raw core slot can be read as to lift ``c``, or None when ``c`` is not a
    plain integer (handles included) or float."""
    if type(c) in (_Int, _Handle, _Float):
        return _SCALAR_CTYPES[c.name]
    return None


def direct_form(params: list[Codec], result: Codec | None, impl: Callable) -> tuple | None:
    """``(param_ctypes, implementation)`` for a function of these parameter and result codecs
    whose arguments can be read straight from wasmtime's raw core slots, or None.

    It exists when every parameter is an integer (handles included) or a float and the
    result is nothing, an integer or a float (``implementation`` is ``impl``) or a bool
    (``implementation`` returns it as 0/1). Reading each raw argument slot as its
    ``param_ctypes`` entry lifts it (u8 is the low byte of its i32, u32 its unsigned reading,
    …); see :attr:`.canon.HostFunction.direct`.
    """
    types = tuple(_scalar_ctype(c) for c in params)
    if any(t is None for t in types):
        return None
    if result is None or type(result) in (_Int, _Float):
        return types, impl
    if type(result) is _Bool:
        def as_int(ctx, *values):
            return 1 if impl(ctx, *values) else 0
        return types, as_int
    return None
