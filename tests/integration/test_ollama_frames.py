"""`ollama-frames`: the `ollama` processor (wasm/ollama.wasm) sends several recent frames per
request, as separate images or tiled into one grid, against the Ollama and Workers AI
stand-ins. The frames fed are flat colours encoding their index (`indexed_frame`), so each
image the server received says which frame it is."""

from __future__ import annotations

import base64
import logging
import time

import cv2
import numpy as np
import pytest

from ollama_driver import OLLAMA_WASM, frame_index, indexed_frame, load_ollama, run_until, stats_count
from vision_host.runtime import NetworkPolicy

LOGGER = "vision_host.processor.ollama"
PROMPT = "Describe what is in this picture in highly complimentary terms using 6 words or less."
IMAGES_SENTENCE = "The images are consecutive moments of one video, oldest first, over the last {} s. "
GRID_SENTENCE = ("The image is a grid of consecutive moments of one video over the last {} s, oldest first, "
                 "left to right then top to bottom, each labelled with its time in seconds before the newest. ")
STEP_S = 0.01


@pytest.fixture
def workers():
    from workers_ai_standin import WorkersAIStandin
    server = WorkersAIStandin(token="cf-frames")
    yield server
    server.stop()


class Feeder:
    """Feeds :func:`indexed_frame` ``0, 1, 2, …`` one every ``STEP_S`` s, remembering when each
    was processed (``time.monotonic()``) and which frames started a request."""

    def __init__(self, rt, processor):
        self.rt, self.p = rt, processor
        self.times: list[float] = []
        self.started: list[int] = []        # the index of each frame that started a request

    def step(self):
        i = len(self.times)
        before = sum(stats_count(self.rt, f"requests-{k}") for k in ("interval", "change", "heartbeat"))
        self.times.append(time.monotonic())
        out = self.p.process(indexed_frame(i))
        if sum(stats_count(self.rt, f"requests-{k}") for k in ("interval", "change", "heartbeat")) > before:
            self.started.append(i)
        return out

    def until(self, condition, timeout_s: float = 15.0):
        return run_until(self.step, condition, timeout_s, STEP_S)


def _check_moments(feeder, indices, newest, span_s):
    """The frames ``indices`` (oldest first) are the right moments: strictly increasing, the
    last the frame that started the request, the others about span·(n−1−k)/(n−1) before it."""
    n = len(indices)
    assert indices == sorted(set(indices)), indices
    assert indices[-1] == newest, (indices, newest)
    t_new = feeder.times[newest]
    for k, i in enumerate(indices[:-1]):
        ago = t_new - feeder.times[i]
        want = span_s * (n - 1 - k) / (n - 1)
        assert abs(ago - want) <= 0.45, f"frame {i} is {ago:.2f} s old, wanted about {want:.2f} s ({indices})"


def _images_of(req, api):
    """The JPEGs of a request, in the body's order (decoded bytes, as the body carries them)."""
    if api == "openai":
        (message,) = req.body["messages"]
        parts = message["content"]
        assert [p["type"] for p in parts[:-1]] == ["image_url"] * (len(parts) - 1) and parts[-1]["type"] == "text"
        return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts[:-1]]
    images = req.body["messages"][0]["images"] if api == "chat" else req.body["images"]
    return [base64.b64decode(s) for s in images]


def _prompt_of(req, api):
    if api == "openai":
        return req.body["messages"][0]["content"][-1]["text"]
    return req.body["messages"][0]["content"] if api == "chat" else req.body["prompt"]


@pytest.mark.slow
@pytest.mark.parametrize("api", ["generate", "chat", "openai"])
def test_four_frames_over_three_seconds_go_as_four_jpegs_oldest_first(runtime_factory, standin, api):
    rt, p = load_ollama(runtime_factory, standin.url, ollama_api=api, ollama_frames=4, ollama_frames_span_ms=3000,
                        ollama_interval_ms=3500, ollama_image_max_side=320)
    feeder = Feeder(rt, p)
    feeder.until(lambda: len(standin.requests) >= 2 and rt.processor_store.get("captions", "caption") is not None)
    first, second = standin.requests[:2]
    # the first request starts on the first frame: nothing kept yet, the frame alone
    assert [frame_index(img) for img in first.decoded()] == [0]
    jpegs = _images_of(second, api)
    assert len(jpegs) == 4 and second.images == tuple(jpegs)
    decoded = second.decoded()
    assert all(img is not None and img.shape == (180, 320, 3) for img in decoded), [s for s in second.image_shapes]
    assert all(j[:2] == b"\xff\xd8" for j in jpegs)                    # JPEGs
    _check_moments(feeder, [frame_index(img) for img in decoded], feeder.started[1], 3.0)
    assert _prompt_of(second, api) == IMAGES_SENTENCE.format(3) + PROMPT
    assert (rt.processor_store.get("ollama", "frames"), rt.processor_store.get("ollama", "frames-span-ms"),
            rt.processor_store.get("ollama", "frames-layout")) == ("4", "3000", "images")


def _tiles(grid, n):
    """The tiles of a grid of ``n`` frames (ceil(√n) columns), left to right, top to bottom."""
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    h, w = grid.shape[0] // rows, grid.shape[1] // cols
    return [grid[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)][:n]


def _tile_index(tile):
    """The frame index of a tile, read below its time label (the label sits top left)."""
    h, w = tile.shape[:2]
    return frame_index(tile[h // 2:h - 2, 2:w - 2])


@pytest.mark.slow
def test_the_grid_layout_sends_one_jpeg_of_tiles_within_the_max_side(runtime_factory, standin):
    rt, p = load_ollama(runtime_factory, standin.url, ollama_frames=4, ollama_frames_span_ms=900,
                        ollama_frames_layout="GRID", ollama_interval_ms=1100, ollama_image_max_side=400)
    feeder = Feeder(rt, p)
    feeder.until(lambda: len(standin.requests) >= 2 and rt.processor_store.get("captions", "caption") is not None)
    req = standin.requests[1]
    assert len(req.body["images"]) == 1
    (grid,) = req.decoded()
    assert grid is not None and max(grid.shape[:2]) <= 400
    assert abs(grid.shape[1] / grid.shape[0] - 16 / 9) < 0.05         # 2×2 tiles of 16:9 frames
    _check_moments(feeder, [_tile_index(t) for t in _tiles(grid, 4)], feeder.started[1], 0.9)
    assert req.body["prompt"] == GRID_SENTENCE.format("0.9") + PROMPT
    assert rt.processor_store.get("ollama", "frames-layout") == "grid"


@pytest.mark.slow
def test_workers_ai_always_gets_one_grid_and_says_so(runtime_factory, workers, monkeypatch, caplog):
    monkeypatch.setenv("VH_TEST_CF_TOKEN", workers.token)
    cfg = {"ollama-url": workers.run_url, "ollama-api": "workers-ai", "ollama-model": "@cf/llava-hf/llava-1.5-7b-hf",
           "ollama-api-key-env": "VH_TEST_CF_TOKEN", "ollama-frames": "4", "ollama-frames-span-ms": "900",
           "ollama-interval-ms": "1100", "ollama-image-max-side": "400"}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
        p = rt.load(OLLAMA_WASM)
        feeder = Feeder(rt, p)
        feeder.until(lambda: len(workers.requests) >= 2 and rt.processor_store.get("captions", "caption") is not None)
    assert caplog.text.count("Workers AI takes one image per request; the frames are sent tiled into one grid") == 1
    req = workers.requests[1]
    assert isinstance(req.body["image"], list) and bytes(req.body["image"]) == req.image
    grid = cv2.imdecode(np.frombuffer(req.image, np.uint8), cv2.IMREAD_COLOR)
    assert grid is not None and max(grid.shape[:2]) <= 400
    assert abs(grid.shape[1] / grid.shape[0] - 16 / 9) < 0.05
    _check_moments(feeder, [_tile_index(t) for t in _tiles(grid, 4)], feeder.started[1], 0.9)
    assert req.body["prompt"] == GRID_SENTENCE.format("0.9") + PROMPT
    assert rt.processor_store.get("ollama", "frames-layout") == "grid"


#: The exact bodies of one frame, as before ollama-frames: the image first, then the rest.
ONE_FRAME_BODIES = {
    "generate": ('{"images":["%IMAGE%"],"model":"llava","prompt":"' + PROMPT + '","stream":true,'
                 '"options":{"num_predict":40}}'),
    "chat": ('{"messages":[{"role":"user","images":["%IMAGE%"],"content":"' + PROMPT + '"}],"model":"llava",'
             '"stream":true,"options":{"num_predict":40}}'),
    "openai": ('{"messages":[{"role":"user","content":[{"type":"image_url","image_url":'
               '{"url":"data:image/jpeg;base64,%IMAGE%"}},{"type":"text","text":"' + PROMPT + '"}]}],'
               '"model":"llava","stream":true,"max_tokens":40}'),
}


@pytest.mark.parametrize("api", ["generate", "chat", "openai"])
@pytest.mark.parametrize("frames", [None, "1"])
def test_one_frame_sends_the_same_body_as_before(runtime_factory, standin, real_frame, api, frames):
    extra = {} if frames is None else {"ollama_frames": frames}
    rt, p = load_ollama(runtime_factory, standin.url, ollama_api=api, ollama_interval_ms=100, **extra)
    run_until(lambda: p.process(real_frame.copy()), lambda: len(standin.requests) >= 2)
    for req in standin.requests[:2]:
        (jpeg,) = req.images
        b64 = base64.b64encode(jpeg).decode()
        assert req.raw.decode().replace(b64, "%IMAGE%", 1) == ONE_FRAME_BODIES[api]
        assert req.image_shapes == ((360, 640, 3),)
    assert rt.processor_store.get("ollama", "frames") == "1"


def test_out_of_range_frame_settings_are_reported_once_and_the_defaults_used(runtime_factory, standin, caplog):
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        rt, p = load_ollama(runtime_factory, standin.url, ollama_frames=9, ollama_frames_span_ms=50,
                            ollama_frames_layout="mosaic", ollama_interval_ms=100)
        feeder = Feeder(rt, p)
        feeder.until(lambda: len(standin.requests) >= 2)
    for key, value, expected, default in (("ollama-frames", "9", "an integer 1-8", "1"),
                                          ("ollama-frames-span-ms", "50", "an integer 100-60000 ms", "2000"),
                                          ("ollama-frames-layout", "mosaic", "images or grid", "images")):
        line = f'config {key}="{value}" is invalid (expected {expected}); using the default {default}'
        assert caplog.text.count(f"config {key}=") == 1 and line in caplog.text, caplog.text
    store = rt.processor_store
    assert (store.get("ollama", "frames"), store.get("ollama", "frames-span-ms"),
            store.get("ollama", "frames-layout")) == ("1", "2000", "images")
    assert all(len(r.images) == 1 for r in standin.requests)
    assert standin.requests[0].body["prompt"] == PROMPT


@pytest.mark.slow
def test_the_frames_kept_are_of_the_region_sent(runtime_factory, standin):
    # the left half of each frame is the index, the right half white: only the left is sent
    rt, p = load_ollama(runtime_factory, standin.url, ollama_frames=3, ollama_frames_span_ms=600,
                        ollama_interval_ms=800, ollama_region="0,0,320,360", ollama_image_max_side=0)
    times, started = [], []

    def step():
        i = len(times)
        frame = indexed_frame(i)
        frame[:, 320:] = 255
        times.append(time.monotonic())
        before = stats_count(rt, "requests-interval")
        p.process(frame)
        if stats_count(rt, "requests-interval") > before:
            started.append(i)
    run_until(step, lambda: len(standin.requests) >= 2, 15.0, STEP_S)
    decoded = standin.requests[1].decoded()
    assert len(decoded) == 3 and all(img.shape == (360, 320, 3) for img in decoded)
    indices = [frame_index(img) for img in decoded]
    assert indices == sorted(set(indices)) and indices[-1] == started[1]


@pytest.mark.slow
def test_keeping_frames_leaks_nothing_per_frame(runtime_factory, standin):
    rt, p = load_ollama(runtime_factory, standin.url, ollama_frames=8, ollama_frames_span_ms=100,
                        ollama_interval_ms=200)
    feeder = Feeder(rt, p)

    def step():
        feeder.step()
        assert len(p.ctx.mats) == 0, "mats left in the host's table after process"
    run_until(step, lambda: len(standin.requests) >= 3 and rt.processor_store.get("captions", "caption"))
    assert max(len(r.images) for r in standin.requests) <= 8
    # paused: no request, but a copy still kept on every frame (span/14 is less than a frame)
    rt.streams[0].set_config({"ollama-paused": "true"})
    stats = rt.fetch_stats
    run_until(step, lambda: stats.started == stats.completed + stats.failed)      # nothing in flight
    for _ in range(3):
        step()
    memory = p.memory_bytes
    for _ in range(30):
        step()
    assert p.memory_bytes == memory, "guest memory grows frame after frame"
    assert p.stats.errors == 0 and p.last_error is None
