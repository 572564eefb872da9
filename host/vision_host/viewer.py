"""The live viewer at the MJPEG output's address: the page, a JSON API and Server-Sent Events.

Routes (added to :func:`.webapp.build_app`'s app when the :class:`.outputs.MjpegOutput` starts;
the video itself stays at ``/stream/N``):

* ``GET /`` — the page (``viewer.html``, self-contained: it loads nothing from elsewhere).
* ``GET /api/state`` — every stream's state, fps, frame gaps, processor costs, caption
  statistics, config, and the ``ollama`` processor's settings in force (``in_force``: what it
  stores as ``ollama``/KEY in its processor store, as ``{"ollama-KEY": value}``, defaults
  included) (:meth:`Viewer.state`).
* ``GET /api/captions?stream=N&limit=K`` — the latest completed captions, oldest first
  (``N``, ``K``: whole numbers of at most 6 digits, ``K`` ≥ 1; otherwise 400).
* ``GET /api/config?stream=N`` / ``POST /api/config`` — read or change a stream's config while
  it runs (``{"stream": N, "set": {"ollama-prompt": "…"}}``; no ``stream``: every stream).
  Processors see the change on their next frame (``vision-host:platform/config-watch``).
* ``GET /api/events`` — ``text/event-stream`` (W3C Server-Sent Events): ``state`` once a second,
  ``caption`` for each completed caption, ``config`` after a change.
* ``GET /snapshot.png``, ``/snapshot/N.png`` — the newest annotated frame as PNG.
* ``GET /api/history?q=&stream=&since=&until=&limit=``, ``GET /api/history/ID/thumbnail.jpg`` —
  the caption history (:mod:`.history.api`; 404 with a sentence when the run has none).

Security (the Host, token and Origin rules are :class:`.webapp.AccessRules`'): with a token
(always when bound beyond loopback) every request must carry it, as ``?token=T`` or
``Authorization: Bearer T``, or gets 401. No CORS header is ever sent, and a POST must be
``application/json`` (else 415) from the page's own origin (a foreign ``Origin`` gets 403), so
other sites cannot read the API or drive the controls. A POST body is UTF-8 JSON of at most
:attr:`.webserver.ServerLimits.max_body_bytes` (413 beyond); keys and values and the keys added
while running are bounded by :class:`ConfigLimits`. Every refusal is JSON ``{"error": "…"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import __version__
from .captions import CaptionEvent, CaptionSubscriber
from .history.api import history_routes
from .runtime.engine import is_locked_key
from .webapp import json_response, read_body

log = logging.getLogger("vision_host.viewer")

PAGE = Path(__file__).with_name("viewer.html")
_STATE_PERIOD_S = 1.0
_KEEPALIVE_S = 15.0
#: Events a viewer may have waiting; one that falls further behind has stopped reading and is dropped.
_MAX_BACKLOG = 64
#: PNG snapshots being encoded or waiting at once; more are answered 503.
_MAX_PNG_PENDING = 4
_NUMBER = re.compile(r"[0-9]{1,6}")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


@dataclass(frozen=True)
class ConfigLimits:
    """What ``POST /api/config`` may store, per stream.

    Attributes:
        max_added_keys: keys a stream may hold beyond those the run started with (keys
            removed again, with ``""``, no longer count).
        max_key_bytes: longest key, in UTF-8 bytes.
        max_value_bytes: longest value, in UTF-8 bytes.

    Raises:
        ValueError: a limit that is not a whole number above 0.
    """

    max_added_keys: int = 64
    max_key_bytes: int = 128
    max_value_bytes: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} = {value!r}: give a whole number above 0")


class _Subscriber:
    """One ``/api/events`` connection: its queue of encoded events (touched by the server's loop only).

    Args:
        on_drop: called once when the viewer falls :data:`_MAX_BACKLOG` events behind (it has
            stopped reading): it should close the connection.
    """

    def __init__(self, on_drop=None):
        self.events: deque[bytes] = deque()
        self.dropped = False
        self._on_drop = on_drop
        self._wake = asyncio.Event()

    def push(self, event: bytes) -> None:
        """Queue ``event``; never waits. Beyond the backlog the subscriber is dropped instead."""
        if self.dropped:
            return
        if len(self.events) >= _MAX_BACKLOG:      # not reading: drop it, never wait for it
            self.close()
            if self._on_drop is not None:
                self._on_drop()
        else:
            self.events.append(event)
            self._wake.set()

    def close(self) -> None:
        """End the subscription: :meth:`next_batch` answers None from now on."""
        self.dropped = True
        self.events.clear()
        self._wake.set()

    async def next_batch(self, timeout_s: float) -> bytes | None:
        """The events queued (b"" when none came within ``timeout_s`` s), None once dropped."""
        if not self.events and not self.dropped:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout_s)
        if self.dropped:
            return None
        batch = b"".join(self.events)
        self.events.clear()
        return batch


def _sse(event: str, data) -> bytes:
    """One SSE message: ``event: NAME`` and a single ``data:`` line of compact JSON."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return f"event: {event}\ndata: {text}\n\n".encode()
    except UnicodeEncodeError:    # a lone surrogate somewhere
        return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _BadRequest(Exception):
    """A request to refuse: ``status`` and a sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


class Viewer:
    """The page, the API and the event stream of a run's MJPEG output.

    Args:
        runtime: the run's :class:`.runtime.Runtime` (its streams' config and statistics).
        mjpeg: the :class:`.outputs.MjpegOutput` serving the streams (for PNG snapshots); the
            viewer attaches itself to it (``mjpeg.attach_viewer``), which must happen before
            ``mjpeg.start()``.
        token: required on every request when set (see the module docstring).
        captions_kept: completed captions kept for ``/api/captions`` (all streams together).
        limits: what ``POST /api/config`` may store (:class:`ConfigLimits`; defaults when None).

    Call :meth:`attach` with each stream's pipeline once it runs, subscribe
    :attr:`caption_subscriber` to the run's caption bus (every stream), and :meth:`close` at the end.
    """

    def __init__(self, runtime, mjpeg, token: str | None = None, captions_kept: int = 500,
                 limits: ConfigLimits | None = None):
        self.runtime = runtime
        self.mjpeg = mjpeg
        self.token = token
        self.limits = limits or ConfigLimits()
        self.started = time.monotonic()
        self.pipelines: dict[int, object] = {}
        self.captions: deque[dict] = deque(maxlen=captions_kept)
        self._next_caption_id = 1
        self._lock = threading.Lock()
        self._initial_keys = {s.index: frozenset(s.config_snapshot()) for s in runtime.streams}
        self._subscribers: list[_Subscriber] = []    # the server's loop's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._png_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._png_pending = 0
        self._stop = threading.Event()
        try:
            self.page = PAGE.read_bytes()
        except OSError:
            self.page = None
        self._ticker = threading.Thread(target=self._tick, name="vision-host-viewer-events", daemon=True)
        self._ticker.start()
        #: Receives every stream's captions from the run's caption bus (subscribe it with ``stream=None``).
        self.caption_subscriber = _ViewerCaptions(self)
        #: The run's alert rules and event sinks (:class:`.sinks.event_sinks.EventSinks`), when
        #: any: their states appear in ``/api/state`` (``alerts`` per stream, ``sinks``).
        self.events = None
        #: The run's caption history database (a path), None when history is off.
        self.history_path = None
        #: Routes of other services on the viewer's server (metrics, MCP, …), added before it
        #: starts; they pass the same access rules (Host, token, Origin) as the viewer's own.
        self.extra_routes: list = []
        mjpeg.attach_viewer(self)

    # -- feeding --------------------------------------------------------------------------------
    def attach(self, index: int, pipeline) -> None:
        """Stream ``index`` runs ``pipeline`` (its statistics appear in the state)."""
        self.pipelines[index] = pipeline

    def add_caption(self, event: CaptionEvent) -> None:
        """Record a completed caption and send it to every viewer (from any stream's thread)."""
        stream = self.runtime.streams[event.stream]
        with self._lock:
            record = {"id": self._next_caption_id, "stream": event.stream, "stream_name": stream.name,
                      "wall_time": event.wall_time_iso,
                      "stream_time_s": round(event.stream_time_s, 3), "text": event.text,
                      "latency_ms": None if event.latency_ms is None else round(event.latency_ms, 1),
                      "model": event.model}
            if event.fields is not None or event.fields_error is not None:
                record.update(fields=event.fields, fields_error=event.fields_error)
            self._next_caption_id += 1
            self.captions.append(record)
        self._broadcast(_sse("caption", record))

    def close(self) -> None:
        """Stop the event ticker and end every event stream; PNG snapshots are refused from now on."""
        self._stop.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):     # the loop has stopped
                loop.call_soon_threadsafe(self._close_subscribers)
        self._ticker.join()
        with self._lock:
            pool, self._png_pool = self._png_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        """The object ``/api/state`` returns (documented in the README)."""
        events = self.events
        streams = [self._stream_state(s) for s in self.runtime.streams]
        for stream in streams:
            stream["alerts"] = events.alert_states(stream["index"]) if events is not None else []
        return {"version": __version__, "uptime_s": round(time.monotonic() - self.started, 1),
                "streams": streams, "sinks": events.sink_health() if events is not None else []}

    def _stream_state(self, stream) -> dict:
        pipeline = self.pipelines.get(stream.index)
        fs = stream.fetch_stats.snapshot()
        base = {"index": stream.index, "name": stream.name, "mjpeg": f"/stream/{stream.index}",
                "snapshot": f"/snapshot/{stream.index}.png", "config": stream.config_snapshot(),
                "in_force": settings_in_force(stream)}
        if pipeline is None:
            return {**base, "source": None, "state": "connecting", "fps": 0.0, "frames_out": 0, "frames_dropped": 0,
                    "frame_gap_ms": None, "max_frame_gap_ms": 0.0, "reconnects": 0, "processors": [],
                    "captions": {"started": fs.started, "completed": 0, "failed": fs.failed,
                                 "latency_ms_p50": None, "latency_ms_p95": None, "last": None,
                                 "last_latency_ms": None, "server_error": fs.last_error}}
        summary = pipeline.summary()
        processors = [{"name": name, **{k: p[k] for k in ("calls", "mean_us", "p99_us", "errors", "disabled")},
                       "last_error": proc.last_error}
                      for (name, p), proc in zip(summary["processors"].items(), pipeline.processors, strict=True)]
        captions = {k: summary["captions"][k] for k in ("started", "completed", "failed", "latency_ms_p50",
                                                        "latency_ms_p95", "last")}
        last_latency_ms = pipeline.caption_stats.snapshot().last_latency_ms
        captions["last_latency_ms"] = None if last_latency_ms is None else round(last_latency_ms, 1)
        captions["server_error"] = fs.last_error
        gap = pipeline.last_gap_s
        return {**base, "source": summary["source"], "state": summary["source_state"], "fps": summary["fps"],
                "frames_out": summary["frames_out"], "frames_dropped": summary["frames_dropped"],
                "frame_gap_ms": None if gap is None else round(gap * 1000, 1),
                "max_frame_gap_ms": summary["max_frame_gap_ms"], "reconnects": summary["reconnects"],
                "processors": processors, "captions": captions}

    # -- events ---------------------------------------------------------------------------------
    def _broadcast(self, event: bytes) -> None:
        """Queue ``event`` for every event stream (from any thread; never waits for a viewer)."""
        loop = self._loop
        if loop is None or not self._subscribers:
            return
        with contextlib.suppress(RuntimeError):         # the loop has stopped
            loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: bytes) -> None:
        for sub in list(self._subscribers):
            sub.push(event)

    def _close_subscribers(self) -> None:
        for sub in list(self._subscribers):
            sub.close()

    def _tick(self) -> None:
        while not self._stop.wait(_STATE_PERIOD_S):
            if self._subscribers:
                try:
                    self._broadcast(_sse("state", self.state()))
                except Exception:   # noqa: BLE001 - a stats race must not end the events
                    log.exception("could not build the viewer state")

    # -- HTTP -----------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """The viewer's API routes, for :func:`.webapp.build_app` (which also routes ``/`` to
        :attr:`page` and ``/snapshot….png`` to :meth:`snapshot_png`)."""
        return [Route("/api/state", self._get_state, methods=["GET"]),
                Route("/api/captions", self._get_captions, methods=["GET"]),
                Route("/api/config", self._get_config, methods=["GET"]),
                Route("/api/config", self._post_config, methods=["POST"]),
                Route("/api/events", self._get_events, methods=["GET"]),
                *history_routes(lambda: self.history_path), *self.extra_routes]

    async def _get_state(self, request: Request) -> Response:
        return json_response(200, self.state())

    async def _get_captions(self, request: Request) -> Response:
        try:
            stream = _number_arg(request, "stream")
            limit = _number_arg(request, "limit", least=1)
        except _BadRequest as exc:
            return json_response(exc.status, {"error": str(exc)})
        with self._lock:
            found = [c for c in self.captions if stream is None or c["stream"] == stream]
        return json_response(200, {"captions": found[-limit:] if limit else found})

    async def _get_config(self, request: Request) -> Response:
        try:
            number = _number_arg(request, "stream")
            stream = self._stream(0 if number is None else number)
        except _BadRequest as exc:
            return json_response(exc.status, {"error": str(exc)})
        return json_response(200, _config_reply(stream))

    async def _post_config(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return json_response(415, {"error": "send the body as application/json"})
        body = await read_body(request, request.app.state.limits.max_body_bytes)
        if isinstance(body, Response):
            return body
        try:
            targets, values = self._parse_change(body)
            self._check_limits(targets, values)
            for stream in targets:
                stream.set_config(values)
        except _BadRequest as exc:
            return json_response(exc.status, {"error": str(exc)})
        except ValueError as exc:      # set_config's sentence
            return json_response(400, {"error": str(exc)})
        log.info("config of stream(s) %s changed: %s", ", ".join(s.name for s in targets),
                 ", ".join(f"{k}={_short(v, 80)}" for k, v in values.items()))
        for stream in targets:
            self._broadcast(_sse("config", {"stream": stream.index, "config": stream.config_snapshot()}))
        return json_response(200, {"streams": [s.index for s in targets], "config": targets[0].config_snapshot()})

    def _parse_change(self, body: bytes) -> tuple[list, dict[str, str]]:
        """The streams and values of a ``POST /api/config`` body. Raises _BadRequest."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadRequest(400, f"bad request: the body is not UTF-8 (byte {exc.start})") from None
        try:
            obj = json.loads(text)
        except RecursionError:
            raise _BadRequest(400, "bad request: the body is JSON nested too deeply") from None
        except ValueError as exc:
            raise _BadRequest(400, f"bad request: the body is not JSON ({str(exc)[:120]})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("set"), dict) or not obj["set"]:
            raise _BadRequest(400, 'bad request: give {"set": {"key": "value", …}} and optionally "stream": N')
        if obj.get("stream") is not None:
            number = obj["stream"]
            if isinstance(number, bool) or not isinstance(number, int):
                raise _BadRequest(400, "bad request: \"stream\" must be a stream number (0, 1, …)")
            targets = [self._stream(number)]
        else:
            targets = list(self.runtime.streams)
        return targets, obj["set"]

    def _check_limits(self, targets: list, values: dict) -> None:
        """Refuse (_BadRequest) keys, values or a number of added keys beyond :attr:`limits`."""
        limits = self.limits
        for key, value in values.items():
            try:
                key_bytes = len(key.encode("utf-8"))
                value_bytes = len(value.encode("utf-8")) if isinstance(value, str) else 0
            except UnicodeEncodeError:
                raise _BadRequest(400, f"config key {_short(key)}: keys and values must be valid Unicode "
                                       f"(no lone surrogates)") from None
            if key_bytes > limits.max_key_bytes:
                raise _BadRequest(400, f"config key {_short(key)}: give a key of at most {limits.max_key_bytes} "
                                       f"bytes")
            if value_bytes > limits.max_value_bytes:
                raise _BadRequest(400, f"config value of {_short(key)[1:-1]}: give a string of at most "
                                       f"{limits.max_value_bytes} bytes (UTF-8)")
        removed = {k for k, v in values.items() if v == ""}
        for stream in targets:
            config = stream.config_snapshot()
            initial = self._initial_keys.setdefault(stream.index, frozenset(config))
            after = (set(config) | set(values)) - removed
            added = len(after - initial)
            if added > limits.max_added_keys:
                raise _BadRequest(400, f"stream {stream.index} would hold {added} keys beyond those it started "
                                       f"with; at most {limits.max_added_keys} may be added while running: remove "
                                       f"some first (set them to \"\")")

    def _stream(self, index: int):
        streams = self.runtime.streams
        if 0 <= index < len(streams):
            return streams[index]
        raise _BadRequest(404, f"there is no stream {index}: streams are 0 to {len(streams) - 1}")

    async def _get_events(self, request: Request) -> Response:
        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        media_type = "text/event-stream; charset=utf-8"
        if request.method == "HEAD":
            return Response(b"", 200, headers, media_type=media_type)
        self._loop = asyncio.get_running_loop()
        connections = request.app.state.connections
        client = request.scope.get("client")
        on_drop = (lambda: connections.abort(client)) if connections is not None else None
        return StreamingResponse(self._events(on_drop), 200, headers, media_type=media_type)

    async def _events(self, on_drop):
        sub = _Subscriber(on_drop)
        self._subscribers.append(sub)
        try:
            yield b"retry: 2000\n\n" + _sse("state", self.state())
            while not self._stop.is_set():
                batch = await sub.next_batch(_KEEPALIVE_S)
                if batch is None:
                    return
                yield batch or b": keep-alive\n\n"
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)

    async def snapshot_png(self, request: Request, index: int) -> Response:
        """``/snapshot/N.png``: stream ``index``'s newest frame as PNG, encoded off the event loop
        (503 before the first frame, while :data:`_MAX_PNG_PENDING` are being encoded, or once closed)."""
        frame = await asyncio.to_thread(self.mjpeg.latest_frame, index)   # may wait for the next frame
        if frame is None:
            return json_response(503, {"error": "no frame has been written yet"})
        with self._lock:
            if self._stop.is_set():
                return json_response(503, {"error": "the server is stopping"})
            if self._png_pending >= _MAX_PNG_PENDING:
                return json_response(503, {"error": "too many snapshots at once: try again"}, {"retry-after": "1"})
            if self._png_pool is None:
                self._png_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vision-host-png")
            self._png_pending += 1
            future = self._png_pool.submit(_encode_png, frame)
        try:
            png = await asyncio.wrap_future(future)
        finally:
            with self._lock:
                self._png_pending -= 1
        return Response(png, 200, {"cache-control": "no-store"}, media_type="image/png")


def _encode_png(frame) -> bytes:
    ok, png = cv2.imencode(".png", frame)
    if not ok:  # pragma: no cover - imencode of a valid uint8 image does not fail
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def _number_arg(request: Request, name: str, least: int = 0) -> int | None:
    """The query argument ``name`` as a whole number (at most 6 ASCII digits, at least
    ``least``), None when absent. Raises _BadRequest (400) otherwise."""
    value = request.query_params.get(name)
    if value is None:
        return None
    if not _NUMBER.fullmatch(value) or int(value) < least:
        raise _BadRequest(400, f"bad request: {name} must be a whole number from {least} to 999999, "
                               f"not {_short(value, 20)}")
    return int(value)


class _ViewerCaptions(CaptionSubscriber):
    """The viewer's subscriber of the caption bus: every stream's captions (their gaps are in the state)."""

    def __init__(self, viewer: Viewer):
        self.viewer = viewer

    def add(self, event: CaptionEvent) -> None:
        self.viewer.add_caption(event)


def settings_in_force(stream) -> dict[str, str]:
    """The ``ollama`` processor's settings in force on ``stream``, by config key: it stores
    them in its processor store as ``ollama``/KEY (``model``, ``interval-ms``, ``prompt``,
    ``paused``, …) whenever it reads its config, defaults included, so this answers
    ``{"ollama-model": "llava", "ollama-interval-ms": "3000", …}`` also for keys nobody set.
    Empty before the processor's first frame or without an ``ollama`` processor."""
    store = stream.processor_store
    values = {f"ollama-{key}": store.get("ollama", key) for key in store.keys("ollama")}
    return {key: value for key, value in values.items() if value is not None}


def _config_reply(stream) -> dict:
    config = stream.config_snapshot()
    return {"stream": stream.index, "config": config, "locked": sorted(k for k in config if is_locked_key(k))}


__all__ = ["PAGE", "ConfigLimits", "Viewer", "is_loopback", "settings_in_force"]
