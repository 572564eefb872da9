"""The Zig processors built on the generated SDK, against OpenCV run directly in Python.

* `cvcheck` (processor/cvcheck/main.zig) applies one SDK call per frame, chosen by config
  `op`, and returns the image result or stores a JSON text in the processor store (processor
  "cvcheck", key = op). Every op is compared with the same OpenCV call made here on the same
  frame: exactly where OpenCV is deterministic, with tolerances where it is not (feature
  detectors, FLANN) or where the SDK passes f32 parameters that Python passes as f64.
* the ports of wasmVision's processors (gaussianblur, captions, faceblur, asciify) on real
  footage;
* the generated bindings (processor/sdk/wit.zig) are current and import exactly the world's
  functions with the world's core signatures; no processor leaks mats or memory per frame.

The ops' parameters are written twice, in cvcheck and here: change both together.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import wasmtime

from conftest import PEOPLE_CLIP, REPO
from vision_host.runtime import Runtime, SandboxLimits

ROOT = REPO
WASM = ROOT / "wasm"
FACE_CASCADE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"

#: Generous per-call deadline: KAZE or HOG on a full frame take 100+ ms in the host.
SLOW = SandboxLimits(call_timeout_ms=5000)


# ==========================================================================================
# Helpers
# ==========================================================================================
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Compiled-module cache shared by the module's runtimes (each op gets a fresh one)."""
    return tmp_path_factory.mktemp("cwasm")


class Run:
    """One processor call: the returned frame, the stored JSON (or None), the processor."""

    def __init__(self, out, result, processor, runtime):
        self.out, self.result, self.processor, self.runtime = out, result, processor, runtime


@pytest.fixture
def run(cache_dir):
    """``run(name, frame, config=…, limits=…, store=…)``: load wasm/<name>.wasm in a new
    Runtime, process a copy of ``frame`` once, return a :class:`Run`."""
    made = []

    def go(name: str, frame: np.ndarray, config: dict | None = None, limits=SLOW,
           store: dict | None = None, frames: int = 1, println=None, models_dir=None) -> Run:
        rt = Runtime(config or {}, limits=limits, cache_dir=cache_dir, println=println, models_dir=models_dir)
        made.append(rt)
        for (proc, key), value in (store or {}).items():
            rt.processor_store.set(proc, key, value)
        p = rt.load(WASM / f"{name}.wasm")
        out = None
        for _ in range(frames):
            out = p.process(frame.copy())
        assert p.last_error is None, f"{name}: {p.last_error}"
        op = (config or {}).get("op")
        stored = rt.processor_store.get("cvcheck", op) if op else None
        return Run(out, json.loads(stored) if stored else None, p, rt)

    yield go
    for rt in made:
        rt.close()


@pytest.fixture
def cvcheck(run, real_frame):
    """``cvcheck(op, frame=real_frame)`` → Run; fails on a stored {"error": …}."""

    def go(op: str, frame: np.ndarray | None = None, **kw) -> Run:
        r = run("cvcheck", real_frame if frame is None else frame, config={"op": op, **kw.pop("config", {})}, **kw)
        if r.result is not None and set(r.result) == {"error", "message"}:
            pytest.fail(f"cvcheck op {op} failed in the processor: {r.result['error']}: {r.result['message']}")
        return r

    return go


def gray(f: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)


def blurred(f: np.ndarray) -> np.ndarray:
    return cv2.blur(f, (5, 5))


def edges(f: np.ndarray) -> np.ndarray:
    return cv2.Canny(gray(f), 50, 150)


def xywh_to_rect(boxes) -> list[list[int]]:
    return [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in (boxes if len(boxes) else [])]


def drawn(f: np.ndarray, draw) -> np.ndarray:
    out = f.copy()
    draw(out)
    return out


def ones3(rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols, 3), np.uint8)
    out[..., 0] = 1
    return out


def first_channel(f: np.ndarray, fn) -> np.ndarray:
    out = f.copy()
    out[..., 0] = fn(out[..., 0])
    return out


def clip_u8(a) -> np.ndarray:
    return np.clip(a, 0, 255).astype(np.uint8)


def set_at_expected(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    flat = out.reshape(out.shape[0], -1)
    flat[10, 20] = 7
    flat[11, 21] = 255          # set-int-at 300, saturated
    flat[12, 22] = 4            # set-float-at 3.6, rounded
    out[20, 30, 1] = 9
    out[21, 31, 2] = 0          # set-int-at3 -5, saturated
    out[22, 32, 0] = 250        # set-float-at3 250.4, rounded
    return out


def copy_to_expected(f: np.ndarray) -> np.ndarray:
    out = f.copy()
    out[50:200, 100:300] = cv2.blur(f[50:200, 100:300].copy(), (15, 15))
    return out


def blob_params():
    return cv2.dnn.Image2BlobParams(
        scalefactor=(1 / 127.5,) * 4, size=(320, 240), mean=(127.5, 127.5, 127.5), swapRB=True,
        ddepth=cv2.CV_32F, datalayout=cv2.dnn.DNN_LAYOUT_NCHW, mode=cv2.dnn.DNN_PMODE_LETTERBOX,
        borderValue=(0, 0, 0))


#: op → (expected image from the frame, absolute tolerance).
IMAGE_OPS = {
    # mat
    "new-with-size": (lambda f: np.zeros((100, 200, 3), np.uint8), 0),
    "zeros": (lambda f: np.zeros((50, 80), np.float32), 0),
    "ones": (lambda f: ones3(40, 30), 0),
    "clone": (lambda f: f, 0),
    "region": (lambda f: f[50:200, 100:300], 0),
    "copy-to": (copy_to_expected, 0),
    "copy-to-new": (lambda f: f, 0),
    "convert-to": (lambda f: f.astype(np.float32), 0),
    "convert-to-with-params": (lambda f: clip_u8(np.rint(f * 0.5 + 10)), 1),
    "set-at": (set_at_expected, 0),
    "add-uchar": (lambda f: first_channel(f, lambda c: clip_u8(c.astype(int) + 30)), 0),
    "subtract-uchar": (lambda f: first_channel(f, lambda c: clip_u8(c.astype(int) - 30)), 0),
    "multiply-uchar": (lambda f: clip_u8(f.astype(int) * 2), 0),
    "divide-uchar": (lambda f: clip_u8(np.rint(f / 3)), 1),
    "add-float": (lambda f: first_channel(f.astype(np.float32), lambda c: c + 1.5), 1e-5),
    "subtract-float": (lambda f: first_channel(f.astype(np.float32), lambda c: c - 1.5), 1e-5),
    "multiply-float": (lambda f: f.astype(np.float32) * 0.5, 1e-5),
    "divide-float": (lambda f: f.astype(np.float32) / 4, 1e-5),
    "reshape": (lambda f: f.reshape(360, 1920), 0),
    "reshape-rows": (lambda f: f.reshape(720, 320, 3), 0),
    "row-range": (lambda f: f[100:200], 0),
    "col-range": (lambda f: f[:, 50:150], 0),
    "row": (lambda f: f[5:6], 0),
    "col": (lambda f: f[:, 7:8], 0),
    "merge": (lambda f: cv2.merge([gray(f), edges(f), gray(f)]), 0),
    # cv: drawing (colours are RGBA in the SDK, BGR here)
    "arrowed-line": (lambda f: drawn(f, lambda o: cv2.arrowedLine(o, (20, 30), (300, 200), (0, 0, 255), 3)), 0),
    "rectangle": (lambda f: drawn(f, lambda o: cv2.rectangle(o, (50, 60), (400, 300), (0, 255, 0), 2)), 0),
    "circle": (lambda f: drawn(f, lambda o: cv2.circle(o, (320, 180), 80, (255, 0, 0), 4)), 0),
    "line": (lambda f: drawn(f, lambda o: cv2.line(o, (0, 0), (639, 359), (0, 255, 255), 1)), 0),
    "put-text": (lambda f: drawn(f, lambda o: cv2.putText(o, "Hello vision-host", (30, 100), cv2.FONT_HERSHEY_SIMPLEX,
                                                         1.5, (255, 255, 255), 2, cv2.LINE_AA)), 0),
    # cv: image processing
    "adaptive-threshold": (lambda f: cv2.adaptiveThreshold(gray(f), 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                                           cv2.THRESH_BINARY, 11, 2), 0),
    "blur": (lambda f: cv2.blur(f, (7, 5)), 0),
    "box-filter": (lambda f: cv2.boxFilter(f, -1, (9, 9)), 0),
    "canny": (edges, 0),
    "cvt-color": (gray, 0),
    "cvt-color-rgb": (lambda f: cv2.cvtColor(f, cv2.COLOR_BGR2RGB), 0),
    "dilate": (lambda f: cv2.dilate(f, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))), 0),
    "erode": (lambda f: cv2.erode(f, cv2.getStructuringElement(cv2.MORPH_RECT, (5, 5))), 0),
    "structuring-element": (lambda f: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 5)), 0),
    "equalize-hist": (lambda f: cv2.equalizeHist(gray(f)), 0),
    "gaussian-blur": (lambda f: cv2.GaussianBlur(f, (9, 9), 2.0, sigmaY=2.0, borderType=cv2.BORDER_DEFAULT), 0),
    "hough-lines": (lambda f: cv2.HoughLines(edges(f), 1, np.pi / 180, 100), 1e-5),
    "hough-lines-p": (lambda f: cv2.HoughLinesP(edges(f), 1, np.pi / 180, 50), 0),
    "median-blur": (lambda f: cv2.medianBlur(f, 5), 0),
    "resize": (lambda f: cv2.resize(f, (320, 180), interpolation=cv2.INTER_LINEAR), 0),
    "resize-fx": (lambda f: cv2.resize(f, (0, 0), fx=0.5, fy=0.25, interpolation=cv2.INTER_NEAREST), 0),
    "threshold": (lambda f: cv2.threshold(f, 100, 255, cv2.THRESH_BINARY)[1], 0),
    "transpose-nd": (lambda f: np.ascontiguousarray(gray(f).T), 0),
    "estimate-affine2d": (lambda f: np.array([[0.9, -0.2, 15], [0.1, 1.1, -7]]), 1e-3),
    "warp-affine": (lambda f: cv2.warpAffine(f, cv2.getRotationMatrix2D((320, 180), 30, 0.8), (640, 360)), 1),
    "get-rotation-matrix2d": (lambda f: cv2.getRotationMatrix2D((320, 180), 30, 0.8), 1e-9),
    # cv: arithmetic (second operand: 5 × 5 box blur of the frame)
    "add": (lambda f: cv2.add(f, blurred(f)), 0),
    "subtract": (lambda f: cv2.subtract(f, blurred(f)), 0),
    "multiply": (lambda f: cv2.multiply(f, blurred(f)), 0),
    "divide": (lambda f: cv2.divide(f, blurred(f)), 0),
    "add-weighted": (lambda f: cv2.addWeighted(f, 0.7, blurred(f), 0.3, 5), 1),
    "hconcat": (lambda f: cv2.hconcat([f, blurred(f)]), 0),
    "vconcat": (lambda f: cv2.vconcat([f, blurred(f)]), 0),
    "exp": (lambda f: cv2.exp(gray(f).astype(np.float32) / 64), 1e-3),
    "lut": (lambda f: cv2.LUT(f, (255 - np.arange(256)).astype(np.uint8).reshape(1, 256)), 0),
    "reduce": (lambda f: cv2.reduce(gray(f), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S), 0),
    "reduce-avg": (lambda f: cv2.reduce(f, 1, cv2.REDUCE_AVG, dtype=cv2.CV_32F), 1e-3),
    "reduce-arg-max": (lambda f: cv2.reduceArgMax(gray(f), 0), 0),
    "normalize": (lambda f: cv2.normalize(gray(f), None, 10, 100, cv2.NORM_MINMAX), 1),
    # dnn
    "blob-from-image": (lambda f: cv2.dnn.blobFromImage(f, 1 / 255, (300, 300), (10, 20, 30), swapRB=True,
                                                        crop=False), 1e-5),
    "blob-from-image-with-params": (lambda f: cv2.dnn.blobFromImageWithParams(f, blob_params()), 1e-4),
}


def assert_image(out: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    expected = np.asarray(expected)
    assert out.shape == expected.shape, f"{what}: shape {out.shape}, OpenCV gives {expected.shape}"
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype}, OpenCV gives {expected.dtype}"
    if atol == 0:
        diff = np.argwhere(out != expected)
        assert diff.size == 0, (f"{what}: {len(diff)} elements differ, first at {tuple(diff[0])}: "
                                f"{out[tuple(diff[0])]} vs {expected[tuple(diff[0])]}")
    else:
        np.testing.assert_allclose(out.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=1e-6,
                                   err_msg=what)


# ==========================================================================================
# cvcheck: image results
# ==========================================================================================
@pytest.mark.parametrize("op", sorted(IMAGE_OPS))
def test_image_op_matches_opencv(cvcheck, real_frame, op):
    expected_fn, atol = IMAGE_OPS[op]
    r = cvcheck(op)
    assert_image(r.out, expected_fn(real_frame), atol, op)
    assert len(r.processor.ctx.mats) == 0, "mats left in the table after the call"


def test_copy_to_blurs_only_the_region(cvcheck, real_frame):
    out = cvcheck("copy-to").out
    outside = np.ones(real_frame.shape[:2], bool)
    outside[50:200, 100:300] = False
    assert np.array_equal(out[outside], real_frame[outside])
    assert not np.array_equal(out[50:200, 100:300], real_frame[50:200, 100:300])


# ==========================================================================================
# cvcheck: values
# ==========================================================================================
def test_info(cvcheck, real_frame):
    assert cvcheck("info").result == {"cols": 640, "rows": 360, "mattype": 16, "step": 1920, "elemsize": 3,
                                      "empty": False, "size": [360, 640]}


def test_empty_mat_and_close(cvcheck):
    init = cvcheck("init").result
    assert init["empty"] is True and init["shape"]["rows"] == 0 and init["shape"]["cols"] == 0
    assert cvcheck("close").result == {"before": False, "after": True, "cols": 0, "rows": 0}


def test_element_reads(cvcheck, real_frame):
    f = real_frame
    flat = f.reshape(f.shape[0], -1)
    r = cvcheck("reads").result
    pts2 = [(0, 0), (10, 20), (123, 456), (359, 1919), (5, 1925)]
    # (5, 1925) runs past the end of row 5 into row 6, as OpenCV's `at` on continuous data
    want2 = [int(f.reshape(-1)[row * 1920 + col]) for row, col in pts2]
    assert r["uchar"] == want2 and r["int"] == want2 and r["float"] == want2
    pts3 = [(0, 0, 0), (10, 20, 1), (200, 600, 2)]
    want3 = [int(f[x, y, z]) for x, y, z in pts3]
    assert r["uchar3"] == want3 and r["int3"] == want3 and r["float3"] == want3
    px = [(0, 0), (10, 20), (359, 639)]
    want_px = [f[row, col].tolist() for row, col in px]
    assert r["vecb"] == want_px and r["veci"] == want_px and r["vecf"] == want_px
    assert flat[10, 20] == r["uchar"][1]


def test_float_mat_reads_and_writes(cvcheck, real_frame):
    r = cvcheck("float-mat")
    f = real_frame.astype(np.float32)
    assert r.result["float"] == 0.25 and r.result["int"] == -7 and r.result["float3"] == 2.5
    assert r.result["int3"] == 1000 and r.result["uchar3"] == 77 and r.result["uchar"] == 0  # -7 clamped
    assert r.result["vecf"] == [f[1, 0, 0], f[1, 0, 1], 0.25]
    assert r.result["veci"] == [int(f[3, 1, 0]), -7, int(f[3, 1, 2])]
    want = f.copy()
    want[1, 0, 2], want[3, 1, 1], want[5, 6, 1], want[7, 8, 2], want[9, 10, 0] = 0.25, -7, 2.5, 1000, 77
    assert_image(r.out, want, 0, "float-mat")


def test_min_max_loc(cvcheck, real_frame):
    r = cvcheck("min-max-loc").result
    mn, mx, mnloc, mxloc = cv2.minMaxLoc(gray(real_frame))
    assert (r["min_val"], r["max_val"], r["min_loc"], r["max_loc"]) == (mn, mx, list(mnloc), list(mxloc))
    assert r["bgr"]["error"] == "Failed" and r["bgr"]["message"], "a 3-channel mat must be an error"


def test_rotation_matrix_values(cvcheck):
    r = cvcheck("get-rotation-matrix2d").result
    want = cv2.getRotationMatrix2D((320, 180), 30, 0.8).reshape(-1)
    np.testing.assert_allclose(r["m"], want, rtol=1e-6)          # read back through get-float-at (f32)
    assert r["shape"] == {"rows": 2, "cols": 3, "mattype": 6, "size": [2, 3]}


def test_estimate_affine_agrees_with_opencv(cvcheck):
    pts = np.array([[10, 20], [200, 40], [50, 300], [400, 250], [600, 100], [320, 180]], np.float32)
    to = np.stack([0.9 * pts[:, 0] - 0.2 * pts[:, 1] + 15, 0.1 * pts[:, 0] + 1.1 * pts[:, 1] - 7], 1).astype(np.float32)
    want, _ = cv2.estimateAffine2D(pts, to)
    np.testing.assert_allclose(cvcheck("estimate-affine2d").out, want, atol=1e-4)


def test_error_results_carry_the_hosts_message(cvcheck):
    r = cvcheck("error-result").result
    for key in ("gaussian", "add"):
        assert r[key]["error"] == "Failed" and len(r[key]["message"]) > 10, r


def test_norm(cvcheck, real_frame):
    r = cvcheck("norm").result
    g = gray(real_frame)
    assert r["inf"] == cv2.norm(g, cv2.NORM_INF)
    assert math.isclose(r["l1"], cv2.norm(g, cv2.NORM_L1), rel_tol=1e-6)
    assert math.isclose(r["l2"], cv2.norm(g, cv2.NORM_L2), rel_tol=1e-6)


def test_blob_rects_to_image_rects(cvcheck):
    r = cvcheck("blob-rects-to-image-rects").result
    want = blob_params().blobRectsToImageRects([(10, 20, 100, 200), (0, 0, 320, 240)], (640, 360))
    assert r["rects"] == xywh_to_rect(want)


def test_nms_boxes(cvcheck):
    boxes = [(10, 10, 110, 110), (15, 12, 115, 112), (200, 200, 260, 280), (205, 198, 262, 285), (400, 50, 450, 90)]
    scores = [0.9, 0.8, 0.7, 0.95, 0.3]
    want = cv2.dnn.NMSBoxes([(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes], scores, 0.5, 0.4)
    assert cvcheck("nms-boxes").result["keep"] == [int(i) for i in np.array(want).reshape(-1)]


def test_missing_models_are_errors_not_traps(cvcheck):
    net = cvcheck("net-missing").result
    assert net["read"]["error"] == "Failed" and "no-such-model.onnx" in net["read"]["message"]
    assert net["read_onnx"]["error"] == "Failed"
    assert "layer_name" in net
    yn = cvcheck("face-yn-missing").result
    assert yn["size"] == [640, 360] and math.isclose(yn["score"], 0.9, rel_tol=1e-6)
    assert math.isclose(yn["nms"], 0.3, rel_tol=1e-6) and yn["topk"] == 5000
    assert yn["set"][:2] == [320, 240] and yn["set"][4] == 7
    assert math.isclose(yn["set"][2], 0.5) and math.isclose(yn["set"][3], 0.25)
    assert yn["detect"]["error"] == "Failed" and "no-such-yunet.onnx" in yn["detect"]["message"]
    assert yn["params"][:2] == [100, 80] and yn["params"][4] == 9
    sf = cvcheck("face-sf-missing").result
    for key in ("feature", "align_crop", "match", "match_l2", "params_feature"):
        assert sf[key]["error"] == "Failed" and sf[key]["message"], key
    missing = cvcheck("cascade-missing").result
    assert missing["loaded"] is False and missing["detect"]["error"] == "Failed"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A models directory holding `cvcheck-tiny.onnx`: ReLU then global average pooling of a
    1 × 3 × 32 × 32 input."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["data"], ["relu_out"], name="relu"),
         helper.make_node("GlobalAveragePool", ["relu_out"], ["pool_out"], name="pool")],
        "cvcheck-tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("pool_out", TensorProto.FLOAT, [1, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder = tmp_path_factory.mktemp("models")
    onnx.save(model, str(folder / "cvcheck-tiny.onnx"))
    return folder


def test_net_runs_an_onnx_model(cvcheck, real_frame, models_dir):
    r = cvcheck("net", models_dir=models_dir)
    net = cv2.dnn.readNetFromONNX(str(models_dir / "cvcheck-tiny.onnx"))
    names = list(net.getLayerNames())
    unconnected = [int(i) for i in np.array(net.getUnconnectedOutLayers()).reshape(-1)]
    assert r.result["empty"] is False and r.result["read_empty"] is False
    assert r.result["names"] == names and r.result["unconnected"] == unconnected
    assert r.result["out_layer"] == net.getLayer(unconnected[0]).name
    blob = cv2.dnn.blobFromImage(real_frame, 1 / 255, (32, 32))
    net.setInput(blob)
    layers = net.forward(names)
    assert [s["size"] for s in r.result["forward_layers"]] == [list(m.shape) for m in layers]
    net.setInput(blob)
    assert_image(r.out, net.forward(), 1e-5, "net forward")


# -- objdetect ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_frame() -> np.ndarray:
    """A frame of the people clip where OpenCV's frontal-face cascade finds a "face" (the
    clip's people turn their backs to the camera: what the cascade finds on them is what
    faceblur must blur, true face or not)."""
    cap = cv2.VideoCapture(str(PEOPLE_CLIP))
    cc = cv2.CascadeClassifier(FACE_CASCADE)
    try:
        while True:
            ok, frame = cap.read()
            assert ok, f"no frame of {PEOPLE_CLIP} has a face for OpenCV's cascade"
            if len(cc.detectMultiScale(frame)):
                return frame
    finally:
        cap.release()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bottles", "people"])
def test_cascade_matches_opencv(cvcheck, real_frame, face_frame, which):
    frame = real_frame if which == "bottles" else face_frame
    cc = cv2.CascadeClassifier(FACE_CASCADE)
    r = cvcheck("cascade", frame).result
    assert r["loaded"] is True
    assert sorted(r["rects"]) == sorted(xywh_to_rect(cc.detectMultiScale(frame)))
    r = cvcheck("cascade-params", frame).result
    want = cc.detectMultiScale(frame, scaleFactor=1.2, minNeighbors=5, flags=0, minSize=(30, 30))
    assert sorted(r["rects"]) == sorted(xywh_to_rect(want))


@pytest.mark.slow
def test_hog_matches_opencv(cvcheck, real_frame):
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    rects, _ = hog.detectMultiScale(real_frame)
    assert sorted(cvcheck("hog").result["rects"]) == sorted(xywh_to_rect(rects))
    rects, _ = hog.detectMultiScale(real_frame, hitThreshold=0, winStride=(8, 8), padding=(16, 16), scale=1.05,
                                    groupThreshold=2, useMeanshiftGrouping=False)
    assert sorted(cvcheck("hog-params").result["rects"]) == sorted(xywh_to_rect(rects))


# -- features2d -----------------------------------------------------------------------------
DETECTORS = {
    "akaze": (cv2.AKAZE_create, 61),
    "brisk": (cv2.BRISK_create, 64),
    "kaze": (cv2.KAZE_create, 64),
    "orb": (cv2.ORB_create, 32),
    "sift": (cv2.SIFT_create, 128),
}


def kp_array(kps) -> np.ndarray:
    """Key points as rows (x, y, size, angle, response, octave, class_id), sorted."""
    rows = [[k.pt[0], k.pt[1], k.size, k.angle, k.response, k.octave, k.class_id] if hasattr(k, "pt") else k
            for k in kps]
    a = np.array(rows, np.float64).reshape(-1, 7)
    return a[np.lexsort(a.T[::-1])]


def assert_keypoints(got, want, what: str) -> None:
    g, w = kp_array(got), kp_array(want)
    assert len(g) == len(w), f"{what}: {len(g)} key points, OpenCV finds {len(w)}"
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3, err_msg=what)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_matches_opencv(cvcheck, real_frame, name):
    create, width = DETECTORS[name]
    want = create().detect(real_frame)
    assert_keypoints(cvcheck(name).result["kps"], want, f"{name} detect")

    kps, desc = create().detectAndCompute(real_frame, None)
    r = cvcheck(f"{name}-detect-and-compute")
    assert_keypoints(r.result["kps"], kps, f"{name} detect-and-compute")
    assert r.result["desc"]["rows"] == len(kps) and r.result["desc"]["cols"] == width
    assert r.out.shape == desc.shape and r.out.dtype == desc.dtype
    got_sorted = r.out[np.lexsort(np.array(r.result["kps"], np.float64).reshape(-1, 7).T[::-1])]
    want_sorted = desc[np.lexsort(np.array([[k.pt[0], k.pt[1], k.size, k.angle, k.response, k.octave, k.class_id]
                                            for k in kps]).T[::-1])]
    close = np.isclose(got_sorted.astype(np.float64), want_sorted.astype(np.float64), atol=1e-4).all(axis=1)
    assert close.mean() >= 0.99, f"{name}: {close.mean():.1%} of descriptor rows match OpenCV's"

    r = cvcheck(f"{name}-compute").result
    detected = create().detect(real_frame)
    kps_c, desc_c = create().compute(real_frame, detected)
    assert r["n_in"] == len(detected)
    assert_keypoints(r["kps"], kps_c, f"{name} compute")
    assert r["desc"]["rows"] == len(kps_c) and r["desc"]["cols"] == desc_c.shape[1]


@pytest.mark.slow
def test_orb_with_params(cvcheck, real_frame):
    orb = cv2.ORB_create(300, 1.2, 8, 31, 0, 2, cv2.ORB_HARRIS_SCORE, 31, 20)
    assert_keypoints(cvcheck("orb-params").result["kps"], orb.detect(real_frame), "orb-params")


def test_closed_detectors_and_matchers_are_errors(cvcheck):
    r = cvcheck("detector-close").result
    for key in ("akaze", "brisk", "kaze", "orb", "sift", "match", "knn"):
        assert r[key]["error"] == "Failed" and r[key]["message"], key


def descriptor_pair(real_frame, create):
    other = cv2.GaussianBlur(real_frame, (3, 3), 0)
    return create().detectAndCompute(real_frame, None)[1], create().detectAndCompute(other, None)[1]


def test_bf_match(cvcheck, real_frame):
    a, b = descriptor_pair(real_frame, cv2.ORB_create)
    want = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(a, b)
    got = cvcheck("bf-match").result["matches"]
    assert sorted(got) == sorted([[m.queryIdx, m.trainIdx, m.imgIdx, m.distance] for m in want])


def test_bf_knn_match(cvcheck, real_frame):
    a, b = descriptor_pair(real_frame, cv2.ORB_create)
    want = cv2.BFMatcher().knnMatch(a, b, k=2)
    got = cvcheck("bf-knn-match").result["knn"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [m[:3] for m in g] == [[m.queryIdx, m.trainIdx, m.imgIdx] for m in w]
        np.testing.assert_allclose([m[3] for m in g], [m.distance for m in w], rtol=1e-5)


def test_flann_knn_match(cvcheck, real_frame):
    """FLANN's randomised trees are approximate: compared with the exact nearest neighbours."""
    a, b = descriptor_pair(real_frame, cv2.SIFT_create)
    exact = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a, b, k=2)
    got = cvcheck("flann-knn-match").result["knn"]
    assert len(got) == len(a)
    assert all(len(g) == 2 and g[0][3] <= g[1][3] for g in got)
    assert all(g[0][3] >= e[0].distance - 1e-3 for g, e in zip(got, exact)), "better than exact?"
    same = np.mean([g[0][1] == e[0].trainIdx for g, e in zip(got, exact)])
    assert same >= 0.8, f"only {same:.0%} of FLANN's nearest neighbours are the exact ones"


# -- platform -------------------------------------------------------------------------------
def test_config_and_time(cvcheck):
    assert cvcheck("config").result == {"op": "config", "missing": "NoSuchKey"}
    before = time.time_ns() // 1000
    r = cvcheck("time").result
    assert before - 1_000_000 <= r["now_us"] <= time.time_ns() // 1000 + 1_000_000
    assert abs(r["now_ms"] - r["now_us"] // 1000) <= 1000


def test_logging_levels(cvcheck, caplog):
    printed = []
    with caplog.at_level(logging.DEBUG):
        cvcheck("logging", println=printed.append)
    levels = {rec.getMessage(): rec.levelno for rec in caplog.records if "cvcheck logging" in rec.getMessage()}
    assert levels == {"cvcheck logging log": logging.WARNING, "cvcheck logging error": logging.ERROR,
                      "cvcheck logging warn": logging.WARNING, "cvcheck logging info": logging.INFO,
                      "cvcheck logging debug": logging.DEBUG, "cvcheck logging formatted 42": logging.INFO}
    assert printed == ["cvcheck logging println"]


def test_processor_store(cvcheck):
    assert cvcheck("processor-store").result == {"exists_before": False, "keys": ["a", "b"], "exists": True,
                                                 "b": "two", "a_after_delete": "NoSuchKey", "exists_after": False}


def test_frame_store(cvcheck):
    assert cvcheck("frame-store").result == {"exists_before": False, "keys": ["face-0", "face-1"], "exists": True,
                                             "face_1": "5,6,7,8", "face_0_after_delete": "NoSuchKey",
                                             "exists_after": False}


def test_overlay_caption_draws_a_band(cvcheck, real_frame):
    out = cvcheck("overlay").out
    changed = np.any(out != real_frame, axis=2)
    assert changed[:60].mean() > 0.3, "the top band is not drawn"
    assert not changed[200:].any(), "drawn outside the top band"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(b"got " + self.path.encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/image":
            image = json.loads(body)["image"]
            ok = image[:4] == "/9j/"           # base64 of a JPEG's FF D8 FF
            self._reply(json.dumps({"answer": f"jpeg {ok}"}).encode(), "application/json")
        else:
            self._reply(b"posted " + body)


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_blocking_http(cvcheck, http_server):
    r = cvcheck("http", config={"cvcheck-url": http_server}).result
    assert r == {"get": "got /get", "post": "posted cvcheck body", "post_image": "jpeg True",
                 "not_allowed": "DestinationNotAllowed"}


def test_fetch_polls_across_frames(run, real_frame, http_server):
    """`fetch` starts a GET on the first frame and polls it on the next ones (never blocking)."""
    r = run("cvcheck", real_frame, config={"op": "fetch", "cvcheck-url": http_server})
    deadline = time.monotonic() + 10
    while r.runtime.processor_store.get("cvcheck", "fetch") is None and time.monotonic() < deadline:
        time.sleep(0.01)
        r.processor.process(real_frame.copy())
    assert json.loads(r.runtime.processor_store.get("cvcheck", "fetch")) == {"status": 200, "body": "got /fetch"}
    r = run("cvcheck", real_frame, config={"op": "fetch-cancel", "cvcheck-url": http_server})
    assert r.result == {"poll_after_cancel": "UnknownRequest"}


def test_every_op_is_tested():
    source = (ROOT / "processor" / "cvcheck" / "main.zig").read_text()
    ops = set(re.findall(r'\.name = "([^"]+)"', source))
    tested = set(IMAGE_OPS) | {f"{d}{s}" for d in DETECTORS for s in ("", "-compute", "-detect-and-compute")} | {
        "info", "init", "close", "reads", "float-mat", "min-max-loc", "get-rotation-matrix2d", "error-result",
        "norm", "blob-rects-to-image-rects", "nms-boxes", "net-missing", "face-yn-missing", "face-sf-missing",
        "cascade", "cascade-params", "cascade-missing", "hog", "hog-params", "orb-params", "detector-close",
        "bf-match", "bf-knn-match", "flann-knn-match", "config", "time", "logging", "processor-store",
        "frame-store", "overlay", "http", "net", "fetch", "fetch-cancel"}
    assert ops - tested == set(), "cvcheck ops without a test"


# ==========================================================================================
# The ports of wasmVision's processors
# ==========================================================================================
def test_gaussianblur_equals_opencv(run, real_frame):
    out = run("gaussianblur", real_frame).out
    assert_image(out, cv2.GaussianBlur(real_frame, (25, 25), 4.5, sigmaY=4.5, borderType=cv2.BORDER_REFLECT_101),
                 0, "gaussianblur defaults")
    out = run("gaussianblur", real_frame, config={"gaussianblur-size": "7", "gaussianblur-sigma": "0"}).out
    assert_image(out, cv2.GaussianBlur(real_frame, (7, 7), 0, borderType=cv2.BORDER_REFLECT_101), 0,
                 "gaussianblur 7 px")


def test_gaussianblur_bad_config_logged_once_and_default_used(run, real_frame, caplog):
    with caplog.at_level(logging.ERROR):
        r = run("gaussianblur", real_frame, config={"gaussianblur-size": "4", "gaussianblur-sigma": "x"}, frames=3)
    assert_image(r.out, cv2.GaussianBlur(real_frame, (25, 25), 4.5, borderType=cv2.BORDER_REFLECT_101), 0,
                 "defaults after bad config")
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert sum("gaussianblur-size" in m for m in errors) == 1 and sum("gaussianblur-sigma" in m for m in errors) == 1


CAPTION = "a person walks past a white table in an office with a wooden floor and a grey pillar"


def caption_expected(frame, text, words=10, size=0.6, line_height=20, color=(0, 0, 0), outline=True):
    """What the captions processor draws, made with OpenCV here: each line at x = 10 px,
    over a 6 px thick outline in the contrasting colour (white around dark text, black around
    light) unless ``outline`` is false (wasmVision's plain text)."""
    out = frame.copy()
    words_ = text.split()
    b, g, r = color
    halo = (255, 255, 255) if 0.299 * r + 0.587 * g + 0.114 * b < 128 else (0, 0, 0)
    for i in range(0, len(words_), words):
        y = line_height * (i // words + 1)
        line = " ".join(words_[i:i + words])
        if outline:
            cv2.putText(out, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, size, halo, 6, cv2.LINE_AA)
        cv2.putText(out, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, size, color, 2, cv2.LINE_AA)
    return out


def test_captions_draws_the_stored_caption(run, real_frame):
    plain = run("captions", real_frame).out
    assert np.array_equal(plain, real_frame), "no caption stored: the frame must pass unchanged"

    out = run("captions", real_frame, store={("captions", "caption"): CAPTION}).out
    changed = np.any(out != real_frame, axis=2)
    assert changed[:50].sum() > 500, "the caption is not drawn in the top band"
    assert not changed[60:].any(), "two lines of text drawn below the top band?"
    assert_image(out, caption_expected(real_frame, CAPTION), 0, "captions")

    cfg = {"caption-words-per-line": "4", "caption-size": "0.8", "caption-line-height": "30", "caption-color": "red"}
    out = run("captions", real_frame, config=cfg, store={("captions", "caption"): CAPTION}).out
    assert_image(out, caption_expected(real_frame, CAPTION, 4, 0.8, 30, (0, 0, 255)), 0, "captions configured")


def test_captions_bad_config_uses_defaults(run, real_frame, caplog):
    cfg = {"caption-words-per-line": "0", "caption-size": "big", "caption-line-height": "-3",
           "caption-color": "mauve", "caption-outline": "sometimes"}
    with caplog.at_level(logging.ERROR):
        out = run("captions", real_frame, config=cfg, store={("captions", "caption"): CAPTION}, frames=2).out
    assert_image(out, caption_expected(real_frame, CAPTION), 0, "captions defaults")
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    for key in cfg:
        assert sum(key in m for m in errors) == 1, key


def _glyph_contrast(out, frame, text, x, y, size=0.6, thickness=2):
    """Per column of the first glyph of ``text`` drawn at (x, y): the luminance difference
    between its strokes and the 1 px ring around them in ``out``; and the first glyph's
    leftmost changed column. The strokes are where OpenCV itself puts them."""
    canvas = np.zeros(frame.shape[:2], np.uint8)
    cv2.putText(canvas, text[0], (x, y), cv2.FONT_HERSHEY_SIMPLEX, size, 255, thickness, cv2.LINE_AA)
    strokes = canvas > 200
    ring = (cv2.dilate(canvas, np.ones((3, 3), np.uint8)) > 0) & ~(canvas > 0)
    luma = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY).astype(int)
    columns = np.nonzero(strokes.any(axis=0))[0]
    contrast = [abs(luma[:, c][ring[:, c]].mean() - luma[:, c][strokes[:, c]].mean()) for c in columns
                if ring[:, c].any()]
    changed = np.any(out != frame, axis=2)
    return contrast, int(np.nonzero(changed.any(axis=0))[0].min())


@pytest.mark.parametrize("color", ["black", "white"])
def test_captions_first_letter_is_fully_visible_at_the_left_edge(run, real_frame, color):
    """The clip's left edge is a dark strip (x < 23): wasmVision's plain black text put its
    first letter there, where it could not be seen ("cut off"). Every column of the first
    glyph stands out from what surrounds it, and nothing is drawn outside the frame."""
    text = "What a stunning bottle on a lovely table"
    luma = cv2.cvtColor(real_frame, cv2.COLOR_BGR2GRAY)
    assert luma[5:25, :20].mean() < 30 and luma[5:25, 30:200].mean() > 100, "the clip's dark left strip moved?"
    out = run("captions", real_frame, config={"caption-color": color}, store={("captions", "caption"): text}).out
    contrast, left = _glyph_contrast(out, real_frame, text, 10, 20)
    assert left >= 5, f"the caption starts at x={left}, too close to the left edge"
    assert len(contrast) >= 10 and min(contrast) > 60, [round(c) for c in contrast]

    plain = run("captions", real_frame, config={"caption-color": color, "caption-outline": "false"},
                store={("captions", "caption"): text}).out
    assert_image(plain, caption_expected(real_frame, text, color={"black": (0, 0, 0), "white": (255, 255, 255)}[color],
                                         outline=False), 0, "caption-outline=false: wasmVision's plain text")


def test_captions_follows_the_ollama_caption(run, real_frame):
    """ollama stores its caption under captions/caption; a new caption is drawn next frame."""
    r = run("captions", real_frame, store={("captions", "caption"): "first caption"})
    r.runtime.processor_store.set("captions", "caption", "second")
    out = r.processor.process(real_frame.copy())
    assert_image(out, caption_expected(real_frame, "second"), 0, "updated caption")


def test_faceblur_blurs_the_faces_opencv_finds(run, face_frame):
    faces = cv2.CascadeClassifier(FACE_CASCADE).detectMultiScale(face_frame)
    assert len(faces)
    r = run("faceblur", face_frame, config={"faceblur-detect-width": "0"})
    out = r.out
    near = np.zeros(face_frame.shape[:2], bool)
    for x, y, w, h in faces:
        region = (slice(y, y + h), slice(x, x + w))
        diff = np.abs(out[region].astype(int) - face_frame[region].astype(int)).mean()
        assert diff > 3, f"face {x},{y},{w},{h} is not blurred (mean change {diff:.2f})"
        # blurring makes the region smoother
        assert cv2.Laplacian(out[region], cv2.CV_64F).var() < cv2.Laplacian(face_frame[region], cv2.CV_64F).var()
        near[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = True
    assert np.array_equal(out[~near], face_frame[~near]), "pixels away from the faces changed"
    want = face_frame.copy()
    for x, y, w, h in faces:
        want[y:y + h, x:x + w] = cv2.blur(face_frame[y:y + h, x:x + w].copy(), (50, 50))
    assert_image(out, want, 0, "faceblur = OpenCV's box blur of each face")
    assert len(r.processor.ctx.mats) == 0


def test_faceblur_detects_on_a_downscaled_frame(run, face_frame):
    """With `faceblur-detect-width`, faces are found on the frame resized to that width
    (area interpolation) and their rectangles scaled back to the frame."""
    cc = cv2.CascadeClassifier(FACE_CASCADE)
    rows, cols = face_frame.shape[:2]
    for width in (384, 320, 512, 256):
        height = (rows * width + cols // 2) // cols
        small = cv2.resize(face_frame, (width, height), interpolation=cv2.INTER_AREA)
        faces = cc.detectMultiScale(small)
        if len(faces):
            break
    else:
        pytest.skip("no face at any detection width")
    out = run("faceblur", face_frame, config={"faceblur-detect-width": str(width)}).out
    want = face_frame.copy()
    for x, y, w, h in faces:
        x0, x1 = [(v * cols + width // 2) // width for v in (x, x + w)]
        y0, y1 = [(v * rows + height // 2) // height for v in (y, y + h)]
        want[y0:y1, x0:x1] = cv2.blur(face_frame[y0:y1, x0:x1].copy(), (50, 50))
    assert_image(out, want, 0, f"faceblur at detection width {width}")


def test_faceblur_defaults_fit_the_default_deadline(run, face_frame, real_frame):
    r = run("faceblur", face_frame, limits=SandboxLimits(), frames=5)   # 20 ms per call
    assert r.processor.stats.errors == 0
    out = run("faceblur", real_frame).out
    assert np.array_equal(out, real_frame), "no face in the bottle clip: nothing may change"


def test_faceblur_missing_cascade_passes_frames(run, face_frame, caplog):
    with caplog.at_level(logging.ERROR):
        out = run("faceblur", face_frame, config={"faceblur-cascade": "no-such-cascade.xml"}, frames=3).out
    assert np.array_equal(out, face_frame)
    assert sum("no-such-cascade.xml" in rec.getMessage() and "faceblur" in rec.getMessage()
               for rec in caplog.records) == 1


def test_asciify_renders_text_of_the_frame_size(run, real_frame):
    r = run("asciify", real_frame)
    out = r.out
    assert out.shape == real_frame.shape and out.dtype == real_frame.dtype
    assert not np.array_equal(out, real_frame)
    lit = np.any(out > 0, axis=2)
    assert 0.02 < lit.mean() < 0.6, f"{lit.mean():.1%} of the pixels are lit"
    assert set(np.unique(out[..., 0])) == set(np.unique(out[..., 2])), "white text on black expected"
    # brighter areas of the frame get denser characters
    g = gray(real_frame).astype(float)
    bright, dark = g > np.percentile(g, 80), g < np.percentile(g, 20)
    assert lit[bright].mean() > lit[dark].mean()
    assert len(r.processor.ctx.mats) == 0


def test_asciify_columns_rows_and_print(run, real_frame):
    printed = []
    cfg = {"asciify-columns": "40", "asciify-rows": "10", "asciify-print": "true"}
    out = run("asciify", real_frame, config=cfg, println=printed.append).out
    assert out.shape == real_frame.shape
    assert len(printed) == 10 and all(len(line) == 40 for line in printed)
    small = cv2.cvtColor(cv2.resize(real_frame, (40, 10), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    ramp = " .,:;i1tfLCG08@"

    def art(g):
        return ["".join(ramp[int(v) * len(ramp) // 256] for v in row) for row in g]

    assert printed == art(cv2.equalizeHist(small))
    printed.clear()
    run("asciify", real_frame, config={**cfg, "asciify-equalize": "false"}, println=printed.append)
    assert printed == art(small)


def test_asciify_fits_the_default_deadline(run, real_frame):
    r = run("asciify", real_frame, limits=SandboxLimits(), frames=5)
    assert r.processor.stats.errors == 0


# ==========================================================================================
# No per-frame leaks
# ==========================================================================================
@pytest.mark.slow
@pytest.mark.parametrize("name,config", [
    ("gaussianblur", {}), ("captions", {}), ("asciify", {}), ("faceblur", {"faceblur-detect-width": "0"}),
    ("cvcheck", {"op": "copy-to"}), ("cvcheck", {"op": "orb-detect-and-compute"}),
    ("cvcheck", {"op": "bf-knn-match"}), ("cvcheck", {"op": "reads"}), ("cvcheck", {"op": "frame-store"}),
])
def test_no_per_frame_leaks(run, face_frame, name, config):
    r = run(name, face_frame, config=config, store={("captions", "caption"): CAPTION})
    p = r.processor
    for _ in range(3):
        p.process(face_frame.copy())
    memory = p.memory_bytes
    for _ in range(10):
        p.process(face_frame.copy())
        assert len(p.ctx.mats) == 0, "mats left in the host's table after process"
    assert p.memory_bytes == memory, "guest memory grows frame after frame"
    assert p.stats.errors == 0


# ==========================================================================================
# The generated bindings
# ==========================================================================================
@pytest.mark.slow
def test_generated_bindings_are_current():
    res = subprocess.run([sys.executable, str(ROOT / "processor" / "bindgen.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_bindings_import_exactly_the_world(tmp_path):
    """Every raw import of wit.zig, forced into one module, has the core signature that
    `wasm-tools component embed --dummy-names legacy wasm/wit -w processor` gives."""
    tool = shutil.which("wasm-tools") or str(Path(sys.executable).parent / "wasm-tools")
    if not Path(tool).exists():
        pytest.skip("wasm-tools is not installed")
    sys.path.insert(0, str(ROOT / "processor"))
    import build  # noqa: E402  (processor/build.py)
    out = tmp_path / "bindings.wasm"
    res = subprocess.run(build.zig_cmd("build-exe", "-fno-entry", "--export=imports", "-target", "wasm32-wasi",
                                       "-O", "ReleaseSmall", f"-femit-bin={out}",
                                       str(ROOT / "processor" / "sdk" / "bindings_check.zig")),
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dummy = tmp_path / "dummy.wasm"
    subprocess.run([tool, "component", "embed", "--dummy-names", "legacy", str(ROOT / "wasm" / "wit"),
                    "-w", "processor", "-o", str(dummy)], check=True, capture_output=True)
    engine = wasmtime.Engine()

    def imports(path):
        return {(i.module, i.name): (tuple(map(str, i.type.params)), tuple(map(str, i.type.results)))
                for i in wasmtime.Module(engine, path.read_bytes()).imports}

    ours, world = imports(out), imports(dummy)
    assert set(ours) == set(world)
    assert {k: v for k, v in ours.items() if world[k] != v} == {}
    assert len(ours) > 150
