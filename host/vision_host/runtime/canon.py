"""The canonical ABI, host side: the host functions a processor imports, each lifting its
core-wasm arguments into Python values, calling the Python implementation and lowering the
result back, for any function of the WIT contract.

Source: the component model's ``CanonicalABI.md`` (``MAX_FLAT_PARAMS`` = 16,
``MAX_FLAT_RESULTS`` = 1, parameters spilled to memory, results through a return pointer).
A host implementation is a plain Python function registered with :func:`implements`; it
receives and returns the Python values of :mod:`.canon_codecs` (the per-type layouts and
conversions). :func:`build_host_functions` pairs each with its WIT declaration and returns
core-level trampolines for the linker.

Every violation (pointer or length outside memory, invalid UTF-8 or char, an enum or
variant case that does not exist, an unknown handle) raises :class:`~.abi.AbiError`, which
traps the processor's call; the host never crashes.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import wasmtime

from .abi import AbiError
from .canon_codecs import codec, direct_form, flat_lifter, tuple_codec
from .wit import Function, Handle, ListT, Prim, RecordT, ResultT, parse_dir

__all__ = ["ErrResult", "HostFunction", "implements", "build_host_functions", "MAX_FLAT_PARAMS",
           "MAX_FLAT_RESULTS", "VALTYPES"]

MAX_FLAT_PARAMS = 16
MAX_FLAT_RESULTS = 1

#: Core value-type letters: i32, i64, f32, f64.
VALTYPES = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i64(),
            "f": wasmtime.ValType.f32(), "F": wasmtime.ValType.f64()}


class ErrResult(Exception):
    """Raised by a host implementation to return the ``err`` case of its ``result``."""

    def __init__(self, value=None):
        super().__init__(value)
        self.value = value


#: ctypes types of core values (letters of :data:`VALTYPES`).
CORE_CTYPES = {"i": ctypes.c_int32, "I": ctypes.c_int64, "f": ctypes.c_float, "F": ctypes.c_double}


@dataclass(frozen=True)
class HostFunction:
    """One imported function ready for the linker.

    ``params``/``results`` are core signature letters (see :data:`VALTYPES`); ``impl(ctx,
    *core_args)`` lifts the arguments, calls the Python implementation and lowers its result.

    ``direct``, when set, is a cheaper equivalent for functions of integer and float
    parameters and an integer, float or bool result: ``(param_ctypes, implementation)``,
    where reading each core argument as its ``param_ctypes`` entry lifts it (u8 is the low
    byte of its i32, u32 its unsigned reading, …), and ``implementation(ctx, *values)``
    returns the result as the core value (bools as 0/1), to be written to the result slot
    as its core type (which wraps integers as the canonical ABI's lowering does).
    """

    module: str
    name: str
    params: str
    results: str
    impl: Callable
    direct: tuple | None = None

    def functype(self) -> wasmtime.FuncType:
        """The core-wasm type the guest must import this function with."""
        return wasmtime.FuncType([VALTYPES[c] for c in self.params], [VALTYPES[c] for c in self.results])


#: Python implementations by (interface, import name), filled by :func:`implements`.
IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


def implements(interface: str, name: str) -> Callable:
    """Decorator registering ``impl(ctx, *params)`` for WIT function ``name`` of ``interface``
    (``name`` as imported: ``blur``, ``[method]mat.cols``, ``[static]net.read``, …).

    ``impl`` receives lifted Python values (see the module docstring) and returns the result.
    """

    def register(impl: Callable) -> Callable:
        key = (interface, name)
        if key in IMPLEMENTATIONS:
            raise ValueError(f"{interface}#{name} is implemented twice")
        IMPLEMENTATIONS[key] = impl
        return impl

    return register


def trampoline(fn: Function, impl: Callable) -> HostFunction:
    """The core-level host function for WIT function ``fn`` implemented by ``impl``."""
    params = [codec(t) for _, t in fn.params]
    result = codec(fn.result)
    flat_params = "".join(c.flat for c in params)
    flat_result = result.flat if result is not None else ""
    spilled = len(flat_params) > MAX_FLAT_PARAMS
    retptr = len(flat_result) > MAX_FLAT_RESULTS
    core_params = ("i" if spilled else flat_params) + ("i" if retptr else "")
    core_results = "" if retptr else flat_result
    is_result = isinstance(fn.result, ResultT)
    params_record = tuple_codec(params) if spilled else None
    lift = None if spilled else flat_lifter(params)
    # The bytes of `ok` for result<_, E> returned through memory (what result.store writes).
    ok_empty = None
    if is_result and retptr and result.cases[0] is None:
        buf = bytearray(result.size)
        result.store(None, buf, 0, (0, None))
        ok_empty = bytes(buf)
    n_flat = len(flat_params)

    def call(ctx, *args):
        if spilled:
            ptr = args[0] & 0xFFFF_FFFF
            values = params_record.load(ctx, ctx.memory.read(ptr, params_record.size), 0)
        else:
            values = lift(ctx, args)
        if is_result:
            try:
                ok = impl(ctx, *values)
            except ErrResult as err:
                value = (1, err.value)
            else:
                if ok is None and ok_empty is not None:     # result<_, E>: ok, no payload
                    ctx.memory.write(args[n_flat if not spilled else 1] & 0xFFFF_FFFF, ok_empty)
                    return None
                value = (0, ok)
        else:
            value = impl(ctx, *values)
        if result is None:
            return None
        if retptr:
            buf = bytearray(result.size)
            result.store(ctx, buf, 0, value)
            ctx.memory.write(args[n_flat if not spilled else 1] & 0xFFFF_FFFF, buf)
            return None
        out: list = []
        result.lower_flat(ctx, value, out)
        return out[0]

    return HostFunction(fn.interface, fn.import_name, core_params, core_results, call,
                        None if spilled or retptr or is_result else direct_form(params, result, impl))


def build_host_functions(wit_dir: Path) -> dict[tuple[str, str], HostFunction]:
    """Every WIT function under ``wit_dir`` that has an implementation, as a core host
    function keyed by (module, name). ``[resource-drop]`` functions without an explicit
    implementation drop the handle from the caller's table for that resource.

    Raises:
        WitError: the WIT files do not parse.
    """
    functions = {}
    for iface in parse_dir(wit_dir).values():
        for fn in iface.functions.values():
            impl = IMPLEMENTATIONS.get((fn.interface, fn.import_name))
            if impl is None and fn.import_name.startswith("[resource-drop]"):
                resource = fn.params[0][1].resource.key
                impl = _dropper(resource)
            if impl is not None:
                functions[(fn.interface, fn.import_name)] = trampoline(fn, impl)
    return functions


def legacy_function(fn: Function) -> Function | None:
    """The pre-2025-03 wasmCV form of ``fn``, or None when it has none.

    Until March 2025 wasmCV's functions returned ``T`` where they now return
    ``result<T, error-result>`` (and nothing where they now return ``result<_,
    error-result>``); wasmVision's published processors were built against that form, so
    the host offers both and links whichever core signature a module imports.
    """
    result = fn.result
    if (fn.interface.startswith("wasm:cv/") and isinstance(result, ResultT)
            and isinstance(result.err, Prim) and result.err.name == "string"):
        return Function(fn.interface, fn.import_name, fn.params, result.ok, fn.docs)
    return None


def legacy_trampoline(fn: Function, legacy: Function, impl: Callable) -> HostFunction:
    """Core host function for the legacy form of ``fn``: an error has no channel there, so
    it is logged once per processor and function, and the call returns an empty mat, an
    empty list, zero or nothing; a function that should return another resource (a
    ``net``, a detector) traps, failing that frame's call with the message."""
    ok_type = legacy.result

    def unwrap(ctx, *values):
        try:
            return impl(ctx, *values)
        except ErrResult as err:
            message = f"{fn.import_name} failed: {err.value}"
            if isinstance(ok_type, Handle) and ok_type.resource.key != "wasm:cv/mat.mat":
                raise AbiError(message) from None
            ctx.log_once(f"{message} (reported once; this processor uses the pre-2025 wasm:cv interface, "
                         f"which has no error results)")
            return _empty_value(ok_type)

    return trampoline(legacy, unwrap)


def _empty_value(ty):
    if ty is None:
        return None
    if isinstance(ty, Handle):
        return np.empty((0, 0), np.uint8)
    if isinstance(ty, ListT):
        return []
    if isinstance(ty, Prim):
        return {"bool": False, "string": "", "char": "\0", "f32": 0.0, "f64": 0.0}.get(ty.name, 0)
    if isinstance(ty, RecordT):
        return tuple(_empty_value(t) for _, t in ty.fields)
    return 0


def build_legacy_functions(wit_dir: Path) -> dict[tuple[str, str], HostFunction]:
    """The legacy forms (see :func:`legacy_function`) of the implemented functions."""
    functions = {}
    for iface in parse_dir(wit_dir).values():
        for fn in iface.functions.values():
            impl = IMPLEMENTATIONS.get((fn.interface, fn.import_name))
            legacy = legacy_function(fn)
            if impl is not None and legacy is not None:
                functions[(fn.interface, fn.import_name)] = legacy_trampoline(fn, legacy, impl)
    return functions


def _dropper(resource: str) -> Callable:
    def drop(ctx, handle):
        ctx.table(resource).take(handle)
    return drop


def declared_functions(wit_dir: Path) -> dict[tuple[str, str], Function]:
    """Every function the WIT under ``wit_dir`` declares, by (module, name)."""
    return {(fn.interface, fn.import_name): fn
            for iface in parse_dir(wit_dir).values() for fn in iface.functions.values()}
