"""Several frames as one image: the grid that BLIP and BLIP-2 (one image per prompt), and
LLaVA when its prompt with one ``<image>`` per frame would not fit its positions, answer on.

:func:`grid_geometry` says where each frame goes: ``cols = ceil(sqrt(n))`` columns, ``rows =
ceil(n / cols)`` rows, every tile the size of the last (newest) frame, the oldest frame top
left, then left to right, top to bottom; tiles that are left over stay black. When the whole
grid would have more than ``max_pixels`` pixels the tiles are scaled down together (same
aspect), so a grid never holds more pixels than one allowed image. :func:`compose_grid` pastes
the frames (Pillow images) into it. Pillow is imported inside the function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Grid", "compose_grid", "grid_geometry"]


@dataclass(frozen=True)
class Grid:
    """A grid of ``n`` frames: ``cols`` × ``rows`` tiles of ``tile_width`` × ``tile_height``
    pixels (frame ``i``, oldest first, at column ``i % cols``, row ``i // cols``)."""

    n: int
    cols: int
    rows: int
    tile_width: int
    tile_height: int

    @property
    def size(self) -> tuple[int, int]:
        """The grid image's (width, height) in pixels."""
        return self.cols * self.tile_width, self.rows * self.tile_height

    def box(self, i: int) -> tuple[int, int]:
        """The top-left corner (x, y) of frame ``i``'s tile."""
        return (i % self.cols) * self.tile_width, (i // self.cols) * self.tile_height


def grid_geometry(n: int, last_size: tuple[int, int], max_pixels: int | None = None) -> Grid:
    """The grid for ``n`` frames (n ≥ 1) whose newest is ``last_size`` (width, height): tiles of
    that size, scaled down together when the grid would exceed ``max_pixels`` (None: no limit).

    Raises:
        ValueError: ``n`` below 1, or a size that is not positive.
    """
    width, height = last_size
    if n < 1 or width < 1 or height < 1:
        raise ValueError(f"a grid needs at least one frame of a positive size, not {n} of {width}×{height}")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    total = cols * rows * width * height
    if max_pixels is not None and total > max_pixels:
        scale = math.sqrt(max_pixels / total)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    return Grid(n, cols, rows, width, height)


def compose_grid(frames: Iterable, n: int, last_size: tuple[int, int], max_pixels: int | None = None):
    """The ``n`` frames (RGB Pillow images, oldest first; an iterator is consumed one frame
    at a time, so only one full-size frame need be in memory) tiled as :func:`grid_geometry`
    says: an RGB Pillow image of the grid's size, and the :class:`Grid`.

    Raises:
        ValueError: ``frames`` does not hold ``n`` frames.
    """
    from PIL import Image

    grid = grid_geometry(n, last_size, max_pixels)
    canvas = Image.new("RGB", grid.size)
    tile = (grid.tile_width, grid.tile_height)
    count = 0
    for i, frame in enumerate(frames):
        if i >= n:
            raise ValueError(f"more than the {n} frames announced for the grid")
        canvas.paste(frame if frame.size == tile else frame.resize(tile, Image.Resampling.BICUBIC), grid.box(i))
        count += 1
    if count != n:
        raise ValueError(f"{count} frames for a grid of {n}")
    return canvas, grid
