"""OpenAI's chat completions API (as Ollama's OpenAI compatibility serves it, which the official
``openai`` clients use): ``POST /v1/chat/completions`` (content parts with ``image_url`` data
URLs; ``max_tokens`` or ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``;
``response_format``: ``text``, ``json_object`` or ``json_schema``, see :mod:`.structured`;
``stream`` → SSE ``chat.completion.chunk`` events then ``data: [DONE]``, with a usage chunk for
``stream_options.include_usage``), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/models/{id}``.

The images are the ``image_url`` parts of the last message that has any. Several (at most
``--max-images``, 8; more: 400) are consecutive moments of one video, oldest first: LLaVA gets
them all, one ``<image>`` each, BLIP and BLIP-2 one grid of them; LLaVA's and BLIP-2's prompts
start with a sentence saying so (see :mod:`..models.base`). One image is answered as ever.
Without any image part the chat is text-only: LLaVA's and BLIP-2's language model answers
the system (or ``developer``), user and assistant messages, oldest first, through the
family's chat format; BLIP, a captioner, answers 400 saying which families can.

``POST /v1/embeddings`` (OpenAI's "Create embeddings", as Ollama's OpenAI compatibility serves
it: ``model``, ``input`` a string or an array of strings, ``encoding_format`` ``"float"``
(default) or ``"base64"`` (little-endian float32, what the ``openai`` client asks for and
decodes when no format is given), ``dimensions``; ``user`` is ignored) → ``{"object": "list",
"data": [{"object": "embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens",
"total_tokens"}}``: one L2-normalised vector per input, in order (see
:meth:`..models.base.VisionLanguageModel.embed`). Ollama's rules: ``""`` is embedded as one
empty text; no ``input``, ``[]`` or token arrays → 400 ``invalid input``; inputs longer than
the model's positions are cut; more than ``--max-embed-inputs`` (256) inputs → 400.

Errors are OpenAI's ``{"error": {"message", "type", ...}}`` (:func:`.errors.openai_error`);
one that comes after a stream's 200 is its last event before ``[DONE]``.
"""

import base64
import binascii
import json
import logging
import struct
import time
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import RequestError
from ..models import normalize_model_name
from ..parsing import json_object, typed_field
from ..scheduler import GenerationResult
from ..served_model import ServedModel
from ..structured import openai_response_format

log = logging.getLogger(__name__)

#: Our ``done_reason`` → OpenAI's ``finish_reason``.
_FINISH = {"stop": "stop", "length": "length"}


def _decode_data_url(url: Any) -> bytes:
    """An ``image_url`` part's image: a ``data:…;base64,`` URL (Ollama takes no other)."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise RequestError(400, "invalid message format")
    if url.startswith(("http://", "https://")):
        raise RequestError(400, "image URLs are not currently supported, please use base64 encoded data instead")
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise RequestError(400, "invalid image input")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid image input") from None


def _prompt_and_images(messages: list, check_count: Any = None) -> tuple[str, list[bytes]]:
    """The last non-blank user text of a chat's ``messages``, and the images (oldest first) of
    the last message that has any; ``check_count(n)`` vets a message's number of image parts
    before they are decoded."""
    prompt, images = "", []
    for m in messages:
        if not isinstance(m, dict):
            raise RequestError(400, "invalid message format")
        content = m.get("content")
        texts = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            if check_count is not None:
                check_count(sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url"))
            own = []
            for part in content:
                if not isinstance(part, dict):
                    raise RequestError(400, "invalid message format")
                if part.get("type") == "text":
                    texts.append(str(part.get("text") or ""))
                elif part.get("type") == "image_url":
                    own.append(_decode_data_url(part.get("image_url")))
                else:
                    raise RequestError(400, "invalid message format")
            if own:
                images = own
        elif content is None and m.get("role") != "assistant":
            raise RequestError(400, "invalid message content type: <nil>")
        if m.get("role", "user") == "user":
            for t in texts:
                if t.strip():
                    prompt = t
    return prompt, images


def _text_turns(messages: list) -> list[tuple[str, str]]:
    """A text-only chat's ``(role, text)`` turns, oldest first: the system (and ``developer``),
    user and assistant messages that have text (a message's text parts joined by a space)."""
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = {"developer": "system"}.get(m.get("role"), m.get("role") or "user")
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text") or "") for p in content
                               if isinstance(p, dict) and p.get("type") == "text")
        if role in ("system", "user", "assistant") and isinstance(content, str) and content.strip():
            turns.append((role, content))
    return turns


def _embedding_texts(value: Any) -> list[str]:
    """``/v1/embeddings``' ``input`` as a list of texts (Ollama's rules: ``""`` is one empty
    text). Raises :class:`RequestError` 400 ``invalid input`` for none, ``[]``, token arrays
    or other types."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise RequestError(400, "invalid input: give a string or a non-empty array of strings (token arrays are "
                            "not supported)")


def _float32_base64(vector: list[float]) -> str:
    """``vector`` as little-endian float32 bytes in base64 (OpenAI's ``encoding_format: base64``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _usage(res: GenerationResult) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.eval_count,
            "total_tokens": res.prompt_tokens + res.eval_count}


def _event(obj: dict, ensure_ascii: bool = True) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii)}\n\n".encode()


def routes(served: ServedModel) -> APIRouter:
    """OpenAI's routes for ``served``."""
    router = APIRouter()
    model, scheduler = served.model, served.scheduler

    def model_object(name: str) -> dict:
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(model.loaded_at.timestamp()), "owned_by": owner}

    @router.get("/v1/models")
    def v1_models():
        return {"object": "list", "data": [model_object(served.name)]}

    @router.get("/v1/models/{model_id:path}")
    def v1_model(model_id: str):
        if not served.answers_to(model_id):
            raise RequestError(404, f"model '{normalize_model_name(model_id)}' not found")
        return model_object(model_id)

    @router.post("/v1/chat/completions")
    async def v1_chat(request: Request):
        raw = await request.body()
        if not raw.strip():
            raise RequestError(400, "EOF")
        body = json_object(raw)
        name = typed_field(body, "model", (str,), "string", "")
        messages = typed_field(body, "messages", (list,), "[]openai.Message", [])
        if not messages:
            raise RequestError(400, "[] is too short - 'messages'")
        streamed = typed_field(body, "stream", (bool,), "bool", False)
        include_usage = bool((typed_field(body, "stream_options", (dict,), "openai.StreamOptions", {}) or {})
                             .get("include_usage"))
        max_tokens = typed_field(body, "max_tokens", (int,), "int", None)
        if max_tokens is None:
            max_tokens = typed_field(body, "max_completion_tokens", (int,), "int", None)
        temperature = typed_field(body, "temperature", (int, float), "float64", None)
        seed = typed_field(body, "seed", (int,), "int", None)
        top_p = typed_field(body, "top_p", (int, float), "float64", None)
        settings = served.settings_of({"num_predict": max_tokens, "temperature": temperature, "seed": seed,
                                       "top_p": top_p})
        constraint = openai_response_format(body.get("response_format"))
        prompt, images = _prompt_and_images(messages, served.check_image_count)
        if not name:
            raise RequestError(400, "model is required")
        served.check_model(name)
        job = await served.queue_generation(images, prompt, settings, streamed=streamed,
                                            constraint=constraint, turns=None if images else _text_turns(messages))
        head = {"id": f"chatcmpl-{int(time.time() * 1000) % 1000}", "object": "chat.completion",
                "created": int(time.time()), "model": name, "system_fingerprint": "fp_ollama"}

        if not streamed:
            res = await scheduler.wait_done(job)
            return JSONResponse({**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                                      "finish_reason": _FINISH.get(res.done_reason, "stop")}],
                                 "usage": _usage(res)})
        await scheduler.wait_started(job)
        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, reason: str | None) -> bytes:
            return _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]},
                          ensure_ascii=False)

        def events() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.streamed_reply:
                    if first:
                        piece = piece.lstrip()
                    if not piece:
                        continue
                    yield chunk({"role": "assistant", "content": piece} if first else {"content": piece}, None)
                    first = False
                problem = scheduler.stream_finished(job)
                if problem is not None:
                    status = getattr(problem, "status", 500)
                    kind = "server_error" if status in (503, 504) else "api_error"
                    yield _event({"error": {"message": str(problem), "type": kind}})
                else:
                    yield chunk({}, _FINISH.get(job.result.done_reason, "stop"))
                    if include_usage:
                        yield _event({**head, "choices": [], "usage": _usage(job.result)})
            except GeneratorExit:
                job.cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001 — the 200 went out: the error is the last event
                log.exception("generation failed")
                yield _event({"error": {"message": str(exc), "type": "api_error"}})
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/v1/embeddings")
    async def v1_embeddings(request: Request):
        """OpenAI's embeddings (see the module's docstring)."""
        raw = await request.body()
        if not raw.strip():
            raise RequestError(400, "EOF")
        body = json_object(raw)
        name = typed_field(body, "model", (str,), "string", "")
        if not name:
            raise RequestError(400, "model is required")
        texts = _embedding_texts(body.get("input"))
        encoding = typed_field(body, "encoding_format", (str,), "string", "float")
        if encoding not in ("float", "base64"):
            raise RequestError(400, f'invalid encoding_format {encoding[:32]!r}: give "float" or "base64"')
        dimensions = typed_field(body, "dimensions", (int,), "int", None)
        served.check_model(name)
        served.shaped([], dimensions)   # a bad value is refused before any work
        job = await served.queue_embedding(texts)
        res = await scheduler.wait_done(job)

        def answer() -> bytes:   # off the event loop: 256 vectors of 4096 numbers take a while to write
            vectors = served.shaped(job.vectors, dimensions)
            data = [{"object": "embedding", "index": i,
                     "embedding": _float32_base64(v) if encoding == "base64" else v} for i, v in enumerate(vectors)]
            return json.dumps({"object": "list", "data": data, "model": name,
                               "usage": {"prompt_tokens": res.prompt_tokens, "total_tokens": res.prompt_tokens}},
                              separators=(",", ":")).encode()
        return Response(await run_in_threadpool(answer), media_type="application/json")

    return router
