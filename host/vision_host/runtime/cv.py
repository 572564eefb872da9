"""Host side of ``wasm:cv``: the ``mat`` resource and the image functions processors call.

Pixels stay in the host as numpy arrays (H×W×3 uint8 BGR frames; other shapes and depths for
mats a processor creates); processors hold u32 handles from their instance's
:class:`~vision_host.runtime.mats.MatTable`. Functions that wasm:cv declares as taking an
owned ``mat`` do not consume it (as in wasmVision's runtime): the processor still drops what
it created. OpenCV errors become ``error-result`` strings; ABI violations trap.
WIT: ``wasm/wit/deps/wasm-cv/cv.wit``.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from .abi import AbiError, host_function
from .mats import cv_type, dtype_channels

_M = "wasm:cv/mat"
_CV = "wasm:cv/cv"

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


def _enum(table: tuple, index: int, what: str):
    if not 0 <= index < len(table):
        raise AbiError(f"invalid {what} {index}")
    return table[index]


def bgr(r: int, g: int, b: int, a: int) -> tuple[int, int, int, int]:
    """wasm:cv RGBA → the colour tuple OpenCV draws with (B, G, R, A)."""
    return (b & 0xFF, g & 0xFF, r & 0xFF, a & 0xFF)


def _ret_mat(ctx, retptr: int, produce) -> None:
    """Run ``produce()`` and write ``result<mat, error-result>``."""
    try:
        array = produce()
    except cv2.error as exc:
        ctx.memory.ret_err_str(retptr, str(exc).strip().splitlines()[-1])
        return
    ctx.memory.ret_ok_u32(retptr, ctx.mats.insert(array))


def _ret_unit(ctx, retptr: int, draw) -> None:
    """Run ``draw()`` and write ``result<_, error-result>``."""
    try:
        draw()
    except cv2.error as exc:
        ctx.memory.ret_err_str(retptr, str(exc).strip().splitlines()[-1])
        return
    ctx.memory.ret_ok_unit(retptr)


def _bytes_2d(array: np.ndarray) -> np.ndarray:
    """Rows × (cols·channels) view of an 8-bit mat, as OpenCV's ``at<uchar>(row, col)`` sees it."""
    if array.dtype.itemsize != 1:
        raise AbiError("get/set-uchar-at on a mat that is not 8-bit")
    return array.reshape(array.shape[0], -1) if array.ndim == 3 else array


# -- mat resource ----------------------------------------------------------------------
@host_function(_M, "[constructor]mat", "i", "i")
def _mat_new(ctx, _id):
    return ctx.mats.insert(np.empty((0, 0), np.uint8))


@host_function(_M, "[static]mat.new-with-size", "iii", "i")
def _mat_new_with_size(ctx, cols, rows, mattype):
    dtype, channels = dtype_channels(mattype)
    if cols * rows * channels > 64 * 1024 * 1024:
        raise AbiError(f"mat of {cols}×{rows}×{channels} is too large")
    shape = (rows, cols) if channels == 1 else (rows, cols, channels)
    return ctx.mats.insert(np.zeros(shape, dtype))


@host_function(_M, "[method]mat.clone", "i", "i")
def _mat_clone(ctx, handle):
    return ctx.mats.insert(ctx.mats.get(handle).copy())


@host_function(_M, "[method]mat.close", "i")
def _mat_close(ctx, handle):
    ctx.mats.replace(handle, np.empty((0, 0), np.uint8))


@host_function(_M, "[resource-drop]mat", "i")
def _mat_drop(ctx, handle):
    ctx.mats.take(handle)


@host_function(_M, "[method]mat.cols", "i", "i")
def _mat_cols(ctx, handle):
    return ctx.mats.get(handle).shape[1]


@host_function(_M, "[method]mat.rows", "i", "i")
def _mat_rows(ctx, handle):
    return ctx.mats.get(handle).shape[0]


@host_function(_M, "[method]mat.mattype", "i", "i")
def _mat_type(ctx, handle):
    return cv_type(ctx.mats.get(handle))


@host_function(_M, "[method]mat.size", "ii")
def _mat_size(ctx, handle, retptr):
    a = ctx.mats.get(handle)
    ctx.memory.ret_list(retptr, struct.pack("<II", a.shape[0], a.shape[1]), 2, 4)


@host_function(_M, "[method]mat.step", "i", "i")
def _mat_step(ctx, handle):
    a = ctx.mats.get(handle)
    return a.strides[0] if a.size else 0


@host_function(_M, "[method]mat.elemsize", "i", "i")
def _mat_elemsize(ctx, handle):
    a = ctx.mats.get(handle)
    return a.itemsize * (a.shape[2] if a.ndim == 3 else 1)


@host_function(_M, "[method]mat.empty", "i", "i")
def _mat_empty(ctx, handle):
    return int(ctx.mats.get(handle).size == 0)


@host_function(_M, "[method]mat.region", "iiiii", "i")
def _mat_region(ctx, handle, x0, y0, x1, y1):
    a = ctx.mats.get(handle)
    h, w = a.shape[:2]
    x0, x1 = sorted((min(max(x0, 0), w), min(max(x1, 0), w)))
    y0, y1 = sorted((min(max(y0, 0), h), min(max(y1, 0), h)))
    return ctx.mats.insert(a[y0:y1, x0:x1])


@host_function(_M, "[method]mat.copy-to", "ii")
def _mat_copy_to(ctx, handle, dst):
    src, target = ctx.mats.get(handle), ctx.mats.get(dst)
    if target.shape == src.shape and target.dtype == src.dtype:
        np.copyto(target, src)     # writes through a region view, as cv::Mat::copyTo does
    else:
        ctx.mats.replace(dst, src.copy())


def _at(array: np.ndarray, row: int, col: int) -> tuple[np.ndarray, int, int]:
    plane = _bytes_2d(array)
    if not (0 <= row < plane.shape[0] and 0 <= col < plane.shape[1]):
        raise AbiError(f"element ({row}, {col}) is outside the {plane.shape[0]}×{plane.shape[1]} mat")
    return plane, row, col


@host_function(_M, "[method]mat.get-uchar-at", "iii", "i")
def _mat_get_uchar(ctx, handle, row, col):
    plane, r, c = _at(ctx.mats.get(handle), row, col)
    return int(plane[r, c])


@host_function(_M, "[method]mat.set-uchar-at", "iiii")
def _mat_set_uchar(ctx, handle, row, col, value):
    plane, r, c = _at(ctx.mats.get(handle), row, col)
    plane[r, c] = value & 0xFF


@host_function(_M, "[method]mat.get-vecb-at", "iiii")
def _mat_get_vecb(ctx, handle, row, col, retptr):
    a = ctx.mats.get(handle)
    if a.dtype != np.uint8 or not (0 <= row < a.shape[0] and 0 <= col < a.shape[1]):
        raise AbiError(f"get-vecb-at({row}, {col}) outside the mat or on a mat that is not 8-bit")
    pixel = a[row, col].tobytes()
    ctx.memory.ret_list(retptr, pixel, len(pixel), 1)


# -- cv: drawing -------------------------------------------------------------------------
@host_function(_CV, "put-text", "iiiiiiFiiiiii")
def _put_text(ctx, img, t_p, t_n, x, y, font, scale, r, g, b, a, thickness, retptr):
    array = ctx.mats.get(img)
    text = ctx.memory.read_str(t_p, t_n)
    face = _enum(FONTS, font, "font")
    _ret_unit(ctx, retptr, lambda: cv2.putText(array, text, (x, y), face, scale, bgr(r, g, b, a),
                                                 max(1, thickness), cv2.LINE_AA))


@host_function(_CV, "rectangle", "iiiiiiiiiii")
def _rectangle(ctx, img, x0, y0, x1, y1, r, g, b, a, thickness, retptr):
    array = ctx.mats.get(img)
    _ret_unit(ctx, retptr, lambda: cv2.rectangle(array, (x0, y0), (x1, y1), bgr(r, g, b, a), max(1, thickness)))


@host_function(_CV, "circle", "iiiiiiiiii")
def _circle(ctx, img, cx, cy, radius, r, g, b, a, thickness, retptr):
    array = ctx.mats.get(img)
    _ret_unit(ctx, retptr, lambda: cv2.circle(array, (cx, cy), radius, bgr(r, g, b, a), max(1, thickness)))


@host_function(_CV, "line", "iiiiiiiiiii")
def _line(ctx, img, x0, y0, x1, y1, r, g, b, a, thickness, retptr):
    array = ctx.mats.get(img)
    _ret_unit(ctx, retptr, lambda: cv2.line(array, (x0, y0), (x1, y1), bgr(r, g, b, a), max(1, thickness)))


# -- cv: image processing ------------------------------------------------------------------
@host_function(_CV, "blur", "iiii")
def _blur(ctx, src, kx, ky, retptr):
    array = ctx.mats.get(src)
    _ret_mat(ctx, retptr, lambda: cv2.blur(array, (kx, ky)))


@host_function(_CV, "gaussian-blur", "iiiffii")
def _gaussian_blur(ctx, src, kx, ky, sigma_x, sigma_y, border, retptr):
    array = ctx.mats.get(src)
    flag = _enum(BORDERS, border, "border type")
    _ret_mat(ctx, retptr, lambda: cv2.GaussianBlur(array, (kx, ky), sigma_x, sigmaY=sigma_y, borderType=flag))


@host_function(_CV, "resize", "iiiffii")
def _resize(ctx, src, w, h, fx, fy, interp, retptr):
    array = ctx.mats.get(src)
    flag = _enum(INTERPOLATIONS, interp, "interpolation")
    _ret_mat(ctx, retptr, lambda: cv2.resize(array, (w, h), fx=fx, fy=fy, interpolation=flag))
