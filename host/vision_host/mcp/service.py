"""The run's MCP server (Model Context Protocol, official ``mcp`` SDK), at ``/mcp`` on the viewer.

``vision-host run … -o mjpeg --mcp`` serves MCP over Streamable HTTP at ``/mcp`` on the
viewer's address: one route of the viewer's app, so the viewer's access rules apply to it
unchanged (Host, token as ``Authorization: Bearer T`` or ``?token=T``, Origin; see
:mod:`..webapp`). The SDK's own DNS-rebinding check is off: those rules already do it.

Resources (named as wasmVision names its own): ``images://input`` and ``images://output``,
stream 0's current frame as JPEG before and after the processors; ``images://input/STREAM``
and ``images://output/STREAM`` for any stream (its index or name). The input frame is not
kept while nobody asks: a read asks the stream's pipeline to copy each source frame for the
next :attr:`McpLimits.input_keep_s` seconds (:attr:`.pipeline.Pipeline.input_wanted_until`)
and waits for the next one, so the first read after a pause takes one frame's time.

Tools: ``list_streams``, ``latest_captions``, ``ask`` (the current frame and a question, to
the stream's vision server through the same fair share as its captions: :mod:`.ask`),
``snapshot``, ``set_prompt``, ``alert_states``, ``search_history`` and ``summarize`` (with
the history on). A bad argument (an unknown stream, a limit out of range) and a failure
(history off, no frame yet, the vision server failed) are MCP errors (JSON-RPC error
``-32602`` invalid params, ``-32603`` internal error) whose message says what to do.

The SDK's session manager needs a task group for the server's lifetime: it is started on the
server's event loop by the first request and ended by :meth:`McpService.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import Field

log = logging.getLogger("vision_host.mcp")

__all__ = ["McpLimits", "McpService"]

INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


@dataclass(frozen=True)
class McpLimits:
    """What one MCP client may ask of a run.

    Attributes:
        max_sessions: MCP sessions open at once; one more is answered 503.
        session_idle_s: a session with no request for this long is closed (s).
        max_request_bytes: largest request body (bytes); larger: 413.
        max_captions: most captions ``latest_captions`` returns at once.
        max_results: most hits ``search_history`` returns at once.
        max_summary_captions: most captions one ``summarize`` reads (the latest of the window).
        max_question_chars: longest ``ask`` question (and ``set_prompt`` prompt), characters.
        max_answer_tokens: most tokens an answer may be asked to have.
        ask_timeout_s: an ``ask`` not answered in this time is cancelled (s).
        frame_timeout_s: how long a read waits for a frame (s).
        input_keep_s: after a read of the input frame, source frames are copied for this long (s).
        jpeg_quality: quality of the JPEGs served (1–100).

    Raises:
        ValueError: a limit that is not a number above 0 (a whole one where a count).
    """

    max_sessions: int = 32
    session_idle_s: float = 600.0
    max_request_bytes: int = 1 << 20
    max_captions: int = 500
    max_results: int = 100
    max_summary_captions: int = 5000
    max_question_chars: int = 4000
    max_answer_tokens: int = 4096
    ask_timeout_s: float = 60.0
    frame_timeout_s: float = 5.0
    input_keep_s: float = 30.0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not value > 0:
                raise ValueError(f"{f.name} = {value!r}: give a {'whole ' if whole else ''}number above 0")
        if self.jpeg_quality > 100:
            raise ValueError(f"jpeg_quality = {self.jpeg_quality}: give 1 to 100")


def _mcp_error(code: int, message: str):
    from mcp.shared.exceptions import MCPError
    return MCPError(code=code, message=message)


_DEFAULTS = McpLimits()
# the tools' argument types (module level: the SDK evaluates the annotations in this module)
StreamArg = Annotated[int | str, Field(description="the stream: its index (0, 1, …) or its name, as list_streams "
                                                   "shows them")]
OneStream = Annotated[int | str | None, Field(description="one stream (index or name); all when omitted")]
CaptionCount = Annotated[int, Field(description=f"how many, 1 to {_DEFAULTS.max_captions}")]
ResultCount = Annotated[int, Field(description=f"how many, 1 to {_DEFAULTS.max_results}")]
Question = Annotated[str, Field(description="the question, in words")]
Schema = Annotated[dict[str, Any] | None, Field(description="optional JSON Schema (an object) the answer must match; "
                                                            "the parsed answer comes back in fields")]
AnswerTokens = Annotated[int, Field(description=f"longest answer, in tokens (1 to {_DEFAULTS.max_answer_tokens})")]
Which = Annotated[Literal["output", "input"], Field(description="output (after the processors, annotated) or input "
                                                                "(as the source sent it)")]
Prompt = Annotated[str, Field(description="the new captioning prompt; empty: back to the default")]
Query = Annotated[str, Field(description="words that must all occur (any order, case ignored)")]
Since = Annotated[str | None, Field(description="a duration before now (90s, 30m, 2h, 7d) or an ISO 8601 time "
                                                "(2026-12-01T15:00Z); omitted: no limit")]
SummarySince = Annotated[str, Field(description="a duration before now (30m, 2h, 1d) or an ISO 8601 time")]


class _McpAsgi:
    """The ASGI app at ``/mcp``: starts the session manager on first use, then hands over."""

    def __init__(self, service: McpService):
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        await self.service._started()
        await self.service._manager.handle_request(scope, receive, send)


class McpService:
    """The MCP server of a run with the viewer (module docstring).

    Args:
        viewer: the run's :class:`.viewer.Viewer` (streams, pipelines, captions, config, the
            MJPEG output's frames, alert states, the history path); may be set later, before
            the server starts (:func:`..runner.start_viewer` does).
        limits: :class:`McpLimits` (defaults when None).

    Put :meth:`route` in ``viewer.extra_routes`` before the server starts, and call
    :meth:`close` at the end of the run, before the server stops.
    """

    def __init__(self, viewer=None, limits: McpLimits | None = None):
        from mcp.server.mcpserver import MCPServer
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        from .. import __version__

        self.viewer = viewer
        self.limits = limits or McpLimits()
        self._clients: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.server = MCPServer("vision-host", version=__version__, log_level="WARNING", instructions=(
            "Live video streams captioned by a vision model. list_streams first; images://output/STREAM is the "
            "current annotated frame, images://input/STREAM the frame as the camera sent it."))
        self._register()
        self._manager = StreamableHTTPSessionManager(
            app=self.server._lowlevel_server,
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            session_idle_timeout=self.limits.session_idle_s, max_request_body_size=self.limits.max_request_bytes,
            max_sessions=self.limits.max_sessions)

    # -- life cycle ------------------------------------------------------------------------------
    def route(self):
        """The Starlette route serving MCP at ``/mcp`` (every method: POST, GET, DELETE)."""
        from starlette.routing import Route
        return Route("/mcp", _McpAsgi(self))

    async def _started(self) -> None:
        if self._ready is None:           # the first request, on the server's loop
            self._loop = asyncio.get_running_loop()
            self._ready, self._stop = asyncio.Event(), asyncio.Event()
            self._task = self._loop.create_task(self._run_manager())
        await self._ready.wait()

    async def _run_manager(self) -> None:
        try:
            async with self._manager.run():
                self._ready.set()
                await self._stop.wait()
        except Exception:   # logged; requests then fail with the manager's own error
            log.exception("the MCP session manager stopped")
            self._ready.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """End every MCP session and the session manager (from any thread but the server's);
        waits up to ``timeout_s`` s. Idempotent."""
        loop, stop, task = self._loop, self._stop, self._task
        if loop is None or task is None:
            return

        async def finish() -> None:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)

        with contextlib.suppress(Exception):     # the loop has stopped already
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout_s + 1)
        for client in self._clients.values():
            client.close()
        self._loop = self._task = None

    # -- helpers ---------------------------------------------------------------------------------
    def _stream(self, which: int | str):
        """The stream ``which`` (index or name), or an invalid-params MCP error."""
        streams = self.viewer.runtime.streams
        if isinstance(which, bool):
            which = str(which)
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit() and len(which) <= 6):
            index = int(which)
            if 0 <= index < len(streams):
                return streams[index]
        for stream in streams:
            if stream.name == which:
                return stream
        names = ", ".join(f"{s.index} ({s.name})" for s in streams)
        raise _mcp_error(INVALID_PARAMS, f"there is no stream {which!r}: the streams are {names}")

    def _pipeline(self, stream):
        pipeline = self.viewer.pipelines.get(stream.index)
        if pipeline is None:
            raise _mcp_error(INTERNAL_ERROR, f"stream {stream.index} ({stream.name}) is still connecting to its "
                                             f"source: try again in a moment")
        return pipeline

    async def _output_frame(self, stream):
        frame = await asyncio.to_thread(self.viewer.mjpeg.latest_frame, stream.index)  # may wait for a frame
        if frame is None:
            raise _mcp_error(INTERNAL_ERROR, f"stream {stream.index} ({stream.name}) has no frame yet: try again "
                                             f"in a moment")
        return frame

    async def _input_frame(self, stream):
        """The next source frame of ``stream`` before its processors (a copy), waiting up to
        :attr:`McpLimits.frame_timeout_s`; the newest copy when no frame comes (the source ended)."""
        pipeline = self._pipeline(stream)
        asked = time.monotonic()
        pipeline.input_wanted_until = asked + self.limits.input_keep_s
        deadline = asked + self.limits.frame_timeout_s
        while True:
            kept = pipeline.last_input
            if kept is not None and kept[1] >= asked - 0.5:      # copied while someone wanted it
                return kept[0]
            if time.monotonic() >= deadline or pipeline.ended:
                if kept is not None:
                    return kept[0]
                raise _mcp_error(INTERNAL_ERROR, f"stream {stream.index} ({stream.name}) sent no frame within "
                                                 f"{self.limits.frame_timeout_s:g} s: its source may be reconnecting")
            await asyncio.sleep(0.02)

    async def _jpeg(self, frame) -> bytes:
        from ..runtime.frame_ring import encode_jpeg
        jpeg = await asyncio.to_thread(encode_jpeg, frame, self.limits.jpeg_quality)
        return jpeg.tobytes()

    def _history(self):
        from ..history import HistoryError, HistoryStore
        path = self.viewer.history_path
        if path is None:
            raise _mcp_error(INTERNAL_ERROR, "this run keeps no caption history (it was started with "
                                             "--no-history): restart it without --no-history")
        try:
            return HistoryStore(path, read_only=True)
        except HistoryError as exc:
            raise _mcp_error(INTERNAL_ERROR, f"the history cannot be read yet: {exc}") from None

    def _since(self, since: str | None) -> float | None:
        from ..history import HistoryError, parse_when
        if since is None or not since.strip():
            return None
        try:
            return parse_when(since)
        except HistoryError as exc:
            raise _mcp_error(INVALID_PARAMS, str(exc)) from None

    def _check_range(self, name: str, value: int, high: int, low: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _mcp_error(INVALID_PARAMS, f"{name} = {value!r}: give a whole number from {low} to {high}")

    def _stream_summary(self, stream) -> dict:
        from ..viewer import settings_in_force
        pipeline = self.viewer.pipelines.get(stream.index)
        in_force = settings_in_force(stream)
        config = stream.config_snapshot()
        out = {"index": stream.index, "name": stream.name, "state": "connecting", "source": None,
               "width": None, "height": None, "fps": 0.0, "frames_out": 0,
               "prompt": in_force.get("ollama-prompt", config.get("ollama-prompt")),
               "model": in_force.get("ollama-model", config.get("ollama-model")),
               "last_caption": None, "resources": {"input": f"images://input/{stream.index}",
                                                   "output": f"images://output/{stream.index}"}}
        if pipeline is not None:
            summary = pipeline.summary()
            out.update(state=summary["source_state"], source=summary["source"], width=pipeline.source.width,
                       height=pipeline.source.height, fps=summary["fps"], frames_out=summary["frames_out"],
                       last_caption=summary["captions"]["last"])
        return out

    # -- the MCP surface ----------------------------------------------------------------------------
    def _register(self) -> None:
        server, limits = self.server, self.limits

        for which, what in (("input", "before the processors (as the source sent it)"),
                            ("output", "after the processors (what the viewer shows, captions drawn)")):
            self._add_image_resources(which, what)

        @server.tool(description="The run's video streams: index, name, state (live, reconnecting, ended), "
                                 "source, frame size, fps, the captioning prompt and model in force, the "
                                 "last caption and the image resources of each.")
        async def list_streams() -> dict[str, Any]:
            return {"streams": [self._stream_summary(s) for s in self.viewer.runtime.streams]}

        @server.tool(description="The latest completed captions of a stream, oldest first: text, time (ISO "
                                 "8601 UTC), stream time, latency, model, and fields when the answers are "
                                 "structured.")
        async def latest_captions(stream: StreamArg = 0, limit: CaptionCount = 10) -> dict[str, Any]:
            target = self._stream(stream)
            self._check_range("limit", limit, limits.max_captions)
            captions = [c for c in self.viewer.captions.copy() if c["stream"] == target.index]
            return {"stream": target.index, "captions": captions[-limit:]}

        @server.tool(description="Ask the stream's vision model a question about its current frame (the one "
                                 "the camera just sent). The question waits its turn with the stream's "
                                 "captions. Give schema (a JSON Schema object) to get the answer as JSON "
                                 "matching it, in fields.")
        async def ask(stream: StreamArg, question: Question, schema: Schema = None,
                      max_tokens: AnswerTokens = 200) -> dict[str, Any]:
            return await self._ask(stream, question, schema, max_tokens)

        @server.tool(description="The stream's current frame as a JPEG image: output (after the processors, "
                                 "captions drawn; the default) or input (as the source sent it).")
        async def snapshot(stream: StreamArg = 0, which: Which = "output"):
            from mcp.server.mcpserver.utilities.types import Image
            target = self._stream(stream)
            frame = await (self._input_frame(target) if which == "input" else self._output_frame(target))
            return Image(data=await self._jpeg(frame), format="jpeg")

        @server.tool(description="Change the prompt the stream's captions are asked with; the next caption "
                                 "request uses it. Give an empty prompt to go back to the default.")
        async def set_prompt(stream: StreamArg, prompt: Prompt) -> dict[str, Any]:
            target = self._stream(stream)
            most = min(limits.max_question_chars, self.viewer.limits.max_value_bytes)
            if len(prompt.encode("utf-8", "replace")) > most:
                raise _mcp_error(INVALID_PARAMS, f"the prompt is too long: give at most {most} bytes (UTF-8)")
            try:
                config = target.set_config({"ollama-prompt": prompt})
            except ValueError as exc:
                raise _mcp_error(INVALID_PARAMS, str(exc)) from None
            log.info("MCP: prompt of stream %s set to %r", target.name, prompt[:80])
            return {"stream": target.index, "prompt": config.get("ollama-prompt", "")}

        @server.tool(description="Each alert rule's state per stream: ON/OFF, since when, the last match, how "
                                 "often it fired. Empty when the run has no alert rules.")
        async def alert_states(stream: OneStream = None) -> dict[str, Any]:
            streams = [self._stream(stream)] if stream is not None else self.viewer.runtime.streams
            events = self.viewer.events
            return {"streams": [{"index": s.index, "name": s.name,
                                 "alerts": events.alert_states(s.index) if events is not None else []}
                                for s in streams]}

        @server.tool(description="Search the caption history (every caption and alert of this run and "
                                 "earlier ones, kept on disk) for words; best matches first. since: a "
                                 "duration before now (90s, 30m, 2h, 7d) or an ISO 8601 time.")
        async def search_history(query: Query, since: Since = None, stream: OneStream = None,
                                 limit: ResultCount = 20) -> dict[str, Any]:
            from ..history import HistoryError
            self._check_range("limit", limit, limits.max_results)
            when = self._since(since)
            if stream is not None:
                stream = self._stream(stream).index
            store = self._history()
            try:
                hits = await asyncio.to_thread(store.search, query, stream, when, None, limit)
            except HistoryError as exc:
                raise _mcp_error(INVALID_PARAMS, str(exc)) from None
            finally:
                store.close()
            return {"results": hits}

        @server.tool(description="A summary of what happened on the streams since a time, from the caption "
                                 "history (needs the history on). since: a duration before now (30m, 2h, "
                                 "1d) or an ISO 8601 time.")
        async def summarize(since: SummarySince = "1h", stream: OneStream = None) -> dict[str, Any]:
            return await self._summarize(since, stream)

    def _add_image_resources(self, which: str, what: str) -> None:
        server = self.server

        async def read(stream: str) -> bytes:
            target = self._stream(stream)
            frame = await (self._input_frame(target) if which == "input" else self._output_frame(target))
            return await self._jpeg(frame)

        async def read_first() -> bytes:
            return await read("0")

        server.resource(f"images://{which}", name=which, mime_type="image/jpeg",
                        description=f"Current {which} image frame of stream 0, JPEG: {what}")(read_first)
        server.resource(f"images://{which}/{{stream}}", name=f"{which}-of-stream", mime_type="image/jpeg",
                        description=f"Current {which} image frame of a stream (its index or name), JPEG: "
                                    f"{what}")(read)

    async def _ask(self, stream, question: str, schema: dict | None, max_tokens: int) -> dict:
        from .ask import AskError, AskSettings, new_client, send_question

        target = self._stream(stream)
        limits = self.limits
        if not question.strip():
            raise _mcp_error(INVALID_PARAMS, "the question is empty: ask something about the frame")
        if len(question) > limits.max_question_chars:
            raise _mcp_error(INVALID_PARAMS, f"the question is too long: give at most {limits.max_question_chars} "
                                             f"characters")
        self._check_range("max_tokens", max_tokens, limits.max_answer_tokens)
        if schema is not None and not isinstance(schema, dict):
            raise _mcp_error(INVALID_PARAMS, "schema must be a JSON Schema object, e.g. {\"type\": \"object\", …}")
        try:
            settings = AskSettings.of_stream(target)
        except AskError as exc:
            raise _mcp_error(INVALID_PARAMS, str(exc)) from None
        frame = await self._input_frame(target)
        client = self._clients.get(target.index)
        if client is None:
            client = self._clients[target.index] = new_client(self.viewer.runtime, target)
        try:
            answer, latency_ms = await send_question(client, settings, frame, question, max_tokens=max_tokens,
                                                     schema=schema, timeout_s=limits.ask_timeout_s)
        except AskError as exc:
            raise _mcp_error(INTERNAL_ERROR, str(exc)) from None
        reply: dict[str, Any] = {"stream": target.index, "answer": answer, "model": settings.model,
                                 "latency_ms": round(latency_ms, 1)}
        if schema is not None:
            from ..captions.structured import FormatError, StructuredFormat
            try:
                fields_, error = StructuredFormat(json.dumps(schema)).parse(answer)
            except FormatError as exc:
                fields_, error = None, str(exc)
            reply.update(fields=fields_, fields_error=error)
        return reply

    async def _summarize(self, since: str, stream) -> dict:
        """The captions of the history since ``since`` summarised by the stream's vision server
        (stream 0's for all streams) with the model in force (:mod:`..history.summaries`)."""
        from .ask import AskError, AskSettings

        when = self._since(since)
        if when is None:
            raise _mcp_error(INVALID_PARAMS, "give since: a duration before now (30m, 2h, 1d) or an ISO 8601 time")
        target = self._stream(stream) if stream is not None else None
        if importlib.util.find_spec("vision_host.history.summaries") is None:
            raise _mcp_error(INTERNAL_ERROR, "summaries are not available in this version of vision-host: use "
                                             "search_history or latest_captions")
        try:
            settings = AskSettings.of_stream(target or self.viewer.runtime.streams[0])
        except AskError as exc:
            raise _mcp_error(INTERNAL_ERROR, str(exc)) from None
        config = (target or self.viewer.runtime.streams[0]).config_snapshot()
        server = {"url": settings.url, "api": settings.api, "api_key_env": config.get("ollama-api-key-env")}
        store = self._history()
        try:
            return await asyncio.to_thread(self._summary, store, server, settings.model, when,
                                           None if target is None else target.index)
        finally:
            store.close()

    def _summary(self, store, server: dict, model: str, since: float, stream: int | None) -> dict:
        """On a worker thread: read the window, summarise it. Raises MCPError."""
        from ..captions.event import iso_utc
        from ..history import HistoryError
        from ..history.summaries import Caption, SummaryError, summarize

        most = self.limits.max_summary_captions
        until = time.time()
        try:
            records = store.list(stream=stream, since=since, until=until, limit=most + 1, kind="caption")
        except HistoryError as exc:
            raise _mcp_error(INTERNAL_ERROR, str(exc)) from None
        cut = len(records) > most
        captions = [Caption(r["wall_time_unix"], r["stream_name"] or str(r["stream"]), r["text"])
                    for r in records[-most:] if r["text"].strip()]
        window = {"since": iso_utc(since), "until": iso_utc(until), "window_cut": cut}
        if not captions:
            return {"text": "No captions in that window: nothing to summarise.", "moments": [], "model": model,
                    "caption_count": 0, **window}
        try:
            summary = summarize(captions, server, model=model, timeout_s=self.limits.ask_timeout_s, since=since,
                                until=until)
        except SummaryError as exc:
            raise _mcp_error(INTERNAL_ERROR, str(exc)) from None
        return {"text": summary.text, "moments": [{"time": None if m.wall_time is None else iso_utc(m.wall_time),
                                                   "clock": m.clock, "text": m.text} for m in summary.moments],
                "model": summary.model, "caption_count": summary.caption_count, **window}
