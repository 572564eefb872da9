"""Ollama's API (its docs/api.md), as the official ``ollama`` clients, ``curl`` and
vision-host's own ``ollama`` processor use it.

* ``GET /`` → ``Ollama is running``; ``GET /api/version``; ``GET /api/tags``, ``GET /api/ps``
  (the loaded model, as ``NAME:latest``); ``POST /api/show``.
* ``POST /api/generate`` (``model``, ``prompt``, ``images`` as base64, ``stream`` default true,
  ``raw``, ``keep_alive``, ``options``: ``num_predict``, ``temperature``, ``top_p``,
  ``top_k``, ``seed``, ``num_beams``, ``min_length``, ``max_length``, ``length_penalty``,
  ``repeat_penalty``; ``format``: ``"json"`` or a JSON Schema object, see :mod:`..structured`): NDJSON lines ``{"model","created_at","response","done":false}`` then a
  final ``"done":true`` line with ``done_reason`` (``"stop"``, or ``"length"`` when
  ``num_predict`` cut it short) and Ollama's metrics (durations in ns); ``"stream": false`` →
  one JSON object. Without prompt and images: load the model (``done_reason: "load"``), or
  with ``keep_alive: 0`` unload it (``"unload"``).
* ``POST /api/chat``: the same with ``messages[]`` (``content``, ``images``) and
  ``"message": {"role": "assistant", "content": ...}``; the last user message is the prompt,
  the images are those of the last message that has any.
* Without images (text-only: summaries, questions about earlier answers) LLaVA's and BLIP-2's
  language model answers: ``/api/chat``'s system, user and assistant messages, oldest first,
  go through the family's chat format (:meth:`..models.base.VisionLanguageModel.text_prompt`),
  ``/api/generate``'s ``system`` and ``prompt`` likewise. BLIP, a captioner, answers 400
  saying which families can. A request with neither prompt (messages) nor images is still
  Ollama's load/unload request.
* ``POST /api/embed`` (api.md's "Generate Embeddings": ``model``, ``input`` a string or an
  array of strings, ``truncate`` default true, ``dimensions``, ``keep_alive``; ``options`` is
  ignored) → ``{"model", "embeddings": [[…], …], "total_duration", "load_duration",
  "prompt_eval_count"}``: one L2-normalised vector per input, in order (see
  :meth:`..models.base.VisionLanguageModel.embed`). An empty ``input`` (``""``, ``[]``, none)
  → ``{"model", "embeddings": []}``, as Ollama answers; an input that is not a string →
  400 ``invalid input type``; ``truncate: false`` with an input longer than the model's
  positions → 400 ``the input length exceeds the context length …``; more than
  ``--max-embed-inputs`` (256) inputs, or one over ``--max-prompt-chars`` → 400.
* Several ``images`` (at most ``--max-images``, 8; more: 400) are consecutive moments of one
  video, oldest first: LLaVA gets them all, one ``<image>`` each, BLIP and BLIP-2 one grid of
  them; LLaVA's and BLIP-2's prompts start with a sentence saying so (see
  :mod:`..models.base`). One image is answered as ever.

Errors are Ollama's ``{"error": "..."}`` (:func:`.errors.ollama_error`); one that comes after
a stream's 200 is its last line.
"""

import base64
import binascii
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import RequestError
from ..models.base import VisionLanguageModel
from ..parsing import go_type, json_object, parse_keep_alive, typed_field
from ..scheduler import SERVER_DEFAULT, GenerationResult, Job
from ..served_model import ServedModel
from ..structured import ollama_format

log = logging.getLogger(__name__)

#: What ``/api/version`` answers: the Ollama API level this server follows.
OLLAMA_API_VERSION = "0.12.0"
#: ``expires_at`` of a model that never unloads: Ollama's far-future date.
FOREVER_ISO = "2318-01-01T00:00:00Z"
_JSON_UTF8 = "application/json; charset=utf-8"


def utc_iso(when: datetime | None = None) -> str:
    """``when`` (default now; a UTC datetime) as ISO 8601 with ``Z``, as Ollama writes times."""
    return (when or datetime.now(timezone.utc)).isoformat().replace("+00:00", "Z")


def param_size(model: VisionLanguageModel) -> str:
    """The model's parameter count as Ollama writes it (``"247.4M"``, ``"7B"``; ``""`` unknown)."""
    n = model.n_params
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


def metrics(res: GenerationResult) -> dict:
    """Ollama's metrics of a finished generation (durations in ns, token counts)."""
    end = res.ended_at or time.perf_counter()
    first = res.first_token_at or end
    return {"total_duration": int((end - res.started_at + res.lock_wait_s) * 1e9),
            "load_duration": int(res.lock_wait_s * 1e9),
            "prompt_eval_count": res.prompt_tokens,
            "prompt_eval_duration": int((first - res.started_at) * 1e9),
            "eval_count": res.eval_count,
            "eval_duration": int((end - first) * 1e9)}


def _b64_image(s: Any) -> bytes:
    if not isinstance(s, str):
        raise RequestError(400, f"json: cannot unmarshal {go_type(s)} into Go struct field .images of type string")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        bad = next((i for i, c in enumerate(s) if not (c.isalnum() or c in "+/=")), len(s))
        raise RequestError(400, f"illegal base64 data at input byte {bad}") from None


def _keep_alive(body: dict) -> Any:
    """The request's ``keep_alive`` (see :func:`.parsing.parse_keep_alive`), or the server's default."""
    if body.get("keep_alive") is None:
        return SERVER_DEFAULT
    return parse_keep_alive(body["keep_alive"])


def _line(obj: dict, ensure_ascii: bool = False) -> bytes:
    return (json.dumps(obj, ensure_ascii=ensure_ascii, separators=(",", ":")) + "\n").encode()


def routes(served: ServedModel) -> APIRouter:
    """Ollama's routes for ``served``."""
    router = APIRouter()
    model, scheduler = served.model, served.scheduler

    def details() -> dict:
        return {"parent_model": "", "format": "safetensors", "family": model.family,
                "families": [model.family], "parameter_size": param_size(model),
                "quantization_level": "F16" if model.device == "cuda" else "F32"}

    def model_entry() -> dict:
        return {"name": served.name, "model": served.name, "modified_at": model.loaded_at.isoformat(),
                "size": model.size, "digest": "", "details": details()}

    @router.get("/", response_class=PlainTextResponse)
    @router.head("/", response_class=PlainTextResponse)
    def root():
        return "Ollama is running"

    @router.get("/api/version")
    def version():
        return {"version": OLLAMA_API_VERSION}

    @router.get("/api/tags")
    def tags():
        return {"models": [model_entry()]}

    @router.get("/api/ps")
    def ps():
        """The model while it is loaded (with ``expires_at``), and, as an extra field the
        clients ignore, ``vision_host``: the scheduler's statistics (batch sizes, queue, images),
        ``limits``, the request limits in force, ``max_images`` (``--max-images``) and
        ``max_embed_inputs`` (``--max-embed-inputs``)."""
        models = []
        if model.loaded:
            entry = model_entry()
            expires = scheduler.expires_wall
            entry.update(expires_at=FOREVER_ISO if expires is None else utc_iso(expires),
                         size_vram=model.size if model.device == "cuda" else 0)
            models.append(entry)
        return {"models": models, "vision_host": {**scheduler.stats(), "limits": served.limits_in_force,
                                                  "max_images": served.max_images,
                                                  "max_embed_inputs": served.max_embed_inputs}}

    @router.post("/api/show")
    async def show(request: Request):
        body = json_object(await request.body())
        served.check_model(body.get("model") or body.get("name"))
        return {"license": "", "modelfile": f"# served by vision-host serve\nFROM {model.source}\n",
                "parameters": "", "template": "{{ .Prompt }}", "details": details(),
                "model_info": {"general.architecture": model.family, "general.basename": model.source},
                "capabilities": ["completion", "vision", "embedding"], "modified_at": model.loaded_at.isoformat()}

    async def reply(kind: str, name: str, job: Job):
        """The /api/generate or /api/chat answer (``kind`` "response" or "message") to a
        queued ``job``: a load/unload, a whole answer, or (a streamed reply) NDJSON lines."""
        def piece_obj(text: str, done: bool) -> dict:
            obj: dict[str, Any] = {"model": name, "created_at": utc_iso()}
            if kind == "response":
                obj["response"] = text
            else:
                obj["message"] = {"role": "assistant", "content": text}
            obj["done"] = done
            return obj

        if job.prepared is None:   # nothing to caption: Ollama's "load" (or, with keep_alive 0, "unload") answer
            await scheduler.wait_done(job)
            obj = piece_obj("", True)
            obj["done_reason"] = job.done_reason
            return JSONResponse(obj, media_type=_JSON_UTF8)
        if job.streamed_reply is None:
            res = await scheduler.wait_done(job)
            obj = piece_obj(res.text, True)
            obj.update(done_reason=res.done_reason, **metrics(res))
            return JSONResponse(obj, media_type=_JSON_UTF8)
        await scheduler.wait_started(job)

        def lines() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.streamed_reply:
                    if first:
                        job.result.first_token_at = job.result.first_token_at or time.perf_counter()
                        piece = piece.lstrip()
                    if not piece:
                        continue
                    first = False
                    yield _line(piece_obj(piece, False))
                problem = scheduler.stream_finished(job)
                if problem is not None:   # after the 200 went out: Ollama's last-line error
                    yield _line({"error": str(problem)}, ensure_ascii=True)
                    return
                obj = piece_obj("", True)
                obj["done_reason"] = job.result.done_reason
                obj.update(metrics(job.result))
                yield _line(obj)
            except GeneratorExit:
                job.cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001 — the 200 went out: the error is the last line
                job.cancel.set()
                log.exception("generation failed")
                yield _line({"error": str(exc)}, ensure_ascii=True)
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def load_job(keep_alive: Any) -> Job:
        """Ollama's request without prompt and images: load the model (unload with keep_alive 0)."""
        return scheduler.submit(scheduler.new_job(None, keep_alive=keep_alive))

    @router.post("/api/generate")
    async def generate(request: Request):
        body = json_object(await request.body())
        name = typed_field(body, "model", (str,), "string", "")
        served.check_model(name)
        prompt = typed_field(body, "prompt", (str,), "string", "")
        system = typed_field(body, "system", (str,), "string", "")
        given = typed_field(body, "images", (list,), "[]api.ImageData", [])
        served.check_image_count(len(given))
        images = [_b64_image(s) for s in given]
        streamed = typed_field(body, "stream", (bool,), "bool", True)
        raw = typed_field(body, "raw", (bool,), "bool", False)
        settings = served.settings_of(typed_field(body, "options", (dict,), "map[string]interface {}", {}))
        keep_alive = _keep_alive(body)
        constraint = ollama_format(body.get("format"))
        if not prompt and not images:
            return await reply("response", name, load_job(keep_alive))
        turns = ([("system", system)] if system.strip() else []) + [("user", prompt)]
        job = await served.queue_generation(images, prompt, settings, raw=raw, streamed=streamed,
                                            keep_alive=keep_alive, constraint=constraint, turns=turns)
        return await reply("response", name, job)

    @router.post("/api/chat")
    async def chat(request: Request):
        body = json_object(await request.body())
        name = typed_field(body, "model", (str,), "string", "")
        if not name:
            raise RequestError(400, "model is required")
        served.check_model(name)
        messages = typed_field(body, "messages", (list,), "[]api.Message", [])
        streamed = typed_field(body, "stream", (bool,), "bool", True)
        settings = served.settings_of(typed_field(body, "options", (dict,), "map[string]interface {}", {}))
        keep_alive = _keep_alive(body)
        constraint = ollama_format(body.get("format"))
        prompt, images, turns = "", [], []
        for m in messages:
            if not isinstance(m, dict):
                raise RequestError(400, f"json: cannot unmarshal {go_type(m)} into Go value of type api.Message")
            content = typed_field(m, "content", (str,), "string", "")
            role = m.get("role") or "user"
            if role == "user" and content.strip():
                prompt = content
            if role in ("system", "user", "assistant") and content.strip():
                turns.append((role, content))   # a text-only chat's history
            own = [_b64_image(s) for s in typed_field(m, "images", (list,), "[]api.ImageData", [])]
            if own:   # the frames of the last message that has images
                images = own
        if not messages:
            return await reply("message", name, load_job(keep_alive))
        job = await served.queue_generation(images, prompt, settings, streamed=streamed,
                                            keep_alive=keep_alive, constraint=constraint, turns=turns)
        return await reply("message", name, job)

    @router.post("/api/embed")
    async def embed(request: Request):
        """Ollama's ``/api/embed`` (see the module's docstring)."""
        t0 = time.perf_counter()
        body = json_object(await request.body())
        name = typed_field(body, "model", (str,), "string", "")
        served.check_model(name)
        texts = _embed_input(body.get("input"))
        truncate = typed_field(body, "truncate", (bool,), "bool", True)
        dimensions = typed_field(body, "dimensions", (int,), "int", None)
        served.shaped([], dimensions)   # a bad value is refused before any work
        keep_alive = _keep_alive(body)
        if not texts:   # Ollama's answer to an empty input
            return JSONResponse({"model": name, "embeddings": []}, media_type=_JSON_UTF8)
        job = await served.queue_embedding(texts, truncate=truncate, keep_alive=keep_alive)
        res = await scheduler.wait_done(job)

        def answer() -> bytes:   # off the event loop: 256 vectors of 4096 numbers take a while to write
            return json.dumps({"model": name, "embeddings": served.shaped(job.vectors, dimensions),
                               "total_duration": int((time.perf_counter() - t0) * 1e9),
                               "load_duration": int(res.lock_wait_s * 1e9),
                               "prompt_eval_count": res.prompt_tokens}, separators=(",", ":")).encode()
        return Response(await run_in_threadpool(answer), media_type=_JSON_UTF8)

    return router


def _embed_input(value: Any) -> list[str]:
    """``/api/embed``'s ``input``: a string (empty: none) or an array of strings, as a list.
    Raises :class:`RequestError` 400 ``invalid input type`` (Ollama's words) for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RequestError(400, "invalid input type: give a string or an array of strings")
