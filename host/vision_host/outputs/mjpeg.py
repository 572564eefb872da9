"""MJPEG over HTTP: :class:`MjpegOutput` (one server, one or more streams) and
:class:`MjpegStreamOutput` (one of its streams), watched in any browser.

The HTTP side (routes, access rules, the server thread) is :mod:`vision_host.webapp` and
:mod:`vision_host.webserver`, loaded only when the server starts; the live viewer
(:mod:`vision_host.viewer`) plugs into it through :meth:`MjpegOutput.attach_viewer`.
"""

from __future__ import annotations

import contextlib
import errno
import html
import logging
import socket
import threading
import time

import cv2
import numpy as np

from .base import LIVE_OUTPUTS, Output, OutputError, check_frame

__all__ = ["MjpegOutput", "MjpegStreamOutput", "make", "parse_listen_address"]

log = logging.getLogger("vision_host.outputs")

_DEFAULT_MJPEG_PORT = 8080
_BOUNDARY = "frame"  # the same as webapp.BOUNDARY, which is not imported here: it loads Starlette
_SNAPSHOT_TIMEOUT_S = 5.0
#: After a snapshot or a frame is asked for, every frame is kept (copied) for this long (s),
#: so the next asks are answered at once.
_KEEP_AFTER_ASK_S = 10.0
#: How long (s) an ask waits for the frame loop's next frame before taking the newest frame as
#: it lies (the stream is then idle: ended, paused between frames, or between reconnections).
_FRESH_WAIT_S = 0.5


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

    A frame is copied (kept) only while someone may want it: a viewer, a snapshot, or for
    :data:`_KEEP_AFTER_ASK_S` after an ask (:meth:`latest_frame`, :meth:`snapshot_async`).
    Otherwise ``write()`` only notes the frame it was given (``newest``, not a copy: the
    source reuses that buffer for its next frame), and an ask waits for the next frame, which
    is then copied, or, after :data:`_FRESH_WAIT_S` without one (the stream is idle), copies
    ``newest`` as it lies (:meth:`_keep_newest`). A stream that stops keeps its last frame.

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
        self.frame_waiters = 0  # latest_frame() calls waiting for the next frame
        self.clients = 0
        self.keep_until = 0.0  # time.monotonic() until which every frame is kept
        self.newest: np.ndarray | None = None  # the frame last written when it was not kept
        self.frames_written = 0
        self.frames_kept = 0
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
        if not (self.clients or self.snapshot_waiters or self.frame_waiters) and time.monotonic() >= self.keep_until:
            with self.cond:             # nobody wants it: noted, not copied
                self.newest = frame
                self.frames_written += 1
            return
        back = self.back
        if back is None or back.shape != frame.shape:
            back = self.back = np.empty_like(frame)
        np.copyto(back, frame)
        with self.cond:
            self.back, self.pending = self.pending, back
            self.newest = None
            self.frame_seq += 1
            self.frames_written += 1
            self.frames_kept += 1
            if self.clients or self.snapshot_waiters or self.frame_waiters:   # else the encoder sleeps on
                self.cond.notify_all()

    def _keep_newest(self) -> None:
        """Copy the frame last written, not kept, into ``pending`` (under ``cond``): for an ask
        that no new frame answered in :data:`_FRESH_WAIT_S`, and when the stream stops."""
        newest, self.newest = self.newest, None
        if newest is None:
            return
        pending = self.pending
        if pending is None or pending.shape != newest.shape:
            pending = self.pending = np.empty_like(newest)
        np.copyto(pending, newest)
        self.frame_seq += 1
        self.frames_kept += 1
        self.cond.notify_all()

    def _asked(self) -> None:
        """Someone asked for the newest frame (under ``cond``): keep frames for a while."""
        self.keep_until = time.monotonic() + _KEEP_AFTER_ASK_S

    def stop(self, finished: bool) -> None:
        """End the encoder and this channel's client streams; join the encoder thread."""
        with self.cond:
            self._keep_newest()     # the frame loop has stopped writing: its last frame is kept
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
        """A copy of the newest frame written (H×W×3 uint8 BGR), None before the first. Blocks
        up to :data:`_FRESH_WAIT_S` when the newest frame was not kept (call it off the event
        loop)."""
        with self.cond:
            if self.frame_seq == 0 and self.newest is None:
                return None
            self._asked()
            if self.newest is not None and not self.stopping:
                self.frame_waiters += 1
                try:
                    self.cond.wait_for(lambda: self.newest is None or self.stopping, _FRESH_WAIT_S)
                finally:
                    self.frame_waiters -= 1
                self._keep_newest()
            newest = self.work if self.work_seq == self.frame_seq else self.pending
            return newest.copy()    # the encoder only reads `work`

    async def snapshot_async(self) -> bytes | None:
        """Newest frame as JPEG, encoding it if needed (waits up to 5 s on the loop, never
        blocking it; a frame that was not kept is the next one written, or after 0.5 s an idle
        stream's last one); None before the first frame."""
        import asyncio

        self.loop = asyncio.get_running_loop()
        with self.cond:
            if self.frame_seq == 0 and self.newest is None:
                return None
            self._asked()
            target = self.frame_seq + (self.newest is not None)   # a frame not kept: the next one
            if self.jpeg_seq >= target or self.stopping:
                return self.jpeg
            self.snapshot_waiters += 1
            self.cond.notify_all()
        try:
            now = self.loop.time()
            deadline, fresh_by = now + _SNAPSHOT_TIMEOUT_S, now + _FRESH_WAIT_S
            while True:
                changed = self._changed_event()
                with self.cond:
                    if self.jpeg_seq >= target or self.stopping:
                        return self.jpeg
                    if fresh_by is not None and self.loop.time() >= fresh_by:
                        self._keep_newest()      # no new frame came: the stream is idle
                        fresh_by = None
                now = self.loop.time()
                if now >= deadline:
                    return self.jpeg
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(deadline, fresh_by or deadline) - now)
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
            fresh_by = self.loop.time() + _FRESH_WAIT_S   # then an idle stream's last frame is kept
            while True:
                changed = self._changed_event()
                with self.cond:
                    if self.stopping:
                        return
                    if fresh_by is not None and (self.newest is None or self.loop.time() >= fresh_by):
                        self._keep_newest()
                        fresh_by = None
                    jpeg, seq = self.jpeg, self.jpeg_seq
                if jpeg is None or seq == sent_seq:
                    if fresh_by is None:
                        await changed.wait()
                    else:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(changed.wait(), max(fresh_by - self.loop.time(), 0.0))
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
    :meth:`write` takes an H×W×3 uint8 BGR frame, copied while someone watches or asks (never
    blocks on the network or on encoding); :meth:`close` marks only this
    channel finished (its viewers' streams end, ``/stream/N`` answers 410,
    its last JPEG stays available at ``/snapshot/N.jpg``) while the server
    keeps serving the other streams. :meth:`MjpegOutput.close` stops everything.

    Attributes:
        index: the stream number N in ``/stream/N``.
        name: the caption shown on the page.
        url: ``http://host:port/stream/N``.
        frames_written, frames_kept, frames_encoded, clients: as in :class:`MjpegOutput`, for this stream.
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
    def frames_kept(self) -> int:
        return self._channel.frames_kept

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
        """Give this stream ``frame`` (H×W×3 uint8 BGR): copied into its buffer while a viewer
        watches, a snapshot waits or for 10 s after an ask (the encoder is then woken), else only
        noted (the caller may reuse ``frame`` at once either way; see :class:`MjpegOutput`).

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        channel = self._channel
        if not channel.opened or channel.stopping:
            raise RuntimeError(f"MJPEG stream {self.index}: write() needs open() first and no close() before it")
        check_frame(frame)
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
      every stream, each captioned with its name. With a viewer attached, the
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
    its stream (≈10–60 µs for 640×360, 0.6 ms for 1920×1080) while a client watches, a snapshot
    waits or for 10 s after a frame was asked for, and otherwise only notes it (an ask then
    waits for the next frame, up to 0.5 s); it never touches the
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
        frames_kept: frames of them copied for viewers, snapshots and asks (stream 0).
        frames_encoded: JPEGs produced for stream 0.
        clients: stream-0 clients currently connected.
        limits, allowed_hosts: as given; read by :meth:`start` (which sets ``limits`` to the
            defaults when None). The web modules (Starlette, uvicorn) load only then.
        viewer: the live viewer (:class:`.viewer.Viewer`) given to :meth:`attach_viewer`;
            None: the plain page only.

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
        #: Set it with :meth:`attach_viewer` (assigning it before :meth:`start` works too).
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
    def frames_kept(self) -> int:
        return self._channels[0].frames_kept

    @property
    def clients(self) -> int:
        return self._channels[0].clients

    def describe(self) -> str:
        """E.g. ``MJPEG at http://127.0.0.1:8080/``."""
        return f"MJPEG at {self.url}"

    def latest_frame(self, index: int) -> np.ndarray | None:
        """A copy of stream ``index``'s newest frame (H×W×3 uint8 BGR), None before the first.
        Blocks up to 0.5 s while the stream's frames are not being kept (nobody watched or
        asked lately): call it off the server's event loop."""
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

    def attach_viewer(self, viewer) -> None:
        """Let ``viewer`` (a :class:`.viewer.Viewer`) answer ``/``, ``/api/…`` and ``/snapshot….png``
        and check the access token on every request, from :meth:`start` on.

        This is the viewer's hook into the server: the routes are fixed when the server starts,
        so no request is ever answered without the viewer's token check.

        Raises:
            RuntimeError: the server has started already.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("attach the viewer before MjpegOutput.start(): the server's routes are fixed")
            self.viewer = viewer

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
        from ..webapp import HostRule, build_app
        from ..webserver import BackgroundServer, ServerLimits

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
            LIVE_OUTPUTS.add(self)
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
        """Give stream 0 ``frame`` (H×W×3 uint8 BGR), as :meth:`MjpegStreamOutput.write` does.

        Never blocks on the network or on JPEG encoding; costs one frame copy plus a lock
        round trip while someone watches or asked lately, else the lock round trip only.

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
        LIVE_OUTPUTS.discard(self)
        log.info("MJPEG server at %s stopped", self.url)


def make(destination: str | None, *, quality: int = 80, **_unused) -> MjpegOutput:
    """``-o mjpeg``: serve at ``destination`` (see :func:`parse_listen_address`; default ``:8080``)
    with JPEG ``quality`` 1..100; the other :func:`~vision_host.outputs.make_output` options do not apply.

    Raises:
        OutputError: an unreadable address or a quality out of range.
    """
    return MjpegOutput(destination or f":{_DEFAULT_MJPEG_PORT}", quality=quality)
