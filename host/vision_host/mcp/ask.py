"""The MCP ``ask`` tool's request: one frame and a question to the stream's vision server.

The request goes where the stream's ``ollama`` processor sends its captions, in the same wire
protocol, through the run's :class:`.runtime.fetch.FairShare` on the stream's lane (so a
question waits its turn like a caption and never starves the other streams), under the run's
:class:`.runtime.NetworkPolicy` (allow-list, credentials, timeouts, reply size cap). The
settings in force are those the processor stores as ``ollama``/KEY in the stream's processor
store (``url``, ``api``, ``model``), falling back to the stream's config and the processor's
defaults before its first frame.

Bodies (the processor's ``protocols.zig`` documents each protocol; here without streaming,
so the whole answer is one JSON reply):

* ``generate``: POST ``URL/api/generate`` ``{"images": [B64], "model", "prompt", "stream":
  false, "options": {"num_predict"}, "format"?}`` → ``{"response": …}``.
* ``chat``: POST ``URL/api/chat`` ``{"messages": [{"role": "user", "images": [B64],
  "content"}], …}`` → ``{"message": {"content": …}}``.
* ``openai``: POST ``URL[/v1]/chat/completions`` ``{"messages": [{"role": "user", "content":
  [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,B64"}}, {"type":
  "text", "text"}]}], "model", "stream": false, "max_tokens", "response_format"?}`` →
  ``{"choices": [{"message": {"content": …}}]}``.
* ``workers-ai``: POST ``URL/MODEL`` ``{"image": [bytes…], "prompt", "max_tokens"}`` →
  ``{"result": {"description": …}, "success": true}`` (no schema: it cannot be asked for one).

``format``/``response_format`` are sent only when the question gives a JSON Schema.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from ..runtime.fetch import FetchClient, FetchErrorResult, FetchStats, frame_jpeg_body

__all__ = ["PROTOCOLS", "AskError", "AskSettings", "answer_text", "ask_body", "ask_url", "send_question"]

#: The ``ollama-api`` values ``ask`` speaks.
PROTOCOLS = ("generate", "chat", "openai", "workers-ai")

_DEFAULT_URL = "http://localhost:11434"


class AskError(Exception):
    """The question could not be asked or answered; the message says why (and what to do)."""


@dataclass(frozen=True)
class AskSettings:
    """Where and how a stream's questions go (:meth:`of_stream`).

    Attributes:
        url: the vision server's base URL (``ollama-url`` in force).
        api: the wire protocol, one of :data:`PROTOCOLS`.
        model: the model asked.
        image_max_side: longer side of the JPEG sent, px (0: full size).
        jpeg_quality: its quality, 1–100.
    """

    url: str
    api: str
    model: str
    image_max_side: int = 672
    jpeg_quality: int = 80

    @classmethod
    def of_stream(cls, stream) -> AskSettings:
        """The settings in force on ``stream`` (a :class:`.runtime.engine.StreamContext`): what
        its ``ollama`` processor stored, else its config, else the processor's defaults.

        Raises:
            AskError: a protocol ``ask`` does not speak.
        """
        store, config = stream.processor_store, stream.config_snapshot()

        def setting(key: str, default: str) -> str:
            return store.get("ollama", key) or config.get(f"ollama-{key}") or default

        def number(key: str, default: int, low: int, high: int) -> int:
            try:
                value = int(config.get(f"ollama-{key}", default))
            except ValueError:
                return default
            return value if low <= value <= high else default

        api = setting("api", "generate")
        if api not in PROTOCOLS:
            raise AskError(f"the stream's ollama-api is {api!r}; ask speaks {', '.join(PROTOCOLS)}")
        return cls(url=setting("url", _DEFAULT_URL).rstrip("/"), api=api, model=setting("model", "llava"),
                   image_max_side=number("image-max-side", 672, 0, 16384),
                   jpeg_quality=number("jpeg-quality", 80, 1, 100))


def ask_url(settings: AskSettings) -> str:
    """The request URL of ``settings.api`` (module docstring)."""
    if settings.api == "generate":
        return f"{settings.url}/api/generate"
    if settings.api == "chat":
        return f"{settings.url}/api/chat"
    if settings.api == "openai":
        return f"{settings.url}{'' if settings.url.endswith('/v1') else '/v1'}/chat/completions"
    return f"{settings.url}/{settings.model}"


def ask_body(settings: AskSettings, question: str, max_tokens: int, schema: dict | None) -> bytes:
    """The JSON body template (UTF-8) with the image placeholder (``%IMAGE%``, or
    ``%IMAGE_BYTES%`` for Workers AI) before any text, so a question that contains the
    placeholder's letters is never where the image goes (:func:`.runtime.frame_ring.fill_image`
    replaces the first).

    Raises:
        AskError: a schema with Workers AI (which has no structured answers).
    """
    api = settings.api
    if api == "workers-ai":
        if schema is not None:
            raise AskError("the stream's vision server is Workers AI, which cannot answer in a JSON schema: "
                           "ask without one")
        head = b'{"image":%IMAGE_BYTES%,'
        rest = {"prompt": question, "max_tokens": max_tokens}
    elif api == "openai":
        head = b'{"messages":[{"role":"user","content":[{"type":"image_url","image_url":' \
               b'{"url":"data:image/jpeg;base64,%IMAGE%"}},'
        text = json.dumps({"type": "text", "text": question}, ensure_ascii=False).encode("utf-8")
        head += text + b"]}],"
        rest = {"model": settings.model, "stream": False, "max_tokens": max_tokens}
        if schema is not None:
            rest["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    elif api == "chat":
        head = b'{"messages":[{"role":"user","images":["%IMAGE%"],'
        head += b'"content":' + json.dumps(question, ensure_ascii=False).encode("utf-8") + b"}],"
        rest = {"model": settings.model, "stream": False, "options": {"num_predict": max_tokens}}
        if schema is not None:
            rest["format"] = schema
    else:
        head = b'{"images":["%IMAGE%"],'
        rest = {"model": settings.model, "prompt": question, "stream": False, "options": {"num_predict": max_tokens}}
        if schema is not None:
            rest["format"] = schema
    return head + json.dumps(rest, ensure_ascii=False, separators=(",", ":")).encode("utf-8")[1:]


def answer_text(api: str, status: int, body: bytes) -> str:
    """The answer in a reply of protocol ``api``.

    Raises:
        AskError: an error reply (its message), or a reply that is not the protocol's.
    """
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if status != 200 or not isinstance(doc, dict):
        message = ""
        if isinstance(doc, dict):
            err = doc.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            errors = doc.get("errors")
            if not err and isinstance(errors, list) and errors and isinstance(errors[0], dict):
                err = errors[0].get("message")
            message = err if isinstance(err, str) else ""
        if status != 200:
            raise AskError(f"the vision server answered HTTP {status}" + (f": {message}" if message else ""))
        raise AskError("the vision server's reply is not JSON of its protocol")
    try:
        if api == "generate":
            text = doc["response"]
        elif api == "chat":
            text = doc["message"]["content"]
        elif api == "openai":
            text = doc["choices"][0]["message"]["content"]
        else:
            if doc.get("success") is False:
                raise AskError("Workers AI refused the question")
            text = doc["result"]["description"]
    except (KeyError, IndexError, TypeError):
        raise AskError(f"the vision server's reply has no answer where the {api} protocol puts it") from None
    if not isinstance(text, str):
        raise AskError(f"the vision server's answer is not text (the {api} protocol)")
    return text.strip()


async def send_question(client: FetchClient, settings: AskSettings, frame, question: str, *, max_tokens: int,
                        schema: dict | None, timeout_s: float, poll_s: float = 0.02) -> tuple[str, float]:
    """Ask ``question`` about ``frame`` (H×W×3 uint8 BGR) through ``client`` (the stream's lane
    of the fair share); returns ``(answer, latency_ms)``. Polls the request every ``poll_s`` s
    on the running event loop (never blocking it); a request not done in ``timeout_s`` s is
    cancelled.

    Raises:
        AskError: refused by the network policy, too many questions at once, the server
            failed or did not answer in time, or its reply carries no answer.
    """
    template = ask_body(settings, question, max_tokens, schema)
    url = ask_url(settings)
    started = time.monotonic()
    try:
        request_id = client.start("POST", url, "application/json", lambda: frame_jpeg_body(
            frame, settings.image_max_side, settings.jpeg_quality, template), is_image=True, prepare=True)
    except FetchErrorResult as err:
        raise AskError(_fetch_error(err, url)) from None
    body = bytearray()
    deadline = started + timeout_s
    try:
        while True:
            try:
                status, done, chunk = client.poll(request_id)
            except FetchErrorResult as err:
                request_id = None
                raise AskError(_fetch_error(err, url)) from None
            body += chunk
            if done:
                request_id = None
                break
            if time.monotonic() >= deadline:
                raise AskError(f"the vision server at {settings.url} did not answer within {timeout_s:g} s")
            await asyncio.sleep(poll_s)
    finally:
        if request_id is not None:       # timed out or the client went away: free the slot
            client.cancel(request_id)
    return answer_text(settings.api, status, bytes(body)), (time.monotonic() - started) * 1000


def _fetch_error(err: FetchErrorResult, url: str) -> str:
    name = err.code.name.lower().replace("_", " ")
    if name == "too many requests":
        return "too many questions are waiting for this stream's vision server: try again when one has answered"
    if name in ("destination not allowed", "invalid url"):
        return f"{url} is not a destination this run may reach ({name}): ask where the stream's captions go"
    return f"the request to {url} failed ({name})"


def new_client(runtime, stream) -> FetchClient:
    """A fetch client for ``stream``'s questions: the run's policy, worker pool and fair share,
    on the stream's lane, with its own counts (questions are not captions)."""
    return FetchClient(runtime.policy, runtime.pool, FetchStats(), runtime.fair_share, stream.index)
