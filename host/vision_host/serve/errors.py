"""Refusals and failures, answered in the error shape of the API a request was for.

Routes, the request guard and the scheduler raise :class:`RequestError` (or a subclass); the
handlers :func:`add_error_handlers` installs turn it, and any unexpected exception (500), into
one response in the shape of the request's API (:func:`api_of`), one function per shape:

* Ollama (api.md's errors): ``{"error": "..."}``.
* OpenAI (the chat completions API's error object): ``{"error": {"message", "type", "param",
  "code"}}``.
* Workers AI (Cloudflare's v4 API envelope): ``{"result": null, "success": false, "errors":
  [{"code", "message"}], "messages": []}``.

Importing this module imports neither FastAPI nor Starlette.
"""

from __future__ import annotations

import re
from typing import Any, Callable


class RequestError(Exception):
    """A request the server refuses: the HTTP ``status`` and the ``message``, answered in the
    error shape of the API the request was for (see :func:`error_body`); ``cf_code``: the
    Workers AI error code, when not the status's usual one."""

    def __init__(self, status: int, message: str, cf_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.cf_code = cf_code


class InternalError(RequestError):
    """An unexpected failure on this request (the model worker's, or a route's; it is logged): 500."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(500, f"internal error: {type(exc).__name__}: {exc}")


class Busy(RequestError):
    """The scheduler's queue is full: 503 with ``Retry-After`` (``retry_after``, in s)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


class RequestTimeout(RequestError):
    """The request waited and generated longer than ``request_timeout_s``: 504."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message)


class BodyTooLarge(RequestError):
    """The request body is larger than ``--max-body-mb`` (``limit``, in bytes): 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit / 2 ** 20:g} MiB "
                              f"(--max-body-mb)")


_WORKERS_AI_PATH = re.compile(r"^/(?:client/v4/accounts/[^/]+/)?ai/run/")


def api_of(path: str) -> str:
    """The API a request path belongs to, which decides its error shape: ``"openai"``
    (``/v1/…``), ``"workers-ai"`` (``/ai/run/…``, ``/client/v4/accounts/{id}/ai/run/…``) or
    ``"ollama"`` (everything else)."""
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if _WORKERS_AI_PATH.match(path):
        return "workers-ai"
    return "ollama"


def ollama_error(exc: RequestError) -> dict:
    """Ollama's error body: ``{"error": message}``."""
    return {"error": exc.message}


def openai_error(exc: RequestError) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``; ``type`` is
    ``invalid_request_error`` for 4xx (``not_found_error`` for 404), ``server_error`` for 503
    and 504, else ``api_error``; ``code`` names 403, 413, 415, 503 and 504."""
    status = exc.status
    kind = ("not_found_error" if status == 404 else "invalid_request_error" if 400 <= status < 500
            else "server_error" if status in (503, 504) else "api_error")
    code = {403: "origin_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
            503: "server_busy", 504: "timeout"}.get(status)
    return {"error": {"message": exc.message, "type": kind, "param": None, "code": code}}


def workers_ai_error(exc: RequestError) -> dict:
    """Workers AI's v4 envelope ``{"result": null, "success": false, "errors": [{"code",
    "message"}], "messages": []}``; codes 5006 (bad input, message prefixed ``Error: ``), 5007
    (no such model), 3040 (busy), 3007 (timeout), 3043 (internal error: ``internal error: …``)."""
    code = exc.cf_code or {503: 3040, 504: 3007}.get(exc.status) or (5006 if exc.status < 500 else 3043)
    prefix = "Error: " if code == 5006 else ""
    return {"result": None, "success": False, "errors": [{"code": code, "message": prefix + exc.message}],
            "messages": []}


#: Each API's error body, by :func:`api_of`'s name.
ERROR_SHAPES: dict[str, Callable[[RequestError], dict]] = {
    "ollama": ollama_error, "openai": openai_error, "workers-ai": workers_ai_error}


def error_body(api: str, exc: RequestError) -> dict:
    """The JSON body of ``exc`` in ``api``'s (:func:`api_of`) error shape."""
    return ERROR_SHAPES[api](exc)


def error_response(api: str, exc: RequestError) -> Any:
    """:func:`error_body` as a JSON response with ``exc``'s status (and ``Retry-After`` for 503)."""
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
    media = "application/json; charset=utf-8" if api == "ollama" else "application/json"
    return JSONResponse(error_body(api, exc), status_code=exc.status, headers=headers, media_type=media)


def add_error_handlers(app: Any) -> None:
    """Answer, on ``app`` (FastAPI's), a :class:`RequestError` in its API's shape, any other
    exception as :class:`InternalError` (500; Starlette then re-raises it, and it is logged),
    and Starlette's own 404 and 405 as Ollama's plain-text ``404 page not found`` and ``405
    method not allowed``."""
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse

    async def refused(request: Any, exc: RequestError) -> Any:
        return error_response(api_of(request.url.path), exc)

    async def failed(request: Any, exc: Exception) -> Any:
        return error_response(api_of(request.url.path), InternalError(exc))

    async def not_routed(request: Any, exc: HTTPException) -> Any:
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return error_response(api_of(request.url.path), RequestError(exc.status_code, str(exc.detail)))

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(Exception, failed)
    app.add_exception_handler(HTTPException, not_routed)
