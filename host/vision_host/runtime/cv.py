"""Host side of ``wasm:cv/mat`` and ``wasm:cv/cv``: the ``mat`` resource and OpenCV's image
functions, with the helpers the other wasm:cv modules (:mod:`.dnn`, :mod:`.objdetect`,
:mod:`.features2d`) share.

Mats are numpy arrays in the instance's handle table for ``wasm:cv/mat.mat``:

* an image is rows × cols (one channel) or rows × cols × C (C channels, BGR for frames);
* an N-d blob (from ``dnn``) has one channel and ndim ≥ 3. A 3-D array is ambiguous, so
  the rule is: a 3-D array is an image unless it is a ``cv2.Mat`` with ``wrap_channels``
  false (how OpenCV's Python bindings mark an N-d array); blobs this module and
  :mod:`.dnn` create are wrapped that way (:func:`as_nd`), ndim ≥ 4 is always a blob;
* views (``region``, ``row-range``, ``col-range``, ``row``, ``col``, ``reshape``) share
  data with the mat they come from, as cv::Mat headers do.

Behaviour follows wasmVision's runtime (GoCV) where processors depend on it; the WIT files
(``wasm/wit/deps/wasm-cv``) document each quirk. Functions declared with an owned ``mat``
parameter do not consume it. OpenCV failures become ``error-result`` strings
(:func:`cv_errors`); ABI violations (unknown handles, elements outside a mat) raise
:class:`AbiError` and trap the call.
"""

from __future__ import annotations

import functools
import re

import cv2
import numpy as np

from .abi import AbiError
from .canon import ErrResult, implements

__all__ = ["MAT", "DEPTH_DTYPES", "MAX_MAT_BYTES", "cv_type", "dtype_channels", "channels", "is_nd", "as_nd",
           "cv_errors", "short_error", "bgr", "rect_xywh", "xywh_rect", "check_size"]

_M = "wasm:cv/mat"
_CV = "wasm:cv/cv"
#: Handle-table key of the ``mat`` resource.
MAT = "wasm:cv/mat.mat"

#: numpy dtypes of OpenCV depths 0 … 7 (CV_8U, CV_8S, CV_16U, CV_16S, CV_32S, CV_32F, CV_64F, CV_16F).
DEPTH_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32,
                                            np.float64, np.float16))
_DTYPE_DEPTH = {t: i for i, t in enumerate(DEPTH_DTYPES)}
#: OpenCV's CV_CN_MAX: most channels a mat may have.
CN_MAX = 512
#: Largest mat (bytes) a processor may have the host create with an explicit size.
MAX_MAT_BYTES = 512 * 1024 * 1024
#: Limits that keep one call from stalling the video inside OpenCV, where the call deadline
#: cannot interrupt it: kernel sides (px) of box-type filters and structuring elements, of
#: Gaussian filters (also when derived from sigma), of dilate/erode kernels; Hough
#: accumulator angles and cells; circle radius (px).
MAX_KERNEL = 1024
MAX_GAUSSIAN_KERNEL = 511
MAX_MORPH_KERNEL = 255
MAX_HOUGH_ANGLES = 3600
MAX_HOUGH_CELLS = 1 << 24
MAX_RADIUS = 1 << 20

#: wasm:cv ``hershey-font-type`` → OpenCV font code.
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
         cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL,
         cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_SCRIPT_COMPLEX,
         cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC)
#: wasm:cv ``interpolation-type`` → OpenCV flag.
INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_LANCZOS4)
#: wasm:cv ``border-type`` → OpenCV flag.
BORDERS = (cv2.BORDER_CONSTANT, cv2.BORDER_REPLICATE, cv2.BORDER_REFLECT, cv2.BORDER_WRAP,
           cv2.BORDER_REFLECT_101, cv2.BORDER_TRANSPARENT, cv2.BORDER_DEFAULT, cv2.BORDER_ISOLATED)
#: wasm:cv ``threshold-type`` → OpenCV flag (Otsu and triangle pick the threshold of a binary one).
THRESHOLDS = (cv2.THRESH_BINARY, cv2.THRESH_BINARY_INV, cv2.THRESH_TRUNC, cv2.THRESH_TOZERO,
              cv2.THRESH_TOZERO_INV, cv2.THRESH_MASK, cv2.THRESH_BINARY | cv2.THRESH_OTSU,
              cv2.THRESH_BINARY | cv2.THRESH_TRIANGLE)
#: wasm:cv ``adaptive-threshold-type`` → OpenCV flag.
ADAPTIVE = (cv2.ADAPTIVE_THRESH_MEAN_C, cv2.ADAPTIVE_THRESH_GAUSSIAN_C)
#: wasm:cv ``color-coversion-type`` → OpenCV colour conversion code.
COLOR_CODES = (cv2.COLOR_BGR2BGRA, cv2.COLOR_RGB2RGBA, cv2.COLOR_BGRA2BGR, cv2.COLOR_RGBA2RGB,
               cv2.COLOR_BGR2RGBA, cv2.COLOR_RGB2BGRA, cv2.COLOR_RGBA2BGR, cv2.COLOR_BGRA2RGB,
               cv2.COLOR_BGR2RGB, cv2.COLOR_RGB2BGR, cv2.COLOR_BGRA2RGBA, cv2.COLOR_RGBA2BGRA,
               cv2.COLOR_BGR2GRAY, cv2.COLOR_RGB2GRAY, cv2.COLOR_GRAY2BGR, cv2.COLOR_GRAY2RGB,
               cv2.COLOR_GRAY2BGRA, cv2.COLOR_GRAY2RGBA, cv2.COLOR_BGRA2GRAY, cv2.COLOR_RGBA2GRAY)
#: wasm:cv ``morph-shape`` → OpenCV shape.
MORPH_SHAPES = (cv2.MORPH_RECT, cv2.MORPH_CROSS, cv2.MORPH_ELLIPSE)

_EMPTY_SHAPE = (0, 0)
_INT_LIMITS = {t: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in DEPTH_DTYPES if t.kind in "iu"}


# -- shared helpers -----------------------------------------------------------------------------
def is_nd(a: np.ndarray) -> bool:
    """True for an N-d blob (ndim ≥ 4, or 3-D marked as N-d), False for an image."""
    nd = a.ndim
    return nd > 3 or (nd == 3 and isinstance(a, cv2.Mat) and not a.wrap_channels)


def as_nd(a: np.ndarray) -> np.ndarray:
    """``a`` (a view) marked as an N-d blob when it has 3 or more dims (see module doc)."""
    if a.ndim >= 3 and not (isinstance(a, cv2.Mat) and not a.wrap_channels):
        return cv2.Mat(a, wrap_channels=False)
    return a


def _image(a: np.ndarray) -> np.ndarray:
    """``a`` as a plain ndarray (a view), so a 3-D result reads as rows × cols × channels."""
    return a if type(a) is np.ndarray else a.view(np.ndarray)


def _reshaped(a: np.ndarray, shape: tuple) -> np.ndarray:
    """A view of ``a`` with ``shape`` (ValueError when that would need a copy)."""
    view = _image(a).reshape(shape)
    if view.size and not np.may_share_memory(view, a):
        raise ValueError("the mat is not continuous, so it cannot be reshaped without copying")
    return view


def _like(result, src: np.ndarray) -> np.ndarray:
    """An OpenCV result shaped like ``src``: N-d again when ``src`` was an N-d blob."""
    if result is None:
        raise ErrResult("OpenCV returned no result")
    return as_nd(result) if is_nd(src) and result.ndim >= 3 else result


def channels(a: np.ndarray) -> int:
    """Channels of a mat (1 for N-d blobs)."""
    return a.shape[2] if a.ndim == 3 and not is_nd(a) else 1


def cv_type(a: np.ndarray) -> int:
    """OpenCV type code of ``a`` (depth + 8 × (channels − 1)), e.g. 16 for rows × cols × 3 uint8."""
    return _DTYPE_DEPTH.get(a.dtype, 0) + 8 * (channels(a) - 1)


def dtype_channels(code: int) -> tuple[np.dtype, int]:
    """numpy dtype and channel count of OpenCV type code ``code`` (a one-channel ``mattype``
    enum value is the same code).

    Raises:
        ValueError: a channel count above 512 (CV_CN_MAX).
    """
    depth, cn = code & 7, (code >> 3) + 1
    if cn > CN_MAX:
        raise ValueError(f"type code {code} has {cn} channels; OpenCV allows at most {CN_MAX}")
    return DEPTH_DTYPES[depth], cn


def check_size(rows: int, cols: int, cn: int = 1, itemsize: int = 1, what: str = "mat") -> None:
    """Raise ValueError when a rows × cols × cn mat of ``itemsize`` bytes would exceed
    :data:`MAX_MAT_BYTES` (or a dimension is negative)."""
    if rows < 0 or cols < 0:
        raise ValueError(f"{what} of {cols}×{rows} px has a negative size")
    if rows * cols * cn * itemsize > MAX_MAT_BYTES:
        raise ValueError(f"{what} of {rows} rows × {cols} cols × {cn} channels × {itemsize} B exceeds the host's "
                         f"{MAX_MAT_BYTES >> 20} MiB cap on one mat")


def _check_kernel(kx: int, ky: int, limit: int, what: str) -> None:
    if kx > limit or ky > limit:
        raise ValueError(f"{what} kernel of {kx}×{ky} px is larger than the host allows ({limit} px a side)")


def _check_gaussian(a: np.ndarray, kx: int, ky: int, sigma_x: float, sigma_y: float) -> None:
    """Gaussian kernel sides, including those OpenCV derives from the sigmas when a side is ≤ 0."""
    per_sigma = 6 if a.dtype == np.uint8 else 8
    sides = []
    for k, sigma in ((kx, sigma_x), (ky, sigma_y if sigma_y > 0 else sigma_x)):
        if k <= 0:
            if not np.isfinite(sigma):
                raise ValueError(f"sigma {sigma} is not a finite number")
            k = int(round(sigma * per_sigma + 1)) | 1
        sides.append(k)
    _check_kernel(sides[0], sides[1], MAX_GAUSSIAN_KERNEL, "Gaussian")


def _check_hough(a: np.ndarray, rho: float, theta: float) -> None:
    """Hough resolutions OpenCV can use safely (it divides by them and sizes its accumulator
    from them without checks) and that stay within the host's accumulator limits."""
    if not (np.isfinite(rho) and np.isfinite(theta) and rho > 0 and theta > 0):
        raise ValueError(f"Hough rho and theta must be positive finite numbers, not {rho:g} and {theta:g}")
    angles = round(np.pi / theta)
    rhos = round((2 * (a.shape[0] + a.shape[1]) + 1) / rho) if a.ndim >= 2 else 1
    if angles < 1 or rhos < 1:
        raise ValueError(f"Hough resolution rho={rho:g} px, theta={theta:g} rad leaves no accumulator cell")
    if angles > MAX_HOUGH_ANGLES or angles * rhos > MAX_HOUGH_CELLS:
        raise ValueError(f"Hough resolution rho={rho:g} px, theta={theta:g} rad is finer than the host allows "
                         f"(at most {MAX_HOUGH_ANGLES} angles and {MAX_HOUGH_CELLS} accumulator cells)")


def _new_mat(rows: int, cols: int, code: int) -> np.ndarray:
    dtype, cn = dtype_channels(code)
    check_size(rows, cols, cn, dtype.itemsize)
    return np.zeros((rows, cols) if cn == 1 else (rows, cols, cn), dtype)


_ERROR_RE = re.compile(r"error: \((-?\d+):([^)]*)\)\s*(.*)", re.S)


def short_error(exc: BaseException) -> str:
    """A one-line message from an OpenCV (or numpy) exception, without paths."""
    text = str(exc).strip()
    m = _ERROR_RE.search(text)
    if m:
        kind, rest = m.group(2).strip(), m.group(3)
        lines = [ln.strip().lstrip(">").strip() for ln in rest.splitlines()]
        first, more = (lines[0] if lines else ""), " ".join(ln for ln in lines[1:] if ln)
        text = f"{kind}: {first}" if first else kind
        if more:
            text += f": {more}"
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def cv_errors(fn):
    """Decorator for implementations returning ``result<_, error-result>``: an OpenCV error
    (or a numpy shape/size error) becomes :class:`ErrResult` with a short message."""

    @functools.wraps(fn)
    def call(ctx, *args):
        try:
            return fn(ctx, *args)
        except cv2.error as exc:
            raise ErrResult(short_error(exc)) from None
        except (ValueError, OverflowError, MemoryError, ZeroDivisionError) as exc:
            raise ErrResult(short_error(exc) or type(exc).__name__) from None
    return call


def bgr(c) -> tuple[int, int, int, int]:
    """wasm:cv RGBA → the colour OpenCV draws with (B, G, R, A)."""
    return (c.b, c.g, c.r, c.a)


def rect_xywh(r) -> tuple[int, int, int, int]:
    """wasm:cv rect (min, max corners) → OpenCV (x, y, width, height).

    Raises:
        ValueError: the width or height does not fit OpenCV's int.
    """
    w, h = r.max.x - r.min.x, r.max.y - r.min.y
    if not (-0x8000_0000 <= w <= 0x7FFF_FFFF and -0x8000_0000 <= h <= 0x7FFF_FFFF):
        raise ValueError(f"rect from ({r.min.x}, {r.min.y}) to ({r.max.x}, {r.max.y}) is too large")
    return (r.min.x, r.min.y, w, h)


def xywh_rect(x, y, w, h) -> tuple:
    """OpenCV (x, y, width, height) → wasm:cv rect value ((x0, y0), (x1, y1))."""
    x, y = int(x), int(y)
    return ((x, y), (x + int(w), y + int(h)))


def _mat(ctx, handle: int) -> np.ndarray:
    return ctx.mats.get(handle)


# -- element access -------------------------------------------------------------------------------
def _shape_text(a: np.ndarray) -> str:
    return "×".join(map(str, a.shape)) + (" (N-d)" if is_nd(a) else "")


def _flat_index(a: np.ndarray, row: int, col: int, span: int = 1) -> int:
    """Flat (C-order) index of element ``col`` of row ``row`` (see the ``mat`` interface
    notes): on continuous data ``col`` may run into the following rows, as with cv::Mat::at;
    anything past the last element traps."""
    size = a.size
    n0 = a.shape[0]
    rowlen = size // n0 if n0 else 0
    i = row * rowlen + col
    if a.flags.c_contiguous:
        if i + span <= size:
            return i
    elif row < n0 and col + span <= rowlen:
        return i
    raise AbiError(f"element ({row}, {col}) is outside the {_shape_text(a)} mat")


def _flat_index3(a: np.ndarray, x: int, y: int, z: int) -> int:
    size = a.size
    d0 = a.shape[0]
    d1 = a.shape[1] if a.ndim > 1 else 1
    inner = size // (d0 * d1) if d0 and d1 else 0
    i = (x * d1 + y) * inner + z
    if a.flags.c_contiguous:
        if i < size:
            return i
    elif x < d0 and y < d1 and z < inner:
        return i
    raise AbiError(f"element ({x}, {y}, {z}) is outside the {_shape_text(a)} mat")


def _as_int(v, lo: int, hi: int) -> int:
    """``v`` rounded (half to even, as cvRound) and saturated to [lo, hi]; NaN → 0."""
    if isinstance(v, (np.floating, float)):
        v = float(v)      # compared as a Python float: no NumPy cast of lo/hi into v's (float16) type
        if v != v:
            return 0
        if v >= hi:
            return hi
        if v <= lo:
            return lo
        return int(round(float(v)))
    v = int(v)
    return lo if v < lo else hi if v > hi else v


def _put(a: np.ndarray, i: int, v) -> None:
    limits = _INT_LIMITS.get(a.dtype)
    if limits is not None:
        a.flat[i] = _as_int(v, *limits)
    elif a.dtype.itemsize < 8:
        with np.errstate(over="ignore"):    # too large for float16/float32: ±inf, as OpenCV's saturate_cast
            a.flat[i] = v
    else:
        a.flat[i] = v


def _values(a: np.ndarray, dtype) -> np.ndarray:
    """Values of ``a`` converted to ``dtype`` as OpenCV's saturate_cast does."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    with np.errstate(all="ignore"):          # overflow to ±inf is the intended result for floats
        if dtype.kind == "f" or np.can_cast(a.dtype, dtype, "safe"):
            return a.astype(dtype)
        lo, hi = _INT_LIMITS[dtype]
        src = np.nan_to_num(np.rint(a), nan=0.0) if a.dtype.kind == "f" else a
        return np.clip(src, lo, hi).astype(dtype)


# -- mat resource ---------------------------------------------------------------------------------
@implements(_M, "[constructor]mat")
def _mat_new(ctx, _id):
    return np.empty(_EMPTY_SHAPE, np.uint8)


@implements(_M, "[static]mat.new-with-size")
def _mat_new_with_size(ctx, rows, cols, code):
    # wasmVision's runtime takes the first argument as rows and passes the type code
    # straight to OpenCV; its processors call new-with-size(rows, cols, 16).
    try:
        return _new_mat(rows, cols, code)
    except ValueError as exc:
        raise AbiError(f"new-with-size({rows}, {cols}, {code}): {exc}") from None


@implements(_M, "[method]mat.clone")
def _mat_clone(ctx, h):
    return _mat(ctx, h).copy()


@implements(_M, "[method]mat.close")
def _mat_close(ctx, h):
    # Empty now, released when the call ends: wasmVision's TinyGo processors close mats
    # and never drop them.
    ctx.mats.close(h, np.empty(_EMPTY_SHAPE, np.uint8))


@implements(_M, "[method]mat.cols")
def _mat_cols(ctx, h):
    a = _mat(ctx, h)
    return -1 if is_nd(a) else a.shape[1]


@implements(_M, "[method]mat.rows")
def _mat_rows(ctx, h):
    a = _mat(ctx, h)
    return -1 if is_nd(a) else a.shape[0]


@implements(_M, "[method]mat.region")
def _mat_region(ctx, h, rect):
    a = _mat(ctx, h)
    if is_nd(a):
        raise AbiError(f"region of an N-d blob ({_shape_text(a)})")
    rows, cols = a.shape[0], a.shape[1]
    x0, x1 = sorted((min(max(rect.min.x, 0), cols), min(max(rect.max.x, 0), cols)))
    y0, y1 = sorted((min(max(rect.min.y, 0), rows), min(max(rect.max.y, 0), rows)))
    return a[y0:y1, x0:x1]


@implements(_M, "[method]mat.copy-to")
def _mat_copy_to(ctx, h, dst):
    src, target = _mat(ctx, h), _mat(ctx, dst)
    if target is src:
        return
    if target.shape == src.shape and target.dtype == src.dtype and is_nd(target) == is_nd(src):
        np.copyto(target, src)     # into the existing pixels: through a region view, as cv::Mat::copyTo
    else:
        ctx.mats.replace(dst, src.copy())


@implements(_M, "[method]mat.convert-to")
@cv_errors
def _mat_convert_to(ctx, h, code):
    a = _mat(ctx, h)
    dtype, _ = dtype_channels(code)
    return _like(a.copy() if a.dtype == dtype else _values(a, dtype), a)


@implements(_M, "[method]mat.convert-to-with-params")
@cv_errors
def _mat_convert_to_with_params(ctx, h, code, alpha, beta):
    a = _mat(ctx, h)
    dtype, _ = dtype_channels(code)
    with np.errstate(all="ignore"):
        scaled = a * np.float64(alpha) + np.float64(beta) if a.dtype != np.float32 or dtype != np.float32 \
            else a * np.float32(alpha) + np.float32(beta)
    return _like(_values(scaled, dtype), a)


@implements(_M, "[method]mat.mattype")
def _mat_type(ctx, h):
    return cv_type(_mat(ctx, h))


@implements(_M, "[method]mat.size")
def _mat_size(ctx, h):
    a = _mat(ctx, h)
    if is_nd(a):
        return list(a.shape)
    return list(a.shape[:2]) if a.shape != _EMPTY_SHAPE else []


@implements(_M, "[method]mat.step")
def _mat_step(ctx, h):
    a = _mat(ctx, h)
    return a.strides[0] if a.size else 0


@implements(_M, "[method]mat.elemsize")
def _mat_elemsize(ctx, h):
    a = _mat(ctx, h)
    return a.itemsize * channels(a)


@implements(_M, "[method]mat.empty")
def _mat_empty(ctx, h):
    return _mat(ctx, h).size == 0


@implements(_M, "[method]mat.get-float-at")
def _get_float(ctx, h, row, col):
    a = _mat(ctx, h)
    return float(a.flat[_flat_index(a, row, col)])


@implements(_M, "[method]mat.set-float-at")
def _set_float(ctx, h, row, col, val):
    a = _mat(ctx, h)
    _put(a, _flat_index(a, row, col), val)


@implements(_M, "[method]mat.get-uchar-at")
def _get_uchar(ctx, h, row, col):
    a = _mat(ctx, h)
    v = a.flat[_flat_index(a, row, col)]
    return int(v) if a.dtype == np.uint8 else _as_int(v, 0, 255)


@implements(_M, "[method]mat.set-uchar-at")
def _set_uchar(ctx, h, row, col, val):
    a = _mat(ctx, h)
    _put(a, _flat_index(a, row, col), val)


@implements(_M, "[method]mat.get-int-at")
def _get_int(ctx, h, row, col):
    a = _mat(ctx, h)
    return _as_int(a.flat[_flat_index(a, row, col)], -0x8000_0000, 0x7FFF_FFFF)


@implements(_M, "[method]mat.set-int-at")
def _set_int(ctx, h, row, col, val):
    a = _mat(ctx, h)
    _put(a, _flat_index(a, row, col), val)


@implements(_M, "[method]mat.get-float-at3")
def _get_float3(ctx, h, x, y, z):
    a = _mat(ctx, h)
    return float(a.flat[_flat_index3(a, x, y, z)])


@implements(_M, "[method]mat.set-float-at3")
def _set_float3(ctx, h, x, y, z, val):
    a = _mat(ctx, h)
    _put(a, _flat_index3(a, x, y, z), val)


@implements(_M, "[method]mat.get-uchar-at3")
def _get_uchar3(ctx, h, x, y, z):
    a = _mat(ctx, h)
    return _as_int(a.flat[_flat_index3(a, x, y, z)], 0, 255)


@implements(_M, "[method]mat.set-uchar-at3")
def _set_uchar3(ctx, h, x, y, z, val):
    a = _mat(ctx, h)
    _put(a, _flat_index3(a, x, y, z), val)


@implements(_M, "[method]mat.get-int-at3")
def _get_int3(ctx, h, x, y, z):
    a = _mat(ctx, h)
    return _as_int(a.flat[_flat_index3(a, x, y, z)], -0x8000_0000, 0x7FFF_FFFF)


@implements(_M, "[method]mat.set-int-at3")
def _set_int3(ctx, h, x, y, z, val):
    a = _mat(ctx, h)
    _put(a, _flat_index3(a, x, y, z), val)


def _pixel(ctx, h, row, col, dtype) -> np.ndarray:
    a = _mat(ctx, h)
    cn = channels(a)
    i = _flat_index(a, row, col * cn, cn)
    return _values(a.flat[i:i + cn], dtype)


@implements(_M, "[method]mat.get-vecb-at")
def _get_vecb(ctx, h, row, col):
    return _pixel(ctx, h, row, col, np.uint8)


@implements(_M, "[method]mat.get-vecf-at")
def _get_vecf(ctx, h, row, col):
    return _pixel(ctx, h, row, col, np.float32)


@implements(_M, "[method]mat.get-veci-at")
def _get_veci(ctx, h, row, col):
    return _pixel(ctx, h, row, col, np.int32)


def _scalar_op(a: np.ndarray, op: str, val) -> None:
    """In-place ``a op= val`` as OpenCV's Mat operators: + and − on the first channel only,
    × and ÷ on all; rounded and saturated for integer depths; ÷ 0 gives 0 for integers."""
    if a.size == 0:
        return
    target = a[..., 0] if op in "+-" and channels(a) > 1 else a
    limits = _INT_LIMITS.get(a.dtype)
    with np.errstate(all="ignore"):
        if limits is None:
            val = a.dtype.type(val)
            if op == "+":
                target += val
            elif op == "-":
                target -= val
            elif op == "*":
                target *= val
            else:
                target /= val
            return
        if op == "/" and val == 0:
            target[...] = 0
            return
        wide = target.astype(np.float64)
        wide = (wide + val if op == "+" else wide - val if op == "-" else wide * val if op == "*"
                else wide / val)
        np.copyto(target, np.clip(np.rint(wide), *limits), casting="unsafe")


def _arith(op: str):
    def apply(ctx, h, val):
        _scalar_op(_mat(ctx, h), op, val)
    return apply


for _kind in ("uchar", "float"):
    for _name, _sym in (("add", "+"), ("subtract", "-"), ("multiply", "*"), ("divide", "/")):
        implements(_M, f"[method]mat.{_name}-{_kind}")(_arith(_sym))


@implements(_M, "[method]mat.reshape")
@cv_errors
def _mat_reshape(ctx, h, new_cn, new_rows):
    a = _mat(ctx, h)
    if is_nd(a):
        if new_cn > 1:
            raise ValueError(f"an N-d blob ({_shape_text(a)}) can only be reshaped to one channel")
        if new_rows == 0:
            return a[...]
        if a.size % new_rows:
            raise ValueError(f"{a.size} elements cannot be split into {new_rows} rows")
        return _reshaped(a, (new_rows, a.size // new_rows))
    if new_cn > CN_MAX:
        raise ValueError(f"{new_cn} channels: OpenCV allows at most {CN_MAX}")
    rows, cols, cn = a.shape[0], a.shape[1], channels(a)
    new_cn = new_cn or cn
    total_width = cols * cn
    if new_rows == 0 and (new_cn > total_width or total_width % new_cn):
        new_rows = rows * total_width // new_cn
    if new_rows and new_rows != rows:
        total = total_width * rows
        if not a.flags.c_contiguous:
            raise ValueError("the mat is not continuous, so its number of rows cannot change")
        if new_rows > total:
            raise ValueError(f"bad new number of rows {new_rows} for {total} elements")
        if total % new_rows:
            raise ValueError(f"{total} elements are not divisible by the new number of rows {new_rows}")
        total_width, rows = total // new_rows, new_rows
    if total_width % new_cn:
        raise ValueError(f"the row width {total_width} is not divisible by the new number of channels {new_cn}")
    shape = (rows, total_width // new_cn) + ((new_cn,) if new_cn > 1 else ())
    return _reshaped(a, shape)


def _range(a: np.ndarray, axis: int, start: int, end: int, what: str) -> np.ndarray:
    n = a.shape[axis]
    if not 0 <= start <= end <= n:
        raise ValueError(f"{what} range [{start}, {end}) is outside the mat's {n} {what}s")
    return a[start:end] if axis == 0 else a[:, start:end]


@implements(_M, "[method]mat.row-range")
@cv_errors
def _mat_row_range(ctx, h, start, end):
    return _range(_mat(ctx, h), 0, start, end, "row")


@implements(_M, "[method]mat.col-range")
@cv_errors
def _mat_col_range(ctx, h, start, end):
    return _range(_mat(ctx, h), 1, start, end, "column")


@implements(_M, "[method]mat.row")
@cv_errors
def _mat_row(ctx, h, row):
    return _range(_mat(ctx, h), 0, row, row + 1, "row")


@implements(_M, "[method]mat.col")
@cv_errors
def _mat_col(ctx, h, col):
    return _range(_mat(ctx, h), 1, col, col + 1, "column")


@implements(_M, "[method]mat.min-max-loc")
@cv_errors
def _mat_min_max_loc(ctx, h):
    a = _mat(ctx, h)
    if channels(a) != 1:
        raise ValueError(f"min-max-loc needs a one-channel mat, this one has {channels(a)} channels")
    lo, hi, lo_at, hi_at = cv2.minMaxLoc(a)
    return (lo, hi, lo_at, hi_at)


@implements(_M, "[static]mat.merge")
@cv_errors
def _mat_merge(ctx, handles):
    if not handles:
        raise ValueError("merge of no mats")
    return cv2.merge([_mat(ctx, h) for h in handles])


@implements(_M, "[static]mat.zeros")
@cv_errors
def _mat_zeros(ctx, rows, cols, code):
    return _new_mat(rows, cols, code)


@implements(_M, "[static]mat.ones")
@cv_errors
def _mat_ones(ctx, rows, cols, code):
    a = _new_mat(rows, cols, code)
    if a.ndim == 3:
        a[..., 0] = 1          # cv::Mat::ones: only the first channel
    else:
        a.fill(1)
    return a


# -- cv: drawing ----------------------------------------------------------------------------------
def _canvas(ctx, handle) -> np.ndarray:
    """The image to draw on; N-d blobs are refused (OpenCV's drawing misbehaves on them)."""
    a = _mat(ctx, handle)
    if is_nd(a):
        raise ValueError(f"cannot draw on an N-d blob ({_shape_text(a)})")
    return a


@implements(_CV, "arrowed-line")
@cv_errors
def _arrowed_line(ctx, img, p1, p2, c, thickness):
    cv2.arrowedLine(_canvas(ctx, img), (p1.x, p1.y), (p2.x, p2.y), bgr(c), max(1, thickness))


@implements(_CV, "rectangle")
@cv_errors
def _rectangle(ctx, img, r, c, thickness):
    cv2.rectangle(_canvas(ctx, img), (r.min.x, r.min.y), (r.max.x, r.max.y), bgr(c), max(1, thickness))


@implements(_CV, "circle")
@cv_errors
def _circle(ctx, img, center, radius, c, thickness):
    if radius > MAX_RADIUS:
        raise ValueError(f"circle radius {radius} px is larger than the host allows ({MAX_RADIUS} px)")
    cv2.circle(_canvas(ctx, img), (center.x, center.y), radius, bgr(c), max(1, thickness))


@implements(_CV, "line")
@cv_errors
def _line(ctx, img, p1, p2, c, thickness):
    cv2.line(_canvas(ctx, img), (p1.x, p1.y), (p2.x, p2.y), bgr(c), max(1, thickness))


@implements(_CV, "put-text")
@cv_errors
def _put_text(ctx, img, text, org, font, scale, c, thickness):
    cv2.putText(_canvas(ctx, img), text, (org.x, org.y), FONTS[font], scale, bgr(c), max(1, thickness), cv2.LINE_AA)


# -- cv: image processing -------------------------------------------------------------------------
def _s32(v: int) -> int:
    """A u32 parameter that OpenCV takes as a signed int (0xFFFFFFFF → -1), as GoCV passes it."""
    return v - 0x1_0000_0000 if v & 0x8000_0000 else v


@implements(_CV, "adaptive-threshold")
@cv_errors
def _adaptive_threshold(ctx, src, max_value, adaptive, ttype, block, c):
    limit = MAX_GAUSSIAN_KERNEL if adaptive == 1 else MAX_KERNEL
    _check_kernel(block, block, limit, "adaptive threshold block")
    return cv2.adaptiveThreshold(_mat(ctx, src), max_value, ADAPTIVE[adaptive], THRESHOLDS[ttype], block, c)


@implements(_CV, "blur")
@cv_errors
def _blur(ctx, src, k):
    _check_kernel(k.x, k.y, MAX_KERNEL, "blur")
    return cv2.blur(_mat(ctx, src), (k.x, k.y))


@implements(_CV, "box-filter")
@cv_errors
def _box_filter(ctx, src, depth, k):
    _check_kernel(k.x, k.y, MAX_KERNEL, "box filter")
    return cv2.boxFilter(_mat(ctx, src), _s32(depth), (k.x, k.y))


@implements(_CV, "canny")
@cv_errors
def _canny(ctx, src, t1, t2):
    return cv2.Canny(_mat(ctx, src), t1, t2)


@implements(_CV, "cvt-color")
@cv_errors
def _cvt_color(ctx, src, code):
    return cv2.cvtColor(_mat(ctx, src), COLOR_CODES[code])


def _morph_kernel(ctx, handle) -> np.ndarray:
    k = _mat(ctx, handle)
    if k.ndim >= 2:
        _check_kernel(k.shape[1], k.shape[0], MAX_MORPH_KERNEL, "dilate/erode")
    return k


@implements(_CV, "dilate")
@cv_errors
def _dilate(ctx, src, kernel):
    return cv2.dilate(_mat(ctx, src), _morph_kernel(ctx, kernel))


@implements(_CV, "erode")
@cv_errors
def _erode(ctx, src, kernel):
    return cv2.erode(_mat(ctx, src), _morph_kernel(ctx, kernel))


@implements(_CV, "equalize-hist")
@cv_errors
def _equalize_hist(ctx, src):
    return cv2.equalizeHist(_mat(ctx, src))


@implements(_CV, "gaussian-blur")
@cv_errors
def _gaussian_blur(ctx, src, k, sigma_x, sigma_y, border):
    a = _mat(ctx, src)
    _check_gaussian(a, k.x, k.y, sigma_x, sigma_y)
    return cv2.GaussianBlur(a, (k.x, k.y), sigma_x, sigmaY=sigma_y, borderType=BORDERS[border])


@implements(_CV, "get-structuring-element")
@cv_errors
def _structuring_element(ctx, shape, size):
    _check_kernel(size.x, size.y, MAX_KERNEL, "structuring element")
    return cv2.getStructuringElement(MORPH_SHAPES[shape], (size.x, size.y))


@implements(_CV, "hough-lines")
@cv_errors
def _hough_lines(ctx, src, rho, theta, threshold):
    a = _mat(ctx, src)
    _check_hough(a, rho, theta)
    lines = cv2.HoughLines(a, rho, theta, threshold)
    return lines if lines is not None else np.empty((0, 1, 2), np.float32)


@implements(_CV, "hough-lines-p")
@cv_errors
def _hough_lines_p(ctx, src, rho, theta, threshold):
    a = _mat(ctx, src)
    _check_hough(a, rho, theta)
    lines = cv2.HoughLinesP(a, rho, theta, threshold)
    return lines if lines is not None else np.empty((0, 1, 4), np.int32)


@implements(_CV, "median-blur")
@cv_errors
def _median_blur(ctx, src, k):
    _check_kernel(k.x, k.x, MAX_KERNEL, "median")
    return cv2.medianBlur(_mat(ctx, src), k.x)


@implements(_CV, "resize")
@cv_errors
def _resize(ctx, src, size, fx, fy, interp):
    a = _mat(ctx, src)
    w, h = (size.x, size.y) if size.x > 0 and size.y > 0 else \
        (round(a.shape[1] * fx) if a.ndim > 1 else 0, round(a.shape[0] * fy))
    check_size(h, w, channels(a), a.itemsize, "resized image")
    return cv2.resize(a, (size.x, size.y), fx=fx, fy=fy, interpolation=INTERPOLATIONS[interp])


@implements(_CV, "threshold")
@cv_errors
def _threshold(ctx, src, thresh, max_value, ttype):
    a = _mat(ctx, src)
    return _like(cv2.threshold(a, thresh, max_value, THRESHOLDS[ttype])[1], a)


@implements(_CV, "transpose-ND")
@cv_errors
def _transpose_nd(ctx, src, order):
    a = _mat(ctx, src)
    return as_nd(cv2.transposeND(a, order))


@implements(_CV, "estimate-affine2d")
@cv_errors
def _estimate_affine2d(ctx, frm, to):
    m, _inliers = cv2.estimateAffine2D(_mat(ctx, frm), _mat(ctx, to))
    if m is None:
        raise ErrResult("no affine transform could be estimated from these points")
    return m


@implements(_CV, "warp-affine")
@cv_errors
def _warp_affine(ctx, src, m, size):
    a = _mat(ctx, src)
    check_size(size.y, size.x, channels(a), a.itemsize, "warped image")
    return cv2.warpAffine(a, _mat(ctx, m), (size.x, size.y))


@implements(_CV, "get-rotation-matrix2d")
@cv_errors
def _rotation_matrix(ctx, center, angle, scale):
    return cv2.getRotationMatrix2D((float(center.x), float(center.y)), angle, scale)


def _binary(cv_fn):
    @cv_errors
    def apply(ctx, src1, src2):
        a = _mat(ctx, src1)
        return _like(cv_fn(a, _mat(ctx, src2)), a)
    return apply


implements(_CV, "add")(_binary(cv2.add))
implements(_CV, "subtract")(_binary(cv2.subtract))
implements(_CV, "multiply")(_binary(cv2.multiply))
implements(_CV, "divide")(_binary(cv2.divide))


@implements(_CV, "add-weighted")
@cv_errors
def _add_weighted(ctx, src1, alpha, src2, beta, gamma):
    a = _mat(ctx, src1)
    return _like(cv2.addWeighted(a, alpha, _mat(ctx, src2), beta, gamma), a)


@implements(_CV, "exp")
@cv_errors
def _exp(ctx, src):
    a = _mat(ctx, src)
    return _like(cv2.exp(a), a)


@implements(_CV, "hconcat")
@cv_errors
def _hconcat(ctx, src1, src2):
    return cv2.hconcat([_mat(ctx, src1), _mat(ctx, src2)])


@implements(_CV, "vconcat")
@cv_errors
def _vconcat(ctx, src1, src2):
    return cv2.vconcat([_mat(ctx, src1), _mat(ctx, src2)])


@implements(_CV, "lut")
@cv_errors
def _lut(ctx, src, table):
    a = _mat(ctx, src)
    return _like(cv2.LUT(a, _mat(ctx, table)), a)


@implements(_CV, "reduce")
@cv_errors
def _reduce(ctx, src, dim, rtype, dtype):
    return cv2.reduce(_mat(ctx, src), dim, rtype, dtype=_s32(dtype))


@implements(_CV, "reduce-arg-max")
@cv_errors
def _reduce_arg_max(ctx, src, axis, last_index):
    a = _mat(ctx, src)
    return _like(cv2.reduceArgMax(a, axis, lastIndex=last_index), a)


@implements(_CV, "normalize")
@cv_errors
def _normalize(ctx, src, alpha, beta, norm_type):
    a = _mat(ctx, src)
    return _like(cv2.normalize(a, None, alpha, beta, _s32(norm_type)), a)


@implements(_CV, "norm")
@cv_errors
def _norm(ctx, src, norm_type):
    return cv2.norm(_mat(ctx, src), _s32(norm_type))
