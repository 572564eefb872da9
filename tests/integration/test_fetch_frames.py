"""Several recent frames in one request: ``keep-frame`` and ``post-frames`` (the host's ring of
frame copies, ``vision_host.runtime.frame_ring``) called as a processor calls them, against the
real Ollama stand-in.

Every frame is a flat grey image whose level encodes its index, so a decoded JPEG says which
frame it is; the ring's clock is injected so that frames are kept at chosen times.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import cv2
import numpy as np
import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Driver
from guest_call import BUMP_REALLOC
from vision_host.runtime import NetworkPolicy
from vision_host.runtime.abi import AbiError
from vision_host.runtime.fetch import FetchError
from vision_host.runtime.frame_ring import (MAX_CAPACITY, FrameRing, FramesLayout, compose_grid, frames_jpeg_body,
                                            label_text, downscale)
from vision_host.runtime.linking import HOST_FUNCTIONS

F = "vision-host:platform/fetch"
TRAP = (AbiError, wasmtime.Trap)
IMAGES, GRID = int(FramesLayout.IMAGES), int(FramesLayout.GRID)
OLLAMA = b'{"model":"llava","prompt":"what changed?","stream":false,"images":[%EACH%"%IMAGE%"%END%]}'
ONE_IMAGE = b'{"model":"llava","prompt":"what changed?","stream":false,"images":["%IMAGE%"]}'
OPENAI = (b'{"model":"llava","messages":[{"role":"user","content":[{"type":"text","text":"what changed?"},'
          b'%EACH%{"type":"image_url","image_url":{"url":"data:image/jpeg;base64,%IMAGE%"}}%END%]}]}')


class Clock:
    """A settable clock for the ring (seconds)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def grey(level: int, w: int = 160, h: int = 90) -> np.ndarray:
    return np.full((h, w, 3), level, np.uint8)


def level_of(i: int) -> int:
    """Grey level of frame ``i``: 40, 60, 80, … (0 stays free for empty grid tiles)."""
    return 40 + 20 * i


@pytest.fixture
def frames_driver(driver, standin):
    host = standin.url.split("//")[1]
    d = driver([(F, "keep-frame"), (F, "post-frames"), (F, "poll"), (F, "cancel")],
               policy=NetworkPolicy(allowed={host}))
    d.clock = Clock()
    d.ctx.frame_ring = FrameRing(clock=d.clock)
    return d


def keep(d, handle: int, max_side: int = 0, capacity: int = 16, ret: int | None = None) -> FetchError | None:
    """``keep-frame``; None on success, else the fetch-error."""
    ret = d.retarea() if ret is None else ret
    d.call(F, "keep-frame", handle, max_side, capacity, ret)
    return None if d.u8(ret) == 0 else FetchError(d.u8(ret + 1))


def post_frames(d, url: str, handle: int, template: bytes = OLLAMA, count: int = 4, span_ms: int = 3000,
                layout: int = IMAGES, max_side: int = 0, quality: int = 90) -> tuple[bool, int]:
    """``post-frames``: (True, request id) or (False, fetch-error)."""
    ret = d.retarea()
    d.call(F, "post-frames", *d.put_str(url), *d.put_str("application/json"), *d.put(template), handle,
           max_side, quality, count, span_ms, layout, ret)
    return (True, d.u32(ret + 4)) if d.u8(ret) == 0 else (False, FetchError(d.u8(ret + 4)))


def finish(d, rid: int, timeout_s: float = 10.0) -> int:
    """Poll request ``rid`` until done; its HTTP status."""
    ret = d.retarea()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d.call(F, "poll", rid, ret)
        assert d.u8(ret) == 0, FetchError(d.u8(ret + 4)).name
        status, done = struct.unpack("<HB", d.mem.read(ret + 4, 3))
        if done:
            return status
        time.sleep(0.005)
    raise AssertionError(f"request {rid} did not finish within {timeout_s} s")


def sent(d, standin, url: str, handle: int, **kw):
    """Post, wait for the reply, and return the stand-in's record of the request."""
    ok, rid = post_frames(d, url, handle, **kw)
    assert ok, rid
    assert finish(d, rid) == 200
    return standin.requests[-1]


def decoded(jpegs) -> list[np.ndarray]:
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    assert all(i is not None for i in images)
    return images


def keep_at(d, times_and_levels, capacity: int = 16, max_side: int = 0, w: int = 160, h: int = 90) -> None:
    for t, level in times_and_levels:
        d.clock.t = t
        assert keep(d, d.mats.insert(grey(level, w, h)), max_side, capacity) is None


# -- images layout ------------------------------------------------------------------------------
def test_four_frames_nearest_to_the_moments_oldest_first(frames_driver, standin):
    d = frames_driver
    keep_at(d, [(i * 0.5, level_of(i)) for i in range(7)], capacity=7)        # t = 0 … 3 s
    d.clock.t = 4.0
    ok, rid = post_frames(d, standin.url + "/api/generate", d.mats.insert(grey(230)), max_side=64)
    assert ok
    keep_at(d, [(4.0 + i / 10, 250) for i in range(7)], capacity=7)          # overwrite the ring at once
    assert finish(d, rid) == 200
    req = standin.requests[-1]
    assert isinstance(req.body, dict) and len(req.body["images"]) == 4
    images = decoded(req.images)
    # moments 1, 2, 3 s: frames 2, 4, 6; then the current frame; as they were when posted
    assert [round(float(i.mean())) for i in images] == pytest.approx([80, 120, 160, 230], abs=3)
    assert all(i.shape == (36, 64, 3) for i in images)                        # 160×90 within 64


def test_fewer_frames_early_in_a_stream_and_valid_json(frames_driver, standin):
    d = frames_driver
    url = standin.url + "/api/generate"
    current = d.mats.insert(grey(230))
    d.clock.t = 4.0
    only = sent(d, standin, url, current)                                    # nothing kept yet
    assert len(only.body["images"]) == 1 and decoded(only.images)[0].mean() == pytest.approx(230, abs=3)
    keep_at(d, [(2.0, level_of(0)), (2.5, level_of(1)), (3.0, level_of(2))])
    d.clock.t = 4.0                                                          # moment 1 s is before the oldest
    req = sent(d, standin, url, current)
    assert [round(float(i.mean())) for i in decoded(req.images)] == pytest.approx([40, 80, 230], abs=3)
    for count, span_ms in ((1, 3000), (0, 3000), (4, 0)):                     # just the frame
        assert len(sent(d, standin, url, current, count=count, span_ms=span_ms).images) == 1


def test_openai_image_parts(frames_driver, standin):
    d = frames_driver
    keep_at(d, [(float(i), level_of(i)) for i in range(4)])
    d.clock.t = 4.0
    req = sent(d, standin, standin.url + "/v1/chat/completions", d.mats.insert(grey(230)), template=OPENAI,
               count=3, span_ms=2000)
    parts = req.body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "image_url"]
    assert [round(float(i.mean())) for i in decoded(req.images)] == pytest.approx([80, 100, 230], abs=3)


def test_workers_ai_image_bytes():
    t0 = [(1.0, grey(level_of(0))), (2.0, grey(level_of(1))), (3.0, grey(230))]
    body = json.loads(frames_jpeg_body(t0, b'{"prompt":"p","frames":[%EACH%{"image":%IMAGE_BYTES%}%END%]}',
                                       FramesLayout.IMAGES, 0, 90)())
    means = [decoded([bytes(f["image"])])[0].mean() for f in body["frames"]]
    assert means == pytest.approx([40, 60, 230], abs=3) and body["prompt"] == "p"
    grid = json.loads(frames_jpeg_body(t0, b'{"image":%IMAGE_BYTES%,"prompt":"a %IMAGE% b"}',
                                       FramesLayout.GRID, 200, 90)())
    assert grid["prompt"] == "a %IMAGE% b"
    assert decoded([bytes(grid["image"])])[0].shape == (112, 200, 3)        # 2×2 of 160×90, within 200


# -- grid layout ---------------------------------------------------------------------------------
def tile_means(image: np.ndarray, rows: int, cols: int) -> list[int]:
    """Mean level of the lower-right quarter of each tile (away from its label), row by row."""
    h, w = image.shape[0] // rows, image.shape[1] // cols
    return [round(float(image[r * h + h // 2:(r + 1) * h - 2, c * w + w // 2:(c + 1) * w - 2].mean()))
            for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize("n, rows, cols, max_side, size", [
    (4, 2, 2, 200, (112, 200)),          # 320×180 shrunk to 200: tiles 100×56
    (3, 2, 2, 0, (180, 320)),            # the fourth tile empty (black)
    (9, 3, 3, 0, (270, 480)),
    (2, 1, 2, 100, (28, 100)),
])
def test_grid_geometry_order_and_labels(frames_driver, standin, n, rows, cols, max_side, size):
    d = frames_driver
    keep_at(d, [(float(i), level_of(i)) for i in range(n - 1)])
    d.clock.t = float(n - 1)
    req = sent(d, standin, standin.url + "/api/generate", d.mats.insert(grey(230)), template=ONE_IMAGE,
               count=n, span_ms=(n - 1) * 1000, layout=GRID, max_side=max_side)
    assert len(req.images) == 1
    image = decoded(req.images)[0]
    assert image.shape[:2] == size and (not max_side or max(size) <= max_side)
    expected = [level_of(i) for i in range(n - 1)] + [230] + [0] * (rows * cols - n)
    assert tile_means(image, rows, cols) == pytest.approx(expected, abs=4)
    th, tw = size[0] // rows, size[1] // cols
    for k in range(n):                    # a black box with white text in each tile's top-left corner
        r, c = divmod(k, cols)
        corner = image[r * th:r * th + max(4, th // 6), c * tw:c * tw + max(8, tw // 3)]
        assert corner.min() < 30 and corner.max() > 150, k


def test_grid_tiles_take_the_newest_frames_size_and_labels_read_times():
    frames = [(0.5, grey(level_of(0), 80, 45)), (2.0, grey(230, 160, 90))]    # a smaller kept copy
    grid = compose_grid(frames, 0)
    assert grid.shape == (90, 320, 3)
    assert tile_means(grid, 1, 2) == pytest.approx([40, 230], abs=1)
    assert [label_text(t - 2.0) for t, _ in frames] == ["-1.5 s", "0.0 s"]
    assert label_text(-0.04) == "0.0 s" and label_text(-12.25) == "-12.2 s"


# -- limits and errors ---------------------------------------------------------------------------
def test_capacity_is_clamped_and_trims_at_once(frames_driver):
    d = frames_driver
    ring = d.ctx.frame_ring
    tiny = d.mats.insert(grey(50, 8, 6))
    for capacity, calls, held in ((0, 3, 1), (65, 70, MAX_CAPACITY), (10**9, 3, MAX_CAPACITY), (5, 1, 5)):
        for _ in range(calls):
            d.clock.t += 0.1
            assert keep(d, tiny, 0, capacity) is None
        assert len(ring) == held, capacity
    assert ring.nbytes == 5 * 8 * 6 * 3


def test_count_is_clamped_to_sixteen(frames_driver, standin):
    d = frames_driver
    keep_at(d, [(float(i), 10 + i * 12) for i in range(20)], capacity=32, w=32, h=18)
    d.clock.t = 20.0
    req = sent(d, standin, standin.url + "/api/generate", d.mats.insert(grey(250, 32, 18)), count=17,
               span_ms=15000)
    assert len(req.images) == 16                      # moments 5 … 19 s and the frame (17 would be 17)


def test_bad_handles_layouts_and_templates(frames_driver, standin):
    d = frames_driver
    url = standin.url + "/api/generate"
    frame = d.mats.insert(grey(100))
    with pytest.raises(TRAP, match="unknown or dropped"):
        keep(d, 999)
    with pytest.raises(TRAP, match="unknown or dropped"):
        post_frames(d, url, 999)
    with pytest.raises(TRAP, match="case 2 does not exist"):
        post_frames(d, url, frame, layout=2)
    for template in (ONE_IMAGE, b'{"images":[%EACH%"%IMAGE%"]}', b'{"images":[%END%"%IMAGE%"%EACH%]}'):
        assert post_frames(d, url, frame, template=template) == (False, FetchError.RUNTIME_ERROR)
    assert post_frames(d, url, frame, template=ONE_IMAGE, layout=GRID)[0]   # grid needs no markers
    assert keep(d, d.mats.insert(np.zeros((90, 160, 3), np.float32))) == FetchError.RUNTIME_ERROR
    assert keep(d, d.mats.insert(np.zeros((0, 0), np.uint8))) == FetchError.RUNTIME_ERROR
    assert keep(d, d.mats.insert(np.full((90, 160), 70, np.uint8))) is None  # grey frames are kept as BGR
    assert post_frames(d, "http://203.0.113.9:1/x", frame) == (False, FetchError.DESTINATION_NOT_ALLOWED)


# -- the ring on its own -------------------------------------------------------------------------
def test_a_full_ring_reuses_the_dropped_copy():
    clock = Clock()
    ring = FrameRing(clock=clock)
    ring.keep(grey(10), 80, 1)
    (_, first), = ring.select(2, 1.0, 5.0)
    clock.t = 1.0
    ring.keep(grey(20), 80, 1)
    (t, second), = ring.select(2, 1.0, 5.0)
    assert second is first and t == 1.0 and second.mean() == 20 and second.shape == (45, 80, 3)
    ring.keep(grey(30), 40, 1)                          # another size: a new array
    assert ring.select(2, 1.0, 5.0)[0][1] is not first and ring.nbytes == 40 * 22 * 3


def test_the_byte_cap_drops_the_oldest():
    ring = FrameRing(max_bytes=3 * 160 * 90 * 3)
    for level in range(6):
        ring.keep(grey(level), 0, 64)
    assert len(ring) == 3 and ring.nbytes == 3 * 160 * 90 * 3


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(gaps=st.lists(st.floats(0.001, 2.0), min_size=0, max_size=40), count=st.integers(-2, 20),
       span=st.floats(0.0, 30.0), capacity=st.integers(0, 70), after=st.floats(0.0, 3.0))
def test_selection_invariants(gaps, count, span, capacity, after):
    clock = Clock()
    ring = FrameRing(clock=clock)
    tiny = grey(1, 4, 3)
    for gap in gaps:
        clock.t += gap
        ring.keep(tiny, 0, capacity)
    assert len(ring) <= min(max(1, capacity), MAX_CAPACITY)
    now = clock.t + after
    chosen = [t for t, _ in ring.select(count, span, now)]
    n = min(16, max(1, count))
    assert len(chosen) <= n - 1
    assert chosen == sorted(set(chosen)) and set(chosen) <= set(ring.times())
    if n == 1 or span <= 0:
        assert chosen == []
        return
    spacing = span / (n - 1)
    assert all(t <= now - spacing / 2 for t in chosen)            # the frame itself stands for newer ones
    in_span = [t for t in ring.times() if now - span + 1e-6 <= t <= now - spacing / 2 - 1e-6]
    assert bool(chosen) or not in_span                            # a copy in the span is never left unused


# -- memory stays flat ---------------------------------------------------------------------------
_WAT = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}


def soak_module() -> bytes:
    """A driver (see ``wat.driver_module``) for keep-frame, post-frames and poll that also
    exports ``soak(frame, n, max_side, capacity, ret) -> calls``: n keep-frame calls in a
    loop inside wasm (so the host function, not wasmtime-py's calling of exports, is what
    runs), stopping at the first error; it returns how many succeeded."""
    imports, wrappers = [], []
    for i, name in enumerate(("keep-frame", "post-frames", "poll")):
        spec = HOST_FUNCTIONS[(F, name)]
        sig = f"(param {' '.join(_WAT[c] for c in spec.params)})" + \
            (f" (result {' '.join(_WAT[c] for c in spec.results)})" if spec.results else "")
        imports.append(f'(import "{F}" "{name}" (func $h{i} {sig}))')
        args = " ".join(f"(local.get {j})" for j in range(len(spec.params)))
        wrappers.append(f'(func (export "call:{F}#{name}") {sig} (call $h{i} {args}))')
    return wasmtime.wat2wasm(f"""
(module
  {' '.join(imports)}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  {BUMP_REALLOC}
  (func (export "process") (param i32) (result i32) (local.get 0))
  {' '.join(wrappers)}
  (func (export "soak") (param $frame i32) (param $n i32) (param $max i32) (param $cap i32) (param $ret i32)
        (result i32) (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (call $h0 (local.get $frame) (local.get $max) (local.get $cap) (local.get $ret))
      (br_if $done (i32.load8_u (local.get $ret)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $i))
)""")


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(runtime_factory, standin, capsys):
    """50 000 keep-frame calls (96×54 frames, capacity 8) and one post-frames per 1000:
    the ring never passes its capacity, and what is allocated and still alive after the
    first 1000 calls stays within a small bound (tracemalloc)."""
    host = standin.url.split("//")[1]
    d = Driver(runtime_factory(policy=NetworkPolicy(allowed={host})).load_bytes(soak_module(), "soak"))
    soak = d.processor.exports["soak"]
    url = standin.url + "/api/generate"
    handles = [d.mats.insert(grey(level, 96, 54)) for level in (40, 80, 120, 160)]
    ret = d.retarea()
    batches, batch, capacity = 50, 1000, 8
    tracemalloc.start()
    try:
        started = time.perf_counter()
        for b in range(batches):
            d.processor.deadline.arm(10_000, 10_000)         # as process() does before each call
            assert soak(d.store, handles[b & 3], batch, 0, capacity, ret) == batch
            assert len(d.ctx.frame_ring) <= capacity
            ok, rid = post_frames(d, url, handles[b & 3], count=4, span_ms=20)
            assert ok and finish(d, rid) == 200
            assert len(standin.requests) == 1                # what the stand-in keeps is not the host's
            standin.clear_requests()
            if b == 0:
                warm, _ = tracemalloc.get_traced_memory()
        elapsed = time.perf_counter() - started
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.ctx.frame_ring.nbytes == capacity * 96 * 54 * 3
    with capsys.disabled():
        print(f"\nkeep-frame soak: {batches * batch} calls in {elapsed:.1f} s; traced {warm} B after {batch}, "
              f"{after} B after {batches * batch} (peak {peak} B)")
    assert after - warm < 128 * 1024, (warm, after)


@pytest.mark.parametrize(("size", "max_side", "expected"), [
    ((1920, 1080), 672, (672, 378)),     # halved twice, then the rest
    ((1280, 720), 672, (672, 378)),      # half would be under 672: one general resize
    ((1921, 1081), 672, (672, 378)),     # odd sides: one general resize
    ((640, 360), 672, (640, 360)),       # small enough: a copy
    ((3840, 2160), 0, (3840, 2160)),     # no limit
])
def test_downscale_matches_one_area_resize(real_frame, size, max_side, expected):
    """Halving first (OpenCV's fast whole-factor area path) gives what one area resize gives,
    within a fraction of a grey level on average (a few levels at sharp edges)."""
    frame = cv2.resize(real_frame, size, interpolation=cv2.INTER_CUBIC)     # camera footage at that size
    out = downscale(frame, max_side)
    assert (out.shape[1], out.shape[0]) == expected and out is not frame
    if expected != size:
        one = cv2.resize(frame, expected, interpolation=cv2.INTER_AREA)
        diff = np.abs(out.astype(np.int16) - one)
        assert diff.max() <= 16 and diff.mean() < 0.5
    assert downscale(frame, 0, copy=False) is frame
    ring = FrameRing()                                   # keep-frame shrinks its copies the same way
    ring.keep(frame, max_side, 1)
    assert np.array_equal(ring._kept[-1][1], out)


def test_a_caption_request_takes_only_a_copy_of_the_frame_on_the_frame_loop(real_frame):
    """post-frame's body builder holds its own copy (the frame loop reuses its buffer at once),
    downscaled and encoded when the builder runs on a worker."""
    from vision_host.runtime.fetch import frame_jpeg_body
    frame = cv2.resize(real_frame, (1920, 1080))
    build = frame_jpeg_body(frame, 672, 90, b'{"images":["%IMAGE%"]}')
    frame[:] = 0                                           # the loop's next frame overwrites the buffer
    image = json.loads(build())["images"][0]
    import base64
    sent = cv2.imdecode(np.frombuffer(base64.b64decode(image), np.uint8), cv2.IMREAD_COLOR)
    assert sent.shape == (378, 672, 3)
    assert np.abs(sent.astype(np.int16) - cv2.resize(real_frame, (672, 378), interpolation=cv2.INTER_AREA)).mean() < 3
