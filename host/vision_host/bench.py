"""``vision-host bench``: measured speed on a real clip, side by side in one run.

Every scenario runs in this process (or, for start-up, a child ``vision-host run``) against
:class:`LatencyServer`, a local server speaking Ollama's ``/api/generate`` (NDJSON when
``"stream": true``, one JSON object otherwise) that waits a chosen latency before answering
with a fixed sentence. It stands for the vision server's delay only: the captions it returns
say they come from the bench.

Scenarios (keys of the ``--json`` object; ``fps`` and ``max_frame_gap_ms`` mean what they
mean in ``--stats``):

* ``fps``, ``opencv_fps``, ``fps_ratio_vs_opencv``, ``fps_ratio_spread``, ``fps_ratio_rounds``:
  ``-p ollama`` with a file output, unpaced, against a plain OpenCV read + ``mp4v`` write loop
  over the same frames (the clip's first 600; ``--quick``: 300), in interleaved rounds (7;
  ``--quick``: 3), each pipeline run set against the plain runs just before and after it, so
  a change of load across the runs lands on both (:func:`interleaved_ratio`): the median
  round's pipeline and OpenCV frames/s and ratio, the ratios' ``[min, max]``, and each
  round's ratio.
* ``streams`` (with ``--streams N``, N > 1): ``count`` unpaced ``-p ollama`` streams at once
  (one runtime, a processor instance, source, output and thread each) against as many plain
  OpenCV loops on threads, interleaved as above: ``fps`` and ``opencv_fps`` of all streams
  together while all of them run (until the first ends), ``fps_ratio_vs_opencv``,
  ``fps_ratio_spread``, ``fps_ratio_rounds``.
* ``nonblocking`` / ``blocking``: the paced clip while the server takes ``server_latency_ms``
  per caption (a request every 3 s at most, ``ollama``'s default), with ``ollama`` and with ``ollama-blocking`` (wasmVision's design: the caption
  request inside ``process`` through the blocking ``post-image``): ``fps``, ``max_frame_gap_ms``.
* ``processor_overhead_us``: mean µs of one ``process`` call for ``hello``, ``blur``, ``ollama``
  (steady state, a caption on screen).
* ``caption_overhead_ms``: end-to-end caption latency (request started → reply complete, as the
  host measures it) minus the server's own time, median, at 1920×1080 and at the clip's size.
* ``payload_bytes``: request body bytes for a 1920×1080 frame at the default
  ``ollama-image-max-side`` (672 px) and at full resolution.
* ``startup_ms``: child process start → first frame out, without and with the compiled-module cache.
* ``soak``: RSS and guest memory before and after ``soak_frames`` frames (320×180, unpaced).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from . import __version__
from .outputs import FileOutput
from .outputs.recording import encoder_thread_pays
from .pipeline import Pipeline, rss_bytes
from .runtime import NetworkPolicy, Runtime, SandboxLimits
from .sources import FileSource, Source

BENCH_CAPTION = "caption from the vision-host bench server"
WASM = Path(__file__).resolve().parent / "wasm"


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server for which a client hanging up is not an error, and that counts
    the connections it has finished with (see :meth:`LatencyServer.wait_closed`)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.closed = 0
        self.closed_changed = threading.Condition()

    def handle_error(self, request, client_address) -> None:
        """Print the traceback (socketserver's way), unless the client went away: the host
        drops a request in flight when a processor or a run ends (a reset or broken pipe here)."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request) -> None:
        """Close a finished connection (after :meth:`handle_error`, if it failed) and count it."""
        super().shutdown_request(request)
        with self.closed_changed:
            self.closed += 1
            self.closed_changed.notify_all()


class LatencyServer:
    """Ollama's ``POST /api/generate`` on 127.0.0.1 answering after ``latency_s``.

    A client that hangs up (before, during or after its reply) is not reported; any other
    failure of a request prints its traceback to stderr.

    Attributes:
        url: base URL (``http://127.0.0.1:PORT``).
        bodies: request body sizes in bytes, in arrival order.
        handled_ms: per request, ms from the request's last byte read to the reply's last byte sent.
    """

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.bodies: list[int] = []
        self.handled_ms: list[float] = []
        bench = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # headers and body go out in separate writes: without this, Nagle's algorithm
                # and the client's delayed ACK add ~40 ms to every reply (Ollama's Go server sets it too)
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                read = time.perf_counter()
                bench.bodies.append(len(body))
                try:
                    stream = bool(json.loads(body).get("stream", True))
                except ValueError:
                    self.send_error(400)
                    return
                time.sleep(bench.latency_s)
                words = BENCH_CAPTION.split(" ")
                if stream:
                    lines = [{"model": "bench", "response": w + " ", "done": False} for w in words]
                    lines.append({"model": "bench", "response": "", "done": True, "done_reason": "stop"})
                    payload = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
                    ctype = "application/x-ndjson"
                else:
                    payload = json.dumps({"model": "bench", "response": BENCH_CAPTION, "done": True}).encode()
                    ctype = "application/json; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                bench.handled_ms.append((time.perf_counter() - read) * 1000)

        self._server = _HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="vision-host-bench-server", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> int:
        """How many connections the server has finished with (the client's or its own close)."""
        return self._server.closed

    def wait_closed(self, n: int, timeout_s: float = 10.0) -> bool:
        """Wait until the server has finished with ``n`` connections (any error reported);
        False if it has not within ``timeout_s`` s."""
        with self._server.closed_changed:
            return self._server.closed_changed.wait_for(lambda: self._server.closed >= n, timeout_s)

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class _LoopSource(Source):
    """``frames`` (H×W×3 uint8 BGR, in memory) over and over, ``count`` frames in all, unpaced."""

    def __init__(self, frames: list[np.ndarray], count: int, fps: float):
        self.frames, self.count, self.fps = frames, count, fps
        self.height, self.width = frames[0].shape[:2]
        self.i = 0

    def read(self):
        if self.i >= self.count:
            self.ended = True
            return None
        self.i += 1
        return self.frames[self.i % len(self.frames)]

    @property
    def name(self) -> str:
        return "bench frames"


def _clip_frames(path: str, n: int, size: tuple[int, int] | None = None) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if size else frame)
    cap.release()
    if not frames:
        raise ValueError(f"cannot read frames from {path}")
    return frames, fps


def _runtime(config: dict, limits: SandboxLimits | None = None) -> Runtime:
    return Runtime(config, NetworkPolicy.from_config(config), limits or SandboxLimits(), cache_dir=None)


def _opencv_loop(clip: str, frames: int, out_path: Path) -> float:
    """A plain OpenCV read + ``mp4v`` write loop over the first ``frames`` frames of ``clip``,
    decoding into one reused buffer as the pipeline's file source does; returns its frames/s
    (the loop only: opening and finalizing the files are not timed, as they are not in a
    pipeline's ``fps``)."""
    cap = cv2.VideoCapture(clip)
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS), (w, h))
    buffer = np.empty((h, w, 3), np.uint8)
    done = 0
    started = time.perf_counter()
    while done < frames:
        ok, frame = cap.read(buffer)
        if not ok:
            break
        writer.write(frame)
        done += 1
    elapsed = time.perf_counter() - started
    writer.release()
    cap.release()
    return done / elapsed


def _pipeline_fps(clip: str, server: LatencyServer, frames: int, out_path: Path) -> float:
    """``-p ollama`` → an ``mp4v`` file, unpaced, over the first ``frames`` frames of ``clip``
    (a caption requested every 500 ms at most); returns the run's ``fps``."""
    config = {"ollama-url": server.url, "ollama-interval-ms": "500"}
    with _runtime(config) as rt:
        processors = [rt.load(WASM / "ollama.wasm")]
        source = FileSource(clip, pace=False)
        output = FileOutput(out_path)
        output.open(source.width, source.height, source.fps)
        try:
            stats = Pipeline(source, processors, [output], rt).run(frames)
        finally:
            output.close()
            source.close()
            processors[0].close()
    return stats["fps"]


def interleaved_ratio(plain, pipeline, rounds: int) -> dict:
    """Run ``plain()`` and ``pipeline()`` (each returning frames/s) in turn, plain first and
    last: plain, pipeline, plain, pipeline, …, plain (``rounds`` pipeline runs, ``rounds`` + 1
    plain ones). Round k is pipeline run k against the mean of the plain runs just before and
    just after it, so a load that changes steadily across the three runs lands on both sides.

    Returns ``{"fps", "opencv_fps", "fps_ratio_vs_opencv", "fps_ratio_spread",
    "fps_ratio_rounds"}``: the median round's two figures (the pipeline's, the mean of its two
    plain runs) and ratio (the lower median for an even count), ``[min, max]`` of the ratios,
    and every round's ratio in order.

    Raises:
        ValueError: ``rounds`` < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    runs = []
    before = plain()
    for _ in range(rounds):
        pipeline_fps = pipeline()
        after = plain()
        plain_fps = (before + after) / 2
        runs.append((pipeline_fps / plain_fps, pipeline_fps, plain_fps))
        before = after
    ratios = [ratio for ratio, _, _ in runs]
    ratio, fps, plain_fps = sorted(runs)[(len(runs) - 1) // 2]
    return {"fps": round(fps, 2), "opencv_fps": round(plain_fps, 1), "fps_ratio_vs_opencv": round(ratio, 3),
            "fps_ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "fps_ratio_rounds": [round(x, 3) for x in ratios]}


def _opencv_vs_pipeline(clip: str, server: LatencyServer, frames: int, out_dir: Path, rounds: int) -> dict:
    """``-p ollama`` against the plain OpenCV loop over the same frames, interleaved
    (:func:`interleaved_ratio`)."""
    return interleaved_ratio(lambda: _opencv_loop(clip, frames, out_dir / "plain.mp4"),
                             lambda: _pipeline_fps(clip, server, frames, out_dir / "pipeline.mp4"), rounds)


def _run_together(work, streams: int, name: str, frames_done) -> float:
    """Run ``work(k, ready)`` for k in 0..``streams``-1, one thread each (named ``name-k``); each
    calls ``ready.wait()`` (a :class:`threading.Barrier`) once set up, so all start at once.
    ``frames_done()`` gives the frames every stream has done so far (any thread may call it).

    Returns the frames/s of all streams together while all of them ran: the frames done when
    the first stream ended over the time from the common start to then (cameras never end, so
    a tail where fewer streams than cores run would measure something else), after every
    thread has ended.
    """
    ready = threading.Barrier(streams + 1)
    first_end: list[tuple[float, int]] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        try:
            work(k, ready)
        finally:
            with lock:
                if not first_end:
                    first_end.append((time.perf_counter(), sum(frames_done())))

    threads = [threading.Thread(target=run, args=(k,), name=f"{name}-{k}") for k in range(streams)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    ended, frames = first_end[0]
    return frames / (ended - started)


def _opencv_threads(clip: str, frames: int, streams: int, out_dir: Path) -> float:
    """``streams`` plain OpenCV read + write loops (:func:`_opencv_loop`'s) at once, one thread
    each, over the first ``frames`` frames of ``clip``; returns the frames/s of all together
    while all ran (:func:`_run_together`; opening and finalizing the files are not timed)."""
    done = [0] * streams

    def loop(k: int, ready: threading.Barrier) -> None:
        cap = cv2.VideoCapture(clip)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        writer = cv2.VideoWriter(str(out_dir / f"plain-{k}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                 cap.get(cv2.CAP_PROP_FPS), (w, h))
        buffer = np.empty((h, w, 3), np.uint8)
        ready.wait()
        try:
            while done[k] < frames:
                ok, frame = cap.read(buffer)
                if not ok:
                    break
                writer.write(frame)
                done[k] += 1
        finally:
            writer.release()
            cap.release()

    return _run_together(loop, streams, "vision-host-bench-opencv", lambda: done)


def _pipeline_streams(clip: str, server: LatencyServer, frames: int, streams: int, out_dir: Path) -> float:
    """``streams`` streams of ``-p ollama`` → an ``mp4v`` file at once, unpaced, each with its
    own processor instance, source, output and thread (as ``vision-host run -s … -s …`` runs
    them), sharing one runtime and the vision server; returns the frames/s of all together
    while all ran (:func:`_run_together`)."""
    config = {"ollama-url": server.url, "ollama-interval-ms": "500"}
    with _runtime(config) as rt:
        contexts = [rt.streams[0]] + [rt.add_stream(str(k)) for k in range(1, streams)]
        runs = []
        try:
            for k, stream in enumerate(contexts):
                processor = rt.load(WASM / "ollama.wasm", stream=stream)
                source = FileSource(clip, pace=False)
                output = FileOutput(out_dir / f"pipeline-{k}.mp4", encoder_thread=encoder_thread_pays(streams))
                output.open(source.width, source.height, source.fps)
                runs.append((processor, source, output, Pipeline(source, [processor], [output], rt, stream=stream)))

            def run(k: int, ready: threading.Barrier) -> None:
                ready.wait()
                runs[k][3].run(frames)

            return _run_together(run, streams, "vision-host-bench-stream", lambda: [r[3].frames_out for r in runs])
        finally:
            for processor, source, output, _ in runs:
                output.close()
                source.close()
                processor.close()


def _streams_vs_threads(clip: str, server: LatencyServer, frames: int, streams: int, out_dir: Path,
                        rounds: int) -> dict:
    """``streams`` unpaced ``-p ollama`` streams against as many plain OpenCV threads, over the
    same frames, interleaved (:func:`interleaved_ratio`; frames/s of all streams together)."""
    r = interleaved_ratio(lambda: _opencv_threads(clip, frames, streams, out_dir),
                          lambda: _pipeline_streams(clip, server, frames, streams, out_dir), rounds)
    return {"count": streams, **r}


def _paced(clip: str, processor: str, server: LatencyServer, frames: int) -> dict:
    config = {"ollama-url": server.url, "ollama-interval-ms": "3000"}   # ollama's default, for both
    asked = len(server.bodies)
    limits = SandboxLimits(call_hard_timeout_ms=60_000)   # let the blocking design wait as long as it does
    with _runtime(config, limits) as rt:
        processors = [rt.load(WASM / f"{processor}.wasm")]
        source = FileSource(clip, pace=True)
        try:
            stats = Pipeline(source, processors, [], rt).run(frames)
        finally:
            source.close()
            processors[0].close()
    return {"fps": stats["fps"], "max_frame_gap_ms": stats["max_frame_gap_ms"],
            "caption_requests": len(server.bodies) - asked}


def _overhead(frames: list[np.ndarray], url: str, calls: int) -> dict:
    out = {}
    for name in ("hello", "blur", "ollama"):
        config = {"ollama-url": url, "ollama-interval-ms": "3600000"}
        with _runtime(config) as rt:
            p = rt.load(WASM / f"{name}.wasm")
            deadline = time.monotonic() + 10
            if name == "ollama":     # steady state: the caption is on screen, no request in flight
                while rt.processor_store.get("captions", "caption") is None and time.monotonic() < deadline:
                    p.process(frames[0].copy())
                    time.sleep(0.01)
                time.sleep(0.2)
                p.process(frames[0].copy())
            work = [f.copy() for f in frames[:8]]
            times = []
            for i in range(calls):
                frame = work[i % len(work)]
                t0 = time.perf_counter()
                p.process(frame)
                times.append(time.perf_counter() - t0)
            p.close()
        out[name] = round(statistics.mean(times) * 1e6, 1)
    return out


def _caption_overhead(frames: list[np.ndarray], server: LatencyServer, requests: int) -> float:
    """Median (host latency − server time) in ms over ``requests`` captions of ``frames``."""
    config = {"ollama-url": server.url, "ollama-interval-ms": "0"}
    with _runtime(config) as rt:
        p = rt.load(WASM / "ollama.wasm")
        first = len(server.handled_ms)
        deadline = time.monotonic() + 60
        i = 0
        while rt.fetch_stats.completed < requests and time.monotonic() < deadline:
            p.process(frames[i % len(frames)])
            i += 1
            time.sleep(0.002)
        p.close()
        host = list(rt.fetch_stats.snapshot().latencies_ms)[:requests]
    own = server.handled_ms[first:first + len(host)]
    return round(statistics.median(h - s for h, s in zip(host, own, strict=False)), 2)


def _payloads(frame_1080: np.ndarray, server: LatencyServer) -> dict:
    out = {}
    for key, side in (("default_max_side", None), ("full_resolution", "0")):
        config = {"ollama-url": server.url, "ollama-interval-ms": "3600000"}
        if side is not None:
            config["ollama-image-max-side"] = side
        with _runtime(config) as rt:
            p = rt.load(WASM / "ollama.wasm")
            before = len(server.bodies)
            deadline = time.monotonic() + 10
            while len(server.bodies) == before and time.monotonic() < deadline:
                p.process(frame_1080.copy())
                time.sleep(0.01)
            p.close()
        out[key] = server.bodies[before]
    return out


def _startup(clip: str, url: str) -> dict:
    """ms from spawning ``vision-host run -p ollama --max-frames 1`` to its first frame out, with
    the compiled-module cache empty (``cold``) and filled (``warm``). Captions are paused: a
    request would still be in flight when the one-frame run ends (then ``run`` exits 1 for
    "no caption completed"), and the figure is about start-up only."""
    out = {}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VISION_HOST_CACHE_DIR": cache}
        for key in ("cold", "warm"):     # the first run fills the compiled-module cache
            stats = Path(tmp) / f"{key}.json"
            spawned = time.time()
            subprocess.run([sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", clip, "--max-frames", "1",
                            "-o", "file", "-d", str(Path(tmp) / f"{key}.mp4"), "--codec", "mp4v", "--stats", str(stats),
                            "-c", f"ollama-url={url}", "-c", "ollama-paused=true"],
                           env=env, check=True, capture_output=True, timeout=120)
            out[key] = round((json.loads(stats.read_text())["first_frame_unix"] - spawned) * 1000, 1)
    return out


def _soak(frames: list[np.ndarray], server: LatencyServer, count: int) -> dict:
    config = {"ollama-url": server.url, "ollama-interval-ms": "0"}
    with _runtime(config) as rt:
        p = rt.load(WASM / "ollama.wasm")
        warm_up = 1000                           # first captions, arenas at their size
        pipeline = Pipeline(_LoopSource(frames, warm_up + count, 30.0), [p], [], rt)
        pipeline.run(warm_up)
        rss0, guest0, captions0 = rss_bytes(), p.memory_bytes, rt.fetch_stats.completed
        stats = pipeline.run(warm_up + count)
        rss1, guest1 = rss_bytes(), p.memory_bytes
        pipeline.drain_captions(10.0)            # the caption in flight at the end is waited for and counted
        captions = rt.fetch_stats.completed - captions0
        p.close()
    return {"frames": stats["frames_out"] - warm_up, "rss_bytes_start": rss0, "rss_bytes_end": rss1,
            "guest_memory_bytes_start": guest0, "guest_memory_bytes_end": guest1,
            "captions": captions, "errors": stats["processors"]["ollama"]["errors"]}


def machine() -> dict:
    """What the figures were measured on: ``cpu`` (model name from /proc/cpuinfo), ``cores``,
    and the versions of ``python``, ``opencv``, ``wasmtime`` and ``vision_host``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib.metadata import version
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__,
            "wasmtime": version("wasmtime"), "vision_host": __version__}


def run_bench(clip: str, latency_ms: float = 2000, soak_frames: int = 50_000, quick: bool = False,
              progress=None, streams: int = 1) -> dict:
    """Run every scenario on ``clip`` (H.264/MP4 readable by OpenCV); returns the ``--json`` object.

    ``latency_ms`` is the local server's delay for the blocking comparison, ``soak_frames``
    the length of the memory soak. ``quick`` shortens every scenario (for tests; its figures
    are rougher). ``progress(text)`` is told which scenario runs. ``streams`` > 1 adds the
    ``streams`` scenario: that many unpaced ``-p ollama`` streams at once against as many
    plain OpenCV threads, interleaved like the single-stream ratio. Takes about 60 s
    (``quick``: about 20 s) on a 2-core machine, plus about 25 s for ``streams`` = 2.

    Raises:
        ValueError: OpenCV cannot read frames from ``clip``, or ``streams`` < 1.
        subprocess.CalledProcessError: the start-up run (a child ``vision-host run``) failed.
    """
    if streams < 1:
        raise ValueError(f"streams must be at least 1, not {streams}")
    say = progress or (lambda text: None)
    ratio_rounds, ratio_frames = (3, 300) if quick else (7, 600)
    frames, fps = _clip_frames(clip, 64)
    h, w = frames[0].shape[:2]
    result: dict = {"machine": machine(), "clip": Path(clip).name, "clip_size": f"{w}x{h}", "clip_fps": round(fps, 2)}
    fast = LatencyServer(0.05)
    slow = LatencyServer(latency_ms / 1000)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            say(f"pipeline vs a plain OpenCV loop, {ratio_rounds} interleaved rounds of {ratio_frames} frames")
            result.update(_opencv_vs_pipeline(clip, fast, ratio_frames, Path(tmp), ratio_rounds))
            if streams > 1:
                say(f"{streams} streams vs {streams} plain OpenCV threads, {ratio_rounds} interleaved rounds")
                result["streams"] = _streams_vs_threads(clip, fast, ratio_frames, streams, Path(tmp), ratio_rounds)
        paced_frames = int(fps * (4 if quick else 12))
        result["server_latency_ms"] = latency_ms
        say(f"non-blocking vs blocking captions, server taking {latency_ms:g} ms")
        result["nonblocking"] = _paced(clip, "ollama", slow, paced_frames)
        result["blocking"] = _paced(clip, "ollama-blocking", slow, paced_frames)
        say("per-frame processor overhead")
        result["processor_overhead_us"] = _overhead(frames, fast.url, 300 if quick else 3000)
        say("caption overhead")
        hd = [cv2.resize(f, (1920, 1080), interpolation=cv2.INTER_LINEAR) for f in frames[:8]]
        n = 5 if quick else 30
        result["caption_overhead_ms"] = {"1920x1080": _caption_overhead(hd, fast, n),
                                         f"{w}x{h}": _caption_overhead(frames[:8], fast, n)}
        result["payload_bytes"] = _payloads(hd[0], fast)
        say("start-up to first frame")
        result["startup_ms"] = _startup(clip, fast.url)
        say(f"soak over {soak_frames} frames")
        small = [cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in frames]
        result["soak"] = _soak(small, fast, soak_frames)
    finally:
        fast.stop()
        slow.stop()
    return result


def format_table(r: dict) -> str:
    """The bench result as a Markdown table (what ``vision-host bench`` prints)."""
    m = r["machine"]
    rows = [
        ("pipeline fps, `-p ollama` → file, unpaced", f"{r['fps']:.1f}"),
        ("plain OpenCV read + write loop fps", f"{r['opencv_fps']:.1f}"),
        ("`fps_ratio_vs_opencv`", f"{r['fps_ratio_vs_opencv']:.2f} (median of {len(r['fps_ratio_rounds'])} "
                                  f"interleaved rounds; {r['fps_ratio_spread'][0]:.2f}–{r['fps_ratio_spread'][1]:.2f})"),
        (f"`ollama` (non-blocking), server {r['server_latency_ms']:g} ms: fps / `max_frame_gap_ms`",
         f"{r['nonblocking']['fps']:.1f} / {r['nonblocking']['max_frame_gap_ms']:.0f}"),
        ("`ollama-blocking` (wasmVision's design), same server: fps / `max_frame_gap_ms`",
         f"{r['blocking']['fps']:.1f} / {r['blocking']['max_frame_gap_ms']:.0f}"),
    ]
    if "streams" in r:
        st = r["streams"]
        rows += [(f"{st['count']} streams `-p ollama` → files, unpaced: fps of all / plain OpenCV threads",
                  f"{st['fps']:.1f} / {st['opencv_fps']:.1f}"),
                 (f"{st['count']} streams: ratio vs OpenCV", f"{st['fps_ratio_vs_opencv']:.2f} (median of "
                  f"{len(st['fps_ratio_rounds'])} interleaved rounds; {st['fps_ratio_spread'][0]:.2f}–"
                  f"{st['fps_ratio_spread'][1]:.2f})")]
    rows += [(f"`{name}` per-frame overhead (µs)", f"{us:.0f}") for name, us in r["processor_overhead_us"].items()]
    rows += [(f"caption overhead at {size} (ms)", f"{ms:.1f}") for size, ms in r["caption_overhead_ms"].items()]
    rows += [("request bytes, 1920×1080 frame, default max side / full resolution",
              f"{r['payload_bytes']['default_max_side']:,} / {r['payload_bytes']['full_resolution']:,}"),
             ("start-up to first frame, cold / cached (ms)",
              f"{r['startup_ms']['cold']:.0f} / {r['startup_ms']['warm']:.0f}")]
    s = r["soak"]
    rows.append((f"soak, {s['frames']:,} frames: RSS start → end (MiB)",
                 f"{s['rss_bytes_start'] / 2**20:.1f} → {s['rss_bytes_end'] / 2**20:.1f}"))
    rows.append(("soak: guest memory start → end (bytes)",
                 f"{s['guest_memory_bytes_start']:,} → {s['guest_memory_bytes_end']:,}"))
    lines = [f"vision-host bench on {r['clip']} ({r['clip_size']} @ {r['clip_fps']} fps); {m['cpu']}, "
             f"{m['cores']} cores, Python {m['python']}, OpenCV {m['opencv']}, wasmtime {m['wasmtime']}", "",
             "| measure | value |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


__all__ = ["BENCH_CAPTION", "LatencyServer", "format_table", "interleaved_ratio", "machine", "run_bench"]
