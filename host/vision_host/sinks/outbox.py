"""The delivery outbox: a bounded on-disk queue (SQLite) of messages waiting for their sink.

A sink puts every message it has to deliver here first (:meth:`Outbox.put`), delivers the
oldest (:meth:`Outbox.peek`) and removes a message only once its receiver has it
(:meth:`Outbox.remove`). So a message its receiver cannot take now (broker down, webhook
answering 5xx) waits, in order, and one still waiting when vision-host exits is delivered by
the next run: a new :class:`Outbox` on the same file and sink sees what was pending, oldest
first.

The bound: each sink keeps at most ``max_messages`` pending messages. A put past the bound
deletes that sink's oldest messages; they are counted in :attr:`Outbox.dropped` and logged, once
when the drops start and once with the total when the burst ends (a message is delivered again,
or the outbox is closed).

Storage: one SQLite file may hold the queues of several sinks (a ``sink`` column; each
:class:`Outbox` sees its own sink's rows only). The file is in WAL mode with
``synchronous=NORMAL``: a committed put survives a crash of vision-host; a power cut may lose
the last moments' puts. Row ids come from ``AUTOINCREMENT`` and are never reused, so they order
the messages even across runs. Each :class:`Outbox` has its own connection, used under a lock,
so its methods may be called from any thread; write transactions take SQLite's write lock up
front (``BEGIN IMMEDIATE``) and wait up to :data:`BUSY_TIMEOUT_S` for another connection's.
Two :class:`Outbox` objects of the same sink on one file at the same time (two vision-host runs
sharing a sink name) are not supported: both would deliver the same messages.

Errors: a file that cannot be created, opened or written (read-only directory, full disk, not
an outbox) raises :class:`OutboxError`, whose message names the file and says what to do.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUSY_TIMEOUT_S", "DEFAULT_MAX_MESSAGES", "Outbox", "OutboxError", "OutboxMessage", "default_outbox_path"]

log = logging.getLogger(__name__)

#: Pending messages a sink keeps by default before the oldest are dropped.
DEFAULT_MAX_MESSAGES = 10_000
#: Largest ``max_messages`` accepted (a bound that keeps the file in the hundreds of MB at most).
MAX_MAX_MESSAGES = 10_000_000
#: Seconds a write waits for another connection's write lock on the same file.
BUSY_TIMEOUT_S = 10.0
#: Largest ``peek`` limit.
MAX_PEEK = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_sink ON outbox (sink, row_id);
CREATE INDEX IF NOT EXISTS outbox_by_topic ON outbox (sink, topic);
"""

_COLUMNS = "row_id, message_id, topic, payload, retain, created, attempts"


@dataclass(frozen=True)
class OutboxMessage:
    """One pending message, as :meth:`Outbox.put` stored it.

    Attributes:
        row_id: its place in the outbox (increasing in put order, never reused); the handle for
            :meth:`Outbox.attempted` and :meth:`Outbox.remove`.
        message_id: the id receivers dedupe on (a uuid4 hex unless the sink gave one); the same
            on every delivery attempt.
        topic: where it goes, in the sink's terms (an MQTT topic, a webhook's event type).
        payload: the bytes to deliver.
        retain: MQTT's retain flag (other sinks ignore it).
        created: when it was put, seconds since the epoch.
        attempts: delivery attempts so far (:meth:`Outbox.attempted`).
    """

    row_id: int
    message_id: str
    topic: str
    payload: bytes
    retain: bool
    created: float
    attempts: int


class OutboxError(Exception):
    """The outbox file cannot be opened or written; the message names it and says what to do."""


def default_outbox_path() -> Path:
    """Where the outbox lives unless the run says otherwise: the user's data directory /
    ``vision-host`` / ``outbox.sqlite3`` (:mod:`vision_host.datadir`). Nothing is created here."""
    from ..datadir import vision_host_data
    return vision_host_data("outbox.sqlite3")


class Outbox:
    """One sink's bounded queue in an outbox file (see the module docstring).

    Args:
        path: the SQLite file; created, with its missing parent directories, if absent.
        sink: the queue's name in the file (e.g. ``"webhook:https://example.net/hook"``,
            ``"mqtt"``); 1 to 1000 characters.
        max_messages: pending messages kept at most; past it the oldest are dropped
            (1 … :data:`MAX_MAX_MESSAGES`).

    Raises:
        OutboxError: the file cannot be created or opened, or is not an outbox.
        ValueError: an empty or too long ``sink``, ``max_messages`` out of range.

    Attributes:
        path: the file.
        sink: the queue's name.
        max_messages: the bound.
        dropped: messages this object deleted unsent because the bound was reached.
    """

    def __init__(self, path: str | Path, sink: str, max_messages: int = DEFAULT_MAX_MESSAGES):
        if not isinstance(sink, str) or not 1 <= len(sink) <= 1000:
            raise ValueError(f"an outbox sink name must be 1 to 1000 characters, not {sink!r}")
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) \
                or not 1 <= max_messages <= MAX_MAX_MESSAGES:
            raise ValueError(f"the outbox bound must be a whole number from 1 to {MAX_MAX_MESSAGES}, "
                             f"not {max_messages!r}")
        self.path = Path(path)
        self.sink = sink
        self.max_messages = max_messages
        self.dropped = 0
        self._burst = 0            # messages dropped in the current burst (bound reached, nothing delivered since)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise OutboxError(f"cannot create the directory of the delivery outbox {self.path} "
                              f"({exc.strerror or exc}): make {self.path.parent} writable or choose "
                              f"another outbox file") from None
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
            if not {"row_id", "sink", "message_id", "topic", "payload", "retain", "created", "attempts"} <= columns:
                raise sqlite3.DatabaseError("its outbox table has other columns")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise OutboxError(self._sentence("open", exc)) from None
        self._conn = conn

    def _sentence(self, doing: str, exc: sqlite3.Error) -> str:
        """The :class:`OutboxError` message for SQLite error ``exc`` while ``doing`` (a verb)."""
        text = str(exc)
        low = text.lower()
        if "full" in low:
            advice = "free disk space on its file system, or choose another outbox file"
        elif "not a database" in low or "other columns" in low or "malformed" in low:
            advice = "move that file away (vision-host makes a new one) or choose another outbox file"
        elif "readonly" in low or "read-only" in low or "unable to open" in low or "permission" in low:
            advice = f"make the file and its directory {self.path.parent} writable, or choose another outbox file"
        else:
            advice = "check the file and its directory, or choose another outbox file"
        return f"cannot {doing} the delivery outbox {self.path} ({text}): {advice}"

    def _db(self) -> sqlite3.Connection:
        """(under the lock) The connection; OutboxError once closed."""
        if self._conn is None:
            raise OutboxError(f"the delivery outbox {self.path} is closed")
        return self._conn

    def put(self, topic: str, payload: bytes, *, message_id: str | None = None, retain: bool = False,
            replace: bool = False) -> OutboxMessage:
        """Queue ``payload`` for ``topic`` behind this sink's pending messages; returns it as stored.

        Args:
            topic: where it goes (the sink's meaning).
            payload: the bytes to deliver.
            message_id: the id receivers dedupe on; a new uuid4 hex when None.
            retain: MQTT's retain flag, stored with it.
            replace: first delete this sink's pending messages of the same ``topic`` (for
                latest-only data such as snapshots; those are not counted as dropped).

        Past :attr:`max_messages` the oldest pending messages are deleted, counted in
        :attr:`dropped` and logged (see the module docstring).

        Raises:
            OutboxError: the file cannot be written (full disk, read-only) or the outbox is closed.
            TypeError: ``payload`` is not bytes.
        """
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"an outbox payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
        message_id = message_id or uuid.uuid4().hex
        created = time.time()
        with self._lock:
            db = self._db()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if replace:
                        db.execute("DELETE FROM outbox WHERE sink = ? AND topic = ?", (self.sink, topic))
                    row_id = db.execute(
                        "INSERT INTO outbox (sink, message_id, topic, payload, retain, created, attempts) "
                        "VALUES (?, ?, ?, ?, ?, ?, 0)",
                        (self.sink, message_id, topic, payload, int(bool(retain)), created)).lastrowid
                    (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE sink = ?", (self.sink,)).fetchone()
                    excess = count - self.max_messages
                    if excess > 0:
                        db.execute("DELETE FROM outbox WHERE row_id IN (SELECT row_id FROM outbox WHERE sink = ? "
                                   "ORDER BY row_id LIMIT ?)", (self.sink, excess))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(self._sentence("write to", exc)) from None
            if excess > 0:
                self.dropped += excess
                if self._burst == 0:
                    log.warning("delivery outbox %s is full for %s (%d messages waiting): dropping the oldest; "
                                "the receiver has not taken messages for a while", self.path, self.sink,
                                self.max_messages)
                self._burst += excess
        return OutboxMessage(row_id, message_id, topic, payload, bool(retain), created, 0)

    def peek(self, limit: int = 100) -> list[OutboxMessage]:
        """This sink's pending messages, oldest first, at most ``limit`` (1 … :data:`MAX_PEEK`).

        Raises:
            OutboxError: the file cannot be read or the outbox is closed.
            ValueError: ``limit`` out of range.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PEEK:
            raise ValueError(f"peek takes 1 to {MAX_PEEK} messages, not {limit!r}")
        with self._lock:
            try:
                rows = self._db().execute(f"SELECT {_COLUMNS} FROM outbox WHERE sink = ? ORDER BY row_id LIMIT ?",
                                          (self.sink, limit)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(self._sentence("read", exc)) from None
        return [OutboxMessage(r[0], r[1], r[2], bytes(r[3]), bool(r[4]), r[5], r[6]) for r in rows]

    def attempted(self, row_id: int) -> None:
        """Count a delivery attempt of message ``row_id`` (no-op if it is gone).

        Raises:
            OutboxError: the file cannot be written or the outbox is closed.
        """
        self._write("UPDATE outbox SET attempts = attempts + 1 WHERE row_id = ? AND sink = ?", (row_id, self.sink))

    def remove(self, row_id: int) -> None:
        """Message ``row_id`` was delivered: delete it (no-op if it is gone). Ends a burst of
        drops (its total is logged).

        Raises:
            OutboxError: the file cannot be written or the outbox is closed.
        """
        self._write("DELETE FROM outbox WHERE row_id = ? AND sink = ?", (row_id, self.sink))
        with self._lock:
            self._end_burst()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            db = self._db()
            try:
                db.execute(sql, args)      # one statement: its own transaction (autocommit)
            except sqlite3.Error as exc:
                raise OutboxError(self._sentence("write to", exc)) from None

    def _end_burst(self) -> None:
        """(under the lock) Log the total of a burst of drops, if one is going on."""
        if self._burst:
            log.warning("delivery outbox %s dropped %d oldest messages for %s while it was full "
                        "(%d dropped since start)", self.path, self._burst, self.sink, self.dropped)
            self._burst = 0

    def __len__(self) -> int:
        """This sink's pending messages. Raises OutboxError as :meth:`peek` does."""
        with self._lock:
            try:
                (count,) = self._db().execute("SELECT COUNT(*) FROM outbox WHERE sink = ?", (self.sink,)).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(self._sentence("read", exc)) from None
        return count

    def __bool__(self) -> bool:
        """Always True: an empty outbox is still an outbox (``len()`` counts)."""
        return True

    def close(self) -> None:
        """Close the connection (idempotent); pending messages stay in the file for the next run."""
        with self._lock:
            self._end_burst()
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, {self.sink!r}, max_messages={self.max_messages})"
