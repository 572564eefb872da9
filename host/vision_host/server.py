"""``vision-host serve``: an embedded vision server speaking Ollama's, OpenAI's and Workers AI's APIs.

Ollama clients (the official ``ollama`` library, ``curl``, vision-host's own ``ollama``
processor), OpenAI clients and Workers AI clients work unchanged against it. The model
(BLIP, BLIP-2 or LLaVA-1.5: see :mod:`.vlm`) runs in-process with Hugging Face transformers.

* ``GET /`` → ``Ollama is running``; ``GET /api/version``; ``GET /api/tags``, ``GET /api/ps``
  (the loaded model, as ``NAME:latest``); ``POST /api/show``.
* ``POST /api/generate`` (``model``, ``prompt``, ``images`` as base64, ``stream`` default true,
  ``raw``, ``options``: ``num_predict``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
  ``num_beams``, ``min_length``, ``max_length``, ``length_penalty``, ``repeat_penalty``):
  NDJSON lines ``{"model","created_at","response","done":false}`` then a final
  ``"done":true`` line with ``done_reason`` (``"stop"``, or ``"length"`` when ``num_predict``
  cut it short) and Ollama's metrics (durations in ns); ``"stream": false`` → one JSON object.
* ``POST /api/chat``: the same with ``messages[]`` (``content``, ``images``) and
  ``"message": {"role": "assistant", "content": ...}``; the last user message is the prompt.
* ``POST /v1/chat/completions`` (content parts with ``image_url`` data URLs; ``stream`` → SSE
  ``chat.completion.chunk`` events then ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``.
* ``POST /ai/run/{model}`` and ``POST /client/v4/accounts/{account}/ai/run/{model}``: the
  Workers AI schema of ``@cf/llava-hf/llava-1.5-7b-hf`` (``image`` as an array of bytes,
  ``prompt`` or ``messages``, ``max_tokens`` default 512) → ``{"result": {"description"},
  "success": true, "errors": [], "messages": []}``; not streamed, as Workers AI's LLaVA.
* Errors as each API sends them: Ollama's ``{"error": "..."}`` (404 ``model 'x' not found``,
  400 for bad bodies and images, 413 too large, 415 not JSON, 403 a foreign ``Origin``),
  OpenAI's ``{"error": {"message", "type", ...}}``, Workers AI's v4 envelope with
  ``errors: [{"code", "message"}]`` (see :func:`error_body`).

A model answers to its served name (the alias or directory name), its Hub id, and, for
Workers AI, ``@cf/`` + its Hub id. With several images the last one is used.

Scheduling (:class:`Scheduler`): one model worker thread runs every generation.

* **Micro-batching**: requests that arrive within ``batch_window_ms`` (10 ms) of the oldest
  waiting one, or while a batch runs, share one batched ``generate`` of up to ``max_batch``
  (8) images when their decoding settings, ``num_predict`` and ``seed`` match (BLIP also
  needs equal prompt lengths; BLIP-2 and LLaVA pad prompts on the left). Streamed rows get
  their words as they are generated. Batch sizes are in ``/api/ps`` under the extra field
  ``vision_host`` (``mean_batch_size``, ...).
* **Bounded queue**: with ``max_queue`` (32) requests waiting, a new one gets **503** with a
  ``Retry-After`` header (seconds) and ``{"error": "server busy: ..."}`` (on ``/v1``
  ``{"error": {"message", "type": "server_error", "code": "server_busy"}}``).
* **Timeout**: a request that waits and generates longer than ``request_timeout_s`` (120 s)
  gets **504** ``{"error": "request timed out after ..."}`` (``type": "server_error"`` on
  ``/v1``; a stream that already started ends with that error line) and its generation stops
  at the next token. The ``ollama`` client raises ``ResponseError`` (status_code 504); the
  ``openai`` client retries 503 and 504 per its ``max_retries``.
* **keep_alive** (Ollama's: ``"5m"``, seconds, 0 = unload now, negative = forever; server
  default ``keep_alive``): after the last request the model stays loaded that long, then its
  weights are freed; the next request reloads them (counted in ``load_duration``). ``/api/ps``
  lists the model only while loaded, with ``expires_at``. A request without prompt and images
  loads the model (``done_reason: "load"``), or with ``keep_alive: 0`` unloads it (``"unload"``).

Safety (a request must not stop, starve or exhaust the server; a web page must not drive it):

* **Origins and content types** (:class:`RequestGuard`): a request with an ``Origin`` header
  that is not the server's own (``--allow-origin`` adds others) gets **403**; a ``POST`` that is
  not ``application/json`` (Workers AI also takes ``image/*`` and ``application/octet-stream``)
  gets **415**. The official clients send JSON and no ``Origin``.
* **Sizes**: a body over ``--max-body-mb`` (32 MiB) gets **413**, from ``Content-Length`` or
  counted as a chunked body arrives; an image whose header says more than
  ``--max-image-pixels`` (40 000 000) gets **413** before it is decoded, and only the formats
  of :data:`.vlm.IMAGE_FORMATS` are opened; the queue is checked (503) before any decoding, and
  ``--decode-threads`` (2) images are decoded at once; a prompt over ``--max-prompt-chars``
  (32 768) or longer than the model's positions gets **400**.
* **Options**: ``num_beams`` over ``--max-beams`` (8), ``num_predict`` / ``max_tokens`` /
  ``max_length`` / ``min_length`` over ``--max-new-tokens`` (512), ``top_k`` over
  ``--max-top-k`` (1000), numbers that are not finite or do not fit 64 bits: **400**.
* **Input**: bodies are strict JSON (:func:`parse_json`: no ``NaN``/``Infinity``, no lone
  surrogates, no nesting beyond the parser's depth): **400**; ``keep_alive`` must be finite
  (longer than Go's longest duration means forever). Every refusal comes in the request's
  API's error shape (:func:`error_body`), from one exception handler.
* The model worker survives any exception: that batch's requests get 500, the rest go on.

Limits: one process, one model; one image per request; chat history is not sent to the model.

torch and transformers are imported lazily (inside functions), so importing this module, and
``vision-host run``, never loads them.
"""

import base64
import binascii
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

from .vlm import (DEFAULT_MAX_BEAMS, DEFAULT_MAX_NEW_TOKENS_LIMIT, DEFAULT_MAX_TOP_K, DEFAULT_MODEL, BadImage,
                  GenerationLimits, GenerationRow, GenerationSettings, ImageTooLarge, ModelLoadError, Prepared,
                  PromptTooLong, TextQueue, VisionLanguageModel, open_model, resolve_model)

__all__ = ["GenerationLimits", "ModelLoadError", "RequestError", "ServeError", "create_app", "normalize_model_name",
           "parse_keep_alive", "resolve_model", "serve"]

log = logging.getLogger("vision_host.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
#: Scheduling defaults (see :class:`Scheduler` and :func:`serve`).
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WINDOW_MS = 10.0
DEFAULT_MAX_QUEUE = 32
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEFAULT_KEEP_ALIVE = "5m"
#: Request limits (see :func:`create_app` and :func:`serve`; the generation options' limits are
#: :class:`.vlm.GenerationLimits`'s: ``num_beams`` 8, new tokens 512, ``top_k`` 1000).
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_PROMPT_CHARS = 32_768
DEFAULT_DECODE_THREADS = 2
#: Go's longest ``time.Duration`` (about 292 years), in seconds: a longer ``keep_alive`` means forever.
MAX_KEEP_ALIVE_S = (2 ** 63 - 1) / 1e9
#: What ``/api/version`` answers: the Ollama API level this server follows.
OLLAMA_API_VERSION = "0.12.0"
#: Workers AI's default ``max_tokens`` for ``@cf/llava-hf/llava-1.5-7b-hf``.
WORKERS_AI_MAX_TOKENS = 512


class ServeError(Exception):
    """The server cannot start (port in use, model not loadable): the message says what to do."""


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


@dataclass
class GenerationResult:
    """What one generation produced (filled in as it runs); times are ``time.perf_counter()``."""

    text: str = ""
    prompt_tokens: int = 0
    eval_count: int = 0
    done_reason: str = "stop"
    first_token_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    ended_at: float | None = None
    #: Time spent waiting in the queue (and reloading the model) before the generation started.
    lock_wait_s: float = 0.0
    #: How many requests shared the ``generate`` call that produced this one.
    batch_size: int = 1


def normalize_model_name(name: str) -> str:
    """Ollama's matching: case-insensitive, and a name without a tag means ``:latest``."""
    name = (name or "").strip().lower()
    if not name:
        return ""
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


# -- scheduling ------------------------------------------------------------------------------------
_FOREVER_ISO = "2318-01-01T00:00:00Z"
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive`` → seconds to stay loaded after a request; ``None`` = forever.

    A number is seconds; a string is a Go duration (``"5m"``, ``"1h30m"``, ``"10s"``,
    ``"-1"``) or a bare number of seconds; 0 unloads at once, a negative value keeps the model
    loaded forever, and so does one longer than Go's longest duration (:data:`MAX_KEEP_ALIVE_S`,
    about 292 years: Ollama's "forever" date).

    Raises:
        RequestError: 400 for anything else: another JSON type, a string that is no duration,
            NaN or infinity.
    """
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(value)} into Go struct field .keep_alive "
                                f"of type api.Duration")
    seconds: int | float
    if isinstance(value, (int, float)):
        seconds = value
    else:
        s = value.strip()
        if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", s):
            seconds = float(s)   # a huge exponent gives inf, refused below
        else:
            m = re.fullmatch(r"([-+]?)((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)", s)
            if not m:
                raise RequestError(400, f'time: invalid duration "{value[:64]}"')
            seconds = sum(float(n) * _DURATION_UNITS[u]
                          for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", m.group(2)))
            if m.group(1) == "-":
                seconds = -seconds
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise RequestError(400, f"keep_alive must be a finite duration or number of seconds, not {str(value)[:64]}")
    if seconds < 0 or seconds > MAX_KEEP_ALIVE_S:   # ints compare exactly, however large
        return None
    return float(seconds)


class Busy(RequestError):
    """The queue is full: 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after


class RequestTimeout(RequestError):
    """The request waited and generated longer than ``request_timeout_s``: 504."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message)


_UNSET = object()


class Reservation:
    """A place in the :class:`Scheduler`'s queue, taken (:meth:`Scheduler.reserve`) before a
    request's image is decoded, so a full queue refuses the request before that cost; handed
    to :meth:`Scheduler.submit`, or given back with :meth:`release` (also on leaving a
    ``with`` block) when the request fails before it is queued."""

    def __init__(self, scheduler: "Scheduler") -> None:
        self._scheduler = scheduler
        self.held = True

    def release(self) -> None:
        """Give the place back (once; later calls do nothing)."""
        with self._scheduler.cond:
            if self.held:
                self.held = False
                self._scheduler.reserved -= 1
                self._scheduler.cond.notify_all()

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class Job(GenerationRow):
    """One request for the model worker: a generation (a row of a batch, streamed or not) or,
    with ``prepared`` None, a load/unload."""

    prepared: Prepared | None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    #: The streamed answer's text pieces (None: not streamed).
    stream: TextQueue | None = None
    keep_alive: Any = _UNSET             # seconds, None = forever, _UNSET = the server's default
    deadline: float = float("inf")       # time.monotonic()
    max_new: int = 0
    decoding: tuple = ()
    key: tuple = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_event: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult = field(default_factory=GenerationResult)
    error: BaseException | None = None
    timed_out: bool = False
    timeout_counted: bool = False        # in Scheduler.timeouts (which several paths report)
    enqueued_at: float = field(default_factory=time.monotonic)
    done_reason: str = ""                # for load/unload jobs
    _loop: Any = None
    _started: Any = None
    _done: Any = None

    # GenerationRow: called by the model on the worker thread
    def should_stop(self) -> bool:
        """True once the job is cancelled or past its deadline (then it is timed out, unless its
        answer was already complete while the rest of its batch generates)."""
        if not self.cancel.is_set() and not self.finished_event.is_set() and time.monotonic() > self.deadline:
            self.timed_out = True
            self.cancel.set()
        return self.cancel.is_set()

    def started(self, at: float) -> None:
        self.result.started_at = at

    def finished(self, text: str, tokens: int, reason: str, at: float) -> None:
        """Record the answer; a row that was not stopped is complete now (even while the rest
        of its batch still generates), a stopped one is settled by the worker."""
        if self.finished_event.is_set():
            return
        res = self.result
        res.text, res.eval_count, res.done_reason, res.ended_at = text, tokens, reason, at
        if res.first_token_at is None:
            res.first_token_at = at
        if not self.cancel.is_set():
            self.finish()

    def _call(self, fut: Any, value: Any = None, exc: BaseException | None = None) -> None:
        if fut is None or self._loop is None:
            return

        def settle() -> None:
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:   # the event loop is gone (shutting down)
            pass

    def mark_started(self) -> None:
        """The worker began generating this job (ends its time in the queue)."""
        self._call(self._started, True)

    def finish(self, error: BaseException | None = None) -> None:
        """Complete the job, with ``error`` when it failed; later calls are ignored."""
        if self.finished_event.is_set():
            return
        self.error = error
        if self.result.ended_at is None:
            self.result.ended_at = time.perf_counter()
        self.finished_event.set()
        if error is not None and self.stream is not None:
            self.stream.end()
        self._call(self._started, None, error)
        self._call(self._done, self.result, error)


class Scheduler:
    """The single model worker: a bounded queue, micro-batching, timeouts and ``keep_alive``.

    * Generations that arrive within ``batch_window_s`` of the oldest waiting one (or while a
      batch runs) and share :attr:`Job.key` (decoding settings, ``num_predict``, ``seed``,
      and for BLIP the prompt's token length) run as one batched ``generate`` of up to
      ``max_batch`` images. Streamed and non-streamed requests share batches when their
      decoding matches (streaming is greedy or sampled, never beam search); each streamed
      row gets its words as they are generated and its final line as soon as it ends.
    * More than ``max_queue`` waiting requests (0: no limit) → :class:`Busy` (503); a request
      whose image is being decoded holds a :class:`Reservation` and counts as waiting.
    * A request past ``request_timeout_s`` (waiting plus generating) is withdrawn from the
      queue, or its generation stops at the next token → :class:`RequestTimeout` (504).
    * After the last request the model stays loaded for that request's ``keep_alive`` (the
      server's default unless given), then the worker unloads it; the next request reloads it.
    * The worker survives any exception: the failing batch's requests get :class:`InternalError`
      (500), the failure is logged, and the next batch runs.
    """

    def __init__(self, model: VisionLanguageModel, max_batch: int = 8, batch_window_s: float = 0.01,
                 max_queue: int = 32, request_timeout_s: float = 120.0, keep_alive: Any = "5m") -> None:
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.batch_window_s = max(0.0, float(batch_window_s))
        self.max_queue = int(max_queue)
        self.request_timeout_s = float(request_timeout_s) if request_timeout_s and request_timeout_s > 0 else None
        self.default_keep_alive = parse_keep_alive(keep_alive)
        self.cond = threading.Condition()
        self.queue: list[Job] = []
        #: Requests holding a :class:`Reservation` (decoding their image), not queued yet.
        self.reserved = 0
        self.busy = False
        self.stopping = False
        #: ``time.monotonic()`` at which the idle model is unloaded; None = never.
        self.expires_at: float | None = None
        self.expires_wall: datetime | None = None
        self._touch(self.default_keep_alive)
        # statistics
        self.batch_sizes: list[int] = []
        self.batches = 0
        self.batched_requests = 0
        self.rejected = 0
        self.timeouts = 0
        self.loads = 0
        self.unloads = 0
        self._batch_s = 0.5   # moving average of one batch's duration, for Retry-After
        self.thread = threading.Thread(target=self._run, name="vision-host-model", daemon=True)
        self.thread.start()

    # -- the request side --------------------------------------------------------------------
    def new_job(self, prepared: Prepared | None, settings: GenerationSettings | None = None,
                stream: bool = False, keep_alive: Any = _UNSET) -> Job:
        """A generation for ``prepared`` inputs (None = load/unload only), to :meth:`submit`;
        ``settings`` default to :class:`GenerationSettings`'s."""
        settings = settings or GenerationSettings()
        job = Job(prepared, settings, keep_alive=keep_alive)
        if self.request_timeout_s is not None:
            job.deadline = job.enqueued_at + self.request_timeout_s
        if prepared is None:
            job.key = ("solo", id(job))
            return job
        job.max_new = self.model.max_new_tokens(prepared, settings)
        job.decoding = self.model.decoding(settings, stream)
        job.key = self.model.batch_key(prepared, job.decoding, job.max_new, settings.seed)
        job.result.prompt_tokens = prepared.prompt_tokens
        if stream:
            job.stream = TextQueue(timeout_s=(self.request_timeout_s or 600) + 30)
        return job

    def _check_room(self) -> None:
        """Under the lock: raise Busy when ``max_queue`` requests wait (queued or reserved)."""
        waiting = len(self.queue) + self.reserved
        if self.max_queue > 0 and waiting >= self.max_queue:
            self.rejected += 1
            waves = waiting / self.max_batch + (1 if self.busy else 0)
            retry = max(1, int(-(-self._batch_s * max(1.0, waves) // 1)))
            raise Busy(f"server busy: {waiting} requests are waiting (the limit is {self.max_queue}); "
                       f"retry in {retry} s", retry)

    def reserve(self) -> Reservation:
        """A place in the queue for a request about to decode its image (any thread).

        Raises:
            Busy: the queue is full (503), before any decoding.
        """
        with self.cond:
            self._check_room()
            self.reserved += 1
            self.cond.notify_all()
        return Reservation(self)

    def submit(self, job: Job, reservation: Reservation | None = None) -> Job:
        """Queue ``job`` (from the event loop), in ``reservation``'s place when given.

        Raises:
            Busy: no reservation and the queue is full.
        """
        import asyncio

        job._loop = asyncio.get_running_loop()
        job._started = job._loop.create_future()
        job._done = job._loop.create_future()
        for fut in (job._started, job._done):
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())   # no "never retrieved" noise
        with self.cond:
            if reservation is not None and reservation.held:
                reservation.held = False
                self.reserved -= 1
            else:
                self._check_room()
            self.queue.append(job)
            self.cond.notify_all()
        return job

    def withdraw(self, job: Job) -> None:
        """Cancel ``job``: out of the queue if it has not started, else stop at the next token."""
        job.cancel.set()
        with self.cond:
            if job in self.queue:
                self.queue.remove(job)
                job.finish(RequestError(499, "cancelled"))

    def _timeout_error(self, job: Job) -> RequestTimeout:
        """The 504 for ``job``, counted in :attr:`timeouts` once per job (a stream's timeout is
        reported by the worker and again when its streamer ends; a deadline can pass for
        the waiting request and for the generation at the same time)."""
        with self.cond:
            if not job.timeout_counted:
                job.timeout_counted = True
                self.timeouts += 1
        return RequestTimeout(f"request timed out after {self.request_timeout_s:g} s (the limit set with "
                              f"--request-timeout-s); the server is overloaded or the request too long")

    async def wait_started(self, job: Job) -> None:
        """Await the start of a streaming job (or the end of a load job). Raises its error,
        or RequestTimeout past the deadline (the job is then withdrawn)."""
        await self._await(job, job._started)

    async def wait_done(self, job: Job) -> GenerationResult:
        """Await a job's result. Raises its error, or RequestTimeout past the deadline."""
        return await self._await(job, job._done)

    async def _await(self, job: Job, fut: Any) -> Any:
        import asyncio

        remaining = job.deadline - time.monotonic()
        try:
            if remaining == float("inf"):
                return await asyncio.shield(fut)
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, remaining))
        except asyncio.TimeoutError:
            self.withdraw(job)
            raise self._timeout_error(job) from None
        except RequestTimeout:
            raise
        except asyncio.CancelledError:
            self.withdraw(job)
            raise

    def stream_finished(self, job: Job) -> BaseException | None:
        """After a streamer ended: wait for the worker and say what went wrong, if anything."""
        job.finished_event.wait()
        if job.timed_out:
            return self._timeout_error(job)
        return job.error

    # -- keep_alive ------------------------------------------------------------------------------
    def _touch(self, keep_alive: Any) -> None:
        """Expire the model ``keep_alive`` seconds from now (None, or past
        :data:`MAX_KEEP_ALIVE_S`: never)."""
        if keep_alive is _UNSET:
            keep_alive = self.default_keep_alive
        if keep_alive is None or not keep_alive <= MAX_KEEP_ALIVE_S:   # (NaN never gets here)
            self.expires_at, self.expires_wall = None, None
        else:
            keep_alive = max(0.0, float(keep_alive))
            self.expires_at = time.monotonic() + keep_alive
            from datetime import timedelta
            self.expires_wall = datetime.now(timezone.utc) + timedelta(seconds=keep_alive)

    def expires_iso(self) -> str:
        """When the model unloads, as ISO 8601 UTC (Ollama's far-future date for never)."""
        if self.expires_wall is None:
            return _FOREVER_ISO
        return self.expires_wall.isoformat().replace("+00:00", "Z")

    # -- the worker --------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker thread to stop (it exits after the batch it is running)."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _unload(self) -> None:
        """Under the lock: free the model's weights (a failure is logged, and the model is not
        unloaded again until the next request touches it)."""
        try:
            self.model.unload()
            self.unloads += 1
        except Exception:  # noqa: BLE001 — the worker must keep serving
            log.exception("unloading the model failed")
            self.expires_at = self.expires_wall = None

    def _take(self) -> list[Job] | None:
        """Under the lock: wait for work; return the next batch (None to stop)."""
        while True:
            while not self.queue and not self.stopping:
                timeout = None
                if self.model.loaded and self.expires_at is not None:
                    timeout = self.expires_at - time.monotonic()
                    if timeout <= 0:
                        self._unload()
                        continue
                self.cond.wait(timeout)
            if self.stopping:
                return None
            first = self.queue[0]
            key = first.key
            if key[0] != "solo" and self.max_batch > 1:
                end = first.enqueued_at + self.batch_window_s
                while not self.stopping and first in self.queue:
                    n = sum(1 for j in self.queue if j.key == key)
                    left = end - time.monotonic()
                    if n >= self.max_batch or left <= 0:
                        break
                    self.cond.wait(left)
                if first not in self.queue:   # withdrawn meanwhile
                    continue
            batch = [j for j in self.queue if j.key == key][:self.max_batch]
            for j in batch:
                self.queue.remove(j)
            self.busy = True
            return batch

    def _run(self) -> None:
        """The worker thread: batch after batch until :meth:`stop`. No exception ends it: a
        failing batch's requests get :class:`InternalError` (500) and the failure is logged."""
        while True:
            batch: list[Job] = []
            try:
                with self.cond:
                    taken = self._take()
                if taken is None:
                    return
                batch = taken
                self._work(batch)
            except BaseException as exc:  # noqa: BLE001 — reported to the clients, the worker goes on
                log.exception("the model worker failed on a batch of %d request(s)", len(batch))
                for j in batch:
                    j.finish(exc if isinstance(exc, RequestError) else InternalError(exc))
            finally:
                self._settle(batch)

    def _settle(self, batch: list[Job]) -> None:
        """After a batch (or a failure taking one): not busy, the model's expiry from the last
        request's ``keep_alive`` (0: unload now, if nothing waits). Never raises."""
        with self.cond:
            try:
                self.busy = False
                if batch:
                    self._touch(batch[-1].keep_alive)
                    if batch[-1].keep_alive == 0 and not self.queue and self.model.loaded:
                        self._unload()
            except Exception:  # noqa: BLE001 — the worker must keep serving
                log.exception("settling a batch failed")
                self.expires_at = self.expires_wall = None
            finally:
                self.cond.notify_all()   # for wait_idle

    def _work(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for j in batch:
            if j.cancel.is_set():
                j.finish(RequestError(499, "cancelled"))
            elif now > j.deadline:
                j.timed_out = True
                j.finish(self._timeout_error(j))
            else:
                live.append(j)
        if not live:
            return
        first = live[0]
        if first.prepared is None:   # load / unload request
            if first.keep_alive == 0:
                first.done_reason = "unload"
            else:
                self._ensure_loaded(live)
                first.done_reason = "load"
            first.finish()
            return
        self._ensure_loaded(live)
        t0 = time.perf_counter()
        for j in live:
            j.result.lock_wait_s += time.monotonic() - j.enqueued_at
            j.result.batch_size = len(live)
            j.mark_started()
        self.model.generate(live, first.decoding, first.max_new, first.settings.seed)
        with self.cond:
            self.batches += 1
            self.batched_requests += len(live)
            self.batch_sizes.append(len(live))
            del self.batch_sizes[:-1000]
            self._batch_s = 0.7 * self._batch_s + 0.3 * (time.perf_counter() - t0)
        for j in live:
            if j.timed_out:
                j.finish(self._timeout_error(j))
            elif j.cancel.is_set():
                j.finish(RequestError(499, "cancelled"))
            else:
                j.finish()

    def _ensure_loaded(self, jobs: list[Job]) -> None:
        if self.model.loaded:
            return
        self.model.load_weights()
        with self.cond:
            self.loads += 1

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no request is queued or generating (the worker has settled the last
        batch, and unloaded the model if its ``keep_alive`` was 0); False if that did not
        happen within ``timeout_s`` s (None: no limit)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.busy and not self.queue, timeout_s)

    def stats(self) -> dict:
        """Batching and queue counters (``mean_batch_size``, ``recent_batch_sizes``, ``queued``,
        ``reserved`` (decoding their image), ``rejected``, ``timeouts``, ``loads``, ``unloads``, ``loaded``, …)."""
        with self.cond:
            sizes = list(self.batch_sizes)
            return {"batches": self.batches, "batched_requests": self.batched_requests,
                    "mean_batch_size": self.batched_requests / self.batches if self.batches else 0.0,
                    "max_batch_size": max(sizes) if sizes else 0, "recent_batch_sizes": sizes[-50:],
                    "queued": len(self.queue), "reserved": self.reserved, "busy": self.busy, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "rejected": self.rejected, "timeouts": self.timeouts,
                    "loads": self.loads, "unloads": self.unloads, "loaded": self.model.loaded}


# -- request parsing ------------------------------------------------------------------------------
def _go_type(v: Any) -> str:
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


#: A ``\\uD800``–``\\uDFFF`` escape: a request whose JSON has one is checked for lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """A request body as strict JSON (RFC 8259), for every API.

    Refused, with :class:`RequestError` 400 (the caller's API gives it its shape): bytes that
    are not UTF-8 JSON; ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, though Python's
    parser takes them); JSON nested too deeply for the parser (Python's recursion limit, about
    a thousand levels: far beyond any request); a string with a lone UTF-16 surrogate
    (``"\\ud800"``), which no UTF-8 text can hold.
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "invalid request body: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid character in request body: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(raw):   # rare: then check each string (pairs are fine, lone halves not)
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "invalid request body: a string holds a lone UTF-16 surrogate") from None
        except RecursionError:
            raise RequestError(400, "invalid request body: JSON nested too deeply") from None
    return body


def _parse_body(raw: bytes) -> dict:
    """An Ollama request's body: a JSON object (see :func:`parse_json`)."""
    if not raw.strip():
        raise RequestError(400, "missing request body")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(body)} into Go value of type api.Request")
    return body


def _field(body: dict, key: str, types: tuple, gotype: str, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(value)} into Go struct field .{key} of type {gotype}")
    return value


def _b64_image(s: Any) -> bytes:
    if not isinstance(s, str):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(s)} into Go struct field .images of type string")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        bad = next((i for i, c in enumerate(s) if not (c.isalnum() or c in "+/=")), len(s))
        raise RequestError(400, f"illegal base64 data at input byte {bad}") from None


def _keep_alive(body: dict) -> Any:
    """The request's ``keep_alive`` (see :func:`parse_keep_alive`), or the server's default."""
    if body.get("keep_alive") is None:
        return _UNSET
    return parse_keep_alive(body["keep_alive"])


def _decode_data_url(url: Any) -> bytes:
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- request guards and error shapes ----------------------------------------------------------------
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


def error_body(api: str, exc: RequestError) -> dict:
    """The JSON body of ``exc`` in ``api``'s (:func:`api_of`) error shape.

    * Ollama: ``{"error": message}``.
    * OpenAI: ``{"error": {"message", "type", "param", "code"}}``; ``type`` is
      ``invalid_request_error`` for 4xx (``not_found_error`` for 404), ``server_error`` for 503
      and 504, else ``api_error``; ``code`` names 403, 413, 415, 503 and 504.
    * Workers AI: the v4 envelope ``{"result": null, "success": false, "errors": [{"code",
      "message"}], "messages": []}``; codes 5006 (bad input, message prefixed ``Error: ``), 5007
      (no such model), 3040 (busy), 3007 (timeout), 3043 (internal error: ``internal error: …``).
    """
    status, message = exc.status, exc.message
    if api == "openai":
        kind = ("not_found_error" if status == 404 else "invalid_request_error" if 400 <= status < 500
                else "server_error" if status in (503, 504) else "api_error")
        code = {403: "origin_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
                503: "server_busy", 504: "timeout"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    if api == "workers-ai":
        code = exc.cf_code or {503: 3040, 504: 3007}.get(status) or (5006 if status < 500 else 3043)
        prefix = "Error: " if code == 5006 else ""
        return {"result": None, "success": False, "errors": [{"code": code, "message": prefix + message}],
                "messages": []}
    return {"error": message}


def error_response(api: str, exc: RequestError):
    """:func:`error_body` as a response with ``exc``'s status (and ``Retry-After`` for 503)."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
    media = "application/json; charset=utf-8" if api == "ollama" else "application/json"
    return JSONResponse(error_body(api, exc), status_code=exc.status, headers=headers, media_type=media)


def normalize_origin(origin: str) -> str | None:
    """An ``Origin`` header (or ``--allow-origin`` value) as ``scheme://host:port`` in lower
    case with the port always written; None when it is not an http(s) origin (``null``, a
    path, a bad port)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        return None
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    host = parts.hostname.lower()
    return f"{parts.scheme.lower()}://{f'[{host}]' if ':' in host else host}:{port}"


def origin_allowed(origin: str, server: tuple | None, allowed: frozenset = frozenset()) -> bool:
    """Whether a request carrying this ``Origin`` header may be served.

    Allowed: one of ``allowed`` (normalized by :func:`normalize_origin`), or the server's own
    origin: http or https on the port the request came in on (``server``: ASGI's
    ``scope["server"]``, the listening socket's address), with the host ``localhost``, a
    loopback address, or the address the request came in on. Anything else (another site,
    another local port, ``null``) is foreign: a web page must not drive this server.
    """
    import ipaddress

    norm = normalize_origin(origin)
    if norm is None:
        return False
    if norm in allowed:
        return True
    if not server:
        return False
    from urllib.parse import urlsplit
    parts = urlsplit(norm)
    own_host, own_port = str(server[0]).lower(), int(server[1])
    if parts.port != own_port:
        return False
    host = parts.hostname or ""
    if host in ("localhost", own_host):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyTooLarge(RequestError):
    """The request body is larger than ``--max-body-mb``: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit / 2 ** 20:g} MiB "
                              f"(--max-body-mb)")


class RequestGuard:
    """ASGI middleware in front of every route; what it refuses never reaches a route.

    * An ``Origin`` header that is not the server's own (:func:`origin_allowed`): **403**. A web
      page's ``fetch`` always sends one, so a page cannot drive the server; the official
      clients send none.
    * ``POST`` whose ``Content-Type`` is not ``application/json`` (on the Workers AI routes
      also ``image/*`` and ``application/octet-stream``, the image itself): **415**, missing
      too; ``text/plain`` and form types are what a page can send without a CORS preflight.
    * A body over ``max_body_bytes``: **413**, at once from ``Content-Length``, or once that
      many bytes of a chunked body have been read (the rest is never read).

    Errors come in the shape of the request's API (:func:`error_body`).
    """

    def __init__(self, app: Any, *, max_body_bytes: int | None = None, allowed_origins: frozenset = frozenset()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = allowed_origins

    def refusal(self, scope: dict) -> RequestError | None:
        """Why the request is refused before its route, or None."""
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, scope.get("server"), self.allowed_origins):
            return RequestError(403, f"origin {origin[:100]!r} is not allowed: this server answers no web page but "
                                     f"its own (start it with --allow-origin ORIGIN to allow one)")
        if scope.get("method") == "POST":
            given = headers.get("content-type")
            media = (given or "").split(";")[0].strip().lower()
            ok = media == "application/json" or (
                api_of(scope.get("path", "")) == "workers-ai"
                and (media.startswith("image/") or media == "application/octet-stream"))
            if not ok:
                return RequestError(415, f"unsupported Content-Type {given[:100]!r}: send application/json"
                                    if given else "missing Content-Type: send application/json")
        length = headers.get("content-length")
        if self.max_body_bytes is not None and length and length.strip().isdigit() \
                and int(length) > self.max_body_bytes:
            return BodyTooLarge(self.max_body_bytes)
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.refusal(scope)
        if problem is not None:
            await error_response(api_of(scope.get("path", "")), problem)(scope, receive, send)
            return
        limit = self.max_body_bytes
        if limit is None:
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message
        await self.app(scope, counted, send)


# -- the app ----------------------------------------------------------------------------------------
def create_app(model: VisionLanguageModel, *, max_batch: int = DEFAULT_MAX_BATCH,
               batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE,
               options: GenerationSettings | None = None, limits: GenerationLimits | None = None,
               max_body_mb: float | None = DEFAULT_MAX_BODY_MB,
               max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
               decode_threads: int = DEFAULT_DECODE_THREADS, allow_origins: Sequence[str] = ()):
    """The FastAPI app serving ``model`` (already loaded) through a :class:`Scheduler`
    (``app.state.scheduler``).

    ``options``: the generation defaults a request's own ``options`` override; ``limits``:
    bounds on a request's options (:class:`.vlm.GenerationLimits`, 400 beyond);
    ``max_body_mb``: largest request body in MiB (413 beyond); ``max_image_pixels``: most
    pixels an image may decode to, read from its header (413 beyond, nothing decoded);
    ``max_prompt_chars``: longest prompt in characters, checked before tokenising (400);
    ``decode_threads``: images decoded (and prompts tokenised) at once, the others wait in
    the queue; ``allow_origins``: web origins allowed besides the server's own (see
    :class:`RequestGuard`). None: no limit. The other keyword arguments are the scheduler's.

    Raises:
        ValueError: an ``allow_origins`` entry that is not an http(s) origin, or a limit below 1.
    """
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    limits = limits or GenerationLimits()
    origins = set()
    for origin in allow_origins:
        norm = normalize_origin(origin)
        if norm is None:
            raise ValueError(f"allow_origins: {origin!r} is not an origin (give e.g. http://localhost:3000)")
        origins.add(norm)
    for name, value in (("max_body_mb", max_body_mb), ("max_image_pixels", max_image_pixels),
                        ("max_prompt_chars", max_prompt_chars), ("decode_threads", decode_threads)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number above 0, not {value!r}")
    max_body_bytes = None if max_body_mb is None else int(max_body_mb * 2 ** 20)

    app = FastAPI(title="vision-host serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, allowed_origins=frozenset(origins))
    served = normalize_model_name(model.name)
    #: Names a request may use: the served name, and the Hub id (also as Workers AI's ``@cf/…``).
    known = {served, normalize_model_name(model.source), normalize_model_name("@cf/" + model.source)}
    defaults = options or GenerationSettings()
    scheduler = Scheduler(model, max_batch=max_batch, batch_window_s=batch_window_ms / 1000.0,
                          max_queue=max_queue, request_timeout_s=request_timeout_s, keep_alive=keep_alive)
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.stop)
    decode_slots = asyncio.Semaphore(int(decode_threads))

    # Errors: routes raise RequestError; these answer it in the shape of the request's API.
    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return error_response(api_of(request.url.path), exc)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):   # then re-raised by Starlette, and logged
        return error_response(api_of(request.url.path), InternalError(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return error_response(api_of(request.url.path), RequestError(exc.status_code, str(exc.detail)))

    def check_model(name: Any) -> None:
        if not isinstance(name, str) or normalize_model_name(name) not in known:
            raise RequestError(404, f"model '{name or ''}' not found")

    def settings_of(opts: dict) -> GenerationSettings:
        try:
            return GenerationSettings.from_options(opts, defaults, limits)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    async def queue_generation(image: bytes | None, prompt: str, settings: GenerationSettings, *,
                               raw: bool = False, stream: bool = False, keep_alive: Any = _UNSET,
                               field_name: str = "images") -> Job:
        """Check the prompt, take a place in the queue (503 when full), decode the image and
        tokenise (``decode_threads`` at once), queue the generation: its job."""
        if image is None:
            raise RequestError(400, f"model '{model.name}' answers about images: add one to \"{field_name}\"")
        if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
            raise RequestError(400, f"the prompt is {len(prompt)} characters, above this server's limit of "
                                    f"{max_prompt_chars} (--max-prompt-chars)")
        with scheduler.reserve() as place:
            async with decode_slots:
                try:
                    inputs = await run_in_threadpool(model.prepare, image, prompt, raw, max_image_pixels)
                except ImageTooLarge as exc:
                    raise RequestError(413, str(exc)) from None
                except (BadImage, PromptTooLong) as exc:
                    raise RequestError(400, str(exc)) from None
            job = scheduler.new_job(inputs, settings, stream=stream, keep_alive=keep_alive)
            scheduler.submit(job, place)
        return job

    def details() -> dict:
        return {"parent_model": "", "format": "safetensors", "family": model.family,
                "families": [model.family], "parameter_size": _param_size(model),
                "quantization_level": "F16" if model.device == "cuda" else "F32"}

    def model_entry() -> dict:
        return {"name": served, "model": served, "modified_at": model.loaded_at.isoformat(),
                "size": model.size, "digest": "", "details": details()}

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    def root():
        return "Ollama is running"

    @app.get("/api/version")
    def version():
        return {"version": OLLAMA_API_VERSION}

    @app.get("/api/tags")
    def tags():
        return {"models": [model_entry()]}

    limits_in_force = {"max_beams": limits.max_beams, "max_new_tokens": limits.max_new_tokens,
                       "max_top_k": limits.max_top_k, "max_body_bytes": max_body_bytes,
                       "max_image_pixels": max_image_pixels, "max_prompt_chars": max_prompt_chars,
                       "decode_threads": int(decode_threads)}

    @app.get("/api/ps")
    def ps():
        """The model while it is loaded (with ``expires_at``), and, as an extra field the
        clients ignore, ``vision_host``: the scheduler's statistics (batch sizes, queue) and
        ``limits``, the request limits in force."""
        models = []
        if model.loaded:
            entry = model_entry()
            entry.update(expires_at=scheduler.expires_iso(),
                         size_vram=model.size if model.device == "cuda" else 0)
            models.append(entry)
        return {"models": models, "vision_host": {**scheduler.stats(), "limits": limits_in_force}}

    @app.post("/api/show")
    async def show(request: Request):
        body = _parse_body(await request.body())
        check_model(body.get("model") or body.get("name"))
        return {"license": "", "modelfile": f"# served by vision-host serve\nFROM {model.source}\n",
                "parameters": "", "template": "{{ .Prompt }}", "details": details(),
                "model_info": {"general.architecture": model.family, "general.basename": model.source},
                "capabilities": ["completion", "vision"], "modified_at": model.loaded_at.isoformat()}

    def metrics(res: GenerationResult) -> dict:
        end = res.ended_at or time.perf_counter()
        first = res.first_token_at or end
        return {"total_duration": int((end - res.started_at + res.lock_wait_s) * 1e9),
                "load_duration": int(res.lock_wait_s * 1e9),
                "prompt_eval_count": res.prompt_tokens,
                "prompt_eval_duration": int((first - res.started_at) * 1e9),
                "eval_count": res.eval_count,
                "eval_duration": int((end - first) * 1e9)}

    async def ollama_reply(kind: str, name: str, job: Job):
        """The /api/generate or /api/chat answer (``kind`` "response" or "message") to a
        queued ``job``: a load/unload, a whole answer, or (``job.stream``) NDJSON lines."""
        def piece_obj(text: str, done: bool) -> dict:
            obj: dict[str, Any] = {"model": name, "created_at": _now()}
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
            return JSONResponse(obj, media_type="application/json; charset=utf-8")
        if job.stream is None:
            res = await scheduler.wait_done(job)
            obj = piece_obj(res.text, True)
            obj.update(done_reason=res.done_reason, **metrics(res))
            return JSONResponse(obj, media_type="application/json; charset=utf-8")
        await scheduler.wait_started(job)

        def lines() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.stream:
                    if first:
                        job.result.first_token_at = job.result.first_token_at or time.perf_counter()
                        piece = piece.lstrip()
                    if not piece:
                        continue
                    first = False
                    yield (json.dumps(piece_obj(piece, False), ensure_ascii=False, separators=(",", ":"))
                           + "\n").encode()
                problem = scheduler.stream_finished(job)
                if problem is not None:   # after the 200 went out: Ollama's last-line error
                    yield (json.dumps({"error": str(problem)}, separators=(",", ":")) + "\n").encode()
                    return
                obj = piece_obj("", True)
                obj["done_reason"] = job.result.done_reason
                obj.update(metrics(job.result))
                yield (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            except GeneratorExit:
                job.cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001
                job.cancel.set()
                log.exception("generation failed")
                yield (json.dumps({"error": str(exc)}, separators=(",", ":")) + "\n").encode()
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def load_job(keep_alive: Any) -> Job:
        """Ollama's request without prompt and images: load the model (unload with keep_alive 0)."""
        return scheduler.submit(scheduler.new_job(None, keep_alive=keep_alive))

    @app.post("/api/generate")
    async def generate(request: Request):
        body = _parse_body(await request.body())
        name = _field(body, "model", (str,), "string", "")
        check_model(name)
        prompt = _field(body, "prompt", (str,), "string", "")
        images = [_b64_image(s) for s in _field(body, "images", (list,), "[]api.ImageData", [])]
        stream = _field(body, "stream", (bool,), "bool", True)
        raw = _field(body, "raw", (bool,), "bool", False)
        settings = settings_of(_field(body, "options", (dict,), "map[string]interface {}", {}))
        keep_alive = _keep_alive(body)
        if not prompt and not images:
            return await ollama_reply("response", name, load_job(keep_alive))
        job = await queue_generation(images[-1] if images else None, prompt, settings, raw=raw, stream=stream,
                                     keep_alive=keep_alive)
        return await ollama_reply("response", name, job)

    @app.post("/api/chat")
    async def chat(request: Request):
        body = _parse_body(await request.body())
        name = _field(body, "model", (str,), "string", "")
        if not name:
            raise RequestError(400, "model is required")
        check_model(name)
        messages = _field(body, "messages", (list,), "[]api.Message", [])
        stream = _field(body, "stream", (bool,), "bool", True)
        settings = settings_of(_field(body, "options", (dict,), "map[string]interface {}", {}))
        keep_alive = _keep_alive(body)
        prompt, images = "", []
        for m in messages:
            if not isinstance(m, dict):
                raise RequestError(400, f"json: cannot unmarshal {_go_type(m)} into Go value of type api.Message")
            content = _field(m, "content", (str,), "string", "")
            if m.get("role", "user") == "user" and content.strip():
                prompt = content
            images += [_b64_image(s) for s in _field(m, "images", (list,), "[]api.ImageData", [])]
        if not messages:
            return await ollama_reply("message", name, load_job(keep_alive))
        job = await queue_generation(images[-1] if images else None, prompt, settings, stream=stream,
                                     keep_alive=keep_alive)
        return await ollama_reply("message", name, job)

    # -- OpenAI compatibility ----------------------------------------------------------------
    def oai_model(name: str) -> dict:
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(model.loaded_at.timestamp()), "owned_by": owner}

    @app.get("/v1/models")
    def v1_models():
        return {"object": "list", "data": [oai_model(served)]}

    @app.get("/v1/models/{model_id:path}")
    def v1_model(model_id: str):
        if normalize_model_name(model_id) not in known:
            raise RequestError(404, f"model '{normalize_model_name(model_id)}' not found")
        return oai_model(model_id)

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request):
        raw = await request.body()
        if not raw.strip():
            raise RequestError(400, "EOF")
        body = _parse_body(raw)
        name = _field(body, "model", (str,), "string", "")
        messages = _field(body, "messages", (list,), "[]openai.Message", [])
        if not messages:
            raise RequestError(400, "[] is too short - 'messages'")
        stream = _field(body, "stream", (bool,), "bool", False)
        include_usage = bool((_field(body, "stream_options", (dict,), "openai.StreamOptions", {}) or {})
                             .get("include_usage"))
        max_tokens = _field(body, "max_tokens", (int,), "int", None)
        if max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", (int,), "int", None)
        temperature = _field(body, "temperature", (int, float), "float64", None)
        seed = _field(body, "seed", (int,), "int", None)
        top_p = _field(body, "top_p", (int, float), "float64", None)
        settings = settings_of({"num_predict": max_tokens, "temperature": temperature, "seed": seed, "top_p": top_p})
        prompt, images = "", []
        for m in messages:
            if not isinstance(m, dict):
                raise RequestError(400, "invalid message format")
            content = m.get("content")
            texts = []
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        raise RequestError(400, "invalid message format")
                    if part.get("type") == "text":
                        texts.append(str(part.get("text") or ""))
                    elif part.get("type") == "image_url":
                        images.append(_decode_data_url(part.get("image_url")))
                    else:
                        raise RequestError(400, "invalid message format")
            elif content is None and m.get("role") != "assistant":
                raise RequestError(400, "invalid message content type: <nil>")
            if m.get("role", "user") == "user":
                for t in texts:
                    if t.strip():
                        prompt = t
        if not name:
            raise RequestError(400, "model is required")
        check_model(name)
        job = await queue_generation(images[-1] if images else None, prompt, settings, stream=stream)
        cid = f"chatcmpl-{int(time.time() * 1000) % 1000}"
        created = int(time.time())
        finish = {"stop": "stop", "length": "length"}

        def usage(res: GenerationResult) -> dict:
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.eval_count,
                    "total_tokens": res.prompt_tokens + res.eval_count}

        if not stream:
            res = await scheduler.wait_done(job)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                                 "system_fingerprint": "fp_ollama",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                              "finish_reason": finish.get(res.done_reason, "stop")}],
                                 "usage": usage(res)})
        await scheduler.wait_started(job)

        def chunk(delta: dict, reason: str | None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        def events() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.stream:
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
                    yield f"data: {json.dumps({'error': {'message': str(problem), 'type': kind}})}\n\n".encode()
                else:
                    item = job.result
                    yield chunk({}, finish.get(item.done_reason, "stop"))
                    if include_usage:
                        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                               "system_fingerprint": "fp_ollama", "choices": [], "usage": usage(item)}
                        yield f"data: {json.dumps(obj)}\n\n".encode()
            except GeneratorExit:
                job.cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'api_error'}})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # -- Cloudflare Workers AI schema ------------------------------------------------------------
    async def workers_ai(model_id: str, request: Request):
        """``@cf/llava-hf/llava-1.5-7b-hf``'s schema: ``image`` (the file's bytes as an array
        of integers, as base64, or the whole request body when it is sent as ``image/*`` or
        ``application/octet-stream``), ``prompt`` or ``messages`` (exactly one),
        ``max_tokens`` (512, or ``--max-new-tokens`` when lower), ``temperature``, ``top_p``,
        ``top_k``, ``seed``, ``repetition_penalty``, ``raw`` → ``{"result": {"description"},
        "success"}``; errors in the v4 envelope (:func:`error_body`)."""
        if normalize_model_name(model_id) not in known:
            raise RequestError(400, f"No such model {model_id} or task", cf_code=5007)
        raw_body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not raw_body.lstrip().startswith(b"{"):
            body, image = {"prompt": "Describe this image."}, raw_body   # a binary upload: the image itself
        else:
            body = parse_json(raw_body)
            if not isinstance(body, dict):
                raise RequestError(400, "the request body is not a JSON object")
            image = body.get("image")
            if isinstance(image, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                                               for v in image):
                image = bytes(image)
            elif isinstance(image, str):
                try:
                    image = base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    raise RequestError(400, "'image' is a string but not base64") from None
            else:
                raise RequestError(400, "required properties at '/' are 'image' (an array of integers 0-255)")
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
        opts = {"num_predict": body.get("max_tokens", min(WORKERS_AI_MAX_TOKENS, limits.max_new_tokens))}
        for key in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
            opts[key] = body.get(key)
        settings = settings_of(opts)
        job = await queue_generation(image, prompt, settings, raw=bool(body.get("raw")), field_name="image")
        res = await scheduler.wait_done(job)
        return JSONResponse({"result": {"description": res.text}, "success": True, "errors": [], "messages": []})

    @app.post("/client/v4/accounts/{account_id}/ai/run/{model_id:path}")
    async def workers_ai_account(account_id: str, model_id: str, request: Request):
        return await workers_ai(model_id, request)

    @app.post("/ai/run/{model_id:path}")
    async def workers_ai_short(model_id: str, request: Request):
        return await workers_ai(model_id, request)

    return app


def _param_size(model: VisionLanguageModel) -> str:
    n = model.n_params
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


# -- running --------------------------------------------------------------------------------------
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
        import errno
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
          allow_origins: Sequence[str] = ()) -> None:
    """Bind ``host:port`` (first, so a taken port fails fast), load the model, serve until stopped.

    ``model``: alias, Hub id or ``save_pretrained`` directory (see :func:`.vlm.open_model`);
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
    from the image's header; 40 000 000) → 413; ``max_prompt_chars`` (32 768) → 400;
    ``decode_threads`` (images decoded at once; 2); ``allow_origins``: web origins allowed
    besides the server's own (others get 403).

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
                        ("max-prompt-chars", max_prompt_chars), ("decode-threads", decode_threads)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ServeError(f"--{name} must be a number above 0, not {value}")
    for origin in allow_origins:
        if normalize_origin(origin) is None:
            raise ServeError(f"--allow-origin {origin}: not a web origin (give e.g. http://localhost:3000)")
    unknown = set(options or {}) - set(GenerationSettings.OPTION_NAMES)
    if unknown:
        raise ServeError(f"--option {sorted(unknown)[0]}: unknown (known: {', '.join(GenerationSettings.OPTION_NAMES)})")
    sock = bind_socket(host, port)
    try:
        try:
            vlm = open_model(model)
            print(f"vision-host serve: loading {vlm.source} ({vlm.family}) …", file=status, flush=True)
            vlm.load()
        except ModelLoadError as exc:
            raise ServeError(str(exc)) from None
        app = create_app(vlm, max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         request_timeout_s=request_timeout_s, keep_alive=keep_alive, options=defaults,
                         limits=limits, max_body_mb=max_body_mb, max_image_pixels=max_image_pixels,
                         max_prompt_chars=max_prompt_chars, decode_threads=decode_threads,
                         allow_origins=allow_origins)
        shown = f"[{host}]" if ":" in host else host
        print(f"vision-host serve: {normalize_model_name(vlm.name)} ({vlm.source}, {vlm.family}, {vlm.device}) "
              f"loaded in {vlm.load_duration_ns / 1e9:.1f} s; Ollama API on http://{shown}:{port} "
              f"(OpenAI API under /v1, Workers AI under /ai/run)", file=status, flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                                timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
