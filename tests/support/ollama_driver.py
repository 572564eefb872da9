"""The ``ollama`` processor driven frame by frame in tests: loaded against a server, fed frames
until something happened (a condition on the store, the server's requests), never a fixed sleep."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from conftest import CAR_CLIP, REPO
from vision_host.runtime import NetworkPolicy

OLLAMA_WASM = REPO / "wasm" / "ollama.wasm"


@pytest.fixture(scope="module")
def car():
    """Frames 0 (a still street) and 80 (the car in view) of the shipped car clip: 768×432×3
    uint8 BGR each. A fixture: import it into a test module to use it."""
    cap = cv2.VideoCapture(str(CAR_CLIP))
    frames = [cap.read()[1] for _ in range(81)]
    cap.release()
    return frames[0], frames[80]


def load_ollama(runtime_factory, url: str, **config):
    """``(runtime, processor)``: the ``ollama`` processor in a runtime whose config is
    ``ollama-url=url`` plus ``config`` (``ollama_model="x"`` → ``ollama-model=x``) and whose
    network policy allows exactly those URLs."""
    cfg = {"ollama-url": url, **{k.replace("_", "-"): str(v) for k, v in config.items()}}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    return rt, rt.load(OLLAMA_WASM)


def run_until(step, condition, timeout_s: float = 10.0, step_s: float = 0.01):
    """Call ``step()`` (one frame) every ``step_s`` s until ``condition()``; returns the last
    ``step()`` result. Raises AssertionError after ``timeout_s`` s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = step()
        if condition():
            return out
        time.sleep(step_s)
    raise AssertionError("condition not reached in time")


def feed_until(processor, frame, condition, timeout_s: float = 10.0, step_s: float = 0.01):
    """:func:`run_until` feeding copies of ``frame`` (H×W×3 uint8 BGR) to ``processor``; returns
    the last processed frame."""
    return run_until(lambda: processor.process(frame.copy()), condition, timeout_s, step_s)


def stats_count(rt, key: str) -> int:
    """The ``ollama`` processor's counter ``key`` (``requests-change``, ``frames-unchanged``, …)."""
    return int(rt.processor_store.get("ollama-stats", key) or 0)



def indexed_frame(i: int, width: int = 640, height: int = 360):
    """A flat frame (``height``×``width``×3 uint8 BGR) whose colour encodes ``i`` (0–4095) in
    base 16, one digit a channel: blue ``(i % 16)·16 + 8``, green ``(i // 16 % 16)·16 + 8``,
    red ``(i // 256)·16 + 8``. JPEG keeps a flat colour within a few levels, so
    :func:`frame_index` reads ``i`` back from what a server received, downscaled or not."""
    if not 0 <= i < 4096:
        raise ValueError(f"frame index {i} is outside 0-4095: feed fewer frames or reuse indices")
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = ((i % 16) * 16 + 8, (i // 16 % 16) * 16 + 8, (i // 256) * 16 + 8)
    return frame


def frame_index(image) -> int:
    """The index :func:`indexed_frame` wrote into ``image`` (a decoded image or a part of one,
    e.g. a grid tile without its label), from its median colour."""
    b, g, r = (round((float(np.median(image[..., c])) - 8) / 16) for c in (0, 1, 2))
    return r * 256 + g * 16 + b
