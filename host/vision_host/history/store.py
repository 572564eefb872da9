"""The caption history database: :class:`HistoryStore`, one SQLite file of every caption and
alert edge, searchable by words.

Layout (schema version :data:`SCHEMA_VERSION`, kept in SQLite's ``user_version``):

* ``events``: one row per caption or alert edge (``id``, ``kind`` = ``caption``/``alert``,
  ``wall_time`` in seconds since the epoch, ``stream``, ``stream_name``, ``text`` (the caption;
  "" for an alert edge), ``model``, ``alert_name``, ``reason``, ``bytes``: the row's estimated
  size, counted by :meth:`HistoryStore.prune`).
* ``captions``: what only captions have (stream time, frame index, source, latency, prompt, the
  structured ``fields`` as JSON, ``fields_error``, and ``thumbnail``: the captioned frame as a
  JPEG whose longer side is at most ``thumbnail_px``, encoded when the row is written).
* ``alerts``: what only alert edges have (``state`` ON/OFF, the rule's ``expression``, and the
  wall time of the caption that caused the edge, if one did).
* ``events_fts``: an FTS5 index over ``events`` (external content: the text is stored once)
  on the caption text, stream name, model, alert name and reason, kept in step by triggers.
* ``embeddings``: text embeddings of captions for semantic search (``id`` of the caption,
  ``model`` that made it, ``dim``, ``vector``: ``dim`` little-endian float32, L2-normalised),
  one per caption and model; a trigger deletes them with their event. The table is additive:
  created on every writable open when missing (the schema version stays 1, and a vision-host
  without it reads the file as before, its pruning still deleting the vectors through the
  trigger).

Writes: each :meth:`~HistoryStore.add_caption` / :meth:`~HistoryStore.add_alert` is one
transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), committed when the call returns. The journal is
WAL with ``synchronous=NORMAL``: a committed event survives the process being killed at any
moment (SIGKILL included); a power loss may lose the last few. Several stores (threads,
processes) may write one file at once: each waits up to ``busy_timeout_ms`` for the others.

Pruning (:meth:`~HistoryStore.prune`) deletes the oldest events first, by age
(``retention_days``) then by size (``max_mb``: the pages the database uses, not counting the
``-wal`` file, which automatic checkpoints keep to a few MB), and returns how many it deleted.
It never runs ``VACUUM`` (which copies the whole file): the database is created with
``auto_vacuum=INCREMENTAL`` and a prune ends with ``PRAGMA incremental_vacuum``, which hands the
freed pages back to the file system; a database made without it reuses them instead.

Search (:meth:`~HistoryStore.search`): the user's words are each quoted as an FTS5 string, so
any text (quotes, ``NEAR(``, ``*``, ``-``, ``AND``) is searched for as words and is never a
syntax error; all words must occur (in any column, any order; case and diacritics are ignored,
``unicode61`` tokenizer). With ``raw=True`` the query is FTS5's own syntax
(https://sqlite.org/fts5.html#full_text_query_syntax: phrases, ``OR``, ``NOT``, ``NEAR``,
prefixes ``car*``) and a syntax error is a :class:`HistoryError` sentence. Hits are ranked by
``bm25`` (caption text weighs most), then newest first.

Semantic search (:meth:`~HistoryStore.search_semantic`): a query vector (from the same
embedding model, :mod:`.embeddings`) against the stored vectors of that model only (vectors of
another model, or of another dimension, are never compared), ranked by cosine similarity
(``score``, -1 to 1, higher is closer), then newest first. Cost: the filters (stream, time) are
applied in SQL first, then every remaining vector of that model is read and scored with numpy,
``batch`` rows at a time with a running top ``limit``: O(rows × dim) work and
``batch × dim × 4`` bytes of memory. 100 000 captions of a 768-dimension model are about 300 MB
of vectors to read: around a second from a warm disk cache; narrow it with ``--since`` or
``--stream`` when it grows beyond that.

Records (what :meth:`~HistoryStore.search`, :meth:`~HistoryStore.list` and
:meth:`~HistoryStore.get` return, and what ``export`` writes): dicts with ``id``, ``kind``,
``time`` (ISO 8601 UTC with ms), ``wall_time_unix``, ``stream``, ``stream_name``, ``text``,
``model``; a caption adds ``stream_time_s``, ``frame_index``, ``source``, ``latency_ms``,
``prompt``, ``fields``, ``fields_error``, ``thumbnail`` (True/False: one is stored); an alert
edge adds ``alert``, ``state``, ``reason``, ``expression``, ``caption_id`` (the caption that
caused it, if it is stored); a search hit adds ``rank`` (bm25: lower is better); a semantic
hit adds ``score`` (cosine similarity: higher is better).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from ..captions.event import AlertEvent, CaptionEvent, iso_utc

__all__ = ["SCHEMA_VERSION", "HistoryError", "HistoryStore", "default_history_path",
           "parse_when"]

#: The schema this code writes; a database with a higher ``user_version`` is refused.
SCHEMA_VERSION = 1
#: Most records one search or list returns.
MAX_LIMIT = 100_000

_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('caption', 'alert')),
    wall_time REAL NOT NULL,
    stream INTEGER NOT NULL,
    stream_name TEXT,
    text TEXT NOT NULL DEFAULT '',
    model TEXT,
    alert_name TEXT,
    reason TEXT,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_by_time ON events (wall_time);
CREATE INDEX events_by_stream_time ON events (stream, wall_time);
CREATE TABLE captions (
    id INTEGER PRIMARY KEY REFERENCES events (id),
    stream_time_s REAL,
    frame_index INTEGER,
    source TEXT,
    latency_ms REAL,
    prompt TEXT,
    fields TEXT,
    fields_error TEXT,
    thumbnail BLOB
);
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY REFERENCES events (id),
    state TEXT NOT NULL,
    expression TEXT,
    caption_wall_time REAL
);
CREATE VIRTUAL TABLE events_fts USING fts5 (
    text, stream_name, model, alert_name, reason,
    content = 'events', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER events_fts_insert AFTER INSERT ON events BEGIN
    INSERT INTO events_fts (rowid, text, stream_name, model, alert_name, reason)
    VALUES (new.id, new.text, new.stream_name, new.model, new.alert_name, new.reason);
END;
CREATE TRIGGER events_fts_delete AFTER DELETE ON events BEGIN
    INSERT INTO events_fts (events_fts, rowid, text, stream_name, model, alert_name, reason)
    VALUES ('delete', old.id, old.text, old.stream_name, old.model, old.alert_name, old.reason);
END;
"""

# Created whenever missing (see the module docstring): additive, no schema version of its own.
_EMBEDDINGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER NOT NULL,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (model, id)
);
CREATE INDEX IF NOT EXISTS embeddings_by_id ON embeddings (id);
CREATE TRIGGER IF NOT EXISTS embeddings_delete AFTER DELETE ON events BEGIN
    DELETE FROM embeddings WHERE id = old.id;
END;
"""

# bm25 weights of the indexed columns: text, stream name, model, alert name, reason.
_BM25 = "bm25(events_fts, 10.0, 2.0, 1.0, 5.0, 3.0)"

_SELECT = """
SELECT e.id, e.kind, e.wall_time, e.stream, e.stream_name, e.text, e.model, e.alert_name, e.reason,
       c.stream_time_s, c.frame_index, c.source, c.latency_ms, c.prompt, c.fields, c.fields_error,
       c.thumbnail IS NOT NULL, a.state, a.expression,
       (SELECT k.id FROM events k WHERE k.kind = 'caption' AND k.stream = e.stream
               AND k.wall_time = a.caption_wall_time ORDER BY k.id LIMIT 1)
"""
_FROM = " FROM events e LEFT JOIN captions c ON c.id = e.id LEFT JOIN alerts a ON a.id = e.id"


class HistoryError(Exception):
    """The history database cannot be opened, read or written as asked; the message says why and
    what to do."""


def default_history_path() -> Path:
    """Where the history lives unless ``--history`` says otherwise: the user's data directory /
    ``vision-host`` / ``history.sqlite3`` (:mod:`vision_host.datadir`)."""
    from ..datadir import vision_host_data
    return vision_host_data("history.sqlite3")


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float | None = None) -> float:
    """A ``--since`` / ``--until`` value as seconds since the epoch: a duration before ``now``
    (default: the current time) such as ``90s``, ``30m``, ``2h``, ``7d``, ``2w``, or an ISO 8601
    date or time (``2026-12-01``, ``2026-12-01T15:00``, ``2026-12-01T15:00:00Z``,
    ``…+02:00``); one without a zone is local time.

    Raises:
        HistoryError: neither form.
    """
    match = _RELATIVE.match(text)
    if match:
        now = time.time() if now is None else now
        return now - float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise HistoryError(f"cannot read the time {text!r}: write a duration before now (90s, 30m, 2h, 7d) "
                           f"or an ISO 8601 time (2026-12-01T15:00:00Z)") from None
    return when.timestamp()   # a naive time is taken as local time


def _fts_words(query: str) -> str:
    """The user's words as an FTS5 query that only ever means "all these words": each
    whitespace-separated word becomes an FTS5 string (double quotes doubled inside)."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in _query_text(query).split())


def _query_text(query: str) -> str:
    """``query`` as SQLite can take it: NUL (which ends a C string) a space, lone surrogates U+FFFD."""
    return _SURROGATE.sub("\ufffd", query.replace("\x00", " "))


def _statements(script: str) -> Iterator[str]:
    """The complete SQL statements of ``script``, one at a time (trigger bodies kept whole)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""


class HistoryStore:
    """The history database at ``path`` (created with its folders if missing). Thread-safe:
    one connection, used under a lock; several stores (or processes) may share a file.

    Args:
        path: the SQLite file.
        thumbnail_px: longer side of stored thumbnails, px (16 to 1024).
        thumbnail_quality: their JPEG quality (10 to 100).
        busy_timeout_ms: how long a write waits for another writer of the file, ms (at least 0).
        read_only: only read an existing history (``vision-host history``): nothing is created
            or changed, and every write raises :class:`HistoryError`.

    Raises:
        HistoryError: the file cannot be created or opened (a read-only or missing folder, not a
            database, a newer schema), or a setting is out of range.
    """

    def __init__(self, path: str | os.PathLike, *, thumbnail_px: int = 160, thumbnail_quality: int = 75,
                 busy_timeout_ms: int = 10_000, read_only: bool = False):
        if not 16 <= thumbnail_px <= 1024:
            raise HistoryError(f"thumbnail size {thumbnail_px} px is out of range: use 16 to 1024")
        if not 10 <= thumbnail_quality <= 100:
            raise HistoryError(f"thumbnail JPEG quality {thumbnail_quality} is out of range: use 10 to 100")
        if busy_timeout_ms < 0:
            raise HistoryError(f"busy timeout {busy_timeout_ms} ms is negative: use 0 or more")
        self.path = Path(path)
        self.read_only = read_only
        self.thumbnail_px, self.thumbnail_quality = thumbnail_px, thumbnail_quality
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        advice = "give another path with --history PATH" if read_only else \
            "give another path with --history PATH, or turn history off with --no-history"
        if read_only:
            if not self.path.is_file():
                raise HistoryError(f"no caption history at {self.path}: {advice}")
            target, uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro", True
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HistoryError(f"cannot create the folder of the history database {self.path} "
                                   f"({exc.strerror or exc}): {advice}") from None
            if self.path.exists() and not os.access(self.path, os.W_OK) or \
                    not self.path.exists() and not os.access(self.path.parent, os.W_OK):
                raise HistoryError(f"the history database {self.path} is on a read-only path: {advice}")
            target, uri = str(self.path), False
        try:
            self._conn = sqlite3.connect(target, timeout=busy_timeout_ms / 1000, isolation_level=None,
                                         check_same_thread=False, uri=uri)
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._setup()
        except sqlite3.DatabaseError as exc:
            self.close()
            text = str(exc)
            if "not a database" in text:
                raise HistoryError(f"{self.path} is not a SQLite database (or is damaged): {advice}") from None
            if "readonly" in text or "unable to open" in text:
                what = "read" if read_only else "write"
                raise HistoryError(f"cannot {what} the history database {self.path} ({text}): {advice}") from None
            raise HistoryError(f"cannot open the history database {self.path} ({text}): {advice}") from None
        except HistoryError:
            self.close()
            raise

    def _setup(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"the history database {self.path} was written by a newer vision-host (schema "
                               f"{version}; this one reads up to {SCHEMA_VERSION}): upgrade vision-host, or give "
                               f"another path with --history PATH")
        if self.read_only:
            if version < SCHEMA_VERSION:
                raise HistoryError(f"{self.path} holds no vision-host history: give another path with --history PATH")
            return
        if version == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")   # before WAL and the first table; else a no-op
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise HistoryError(f"the history database {self.path} cannot use a write-ahead log (WAL) there: "
                               f"put it on a local disk with --history PATH")
        conn.execute("PRAGMA synchronous = NORMAL")
        if version == SCHEMA_VERSION:
            self._add_embeddings_table(conn)
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]   # another process may have made it
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise HistoryError(f"{self.path} holds tables but no vision-host history: give another "
                                       f"path with --history PATH")
                for statement in _statements(_SCHEMA + _EMBEDDINGS_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._add_embeddings_table(conn)

    @staticmethod
    def _add_embeddings_table(conn: sqlite3.Connection) -> None:
        """Create the ``embeddings`` table and its trigger when missing (a file of an older vision-host)."""
        if conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('embeddings', 'embeddings_delete')"
                        ).fetchone()[0] == 2:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(_EMBEDDINGS_SCHEMA):
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writing ---------------------------------------------------------------------------
    def _write(self, what: str, work) -> int:
        """Run ``work(conn)`` in one IMMEDIATE transaction; returns its result (a row id).

        Raises:
            HistoryError: the write failed (full disk, read-only file, I/O error, closed store).
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise HistoryError(f"the history database {self.path} is closed")
            if self.read_only:
                raise HistoryError(f"cannot store {what} in the history database {self.path}: it is open read-only")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                text = str(exc)
                if "full" in text:
                    why = "the disk is full: free some space, or lower [history] max-mb"
                elif "readonly" in text:
                    why = "the file became read-only: give another path with --history PATH"
                elif "locked" in text or "busy" in text:
                    why = "another writer held it too long"
                else:
                    why = "the disk failed or the file is damaged"
                raise HistoryError(f"cannot store {what} in the history database {self.path} ({text}): {why}") \
                    from None
            return result

    def add_caption(self, event: CaptionEvent) -> int:
        """Store caption ``event`` (and a thumbnail of its frame, if it has one); committed on
        return. Returns its id.

        Raises:
            HistoryError: it could not be written (see :meth:`_write`); nothing of it is stored.
        """
        thumbnail = None if event.frame is None else self.encode_thumbnail(event.frame)
        fields = None if event.fields is None else json.dumps(event.fields, ensure_ascii=False, default=str)
        size = 200 + 2 * len(event.text.encode("utf-8", "replace")) + len(thumbnail or b"") + \
            sum(len(s) for s in (event.source, event.prompt, fields, event.fields_error, event.model,
                                 event.stream_name) if s)

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("INSERT INTO events (kind, wall_time, stream, stream_name, text, model, bytes) "
                               "VALUES ('caption', ?, ?, ?, ?, ?, ?)",
                               (event.wall_time, event.stream, event.stream_name, _clean(event.text),
                                _clean(event.model), size)).lastrowid
            conn.execute("INSERT INTO captions (id, stream_time_s, frame_index, source, latency_ms, prompt, fields, "
                         "fields_error, thumbnail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (row, event.stream_time_s, event.frame_index, _clean(event.source), event.latency_ms,
                          _clean(event.prompt), _clean(fields), _clean(event.fields_error), thumbnail))
            return row

        return self._write("a caption", work)

    def add_alert(self, event: AlertEvent) -> int:
        """Store alert edge ``event``; committed on return. Returns its id.

        Raises:
            HistoryError: it could not be written; nothing of it is stored.
        """
        size = 200 + sum(len(s) for s in (event.name, event.reason, event.expression, event.stream_name) if s)

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("INSERT INTO events (kind, wall_time, stream, stream_name, text, alert_name, reason, "
                               "bytes) VALUES ('alert', ?, ?, ?, '', ?, ?, ?)",
                               (event.wall_time, event.stream, event.stream_name, _clean(event.name),
                                _clean(event.reason), size)).lastrowid
            conn.execute("INSERT INTO alerts (id, state, expression, caption_wall_time) VALUES (?, ?, ?, ?)",
                         (row, event.state, _clean(event.expression),
                          None if event.caption is None else event.caption.wall_time))
            return row

        return self._write("an alert edge", work)

    def add_embeddings(self, model: str, items: list[tuple[int, object]]) -> int:
        """Store the text embedding of each caption ``(event_id, vector)`` made by ``model``, in
        one transaction (committed on return), L2-normalised as float32. A caption that already
        has a vector of ``model``, or is no longer stored (pruned meanwhile), is skipped. Returns
        how many were stored.

        Raises:
            HistoryError: a vector is not a finite, non-zero 1-D vector of 1 to 16384 numbers
                (nothing is stored), or the write failed (see :meth:`_write`).
        """
        if not isinstance(model, str) or not model:
            raise HistoryError("an embedding needs the name of its model")
        rows = []
        for event_id, vector in items:
            v = _unit_vector(vector, f"the embedding of caption #{event_id}")
            rows.append((int(event_id), v.shape[0], v.astype("<f4").tobytes()))

        def work(conn: sqlite3.Connection) -> int:
            stored = 0
            for event_id, dim, blob in rows:
                cur = conn.execute("INSERT OR IGNORE INTO embeddings (id, model, dim, vector) SELECT ?, ?, ?, ? "
                                   "WHERE EXISTS (SELECT 1 FROM events WHERE id = ? AND kind = 'caption')",
                                   (event_id, model, dim, blob, event_id))
                if cur.rowcount == 1:
                    stored += 1
                    conn.execute("UPDATE events SET bytes = bytes + ? WHERE id = ?", (len(blob) + 40, event_id))
            return stored

        return self._write("caption embeddings", work) if rows else 0

    def encode_thumbnail(self, frame) -> bytes | None:
        """``frame`` (H×W×3 uint8 BGR) as a JPEG whose longer side is at most :attr:`thumbnail_px`
        (never enlarged); None if it is not such a frame or does not encode."""
        import cv2   # only where thumbnails are made: the history commands load no OpenCV
        import numpy as np

        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 \
                or 0 in frame.shape:
            return None
        h, w = frame.shape[:2]
        scale = self.thumbnail_px / max(h, w)
        if scale < 1:
            frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.thumbnail_quality])
        return data.tobytes() if ok else None

    # -- pruning ---------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of the pages the database uses (its size without free pages or the ``-wal`` file)."""
        with self._lock:
            conn = self._checked()
            pages, free, size = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
            return (pages - free) * size

    def prune(self, retention_days: float | None = None, max_mb: float | None = None,
              now: float | None = None) -> int:
        """Delete the oldest events: those older than ``retention_days`` days (before ``now``,
        default the current time), then, while the database uses more than ``max_mb`` MiB
        (:meth:`used_bytes`), the oldest until it uses at most 90 % of that. None or 0: no
        limit. Returns how many events it deleted. See the module docstring (no VACUUM).

        Raises:
            HistoryError: a limit is negative or not a number, or the deletes failed.
        """
        for name, value in (("retention-days", retention_days), ("max-mb", max_mb)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise HistoryError(f"[history] {name} = {value!r} is not a number of 0 or more (0: no limit)")
        deleted = 0
        if retention_days:
            cutoff = (time.time() if now is None else now) - retention_days * 86400
            deleted += self._write("the pruning", lambda conn: self._delete(
                conn, conn.execute("SELECT id FROM events WHERE wall_time < ?", (cutoff,)).fetchall()))
        if max_mb:
            limit = max_mb * 1024 * 1024
            for _ in range(100):   # each round re-measures; the size estimate is rough
                used = self.used_bytes()
                if used <= limit:
                    break
                need = used - 0.9 * limit

                def trim(conn: sqlite3.Connection, need=need) -> int:
                    ids, total = [], 0
                    for row_id, size in conn.execute("SELECT id, bytes FROM events ORDER BY wall_time, id"):
                        ids.append((row_id,))
                        total += size
                        if total >= need:
                            break
                    return self._delete(conn, ids)

                removed = self._write("the pruning", trim)
                deleted += removed
                if not removed:
                    break
        if deleted:
            with self._lock:
                try:
                    # executescript steps it to the end (execute would free one page only)
                    self._checked().executescript("PRAGMA incremental_vacuum;")
                except sqlite3.Error:
                    pass   # the pages stay free and are reused
        return deleted

    @staticmethod
    def _delete(conn: sqlite3.Connection, ids: list[tuple[int]]) -> int:
        for table in ("captions", "alerts", "events"):
            conn.executemany(f"DELETE FROM {table} WHERE id = ?", ids)
        return len(ids)

    # -- reading ---------------------------------------------------------------------------
    def _checked(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError(f"the history database {self.path} is closed")
        return self._conn

    def _query(self, sql: str, params: list) -> list[tuple]:
        with self._lock:
            try:
                return self._checked().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot read the history database {self.path} ({exc})") from None

    @staticmethod
    def _filters(stream: str | int | None, since: float | None, until: float | None,
                 kind: str | None) -> tuple[list[str], list]:
        where, params = [], []
        if stream is not None:
            stream = str(stream)
            if stream.isdigit():
                where.append("(e.stream = ? OR e.stream_name = ?)")
                params += [int(stream), stream]
            else:
                where.append("e.stream_name = ?")
                params.append(stream)
        if since is not None:
            where.append("e.wall_time >= ?")
            params.append(since)
        if until is not None:
            where.append("e.wall_time <= ?")
            params.append(until)
        if kind is not None:
            if kind not in ("caption", "alert"):
                raise HistoryError(f"unknown kind of event {kind!r}: use caption or alert")
            where.append("e.kind = ?")
            params.append(kind)
        return where, params

    @staticmethod
    def _check_limit(limit: int) -> None:
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise HistoryError(f"limit {limit!r} is out of range: use 1 to {MAX_LIMIT}")

    def search(self, query: str, stream: str | int | None = None, since: float | None = None,
               until: float | None = None, limit: int = 20, *, kind: str | None = None,
               raw: bool = False) -> list[dict]:
        """Events whose indexed text holds every word of ``query``, best first (bm25, then
        newest), at most ``limit``; ``stream``: an index or a name; ``since``/``until``: seconds
        since the epoch (inclusive); ``kind``: ``caption`` or ``alert``; ``raw``: ``query`` is
        FTS5 syntax (module docstring). Returns records with ``rank``.

        Raises:
            HistoryError: no words to search for, an FTS5 syntax error (raw), a bad filter or limit.
        """
        self._check_limit(limit)
        match = _query_text(query).strip() if raw else _fts_words(query)
        if not match:
            raise HistoryError("nothing to search for: give one or more words, e.g. history search \"red car\"")
        where, params = self._filters(stream, since, until, kind)
        sql = (f"{_SELECT}, {_BM25} AS score FROM events_fts JOIN events e ON e.id = events_fts.rowid "
               f"LEFT JOIN captions c ON c.id = e.id LEFT JOIN alerts a ON a.id = e.id "
               f"WHERE events_fts MATCH ? {''.join(' AND ' + w for w in where)} "
               f"ORDER BY score, e.wall_time DESC, e.id DESC LIMIT ?")
        with self._lock:
            try:
                rows = self._checked().execute(sql, [match, *params, limit]).fetchall()
            except sqlite3.OperationalError as exc:
                text = str(exc)
                if raw and not any(word in text for word in ("locked", "busy", "disk", "I/O", "malformed")):
                    raise HistoryError(f"the search {query!r} is not valid FTS5 query syntax ({text}): fix it "
                                       f"(https://sqlite.org/fts5.html#full_text_query_syntax), or search for "
                                       f"the words as written without --raw") from None
                raise HistoryError(f"cannot search the history database {self.path} ({text})") from None
        return [dict(_record(row), rank=round(row[-1], 4)) for row in rows]

    def embedding_models(self) -> list[dict]:
        """The embeddings stored, per model and dimension: ``[{"model", "dim", "count"}]``, most
        vectors first ([] when none, or in a file of a vision-host without them)."""
        if not self._has_embeddings():
            return []
        rows = self._query("SELECT model, dim, count(*) FROM embeddings GROUP BY model, dim "
                           "ORDER BY count(*) DESC, model", [])
        return [{"model": m, "dim": d, "count": c} for m, d, c in rows]

    def embedding_model(self, model: str) -> str:
        """The name under which vectors of ``model`` are stored: ``model`` itself, or the same
        Ollama name with or without ``:latest``.

        Raises:
            HistoryError: no vectors of that model are stored (the message names those there are).
        """
        names = sorted({m["model"] for m in self.embedding_models()})
        if model in names:
            return model
        for name in names:
            if _untagged(name) == _untagged(model):
                return name
        there = (f"it holds vectors of {', '.join(names)}: search with that --embed-model, or record new "
                 f"captions with --embed-model {model}") if names else \
            f"record captions with vision-host run --embed-model {model}"
        raise HistoryError(f"no captions in {self.path} were embedded with model {model!r}: {there}")

    def _has_embeddings(self) -> bool:
        return bool(self._query("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'embeddings'",
                                [])[0][0])

    def search_semantic(self, vector, model: str, stream: str | int | None = None, since: float | None = None,
                        until: float | None = None, limit: int = 20, *, batch: int = 20_000) -> list[dict]:
        """The captions whose stored embedding of ``model`` is closest to ``vector`` (the query's
        embedding by the same model), best first (cosine similarity, then newest), at most
        ``limit``; ``stream``, ``since``, ``until`` filter as in :meth:`search`, before scoring.
        Returns caption records with ``score`` (cosine similarity, -1 to 1, rounded to 4
        places). Cost: see the module docstring (``batch`` vectors in memory at a time).

        Raises:
            HistoryError: a bad vector, filter or limit; no vectors of ``model`` stored (the
                message names the models there are), or only of another dimension than
                ``vector``'s; the database cannot be read.
        """
        import numpy as np

        self._check_limit(limit)
        if not isinstance(batch, int) or not 1 <= batch <= 1_000_000:
            raise HistoryError(f"semantic search batch {batch!r} is out of range: use 1 to 1000000")
        query = _unit_vector(vector, "the query's embedding")
        dim = query.shape[0]
        model = self.embedding_model(model)
        stored = [m for m in self.embedding_models() if m["model"] == model]
        if not any(m["dim"] == dim for m in stored):
            raise HistoryError(f"the captions embedded with model {model!r} have vectors of dimension "
                               f"{', '.join(str(m['dim']) for m in stored)}, the query's has {dim}: the model "
                               f"changed under that name; search with the model that recorded them")
        where, params = self._filters(stream, since, until, None)
        extra = "".join(" AND " + w for w in where)
        best_ids = np.zeros(0, np.int64)
        best_scores = np.zeros(0, np.float32)
        last = -1
        while True:
            rows = self._query(f"SELECT m.id, m.vector FROM embeddings m JOIN events e ON e.id = m.id "
                               f"WHERE m.model = ? AND m.dim = ? AND m.id > ?{extra} ORDER BY m.id LIMIT ?",
                               [model, dim, last, *params, batch])
            if not rows:
                break
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
            scores = matrix @ query
            best_ids = np.concatenate([best_ids, ids])
            best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
            if best_ids.shape[0] > limit:
                keep = np.argpartition(-best_scores, limit - 1)[:limit]
                best_ids, best_scores = best_ids[keep], best_scores[keep]
            last = int(rows[-1][0])
            if len(rows) < batch:
                break
        score_of = dict(zip(best_ids.tolist(), best_scores.tolist()))
        records = []
        ids = list(score_of)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self._query(f"{_SELECT}{_FROM} WHERE e.id IN ({','.join('?' * len(chunk))})", chunk)
            records += [dict(_record(row), score=round(score_of[row[0]], 4)) for row in rows]
        records.sort(key=lambda r: (-r["score"], -r["wall_time_unix"], -r["id"]))
        return records

    def list(self, stream: str | int | None = None, since: float | None = None, until: float | None = None,
             limit: int = 50, *, kind: str | None = None) -> list[dict]:
        """The latest ``limit`` events matching the filters (as in :meth:`search`), oldest first.

        Raises:
            HistoryError: a bad filter or limit, or the database cannot be read.
        """
        self._check_limit(limit)
        where, params = self._filters(stream, since, until, kind)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._query(f"{_SELECT}{_FROM}{clause} ORDER BY e.wall_time DESC, e.id DESC LIMIT ?", [*params, limit])
        return [_record(row) for row in reversed(rows)]

    def get(self, event_id: int) -> dict | None:
        """The record of event ``event_id``, or None if there is none."""
        rows = self._query(f"{_SELECT}{_FROM} WHERE e.id = ?", [event_id])
        return _record(rows[0]) if rows else None

    def thumbnail(self, event_id: int) -> bytes | None:
        """The JPEG thumbnail of caption ``event_id``, or None (no such caption, or none stored)."""
        rows = self._query("SELECT thumbnail FROM captions WHERE id = ?", [event_id])
        return rows[0][0] if rows and rows[0][0] is not None else None

    def count(self) -> int:
        """Events stored."""
        return self._query("SELECT count(*) FROM events", [])[0][0]

    def iter_records(self, stream: str | int | None = None, since: float | None = None,
                     until: float | None = None, *, kind: str | None = None, batch: int = 500) -> Iterator[dict]:
        """Every event matching the filters, oldest first, read ``batch`` at a time (the lock is
        not held between batches, so writers go on)."""
        where, params = self._filters(stream, since, until, kind)
        last = (-math.inf, -1)
        while True:
            clause = " AND ".join([*where, "(e.wall_time > ? OR (e.wall_time = ? AND e.id > ?))"])
            rows = self._query(f"{_SELECT}{_FROM} WHERE {clause} ORDER BY e.wall_time, e.id LIMIT ?",
                               [*params, last[0], last[0], last[1], batch])
            for row in rows:
                yield _record(row)
            if len(rows) < batch:
                return
            last = (rows[-1][2], rows[-1][0])

    def cue_ends(self, stream: str | int | None = None, since: float | None = None, until: float | None = None,
                 *, kind: str | None = None) -> tuple[dict[int, float | None], set[int]]:
        """For the events matching the filters: each one's id → the time of the next event of
        its stream (None for the last), and the streams they belong to (for WebVTT cues)."""
        where, params = self._filters(stream, since, until, kind)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        ends = dict(self._query(f"SELECT e.id, LEAD(e.wall_time) OVER (PARTITION BY e.stream ORDER BY e.wall_time, "
                                f"e.id) FROM events e{clause}", params))
        streams = {row[0] for row in self._query(f"SELECT DISTINCT e.stream FROM events e{clause}", params)}
        return ends, streams

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the database (idempotent); later calls raise :class:`HistoryError`."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str | None) -> str | None:
    """``text`` storable as UTF-8: lone surrogates become U+FFFD."""
    return None if text is None else _SURROGATE.sub("\ufffd", text)


def _untagged(model: str) -> str:
    """An Ollama model name without its default tag (``x:latest`` is ``x``), lower-cased."""
    return model.strip().lower().removesuffix(":latest")


def _unit_vector(vector, what: str):
    """``vector`` as a 1-D float32 numpy array of length 1 to 16384 divided by its L2 norm.

    Raises:
        HistoryError: not such a vector, a value that is not finite, or all zeros.
    """
    import numpy as np

    try:
        v = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise HistoryError(f"{what} is not a vector of numbers") from None
    if v.ndim != 1 or not 1 <= v.shape[0] <= 16384:
        raise HistoryError(f"{what} has shape {v.shape}: it must be one vector of 1 to 16384 numbers")
    if not np.isfinite(v).all():
        raise HistoryError(f"{what} holds values that are not finite numbers")
    norm = float(np.linalg.norm(v))
    if norm == 0 or not math.isfinite(norm):
        raise HistoryError(f"{what} is all zeros (or too large): it has no direction to compare")
    return (v / norm).astype(np.float32)


def _record(row: tuple) -> dict:
    (row_id, kind, wall, stream, stream_name, text, model, alert_name, reason, stream_time_s, frame_index, source,
     latency_ms, prompt, fields, fields_error, has_thumbnail, state, expression, caption_id) = row[:20]
    record = {"id": row_id, "kind": kind, "time": iso_utc(wall), "wall_time_unix": wall, "stream": stream,
              "stream_name": stream_name, "text": text, "model": model}
    if kind == "caption":
        record.update(stream_time_s=stream_time_s, frame_index=frame_index, source=source, latency_ms=latency_ms,
                      prompt=prompt, fields=None if fields is None else json.loads(fields),
                      fields_error=fields_error, thumbnail=bool(has_thumbnail))
    else:
        record.update(alert=alert_name, state=state, reason=reason, expression=expression, caption_id=caption_id)
    return record
