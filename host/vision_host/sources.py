"""Frame sources: video files, cameras and network streams, read with OpenCV.

Every source yields H×W×3 uint8 BGR frames. A file is read frame by frame, paced at its own
frame rate by default so a recording behaves like a live camera (``pace=False`` reads as fast
as possible; no frame is ever skipped). A file damaged in the middle is read past the damage: the
frames FFmpeg cannot decode are skipped and counted in ``frames_undecodable``, and a file whose
end cannot be read (truncated, or damaged to its end) says so in ``source_error``. Live sources (cameras, ``rtsp://``, ``http(s)://``)
are read on their own thread that keeps only the newest frame, so a slow processor chain
never builds a backlog; the frames it had to skip are counted in ``frames_dropped``.

HTTP sources: a camera-style MJPEG stream (``multipart/x-mixed-replace``) opens as-is (FFmpeg
picks its ``mpjpeg`` demuxer from the Content-Type). An HLS URL (path ending in ``.m3u8``) is
live when its playlist has no ``#EXT-X-ENDLIST``: its frames are released at the pace of their
timestamps (FFmpeg hands over a whole segment at once), and after a stall it is only reopened
once the playlist changes again. A VOD playlist (with ``#EXT-X-ENDLIST``) is a recording: it is
read like a file (:class:`FileSource`: every frame, paced, then it ends).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("vision_host.sources")

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")


class SourceError(Exception):
    """A source could not be opened; the message says what to do instead."""


class Source:
    """Base class: ``read()`` returns the next frame or None at the end.

    Attributes:
        width, height: frame size in px.
        fps: nominal frame rate (frames/s; 30 when the source does not say).
        live: True for cameras and streams.
        frames_dropped: frames skipped to stay real-time (live sources only).
        frames_undecodable: frames of a file that could not be decoded and were skipped
            (:class:`FileSource` only; 0 elsewhere).
        source_error: a sentence when a file could not be read to its end, else None.
    """

    width = 0
    height = 0
    fps = 30.0
    live = False
    frames_dropped = 0
    frames_undecodable = 0
    source_error: str | None = None
    #: "live", "connecting", "reconnecting" or "ended" (live sources change it as they go).
    state = "live"
    #: True once :meth:`read` will never return a frame again.
    ended = False
    reconnects = 0

    def read(self) -> np.ndarray | None:
        """The next frame (H×W×3 uint8 BGR), or None: at the end (then :attr:`ended` is True),
        or, for a live source, no frame right now (reconnecting)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the capture device or file (idempotent)."""

    @property
    def name(self) -> str:
        """What the user gave with ``-s`` (a stream URL without its password)."""
        return "source"

    def describe(self) -> str:
        """The name, size and frame rate, for messages."""
        return self.name


def _fps_of(cap: cv2.VideoCapture) -> float:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and 1.0 <= fps <= 240.0 else 30.0


#: Frames of a file's end that may be missing without :attr:`FileSource.source_error` being set
#: (OpenCV estimates the frame count of some containers from their duration).
_TAIL_SLACK = 2


class FileSource(Source):
    """A video file, read in order; paced at ``fps`` when ``pace`` is set.

    A damaged stretch in the middle of a file does not end it: a failed read is followed by more
    reads (FFmpeg's decoder goes on with the next packet each time) until a frame comes again, at
    most as many as the frames still to come (``frame_count``) plus a small margin, so the end of
    the file and a damaged tail cost a few microseconds per read, never an endless loop. The
    frames lost are counted in :attr:`frames_undecodable` (during the run: the failed reads; at the
    end, when ``frame_count`` is known: the frames it lists that were never decoded), and a warning
    is logged once, when the first damage is met, with its frame index. Pacing keeps to the
    file's time line: a skipped stretch is a pause, as with a camera. When the end of the file
    cannot be read (it is truncated, or damaged to its end), the source ends with
    :attr:`source_error` (and :attr:`last_error`) saying up to which frame it could be read.

    ``path`` may also be an http(s) URL of a recording (:func:`open_source` gives a VOD HLS
    playlist here): it is read the same way and ends at its end; ``open_timeout_s`` /
    ``read_timeout_s`` bound the open and each read (s). A connection lost midway ends it too,
    with :attr:`last_error` and :attr:`source_error` saying so (a recording is not read past a
    failed read: each further one could wait ``read_timeout_s``).

    Attributes:
        frame_count: frames the file says it holds (0 when it does not say).

    Raises:
        SourceError: the file is missing or OpenCV cannot decode it (or the URL cannot be opened).
    """

    last_error: str | None = None

    def __init__(self, path: str, pace: bool = True, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0):
        self.path = path
        self._url = path.lower().startswith(STREAM_SCHEMES)
        if self._url:
            self._cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
                                                                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)])
        elif not Path(path).is_file():
            raise SourceError(f"video file {path} does not exist: check the path given to -s")
        else:
            self._cap = cv2.VideoCapture(path)
        ok, first = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok:
            self._cap.release()
            if self._url:
                raise SourceError(f"cannot open recording {redact_url(path)}: check the address and that the server is up")
            raise SourceError(f"cannot decode video file {path}: is it a video OpenCV's FFmpeg can read "
                              f"(mp4, mkv, avi, …)?")
        self.height, self.width = first.shape[:2]
        self.fps = _fps_of(self._cap)
        self.frame_count = max(0, int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))  # raw streams say < 0
        #: frames/s of the file's timestamps (0: unknown), and the largest frame position decoded so far
        self._pos_fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._max_pos = 0
        self._pending = first
        self._buffer = np.empty_like(first)
        self._pace = pace
        self._start: float | None = None
        self._index = 0

    def read(self) -> np.ndarray | None:
        """The next frame (H×W×3 uint8 BGR; the same buffer is reused, so copy it to keep it),
        past any damaged stretch, or None at the end of the file (then :attr:`ended` is True,
        and :attr:`source_error` is set when the end could not be read)."""
        if self._pending is not None:
            frame, self._pending = self._pending, None
        elif self.ended:
            return None
        else:
            frame = self._next_frame()
            if frame is None:
                return None
        if self._pace:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            due = self._start + (self._index + self.frames_undecodable) / self.fps
            if due > now:
                time.sleep(due - now)
        self._index += 1
        return frame

    def _next_frame(self) -> np.ndarray | None:
        """The next decodable frame, or None at the end (which :meth:`_end_of_file` examines)."""
        ok, frame = self._cap.read(self._buffer)
        if ok:
            self._note_position()
            return frame
        if self._url:
            self.ended = True
            if self.frame_count and self._index < self.frame_count - 1:
                self.source_error = self.last_error = (f"recording {redact_url(self.path)} ended after {self._index} of "
                                                       f"{self.frame_count} frames: the connection was lost")
                log.warning("%s", self.last_error)
            return None
        # The end of the file, or a packet FFmpeg could not decode: each further read tries the
        # next packet, and at the end each fails at once (microseconds). A damaged stretch takes at
        # least one read per packet, so the frames still to come bound the reads it can need.
        limit = (max(self.frame_count - self._index, 0) if self.frame_count else int(60 * self.fps)) + 64
        for failed in range(1, limit + 1):
            ok, frame = self._cap.read(self._buffer)
            if ok:
                if not self.frames_undecodable:
                    log.warning("video file %s is damaged at frame %d: skipping the frames that cannot be decoded "
                                "and reading on (the summary counts them)",
                                self.name, self._index)
                self.frames_undecodable += failed
                self._note_position()
                return frame
        self._end_of_file()
        return None

    def _note_position(self) -> None:
        """Track the largest frame position (from the frame's timestamp) decoded so far."""
        if self._pos_fps > 0:
            self._max_pos = max(self._max_pos, round(self._cap.get(cv2.CAP_PROP_POS_MSEC) * self._pos_fps / 1000))

    def _end_of_file(self) -> None:
        """No frame comes any more: end, and set :attr:`source_error` when the frames that never
        came are the file's tail (truncated, or damaged to its end) rather than its end."""
        self.ended = True
        total = self.frame_count
        if not total:
            return
        missing = total - self._index            # frames the file lists that were never decoded
        # the tail: past the last frame position decoded (or, without timestamps, past the frames
        # read and skipped)
        tail = total - 1 - self._max_pos if self._max_pos > 0 else missing - self.frames_undecodable
        if missing > _TAIL_SLACK and tail > _TAIL_SLACK:
            self.source_error = self.last_error = (
                f"video file {self.name} could not be read past frame {total - tail} of {total}: "
                f"the rest of the file is damaged or missing")
            log.warning("%s", self.source_error)
        if self.frames_undecodable or self.source_error:
            self.frames_undecodable = max(self.frames_undecodable, missing)

    def close(self) -> None:
        self._cap.release()

    @property
    def name(self) -> str:
        return redact_url(self.path)

    def describe(self) -> str:
        kind = "recording" if self._url else "file"
        return f"{kind} {self.name} ({self.width}×{self.height} @ {self.fps:g} fps)"


@dataclass
class LiveOptions:
    """How live sources are opened and kept alive.

    ``rtsp_transport``: ``"tcp"`` (default: survives lossy links and firewalls) or ``"udp"``;
    ``open_timeout_s`` / ``stall_timeout_s``: an open, or a stream sending no frame, giving up
    after this long (s); ``retries``: attempts to open, and to reopen after a drop, before the
    source fails (0 = forever); ``backoff_s`` … ``backoff_max_s``: the wait between attempts,
    doubling each time, with ±``jitter`` (a fraction) so many cameras do not retry in step;
    ``width``, ``height``, ``fps``, ``fourcc``: asked of a webcam (0 / "" = its default).
    """

    rtsp_transport: str = "tcp"
    open_timeout_s: float = 10.0
    stall_timeout_s: float = 5.0
    retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    jitter: float = 0.25
    width: int = 0
    height: int = 0
    fps: float = 0.0
    fourcc: str = ""

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based) of a reopen."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


#: OpenCV reads FFmpeg's capture options from this variable at each open (``key;value|…``).
_FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_OPEN_LOCK = threading.Lock()


class LiveSource(Source):
    """A camera or network stream read on a background thread keeping only the newest frame.

    A stream that drops, stalls past ``stall_timeout_s`` or ends is reopened with backoff and
    jitter (:class:`LiveOptions`); meanwhile :attr:`state` is ``"reconnecting"`` and
    :meth:`read` returns None while :attr:`ended` stays False. :attr:`state` turns
    ``"reconnecting"`` as soon as no frame has come for ``stall_timeout_s``, even while FFmpeg
    still waits on the old connection (its HLS reader retries the playlist a few times before
    giving up, which can take 2–3× the timeout). After ``retries`` failed attempts in a row
    (0 = never) the source ends with :attr:`last_error` saying why.

    HTTP MJPEG (``multipart/x-mixed-replace``, e.g. an IP camera's ``/video.mjpg``) needs no
    option. Live HLS (``….m3u8`` without ``#EXT-X-ENDLIST``): FFmpeg delivers a whole segment at
    once, so frames are released at the pace of their timestamps (else a slow reader would see
    one frame per segment); reading starts about three segments behind the live edge, and
    ``stall_timeout_s`` must exceed the segment duration (a warning says so). After a stall
    the playlist is reopened only once it has changed: a playlist that stopped growing (the
    encoder died) fails each attempt with a message saying so instead of replaying its last
    segments. A VOD playlist (with ``#EXT-X-ENDLIST``) is not live: :func:`open_source` reads
    it as a :class:`FileSource`; given to this class directly it is reopened when it ends.

    Args:
        spec: camera index ("0"), device path ("/dev/video0") or stream URL (rtsp://, http(s)://
            MJPEG or HLS, rtmp://, udp://, tcp://).
        options: see :class:`LiveOptions`.
    Raises:
        SourceError: the camera or stream cannot be opened within ``retries`` attempts.
    """

    live = True

    def __init__(self, spec: str, options: LiveOptions | None = None):
        self.spec = spec
        self.options = options or LiveOptions()
        self.state = "connecting"
        self.reconnects = 0
        self.last_error: str | None = None
        self.ended = False
        self._cap = None
        self._stop = threading.Event()
        self._hls = _is_hls(spec)
        #: HLS: the media playlist's text when the stream dropped (reopen once it differs).
        self._stalled_playlist: str | None = None
        self._anchor: tuple[float, float] | None = None   # HLS pacing: (wall s, stream s)
        self._last_frame_t = 0.0
        self._after_stall = False
        first = self._open_with_retries()
        if first is None:
            raise SourceError(self.last_error or f"cannot open {spec}")
        self.height, self.width = first.shape[:2]
        self.fps = _fps_of(self._cap)
        self.state = "live"
        if self._hls:
            self._check_segment_length()
        self._latest: np.ndarray | None = first
        self._cond = threading.Condition()
        #: (start, end) of each reconnection in time.monotonic() seconds; end None while ongoing.
        self.gaps: list[list] = []
        self._thread = threading.Thread(target=self._capture, name=f"vision-host-capture {spec}", daemon=True)
        self._thread.start()

    @property
    def state(self) -> str:
        """``"connecting"``, ``"live"``, ``"reconnecting"`` (also while stalled: no frame for
        ``stall_timeout_s``) or ``"ended"``."""
        if (self._state == "live" and self._last_frame_t
                and time.monotonic() - self._last_frame_t > self.options.stall_timeout_s):
            return "reconnecting"
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    def _check_segment_length(self) -> None:
        try:
            target = _hls_target_duration(_fetch_hls_playlist(self.spec, self.options.open_timeout_s))
        except (OSError, ValueError):
            return
        if target and target >= self.options.stall_timeout_s:
            log.warning("HLS stream %s has %g s segments, not shorter than the stall timeout (%g s): it may be "
                        "taken for stalled between segments; raise --source-timeout-s above %g",
                        redact_url(self.spec), target, self.options.stall_timeout_s, 2 * target)

    # -- opening ----------------------------------------------------------------------------------
    def _open_once(self):
        """One attempt: (capture, first frame) or (None, None) with :attr:`last_error` set."""
        spec, opt = self.spec, self.options
        if self._stalled_playlist is not None:
            try:
                playlist = _fetch_hls_playlist(spec, opt.open_timeout_s)
            except (OSError, ValueError) as exc:
                self.last_error = f"cannot read HLS playlist {redact_url(spec)} ({exc}): check the address and the server"
                return None, None
            if playlist == self._stalled_playlist:
                self.last_error = (f"HLS playlist {redact_url(spec)} has not changed since the stream stalled: "
                                   f"check that the encoder writing it is running")
                return None, None
        if spec.isdigit() or not spec.lower().startswith(STREAM_SCHEMES):
            cap = cv2.VideoCapture(int(spec) if spec.isdigit() else spec)
            if opt.fourcc:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*opt.fourcc[:4].ljust(4)))
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, opt.width), (cv2.CAP_PROP_FRAME_HEIGHT, opt.height),
                                (cv2.CAP_PROP_FPS, opt.fps)):
                if value:
                    cap.set(prop, value)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(opt.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(opt.stall_timeout_s * 1000)]
            with _OPEN_LOCK:
                saved = os.environ.get(_FFMPEG_OPTIONS_ENV)
                if spec.lower().startswith(("rtsp://", "rtsps://")):
                    os.environ[_FFMPEG_OPTIONS_ENV] = f"rtsp_transport;{opt.rtsp_transport}"
                try:
                    cap = cv2.VideoCapture(spec, cv2.CAP_FFMPEG, params)
                finally:
                    if saved is None:
                        os.environ.pop(_FFMPEG_OPTIONS_ENV, None)
                    else:
                        os.environ[_FFMPEG_OPTIONS_ENV] = saved
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if ok and self._after_stall:
            # many MJPEG servers greet a new client with their last frame: after a stall, only a
            # second frame shows that the stream moves again (else it would flap live/reconnecting)
            ok, first = cap.read()
            if not ok:
                cap.release()
                self.last_error = (f"stream {redact_url(spec)} answers but sends no new frame: check that the camera "
                                   f"or encoder behind it is running")
                return None, None
        if ok:
            return cap, first
        cap.release()
        if spec.isdigit():
            self.last_error = (f"no camera at index {spec}: connect a camera, or read a video file with -s FILE "
                               f"or a network camera with -s rtsp://HOST/PATH")
        elif spec.lower().startswith(STREAM_SCHEMES):
            self.last_error = (f"cannot open stream {redact_url(spec)}: check the address, the credentials and that "
                               f"the camera is on")
        else:
            self.last_error = f"cannot open camera device {spec}: check that it exists and is not in use"
        return None, None

    def _open_with_retries(self) -> np.ndarray | None:
        """Open (or reopen) until it works, ``retries`` attempts fail, or the source is closed."""
        attempt = 0
        while True:
            attempt += 1
            cap, first = self._open_once()
            if cap is not None:
                self._cap = cap
                self._stalled_playlist = None
                self._after_stall = False
                self._anchor = (time.monotonic(), cap.get(cv2.CAP_PROP_POS_MSEC) / 1000)
                self._last_frame_t = time.monotonic()
                return first
            retries = self.options.retries
            if retries and attempt >= retries:
                if retries > 1:
                    self.last_error += f" (gave up after {attempt} attempts; set the number with --source-retries)"
                return None
            wait = self.options.backoff(attempt)
            log.warning("%s; retrying in %.1f s (attempt %d%s)", self.last_error, wait, attempt + 1,
                        f" of {retries}" if retries else "")
            if self._stop.wait(wait):
                return None

    # -- the capture thread ---------------------------------------------------------------------
    def _capture(self) -> None:
        while not self._stop.is_set():
            ok, frame = self._cap.read()
            if ok:
                if self._hls and self._pace_hls():
                    return
                with self._cond:
                    self._last_frame_t = time.monotonic()
                    if self._latest is not None:
                        self.frames_dropped += 1
                    self._latest = frame
                    self._cond.notify_all()
                continue
            if self._stop.is_set():
                return
            # dropped, stalled past the read timeout, or ended: reopen
            self._cap.release()
            now = time.monotonic()
            self._after_stall = now - self._last_frame_t >= 0.9 * self.options.stall_timeout_s
            if self._hls:
                try:
                    self._stalled_playlist = _fetch_hls_playlist(self.spec, self.options.open_timeout_s)
                except (OSError, ValueError):
                    self._stalled_playlist = None
            with self._cond:
                self.state = "reconnecting"
                # a stall began when it was first reported (stall_timeout_s after the last frame)
                self.gaps.append([min(now, self._last_frame_t + self.options.stall_timeout_s), None])
                self._cond.notify_all()
            log.warning("stream %s dropped or stalled: reconnecting", redact_url(self.spec))
            first = self._open_with_retries()
            with self._cond:
                if first is None:
                    self.ended = True
                    self.state = "ended"
                    self._cond.notify_all()
                    if not self._stop.is_set():
                        log.error("%s", self.last_error)
                    return
                self.reconnects += 1
                self.state = "live"
                self.gaps[-1][1] = time.monotonic()
                self._latest = first
                self._cond.notify_all()
            log.warning("stream %s is back after %.1f s", redact_url(self.spec), self.gaps[-1][1] - self.gaps[-1][0])

    def _pace_hls(self) -> bool:
        """Hold the frame just read until its timestamp is due (HLS hands over whole segments).
        Re-anchors when the stream is over 1 s late or jumps ahead by over 5 s. True if closed."""
        pos = self._cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
        now = time.monotonic()
        if self._anchor is None:
            self._anchor = (now, pos)
        due = self._anchor[0] + pos - self._anchor[1]
        if due < now - 1.0 or due > now + 5.0:
            self._anchor, due = (now, pos), now
        return due > now and self._stop.wait(due - now)

    def read(self, timeout_s: float = 0.5) -> np.ndarray | None:
        """The newest frame (H×W×3 uint8 BGR), waiting up to ``timeout_s``; None when there is
        none yet (reconnecting, or slower than asked) or the source has :attr:`ended`."""
        with self._cond:
            if self._latest is None and not self.ended:
                self._cond.wait_for(lambda: self._latest is not None or self.ended or self._stop.is_set(),
                                    timeout=timeout_s)
            frame, self._latest = self._latest, None
            return frame

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=self.options.open_timeout_s + 5)
        if self._cap is not None:
            self._cap.release()

    @property
    def name(self) -> str:
        return redact_url(self.spec)

    def describe(self) -> str:
        return f"live {self.name} ({self.width}×{self.height} @ {self.fps:g} fps)"


def redact_url(url: str) -> str:
    """``url`` with its credentials hidden (``rtsp://user:secret@host`` → ``rtsp://user:***@host``).

    The userinfo is split off the way FFmpeg splits it (``av_url_split``): the authority ends at
    the first ``/``, ``?`` or ``#`` after ``scheme://``, and the userinfo runs to the *last* ``@``
    in it, so a password holding ``@`` is hidden whole. A password holding ``/``, ``?`` or ``#``
    (which FFmpeg itself would misread) is hidden up to the last ``@`` of the whole URL: more is
    hidden rather than any of it shown. A userinfo without ``:`` (a token) becomes ``***``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return url
    userinfo, host = rest[:at], rest[at + 1:]
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"


def _is_hls(spec: str) -> bool:
    """An http(s) URL whose path ends in ``.m3u8`` (an HLS playlist)."""
    parts = urllib.parse.urlsplit(spec)
    return parts.scheme.lower() in ("http", "https") and parts.path.lower().endswith(".m3u8")


def _fetch_hls_playlist(url: str, timeout_s: float) -> str:
    """The text of the HLS media playlist at ``url``; of a master playlist, its first variant.

    Credentials in the URL are sent as HTTP basic auth. Raises OSError (network, HTTP status)
    or ValueError (not a playlist)."""
    for _ in range(2):
        parts = urllib.parse.urlsplit(url)
        request = urllib.request.Request(urllib.parse.urlunsplit(
            parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))))
        if parts.username is not None:
            auth = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read(4 << 20).decode("utf-8", "replace").lstrip("\ufeff")
        if not text.startswith("#EXTM3U"):
            raise ValueError("not an HLS playlist")
        lines = [line.strip() for line in text.splitlines()]
        variant = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("#EXT-X-STREAM-INF")), None)
        if variant is None:
            return text
        url = urllib.parse.urljoin(url, variant)
    raise ValueError("a master playlist that points to another master playlist")


def _hls_target_duration(playlist: str) -> float:
    """``#EXT-X-TARGETDURATION`` of a media playlist in seconds (0 when absent)."""
    for line in playlist.splitlines():
        if line.startswith("#EXT-X-TARGETDURATION:"):
            try:
                return float(line.split(":", 1)[1])
            except ValueError:
                return 0.0
    return 0.0


def open_source(spec: str, pace: bool = True, live_options: LiveOptions | None = None) -> Source:
    """Open ``spec``: a camera index or device path, a video file, or a stream URL
    (``live_options`` apply to cameras and streams).

    An HLS URL (``….m3u8``) whose playlist ends with ``#EXT-X-ENDLIST`` (VOD) is a recording,
    not a live stream: it is read like a file (:class:`FileSource`: every frame, paced at its
    frame rate unless ``pace`` is False, and the source ends at its end instead of reconnecting).
    A live playlist, MJPEG over HTTP and every other stream URL give a :class:`LiveSource`.

    Raises:
        SourceError: with a sentence saying what to do.
    """
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    spec = str(spec).strip()
    if not spec:
        raise SourceError("the source given with -s is empty: give a camera index (0), a video file or a stream URL")
    if _is_hls(spec):
        opts = live_options or LiveOptions()
        try:
            vod = "#EXT-X-ENDLIST" in _fetch_hls_playlist(spec, opts.open_timeout_s)
        except (OSError, ValueError):
            vod = False     # unreachable for now: LiveSource retries and says why
        if vod:
            return FileSource(spec, pace=pace, open_timeout_s=opts.open_timeout_s, read_timeout_s=opts.stall_timeout_s)
    if spec.isdigit() or spec.startswith("/dev/video") or spec.lower().startswith(STREAM_SCHEMES):
        return LiveSource(spec, live_options)
    return FileSource(spec, pace=pace)
