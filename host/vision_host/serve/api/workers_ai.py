"""Cloudflare Workers AI's API for ``@cf/llava-hf/llava-1.5-7b-hf`` (its model schema):
``POST /ai/run/{model}`` and ``POST /client/v4/accounts/{account}/ai/run/{model}``.

The request: ``image`` (the file's bytes as an array of integers, as base64, or the whole
request body when it is sent as ``image/*`` or ``application/octet-stream``), ``prompt`` or
``messages`` (exactly one), ``max_tokens`` (512, or ``--max-new-tokens`` when lower),
``temperature``, ``top_p``, ``top_k``, ``seed``, ``repetition_penalty``, ``raw``. The answer:
``{"result": {"description"}, "success": true, "errors": [], "messages": []}``; not streamed,
as Workers AI's LLaVA. One image per request, as Workers AI's schema has it. Errors come in
the v4 envelope (:func:`.errors.workers_ai_error`).
"""

import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import RequestError
from ..parsing import parse_json
from ..served_model import ServedModel

#: Workers AI's default ``max_tokens`` for ``@cf/llava-hf/llava-1.5-7b-hf``.
WORKERS_AI_MAX_TOKENS = 512


def _image_and_body(raw_body: bytes, content_type: str) -> tuple[bytes, dict]:
    """The request's image and its JSON fields (a binary upload: the body is the image)."""
    if content_type != "application/json" and not raw_body.lstrip().startswith(b"{"):
        return raw_body, {"prompt": "Describe this image."}
    body = parse_json(raw_body)
    if not isinstance(body, dict):
        raise RequestError(400, "the request body is not a JSON object")
    image = body.get("image")
    if isinstance(image, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                       for v in image):
        return bytes(image), body
    if isinstance(image, str):
        try:
            return base64.b64decode(image, validate=True), body
        except (binascii.Error, ValueError):
            raise RequestError(400, "'image' is a string but not base64") from None
    raise RequestError(400, "required properties at '/' are 'image' (an array of integers 0-255)")


def _prompt(body: dict) -> str:
    """The ``prompt``, or the last user message of ``messages`` (exactly one of them)."""
    if ("prompt" in body) == ("messages" in body):
        raise RequestError(400, "exactly one of 'prompt' and 'messages' is required")
    prompt = body.get("prompt")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "'messages' must be an array of {role, content} objects")
        users = [m.get("content") for m in messages if m.get("role", "user") == "user"]
        prompt = users[-1] if users else ""
    if not isinstance(prompt, str):
        raise RequestError(400, "'prompt' must be a string")
    return prompt


def routes(served: ServedModel) -> APIRouter:
    """Workers AI's routes for ``served``."""
    router = APIRouter()

    async def run(model_id: str, request: Request):
        if not served.answers_to(model_id):
            raise RequestError(400, f"No such model {model_id} or task", cf_code=5007)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image, body = _image_and_body(await request.body(), content_type)
        prompt = _prompt(body)
        opts = {"num_predict": body.get("max_tokens", min(WORKERS_AI_MAX_TOKENS, served.limits.max_new_tokens))}
        for key in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
            opts[key] = body.get(key)
        settings = served.settings_of(opts)
        job = await served.queue_generation([image], prompt, settings, raw=bool(body.get("raw")),
                                            field_name="image")
        res = await served.scheduler.wait_done(job)
        return JSONResponse({"result": {"description": res.text}, "success": True, "errors": [], "messages": []})

    @router.post("/client/v4/accounts/{account_id}/ai/run/{model_id:path}")
    async def run_in_account(account_id: str, model_id: str, request: Request):
        return await run(model_id, request)

    @router.post("/ai/run/{model_id:path}")
    async def run_short(model_id: str, request: Request):
        return await run(model_id, request)

    return router
