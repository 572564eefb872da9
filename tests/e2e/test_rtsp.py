"""Live RTSP sources against a real RTSP server (GStreamer's gst-rtsp-server, Debian packages).

The server (:mod:`rtsp_server`, run by the system Python that has ``gi``) streams the shared
real footage. Tests kill and restart it mid-run, drop its clients, and point vision-host at
ports where nothing listens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE_CLIP, has_gst_rtsp_server, missing_system_package

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = REPO / "tests" / "support" / "rtsp_server.py"


_gst_rtsp_available = has_gst_rtsp_server


pytestmark = pytest.mark.skipif(not _gst_rtsp_available(),
                                reason=missing_system_package("rtsp-server"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """``tests/rtsp_server.py`` in a child process: start, kill, restart, drop its clients."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None) -> None:
        self.mounts = mounts
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, mount: str = "/cam0") -> str:
        return f"rtsp://127.0.0.1:{self.port}{mount}"

    def start(self) -> "RtspServer":
        args = [SYSTEM_PYTHON, str(SERVER), "--port", str(self.port)]
        for mount, clip in self.mounts.items():
            args += ["--mount", f"{mount}={clip}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the RTSP server did not start: {line}{self.proc.stderr.read()}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def drop_clients(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)


@pytest.fixture
def rtsp_server():
    server = RtspServer({"/cam0": SAMPLE_CLIP}).start()
    yield server
    server.kill()


def _run(*args: str, timeout: float = 120) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "host"))
    return subprocess.Popen([sys.executable, "-m", "vision_host", "run", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_killed_and_restarted_server_is_reconnected_without_restarting_the_run(rtsp_server, tmp_path):
    stats_path, out = tmp_path / "stats.json", tmp_path / "out.mp4"
    track = tmp_path / "track.jsonl"
    run = _run("-s", rtsp_server.url(), "-p", "blur", "--max-frames", "240", "-o", "file", "-d", str(out),
               "--stats", str(stats_path), "--source-retries", "0", "--captions", str(track))
    time.sleep(4)                       # ~100 frames through
    rtsp_server.kill()
    down = time.monotonic()
    time.sleep(2)
    rtsp_server.start()
    restarted = time.monotonic()
    stdout, stderr = run.communicate(timeout=90)
    assert run.returncode == 0, stderr
    stats = json.loads(stats_path.read_text())
    assert stats["frames_out"] == 240 and stats["reconnects"] == 1, stats
    assert stats["source_state"] == "live"
    [gap] = stats["reconnect_gaps_s"]
    assert gap >= 1.5                               # the outage is in the record
    assert gap - (restarted - down) < 5.0, gap      # back within 5 s of the server's return
    assert stats["processors"]["blur"]["calls"] == 240 and stats["processors"]["blur"]["errors"] == 0
    assert "reconnecting" in stderr and "is back after" in stderr
    import cv2
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 240   # one file, every frame, nothing invented
    records = [json.loads(line) for line in track.read_text().splitlines()]
    assert [r["event"] for r in records] == ["gap", "resume", "end"]   # the caption track records the outage
    assert records[0]["reason"] == "reconnecting"
    assert records[1]["gap_s"] == 0                            # the file skips the outage …
    assert abs(records[1]["outage_s"] - gap) < 1.0, records    # … which the track records in wall time


@pytest.mark.slow
def test_a_stream_that_never_opens_fails_clearly_after_its_retries(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    run = _run("-s", f"rtsp://user:secret@127.0.0.1:{port}/cam", "-p", "hello", "-o", "file",
               "-d", str(tmp_path / "x.mp4"), "--source-retries", "3")
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1
    assert f"cannot open stream rtsp://user:***@127.0.0.1:{port}/cam" in stderr
    assert "gave up after 3 attempts" in stderr and "--source-retries" in stderr
    assert "secret" not in stderr and "Traceback" not in stderr
    assert time.monotonic() - t0 < 30


def _sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.slow
def test_thirty_reconnects_leak_no_threads_sockets_or_memory(rtsp_server):
    """Soak: drop the clients 30 times; the source comes back every time, and threads,
    sockets and RSS stay flat (reported)."""
    from vision_host.pipeline import rss_bytes
    from vision_host.sources import LiveOptions, LiveSource

    source = LiveSource(rtsp_server.url(), LiveOptions(backoff_s=0.1, backoff_max_s=0.5, retries=0))
    frames = 0
    stop = threading.Event()

    def consume():
        nonlocal frames
        while not stop.is_set():
            if source.read(0.2) is not None:
                frames += 1
    reader = threading.Thread(target=consume)
    reader.start()
    samples = {}
    try:
        for i in range(1, 31):
            before = source.reconnects
            deadline = time.monotonic() + 15
            rtsp_server.drop_clients()
            while source.reconnects == before:
                assert time.monotonic() < deadline, f"reconnect {i} did not happen within 15 s"
                time.sleep(0.05)
            got = frames
            while frames < got + 5:                     # frames flow again
                assert time.monotonic() < deadline
                time.sleep(0.02)
            if i in (5, 30):
                samples[i] = (threading.active_count(), len(os.listdir("/proc/self/task")), _sockets(), rss_bytes())
    finally:
        stop.set()
        reader.join(5)
        source.close()
    (py5, os5, sock5, rss5), (py30, os30, sock30, rss30) = samples[5], samples[30]
    print(f"\nafter 5 / 30 reconnects: python threads {py5}/{py30}, OS threads {os5}/{os30}, "
          f"sockets {sock5}/{sock30}, RSS {rss5 / 2**20:.1f}/{rss30 / 2**20:.1f} MiB")
    assert source.reconnects == 30
    assert py30 == py5 and os30 <= os5 and sock30 <= sock5
    assert rss30 - rss5 < 32 * 2**20
