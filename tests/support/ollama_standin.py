"""A stand-in for an Ollama server, for tests: the real wire protocol, no model.

It speaks Ollama's HTTP API (https://github.com/ollama/ollama/blob/main/docs/api.md,
checked against server/routes.go and api/types.go at ollama commit fb30760, 2026-08):

* ``GET /`` → ``200 text/plain`` ``Ollama is running``; ``GET /api/version`` → ``{"version": ...}``;
  ``GET /api/tags`` → ``{"models": [{"name", "model", "modified_at", "size", "digest", "details"}]}``;
  ``POST /api/show`` → details and ``capabilities`` (``["completion", "vision"]``).
* ``POST /api/generate`` with ``model``, ``prompt``, ``images`` (base64 strings), ``stream``
  (default true), ``options.num_predict``, ``keep_alive``. Streaming replies are NDJSON
  (``Content-Type: application/x-ndjson``, chunked transfer encoding): lines
  ``{"model","created_at","response","done":false}``, then a final line with
  ``"done":true``, ``"done_reason"`` (``"stop"``, or ``"length"`` when ``num_predict``
  cut it short), ``"context"`` and the metrics ``total_duration``, ``load_duration``,
  ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``, ``eval_duration``
  (durations in ns). ``"stream": false`` → one ``application/json; charset=utf-8`` object
  with the whole ``response``. An empty prompt answers ``done_reason: "load"``
  (``"unload"`` with ``keep_alive: 0``), as Ollama does.
* ``POST /api/chat`` with ``messages[]`` (``role``, ``content``, ``images``): the same,
  with ``{"message": {"role": "assistant", "content": piece}}`` instead of ``response``.
* Several images in one request (``images`` with more than one entry, or several
  messages' ``images``; on /v1 several ``image_url`` parts) are accepted as Ollama accepts
  them: every one must decode (else the 400 below), all are recorded in order
  (:attr:`RecordedRequest.images`, :meth:`RecordedRequest.decoded`), each is charged
  576 prompt tokens, and ``reply`` is given the first.

Errors as Ollama sends them, ``{"error": "..."}`` with ``application/json; charset=utf-8``:

* 400 ``missing request body``; 400 for a body that is not valid JSON or has fields of the
  wrong type (Go's ``encoding/json`` wording, approximately); 400
  ``illegal base64 data at input byte N`` for an image that is not base64 (Go's wording);
  400 ``Failed to load image or audio file`` for base64 that is not a decodable image
  (what Ollama passes through from its llama.cpp runner).
* /api/generate: 404 ``model 'x' not found`` (also for a missing model: ``model '' not found``).
  /api/chat: 400 ``model is required`` when missing, 404 ``model 'x' not found`` when unknown.
  (The old wording ``model "x" not found, try pulling it first`` is gone from current Ollama.)
* Unknown path: 404 ``404 page not found`` (text/plain, gin's); wrong method: 405.
* Errors after streaming began arrive as a last NDJSON line ``{"error": "..."}`` with
  status 200 (failure mode ``"midstream_error"``).

Structured answers (``format``), as Ollama does them (llm/server.go ``Completion``, server/routes.go):

* /api/generate and /api/chat take ``format``: ``"json"`` (the reply is some JSON object) or a JSON
  Schema object (the reply is an instance of it); absent, ``null`` or ``""`` is plain text. Anything
  else is refused once the model is loaded, as Ollama's runner refuses it: 500
  ``{"error": "invalid format: \"<the raw JSON, Go-quoted>\"; expected \"json\" or a valid JSON Schema
  object"}`` (e.g. ``format: "xml"`` → ``invalid format: "\"xml\""; ...``).
* /v1/chat/completions takes ``response_format`` as Ollama's compat layer (openai/openai.go) reads it:
  ``{"type": "json_object"}`` is ``format: "json"``; ``{"type": "json_schema", "json_schema": {"schema":
  S}}`` is ``format: S`` (``name`` is not checked; no ``json_schema`` or no ``schema``: plain text);
  another ``type`` (``"text"``, ...) is ignored. A ``response_format`` that is not an object is a
  400 bind error; a ``schema`` that is not an object is the 500 ``invalid format`` above, in the
  OpenAI error shape. ``openai_strict=True`` refuses instead as OpenAI's own API does, 400
  ``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``: ``Invalid value:
  'xml'. Supported values are: 'json_object', 'json_schema', and 'text'.`` (param
  ``response_format.type``, code ``invalid_value``), ``Missing required parameter:
  'response_format.json_schema'.`` and ``... 'response_format.json_schema.name'.`` (code
  ``missing_required_parameter``). (OpenAI's reference makes ``schema`` optional: without it any
  JSON object is answered.)
* The reply with a format: the reply text if it already is a JSON object (so a test can give
  one); else with ``json`` ``{"caption": text}``, and with a schema an instance made from it
  (:func:`schema_instance`: every property, required or not; a string is the reply text).
  It is written with ``", "`` and ``": "`` separators and streams in pieces like any reply.

Text-only chat (no image: /api/chat, /api/generate, /v1/chat/completions without image parts) is
answered like any request; the default reply is then :func:`default_text_reply`, made from the
times found in the prompt (what a summary of captions sends), and ``text_only_error`` refuses it.

Model names match like Ollama's: case-insensitively, and a name without a tag means ``:latest``.

OpenAI compatibility (``/v1``), as Ollama's layer behaves (checked against docs/api/openai-compatibility.mdx,
openai/openai.go, middleware/openai.go and server/routes.go at the same commit, fb30760):

* ``POST /v1/chat/completions`` with ``model``, ``messages`` (``role``; ``content`` a string or a
  list of parts ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url":
  {"url": ...}}``, ``image_url`` also as a plain string), ``stream`` (default false),
  ``stream_options.include_usage``, ``max_tokens`` (becomes ``num_predict``), ``temperature``.
  ``max_completion_tokens`` is not a field Ollama reads: accepted and ignored, as Ollama does.
  Like Ollama's ``FromChatRequest``, every text part and every image part becomes a message of
  its own; the reply is made exactly as for /api/chat (``reply``, pieces, ``latency_s``,
  ``token_delay_s``) from the images in order and, as the prompt, the last non-empty user text.
  An ``image_url`` must be ``data:image/{jpeg,jpg,png,webp};base64,...`` or ``data:;base64,...``.
* ``stream: true`` → ``200 text/event-stream``, chunked: events ``data: {json}\\n\\n`` with
  ``{"id": "chatcmpl-NNN", "object": "chat.completion.chunk", "created", "model",
  "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": {...},
  "finish_reason": null}]}``; the first delta is ``{"role": "assistant", "content": piece}``,
  later ones ``{"content": piece}`` (role only on the first, as Ollama's ChatWriter does since
  #17485); one ``created`` for the whole stream. Then a finish chunk with an empty delta ``{}``
  and ``finish_reason`` ``"stop"`` (``"length"`` when ``max_tokens`` cut it short); with
  ``stream_options.include_usage`` a chunk with ``"choices": []`` and ``usage``; then
  ``data: [DONE]\\n\\n``.
* ``stream: false`` → ``200 application/json`` (no charset): ``{"id", "object": "chat.completion",
  "created", "model", "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "message":
  {"role": "assistant", "content"}, "finish_reason"}], "usage": {"prompt_tokens",
  "completion_tokens", "total_tokens"}}`` (the counts are /api/chat's ``prompt_eval_count`` and
  ``eval_count``).
* ``GET /v1/models`` → ``{"object": "list", "data": [{"id": "llava:latest", "object": "model",
  "created": <unix s>, "owned_by": "library"}]}`` (``owned_by`` is the name's namespace;
  ``data`` is ``null`` with no models, Go's nil slice). ``GET /v1/models/{model}`` → one such
  object with ``id`` as asked, or 404.
* Errors: ``{"error": {"message", "type", "param": null, "code": null}}``, ``type``
  ``invalid_request_error`` for 400, ``not_found_error`` for 404, ``api_error`` otherwise. From the
  middleware (``application/json; charset=utf-8``), 400: ``EOF`` (empty body), Go's JSON wording
  for bad JSON / wrong types, ``[] is too short - 'messages'``, ``invalid message format`` (a bad
  content part), ``invalid message content type: <nil>`` (no content), ``invalid image input``
  (not a base64 data URL), ``image URLs are not currently supported, please use base64 encoded
  data instead`` (http/https). From the handler (``application/json``): 400 ``model is
  required``, 404 ``model 'x' not found`` (/v1/models/x: ``model 'x:latest' not found``), 400
  ``Failed to load image or audio file``, 500 for ``"http500"``.
* An error after streaming began is *not* an SSE error event with Ollama: its ChatWriter decodes
  the ``{"error": ...}`` line as an ``api.ChatResponse``, so the client gets one more chunk
  ``{"delta": {"content": ""}, "finish_reason": null}`` with ``"model": ""``, then the body
  ends: no finish chunk, no ``data: [DONE]``. Clients must treat a stream that ends without a
  ``finish_reason`` as failed (the ``openai`` client raises nothing). ``sse_error_events=True``
  sends ``data: {"error": {"message", "type": "api_error", ...}}`` instead, as OpenAI's API does
  (the ``openai`` client raises ``openai.APIError`` on it).

Deliberate stress for clients (``split_chunks=True``, the default): every NDJSON line (and
every SSE event) is its own HTTP chunk, except that every fourth line (4th, 8th, ...) shares a
chunk with the line after it, and every third line from the 2nd (2nd, 5th, 11th, ...; not one
already merged) is cut across two chunks, so clients must reassemble lines rather than trust
chunk boundaries (TCP and proxies give no such guarantee with a real server either).

Failure modes (``failure=``), applied to /api/generate, /api/chat and /v1/chat/completions
after request validation and after ``latency_s`` (on /v1 a "line" is an SSE event and the
errors take the OpenAI shape above):

* ``None`` — behave.
* ``"http500"`` — 500 ``{"error": failure_message}``.
* ``"malformed"`` — 200; streaming: the first piece, then a line (/v1: an event ``data: ...``)
  that is not JSON, then the rest; ``stream: false``: a body that is not JSON.
* ``"hang"`` — read the request and never answer (until :meth:`OllamaStandin.stop`).
* ``"reset"`` — streaming: headers and the first piece, then a TCP reset (SO_LINGER 0);
  ``stream: false``: headers and half of the body, then a reset.
* ``"drip"`` — the correct reply, one byte per HTTP chunk (streaming) or per send
  (``stream: false``), ``drip_delay_s`` apart.
* ``"midstream_error"`` — streaming: two pieces, then ``{"error": failure_message}`` as the
  last line (status 200, as Ollama does); ``stream: false``: 500 ``{"error": ...}``.
  /v1 streaming: two pieces, then what Ollama's compat layer makes of that line (an empty
  chunk and the end of the body, or an SSE error event with ``sse_error_events``, see above).

Embeddings (``POST /api/embed``, ``POST /v1/embeddings``), as Ollama answers them (server/routes.go
``EmbedHandler``, middleware/openai.go ``EmbeddingsMiddleware``): the vectors are not a model's but
:func:`hash_embedding`'s, deterministic bag-of-words vectors (each word, lower-cased, a few
stop words left out, adds ±1 at 3 dimensions chosen by a hash of the model's name and the word;
L2-normalised), so texts sharing words are closer and two models' vectors are unrelated. Any
model of ``models`` embeds; ``embed_dim`` (default :data:`EMBED_DIM`, settable) is the dimension.

* /api/embed: ``{"model", "input": string | [strings], "truncate", "dimensions", ...}`` →
  ``{"model", "embeddings": [[floats]], "total_duration", "load_duration", "prompt_eval_count"}``
  (``application/json; charset=utf-8``); ``input: ""`` gives ``"embeddings": []``; ``dimensions``
  below the full size keeps that many and normalises again. Errors: 400 ``missing request body``,
  Go's JSON wording, 400 ``invalid input type`` (an input that is not a string or strings), 404
  ``model '' not found`` (no model), 404 ``model "x" not found, try pulling it first`` (unknown).
* /v1/embeddings: ``{"model", "input", "encoding_format", "dimensions"}`` → ``{"object": "list",
  "data": [{"object": "embedding", "embedding": [floats] (base64 of little-endian float32 with
  ``encoding_format: "base64"``), "index"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``
  (``application/json``). Errors in the OpenAI shape: from the middleware 400 ``EOF``, Go's JSON
  wording, ``Invalid value for 'encoding_format' = x. Supported values: ['float', 'base64'].``,
  ``invalid input`` (no input, or ``[]``); from the handler 400 ``invalid input type`` and the 404s
  above (type ``not_found_error``).
* ``latency_s`` delays both; ``failure`` ``"http500"`` answers 500 with ``failure_message`` and
  ``"hang"`` never answers; the other failure modes do not apply to embeddings.

Usage::

    from ollama_standin import OllamaStandin, ollama_standin   # the second is a pytest fixture

    def test_x(ollama_standin):            # started, stopped after the test
        ollama_standin.latency_s = 0.2     # settable while running
        client = ollama.Client(host=ollama_standin.url)
        oai = openai.OpenAI(base_url=ollama_standin.url + "/v1", api_key="ollama")
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import cv2
import numpy as np
import pytest

__all__ = ["EMBED_DIM", "FAILURE_MODES", "hash_embedding",
           "OllamaStandin", "RecordedRequest", "default_caption", "default_text_reply", "ollama_standin",
           "schema_instance"]

#: Accepted values of ``OllamaStandin.failure``.
FAILURE_MODES = (None, "http500", "malformed", "hang", "reset", "drip", "midstream_error")

ReplyFn = Callable[[str, "bytes | None"], str]

_JSON_CT = "application/json; charset=utf-8"
_NDJSON_CT = "application/x-ndjson"
_TEXT_CT = "text/plain; charset=utf-8"
_OPENAI_JSON_CT = "application/json"  # what Ollama's OpenAI middleware sets (no charset)
_SSE_CT = "text/event-stream"
_V1_CHAT = "/v1/chat/completions"
_V1_MODELS = "/v1/models"
_V1_EMBEDDINGS = "/v1/embeddings"
#: The default dimension of the stand-in's embeddings (``OllamaStandin.embed_dim``).
EMBED_DIM = 64
_STOP_WORDS = frozenset("a an the at of in on is are and or with to by from".split())
_DATA_URL_PREFIXES = ("data:;base64,",) + tuple(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_IMAGE_TOKENS = 576  # prompt_eval_count charged per image, like a LLaVA-style projector


def schema_instance(schema: Any, text: str) -> Any:
    """An instance of JSON Schema ``schema`` (what a model constrained by it could answer).

    ``const`` / ``enum`` (first value) first; ``anyOf`` / ``oneOf`` / ``allOf``: the first
    subschema; then by ``type`` (the first that is not ``"null"`` of a list): an object has
    every property (required or not), a string is ``text``, an integer 1, a number 0.5, a
    boolean true, an array one item of ``items`` (none without ``items``), null None. No
    ``type`` but ``properties``: an object; no type at all: ``text``.
    """
    if not isinstance(schema, dict):
        return text
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema_instance(schema[key][0], text)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if t is None and isinstance(schema.get("properties"), dict):
        t = "object"
    if t == "object":
        props = schema.get("properties")
        return {k: schema_instance(v, text) for k, v in (props.items() if isinstance(props, dict) else ())}
    if t == "integer":
        return 1
    if t == "number":
        return 0.5
    if t == "boolean":
        return True
    if t == "null":
        return None
    if t == "array":
        items = schema.get("items")
        return [schema_instance(items, text)] if isinstance(items, dict) else []
    return text


def _go_quote(s: str) -> str:
    """``s`` as Go's ``%q`` writes it (printable characters kept, quotes and controls escaped)."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def _check_format(fmt: Any) -> Any:
    """Ollama's ``format`` as its runner takes it: None (plain text), ``"json"`` or a schema dict.

    Raises:
        _BadRequest: 500 ``invalid format: ...`` for anything else (see the module docstring).
    """
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    raise _BadRequest(500, f'invalid format: {_go_quote(_dumps(fmt).decode())}; expected "json" or a valid JSON Schema object')


def _formatted(text: str, fmt: Any) -> str:
    """The reply text under format ``fmt`` (see the module docstring)."""
    if fmt is None:
        return text
    try:
        if isinstance(json.loads(text), dict):
            return text
    except ValueError:
        pass
    obj = {"caption": text} if fmt == "json" else schema_instance(fmt, text)
    return json.dumps(obj, ensure_ascii=False)


def default_caption(prompt: str, jpeg: bytes | None) -> str:
    """A caption that depends on the image content, so tests can tell frames apart.

    Returns e.g. ``"a 640x360 scene with mean brightness 87"`` (brightness = mean of the
    grey image, 0..255, rounded); without an image (text-only chat), :func:`default_text_reply`.
    """
    if jpeg is None:
        return default_text_reply(prompt)
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return "an image that cannot be decoded"
    h, w = img.shape[:2]
    return f"a {w}x{h} scene with mean brightness {int(round(float(img.mean())))}"


_CLOCK = re.compile(r"\b(?:\d{4}-\d{2}-\d{2} )?\d{2}:\d{2}:\d{2}\b")


def default_text_reply(prompt: str) -> str:
    """The reply to a text-only request (no image), deterministic from the prompt, in the form a
    summary asks for: ``SUMMARY: N times from FIRST to LAST.`` then ``MOMENTS:`` and one line
    ``- TIME - WORDS`` per distinct time (``HH:MM:SS``, optionally dated ``YYYY-MM-DD HH:MM:SS``)
    found in the prompt, in order of first appearance, ``WORDS`` being at most 40 characters of
    what follows that time on the first line that starts with it (after ``-``; ``[stream]``,
    ``-`` and ``:`` dropped), else ``seen``. A prompt without times answers ``"there is no
    image to describe"``."""
    seen: dict[str, str] = {}
    for line in prompt.splitlines():
        for m in _CLOCK.finditer(line):
            starts = not line[: m.start()].strip(" -")
            if m.group(0) not in seen or (starts and seen[m.group(0)] == "seen"):
                rest = re.sub(r"^[\s\-:]*(\[[^\]]*\])?[\s\-:]*", "", line[m.end():]) if starts else ""
                seen[m.group(0)] = rest[:40].strip() or "seen"
    if not seen:
        return "there is no image to describe"
    times = list(seen)
    return (f"SUMMARY: {len(times)} times from {times[0]} to {times[-1]}.\nMOMENTS:\n"
            + "\n".join(f"- {t} - {words}" for t, words in seen.items()))


def struct_pack_f32(values: list[float]) -> bytes:
    """``values`` as little-endian float32 bytes (OpenAI's ``encoding_format: "base64"``)."""
    return struct.pack(f"<{len(values)}f", *values)


def hash_embedding(text: str, model: str = "", dim: int = EMBED_DIM) -> list[float]:
    """The stand-in's embedding of ``text`` by ``model``: ``dim`` floats, L2-normalised (all zeros
    for a text with no words). Each lower-cased word (``[a-z0-9]+``, stop words such as "a", "the",
    "at" left out) adds +1 or -1 at 3 dimensions picked by SHA-256 of the model's normalised name
    and the word: texts sharing words have a higher cosine similarity, other models' vectors of
    the same text are unrelated."""
    v = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _STOP_WORDS:
            continue
        h = hashlib.sha256(f"{_normalize_model(model)}\0{word}".encode()).digest()
        for k in range(3):
            v[int.from_bytes(h[4 * k:4 * k + 4], "little") % dim] += 1.0 if h[12 + k] & 1 else -1.0
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v] if norm else v


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it.

    Attributes:
        method: ``"GET"``, ``"POST"``, ...
        path: the request path, e.g. ``"/api/generate"``.
        body: the parsed JSON body, or None (no body, or not JSON).
        image_shapes: ``(H, W, 3)`` of each image in the request (generate: ``images``;
            chat: every message's ``images``; /v1/chat/completions: every ``image_url`` data
            URL), ``None`` for one that did not decode.
        images: the raw decoded bytes of each image (JPEG/PNG as sent), same order: a
            request with several images (several frames) has them all, in the body's order.
        arrived: ``time.monotonic()`` when the request line was read, in s.
        client: the client's ``(host, port)``; the same port across requests means the
            connection was kept alive.
        headers: the request headers.
        raw: the request body exactly as received (b"" without one).
    """

    method: str
    path: str
    body: Any
    image_shapes: tuple[tuple[int, int, int] | None, ...]
    images: tuple[bytes, ...]
    arrived: float
    client: tuple[str, int]
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""

    def decoded(self) -> list[np.ndarray | None]:
        """Each image of the request decoded (H×W×3 uint8 BGR, ``cv2.imdecode``), None for one
        that does not decode; same order as :attr:`images`."""
        return [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
                for data in self.images]

    @property
    def width(self) -> int | None:
        """Width in px of the first image, or None."""
        s = self.image_shapes[0] if self.image_shapes else None
        return s[1] if s else None

    @property
    def height(self) -> int | None:
        """Height in px of the first image, or None."""
        s = self.image_shapes[0] if self.image_shapes else None
        return s[0] if s else None


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _OpenAIBindError(_BadRequest):
    """A 400 from Ollama's OpenAI middleware itself (before the handler): gin's
    ``AbortWithStatusJSON``, so ``application/json; charset=utf-8`` and no trailing newline."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class _OpenAIStrictError(_BadRequest):
    """A 400 as OpenAI's own API refuses a request (``openai_strict``): with ``param`` and ``code``."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(400, message)
        self.param = param
        self.code = code


class _Stopped(Exception):
    """The stand-in is stopping: drop the connection."""


@dataclass
class _Generation:
    failure: str | None
    pieces: list[str]
    done_reason: str
    prompt_tokens: int
    t_start: int
    t_loaded: int


def _go_time() -> str:
    """Now in UTC as Go's time.Time marshals to JSON (RFC 3339, fraction without trailing zeros)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    frac = f"{now.microsecond:06d}".rstrip("0")
    return now.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _normalize_model(name: str) -> str:
    name = name.strip().lower()
    if not name:
        return name
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def _go_base64_decode(s: str) -> bytes:
    """Decode like Go's base64.StdEncoding (as encoding/json does for []byte).

    Raises:
        _BadRequest: 400 ``illegal base64 data at input byte N``.
    """
    raw = s.encode("latin-1", errors="replace")
    # Go skips \\r and \\n; positions are reported in the original string.
    positions = [i for i, c in enumerate(raw) if c not in (0x0D, 0x0A)]
    data = bytes(raw[i] for i in positions)
    for k, c in enumerate(data):
        if c not in _B64_ALPHABET:
            if c == ord("="):
                pad = len(data) - k
                if pad <= 2 and k % 4 + pad == 4 and k % 4 >= 2 and all(x == ord("=") for x in data[k:]):
                    break
            raise _BadRequest(400, f"illegal base64 data at input byte {positions[k] if k < len(positions) else len(raw)}")
    if len(data) % 4:
        bad = len(data) - len(data) % 4
        raise _BadRequest(400, f"illegal base64 data at input byte {positions[bad] if bad < len(positions) else len(raw)}")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _BadRequest(400, "illegal base64 data at input byte 0") from None


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _expect(body: dict, key: str, pytype: type, struct_name: str, gotype: str) -> None:
    v = body.get(key)
    if v is not None and not isinstance(v, pytype):
        raise _BadRequest(
            400, f"json: cannot unmarshal {_json_type(v)} into Go struct field {struct_name}.{key} of type {gotype}"
        )


def _openai_error(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object as Ollama's ``openai.NewError`` builds it."""
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


def _owned_by(name: str) -> str:
    """The namespace part of a model name, as Ollama's ``model.ParseName`` finds it (default ``library``)."""
    if name.rfind(":") > name.rfind("/"):
        name = name[: name.rfind(":")]
    parts = name.split("/")
    if len(parts) == 1 or not parts[-2]:
        return "library"
    return parts[-2]


def _decode_data_url(url: Any) -> bytes:
    """An ``image_url`` as Ollama's ``decodeImageURL`` takes it.

    Raises:
        _OpenAIBindError: ``image URLs are not currently supported, ...`` for http(s) URLs,
            ``invalid image input`` for anything else that is not a base64 data URL.
    """
    if url.startswith(("http://", "https://")):
        raise _OpenAIBindError("image URLs are not currently supported, please use base64 encoded data instead")
    for prefix in _DATA_URL_PREFIXES:
        if url.startswith(prefix):
            try:
                return _go_base64_decode(url[len(prefix) :])
            except _BadRequest:
                raise _OpenAIBindError("invalid image input") from None
    raise _OpenAIBindError("invalid image input")


def _pieces(text: str) -> list[str]:
    """Split a reply into token-like pieces: words with their leading white space."""
    parts = re.findall(r"\s*\S+", text)
    tail = text[len("".join(parts)):]
    if tail:
        parts.append(tail)
    return parts or [""]


def _is_zero_keep_alive(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v == 0
    if isinstance(v, str):
        m = re.fullmatch(r"\s*0+(\.0*)?\s*(ns|us|µs|ms|s|m|h)?\s*", v)
        return m is not None
    return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, standin: "OllamaStandin", port: int = 0) -> None:
        self.standin = standin
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        # skip HTTPServer.server_bind's socket.getfqdn(): a reverse DNS lookup
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        t = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="ollama-standin-conn", daemon=True
        )
        self.standin._track_thread(t)
        t.start()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # ------------------------------------------------------------ plumbing

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.standin._track_conn(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.standin._untrack_conn(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        # like Go's net/http: a Date header, no Server header
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _send_full(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_full(status, _JSON_CT, _dumps(obj))

    def _send_error_json(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _reset(self) -> None:
        """Abort the connection with a TCP RST."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    # ------------------------------------------------------------ routing

    _ROUTES = {
        "/": ("GET", "HEAD"),
        "/api/version": ("GET", "HEAD"),
        "/api/tags": ("GET", "HEAD"),
        "/api/ps": ("GET",),
        "/api/show": ("POST",),
        "/api/generate": ("POST",),
        "/api/chat": ("POST",),
        _V1_CHAT: ("POST",),
        _V1_MODELS: ("GET",),
        "/api/embed": ("POST",),
        _V1_EMBEDDINGS: ("POST",),
    }

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        standin = self.server.standin
        arrived = time.monotonic()
        path = self.path.split("?", 1)[0]
        raw = self._read_body() if self.command in ("POST", "PUT", "DELETE") else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        shapes, images = self._decode_images_for_record(path, body)
        standin._record(
            RecordedRequest(
                method=self.command,
                path=path,
                body=body,
                image_shapes=shapes,
                images=images,
                arrived=arrived,
                client=self.client_address[:2],
                headers=dict(self.headers.items()),
                raw=raw,
            )
        )
        methods = self._ROUTES.get(path)
        model_param = path[len(_V1_MODELS) + 1 :] if path.startswith(_V1_MODELS + "/") else ""
        if model_param and "/" not in model_param:  # gin's /v1/models/:model
            methods = ("GET",)
        if methods is None:
            self._send_full(404, _TEXT_CT, b"404 page not found")
            return
        if self.command not in methods:
            self._send_full(405, _TEXT_CT, b"405 method not allowed")
            return
        try:
            if path == "/":
                self._send_full(200, _TEXT_CT, b"Ollama is running")
            elif path == "/api/version":
                self._send_json(200, {"version": standin.version})
            elif path == "/api/tags":
                self._send_json(200, {"models": [standin._model_entry(m) for m in standin.models]})
            elif path == "/api/ps":
                self._send_json(200, {"models": []})
            elif path == "/api/show":
                self._show(raw)
            elif path == _V1_CHAT:
                self._openai_chat(raw)
            elif path == "/api/embed":
                self._embed(raw)
            elif path == _V1_EMBEDDINGS:
                self._openai_embed(raw)
            elif path == _V1_MODELS:
                self._openai_models()
            elif model_param:
                self._openai_model(unquote(model_param))
            else:
                self._infer(path, raw)
        except _BadRequest as e:
            if path.startswith("/v1/"):
                self._send_openai_error(e)
            else:
                self._send_error_json(e.status, e.message)
        except _Stopped:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    @staticmethod
    def _decode_images_for_record(path: str, body: Any) -> tuple[tuple, tuple]:
        if not isinstance(body, dict):
            return (), ()
        b64s: list[Any] = []
        if path == "/api/generate" and isinstance(body.get("images"), list):
            b64s = body["images"]
        elif path == "/api/chat" and isinstance(body.get("messages"), list):
            for m in body["messages"]:
                if isinstance(m, dict) and isinstance(m.get("images"), list):
                    b64s.extend(m["images"])
        elif path == _V1_CHAT and isinstance(body.get("messages"), list):
            for m in body["messages"]:
                parts = m.get("content") if isinstance(m, dict) else None
                for part in parts if isinstance(parts, list) else ():
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        url = part.get("image_url")
                        url = url.get("url") if isinstance(url, dict) else url
                        b64s.append(("url", url))
        shapes, images = [], []
        for s in b64s:
            try:
                if isinstance(s, tuple):
                    data = _decode_data_url(s[1]) if isinstance(s[1], str) else b""
                else:
                    data = _go_base64_decode(s) if isinstance(s, str) else b""
            except _BadRequest:
                data = b""
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
            shapes.append(tuple(img.shape) if img is not None else None)
            images.append(data)
        return tuple(shapes), tuple(images)

    # ------------------------------------------------------------ endpoints

    def _parse(self, raw: bytes, struct_name: str) -> dict:
        if not raw.strip():
            raise _BadRequest(400, "missing request body")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.pos >= len(raw.strip()):
                raise _BadRequest(400, "unexpected EOF") from None
            ch = raw.decode("utf-8", "replace")[e.pos]
            raise _BadRequest(400, f"invalid character '{ch}' looking for beginning of value") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, f"json: cannot unmarshal {_json_type(body)} into Go value of type api.{struct_name}")
        _expect(body, "model", str, struct_name, "string")
        _expect(body, "stream", bool, struct_name, "bool")
        _expect(body, "options", dict, struct_name, "map[string]interface {}")
        return body

    def _show(self, raw: bytes) -> None:
        standin = self.server.standin
        body = self._parse(raw, "ShowRequest")
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str) or not name.strip():
            raise _BadRequest(400, "model is required")
        found = standin._find_model(name)
        if found is None:
            raise _BadRequest(404, f"model '{name}' not found")
        entry = standin._model_entry(found)
        self._send_json(
            200,
            {
                "license": "",
                "modelfile": f"FROM {found}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": entry["details"],
                "model_info": {"general.architecture": "llama"},
                "capabilities": ["completion", "vision"],
                "modified_at": entry["modified_at"],
            },
        )

    def _decode_images(self, b64s: Any, struct_name: str) -> list[bytes]:
        if b64s is None:
            return []
        if not isinstance(b64s, list):
            raise _BadRequest(
                400, f"json: cannot unmarshal {_json_type(b64s)} into Go struct field {struct_name}.images of type []api.ImageData"
            )
        out = []
        for s in b64s:
            if not isinstance(s, str):
                raise _BadRequest(
                    400, f"json: cannot unmarshal {_json_type(s)} into Go struct field {struct_name}.images of type api.ImageData"
                )
            out.append(_go_base64_decode(s))
        return out

    def _infer(self, path: str, raw: bytes) -> None:
        standin = self.server.standin
        chat = path == "/api/chat"
        struct_name = "ChatRequest" if chat else "GenerateRequest"
        body = self._parse(raw, struct_name)
        # Go decodes every field (base64 included) before looking at the model
        if chat:
            messages = body.get("messages")
            if messages is not None and not isinstance(messages, list):
                raise _BadRequest(
                    400, f"json: cannot unmarshal {_json_type(messages)} into Go struct field ChatRequest.messages of type []api.Message"
                )
            messages = messages or []
            images: list[bytes] = []
            prompt = ""
            for m in messages:
                if not isinstance(m, dict):
                    raise _BadRequest(
                        400, f"json: cannot unmarshal {_json_type(m)} into Go struct field ChatRequest.messages of type api.Message"
                    )
                _expect(m, "content", str, "ChatRequest.messages", "string")
                _expect(m, "role", str, "ChatRequest.messages", "string")
                images.extend(self._decode_images(m.get("images"), "ChatRequest.messages"))
                if m.get("role", "user") == "user":
                    prompt = m.get("content") or ""
        else:
            _expect(body, "prompt", str, struct_name, "string")
            prompt = body.get("prompt") or ""
            images = self._decode_images(body.get("images"), struct_name)

        model = body.get("model") or ""
        if chat and not model.strip():
            raise _BadRequest(400, "model is required")
        if standin._find_model(model) is None:
            raise _BadRequest(404, f"model '{model}' not found")

        stream = body.get("stream", True) is not False
        keep_alive = body.get("keep_alive")
        empty = (not messages) if chat else (prompt == "")
        if empty:  # load / unload requests
            reason = "unload" if _is_zero_keep_alive(keep_alive) else "load"
            resp: dict[str, Any] = {"model": model, "created_at": _go_time()}
            if chat:
                resp["message"] = {"role": "assistant", "content": ""}
            else:
                resp["response"] = ""
            resp.update(done=True, done_reason=reason)
            self._send_json(200, resp)
            return

        gen = self._generate(model, prompt, images, (body.get("options") or {}).get("num_predict"), body.get("format"))
        failure, pieces, done_reason, prompt_tokens = gen.failure, gen.pieces, gen.done_reason, gen.prompt_tokens
        t_start, t_loaded = gen.t_start, gen.t_loaded

        def line(piece: str) -> dict[str, Any]:
            d: dict[str, Any] = {"model": model, "created_at": _go_time()}
            if chat:
                d["message"] = {"role": "assistant", "content": piece}
            else:
                d["response"] = piece
            d["done"] = False
            return d

        def final(piece: str, t_eval_start: int) -> dict[str, Any]:
            now = time.monotonic_ns()
            d = line(piece)
            d.update(done=True, done_reason=done_reason)
            if not chat:
                d["context"] = list(range(1, prompt_tokens + len(pieces) + 1))[-64:]
            prompt_eval_ns = max(1, t_eval_start - t_loaded)
            d.update(
                total_duration=max(1, now - t_start),
                load_duration=max(1, t_loaded - t_start),
                prompt_eval_count=prompt_tokens,
                prompt_eval_duration=prompt_eval_ns,
                eval_count=len(pieces),
                eval_duration=max(1, now - t_eval_start),
            )
            return d

        if not stream:
            t_eval = time.monotonic_ns()
            standin._sleep(standin.token_delay_s * len(pieces))
            if failure == "midstream_error":
                raise _BadRequest(500, standin.failure_message)
            if failure == "malformed":
                self._send_full(200, _JSON_CT, b"<html>this is not json</html>\n")
                return
            whole = final("".join(pieces), t_eval)
            payload = _dumps(whole)
            if failure == "reset":
                self.send_response(200)
                self.send_header("Content-Type", _JSON_CT)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self._reset()
                return
            if failure == "drip":
                self.send_response(200)
                self.send_header("Content-Type", _JSON_CT)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                for i in range(len(payload)):
                    self.wfile.write(payload[i : i + 1])
                    standin._sleep(standin.drip_delay_s)
                return
            self._send_full(200, _JSON_CT, payload)
            return

        # streaming: NDJSON over chunked transfer encoding
        self.send_response(200)
        self.send_header("Content-Type", _NDJSON_CT)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        t_eval = time.monotonic_ns()

        def gen_lines() -> Iterator[bytes]:
            for i, p in enumerate(pieces):
                if i > 0:
                    standin._sleep(standin.token_delay_s)
                yield _dumps(line(p)) + b"\n"
                if failure == "malformed" and i == 0:
                    yield b"<html>this is not json</html>\n"
                if failure == "midstream_error" and i == min(1, len(pieces) - 1):
                    yield _dumps({"error": standin.failure_message}) + b"\n"
                    return
            standin._sleep(standin.token_delay_s)
            yield _dumps(final("", t_eval)) + b"\n"

        self._send_units(gen_lines(), failure)

    # ------------------------------------------------------------ embeddings

    @staticmethod
    def _embed_inputs(value: Any) -> list[str]:
        """``EmbedRequest.input`` as Ollama's EmbedHandler reads it."""
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if value is None:
            return []
        raise _BadRequest(400, "invalid input type")

    def _embed_vectors(self, model: Any, inputs: list[str], dimensions: Any) -> tuple[list[list[float]], int]:
        """The vectors and the token count, after Ollama's model checks, ``latency_s`` and ``failure``."""
        standin = self.server.standin
        if not isinstance(model, str) or not model.strip():
            raise _BadRequest(404, f"model '{model or ''}' not found")
        name = standin._find_model(model)
        if name is None:
            raise _BadRequest(404, f"model {_go_quote(model)} not found, try pulling it first")
        standin._sleep(standin.latency_s)
        if standin.failure == "hang":
            standin._sleep(1e9)
        if standin.failure == "http500":
            raise _BadRequest(500, standin.failure_message)
        dim = int(standin.embed_dim)
        vectors = [hash_embedding(t, name, dim) for t in inputs]
        if isinstance(dimensions, int) and 0 < dimensions < dim:
            cut = [v[:dimensions] for v in vectors]
            vectors = [[x / n for x in v] if (n := sum(x * x for x in v) ** 0.5) else v for v in cut]
        tokens = sum(len(t.split()) + 1 for t in inputs)
        return vectors, tokens

    def _embed(self, raw: bytes) -> None:
        t0 = time.monotonic_ns()
        body = self._parse(raw, "EmbedRequest")
        _expect(body, "truncate", bool, "EmbedRequest", "*bool")
        _expect(body, "dimensions", int, "EmbedRequest", "int")
        inputs = self._embed_inputs(body.get("input"))
        vectors, tokens = self._embed_vectors(body.get("model"), inputs, body.get("dimensions"))
        if not inputs:
            self._send_json(200, {"model": body.get("model"), "embeddings": []})
            return
        total = time.monotonic_ns() - t0
        self._send_json(200, {"model": body.get("model"), "embeddings": vectors, "total_duration": total,
                              "load_duration": total // 10, "prompt_eval_count": tokens})

    def _openai_embed(self, raw: bytes) -> None:
        struct_name = "EmbedRequest"
        if not raw.strip():
            raise _OpenAIBindError("EOF")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.pos >= len(raw.strip()):
                raise _OpenAIBindError("unexpected EOF") from None
            ch = raw.decode("utf-8", "replace")[e.pos]
            raise _OpenAIBindError(f"invalid character '{ch}' looking for beginning of value") from None
        if not isinstance(body, dict):
            raise _OpenAIBindError(f"json: cannot unmarshal {_json_type(body)} into Go value of type "
                                   f"openai.{struct_name}")
        for key, ok, gotype in (("model", lambda v: isinstance(v, str), "string"),
                                ("encoding_format", lambda v: isinstance(v, str), "string"),
                                ("dimensions", lambda v: isinstance(v, int) and not isinstance(v, bool), "int")):
            v = body.get(key)
            if v is not None and not ok(v):
                raise _OpenAIBindError(f"json: cannot unmarshal {_json_type(v)} into Go struct field "
                                       f"{struct_name}.{key} of type {gotype}")
        fmt = (body.get("encoding_format") or "").lower()
        if fmt and fmt not in ("float", "base64"):
            raise _OpenAIBindError(f"Invalid value for 'encoding_format' = {body['encoding_format']}. "
                                   f"Supported values: ['float', 'base64'].")
        value = body.get("input")
        if value == "":
            value = [""]
        if value is None or (isinstance(value, list) and not value):
            raise _OpenAIBindError("invalid input")
        inputs = self._embed_inputs(value)
        vectors, tokens = self._embed_vectors(body.get("model"), inputs, body.get("dimensions"))
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct_pack_f32(v)).decode() if fmt == "base64" else v}
                for i, v in enumerate(vectors)]
        reply = {"object": "list", "data": data, "model": body.get("model"),
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        self._send_full(200, _OPENAI_JSON_CT, _dumps(reply) + b"\n")

    # ------------------------------------------------------------ OpenAI compatibility (/v1)

    def _send_openai_error(self, e: _BadRequest) -> None:
        if isinstance(e, _OpenAIStrictError):
            err = {"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": e.code}}
            self._send_full(e.status, _OPENAI_JSON_CT, _dumps(err) + b"\n")
            return
        if isinstance(e, _OpenAIBindError):  # gin's AbortWithStatusJSON in the middleware
            self._send_full(e.status, _JSON_CT, _dumps(_openai_error(e.status, e.message)))
        else:  # the handler's error, rewritten by the middleware's writer (json.Encoder: trailing newline)
            self._send_full(e.status, _OPENAI_JSON_CT, _dumps(_openai_error(e.status, e.message)) + b"\n")

    def _openai_parse(self, raw: bytes) -> dict:
        """``c.ShouldBindJSON(&openai.ChatCompletionRequest{})`` (Go's wording, approximately)."""
        struct = "ChatCompletionRequest"
        if not raw.strip():
            raise _OpenAIBindError("EOF")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            if e.pos >= len(raw.strip()):
                raise _OpenAIBindError("unexpected EOF") from None
            ch = raw.decode("utf-8", "replace")[e.pos]
            raise _OpenAIBindError(f"invalid character '{ch}' looking for beginning of value") from None
        if not isinstance(body, dict):
            raise _OpenAIBindError(f"json: cannot unmarshal {_json_type(body)} into Go value of type openai.{struct}")

        def expect(obj: dict, key: str, ok: Callable[[Any], bool], field_path: str, gotype: str) -> None:
            v = obj.get(key)
            if v is not None and not ok(v):
                what = _json_type(v) if _json_type(v) != "number" else f"number {v}"
                raise _OpenAIBindError(
                    f"json: cannot unmarshal {what} into Go struct field {struct}.{field_path} of type {gotype}"
                )

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        expect(body, "model", lambda v: isinstance(v, str), "model", "string")
        expect(body, "stream", lambda v: isinstance(v, bool), "stream", "bool")
        expect(body, "max_tokens", is_int, "max_tokens", "int")
        expect(body, "temperature", is_num, "temperature", "float64")
        expect(body, "stream_options", lambda v: isinstance(v, dict), "stream_options", "openai.StreamOptions")
        expect(body, "response_format", lambda v: isinstance(v, dict), "response_format", "openai.ResponseFormat")
        if isinstance(body.get("response_format"), dict):
            rf = body["response_format"]
            expect(rf, "type", lambda v: isinstance(v, str), "response_format.type", "string")
            expect(rf, "json_schema", lambda v: isinstance(v, dict), "response_format.json_schema", "openai.JsonSchema")
        expect(body, "messages", lambda v: isinstance(v, list), "messages", "[]openai.Message")
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                raise _OpenAIBindError(
                    f"json: cannot unmarshal {_json_type(m)} into Go struct field {struct}.messages of type openai.Message"
                )
            expect(m, "role", lambda v: isinstance(v, str), "messages.role", "string")
        return body

    @staticmethod
    def _openai_messages(messages: list[dict]) -> list[tuple[str, str, list[bytes]]]:
        """``openai.FromChatRequest``: one ``(role, content, images)`` per string content, and one
        per content part (a text part or an image part)."""
        out: list[tuple[str, str, list[bytes]]] = []
        for m in messages:
            role, content = m.get("role") or "", m.get("content")
            if isinstance(content, str):
                out.append((role, content, []))
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        raise _OpenAIBindError("invalid message format")
                    if part.get("type") == "text":
                        if not isinstance(part.get("text"), str):
                            raise _OpenAIBindError("invalid message format")
                        out.append((role, part["text"], []))
                    elif part.get("type") == "image_url":
                        url = part.get("image_url")
                        if isinstance(url, dict):
                            url = url.get("url")
                        if not isinstance(url, str):
                            raise _OpenAIBindError("invalid message format")
                        out.append((role, "", [_decode_data_url(url)]))
                    else:
                        raise _OpenAIBindError("invalid message format")
            elif not m.get("tool_calls"):
                gotype = {"null": "<nil>", "number": "float64", "bool": "bool", "object": "map[string]interface {}"}
                raise _OpenAIBindError(f"invalid message content type: {gotype.get(_json_type(content), 'string')}")
        return out

    def _openai_models(self) -> None:
        standin = self.server.standin
        ids = [_normalize_model(m) for m in standin.models]
        data = [{"id": i, "object": "model", "created": standin._created_unix, "owned_by": _owned_by(i)} for i in ids]
        # Go marshals an empty (nil) slice as null
        self._send_full(200, _OPENAI_JSON_CT, _dumps({"object": "list", "data": data or None}) + b"\n")

    def _openai_model(self, name: str) -> None:
        standin = self.server.standin
        if standin._find_model(name) is None:
            shortest = name if name.rfind(":") > name.rfind("/") else name + ":latest"
            raise _BadRequest(404, f"model '{shortest}' not found")
        obj = {"id": name, "object": "model", "created": standin._created_unix, "owned_by": _owned_by(name)}
        self._send_full(200, _OPENAI_JSON_CT, _dumps(obj) + b"\n")

    def _openai_chat(self, raw: bytes) -> None:
        standin = self.server.standin
        body = self._openai_parse(raw)
        messages = body.get("messages") or []
        if not messages:
            raise _OpenAIBindError("[] is too short - 'messages'")
        converted = self._openai_messages(messages)
        images = [img for _, _, imgs in converted for img in imgs]
        prompt = ""
        for role, content, _ in converted:
            if role == "user" and content:
                prompt = content

        model = body.get("model") or ""
        if not model.strip():
            raise _BadRequest(400, "model is required")
        if standin._find_model(model) is None:
            raise _BadRequest(404, f"model '{model}' not found")
        stream = body.get("stream") is True  # OpenAI's default: false
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        # max_completion_tokens is not a field of Ollama's ChatCompletionRequest: ignored, as Ollama does
        gen = self._generate(model, prompt, images, body.get("max_tokens"), self._openai_format(body))
        failure, pieces = gen.failure, gen.pieces
        cid = f"chatcmpl-{random.randrange(999)}"
        created = int(time.time())
        usage = {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": gen.prompt_tokens + len(pieces),
        }

        if not stream:
            standin._sleep(standin.token_delay_s * len(pieces))
            if failure == "midstream_error":
                raise _BadRequest(500, standin.failure_message)
            if failure == "malformed":
                self._send_full(200, _OPENAI_JSON_CT, b"<html>this is not json</html>\n")
                return
            whole = {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": gen.done_reason,
                    }
                ],
                "usage": usage,
            }
            payload = _dumps(whole) + b"\n"
            if failure in ("reset", "drip"):
                self.send_response(200)
                self.send_header("Content-Type", _OPENAI_JSON_CT)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if failure == "reset":
                    self.wfile.write(payload[: len(payload) // 2])
                    self._reset()
                    return
                for i in range(len(payload)):
                    self.wfile.write(payload[i : i + 1])
                    standin._sleep(standin.drip_delay_s)
                return
            self._send_full(200, _OPENAI_JSON_CT, payload)
            return

        # streaming: server-sent events over chunked transfer encoding
        self.send_response(200)
        self.send_header("Content-Type", _SSE_CT)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(delta: dict, finish: str | None = None, chunk_model: str = model) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,  # one value for the whole stream, as Ollama pins it
                "model": chunk_model,
                "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        def event(obj: Any) -> bytes:
            return b"data: " + _dumps(obj) + b"\n\n"

        def gen_events() -> Iterator[bytes]:
            for i, p in enumerate(pieces):
                if i > 0:
                    standin._sleep(standin.token_delay_s)
                yield event(chunk({"role": "assistant", "content": p} if i == 0 else {"content": p}))
                if failure == "malformed" and i == 0:
                    yield b"data: <html>this is not json</html>\n\n"
                if failure == "midstream_error" and i == min(1, len(pieces) - 1):
                    if standin.sse_error_events:
                        yield event(_openai_error(500, standin.failure_message))
                    else:
                        # Ollama's ChatWriter parses the {"error": ...} line as an api.ChatResponse: an
                        # empty chunk (model "", not done), then the body ends: no finish chunk, no [DONE]
                        yield event(chunk({"content": ""}, chunk_model=""))
                    return
            standin._sleep(standin.token_delay_s)
            finish = chunk({}, gen.done_reason)
            yield event(finish)
            if include_usage:
                yield event({**finish, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        self._send_units(gen_events(), failure)

    def _openai_format(self, body: dict) -> Any:
        """``response_format`` as Ollama's compat layer turns it into ``format`` (or, with
        ``openai_strict``, refuses it as OpenAI does); see the module docstring."""
        rf = body.get("response_format")
        if rf is None:
            return None
        rtype = rf.get("type")
        js = rf.get("json_schema")
        if self.server.standin.openai_strict:
            if rtype not in ("text", "json_object", "json_schema"):
                raise _OpenAIStrictError(
                    f"Invalid value: '{rtype}'. Supported values are: 'json_object', 'json_schema', and 'text'.",
                    "response_format.type", "invalid_value")
            if rtype == "json_schema":
                if not isinstance(js, dict):
                    raise _OpenAIStrictError("Missing required parameter: 'response_format.json_schema'.",
                                             "response_format.json_schema", "missing_required_parameter")
                if "name" not in js:
                    raise _OpenAIStrictError("Missing required parameter: 'response_format.json_schema.name'.",
                                             "response_format.json_schema.name", "missing_required_parameter")
                return js.get("schema", "json")
        kind = (rtype or "").strip().lower()
        if kind == "json_object":
            return "json"
        if kind == "json_schema" and isinstance(js, dict):
            return js.get("schema")
        return None

    def _generate(self, model: str, prompt: str, images: list[bytes], num_predict: Any,
                  fmt: Any = None) -> "_Generation":
        """What /api/generate, /api/chat and /v1/chat/completions share once the request is valid:
        the image check, ``latency_s``, the ``http500``/``hang`` failures, the reply and its pieces."""
        standin = self.server.standin
        for data in images:
            if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
                raise _BadRequest(400, "Failed to load image or audio file")
        if not images and standin.text_only_error:  # a model that cannot chat (vision-host serve's BLIP)
            raise _BadRequest(400, standin.text_only_error)

        t_start = time.monotonic_ns()
        failure = standin.failure
        standin._sleep(standin.latency_s)
        t_loaded = time.monotonic_ns()

        if failure == "http500":
            raise _BadRequest(500, standin.failure_message)
        if failure == "hang":
            self.close_connection = True
            standin._stopped.wait()
            raise _Stopped

        fmt = _check_format(fmt)
        reply = standin.reply
        jpeg = images[0] if images else None
        text = _formatted(reply(prompt, jpeg) if callable(reply) else str(reply), fmt)
        pieces = _pieces(text)
        done_reason = "stop"
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and 0 < num_predict < len(pieces):
            pieces, done_reason = pieces[:num_predict], "length"
        prompt_tokens = len(prompt.split()) + 1 + _IMAGE_TOKENS * len(images)
        return _Generation(failure, pieces, done_reason, prompt_tokens, t_start, t_loaded)

    def _send_units(self, units: Iterator[bytes], failure: str | None) -> None:
        """Send a streamed body (NDJSON lines or SSE events, one per unit) over chunked transfer
        encoding, with the ``reset``/``drip`` failures and the ``split_chunks`` stress.
        The status line and headers must already be out."""
        standin = self.server.standin
        if failure == "reset":
            for unit in units:
                self._chunk(unit)
                break
            self._reset()
            return
        if failure == "drip":
            for unit in units:
                for i in range(len(unit)):
                    self._chunk(unit[i : i + 1])
                    standin._sleep(standin.drip_delay_s)
            self._end_chunks()
            return
        pending = b""
        for n, unit in enumerate(units):
            if pending:  # unit 3, 7, ... went out together with this one
                self._chunk(pending + unit)
                pending = b""
            elif standin.split_chunks and n % 4 == 3:
                pending = unit
            elif standin.split_chunks and n % 3 == 1 and len(unit) > 2:
                cut = len(unit) // 2 + 1
                self._chunk(unit[:cut])
                standin._sleep(0.001)  # lets the halves arrive in separate reads
                self._chunk(unit[cut:])
            else:
                self._chunk(unit)
        self._chunk(pending)
        self._end_chunks()

class OllamaStandin:
    """A fake Ollama server on ``127.0.0.1`` (ephemeral port) serving from background threads.

    It starts serving in the constructor; call :meth:`stop` (or use ``with``) to end it.
    Every attribute below may be changed while it runs; a request uses the values current
    when it reaches them.

    Args / attributes:
        models: names that "exist" (``"llava"`` means ``"llava:latest"``); default ``["llava:latest"]``.
        latency_s: delay before the first token (and before the headers, as with Ollama), in s.
        token_delay_s: delay between NDJSON lines, in s.
        reply: the reply text, or ``callable(prompt, image_bytes_or_None) -> str``;
            default :func:`default_caption` (depends on the first image's content).
        failure: one of :data:`FAILURE_MODES` (see the module docstring).
        failure_message: the error text for ``"http500"`` / ``"midstream_error"``.
        drip_delay_s: delay between bytes in ``"drip"`` mode, in s.
        split_chunks: cut and merge NDJSON lines / SSE events across HTTP chunks (see module docstring).
        sse_error_events: ``"midstream_error"`` on a streamed ``/v1/chat/completions`` sends an SSE
            ``data: {"error": {...}}`` event (what OpenAI's own API does) instead of what Ollama
            does (see module docstring). Default False: Ollama's behaviour.
        openai_strict: ``response_format`` on ``/v1/chat/completions`` is checked as OpenAI's own API
            checks it (400 for an unknown ``type``, a ``json_schema`` without ``name``) instead of
            as Ollama's compat layer reads it (see the module docstring). Default False.
        version: what ``GET /api/version`` reports.
        text_only_error: attribute only (default None): a request with no image (text-only
            chat) is refused with 400 and this sentence (/v1: in the OpenAI error shape), as
            ``vision-host serve`` refuses it for a model that cannot chat.
        port: the port to bind (constructor only); 0, the default, picks a free one.

    Attributes (read-only):
        url: ``http://127.0.0.1:PORT`` (no trailing slash; what ``ollama.Client(host=...)`` takes).
        port: the bound port.
        requests: a copy of the :class:`RecordedRequest` list, oldest first (thread-safe).

    Raises:
        ValueError: an unknown failure mode.
    """

    def __init__(
        self,
        models: Iterable[str] = ("llava:latest",),
        *,
        latency_s: float = 0.0,
        token_delay_s: float = 0.0,
        reply: str | ReplyFn = default_caption,
        failure: str | None = None,
        failure_message: str = "llama runner process has terminated: exit status 2",
        drip_delay_s: float = 0.0005,
        split_chunks: bool = True,
        sse_error_events: bool = False,
        openai_strict: bool = False,
        version: str = "0.12.6",
        port: int = 0,
    ) -> None:
        self.models = list(models)
        self.latency_s = latency_s
        self.token_delay_s = token_delay_s
        self.reply = reply
        self.failure = failure
        self.failure_message = failure_message
        self.drip_delay_s = drip_delay_s
        self.split_chunks = split_chunks
        self.sse_error_events = sse_error_events
        self.openai_strict = openai_strict
        self.text_only_error: str | None = None
        self.version = version
        self.embed_dim = EMBED_DIM  # /api/embed and /v1/embeddings vectors: this many floats (settable)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._request_added = threading.Condition(self._lock)
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._created = _go_time()
        self._created_unix = int(time.time())
        self._server = _Server(self, port)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="ollama-standin", daemon=True
        )
        self._serve_thread.start()

    # ------------------------------------------------------------ configuration

    @property
    def failure(self) -> str | None:
        """The current failure mode (one of :data:`FAILURE_MODES`)."""
        return self._failure

    @failure.setter
    def failure(self, mode: str | None) -> None:
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; use one of {FAILURE_MODES}")
        self._failure = mode

    def _find_model(self, name: Any) -> str | None:
        if not isinstance(name, str):
            return None
        want = _normalize_model(name)
        for m in self.models:
            if _normalize_model(m) == want:
                return m
        return None

    def _model_entry(self, name: str) -> dict[str, Any]:
        full = _normalize_model(name)
        digest = hashlib.sha256(full.encode()).hexdigest()
        return {
            "name": full,
            "model": full,
            "modified_at": self._created,
            "size": 4_700_000_000,
            "digest": digest,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama", "clip"],
                "parameter_size": "7B",
                "quantization_level": "Q4_0",
            },
        }

    # ------------------------------------------------------------ recording

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests were recorded; returns them.

        Raises:
            TimeoutError: fewer than ``n`` after ``timeout_s`` s.
        """
        with self._request_added:
            if not self._request_added.wait_for(lambda: len(self._requests) >= n, timeout_s):
                raise TimeoutError(f"{len(self._requests)} requests after {timeout_s} s, wanted {n}")
            return list(self._requests)

    def _record(self, r: RecordedRequest) -> None:
        with self._request_added:
            self._requests.append(r)
            self._request_added.notify_all()

    # ------------------------------------------------------------ threads & sockets

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stopped.wait(seconds):
            raise _Stopped

    def _track_thread(self, t: threading.Thread) -> None:
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _track_conn(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        if self._stopped.is_set():
            self._shutdown_sock(conn)

    def _untrack_conn(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    @staticmethod
    def _shutdown_sock(conn: socket.socket) -> None:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop serving: wake hung requests, close every connection, join the threads.

        Returns within about ``timeout_s`` s even with hung or stalled clients (the
        connection threads are daemons). Idempotent.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            self._shutdown_sock(c)
        self._server.server_close()
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._serve_thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "OllamaStandin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OllamaStandin({self.url}, models={self.models}, failure={self.failure!r})"


@pytest.fixture
def ollama_standin() -> Iterator[OllamaStandin]:
    """A running :class:`OllamaStandin` with model ``llava:latest``; stopped after the test.

    Import it into a test module (``from ollama_standin import ollama_standin``) or a conftest.
    """
    standin = OllamaStandin()
    try:
        yield standin
    finally:
        standin.stop()
