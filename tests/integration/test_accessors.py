"""The ``wasm:cv/mat`` data accessors served inside wasm (``runtime/accessors.py``).

Their results against the host's own implementation on random programs are in
``tests/test_fuzz.py`` (part c); every accessor test of ``tests/test_wasm_cv.py`` and
``tests/test_host_functions.py`` runs through them too (drivers import the accessors). Here:
that they are really served without the host, that what a processor writes through them and
what host functions draw stay coherent within one call, and the cases the host keeps.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import wasmtime

from conftest import CAR_CLIP
from vision_host.runtime import SandboxLimits
from wat import module

M = "wasm:cv/mat"


@pytest.fixture(scope="module")
def car_frame() -> np.ndarray:
    """A 768×432 frame of the shipped car clip."""
    cap = cv2.VideoCapture(str(CAR_CLIP))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (432, 768, 3)
    return frame


#: wasmVision's asciify reading pattern: one get-uchar-at per cell of a 160×90 grid over the
#: frame (rows y·h/90, byte x·w/160·3 + channel x % 3), summed into the global `sum`.
ASCIIFY_READS = module(f"""(module
  (import "{M}" "[method]mat.get-uchar-at" (func $at (param i32 i32 i32) (result i32)))
  (import "{M}" "[method]mat.rows" (func $rows (param i32) (result i32)))
  (import "{M}" "[method]mat.cols" (func $cols (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $sum (export "sum") (mut i32) (i32.const 0))
  (func (export "process") (param $f i32) (result i32)
    (local $x i32) (local $y i32) (local $w i32) (local $h i32)
    (local.set $w (call $cols (local.get $f)))
    (local.set $h (call $rows (local.get $f)))
    (global.set $sum (i32.const 0))
    (loop $rows
      (local.set $x (i32.const 0))
      (loop $cells
        (global.set $sum (i32.add (global.get $sum)
          (call $at (local.get $f)
                    (i32.div_u (i32.mul (local.get $y) (local.get $h)) (i32.const 90))
                    (i32.add (i32.mul (i32.div_u (i32.mul (local.get $x) (local.get $w)) (i32.const 160)) (i32.const 3))
                             (i32.rem_u (local.get $x) (i32.const 3))))))
        (local.set $x (i32.add (local.get $x) (i32.const 1)))
        (br_if $cells (i32.lt_u (local.get $x) (i32.const 160))))
      (local.set $y (i32.add (local.get $y) (i32.const 1)))
      (br_if $rows (i32.lt_u (local.get $y) (i32.const 90))))
    (local.get $f)))""")


def asciify_sum(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    return sum(int(frame[y * h // 90, x * w // 160, x % 3]) for y in range(90) for x in range(160))


def test_14400_reads_a_frame_stay_inside_wasm(runtime_factory, car_frame):
    """asciify's 14 400 reads of a 768×432 frame: the right values, and only a handful of
    calls into the host (describing the frame, loading the 64 KiB stretches read)."""
    p = runtime_factory().load_bytes(ASCIIFY_READS, "asciify-like")
    acc = p.ctx.accessors
    assert acc is not None
    for _ in range(3):
        assert p.process(car_frame) is car_frame
        assert p.exports["sum"].value(p.store) == asciify_sum(car_frame)
    assert p.last_error is None
    per_frame = (acc.describes + acc.loads) / 3
    assert per_frame <= 1 + car_frame.nbytes // (64 * 1024) + 1, per_frame     # ≪ 14 400


def test_switched_off_every_call_goes_to_the_host(runtime_factory, car_frame):
    rt = runtime_factory()
    rt.wasm_accessors = False
    p = rt.load_bytes(ASCIIFY_READS, "asciify-like")
    assert p.ctx.accessors is None
    p.process(car_frame)
    assert p.exports["sum"].value(p.store) == asciify_sum(car_frame)


def test_a_memory_cap_below_the_helpers_memory_leaves_the_accessors_in_the_host(runtime_factory, car_frame):
    p = runtime_factory(limits=SandboxLimits(memory_limit_bytes=128 * 1024)).load_bytes(ASCIIFY_READS, "small")
    assert p.ctx.accessors is None
    p.process(car_frame)
    assert p.exports["sum"].value(p.store) == asciify_sum(car_frame) and p.last_error is None


# One process call: write pixels through the accessors, let host functions read and draw,
# read back through the accessors, through a view too; results stored at 0, 4, 8, ….
COHERENCE = module(f"""(module
  (import "{M}" "[method]mat.set-uchar-at" (func $set (param i32 i32 i32 i32)))
  (import "{M}" "[method]mat.get-uchar-at" (func $get (param i32 i32 i32) (result i32)))
  (import "{M}" "[method]mat.set-float-at" (func $setf (param i32 i32 i32 f32)))
  (import "{M}" "[method]mat.clone" (func $clone (param i32) (result i32)))
  (import "{M}" "[method]mat.add-uchar" (func $add (param i32 i32)))
  (import "{M}" "[method]mat.region" (func $region (param i32 i32 i32 i32 i32) (result i32)))
  (import "{M}" "[method]mat.copy-to" (func $copy (param i32 i32)))
  (import "{M}" "[resource-drop]mat" (func $drop (param i32)))
  (import "wasmvision:platform/logging" "debug" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "hi")
  (func (export "process") (param $f i32) (result i32) (local $c i32) (local $r i32)
    (call $set (local.get $f) (i32.const 5) (i32.const 30) (i32.const 201))   ;; written through wasm …
    (local.set $c (call $clone (local.get $f)))                               ;; … a host copy sees it
    (i32.store (i32.const 0) (call $get (local.get $c) (i32.const 5) (i32.const 30)))
    (call $add (local.get $f) (i32.const 10))                                 ;; the host adds 10 to channel 0
    (i32.store (i32.const 4) (call $get (local.get $f) (i32.const 5) (i32.const 30)))   ;; … seen here
    (local.set $r (call $region (local.get $f) (i32.const 10) (i32.const 5) (i32.const 20) (i32.const 8)))
    (call $set (local.get $r) (i32.const 0) (i32.const 1) (i32.const 77))     ;; through the view (row 5, px 10, G)
    (i32.store (i32.const 8) (call $get (local.get $f) (i32.const 5) (i32.const 31)))   ;; seen in the frame
    (call $set (local.get $f) (i32.const 5) (i32.const 32) (i32.const 66))    ;; through the frame (R) …
    (call $log (i32.const 200) (i32.const 2))                                 ;; (a host call touching no mat)
    (i32.store (i32.const 12) (call $get (local.get $r) (i32.const 0) (i32.const 2)))   ;; … seen in the view
    (call $copy (call $region (local.get $c) (i32.const 10) (i32.const 5) (i32.const 20) (i32.const 8))
                (local.get $r))                                               ;; host writes the view's pixels …
    (i32.store (i32.const 16) (call $get (local.get $f) (i32.const 5) (i32.const 30)))  ;; … from the clone
    (call $drop (local.get $r))
    (call $drop (local.get $c))
    (call $drop (i32.add (local.get $r) (i32.const 1)))                       ;; the clone's region
    (call $set (local.get $f) (i32.const 0) (i32.const 0) (i32.const 1))      ;; left for `process` to flush
    (local.get $f)))""")


@pytest.mark.parametrize("served", [True, False], ids=["served", "host"])
def test_writes_and_host_drawing_stay_coherent_within_a_call(runtime_factory, real_frame, served):
    rt = runtime_factory()
    rt.wasm_accessors = served
    p = rt.load_bytes(COHERENCE, "coherent")
    assert (p.ctx.accessors is not None) == served
    frame = real_frame.copy()
    before = frame.copy()
    assert p.process(frame) is frame and p.last_error is None
    results = np.frombuffer(p.ctx.memory.read(0, 20), np.int32).tolist()
    assert results[0] == 201                                     # the host's clone saw the write
    assert results[1] == 211                                     # the write saw the host's +10
    assert results[2] == 77 and results[3] == 66                 # a view and its mat agree
    # copy-to wrote the clone's 10×3 pixels (taken before the +10) over the view
    assert results[4] == 201
    want = before.copy()
    want[..., 0] = np.clip(want[..., 0].astype(int) + 10, 0, 255)
    snapshot = before.copy()
    snapshot[5, 10, 0] = 201
    want[5:8, 10:20] = snapshot[5:8, 10:20]
    want[0, 0, 0] = 1
    assert np.array_equal(frame, want)
    assert len(p.ctx.mats) == 0
    assert not p.ctx.accessors_live
    if served:      # it was served: the host described the mats and loaded windows, not 14 calls
        assert p.ctx.accessors.loads >= 1


def test_a_failed_call_still_writes_back_what_it_wrote(runtime_factory, real_frame):
    """As through the host: writes before a trap land in the frame of that (first) failed call."""
    wasm = module(f"""(module
      (import "{M}" "[method]mat.set-uchar-at" (func $set (param i32 i32 i32 i32)))
      (memory (export "memory") 1)
      (func (export "process") (param $f i32) (result i32)
        (call $set (local.get $f) (i32.const 1) (i32.const 2) (i32.const 250)) unreachable))""")
    p = runtime_factory().load_bytes(wasm, "writer")
    frame = real_frame.copy()
    assert p.process(frame) is frame and "unreachable" in p.last_error
    assert frame[1, 0, 2] == 250 and not p.ctx.accessors_live


@pytest.mark.parametrize("make, call, expected", [
    (lambda: np.zeros((3, 3), np.float16), "get-uchar-at", 0),                 # a depth the helper leaves to the host
    (lambda: np.full((4, 4), 9, np.uint8)[:, :2], "get-uchar-at", 9),          # a view, not continuous
    (lambda: np.full((2, 70_000), 5, np.uint8)[:, :66_000], "get-uchar-at", 5),  # rows wider than a window
])
def test_mats_the_helper_leaves_to_the_host(runtime_factory, real_frame, make, call, expected):
    wasm = module(f"""(module
      (import "{M}" "[method]mat.{call}" (func $at (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $h (export "h") (mut i32) (i32.const 0))
      (func (export "process") (param $f i32) (result i32)
        (i32.store (i32.const 0) (call $at (global.get $h) (i32.const 1) (i32.const 1))) (local.get $f)))""")
    p = runtime_factory().load_bytes(wasm, "reader")
    h = p.ctx.mats.insert(make())
    p.exports["h"].set_value(p.store, h)
    p.process(real_frame)
    assert p.last_error is None and p.ctx.memory.read(0, 1)[0] == expected


def test_read_only_mats_refuse_writes_as_the_host_does(runtime_factory, real_frame):
    wasm = module(f"""(module
      (import "{M}" "[method]mat.set-uchar-at" (func $set (param i32 i32 i32 i32)))
      (memory (export "memory") 1)
      (global $h (export "h") (mut i32) (i32.const 0))
      (func (export "process") (param $f i32) (result i32)
        (call $set (global.get $h) (i32.const 0) (i32.const 0) (i32.const 1)) (local.get $f)))""")
    errors = []
    for served in (True, False):
        rt = runtime_factory()
        rt.wasm_accessors = served
        p = rt.load_bytes(wasm, "writer")
        locked = np.zeros((4, 4), np.uint8)
        locked.flags.writeable = False
        p.exports["h"].set_value(p.store, p.ctx.mats.insert(locked))
        p.process(real_frame)
        errors.append(p.last_error)
        assert not locked.any()
    assert errors[0] == errors[1] and "read-only" in errors[0]


def test_the_processor_cannot_reach_the_helpers_memory(runtime_factory):
    """The helper's memory (its copies of mats) is its own: the processor is linked to the
    helper's functions only, its own memory is another one, and the helper imports nothing
    but the host's loaders and accessors."""
    rt = runtime_factory()
    p = rt.load_bytes(ASCIIFY_READS, "asciify-like")
    helper = p.ctx.accessors.instance.exports(p.store)
    assert helper["memory"].data_ptr(p.store) != p.exports["memory"].data_ptr(p.store)
    assert all(isinstance(helper[name], wasmtime.Func) for name in p.ctx.accessors.exports)
    assert {imp.module for imp in rt.accessor_module().imports} == {"vision-host:accessors",
                                                                      "vision-host:accessors-fallback"}
