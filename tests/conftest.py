"""Shared fixtures: paths to real footage, a runtime, and host-function drivers."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

try:
    import vision_host  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vision_host.runtime import NetworkPolicy, Runtime, SandboxLimits  # noqa: E402
from wat import driver_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
SAMPLE_CLIP = REPO / "media" / "bottle-detection.mp4"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The shared real-footage folder (../shared/media); skips when absent."""
    if not MEDIA.is_dir():
        pytest.skip("../shared/media is not present")
    return MEDIA


@pytest.fixture(scope="session")
def real_frame() -> np.ndarray:
    """Frame 30 of the shipped real clip: 360×640×3 uint8 BGR."""
    cap = cv2.VideoCapture(str(SAMPLE_CLIP))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
    ok, frame = cap.read()
    cap.release()
    assert ok, f"cannot read {SAMPLE_CLIP}"
    return frame


@pytest.fixture
def runtime_factory():
    """Build runtimes (closed at teardown): ``runtime_factory(config=…, policy=…, limits=…)``."""
    made = []

    def make(config=None, policy=None, limits=None, cache_dir=None):
        rt = Runtime(config or {}, policy, limits or SandboxLimits(), cache_dir)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


class Driver:
    """A loaded driver processor: call host functions directly and inspect guest memory."""

    def __init__(self, processor):
        self.processor = processor
        self.store = processor.store
        self.mem = processor.ctx.memory
        self.mats = processor.ctx.mats
        self.ctx = processor.ctx

    def call(self, module: str, name: str, *args):
        return self.processor.exports[f"call:{module}#{name}"](self.store, *args)

    def put(self, data: bytes) -> tuple[int, int]:
        return self.mem.lower_bytes(data)

    def put_str(self, text: str) -> tuple[int, int]:
        return self.mem.lower_str(text)

    def retarea(self) -> int:
        ptr = self.mem.alloc(16, 4)
        self.mem.write(ptr, bytes(16))
        return ptr

    def u8(self, ptr: int) -> int:
        return self.mem.read(ptr, 1)[0]

    def u32(self, ptr: int) -> int:
        return struct.unpack("<I", self.mem.read(ptr, 4))[0]

    def string_at(self, retptr: int, offset: int = 4) -> str:
        ptr, n = struct.unpack("<II", self.mem.read(retptr + offset, 8))
        return self.mem.read(ptr, n).decode()


@pytest.fixture
def driver(runtime_factory):
    """``driver([(module, name), …], config=…, policy=…)`` → :class:`Driver`."""

    def make(functions, config=None, policy=None, limits=None):
        rt = runtime_factory(config=config, policy=policy or NetworkPolicy(), limits=limits)
        return Driver(rt.load_bytes(driver_module(functions), "driver"))

    return make
