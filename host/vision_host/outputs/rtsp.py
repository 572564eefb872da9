"""Re-publishing: :class:`RtspOutput` pushes the video as live H.264 to an RTSP server
(RFC 2326 ANNOUNCE/RECORD through FFmpeg's rtsp muxer), and :func:`make` for ``-o rtsp``."""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from fractions import Fraction
from urllib.parse import urlsplit

import cv2
import numpy as np

from ..sources import redact_url
from . import encoding
from .base import LIVE_OUTPUTS, Output, OutputError, check_frame, frame_rate_or_default

__all__ = ["RtspOutput", "make"]

log = logging.getLogger("vision_host.outputs")

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
        self._av = encoding.import_av()
        if self._av is None:
            raise OutputError(f"cannot publish to {redact_url(self.url)}: {encoding.NO_PYAV_ADVICE}")
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
        encoded_size = encoding.even_size(width, height)
        self.fps = frame_rate_or_default(fps)
        self.size = (int(width), int(height))
        self.encoded_size = encoded_size
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
        LIVE_OUTPUTS.add(self)
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
        check_frame(frame)
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
        LIVE_OUTPUTS.discard(self)
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
            stream = encoding.add_h264_stream(container, rate, self.encoded_size, gop=gop, time_base=_RTP_TIME_BASE)
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


def make(destination: str | None, **_unused) -> RtspOutput:
    """``-o rtsp``: publish to the ``rtsp://`` or ``rtsps://`` address ``destination`` (required);
    the other :func:`~vision_host.outputs.make_output` options do not apply.

    Raises:
        OutputError: no address, one that is not rtsp:// or rtsps://, or PyAV is missing.
    """
    if not destination:
        raise OutputError("-o rtsp needs the server address to publish to: add -d rtsp://127.0.0.1:8554/vision")
    return RtspOutput(destination)
