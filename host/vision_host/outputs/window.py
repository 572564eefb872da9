"""A desktop window: :class:`DisplayOutput` (OpenCV's ``imshow``), and :func:`make` for ``-o display``."""

from __future__ import annotations

import logging
import os
import sys

import cv2
import numpy as np

from .base import Output, OutputError, check_frame

__all__ = ["DisplayOutput", "make"]

log = logging.getLogger("vision_host.outputs")

_DISPLAY_ADVICE = "use -o mjpeg to watch in a browser or -o file -d out.mp4"


class DisplayOutput(Output):
    """Show frames in an OpenCV window (``cv2.imshow`` + ``cv2.waitKey(1)``).

    Pressing ``q`` or Esc in the window, or closing it, sets :attr:`closed`;
    the pipeline should check it after each :meth:`write` and stop.

    Availability is checked in :meth:`open` without crashing: on Linux a
    display (``DISPLAY`` or ``WAYLAND_DISPLAY``) must be set, and OpenCV must
    have a GUI backend (``opencv-python-headless`` has none: its
    ``cv2.namedWindow`` raises ``cv2.error``).

    Args:
        window_name: the window title (default ``"vision-host"``).

    Raises:
        OutputError: from :meth:`open` when no window can be opened, e.g.
            "cannot open a window: no display (DISPLAY unset); use -o mjpeg to
            watch in a browser or -o file -d out.mp4".
    """

    live_view = True

    def __init__(self, window_name: str = "vision-host") -> None:
        self.window_name = window_name or "vision-host"
        self.closed = False
        self._opened = False
        # Some backends do not report WND_PROP_VISIBLE (they return -1 while the
        # window is open); trust it only if it read >= 1 after the first imshow.
        self._visible_prop_works: bool | None = None

    def describe(self) -> str:
        """E.g. ``window 'vision-host' (press q or Esc to quit)``."""
        return f"window {self.window_name!r} (press q or Esc to quit)"

    def open(self, width: int, height: int, fps: float) -> None:
        """Create the window (sized ``width``×``height`` px; ``fps`` unused).

        Raises:
            OutputError: no display, or this OpenCV has no GUI support.
        """
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise OutputError(f"cannot open a window: no display (DISPLAY unset); {_DISPLAY_ADVICE}")
        try:
            cv2.namedWindow(self.window_name, cv2.WINDOW_NORMAL)
            if width > 0 and height > 0:
                cv2.resizeWindow(self.window_name, int(width), int(height))
        except cv2.error as e:
            log.debug("cv2.namedWindow failed: %s", e)
            raise OutputError(
                f"cannot open a window: this OpenCV has no GUI support (opencv-python-headless?); {_DISPLAY_ADVICE}"
            ) from None
        self._opened = True

    def write(self, frame: np.ndarray) -> None:
        """Show one H×W×3 uint8 BGR frame and poll the keyboard for 1 ms.

        Sets :attr:`closed` when the user pressed q/Esc or closed the window.

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open`.
        """
        if not self._opened:
            raise RuntimeError("DisplayOutput.write() needs open() first")
        check_frame(frame)
        if self.closed:
            return
        cv2.imshow(self.window_name, frame)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), ord("Q"), 27):
            self.closed = True
            return
        try:
            visible = cv2.getWindowProperty(self.window_name, cv2.WND_PROP_VISIBLE)
        except cv2.error:
            visible = -1.0
        if self._visible_prop_works is None:
            self._visible_prop_works = visible >= 1
        elif self._visible_prop_works and visible < 1:
            self.closed = True  # the user closed the window

    def close(self) -> None:
        """Destroy the window. Idempotent."""
        self.closed = True
        if self._opened:
            self._opened = False
            try:
                cv2.destroyWindow(self.window_name)
                cv2.waitKey(1)
            except cv2.error:
                pass


def make(destination: str | None, **_unused) -> DisplayOutput:
    """``-o display``: a window titled ``destination`` (default ``vision-host``); the other
    :func:`~vision_host.outputs.make_output` options do not apply. Nothing is opened here."""
    return DisplayOutput(destination or "vision-host")
