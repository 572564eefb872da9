"""Host side of ``wasm:cv/dnn``: networks loaded from the models directory, blobs, NMS.

Model files are found only by name in the run's ``--models-dir`` (:func:`model_path`):
absolute paths and ``..`` are refused, wasmVision's well-known aliases (``candy-9``,
``yunet_2023mar``, …) map to their usual file names, and nothing is downloaded. A missing
model is an ``error-result`` that names the file, the models directory and what to do.
Networks run on OpenCV's own backend on the CPU. Blobs are N-d mats (see :mod:`.cv`).
WIT: ``wasm/wit/deps/wasm-cv/dnn.wit``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import cv2
import numpy as np

from .canon import ErrResult, implements
from .cv import as_nd, check_size, cv_errors, rect_xywh, xywh_rect

__all__ = ["KNOWN_MODELS", "ModelError", "model_path"]

_DNN = "wasm:cv/dnn"
NET = "wasm:cv/dnn.net"
LAYER = "wasm:cv/dnn.layer"


class KnownModel(NamedTuple):
    """A model file processors load by name (``filename`` in --models-dir) and where it is published."""
    filename: str
    url: str


_ZOO = "https://github.com/opencv/opencv_zoo/raw/refs/heads/main/models"
_STYLE = "https://github.com/onnx/models/raw/refs/heads/main/validated/vision/style_transfer/fast_neural_style/model"

#: wasmVision's model aliases → file name in the models directory, and where it is published.
KNOWN_MODELS: dict[str, KnownModel] = {
    **{f"{style}-{opset}": KnownModel(f"{style}-{opset}.onnx", f"{_STYLE}/{style}-{opset}.onnx")
       for style in ("candy", "mosaic", "pointilism", "rain-princess", "udnie") for opset in (8, 9)},
    "yunet_2023mar": KnownModel("face_detection_yunet_2023mar.onnx",
                                f"{_ZOO}/face_detection_yunet/face_detection_yunet_2023mar.onnx"),
    **{f"yolov8{v}": KnownModel(f"yolov8{v}.onnx", f"https://huggingface.co/cabelo/yolov8/resolve/main/yolov8{v}.onnx")
       for v in "nsmlx"},
    "yolox": KnownModel("object_detection_yolox_2022nov.onnx",
                        f"{_ZOO}/object_detection_yolox/object_detection_yolox_2022nov.onnx"),
    "mobilefacenet_2022july": KnownModel(
        "face_expression_recognition_mobilefacenet_2022july.onnx",
        f"{_ZOO}/facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july.onnx"),
    "mobilefacenet_2022july_int8": KnownModel(
        "facial_expression_recognition_mobilefacenet_2022july_int8.onnx",
        f"{_ZOO}/facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july_int8.onnx"),
    "mobilefacenet_2022july_int8bq": KnownModel(
        "facial_expression_recognition_mobilefacenet_2022july_int8bq.onnx",
        f"{_ZOO}/facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july_int8bq.onnx"),
    "dexined_2024sep": KnownModel("edge_detection_dexined_2024sep.onnx",
                                  f"{_ZOO}/edge_detection_dexined/edge_detection_dexined_2024sep.onnx"),
}


class ModelError(Exception):
    """A model file cannot be used; the message says which file, where it was looked for and
    what to do."""


def model_path(ctx, name: str, what: str = "model") -> Path:
    """The file for model ``name`` in ``ctx.models_dir``.

    Raises:
        ModelError: ``name`` is empty or a path outside the models directory, no models
            directory was given, or the file is not there.
    """
    if not name:
        raise ModelError(f"no {what} file name was given")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or \
            ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ModelError(f"{what} {name!r} must be a file name in the models directory (--models-dir), not a path")
    known = KNOWN_MODELS.get(name)
    filename = known.filename if known else name
    hint = f" (it is published at {known.url})" if known else ""
    if ctx.models_dir is None:
        raise ModelError(f"{what} file {filename} cannot be loaded: no --models-dir was given; run with "
                         f"--models-dir DIR and put {filename} in DIR{hint}")
    path = Path(ctx.models_dir) / filename
    if not path.is_file():
        raise ModelError(f"{what} file {filename} is not in the models directory {ctx.models_dir}: "
                         f"put it there{hint}")
    return path


def _cpu(net):
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def _load(ctx, read, model: str, config: str = ""):
    try:
        path = model_path(ctx, model)
        config_path = str(model_path(ctx, config, "config")) if config else ""
    except ModelError as exc:
        raise ErrResult(str(exc)) from None
    net = read(str(path), config_path) if read is cv2.dnn.readNet else read(str(path))
    if net.empty():
        raise ErrResult(f"model file {path.name} holds no network layers")
    return _cpu(net)


def _net(ctx, handle) -> "cv2.dnn.Net":
    return ctx.table(NET).get(handle)


# -- layer --------------------------------------------------------------------------------------
# A layer is kept as its name (the only thing wasm:cv asks of it).
@implements(_DNN, "[constructor]layer")
def _layer_new(ctx):
    return ""


@implements(_DNN, "[method]layer.close")
def _layer_close(ctx, handle):
    ctx.table(LAYER).replace(handle, "")


@implements(_DNN, "[method]layer.get-name")
def _layer_name(ctx, handle):
    return ctx.table(LAYER).get(handle)


# -- net ----------------------------------------------------------------------------------------
@implements(_DNN, "[static]net.read")
@cv_errors
def _net_read(ctx, model, config):
    return _load(ctx, cv2.dnn.readNet, model, config)


@implements(_DNN, "[static]net.read-from-ONNX")
@cv_errors
def _net_read_onnx(ctx, model):
    return _load(ctx, cv2.dnn.readNetFromONNX, model)


@implements(_DNN, "[method]net.close")
def _net_close(ctx, handle):
    ctx.table(NET).replace(handle, cv2.dnn.Net())


@implements(_DNN, "[method]net.empty")
def _net_empty(ctx, handle):
    return _net(ctx, handle).empty()


@implements(_DNN, "[method]net.set-input")
@cv_errors
def _net_set_input(ctx, handle, blob, name):
    net = _net(ctx, handle)
    if net.empty():
        raise ErrResult("the network is empty (closed, or never loaded)")
    net.setInput(ctx.mats.get(blob), name)


def _output(a: np.ndarray) -> np.ndarray:
    return as_nd(a) if a.ndim >= 3 else a.reshape(-1, 1) if a.ndim == 1 else a


@implements(_DNN, "[method]net.forward")
@cv_errors
def _net_forward(ctx, handle, name):
    net = _net(ctx, handle)
    if net.empty():
        raise ErrResult("the network is empty (closed, or never loaded)")
    out = net.forward(name) if name else net.forward()
    if out is None or out.size == 0:
        raise ErrResult("the network's forward pass gave an empty output")
    return _output(out)


@implements(_DNN, "[method]net.forward-layers")
@cv_errors
def _net_forward_layers(ctx, handle, names):
    net = _net(ctx, handle)
    if net.empty():
        raise ErrResult("the network is empty (closed, or never loaded)")
    if not names:
        raise ErrResult("forward-layers needs at least one output name")
    outs = net.forward(list(names))
    return [_output(o) for o in outs]


@implements(_DNN, "[method]net.get-unconnected-out-layers")
@cv_errors
def _net_unconnected(ctx, handle):
    return np.asarray(_net(ctx, handle).getUnconnectedOutLayers(), np.uint32).ravel()


@implements(_DNN, "[method]net.get-layer-names")
@cv_errors
def _net_layer_names(ctx, handle):
    return list(_net(ctx, handle).getLayerNames())


@implements(_DNN, "[method]net.get-layer")
@cv_errors
def _net_get_layer(ctx, handle, layer_id):
    net = _net(ctx, handle)
    if net.empty():
        raise ErrResult("the network is empty (closed, or never loaded)")
    if layer_id > len(net.getLayerNames()):
        raise ErrResult(f"the network has no layer {layer_id} (ids 0 to {len(net.getLayerNames())})")
    return net.getLayer(layer_id).name


# -- blobs ----------------------------------------------------------------------------------------
def _blob_params(p) -> "cv2.dnn.Image2BlobParams":
    s = float(p.scale_factor)
    return cv2.dnn.Image2BlobParams(scalefactor=(s, s, s, s), size=(p.size.x, p.size.y), mean=tuple(p.mean),
                                    swapRB=p.swap_RB, ddepth=p.ddepth, datalayout=p.data_layout,
                                    mode=p.padding_mode, borderValue=tuple(p.border))


def _check_blob(image: np.ndarray, size) -> None:
    h, w = (size.y, size.x) if size.x > 0 and size.y > 0 else image.shape[:2]
    check_size(h, w, image.shape[2] if image.ndim == 3 else 1, 4, "blob")


def _blob(blob) -> np.ndarray:
    if blob is None or blob.size == 0:
        raise ErrResult("the image gave an empty blob")
    return as_nd(blob)


@implements(_DNN, "blob-from-image")
@cv_errors
def _blob_from_image(ctx, image, scale, size, mean, swap_rb, crop):
    a = ctx.mats.get(image)
    _check_blob(a, size)
    return _blob(cv2.dnn.blobFromImage(a, scale, (size.x, size.y), tuple(mean), swap_rb, crop))


@implements(_DNN, "blob-from-image-with-params")
@cv_errors
def _blob_from_image_with_params(ctx, image, params):
    a = ctx.mats.get(image)
    _check_blob(a, params.size)
    return _blob(cv2.dnn.blobFromImageWithParams(a, _blob_params(params)))


@implements(_DNN, "blob-rects-to-image-rects")
@cv_errors
def _blob_rects_to_image_rects(ctx, params, rects, image_size):
    if not rects:
        return []
    out = _blob_params(params).blobRectsToImageRects([rect_xywh(r) for r in rects], (image_size.x, image_size.y))
    return [xywh_rect(*r) for r in out]


@implements(_DNN, "NMS-boxes")
@cv_errors
def _nms_boxes(ctx, boxes, scores, score_threshold, nms_threshold):
    if len(boxes) != len(scores):
        raise ErrResult(f"NMS-boxes got {len(boxes)} boxes but {len(scores)} scores")
    if not boxes:
        return []
    kept = cv2.dnn.NMSBoxes([rect_xywh(r) for r in boxes], list(scores), score_threshold, nms_threshold)
    return np.asarray(kept, np.uint32).ravel()
