"""H.264 through PyAV, shared by :class:`.recording.RecordingOutput` and :class:`.rtsp.RtspOutput`:
the optional import, the even frame size yuv420p needs, and one libx264 stream setup."""

from __future__ import annotations

import functools
from fractions import Fraction

__all__ = ["CRF", "NO_PYAV_ADVICE", "PRESET", "add_h264_stream", "even_size", "import_av"]

#: libx264 settings of every H.264 output: the speed preset and the constant rate factor.
PRESET = "veryfast"
CRF = 23
#: What to tell the user when PyAV is missing.
NO_PYAV_ADVICE = "install PyAV with pip install 'vision-host[record]'"

_BT601 = 6  # AVCOL_*_SMPTE170M: swscale converts BGR to YUV with BT.601 coefficients, limited range
_MPEG_RANGE = 1  # AVCOL_RANGE_MPEG


@functools.cache
def import_av():
    """The ``av`` module (PyAV), or None when it is not installed.

    Callers look it up as ``encoding.import_av()`` (through the module) so that tests can
    replace it to play a machine without PyAV.
    """
    try:
        import av
    except ImportError:
        return None
    return av


def even_size(width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` px yuv420p can hold: an odd width or height loses its last column or row.

    Raises:
        ValueError: ``width`` or ``height`` is below 2.
    """
    if width < 2 or height < 2:
        raise ValueError(f"H.264 needs frames of at least 2x2 px, got {width}x{height}")
    return int(width) - int(width) % 2, int(height) - int(height) % 2


def add_h264_stream(container, rate: Fraction, size: tuple[int, int], *, gop: int | None = None,
                    time_base: Fraction | None = None):
    """Add a libx264 video stream to an open PyAV output ``container`` and return it.

    Every stream gets preset :data:`PRESET`, CRF :data:`CRF`, yuv420p, and colours tagged BT.601
    limited range (what swscale's BGR→YUV conversion produces).

    Args:
        container: an ``av.container.OutputContainer`` before ``start_encoding()``.
        rate: the nominal frame rate in frames/s.
        size: ``(width, height)`` px, both even (see :func:`even_size`).
        gop: for live streams: tune ``zerolatency`` (no B-frames, no lookahead) and a keyframe
            every ``gop`` frames; None (recordings): libx264's defaults.
        time_base: the stream's and encoder's time base in seconds (e.g. RTP's 1/90000);
            None: PyAV's default (1/``rate``).

    Raises:
        av.FFmpegError: the encoder cannot be set up.
    """
    options = {"preset": PRESET, "crf": str(CRF)}
    if gop is not None:
        options.update(tune="zerolatency", g=str(gop))
    stream = container.add_stream("libx264", rate=rate, options=options)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    ctx = stream.codec_context
    if time_base is not None:
        stream.time_base = ctx.time_base = time_base
    ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT601
    ctx.color_range = _MPEG_RANGE
    return stream
