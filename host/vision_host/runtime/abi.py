"""Guest memory for the canonical ABI: bounds-checked access and the two allocator
conventions for strings and lists the host returns.

* ``cabi_realloc(old_ptr, old_size, align, new_size)`` (Rust, C and Zig bindings): every
  allocation is the guest's own, which it frees (``CanonicalABI.md``).
* ``malloc(size)``/``free(ptr)`` (TinyGo): TinyGo's bindings never free what the host
  returns, and its ``malloc`` keeps each block alive until ``free``. So the host keeps a
  per-instance *arena* of blocks it allocated once: a frame's returned strings and lists are
  bump-allocated in it, stay valid until the next frame, and the arena is reused from the
  start at each frame (:meth:`GuestMemory.reset_arena`). It grows by adding blocks when a
  frame needs more, so a long reply never overflows a fixed buffer, and blocks a frame did
  not need are freed (when the module exports ``free``).

Every violation (pointer or length outside memory, invalid UTF-8, allocator failure) raises
:class:`AbiError`, which traps the guest's call: the host never crashes.
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _bindings as _ffi

__all__ = ["WASMTIME_HOLDING_GIL", "AbiError", "GuestMemory"]

#: First arena block for malloc-convention guests (bytes); later blocks at least double.
ARENA_BLOCK = 16 * 1024

#: wasmtime's shared library as a ctypes.PyDLL: its functions are called holding Python's
#: interpreter lock (for C calls that never block, or wasm calls that are known to be quick).
#: A call that releases the lock (ctypes' default) must take it back afterwards; with several
#: streams on a busy machine another thread has usually taken it meanwhile, and the call then
#: waits for it: a thread switch for a call of nanoseconds.
WASMTIME_HOLDING_GIL = ctypes.PyDLL(_ffi.dll._name, handle=_ffi.dll._handle)

# wasmtime_memory_data_size as a bare function pointer, called with prepared arguments (a third
# of the cost of the bindings' checked call; it runs on every guest-memory access), keeping the
# interpreter lock (it reads one number).
_data_size = WASMTIME_HOLDING_GIL["wasmtime_memory_data_size"]
_data_size.restype = ctypes.c_size_t
# C's memmove keeping the interpreter lock, as ``ctypes.string_at`` (the reads) does:
# ``ctypes.memmove`` releases it, and a host function's writes into guest memory are a few
# bytes (a result, a pointer and length) to a few KiB (a reply's text).
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes._memmove_addr)


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
                 realloc: wasmtime.Func | None = None, malloc: wasmtime.Func | None = None,
                 free: wasmtime.Func | None = None):
        self._store = store
        self._memory = memory
        self._realloc = realloc
        self._malloc = malloc
        #: Called before the host calls into the guest's allocator from inside a host function,
        #: so the call's epoch deadline covers guest time only (a host function that waited,
        #: e.g. a blocking HTTP call, must not make the allocation look like a runaway guest).
        self.rearm = None
        #: Called when a call into the guest's allocator from inside a host function returns
        #: (the in-wasm mat accessors write back what the guest wrote meanwhile).
        self.after_guest = None
        self._free = free
        self._blocks: list[list[int]] = []   # [ptr, size] of arena blocks (malloc guests)
        self._block = 0                       # index of the block being filled
        self._used = 0                        # bytes used in it
        self._frame_blocks = 0                # blocks touched since the last reset
        # Memories never move (the engine is configured with memory_may_move(False)),
        # so the base address is fixed for the instance's life; only the length changes.
        self._base = ctypes.addressof(memory.data_ptr(store).contents)
        self._size_args = (ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value),
                           ctypes.byref(memory._memory))

    @property
    def size(self) -> int:
        """Current linear-memory size in bytes."""
        return _data_size(*self._size_args)

    def _check(self, ptr: int, length: int) -> int:
        size = _data_size(*self._size_args)
        if ptr < 0 or length < 0 or ptr + length > size:
            raise AbiError(f"guest range [{ptr}, {ptr + length}) is outside its {size}-byte memory")
        return self._base + ptr

    def read(self, ptr: int, length: int) -> bytes:
        """Copy ``length`` bytes at guest address ``ptr``."""
        if length == 0:
            return b""
        return ctypes.string_at(self._check(ptr, length), length)

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
            if isinstance(data, bytearray):
                data = (ctypes.c_char * n).from_buffer(data)
            elif isinstance(data, memoryview):
                data = bytes(data)
            _memmove(self._check(ptr, n), data, n)

    def alloc(self, size: int, align: int = 1) -> int:
        """Allocate ``size`` bytes in the guest with its own allocator; returns the address."""
        if size == 0:
            return align  # canonical ABI: a zero-length list may use any aligned pointer
        if self._realloc is not None:
            if self.rearm is not None:
                self.rearm()
            ptr = self._realloc(self._store, 0, 0, align, size)
            if self.after_guest is not None:
                self.after_guest()
        elif self._malloc is not None:
            return self._arena_alloc(size, align)
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

    @property
    def arena_bytes(self) -> int:
        """Bytes of guest memory the host's arena holds (0 for cabi_realloc guests)."""
        return sum(size for _, size in self._blocks)

    def _arena_alloc(self, size: int, align: int) -> int:
        while self._block < len(self._blocks):
            ptr, cap = self._blocks[self._block]
            start = (ptr + self._used + align - 1) & ~(align - 1)
            if start + size <= ptr + cap:
                self._used = start + size - ptr
                self._frame_blocks = max(self._frame_blocks, self._block + 1)
                return start
            self._block += 1
            self._used = 0
        cap = max(ARENA_BLOCK, 2 * (self._blocks[-1][1] if self._blocks else 0), size + align)
        if self.rearm is not None:
            self.rearm()
        ptr = self._malloc(self._store, cap)
        if self.after_guest is not None:
            self.after_guest()
        if not isinstance(ptr, int) or ptr <= 0:
            raise AbiError(f"the processor's malloc returned an unusable pointer ({ptr}) for {cap} bytes")
        self._check(ptr, cap)
        self._blocks.append([ptr, cap])
        self._block, self._used = len(self._blocks) - 1, 0
        return self._arena_alloc(size, align)

    def reset_arena(self) -> None:
        """Start a new frame: the arena is reused from its first block. Blocks the last frame
        did not touch are freed when the module exports ``free``."""
        if self._free is not None and len(self._blocks) > max(1, self._frame_blocks):
            for ptr, _ in self._blocks[max(1, self._frame_blocks):]:
                self._free(self._store, ptr)
            del self._blocks[max(1, self._frame_blocks):]
        self._block = self._used = self._frame_blocks = 0
