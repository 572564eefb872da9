"""Benchmarks (pytest-benchmark). Run with figures:

    python -m pytest tests/test_bench.py --benchmark-enable

Without ``--benchmark-enable`` (the default in CI) each body runs once, as a smoke test.
"""

from __future__ import annotations

import time

import cv2
import pytest

from conftest import REPO, SAMPLE_CLIP
from ollama_standin import OllamaStandin
from vision_host.outputs import FileOutput
from vision_host.pipeline import Pipeline
from vision_host.runtime import NetworkPolicy
from vision_host.sources import FileSource

FRAMES = 1189


@pytest.fixture
def standin():
    server = OllamaStandin(latency_s=0.5)
    yield server
    server.stop()


def test_ollama_call_per_frame(benchmark, runtime_factory, standin, real_frame):
    """Steady-state cost of one `ollama` process call: poll-free, caption drawn (µs)."""
    cfg = {"ollama-url": standin.url, "ollama-interval-ms": "3600000"}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    p = rt.load(REPO / "wasm" / "ollama.wasm")
    frame = real_frame.copy()
    deadline = time.monotonic() + 10
    while rt.processor_store.get("captions", "caption") is None:
        assert time.monotonic() < deadline
        p.process(frame)
        time.sleep(0.01)
    benchmark(p.process, frame)
    assert p.stats.errors == 0


def _opencv_loop(path, out_path, frames):
    cap = cv2.VideoCapture(str(path))
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), cap.get(cv2.CAP_PROP_FPS), (640, 360))
    for _ in range(frames):
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(frame)
    writer.release()
    cap.release()


def _pipeline(runtime_factory, url, out_path, frames):
    cfg = {"ollama-url": url, "ollama-interval-ms": "500"}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    processors = [rt.load(REPO / "wasm" / "ollama.wasm")]
    source = FileSource(str(SAMPLE_CLIP), pace=False)
    output = FileOutput(out_path)
    output.open(source.width, source.height, source.fps)
    try:
        stats = Pipeline(source, processors, [output], rt).run(frames)
    finally:
        output.close()
        source.close()
    return stats


def test_pipeline_fps_vs_plain_opencv(benchmark, runtime_factory, standin, tmp_path):
    """Whole pipeline (-p ollama, file output, --no-pace) vs an OpenCV read+write loop."""
    started = time.perf_counter()
    _opencv_loop(SAMPLE_CLIP, tmp_path / "plain.mp4", FRAMES)
    opencv_fps = FRAMES / (time.perf_counter() - started)
    stats = benchmark.pedantic(_pipeline, args=(runtime_factory, standin.url, tmp_path / "vh.mp4", FRAMES),
                               rounds=1, iterations=1)
    ratio = stats["fps"] / opencv_fps
    benchmark.extra_info.update(pipeline_fps=stats["fps"], opencv_fps=round(opencv_fps, 1),
                                fps_ratio_vs_opencv=round(ratio, 3), captions=stats["captions"]["completed"])
    print(f"\npipeline {stats['fps']:.1f} fps, plain OpenCV {opencv_fps:.1f} fps, ratio {ratio:.2f}")
    assert stats["frames_out"] == FRAMES


_HOST_CALLS = 1000


def test_host_call_round_trip(benchmark, runtime_factory, real_frame):
    """One process() making 1000 host calls (`[method]mat.get-uchar-at`, the call wasmVision's
    asciify makes per pixel): the per-call cost of crossing the boundary is this / 1000."""
    from wat import module
    wasm = module(f"""(module
      (import "wasm:cv/mat" "[method]mat.get-uchar-at" (func $at (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "process") (param $f i32) (result i32)
        (local $i i32)
        (loop $again
          (drop (call $at (local.get $f) (i32.const 10) (local.get $i)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $again (i32.lt_u (local.get $i) (i32.const {_HOST_CALLS}))))
        (local.get $f)))""")
    p = runtime_factory().load_bytes(wasm, "caller")
    assert benchmark(p.process, real_frame) is real_frame
    assert p.last_error is None
