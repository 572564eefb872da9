"""The caption history over HTTP, on the viewer's server: two read-only routes that
:meth:`.viewer.Viewer.routes` adds (they pass the viewer's access rules: Host, token, Origin).

* ``GET /api/history?q=WORDS&stream=S&since=T&until=T&limit=K`` — events of the history,
  newest first: ``{"events": [record, …]}``. ``q``: plain words, all of which must occur
  (:meth:`.HistoryStore.search`: any text is searched for as words, never an FTS5 syntax error;
  the ``K`` best matches by bm25, then shown newest first); without ``q`` the latest ``K`` events.
  ``stream``: a stream index or name; ``since`` / ``until``: a duration before now (``90s``,
  ``30m``, ``2h``, ``7d``, ``2w``) or an ISO 8601 time (``2026-12-01T15:00:00Z``; without a zone
  it is the server's local time), as :func:`.parse_when` reads them; ``limit``: 1 to
  :data:`MAX_LIMIT`, default :data:`DEFAULT_LIMIT`. An empty ``q``, ``stream``, ``since`` or
  ``until`` is the same as none.
* ``GET /api/history/ID/thumbnail.jpg`` — caption ``ID``'s stored thumbnail (``image/jpeg``,
  ``Cache-Control: private, max-age=3600``: a stored event never changes).

A record: ``id``, ``kind`` (``caption`` / ``alert``), ``time`` (ISO 8601 UTC with ms),
``stream``, ``stream_name``, ``text`` (the caption; "" for an alert edge), ``fields`` (the
structured fields of a caption, else None), ``alert``, ``state`` (``ON`` / ``OFF``) and
``reason`` (an alert edge's, else None), ``thumbnail`` (the path of the thumbnail above, or None
when none is stored) and ``recording_time_s``: the caption's position in its stream's output
video (:attr:`.CaptionEvent.stream_time_s`, s, 3 decimals), which for a run recorded with
``-o file`` is the time in the recording; None for an alert edge.

Errors are JSON ``{"error": "…"}``: 400 for a bad parameter, 404 for an unknown id or a missing
thumbnail, 404 when the run keeps no history (``--no-history``), 503 when the history file cannot
be read (the server's log says why; the answer does not show the server's paths).

Every request opens the database read-only (:class:`.HistoryStore` with ``read_only=True``),
reads and closes it on a worker thread (``starlette.concurrency.run_in_threadpool``), so SQLite
never blocks the server's event loop and the run's recorder writes on (WAL readers do not block
the writer).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..webapp import json_response
from .store import HistoryError, HistoryStore, parse_when

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_QUERY_CHARS", "history_routes", "thumbnail_path"]

log = logging.getLogger(__name__)

#: Events one ``/api/history`` answer holds when ``limit`` is not given.
DEFAULT_LIMIT = 100
#: Most events one ``/api/history`` answer may hold.
MAX_LIMIT = 500
#: Longest ``q``, in characters.
MAX_QUERY_CHARS = 500
#: Longest ``stream`` (a name), in characters.
MAX_STREAM_CHARS = 200
#: Longest ``since`` / ``until``, in characters.
MAX_WHEN_CHARS = 64
#: ``Cache-Control`` of a thumbnail: a stored event never changes; only this browser keeps it.
THUMBNAIL_CACHE = "private, max-age=3600"

_NUMBER = re.compile(r"[0-9]{1,6}")
_EVENT_ID = re.compile(r"[0-9]{1,18}")   # fits SQLite's 64-bit integers

_NO_HISTORY = ("this run keeps no caption history (it was started with --no-history or [history] enabled = false): "
               "start vision-host run without --no-history to search its captions here, or search an earlier "
               "run's with vision-host history search")
_UNREADABLE = "the caption history cannot be read now: the server's log says why"


class _BadRequest(Exception):
    """A request to refuse: ``status`` and a sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def thumbnail_path(event_id: int) -> str:
    """The path of event ``event_id``'s thumbnail on the viewer's server."""
    return f"/api/history/{event_id}/thumbnail.jpg"


def history_routes(history_path: Path | str | None | Callable[[], Path | str | None]) -> list[Route]:
    """The two routes (module docstring), reading the history at ``history_path``: a path, None
    (the run keeps no history: every request gets 404 with a sentence saying so), or a callable
    returning one, asked on each request (the run names its history after the viewer's server
    started)."""
    where = history_path if callable(history_path) else (lambda: history_path)
    logged: set[str] = set()
    lock = threading.Lock()

    def open_store() -> HistoryStore:
        """The history, read-only (on a worker thread). Raises _BadRequest (404, 503)."""
        path = where()
        if path is None:
            raise _BadRequest(404, _NO_HISTORY)
        try:
            return HistoryStore(os.fspath(path), read_only=True)
        except HistoryError as exc:
            with lock:
                first = str(exc) not in logged
                logged.add(str(exc))
            if first:
                log.warning("the viewer cannot read the caption history: %s", exc)
            raise _BadRequest(503, _UNREADABLE) from None

    def search(args: dict) -> list[dict]:
        store = open_store()
        try:
            if args["q"] is None:
                records = store.list(args["stream"], args["since"], args["until"], args["limit"])
                records.reverse()   # newest first
            else:
                records = store.search(args["q"], args["stream"], args["since"], args["until"], args["limit"])
                records.sort(key=lambda r: (r["wall_time_unix"], r["id"]), reverse=True)
        except HistoryError as exc:
            log.warning("the viewer's history search failed: %s", exc)
            raise _BadRequest(503, _UNREADABLE) from None
        finally:
            store.close()
        return [_event(r) for r in records]

    def thumbnail(event_id: int) -> bytes:
        store = open_store()
        record = None
        try:
            jpeg = store.thumbnail(event_id)
            if jpeg is None:
                record = store.get(event_id)
        except HistoryError as exc:
            log.warning("the viewer could not read a thumbnail of the history: %s", exc)
            raise _BadRequest(503, _UNREADABLE) from None
        finally:
            store.close()
        if jpeg is None:
            if record is None:
                raise _BadRequest(404, f"there is no event {event_id} in the caption history (it may have been "
                                       f"pruned): list the events with /api/history")
            raise _BadRequest(404, f"event {event_id} of the caption history has no thumbnail (an alert edge, or a "
                                   f"caption stored without its frame)")
        return jpeg

    async def get_history(request: Request) -> Response:
        try:
            args = _history_args(request)
            events = await run_in_threadpool(search, args)
        except _BadRequest as exc:
            return json_response(exc.status, {"error": str(exc)})
        return json_response(200, {"events": events})

    async def get_thumbnail(request: Request) -> Response:
        text = request.path_params["event_id"]
        try:
            if not _EVENT_ID.fullmatch(text):
                raise _BadRequest(404, f"there is no event {_short(text)} in the caption history: ids are whole "
                                       f"numbers (the \"id\" of /api/history's events)")
            jpeg = await run_in_threadpool(thumbnail, int(text))
        except _BadRequest as exc:
            return json_response(exc.status, {"error": str(exc)})
        return Response(jpeg, 200, {"cache-control": THUMBNAIL_CACHE}, media_type="image/jpeg")

    return [Route("/api/history", get_history, methods=["GET"]),
            Route("/api/history/{event_id}/thumbnail.jpg", get_thumbnail, methods=["GET"])]


def _event(record: dict) -> dict:
    """A store record as ``/api/history`` answers it (module docstring)."""
    caption = record["kind"] == "caption"
    stream_time = record.get("stream_time_s") if caption else None
    return {"id": record["id"], "kind": record["kind"], "time": record["time"], "stream": record["stream"],
            "stream_name": record["stream_name"], "text": record["text"],
            "fields": record.get("fields") if caption else None,
            "alert": record.get("alert"), "state": record.get("state"), "reason": record.get("reason"),
            "thumbnail": thumbnail_path(record["id"]) if caption and record.get("thumbnail") else None,
            "recording_time_s": round(stream_time, 3) if isinstance(stream_time, (int, float))
            and math.isfinite(stream_time) else None}


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _text_arg(request: Request, name: str, max_chars: int) -> str | None:
    """Query argument ``name`` stripped, None when absent or empty; 400 beyond ``max_chars``."""
    value = request.query_params.get(name)
    if value is None or not value.replace("\x00", " ").strip():
        return None
    if len(value) > max_chars:
        raise _BadRequest(400, f"bad request: {name} is {len(value)} characters long: give at most {max_chars}")
    return value.strip()


def _when_arg(request: Request, name: str) -> float | None:
    """Query argument ``name`` (``since`` / ``until``) as seconds since the epoch (:func:`.parse_when`)."""
    value = _text_arg(request, name, MAX_WHEN_CHARS)
    if value is None:
        return None
    try:
        when = parse_when(value)
    except HistoryError:
        when = None
    except (ValueError, OverflowError, OSError):   # a date the platform's clock cannot hold (year 1)
        when = None
    if when is None or not math.isfinite(when):
        raise _BadRequest(400, f"bad request: {name} {_short(value)} is not a time: give a duration before now "
                               f"(90s, 30m, 2h, 7d, 2w) or an ISO 8601 time (2026-12-01T15:00:00Z)")
    return when


def _history_args(request: Request) -> dict:
    """The checked parameters of ``/api/history``. Raises _BadRequest (400)."""
    limit = request.query_params.get("limit")
    if limit is None:
        limit = DEFAULT_LIMIT
    elif not _NUMBER.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIMIT:
        raise _BadRequest(400, f"bad request: limit must be a whole number from 1 to {MAX_LIMIT}, "
                               f"not {_short(limit, 20)}")
    else:
        limit = int(limit)
    args = {"q": _text_arg(request, "q", MAX_QUERY_CHARS), "stream": _text_arg(request, "stream", MAX_STREAM_CHARS),
            "since": _when_arg(request, "since"), "until": _when_arg(request, "until"), "limit": limit}
    if args["since"] is not None and args["until"] is not None and args["since"] > args["until"]:
        raise _BadRequest(400, "bad request: since is later than until: give the earlier time as since")
    return args
