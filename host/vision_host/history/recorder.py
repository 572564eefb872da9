"""The caption history's writer on the caption bus: :class:`HistoryRecorder`, a subscriber of
every stream that stores each caption event and alert edge in a :class:`.HistoryStore`.

Protocol: ``bus.subscribe(recorder)`` (every stream); :meth:`~HistoryRecorder.add` and
:meth:`~HistoryRecorder.alert` run on the frame loops (and the alert rules' timer thread) and
only put the event on a bounded queue (``queue_size``); when it is full the event is dropped,
counted in :attr:`~HistoryRecorder.dropped` and logged once, and the video goes on. One writer
thread takes the events in order and commits each as one transaction (thumbnail encoded there),
so an event whose commit returned survives a crash of the process (SIGKILL included). A write
that fails (full disk, the file became read-only) loses that event only: it is counted in
:attr:`~HistoryRecorder.lost`, the first failure of each kind is logged, and later events are
tried again. The writer prunes the store (``retention_days``, ``max_mb``) when it starts and
every ``prune_every_s`` s. :meth:`~HistoryRecorder.close` (the bus calls it at the end of the
run) writes what is queued, up to ``close_timeout_s`` s, and closes the store.

Memory: a queued caption holds its frame (H×W×3 bytes) until written, so at most
``queue_size`` frames wait; captions come seconds apart, so the queue is normally empty.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ..captions.bus import CaptionSubscriber
from ..captions.event import AlertEvent, CaptionEvent
from .store import HistoryError, HistoryStore

__all__ = ["HistoryRecorder", "start_history"]

log = logging.getLogger(__name__)

_STOP = object()


class HistoryRecorder(CaptionSubscriber):
    """Stores every caption and alert edge of the bus in ``store`` (see the module docstring).

    Args:
        store: the database; the recorder owns it from now on and closes it in :meth:`close`.
        retention_days: prune events older than this many days (None or 0: keep them).
        max_mb: prune the oldest events while the database uses more MiB (None or 0: no limit).
        queue_size: events that may wait for the writer (1 to 10000).
        prune_every_s: seconds between prunes (at least 1).
        close_timeout_s: most seconds :meth:`close` waits for the queue to be written (at least 0).
        on_commit: called on the writer thread as ``on_commit(event, event_id)`` after each
            event is committed (a callback that raises is logged once and ignored).

    Attributes:
        committed: events stored. lost: events whose write failed. dropped: events not queued
            (the queue was full, or the recorder was closed). pruned: events deleted by pruning.

    Raises:
        HistoryError: a setting is out of range.
    """

    wants_frames = True

    def __init__(self, store: HistoryStore, *, retention_days: float | None = 30, max_mb: float | None = 1024,
                 queue_size: int = 64, prune_every_s: float = 600.0, close_timeout_s: float = 10.0,
                 on_commit: Callable[[CaptionEvent | AlertEvent, int], None] | None = None):
        if not 1 <= queue_size <= 10_000:
            raise HistoryError(f"history queue size {queue_size} is out of range: use 1 to 10000")
        if not prune_every_s >= 1:
            raise HistoryError(f"history prune interval {prune_every_s} s is too short: use 1 s or more")
        if not close_timeout_s >= 0:
            raise HistoryError(f"history close timeout {close_timeout_s} s is negative: use 0 or more")
        for name, value in (("retention-days", retention_days), ("max-mb", max_mb)):
            if value is not None and not value >= 0:
                raise HistoryError(f"[history] {name} = {value!r} is negative: use 0 (no limit) or more")
        self.store = store
        self.retention_days, self.max_mb = retention_days, max_mb
        self.prune_every_s, self.close_timeout_s = prune_every_s, close_timeout_s
        self.on_commit = on_commit
        self.committed = self.lost = self.dropped = self.pruned = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._done = threading.Condition()
        self._submitted = 0      # events queued
        self._finished = 0       # of those, written or lost
        self._logged: set[str] = set()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vision-host-history", daemon=True)
        self._thread.start()

    # -- the frame loops' side ------------------------------------------------------------
    def add(self, event: CaptionEvent) -> None:
        """Queue caption ``event`` for writing; never blocks."""
        self._put(event)

    def alert(self, event: AlertEvent) -> None:
        """Queue alert edge ``event`` for writing; never blocks."""
        self._put(event)

    def _put(self, event) -> None:
        with self._done:
            if self._closed:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self.dropped += 1
                self._log_once("full", "the caption history falls behind (its queue of %d is full): events are "
                               "dropped, the video goes on", self._queue.maxsize)
                return
            self._submitted += 1

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every event queued so far is written (or lost); True if it was within
        ``timeout_s`` s."""
        with self._done:
            target = self._submitted
            return self._done.wait_for(lambda: self._finished >= target, timeout=timeout_s)

    @property
    def queued(self) -> int:
        """Events waiting for the writer thread."""
        return self._queue.qsize()

    def close(self, end_time_s: float | None = None) -> None:
        """Write what is queued (at most :attr:`close_timeout_s` s), stop the writer and close the
        store. Idempotent; events after it are dropped."""
        with self._close_lock:
            with self._done:
                if self._closed:
                    return
                self._closed = True
            deadline = time.monotonic() + self.close_timeout_s
            while True:   # the queue may be full: wait for room for the stop mark
                try:
                    self._queue.put(_STOP, timeout=max(0.01, deadline - time.monotonic()))
                    break
                except queue.Full:
                    if time.monotonic() >= deadline:
                        break
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                left = self._queue.qsize()
                log.warning("the caption history did not write its last %d events within %.0f s; they are lost",
                            left, self.close_timeout_s)
            else:
                self.store.close()

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        next_prune = 0.0
        while True:
            try:
                event = self._queue.get(timeout=max(0.05, next_prune - time.monotonic()))
            except queue.Empty:
                event = None
            if event is _STOP:
                self.store.close()
                return
            if event is not None:
                self._write(event)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_every_s
                self._prune()

    def _write(self, event) -> None:
        try:
            if isinstance(event, AlertEvent):
                event_id = self.store.add_alert(event)
            else:
                event_id = self.store.add_caption(event)
        except HistoryError as exc:
            self.lost += 1
            self._log_once(str(exc).rsplit("): ", 1)[-1], "%s; the event is lost (the video goes on; lost so far: %d)",
                           exc, self.lost)
        except Exception as exc:   # a bug in one event (an odd frame) loses that event only
            self.lost += 1
            self._log_once(type(exc).__name__, "the caption history could not store an event (%s: %s); "
                           "it is lost, the video goes on", type(exc).__name__, exc)
        else:
            self.committed += 1
            if self.on_commit is not None:
                try:
                    self.on_commit(event, event_id)
                except Exception as exc:
                    self._log_once("on_commit", "the history's commit callback failed (%s: %s)",
                                   type(exc).__name__, exc)
        finally:
            with self._done:
                self._finished += 1
                self._done.notify_all()

    def _prune(self) -> None:
        if not (self.retention_days or self.max_mb):
            return
        try:
            removed = self.store.prune(self.retention_days, self.max_mb)
        except HistoryError as exc:
            self._log_once("prune", "%s; the history is not pruned this time", exc)
            return
        if removed:
            self.pruned += removed
            log.info("caption history: pruned %d old events (retention-days %s, max-mb %s)", removed,
                     self.retention_days, self.max_mb)

    def _log_once(self, key: str, message: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)


def start_history(path, *, retention_days: float | None = 30, max_mb: float | None = 1024,
                  thumbnail_px: int = 160) -> HistoryRecorder | None:
    """A :class:`HistoryRecorder` on a :class:`HistoryStore` at ``path`` (None: the default
    path, :func:`.default_history_path`), or None when the store cannot be opened: then the
    reason is logged as one warning and the run goes on without history.

    Raises:
        HistoryError: a setting is out of range (the user's to fix).
    """
    from .store import default_history_path

    if thumbnail_px is not None and not 16 <= thumbnail_px <= 1024:
        raise HistoryError(f"thumbnail size {thumbnail_px} px is out of range: use 16 to 1024")
    for name, value in (("retention-days", retention_days), ("max-mb", max_mb)):
        if value is not None and not value >= 0:
            raise HistoryError(f"[history] {name} = {value!r} is negative: use 0 (no limit) or more")
    try:
        store = HistoryStore(default_history_path() if path is None else path, thumbnail_px=thumbnail_px)
    except HistoryError as exc:
        log.warning("%s; the video goes on without caption history", exc)
        return None
    return HistoryRecorder(store, retention_days=retention_days, max_mb=max_mb)
