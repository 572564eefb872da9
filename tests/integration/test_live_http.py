"""Live HTTP sources against real servers on 127.0.0.1: MJPEG and HLS.

MJPEG: our own :class:`MjpegOutput` serves frames of the real clip, each with its frame number
drawn as a 16-bit black/white bar code across the top 24 rows, so a test can tell exactly which
frame it got, compare it with that clip frame, and see how far behind the server it is.
HLS: ffmpeg (Debian package) encodes the real clip to a live (or VOD) HLS playlist, served by
``http.server.ThreadingHTTPServer``. Tests stop and restart the servers mid-run.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLE_CLIP, missing_system_package
from vision_host.outputs import MjpegOutput
from vision_host.sources import (
    FileSource,
    LiveOptions,
    LiveSource,
    SourceError,
    open_source,
)

BITS, BAND = 16, 24          # frame-number bar code: 16 blocks of 40 px across rows 0..23
SMALL = (64, 36)             # references are compared at 64×36 grey, below the band


def _small(frame: np.ndarray) -> np.ndarray:
    return cv2.resize(cv2.cvtColor(frame[BAND + 8:], cv2.COLOR_BGR2GRAY), SMALL, interpolation=cv2.INTER_AREA
                      ).astype(np.float32)


@pytest.fixture(scope="session")
def clip():
    """(frames 360×640×3 uint8 BGR of the first 150 clip frames, 64×36 grey references of every frame, fps)."""
    cap = cv2.VideoCapture(str(SAMPLE_CLIP))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames, refs = [], []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if len(frames) < 150:
            frames.append(frame)
        refs.append(_small(frame))
    cap.release()
    assert len(refs) > 1000, f"cannot read {SAMPLE_CLIP}"
    return frames, np.stack(refs), fps


def _mark(frame: np.ndarray, n: int) -> np.ndarray:
    out = frame.copy()
    w = out.shape[1] // BITS
    for b in range(BITS):
        out[:BAND, b * w:(b + 1) * w] = 255 if (n >> b) & 1 else 0
    return out


def _read_mark(frame: np.ndarray) -> int:
    w = frame.shape[1] // BITS
    return sum(1 << b for b in range(BITS) if frame[4:BAND - 4, b * w + 8:(b + 1) * w - 8].mean() > 128)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


class ClipServer:
    """:class:`MjpegOutput` on 127.0.0.1 fed with marked clip frames at the clip's fps by a thread."""

    def __init__(self, clip, port: int = 0):
        self.frames, _, self.fps = clip
        self.port = port
        self.written = -1            # number of the newest frame written
        self.paused = threading.Event()
        self.out: MjpegOutput | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream"

    def start(self) -> ClipServer:
        self.out = MjpegOutput(f"127.0.0.1:{self.port}")
        self.out.open(640, 360, self.fps)
        self.port = self.out.port
        self._stop.clear()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()
        return self

    def _feed(self) -> None:
        t0, n, tick = time.monotonic(), self.written + 1, 0
        while not self._stop.is_set():
            if not self.paused.is_set():
                self.out.write(_mark(self.frames[n % len(self.frames)], n))
                self.written = n
                n += 1
            tick += 1
            self._stop.wait(max(0.0, t0 + tick / self.fps - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.out is not None:
            self.out.close()


@pytest.fixture
def mjpeg(clip):
    server = ClipServer(clip).start()
    yield server
    server.stop()


def _wait(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def _check_content(frame: np.ndarray, refs: np.ndarray, index: int | None = None) -> float:
    """MAD (grey levels) between ``frame`` and clip frame ``index`` (the best match when None);
    asserts it is small and much smaller than to an unrelated frame (half a clip away)."""
    small = _small(frame)
    if index is None:
        index = int(np.argmin(np.abs(refs - small).mean(axis=(1, 2))))
    near, far = _mad(small, refs[index]), _mad(small, refs[(index + len(refs) // 2) % len(refs)])
    assert near < 4.0 and far > 3 * near, (index, near, far)
    return near


# ------------------------------------------------------------------------------------------ MJPEG

@pytest.mark.slow
def test_mjpeg_frames_are_the_clip_and_a_slow_reader_gets_only_the_newest(mjpeg, clip):
    _, refs, _ = clip
    source = open_source(mjpeg.url, live_options=LiveOptions(open_timeout_s=5, stall_timeout_s=3, retries=1))
    try:
        assert isinstance(source, LiveSource) and source.live and source.state == "live"
        assert (source.width, source.height) == (640, 360)
        seen = []
        for _ in range(30):
            frame = source.read(1.0)
            assert frame is not None and frame.shape == (360, 640, 3) and frame.dtype == np.uint8
            n = _read_mark(frame)
            seen.append(n)
            _check_content(frame, refs, n % len(mjpeg.frames))
        assert seen == sorted(seen) and len(set(seen)) >= 25, seen      # in order, hardly a repeat
        dropped0, lags = source.frames_dropped, []
        for _ in range(8):                     # a reader at ~3 frames/s
            time.sleep(0.3)
            frame = source.read(1.0)
            lags.append(mjpeg.written - _read_mark(frame))
        print(f"\nslow reader: lag behind the server {lags} frames, {source.frames_dropped - dropped0} dropped")
        assert source.frames_dropped - dropped0 >= 40                     # ~70 frames skipped …
        assert max(lags) <= 8, lags                                         # … and never more than ~0.25 s behind
    finally:
        source.close()


@pytest.mark.slow
def test_mjpeg_server_restarted_on_the_same_port_is_reconnected(mjpeg):
    source = LiveSource(mjpeg.url, LiveOptions(stall_timeout_s=2, backoff_s=0.2, backoff_max_s=0.5, retries=0))
    try:
        assert source.read(1.0) is not None
        port = mjpeg.port
        mjpeg.stop()
        down = time.monotonic()
        _wait(lambda: source.state == "reconnecting", 3, "state reconnecting")
        print(f"\nMJPEG: reconnecting {time.monotonic() - down:.2f} s after the server stopped")
        time.sleep(1.5)
        assert source.state == "reconnecting" and source.reconnects == 0 and source.read(0.1) is None
        assert not source.ended
        mjpeg.port = port
        mjpeg.start()
        back = _wait(lambda: source.state == "live" and source.reconnects == 1, 5, "reconnection")
        print(f"MJPEG: live again {back:.2f} s after the server restarted; gap {source.gaps[0][1] - source.gaps[0][0]:.2f} s")
        frame = source.read(1.0)
        assert frame is not None and _read_mark(frame) >= mjpeg.written - 8    # the restarted server's frames
        assert source.reconnects == 1 and len(source.gaps) == 1
    finally:
        source.close()


@pytest.mark.slow
def test_mjpeg_server_that_stops_sending_is_reported_stalled_within_the_stall_timeout(mjpeg):
    source = LiveSource(mjpeg.url, LiveOptions(stall_timeout_s=1.0, backoff_s=0.2, backoff_max_s=0.5, retries=0))
    try:
        assert source.read(1.0) is not None
        mjpeg.paused.set()                      # connection open, no frames
        t0 = time.monotonic()
        stalled = _wait(lambda: source.state == "reconnecting", 3, "state reconnecting")
        print(f"\nMJPEG stall: reconnecting {stalled:.2f} s after the last frame was written")
        assert stalled >= 0.9
        time.sleep(1.5)      # the server greets each reopen with its last frame: that is no reason to go live
        assert source.state == "reconnecting" and source.reconnects == 0
        mjpeg.paused.clear()
        back = _wait(lambda: source.state == "live" and source.reconnects == 1, 5, "reconnection")
        print(f"MJPEG stall: live again {back:.2f} s after frames resumed ({time.monotonic() - t0:.2f} s outage)")
        assert source.read(1.0) is not None and source.reconnects == 1
    finally:
        source.close()


@pytest.mark.slow
def test_an_http_url_that_never_answers_fails_after_its_retries_with_the_password_redacted():
    with socket.socket() as listener:           # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(SourceError) as info:
            open_source(f"http://user:secret@127.0.0.1:{port}/video.mjpg",
                        live_options=LiveOptions(open_timeout_s=1.0, retries=2, backoff_s=0.1, jitter=0))
        took = time.monotonic() - t0
    message = str(info.value)
    assert f"cannot open stream http://user:***@127.0.0.1:{port}/video.mjpg" in message, message
    assert "gave up after 2 attempts" in message and "--source-retries" in message
    assert "secret" not in message
    assert 1.8 <= took < 6, took               # two attempts, each waiting its 1 s open timeout


# ------------------------------------------------------------------------------------------ HLS

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason=missing_system_package("ffmpeg"))


class HlsServer:
    """A directory served over HTTP on 127.0.0.1, and an ffmpeg writing a live playlist into it."""

    def __init__(self, root: Path):
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.ffmpeg: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def start_live(self) -> None:
        playlist = self.root / "live.m3u8"
        playlist.unlink(missing_ok=True)
        self.ffmpeg = subprocess.Popen(
            [FFMPEG, "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(SAMPLE_CLIP), "-an",
             "-c:v", "libx264", "-preset", "ultrafast", "-g", "30", "-keyint_min", "30", "-sc_threshold", "0",
             "-f", "hls", "-hls_time", "1", "-hls_list_size", "6", "-hls_flags", "delete_segments+omit_endlist",
             str(playlist)], stderr=subprocess.PIPE)
        _wait(lambda: playlist.exists() and playlist.read_text().count("#EXTINF") >= 2, 10, "ffmpeg's first segments")

    def stop_live(self) -> None:
        if self.ffmpeg is not None and self.ffmpeg.poll() is None:
            self.ffmpeg.terminate()
            self.ffmpeg.wait(5)

    def close(self) -> None:
        self.stop_live()
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hls(tmp_path):
    server = HlsServer(tmp_path)
    yield server
    server.close()


@pytest.mark.slow
@needs_ffmpeg
def test_live_hls_is_paced_and_comes_back_when_the_encoder_restarts(hls, clip):
    _, refs, _ = clip
    hls.start_live()
    source = open_source(hls.url("live.m3u8"),
                         live_options=LiveOptions(stall_timeout_s=2.5, backoff_s=0.3, backoff_max_s=1, retries=0))
    try:
        assert isinstance(source, LiveSource) and source.state == "live"
        assert (source.width, source.height) == (640, 360)
        frames, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 2.0:      # a reader at ~30 frames/s gets ~30 frames/s, not 1 per segment
            frame = source.read(1.0)
            if frame is not None:
                frames += 1
                last = frame
            time.sleep(0.03)
        assert frames >= 40, frames
        mad = _check_content(last, refs)
        print(f"\nHLS: {frames} frames in 2 s, MAD to the clip {mad:.2f}")

        hls.stop_live()                         # the playlist stops growing; ~3 segments are still to play
        stopped = time.monotonic()
        last_frame = stopped
        while source.state == "live":
            if source.read(0.05) is not None:
                last_frame = time.monotonic()
            assert time.monotonic() - stopped < 12, "the stalled HLS stream was never reported"
        detected = time.monotonic()
        print(f"HLS: last frame {last_frame - stopped:.2f} s after ffmpeg stopped; reconnecting "
              f"{detected - last_frame:.2f} s after the last frame")
        assert detected - last_frame < 2.5 + 0.6
        # FFmpeg's HLS reader may still hand over a late frame before it gives the old connection up
        _wait(lambda: source.gaps, 15, "the reconnection to start")
        source.read(0.01)                       # drop that late frame if one came
        # the old playlist is still there, unchanged: it must not be replayed as if it were live
        _wait(lambda: source.last_error and "has not changed" in source.last_error, 10, "the stale-playlist message")
        time.sleep(1.5)
        assert (source.state, source.reconnects, source.ended) == ("reconnecting", 0, False), source.last_error
        assert source.read(0.1) is None

        restart = time.monotonic()
        hls.start_live()
        _wait(lambda: source.state == "live" and source.reconnects == 1, 15, "reconnection")
        back = time.monotonic() - restart
        frame = source.read(1.0)
        assert frame is not None and frame.shape == (360, 640, 3)
        _check_content(frame, refs)
        print(f"HLS: live again {back:.2f} s after ffmpeg restarted; gap {source.gaps[0][1] - source.gaps[0][0]:.2f} s")
        assert source.reconnects == 1 and len(source.gaps) == 1
    finally:
        source.close()


@pytest.mark.slow
@needs_ffmpeg
def test_vod_hls_is_read_like_a_file_every_frame_then_it_ends(hls, clip):
    _, refs, fps = clip
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-t", "3", "-i", str(SAMPLE_CLIP), "-an",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "30", "-f", "hls", "-hls_time", "1",
                    "-hls_playlist_type", "vod", str(hls.root / "vod.m3u8")], check=True)
    assert "#EXT-X-ENDLIST" in (hls.root / "vod.m3u8").read_text()
    source = open_source(hls.url("vod.m3u8"), pace=False, live_options=LiveOptions(retries=0))
    try:
        assert isinstance(source, FileSource) and not source.live
        assert (source.width, source.height) == (640, 360) and abs(source.fps - fps) < 0.5
        frames = []
        while (frame := source.read()) is not None:
            frames.append(_small(frame))
        assert source.ended and source.last_error is None
        assert len(frames) == source.frame_count and abs(len(frames) - 3 * fps) <= 2, (len(frames), source.frame_count)
        for i in (0, len(frames) // 2, len(frames) - 1):    # frame i is clip frame i
            near = _mad(frames[i], refs[i])
            assert near < 4.0 and _mad(frames[i], refs[i + 300]) > 3 * near, (i, near)
        assert source.read() is None                       # it stays ended: no reconnect, no replay
    finally:
        source.close()
