"""Re-publishing the annotated video to a real RTSP server (RtspOutput, PyAV → gst-rtsp-server).

The server (:mod:`rtsp_server` in record mode, run by the system Python that has ``gi``)
takes the published H.264 and writes it to MPEG-TS files, which the tests read back with
ffprobe and OpenCV. Frames are real footage (media/bottle-detection.mp4, 640×360) with a
white rectangle drawn in, standing for an annotation. Tests kill and restart the server,
drop its clients, and point the output at ports where nothing (or nothing useful) listens.
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'vision-host[record]')")

from conftest import SAMPLE_CLIP, missing_system_package, needs_ffprobe  # noqa: E402
from test_rtsp import SERVER, SYSTEM_PYTHON, _free_port, _gst_rtsp_available  # noqa: E402
from vision_host.outputs import OutputError, RtspOutput, make_output  # noqa: E402

BOX = (slice(100, 200), slice(120, 320))  # rows, columns of the drawn annotation


pytestmark = pytest.mark.skipif(not _gst_rtsp_available(),
                                reason=missing_system_package("rtsp-server"))


class RecordServer:
    """``tests/rtsp_server.py --record`` in a child process: start, kill, restart, drop its publishers.

    ``recorded`` collects the files the server reports finished (``recorded FILE`` lines).
    """

    def __init__(self, pattern: Path, port: int | None = None) -> None:
        self.pattern = pattern
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self.recorded: list[str] = []
        self._reader: threading.Thread | None = None

    def url(self, mount: str = "/pub") -> str:
        return f"rtsp://127.0.0.1:{self.port}{mount}"

    def start(self, pattern: Path | None = None) -> RecordServer:
        self.pattern = pattern or self.pattern
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), "--record", f"/pub={self.pattern}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the RTSP server did not start: {line}{self.proc.stderr.read()}")
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("recorded "):
                self.recorded.append(line[len("recorded "):].strip())

    def wait_recorded(self, path: Path, timeout: float = 10) -> None:
        """Wait until the server finalized ``path`` (its publisher disconnected)."""
        deadline = time.monotonic() + timeout
        while str(path) not in self.recorded:
            assert time.monotonic() < deadline, f"the server did not finish {path}; finished: {self.recorded}"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)

    def drop_clients(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)


@pytest.fixture
def server(tmp_path):
    srv = RecordServer(tmp_path / "rec-{n}.ts").start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def clip() -> tuple[list[np.ndarray], float]:
    """The first 120 frames of the real clip (360×640×3 uint8 BGR), unannotated, and its fps."""
    cap = cv2.VideoCapture(str(SAMPLE_CLIP))
    assert cap.isOpened(), f"cannot read {SAMPLE_CLIP}"
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while len(frames) < 120:
        ok, frame = cap.read()
        assert ok, f"{SAMPLE_CLIP} has fewer than 120 frames"
        frames.append(frame)
    cap.release()
    return frames, fps


def annotated(frame: np.ndarray) -> np.ndarray:
    """A copy of ``frame`` with a filled white rectangle where BOX is (the drawn "annotation")."""
    out = frame.copy()
    cv2.rectangle(out, (BOX[1].start, BOX[0].start), (BOX[1].stop - 1, BOX[0].stop - 1), (255, 255, 255), -1)
    return out


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two same-shaped uint8 images, in grey levels."""
    return float(np.mean(cv2.absdiff(a, b)))


def publish(out: RtspOutput, frames: list[np.ndarray], fps: float, seconds: float,
            durations: list[float] | None = None) -> int:
    """Write annotated clip frames at ``fps`` for ``seconds`` (wall clock); returns how many were written."""
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        frame = annotated(frames[n % len(frames)])
        t0 = time.perf_counter()
        out.write(frame)
        if durations is not None:
            durations.append(time.perf_counter() - t0)
        n += 1
        time.sleep(max(0.0, start + n / fps - time.monotonic()))
    return n


def probe(path: Path) -> dict:
    """ffprobe's view of the first video stream: codec, size and decoded frame count."""
    proc = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                           "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["streams"][0]


def decode(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"cannot read back {path}"
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def check_recording(path: Path, clip_frames: list[np.ndarray], at_least: int) -> int:
    """The recording is H.264 640×360 with at least ``at_least`` frames, each showing the clip and the box."""
    info = probe(path)
    assert (info["codec_name"], info["width"], info["height"]) == ("h264", 640, 360), info
    count = int(info["nb_read_frames"])
    assert count >= at_least, f"{path.name}: {count} frames recorded, expected at least {at_least}"
    decoded = decode(path)
    assert len(decoded) == count
    for frame in decoded[::10]:
        assert frame.shape == (360, 640, 3)
        assert frame[BOX].min() > 200, "the annotation is missing from a recorded frame"
        assert frame[BOX].mean() > 245
        outside = frame.copy()
        outside[BOX] = 255
        # the rest of the picture is the clip (nearest source frame; H.264 at CRF 23 stays within a few levels)
        assert min(mad(outside, annotated(f)) for f in clip_frames) < 6.0, "recorded frame is not the clip"
    return count


@pytest.mark.slow
@needs_ffprobe
def test_published_frames_are_recorded_with_their_annotation(server, clip, tmp_path, capsys):
    frames, fps = clip
    out = make_output("rtsp", server.url())
    assert isinstance(out, RtspOutput) and not out.live_view
    out.open(640, 360, fps)
    assert out.connected
    assert out.describe() == f"RTSP {server.url()} (H.264, {fps:.2f} fps)"
    durations: list[float] = []
    written = publish(out, frames, fps, 3.0, durations)
    out.close()
    out.close()  # idempotent
    with pytest.raises(RuntimeError):
        out.write(frames[0])
    assert out.frames_written == written and written >= 80
    assert out.frames_sent + out.frames_dropped == written
    assert out.frames_sent >= 0.95 * written, (out.frames_sent, out.frames_dropped)
    assert out.reconnects == 0
    server.wait_recorded(tmp_path / "rec-0.ts")
    count = check_recording(tmp_path / "rec-0.ts", frames, at_least=int(0.8 * written))
    assert count <= written
    with capsys.disabled():
        print(f"\nRtspOutput: {written} frames written, {out.frames_sent} sent, {count} recorded;"
              f" write() median {statistics.median(durations) * 1e6:.0f} µs, max {max(durations) * 1e6:.0f} µs")


@pytest.mark.slow
def test_write_cost_microseconds(server, clip, capsys):
    """write() costs about one frame copy while the sender encodes and sends (numbers printed with -s)."""
    frames, fps = clip
    prepared = [annotated(f) for f in frames]
    out = RtspOutput(server.url())
    out.open(640, 360, fps)
    durations = []
    try:
        for i in range(400):
            t0 = time.perf_counter()
            out.write(prepared[i % len(prepared)])
            durations.append(time.perf_counter() - t0)
            time.sleep(1 / 60)
    finally:
        out.close()
    med, p99 = statistics.median(durations) * 1e6, sorted(durations)[int(0.99 * len(durations))] * 1e6
    with capsys.disabled():
        print(f"\nRtspOutput.write 640x360 over 400 frames at 60 fps: median {med:.0f} µs p99 {p99:.0f} µs,"
              f" max {max(durations) * 1e6:.0f} µs; sent {out.frames_sent}, dropped {out.frames_dropped}")
    assert med < 1000 and max(durations) < 0.02
    assert out.frames_sent >= 0.9 * 400


def test_unreachable_server_fails_open_with_advice():
    port = _free_port()
    out = RtspOutput(f"rtsp://user:secret@127.0.0.1:{port}/pub")
    t0 = time.monotonic()
    with pytest.raises(OutputError) as info:
        out.open(640, 360, 30)
    assert time.monotonic() - t0 < 3
    assert str(info.value) == (f"cannot publish to rtsp://user:***@127.0.0.1:{port}/pub: connection refused;"
                               " start the RTSP server (e.g. mediamtx) or check -d")
    out.close()  # closing an output that never opened is fine
    assert out.closed


@pytest.mark.slow
def test_a_server_that_never_answers_fails_open_within_the_timeout():
    """A port that accepts connections but never speaks RTSP: open() gives up after timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        out = RtspOutput(f"rtsp://127.0.0.1:{port}/pub", timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(OutputError, match=r"no answer from 127\.0\.0\.1:\d+ within 0\.5 s; start the RTSP"):
            out.open(640, 360, 30)
        assert time.monotonic() - t0 < 2


@pytest.mark.slow
@needs_ffprobe
def test_killed_server_never_blocks_write_and_the_output_reconnects_when_it_is_back(clip, tmp_path, caplog):
    frames, fps = clip
    server = RecordServer(tmp_path / "before.ts").start()
    out = RtspOutput(f"rtsp://user:secret@127.0.0.1:{server.port}/pub", backoff_s=0.25, backoff_max_s=1.0)
    try:
        out.open(640, 360, fps)
        publish(out, frames, fps, 1.5)
        sent_before = out.frames_sent
        assert sent_before > 30
        server.kill()
        durations: list[float] = []
        dropped_before = out.frames_dropped
        down = publish(out, frames, fps, 3.0, durations)          # the server is gone meanwhile
        assert max(durations) < 0.02, f"write() took {max(durations) * 1e3:.1f} ms while the server was down"
        assert not out.connected
        assert out.frames_dropped - dropped_before >= down - 5    # dropped, not queued
        assert out.reconnects == 0
        server.start(tmp_path / "after.ts")
        deadline = time.monotonic() + 10
        while out.reconnects == 0:                                # frames keep flowing, paced, while it retries
            assert time.monotonic() < deadline, "no reconnection within 10 s of the server's return"
            publish(out, frames, fps, 0.1, durations)
        assert out.connected
        written_before = out.frames_written
        publish(out, frames, fps, 2.0, durations)
        after = out.frames_written - written_before
        assert max(durations) < 0.02, f"write() took {max(durations) * 1e3:.1f} ms around the reconnection"
    finally:
        out.close()
    assert out.reconnects == 1
    assert out.frames_sent + out.frames_dropped == out.frames_written
    server.wait_recorded(tmp_path / "after.ts")
    server.kill()
    check_recording(tmp_path / "after.ts", frames, at_least=int(0.8 * after))
    assert probe(tmp_path / "before.ts")["nb_read_frames"]   # MPEG-TS cut off by the kill is still readable
    log_text = caplog.text
    assert f"lost the RTSP connection to rtsp://user:***@127.0.0.1:{server.port}/pub" in log_text
    assert "publishing to" in log_text and "again after" in log_text
    assert "secret" not in log_text


@pytest.mark.slow
@needs_ffprobe
def test_dropped_connection_reconnects_into_a_new_session(server, clip, tmp_path):
    """The server survives but drops its publisher (SIGUSR1): the output starts a new session, a new file."""
    frames, fps = clip
    out = RtspOutput(server.url(), backoff_s=0.25, backoff_max_s=1.0)
    try:
        out.open(640, 360, fps)
        publish(out, frames, fps, 1.0)
        server.drop_clients()
        deadline = time.monotonic() + 10
        while out.reconnects == 0:
            assert time.monotonic() < deadline, "no reconnection within 10 s of the drop"
            publish(out, frames, fps, 0.1)
        written_before = out.frames_written
        publish(out, frames, fps, 1.5)
        after = out.frames_written - written_before
    finally:
        out.close()
    server.wait_recorded(tmp_path / "rec-1.ts")
    check_recording(tmp_path / "rec-0.ts", frames, at_least=10)
    check_recording(tmp_path / "rec-1.ts", frames, at_least=int(0.8 * after))



@pytest.mark.slow
@needs_ffprobe
def test_run_republishes_the_annotated_video(server, tmp_path):
    """``vision-host run -o rtsp``: the ``hello`` processor's overlay reaches the RTSP server."""
    from vision_host.cli import main

    rc = main(["run", "-p", "hello", "-s", str(SAMPLE_CLIP), "--max-frames", "60", "-o", "rtsp",
               "-d", server.url(), "--stats", str(tmp_path / "stats.json")])
    assert rc == 0
    recording = tmp_path / "rec-0.ts"
    server.wait_recorded(recording)
    info = probe(recording)
    assert (info["codec_name"], info["width"], info["height"]) == ("h264", 640, 360)
    assert int(info["nb_read_frames"]) >= 50
    first_source = cv2.VideoCapture(str(SAMPLE_CLIP)).read()[1]
    assert mad(decode(recording)[0], first_source) > 1.0, "the published frame carries no overlay"
