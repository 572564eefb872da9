"""Fault drills: every failure the sandbox and the ollama processor must survive, in one place.

Each drill runs the real clip (``conftest.SAMPLE_CLIP``, unpaced) through a real
:class:`~vision_host.pipeline.Pipeline` (or ``vision-host run``) and checks three things:

1. the video keeps flowing: every frame read leaves the chain and reaches the output, and no
   gap between two output frames is long;
2. a clear message: the processor's ``last_error``, a log record or the CLI's stderr says what
   happened (and, where it applies, what to do);
3. no leak: between a warm-up point and the end of a long run nothing grows: mats in the
   instance's handle table, requests in flight, threads, open file descriptors, and RSS
   stays within a bound.

The table (what the user sees):

========================  =========================================================================
drill                     what the user sees
========================  =========================================================================
processor traps           ``trapped (wasm trap: …unreachable…)``, then ``disabled after 5 failed
                          calls in a row …; the video goes on without it``
processor loops forever   ``call exceeded its 1000 ms deadline (host functions included) and was
                          interrupted`` (each of its 5 calls stalls the video up to that deadline)
allocates memory w/o end  ``trapped (…); its memory is near its 4 MiB cap (raise it with
                          --memory-limit-mb …)``
allocates mats w/o end    ``too many live mat handles (32): the processor does not drop what it
                          creates``; its mats are released when it is disabled
unknown handle            ``unknown or dropped mat handle 424242``
out-of-bounds pointer     ``guest range [2147418112, …) is outside its 65536-byte memory``
invalid UTF-8             ``string at 16 is not valid UTF-8 (invalid start byte at byte 0)``
truncated .wasm           ``… is not a valid WebAssembly module (… unexpected end-of-file …): the
                          file is truncated or corrupt; rebuild it …``
not wasm                  ``… is not a WebAssembly module (it does not start with the \\0asm magic
                          bytes): rebuild it or pick the right file``
missing ``process``       ``… does not export `process` (expected `process(frame: u32) -> u32`)``
imports what host lacks   ``… imports wasm:cv/cv#no-such-filter, which vision-host does not provide``
server refuses (closed)   ``cannot reach Ollama at URL, retrying in 1 s`` (backoff 1, 2, 4 … s)
server refuses (HTTP 500) ``server error 500: llama runner process has terminated …``
server resets mid-stream  ``the connection to Ollama at URL broke during the reply``
server drips bytes        ``Ollama at URL timed out`` (the video never waits for it)
server answers 20 MB      ``the reply from Ollama at URL exceeded the response size limit …``
invalid UTF-8 in caption  the caption, with U+FFFD for the bad bytes (no error)
HTML page with status 200 ``URL answered with an HTML page, not the generate API: check ollama-url
                          and ollama-api``
bad ollama-* values       ``config ollama-interval-ms="abc" is invalid (expected …); using the
                          default 3000`` (one line per key), captions still flow
bad CLI values            ``--processor-timeout-ms: 0 must be greater than 0`` (exit 2); a
                          ``[config]`` table value → the processor's "is invalid" line
========================  =========================================================================

Drills already covered closely elsewhere (``tests/test_sandbox.py``,
``tests/test_ollama_processor.py``, ``tests/test_fetch.py``) are repeated here through the
pipeline because the point of a drill is the whole run, not the single call.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import REPO, SAMPLE_CLIP
from ollama_standin import OllamaStandin
from reply_server import ReplyServer
from vision_host.outputs import Output
from vision_host.pipeline import Pipeline, rss_bytes
from vision_host.runtime import NetworkPolicy, ProcessorLoadError, Runtime, SandboxLimits
from vision_host.sources import FileSource
from wat import module

OLLAMA_WASM = REPO / "wasm" / "ollama.wasm"
HELLO_WASM = REPO / "wasm" / "hello.wasm"
FRAMES = 300          # frames per drill run
WARM = 60             # frames before the leak baseline is taken


# -- the harness ---------------------------------------------------------------------------
class CountingOutput(Output):
    """An output that counts the frames it gets and checks each is an H×W×3 uint8 frame."""

    def __init__(self):
        self.frames = 0
        self.shape = None

    def open(self, width, height, fps):
        self.shape = (height, width, 3)

    def write(self, frame):
        assert isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == self.shape
        self.frames += 1

    def close(self):
        self.closed = True

    def describe(self):
        return "counting output"


class _SteadySource(FileSource):
    """The real clip, unpaced, with ``delay_s`` per frame so a drill lasts long enough for
    server retries and timeouts to happen during it."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__(str(SAMPLE_CLIP), pace=False)
        self.delay_s = delay_s

    def read(self):
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().read()


@dataclass
class Snapshot:
    """What must not grow during a run."""

    mats: int
    in_flight: int
    threads: int
    fds: int
    rss: int

    @classmethod
    def take(cls, processors) -> "Snapshot":
        return cls(mats=sum(len(p.ctx.mats) for p in processors),
                   in_flight=sum(p.ctx.fetch.in_flight for p in processors),
                   threads=threading.active_count(), fds=len(os.listdir("/proc/self/fd")), rss=rss_bytes())


@dataclass
class DrillRun:
    """The result of :func:`run_drill`."""

    pipeline: Pipeline
    output: CountingOutput
    stats: dict
    before: Snapshot
    after: Snapshot


def run_drill(runtime: Runtime, processors, delay_s: float = 0.0, frames: int = FRAMES) -> DrillRun:
    """Run ``frames`` frames of the real clip through ``processors`` into a counting output,
    taking a :class:`Snapshot` after :data:`WARM` frames and at the end."""
    source = _SteadySource(delay_s)
    out = CountingOutput()
    out.open(source.width, source.height, source.fps)
    pipe = Pipeline(source, list(processors), [out], runtime)
    try:
        pipe.run(max_frames=WARM)
        before = Snapshot.take(processors)
        stats = pipe.run(max_frames=frames)
        after = Snapshot.take(processors)
    finally:
        source.close()
    return DrillRun(pipe, out, stats, before, after)


def assert_flowing(run: DrillRun, frames: int = FRAMES, max_gap_ms: float = 250.0) -> None:
    """(1) Every frame read left the chain and reached the output, without a long stall."""
    assert run.pipeline.frames_in == run.pipeline.frames_out == run.output.frames == frames
    assert run.stats["max_frame_gap_ms"] < max_gap_ms, f"the video stalled {run.stats['max_frame_gap_ms']} ms"


def assert_no_leak(run: DrillRun, rss_slack_mb: int = 48) -> None:
    """(3) Nothing grew between the warm-up point and the end of the run."""
    b, a = run.before, run.after
    assert a.mats <= b.mats, f"mats in the handle table grew {b.mats} → {a.mats}"
    assert a.in_flight <= max(b.in_flight, 1), f"requests in flight grew {b.in_flight} → {a.in_flight}"
    assert a.threads <= b.threads + 2, f"threads grew {b.threads} → {a.threads}"
    assert a.fds <= b.fds + 3, f"open files grew {b.fds} → {a.fds}"
    assert a.rss - b.rss < rss_slack_mb * 2**20, f"RSS grew {(a.rss - b.rss) / 2**20:.0f} MiB"


def logged(caplog, text: str) -> list[str]:
    """Messages of the records captured so far that contain ``text``."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def runtimes():
    """``make(config=…, limits=…)`` → a :class:`Runtime` (policy from the ``*-url`` keys),
    closed with its processors at teardown."""
    made = []

    def make(config=None, limits=None):
        config = config or {}
        rt = Runtime(config, NetworkPolicy.from_config(config), limits or SandboxLimits(), None)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


# -- 1. processors that misbehave ---------------------------------------------------------
def _logging_processor(address: int, data: bytes = b"") -> bytes:
    """A processor whose every call logs the 16 bytes at ``address`` (``data`` placed at 16)."""
    escaped = "".join(f"\\{b:02x}" for b in data)
    return module(f"""
(module
  (import "wasmvision:platform/logging" "info" (func $info (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{escaped}")
  (func (export "process") (param i32) (result i32)
    (call $info (i32.const {address}) (i32.const {max(len(data), 16)})) (local.get 0)))""")


PROCESSOR_DRILLS = {
    "traps": (module("""(module (memory (export "memory") 1)
        (func (export "process") (param i32) (result i32) unreachable))"""),
              {}, "trapped (wasm trap: wasm `unreachable` instruction executed"),
    "loops-forever": (module("""(module (memory (export "memory") 1)
        (func (export "process") (param i32) (result i32) (loop $spin (br $spin)) (local.get 0)))"""),
                      {}, "call exceeded its 1000 ms deadline (host functions included) and was interrupted"),
    "allocates-memory-without-bound": (module("""(module (memory (export "memory") 1)
        (func (export "process") (param i32) (result i32)
          (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
          (local.get 0)))"""),
        {"memory_limit_bytes": 4 * 2**20},
        "its memory is near its 4 MiB cap (raise it with --memory-limit-mb if the processor needs more)"),
    "allocates-mats-without-bound": (module("""(module
        (import "wasm:cv/mat" "[static]mat.new-with-size" (func $new (param i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "process") (param i32) (result i32)
          (drop (call $new (i32.const 64) (i32.const 64) (i32.const 16))) (local.get 0)))"""),
        {"max_live_mats": 32}, "too many live mat handles (32): the processor does not drop what it creates"),
    "returns-unknown-handle": (module("""(module (memory (export "memory") 1)
        (func (export "process") (param i32) (result i32) (i32.const 424242)))"""),
                               {}, "ABI violation: unknown or dropped mat handle 424242"),
    "passes-out-of-bounds-pointer": (_logging_processor(0x7FFF0000), {},
                                     "ABI violation: guest range [2147418112, 2147418128) is outside its "
                                     "65536-byte memory"),
    "passes-invalid-utf8": (_logging_processor(16, b"\xff\xfe caption \xc3"), {},
                            "ABI violation: string at 16 is not valid UTF-8 (invalid start byte at byte 0)"),
}
#: Drills whose failed calls may hold a frame longer than assert_flowing's default: a runaway
#: loop runs to the default deadline (1 s, SandboxLimits) before it is interrupted.
DRILL_STALL_MS = {"loops-forever": 1000 + 500}


@pytest.mark.slow
@pytest.mark.parametrize("drill", list(PROCESSOR_DRILLS))
def test_a_misbehaving_processor_is_stopped_and_the_video_goes_on(runtimes, caplog, drill):
    """Chained before ``hello``: the bad processor's calls fail one by one (the frame passes
    unchanged), it is disabled after 5 in a row, and ``hello`` keeps getting every frame."""
    wasm, limits, message = PROCESSOR_DRILLS[drill]
    rt = runtimes(limits=SandboxLimits(**limits))
    bad, hello = rt.load_bytes(wasm, "bad"), rt.load(HELLO_WASM)
    with caplog.at_level(logging.ERROR, logger="vision_host"):
        run = run_drill(rt, [bad, hello])
    assert_flowing(run, max_gap_ms=DRILL_STALL_MS.get(drill, 250.0))
    assert message in bad.last_error, bad.last_error
    assert bad.disabled and bad.stats.errors == 5
    assert logged(caplog, f"processor bad: {bad.last_error}; the frame passes on unchanged")
    assert logged(caplog, "processor bad disabled after 5 failed calls in a row")
    assert hello.stats.calls == FRAMES and hello.stats.errors == 0
    assert_no_leak(run)
    assert len(bad.ctx.mats) == 0       # a disabled processor holds nothing


def test_a_processor_failing_every_other_frame_is_never_disabled_and_leaks_nothing(runtimes, real_frame):
    """Failures that do not come 5 in a row: the processor stays on, each failed call drops
    the mats it made, and the good calls' output flows."""
    wasm = module("""(module
      (import "wasm:cv/mat" "[static]mat.new-with-size" (func $new (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $n (mut i32) (i32.const 0))
      (func (export "process") (param i32) (result i32)
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (drop (call $new (i32.const 64) (i32.const 64) (i32.const 16)))     ;; made, then …
        (if (i32.and (global.get $n) (i32.const 1)) (then unreachable))     ;; … the call fails
        (local.get 0)))""")
    rt = runtimes()
    p = rt.load_bytes(wasm, "flaky")
    run = run_drill(rt, [p])
    assert_flowing(run)
    assert not p.disabled and p.stats.errors == FRAMES // 2
    assert "unreachable" in p.last_error
    # the good calls keep their mat (the processor owns it): one per good call, bounded by
    # max_live_mats; the failed calls' mats are gone
    assert len(p.ctx.mats) == FRAMES // 2
    assert run.after.rss - run.before.rss < 48 * 2**20


# -- 2. .wasm files that cannot run ---------------------------------------------------------
WASM_FILE_DRILLS = {
    "truncated": (HELLO_WASM.read_bytes()[:100], "is not a valid WebAssembly module (failed to parse WebAssembly "
                  "module: unexpected end-of-file"),
    "not-wasm": (b"<html>404 not found</html>", "is not a WebAssembly module (it does not start with the \\0asm "
                 "magic bytes): rebuild it or pick the right file"),
    "missing-process": (module('(module (memory (export "memory") 1) (func (export "other")))'),
                        "does not export `process` (expected `process(frame: u32) -> u32`)"),
    "imports-what-the-host-lacks": (
        module('(module (import "wasm:cv/cv" "no-such-filter" (func (param i32))) (memory (export "memory") 1)'
               ' (func (export "process") (param i32) (result i32) (local.get 0)))'),
        "imports wasm:cv/cv#no-such-filter, which vision-host does not provide"),
}


@pytest.mark.parametrize("drill", list(WASM_FILE_DRILLS))
def test_a_wasm_file_that_cannot_run_is_refused_with_a_sentence(runtimes, tmp_path, drill):
    """The runtime refuses the file with a sentence naming it and the fix, and stays usable:
    a good processor loaded next runs the clip, and the failed load left nothing behind."""
    data, message = WASM_FILE_DRILLS[drill]
    path = tmp_path / f"{drill}.wasm"
    path.write_bytes(data)
    rt = runtimes()
    hello = rt.load(HELLO_WASM)
    run = run_drill(rt, [hello], frames=WARM + 1)           # baseline: threads and files of a running pipeline
    for _ in range(20):                                     # load it again and again: nothing piles up
        with pytest.raises(ProcessorLoadError) as info:
            rt.load(path)
        assert message in str(info.value) and str(path) in str(info.value)
    run = run_drill(rt, [hello])
    assert_flowing(run)
    assert_no_leak(run)
    assert Snapshot.take([hello]).fds <= run.before.fds + 3


def _cli(args: list[str], cwd, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """``python -m vision_host run ARGS`` on the clip (unpaced, 120 frames, to a file)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "host") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "vision_host", "run", "-s", str(SAMPLE_CLIP), "--no-pace", "--max-frames", "120",
           "-o", "file", "-d", str(cwd / "out.mp4"), "--stats", str(cwd / "stats.json"), "--no-cache", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("drill", ["truncated", "not-wasm"])
def test_the_cli_refuses_a_broken_wasm_with_the_same_sentence_and_no_traceback(tmp_path, drill):
    data, message = WASM_FILE_DRILLS[drill]
    (tmp_path / "bad.wasm").write_bytes(data)
    result = _cli(["-p", "./bad.wasm", "-p", "hello"], tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


# -- 3. vision servers that misbehave -------------------------------------------------------
def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


_LINE = b'{"model":"llava","created_at":"2025-01-01T00:00:00Z","response":" bottles","done":false}\n'
HUGE_CHUNKS = [_LINE * 1200] * 200           # ~20 MB of a never-ending caption
HTML_PAGE = [b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n",
             b"<body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>\n"]
BAD_UTF8 = [b'{"response":"Bottles \xff\xfe gleam","done":false}\n',
            b'{"response":" caf\xc3","done":false}\n{"response":"\xa9 blue","done":true}\n']


@dataclass
class ServerDrill:
    """A misbehaving vision server: how to start it, and what the user must be told."""

    start: object                  # () -> (url, stop)
    message: str                   # in the ollama processor's log (URL replaced)
    timeout_ms: int = 1000
    delay_s: float = 0.003


def _standin(failure, **kw):
    def start():
        server = OllamaStandin(failure=failure, **kw)
        return server.url, server.stop
    return start


def _reply(status, content_type, chunks):
    def start():
        server = ReplyServer(status, content_type, chunks)
        return server.url, server.stop
    return start


SERVER_DRILLS = {
    "refuses-connections": ServerDrill(lambda: (_closed_port_url(), lambda: None),
                                       "cannot reach Ollama at URL, retrying in 1 s", delay_s=0.005),
    "refuses-with-http-500": ServerDrill(_standin("http500"),
                                         "server error 500: llama runner process has terminated: exit status 2"),
    "resets-mid-stream": ServerDrill(_standin("reset"), "the connection to Ollama at URL broke during the reply"),
    "drips-a-byte-at-a-time": ServerDrill(_standin("drip", drip_delay_s=0.02), "Ollama at URL timed out",
                                          delay_s=0.006),
    "answers-20-mb": ServerDrill(_reply(200, "application/x-ndjson", HUGE_CHUNKS),
                                 "the reply from Ollama at URL exceeded the response size limit and was cut off"),
    "sends-an-html-page-with-200": ServerDrill(_reply(200, "text/html", HTML_PAGE),
                                               "URL answered with an HTML page, not the generate API: "
                                               "check ollama-url and ollama-api"),
}


@pytest.mark.slow
@pytest.mark.parametrize("drill", list(SERVER_DRILLS))
def test_a_misbehaving_server_is_reported_and_the_video_never_waits(runtimes, caplog, drill):
    """The ollama processor against a bad server for a whole run: every frame flows without
    a stall, the problem is logged once (and drawn on the video), and nothing accumulates."""
    spec = SERVER_DRILLS[drill]
    url, stop = spec.start()
    try:
        rt = runtimes(config={"ollama-url": url, "ollama-interval-ms": "0", "ollama-timeout-ms": str(spec.timeout_ms)})
        p = rt.load(OLLAMA_WASM)
        with caplog.at_level(logging.INFO, logger="vision_host"):
            run = run_drill(rt, [p], delay_s=spec.delay_s)
    finally:
        stop()
    assert_flowing(run)
    message = spec.message.replace("URL", url)
    assert len(logged(caplog, message)) == 1, [r.getMessage() for r in caplog.records][-10:]
    assert p.stats.errors == 0 and not p.disabled and p.last_error is None   # the processor is healthy
    assert rt.processor_store.get("captions", "caption") is None
    assert_no_leak(run)
    p.close()
    assert p.ctx.fetch.in_flight == 0


@pytest.mark.slow
def test_invalid_utf8_in_the_streamed_caption_becomes_replacement_characters(runtimes, caplog):
    server = ReplyServer(200, "application/x-ndjson", BAD_UTF8)
    try:
        rt = runtimes(config={"ollama-url": server.url, "ollama-interval-ms": "0"})
        p = rt.load(OLLAMA_WASM)
        with caplog.at_level(logging.INFO, logger="vision_host"):
            run = run_drill(rt, [p], delay_s=0.002)
    finally:
        server.stop()
    assert_flowing(run)
    assert rt.processor_store.get("captions", "caption") == "Bottles \ufffd\ufffd gleam caf\ufffd\ufffd blue"
    assert logged(caplog, f"Ollama at {server.url} is answering (model llava)")
    assert p.stats.errors == 0 and p.last_error is None and rt.fetch_stats.completed >= 2
    assert_no_leak(run)


# -- 4. config values of the wrong type or out of range -------------------------------------
BAD_OLLAMA_CONFIG = {
    "ollama-interval-ms": ("abc", "0–86400000", "3000"),
    "ollama-max-tokens": ("-5", "1–4096", "40"),
    "ollama-jpeg-quality": ("1000", "1–100", "80"),
    "ollama-timeout-ms": ("1e99", "1000–3600000", "60000"),
    "ollama-image-max-side": ("7", "0 or 32–16384", "672"),
    "ollama-font-scale": ("nan", "0.1–10", "0.6"),
    "ollama-max-lines": ("", None, None),          # empty: the default, silently
    "ollama-paused": ("maybe", "true or false", "false"),
    "ollama-caption-placement": ("middle", "top or bottom", "bottom"),
}


@pytest.mark.slow
def test_bad_ollama_config_values_are_each_reported_once_and_captions_still_flow(runtimes, caplog):
    server = OllamaStandin()
    try:
        config = {k: v for k, (v, _, _) in BAD_OLLAMA_CONFIG.items()}
        rt = runtimes(config={"ollama-url": server.url, **config})
        p = rt.load(OLLAMA_WASM)
        with caplog.at_level(logging.INFO, logger="vision_host"):
            run = run_drill(rt, [p], delay_s=0.002)
    finally:
        server.stop()
    assert_flowing(run)
    for key, (value, expected, default) in BAD_OLLAMA_CONFIG.items():
        if expected is None:
            continue
        lines = logged(caplog, f'config {key}="{value}" is invalid')
        assert len(lines) == 1, (key, [r.getMessage() for r in caplog.records if "config" in r.getMessage()])
        assert "using the default" in lines[0] and default in lines[0], lines[0]
    assert rt.processor_store.get("captions", "caption")           # the defaults work
    body = server.requests[0].body
    assert body["options"]["num_predict"] == 40
    assert p.stats.errors == 0 and p.last_error is None
    assert_no_leak(run)


@pytest.mark.parametrize("args, message", [
    (["--processor-timeout-ms", "0"], "argument --processor-timeout-ms: 0 must be greater than 0"),
    (["--memory-limit-mb", "-5"], "argument --memory-limit-mb: -5 must be greater than 0"),
    (["--processor-timeout-ms", "abc"], "argument --processor-timeout-ms"),
])
def test_bad_cli_values_are_refused_before_anything_starts(tmp_path, args, message):
    result = _cli(["-p", "hello", *args], tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.slow
def test_a_config_table_in_the_run_file_is_reported_by_the_processor_and_the_run_goes_on(tmp_path):
    """``[config] ollama-interval-ms = { a = 1 }``: the run file gives a table where a value
    belongs; the processor reports the value as invalid and uses its default, every frame
    is written."""
    import json
    run_file = tmp_path / "run.toml"
    url = _closed_port_url()
    run_file.write_text(f'[config]\nollama-url = "{url}"\nollama-interval-ms = {{ a = 1 }}\n')
    result = _cli(["-f", str(run_file), "-p", "ollama"], tmp_path)
    assert result.returncode == 1, result.stderr       # nothing listens at the URL: no caption completed
    assert "no caption completed: " in result.stderr and f"to Ollama at {url} failed" in result.stderr
    assert "config ollama-interval-ms=" in result.stderr and "is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames_in"] == stats["frames_out"] == 120


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ['processor-timeout-ms = "abc"', "memory-limit-mb = { x = 1 }",
                                     "processor-timeout-ms = -3"])
def test_bad_sandbox_values_in_the_run_file_are_refused_with_a_sentence(tmp_path, sandbox):
    run_file = tmp_path / "run.toml"
    run_file.write_text(f"[sandbox]\n{sandbox}\n")
    result = _cli(["-f", str(run_file), "-p", "hello"], tmp_path)
    key = sandbox.split(" ")[0]
    assert result.returncode == 2 and key in result.stderr and "Traceback" not in result.stderr


# -- the list of the issue, all present ----------------------------------------------------
def test_every_drill_of_the_issue_is_in_this_file():
    """The issue's list, drill by drill, against the tables above (so none silently goes)."""
    drills = (set(PROCESSOR_DRILLS) | set(WASM_FILE_DRILLS) | set(SERVER_DRILLS)
              | {"invalid-utf8-caption", "bad-ollama-config", "bad-cli-values"})
    wanted = {"traps", "loops-forever", "allocates-memory-without-bound", "allocates-mats-without-bound",
              "returns-unknown-handle", "passes-out-of-bounds-pointer", "passes-invalid-utf8", "truncated",
              "not-wasm", "missing-process", "imports-what-the-host-lacks", "refuses-connections",
              "resets-mid-stream", "drips-a-byte-at-a-time", "answers-20-mb", "invalid-utf8-caption",
              "sends-an-html-page-with-200", "bad-ollama-config", "bad-cli-values"}
    assert wanted <= drills, wanted - drills
