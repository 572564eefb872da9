"""Common fixtures: paths to real footage, a runtime, and host-function drivers."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

try:
    import vision_host  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))

# Stand-ins and helpers (tests/support/) are imported by name from every tier.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from vision_host.runtime import NetworkPolicy, Runtime, SandboxLimits  # noqa: E402
from wat import driver_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Real camera footage the repository ships (media/README.md): every test input is in the
#: repository or made by the tests.
MEDIA = REPO / "media"
SAMPLE_CLIP = MEDIA / "bottle-detection.mp4"   # 640×360, 1189 frames at 29.83 fps
CAR_CLIP = MEDIA / "car-detection.mp4"         # 768×432, 120 frames at 12.5 fps
PEOPLE_CLIP = MEDIA / "person-detection.mp4"   # 768×432, 31 frames at 10 fps

#: Debian packages that some tests need, by what they provide. A test whose package is missing
#: skips with :func:`missing_system_package`'s reason, and the run ends with one line naming
#: every package to install (:func:`pytest_terminal_summary`).
SYSTEM_PACKAGES = {
    "ffmpeg": "ffmpeg",
    "ffprobe": "ffmpeg",
    "rtsp-server": "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
                   "gstreamer1.0-plugins-bad",
    "chromium": "chromium",
    "mosquitto": "mosquitto",
}
_APT_HINT = re.compile(r"\(apt-get install ([^)]+)\)")


def missing_system_package(what: str) -> str:
    """The skip reason for a test that needs ``what`` (a key of :data:`SYSTEM_PACKAGES`)."""
    return f"{what} is not installed (apt-get install {SYSTEM_PACKAGES[what]})"


def has_gst_rtsp_server() -> bool:
    """Whether the system Python has GStreamer's RTSP server through python3-gi (the RTSP tests' server)."""
    if not Path("/usr/bin/python3").exists():
        return False
    probe = subprocess.run(["/usr/bin/python3", "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True)
    return probe.returncode == 0


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason=missing_system_package("ffmpeg"))
needs_ffprobe = pytest.mark.skipif(shutil.which("ffprobe") is None, reason=missing_system_package("ffprobe"))


def pytest_configure(config):
    """Runs keep their caption history and outbox under the user's data directory by default:
    the tests' runs (and the commands they start) keep theirs in a directory of their own, never
    in the real one."""
    import os
    import tempfile
    config._vision_host_data_home = os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="vision-host-test-data-")


def pytest_unconfigure(config):
    """Remove the tests' data directory (:func:`pytest_configure`)."""
    home = getattr(config, "_vision_host_data_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """End the run with one line naming the Debian packages whose absence skipped tests."""
    packages: dict[str, None] = {}
    skipped = 0
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if found := _APT_HINT.search(reason):
            skipped += 1
            packages.update(dict.fromkeys(found.group(1).split()))
    if packages:
        terminalreporter.write_line(
            f"{skipped} tests skipped for missing system packages; to run them: "
            f"sudo apt-get install -y --no-install-recommends {' '.join(packages)}", yellow=True)


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


@pytest.fixture
def standin():
    """A fresh Ollama stand-in (``tests/support/ollama_standin.py``) on a free loopback port,
    answering at once; stopped after the test. A suite needing another latency or reply makes
    its own."""
    from ollama_standin import OllamaStandin

    server = OllamaStandin()
    yield server
    server.stop()
