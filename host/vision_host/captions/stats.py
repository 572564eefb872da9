"""Caption statistics of one stream: a subscriber of the caption bus."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .bus import CaptionSubscriber
from .event import CaptionEvent

__all__ = ["CaptionStats", "CaptionCounts"]


@dataclass(frozen=True)
class CaptionCounts:
    """A consistent copy of :class:`CaptionStats`.

    Attributes:
        completed: captions completed on the stream.
        last: the last caption's text (None before the first).
        last_latency_ms: the last caption's request-to-completion time, ms (None if unknown).
        last_wall_time: when the last caption completed, seconds since the epoch (None before the first).
        invalid: captions that should have been structured answers and were not
            (:attr:`.CaptionEvent.fields_error`); they count in ``completed`` too.
    """

    completed: int = 0
    last: str | None = None
    last_latency_ms: float | None = None
    last_wall_time: float | None = None
    invalid: int = 0


class CaptionStats(CaptionSubscriber):
    """Counts the captions of one stream (subscribe it with ``stream=INDEX``).

    Written from that stream's frame loop, read from any thread (the viewer's, the status line)
    through :meth:`snapshot`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = CaptionCounts()

    def add(self, event: CaptionEvent) -> None:
        """Count ``event`` and keep it as the last caption."""
        with self._lock:
            c = self._counts
            self._counts = CaptionCounts(c.completed + 1, event.text, event.latency_ms, event.wall_time,
                                         c.invalid + (event.fields_error is not None))

    def snapshot(self) -> CaptionCounts:
        """The counts as they are now (immutable)."""
        return self._counts
