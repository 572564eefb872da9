"""Host side of ``wasm:cv/features2d``: key-point detectors (AKAZE, BRISK, KAZE, ORB, SIFT)
and descriptor matchers (brute force, FLANN), all OpenCV's.

Each resource handle holds the OpenCV object; ``close`` releases it and later calls return
an ``error-result``. WIT: ``wasm/wit/deps/wasm-cv/features2d.wit``.
"""

from __future__ import annotations

import cv2
import numpy as np

from .canon import ErrResult, implements
from .cv import cv_errors, short_error

_F2D = "wasm:cv/features2d"

#: wasm:cv detector resource → factory of the OpenCV detector with its default parameters.
DETECTORS = {
    "AKAZE-detector": cv2.AKAZE_create,
    "BRISK-detector": cv2.BRISK_create,
    "KAZE-detector": cv2.KAZE_create,
    "ORB-detector": cv2.ORB_create,
    "SIFT-detector": cv2.SIFT_create,
}


#: ORB parameters are clamped so one detection cannot allocate without bound: the largest
#: upscaling of the input (levels before `first`), and at most 32 levels of scale ≤ 2.
MAX_ORB_UPSCALE = 4.0


def _key_points_out(kps) -> list[tuple]:
    return [(k.pt[0], k.pt[1], k.size, k.angle, k.response, k.octave, k.class_id) for k in kps]


def _key_points_in(kps) -> list:
    return [cv2.KeyPoint(k.x, k.y, k.size, k.angle, k.response, k.octave, k.class_id) for k in kps]


def _descriptors(desc) -> np.ndarray:
    return desc if desc is not None else np.empty((0, 0), np.uint8)


def _live(ctx, resource: str, handle: int):
    obj = ctx.table(f"{_F2D}.{resource}").get(handle)
    if obj is None:
        raise ErrResult(f"the {resource} was closed")
    return obj


def _register_detector(resource: str, factory) -> None:
    key = f"{_F2D}.{resource}"

    def new(ctx, _name):
        return factory()

    def close(ctx, handle):
        ctx.table(key).replace(handle, None)

    @cv_errors
    def detect(ctx, handle, src):
        return _key_points_out(_live(ctx, resource, handle).detect(ctx.mats.get(src), None))

    @cv_errors
    def compute(ctx, handle, src, _mask, kps):
        found, desc = _live(ctx, resource, handle).compute(ctx.mats.get(src), _key_points_in(kps))
        return (_key_points_out(found), _descriptors(desc))

    @cv_errors
    def detect_and_compute(ctx, handle, src, mask):
        m = ctx.mats.get(mask)
        found, desc = _live(ctx, resource, handle).detectAndCompute(ctx.mats.get(src), m if m.size else None)
        return (_key_points_out(found), _descriptors(desc))

    implements(_F2D, f"[constructor]{resource}")(new)
    implements(_F2D, f"[method]{resource}.close")(close)
    implements(_F2D, f"[method]{resource}.detect")(detect)
    implements(_F2D, f"[method]{resource}.compute")(compute)
    implements(_F2D, f"[method]{resource}.detect-and-compute")(detect_and_compute)


for _resource, _factory in DETECTORS.items():
    _register_detector(_resource, _factory)


class Unusable:
    """Stands in for a detector OpenCV refused to create: every use is an ``error-result``."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message

    def _fail(self, *_args):
        raise ErrResult(self.message)

    detect = compute = detectAndCompute = _fail


@implements(_F2D, "[static]ORB-detector.new-with-params")
def _orb_new_params(ctx, features, scale, levels, edge_threshold, first, wta_k, score_type, patch_size,
                    fast_threshold):
    # The constructor cannot fail: values past OpenCV's ranges (or the host's limits) are
    # clamped (a scale ≤ 1 or NaN becomes 1.2, its default), and parameters OpenCV still
    # refuses give a detector whose every use returns the refusal.
    scale = float(scale) if 1.0 < scale <= 2.0 else 2.0 if scale > 2.0 else 1.2
    levels = max(min(levels, 32), 1)
    first = min(first, levels - 1)
    while first and scale ** first > MAX_ORB_UPSCALE:      # levels before `first` upscale the image
        first -= 1
    try:
        return cv2.ORB_create(nfeatures=min(features, 100_000), scaleFactor=scale, nlevels=levels,
                              edgeThreshold=min(edge_threshold, 1024), firstLevel=first,
                              WTA_K=min(max(wta_k, 2), 4), scoreType=score_type,
                              patchSize=max(min(patch_size, 1024), 2), fastThreshold=min(fast_threshold, 255))
    except cv2.error as exc:
        return Unusable(f"OpenCV refused these ORB parameters: {short_error(exc)}")


def _knn_k(k: int, train: np.ndarray) -> int:
    """``k`` capped at the train descriptors' count: OpenCV returns no more, and allocates for k."""
    return max(1, min(k, train.shape[0] if train.ndim else 1))


def _matches(ms) -> list[tuple]:
    return [(m.queryIdx, m.trainIdx, m.imgIdx, m.distance) for m in ms]


# -- brute-force matcher ---------------------------------------------------------------------------
_BF = f"{_F2D}.BF-matcher"
_FLANN = f"{_F2D}.flann-based-matcher"


@implements(_F2D, "[constructor]BF-matcher")
def _bf_new(ctx, _name):
    return cv2.BFMatcher()


@implements(_F2D, "[static]BF-matcher.new-with-params")
def _bf_new_params(ctx, norm, cross_check):
    return cv2.BFMatcher(norm, cross_check)


@implements(_F2D, "[method]BF-matcher.close")
def _bf_close(ctx, handle):
    ctx.table(_BF).replace(handle, None)


@implements(_F2D, "[method]BF-matcher.match")
@cv_errors
def _bf_match(ctx, handle, query, train):
    return _matches(_live(ctx, "BF-matcher", handle).match(ctx.mats.get(query), ctx.mats.get(train)))


@implements(_F2D, "[method]BF-matcher.KNN-match")
@cv_errors
def _bf_knn(ctx, handle, query, train, k):
    t = ctx.mats.get(train)
    found = _live(ctx, "BF-matcher", handle).knnMatch(ctx.mats.get(query), t, _knn_k(k, t))
    return [_matches(ms) for ms in found]


# -- FLANN matcher ---------------------------------------------------------------------------------
@implements(_F2D, "[constructor]flann-based-matcher")
def _flann_new(ctx, _name):
    return cv2.FlannBasedMatcher()


@implements(_F2D, "[method]flann-based-matcher.close")
def _flann_close(ctx, handle):
    ctx.table(_FLANN).replace(handle, None)


@implements(_F2D, "[method]flann-based-matcher.KNN-match")
@cv_errors
def _flann_knn(ctx, handle, query, train, k):
    t = ctx.mats.get(train)
    found = _live(ctx, "flann-based-matcher", handle).knnMatch(ctx.mats.get(query), t, _knn_k(k, t))
    return [_matches(ms) for ms in found]
