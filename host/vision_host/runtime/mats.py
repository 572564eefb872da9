"""Per-instance handle table for ``mat`` resources (``wasm:cv/mat``).

A processor sees frames only as u32 handles; the pixels stay in the host as numpy arrays
(H×W×C uint8 BGR for colour frames, H×W for single-channel ones, other depths for
``new-with-size``). Every processor instance has its own table, so one processor cannot
reach another's mats. Handles count up and are never reused, so a dropped handle stays
invalid; an unknown handle raises :class:`~vision_host.runtime.abi.AbiError`.
"""

from __future__ import annotations

import numpy as np

from .abi import AbiError

#: OpenCV depth codes (CV_8U … CV_64F) in wasm:cv's ``mattype`` enum order.
DEPTH_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)
_DTYPE_DEPTH = {np.dtype(t): i for i, t in enumerate(DEPTH_DTYPES)}


def cv_type(array: np.ndarray) -> int:
    """OpenCV type code of ``array`` (depth + 8 × (channels − 1)), e.g. 16 for H×W×3 uint8."""
    channels = 1 if array.ndim < 3 else array.shape[2]
    return _DTYPE_DEPTH.get(array.dtype, 0) + 8 * (channels - 1)


def dtype_channels(mattype: int) -> tuple[type, int]:
    """numpy dtype and channel count for a wasm:cv ``mattype`` enum value or OpenCV type code.

    Raises:
        AbiError: for a depth OpenCV does not define.
    """
    depth, channels = mattype & 7, (mattype >> 3) + 1
    if depth >= len(DEPTH_DTYPES) or channels > 4:
        raise AbiError(f"unsupported mat type {mattype}")
    return DEPTH_DTYPES[depth], channels


class MatTable:
    """Maps u32 handles to numpy arrays for one processor instance.

    Args:
        limit: most live handles at once; creating more raises AbiError (a processor leaking
            a mat per frame is stopped instead of exhausting host memory).
    """

    __slots__ = ("_mats", "_next", "limit")

    def __init__(self, limit: int = 1024):
        self._mats: dict[int, np.ndarray] = {}
        self._next = 1
        self.limit = limit

    def __len__(self) -> int:
        return len(self._mats)

    @property
    def next_handle(self) -> int:
        """The handle the next :meth:`insert` will return (handles only ever increase)."""
        return self._next

    def insert(self, array: np.ndarray) -> int:
        """Store ``array`` and return its new handle."""
        if len(self._mats) >= self.limit:
            raise AbiError(f"too many live mats ({self.limit}): the processor does not drop the mats it creates")
        handle = self._next
        self._next = handle + 1 if handle < 0xFFFF_FFFF else 1
        self._mats[handle] = array
        return handle

    def get(self, handle: int) -> np.ndarray:
        """The array behind ``handle``."""
        try:
            return self._mats[handle]
        except KeyError:
            raise AbiError(f"unknown or dropped mat handle {handle}") from None

    def replace(self, handle: int, array: np.ndarray) -> None:
        """Point an existing ``handle`` at ``array`` (``close``, ``copy-to``)."""
        self.get(handle)
        self._mats[handle] = array

    def take(self, handle: int) -> np.ndarray:
        """Remove ``handle`` and return its array."""
        try:
            return self._mats.pop(handle)
        except KeyError:
            raise AbiError(f"unknown or dropped mat handle {handle}") from None

    def discard(self, handle: int) -> None:
        """Remove ``handle`` if present."""
        self._mats.pop(handle, None)

    def drop_from(self, first_handle: int, keep: int = 0) -> int:
        """Drop every handle ≥ ``first_handle`` except ``keep``; returns how many were dropped."""
        stale = [h for h in self._mats if h >= first_handle and h != keep]
        for h in stale:
            del self._mats[h]
        return len(stale)
