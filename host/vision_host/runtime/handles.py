"""Per-instance handle tables for WIT resources (``mat``, ``cascade-classifier``, ``net``, …).

A processor sees resources only as u32 handles; the objects stay in the host (a mat is a
numpy array: H×W×C uint8 BGR for colour frames, H×W for single-channel ones, other depths
and N-d blobs for what processors create). Every processor instance has its own tables, so
one processor cannot reach another's objects. Handles count up and are never reused, so a
dropped handle stays invalid; an unknown handle raises
:class:`~vision_host.runtime.abi.AbiError`, which traps the call.
"""

from __future__ import annotations

from .abi import AbiError

class HandleTable:
    """Maps u32 handles to host objects of one resource type for one processor instance.

    Args:
        what: the resource's name, for error messages.
        limit: most live handles at once; creating more raises AbiError (a processor leaking
            one per frame is stopped instead of exhausting host memory).
    """

    __slots__ = ("_objects", "_next", "_closed", "limit", "what")

    def __init__(self, what: str = "mat", limit: int = 1024):
        self._objects: dict[int, object] = {}
        self._next = 1
        self._closed: list[int] = []
        self.limit = limit
        self.what = what

    def __len__(self) -> int:
        return len(self._objects)

    def insert(self, obj: object) -> int:
        """Store ``obj`` and return its new handle."""
        if len(self._objects) >= self.limit:
            raise AbiError(f"too many live {self.what} handles ({self.limit}): the processor does not drop what it creates")
        handle = self._next
        self._next = handle + 1 if handle < 0xFFFF_FFFF else 1
        self._objects[handle] = obj
        return handle

    def get(self, handle: int) -> object:
        """The object behind ``handle``."""
        try:
            return self._objects[handle]
        except KeyError:
            raise AbiError(f"unknown or dropped {self.what} handle {handle}") from None

    def replace(self, handle: int, obj: object) -> None:
        """Point an existing ``handle`` at ``obj`` (``close``, ``copy-to``)."""
        self.get(handle)
        self._objects[handle] = obj

    def take(self, handle: int) -> object:
        """Remove ``handle`` and return its object."""
        try:
            return self._objects.pop(handle)
        except KeyError:
            raise AbiError(f"unknown or dropped {self.what} handle {handle}") from None

    def discard(self, handle: int) -> None:
        """Remove ``handle`` if present."""
        self._objects.pop(handle, None)

    def drop_from(self, first_handle: int) -> int:
        """Drop every handle ≥ ``first_handle``; returns how many were dropped."""
        stale = [h for h in self._objects if h >= first_handle]
        for h in stale:
            del self._objects[h]
        return len(stale)

    def close(self, handle: int, empty: object) -> None:
        """``close`` a handle: its object becomes ``empty`` for the rest of the call, and the
        handle is released when the call ends (:meth:`release_closed`). wasmVision's TinyGo
        bindings ``Close()`` mats and never drop them; without this their handles would pile
        up frame after frame."""
        self.replace(handle, empty)
        self._closed.append(handle)

    def release_closed(self) -> None:
        """Drop the handles closed during the call that just ended."""
        if self._closed:
            for handle in self._closed:
                self._objects.pop(handle, None)
            self._closed.clear()
