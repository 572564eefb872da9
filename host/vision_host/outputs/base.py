"""What every output shares: the :class:`Output` interface, :class:`OutputError`, the frame
check, the frame-rate default, and the closing of threaded outputs at interpreter exit."""

from __future__ import annotations

import abc
import atexit
import logging
import math
import weakref

import numpy as np

__all__ = ["DEFAULT_FPS", "LIVE_OUTPUTS", "Output", "OutputError", "check_frame", "frame_rate_or_default"]

# One logger for every output module: webserver adds its redaction filter to this name.
log = logging.getLogger("vision_host.outputs")

#: Frames/s assumed when a source does not say (``fps`` ≤ 0, NaN or not a number).
DEFAULT_FPS = 30.0

#: Outputs with threads (MJPEG, RTSP) still open: each adds itself when it starts and
#: discards itself when it closes. At interpreter exit they are closed before Python kills
#: daemon threads: a daemon thread caught inside cv2.imencode() or an FFmpeg encoder when
#: the interpreter finalizes aborts the whole process ("terminate called without an active
#: exception"), so encoders must be stopped and joined first.
LIVE_OUTPUTS: weakref.WeakSet[Output] = weakref.WeakSet()


@atexit.register
def _close_live_outputs() -> None:
    for out in list(LIVE_OUTPUTS):
        try:
            out.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("closing %s at exit failed", out.describe())


class OutputError(Exception):
    """An output cannot be opened or used; the message tells the user what to do."""


def check_frame(frame: np.ndarray) -> None:
    """Accept only an H×W×3 uint8 (BGR) array.

    Raises:
        ValueError: anything else, naming its shape and dtype.
    """
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(f"expected an H×W×3 uint8 BGR frame, got shape {shape} dtype {dtype}")


def frame_rate_or_default(fps: object) -> float:
    """``fps`` (frames/s) as a float when it is a finite positive number, else :data:`DEFAULT_FPS`."""
    try:
        rate = float(fps)
    except (TypeError, ValueError):
        return DEFAULT_FPS
    return rate if math.isfinite(rate) and rate > 0 else DEFAULT_FPS


class Output(abc.ABC):
    """Common interface of every output.

    Protocol: ``open()`` once, then any number of ``write()`` calls from one
    thread, then ``close()`` (idempotent, also usable as a context manager).

    Attributes:
        closed: True once the output takes no more frames: after ``close()``,
            or when the user closed the display window. The pipeline should
            stop when it turns True.
        live_view: True for outputs someone watches live (MJPEG streams, the
            display window): while a live source reconnects, the pipeline
            keeps showing them a "reconnecting" frame; recordings and
            re-published streams do not get it. A class attribute.
    """

    closed: bool = False
    live_view: bool = False

    @abc.abstractmethod
    def open(self, width: int, height: int, fps: float) -> None:
        """Prepare for frames of ``width``×``height`` px arriving at ``fps`` frames/s.

        Raises:
            OutputError: the output cannot be opened (message says what to do).
            RuntimeError: called twice.
        """

    @abc.abstractmethod
    def write(self, frame: np.ndarray) -> None:
        """Take one H×W×3 uint8 BGR frame.

        The output never keeps a reference to ``frame``: the caller may
        overwrite the array as soon as this returns.

        Raises:
            ValueError: ``frame`` is not H×W×3 uint8.
            RuntimeError: called before ``open()`` or after ``close()``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Finalize and free everything; safe to call more than once."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the user saying where frames go, e.g. ``MJPEG at http://127.0.0.1:8080/``."""

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
