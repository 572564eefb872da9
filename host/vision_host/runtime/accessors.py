"""The ``wasm:cv/mat`` data accessors served inside wasm: a helper module linked into each
processor's instance answers ``get-*-at``/``set-*-at`` (2- and 3-index, uchar/int/float) and
``cols``, ``rows``, ``mattype``, ``elemsize``, ``empty`` and ``step`` without leaving wasm.

Why: a processor reading pixels one by one (wasmVision's ``asciify`` calls ``get-uchar-at``
14 400 times a frame) spends a few µs per call crossing into Python; here a call is a
wasm-to-wasm call of a few ns.

How. The helper is a small core module (:data:`HELPER_WAT`) instantiated in the processor's
store, with its own linear memory, which the processor cannot reach: the processor's imports
of those functions are linked to the helper's exports. The helper memory holds

* descriptors (:data:`DESCRIPTORS` of them) of mats the processor touched: handle, depth,
  writable and continuous flags, the shape numbers the element index needs, and the values of
  the six metadata functions (each with a validity bit);
* windows (:data:`WINDOWS` of them): copies of a stretch of one mat's elements (at most
  :data:`WINDOW_BYTES`: a 64 KiB aligned chunk of a continuous mat, or whole rows of a view
  that is not continuous), with a dirty flag.

On a call the helper looks the handle up among the descriptors (else asks the host to
describe it: an unknown or dropped handle traps there, with the host's message), checks the
index the way :func:`.cv._flat_index` does, finds the window holding the element (else asks
the host to load it) and reads or writes it there, converting between the mat's depth and
the call's type exactly as :mod:`.cv` does (rounded half to even and saturated into integer
depths, NaN → 0). Anything it does not handle itself goes to the host's own implementation
(imported by the helper as its fallback): every error (an index outside the mat, a float16
mat, a write to a read-only mat, an element of a row wider than a window, a mat of 2³¹
elements or more), so errors and their messages are the host's.

Coherence: the host's numpy arrays stay the mats. Before any host function that may touch a
mat runs (all but logging, time, config, config-watch and the datastore: :data:`NO_MAT_INTERFACES`),
before the host re-enters the processor's allocator from a host function, and when
``process`` returns or fails, the dirty windows are written back into their arrays and
every descriptor and window is dropped (:meth:`MatAccessors.flush`), so a host function sees
what the processor wrote and the processor reads what a host function drew. Windows that
may share memory with a window being loaded (a view and the mat it views) are written back
and dropped first, so no two live windows hold the same pixel.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import wasmtime

from .canon import HostFunction
from .cv import DEPTH_DTYPES, is_nd

__all__ = ["SERVED", "NO_MAT_INTERFACES", "HELPER_WAT", "MatAccessors", "served_imports"]

MAT = "wasm:cv/mat"
#: The helper's own imports: the host's loaders and, under FALLBACK, the host's implementations.
LOADERS = "vision-host:accessors"
FALLBACK = "vision-host:accessors-fallback"
#: Element accessors served (by name as imported) and their kind: (indexes, value type, write).
ELEMENT_ACCESSORS = {
    f"[method]mat.{op}-{ty}-at{suffix}": (3 if suffix else 2, ty, op == "set")
    for op in ("get", "set") for ty in ("uchar", "int", "float") for suffix in ("", "3")}
#: Metadata accessors served: name → (validity bit, offset in a descriptor).
META_ACCESSORS = {"[method]mat.cols": (0, 36), "[method]mat.rows": (1, 40), "[method]mat.mattype": (2, 44),
                  "[method]mat.elemsize": (3, 48), "[method]mat.empty": (4, 52), "[method]mat.step": (5, 56)}
SERVED = frozenset(ELEMENT_ACCESSORS) | frozenset(META_ACCESSORS)
#: Interfaces whose functions never read or write a mat's pixels or replace a mat: calling
#: them needs no write-back of the helper's windows.
NO_MAT_INTERFACES = frozenset({"wasmvision:platform/logging", "wasmvision:platform/time",
                               "wasmvision:platform/config", "wasmvision:platform/datastore",
                               "vision-host:platform/config-watch"})

DESCRIPTORS = 4
DESCRIPTOR_BYTES = 64
WINDOWS = 4
WINDOW_ENTRY_BYTES = 32
WINDOW_TABLE = DESCRIPTORS * DESCRIPTOR_BYTES          # 256
WINDOW_BYTES = 64 * 1024
DATA = 4096
PAGES = -(-(DATA + WINDOWS * WINDOW_BYTES) // 65536)
#: numpy dtypes the helper reads and writes, by its depth code (OpenCV's 0 … 6; not 16F).
KINDS = {np.dtype(t): k for k, t in enumerate((np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32,
                                                np.float64))}
_LARGEST = 1 << 31      # mats with this many elements or more are left to the host
_DEPTHS = {t: k for k, t in enumerate(DEPTH_DTYPES)}     # numpy dtype → OpenCV depth (cv.cv_type's)
_DESCRIPTOR = struct.Struct("<16i")
_WINDOW = struct.Struct("<6i")

# Descriptor fields (i32 each, byte offsets): handle 0, kind 4 (-1: elements left to the host),
# flags 8 (1 writable, 2 continuous), n0 12, rowlen 16, d1 20, inner 24, size 28, meta bits 32,
# cols 36, rows 40, mattype 44, elemsize 48, empty 52, step 56, used 60.
# Window entries (at WINDOW_TABLE + 32·w): handle 0, e0 4, e1 8, data 12, dirty 16, shift 20.

_ACCESSOR_SIGNATURES = {
    2: ("(param $h i32) (param $a i32) (param $b i32)", "(local.get $h) (local.get $a) (local.get $b)"),
    3: ("(param $h i32) (param $a i32) (param $b i32) (param $c i32)",
        "(local.get $h) (local.get $a) (local.get $b) (local.get $c)"),
}
_WAT_TYPE = {"uchar": "i32", "int": "i32", "float": "f32"}


def _accessor_wat(n: int, name: str, indexes: int, ty: str, write: bool) -> tuple[str, str]:
    """(import of the fallback, exported function) for element accessor number ``n``."""
    params, args = _ACCESSOR_SIGNATURES[indexes]
    vt = _WAT_TYPE[ty]
    fb = f"$fallback{n}"
    locate = f"(call $loc{indexes} {args} (i32.const {1 if write else 0}))"
    if write:
        sig = f"{params} (param $v {vt})"
        value = "(i32.and (local.get $v) (i32.const 255))" if ty == "uchar" else "(local.get $v)"
        put = "$put_float" if ty == "float" else "$put_int"
        imp = f'(import "{FALLBACK}" "{name}" (func {fb} {sig}))'
        body = f"""(func (export "{name}") {sig} (local $at i32)
    (local.set $at {locate})
    (if (i32.lt_s (local.get $at) (i32.const 0))
      (then (call {fb} {args} (local.get $v)))
      (else (call {put} (local.get $at) {value}))))"""
    else:
        sig = f"{params} (result {vt})"
        get = {"uchar": "$as_uchar", "int": "$as_int", "float": "$as_float"}[ty]
        imp = f'(import "{FALLBACK}" "{name}" (func {fb} {sig}))'
        body = f"""(func (export "{name}") {sig} (local $at i32)
    (local.set $at {locate})
    (if (result {vt}) (i32.lt_s (local.get $at) (i32.const 0))
      (then (call {fb} {args}))
      (else (call {get} (local.get $at)))))"""
    return imp, body


def _meta_wat(n: int, name: str, bit: int, offset: int) -> tuple[str, str]:
    fb = f"$fallback{n}"
    imp = f'(import "{FALLBACK}" "{name}" (func {fb} (param i32) (result i32)))'
    body = f"""(func (export "{name}") (param $h i32) (result i32) (local $d i32)
    (local.set $d (call $desc (local.get $h)))
    (if (result i32) (i32.and (i32.load offset=32 (local.get $d)) (i32.const {1 << bit}))
      (then (i32.load offset={offset} (local.get $d)))
      (else (call {fb} (local.get $h)))))"""
    return imp, body


def _helper_wat() -> str:
    imports, bodies = [], []
    for n, (name, (indexes, ty, write)) in enumerate(ELEMENT_ACCESSORS.items()):
        imp, body = _accessor_wat(n, name, indexes, ty, write)
        imports.append(imp)
        bodies.append(body)
    for n, (name, (bit, offset)) in enumerate(META_ACCESSORS.items(), len(ELEMENT_ACCESSORS)):
        imp, body = _meta_wat(n, name, bit, offset)
        imports.append(imp)
        bodies.append(body)
    nl = "\n  "
    return f"""(module
  (import "{LOADERS}" "describe" (func $describe (param i32) (result i32)))
  (import "{LOADERS}" "window" (func $window (param i32 i32) (result i32)))
  {nl.join(imports)}
  (memory (export "memory") {PAGES} {PAGES})
  (global $k (mut i32) (i32.const 0))

  ;; The descriptor of mat $h (the host describes it when none is held; an unknown handle traps there).
  (func $desc (param $h i32) (result i32) (local $d i32)
    (loop $next
      (if (i32.and (i32.eq (i32.load (local.get $d)) (local.get $h)) (i32.load offset=60 (local.get $d)))
        (then (return (local.get $d))))
      (local.set $d (i32.add (local.get $d) (i32.const {DESCRIPTOR_BYTES})))
      (br_if $next (i32.lt_u (local.get $d) (i32.const {WINDOW_TABLE}))))
    (call $describe (local.get $h)))

  ;; The address of element $i (flat, in bounds) of mat $h, descriptor $d, in a window (the host
  ;; loads it when none holds it), or -1 when the host keeps it. Sets $k to the mat's depth.
  (func $element (param $d i32) (param $h i32) (param $i i32) (param $write i32) (result i32) (local $w i32)
    (block $found
      (loop $next
        (br_if $found (i32.and (i32.eq (i32.load offset={WINDOW_TABLE} (local.get $w)) (local.get $h))
                               (i32.and (i32.ge_s (local.get $i) (i32.load offset={WINDOW_TABLE + 4} (local.get $w)))
                                        (i32.lt_s (local.get $i) (i32.load offset={WINDOW_TABLE + 8} (local.get $w))))))
        (local.set $w (i32.add (local.get $w) (i32.const {WINDOW_ENTRY_BYTES})))
        (br_if $next (i32.lt_u (local.get $w) (i32.const {WINDOWS * WINDOW_ENTRY_BYTES}))))
      (local.set $w (call $window (local.get $h) (local.get $i)))
      (if (i32.lt_s (local.get $w) (i32.const 0)) (then (return (i32.const -1)))))
    (global.set $k (i32.load offset=4 (local.get $d)))
    (if (local.get $write) (then (i32.store offset={WINDOW_TABLE + 16} (local.get $w) (i32.const 1))))
    (i32.add (i32.load offset={WINDOW_TABLE + 12} (local.get $w))
             (i32.shl (i32.sub (local.get $i) (i32.load offset={WINDOW_TABLE + 4} (local.get $w)))
                      (i32.load offset={WINDOW_TABLE + 20} (local.get $w)))))

  ;; Element (row $r, col $c) as cv._flat_index finds it: on a continuous mat col may run on
  ;; into the next rows up to the last element; otherwise it must be inside the row.
  (func $loc2 (param $h i32) (param $r i32) (param $c i32) (param $write i32) (result i32)
    (local $d i32) (local $i i64)
    (local.set $d (call $desc (local.get $h)))
    (if (i32.lt_s (i32.load offset=4 (local.get $d)) (i32.const 0)) (then (return (i32.const -1))))
    (if (i32.and (local.get $write) (i32.eqz (i32.and (i32.load offset=8 (local.get $d)) (i32.const 1))))
      (then (return (i32.const -1))))
    (if (i32.ge_u (local.get $r) (i32.load offset=12 (local.get $d))) (then (return (i32.const -1))))
    (if (i32.eqz (i32.and (i32.load offset=8 (local.get $d)) (i32.const 2)))
      (then (if (i32.ge_u (local.get $c) (i32.load offset=16 (local.get $d))) (then (return (i32.const -1))))))
    (local.set $i (i64.add (i64.mul (i64.extend_i32_u (local.get $r)) (i64.extend_i32_u (i32.load offset=16 (local.get $d))))
                           (i64.extend_i32_u (local.get $c))))
    (if (i64.ge_u (local.get $i) (i64.extend_i32_u (i32.load offset=28 (local.get $d)))) (then (return (i32.const -1))))
    (call $element (local.get $d) (local.get $h) (i32.wrap_i64 (local.get $i)) (local.get $write)))

  ;; Element ($x, $y, $z) as cv._flat_index3 finds it (the same rule over three indexes).
  (func $loc3 (param $h i32) (param $x i32) (param $y i32) (param $z i32) (param $write i32) (result i32)
    (local $d i32) (local $i i64) (local $size i32)
    (local.set $d (call $desc (local.get $h)))
    (if (i32.lt_s (i32.load offset=4 (local.get $d)) (i32.const 0)) (then (return (i32.const -1))))
    (if (i32.and (local.get $write) (i32.eqz (i32.and (i32.load offset=8 (local.get $d)) (i32.const 1))))
      (then (return (i32.const -1))))
    (local.set $size (i32.load offset=28 (local.get $d)))
    (if (i32.ge_u (local.get $x) (i32.load offset=12 (local.get $d))) (then (return (i32.const -1))))
    (if (i32.ge_u (local.get $y) (local.get $size)) (then (return (i32.const -1))))
    (if (i32.ge_u (local.get $z) (local.get $size)) (then (return (i32.const -1))))
    (if (i32.eqz (i32.and (i32.load offset=8 (local.get $d)) (i32.const 2)))
      (then
        (if (i32.ge_u (local.get $y) (i32.load offset=20 (local.get $d))) (then (return (i32.const -1))))
        (if (i32.ge_u (local.get $z) (i32.load offset=24 (local.get $d))) (then (return (i32.const -1))))))
    (local.set $i (i64.add
      (i64.mul (i64.add (i64.mul (i64.extend_i32_u (local.get $x)) (i64.extend_i32_u (i32.load offset=20 (local.get $d))))
                        (i64.extend_i32_u (local.get $y)))
               (i64.extend_i32_u (i32.load offset=24 (local.get $d))))
      (i64.extend_i32_u (local.get $z))))
    (if (i64.ge_u (local.get $i) (i64.extend_i32_u (local.get $size))) (then (return (i32.const -1))))
    (call $element (local.get $d) (local.get $h) (i32.wrap_i64 (local.get $i)) (local.get $write)))

  (func $clamp (param $v i32) (param $lo i32) (param $hi i32) (result i32)
    (if (i32.lt_s (local.get $v) (local.get $lo)) (then (return (local.get $lo))))
    (if (i32.gt_s (local.get $v) (local.get $hi)) (then (return (local.get $hi))))
    (local.get $v))

  ;; cv._as_int of a float: NaN → 0, saturated to [lo, hi], else rounded half to even.
  (func $sat (param $v f64) (param $lo i32) (param $hi i32) (result i32)
    (if (f64.ne (local.get $v) (local.get $v)) (then (return (i32.const 0))))
    (if (f64.ge (local.get $v) (f64.convert_i32_s (local.get $hi))) (then (return (local.get $hi))))
    (if (f64.le (local.get $v) (f64.convert_i32_s (local.get $lo))) (then (return (local.get $lo))))
    (i32.trunc_f64_s (f64.nearest (local.get $v))))

  (func $as_uchar (param $a i32) (result i32) (local $k i32)
    (local.set $k (global.get $k))
    (if (i32.eqz (local.get $k)) (then (return (i32.load8_u (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (call $clamp (i32.load8_s (local.get $a)) (i32.const 0) (i32.const 255)))))
    (if (i32.eq (local.get $k) (i32.const 2)) (then (return (call $clamp (i32.load16_u (local.get $a)) (i32.const 0) (i32.const 255)))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (call $clamp (i32.load16_s (local.get $a)) (i32.const 0) (i32.const 255)))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (call $clamp (i32.load (local.get $a)) (i32.const 0) (i32.const 255)))))
    (if (i32.eq (local.get $k) (i32.const 5))
      (then (return (call $sat (f64.promote_f32 (f32.load (local.get $a))) (i32.const 0) (i32.const 255)))))
    (call $sat (f64.load (local.get $a)) (i32.const 0) (i32.const 255)))

  (func $as_int (param $a i32) (result i32) (local $k i32)
    (local.set $k (global.get $k))
    (if (i32.eqz (local.get $k)) (then (return (i32.load8_u (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (i32.load8_s (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 2)) (then (return (i32.load16_u (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (i32.load16_s (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (i32.load (local.get $a)))))
    (if (i32.eq (local.get $k) (i32.const 5))
      (then (return (call $sat (f64.promote_f32 (f32.load (local.get $a))) (i32.const 0x80000000) (i32.const 0x7fffffff)))))
    (call $sat (f64.load (local.get $a)) (i32.const 0x80000000) (i32.const 0x7fffffff)))

  (func $as_float (param $a i32) (result f32) (local $k i32)
    (local.set $k (global.get $k))
    (if (i32.eqz (local.get $k)) (then (return (f32.convert_i32_s (i32.load8_u (local.get $a))))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (f32.convert_i32_s (i32.load8_s (local.get $a))))))
    (if (i32.eq (local.get $k) (i32.const 2)) (then (return (f32.convert_i32_s (i32.load16_u (local.get $a))))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (f32.convert_i32_s (i32.load16_s (local.get $a))))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (f32.convert_i32_s (i32.load (local.get $a))))))
    (if (i32.eq (local.get $k) (i32.const 5)) (then (return (f32.load (local.get $a)))))
    (f32.demote_f64 (f64.load (local.get $a))))

  ;; cv._put of an integer: saturated into integer depths, converted into float ones.
  (func $put_int (param $a i32) (param $v i32) (local $k i32)
    (local.set $k (global.get $k))
    (if (i32.eqz (local.get $k)) (then (return (i32.store8 (local.get $a) (call $clamp (local.get $v) (i32.const 0) (i32.const 255))))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (i32.store8 (local.get $a) (call $clamp (local.get $v) (i32.const -128) (i32.const 127))))))
    (if (i32.eq (local.get $k) (i32.const 2)) (then (return (i32.store16 (local.get $a) (call $clamp (local.get $v) (i32.const 0) (i32.const 65535))))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (i32.store16 (local.get $a) (call $clamp (local.get $v) (i32.const -32768) (i32.const 32767))))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (i32.store (local.get $a) (local.get $v)))))
    (if (i32.eq (local.get $k) (i32.const 5)) (then (return (f32.store (local.get $a) (f32.convert_i32_s (local.get $v))))))
    (f64.store (local.get $a) (f64.convert_i32_s (local.get $v))))

  ;; cv._put of a float: cv._as_int into integer depths, stored as it is into float ones.
  (func $put_float (param $a i32) (param $v f32) (local $k i32) (local $w f64)
    (local.set $k (global.get $k))
    (local.set $w (f64.promote_f32 (local.get $v)))
    (if (i32.eqz (local.get $k)) (then (return (i32.store8 (local.get $a) (call $sat (local.get $w) (i32.const 0) (i32.const 255))))))
    (if (i32.eq (local.get $k) (i32.const 1)) (then (return (i32.store8 (local.get $a) (call $sat (local.get $w) (i32.const -128) (i32.const 127))))))
    (if (i32.eq (local.get $k) (i32.const 2)) (then (return (i32.store16 (local.get $a) (call $sat (local.get $w) (i32.const 0) (i32.const 65535))))))
    (if (i32.eq (local.get $k) (i32.const 3)) (then (return (i32.store16 (local.get $a) (call $sat (local.get $w) (i32.const -32768) (i32.const 32767))))))
    (if (i32.eq (local.get $k) (i32.const 4)) (then (return (i32.store (local.get $a) (call $sat (local.get $w) (i32.const 0x80000000) (i32.const 0x7fffffff))))))
    (if (i32.eq (local.get $k) (i32.const 5)) (then (return (f32.store (local.get $a) (local.get $v)))))
    (f64.store (local.get $a) (local.get $w)))

  {nl.join(bodies)}
)"""


#: The helper module's text.
HELPER_WAT = _helper_wat()


def served_imports(module: wasmtime.Module, host_functions: dict) -> dict[str, HostFunction]:
    """The imports of ``module`` the helper can serve: ``wasm:cv/mat`` accessors imported with
    the host's own core type, by name → the host function (the helper's fallback)."""
    found = {}
    for imp in module.imports:
        if imp.module != MAT or imp.name not in SERVED or not isinstance(imp.type, wasmtime.FuncType):
            continue
        spec = host_functions.get((MAT, imp.name))
        if spec is not None and _same_type(imp.type, spec.functype()):
            found[imp.name] = spec
    return found


def _same_type(a: wasmtime.FuncType, b: wasmtime.FuncType) -> bool:
    return (list(map(str, a.params)), list(map(str, a.results))) == (list(map(str, b.params)), list(map(str, b.results)))


class _Window:
    """The host side of one live window: the array's elements it holds (a view of the mat) and
    their copy in the helper's memory."""

    __slots__ = ("view", "copy")

    def __init__(self, view: np.ndarray, copy: np.ndarray):
        self.view = view
        self.copy = copy


class MatAccessors:
    """The helper instance of one processor, and the host's side of its protocol.

    Args:
        ctx: the processor's :class:`~.engine.InstanceContext` (its mats, and the
            ``accessors_live`` flag host functions check before running).
        store: the processor's store (the helper lives in it, under the same deadline).
        module: the compiled helper (:data:`HELPER_WAT`).
        define: ``define(linker, spec, module_name, flush)`` defines a host function in a
            linker as the engine does (the fallbacks flush; the loaders must not).
        fallbacks: the host functions the helper falls back on, by name (at least those it
            exports that the processor imports; the others are linked too).
        host_functions: every host function, to complete the fallbacks.

    Raises:
        wasmtime.WasmtimeError: the helper cannot be instantiated (e.g. a memory cap below its
            memory); the caller then links the host functions themselves.
    """

    def __init__(self, ctx, store: wasmtime.Store, module: wasmtime.Module, define, host_functions: dict):
        self.ctx = ctx
        self.store = store
        self._windows: list[_Window | None] = [None] * WINDOWS
        self._next_window = 0
        self._next_descriptor = 0
        #: Calls into the host so far: mats described, windows loaded, flushes that held copies.
        self.describes = self.loads = self.flushes = 0
        linker = wasmtime.Linker(store.engine)
        define(linker, HostFunction(LOADERS, "describe", "i", "i", None, ((ctypes.c_uint32,), self._describe)),
               LOADERS, False)
        define(linker, HostFunction(LOADERS, "window", "ii", "i", None, ((ctypes.c_uint32, ctypes.c_int32), self._window)),
               LOADERS, False)
        for name in sorted(SERVED):
            define(linker, host_functions[(MAT, name)], FALLBACK, True)
        self.instance = linker.instantiate(store, module)
        exports = self.instance.exports(store)
        self.exports = {name: exports[name] for name in SERVED}
        memory = exports["memory"]
        base = ctypes.addressof(memory.data_ptr(store).contents)
        size = memory.data_len(store)
        self._memory = (ctypes.c_uint8 * size).from_address(base)
        self._words = (ctypes.c_int32 * (DATA // 4)).from_address(base)   # the tables, one i32 at a time
        self._bytes = np.ctypeslib.as_array(self._memory)
        self._regions = [self._bytes[DATA + w * WINDOW_BYTES:DATA + (w + 1) * WINDOW_BYTES] for w in range(WINDOWS)]
        self._described: list[int] = []                        # descriptors in use

    # -- the host's loaders, called by the helper ------------------------------------------
    def _describe(self, ctx, handle: int) -> int:
        """Fill a descriptor for mat ``handle`` (AbiError: unknown or dropped); returns its address.

        The metadata values are those of :mod:`.cv`'s ``cols``, ``rows``, ``mattype``,
        ``elemsize``, ``empty`` and ``step``; one that would raise there (``cols`` of a 1-D
        array) is left invalid, so the helper asks the host, which raises.
        """
        a = ctx.mats.get(handle)
        self.describes += 1
        d = self._next_descriptor
        self._next_descriptor = (d + 1) % DESCRIPTORS
        ndim, size, dtype = a.ndim, a.size, a.dtype
        kind = KINDS.get(dtype, -1) if ndim >= 1 and 0 < size < _LARGEST else -1
        n0 = rowlen = d1 = inner = flags = 0
        if kind >= 0:
            shape = a.shape
            n0 = shape[0]
            d1 = shape[1] if ndim > 1 else 1
            rowlen, inner = size // n0, size // (n0 * d1)
            f = a.flags
            flags = (1 if f.writeable else 0) | (2 if f.c_contiguous else 0)
        nd = is_nd(a)
        cn = a.shape[2] if ndim == 3 and not nd else 1                 # cv.channels
        bits = 0b11100                                     # mattype, elemsize, empty: always
        cols = rows = step = 0
        if nd or ndim >= 2:
            cols, bits = -1 if nd else a.shape[1], bits | 1
        if nd or ndim >= 1:
            rows, bits = -1 if nd else a.shape[0], bits | 2
        if size == 0 or ndim >= 1:
            step, bits = a.strides[0] if size else 0, bits | 32
        _DESCRIPTOR.pack_into(self._memory, d * DESCRIPTOR_BYTES, _i32(handle), kind, flags, n0, rowlen, d1, inner,
                              size if kind >= 0 else 0, bits, cols, rows, _DEPTHS.get(dtype, 0) + 8 * (cn - 1),
                              a.itemsize * cn, 1 if size == 0 else 0, _i32(step & 0xFFFF_FFFF), 1)
        self._described.append(d)
        self.ctx.accessors_live = True
        return d * DESCRIPTOR_BYTES

    def _window(self, ctx, handle: int, i: int) -> int:
        """Load the window holding element ``i`` (flat, in bounds) of mat ``handle``; returns
        the window entry's offset, or -1 when the mat's rows are wider than a window."""
        a = ctx.mats.get(handle)
        self.loads += 1
        itemsize = a.itemsize
        if a.flags.c_contiguous:
            chunk = WINDOW_BYTES // itemsize
            e0 = i - i % chunk
            e1 = min(e0 + chunk, a.size)
            view = a.reshape(-1)[e0:e1]
        else:
            n0 = a.shape[0]
            rowlen = a.size // n0
            if rowlen * itemsize > WINDOW_BYTES:
                return -1
            rows = WINDOW_BYTES // (rowlen * itemsize)
            r = i // rowlen
            r0 = r - r % rows
            r1 = min(r0 + rows, n0)
            view = a[r0:r1]
            e0, e1 = r0 * rowlen, r1 * rowlen
        for w, held in enumerate(self._windows):     # no two live windows hold the same pixel
            if held is not None and np.may_share_memory(held.view, view):
                self._retire(w)
        w = next((w for w, held in enumerate(self._windows) if held is None), None)
        if w is None:
            w = self._next_window
            self._next_window = (w + 1) % WINDOWS
            self._retire(w)
        copy = self._regions[w][:view.nbytes].view(a.dtype).reshape(view.shape)
        np.copyto(copy, view)
        self._windows[w] = _Window(view, copy)
        _WINDOW.pack_into(self._memory, WINDOW_TABLE + w * WINDOW_ENTRY_BYTES, _i32(handle), e0, e1,
                          DATA + w * WINDOW_BYTES, 0, itemsize.bit_length() - 1)
        self.ctx.accessors_live = True
        return w * WINDOW_ENTRY_BYTES

    def _retire(self, w: int) -> None:
        """Write window ``w`` back into its mat if the processor wrote to it, and drop it."""
        held = self._windows[w]
        if held is not None:
            if self._words[(WINDOW_TABLE + w * WINDOW_ENTRY_BYTES + 16) // 4]:      # dirty
                np.copyto(held.view, held.copy)
            self._windows[w] = None
            _WINDOW.pack_into(self._memory, WINDOW_TABLE + w * WINDOW_ENTRY_BYTES, 0, 0, 0, 0, 0, 0)

    # -- coherence ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every window the processor wrote to back into its mat, and drop all windows
        and descriptors (the next access describes and loads again)."""
        self.flushes += 1
        for w, held in enumerate(self._windows):
            if held is not None:
                self._retire(w)
        words = self._words
        for d in self._described:
            words[(d * DESCRIPTOR_BYTES + 60) // 4] = 0          # no longer used
        self._described.clear()
        self.ctx.accessors_live = False


def _i32(value: int) -> int:
    """A u32 as the i32 with the same bits."""
    return value - (1 << 32) if value & 0x8000_0000 else value
