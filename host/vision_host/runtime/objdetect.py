"""Host side of ``wasm:cv/objdetect``: Haar cascades, HOG people detection, YuNet face
detection and SFace face recognition.

Cascades load OpenCV's bundled files by name (``cv2.data.haarcascades``) or files from the
models directory; YuNet and SFace models come from the models directory only (see
:func:`.dnn.model_path`). Constructors cannot fail, so a detector whose model is missing is
still created: the problem is logged once and each later call returns it as an
``error-result``. WIT: ``wasm/wit/deps/wasm-cv/objdetect.wit``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .canon import ErrResult, implements
from .cv import cv_errors, xywh_rect
from .dnn import ModelError, model_path

__all__ = ["HAAR_DIR", "FaceDetector", "FaceRecognizer", "cascade_path"]

_OD = "wasm:cv/objdetect"
CASCADE = "wasm:cv/objdetect.cascade-classifier"
HOG = "wasm:cv/objdetect.HOG-descriptor"
FACE_DETECTOR = "wasm:cv/objdetect.face-detector-YN"
FACE_RECOGNIZER = "wasm:cv/objdetect.face-recognizer-SF"

#: Where OpenCV's bundled Haar cascades are.
HAAR_DIR = Path(cv2.data.haarcascades)
#: Largest HOG padding (px) and face-detector input side (px) the host accepts: both size
#: allocations inside OpenCV.
MAX_HOG_PADDING = 1024
MAX_FACE_INPUT = 8192
#: Smallest cascade scale step: finer steps multiply the scans of the image.
MIN_CASCADE_SCALE = 1.01


def _input_size_ok(size) -> bool:
    return 0 < size[0] <= MAX_FACE_INPUT and 0 < size[1] <= MAX_FACE_INPUT


def _rects(found) -> list:
    return [xywh_rect(*r) for r in found] if len(found) else []


def _closed(what: str) -> ErrResult:
    return ErrResult(f"the {what} was closed")


# -- cascade classifier -------------------------------------------------------------------------
@implements(_OD, "[constructor]cascade-classifier")
def _cascade_new(ctx, _name):
    return cv2.CascadeClassifier()


@implements(_OD, "[method]cascade-classifier.close")
def _cascade_close(ctx, handle):
    ctx.table(CASCADE).replace(handle, cv2.CascadeClassifier())


def cascade_path(ctx, file: str) -> Path:
    """The cascade file ``file``: OpenCV's bundled one of that name, else one in the models
    directory.

    Raises:
        ModelError: not found (the message says where it was looked for).
    """
    if file and "/" not in file and "\\" not in file and file not in (".", ".."):
        bundled = HAAR_DIR / file
        if bundled.is_file():
            return bundled
    try:
        return model_path(ctx, file, "cascade")
    except ModelError as exc:
        raise ModelError(f"{exc} (OpenCV's bundled cascades, e.g. haarcascade_frontalface_default.xml, "
                         f"are found by file name)") from None


@implements(_OD, "[method]cascade-classifier.load")
def _cascade_load(ctx, handle, file):
    table = ctx.table(CASCADE)
    table.get(handle)
    try:
        path = cascade_path(ctx, file)
    except ModelError as exc:
        ctx.log_once(str(exc))
        return False
    classifier = cv2.CascadeClassifier()
    try:
        ok = classifier.load(str(path))
    except cv2.error:
        ok = False
    if not ok:
        ctx.log_once(f"cascade file {path.name} could not be read as a cascade classifier")
        return False
    table.replace(handle, classifier)
    return True


def _cascade(ctx, handle) -> cv2.CascadeClassifier:
    classifier = ctx.table(CASCADE).get(handle)
    if classifier.empty():
        raise ErrResult("the cascade classifier has no cascade: call load() first")
    return classifier


@implements(_OD, "[method]cascade-classifier.detect-multi-scale")
@cv_errors
def _cascade_detect(ctx, handle, image):
    return _rects(_cascade(ctx, handle).detectMultiScale(ctx.mats.get(image)))


@implements(_OD, "[method]cascade-classifier.detect-multi-scale-with-params")
@cv_errors
def _cascade_detect_params(ctx, handle, image, scale, min_neighbors, flags, min_size, max_size):
    if not MIN_CASCADE_SCALE <= scale < 1e6:
        raise ErrResult(f"cascade scale step {scale:g} is out of range (at least {MIN_CASCADE_SCALE}: "
                        f"each step rescans the image)")
    found = _cascade(ctx, handle).detectMultiScale(ctx.mats.get(image), scale, min_neighbors, flags,
                                                   (min_size.x, min_size.y), (max_size.x, max_size.y))
    return _rects(found)


# -- HOG people detector ---------------------------------------------------------------------------
@implements(_OD, "[constructor]HOG-descriptor")
def _hog_new(ctx, _name):
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    return hog


@implements(_OD, "[method]HOG-descriptor.close")
def _hog_close(ctx, handle):
    ctx.table(HOG).replace(handle, None)


def _hog(ctx, handle) -> cv2.HOGDescriptor:
    hog = ctx.table(HOG).get(handle)
    if hog is None:
        raise _closed("HOG descriptor")
    return hog


def _hog_image(hog, a: np.ndarray, pad_x: int = 0, pad_y: int = 0):
    """``a`` when HOG can scan it, None when no detection window fits in it (OpenCV's HOG
    corrupts memory on such images, so they never reach it)."""
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ErrResult(f"HOG needs an 8-bit gray or BGR image, not a {a.dtype} mat of shape {a.shape}")
    win_w, win_h = hog.winSize
    if a.shape[0] + 2 * pad_y < win_h or a.shape[1] + 2 * pad_x < win_w:
        return None
    return a


@implements(_OD, "[method]HOG-descriptor.detect-multi-scale")
@cv_errors
def _hog_detect(ctx, handle, image):
    hog = _hog(ctx, handle)
    a = _hog_image(hog, ctx.mats.get(image))
    if a is None:
        return []
    found, _weights = hog.detectMultiScale(a)
    return _rects(found)


@implements(_OD, "[method]HOG-descriptor.detect-multi-scale-with-params")
@cv_errors
def _hog_detect_params(ctx, handle, image, hit_threshold, win_stride, padding, scale, final_threshold, meanshift):
    if not (0 <= padding.x <= MAX_HOG_PADDING and 0 <= padding.y <= MAX_HOG_PADDING):
        raise ErrResult(f"HOG padding {padding.x}×{padding.y} px is out of range (0 to {MAX_HOG_PADDING} px)")
    if (win_stride.x, win_stride.y) != (0, 0) and not (win_stride.x > 0 and win_stride.y > 0):
        raise ErrResult(f"HOG window stride {win_stride.x}×{win_stride.y} px: both sides must be positive "
                        f"(or both 0 for the default)")
    if not (np.isfinite(scale) and np.isfinite(hit_threshold) and np.isfinite(final_threshold)):
        raise ErrResult("HOG scale and thresholds must be finite numbers")
    hog = _hog(ctx, handle)
    a = _hog_image(hog, ctx.mats.get(image), padding.x, padding.y)
    if a is None:
        return []
    found, _weights = hog.detectMultiScale(
        a, hitThreshold=hit_threshold, winStride=(win_stride.x, win_stride.y),
        padding=(padding.x, padding.y), scale=scale, groupThreshold=final_threshold,
        useMeanshiftGrouping=meanshift)
    return _rects(found)


# -- YuNet face detector ---------------------------------------------------------------------------
class FaceDetector:
    """A ``cv2.FaceDetectorYN`` (None when its model could not be loaded, or after close)
    with the settings it was created with and why it is unusable."""

    __slots__ = ("detector", "error", "input_size", "score", "nms", "top_k")

    def __init__(self, detector, error: str | None, input_size, score: float, nms: float, top_k: int):
        self.detector = detector
        self.error = error
        self.input_size = input_size
        self.score, self.nms, self.top_k = score, nms, top_k


def _new_face_detector(ctx, model, config, size, score, nms, top_k) -> FaceDetector:
    input_size = (size.x, size.y)
    try:
        if not _input_size_ok(input_size):
            raise ModelError(f"face detector input size {size.x}×{size.y} px is out of range "
                             f"(1 to {MAX_FACE_INPUT} px a side)")
        path = model_path(ctx, model, "face detection model")
        config_path = str(model_path(ctx, config, "config")) if config else ""
        detector = cv2.FaceDetectorYN.create(str(path), config_path, input_size, score, nms, top_k,
                                             cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU)
    except (ModelError, cv2.error) as exc:
        message = str(exc) if isinstance(exc, ModelError) else \
            f"face detection model {model} could not be loaded: {' '.join(str(exc).split())[:200]}"
        ctx.log_once(message)
        return FaceDetector(None, message, input_size, score, nms, top_k)
    return FaceDetector(detector, None, input_size, score, nms, top_k)


@implements(_OD, "[constructor]face-detector-YN")
def _face_detector_new(ctx, model, config, input_size):
    return _new_face_detector(ctx, model, config, input_size, 0.9, 0.3, 5000)


@implements(_OD, "[static]face-detector-YN.new-with-params")
def _face_detector_new_params(ctx, model, config, input_size, score, nms, top_k, _backend, _target):
    return _new_face_detector(ctx, model, config, input_size, score, nms, top_k)


@implements(_OD, "[method]face-detector-YN.close")
def _face_detector_close(ctx, handle):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    if fd.detector is not None:
        fd.detector, fd.error = None, "the face detector was closed"


@implements(_OD, "[method]face-detector-YN.detect")
@cv_errors
def _face_detect(ctx, handle, image):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    if fd.detector is None:
        raise ErrResult(fd.error)
    if not _input_size_ok(fd.input_size):
        raise ErrResult(f"face detector input size {fd.input_size[0]}×{fd.input_size[1]} px is out of range "
                        f"(1 to {MAX_FACE_INPUT} px a side)")
    _, faces = fd.detector.detect(ctx.mats.get(image))
    return faces if faces is not None else np.empty((0, 15), np.float32)


@implements(_OD, "[method]face-detector-YN.get-input-size")
def _fd_get_input_size(ctx, handle):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    return fd.input_size


@implements(_OD, "[method]face-detector-YN.get-nms-threshold")
def _fd_get_nms(ctx, handle):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    return fd.detector.getNMSThreshold() if fd.detector is not None else fd.nms


@implements(_OD, "[method]face-detector-YN.get-score-threshold")
def _fd_get_score(ctx, handle):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    return fd.detector.getScoreThreshold() if fd.detector is not None else fd.score


@implements(_OD, "[method]face-detector-YN.get-topk")
def _fd_get_topk(ctx, handle):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    return fd.detector.getTopK() if fd.detector is not None else fd.top_k


@implements(_OD, "[method]face-detector-YN.set-input-size")
def _fd_set_input_size(ctx, handle, size):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    fd.input_size = (size.x, size.y)
    if fd.detector is not None and _input_size_ok(fd.input_size):
        fd.detector.setInputSize(fd.input_size)


@implements(_OD, "[method]face-detector-YN.set-nms-threshold")
def _fd_set_nms(ctx, handle, value):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    fd.nms = value
    if fd.detector is not None:
        fd.detector.setNMSThreshold(value)


@implements(_OD, "[method]face-detector-YN.set-score-threshold")
def _fd_set_score(ctx, handle, value):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    fd.score = value
    if fd.detector is not None:
        fd.detector.setScoreThreshold(value)


@implements(_OD, "[method]face-detector-YN.set-topk")
def _fd_set_topk(ctx, handle, value):
    fd = ctx.table(FACE_DETECTOR).get(handle)
    fd.top_k = value
    if fd.detector is not None:
        fd.detector.setTopK(min(value, 0x7FFF_FFFF))


# -- SFace face recognizer -------------------------------------------------------------------------
class FaceRecognizer:
    """A ``cv2.FaceRecognizerSF`` (None when unusable) and why it is unusable."""

    __slots__ = ("recognizer", "error")

    def __init__(self, recognizer, error: str | None):
        self.recognizer = recognizer
        self.error = error


def _new_face_recognizer(ctx, model, config) -> FaceRecognizer:
    try:
        path = model_path(ctx, model, "face recognition model")
        config_path = str(model_path(ctx, config, "config")) if config else ""
        recognizer = cv2.FaceRecognizerSF.create(str(path), config_path, cv2.dnn.DNN_BACKEND_OPENCV,
                                                 cv2.dnn.DNN_TARGET_CPU)
    except (ModelError, cv2.error) as exc:
        message = str(exc) if isinstance(exc, ModelError) else \
            f"face recognition model {model} could not be loaded: {' '.join(str(exc).split())[:200]}"
        ctx.log_once(message)
        return FaceRecognizer(None, message)
    return FaceRecognizer(recognizer, None)


@implements(_OD, "[constructor]face-recognizer-SF")
def _face_recognizer_new(ctx, model, config):
    return _new_face_recognizer(ctx, model, config)


@implements(_OD, "[static]face-recognizer-SF.new-with-params")
def _face_recognizer_new_params(ctx, model, config, _backend, _target):
    return _new_face_recognizer(ctx, model, config)


@implements(_OD, "[method]face-recognizer-SF.close")
def _face_recognizer_close(ctx, handle):
    fr = ctx.table(FACE_RECOGNIZER).get(handle)
    if fr.recognizer is not None:
        fr.recognizer, fr.error = None, "the face recognizer was closed"


def _recognizer(ctx, handle):
    fr = ctx.table(FACE_RECOGNIZER).get(handle)
    if fr.recognizer is None:
        raise ErrResult(fr.error)
    return fr.recognizer


@implements(_OD, "[method]face-recognizer-SF.align-crop")
@cv_errors
def _fr_align_crop(ctx, handle, src, face_box):
    return _recognizer(ctx, handle).alignCrop(ctx.mats.get(src), ctx.mats.get(face_box))


@implements(_OD, "[method]face-recognizer-SF.feature")
@cv_errors
def _fr_feature(ctx, handle, aligned):
    return _recognizer(ctx, handle).feature(ctx.mats.get(aligned)).copy()


@implements(_OD, "[method]face-recognizer-SF.match")
@cv_errors
def _fr_match(ctx, handle, face1, face2):
    return _recognizer(ctx, handle).match(ctx.mats.get(face1), ctx.mats.get(face2))


@implements(_OD, "[method]face-recognizer-SF.match-with-params")
@cv_errors
def _fr_match_params(ctx, handle, face1, face2, distance):
    return _recognizer(ctx, handle).match(ctx.mats.get(face1), ctx.mats.get(face2), distance)

