"""Recent frames for multi-frame caption requests: the host side of ``keep-frame`` and
``post-frames`` (``vision-host:platform/fetch``, WIT: ``wasm/wit/vision-host.wit``).

A processor that wants a vision model to see motion keeps small downscaled copies of its
frames in the host (:class:`FrameRing`, one per processor instance, created on its first
``keep-frame``) and later sends several of them in one request: the copies nearest moments
spread evenly over the last ``span`` seconds, then the current frame (:meth:`FrameRing.select`,
:func:`gather_frames`). They go either as one item per frame (``images``: the template's
``%EACH%`` … ``%END%`` part repeated, as Ollama's ``images`` list or OpenAI image parts take
them) or tiled into one grid JPEG whose tiles carry their time (``grid``, for models that
take one image) (:func:`frames_jpeg_body`, :func:`compose_grid`).

Memory stays flat over a long run: the ring holds at most ``capacity`` copies (1–64) and at
most ``max_bytes`` in all, and once full it writes each new copy into the array of the copy
it drops when their sizes match, so a steady stream allocates nothing per frame. The ring is
used only from its processor's thread (host calls of one instance never overlap); what a
request needs is copied out during the call, so the worker thread that encodes and sends
it never reads the ring.
"""

from __future__ import annotations

import base64
import enum
import math
import time
from collections import deque
from collections.abc import Callable

import cv2
import numpy as np

#: Most copies a ring holds (``keep-frame``'s ``capacity`` is clamped to 1 … this).
MAX_CAPACITY = 64
#: Most frames one ``post-frames`` request carries (``count`` is clamped to 1 … this).
MAX_COUNT = 16
#: Default cap on the bytes of one ring's copies (older copies are dropped first).
DEFAULT_MAX_BYTES = 128 * 1024 * 1024

_EACH, _END = b"%EACH%", b"%END%"
_IMAGE, _IMAGE_BYTES = b"%IMAGE%", b"%IMAGE_BYTES%"
_FONT = cv2.FONT_HERSHEY_SIMPLEX


class FramesLayout(enum.IntEnum):
    """``vision-host:platform/fetch.frames-layout`` case indices."""

    IMAGES = 0
    GRID = 1


class FrameRingError(ValueError):
    """A frame or template ``keep-frame`` / ``post-frames`` cannot use; the message says what
    to change. The host function answers ``runtime-error``."""


# -- single images ---------------------------------------------------------------------------
def downscaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is at most ``max_side`` px (0 = no
    limit; never enlarged; each side at least 1 px)."""
    longer = max(width, height)
    if not max_side or longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def downscale(frame: np.ndarray, max_side: int, copy: bool = True) -> np.ndarray:
    """``frame`` (H×W or H×W×C) with its longer side at most ``max_side`` px (0 = full size),
    shrunk with area interpolation: a new array, or ``frame`` itself when it is small enough
    and ``copy`` is False.

    While the frame is at least twice the size asked (both sides even), it is first halved:
    OpenCV's area interpolation has a fast path for a whole factor, so 1920×1080 → 672×378 takes
    half the time of one general area resize, within 0.1 grey level on average.
    """
    h, w = frame.shape[:2]
    size = downscaled_size(w, h, max_side)
    if size == (w, h):
        return frame.copy() if copy else frame
    frame = _halved(frame, size)
    return frame if frame.shape[1::-1] == size else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _halved(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frame`` halved (area interpolation, OpenCV's whole-factor fast path) while it is at
    least twice ``size`` (``(width, height)`` px) and both its sides are even; itself when not."""
    h, w = frame.shape[:2]
    while w >= 2 * size[0] and h >= 2 * size[1] and w % 2 == 0 and h % 2 == 0:
        w, h = w // 2, h // 2
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    return frame


def as_bgr(frame: np.ndarray) -> np.ndarray:
    """``frame`` as an H×W×3 uint8 BGR image: itself when it already is one, else converted
    (grey H×W or H×W×1, BGRA H×W×4).

    Raises:
        FrameRingError: an empty mat, or one that is not 8-bit with 1, 3 or 4 channels.
    """
    if not isinstance(frame, np.ndarray) or frame.size == 0 or frame.ndim not in (2, 3):
        raise FrameRingError("the frame is empty or not an image: pass the video frame or an 8-bit image mat")
    if frame.dtype != np.uint8:
        raise FrameRingError(f"a frame of element type {frame.dtype} cannot be sent: convert it to 8-bit "
                             f"(CV_8UC1/3/4) first")
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    if channels == 3:
        return frame
    if channels == 1:
        return cv2.cvtColor(frame.reshape(frame.shape[:2]), cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    raise FrameRingError(f"a frame with {channels} channels cannot be sent: use 1, 3 or 4 channels")


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` as JPEG bytes (a uint8 array) at ``quality`` (clamped to 1–100).

    Raises:
        ValueError: OpenCV could not encode it.
    """
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, min(100, max(1, int(quality)))])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg


def fill_image(template: bytes, jpeg: np.ndarray) -> bytes:
    """``template`` with its first image placeholder replaced by ``jpeg``: ``%IMAGE%`` by its
    base64, or, when ``%IMAGE_BYTES%`` comes first, that by its bytes as a JSON array of
    numbers (``[255,216,…]``, Cloudflare Workers AI's image field). Later placeholders and a
    template without one are left as they are."""
    at_bytes = template.find(_IMAGE_BYTES)
    at_base64 = template.find(_IMAGE)
    if at_bytes >= 0 and (at_base64 < 0 or at_bytes <= at_base64):
        numbers = b"[" + b",".join(b"%d" % v for v in jpeg.ravel().tolist()) + b"]"
        return template[:at_bytes] + numbers + template[at_bytes + len(_IMAGE_BYTES):]
    return template.replace(_IMAGE, base64.b64encode(jpeg.tobytes()), 1)


# -- the ring ----------------------------------------------------------------------------------
class FrameRing:
    """One processor instance's newest downscaled frame copies, each stamped with ``clock()``.

    Args:
        capacity: copies kept until the first :meth:`keep` sets it (clamped to 1–64).
        max_bytes: most bytes of copies at once (≥ 1); when a new copy would pass it, the
            oldest copies are dropped first (the newest copy is always kept).
        clock: monotonic seconds (default ``time.monotonic``; tests inject their own).
    """

    def __init__(self, capacity: int = 8, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = min(MAX_CAPACITY, max(1, int(capacity)))
        self.max_bytes = max(1, int(max_bytes))
        self.clock = clock
        self._kept: deque[tuple[float, np.ndarray]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies (at most ``capacity`` × one copy's size, and ``max_bytes``)."""
        return self._bytes

    def times(self) -> list[float]:
        """The copies' times in s, oldest first."""
        return [t for t, _ in self._kept]

    def keep(self, frame: np.ndarray, max_side: int, capacity: int) -> None:
        """Keep a copy of ``frame`` shrunk (area interpolation, halved first as :func:`downscale`
        does) so its longer side is at most
        ``max_side`` px (0 = full size), stamped with ``clock()``, as the newest of at most
        ``capacity`` copies (clamped to 1–64; a smaller one than before drops the oldest at
        once). The dropped copy's array is reused when it has the new copy's size.

        Raises:
            FrameRingError: see :func:`as_bgr`.
        """
        image = as_bgr(frame)
        self.capacity = min(MAX_CAPACITY, max(1, int(capacity)))
        h, w = image.shape[:2]
        size = downscaled_size(w, h, max_side)
        shape = (size[1], size[0], 3)
        need = size[0] * size[1] * 3
        spare = None
        while self._kept and (len(self._kept) >= self.capacity or self._bytes + need > self.max_bytes):
            _, old = self._kept.popleft()
            self._bytes -= old.nbytes
            if spare is None and old.shape == shape:
                spare = old
        copy = spare if spare is not None else np.empty(shape, np.uint8)
        image = _halved(image, size)          # as downscale() does: half the time at 1080p
        if image.shape[1::-1] == size:
            np.copyto(copy, image)
        else:
            cv2.resize(image, size, dst=copy, interpolation=cv2.INTER_AREA)
        self._kept.append((self.clock(), copy))
        self._bytes += copy.nbytes

    def select(self, count: int, span_s: float, now: float) -> list[tuple[float, np.ndarray]]:
        """The kept copies to send with the frame of moment ``now``, oldest first, as
        ``(time_s, image)`` (the ring's own arrays: copy them before the next :meth:`keep`).

        With n = ``count`` clamped to 1–16 and spacing = ``span_s`` / (n − 1): for k = 0 …
        n − 2, the copy nearest ``now − span_s·(n−1−k)/(n−1)`` among those newer than the
        copy chosen before (each used once, times strictly increasing) and not newer than
        ``now − spacing/2`` (the frame itself stands for those). A moment older than the
        oldest copy by more than spacing/2 is skipped, so early in a stream fewer come back.
        Nothing when n is 1, ``span_s`` ≤ 0 or the ring is empty.
        """
        n = min(MAX_COUNT, max(1, int(count)))
        if n == 1 or span_s <= 0 or not self._kept:
            return []
        spacing = span_s / (n - 1)
        kept = list(self._kept)
        oldest = kept[0][0]
        newest_allowed = now - spacing / 2
        chosen: list[tuple[float, np.ndarray]] = []
        start = 0
        for k in range(n - 1):
            target = now - span_s * (n - 1 - k) / (n - 1)
            if target < oldest - spacing / 2:
                continue
            best = None
            for i in range(start, len(kept)):
                t = kept[i][0]
                if t > newest_allowed:
                    break
                if best is None or abs(t - target) < abs(kept[best][0] - target):
                    best = i
            if best is None:
                break                      # nothing newer is left for the later moments either
            chosen.append(kept[best])
            start = best + 1
        return chosen


def gather_frames(ring: FrameRing | None, frame: np.ndarray, max_side: int, count: int,
                  span_s: float) -> list[tuple[float, np.ndarray]]:
    """The frames of one ``post-frames`` request, oldest first, as ``(time_s, image)`` owned
    copies, each downscaled so its longer side is at most ``max_side`` px (0 = as kept): the
    ring's choice (:meth:`FrameRing.select` at the ring's ``clock()``) and then ``frame``
    itself (as BGR) stamped now. Only ``frame`` when there is no ring yet.

    Raises:
        FrameRingError: ``frame`` is not an image (see :func:`as_bgr`).
    """
    image = as_bgr(frame)
    now = ring.clock() if ring is not None else time.monotonic()
    picked = ring.select(count, span_s, now) if ring is not None else []
    chosen = [(t, downscale(kept, max_side)) for t, kept in picked]
    chosen.append((now, downscale(image, max_side)))
    return chosen


# -- request bodies ------------------------------------------------------------------------------
def split_template(template: bytes) -> tuple[bytes, bytes, bytes]:
    """``(before, item, after)`` around the first ``%EACH%`` and the first ``%END%`` after it.

    Raises:
        FrameRingError: the markers are missing.
    """
    at_each = template.find(_EACH)
    at_end = template.find(_END, at_each + len(_EACH)) if at_each >= 0 else -1
    if at_each < 0 or at_end < 0:
        raise FrameRingError("post-frames with layout images needs a template that marks the per-frame item "
                             "as %EACH%…%END% (e.g. \"images\":[%EACH%\"%IMAGE%\"%END%])")
    return template[:at_each], template[at_each + len(_EACH):at_end], template[at_end + len(_END):]


def label_text(seconds: float) -> str:
    """A tile's label: its time relative to the newest frame, ``-1.5 s`` … ``0.0 s``."""
    return f"{round(seconds, 1) + 0.0:.1f} s"


def _label(tile: np.ndarray, text: str) -> None:
    """Draw ``text`` white on a black box in the top-left corner of ``tile`` (a view), sized
    to the tile (≈ 1/12 of its height, and never wider than it)."""
    th, tw = tile.shape[:2]
    scale = min(2.0, max(0.3, th / 300))
    thickness = 2 if scale >= 1.0 else 1
    (width, height), base = cv2.getTextSize(text, _FONT, scale, thickness)
    if width + 4 > tw:
        scale = max(0.2, scale * (tw - 4) / max(1, width))
        (width, height), base = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, round(height * 0.3))
    cv2.rectangle(tile, (0, 0), (min(tw, width + 2 * pad) - 1, min(th, height + base + 2 * pad) - 1),
                  (0, 0, 0), cv2.FILLED)
    cv2.putText(tile, text, (pad, pad + height), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def compose_grid(frames: list[tuple[float, np.ndarray]], max_side: int) -> np.ndarray:
    """One BGR image of ``frames`` (``(time_s, H×W×3 uint8)``, oldest first) tiled left to
    right, top to bottom in ceil(sqrt(n)) columns and ceil(n / columns) rows; each tile has
    the newest frame's size, the whole is shrunk so its longer side is at most ``max_side``
    px (0 = no limit; a tile keeps at least 1×1 px; each tile is resized once, straight to
    its final size), unused tiles are black, and each tile is labelled with
    :func:`label_text` of its time minus the newest's."""
    n = len(frames)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    newest_t, newest = frames[-1]
    h, w = newest.shape[:2]
    tw, th = w, h
    longer = max(cols * w, rows * h)
    if max_side and longer > max_side:
        scale = max_side / longer
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    grid = np.zeros((rows * th, cols * tw, 3), np.uint8)
    for k, (t, image) in enumerate(frames):
        r, c = divmod(k, cols)
        tile = grid[r * th:(r + 1) * th, c * tw:(c + 1) * tw]
        tile[...] = image if image.shape[:2] == (th, tw) else cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
        _label(tile, label_text(t - newest_t))
    return grid


def frames_jpeg_body(frames: list[tuple[float, np.ndarray]], template: bytes, layout: FramesLayout,
                     max_side: int, quality: int) -> Callable[[], bytes]:
    """Prepare a body builder for ``post-frames`` from ``frames`` (owned copies, oldest first,
    from :func:`gather_frames`); the returned function runs on a worker thread.

    ``images``: the body is ``template``'s part before ``%EACH%``, then its item (between
    ``%EACH%`` and ``%END%``) once per frame joined by ``,``, each filled with that frame's
    JPEG by :func:`fill_image`, then the part after ``%END%``. ``grid``: :func:`fill_image`
    of the whole template with the JPEG of :func:`compose_grid` (shrunk to ``max_side``).
    JPEGs at ``quality`` (1–100).

    Raises:
        FrameRingError: ``images`` and the template lacks ``%EACH%``…``%END%`` (checked now).
    """
    if layout == FramesLayout.IMAGES:
        before, item, after = split_template(template)

        def build_images() -> bytes:
            return before + b",".join(fill_image(item, encode_jpeg(image, quality)) for _, image in frames) + after

        return build_images

    def build_grid() -> bytes:
        return fill_image(template, encode_jpeg(compose_grid(frames, max_side), quality))

    return build_grid


__all__ = ["DEFAULT_MAX_BYTES", "FrameRing", "FrameRingError", "FramesLayout", "MAX_CAPACITY", "MAX_COUNT",
           "as_bgr", "compose_grid", "downscale", "downscaled_size", "encode_jpeg", "fill_image",
           "frames_jpeg_body", "gather_frames", "label_text", "split_template"]
