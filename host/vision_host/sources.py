"""Frame sources: video files, cameras and network streams, read with OpenCV.

Every source yields H×W×3 uint8 BGR frames. A file is read frame by frame, paced at its own
frame rate by default so a recording behaves like a live camera (``pace=False`` reads as fast
as possible; no frame is ever skipped). Live sources (cameras, ``rtsp://``, ``http(s)://``)
are read on their own thread that keeps only the newest frame, so a slow processor chain
never builds a backlog; the frames it had to skip are counted in ``frames_dropped``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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
    """

    width = 0
    height = 0
    fps = 30.0
    live = False
    frames_dropped = 0

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the capture device or file (idempotent)."""

    def describe(self) -> str:
        return "source"


def _fps_of(cap: cv2.VideoCapture) -> float:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and 1.0 <= fps <= 240.0 else 30.0


class FileSource(Source):
    """A video file, read in order; paced at ``fps`` when ``pace`` is set.

    Raises:
        SourceError: the file is missing or OpenCV cannot decode it.
    """

    def __init__(self, path: str, pace: bool = True):
        self.path = path
        if not Path(path).is_file():
            raise SourceError(f"video file {path} does not exist: check the path given to -s")
        self._cap = cv2.VideoCapture(path)
        ok, first = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok:
            self._cap.release()
            raise SourceError(f"cannot decode video file {path}: is it a video OpenCV's FFmpeg can read "
                              f"(mp4, mkv, avi, …)?")
        self.height, self.width = first.shape[:2]
        self.fps = _fps_of(self._cap)
        self.frame_count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._pending = first
        self._buffer = np.empty_like(first)
        self._pace = pace
        self._start: float | None = None
        self._index = 0

    def read(self) -> np.ndarray | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
        else:
            ok, frame = self._cap.read(self._buffer)
            if not ok:
                return None
        if self._pace:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            due = self._start + self._index / self.fps
            if due > now:
                time.sleep(due - now)
        self._index += 1
        return frame

    def close(self) -> None:
        self._cap.release()

    def describe(self) -> str:
        return f"file {self.path} ({self.width}×{self.height} @ {self.fps:g} fps)"


class LiveSource(Source):
    """A camera or network stream read on a background thread keeping the newest frame.

    Args:
        spec: camera index ("0"), device path ("/dev/video0") or stream URL.
        read_timeout_s: ``read()`` returns None when no frame arrives for this long.
    Raises:
        SourceError: the camera or stream cannot be opened.
    """

    live = True

    def __init__(self, spec: str, read_timeout_s: float = 10.0, open_timeout_s: float = 10.0):
        self.spec = spec
        self.read_timeout_s = read_timeout_s
        if spec.isdigit():
            self._cap = cv2.VideoCapture(int(spec))
            what = f"no camera at index {spec}"
        elif spec.lower().startswith(STREAM_SCHEMES):
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout_s * 1000)]
            self._cap = cv2.VideoCapture(spec, cv2.CAP_FFMPEG, params)
            what = f"cannot open stream {spec}"
        else:
            self._cap = cv2.VideoCapture(spec)
            what = f"cannot open camera device {spec}"
        ok, first = self._cap.read() if self._cap.isOpened() else (False, None)
        if not ok:
            self._cap.release()
            if spec.isdigit():
                raise SourceError(f"{what}: connect a camera, or read a video file with -s FILE "
                                  f"or a network camera with -s rtsp://HOST/PATH")
            raise SourceError(f"{what}: check the address, the credentials and that the camera is on")
        self.height, self.width = first.shape[:2]
        self.fps = _fps_of(self._cap)
        self._latest: np.ndarray | None = first
        self._seq = 1
        self._taken = 0
        self._ended = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._capture, name="vision-host-capture", daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        while not self._stop.is_set():
            ok, frame = self._cap.read()
            with self._cond:
                if not ok:
                    self._ended = True
                    self._cond.notify_all()
                    return
                if self._latest is not None:
                    self.frames_dropped += 1
                self._latest = frame
                self._seq += 1
                self._cond.notify_all()

    def read(self) -> np.ndarray | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest is not None or self._ended or self._stop.is_set(),
                                       timeout=self.read_timeout_s):
                log.warning("no frame from %s for %g s", self.spec, self.read_timeout_s)
                return None
            frame, self._latest = self._latest, None
            return frame

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._cap.release()

    def describe(self) -> str:
        return f"live {self.spec} ({self.width}×{self.height} @ {self.fps:g} fps)"


def open_source(spec: str, pace: bool = True) -> Source:
    """Open ``spec``: a camera index or device path, a video file, or a stream URL.

    Raises:
        SourceError: with a sentence saying what to do.
    """
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:
        pass
    spec = str(spec).strip()
    if spec.isdigit() or spec.startswith("/dev/video") or spec.lower().startswith(STREAM_SCHEMES):
        return LiveSource(spec)
    return FileSource(spec, pace=pace)
