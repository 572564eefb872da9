"""The server itself: :func:`create_app` puts one router per API (``api/``) behind the request
guard and the error handlers, over one :class:`.scheduler.Scheduler`; :func:`serve` checks the
settings, binds the port, loads the model and runs the app with uvicorn.

Safety (a request must not stop, starve or exhaust the server; a web page must not drive it):

* **Origins and content types** (:class:`.guard.RequestGuard`): a request with an ``Origin``
  header that is not the server's own (``--allow-origin`` adds others) gets **403**; a ``POST``
  that is not ``application/json`` (Workers AI also takes ``image/*`` and
  ``application/octet-stream``) gets **415**. The official clients send JSON and no ``Origin``.
* **Sizes**: a body over ``--max-body-mb`` (32 MiB) gets **413**, from ``Content-Length`` or
  counted as a chunked body arrives; an image whose header says more than
  ``--max-image-pixels`` (40 000 000) gets **413** before it is decoded, and only the formats
  of :data:`.models.base.IMAGE_FORMATS` are opened; the queue is checked (503) before any
  decoding, and ``--decode-threads`` (2) requests' images are decoded at once; a prompt over
  ``--max-prompt-chars`` (32 768) or longer than the model's positions, or more than
  ``--max-images`` (8) images in one request, gets **400**.
* **Options**: ``num_beams`` over ``--max-beams`` (8), ``num_predict`` / ``max_tokens`` /
  ``max_length`` / ``min_length`` over ``--max-new-tokens`` (512), ``top_k`` over
  ``--max-top-k`` (1000), numbers that are not finite or do not fit 64 bits: **400**.
* **Input**: bodies are strict JSON (:func:`.parsing.parse_json`: no ``NaN``/``Infinity``, no
  lone surrogates, no nesting beyond the parser's depth): **400**; ``keep_alive`` must be
  finite (longer than Go's longest duration means forever). Every refusal comes in the
  request's API's error shape (:mod:`.errors`), from one exception handler.

Several images in one request (Ollama's ``images``, OpenAI's ``image_url`` parts; Workers AI
takes one) are consecutive moments of one video, oldest first: LLaVA gets them all, one
``<image>`` each, BLIP and BLIP-2 one grid of them, and LLaVA's and BLIP-2's prompts start
with a sentence saying so (:mod:`.models.base`, :mod:`.models.grid`).

Text-only requests (no image: summaries of earlier answers) are answered by LLaVA's and
BLIP-2's language model, the chat's system, user and assistant turns through the family's chat
format; BLIP, a captioner, refuses them (400). ``/api/embed`` and ``/v1/embeddings`` give one
L2-normalised vector per text, the attention-masked mean of the family's text side's last
hidden state; at most ``--max-embed-inputs`` (256) texts per request, each at most
``--max-prompt-chars`` and cut to the model's positions unless Ollama's ``truncate`` is false
(then 400).

``GET /metrics`` answers Prometheus text (queue depth, batch sizes, requests by API and
outcome, …: :func:`..metrics.add_serve_metrics`).

Limits: one process, one model; chat history reaches the model only in text-only chats.

FastAPI, uvicorn, torch and transformers are imported inside functions, so importing this
module, and ``vision-host run``, never loads them.
"""

from __future__ import annotations

import errno
import math
import socket
import sys
from typing import Any, Sequence

from .errors import RequestError
from .guard import normalize_origin
from .models import (DEFAULT_MAX_BEAMS, DEFAULT_MAX_NEW_TOKENS_LIMIT, DEFAULT_MAX_TOP_K, DEFAULT_MODEL,
                     GenerationLimits, GenerationSettings, ModelLoadError, normalize_model_name, open_model)
from .models.base import VisionLanguageModel
from .parsing import parse_keep_alive
from .scheduler import (DEFAULT_BATCH_WINDOW_MS, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE,
                        DEFAULT_REQUEST_TIMEOUT_S, Scheduler)
from .served_model import DEFAULT_MAX_EMBED_INPUTS, DEFAULT_MAX_IMAGES

__all__ = ["ServeError", "bind_socket", "create_app", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
#: Request limits (see :func:`create_app` and :func:`serve`; the generation options' limits are
#: :class:`.models.settings.GenerationLimits`'s: ``num_beams`` 8, new tokens 512, ``top_k`` 1000).
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_PROMPT_CHARS = 32_768
DEFAULT_DECODE_THREADS = 2
#: ``--batch-window-ms``: the longest wait for more requests to batch with the oldest (ms).
MAX_BATCH_WINDOW_MS = 10_000.0


class ServeError(Exception):
    """The server cannot start (port in use, model not loadable): the message says what to do."""


def create_app(model: VisionLanguageModel, *, max_batch: int = DEFAULT_MAX_BATCH,
               batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE,
               options: GenerationSettings | None = None, limits: GenerationLimits | None = None,
               max_body_mb: float | None = DEFAULT_MAX_BODY_MB,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
               decode_threads: int = DEFAULT_DECODE_THREADS, allow_origins: Sequence[str] = (),
               bind_host: str = DEFAULT_HOST, allow_hosts: Sequence[str] = (),
               max_images: int | None = DEFAULT_MAX_IMAGES,
               max_embed_inputs: int | None = DEFAULT_MAX_EMBED_INPUTS):
    """The FastAPI app serving ``model`` (already loaded) through a :class:`.scheduler.Scheduler`
    (``app.state.scheduler``).

    ``options``: the generation defaults a request's own ``options`` override; ``limits``:
    bounds on a request's options (:class:`.models.settings.GenerationLimits`, 400 beyond);
    ``max_body_mb``: largest request body in MiB (413 beyond); ``max_image_pixels``: most
    pixels an image may decode to, read from its header (413 beyond, nothing decoded);
    ``max_prompt_chars``: longest prompt in characters, checked before tokenising (400);
    ``decode_threads``: requests whose images are decoded (and prompts tokenised) at once,
    the others wait in the queue; ``max_images``: most images in one request (400 beyond);
    ``max_embed_inputs``: most texts in one embedding request (400 beyond);
    ``allow_origins``: web origins allowed besides the server's own;
    ``bind_host``: the address or name listened on and ``allow_hosts``: more names a request's
    ``Host`` may give (see :class:`.guard.RequestGuard`). None: no limit. The other keyword arguments are the scheduler's.

    Raises:
        ValueError: an ``allow_origins`` entry that is not an http(s) origin, or a limit below 1.
    """
    from fastapi import FastAPI

    from .. import __version__
    from ..metrics import add_serve_metrics
    from .api import ollama, openai, workers_ai
    from .errors import add_error_handlers
    from .guard import RequestGuard
    from .served_model import ServedModel

    origins = set()
    for origin in allow_origins:
        norm = normalize_origin(origin)
        if norm is None:
            raise ValueError(f"allow_origins: {origin!r} is not an origin (give e.g. http://localhost:3000)")
        origins.add(norm)
    for name, value in (("max_body_mb", max_body_mb), ("max_image_pixels", max_image_pixels),
                        ("max_prompt_chars", max_prompt_chars), ("decode_threads", decode_threads),
                        ("max_images", max_images), ("max_embed_inputs", max_embed_inputs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number above 0, not {value!r}")
    max_body_bytes = None if max_body_mb is None else int(max_body_mb * 2 ** 20)

    app = FastAPI(title="vision-host serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, allowed_origins=frozenset(origins),
                       bind_host=bind_host, allowed_hosts=tuple(allow_hosts))
    add_error_handlers(app)
    scheduler = Scheduler(model, max_batch=max_batch, batch_window_s=batch_window_ms / 1000.0,
                          max_queue=max_queue, request_timeout_s=request_timeout_s, keep_alive=keep_alive)
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.stop)
    served = ServedModel(model, scheduler, defaults=options or GenerationSettings(),
                         limits=limits or GenerationLimits(), max_body_bytes=max_body_bytes,
                         max_image_pixels=max_image_pixels, max_prompt_chars=max_prompt_chars,
                         decode_threads=decode_threads, max_images=max_images, max_embed_inputs=max_embed_inputs)
    for api in (ollama, openai, workers_ai):
        app.include_router(api.routes(served))
    add_serve_metrics(app)    # GET /metrics (Prometheus text), requests counted by outcome
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``. Raises ServeError naming ``--port`` when taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (is Ollama or another vision-host serve "
                             f"running?): stop it or pick another with --port") from None
        if exc.errno == errno.EACCES:
            raise ServeError(f"no permission to listen on port {port}: pick one above 1023 with --port") from None
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host and --port") from None
    return sock


def serve(model: str = DEFAULT_MODEL, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "warning", status=sys.stderr, *, max_batch: int = DEFAULT_MAX_BATCH,
          batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_queue: int = DEFAULT_MAX_QUEUE,
          request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE,
          options: dict | None = None, max_beams: int = DEFAULT_MAX_BEAMS,
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_LIMIT, max_top_k: int = DEFAULT_MAX_TOP_K,
          max_body_mb: float = DEFAULT_MAX_BODY_MB, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
          max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, decode_threads: int = DEFAULT_DECODE_THREADS,
          allow_origins: Sequence[str] = (), allow_hosts: Sequence[str] = (),
          max_images: int = DEFAULT_MAX_IMAGES, max_embed_inputs: int = DEFAULT_MAX_EMBED_INPUTS) -> None:
    """Bind ``host:port`` (first, so a taken port fails fast), load the model, serve until stopped.

    ``model``: alias, Hub id or ``save_pretrained`` directory (see :func:`.models.open_model`);
    ``max_batch``: most images in one batched ``generate``; ``batch_window_ms``: how long the
    worker waits for more requests to batch with the oldest one; ``max_queue``: waiting
    requests beyond which new ones get 503 + ``Retry-After`` (0: no limit);
    ``request_timeout_s``: limit on waiting plus generating, then 504 (0: none);
    ``keep_alive``: default idle time before the model is unloaded (``"5m"``, seconds, 0,
    negative = never), overridden per request by Ollama's ``keep_alive``; ``options``: default
    generation options (Ollama's names, e.g. ``{"num_beams": 5, "repeat_penalty": 1.2}``),
    overridden per request.

    Limits on requests (see :func:`create_app`; each a ``serve`` flag of the same name):
    ``max_beams`` (``num_beams``, default 8), ``max_new_tokens`` (``num_predict``,
    ``max_tokens``, ``max_length``, ``min_length``; 512), ``max_top_k`` (1000) → 400 beyond;
    ``max_body_mb`` (request body, MiB; 32) → 413; ``max_image_pixels`` (width × height read
    from each image's header; 40 000 000) → 413; ``max_prompt_chars`` (32 768) → 400;
    ``max_images`` (images in one request; 8) → 400; ``max_embed_inputs`` (texts in one
    embedding request; 256) → 400; ``decode_threads`` (requests whose
    images are decoded at once; 2); ``allow_origins``: web origins allowed
    besides the server's own (others get 403); ``allow_hosts``: names a request's ``Host`` may
    give besides localhost and the server's addresses (others get 403).

    Raises:
        ServeError: port taken, model not loadable, serve extra missing, bad option or limit.
    """
    try:
        import uvicorn
    except ImportError:
        raise ServeError("the serve extra is not installed: pip install 'vision-host[serve]'") from None
    try:
        parse_keep_alive(keep_alive)
    except RequestError as exc:
        raise ServeError(f"--keep-alive {keep_alive}: {exc.message} (give e.g. 5m, 30s, 0 or -1)") from None
    try:
        limits = GenerationLimits(max_beams=max_beams, max_new_tokens=max_new_tokens, max_top_k=max_top_k)
    except ValueError as exc:
        raise ServeError(f"--{str(exc).replace('_', '-')}") from None
    try:
        defaults = GenerationSettings.from_options(options or {}, limits=limits)
    except ValueError as exc:
        raise ServeError(f"--option: {exc}") from None
    for name, value in (("max-body-mb", max_body_mb), ("max-image-pixels", max_image_pixels),
                        ("max-prompt-chars", max_prompt_chars), ("decode-threads", decode_threads),
                        ("max-images", max_images), ("max-embed-inputs", max_embed_inputs)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ServeError(f"--{name} must be a number above 0, not {value}")
    if not (isinstance(batch_window_ms, (int, float)) and 0 <= batch_window_ms <= MAX_BATCH_WINDOW_MS):
        raise ServeError(f"--batch-window-ms must be a number from 0 to {MAX_BATCH_WINDOW_MS:g}, not {batch_window_ms}")
    if not (isinstance(request_timeout_s, (int, float)) and math.isfinite(request_timeout_s) and request_timeout_s >= 0):
        raise ServeError(f"--request-timeout-s must be a number of seconds, 0 (none) or more, not {request_timeout_s}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ServeError(f"--max-queue must be a whole number, 0 (no limit) or more, not {max_queue}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServeError(f"--port must be from 1 to 65535, not {port}")
    for origin in allow_origins:
        if normalize_origin(origin) is None:
            raise ServeError(f"--allow-origin {origin}: not a web origin (give e.g. http://localhost:3000)")
    unknown = set(options or {}) - set(GenerationSettings.OPTION_NAMES)
    if unknown:
        raise ServeError(f"--option {sorted(unknown)[0]}: unknown (known: {', '.join(GenerationSettings.OPTION_NAMES)})")
    sock = bind_socket(host, port)
    try:
        try:
            vision_model = open_model(model)
            print(f"vision-host serve: loading {vision_model.source} ({vision_model.family}) …", file=status,
                  flush=True)
            vision_model.load()
        except ModelLoadError as exc:
            raise ServeError(str(exc)) from None
        app = create_app(vision_model, max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         request_timeout_s=request_timeout_s, keep_alive=keep_alive, options=defaults,
                         limits=limits, max_body_mb=max_body_mb, max_image_pixels=max_image_pixels,
                         max_prompt_chars=max_prompt_chars, decode_threads=decode_threads,
                         allow_origins=allow_origins, bind_host=host, allow_hosts=allow_hosts,
                         max_images=max_images, max_embed_inputs=max_embed_inputs)
        shown = f"[{host}]" if ":" in host else host
        print(f"vision-host serve: {normalize_model_name(vision_model.name)} ({vision_model.source}, "
              f"{vision_model.family}, {vision_model.device}) loaded in {vision_model.load_duration_ns / 1e9:.1f} s; "
              f"Ollama API on http://{shown}:{port} "
              f"(OpenAI API under /v1, Workers AI under /ai/run)", file=status, flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                                timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
