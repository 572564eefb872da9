"""Where processed frames go: an MJPEG web stream, a video file, or a window.

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

Errors meant for the person running vision-host are raised as
:class:`OutputError`, whose message is a sentence saying what to do.
Programming mistakes (write() before open(), a frame that is not H×W×3
uint8) raise :class:`RuntimeError` / :class:`ValueError`.
"""

from __future__ import annotations

import abc
import atexit
import errno
import functools
import logging
import math
import os
import select
import socket
import socketserver
import sys
import threading
import time
import weakref
from fractions import Fraction
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np

__all__ = [
    "OUTPUT_KINDS",
    "DisplayOutput",
    "FILE_CODECS",
    "FileOutput",
    "MjpegOutput",
    "Output",
    "OutputError",
    "RecordingOutput",
    "make_output",
    "parse_listen_address",
]

log = logging.getLogger(__name__)

#: Output kinds accepted by :func:`make_output` (the CLI's ``-o`` values).
OUTPUT_KINDS = ("mjpeg", "file", "display")
#: Codecs of ``-o file``: H.264 through PyAV (:class:`RecordingOutput`) or mp4v through OpenCV (:class:`FileOutput`).
FILE_CODECS = ("h264", "mp4v")

_DEFAULT_MJPEG_PORT = 8080
_BOUNDARY = "frame"
_CLIENT_POLL_S = 0.5  # how often an idle stream handler checks that its client is still there
_SNAPSHOT_TIMEOUT_S = 5.0
# Kernel send buffer per stream client. Left alone, Linux grows it to megabytes
# (tens of frames), so a slow viewer would see frames seconds late; capped, a
# slow viewer blocks its own thread early and then gets the newest frame.
# 128 KiB still sustains ~20 MB/s at 10 ms RTT.
_STREAM_SNDBUF = 128 * 1024


# MJPEG outputs still open. At interpreter exit they are closed before Python
# kills daemon threads: a daemon thread caught inside cv2.imencode() when the
# interpreter finalizes aborts the whole process ("terminate called without an
# active exception"), so the encoder must be stopped and joined first.
_LIVE_MJPEG: "weakref.WeakSet[MjpegOutput]" = weakref.WeakSet()


@atexit.register
def _close_live_outputs() -> None:
    for out in list(_LIVE_MJPEG):
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
    """

    closed: bool = False

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


class _MjpegHTTPServer(ThreadingHTTPServer):
    """stdlib threading HTTP server; one daemon handler thread per connection.

    The stdlib's ``server_close()`` does not join daemon handler threads
    (``socketserver._Threads`` skips them), so this server keeps its own list
    and :meth:`join_handlers` joins them.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: "MjpegOutput", family: int) -> None:
        self.address_family = family
        self.owner = owner
        self._handler_threads: list[threading.Thread] = []
        self._handler_lock = threading.Lock()
        self._handler_count = 0
        super().__init__(address, _MjpegHandler)

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        with self._handler_lock:
            self._handler_threads = [t for t in self._handler_threads if t.is_alive()]
            self._handler_count += 1
            t = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"vision-host-mjpeg-client-{self._handler_count}",
                daemon=True,
            )
            self._handler_threads.append(t)
        t.start()

    def join_handlers(self, timeout_s: float) -> list[threading.Thread]:
        """Join every handler thread; returns those still alive after ``timeout_s`` s in total."""
        deadline = time.monotonic() + timeout_s
        with self._handler_lock:
            threads = list(self._handler_threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup
        # that can take seconds; the name is not needed here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


_INDEX_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vision-host</title>
<style>
html, body { margin: 0; height: 100%; background: #111; color: #ddd; font: 14px sans-serif; }
body { display: flex; flex-direction: column; align-items: center; justify-content: center; }
img { max-width: 100vw; max-height: calc(100vh - 2em); object-fit: contain; }
</style>
</head>
<body>
<img src="/stream" alt="vision-host live stream">
<div><a href="/snapshot.jpg" style="color:#8af">snapshot</a></div>
</body>
</html>
"""


class _MjpegHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vision-host"
    sys_version = ""
    server: _MjpegHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.owner._track_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.owner._untrack_connection(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("mjpeg %s: " + format, self.address_string(), *args)

    def _send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        if path in ("/stream", "/stream.mjpg"):
            owner._serve_stream(self)
        elif path == "/snapshot.jpg":
            jpeg = owner._snapshot()
            if jpeg is None:
                self._send_body(
                    HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", b"no frame has been written yet\n"
                )
            else:
                self._send_body(HTTPStatus.OK, "image/jpeg", jpeg)
        elif path in ("/", "/index.html"):
            self._send_body(HTTPStatus.OK, "text/html; charset=utf-8", _INDEX_HTML)
        else:
            self._send_body(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer closed its side (readable with EOF) or the socket failed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class MjpegOutput(Output):
    """Serve frames as an MJPEG stream over HTTP (watch it in any browser).

    Endpoints (HTTP/1.1, stdlib :class:`http.server.ThreadingHTTPServer`):

    * ``GET /`` — a self-contained HTML page titled ``vision-host`` showing ``<img src="/stream">``.
    * ``GET /stream`` and ``GET /stream.mjpg`` — ``multipart/x-mixed-replace; boundary=frame``;
      each part is ``--frame``, ``Content-Type: image/jpeg``, ``Content-Length: N``,
      a blank line, N bytes of JPEG and CRLF. The connection closes when the output closes.
    * ``GET /snapshot.jpg`` — the newest frame as one JPEG; 503 before the first frame.
    * anything else — 404.

    Cost to the pipeline: :meth:`write` copies the frame into a buffer owned
    by this object (≈10–60 µs for 640×360) and notifies; it never touches the
    network and never encodes. One encoder thread JPEG-encodes only the newest
    frame and only while at least one stream client is connected or a snapshot
    is waiting, so frames are skipped when encoding falls behind. Each client
    has its own thread that always sends the newest JPEG it has not sent yet:
    a slow or stalled viewer gets fewer frames and delays nobody (its kernel
    send buffer is capped at 128 KiB so it does not queue seconds of stale
    frames either). Clients that
    hang up are noticed on the next send (broken pipe) or within 0.5 s while
    idle, and removed.

    Args:
        destination: listen address, see :func:`parse_listen_address`; default
            ``":8080"`` = 127.0.0.1 port 8080. A bare port never binds all
            interfaces: give ``0.0.0.0:8080`` for that. Port 0 picks a free port.
        quality: JPEG quality 1..100 (default 80).

    Attributes:
        host: the address listened on, e.g. ``"127.0.0.1"``.
        port: the port actually bound (after :meth:`open`; useful with port 0).
        url: ``http://host:port/`` (after :meth:`open`).
        frames_written: frames given to :meth:`write`.
        frames_encoded: JPEGs produced by the encoder thread.
        clients: stream clients currently connected.

    Raises:
        OutputError: from the constructor for an unreadable address or a
            quality outside 1..100; from :meth:`open` when the port is in use,
            not permitted, or the host is not an address of this machine.
    """

    def __init__(self, destination: str | None = ":8080", quality: int = 80) -> None:
        self.host, self._requested_port = parse_listen_address(destination)
        if not 1 <= int(quality) <= 100:
            raise OutputError(f"JPEG quality {quality} is out of range: give a number from 1 to 100")
        self.quality = int(quality)
        self.port: int = self._requested_port
        self.frames_written = 0
        self.frames_encoded = 0
        self.clients = 0
        self.closed = False

        self._cond = threading.Condition()
        self._opened = False
        self._stopping = False
        # Triple buffer: _back is owned by write(), _work by the encoder,
        # _pending is handed between them under _cond.
        self._back: np.ndarray | None = None
        self._pending: np.ndarray | None = None
        self._work: np.ndarray | None = None
        self._frame_seq = 0  # sequence number of the frame in _pending (0 = none yet)
        self._jpeg: bytes | None = None
        self._jpeg_seq = 0  # frame sequence number that _jpeg shows
        self._snapshot_waiters = 0
        self._connections: set[socket.socket] = set()
        self._server: _MjpegHTTPServer | None = None
        self._server_thread: threading.Thread | None = None
        self._encoder_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page; the stream is at ``url + "stream"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def describe(self) -> str:
        """E.g. ``MJPEG at http://127.0.0.1:8080/``."""
        return f"MJPEG at {self.url}"

    # ---------------------------------------------------------------- life cycle

    def open(self, width: int, height: int, fps: float) -> None:
        """Bind the port and start the server and encoder threads.

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
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            server = _MjpegHTTPServer((self.host, self._requested_port), self, family)
        except OSError as e:
            raise self._bind_error(e) from e
        self._server = server
        self.port = server.server_address[1]
        shape = (max(int(height), 1), max(int(width), 1), 3)
        self._back = np.zeros(shape, np.uint8)
        self._pending = np.zeros(shape, np.uint8)
        self._work = np.zeros(shape, np.uint8)
        self._opened = True
        self._encoder_thread = threading.Thread(target=self._encode_loop, name="vision-host-mjpeg-encoder", daemon=True)
        self._server_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="vision-host-mjpeg-server", daemon=True
        )
        self._encoder_thread.start()
        self._server_thread.start()
        _LIVE_MJPEG.add(self)
        log.info("serving %s", self.describe())

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
        """Copy ``frame`` (H×W×3 uint8 BGR) into the output's buffer and wake the encoder.

        Never blocks on the network or on JPEG encoding; costs one frame copy
        plus a lock round trip.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
        """
        if not self._opened or self._stopping:
            raise RuntimeError("MjpegOutput.write() needs open() first and no close() before it")
        _check_frame(frame)
        back = self._back
        if back is None or back.shape != frame.shape:
            back = self._back = np.empty_like(frame)
        np.copyto(back, frame)
        with self._cond:
            self._back, self._pending = self._pending, back
            self._frame_seq += 1
            self.frames_written += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop serving: end every client connection and join all threads.

        Idempotent. When it returns no thread started by this output is left.
        """
        if self.closed:
            return
        self.closed = True
        if not self._opened:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server = self._server
        assert server is not None
        server.shutdown()  # stops serve_forever(); returns once its loop has exited
        with self._cond:
            conns = list(self._connections)
        for conn in conns:  # wakes handlers blocked in send() to a stalled client or reading keep-alive
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # closes the listening socket
        stuck = server.join_handlers(timeout_s=5.0)
        if stuck:  # pragma: no cover - every handler wakes up on the socket shutdown above
            log.warning("MJPEG client threads still running after close(): %s", [t.name for t in stuck])
        for t in (self._server_thread, self._encoder_thread):
            if t is not None:
                t.join()
        _LIVE_MJPEG.discard(self)
        log.info("MJPEG server at %s stopped", self.url)

    # ---------------------------------------------------------------- encoder

    def _encode_loop(self) -> None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.quality]
        while True:
            with self._cond:
                while not self._stopping and not (
                    self._frame_seq > self._jpeg_seq and (self.clients > 0 or self._snapshot_waiters > 0)
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                self._pending, self._work = self._work, self._pending
                seq = self._frame_seq
                work = self._work
            assert work is not None
            ok, buf = cv2.imencode(".jpg", work, params)  # releases the GIL
            if not ok:  # pragma: no cover - imencode of a valid uint8 image does not fail
                log.warning("JPEG encoding failed for frame %d", seq)
                continue
            jpeg = buf.tobytes()
            with self._cond:
                self._jpeg, self._jpeg_seq = jpeg, seq
                self.frames_encoded += 1
                self._cond.notify_all()

    # ---------------------------------------------------------------- HTTP side

    def _track_connection(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.add(conn)
            stopping = self._stopping
        if stopping:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _untrack_connection(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)

    def _snapshot(self) -> bytes | None:
        """Newest frame as JPEG, encoding it if needed; None before the first frame."""
        with self._cond:
            if self._frame_seq == 0:
                return None
            target = self._frame_seq
            if self._jpeg_seq < target:
                self._snapshot_waiters += 1
                self._cond.notify_all()
                try:
                    self._cond.wait_for(
                        lambda: self._jpeg_seq >= target or self._stopping, timeout=_SNAPSHOT_TIMEOUT_S
                    )
                finally:
                    self._snapshot_waiters -= 1
            return self._jpeg

    def _serve_stream(self, handler: _MjpegHandler) -> None:
        handler.close_connection = True
        conn = handler.connection
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _STREAM_SNDBUF)
        except OSError:  # pragma: no cover - best effort
            pass
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        handler.send_header("Cache-Control", "no-cache, no-store, must-revalidate")
        handler.send_header("Pragma", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        sent_seq = 0
        with self._cond:
            self.clients += 1
            self._cond.notify_all()  # the encoder may have a frame waiting for a viewer
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(
                        lambda: self._stopping or (self._jpeg is not None and self._jpeg_seq != sent_seq),
                        timeout=_CLIENT_POLL_S,
                    )
                    if self._stopping:
                        return
                    jpeg, seq = self._jpeg, self._jpeg_seq
                if jpeg is None or seq == sent_seq:
                    if _peer_gone(conn):
                        return
                    continue
                part = b"".join(
                    (
                        b"--" + _BOUNDARY.encode() + b"\r\n",
                        b"Content-Type: image/jpeg\r\n",
                        b"Content-Length: %d\r\n\r\n" % len(jpeg),
                        jpeg,
                        b"\r\n",
                    )
                )
                handler.wfile.write(part)  # blocks only this client's thread
                sent_seq = seq
        except OSError:  # BrokenPipeError, ConnectionResetError, or shutdown by close()
            return
        finally:
            with self._cond:
                self.clients -= 1


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

    Nothing is opened here; call ``open()`` on the result.

    Raises:
        OutputError: unknown kind or codec (the message lists the valid ones),
            missing file path, an unreadable MJPEG address, segments or
            subtitles asked for without PyAV or with ``mp4v``, or a file
            extension the H.264 recorder does not write.
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
    raise OutputError(f"unknown output {kind!r}: use -o with one of {', '.join(OUTPUT_KINDS)}")
