"""Host side of ``vision-host:platform/overlay``: captions drawn on frames.

A caption is word-wrapped to the frame width with OpenCV's Hershey simplex font and drawn on
a background band at the top or bottom. Layouts are cached, so redrawing an unchanged caption
on every frame costs one ``getTextSize``-free host call; so is the text's antialiased coverage,
laid over the band each frame instead of drawing the strokes again. Hershey fonts cover ASCII only:
other characters are transliterated where Unicode decomposes them (é → e), else shown as ``?``.
"""

from __future__ import annotations

import functools
import math
import unicodedata

import cv2
import numpy as np

from .canon import ErrResult, implements
from .cv import bgr

FONT = cv2.FONT_HERSHEY_SIMPLEX
MARGIN_PX = 8


def drawable(text: str) -> str:
    """``text`` reduced to the printable ASCII the Hershey fonts can draw."""
    if text.isascii():
        return "".join(c if c.isprintable() else " " for c in text)
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        if ch.isascii():
            out.append(ch if ch.isprintable() else " ")
        elif not unicodedata.combining(ch):
            out.append("?")
    return "".join(out)


def warm_up() -> None:
    """Load OpenCV's Hershey font tables now (~40 ms the first time), not on a frame."""
    cv2.getTextSize("Ag", FONT, 1.0, 1)
    cv2.putText(np.zeros((24, 48, 3), np.uint8), "Ag", (0, 20), FONT, 1.0, (255, 255, 255), 1, cv2.LINE_AA)


def _thickness(scale: float) -> int:
    return 1 if scale < 0.8 else 2


@functools.lru_cache(maxsize=256)
def layout(text: str, width_px: int, scale: float, max_lines: int) -> tuple[tuple[str, ...], int, int]:
    """Wrap ``text`` into lines no wider than ``width_px`` (minus margins).

    Returns ``(lines, line_height_px, baseline_px)``, keeping the last ``max_lines`` lines
    (the newest words of a streaming caption).
    """
    thickness = _thickness(scale)
    (_, text_h), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    room = max(1, width_px - 2 * MARGIN_PX)

    def width(s: str) -> int:
        return cv2.getTextSize(s, FONT, scale, thickness)[0][0]

    lines: list[str] = []
    current = ""
    for word in drawable(text).split():
        candidate = f"{current} {word}" if current else word
        if width(candidate) <= room:
            current = candidate
            continue
        if current:
            lines.append(current)
        while width(word) > room and len(word) > 1:   # break words longer than a line
            cut = len(word) - 1
            while cut > 1 and width(word[:cut]) > room:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return tuple(lines[-max_lines:] if max_lines > 0 else lines), text_h + baseline + 6, baseline


@functools.lru_cache(maxsize=8)
def _solid(shape: tuple[int, ...], colour: tuple[int, int, int]) -> np.ndarray:
    """A reusable band of one colour (read-only use)."""
    return np.full(shape, colour, np.uint8)


@functools.lru_cache(maxsize=32)
def _text_layer(lines: tuple[str, ...], width: int, band_h: int, scale: float, line_h: int, baseline: int,
                fg: tuple[int, int, int]):
    """The caption's text as a layer to lay over its band: ``(rows, cols, keep, add)``, where
    ``rows``/``cols`` are the slices of the band the text touches and, there, a pixel becomes
    ``pixel × keep / 255 + add`` (``keep`` = 255 − the antialiased coverage, ``add`` = the
    text colour × coverage / 255). None when the text leaves no mark.

    OpenCV's antialiased ``putText`` blends the colour over each pixel by its coverage, stroke
    after stroke; drawn once on black with 255 that gives the combined coverage, so laying the
    layer over any band gives what drawing on it would (within ±4 of 255 from rounding), at a
    fraction of the cost when the caption stays the same frame after frame.
    """
    mask = np.zeros((band_h, width), np.uint8)
    thickness = _thickness(scale)
    y = MARGIN_PX // 2
    for line in lines:
        y += line_h
        cv2.putText(mask, line, (MARGIN_PX, y - baseline - 3), FONT, scale, 255, thickness, cv2.LINE_AA)
    x0, y0, w, h = cv2.boundingRect(mask)          # of the pixels the text touches
    if not w:
        return None
    rows, cols = slice(y0, y0 + h), slice(x0, x0 + w)
    cover = cv2.cvtColor(mask[rows, cols], cv2.COLOR_GRAY2BGR)
    keep = cv2.bitwise_not(cover)                                    # 255 − coverage
    colour = cv2.merge([np.full((h, w), c, np.uint8) for c in fg])     # (numpy fills 3-channel pixels slowly)
    add = cv2.multiply(cover, colour, scale=1.0 / 255.0)              # colour × coverage / 255, rounded
    keep.flags.writeable = add.flags.writeable = False
    return rows, cols, keep, add


@functools.lru_cache(maxsize=32)
def _fused_layer(lines: tuple[str, ...], width: int, band_h: int, scale: float, line_h: int, baseline: int,
                 fg: tuple[int, int, int], bg_alpha: int, grey: int):
    """The whole band as one layer, for a grey band of alpha ``bg_alpha``/255: each pixel
    becomes ``pixel × keep / 255 + add``, the band's darkening and the text together in one
    pass over the band's rows (contiguous in the frame), within 1 of darkening first and then
    laying :func:`_text_layer` on it. Returns ``(keep, add)``, band_h×width×3 uint8, read-only."""
    alpha = bg_alpha / 255.0
    keep = np.full((band_h, width, 3), round(255 * (1.0 - alpha)), np.uint8)
    add = np.full((band_h, width, 3), round(grey * alpha), np.uint8)
    layer = _text_layer(lines, width, band_h, scale, line_h, baseline, fg)
    if layer is not None:
        rows, cols, text_keep, text_add = layer
        keep[rows, cols] = cv2.convertScaleAbs(text_keep, alpha=1.0 - alpha)                  # keep × (1 − α)
        add[rows, cols] = cv2.addWeighted(text_keep, grey * alpha / 255.0, text_add, 1.0, 0.0)  # grey·α·keep/255 + add
    keep.flags.writeable = add.flags.writeable = False
    return keep, add


@functools.lru_cache(maxsize=64)
def _plan(height: int, width: int, text: str, bottom: bool, scale: float, fg: tuple[int, int, int, int],
          bg: tuple[int, int, int, int], max_lines: int):
    """How :func:`draw_caption` draws ``text`` on a ``height``×``width`` frame, worked out once
    per caption (a frame of an unchanged caption costs this one cache lookup): None when there
    is nothing to draw, else ``(y0, band_h, fused, text_layer)``: the band's first row and
    height (px), and either ``fused``, the one-pass layer ``(keep, add)`` of a translucent grey
    band (:func:`_fused_layer`), or ``text_layer`` (:func:`_text_layer`, None when the text
    leaves no mark) to lay over a band blended on its own."""
    lines, line_h, baseline = layout(text, width, scale, max_lines)
    if not lines:
        return None
    band_h = min(height, line_h * len(lines) + MARGIN_PX)
    y0 = height - band_h if bottom else 0
    fg3 = tuple(int(c) for c in fg[:3])
    if 0 < bg[3] < 0.99 * 255 and bg[0] == bg[1] == bg[2]:   # the usual band: one pass over it
        return y0, band_h, _fused_layer(lines, width, band_h, scale, line_h, baseline, fg3, bg[3], bg[0]), None
    return y0, band_h, None, _text_layer(lines, width, band_h, scale, line_h, baseline, fg3)


def draw_caption(frame: np.ndarray, text: str, bottom: bool, scale: float,
                 fg: tuple[int, int, int, int], bg: tuple[int, int, int, int], max_lines: int) -> None:
    """Draw ``text`` wrapped on a band across ``frame`` (H×W×3 uint8 BGR, modified in place).

    ``fg``/``bg`` are (B, G, R, A) tuples; the band is blended with alpha ``bg[3]``/255;
    ``scale`` is OpenCV's font scale (rounded to 3 decimals), ``max_lines`` keeps the newest
    lines. What to draw is planned once per caption and frame size (:func:`_plan`): on a
    translucent grey band (the ``ollama`` processor's) the blend and the text are one cached
    layer over the whole band (:func:`_fused_layer`): one multiply and one add over the band's
    rows, which are contiguous in the frame; otherwise the band is blended and the cached text
    layer (:func:`_text_layer`) laid over the text's bounding box.
    """
    h, w = frame.shape[:2]
    plan = _plan(h, w, text, bottom, round(scale, 3), fg, bg, max_lines)
    if plan is None:
        return
    y0, band_h, fused, layer = plan
    band = frame[y0:y0 + band_h]
    if fused is not None:
        keep, add = fused
        cv2.multiply(band, keep, dst=band, scale=1.0 / 255.0)
        cv2.add(band, add, dst=band)
        return
    alpha = bg[3] / 255.0
    if alpha >= 0.99:
        band[:] = bg[:3]
    elif alpha > 0:
        if bg[0] == bg[1] == bg[2]:      # one pass, no second image: |band × (1 − α) + grey × α|
            cv2.convertScaleAbs(band, dst=band, alpha=1.0 - alpha, beta=bg[0] * alpha)
        else:
            cv2.addWeighted(band, 1.0 - alpha, _solid(band.shape, bg[:3]), alpha, 0.0, dst=band)
    if layer is not None:
        rows, cols, keep, add = layer
        roi = band[rows, cols]
        cv2.multiply(roi, keep, dst=roi, scale=1.0 / 255.0)
        cv2.add(roi, add, dst=roi)


@implements("vision-host:platform/overlay", "caption")
def _caption(ctx, img, text, placement, scale, fg, bg, max_lines):
    frame = ctx.mats.get(img)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ErrResult("caption needs an 8-bit 3-channel frame")
    if not math.isfinite(scale):
        raise ErrResult(f"caption scale {scale} is not a finite number: give a font scale from 0.2 to 4")
    scale = min(max(scale, 0.2), 4.0)
    draw_caption(frame, text, placement == 1, scale, bgr(fg), bgr(bg), max_lines)
