"""Where processed frames go: MJPEG web streams, a video file, a window, or an RTSP server.

Every output follows the same life cycle, driven by the pipeline thread::

    out = make_output("mjpeg", ":8080")
    out.open(width, height, fps)      # may raise OutputError (port in use, ...)
    for frame in frames:              # frame: H×W×3 uint8 BGR
        out.write(frame)              # the caller may reuse `frame` right after
        if out.closed:                # e.g. the user closed the display window
            break
    out.close()                       # idempotent; finalizes

:class:`RecordingOutput` (H.264 through PyAV) also takes subtitle cues,
``out.add_subtitle(start_s, end_s, text)``, at any time between ``open()``
and ``close()``, and can roll to a new file every N seconds of video.

:class:`MjpegOutput` can serve several streams from one HTTP server:
``MjpegOutput(":8080", stream_names=["cam A", "cam B"]).stream(1)`` is the
:class:`Output` for ``/stream/1``. :class:`RtspOutput` re-publishes the video
as H.264 to an RTSP server and reconnects by itself when the server drops.

Errors meant for the person running vision-host are raised as
:class:`OutputError`, whose message is a sentence saying what to do.
Programming mistakes (write() before open(), a frame that is not H×W×3
uint8) raise :class:`RuntimeError` / :class:`ValueError`.

One module per kind: :mod:`.base` (the interface), :mod:`.mjpeg`, :mod:`.recording` (``file``),
:mod:`.rtsp`, :mod:`.window` (``display``), and :mod:`.encoding` (the H.264 setup recording and
RTSP share). Each kind's module has ``make(destination, **options)``, which
:func:`make_output` calls through :data:`OUTPUT_KINDS`'s registry below. Importing this
package loads neither OpenCV nor NumPy: the classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Output, OutputError
    from .mjpeg import MjpegOutput, MjpegStreamOutput, parse_listen_address
    from .recording import FileOutput, RecordingOutput
    from .rtsp import RtspOutput
    from .window import DisplayOutput

__all__ = [
    "OUTPUT_KINDS",
    "DisplayOutput",
    "FILE_CODECS",
    "FileOutput",
    "MjpegOutput",
    "MjpegStreamOutput",
    "Output",
    "OutputError",
    "RecordingOutput",
    "RtspOutput",
    "make_output",
    "parse_listen_address",
]

#: The registry: each output kind (the CLI's ``-o`` value) → the module of this package whose
#: ``make(destination, **options)`` builds it. A new kind is one module plus one line here.
_KIND_MODULES = {
    "mjpeg": "mjpeg",
    "file": "recording",
    "display": "window",
    "rtsp": "rtsp",
}
#: Output kinds accepted by :func:`make_output` (the CLI's ``-o`` values).
OUTPUT_KINDS = tuple(_KIND_MODULES)
#: Codecs of ``-o file``: H.264 through PyAV (:class:`RecordingOutput`) or mp4v through OpenCV (:class:`FileOutput`).
FILE_CODECS = ("h264", "mp4v")

# The public classes and where they live; loaded by __getattr__ on first use.
_EXPORTS = {
    "Output": "base", "OutputError": "base",
    "MjpegOutput": "mjpeg", "MjpegStreamOutput": "mjpeg", "parse_listen_address": "mjpeg",
    "FileOutput": "recording", "RecordingOutput": "recording",
    "RtspOutput": "rtsp",
    "DisplayOutput": "window",
}


def __getattr__(name: str):
    """``vision_host.outputs.MjpegOutput`` and the other public names, imported on first use (PEP 562).

    Raises:
        AttributeError: ``name`` is not one of them.
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def make_output(
    kind: str,
    destination: str | None = None,
    *,
    quality: int = 80,
    codec: str | None = None,
    segment_seconds: float | None = None,
    subtitles: bool = False,
    encoder_thread: bool = True,
) -> Output:
    """Build the output for the CLI's ``-o KIND -d DESTINATION`` (``kind`` in any case).

    * ``mjpeg``: ``destination`` is the listen address (default ``:8080``),
      ``quality`` the JPEG quality.
    * ``file``: ``destination`` is the ``.mp4`` (or, for H.264, ``.mkv``) path
      (required). ``codec="h264"`` records with :class:`RecordingOutput`
      (PyAV), which also takes ``segment_seconds`` and ``subtitles``;
      ``codec="mp4v"`` writes with OpenCV (:class:`FileOutput`). The default
      is ``h264`` when PyAV is installed, else ``mp4v``. Without PyAV, asking
      for ``h264`` falls back to ``mp4v`` with a warning (logged once).
      ``encoder_thread``: encode on a thread of the output's own (see
      :func:`.recording.encoder_thread_pays`).
    * ``display``: ``destination`` is the window title (default ``vision-host``).
    * ``rtsp``: ``destination`` is the ``rtsp://`` or ``rtsps://`` address to
      publish H.264 to (:class:`RtspOutput`, needs PyAV).

    Options a kind does not use are ignored. Nothing is opened here; call ``open()`` on the result.

    Raises:
        OutputError: unknown kind or codec (the message lists the valid ones),
            missing file path, an unreadable MJPEG address, segments or
            subtitles asked for without PyAV or with ``mp4v``, a file
            extension the H.264 recorder does not write, or an rtsp
            destination that is missing, not rtsp:// or rtsps://, or without PyAV.
    """
    module = _KIND_MODULES.get((kind or "").strip().lower())
    if module is None:
        from .base import OutputError

        raise OutputError(f"unknown output {kind!r}: use -o with one of {', '.join(OUTPUT_KINDS)}")
    make = importlib.import_module(f"{__name__}.{module}").make
    return make(destination, quality=quality, codec=codec, segment_seconds=segment_seconds, subtitles=subtitles,
                encoder_thread=encoder_thread)
