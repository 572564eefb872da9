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

Embeddings (``embedder``, a :class:`.embeddings.CaptionEmbedder`; None: none): on the writer
thread, never on the frame loops. The writer takes what waits in the queue (up to the
embedder's ``batch_size`` events), commits each event as above, then asks the server for the
vectors of those captions in one request and stores them in a second transaction
(:meth:`.HistoryStore.add_embeddings`). So a caption is stored even when its embedding never
is: a failure (server down, unknown model, odd reply) is counted in
:attr:`~HistoryRecorder.embed_failures`, logged once per kind, and the caption stays
searchable by words. When the server cannot be reached (or does not answer in time),
embedding pauses for ``embed_retry_s`` s, so a dead server does not hold up the writer on
every caption; the captions of that time are counted as not embedded. Empty captions are not
embedded. A slow embedding server delays the writes of the captions behind it (the queue
holds them, and drops when full, as above).

Memory: a queued caption holds its frame (H×W×3 bytes) until written, so at most
``queue_size`` frames wait; captions come seconds apart, so the queue is normally empty.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..captions.bus import CaptionSubscriber
from ..captions.event import AlertEvent, CaptionEvent
from .store import HistoryError, HistoryStore

if TYPE_CHECKING:   # importing embeddings loads requests: only when embedding
    from .embeddings import CaptionEmbedder

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
        embedder: a :class:`.embeddings.CaptionEmbedder` for the captions' text embeddings,
            or None (no embeddings); the recorder closes it in :meth:`close`.
        embed_retry_s: after the embedding server could not be reached, seconds before it is
            asked again (0 to 86400).

    Attributes:
        committed: events stored. lost: events whose write failed. dropped: events not queued
            (the queue was full, or the recorder was closed). pruned: events deleted by pruning.
        embedded: captions whose embedding is stored. embed_failures: stored captions whose
            embedding is not (see the module docstring).

    Raises:
        HistoryError: a setting is out of range.
    """

    wants_frames = True

    def __init__(self, store: HistoryStore, *, retention_days: float | None = 30, max_mb: float | None = 1024,
                 queue_size: int = 64, prune_every_s: float = 600.0, close_timeout_s: float = 10.0,
                 on_commit: Callable[[CaptionEvent | AlertEvent, int], None] | None = None,
                 embedder: CaptionEmbedder | None = None, embed_retry_s: float = 60.0):
        if not 1 <= queue_size <= 10_000:
            raise HistoryError(f"history queue size {queue_size} is out of range: use 1 to 10000")
        if not prune_every_s >= 1:
            raise HistoryError(f"history prune interval {prune_every_s} s is too short: use 1 s or more")
        if not close_timeout_s >= 0:
            raise HistoryError(f"history close timeout {close_timeout_s} s is negative: use 0 or more")
        for name, value in (("retention-days", retention_days), ("max-mb", max_mb)):
            if value is not None and not value >= 0:
                raise HistoryError(f"[history] {name} = {value!r} is negative: use 0 (no limit) or more")
        if not 0 <= embed_retry_s <= 86400:
            raise HistoryError(f"embedding retry interval {embed_retry_s} s is out of range: use 0 to 86400")
        self.store = store
        self.embedder, self.embed_retry_s = embedder, embed_retry_s
        self.embedded = self.embed_failures = 0
        self._embed_paused_until = 0.0
        self._batch_max = max(1, int(getattr(embedder, "batch_size", 1))) if embedder is not None else 1
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
            batch = [] if event is None else [event]
            while batch and batch[-1] is not _STOP and len(batch) < self._batch_max:
                try:   # what already waits goes into one embedding request
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = bool(batch) and batch[-1] is _STOP
            if stop:
                batch.pop()
            if batch:
                self._write_batch(batch)
            if stop:
                self.store.close()
                if self.embedder is not None:
                    self.embedder.close()
                return
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_every_s
                self._prune()

    def _write_batch(self, batch: list) -> None:
        """Commit each event of ``batch``, then embed its captions; the events count as finished
        (for :meth:`flush`) once both are done."""
        try:
            captions = []
            for event in batch:
                event_id = self._write(event)
                if event_id is not None and self.embedder is not None and isinstance(event, CaptionEvent) \
                        and event.text.strip():
                    captions.append((event_id, event.text))
            if captions:
                self._embed(captions)
        finally:
            with self._done:
                self._finished += len(batch)
                self._done.notify_all()

    def _embed(self, captions: list[tuple[int, str]]) -> None:
        """Store the embeddings of the committed ``captions`` (``(event_id, text)``); a failure is
        counted and logged once per kind, never raised."""
        from .embeddings import EmbeddingError

        if time.monotonic() < self._embed_paused_until:
            self.embed_failures += len(captions)
            return
        try:
            vectors = self.embedder.embed([text for _, text in captions])
            stored = self.store.add_embeddings(self.embedder.model,
                                               [(event_id, v) for (event_id, _), v in zip(captions, vectors)])
        except EmbeddingError as exc:
            self.embed_failures += len(captions)
            if exc.kind == "unreachable":
                self._embed_paused_until = time.monotonic() + self.embed_retry_s
            self._log_once(f"embed {exc.kind}", "%s. The captions are stored and found by words, not by meaning "
                           "(not embedded so far: %d%s)", exc, self.embed_failures,
                           f"; asking again every {self.embed_retry_s:g} s" if exc.kind == "unreachable" else "")
        except HistoryError as exc:
            self.embed_failures += len(captions)
            self._log_once("embed store", "%s; those captions are stored without their embeddings", exc)
        except Exception as exc:   # an odd reply must not stop the writer
            self.embed_failures += len(captions)
            self._log_once(f"embed {type(exc).__name__}", "the caption embeddings failed (%s: %s); the captions "
                           "are stored without them", type(exc).__name__, exc)
        else:
            self.embedded += stored
            if "embed resumed" not in self._logged and any(k.startswith("embed ") for k in self._logged):
                self._logged.add("embed resumed")
                log.info("caption embeddings work again (%s, model %s)", self.embedder.url, self.embedder.model)

    def _write(self, event) -> int | None:
        """Commit ``event``; its id, or None when it is lost (counted and logged)."""
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
            return event_id
        return None

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
                  thumbnail_px: int = 160, embedder: CaptionEmbedder | None = None) -> HistoryRecorder | None:
    """A :class:`HistoryRecorder` on a :class:`HistoryStore` at ``path`` (None: the default
    path, :func:`.default_history_path`), or None when the store cannot be opened: then the
    reason is logged as one warning and the run goes on without history. ``embedder``: the
    captions' text embeddings (see :class:`HistoryRecorder`), or None.

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
    return HistoryRecorder(store, retention_days=retention_days, max_mb=max_mb, embedder=embedder)
