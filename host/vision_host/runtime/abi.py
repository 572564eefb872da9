"""Canonical-ABI helpers: bounds-checked guest memory access and host-function registration.

Follows the component model's Canonical ABI (``CanonicalABI.md`` of the WebAssembly
component-model repository) for the shapes vision-host's interfaces use:

* a ``string`` or ``list<u8>`` argument arrives as ``(ptr: i32, len: i32)`` in guest memory;
  strings are UTF-8;
* a result that flattens to more than one value is written by the host into a *return area*
  whose address the guest passes as the last argument; for ``result<T, E>`` the discriminant
  is a byte at offset 0 (0 = ok, 1 = err) and the payload starts at offset 4;
* a string or list the host returns lives in guest memory, allocated by the guest's
  ``cabi_realloc(old_ptr, old_size, align, new_size)`` (Rust, C, Zig bindings) or
  ``malloc(size)`` (TinyGo); the guest owns and frees it.

Every violation (pointer or length outside memory, invalid UTF-8, unknown handle, allocator
failure) raises :class:`AbiError`, which traps the guest's call: the host never crashes.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Callable

import wasmtime

__all__ = ["AbiError", "GuestMemory", "HostFunction", "host_function", "HOST_FUNCTIONS", "VALTYPES"]

#: Signature letters used by :func:`host_function`: i32, i64, f32, f64.
VALTYPES = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i64(),
            "f": wasmtime.ValType.f32(), "F": wasmtime.ValType.f64()}

_RESULT_OK = struct.Struct("<BxxxI")           # result<u32|handle|enum, _> ok / err enum
_RESULT_PTR_LEN = struct.Struct("<BxxxII")     # result<string|list, _> ok, or err string
_PTR_LEN = struct.Struct("<II")                # list / string in a return area


class AbiError(Exception):
    """A processor broke the ABI (bad pointer, length, handle or UTF-8): its call traps."""


class GuestMemory:
    """Bounds-checked access to one instance's linear memory, and its allocator.

    Built after instantiation from the instance's ``memory`` export and its allocator export
    (``cabi_realloc``, else ``malloc``). Addresses and lengths are guest byte offsets (u32).

    Raises:
        AbiError: from every accessor when a range falls outside memory, from
            :meth:`read_str` on invalid UTF-8, from :meth:`alloc` when the module exports no
            allocator or it returns an unusable pointer.
    """

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory,
                 realloc: wasmtime.Func | None = None, malloc: wasmtime.Func | None = None):
        self._store = store
        self._memory = memory
        self._realloc = realloc
        self._malloc = malloc
        # Memories never move (the engine is configured with memory_may_move(False)),
        # so the base address is fixed for the instance's life; only the length changes.
        self._base = ctypes.addressof(memory.data_ptr(store).contents)

    @property
    def size(self) -> int:
        """Current linear-memory size in bytes."""
        return self._memory.data_len(self._store)

    def _check(self, ptr: int, length: int) -> int:
        if ptr < 0 or length < 0 or ptr + length > self._memory.data_len(self._store):
            raise AbiError(f"guest range [{ptr}, {ptr + length}) is outside its "
                           f"{self._memory.data_len(self._store)}-byte memory")
        return self._base + ptr

    def read(self, ptr: int, length: int) -> bytes:
        """Copy ``length`` bytes at guest address ``ptr``."""
        if length == 0:
            return b""
        return ctypes.string_at(self._check(ptr, length), length)

    def view(self, ptr: int, length: int) -> memoryview:
        """Zero-copy writable view of guest bytes, valid until the guest next runs."""
        addr = self._check(ptr, length)
        return memoryview((ctypes.c_ubyte * length).from_address(addr)).cast("B")

    def read_str(self, ptr: int, length: int) -> str:
        """Decode the UTF-8 string at ``(ptr, length)``."""
        try:
            return self.read(ptr, length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AbiError(f"string at {ptr} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest address ``ptr``."""
        n = len(data)
        if n:
            ctypes.memmove(self._check(ptr, n), bytes(data) if isinstance(data, memoryview) else data, n)

    def alloc(self, size: int, align: int = 1) -> int:
        """Allocate ``size`` bytes in the guest with its own allocator; returns the address."""
        if size == 0:
            return align  # canonical ABI: a zero-length list may use any aligned pointer
        if self._realloc is not None:
            ptr = self._realloc(self._store, 0, 0, align, size)
        elif self._malloc is not None:
            ptr = self._malloc(self._store, size)
        else:
            raise AbiError("the processor exports no allocator (cabi_realloc or malloc) "
                           "but called a function that returns a string or list")
        if not isinstance(ptr, int) or ptr == 0 or ptr % align:
            raise AbiError(f"the processor's allocator returned an unusable pointer ({ptr}) for {size} bytes")
        self._check(ptr, size)
        return ptr

    def lower_bytes(self, data: bytes) -> tuple[int, int]:
        """Copy ``data`` into a fresh guest allocation; returns ``(ptr, len)``."""
        ptr = self.alloc(len(data), 1)
        self.write(ptr, data)
        return ptr, len(data)

    def lower_str(self, text: str) -> tuple[int, int]:
        """Copy ``text`` as UTF-8 into a fresh guest allocation; returns ``(ptr, len)``."""
        return self.lower_bytes(text.encode("utf-8"))

    # Return-area writers -------------------------------------------------------------
    def ret_ok_u32(self, retptr: int, value: int) -> None:
        """``result<u32-like, E>`` ok (also handles and ``bool`` payloads)."""
        self.write(retptr, _RESULT_OK.pack(0, value))

    def ret_err_enum(self, retptr: int, code: int, payload_offset: int = 4) -> None:
        """``result<T, enum>`` err with enum case index ``code``.

        The payload sits at the largest alignment of the two cases: 4 when ``T`` holds a
        u32, string or list, 1 when ``T`` is ``_`` or ``bool``.
        """
        self.write(retptr, bytes((1,)) + bytes(payload_offset - 1) + bytes((code,)))

    def ret_ok_bool(self, retptr: int, value: bool) -> None:
        """``result<bool, enum>`` ok: the bool byte at offset 1."""
        self.write(retptr, bytes((0, 1 if value else 0)))

    def ret_ok_unit(self, retptr: int) -> None:
        """``result<_, E>`` ok."""
        self.write(retptr, b"\x00")

    def ret_ok_bytes(self, retptr: int, data: bytes) -> None:
        """``result<string | list<u8>, E>`` ok, allocating the payload in the guest."""
        ptr, n = self.lower_bytes(data)
        self.write(retptr, _RESULT_PTR_LEN.pack(0, ptr, n))

    def ret_err_str(self, retptr: int, message: str) -> None:
        """``result<T, string>`` err (wasm:cv's ``error-result``)."""
        ptr, n = self.lower_str(message)
        self.write(retptr, _RESULT_PTR_LEN.pack(1, ptr, n))

    def ret_list(self, retptr: int, data: bytes, count: int, align: int) -> None:
        """A bare ``list<T>`` result: ``count`` elements already packed in ``data``."""
        ptr = self.alloc(len(data), align) if data else align
        self.write(ptr, data)
        self.write(retptr, _PTR_LEN.pack(ptr, count))

    def ret_str_list(self, retptr: int, items: list[str]) -> None:
        """A bare ``list<string>`` result: an array of ``(ptr, len)`` pairs."""
        pairs = b"".join(_PTR_LEN.pack(*self.lower_str(s)) for s in items)
        self.ret_list(retptr, pairs, len(items), 4)


@dataclass(frozen=True)
class HostFunction:
    """One imported function: where the guest finds it and how the host implements it.

    ``params``/``results`` are signature letters (see :data:`VALTYPES`); ``impl`` receives
    the instance's context object first, then the flattened core-wasm arguments.
    """

    module: str
    name: str
    params: str
    results: str
    impl: Callable

    def functype(self) -> wasmtime.FuncType:
        """The core-wasm type the guest must import this function with."""
        return wasmtime.FuncType([VALTYPES[c] for c in self.params], [VALTYPES[c] for c in self.results])


#: Every host function, filled by the interface modules at import time.
HOST_FUNCTIONS: dict[tuple[str, str], HostFunction] = {}


def host_function(module: str, name: str, params: str = "", results: str = "") -> Callable:
    """Decorator registering ``impl(ctx, *args)`` as import ``module``/``name``.

    The signature strings must match the canonical-ABI lowering of the WIT function under
    ``wasm/wit`` (a test checks them against a module generated from the WIT).
    """

    def register(impl: Callable) -> Callable:
        key = (module, name)
        if key in HOST_FUNCTIONS:
            raise ValueError(f"host function {module}#{name} registered twice")
        HOST_FUNCTIONS[key] = HostFunction(module, name, params, results, impl)
        return impl

    return register
