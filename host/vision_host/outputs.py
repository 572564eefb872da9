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
"""

from __future__ import annotations

import abc
import atexit
import collections
import errno
import functools
import html
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np

from .sources import redact_url

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

log = logging.getLogger(__name__)

#: Output kinds accepted by :func:`make_output` (the CLI's ``-o`` values).
OUTPUT_KINDS = ("mjpeg", "file", "display", "rtsp")
#: Codecs of ``-o file``: H.264 through PyAV (:class:`RecordingOutput`) or mp4v through OpenCV (:class:`FileOutput`).
FILE_CODECS = ("h264", "mp4v")

_DEFAULT_MJPEG_PORT = 8080
_BOUNDARY = "frame"
_SNAPSHOT_TIMEOUT_S = 5.0


# Outputs with threads (MJPEG, RTSP) still open. At interpreter exit they are
# closed before Python kills daemon threads: a daemon thread caught inside
# cv2.imencode() or an FFmpeg encoder when the interpreter finalizes aborts the
# whole process ("terminate called without an active exception"), so encoders
# must be stopped and joined first.
_LIVE_OUTPUTS: weakref.WeakSet[Output] = weakref.WeakSet()


@atexit.register
def _close_live_outputs() -> None:
    for out in list(_LIVE_OUTPUTS):
        try:
            out.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("closing %s at exit failed", out.describe())


class OutputError(Exception):
    """An output cannot be opened or used; the message tells the user what to do."""


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(f"expected an H×W×3 uint8 BGR frame, got shape {shape} dtype {dtype}")


class Output(abc.ABC):
    """Common interface of every output.

    Protocol: ``open()`` once, then any number of ``write()`` calls from one
    thread, then ``close()`` (idempotent, also usable as a context manager).

    Attributes:
        closed: True once the output takes no more frames: after ``close()``,
            or when the user closed the display window. The pipeline should
            stop when it turns True.
        live_view: True for outputs someone watches live (MJPEG streams, the
            display window): while a live source reconnects, the pipeline
            keeps showing them a "reconnecting" frame; recordings and
            re-published streams do not get it. A class attribute.
    """

    closed: bool = False
    live_view: bool = False

    @abc.abstractmethod
    def open(self, width: int, height: int, fps: float) -> None:
        """Prepare for frames of ``width``×``height`` px arriving at ``fps`` frames/s.

        Raises:
            OutputError: the output cannot be opened (message says what to do).
            RuntimeError: called twice.
        """

    @abc.abstractmethod
    def write(self, frame: np.ndarray) -> None:
        """Take one H×W×3 uint8 BGR frame.

        The output never keeps a reference to ``frame``: the caller may
        overwrite the array as soon as this returns.

        Raises:
            ValueError: ``frame`` is not H×W×3 uint8.
            RuntimeError: called before ``open()`` or after ``close()``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Finalize and free everything; safe to call more than once."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the user saying where frames go, e.g. ``MJPEG at http://127.0.0.1:8080/``."""

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- MJPEG


def parse_listen_address(destination: str | None) -> tuple[str, int]:
    """Parse an MJPEG ``-d`` destination into ``(host, port)``.

    Accepted forms: ``None`` or ``""`` (→ ``127.0.0.1:8080``), ``"8080"``,
    ``":8080"`` (both bind 127.0.0.1 only), ``"0.0.0.0:8080"`` (all IPv4
    interfaces), ``"host:8080"``, ``"[::1]:8080"``. Port 0 means "any free port".

    Raises:
        OutputError: the port is not a number in 0..65535 or the form is unknown.
    """
    text = (destination or "").strip()
    if not text:
        return "127.0.0.1", _DEFAULT_MJPEG_PORT
    if text.startswith("http://"):
        text = text[len("http://"):].rstrip("/")
    host, port_text = "", text
    if text.startswith("["):  # [v6]:port
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise OutputError(
                f"cannot read the address {destination!r}: write an IPv6 address as -d [::1]:8080, or give -d :8080"
            )
        host, port_text = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise OutputError(
            f"cannot read the address {destination!r}: give a port such as -d :8080 or -d 0.0.0.0:8080"
        ) from None
    return host or "127.0.0.1", port


_GRID_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vision-host</title>
<style>
html, body {{ margin: 0; background: #111; color: #ddd; font: 14px sans-serif; }}
main {{ display: grid; gap: 8px; padding: 8px; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); }}
figure {{ margin: 0; display: flex; flex-direction: column; align-items: center; }}
img {{ width: 100%; height: auto; object-fit: contain; background: #000; }}
figcaption {{ padding: 4px; }}
a {{ color: #8af; }}
</style>
</head>
<body>
<main>
{figures}
</main>
</body>
</html>
"""

_GRID_FIGURE = """<figure>
<img src="/stream/{index}" alt="{name}">
<figcaption>{name} &middot; <a href="/snapshot/{index}.jpg">snapshot</a></figcaption>
</figure>"""


def _index_page(names: list[str]) -> bytes:
    """The plain page at ``/`` when no viewer is attached: every stream in a captioned grid."""
    figures = "\n".join(
        _GRID_FIGURE.format(index=i, name=html.escape(name, quote=True)) for i, name in enumerate(names)
    )
    return _GRID_HTML.format(figures=figures).encode("utf-8")


class _MjpegChannel:
    """One stream of an :class:`MjpegOutput`: its frame buffers, newest JPEG, encoder thread and clients.

    Triple buffer: ``back`` is owned by ``write()``, ``work`` by the encoder
    thread, ``pending`` is handed between them under ``cond``. The encoder
    encodes only while a client of this channel or a snapshot waits.

    The HTTP side runs on the server's event loop: :meth:`parts` (one per viewer) and
    :meth:`snapshot_async` wait on an :class:`asyncio.Event` that the encoder thread sets
    through ``loop.call_soon_threadsafe`` after each JPEG (and :meth:`stop` after the end).
    """

    def __init__(self, index: int, name: str, quality: int) -> None:
        self.index = index
        self.name = name
        self.quality = quality
        self.cond = threading.Condition()
        self.opened = False  # sized by open(); write() allowed
        self.finished = False  # closed: takes no more frames, its clients' streams have ended
        self.stopping = False  # the encoder and every client of this channel must end
        self.back: np.ndarray | None = None
        self.pending: np.ndarray | None = None
        self.work: np.ndarray | None = None
        self.frame_seq = 0  # sequence number of the newest frame (in `pending`, or in `work` once taken)
        self.work_seq = 0  # sequence number of the frame in `work`
        self.jpeg: bytes | None = None
        self.jpeg_seq = 0  # frame sequence number that `jpeg` shows
        self.snapshot_waiters = 0
        self.clients = 0
        self.frames_written = 0
        self.frames_encoded = 0
        self.encoder_thread: threading.Thread | None = None
        self.loop = None  # the HTTP server's event loop, once a client came
        self._changed = None  # asyncio.Event set (and replaced) on the loop when a JPEG is new or the stream stops

    def open(self, width: int, height: int) -> None:
        shape = (max(int(height), 1), max(int(width), 1), 3)
        self.back = np.zeros(shape, np.uint8)
        self.pending = np.zeros(shape, np.uint8)
        self.work = np.zeros(shape, np.uint8)
        self.opened = True
        self.encoder_thread = threading.Thread(
            target=self._encode_loop, name=f"vision-host-mjpeg-encoder-{self.index}", daemon=True
        )
        self.encoder_thread.start()

    def write(self, frame: np.ndarray) -> None:
        back = self.back
        if back is None or back.shape != frame.shape:
            back = self.back = np.empty_like(frame)
        np.copyto(back, frame)
        with self.cond:
            self.back, self.pending = self.pending, back
            self.frame_seq += 1
            self.frames_written += 1
            self.cond.notify_all()

    def stop(self, finished: bool) -> None:
        """End the encoder and this channel's client streams; join the encoder thread."""
        with self.cond:
            self.stopping = True
            self.finished = self.finished or finished
            self.cond.notify_all()
        self._notify_loop()
        if self.encoder_thread is not None:
            self.encoder_thread.join()

    def _encode_loop(self) -> None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        while True:
            with self.cond:
                while not self.stopping and not (
                    self.frame_seq > self.jpeg_seq and (self.clients > 0 or self.snapshot_waiters > 0)
                ):
                    self.cond.wait()
                if self.stopping:
                    return
                self.pending, self.work = self.work, self.pending
                seq = self.work_seq = self.frame_seq
                work = self.work
            assert work is not None
            ok, buf = cv2.imencode(".jpg", work, params)  # releases the GIL
            if not ok:  # pragma: no cover - imencode of a valid uint8 image does not fail
                log.warning("JPEG encoding failed for frame %d of stream %d", seq, self.index)
                continue
            jpeg = buf.tobytes()
            with self.cond:
                self.jpeg, self.jpeg_seq = jpeg, seq
                self.frames_encoded += 1
                self.cond.notify_all()
            self._notify_loop()

    # -- the event loop's side --------------------------------------------------------------

    def _notify_loop(self) -> None:
        """Wake this channel's waiters on the server's loop (from any thread; never blocks)."""
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop has stopped
                pass

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _changed_event(self):
        """The event the next change sets (the loop's thread only)."""
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def latest_frame(self) -> np.ndarray | None:
        """A copy of the newest frame written (H×W×3 uint8 BGR), None before the first."""
        with self.cond:
            if self.frame_seq == 0:
                return None
            newest = self.work if self.work_seq == self.frame_seq else self.pending
            return newest.copy()    # the encoder only reads `work`

    async def snapshot_async(self) -> bytes | None:
        """Newest frame as JPEG, encoding it if needed (waits up to 5 s on the loop, never
        blocking it); None before the first frame."""
        import asyncio

        self.loop = asyncio.get_running_loop()
        with self.cond:
            if self.frame_seq == 0:
                return None
            target = self.frame_seq
            if self.jpeg_seq >= target or self.stopping:
                return self.jpeg
            self.snapshot_waiters += 1
            self.cond.notify_all()
        try:
            deadline = self.loop.time() + _SNAPSHOT_TIMEOUT_S
            while True:
                changed = self._changed_event()
                with self.cond:
                    if self.jpeg_seq >= target or self.stopping:
                        return self.jpeg
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    return self.jpeg
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            with self.cond:
                self.snapshot_waiters -= 1

    async def parts(self):
        """The MJPEG parts for one viewer (async iterator of bytes): each time the newest JPEG
        it has not had yet, so a slow viewer skips frames; ends when the stream stops."""
        import asyncio

        self.loop = asyncio.get_running_loop()
        with self.cond:
            self.clients += 1
            self.cond.notify_all()  # the encoder may have a frame waiting for a viewer
        try:
            sent_seq = 0
            while True:
                changed = self._changed_event()
                with self.cond:
                    if self.stopping:
                        return
                    jpeg, seq = self.jpeg, self.jpeg_seq
                if jpeg is None or seq == sent_seq:
                    await changed.wait()
                    continue
                yield b"".join((_PART_HEAD, b"Content-Length: %d\r\n\r\n" % len(jpeg), jpeg, b"\r\n"))
                sent_seq = seq   # the send above returned: uvicorn's flow control waited for a slow viewer
        finally:
            with self.cond:
                self.clients -= 1


_PART_HEAD = b"--" + _BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\n"


class MjpegStreamOutput(Output):
    """One stream of a multi-stream :class:`MjpegOutput`; get it with :meth:`MjpegOutput.stream`.

    Same life cycle and costs as :class:`MjpegOutput`, for the channel
    ``index`` only: :meth:`open` sizes this channel's buffers, starts its
    encoder thread and starts the shared HTTP server if it is not running yet;
    :meth:`write` copies an H×W×3 uint8 BGR frame into this channel (never
    blocks on the network or on encoding); :meth:`close` marks only this
    channel finished (its viewers' streams end, ``/stream/N`` answers 410,
    its last JPEG stays available at ``/snapshot/N.jpg``) while the server
    keeps serving the other streams. :meth:`MjpegOutput.close` stops everything.

    Attributes:
        index: the stream number N in ``/stream/N``.
        name: the caption shown on the page.
        url: ``http://host:port/stream/N``.
        frames_written, frames_encoded, clients: as in :class:`MjpegOutput`, for this stream.
    """

    live_view = True

    def __init__(self, owner: MjpegOutput, channel: _MjpegChannel) -> None:
        self._owner = owner
        self._channel = channel
        self.index = channel.index
        self.name = channel.name
        self.closed = False

    @property
    def url(self) -> str:
        """``http://host:port/stream/N`` (the port is known once the server started)."""
        return f"{self._owner.url}stream/{self.index}"

    @property
    def frames_written(self) -> int:
        return self._channel.frames_written

    @property
    def frames_encoded(self) -> int:
        return self._channel.frames_encoded

    @property
    def clients(self) -> int:
        return self._channel.clients

    def describe(self) -> str:
        """E.g. ``MJPEG at http://127.0.0.1:8080/stream/1``."""
        return f"MJPEG at {self.url}"

    def open(self, width: int, height: int, fps: float) -> None:
        """Size this stream's buffers for ``width``×``height`` px (other sizes are accepted too; ``fps`` unused).

        Starts the shared server first when it is not running (see :meth:`MjpegOutput.start`).

        Raises:
            OutputError: the server cannot listen (port in use, ...).
            RuntimeError: this stream is already open, or the :class:`MjpegOutput` was closed.
        """
        channel = self._channel
        if channel.opened or channel.finished:
            raise RuntimeError(f"MJPEG stream {self.index} was opened already")
        self._owner.start()
        channel.open(width, height)

    def write(self, frame: np.ndarray) -> None:
        """Copy ``frame`` (H×W×3 uint8 BGR) into this stream's buffer and wake its encoder.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        channel = self._channel
        if not channel.opened or channel.stopping:
            raise RuntimeError(f"MJPEG stream {self.index}: write() needs open() first and no close() before it")
        _check_frame(frame)
        channel.write(frame)

    def close(self) -> None:
        """Mark this stream finished and join its encoder thread; the server keeps serving the others. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._channel.stop(finished=True)


class MjpegOutput(Output):
    """Serve frames as MJPEG streams over HTTP (watch them in any browser).

    One HTTP server serves one or more streams ("channels"), numbered 0, 1, … in the order of
    ``stream_names``: a Starlette app (:func:`.webapp.build_app`) served by uvicorn (HTTP/1.1)
    on its own thread and event loop (:class:`.webserver.BackgroundServer`).
    :meth:`open`/:meth:`write`/:meth:`close` of this object drive stream 0; :meth:`stream`
    gives an :class:`Output` for any stream.

    Endpoints:

    * ``GET /`` — a self-contained HTML page titled ``vision-host``: a grid of
      every stream, each captioned with its name. With :attr:`viewer` set, the
      viewer answers ``/``, ``/api/…`` and ``/snapshot….png`` too (see :mod:`.viewer`).
    * ``GET /stream``, ``/stream.mjpg`` (stream 0), ``/stream/N``, ``/stream/N.mjpg``
      (stream N) — ``multipart/x-mixed-replace; boundary=frame``; each part is
      ``--frame``, ``Content-Type: image/jpeg``, ``Content-Length: N``, a blank
      line, N bytes of JPEG and CRLF. The response ends when the stream or
      the output closes; a closed stream answers 410.
    * ``GET /snapshot.jpg`` (stream 0), ``/snapshot/N.jpg`` — the newest frame
      as one JPEG; 503 before the first frame.
    * a stream number that does not exist — 404 with a text body naming the valid ones;
      anything else — 404 (405 for a method a route does not take), JSON ``{"error"}``.

    Every request must name this server in its ``Host`` header (421 otherwise: DNS
    rebinding), carry the viewer's token when there is one (401), and, beyond GET/HEAD, come
    from this server's own ``Origin`` (403) — see :mod:`.webapp`. Connections are bounded by
    :attr:`limits` (see :class:`.webserver.ServerLimits`).

    Cost to the pipeline: ``write()`` copies the frame into a buffer owned by
    its stream (≈10–60 µs for 640×360) and notifies; it never touches the
    network and never encodes. Each stream has one encoder thread that
    JPEG-encodes only its newest frame and only while at least one client of
    that stream is connected or a snapshot of it is waiting, so frames are
    skipped when encoding falls behind; after each JPEG it wakes the stream's
    clients on the server's event loop (``call_soon_threadsafe``). Each client
    always gets the newest JPEG it has not had yet, once its previous one has
    been taken by the socket (uvicorn's write flow control): a slow or stalled
    viewer gets fewer frames and delays nobody, on its stream or another (its
    kernel send buffer is capped at 128 KiB so it does not queue seconds of
    stale frames either). Clients that hang up are removed at once.

    Args:
        destination: listen address, see :func:`parse_listen_address`; default
            ``":8080"`` = 127.0.0.1 port 8080. A bare port never binds all
            interfaces: give ``0.0.0.0:8080`` for that. Port 0 picks a free port.
        quality: JPEG quality 1..100 (default 80).
        stream_names: one caption per stream; default one stream named ``"0"``.
        limits: connection and request bounds (:class:`.webserver.ServerLimits`; None: its defaults).
        allowed_hosts: more names the server answers for in ``Host`` (``--allow-host``).

    Attributes:
        host: the address listened on, e.g. ``"127.0.0.1"``.
        port: the port actually bound (after :meth:`start`/:meth:`open`; useful with port 0).
        url: ``http://host:port/`` (after :meth:`start`/:meth:`open`).
        stream_names: the captions, one per stream.
        frames_written: frames given to :meth:`write` (stream 0).
        frames_encoded: JPEGs produced for stream 0.
        clients: stream-0 clients currently connected.
        limits, allowed_hosts: as given; read by :meth:`start` (which sets ``limits`` to the
            defaults when None). The web modules (Starlette, uvicorn) load only then.
        viewer: the live viewer (:class:`.viewer.Viewer`), set by the viewer itself before
            :meth:`start`; None: the plain page only.

    Raises:
        OutputError: from the constructor for an unreadable address or a
            quality outside 1..100; from :meth:`start`/:meth:`open` when the
            port is in use, not permitted, or the host is not an address of
            this machine.
        ValueError: ``stream_names`` is empty or holds something that is not a string.
    """

    live_view = True

    def __init__(
        self, destination: str | None = ":8080", quality: int = 80, stream_names: list[str] | None = None,
        limits=None, allowed_hosts=(),
    ) -> None:
        self.host, self._requested_port = parse_listen_address(destination)
        if not 1 <= int(quality) <= 100:
            raise OutputError(f"JPEG quality {quality} is out of range: give a number from 1 to 100")
        names = ["0"] if stream_names is None else list(stream_names)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"stream_names must be a non-empty list of strings, got {stream_names!r}")
        self.quality = int(quality)
        self.port: int = self._requested_port
        self.stream_names = names
        self.limits = limits
        self.allowed_hosts = list(allowed_hosts)
        self.closed = False
        self._lock = threading.Lock()  # start()/close()
        self._started = False
        self._stopping = False
        self._opened = False  # open() (stream 0 through this object) was called
        self._channels = [_MjpegChannel(i, name, self.quality) for i, name in enumerate(names)]
        self._streams = [MjpegStreamOutput(self, c) for c in self._channels]
        self._index_html = _index_page(names)
        #: The live viewer (:class:`.viewer.Viewer`) answering ``/``, ``/api/…`` and
        #: ``/snapshot….png`` and checking the access token; None: the plain page only.
        self.viewer = None
        self._server = None  # the webserver.BackgroundServer, once started

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page; stream 0 is at ``url + "stream"``, stream N at ``url + "stream/N"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def frames_written(self) -> int:
        return self._channels[0].frames_written

    @property
    def frames_encoded(self) -> int:
        return self._channels[0].frames_encoded

    @property
    def clients(self) -> int:
        return self._channels[0].clients

    def describe(self) -> str:
        """E.g. ``MJPEG at http://127.0.0.1:8080/``."""
        return f"MJPEG at {self.url}"

    def latest_frame(self, index: int) -> np.ndarray | None:
        """A copy of stream ``index``'s newest frame (H×W×3 uint8 BGR), None before the first."""
        return self._channels[index].latest_frame()

    def stream(self, index: int) -> MjpegStreamOutput:
        """The :class:`Output` for stream ``index`` (the same object on every call).

        Its ``open()`` starts the shared server when needed; stream 0's is the
        channel this object's own :meth:`open`/:meth:`write` use, so use one or
        the other for stream 0.

        Raises:
            IndexError: ``index`` is not in 0..len(stream_names)-1.
        """
        if not 0 <= index < len(self._streams):
            raise IndexError(f"no MJPEG stream {index}: this output has streams 0 to {len(self._streams) - 1}")
        return self._streams[index]

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Bind the port and start the HTTP server thread; idempotent.

        Called by :meth:`open` and by each stream's ``open()``; call it
        yourself to fail early on a busy port before any stream opens. Until a
        stream is opened its clients wait and its snapshot answers 503.

        Raises:
            OutputError: port in use ("port 8080 on 127.0.0.1 is in use: pick
                another with -d :8081"), permission denied, or unknown host.
            RuntimeError: after :meth:`close`.
        """
        from .webapp import HostRule, build_app
        from .webserver import BackgroundServer, ServerLimits

        with self._lock:
            if self.closed:
                raise RuntimeError("MjpegOutput was closed: make a new one")
            if self._started:
                return
            if self.limits is None:
                self.limits = ServerLimits()
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self._requested_port))
            except OSError as e:
                sock.close()
                raise self._bind_error(e) from e
            self.port = sock.getsockname()[1]
            app = build_app(self._channels, self.viewer, index_html=self._index_html,
                            host_rule=HostRule(self.host, self.allowed_hosts), limits=self.limits)
            server = BackgroundServer(app, sock, self.limits, name="vision-host-mjpeg-server")
            app.state.connections = server.connections
            try:
                server.start()
            except RuntimeError as e:  # pragma: no cover - a bound socket that cannot listen
                raise OutputError(f"cannot serve on port {self.port} of {self.host}: {e}") from e
            for channel in self._channels:
                channel.loop = server.loop
            self._server = server
            self._started = True
            _LIVE_OUTPUTS.add(self)
        log.info("serving %s", self.describe())

    def open(self, width: int, height: int, fps: float) -> None:
        """Start the server (:meth:`start`) and open stream 0.

        ``width``/``height`` (px) size the frame buffers; frames of another
        size are accepted too. ``fps`` is not used (the stream runs at the rate
        frames are written).

        Raises:
            OutputError: port in use ("port 8080 on 127.0.0.1 is in use: pick
                another with -d :8081"), permission denied, or unknown host.
            RuntimeError: already opened.
        """
        if self._opened:
            raise RuntimeError("MjpegOutput.open() called twice")
        self._streams[0].open(width, height, fps)
        self._opened = True

    def _bind_error(self, e: OSError) -> OutputError:
        where = f"port {self._requested_port} on {self.host}"
        suggestion = self._requested_port + 1 if 0 < self._requested_port < 65535 else 8081
        port = self._requested_port or _DEFAULT_MJPEG_PORT
        if e.errno == errno.EADDRINUSE:
            return OutputError(f"{where} is in use: pick another with -d :{suggestion}")
        if e.errno == errno.EACCES:
            return OutputError(
                f"{where} needs extra privileges: pick a port above 1023 with -d :{_DEFAULT_MJPEG_PORT}"
            )
        if e.errno == errno.EADDRNOTAVAIL:
            return OutputError(
                f"cannot listen on {self.host}: it is not an address of this machine;"
                f" use -d :{port} (this machine only) or -d 0.0.0.0:{port} (all interfaces)"
            )
        if isinstance(e, socket.gaierror):
            return OutputError(
                f"cannot listen on {self.host!r}: the host name is unknown;"
                f" use -d :{port} or -d 0.0.0.0:{port}"
            )
        return OutputError(f"cannot listen on {where} ({e.strerror or e}): pick another with -d :{suggestion}")

    def write(self, frame: np.ndarray) -> None:
        """Copy ``frame`` (H×W×3 uint8 BGR) into stream 0's buffer and wake its encoder.

        Never blocks on the network or on JPEG encoding; costs one frame copy
        plus a lock round trip.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        if not self._opened or self._stopping:
            raise RuntimeError("MjpegOutput.write() needs open() first and no close() before it")
        self._streams[0].write(frame)

    def close(self) -> None:
        """Stop serving every stream: end every client connection and join all threads.

        Idempotent. When it returns no thread started by this output is left (a viewer
        that stopped reading is cut after 0.5 s).
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            started = self._started
            self._stopping = True
        for stream in self._streams:
            stream.closed = True
        for channel in self._channels:  # ends every client stream and encoder; joins the encoders
            channel.stop(finished=False)
        if not started:
            return
        server = self._server
        assert server is not None
        if not server.stop(timeout_s=5.0):  # pragma: no cover - every connection is cut within 0.5 s
            log.warning("the MJPEG server thread still runs 5 s after close()")
        _LIVE_OUTPUTS.discard(self)
        log.info("MJPEG server at %s stopped", self.url)


# --------------------------------------------------------------------------- file


class FileOutput(Output):
    """Write frames to an MP4 file with :class:`cv2.VideoWriter` (fourcc ``mp4v``).

    The file plays at the source frame rate given to :meth:`open` (30 frames/s
    when that is ≤ 0 or NaN). Frames whose size differs from the one given to
    :meth:`open` are resized (``cv2.INTER_AREA``) so every frame in the file
    has the same size. :meth:`close` releases the writer, which finalizes the
    MP4; a file that was never closed is not playable.

    Subclasses (:class:`RecordingOutput`) keep :meth:`open`, :meth:`write` and
    :meth:`close` and replace the three steps ``_start()``, ``_append(frame)``
    and ``_finish()``.

    Args:
        path: the ``.mp4`` file to create or overwrite; missing folders are created.

    Attributes:
        fps: frames/s of the file (after :meth:`open`).
        size: ``(width, height)`` px given to :meth:`open`.
        frames_written: frames given to :meth:`write`.
        paths: the files written so far (``[path]`` once opened).

    Raises:
        OutputError: from :meth:`open` when the folder cannot be created or
            the file cannot be opened for writing.
    """

    FOURCC = "mp4v"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fps = 0.0
        self.size: tuple[int, int] = (0, 0)  # (width, height) px
        self.frames_written = 0
        self.paths: list[Path] = []
        self.closed = False
        self._opened = False
        self._writer: cv2.VideoWriter | None = None

    def describe(self) -> str:
        """E.g. ``MP4 file out.mp4 (mp4v, 29.83 fps)``."""
        fps = f", {self.fps:.2f} fps" if self.fps else ""
        return f"MP4 file {self.path} ({self.FOURCC}{fps})"

    def open(self, width: int, height: int, fps: float) -> None:
        """Start the file for ``width``×``height`` px at ``fps`` frames/s.

        Raises:
            OutputError: the parent directory cannot be created, or the file does not open.
            RuntimeError: already opened.
        """
        if self._opened:
            raise RuntimeError(f"{type(self).__name__}.open() called twice")
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: the folder {parent} cannot be created "
                              f"({exc.strerror}); pick another -d path") from None
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            fps = 0.0
        if not math.isfinite(fps) or fps <= 0:
            fps = 30.0
        self.fps = fps
        self.size = (int(width), int(height))
        self._start()
        self._opened = True

    def write(self, frame: np.ndarray) -> None:
        """Append one H×W×3 uint8 BGR frame, resized to the open() size if needed.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        if not self._opened:
            raise RuntimeError(f"{type(self).__name__}.write() needs open() first and no close() before it")
        _check_frame(frame)
        w, h = self.size
        if frame.shape[0] != h or frame.shape[1] != w:
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
        self._append(frame)
        self.frames_written += 1

    def close(self) -> None:
        """Finalize the file(s). Idempotent."""
        self.closed = True
        if self._opened:
            self._opened = False
            self._finish()

    def _start(self) -> None:
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.FOURCC), self.fps, self.size)
        if not writer.isOpened():
            writer.release()
            raise OutputError(
                f"cannot open {self.path} for writing as MP4 video: give a writable file path ending in .mp4"
            )
        self._writer = writer
        self.paths = [self.path]

    def _append(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def _finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()


# --------------------------------------------------------------------------- H.264 recording (PyAV)


@functools.cache
def _import_av():
    """The ``av`` module (PyAV), or None when it is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


_NO_PYAV_ADVICE = "install PyAV with pip install 'vision-host[record]'"
_warned_no_pyav = False

_CONTAINERS = {".mp4": ("MP4", "mov_text"), ".mkv": ("Matroska", "subrip")}  # extension → (label, subtitle codec)
_CUE_TIME_BASE = Fraction(1, 1000)  # subtitle timestamps in ms
# How long (seconds of video) a finished segment stays open for late cues
# starting in it; captions arrive seconds after the frames they describe.
_CUE_GRACE_S = 10.0
# The text subtitle encoders refuse to open without an ASS header; this is
# FFmpeg's default style. For mov_text it becomes the tx3g sample description.
_ASS_HEADER = b"""[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, \
Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, \
MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""
_BT601 = 6  # AVCOL_*_SMPTE170M: swscale converts BGR to YUV with BT.601 coefficients, limited range
_MPEG_RANGE = 1  # AVCOL_RANGE_MPEG


class _Segment:
    """One open container: a file, its H.264 stream and its optional subtitle stream."""

    def __init__(self, path: Path, index: int, first_frame: int, end_frame: float) -> None:
        self.path = path
        self.index = index
        self.first_frame = first_frame  # frame number (from 0 over the whole recording) of its first frame
        self.end_frame = end_frame  # frame number that starts the next segment; inf when not segmenting
        self.container = None
        self.video = None
        self.subtitles = None
        self.cue_end = 0  # end of the last cue muxed, in _CUE_TIME_BASE ticks from the segment start


class RecordingOutput(FileOutput):
    """Record H.264 video (libx264, yuv420p) into ``.mp4`` or ``.mkv`` through PyAV.

    Encoding: preset ``veryfast``, CRF 23, frame rate = the ``fps`` given to
    :meth:`open`; frame *n* has pts *n* in a 1/fps time base, so the file plays
    at the source speed whatever the wall-clock timing was. ``.mp4`` files are
    written with ``movflags=+faststart`` (index at the front; rewritten at
    close). Colours are tagged BT.601 limited range, which is what the
    BGR→YUV conversion produces.

    Sizes: yuv420p needs an even width and height, so an odd-sized frame loses
    its last column and/or row (cropping keeps the other pixels exactly;
    padding would add a line, scaling would blur). :attr:`encoded_size` is the
    size in the file. As in :class:`FileOutput`, frames whose size differs from
    :meth:`open`'s are resized first.

    Per frame, :meth:`write` copies the frame once into a reused buffer; the
    encoder converts it to YUV (a new frame each time, so the buffer is free
    again when :meth:`write` returns) and encodes on its own threads.

    Segments: with ``segment_seconds``, a new file starts every
    ``round(segment_seconds * fps)`` frames (counted in video time, not wall
    time), named from ``path``: ``out.mp4`` → ``out-000.mp4``, ``out-001.mp4``,
    … Each segment has its own encoder, so it starts with a keyframe and plays
    on its own once finished. :attr:`paths` lists the files started so far.

    Subtitles: with ``subtitles=True`` the file(s) get a text subtitle stream
    (``mov_text`` in .mp4, ``subrip`` in .mkv), filled by :meth:`add_subtitle`.
    A finished segment stays open for cues for 10 s of video after its end
    (without subtitles it is finalized at once). :meth:`add_subtitle` may be
    called from another thread than :meth:`write`; a lock serializes them.
    FFmpeg's muxer holds up to 10 s of video packets while it waits for the
    sparse subtitle stream, so cues up to that late are still interleaved in
    time order in the file; later ones are muxed fine, just out of file order.

    Args:
        path: the ``.mp4`` or ``.mkv`` file to create or overwrite (the segment
            name pattern when segmenting); missing folders are created.
        segment_seconds: seconds of video per file, or None for one file.
        subtitles: add a subtitle stream for :meth:`add_subtitle`.

    Attributes:
        encoded_size: ``(width, height)`` px in the file (after :meth:`open`).
        cues_written: cues muxed by :meth:`add_subtitle`.
        cues_dropped: cues that could not be placed (see :meth:`add_subtitle`).

    Raises:
        OutputError: from the constructor when PyAV is not installed or the
            extension is not .mp4/.mkv; from :meth:`open` when the folder or
            the file cannot be created.
        ValueError: ``segment_seconds`` is not a positive number.
    """

    FOURCC = "h264"
    PRESET = "veryfast"
    CRF = 23

    def __init__(
        self, path: str | os.PathLike[str], *, segment_seconds: float | None = None, subtitles: bool = False
    ) -> None:
        super().__init__(path)
        self._av = _import_av()
        if self._av is None:
            raise OutputError(f"cannot record H.264 to {self.path}: {_NO_PYAV_ADVICE}, or use the mp4v codec")
        kind = _CONTAINERS.get(self.path.suffix.lower())
        if kind is None:
            raise OutputError(f"cannot record H.264 to {self.path}: give a file path ending in .mp4 or .mkv")
        self._container_label, self._subtitle_codec = kind
        if segment_seconds is not None and not (math.isfinite(segment_seconds) and segment_seconds > 0):
            raise ValueError(f"segment_seconds must be a positive number of seconds, got {segment_seconds}")
        self.segment_seconds = segment_seconds
        self.subtitles = bool(subtitles)
        self.encoded_size: tuple[int, int] = (0, 0)
        self.cues_written = 0
        self.cues_dropped = 0
        self._segment_frames = 0  # frames per segment, 0 = one file
        self._grace_frames = 0
        self._rate = Fraction(30)
        self._seg: _Segment | None = None  # receives frames
        self._prev: _Segment | None = None  # finished, still open for late cues
        self._frame = None  # reused bgr24 av.VideoFrame of encoded_size
        self._canvas: np.ndarray | None = None  # H×W×3 view of _frame's pixels
        self._lock = threading.Lock()  # write() and add_subtitle() may run on different threads

    def describe(self) -> str:
        """E.g. ``MP4 file out.mp4 (h264, 29.83 fps, with subtitles)`` or ``MP4 files out-NNN.mp4 (…)``."""
        details = [self.FOURCC] + ([f"{self.fps:.2f} fps"] if self.fps else [])
        if self.segment_seconds:
            details.append(f"a new file every {self.segment_seconds:g} s")
        if self.subtitles:
            details.append("with subtitles")
        where = f"files {self._segment_path('NNN')}" if self.segment_seconds else f"file {self.path}"
        return f"{self._container_label} {where} ({', '.join(details)})"

    def add_subtitle(self, start_s: float, end_s: float, text: str) -> bool:
        """Show ``text`` from ``start_s`` to ``end_s`` (seconds of video: frame *n* is at *n*/fps).

        The cue goes to the segment containing ``start_s``, its times made
        relative to that segment's start and its end clipped at the segment's
        end. Cues may arrive late, after their frames were written. Within a
        file cues are kept in order and never overlap: a cue starting before
        the previous cue's end starts at that end instead, and is dropped when
        nothing is left of it. Also dropped (counted in :attr:`cues_dropped`,
        logged): empty text, a cue whose segment is finalized already or not
        started yet, and cues after :meth:`close`. Text longer than 65535 UTF-8
        bytes is cut.

        Returns:
            True when the cue was muxed.

        Raises:
            RuntimeError: the output was made without ``subtitles=True``.
            ValueError: ``start_s`` or ``end_s`` is not a finite number.
        """
        if not self.subtitles:
            raise RuntimeError("add_subtitle() needs RecordingOutput(..., subtitles=True)")
        if not (math.isfinite(start_s) and math.isfinite(end_s)):
            raise ValueError(f"cue times must be finite seconds, got {start_s!r}..{end_s!r}")
        utf8 = text.strip().encode("utf-8")[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
        payload = utf8
        if self._subtitle_codec == "mov_text":  # 3GPP timed text sample: 16-bit big-endian length, UTF-8 text
            payload = len(utf8).to_bytes(2, "big") + utf8
        start_s = max(0.0, start_s)
        first_frame = math.floor(start_s * self._rate + 1e-9)
        with self._lock:
            owners = [s for s in (self._seg, self._prev) if s and s.first_frame <= first_frame < s.end_frame]
            seg = owners[0] if owners else None
            if seg is None or not utf8 or end_s <= start_s:
                return self._drop_cue(start_s, end_s, "it is empty, or its file is finished or not started")
            seg_start_s = seg.first_frame / self._rate
            start = max(round((start_s - seg_start_s) / _CUE_TIME_BASE), seg.cue_end)
            end = round((min(end_s, seg.end_frame / self._rate) - seg_start_s) / _CUE_TIME_BASE)
            if end <= start:
                return self._drop_cue(start_s, end_s, "earlier cues cover it")
            packet = self._av.Packet(payload)
            packet.stream = seg.subtitles
            packet.time_base = _CUE_TIME_BASE
            packet.pts = packet.dts = start
            packet.duration = end - start
            seg.container.mux(packet)
            seg.cue_end = end
            self.cues_written += 1
            return True

    def _drop_cue(self, start_s: float, end_s: float, why: str) -> bool:
        self.cues_dropped += 1
        log.info("subtitle cue %.2f..%.2f s dropped: %s", start_s, end_s, why)
        return False

    def _segment_path(self, index: int | str) -> Path:
        if not self.segment_seconds:
            return self.path
        suffix = f"{index:03d}" if isinstance(index, int) else index
        return self.path.with_name(f"{self.path.stem}-{suffix}{self.path.suffix}")

    def _start(self) -> None:
        w, h = self.size
        if w < 2 or h < 2:
            raise ValueError(f"H.264 needs frames of at least 2x2 px, got {w}x{h}")
        self.encoded_size = (w - w % 2, h - h % 2)
        self._rate = Fraction(self.fps).limit_denominator(1001)
        if self.segment_seconds:
            self._segment_frames = max(1, round(self.segment_seconds * self.fps))
        self._grace_frames = round(_CUE_GRACE_S * self.fps) if self.subtitles else 0
        self._frame = self._av.VideoFrame(*self.encoded_size, "bgr24")
        plane = self._frame.planes[0]
        self._canvas = np.lib.stride_tricks.as_strided(
            np.frombuffer(plane, np.uint8), (self.encoded_size[1], self.encoded_size[0], 3), (plane.line_size, 3, 1)
        )
        self.paths = []
        self._seg = self._open_segment(0, 0)

    def _open_segment(self, index: int, first_frame: int) -> _Segment:
        end_frame = first_frame + self._segment_frames if self._segment_frames else math.inf
        seg = _Segment(self._segment_path(index), index, first_frame, end_frame)
        av = self._av
        options = {"movflags": "+faststart"} if self.path.suffix.lower() == ".mp4" else {}
        try:
            seg.container = av.open(str(seg.path), "w", container_options=options)
            video = seg.container.add_stream(
                "libx264", rate=self._rate, options={"preset": self.PRESET, "crf": str(self.CRF)}
            )
            video.width, video.height = self.encoded_size
            video.pix_fmt = "yuv420p"
            ctx = video.codec_context
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT601
            ctx.color_range = _MPEG_RANGE
            seg.video = video
            if self.subtitles:
                seg.subtitles = seg.container.add_stream(self._subtitle_codec)
                seg.subtitles.time_base = _CUE_TIME_BASE
                seg.subtitles.codec_context.subtitle_header = _ASS_HEADER
            seg.container.start_encoding()  # opens the encoders and writes the header: errors surface here
        except (OSError, av.FFmpegError) as exc:
            if seg.container is not None:
                seg.container.close()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise OutputError(
                f"cannot open {seg.path} for writing as {self._container_label} video ({reason}): "
                "give a writable file path ending in .mp4 or .mkv"
            ) from None
        self.paths.append(seg.path)
        return seg

    def _append(self, frame: np.ndarray) -> None:
        n = self.frames_written
        with self._lock:
            if n >= self._seg.end_frame:  # roll: flush this file's video, start the next file
                done = self._seg
                done.container.mux(done.video.encode(None))
                if self._prev is not None:
                    self._prev.container.close()
                self._prev, self._seg = done, None
                try:
                    self._seg = self._open_segment(done.index + 1, n)
                except OutputError:
                    self.closed, self._opened = True, False  # the recording stops here; earlier files are kept
                    self._finish_locked()
                    raise
            if self._prev is not None and n >= self._prev.end_frame + self._grace_frames:
                self._prev.container.close()  # writes the trailer: that file is complete
                self._prev = None
            w, h = self.encoded_size
            self._canvas[...] = frame[:h, :w]  # the one copy; crops an odd last row/column
            self._frame.pts = n - self._seg.first_frame
            self._seg.container.mux(self._seg.video.encode(self._frame))

    def _finish(self) -> None:
        with self._lock:
            self._finish_locked()

    def _finish_locked(self) -> None:
        seg, prev = self._seg, self._prev
        self._seg = self._prev = None
        try:
            if seg is not None:
                seg.container.mux(seg.video.encode(None))
        finally:
            for s in (prev, seg):
                if s is not None:
                    s.container.close()


# --------------------------------------------------------------------------- RTSP publishing (PyAV)

_RTSP_SCHEMES = ("rtsp://", "rtsps://")
_RTSP_ADVICE = "start the RTSP server (e.g. mediamtx) or check -d"
_RTP_TIME_BASE = Fraction(1, 90000)  # RTP's 90 kHz video clock


class RtspOutput(Output):
    """Publish frames as a live H.264 stream to an RTSP server (e.g. mediamtx) through PyAV.

    The stream is pushed with RTSP ANNOUNCE/RECORD over TCP (FFmpeg's rtsp
    muxer, ``rtsp_transport=tcp``), encoded by libx264 (preset ``veryfast``,
    tune ``zerolatency``: no B-frames, no lookahead; CRF 23; yuv420p; a
    keyframe every ``keyframe_interval_s`` seconds, so a viewer joining late
    waits at most that long). Timestamps are the wall-clock times
    :meth:`write` was called (90 kHz clock), so frames dropped on the way leave
    gaps instead of speeding the video up. yuv420p needs an even size: an
    odd-sized frame loses its last column and/or row; frames of another size
    than :meth:`open`'s are resized first.

    Threads: :meth:`write` never encodes and never touches the network. It
    copies the frame into one of a few preallocated buffers and queues it; the
    queue holds at most ``queue_frames`` frames and drops the oldest when the
    encoder falls behind (counted in :attr:`frames_dropped`). One
    encoder/sender thread converts, encodes and sends.

    Connection: :meth:`open` connects synchronously (the first RTSP handshake
    happens there, bounded by ``timeout_s``) so a wrong address fails at once
    with :class:`OutputError`. When the server goes away later (killed, network
    drop, stops reading for ``timeout_s``), the sender logs one error naming
    the URL (password shown as ``***``), and reconnects in the background with
    backoff ``backoff_s``, doubling up to ``backoff_max_s`` (1, 2, 4, 8, 10,
    10 … s). Meanwhile :meth:`write` drops every frame at once (counted, not
    queued). Each new connection starts a new encoder, so it begins with a
    keyframe. Before each reconnection attempt a plain socket asks the server
    for its RTSP ``OPTIONS`` (``timeout_s``): PyAV runs FFmpeg's handshake
    holding Python's interpreter lock, so it is started only once the server
    answers, which keeps a dead or unreachable server from stalling other
    threads.

    :meth:`close` sends the frames still queued, flushes the encoder, ends the
    session (RTSP TEARDOWN) and joins the thread; with a stalled server it can
    take up to about twice ``timeout_s``.

    Args:
        url: ``rtsp://[user:password@]host[:port]/path`` or ``rtsps://…``.
        keyframe_interval_s: seconds between keyframes (default 1).
        timeout_s: limit for connecting and for each network write, in seconds (default 2).
        queue_frames: frames that may wait for the encoder (1 or more; default 2).
        backoff_s, backoff_max_s: first and longest wait between reconnection attempts, in seconds.

    Attributes:
        url: the address given.
        encoded_size: ``(width, height)`` px sent (after :meth:`open`).
        fps: the nominal frame rate given to :meth:`open` (30 when unknown).
        connected: True while a session with the server is up.
        frames_written: frames given to :meth:`write`.
        frames_sent: frames encoded and handed to the server.
        frames_dropped: frames not sent: replaced in the queue, lost with a
            connection, or written while disconnected.
        reconnects: successful reconnections after a loss.

    Raises:
        OutputError: from the constructor when PyAV is not installed or the
            address is not rtsp:// or rtsps://; from :meth:`open` when the
            server cannot be reached or refuses the stream.
        ValueError: a numeric argument out of range.
    """

    PRESET = "veryfast"
    CRF = 23
    live_view = False

    def __init__(
        self,
        url: str,
        *,
        keyframe_interval_s: float = 1.0,
        timeout_s: float = 2.0,
        queue_frames: int = 2,
        backoff_s: float = 1.0,
        backoff_max_s: float = 10.0,
    ) -> None:
        self.url = (url or "").strip()
        if not self.url.lower().startswith(_RTSP_SCHEMES):
            raise OutputError(
                f"cannot publish to {redact_url(self.url)!r}: -o rtsp needs an rtsp:// or rtsps:// address,"
                " e.g. -d rtsp://127.0.0.1:8554/vision"
            )
        self._av = _import_av()
        if self._av is None:
            raise OutputError(f"cannot publish to {redact_url(self.url)}: {_NO_PYAV_ADVICE}")
        if not (keyframe_interval_s > 0 and timeout_s > 0 and queue_frames >= 1 and 0 < backoff_s <= backoff_max_s):
            raise ValueError(
                "RtspOutput needs keyframe_interval_s > 0, timeout_s > 0, queue_frames >= 1 and"
                f" 0 < backoff_s <= backoff_max_s; got {keyframe_interval_s}, {timeout_s}, {queue_frames},"
                f" {backoff_s}, {backoff_max_s}"
            )
        self.keyframe_interval_s = float(keyframe_interval_s)
        self.timeout_s = float(timeout_s)
        self.queue_frames = int(queue_frames)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.fps = 0.0
        self.size: tuple[int, int] = (0, 0)  # (width, height) given to open()
        self.encoded_size: tuple[int, int] = (0, 0)
        self.connected = False
        self.frames_written = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self.closed = False
        self._opened = False
        self._stopping = False
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[np.ndarray, float]] = collections.deque()
        self._free: list[np.ndarray] = []  # buffers neither queued nor being encoded
        self._container = None
        self._stream = None
        self._t0: float | None = None  # write() time of the first frame sent on this connection
        self._last_pts = -1
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        """E.g. ``RTSP rtsp://127.0.0.1:8554/vision (H.264, 29.83 fps)``; any password shown as ``***``."""
        fps = f", {self.fps:.2f} fps" if self.fps else ""
        return f"RTSP {redact_url(self.url)} (H.264{fps})"

    # ---------------------------------------------------------------- life cycle

    def open(self, width: int, height: int, fps: float) -> None:
        """Connect to the server and start publishing ``width``×``height`` px at nominal ``fps`` frames/s.

        The first connection is made here, synchronously, within about
        ``timeout_s`` seconds.

        Raises:
            OutputError: the server cannot be reached or refuses the stream, e.g.
                "cannot publish to rtsp://127.0.0.1:8554/vision: connection refused;
                start the RTSP server (e.g. mediamtx) or check -d".
            ValueError: ``width`` or ``height`` below 2.
            RuntimeError: already opened.
        """
        if self._opened or self.closed:
            raise RuntimeError("RtspOutput.open() called twice")
        if width < 2 or height < 2:
            raise ValueError(f"H.264 needs frames of at least 2x2 px, got {width}x{height}")
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            fps = 0.0
        self.fps = fps if math.isfinite(fps) and fps > 0 else 30.0
        self.size = (int(width), int(height))
        self.encoded_size = (self.size[0] - self.size[0] % 2, self.size[1] - self.size[1] % 2)
        problem = self._probe()
        if problem is None:
            try:
                self._connect()
            except OutputError as exc:
                problem = str(exc)
        if problem is not None:
            raise OutputError(f"cannot publish to {redact_url(self.url)}: {problem}; {_RTSP_ADVICE}")
        w, h = self.encoded_size
        self._free = [np.empty((h, w, 3), np.uint8) for _ in range(self.queue_frames + 2)]
        self._opened = True
        self.connected = True
        self._thread = threading.Thread(target=self._run, name="vision-host-rtsp-sender", daemon=True)
        self._thread.start()
        _LIVE_OUTPUTS.add(self)
        log.info("publishing %s", self.describe())

    def write(self, frame: np.ndarray) -> None:
        """Queue one H×W×3 uint8 BGR frame for the sender thread; never waits on encoding or the network.

        Costs one frame copy (plus a resize when the size differs from
        :meth:`open`'s). While disconnected the frame is dropped without a copy.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        if not self._opened or self._stopping:
            raise RuntimeError("RtspOutput.write() needs open() first and no close() before it")
        _check_frame(frame)
        now = time.monotonic()
        with self._cond:
            self.frames_written += 1
            if not self.connected:
                self.frames_dropped += 1
                return
            buf = self._free.pop()  # never empty: queue_frames + 2 buffers, at most queue_frames + 1 in use
        w, h = self.encoded_size
        if frame.shape[0] == self.size[1] and frame.shape[1] == self.size[0]:
            np.copyto(buf, frame[:h, :w])
        else:
            cv2.resize(frame, (w, h), dst=buf, interpolation=cv2.INTER_AREA)
        with self._cond:
            if not self.connected:  # lost while copying
                self._free.append(buf)
                self.frames_dropped += 1
                return
            if len(self._queue) >= self.queue_frames:
                old, _ = self._queue.popleft()
                self._free.append(old)
                self.frames_dropped += 1
            self._queue.append((buf, now))
            self._cond.notify_all()

    def close(self) -> None:
        """Send what is queued, end the RTSP session and join the sender thread. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self._opened:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        _LIVE_OUTPUTS.discard(self)
        log.info(
            "stopped publishing to %s: %d frames sent, %d dropped, %d reconnects",
            redact_url(self.url), self.frames_sent, self.frames_dropped, self.reconnects,
        )

    # ---------------------------------------------------------------- connection

    def _address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        default = 322 if parts.scheme.lower() == "rtsps" else 554
        return parts.hostname or "", port or default

    def _probe(self) -> str | None:
        """Ask the server for its RTSP OPTIONS with a plain socket (the GIL is free meanwhile).

        Returns None when it answers, else why not (e.g. ``"connection refused"``).
        For rtsps:// only the TCP connection is tried.
        """
        host, port = self._address()
        if not host:
            return "the address has no host"
        try:
            with socket.create_connection((host, port), timeout=self.timeout_s) as sock:
                if self.url.lower().startswith("rtsps://"):
                    return None
                parts = urlsplit(self.url)
                target = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
                sock.sendall(f"OPTIONS {target} RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: vision-host\r\n\r\n".encode())
                answer = sock.recv(16)
        except socket.gaierror:
            return f"the host name {host!r} is unknown"
        except ConnectionRefusedError:
            return "connection refused"
        except TimeoutError:
            return f"no answer from {host}:{port} within {self.timeout_s:g} s"
        except OSError as exc:
            return exc.strerror or str(exc)
        if not answer.startswith(b"RTSP/"):
            return f"{host}:{port} does not answer as an RTSP server"
        return None

    def _connect(self) -> None:
        """Open the PyAV container and H.264 stream, and do the RTSP handshake (ANNOUNCE, SETUP, RECORD).

        Raises:
            OutputError: with the reason only (the caller adds the URL and the advice).
        """
        av = self._av
        options = {"rtsp_transport": "tcp", "timeout": str(round(self.timeout_s * 1e6))}  # timeout in µs
        container = None
        try:
            container = av.open(self.url, mode="w", format="rtsp", container_options=options)
            rate = Fraction(self.fps).limit_denominator(1001)
            gop = max(1, round(self.fps * self.keyframe_interval_s))
            stream = container.add_stream(
                "libx264",
                rate=rate,
                options={"preset": self.PRESET, "tune": "zerolatency", "crf": str(self.CRF), "g": str(gop)},
            )
            stream.width, stream.height = self.encoded_size
            stream.pix_fmt = "yuv420p"
            stream.time_base = _RTP_TIME_BASE
            ctx = stream.codec_context
            ctx.time_base = _RTP_TIME_BASE
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT601
            ctx.color_range = _MPEG_RANGE
            container.start_encoding()  # opens the encoder and does the RTSP handshake
        except (OSError, av.FFmpegError) as exc:
            if container is not None:
                try:
                    container.close()
                except (OSError, av.FFmpegError):
                    pass
            raise OutputError(_av_reason(exc)) from None
        self._container, self._stream = container, stream
        self._t0, self._last_pts = None, -1

    def _disconnect(self, flush: bool) -> None:
        """Close the current session; with ``flush``, send the encoder's last frames first."""
        av = self._av
        container, stream = self._container, self._stream
        self._container = self._stream = None
        if container is None:
            return
        try:
            if flush:
                container.mux(stream.encode(None))
        except (OSError, av.FFmpegError) as exc:
            log.warning("RTSP %s: the last frames were not sent (%s)", redact_url(self.url), _av_reason(exc))
        try:
            container.close()  # RTSP TEARDOWN, closes the sockets
        except (OSError, av.FFmpegError):
            pass

    # ---------------------------------------------------------------- sender thread

    def _run(self) -> None:
        av = self._av
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:  # stopping, nothing left to send
                    break
                buf, t = self._queue.popleft()
            try:
                self._send(buf, t)
            except (OSError, av.FFmpegError) as exc:
                with self._cond:
                    self.connected = False
                    lost = 1 + len(self._queue)
                    self._free.extend(b for b, _ in self._queue)
                    self._queue.clear()
                    self._free.append(buf)
                    self.frames_dropped += lost
                log.error(
                    "lost the RTSP connection to %s (%s): reconnecting (every %g s at first, then up to %g s apart);"
                    " frames are dropped until it is back",
                    redact_url(self.url), _av_reason(exc), self.backoff_s, self.backoff_max_s,
                )
                self._disconnect(flush=False)
                self._reconnect()
                continue
            with self._cond:
                self._free.append(buf)
                self.frames_sent += 1
        self._disconnect(flush=True)
        with self._cond:
            self.connected = False

    def _send(self, buf: np.ndarray, t: float) -> None:
        if self._t0 is None:
            self._t0 = t
        pts = max(round((t - self._t0) / _RTP_TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        frame = self._av.VideoFrame.from_ndarray(buf, format="bgr24")  # a copy: buf is free again after this
        frame.pts = pts
        frame.time_base = _RTP_TIME_BASE
        self._container.mux(self._stream.encode(frame))

    def _reconnect(self) -> None:
        """Try to reconnect with backoff until it works or close() is called."""
        delay = self.backoff_s
        lost_at = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=delay)
                if self._stopping:
                    return
            problem = self._probe()
            if problem is None:
                try:
                    self._connect()
                except OutputError as exc:
                    problem = str(exc)
            if problem is None:
                with self._cond:
                    self.connected = True
                    self.reconnects += 1
                log.warning("publishing to %s again after %.1f s", redact_url(self.url), time.monotonic() - lost_at)
                return
            delay = min(delay * 2, self.backoff_max_s)
            log.warning("cannot publish to %s yet (%s); next try in %g s", redact_url(self.url), problem, delay)


def _av_reason(exc: BaseException) -> str:
    """A short reason from a PyAV/OS error, e.g. ``"connection refused"``."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "the server stopped answering"
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]


# --------------------------------------------------------------------------- display

_DISPLAY_ADVICE = "use -o mjpeg to watch in a browser or -o file -d out.mp4"


class DisplayOutput(Output):
    """Show frames in an OpenCV window (``cv2.imshow`` + ``cv2.waitKey(1)``).

    Pressing ``q`` or Esc in the window, or closing it, sets :attr:`closed`;
    the pipeline should check it after each :meth:`write` and stop.

    Availability is checked in :meth:`open` without crashing: on Linux a
    display (``DISPLAY`` or ``WAYLAND_DISPLAY``) must be set, and OpenCV must
    have a GUI backend (``opencv-python-headless`` has none: its
    ``cv2.namedWindow`` raises ``cv2.error``).

    Args:
        window_name: the window title (default ``"vision-host"``).

    Raises:
        OutputError: from :meth:`open` when no window can be opened, e.g.
            "cannot open a window: no display (DISPLAY unset); use -o mjpeg to
            watch in a browser or -o file -d out.mp4".
    """

    live_view = True

    def __init__(self, window_name: str = "vision-host") -> None:
        self.window_name = window_name or "vision-host"
        self.closed = False
        self._opened = False
        # Some backends do not report WND_PROP_VISIBLE (they return -1 while the
        # window is open); trust it only if it read >= 1 after the first imshow.
        self._visible_prop_works: bool | None = None

    def describe(self) -> str:
        """E.g. ``window 'vision-host' (press q or Esc to quit)``."""
        return f"window {self.window_name!r} (press q or Esc to quit)"

    def open(self, width: int, height: int, fps: float) -> None:
        """Create the window (sized ``width``×``height`` px; ``fps`` unused).

        Raises:
            OutputError: no display, or this OpenCV has no GUI support.
        """
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise OutputError(f"cannot open a window: no display (DISPLAY unset); {_DISPLAY_ADVICE}")
        try:
            cv2.namedWindow(self.window_name, cv2.WINDOW_NORMAL)
            if width > 0 and height > 0:
                cv2.resizeWindow(self.window_name, int(width), int(height))
        except cv2.error as e:
            log.debug("cv2.namedWindow failed: %s", e)
            raise OutputError(
                f"cannot open a window: this OpenCV has no GUI support (opencv-python-headless?); {_DISPLAY_ADVICE}"
            ) from None
        self._opened = True

    def write(self, frame: np.ndarray) -> None:
        """Show one H×W×3 uint8 BGR frame and poll the keyboard for 1 ms.

        Sets :attr:`closed` when the user pressed q/Esc or closed the window.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open`.
        """
        if not self._opened:
            raise RuntimeError("DisplayOutput.write() needs open() first")
        _check_frame(frame)
        if self.closed:
            return
        cv2.imshow(self.window_name, frame)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            self.closed = True
            return
        try:
            visible = cv2.getWindowProperty(self.window_name, cv2.WND_PROP_VISIBLE)
        except cv2.error:
            visible = -1.0
        if self._visible_prop_works is None:
            self._visible_prop_works = visible >= 1
        elif self._visible_prop_works and visible < 1:
            self.closed = True  # the user closed the window

    def close(self) -> None:
        """Destroy the window. Idempotent."""
        self.closed = True
        if self._opened:
            self._opened = False
            try:
                cv2.destroyWindow(self.window_name)
                cv2.waitKey(1)
            except cv2.error:
                pass


# --------------------------------------------------------------------------- factory


def make_output(
    kind: str,
    destination: str | None = None,
    *,
    quality: int = 80,
    codec: str | None = None,
    segment_seconds: float | None = None,
    subtitles: bool = False,
) -> Output:
    """Build the output for the CLI's ``-o KIND -d DESTINATION``.

    * ``mjpeg``: ``destination`` is the listen address (default ``:8080``),
      ``quality`` the JPEG quality.
    * ``file``: ``destination`` is the ``.mp4`` (or, for H.264, ``.mkv``) path
      (required). ``codec="h264"`` records with :class:`RecordingOutput`
      (PyAV), which also takes ``segment_seconds`` and ``subtitles``;
      ``codec="mp4v"`` writes with OpenCV (:class:`FileOutput`). The default
      is ``h264`` when PyAV is installed, else ``mp4v``. Without PyAV, asking
      for ``h264`` falls back to ``mp4v`` with a warning (logged once).
    * ``display``: ``destination`` is the window title (default ``vision-host``).
    * ``rtsp``: ``destination`` is the ``rtsp://`` or ``rtsps://`` address to
      publish H.264 to (:class:`RtspOutput`, needs PyAV).

    Nothing is opened here; call ``open()`` on the result.

    Raises:
        OutputError: unknown kind or codec (the message lists the valid ones),
            missing file path, an unreadable MJPEG address, segments or
            subtitles asked for without PyAV or with ``mp4v``, a file
            extension the H.264 recorder does not write, or an rtsp
            destination that is missing, not rtsp:// or rtsps://, or without PyAV.
    """
    global _warned_no_pyav
    kind_norm = (kind or "").strip().lower()
    if kind_norm == "mjpeg":
        return MjpegOutput(destination or f":{_DEFAULT_MJPEG_PORT}", quality=quality)
    if kind_norm == "file":
        if not destination:
            raise OutputError("-o file needs a file to write: add -d out.mp4")
        codec_norm = (codec or "h264").strip().lower()
        if codec_norm not in FILE_CODECS:
            raise OutputError(f"unknown codec {codec!r}: use one of {', '.join(FILE_CODECS)}")
        if codec_norm == "h264" and _import_av() is None:
            if segment_seconds or subtitles:
                raise OutputError(f"segments and subtitles need H.264 recording: {_NO_PYAV_ADVICE}")
            if not _warned_no_pyav:
                _warned_no_pyav = True
                log.warning("PyAV is not installed: writing mp4v with OpenCV instead of H.264; to record H.264, %s",
                            _NO_PYAV_ADVICE)
            codec_norm = "mp4v"
        if codec_norm == "mp4v":
            if segment_seconds or subtitles:
                raise OutputError("segments and subtitles need H.264 recording: leave out the mp4v codec")
            return FileOutput(destination)
        return RecordingOutput(destination, segment_seconds=segment_seconds, subtitles=subtitles)
    if kind_norm == "display":
        return DisplayOutput(destination or "vision-host")
    if kind_norm == "rtsp":
        if not destination:
            raise OutputError("-o rtsp needs the server address to publish to: add -d rtsp://127.0.0.1:8554/vision")
        return RtspOutput(destination)
    raise OutputError(f"unknown output {kind!r}: use -o with one of {', '.join(OUTPUT_KINDS)}")
