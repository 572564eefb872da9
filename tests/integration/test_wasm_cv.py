"""The whole wasm:cv family (mat, cv, dnn, objdetect, features2d) called through the real wasm
boundary (tests/guest_call.py lowers and lifts values the way guest bindings do), each result
compared with OpenCV computed directly in Python on the same real frame."""

from __future__ import annotations

import logging
import shutil
import struct

import cv2
import numpy as np
import pytest
import wasmtime

from guest_call import FUNCTIONS, Guest, GuestErr
from vision_host.runtime import NetworkPolicy, SandboxLimits
from vision_host.runtime.abi import AbiError
from vision_host.runtime.engine import Runtime
from vision_host.runtime.linking import HOST_FUNCTIONS

M, CV, DNN, OD, F2D = "wasm:cv/mat", "wasm:cv/cv", "wasm:cv/dnn", "wasm:cv/objdetect", "wasm:cv/features2d"
ALL_CV = [k for k in FUNCTIONS if k[0].startswith("wasm:cv/")]
U32_MINUS_1 = 0xFFFF_FFFF
#: What a trapping host call raises in the caller: the host's AbiError comes back out of wasmtime.
TRAP = (AbiError, wasmtime.Trap)


@pytest.fixture
def guest():
    """``guest(models_dir=None)`` → a :class:`Guest` importing every wasm:cv function."""
    runtimes = []

    def make(models_dir=None, functions=ALL_CV):
        rt = Runtime({}, NetworkPolicy(), SandboxLimits(), None, models_dir=models_dir)
        runtimes.append(rt)
        return Guest(rt, functions)

    yield make
    for rt in runtimes:
        rt.close()


@pytest.fixture
def gray(real_frame):
    return cv2.cvtColor(real_frame, cv2.COLOR_BGR2GRAY)


def mat(g, h):
    return g.mats.get(h)


def m(g, name, *args):
    """Call a ``wasm:cv/mat`` method or static function by its short name."""
    full = (f"[static]mat.{name}" if name in ("new-with-size", "merge", "zeros", "ones") else
            "[constructor]mat" if name == "new" else "[resource-drop]mat" if name == "drop" else f"[method]mat.{name}")
    return g.call(M, full, *args)


# -- the contract ---------------------------------------------------------------------------------
def test_every_wasm_cv_function_has_a_host_implementation():
    declared = {k for k in FUNCTIONS if k[0].startswith("wasm:cv/")}
    assert declared and declared <= set(HOST_FUNCTIONS)
    counts = {}
    for module, _ in declared:
        counts[module] = counts.get(module, 0) + 1
    assert counts == {M: 48, CV: 37, DNN: 19, OD: 32, F2D: 41}


def test_importing_the_modules_registers_them():
    from vision_host.runtime import canon, dnn, features2d, objdetect  # noqa: F401
    from vision_host.runtime import cv as cv_module  # noqa: F401
    assert (OD, "[method]cascade-classifier.load") in canon.IMPLEMENTATIONS
    assert (DNN, "[static]net.read-from-ONNX") in canon.IMPLEMENTATIONS
    assert (F2D, "[method]ORB-detector.detect") in canon.IMPLEMENTATIONS


# -- mat: construction and queries ----------------------------------------------------------------
def test_new_with_size_takes_rows_first_and_a_full_type_code(guest):
    g = guest()
    h = m(g, "new-with-size", 240, 320, 16)               # style-transfer: 240 rows, 320 cols, CV_8UC3
    a = mat(g, h)
    assert a.shape == (240, 320, 3) and a.dtype == np.uint8 and not a.any()
    assert (m(g, "rows", h), m(g, "cols", h), m(g, "mattype", h)) == (240, 320, 16)
    assert m(g, "size", h) == [240, 320] and m(g, "step", h) == 960 and m(g, "elemsize", h) == 3
    p = m(g, "new-with-size", 5, 1, 13)                   # face-expression: 5×1 CV_32FC2 points
    assert mat(g, p).shape == (5, 1, 2) and mat(g, p).dtype == np.float32 and m(g, "mattype", p) == 13
    f = m(g, "new-with-size", 4, 6, 5)                    # an enum value (cv32f) is the same code
    assert mat(g, f).shape == (4, 6) and mat(g, f).dtype == np.float32 and m(g, "elemsize", f) == 4
    with pytest.raises(TRAP, match="cap on one mat"):
        m(g, "new-with-size", 100_000, 100_000, 16)
    assert m(g, "rows", h) == 240                          # the instance keeps working


def test_queries_clone_close_and_drop(guest, real_frame):
    g = guest()
    h = g.new_mat(real_frame)
    assert (m(g, "rows", h), m(g, "cols", h), m(g, "mattype", h)) == (360, 640, 16)
    assert m(g, "size", h) == [360, 640] and m(g, "step", h) == 1920 and m(g, "elemsize", h) == 3
    assert m(g, "empty", h) is False
    c = m(g, "clone", h)
    assert c != h and np.array_equal(mat(g, c), real_frame) and not np.shares_memory(mat(g, c), real_frame)
    m(g, "close", c)
    assert m(g, "empty", c) is True and m(g, "size", c) == [] and m(g, "rows", c) == 0   # still a valid handle
    m(g, "drop", c)
    with pytest.raises(TRAP, match="unknown or dropped mat handle"):
        m(g, "rows", c)
    e = m(g, "new", 7)
    assert m(g, "empty", e) is True and m(g, "step", e) == 0
    assert m(g, "cols", h) == 640


def test_zeros_ones_and_merge(guest, real_frame):
    g = guest()
    z = m(g, "zeros", 3, 4, 21)                            # rows first, CV_32FC3
    assert mat(g, z).shape == (3, 4, 3) and mat(g, z).dtype == np.float32 and not mat(g, z).any()
    o = m(g, "ones", 2, 5, 16)
    assert (mat(g, o)[..., 0] == 1).all() and not mat(g, o)[..., 1:].any()     # cv::Mat::ones: first channel
    o1 = m(g, "ones", 3, 2, 5)
    assert np.array_equal(mat(g, o1), np.ones((3, 2), np.float32))
    with pytest.raises(GuestErr, match="cap"):
        m(g, "zeros", 100_000, 100_000, 6)
    b, gr, r = cv2.split(real_frame)
    hs = [g.new_mat(c) for c in (r, gr, b)]
    merged = m(g, "merge", hs)
    assert np.array_equal(mat(g, merged), cv2.merge([r, gr, b]))
    assert all(m(g, "rows", x) == 360 for x in hs)         # inputs are not consumed
    with pytest.raises(GuestErr):
        m(g, "merge", [hs[0], g.new_mat(np.zeros((2, 2), np.uint8))])
    with pytest.raises(GuestErr):
        m(g, "merge", [])


def test_convert_to_matches_opencv(guest, real_frame):
    g = guest()
    h = g.new_mat(real_frame)
    f = m(g, "convert-to", h, 5)
    assert mat(g, f).dtype == np.float32 and np.array_equal(mat(g, f), real_frame.astype(np.float32))
    s = m(g, "convert-to-with-params", h, 5, 1 / 255, 0.0)
    expected = cv2.addWeighted(real_frame, 1 / 255, real_frame, 0, 0, dtype=cv2.CV_32F)
    assert np.allclose(mat(g, s), expected, atol=1e-6)
    back = m(g, "convert-to-with-params", f, 0, 1.7, -40.0)       # float → 8-bit: rounded, saturated
    expected = cv2.addWeighted(real_frame.astype(np.float32), 1.7, real_frame.astype(np.float32), 0, -40,
                               dtype=cv2.CV_8U)
    assert np.abs(mat(g, back).astype(int) - expected).max() <= 1 and mat(g, back).min() == 0
    i = m(g, "convert-to", f, 20)                          # a full code's channel count is ignored: 32S
    assert mat(g, i).dtype == np.int32 and mat(g, i).shape == real_frame.shape


# -- mat: element access -----------------------------------------------------------------------------
def test_uchar_access_reads_bytes_of_a_row(guest, real_frame):
    g = guest()
    frame = real_frame.copy()
    h = g.new_mat(frame)
    for y, x in ((0, 0), (17, 300), (359, 639)):          # asciify reads get-uchar-at(y, x*3 + c)
        assert [m(g, "get-uchar-at", h, y, x * 3 + c) for c in range(3)] == frame[y, x].tolist()
        assert [m(g, "get-uchar-at3", h, y, x, c) for c in range(3)] == frame[y, x].tolist()
        assert m(g, "get-vecb-at", h, y, x) == frame[y, x].tobytes()
        assert m(g, "get-veci-at", h, y, x) == frame[y, x].tolist()
        assert m(g, "get-vecf-at", h, y, x) == frame[y, x].astype(float).tolist()
    m(g, "set-uchar-at", h, 10, 20 * 3 + 2, 201)
    m(g, "set-uchar-at3", h, 11, 21, 0, 7)
    assert frame[10, 20, 2] == 201 and frame[11, 21, 0] == 7


def test_elements_past_a_row_end_reach_the_next_rows_of_continuous_data(guest):
    g = guest()
    h = m(g, "new-with-size", 240, 320, 16)
    dims = 240 * 320
    for i in (0, 1, dims - 1):                            # style-transfer writes pixel i at (0, i*3 + c)
        for c in range(3):
            m(g, "set-uchar-at", h, 0, i * 3 + c, 10 + c)
    a = mat(g, h)
    assert a[0, 0].tolist() == [10, 11, 12] and a[0, 1].tolist() == [10, 11, 12] and a[239, 319, 2] == 12
    with pytest.raises(TRAP, match="outside"):
        m(g, "get-uchar-at", h, 0, dims * 3)               # past the last element
    with pytest.raises(TRAP, match="outside"):
        m(g, "get-uchar-at", h, 240, 0)
    r = m(g, "region", h, ((0, 0), (10, 10)))              # a view is not continuous: rows end at its width
    with pytest.raises(TRAP, match="outside"):
        m(g, "get-uchar-at", r, 0, 30)
    assert m(g, "get-uchar-at", r, 0, 29) == a[0, 9, 2]
    with pytest.raises(TRAP, match="outside"):
        m(g, "get-vecb-at", r, 0, 10)
    with pytest.raises(TRAP, match="outside"):
        m(g, "get-float-at3", r, 0, 10, 0)


def test_float_and_int_access_with_conversion(guest):
    g = guest()
    f = m(g, "new-with-size", 5, 1, 13)
    for r, (x, y) in enumerate([(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366)]):
        m(g, "set-float-at", f, r, 0, x)
        m(g, "set-float-at", f, r, 1, y)
    a = mat(g, f)
    assert np.allclose(a[:3, 0], [(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366)])
    assert m(g, "get-float-at", f, 1, 1) == pytest.approx(51.5014, abs=1e-5)
    assert m(g, "get-float-at3", f, 2, 0, 1) == pytest.approx(71.7366, abs=1e-5)
    assert m(g, "get-vecf-at", f, 0, 0) == pytest.approx([38.2946, 51.6963], abs=1e-5)
    assert m(g, "get-uchar-at", f, 1, 0) == 74                # value converted: rounded, saturated
    m(g, "set-float-at3", f, 4, 0, 1, -3.5)
    assert m(g, "get-int-at", f, 4, 1) == -4 and m(g, "get-veci-at", f, 4, 0) == [0, -4]
    assert m(g, "get-uchar-at3", f, 4, 0, 1) == 0
    i = m(g, "new-with-size", 2, 3, 4)                        # CV_32S
    m(g, "set-int-at", i, 1, 2, -123456)
    m(g, "set-int-at3", i, 0, 1, 0, 99)
    assert mat(g, i)[1, 2] == -123456 and m(g, "get-int-at3", i, 1, 2, 0) == -123456
    assert m(g, "get-int-at", i, 0, 1) == 99 and m(g, "get-float-at", i, 1, 2) == -123456.0
    m(g, "set-float-at", i, 0, 0, 2.5e10)                     # saturated into s32
    assert mat(g, i)[0, 0] == 2**31 - 1
    u = m(g, "new-with-size", 1, 1, 0)
    m(g, "set-int-at", u, 0, 0, 300)
    assert mat(g, u)[0, 0] == 255


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_float_too_large_for_a_float16_mat_becomes_infinity_quietly(guest):
    """As OpenCV's saturate_cast<float16_t>: ±inf, and no NumPy overflow warning (the host's
    own accessors serve float16 mats)."""
    g = guest()
    h = m(g, "new-with-size", 1, 3, 7)                        # CV_16F
    m(g, "set-float-at", h, 0, 0, 70000.0)
    m(g, "set-float-at", h, 0, 1, -1e30)
    m(g, "set-int-at", h, 0, 2, 2**31 - 1)
    assert mat(g, h).tolist() == [[np.inf, -np.inf, np.inf]]


def test_scalar_arithmetic_matches_opencv_mat_operators(guest, real_frame):
    g = guest()
    frame = real_frame.copy()
    h = g.new_mat(frame)
    m(g, "add-uchar", h, 100)                                  # mat += v: first channel only, saturated
    assert np.array_equal(frame, cv2.add(real_frame, (100, 0, 0, 0)))
    m(g, "subtract-uchar", h, 100)
    expected = cv2.subtract(cv2.add(real_frame, (100, 0, 0, 0)), (100, 0, 0, 0))
    assert np.array_equal(frame, expected)
    m(g, "multiply-uchar", h, 2)                               # mat *= v: every channel
    expected = cv2.convertScaleAbs(expected, alpha=2)
    assert np.array_equal(frame, expected)
    m(g, "divide-uchar", h, 3)
    expected = cv2.convertScaleAbs(expected, alpha=1 / 3)
    assert np.array_equal(frame, expected)
    m(g, "divide-uchar", h, 0)
    assert not frame.any()
    gray = cv2.cvtColor(real_frame, cv2.COLOR_BGR2GRAY).astype(np.float32)
    f = g.new_mat(gray.copy())
    m(g, "add-float", f, 0.5)
    m(g, "multiply-float", f, 2.0)
    m(g, "subtract-float", f, 1.0)
    m(g, "divide-float", f, 4.0)
    assert np.allclose(mat(g, f), ((gray + 0.5) * 2 - 1) / 4)
    r = m(g, "region", g.new_mat(frame), ((10, 10), (20, 20)))  # through a view
    m(g, "add-float", r, 7.6)
    assert (frame[10:20, 10:20, 0] == 8).all() and not frame[10:20, 10:20, 1:].any() and frame[9, 9, 0] == 0


# -- mat: views -----------------------------------------------------------------------------------------
def test_region_copy_to_and_views_share_data(guest, real_frame):
    g = guest()
    frame = real_frame.copy()
    h = g.new_mat(frame)
    r = m(g, "region", h, ((100, 50), (200, 150)))
    assert mat(g, r).shape == (100, 100, 3) and np.shares_memory(mat(g, r), frame)
    assert mat(g, m(g, "region", h, ((600, 300), (700, 400)))).shape == (60, 40, 3)   # clipped
    assert m(g, "empty", m(g, "region", h, ((700, 400), (800, 500)))) is True
    blurred = g.call(CV, "blur", r, (50, 50))                  # faceblur: blur a region, copy it back
    m(g, "copy-to", blurred, r)
    assert np.array_equal(frame[50:150, 100:200], cv2.blur(real_frame[50:150, 100:200], (50, 50)))
    assert np.array_equal(frame[:50], real_frame[:50])
    small = g.new_mat(np.zeros((5, 5), np.uint8))
    m(g, "copy-to", h, small)                                  # a different size: dst becomes a copy
    assert np.array_equal(mat(g, small), frame) and not np.shares_memory(mat(g, small), frame)
    rows = m(g, "row-range", h, 10, 20)
    cols = m(g, "col-range", h, 30, 35)
    row, col = m(g, "row", h, 7), m(g, "col", h, 9)
    assert np.array_equal(mat(g, rows), frame[10:20]) and np.array_equal(mat(g, cols), frame[:, 30:35])
    assert mat(g, row).shape == (1, 640, 3) and mat(g, col).shape == (360, 1, 3)
    m(g, "set-uchar-at", col, 3, 1, 42)
    assert frame[3, 9, 1] == 42
    for name, args in (("row-range", (20, 10)), ("row-range", (0, 361)), ("col-range", (0, 641)),
                       ("row", (360,)), ("col", (640,))):
        with pytest.raises(GuestErr, match="outside"):
            m(g, name, h, *args)


def test_reshape_follows_opencv(guest, real_frame):
    g = guest()
    frame = real_frame.copy()
    h = g.new_mat(frame)
    one = m(g, "reshape", h, 1, 0)
    assert mat(g, one).shape == (360, 1920) and m(g, "mattype", one) == 0
    half = m(g, "reshape", h, 0, 720)
    assert mat(g, half).shape == (720, 320, 3)
    m(g, "set-uchar-at", half, 1, 0, 9)                        # shares data
    assert frame[0, 320, 0] == 9
    with pytest.raises(GuestErr, match="not divisible"):
        m(g, "reshape", h, 0, 7)
    with pytest.raises(GuestErr, match="not continuous"):
        m(g, "reshape", m(g, "region", h, ((0, 0), (10, 10))), 1, 5)
    blob = g.new_mat(cv2.dnn.blobFromImage(real_frame, size=(8, 6)))   # 1×3×6×8 N-d
    assert m(g, "rows", blob) == U32_MINUS_1 and m(g, "cols", blob) == U32_MINUS_1
    assert m(g, "size", blob) == [1, 3, 6, 8] and m(g, "mattype", blob) == 5
    flat = m(g, "reshape", blob, 0, 3)                         # edge-detect: reshape(0, rows) of a blob
    assert mat(g, flat).shape == (3, 48) and np.array_equal(mat(g, flat), mat(g, blob).reshape(3, 48))


def test_min_max_loc_matches_opencv(guest, gray, real_frame):
    g = guest()
    r = m(g, "min-max-loc", g.new_mat(gray))
    lo, hi, lo_at, hi_at = cv2.minMaxLoc(gray)
    assert (r.min_val, r.max_val, tuple(r.min_loc), tuple(r.max_loc)) == (lo, hi, lo_at, hi_at)
    scores = np.random.default_rng(1).random((1, 80)).astype(np.float32)
    r = m(g, "min-max-loc", m(g, "col-range", m(g, "row-range", g.new_mat(np.vstack([scores] * 3)), 1, 2), 4, 80))
    assert r.max_loc.x == int(np.argmax(scores[0, 4:])) and r.max_val == pytest.approx(scores[0, 4:].max())
    with pytest.raises(GuestErr, match="one-channel"):
        m(g, "min-max-loc", g.new_mat(real_frame))


# -- cv: drawing ----------------------------------------------------------------------------------------
def test_drawing_matches_opencv(guest, real_frame):
    g = guest()
    frame, expected = real_frame.copy(), real_frame.copy()
    h = g.new_mat(frame)
    g.call(CV, "arrowed-line", h, (10, 10), (200, 120), (255, 0, 0, 255), 2)
    cv2.arrowedLine(expected, (10, 10), (200, 120), (0, 0, 255, 255), 2)
    g.call(CV, "rectangle", h, ((20, 60), (200, 180)), (0, 255, 0, 255), 3)
    cv2.rectangle(expected, (20, 60), (200, 180), (0, 255, 0, 255), 3)
    g.call(CV, "circle", h, (320, 180), 40, (0, 0, 255, 255), 0)
    cv2.circle(expected, (320, 180), 40, (255, 0, 0, 255), 1)
    g.call(CV, "line", h, (0, 359), (639, 0), (10, 20, 30, 255), 1)
    cv2.line(expected, (0, 359), (639, 0), (30, 20, 10, 255), 1)
    g.call(CV, "put-text", h, "bottles: 3", (10, 40), 5, 1.2, (255, 128, 0, 255), 2)
    cv2.putText(expected, "bottles: 3", (10, 40), cv2.FONT_HERSHEY_COMPLEX_SMALL, 1.2, (0, 128, 255, 255), 2,
                cv2.LINE_AA)
    g.call(CV, "put-text", h, "x", (300, 300), 8, 1.0, (255, 255, 255, 255), 1)     # italic
    cv2.putText(expected, "x", (300, 300), cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC, 1.0, (255, 255, 255, 255),
                1, cv2.LINE_AA)
    assert np.array_equal(frame, expected) and not np.array_equal(frame, real_frame)
    region = m(g, "region", h, ((400, 200), (500, 300)))       # drawing on a view draws on the frame
    g.call(CV, "rectangle", region, ((0, 0), (99, 99)), (1, 2, 3, 255), 1)
    assert frame[200, 450].tolist() == [3, 2, 1]


# -- cv: image processing -----------------------------------------------------------------------------
def test_filters_match_opencv(guest, real_frame, gray):
    g = guest()
    h, gr = g.new_mat(real_frame), g.new_mat(gray)
    checks = [
        (g.call(CV, "blur", h, (25, 25)), cv2.blur(real_frame, (25, 25))),
        (g.call(CV, "box-filter", h, U32_MINUS_1, (7, 3)), cv2.boxFilter(real_frame, -1, (7, 3))),
        (g.call(CV, "box-filter", h, 5, (7, 3)), cv2.boxFilter(real_frame, cv2.CV_32F, (7, 3))),
        (g.call(CV, "gaussian-blur", h, (15, 15), 3.0, 3.0, 4),
         cv2.GaussianBlur(real_frame, (15, 15), 3.0, sigmaY=3.0, borderType=cv2.BORDER_REFLECT_101)),
        (g.call(CV, "gaussian-blur", h, (5, 5), 0.0, 0.0, 1),
         cv2.GaussianBlur(real_frame, (5, 5), 0, borderType=cv2.BORDER_REPLICATE)),
        (g.call(CV, "median-blur", h, (5, 5)), cv2.medianBlur(real_frame, 5)),
        (g.call(CV, "resize", h, (320, 180), 0.0, 0.0, 3),
         cv2.resize(real_frame, (320, 180), interpolation=cv2.INTER_AREA)),
        (g.call(CV, "resize", h, (0, 0), 0.5, 0.25, 1), cv2.resize(real_frame, None, fx=0.5, fy=0.25)),
        (g.call(CV, "canny", gr, 50.0, 150.0), cv2.Canny(gray, 50, 150)),
        (g.call(CV, "equalize-hist", gr), cv2.equalizeHist(gray)),
        (g.call(CV, "adaptive-threshold", gr, 255.0, 1, 1, 11, 2.0),
         cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV, 11, 2)),
        (g.call(CV, "threshold", gr, 100.0, 255.0, 0), cv2.threshold(gray, 100, 255, cv2.THRESH_BINARY)[1]),
        (g.call(CV, "threshold", gr, 0.0, 200.0, 6),
         cv2.threshold(gray, 0, 200, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]),
        (g.call(CV, "threshold", h, 90.0, 0.0, 2), cv2.threshold(real_frame, 90, 0, cv2.THRESH_TRUNC)[1]),
    ]
    for got, expected in checks:
        assert mat(g, got).dtype == expected.dtype and np.array_equal(mat(g, got), expected)
    with pytest.raises(GuestErr, match="ksize"):
        g.call(CV, "gaussian-blur", h, (4, 4), 0.0, 0.0, 4)      # even kernel: OpenCV refuses
    with pytest.raises(GuestErr):
        g.call(CV, "equalize-hist", h)                           # needs one channel
    with pytest.raises(GuestErr):
        g.call(CV, "adaptive-threshold", gr, 255.0, 0, 2, 11, 2.0)
    assert m(g, "rows", h) == 360                                # inputs are not consumed


def test_color_and_morphology_match_opencv(guest, real_frame, gray):
    g = guest()
    h = g.new_mat(real_frame)
    codes = {0: cv2.COLOR_BGR2BGRA, 8: cv2.COLOR_BGR2RGB, 12: cv2.COLOR_BGR2GRAY, 13: cv2.COLOR_RGB2GRAY}
    for index, code in codes.items():
        assert np.array_equal(mat(g, g.call(CV, "cvt-color", h, index)), cv2.cvtColor(real_frame, code))
    gr = g.call(CV, "cvt-color", h, 12)
    back = g.call(CV, "cvt-color", gr, 16)                      # gray → BGRA
    assert np.array_equal(mat(g, back), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA))
    with pytest.raises(GuestErr):
        g.call(CV, "cvt-color", gr, 12)                         # BGR → gray of a gray image
    for shape, cv_shape in ((0, cv2.MORPH_RECT), (1, cv2.MORPH_CROSS), (2, cv2.MORPH_ELLIPSE)):
        k = g.call(CV, "get-structuring-element", shape, (5, 3))
        assert np.array_equal(mat(g, k), cv2.getStructuringElement(cv_shape, (5, 3)))
    k = g.call(CV, "get-structuring-element", 2, (7, 7))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    assert np.array_equal(mat(g, g.call(CV, "dilate", h, k)), cv2.dilate(real_frame, kernel))
    assert np.array_equal(mat(g, g.call(CV, "erode", h, k)), cv2.erode(real_frame, kernel))


def test_hough_lines_match_opencv(guest, gray):
    g = guest()
    edges = cv2.Canny(gray, 50, 150)
    e = g.new_mat(edges)
    lines = mat(g, g.call(CV, "hough-lines", e, 1.0, np.pi / 180, 150))
    expected = cv2.HoughLines(edges, 1, np.pi / 180, 150)
    assert expected is not None and np.array_equal(lines, expected) and lines.shape[1:] == (1, 2)
    segs = g.call(CV, "hough-lines-p", e, 1.0, np.pi / 180, 80)
    expected = cv2.HoughLinesP(edges, 1, np.pi / 180, 80)
    assert np.array_equal(mat(g, segs), expected) and m(g, "mattype", segs) == 4 + 8 * 3   # CV_32SC4
    none = g.call(CV, "hough-lines", g.new_mat(np.zeros((20, 20), np.uint8)), 1.0, np.pi / 180, 10)
    assert m(g, "rows", none) == 0 and m(g, "empty", none) is True


def test_geometry_matches_opencv(guest, real_frame):
    g = guest()
    h = g.new_mat(real_frame)
    rot = g.call(CV, "get-rotation-matrix2d", (320, 180), 30.0, 0.8)
    expected_rot = cv2.getRotationMatrix2D((320, 180), 30, 0.8)
    assert np.array_equal(mat(g, rot), expected_rot)
    warped = g.call(CV, "warp-affine", h, rot, (400, 300))
    assert np.array_equal(mat(g, warped), cv2.warpAffine(real_frame, expected_rot, (400, 300)))
    src = np.array([[38.29, 51.69], [73.53, 51.50], [56.02, 71.73], [41.54, 92.36], [70.72, 92.20]], np.float32)
    dst = src * 1.5 + np.float32([10, -4])
    frm = m(g, "new-with-size", 5, 1, 13)
    to = m(g, "new-with-size", 5, 1, 13)
    for r in range(5):                                         # as face-expression builds its point mats
        for c in range(2):
            m(g, "set-float-at", frm, r, c, float(src[r, c]))
            m(g, "set-float-at", to, r, c, float(dst[r, c]))
    affine = mat(g, g.call(CV, "estimate-affine2d", frm, to))
    expected = cv2.estimateAffine2D(src.reshape(5, 1, 2), dst.reshape(5, 1, 2))[0]
    assert affine.shape == (2, 3) and np.allclose(affine, expected)
    assert np.allclose(affine, [[1.5, 0, 10], [0, 1.5, -4]], atol=1e-3)
    with pytest.raises(GuestErr):
        g.call(CV, "estimate-affine2d", frm, g.new_mat(np.zeros((2, 1, 2), np.float32)))


def test_arithmetic_matches_opencv(guest, real_frame):
    g = guest()
    other = cv2.flip(real_frame, 1)
    a, b = g.new_mat(real_frame), g.new_mat(other)
    af, bf = real_frame.astype(np.float32) / 255, other.astype(np.float32) / 255 + 0.5
    fa, fb = g.new_mat(af), g.new_mat(bf)
    checks = [
        (g.call(CV, "add", a, b), cv2.add(real_frame, other)),
        (g.call(CV, "subtract", a, b), cv2.subtract(real_frame, other)),
        (g.call(CV, "multiply", a, b), cv2.multiply(real_frame, other)),
        (g.call(CV, "divide", a, b), cv2.divide(real_frame, other)),
        (g.call(CV, "divide", fa, fb), cv2.divide(af, bf)),
        (g.call(CV, "add-weighted", a, 0.7, b, 0.3, 5.0), cv2.addWeighted(real_frame, 0.7, other, 0.3, 5)),
        (g.call(CV, "exp", fa), cv2.exp(af)),
        (g.call(CV, "hconcat", a, b), cv2.hconcat([real_frame, other])),
        (g.call(CV, "vconcat", a, b), cv2.vconcat([real_frame, other])),
        (g.call(CV, "normalize", fa, 0.0, 255.0, 32), cv2.normalize(af, None, 0, 255, cv2.NORM_MINMAX)),
        (g.call(CV, "normalize", fa, 1.0, 0.0, 4), cv2.normalize(af, None, 1, 0, cv2.NORM_L2)),
        (g.call(CV, "reduce", a, 0, 1, U32_MINUS_1), cv2.reduce(real_frame, 0, cv2.REDUCE_AVG)),
        (g.call(CV, "reduce", a, 1, 0, 5), cv2.reduce(real_frame, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32F)),
    ]
    for got, expected in checks:
        assert mat(g, got).dtype == expected.dtype and np.array_equal(mat(g, got), expected)
    lut = np.arange(256, dtype=np.uint8)[::-1].copy().reshape(1, 256)
    assert np.array_equal(mat(g, g.call(CV, "lut", a, g.new_mat(lut))), cv2.LUT(real_frame, lut))
    gray = cv2.cvtColor(real_frame, cv2.COLOR_BGR2GRAY)
    for axis in (0, 1):
        for last in (False, True):
            got = mat(g, g.call(CV, "reduce-arg-max", g.new_mat(gray), axis, last))
            assert np.array_equal(got, cv2.reduceArgMax(gray, axis, lastIndex=last))
    for norm_type in (1, 2, 4, 5):
        assert g.call(CV, "norm", fa, norm_type) == pytest.approx(cv2.norm(af, norm_type), rel=1e-6)
    with pytest.raises(GuestErr, match="Sizes of input arguments do not match|size"):
        g.call(CV, "add", a, g.new_mat(gray))
    with pytest.raises(GuestErr):
        g.call(CV, "hconcat", a, g.new_mat(np.zeros((10, 10, 3), np.uint8)))


# -- dnn ----------------------------------------------------------------------------------------------
def _tiny_onnx(path):
    """A 3-node ONNX model: doubled = 2·relu(input) (1×3×8×8) and flat = reshape(input, 1×3×64)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("doubled", TensorProto.FLOAT, [1, 3, 8, 8])
    z = helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 3, 64])
    nodes = [helper.make_node("Relu", ["input"], ["relu"], name="relu"),
             helper.make_node("Mul", ["relu", "two"], ["doubled"], name="double"),
             helper.make_node("Reshape", ["input", "shape"], ["flat"], name="flatten")]
    graph = helper.make_graph(nodes, "tiny", [x], [y, z],
                              initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                                           helper.make_tensor("shape", TensorProto.INT64, [3], [1, 3, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_onnx_network_forward_matches_opencv(guest, tmp_path, real_frame):
    _tiny_onnx(tmp_path / "tiny.onnx")
    g = guest(models_dir=tmp_path)
    net = g.call(DNN, "[static]net.read-from-ONNX", "tiny.onnx")
    assert g.call(DNN, "[method]net.empty", net) is False
    blob = g.call(DNN, "blob-from-image", g.new_mat(real_frame), 1 / 255, (8, 8), (0.5, 0.5, 0.5, 0), True, False)
    expected_blob = cv2.dnn.blobFromImage(real_frame, 1 / 255, (8, 8), (0.5, 0.5, 0.5, 0), True, False)
    assert np.array_equal(mat(g, blob), expected_blob)
    g.call(DNN, "[method]net.set-input", net, blob, "")
    reference = cv2.dnn.readNetFromONNX(str(tmp_path / "tiny.onnx"))
    reference.setInput(expected_blob)
    doubled = g.call(DNN, "[method]net.forward", net, "doubled")
    assert np.array_equal(mat(g, doubled), reference.forward("doubled"))
    assert m(g, "size", doubled) == [1, 3, 8, 8]
    flat = g.call(DNN, "[method]net.forward", net, "")              # the last layer: a 3-D blob
    assert m(g, "size", flat) == [1, 3, 64] and m(g, "rows", flat) == U32_MINUS_1
    assert m(g, "get-float-at", flat, 0, 65) == pytest.approx(float(expected_blob.ravel()[65]))
    outs = g.call(DNN, "[method]net.forward-layers", net, ["doubled", "flat"])
    assert [m(g, "size", o) for o in outs] == [[1, 3, 8, 8], [1, 3, 64]]
    assert np.array_equal(mat(g, outs[0]), mat(g, doubled))
    transposed = g.call(CV, "transpose-ND", flat, [0, 2, 1])           # object-detector's yolov8 steps
    assert m(g, "size", transposed) == [1, 64, 3]
    assert np.array_equal(mat(g, transposed), cv2.transposeND(mat(g, flat), [0, 2, 1]))
    rows = m(g, "reshape", transposed, 1, m(g, "size", transposed)[1])
    assert mat(g, rows).shape == (64, 3) and m(g, "cols", rows) == 3
    layers = g.call(DNN, "[method]net.get-unconnected-out-layers", net)
    assert layers == list(reference.getUnconnectedOutLayers())
    names = [g.call(DNN, "[method]layer.get-name", g.call(DNN, "[method]net.get-layer", net, i)) for i in layers]
    assert names == ["doubled", "flat"]
    assert g.call(DNN, "[method]net.get-layer-names", net) == list(reference.getLayerNames())
    assert g.call(DNN, "[method]layer.get-name", g.call(DNN, "[method]net.get-layer", net, 0)) == "_input"
    with pytest.raises(GuestErr, match="no layer 99"):
        g.call(DNN, "[method]net.get-layer", net, 99)
    with pytest.raises(GuestErr, match="not found"):
        g.call(DNN, "[method]net.forward", net, "nope")
    lone = g.call(DNN, "[constructor]layer")
    assert g.call(DNN, "[method]layer.get-name", lone) == ""
    via_read = g.call(DNN, "[static]net.read", "tiny.onnx", "")
    assert g.call(DNN, "[method]net.empty", via_read) is False
    g.call(DNN, "[method]net.close", net)
    assert g.call(DNN, "[method]net.empty", net) is True
    with pytest.raises(GuestErr, match="empty"):
        g.call(DNN, "[method]net.forward", net, "")


def test_missing_models_give_clear_errors(guest, tmp_path):
    g = guest()
    with pytest.raises(GuestErr, match=r"model file candy-9\.onnx cannot be loaded: no --models-dir was given.*"
                                       r"put candy-9\.onnx in DIR.*candy-9\.onnx"):
        g.call(DNN, "[static]net.read-from-ONNX", "candy-9")
    g = guest(models_dir=tmp_path)
    with pytest.raises(GuestErr) as err:
        g.call(DNN, "[static]net.read", "yolov8n", "")
    assert "yolov8n.onnx" in err.value.value and str(tmp_path) in err.value.value and "put it there" in err.value.value
    for bad in ("/etc/passwd", "../secret.onnx", "a/../../b.onnx", ""):
        with pytest.raises(GuestErr, match="not a path|no model file name"):
            g.call(DNN, "[static]net.read-from-ONNX", bad)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(GuestErr):
        g.call(DNN, "[static]net.read-from-ONNX", "junk.onnx")


def test_blob_helpers_match_opencv(guest, real_frame):
    g = guest()
    h = g.new_mat(real_frame)
    params = (1 / 255, (320, 320), (0.0, 0.0, 0.0, 0.0), True, 5, 2, 2, (144.0, 0.0, 0.0, 0.0))
    blob = g.call(DNN, "blob-from-image-with-params", h, params)
    p = cv2.dnn.Image2BlobParams(scalefactor=(1 / 255,) * 4, size=(320, 320), mean=(0, 0, 0, 0), swapRB=True,
                                 ddepth=cv2.CV_32F, datalayout=cv2.dnn.DNN_LAYOUT_NCHW,
                                 mode=cv2.dnn.DNN_PMODE_LETTERBOX, borderValue=(144, 0, 0, 0))
    assert np.array_equal(mat(g, blob), cv2.dnn.blobFromImageWithParams(real_frame, p))
    assert m(g, "size", blob) == [1, 3, 320, 320]
    cropped = g.call(DNN, "blob-from-image", h, 1.0, (100, 100), (104.0, 117.0, 123.0, 0.0), False, True)
    assert np.array_equal(mat(g, cropped), cv2.dnn.blobFromImage(real_frame, 1.0, (100, 100), (104, 117, 123),
                                                                  False, True))
    boxes = [((10, 20), (110, 220)), ((160, 100), (320, 200))]
    mapped = g.call(DNN, "blob-rects-to-image-rects", params, boxes, (640, 360))
    expected = p.blobRectsToImageRects([(10, 20, 100, 200), (160, 100, 160, 100)], (640, 360))
    assert [(r.min.x, r.min.y, r.max.x - r.min.x, r.max.y - r.min.y) for r in mapped] == [tuple(e) for e in expected]
    assert g.call(DNN, "blob-rects-to-image-rects", params, [], (640, 360)) == []
    rects = [((0, 0), (100, 100)), ((5, 5), (105, 105)), ((200, 200), (260, 260)), ((0, 0), (10, 10))]
    scores = [0.9, 0.8, 0.7, 0.3]
    kept = g.call(DNN, "NMS-boxes", rects, scores, 0.5, 0.4)
    expected = cv2.dnn.NMSBoxes([(0, 0, 100, 100), (5, 5, 100, 100), (200, 200, 60, 60), (0, 0, 10, 10)],
                                scores, 0.5, 0.4)
    assert kept == list(expected) == [0, 2]
    with pytest.raises(GuestErr, match="2 boxes but 1 scores"):
        g.call(DNN, "NMS-boxes", rects[:2], [0.5], 0.5, 0.4)


# -- objdetect ------------------------------------------------------------------------------------------
HAAR = "haarcascade_frontalface_default.xml"


@pytest.mark.slow
def test_haar_cascade_matches_opencv(guest, tmp_path, gray, caplog):
    shutil.copy(cv2.data.haarcascades + HAAR, tmp_path / "faces.xml")
    g = guest(models_dir=tmp_path)
    cc = g.call(OD, "[constructor]cascade-classifier", "faces")
    with pytest.raises(GuestErr, match="load"):
        g.call(OD, "[method]cascade-classifier.detect-multi-scale", cc, g.new_mat(gray))
    assert g.call(OD, "[method]cascade-classifier.load", cc, HAAR) is True
    reference = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR)
    h = g.new_mat(gray)
    found = g.call(OD, "[method]cascade-classifier.detect-multi-scale", cc, h)
    expected = reference.detectMultiScale(gray)
    as_xywh = [(r.min.x, r.min.y, r.max.x - r.min.x, r.max.y - r.min.y) for r in found]
    assert as_xywh == [tuple(map(int, e)) for e in expected]
    smiles = g.call(OD, "[constructor]cascade-classifier", "smiles")   # a cascade that fires on this frame
    assert g.call(OD, "[method]cascade-classifier.load", smiles, "haarcascade_smile.xml") is True
    smile_ref = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_smile.xml")
    for got, want in ((g.call(OD, "[method]cascade-classifier.detect-multi-scale", smiles, h),
                       smile_ref.detectMultiScale(gray)),
                      (g.call(OD, "[method]cascade-classifier.detect-multi-scale-with-params", smiles, h, 1.05, 0, 0,
                              (20, 20), (0, 0)),
                       smile_ref.detectMultiScale(gray, 1.05, 0, 0, (20, 20), (0, 0)))):
        assert len(got) == len(want) > 0                         # raw hits come in thread order: sort
        assert sorted((r.min.x, r.min.y, r.max.x - r.min.x, r.max.y - r.min.y) for r in got) == \
            sorted(tuple(map(int, e)) for e in want)
    cc2 = g.call(OD, "[constructor]cascade-classifier", "")
    assert g.call(OD, "[method]cascade-classifier.load", cc2, "faces.xml") is True     # from the models dir
    with caplog.at_level(logging.ERROR, logger="vision_host.processor.driver"):
        assert g.call(OD, "[method]cascade-classifier.load", cc2, "nope.xml") is False
        assert g.call(OD, "[method]cascade-classifier.load", cc2, "nope.xml") is False
        assert g.call(OD, "[method]cascade-classifier.load", cc2, "../faces.xml") is False
    messages = [r.getMessage() for r in caplog.records]
    assert sum("nope.xml" in msg for msg in messages) == 1 and any("not a path" in msg for msg in messages)
    assert g.call(OD, "[method]cascade-classifier.detect-multi-scale", cc2, h) == found    # still loaded
    g.call(OD, "[method]cascade-classifier.close", cc)
    with pytest.raises(GuestErr):
        g.call(OD, "[method]cascade-classifier.detect-multi-scale", cc, h)


def test_hog_people_detector_matches_opencv(guest, real_frame):
    g = guest()
    small = cv2.resize(real_frame, (320, 180))
    hog = g.call(OD, "[constructor]HOG-descriptor", "people")
    reference = cv2.HOGDescriptor()
    reference.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    h = g.new_mat(small)
    found = g.call(OD, "[method]HOG-descriptor.detect-multi-scale", hog, h)
    expected, _ = reference.detectMultiScale(small)
    assert [(r.min.x, r.min.y, r.max.x - r.min.x, r.max.y - r.min.y) for r in found] == [tuple(map(int, e))
                                                                                         for e in expected]
    raw = g.call(OD, "[method]HOG-descriptor.detect-multi-scale-with-params", hog, h, -0.5, (8, 8), (0, 0), 1.1,
                 0.0, False)
    expected, _ = reference.detectMultiScale(small, hitThreshold=-0.5, winStride=(8, 8), padding=(0, 0), scale=1.1,
                                             groupThreshold=0, useMeanshiftGrouping=False)
    assert len(raw) == len(expected) > 0
    g.call(OD, "[method]HOG-descriptor.close", hog)
    with pytest.raises(GuestErr, match="closed"):
        g.call(OD, "[method]HOG-descriptor.detect-multi-scale", hog, h)


def test_face_models_missing_give_errors_and_keep_settings(guest, tmp_path, real_frame, caplog):
    with caplog.at_level(logging.ERROR, logger="vision_host.processor.driver"):
        g = guest()
        fd = g.call(OD, "[constructor]face-detector-YN", "yunet_2023mar", "", (200, 200))
        with pytest.raises(GuestErr, match=r"face_detection_yunet_2023mar\.onnx.*no --models-dir was given"):
            g.call(OD, "[method]face-detector-YN.detect", fd, g.new_mat(real_frame))
        g2 = guest(models_dir=tmp_path)
        params = ("yunet.onnx", "", (320, 240), 0.5, 0.25, 100, 0, 0)
        fd2 = g2.call(OD, "[static]face-detector-YN.new-with-params", *params)
        g2.call(OD, "[static]face-detector-YN.new-with-params", *params)
    with pytest.raises(GuestErr, match=f"yunet.onnx is not in the models directory {tmp_path}"):
        g2.call(OD, "[method]face-detector-YN.detect", fd2, g2.new_mat(real_frame))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("yunet.onnx" in msg for msg in messages) == 1         # logged once
    assert any("face_detection_yunet_2023mar.onnx" in msg for msg in messages)
    assert tuple(g2.call(OD, "[method]face-detector-YN.get-input-size", fd2)) == (320, 240)
    assert g2.call(OD, "[method]face-detector-YN.get-score-threshold", fd2) == pytest.approx(0.5)
    assert g2.call(OD, "[method]face-detector-YN.get-nms-threshold", fd2) == pytest.approx(0.25)
    assert g2.call(OD, "[method]face-detector-YN.get-topk", fd2) == 100
    g2.call(OD, "[method]face-detector-YN.set-input-size", fd2, (640, 360))
    g2.call(OD, "[method]face-detector-YN.set-score-threshold", fd2, 0.7)
    g2.call(OD, "[method]face-detector-YN.set-nms-threshold", fd2, 0.1)
    g2.call(OD, "[method]face-detector-YN.set-topk", fd2, 7)
    assert tuple(g2.call(OD, "[method]face-detector-YN.get-input-size", fd2)) == (640, 360)
    assert g2.call(OD, "[method]face-detector-YN.get-topk", fd2) == 7
    g2.call(OD, "[method]face-detector-YN.close", fd2)
    fr = g2.call(OD, "[constructor]face-recognizer-SF", "sface.onnx", "")
    fr2 = g2.call(OD, "[static]face-recognizer-SF.new-with-params", "../sface.onnx", "", 0, 0)
    f = g2.new_mat(np.zeros((1, 128), np.float32))
    for name, args in (("align-crop", (g2.new_mat(real_frame), g2.new_mat(np.zeros((1, 15), np.float32)))),
                       ("feature", (g2.new_mat(real_frame),)), ("match", (f, f)), ("match-with-params", (f, f, 1))):
        with pytest.raises(GuestErr, match="sface.onnx is not in the models directory"):
            g2.call(OD, f"[method]face-recognizer-SF.{name}", fr, *args)
    with pytest.raises(GuestErr, match="not a path"):
        g2.call(OD, "[method]face-recognizer-SF.feature", fr2, f)
    g2.call(OD, "[method]face-recognizer-SF.close", fr)
    g2.call(OD, "[resource-drop]face-recognizer-SF", fr)
    with pytest.raises(TRAP, match="unknown or dropped"):
        g2.call(OD, "[method]face-recognizer-SF.feature", fr, f)


# -- features2d ---------------------------------------------------------------------------------------
def _kp_tuple(k):
    return (k.x, k.y, k.size, k.angle, k.response, k.octave, k.class_id)


def _cv_kp_tuple(k):
    return tuple(np.float32([k.pt[0], k.pt[1], k.size, k.angle, k.response]).tolist()) + (k.octave, k.class_id)


def test_orb_detect_compute_and_bf_match_match_opencv(guest, gray):
    g = guest()
    orb = g.call(F2D, "[constructor]ORB-detector", "orb")
    reference = cv2.ORB_create()
    h = g.new_mat(gray)
    kps = g.call(F2D, "[method]ORB-detector.detect", orb, h)
    expected = reference.detect(gray, None)
    assert len(kps) == len(expected) > 100
    assert [_kp_tuple(k) for k in kps] == [_cv_kp_tuple(k) for k in expected]
    empty = g.call(M, "[constructor]mat", 0)
    res = g.call(F2D, "[method]ORB-detector.detect-and-compute", orb, h, empty)
    ekps, edesc = reference.detectAndCompute(gray, None)
    assert [_kp_tuple(k) for k in res.kps] == [_cv_kp_tuple(k) for k in ekps]
    assert np.array_equal(mat(g, res.desc), edesc)
    mask = np.zeros_like(gray)
    mask[:, :320] = 255
    left = g.call(F2D, "[method]ORB-detector.detect-and-compute", orb, h, g.new_mat(mask))
    assert left.kps and all(k.x < 320 for k in left.kps)
    computed = g.call(F2D, "[method]ORB-detector.compute", orb, h, empty, kps[:50])
    ckps, cdesc = reference.compute(gray, expected[:50])
    assert np.array_equal(mat(g, computed.desc), cdesc) and len(computed.kps) == len(ckps)

    shifted = np.roll(gray, 7, axis=1)
    other = g.call(F2D, "[method]ORB-detector.detect-and-compute", orb, g.new_mat(shifted), empty)
    _, sdesc = reference.detectAndCompute(shifted, None)
    bf = g.call(F2D, "[static]BF-matcher.new-with-params", 6, True)      # NORM-HAMMING, cross check
    matches = g.call(F2D, "[method]BF-matcher.match", bf, res.desc, other.desc)
    expected = cv2.BFMatcher(cv2.NORM_HAMMING, True).match(edesc, sdesc)
    assert [(d.query_idx, d.train_idx, d.img_idx, d.distance) for d in matches] == \
        [(e.queryIdx, e.trainIdx, e.imgIdx, e.distance) for e in expected]
    knn = g.call(F2D, "[method]BF-matcher.KNN-match", g.call(F2D, "[static]BF-matcher.new-with-params", 6, False),
                 res.desc, other.desc, 2)
    expected = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(edesc, sdesc, 2)
    assert [[(d.query_idx, d.train_idx, d.distance) for d in row] for row in knn] == \
        [[(e.queryIdx, e.trainIdx, e.distance) for e in row] for row in expected]
    orb2 = g.call(F2D, "[static]ORB-detector.new-with-params", 100, 1.2, 8, 31, 0, 2, 1, 31, 20)
    few = g.call(F2D, "[method]ORB-detector.detect", orb2, h)
    assert [_kp_tuple(k) for k in few] == [_cv_kp_tuple(k) for k in
                                           cv2.ORB_create(100, scoreType=cv2.ORB_FAST_SCORE).detect(gray, None)]
    g.call(F2D, "[method]ORB-detector.close", orb)
    with pytest.raises(GuestErr, match="closed"):
        g.call(F2D, "[method]ORB-detector.detect", orb, h)
    g.call(F2D, "[method]BF-matcher.close", bf)
    with pytest.raises(GuestErr, match="closed"):
        g.call(F2D, "[method]BF-matcher.match", bf, res.desc, other.desc)


@pytest.mark.parametrize("resource, factory", [("AKAZE-detector", cv2.AKAZE_create),
                                               ("BRISK-detector", cv2.BRISK_create),
                                               ("KAZE-detector", cv2.KAZE_create),
                                               ("SIFT-detector", cv2.SIFT_create)])
def test_other_detectors_match_opencv(guest, real_frame, resource, factory):
    small = cv2.resize(real_frame, (320, 180))
    g = guest()
    det = g.call(F2D, f"[constructor]{resource}", "")
    h = g.new_mat(small)
    res = g.call(F2D, f"[method]{resource}.detect-and-compute", det, h, g.call(M, "[constructor]mat", 0))
    ekps, edesc = factory().detectAndCompute(small, None)
    assert len(res.kps) == len(ekps) > 5
    assert [_kp_tuple(k) for k in res.kps] == [_cv_kp_tuple(k) for k in ekps]
    assert np.array_equal(mat(g, res.desc), edesc)
    kps = g.call(F2D, f"[method]{resource}.detect", det, h)
    assert len(kps) == len(factory().detect(small, None))
    computed = g.call(F2D, f"[method]{resource}.compute", det, h, g.call(M, "[constructor]mat", 0), res.kps)
    ckps, cdesc = factory().compute(small, ekps)
    assert len(computed.kps) == len(ckps) and np.array_equal(mat(g, computed.desc), cdesc)
    g.call(F2D, f"[method]{resource}.close", det)
    with pytest.raises(GuestErr, match="closed"):
        g.call(F2D, f"[method]{resource}.detect", det, h)


def test_flann_knn_match_on_sift_descriptors(guest, real_frame):
    small = cv2.resize(real_frame, (320, 180))
    g = guest()
    sift = cv2.SIFT_create()
    _, d1 = sift.detectAndCompute(small, None)
    _, d2 = sift.detectAndCompute(np.roll(small, 5, axis=0), None)
    fl = g.call(F2D, "[constructor]flann-based-matcher", "")
    knn = g.call(F2D, "[method]flann-based-matcher.KNN-match", fl, g.new_mat(d1), g.new_mat(d2), 2)
    exact = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d1, d2, 2)
    assert len(knn) == len(d1) and all(len(row) == 2 for row in knn)
    agree = sum(row[0].train_idx == e[0].trainIdx for row, e in zip(knn, exact))
    assert agree >= 0.9 * len(d1)                                  # approximate nearest neighbours
    with pytest.raises(GuestErr):                                  # binary descriptors: FLANN's KD-tree refuses
        g.call(F2D, "[method]flann-based-matcher.KNN-match", fl, g.new_mat(np.zeros((5, 32), np.uint8)),
               g.new_mat(np.zeros((5, 32), np.uint8)), 2)
    bf = g.call(F2D, "[constructor]BF-matcher", "")                # default: L2, no cross check
    matches = g.call(F2D, "[method]BF-matcher.match", bf, g.new_mat(d1), g.new_mat(d2))
    assert [(d.query_idx, d.train_idx, d.distance) for d in matches] == \
        [(e.queryIdx, e.trainIdx, pytest.approx(e.distance)) for e in cv2.BFMatcher().match(d1, d2)]
    g.call(F2D, "[method]flann-based-matcher.close", fl)
    with pytest.raises(GuestErr, match="closed"):
        g.call(F2D, "[method]flann-based-matcher.KNN-match", fl, g.new_mat(d1), g.new_mat(d2), 2)


@pytest.mark.slow
def test_resource_drops_release_handles(guest, tmp_path, real_frame):
    g = guest(models_dir=tmp_path)
    h = g.new_mat(real_frame)
    resources = [
        (OD, "cascade-classifier", ("x",), "load", (HAAR,)),
        (OD, "HOG-descriptor", ("x",), "detect-multi-scale", (h,)),
        (OD, "face-detector-YN", ("m.onnx", "", (10, 10)), "get-topk", ()),
        (OD, "face-recognizer-SF", ("m.onnx", ""), "feature", (h,)),
        (DNN, "layer", (), "get-name", ()),
        (F2D, "BF-matcher", ("x",), "match", (h, h)),
        (F2D, "flann-based-matcher", ("x",), "KNN-match", (h, h, 1)),
    ] + [(F2D, r, ("x",), "detect", (h,)) for r in ("AKAZE-detector", "BRISK-detector", "KAZE-detector",
                                                        "ORB-detector", "SIFT-detector")]
    for module, resource, ctor_args, method, args in resources:
        handle = g.call(module, f"[constructor]{resource}", *ctor_args)
        g.call(module, f"[resource-drop]{resource}", handle)
        with pytest.raises(TRAP, match=f"unknown or dropped {resource} handle"):
            g.call(module, f"[method]{resource}.{method}", handle, *args)
    layer = g.call(DNN, "[constructor]layer")
    g.call(DNN, "[method]layer.close", layer)
    assert g.call(DNN, "[method]layer.get-name", layer) == ""
    _tiny_onnx(tmp_path / "tiny.onnx")
    net = g.call(DNN, "[static]net.read-from-ONNX", "tiny.onnx")
    g.call(DNN, "[resource-drop]net", net)
    with pytest.raises(TRAP, match="unknown or dropped net handle"):
        g.call(DNN, "[method]net.empty", net)


# -- ABI violations trap the call; the instance keeps working -----------------------------------------
@pytest.mark.slow
def test_abi_violations_trap_and_the_instance_keeps_working(guest, real_frame):
    g = guest()
    h = g.new_mat(real_frame)
    export = g.processor.exports
    cases = [
        (lambda: m(g, "cols", 987654), "unknown or dropped mat handle"),
        (lambda: g.call(CV, "blur", 55555, (3, 3)), "unknown or dropped mat handle"),
        (lambda: g.call(OD, "[method]cascade-classifier.load", 4242, HAAR), "unknown or dropped cascade-classifier"),
        (lambda: g.call(DNN, "[method]net.empty", 1), "unknown or dropped net handle"),
        (lambda: g.call(F2D, "[method]BF-matcher.match", 3, h, h), "unknown or dropped BF-matcher"),
        (lambda: m(g, "get-uchar-at", h, 360, 0), "outside"),
        (lambda: m(g, "get-float-at3", h, 360, 0, 0), "outside"),
        (lambda: m(g, "set-int-at", h, 400, 0, 1), "outside"),
    ]
    for call, message in cases:
        with pytest.raises(TRAP, match=message):
            call()
        assert m(g, "cols", h) == 640
    ret = g.alloc(16, 4)
    enums = [("cvt-color", (h, 20, ret)), ("gaussian-blur", (h, 3, 3, 1.0, 1.0, 8, ret)),
             ("resize", (h, 10, 10, 0.0, 0.0, 5, ret)), ("threshold", (h, 1.0, 2.0, 8, ret)),
             ("put-text", (h, *g.mem.lower_str("x"), 0, 0, 9, 1.0, 0, 0, 0, 0, 1, ret)),
             ("get-structuring-element", (3, 3, 3, ret))]
    for name, args in enums:
        with pytest.raises(TRAP, match="case .* does not exist"):
            export[f"call:{CV}#{name}"](g.store, *args)
        assert m(g, "cols", h) == 640
    with pytest.raises(TRAP, match="case .* does not exist"):
        export[f"call:{F2D}#[static]BF-matcher.new-with-params"](g.store, 9, 0)
    dropped = m(g, "clone", h)
    m(g, "drop", dropped)
    with pytest.raises(TRAP, match="unknown or dropped"):
        g.call(CV, "add", h, dropped)
    with pytest.raises(TRAP, match="unknown or dropped"):
        m(g, "drop", dropped)
    assert np.array_equal(mat(g, g.call(CV, "blur", h, (3, 3))), cv2.blur(real_frame, (3, 3)))


def test_calls_that_would_stall_or_crash_opencv_are_refused(guest, real_frame, gray):
    g = guest()
    h, gr = g.new_mat(real_frame), g.new_mat(gray)
    blob = g.new_mat(cv2.dnn.blobFromImage(real_frame, size=(8, 8)))
    refused = [
        ("blur", (h, (5000, 3)), "larger than the host allows"),
        ("box-filter", (h, U32_MINUS_1, (3, 2_000_000_000)), "larger than the host allows"),
        ("gaussian-blur", (h, (0, 0), 1e30, 0.0, 4), "larger than the host allows"),
        ("gaussian-blur", (h, (0, 0), float("nan"), 0.0, 4), "finite"),
        ("median-blur", (h, (4097, 1)), "larger than the host allows"),
        ("adaptive-threshold", (gr, 255.0, 1, 0, 2001, 2.0), "larger than the host allows"),
        ("get-structuring-element", (0, (100_000, 3)), "larger than the host allows"),
        ("dilate", (h, g.new_mat(np.ones((300, 3), np.uint8))), "larger than the host allows"),
        ("hough-lines", (gr, 1.0, 1e-5, 10), "finer than the host allows"),
        ("hough-lines-p", (gr, 1e30, 1e30, 10), "no accumulator cell"),
        ("hough-lines", (gr, float("nan"), 0.1, 10), "positive finite"),
        ("circle", (h, (5, 5), 2_000_000_000, (1, 2, 3, 4), 1), "larger than the host allows"),
        ("rectangle", (blob, ((0, 0), (5, 5)), (1, 2, 3, 4), 1), "N-d blob"),
        ("resize", (h, (0, 0), 1e6, 1e6, 1), "cap on one mat"),
    ]
    for name, args, message in refused:
        with pytest.raises(GuestErr, match=message):
            g.call(CV, name, *args)
    hog = g.call(OD, "[constructor]HOG-descriptor", "")
    tiny = g.new_mat(np.zeros((100, 100, 3), np.uint8))          # smaller than the 64×128 window
    assert g.call(OD, "[method]HOG-descriptor.detect-multi-scale", hog, tiny) == []
    with pytest.raises(GuestErr, match="both sides must be positive"):
        g.call(OD, "[method]HOG-descriptor.detect-multi-scale-with-params", hog, h, 0.0, (0, 8), (0, 0), 1.05, 2.0,
               False)
    with pytest.raises(GuestErr, match="8-bit"):
        g.call(OD, "[method]HOG-descriptor.detect-multi-scale", hog, g.new_mat(np.zeros((200, 200), np.float32)))
    d = g.new_mat(np.random.default_rng(0).integers(0, 255, (4, 32), dtype=np.uint8))
    bf = g.call(F2D, "[static]BF-matcher.new-with-params", 6, False)
    rows = g.call(F2D, "[method]BF-matcher.KNN-match", bf, d, d, U32_MINUS_1)     # k capped at train rows
    assert [len(r) for r in rows] == [4] * 4 and [r[0].train_idx for r in rows] == [0, 1, 2, 3]
    orb = g.call(F2D, "[static]ORB-detector.new-with-params", 10, float("nan"), 0, 0, 99, 9, 1, 0, 999)
    assert isinstance(g.call(F2D, "[method]ORB-detector.detect", orb, gr), list)    # clamped, usable
    assert m(g, "cols", h) == 640


def test_result_area_layout_of_a_mat_result(guest, real_frame):
    """One result read by hand (not via guest_call's layouts): result<mat, error-result>."""
    g = guest()
    h = g.new_mat(real_frame)
    ret = g.alloc(12, 4)
    g.processor.exports[f"call:{CV}#blur"](g.store, h, 5, 5, ret)
    tag, handle = struct.unpack("<BxxxI", g.mem.read(ret, 8))
    assert tag == 0 and np.array_equal(g.mats.get(handle), cv2.blur(real_frame, (5, 5)))
    g.processor.exports[f"call:{CV}#blur"](g.store, h, 0, 5, ret)
    tag, ptr, n = struct.unpack("<BxxxII", g.mem.read(ret, 12))
    assert tag == 1 and "ksize" in g.mem.read(ptr, n).decode()
