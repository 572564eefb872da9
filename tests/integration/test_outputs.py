"""Tests for vision_host.outputs with real frames, real HTTP clients and real files."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from vision_host.outputs import (
    OUTPUT_KINDS,
    DisplayOutput,
    FileOutput,
    MjpegOutput,
    MjpegStreamOutput,
    Output,
    OutputError,
    RecordingOutput,
    RtspOutput,
    make_output,
    parse_listen_address,
)
from vision_host.outputs.recording import encoder_thread_pays

from conftest import SAMPLE_CLIP as BOTTLE  # 640x360, 29.83 fps


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """The first 30 frames of bottle-detection.mp4 (360×640×3 uint8 BGR)."""
    cap = cv2.VideoCapture(str(BOTTLE))
    out = []
    while len(out) < 30:
        ok, frame = cap.read()
        assert ok, "could not read 30 frames from bottle-detection.mp4"
        out.append(frame)
    cap.release()
    assert out[0].shape == (360, 640, 3)
    return out


@pytest.fixture
def mjpeg():
    out = MjpegOutput(":0")
    out.open(640, 360, 29.83)
    yield out
    out.close()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two images, in grey levels."""
    return float(np.mean(cv2.absdiff(a, b)))


class MultipartReader:
    """Reads parts of a multipart/x-mixed-replace body from a file-like object."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.buf = b""

    def _fill(self) -> bool:
        chunk = self.raw.read(65536) if not hasattr(self.raw, "read1") else self.raw.read1(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def next_part(self) -> tuple[dict[str, str], bytes]:
        line = self._line()
        while line == b"":
            line = self._line()
        assert line == b"--frame", f"expected boundary line, got {line[:60]!r}"
        headers = {}
        while (line := self._line()) != b"":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self._exact(int(headers["content-length"]))
        assert self._exact(2) == b"\r\n"
        return headers, body


_VIEWERS: list[threading.Thread] = []


@pytest.fixture(autouse=True)
def join_viewers():
    """Join every viewer thread a test started, after its output has closed.

    A daemon thread still inside cv2.imdecode() when the interpreter exits
    aborts the process, so none may outlive its test.
    """
    yield
    while _VIEWERS:
        t = _VIEWERS.pop()
        t.join(10)
        assert not t.is_alive(), "a viewer thread did not end after its output closed"


class StreamClient(threading.Thread):
    """A viewer using requests (stream=True) that decodes every JPEG it receives."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        _VIEWERS.append(self)
        self.url = url
        self.images: list[np.ndarray] = []
        self.headers = requests.structures.CaseInsensitiveDict()
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            with requests.get(self.url, stream=True, timeout=10) as resp:
                self.status = resp.status_code
                self.headers = resp.headers  # case-insensitive: header names are (RFC 9110 §5.1)
                self.connected.set()
                reader = MultipartReader(resp.raw)
                while True:
                    headers, body = reader.next_part()
                    assert headers["content-type"] == "image/jpeg"
                    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
                    assert img is not None, "part is not a decodable JPEG"
                    self.images.append(img)
        except EOFError:
            pass  # server ended the stream
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e
        finally:
            self.connected.set()
            self.ended.set()


def wait_until(pred, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def stalled_client(port: int, path: str = "/stream") -> socket.socket:
    """Connect with a tiny receive buffer, send a GET and never read."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return s


# --------------------------------------------------------------------------- address parsing


@pytest.mark.parametrize(
    "destination, expected",
    [
        (None, ("127.0.0.1", 8080)),
        ("", ("127.0.0.1", 8080)),
        (":8080", ("127.0.0.1", 8080)),
        ("8081", ("127.0.0.1", 8081)),
        ("0.0.0.0:9000", ("0.0.0.0", 9000)),
        ("localhost:9000", ("localhost", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        (":0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen_address(destination, expected):
    assert parse_listen_address(destination) == expected


@pytest.mark.parametrize("destination", [":http", "host:", ":70000", "[::1]9000", "a:b:c"])
def test_parse_listen_address_rejects_with_advice(destination):
    with pytest.raises(OutputError, match=r"-d :8080"):
        parse_listen_address(destination)


def test_default_is_loopback_port_8080_and_bare_port_binds_loopback(mjpeg):
    default = MjpegOutput()
    assert (default.host, default.port) == ("127.0.0.1", 8080)
    assert default.describe() == "MJPEG at http://127.0.0.1:8080/"
    # the opened fixture was given ":0": it listens on loopback only, on a real ephemeral port
    assert mjpeg.port != 0
    assert mjpeg._server.socket.getsockname() == ("127.0.0.1", mjpeg.port)
    assert mjpeg.url == f"http://127.0.0.1:{mjpeg.port}/"
    assert mjpeg.describe() == f"MJPEG at http://127.0.0.1:{mjpeg.port}/"


def test_port_in_use_names_port_and_suggests_next():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        out = MjpegOutput(f":{port}")
        with pytest.raises(OutputError) as info:
            out.open(640, 360, 30)
        assert str(info.value) == f"port {port} on 127.0.0.1 is in use: pick another with -d :{port + 1}"
        out.close()  # closing an output that never opened is fine
    finally:
        blocker.close()


def test_quality_out_of_range():
    with pytest.raises(OutputError, match="1 to 100"):
        MjpegOutput(":0", quality=0)


# --------------------------------------------------------------------------- HTTP endpoints


def test_index_page_is_self_contained_and_unknown_paths_404(mjpeg):
    r = requests.get(mjpeg.url, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<title>vision-host</title>" in r.text
    assert '<img src="/stream/0"' in r.text
    for external in ("http://", "https://", 'src="//', "href=\"//", "@import"):
        assert external not in r.text
    assert requests.get(mjpeg.url + "nope", timeout=5).status_code == 404
    assert requests.get(mjpeg.url + "stream/x", timeout=5).status_code == 404


@pytest.mark.slow
def test_snapshot_503_before_first_frame_then_newest_frame(mjpeg, frames):
    r = requests.get(mjpeg.url + "snapshot.jpg", timeout=5)
    assert r.status_code == 503
    for f in frames[:10]:
        mjpeg.write(f)
    mirrored = cv2.flip(frames[10], 1)
    mjpeg.write(mirrored)
    time.sleep(0.3)
    assert mjpeg.frames_encoded == 0, "nothing should be encoded while nobody watches"
    r = requests.get(mjpeg.url + "snapshot.jpg", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (360, 640, 3)
    assert mad(img, mirrored) < 3.0
    assert mad(img, frames[10]) > mad(img, mirrored) + 5.0, "snapshot is not the newest frame"
    assert mjpeg.frames_encoded == 1
    # a second snapshot with no new frame reuses the JPEG
    r2 = requests.get(mjpeg.url + "snapshot.jpg", timeout=5)
    assert r2.content == r.content and mjpeg.frames_encoded == 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ["stream", "stream.mjpg"])
def test_stream_delivers_decodable_jpegs_of_written_frames(mjpeg, frames, path):
    client = StreamClient(mjpeg.url + path)
    client.start()
    assert client.connected.wait(5)
    assert wait_until(lambda: mjpeg.clients == 1)
    for f in frames:
        mjpeg.write(f)
        time.sleep(0.01)
    assert wait_until(lambda: len(client.images) >= 5)
    assert client.error is None, client.error
    assert client.status == 200
    assert client.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=frame"
    for img in client.images:
        assert img.shape == (360, 640, 3)
        assert min(mad(img, f) for f in frames) < 4.0, "streamed image is not one of the written frames"
    # the newest frame arrives last
    assert wait_until(lambda: mad(client.images[-1], frames[-1]) < 4.0)
    mjpeg.close()
    assert client.ended.wait(5), "closing the output must end the stream"
    assert client.error is None, client.error


@pytest.mark.slow
def test_stalled_viewer_does_not_slow_write_or_other_viewers(mjpeg, frames):
    stalled = stalled_client(mjpeg.port)
    normal = StreamClient(mjpeg.url + "stream")
    normal.start()
    try:
        assert wait_until(lambda: mjpeg.clients == 2)
        durations = []
        t_start = time.perf_counter()
        for i in range(300):
            t0 = time.perf_counter()
            mjpeg.write(frames[i % len(frames)])
            durations.append(time.perf_counter() - t0)
            time.sleep(0.002)  # a fast camera: the stalled client's socket buffers fill up long before the end
        elapsed = time.perf_counter() - t_start
        got_normal = len(normal.images)
        assert normal.error is None, normal.error
        assert sum(durations) < 0.3, f"300 writes took {sum(durations) * 1e3:.1f} ms of pipeline time"
        assert max(durations) < 0.05, f"slowest write {max(durations) * 1e3:.1f} ms"
        assert got_normal >= 20, f"normal viewer got only {got_normal} frames in {elapsed:.2f} s"
        assert mjpeg.clients == 2
        # What did the stalled viewer's socket receive? Only as much as fits in the buffers.
        stalled.setblocking(False)
        received = b""
        try:
            while chunk := stalled.recv(1 << 20):
                received += chunk
        except BlockingIOError:
            pass
        stalled_parts = received.count(b"--frame\r\n")
        # bounded by the socket buffers (server send buffer capped at 128 KiB, doubled by Linux)
        assert len(received) < 400_000, f"{len(received)} bytes queued for a viewer that never reads"
        assert stalled_parts < got_normal / 2, (stalled_parts, got_normal)
        assert stalled_parts < mjpeg.frames_encoded / 2
    finally:
        stalled.close()
        mjpeg.close()
    assert normal.ended.wait(5)


@pytest.mark.slow
def test_disconnected_viewers_are_removed(mjpeg, frames):
    # one that reads a frame and hangs up
    with requests.get(mjpeg.url + "stream", stream=True, timeout=5) as r:
        assert wait_until(lambda: mjpeg.clients == 1)
        mjpeg.write(frames[0])
        MultipartReader(r.raw).next_part()
    # one that hangs up before any frame (noticed while idle, without a write)
    s = stalled_client(mjpeg.port)
    assert wait_until(lambda: mjpeg.clients >= 1)
    s.close()
    for f in frames[:5]:
        mjpeg.write(f)
        time.sleep(0.02)
    assert wait_until(lambda: mjpeg.clients == 0, timeout=3), f"{mjpeg.clients} dead clients left"
    encoded = mjpeg.frames_encoded
    for f in frames[5:]:
        mjpeg.write(f)
    time.sleep(0.2)
    assert mjpeg.frames_encoded == encoded, "encoding must stop when nobody watches"


@pytest.mark.slow
def test_close_ends_connections_and_joins_every_thread(frames):
    before = set(threading.enumerate())
    out = MjpegOutput(":0")
    out.open(640, 360, 30)
    viewer = StreamClient(out.url + "stream")
    viewer.start()
    stalled = stalled_client(out.port)
    session = requests.Session()  # an idle keep-alive connection after a page load
    assert session.get(out.url, timeout=5).status_code == 200
    assert wait_until(lambda: out.clients == 2)
    for i in range(120):
        out.write(frames[i % len(frames)])
        time.sleep(0.002)
    ours = {viewer}
    # the server's thread (its event loop serves every client) and the encoder: no thread per client
    assert sorted(t.name for t in set(threading.enumerate()) - before - ours) == [
        "vision-host-mjpeg-encoder-0", "vision-host-mjpeg-server"]
    t0 = time.perf_counter()
    out.close()
    took = time.perf_counter() - t0
    assert took < 2.0, f"close() took {took:.2f} s"
    assert viewer.ended.wait(5)
    left = set(threading.enumerate()) - before - ours
    assert not left, f"threads left behind: {[t.name for t in left]}"
    assert out.closed
    out.close()  # idempotent
    with pytest.raises(RuntimeError):
        out.write(frames[0])
    stalled.close()
    session.close()


@pytest.mark.slow
def test_exit_without_close_does_not_abort(tmp_path):
    """A program that forgets close() while a viewer watches must still exit cleanly.

    Without the module's atexit hook the encoder thread is often inside
    cv2.imencode() at interpreter exit and the process aborts (exit code -6).
    """
    script = tmp_path / "forget_close.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import socket, threading, time
            import cv2
            from vision_host.outputs import MjpegOutput
            cap = cv2.VideoCapture({str(BOTTLE)!r})
            frame = cv2.resize(cap.read()[1], (3840, 2160))  # slow encodes: likely mid-imencode at exit
            out = MjpegOutput(":0")
            out.open(3840, 2160, 30)
            s = socket.create_connection(("127.0.0.1", out.port))
            s.sendall(b"GET /stream HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
            def drain():
                while s.recv(1 << 20):
                    pass
            threading.Thread(target=drain, daemon=True).start()
            for _ in range(40):
                out.write(frame)
                time.sleep(0.003)
            assert out.frames_encoded > 0
            """
        )
    )
    import vision_host

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(vision_host.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]


def test_write_rejects_non_bgr_frames(mjpeg):
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        mjpeg.write(np.zeros((360, 640), np.uint8))
    with pytest.raises(ValueError):
        mjpeg.write(np.zeros((360, 640, 3), np.float32))
    with pytest.raises(RuntimeError):
        MjpegOutput(":0").write(np.zeros((2, 2, 3), np.uint8))


class _CountingCondition(threading.Condition):
    """A condition that counts the returns from wait() (the encoder thread's wake-ups)."""

    def __init__(self):
        super().__init__()
        self.wakeups = 0

    def wait(self, timeout=None):
        woke = super().wait(timeout)
        self.wakeups += 1
        return woke


def test_frames_with_nobody_watching_do_not_wake_the_encoder(frames):
    """With no viewer and no snapshot waiting, write() leaves the encoder asleep (a wake-up a
    frame would be two thread switches for nothing); a viewer that connects to the idle
    stream gets its last frame."""
    out = MjpegOutput(":0")
    cond = out._channels[0].cond = _CountingCondition()
    try:
        out.open(640, 360, 29.83)
        assert wait_until(lambda: out._channels[0].encoder_thread.is_alive())
        for f in frames:
            out.write(f)
        assert cond.wakeups == 0 and out.frames_encoded == 0
        viewer = StreamClient(out.url + "stream")
        viewer.start()
        assert wait_until(lambda: len(viewer.images) >= 1), "a viewer that connects must get the last frame"
        assert mad(viewer.images[0], frames[-1]) < 4.0
        assert cond.wakeups >= 1
    finally:
        out.close()


def _numbered(k: int) -> np.ndarray:
    """Frame number ``k`` (0–254): every pixel is k."""
    return np.full((360, 640, 3), k, np.uint8)


def test_frames_nobody_wants_are_not_copied_and_an_ask_gets_a_fresh_one():
    """While nobody watches or asks, write() copies nothing (a source reuses its buffer, so the
    channel notes the frame only). An ask (latest_frame) then waits for the frame loop's next
    frame, which is copied, and frames are kept for a while after it."""
    out = MjpegOutput(":0")
    stop = threading.Event()

    def camera():
        buffer = np.empty((360, 640, 3), np.uint8)      # one buffer, as a source reuses it
        for k in range(255):
            if stop.is_set():
                return
            buffer[:] = k
            out.write(buffer)
            time.sleep(0.004)                           # a camera's pace

    try:
        out.open(640, 360, 29.83)
        writer = threading.Thread(target=camera)
        writer.start()
        assert wait_until(lambda: out.frames_written >= 20)
        assert out.frames_kept == 0
        asked_at = out.frames_written
        frame = out.latest_frame(0)
        assert frame is not None and frame.shape == (360, 640, 3)
        assert len(np.unique(frame)) == 1, "a torn frame: the copy raced the next write"
        assert int(frame[0, 0, 0]) >= asked_at, "the ask must get a frame written after it"
        kept = out.frames_kept
        assert wait_until(lambda: out.frames_kept >= kept + 5), "frames are kept for a while after an ask"
    finally:
        stop.set()
        writer.join()
        out.close()


def test_an_idle_stream_and_a_closed_one_give_their_last_frame():
    """When no frame comes (the stream is idle), an ask gets the last frame written as it is;
    a stream that stopped keeps its last frame."""
    out = MjpegOutput(":0", stream_names=["a", "b"])
    a, b = out.stream(0), out.stream(1)
    try:
        a.open(640, 360, 30)
        b.open(640, 360, 30)
        for k in range(5):
            a.write(_numbered(k))
            b.write(_numbered(100 + k))
        assert out.latest_frame(0)[0, 0, 0] == 4
        b.close()
        assert b.frames_kept == 1, "a stream that stops keeps its last frame"
        assert out.latest_frame(1)[0, 0, 0] == 104
    finally:
        out.close()


@pytest.mark.slow
def test_write_cost_microseconds(mjpeg, frames, capsys):
    """write() costs a lock round trip with no viewer and about one frame copy with one
    (numbers printed with -s)."""

    def measure(n=300):
        ts = []
        for i in range(n):
            t0 = time.perf_counter()
            mjpeg.write(frames[i % len(frames)])
            ts.append(time.perf_counter() - t0)
            time.sleep(0.001)
        return statistics.median(ts) * 1e6, sorted(ts)[int(0.99 * n)] * 1e6

    med0, p99_0 = measure()
    viewer = StreamClient(mjpeg.url + "stream")
    viewer.start()
    assert wait_until(lambda: mjpeg.clients == 1)
    med1, p99_1 = measure()
    assert len(viewer.images) > 0
    with capsys.disabled():
        print(
            f"\nMjpegOutput.write 640x360: 0 clients median {med0:.0f} µs p99 {p99_0:.0f} µs;"
            f" 1 client median {med1:.0f} µs p99 {p99_1:.0f} µs; encoded {mjpeg.frames_encoded}"
        )
    assert med0 < 1000 and med1 < 1000


# --------------------------------------------------------------------------- several streams


@pytest.fixture
def multi():
    """An MJPEG output with three streams, all opened at 640×360, on a free port."""
    out = MjpegOutput(":0", stream_names=["bottles", "negative <b>", "red"])
    streams = [out.stream(i) for i in range(3)]
    for s in streams:
        s.open(640, 360, 29.83)
    yield out, streams
    out.close()


RED = np.zeros((360, 640, 3), np.uint8)
RED[:, :, 2] = 255  # BGR: solid red


def stream_frames(frames: list[np.ndarray]) -> list[list[np.ndarray]]:
    """What each of three streams shows: the clip, the clip in negative, solid red."""
    return [frames, [cv2.bitwise_not(f) for f in frames], [RED] * len(frames)]


@pytest.mark.slow
def test_each_stream_shows_its_own_frames(multi, frames):
    out, streams = multi
    shown = stream_frames(frames)
    assert [s.describe() for s in streams] == [f"MJPEG at http://127.0.0.1:{out.port}/stream/{i}" for i in range(3)]
    assert out.stream(1) is streams[1]
    paths = ["stream", "stream/1.mjpg", "stream/2"]
    clients = [StreamClient(out.url + p) for p in paths]
    for c in clients:
        c.start()
        assert c.connected.wait(5)
    assert wait_until(lambda: all(s.clients == 1 for s in streams))
    for i in range(len(frames)):
        for s, own in zip(streams, shown):
            s.write(own[i])
        time.sleep(0.01)
    assert wait_until(lambda: all(len(c.images) >= 5 for c in clients))
    assert wait_until(lambda: all(mad(c.images[-1], own[-1]) < 4.0 for c, own in zip(clients, shown)))
    for index, (c, own) in enumerate(zip(clients, shown)):
        assert c.error is None, c.error
        for img in c.images:
            mine = min(mad(img, f) for f in own)
            others = min(mad(img, f) for k, other in enumerate(shown) if k != index for f in other)
            assert mine < 4.0 and others > mine + 10.0, f"stream {index} showed another stream's frame"
    for path, own in zip(["snapshot.jpg", "snapshot/1.jpg", "snapshot/2.jpg"], shown):
        r = requests.get(out.url + path, timeout=5)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        assert mad(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR), own[-1]) < 4.0
    assert [s.frames_written for s in streams] == [len(frames)] * 3
    assert out.frames_written == len(frames)  # MjpegOutput's own counters are stream 0's
    out.close()
    for c in clients:
        assert c.ended.wait(5), "closing the output must end every stream"


def test_index_page_shows_every_stream_with_its_name(multi):
    out, _ = multi
    r = requests.get(out.url, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert "<title>vision-host</title>" in page
    for i in range(3):
        assert f'<img src="/stream/{i}"' in page and f'href="/snapshot/{i}.jpg"' in page
    assert "<figcaption>bottles" in page and "negative &lt;b&gt;" in page and "<b>" not in page
    for external in ("http://", "https://", 'src="//', 'href="//', "@import"):
        assert external not in page


def test_unknown_stream_number_is_404_with_a_sentence(multi, mjpeg):
    out, _ = multi
    for path in ("stream/3", "stream/3.mjpg", "snapshot/3.jpg", "stream/99"):
        r = requests.get(out.url + path, timeout=5)
        assert r.status_code == 404, path
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "this server has streams 0 to 2" in r.text
    r = requests.get(mjpeg.url + "stream/1", timeout=5)  # a one-stream output
    assert r.status_code == 404 and r.text == "there is no stream 1: this server has only stream 0 (/stream)\n"
    with pytest.raises(IndexError, match="streams 0 to 2"):
        out.stream(3)
    with pytest.raises(ValueError):
        MjpegOutput(":0", stream_names=[])


@pytest.mark.slow
def test_stalled_viewer_of_one_stream_does_not_slow_another(multi, frames):
    out, streams = multi
    stalled = stalled_client(out.port, "/stream/0")
    normal = StreamClient(out.url + "stream/1")
    normal.start()
    mirrored = [cv2.flip(f, 1) for f in frames]
    try:
        assert wait_until(lambda: streams[0].clients == 1 and streams[1].clients == 1)
        durations = []
        for i in range(300):
            t0 = time.perf_counter()
            streams[0].write(frames[i % len(frames)])
            streams[1].write(mirrored[i % len(frames)])
            durations.append(time.perf_counter() - t0)
            time.sleep(0.002)
        assert normal.error is None, normal.error
        assert max(durations) < 0.05, f"slowest pair of writes {max(durations) * 1e3:.1f} ms"
        assert len(normal.images) >= 20, f"the other stream's viewer got only {len(normal.images)} frames"
        assert all(min(mad(img, f) for f in mirrored) < 4.0 for img in normal.images)
        stalled.setblocking(False)
        received = b""
        try:
            while chunk := stalled.recv(1 << 20):
                received += chunk
        except BlockingIOError:
            pass
        assert received.count(b"--frame\r\n") < len(normal.images) / 2
    finally:
        stalled.close()
        out.close()
    assert normal.ended.wait(5)


def test_closing_one_stream_keeps_the_others_and_close_joins_every_thread(frames):
    before = set(threading.enumerate())
    out = MjpegOutput(":0", stream_names=["a", "b"])
    a, b = out.stream(0), out.stream(1)
    a.open(640, 360, 30)
    b.open(640, 360, 30)
    viewers = [StreamClient(out.url + "stream/0"), StreamClient(out.url + "stream/1")]
    for v in viewers:
        v.start()
    assert wait_until(lambda: a.clients == 1 and b.clients == 1)
    for f in frames[:10]:
        a.write(f)
        b.write(f)
        time.sleep(0.01)
    assert wait_until(lambda: all(v.images for v in viewers))
    a.close()
    a.close()  # idempotent
    assert viewers[0].ended.wait(5), "closing a stream ends its viewers"
    with pytest.raises(RuntimeError):
        a.write(frames[0])
    r = requests.get(out.url + "stream/0", timeout=5)
    assert r.status_code == 410 and "stream 0 (a) has ended" in r.text
    assert requests.get(out.url + "snapshot/0.jpg", timeout=5).status_code == 200  # its last picture stays
    got = len(viewers[1].images)
    mirrored = cv2.flip(frames[5], 1)
    for _ in range(10):
        b.write(mirrored)
        time.sleep(0.01)
    assert wait_until(lambda: len(viewers[1].images) > got and mad(viewers[1].images[-1], mirrored) < 4.0)
    assert not viewers[1].ended.is_set()
    ours = set(viewers)
    # the server and b's encoder (a's encoder is gone; no thread per client)
    assert sorted(t.name for t in set(threading.enumerate()) - before - ours) == [
        "vision-host-mjpeg-encoder-1", "vision-host-mjpeg-server"]
    out.close()
    assert viewers[1].ended.wait(5)
    left = set(threading.enumerate()) - before - ours
    assert not left, f"threads left behind: {[t.name for t in left]}"
    with pytest.raises(RuntimeError):
        b.write(frames[0])
    with pytest.raises(RuntimeError):
        out.stream(1).open(640, 360, 30)


def test_a_stream_open_starts_the_server_and_reports_a_busy_port():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        out = MjpegOutput(f":{port}", stream_names=["a", "b"])
        with pytest.raises(OutputError, match=f"port {port} on 127.0.0.1 is in use"):
            out.stream(1).open(640, 360, 30)
        out.close()
    finally:
        blocker.close()
    out = MjpegOutput(":0", stream_names=["a", "b"])
    out.start()  # the server alone: clients of a stream not opened yet wait, its snapshot is 503
    try:
        assert requests.get(out.url + "snapshot/1.jpg", timeout=5).status_code == 503
        out.stream(1).open(640, 360, 30)
        out.stream(1).write(RED)
        r = requests.get(out.url + "snapshot/1.jpg", timeout=5)
        assert r.status_code == 200
        assert mad(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR), RED) < 4.0
    finally:
        out.close()


# --------------------------------------------------------------------------- bounds on clients


def _connect(port: int, source: str = "127.0.0.1", send: bytes = b"") -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source`` (Linux
    routes all of 127.0.0.0/8 to lo), that sends ``send`` and nothing more."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if send:
        s.sendall(send)
    return s


def _answer_or_close(s: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sends before it closes ``s`` (b"" for a plain close); raises
    socket.timeout when it neither answers nor closes within ``timeout`` s."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _silent(s: socket.socket) -> bool:
    """True when the server has sent nothing on ``s`` and not closed it (checked without waiting)."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
        return False           # data or EOF
    except BlockingIOError:
        return True
    finally:
        s.setblocking(True)


def test_half_open_connections_take_no_thread_and_those_beyond_the_total_cap_are_refused_at_once(mjpeg):
    """300 connections that never finish a request head (the default caps: 256 in all, 64 per
    client; five client addresses of 60): no thread per connection, the 257th and later are
    answered 503 with a JSON error and closed at once, the others wait for their head."""
    threads_before = threading.active_count()
    held, started = [], time.monotonic()
    for i in range(300):
        source = f"127.0.0.{2 + i // 60}"
        held.append(_connect(mjpeg.port, source, b"GET /stream HTTP/1.1\r\n" if i % 2 else b""))
    try:
        refused = held[256:]
        for s in refused:
            answer = _answer_or_close(s)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
            assert b"maximum of 256 connections" in answer
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert time.monotonic() - started < 5.0
        assert all(_silent(s) for s in held[:256]), "a connection within the caps was closed early"
        assert threading.active_count() == threads_before, "a thread per connection"
    finally:
        for s in held:
            s.close()


def test_a_client_holding_its_maximum_of_idle_connections_delays_nobody_else(mjpeg, frames):
    """One client address (127.0.0.2) opens the default 64 idle connections: its 65th is
    refused at once (503), while another client's video, snapshot and page keep working."""
    idle = [_connect(mjpeg.port, "127.0.0.2") for _ in range(64)]
    try:
        t0 = time.monotonic()
        extra = _connect(mjpeg.port, "127.0.0.2")
        answer = _answer_or_close(extra)
        assert time.monotonic() - t0 < 2.0
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"127.0.0.2 has its maximum of 64 connections" in answer
        viewer = StreamClient(mjpeg.url + "stream")
        viewer.start()
        assert wait_until(lambda: mjpeg.clients == 1)
        written = iter(range(1_000_000))

        def write_and_check() -> bool:   # a camera writing while we wait for the viewer
            mjpeg.write(frames[next(written) % len(frames)])
            return len(viewer.images) >= 3

        assert wait_until(write_and_check, timeout=10), "the other client's video stalled"
        assert requests.get(mjpeg.url + "snapshot.jpg", timeout=5).status_code == 200
        assert requests.get(mjpeg.url, timeout=5).status_code == 200
        assert all(_silent(s) for s in idle)
    finally:
        for s in idle:
            s.close()
    mjpeg.close()
    assert viewer.ended.wait(5) and viewer.error is None, viewer.error


@pytest.mark.slow
def test_a_connection_without_a_complete_request_head_is_closed_after_the_header_timeout(frames):
    """header_timeout_s=0.5: a connection that sends nothing, half a request line, or whole
    headers but no blank line, and one that trickles a second request after its first answer,
    are all closed; a complete request on time is answered."""
    from vision_host.webserver import ServerLimits

    out = MjpegOutput(":0", limits=ServerLimits(header_timeout_s=0.5))
    out.open(640, 360, 30)
    out.write(frames[0])
    try:
        started = time.monotonic()
        slow = [_connect(out.port), _connect(out.port, send=b"GET /snaps"),
                _connect(out.port, send=b"GET /snapshot.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n")]
        for s in slow:
            assert _answer_or_close(s) == b""
        assert 0.4 < time.monotonic() - started < 4.0
        keep = _connect(out.port, send=b"GET /snapshot.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        keep.settimeout(5)
        assert keep.recv(12) == b"HTTP/1.1 200"
        keep.sendall(b"GET /snap")     # the next request, never finished
        rest = _answer_or_close(keep)  # the rest of the first answer, then the close
        assert b"HTTP/1.1" not in rest
        for s in slow + [keep]:
            s.close()
        assert requests.get(out.url + "snapshot.jpg", timeout=5).status_code == 200
    finally:
        out.close()


def test_back_to_back_connects_never_wait_for_the_listen_backlog(mjpeg):
    """200 connects in a row each complete at once (a backlog of 5 made every 7th or so wait
    for the kernel's 1 s SYN retry); those over the per-client cap are refused, not queued."""
    held, slowest = [], 0.0
    try:
        for _ in range(200):
            t0 = time.perf_counter()
            held.append(socket.create_connection(("127.0.0.1", mjpeg.port), timeout=10))
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.5, f"a connect took {slowest:.2f} s"
    finally:
        for s in held:
            s.close()


# --------------------------------------------------------------------------- file


def read_video(path: Path) -> tuple[list[np.ndarray], float, int, int]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"cannot read back {path}"
    fps = cap.get(cv2.CAP_PROP_FPS)
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return out, fps, w, h


@pytest.mark.parametrize("encoder_thread", [True, False])
def test_file_output_round_trip(tmp_path, frames, encoder_thread):
    path = tmp_path / "out.mp4"
    out = make_output("file", str(path), codec="mp4v", encoder_thread=encoder_thread)
    assert isinstance(out, FileOutput) and out.encoder_thread is encoder_thread
    out.open(640, 360, 29.833)
    for f in frames:
        out.write(f)
    out.close()
    out.close()  # idempotent
    back, fps, w, h = read_video(path)
    assert len(back) == len(frames)
    assert (w, h) == (640, 360)
    assert fps == pytest.approx(29.833, abs=0.01)
    assert all(mad(a, b) < 6.0 for a, b in zip(back, frames)), "file frames differ from the written ones"
    assert "out.mp4" in out.describe()


def test_an_encoder_thread_per_file_output_only_while_a_core_is_spare(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [encoder_thread_pays(n) for n in (1, 3, 4, 8)] == [True, True, False, False]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert not encoder_thread_pays(1)      # one core: the thread could only slow the frame loop


def test_file_output_resizes_other_sizes_and_defaults_fps(tmp_path, frames):
    path = tmp_path / "small.mp4"
    out = FileOutput(path)
    out.open(320, 180, float("nan"))
    for f in frames[:10]:
        out.write(f)
    out.close()
    back, fps, w, h = read_video(path)
    assert (len(back), w, h) == (10, 320, 180)
    assert fps == pytest.approx(30.0)
    assert mad(back[5], cv2.resize(frames[5], (320, 180), interpolation=cv2.INTER_AREA)) < 6.0


def test_file_output_errors(tmp_path):
    created = tmp_path / "new-dir" / "out.mp4"          # missing folders are created
    out = FileOutput(created)
    out.open(64, 48, 30)
    out.close()
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    missing = blocker / "sub" / "out.mp4"
    with pytest.raises(OutputError, match="cannot be created") as info:
        FileOutput(missing).open(640, 360, 30)
    assert str(missing.parent) in str(info.value)
    a_dir = tmp_path / "a-directory"
    a_dir.mkdir()
    with pytest.raises(OutputError) as info:
        FileOutput(a_dir).open(640, 360, 30)
    assert str(a_dir) in str(info.value)
    with pytest.raises(OutputError, match="-d out.mp4"):
        make_output("file", None)


# --------------------------------------------------------------------------- display & factory

_NO_WINDOW_ADVICE = "use -o mjpeg to watch in a browser or -o file -d out.mp4"


def test_display_without_display_raises_sentence(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    out = make_output("display", None)
    assert isinstance(out, DisplayOutput) and not out.closed
    with pytest.raises(OutputError) as info:
        out.open(640, 360, 30)
    assert str(info.value) == f"cannot open a window: no display (DISPLAY unset); {_NO_WINDOW_ADVICE}"
    out.close()


@pytest.mark.skipif(
    "GUI:                           NONE" not in cv2.getBuildInformation(),
    reason="needs a headless OpenCV build (a GUI build would try to reach the fake display)",
)
def test_display_with_headless_opencv_raises_sentence(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":99")
    with pytest.raises(OutputError) as info:
        DisplayOutput().open(640, 360, 30)
    msg = str(info.value)
    assert msg.startswith("cannot open a window: this OpenCV has no GUI support")
    assert msg.endswith(_NO_WINDOW_ADVICE)


def test_make_output_kinds_and_unknown_kind():
    out = make_output("mjpeg", None)
    assert isinstance(out, MjpegOutput) and (out.host, out.port) == ("127.0.0.1", 8080)
    assert isinstance(make_output("MJPEG", ":0"), MjpegOutput)
    with pytest.raises(OutputError) as info:
        make_output("ftp", None)
    assert str(info.value) == "unknown output 'ftp': use -o with one of mjpeg, file, display, rtsp"
    assert OUTPUT_KINDS == ("mjpeg", "file", "display", "rtsp")


def test_make_output_rtsp_destinations():
    pytest.importorskip("av", reason="PyAV is not installed")
    with pytest.raises(OutputError, match=r"add -d rtsp://127\.0\.0\.1:8554/vision"):
        make_output("rtsp", None)
    with pytest.raises(OutputError) as info:
        make_output("rtsp", "http://u:pw@127.0.0.1:8554/vision")
    msg = str(info.value)
    assert "-o rtsp needs an rtsp:// or rtsps:// address" in msg and "pw" not in msg
    out = make_output("RTSP", "rtsps://127.0.0.1:8322/vision")
    assert isinstance(out, RtspOutput) and not out.closed  # nothing is connected before open()


def test_rtsp_without_pyav_names_the_install_command(monkeypatch):
    from vision_host.outputs import encoding

    monkeypatch.setattr(encoding, "import_av", lambda: None)
    with pytest.raises(OutputError) as info:
        make_output("rtsp", "rtsp://127.0.0.1:8554/vision")
    assert "pip install 'vision-host[record]'" in str(info.value)


def test_live_view_marks_the_outputs_that_get_reconnecting_frames():
    assert Output.live_view is False
    assert MjpegOutput.live_view and MjpegStreamOutput.live_view and DisplayOutput.live_view
    assert not FileOutput.live_view and not RecordingOutput.live_view and not RtspOutput.live_view
    out = MjpegOutput(":0", stream_names=["a", "b"])
    assert all(out.stream(i).live_view for i in range(2))
