"""The caption bus: one per run; every completed caption is published on it once, to every subscriber.

Data flows one way: a stream's :class:`.pipeline.Pipeline` creates a :class:`.CaptionEvent`
when its processors complete a caption and publishes it here; subscribers (the caption tracks,
a recording's subtitle stream, the viewer, the caption statistics; alerts and history next)
receive it. A subscriber is one class: subclass :class:`CaptionSubscriber`, override
:meth:`~CaptionSubscriber.add`, and :meth:`CaptionBus.subscribe` an instance.

A subscriber either follows one stream (``subscribe(s, stream=i)``) and then also gets that
stream's timeline: :meth:`~CaptionSubscriber.tick` every frame, :meth:`~CaptionSubscriber.gap` /
:meth:`~CaptionSubscriber.resume` around a source outage, :meth:`~CaptionSubscriber.close` when
the stream ends; or it follows every stream (``stream=None``), gets every stream's captions
(``event.stream`` says which) and is closed when the bus is.

Threads: each stream publishes from its own frame loop, so a subscriber of every stream is
called from several threads at once and must be thread-safe; a subscriber of one stream is
called from that stream's thread only. Subscribers run on the frame loop: they must not block
(write a line, hand the event to a queue); one that raises is logged once, counted in
:attr:`CaptionBus.failures`, and the others and the video go on.
"""

from __future__ import annotations

import logging
import threading

from .event import AlertEvent, CaptionEvent, SummaryEvent

__all__ = ["CaptionBus", "CaptionSubscriber"]

log = logging.getLogger(__name__)


class CaptionSubscriber:
    """Base of everything that receives captions from a :class:`CaptionBus`.

    Override :meth:`add`; the timeline methods do nothing unless overridden (they are called on a
    subscriber of one stream only). Times are the stream's (seconds of output video, see
    :attr:`.CaptionEvent.stream_time_s`).
    """

    #: True: this subscriber wants :attr:`.CaptionEvent.frame` (the pipeline then copies the
    #: frame into each caption event; with no such subscriber it does not).
    wants_frames = False

    def add(self, event: CaptionEvent) -> None:
        """A caption completed. Must not block the frame loop."""
        raise NotImplementedError

    def alert(self, event: AlertEvent) -> None:
        """An alert rule changed state (:meth:`CaptionBus.publish_alert`). Must not block; the
        default ignores it. Called from the stream's frame loop or the alert rules' timer thread."""

    def summary(self, event: SummaryEvent) -> None:
        """A periodic summary is ready (:meth:`CaptionBus.publish_summary`). Must not block; the
        default ignores it. Called from the summaries' own thread, never a frame loop."""

    def tick(self, stream_time_s: float) -> None:
        """Called after every frame of the stream (O(1), no I/O expected)."""

    def gap(self, stream_time_s: float, reason: str, wall_time: float | None = None) -> None:
        """The stream's source dropped at ``stream_time_s`` (``reason``: "reconnecting", …)."""

    def resume(self, stream_time_s: float, wall_time: float | None = None) -> None:
        """The stream's source is back after a :meth:`gap`."""

    def close(self, end_time_s: float | None = None) -> None:
        """The stream (or, for a subscriber of every stream, the run) ended at ``end_time_s``
        (None: unknown). Called once; the subscriber receives nothing afterwards."""


class CaptionBus:
    """Publishes caption events and stream timelines to subscribers (see the module docstring).

    Subscribing and unsubscribing are thread-safe and may happen while streams run: the
    subscriber lists are replaced, never changed in place, so publishing takes no lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._everyone: tuple[CaptionSubscriber, ...] = ()
        self._by_stream: dict[int, tuple[CaptionSubscriber, ...]] = {}
        self._failed: set[int] = set()   # id() of subscribers whose failure was logged
        #: Calls to a subscriber that raised (each logged once per subscriber).
        self.failures = 0
        #: Caption events published.
        self.published = 0
        #: Alert events published.
        self.alerts_published = 0
        #: Summary events published.
        self.summaries_published = 0
        #: True while a subscriber wants frames (:attr:`CaptionSubscriber.wants_frames`).
        self.frames_wanted = False
        # Per stream: (its subscriber tuple when last seen, those of them that override tick).
        self._tickers: dict[int, tuple[tuple[CaptionSubscriber, ...], tuple[CaptionSubscriber, ...]]] = {}

    def subscribe(self, subscriber: CaptionSubscriber, stream: int | None = None) -> CaptionSubscriber:
        """Send ``subscriber`` the captions of stream ``stream`` (index) and its timeline, or,
        with None, every stream's captions. Returns ``subscriber``.

        Raises:
            TypeError: ``subscriber`` is not a :class:`CaptionSubscriber`.
        """
        if not isinstance(subscriber, CaptionSubscriber):
            raise TypeError(f"a caption subscriber must subclass CaptionSubscriber, not {type(subscriber).__name__}")
        with self._lock:
            if stream is None:
                self._everyone += (subscriber,)
            else:
                self._by_stream[stream] = self._by_stream.get(stream, ()) + (subscriber,)
            self._note_frames_wanted()
        return subscriber

    def unsubscribe(self, subscriber: CaptionSubscriber) -> None:
        """Stop sending to ``subscriber`` (not closed here); no-op if it is not subscribed."""
        with self._lock:
            self._everyone = tuple(s for s in self._everyone if s is not subscriber)
            self._by_stream = {i: tuple(s for s in subs if s is not subscriber)
                               for i, subs in self._by_stream.items()}
            self._note_frames_wanted()

    def _note_frames_wanted(self) -> None:
        """(under the lock) Recompute :attr:`frames_wanted` from the subscriber lists."""
        self.frames_wanted = any(s.wants_frames for subs in (self._everyone, *self._by_stream.values())
                                 for s in subs)

    def publish(self, event: CaptionEvent) -> None:
        """Send ``event`` to the subscribers of its stream, then to those of every stream."""
        self.published += 1
        for subscriber in self._by_stream.get(event.stream, ()) + self._everyone:
            self._call(subscriber, "add", event)

    def publish_alert(self, event: AlertEvent) -> None:
        """Send alert edge ``event`` to the subscribers of its stream, then to those of every
        stream (their :meth:`~CaptionSubscriber.alert`). Thread-safe."""
        self.alerts_published += 1
        for subscriber in self._by_stream.get(event.stream, ()) + self._everyone:
            self._call(subscriber, "alert", event)

    def publish_summary(self, event: SummaryEvent) -> None:
        """Send summary ``event`` to the subscribers of every stream (their
        :meth:`~CaptionSubscriber.summary`): a summary may cover several streams, so subscribers
        of one stream do not get it. Thread-safe."""
        self.summaries_published += 1
        for subscriber in self._everyone:
            self._call(subscriber, "summary", event)

    def tick(self, stream: int, stream_time_s: float) -> None:
        """A frame of stream ``stream`` was written (its subscribers' :meth:`~CaptionSubscriber.tick`;
        those that do not override it are skipped, the list worked out again only when the
        stream's subscribers change). Called by the stream's own thread, once a frame."""
        subscribers = self._by_stream.get(stream, ())
        seen = self._tickers.get(stream)
        if seen is None or seen[0] is not subscribers:
            seen = self._tickers[stream] = (subscribers, tuple(
                s for s in subscribers if type(s).tick is not CaptionSubscriber.tick))
        for subscriber in seen[1]:
            self._call(subscriber, "tick", stream_time_s)

    def gap(self, stream: int, stream_time_s: float, reason: str, wall_time: float | None = None) -> None:
        """Stream ``stream``'s source dropped (its subscribers' :meth:`~CaptionSubscriber.gap`)."""
        for subscriber in self._by_stream.get(stream, ()):
            self._call(subscriber, "gap", stream_time_s, reason, wall_time)

    def resume(self, stream: int, stream_time_s: float, wall_time: float | None = None) -> None:
        """Stream ``stream``'s source is back (its subscribers' :meth:`~CaptionSubscriber.resume`)."""
        for subscriber in self._by_stream.get(stream, ()):
            self._call(subscriber, "resume", stream_time_s, wall_time)

    def end_stream(self, stream: int, end_time_s: float | None = None) -> None:
        """Stream ``stream`` ended: its subscribers are closed (at ``end_time_s``) and removed."""
        with self._lock:
            subscribers = self._by_stream.pop(stream, ())
            self._note_frames_wanted()
        for subscriber in subscribers:
            self._call(subscriber, "close", end_time_s)

    def close(self) -> None:
        """The run ended: every remaining subscriber is closed and removed."""
        with self._lock:
            subscribers = [s for subs in self._by_stream.values() for s in subs] + list(self._everyone)
            self._by_stream, self._everyone = {}, ()
            self.frames_wanted = False
        for subscriber in subscribers:
            self._call(subscriber, "close", None)

    def _call(self, subscriber: CaptionSubscriber, method: str, *args) -> None:
        try:
            getattr(subscriber, method)(*args)
        except Exception as exc:   # one subscriber's failure stops neither the others nor the video
            self.failures += 1
            if id(subscriber) not in self._failed:
                self._failed.add(id(subscriber))
                log.warning("caption subscriber %s failed in %s (%s: %s); the video goes on",
                            type(subscriber).__name__, method, type(exc).__name__, exc)
