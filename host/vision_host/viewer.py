"""The live viewer at the MJPEG output's address: the page, a JSON API and Server-Sent Events.

Routes (answered through :class:`.outputs.MjpegOutput`'s HTTP server; the video itself stays
at ``/stream/N``):

* ``GET /`` — the page (``viewer.html``, self-contained: it loads nothing from elsewhere).
* ``GET /api/state`` — every stream's state, fps, frame gaps, processor costs, caption
  statistics, config, and the ``ollama`` processor's settings in force (``in_force``: what it
  stores as ``ollama``/KEY in its processor store, as ``{"ollama-KEY": value}``, defaults
  included) (:meth:`Viewer.state`).
* ``GET /api/captions?stream=N&limit=K`` — the latest completed captions, oldest first.
* ``GET /api/config?stream=N`` / ``POST /api/config`` — read or change a stream's config while
  it runs (``{"stream": N, "set": {"ollama-prompt": "…"}}``; no ``stream``: every stream).
  Processors see the change on their next frame (``vision-host:platform/config-watch``).
* ``GET /api/events`` — ``text/event-stream`` (W3C Server-Sent Events): ``state`` once a second,
  ``caption`` for each completed caption, ``config`` after a change.
* ``GET /snapshot.png``, ``/snapshot/N.png`` — the newest annotated frame as PNG.

Security: with a token (always when bound beyond loopback) every request must carry it, as
``?token=T`` or ``Authorization: Bearer T``, or gets 401. No CORS header is ever sent, and a
POST must be ``application/json`` from the page's own origin (a foreign ``Origin`` gets 403),
so other sites cannot read the API or drive the controls.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import logging
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2

from . import __version__
from .runtime.engine import is_locked_key

log = logging.getLogger("vision_host.viewer")

PAGE = Path(__file__).with_name("viewer.html")
_STATE_PERIOD_S = 1.0
_KEEPALIVE_S = 15.0
#: Events a viewer may have waiting; one that falls further behind has stopped reading and is dropped.
_MAX_BACKLOG = 64
_MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


class _Subscriber:
    """One ``/api/events`` connection: its queue of encoded events."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.cond = threading.Condition()
        self.events: deque[bytes] = deque()
        self.dropped = False

    def push(self, event: bytes) -> None:
        with self.cond:
            if self.dropped:
                return
            if len(self.events) >= _MAX_BACKLOG:      # not reading: drop it, never wait for it
                self.dropped = True
                try:
                    self.conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self.events.append(event)
            self.cond.notify_all()


def _sse(event: str, data) -> bytes:
    """One SSE message: ``event: NAME`` and a single ``data:`` line of compact JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Viewer:
    """The page, the API and the event stream of a run's MJPEG output.

    Args:
        runtime: the run's :class:`.runtime.Runtime` (its streams' config and statistics).
        mjpeg: the :class:`.outputs.MjpegOutput` serving the streams (for PNG snapshots).
        token: required on every request when set (see the module docstring).
        captions_kept: completed captions kept for ``/api/captions`` (all streams together).

    Call :meth:`attach` with each stream's pipeline once it runs, give each pipeline
    :meth:`caption_feed` as a caption track, and :meth:`close` at the end.
    """

    def __init__(self, runtime, mjpeg, token: str | None = None, captions_kept: int = 500):
        self.runtime = runtime
        self.mjpeg = mjpeg
        self.token = token
        self.started = time.monotonic()
        self.pipelines: dict[int, object] = {}
        self.captions: deque[dict] = deque(maxlen=captions_kept)
        self._next_caption_id = 1
        self._lock = threading.Lock()
        self._subscribers: list[_Subscriber] = []
        self._stop = threading.Event()
        try:
            self.page = PAGE.read_bytes()
        except OSError:
            self.page = None
        self._ticker = threading.Thread(target=self._tick, name="vision-host-viewer-events", daemon=True)
        self._ticker.start()
        mjpeg.viewer = self

    # -- feeding --------------------------------------------------------------------------------
    def attach(self, index: int, pipeline) -> None:
        """Stream ``index`` runs ``pipeline`` (its statistics appear in the state)."""
        self.pipelines[index] = pipeline

    def caption_feed(self, index: int) -> "_CaptionFeed":
        """A caption track (see :class:`.captions.CaptionTrack`'s methods) for stream ``index``."""
        return _CaptionFeed(self, index)

    def add_caption(self, index: int, event) -> None:
        """Record a completed caption (:class:`.captions.CaptionEvent`) and send it to every viewer."""
        stream = self.runtime.streams[index]
        with self._lock:
            record = {"id": self._next_caption_id, "stream": index, "stream_name": stream.name,
                      "wall_time": _dt.datetime.fromtimestamp(event.wall_time, _dt.timezone.utc)
                      .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                      "stream_time_s": round(event.stream_time_s, 3), "text": event.text,
                      "latency_ms": None if event.latency_ms is None else round(event.latency_ms, 1),
                      "model": event.model}
            self._next_caption_id += 1
            self.captions.append(record)
        self._broadcast(_sse("caption", record))

    def close(self) -> None:
        """Stop the event ticker; open event streams end when the HTTP server closes."""
        self._stop.set()
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            with sub.cond:
                sub.dropped = True
                sub.cond.notify_all()
        self._ticker.join()

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        """The object ``/api/state`` returns (documented in the README)."""
        return {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                "streams": [self._stream_state(s) for s in self.runtime.streams]}

    def _stream_state(self, stream) -> dict:
        pipeline = self.pipelines.get(stream.index)
        fs = stream.fetch_stats
        base = {"index": stream.index, "name": stream.name, "mjpeg": f"/stream/{stream.index}",
                "snapshot": f"/snapshot/{stream.index}.png", "config": dict(stream.config),
                "in_force": settings_in_force(stream)}
        if pipeline is None:
            return {**base, "source": None, "state": "connecting", "fps": 0.0, "frames_out": 0, "frames_dropped": 0,
                    "frame_gap_ms": None, "max_frame_gap_ms": 0.0, "reconnects": 0, "processors": [],
                    "captions": {"started": fs.started, "completed": fs.completed, "failed": fs.failed,
                                 "latency_ms_p50": None, "latency_ms_p95": None, "last": None,
                                 "last_latency_ms": None, "server_error": fs.last_error}}
        summary = pipeline.summary()
        processors = [{"name": name, **{k: p[k] for k in ("calls", "mean_us", "p99_us", "errors", "disabled")},
                       "last_error": proc.last_error}
                      for (name, p), proc in zip(summary["processors"].items(), pipeline.processors, strict=True)]
        captions = {k: summary["captions"][k] for k in ("started", "completed", "failed", "latency_ms_p50",
                                                        "latency_ms_p95", "last")}
        captions["last_latency_ms"] = None if fs.last_latency_ms is None else round(fs.last_latency_ms, 1)
        captions["server_error"] = fs.last_error
        gap = pipeline.last_gap_s
        return {**base, "source": summary["source"], "state": summary["source_state"], "fps": summary["fps"],
                "frames_out": summary["frames_out"], "frames_dropped": summary["frames_dropped"],
                "frame_gap_ms": None if gap is None else round(gap * 1000, 1),
                "max_frame_gap_ms": summary["max_frame_gap_ms"], "reconnects": summary["reconnects"],
                "processors": processors, "captions": captions}

    # -- events ---------------------------------------------------------------------------------
    def _broadcast(self, event: bytes) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.push(event)

    def _tick(self) -> None:
        while not self._stop.wait(_STATE_PERIOD_S):
            if self._subscribers:
                try:
                    self._broadcast(_sse("state", self.state()))
                except Exception:   # noqa: BLE001 - a stats race must not end the events
                    log.exception("could not build the viewer state")

    # -- HTTP -----------------------------------------------------------------------------------
    def authorized(self, handler) -> bool:
        """True when the request may go on; otherwise a 401 has been sent."""
        if self.token is None:
            return True
        given = parse_qs(urlsplit(handler.path).query).get("token", [""])[0]
        auth = handler.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = given or auth[len("Bearer "):].strip()
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            return True
        handler.close_connection = True
        _send_json(handler, HTTPStatus.UNAUTHORIZED, {
            "error": "this server needs the token printed at its start: open /?token=… or send "
                     "Authorization: Bearer …"})
        return False

    def handle_get(self, handler, path: str) -> bool:
        """Answer a GET of the viewer's; False for routes it does not own (the video, JPEGs)."""
        query = parse_qs(urlsplit(handler.path).query)
        if path in ("/", "/index.html") and self.page is not None:
            handler._send_body(HTTPStatus.OK, "text/html; charset=utf-8", self.page)
        elif path == "/api/state":
            _send_json(handler, HTTPStatus.OK, self.state())
        elif path == "/api/captions":
            stream, limit = _int_arg(query, "stream"), _int_arg(query, "limit")
            with self._lock:
                found = [c for c in self.captions if stream is None or c["stream"] == stream]
            _send_json(handler, HTTPStatus.OK, {"captions": found[-limit:] if limit else found})
        elif path == "/api/config":
            stream = self._stream_arg(handler, _int_arg(query, "stream") or 0)
            if stream is not None:
                _send_json(handler, HTTPStatus.OK, _config_reply(stream))
        elif path == "/api/events":
            self._serve_events(handler)
        elif path in ("/snapshot.png",) or (path.startswith("/snapshot/") and path.endswith(".png")):
            number = path[len("/snapshot/"):-len(".png")] if path != "/snapshot.png" else "0"
            stream = self._stream_arg(handler, int(number) if number.isdigit() else -1)
            if stream is None:
                return True
            frame = self.mjpeg.latest_frame(stream.index)
            if frame is None:
                _send_json(handler, HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no frame has been written yet"})
            else:
                ok, png = cv2.imencode(".png", frame)
                handler._send_body(HTTPStatus.OK, "image/png", png.tobytes())
        else:
            return False
        return True

    def handle_post(self, handler, path: str) -> bool:
        """Answer ``POST /api/config``; False for any other path."""
        if path != "/api/config":
            return False
        handler.close_connection = True
        origin = handler.headers.get("Origin")
        if origin and urlsplit(origin).netloc.lower() != (handler.headers.get("Host") or "").lower():
            _send_json(handler, HTTPStatus.FORBIDDEN, {"error": f"requests from {origin} are not allowed"})
            return True
        if handler.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            _send_json(handler, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the body as application/json"})
            return True
        try:
            length = int(handler.headers.get("Content-Length", "0"))
            if not 0 < length <= _MAX_BODY:
                raise ValueError(f"the body must be 1 to {_MAX_BODY} bytes")
            body = json.loads(handler.rfile.read(length))
            if not isinstance(body, dict) or not isinstance(body.get("set"), dict) or not body["set"]:
                raise ValueError('give {"set": {"key": "value", …}} and optionally "stream": N')
        except (ValueError, UnicodeDecodeError) as exc:
            _send_json(handler, HTTPStatus.BAD_REQUEST, {"error": f"bad request: {exc}"})
            return True
        if "stream" in body and body["stream"] is not None:
            stream = self._stream_arg(handler, body["stream"] if isinstance(body["stream"], int) else -1)
            if stream is None:
                return True
            targets = [stream]
        else:
            targets = list(self.runtime.streams)
        values = {str(k): v for k, v in body["set"].items()}
        try:
            for stream in targets:
                stream.set_config(values)
        except ValueError as exc:
            _send_json(handler, HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return True
        log.info("config of stream(s) %s changed: %s", ", ".join(s.name for s in targets),
                 ", ".join(f"{k}={v!r}" for k, v in values.items()))
        for stream in targets:
            self._broadcast(_sse("config", {"stream": stream.index, "config": dict(stream.config)}))
        _send_json(handler, HTTPStatus.OK, {"streams": [s.index for s in targets], "config": dict(targets[0].config)})
        return True

    def _stream_arg(self, handler, index: int):
        streams = self.runtime.streams
        if 0 <= index < len(streams):
            return streams[index]
        _send_json(handler, HTTPStatus.NOT_FOUND, {"error": f"there is no stream {index}: streams are 0 to "
                                                            f"{len(streams) - 1}"})
        return None

    def _serve_events(self, handler) -> None:
        handler.close_connection = True
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("Connection", "close")
        handler.end_headers()
        sub = _Subscriber(handler.connection)
        with self._lock:
            self._subscribers.append(sub)
        try:
            handler.wfile.write(b"retry: 2000\n\n" + _sse("state", self.state()))
            while not self._stop.is_set():
                with sub.cond:
                    sub.cond.wait_for(lambda: sub.events or sub.dropped, timeout=_KEEPALIVE_S)
                    if sub.dropped:
                        return
                    batch = b"".join(sub.events)
                    sub.events.clear()
                handler.wfile.write(batch or b": keep-alive\n\n")   # blocks only this viewer's thread
        except OSError:
            return
        finally:
            with self._lock:
                self._subscribers.remove(sub)


class _CaptionFeed:
    """A pipeline's caption track that feeds the viewer (captions only; gaps are in the state)."""

    def __init__(self, viewer: Viewer, index: int):
        self.viewer, self.index = viewer, index

    def add(self, event) -> None:
        self.viewer.add_caption(self.index, event)

    def gap(self, stream_time_s: float, reason: str) -> None:
        pass

    def resume(self, stream_time_s: float) -> None:
        pass

    def tick(self, stream_time_s: float) -> None:
        pass

    def close(self, stream_time_s: float | None = None) -> None:
        pass


def settings_in_force(stream) -> dict[str, str]:
    """The ``ollama`` processor's settings in force on ``stream``, by config key: it stores
    them in its processor store as ``ollama``/KEY (``model``, ``interval-ms``, ``prompt``,
    ``paused``, …) whenever it reads its config, defaults included, so this answers
    ``{"ollama-model": "llava", "ollama-interval-ms": "3000", …}`` also for keys nobody set.
    Empty before the processor's first frame or without an ``ollama`` processor."""
    store = stream.processor_store
    values = {f"ollama-{key}": store.get("ollama", key) for key in store.keys("ollama")}
    return {key: value for key, value in values.items() if value is not None}


def _int_arg(query: dict, name: str) -> int | None:
    values = query.get(name)
    return int(values[0]) if values and values[0].lstrip("-").isdigit() else None


def _config_reply(stream) -> dict:
    config = dict(stream.config)
    return {"stream": stream.index, "config": config, "locked": sorted(k for k in config if is_locked_key(k))}


def _send_json(handler, status: int, obj) -> None:
    handler._send_body(status, "application/json; charset=utf-8",
                       json.dumps(obj, ensure_ascii=False).encode("utf-8"))


__all__ = ["PAGE", "Viewer", "is_loopback", "settings_in_force"]
