"""Host functions into wasmtime: which host function an import gets, and how it is defined
in a processor's linker.

:data:`HOST_FUNCTIONS` pairs every function of the WIT contract (:func:`wit_dir`) with its
``@implements`` implementation in the interface modules (:data:`INTERFACE_MODULES`);
:data:`LEGACY_FUNCTIONS` holds wasmCV's pre-2025 forms. :func:`define` links one of them
through wasmtime's "unchecked" C API (arguments and result as raw values in one array, no
per-call type checks), read and written through a ctypes structure of the function's own
slot types.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import operator
import os
import threading
from pathlib import Path

import wasmtime
from wasmtime import _bindings as _ffi
from wasmtime import _func as _wasmtime_func

from . import accessors as _accessors
from .canon import CORE_CTYPES, HostFunction, build_host_functions, build_legacy_functions

#: Modules whose ``@implements`` functions make up the host side of the contract.
INTERFACE_MODULES = ("platform", "cv", "objdetect", "dnn", "features2d", "fetch", "overlay")


def wit_dir() -> Path:
    """The WIT contract: ``$VISION_HOST_WIT_DIR``, else the package's ``wasm/wit`` (in the
    source tree a link to the project's ``wasm/``)."""
    if env := os.environ.get("VISION_HOST_WIT_DIR"):
        return Path(env)
    return Path(__file__).resolve().parents[1] / "wasm" / "wit"


for _module in INTERFACE_MODULES:
    importlib.import_module(f".{_module}", __package__)

#: Every host function a processor may import, by (module, name): the WIT contract's
#: functions paired with their implementations.
HOST_FUNCTIONS = build_host_functions(wit_dir())
#: The same functions in wasmCV's pre-2025 form (no error results), linked when a module
#: imports that core signature (wasmVision's published processors do).
LEGACY_FUNCTIONS = build_legacy_functions(wit_dir())


def type_text(ty) -> str:
    """A core function type as text: ``"(i32, i32) -> (i32)"``."""
    return f"({', '.join(map(str, ty.params))}) -> ({', '.join(map(str, ty.results))})"


def host_function_for(module: str, name: str, functype: wasmtime.FuncType) -> HostFunction | None:
    """The host function to link for an import of ``module``/``name`` with core type
    ``functype``, or None when the host has none of that type."""
    spec = HOST_FUNCTIONS.get((module, name))
    if spec is None:
        return None
    if type_text(functype) == type_text(spec.functype()):
        return spec
    legacy = LEGACY_FUNCTIONS.get((module, name))
    if legacy is not None and type_text(functype) == type_text(legacy.functype()):
        return legacy
    return None


#: The exception a host function raised on this thread, by the unchecked callback. wasmtime-py
#: keeps it in one global for all threads, which streams on other threads may overwrite
#: before it is re-raised; this copy is per thread.
HOST_EXCEPTION = threading.local()


def host_exception(raised: BaseException) -> BaseException:
    """The exception that really ended a call on this thread: the host function's own when
    one raised (``raised`` may then be another thread's, or a bare trap), else ``raised``."""
    own = getattr(HOST_EXCEPTION, "value", None)
    if own is None:
        return raised
    HOST_EXCEPTION.value = None
    return own


_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _env: None)
_UNCHECKED = getattr(_ffi, "wasmtime_func_unchecked_callback_t", None)
_define_unchecked = getattr(_ffi, "wasmtime_linker_define_func_unchecked", None)
_SLOT_BYTES = ctypes.sizeof(_ffi.wasmtime_val_raw_t)


@functools.lru_cache(maxsize=None)
def _slots_type(param_types: tuple, result_type) -> type:
    """A ctypes structure laid over wasmtime's raw argument array (one 16-byte slot per
    argument, the result in slot 0): field ``aK`` reads argument K as ``param_types[K]``,
    ``ret`` writes the result as ``result_type``."""
    fields = []
    for k in range(max(len(param_types), 1 if result_type is not None else 0)):
        members = [(f"a{k}", param_types[k])] if k < len(param_types) else []
        if k == 0 and result_type is not None:
            members.append(("ret", result_type))
        members.append(("_bytes", ctypes.c_byte * _SLOT_BYTES))
        fields.append((f"s{k}", type(f"Slot{k}", (ctypes.Union,), {"_fields_": members})))
    return type("Slots", (ctypes.Structure,), {"_anonymous_": [f for f, _ in fields], "_fields_": fields})


def define(linker: wasmtime.Linker, spec: HostFunction, ctx, deadline, keep: list,
           as_module: str | None = None, flush: bool = True) -> None:
    """Define host function ``spec`` in ``linker`` for the processor whose instance context
    is ``ctx`` (:class:`.processor.InstanceContext`) and whose calls ``deadline``
    (:class:`.deadline.CallDeadline`) bounds; under ``as_module`` instead of its own
    interface when given.

    With ``flush`` (and unless its interface never touches mats, :data:`.accessors.NO_MAT_INTERFACES`)
    the call first writes back what the processor wrote through the in-wasm mat accessors
    and drops their copies, so the host function sees current mats and the processor then
    reads what it changed.

    Uses wasmtime's unchecked callback (arguments and result as raw values in one array),
    read and written through a ctypes structure of the function's own slot types; a function
    with a :attr:`~.canon.HostFunction.direct` form gets its arguments lifted by that
    structure and calls its implementation with no canonical-ABI layer in between. Falls back
    to ``define_func`` when this wasmtime-py does not expose the unchecked API. The C callback
    is appended to ``keep``, which must outlive the linker's instances.

    Raises:
        wasmtime.WasmtimeError: wasmtime refused the definition.
    """
    flushing = flush and spec.module not in _accessors.NO_MAT_INTERFACES
    if _UNCHECKED is None or _define_unchecked is None:
        timed = deadline.timed(spec.impl if spec.impl is not None else spec.direct[1], ctx)

        def checked(*args):
            if flushing and ctx.accessors_live:
                ctx.accessors.flush()
            return timed(*args)
        linker.define_func(as_module or spec.module, spec.name, spec.functype(), checked)
        return
    if spec.direct is not None:
        param_types, impl = spec.direct
    else:
        param_types, impl = tuple(CORE_CTYPES[c] for c in spec.params), spec.impl
    has_result = bool(spec.results)
    slots = _slots_type(param_types, CORE_CTYPES[spec.results] if has_result else None)
    n = len(param_types)
    get = operator.attrgetter(*[f"a{k}" for k in range(n)]) if n else None
    Trap = wasmtime.Trap

    def callback(_env, _caller, raw, _n):
        try:
            r = raw[0]
            if flushing and ctx.accessors_live:
                ctx.accessors.flush()
            if deadline.metered:
                value = deadline.host_call(impl, ctx, r, get, n)
            elif n > 1:
                value = impl(ctx, *get(r))
            elif n:
                value = impl(ctx, get(r))
            else:
                value = impl(ctx)
            if has_result:
                r.ret = value
            return 0
        except BaseException as exc:   # noqa: BLE001 - re-raised by wasmtime-py on return
            HOST_EXCEPTION.value = exc
            _wasmtime_func.LAST_EXCEPTION = exc
            return ctypes.cast(Trap("python exception")._consume(), ctypes.c_void_p).value

    c_callback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(slots),
                                  ctypes.c_size_t)(callback)
    keep.append(c_callback)
    module, name = (as_module or spec.module).encode(), spec.name.encode()
    functype = spec.functype()     # must outlive the call: the C side borrows its pointer
    error = _define_unchecked(linker.ptr(), ctypes.create_string_buffer(module), len(module),
                              ctypes.create_string_buffer(name), len(name), functype.ptr(),
                              ctypes.cast(c_callback, _UNCHECKED), None, _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
