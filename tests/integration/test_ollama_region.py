"""`ollama-region`: the `ollama` processor (wasm/ollama.wasm) sends, and with
`ollama-trigger=change` watches, one rectangle of the frame (real frames, the Ollama stand-in
as the server)."""

from __future__ import annotations

import base64
import functools
import logging

import cv2
import numpy as np
import pytest

from ollama_driver import car, load_ollama, run_until, stats_count  # noqa: F401 (car: a fixture)
from ollama_standin import OllamaStandin

STEP_S = 0.01          # one frame every 10 ms
LOGGER = "vision_host.processor.ollama"
#: Mean absolute difference (0-255) of a JPEG sent at quality 80 from the pixels it shows
#: (about 0.8 on these frames; the same crop 10 px off: over 2).
CLOSE = 1.5

_processor = functools.partial(load_ollama, ollama_interval_ms=100)
_count = stats_count


@pytest.fixture
def standin():
    server = OllamaStandin(models=["llava:latest"])
    yield server
    server.stop()









def _sent(standin, frame, p, n=1) -> np.ndarray:
    """Feed ``frame`` until the stand-in has ``n`` requests; the image of the n-th, decoded."""
    run_until(lambda: p.process(frame.copy()), lambda: len(standin.requests) >= n)
    jpeg = base64.b64decode(standin.requests[n - 1].body["images"][0])
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _mad(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_the_region_in_px_is_what_is_sent(runtime_factory, standin, car):
    frame, _ = car
    rt, p = _processor(runtime_factory, standin.url, ollama_region=" 100, 50,300 ,200 ", ollama_image_max_side=0)
    sent = _sent(standin, frame, p)
    assert sent.shape == (200, 300, 3)
    assert _mad(sent, frame[50:250, 100:400]) < CLOSE
    assert _mad(sent, frame[50:250, 110:410]) > CLOSE        # 10 px off is already too far
    store = rt.processor_store
    assert (store.get("ollama", "region"), store.get("ollama", "show-region")) == ("100, 50,300 ,200", "false")


def test_the_region_is_scaled_within_image_max_side(runtime_factory, standin, car):
    frame, _ = car
    rt, p = _processor(runtime_factory, standin.url, ollama_region="100,50,400,200", ollama_image_max_side=200)
    sent = _sent(standin, frame, p)
    assert sent.shape == (100, 200, 3)                      # the region's 2:1, longer side 200
    crop = cv2.resize(frame[50:250, 100:500], (200, 100), interpolation=cv2.INTER_AREA)
    assert _mad(sent, crop) < 4


def test_fractions_of_the_frame(runtime_factory, standin, car):
    frame, _ = car                                           # 768×432
    rt, p = _processor(runtime_factory, standin.url, ollama_region="0.5,0,0.5,1", ollama_image_max_side=0)
    sent = _sent(standin, frame, p)
    assert sent.shape == (432, 384, 3)
    assert _mad(sent, frame[:, 384:]) < CLOSE
    rt.streams[0].set_config({"ollama-region": "0.25,0.5,0.25,0.25"})
    sent = _sent(standin, frame, p, n=2)
    assert sent.shape == (108, 192, 3)
    assert _mad(sent, frame[216:324, 192:384]) < CLOSE
    assert rt.processor_store.get("ollama", "region") == "0.25,0.5,0.25,0.25"


@pytest.mark.parametrize("region, rows, cols", [
    ("600,300,400,400", slice(300, 432), slice(600, 768)),       # past the right and bottom edges
    ("-50,-20,150,100", slice(0, 80), slice(0, 100)),            # before the left and top edges
    ("0.75,0.5,0.5,0.9", slice(216, 432), slice(576, 768)),      # fractions past the edges
])
def test_the_region_is_clamped_to_the_frame(runtime_factory, standin, car, region, rows, cols, caplog):
    frame, _ = car
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        rt, p = _processor(runtime_factory, standin.url, ollama_region=region, ollama_image_max_side=0)
        sent = _sent(standin, frame, p)
    expected = frame[rows, cols]
    assert sent.shape == expected.shape
    assert _mad(sent, expected) < CLOSE
    assert "ollama-region" not in caplog.text


@pytest.mark.parametrize("region", ["1,2,3", "1,2,3,4,5", "10,10,-5,50", "0.5,0,50,1", "0.5,0,0.5,1.5",
                                    "a,b,c,d", "10,10,20,", "left half"])
def test_an_invalid_region_is_reported_once_and_the_whole_frame_sent(runtime_factory, standin, car, region,
                                                                    caplog):
    frame, _ = car
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        rt, p = _processor(runtime_factory, standin.url, ollama_region=region, ollama_image_max_side=0)
        first = _sent(standin, frame, p)
        _sent(standin, frame, p, n=2)
    assert caplog.text.count("ollama-region") == 1, caplog.text
    assert f'config ollama-region="{region}" is invalid' in caplog.text
    assert first.shape == frame.shape and _mad(first, frame) < CLOSE
    assert rt.processor_store.get("ollama", "region") == ""


def test_a_region_empty_on_the_frame_is_reported_once_and_the_whole_frame_sent(runtime_factory, standin, car,
                                                                              caplog):
    frame, _ = car                                           # 768 px wide
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        rt, p = _processor(runtime_factory, standin.url, ollama_region="800,10,50,50", ollama_image_max_side=0)
        first = _sent(standin, frame, p)
        _sent(standin, frame, p, n=2)
    assert caplog.text.count("ollama-region") == 1, caplog.text
    assert "empty" in caplog.text
    assert first.shape == frame.shape and _mad(first, frame) < CLOSE


def test_show_region_outlines_the_region_on_every_frame(runtime_factory, standin, car):
    frame, _ = car
    x0, y0, x1, y1 = 200, 100, 500, 300
    rt, p = _processor(runtime_factory, standin.url, ollama_region=f"{x0},{y0},{x1 - x0},{y1 - y0}",
                       ollama_show_region="true", ollama_overlay="false")
    assert rt.processor_store.get("ollama", "show-region") is None
    for _ in range(3):
        out = p.process(frame.copy())
        changed = np.any(out != frame, axis=2)
        for border in (changed[y0, x0:x1], changed[y1 - 1, x0:x1], changed[y0:y1, x0], changed[y0:y1, x1 - 1]):
            assert border.mean() > 0.95                      # the region's border pixels are drawn on
        assert not changed[y0 + 1:y1 - 1, x0 + 1:x1 - 1].any()   # inside: untouched
        ring = changed.copy()
        ring[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = False
        assert not ring.any()                                # beyond a 2 px outline: untouched
    assert rt.processor_store.get("ollama", "show-region") == "true"
    # the outline is not sent
    sent = _sent(standin, frame, p)
    assert _mad(sent, cv2.resize(frame[y0:y1, x0:x1], sent.shape[1::-1], interpolation=cv2.INTER_AREA)) < 4
    # switched off (the default): nothing drawn
    rt.streams[0].set_config({"ollama-show-region": ""})
    for _ in range(3):
        assert np.array_equal(p.process(frame.copy()), frame)
    assert rt.processor_store.get("ollama", "show-region") == "false"


@pytest.mark.slow
def test_with_trigger_change_only_a_change_inside_the_region_starts_a_request(runtime_factory, standin, car):
    still, _ = car
    region = (468, 0, 300, 432)                              # the right part of the street
    outside, inside = still.copy(), still.copy()
    outside[:, :400] = 255 - outside[:, :400]                # a big change left of the region
    inside[100:300, 500:700] = 255 - inside[100:300, 500:700]
    rt, p = _processor(runtime_factory, standin.url, ollama_region=",".join(map(str, region)),
                       ollama_trigger="change", ollama_interval_ms=0, ollama_min_interval_ms=50)
    run_until(lambda: p.process(still.copy()), lambda: _count(rt, "frames-unchanged") >= 1)   # cooldown over
    assert _count(rt, "requests-change") == 1
    unchanged = _count(rt, "frames-unchanged")
    # frames-unchanged is stored at most once a second (and whenever a request starts)
    run_until(lambda: p.process(outside.copy()), lambda: _count(rt, "frames-unchanged") >= unchanged + 5)
    assert _count(rt, "requests-change") == 1, "a change outside the region started a request"
    p.process(inside.copy())
    assert _count(rt, "requests-change") == 2, "the first frame changed inside the region starts one"
    assert _count(rt, "requests-heartbeat") == 0


@pytest.mark.slow
def test_the_region_leaks_nothing_per_frame(runtime_factory, standin, car):
    still, after = car
    rt, p = _processor(runtime_factory, standin.url, ollama_region="0.1,0.1,0.5,0.5", ollama_show_region="true",
                       ollama_trigger="change", ollama_interval_ms=0, ollama_min_interval_ms=0)
    frames = [still, after]
    i = [0]

    def step(frame=None):
        i[0] += 1
        p.process((frame if frame is not None else frames[i[0] // 3 % 2]).copy())   # a change every 3 frames
        assert len(p.ctx.mats) == 0, "mats left in the host's table after process"
    run_until(step, lambda: len(standin.requests) >= 3 and rt.processor_store.get("captions", "caption"))
    # a still scene: the region's view made (change check) and outlined on every frame
    settled = _count(rt, "frames-unchanged")
    run_until(lambda: step(still), lambda: _count(rt, "frames-unchanged") > settled)   # nothing in flight
    for _ in range(3):
        step(still)
    memory = p.memory_bytes
    unchanged = _count(rt, "frames-unchanged")
    for _ in range(20):
        step(still)
    assert p.memory_bytes == memory, "guest memory grows frame after frame"
    assert p.stats.errors == 0 and p.last_error is None
    run_until(lambda: step(still), lambda: _count(rt, "frames-unchanged") > unchanged)   # it did check
    for request in standin.requests:                        # each sent the region's view
        jpeg = base64.b64decode(request.body["images"][0])
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (216, 384, 3)
