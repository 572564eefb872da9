"""`ollama-trigger=change`: the `ollama` processor (wasm/ollama.wasm) asks the vision server
only when the scene changed (real frames, the Ollama stand-in as the server)."""

from __future__ import annotations

import base64
import logging
import time

import cv2
import numpy as np
import pytest

from conftest import CAR_CLIP
from ollama_driver import car, load_ollama, run_until, stats_count  # noqa: F401 (car: a fixture)
from ollama_standin import OllamaStandin
from vision_host.outputs import FileOutput
from vision_host.pipeline import Pipeline, format_summary
from vision_host.sources import FileSource

STEP_S = 0.01          # one frame every 10 ms

_processor = load_ollama
_count = stats_count


@pytest.fixture
def standin():
    server = OllamaStandin(models=["llava:latest", "bakllava:latest"])
    yield server
    server.stop()









def _by_model(standin, model):
    return [r for r in standin.requests if r.body["model"] == model]


@pytest.mark.slow
def test_a_static_scene_is_asked_once_on_change_but_every_interval_on_interval(runtime_factory, standin, car):
    still, _ = car
    rt_c, change = _processor(runtime_factory, standin.url, ollama_trigger="change", ollama_interval_ms=0,
                              ollama_min_interval_ms=100, ollama_model="llava")
    rt_i, interval = _processor(runtime_factory, standin.url, ollama_interval_ms=100, ollama_model="bakllava")

    def step():
        change.process(still.copy())
        interval.process(still.copy())
    # the same frames to both, until interval mode has asked 5 times and change mode has
    # found the scene unchanged (its counter, stored at most once a second)
    run_until(step, lambda: len(_by_model(standin, "bakllava")) >= 5 and _count(rt_c, "frames-unchanged") >= 5)
    assert len(_by_model(standin, "llava")) == 1
    assert _count(rt_c, "requests-change") == 1 and _count(rt_c, "requests-heartbeat") == 0
    assert _count(rt_i, "requests-interval") >= 5 and _count(rt_i, "frames-unchanged") == 0


def test_a_cut_starts_a_request_on_its_first_frame(runtime_factory, standin, car):
    before, after = car
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger="change", ollama_interval_ms=0,
                       ollama_min_interval_ms=200, ollama_image_max_side=0)
    store = rt.processor_store
    run_until(lambda: p.process(before.copy()), lambda: _count(rt, "frames-unchanged") >= 1)   # cooldown over
    assert _count(rt, "requests-change") == 1
    p.process(after.copy())                                  # the first frame after the cut
    assert _count(rt, "requests-change") == 2, "the request starts on the first changed frame"
    run_until(lambda: p.process(after.copy()), lambda: len(standin.requests) >= 2 and store.get("captions", "caption"))
    jpeg = base64.b64decode(standin.requests[1].body["images"][0])
    sent = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(sent.astype(int) - after).mean() < 4        # the new scene was sent


def test_a_change_during_the_cooldown_waits_for_its_end(runtime_factory, standin, car):
    before, after = car
    cooldown_s = 0.4
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger="change", ollama_interval_ms=0,
                       ollama_min_interval_ms=int(cooldown_s * 1000))
    p.process(before.copy())
    first = time.monotonic()
    assert _count(rt, "requests-change") == 1                 # the first frame is always captioned
    starts = []

    def step():
        p.process(after.copy())                              # the scene changed at once
        if _count(rt, "requests-change") == 2 and not starts:
            starts.append(time.monotonic())
    run_until(step, lambda: bool(starts))
    waited = starts[0] - first
    assert cooldown_s - 0.05 <= waited <= cooldown_s + STEP_S + 0.15, waited   # cooldown + one frame (+ slack)


@pytest.mark.slow
def test_the_heartbeat_asks_a_static_scene_every_interval(runtime_factory, standin, car):
    still, _ = car
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger="change", ollama_interval_ms=300,
                       ollama_min_interval_ms=50)
    run_until(lambda: p.process(still.copy()), lambda: len(standin.requests) >= 3)
    arrived = [r.arrived for r in standin.requests[:3]]
    gaps = np.diff(arrived)
    assert all(0.25 <= g <= 0.6 for g in gaps), gaps
    assert _count(rt, "requests-change") == 1 and _count(rt, "requests-heartbeat") >= 2


def test_invalid_trigger_settings_are_reported_once_and_the_defaults_used(runtime_factory, standin, car, caplog):
    still, _ = car
    with caplog.at_level(logging.ERROR, logger="vision_host.processor.ollama"):
        rt, p = _processor(runtime_factory, standin.url, ollama_trigger="sometimes", ollama_change_threshold="2",
                           ollama_min_interval_ms="-5", ollama_interval_ms=100)
        run_until(lambda: p.process(still.copy()), lambda: len(standin.requests) >= 2)
    for key in ("ollama-trigger", "ollama-change-threshold", "ollama-min-interval-ms"):
        assert caplog.text.count(f"config {key}=") == 1, caplog.text
    assert 'config ollama-trigger="sometimes" is invalid (expected interval or change); using the default interval' \
        in caplog.text
    store = rt.processor_store
    assert store.get("ollama", "trigger") == "interval"
    assert store.get("ollama", "change-threshold") == "0.01"
    assert store.get("ollama", "min-interval-ms") == "1000"
    assert _count(rt, "requests-interval") >= 2 and _count(rt, "requests-change") == 0


def test_valid_trigger_settings_are_in_force_and_change_live(runtime_factory, standin, car):
    still, _ = car
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger=" Change ", ollama_change_threshold="0.25",
                       ollama_min_interval_ms="0")
    p.process(still.copy())
    store = rt.processor_store
    assert (store.get("ollama", "trigger"), store.get("ollama", "change-threshold"),
            store.get("ollama", "min-interval-ms")) == ("change", "0.25", "0")
    rt.streams[0].set_config({"ollama-trigger": "interval", "ollama-change-threshold": "0"})
    p.process(still.copy())
    assert (store.get("ollama", "trigger"), store.get("ollama", "change-threshold")) == ("interval", "0")


@pytest.mark.slow
def test_the_change_check_leaks_nothing_per_frame(runtime_factory, standin, car):
    still, _ = car
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger="change", ollama_interval_ms=0,
                       ollama_min_interval_ms=0)
    run_until(lambda: p.process(still.copy()), lambda: rt.processor_store.get("captions", "caption") is not None)
    for _ in range(3):
        p.process(still.copy())
    memory = p.memory_bytes
    unchanged = _count(rt, "frames-unchanged")
    for _ in range(10):
        p.process(still.copy())
        assert len(p.ctx.mats) == 0, "mats left in the host's table after process"
    assert p.memory_bytes == memory, "guest memory grows frame after frame"
    assert p.stats.errors == 0 and p.last_error is None
    run_until(lambda: p.process(still.copy()), lambda: _count(rt, "frames-unchanged") > unchanged)   # it did check


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["change", "interval"])
def test_the_run_summary_counts_requests_by_trigger(runtime_factory, standin, tmp_path, trigger):
    rt, p = _processor(runtime_factory, standin.url, ollama_trigger=trigger, ollama_interval_ms=0,
                       ollama_min_interval_ms=0)
    source = FileSource(str(CAR_CLIP), pace=False)
    output = FileOutput(tmp_path / "out.mp4")
    output.open(source.width, source.height, source.fps)
    try:
        pipeline = Pipeline(source, [p], [output], rt)
        pipeline.run(120)
    finally:
        output.close()
        source.close()
    c = pipeline.summary()["captions"]
    by = c["requests_by_trigger"]
    assert set(by) == {"interval", "change", "heartbeat"}
    assert sum(by.values()) == rt.fetch_stats.started >= 1
    text = format_summary(pipeline.summary())
    if trigger == "change":
        assert by["change"] >= 1 and by["interval"] == 0
        assert c["frames_unchanged"] == _count(rt, "frames-unchanged")
        assert f"requests: {by['change']} on change" in text and "unchanged frames skipped" in text
    else:
        assert by == {"interval": rt.fetch_stats.started, "change": 0, "heartbeat": 0}
        assert c["frames_unchanged"] == 0 and "on change" not in text
