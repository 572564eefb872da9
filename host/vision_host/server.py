"""``vision-host serve``: an embedded vision server that speaks Ollama's API.

Ollama clients (the official ``ollama`` library, ``curl``, vision-host's own ``ollama``
processor) and OpenAI clients (through Ollama's ``/v1`` compatibility layer) work unchanged
against it. The model runs in-process with Hugging Face transformers:

* ``GET /`` → ``Ollama is running``; ``GET /api/version``; ``GET /api/tags``, ``GET /api/ps``
  (the loaded model, as ``NAME:latest``); ``POST /api/show``.
* ``POST /api/generate`` (``model``, ``prompt``, ``images`` as base64, ``stream`` default true,
  ``options.num_predict``, ``options.temperature``, ``options.seed``): NDJSON lines
  ``{"model","created_at","response","done":false}`` then a final ``"done":true`` line with
  ``done_reason`` (``"stop"``, or ``"length"`` when ``num_predict`` cut it short) and Ollama's
  metrics (durations in ns); ``"stream": false`` → one JSON object.
* ``POST /api/chat``: the same with ``messages[]`` (``content``, ``images``) and
  ``"message": {"role": "assistant", "content": ...}``.
* ``POST /v1/chat/completions`` (content parts with ``image_url`` data URLs; ``stream`` → SSE
  ``chat.completion.chunk`` events then ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``.
* Errors as Ollama sends them: ``{"error": "..."}`` — 404 ``model 'x' not found``, 400 for bad
  bodies and images (on ``/v1``, OpenAI's ``{"error": {"message", "type", ...}}``).

The model is BLIP image captioning (``BlipForConditionalGeneration`` + ``BlipProcessor``):
the image is captioned with the prompt as the text prefix (an empty prompt gives an
unconditional caption), and the reply is the continuation after that prefix. Without
streaming, beam search with 3 beams; when streaming, greedy decoding through
``TextIteratorStreamer`` on a worker thread so tokens are sent as they are generated. A
positive ``temperature`` samples instead. ``num_predict`` / ``max_tokens`` cap the new tokens
(default :data:`DEFAULT_MAX_NEW_TOKENS`). With several images the last one is captioned.

Scheduling (:class:`Scheduler`): one model worker thread runs every generation.

* **Micro-batching**: non-streaming requests that arrive within ``batch_window_ms`` (10 ms) of
  the oldest waiting one, or while a batch runs, share one batched ``generate`` of up to
  ``max_batch`` (8) images when their settings match (prompt length, ``num_predict``,
  sampling ``temperature``, ``seed``); others run in their own batches. **Streaming requests
  run one at a time** on the same worker, in arrival order with the batches. Batch sizes are
  in ``/api/ps`` under the extra field ``vision_host`` (``mean_batch_size``, ...).
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

Limits: BLIP only; one process, one model; batching needs equal prompt lengths.

torch and transformers are imported lazily (inside functions), so importing this module, and
``vision-host run``, never loads them.
"""


import base64
import binascii
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("vision_host.server")

#: Short names accepted by ``--model``.
MODEL_ALIASES = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip-base": "Salesforce/blip-image-captioning-base",
}
DEFAULT_MODEL = "blip"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_MAX_NEW_TOKENS = 40
DEFAULT_NUM_BEAMS = 3
#: Scheduling defaults (see :class:`Scheduler` and :func:`serve`).
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WINDOW_MS = 10.0
DEFAULT_MAX_QUEUE = 32
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEFAULT_KEEP_ALIVE = "5m"
#: What ``/api/version`` answers: the Ollama API level this server follows.
OLLAMA_API_VERSION = "0.12.0"


class ServeError(Exception):
    """The server cannot start (port in use, model not loadable): the message says what to do."""


class ModelLoadError(ServeError):
    """The model's weights or processor cannot be loaded."""


class RequestError(Exception):
    """A request the server refuses: ``status`` and Ollama's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- model names -------------------------------------------------------------------------------
def normalize_model_name(name: str) -> str:
    """Ollama's matching: case-insensitive, and a name without a tag means ``:latest``."""
    name = (name or "").strip().lower()
    if not name:
        return ""
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def resolve_model(spec: str) -> tuple[str, str, bool]:
    """``--model`` → ``(served name, source, is_local_dir)``.

    ``spec`` is an alias (``blip``), a local directory saved with ``save_pretrained``, or a
    Hugging Face Hub id (``Salesforce/blip-image-captioning-large``).
    """
    spec = spec.strip()
    if spec.lower() in MODEL_ALIASES:
        return spec.lower(), MODEL_ALIASES[spec.lower()], False
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name.lower() or "model", str(path.resolve()), True
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelLoadError(f"--model {spec}: no such directory (give a directory saved with "
                             f"save_pretrained, a Hugging Face Hub id, or one of {', '.join(MODEL_ALIASES)})")
    return spec.lower(), spec, False


# -- the model ----------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What one generation produced (filled in as it runs)."""

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


class BlipCaptioner:
    """BLIP captioning on CPU (float32) or CUDA (float16).

    Only the :class:`Scheduler`'s worker thread calls :meth:`generate_batch`,
    :meth:`generate_stream`, :meth:`load_weights` and :meth:`unload`; :meth:`prepare` (image
    decoding, tokenising) runs on any thread, also while the weights are unloaded.
    """

    family = "blip"

    def __init__(self, spec: str = DEFAULT_MODEL) -> None:
        self.name, self.source, self.local = resolve_model(spec)
        self.loaded_at = datetime.now(timezone.utc)
        self.load_duration_ns = 0
        self.model = self.processor = None
        self.config = None
        self.dtype = None
        self.device = "cpu"
        self.size = 0
        self.n_params = 0

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory (False after a keep_alive unload)."""
        return self.model is not None

    def load(self) -> "BlipCaptioner":
        """Load the processor and weights (local cache first, then the Hub unless offline).

        Raises:
            ModelLoadError: not cached and not downloadable, or not a BLIP captioning model.
        """
        t0 = time.perf_counter()
        try:
            import torch
            from transformers import BlipForConditionalGeneration, BlipProcessor
        except ImportError as exc:
            raise ModelLoadError(f"the serve extra is not installed ({exc.name} is missing): "
                                 f"pip install 'vision-host[serve]'") from None
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        cuda = torch.cuda.is_available()
        dtype = torch.float16 if cuda else torch.float32
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

        def attempt(local_only: bool):
            proc = BlipProcessor.from_pretrained(self.source, local_files_only=local_only)
            mod = BlipForConditionalGeneration.from_pretrained(self.source, local_files_only=local_only, dtype=dtype)
            return proc, mod

        try:
            try:
                self.processor, self.model = attempt(True)
            except OSError:
                if self.local or offline:
                    raise
                log.warning("model %s is not in the local Hugging Face cache: downloading it", self.source)
                self.processor, self.model = attempt(False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(self._load_error(exc, offline)) from None
        if getattr(self.model.config, "model_type", None) != "blip":
            raise ModelLoadError(f"model {self.source} is a {self.model.config.model_type!r} model: "
                                 f"vision-host serve runs BLIP captioning models (e.g. --model blip)")
        self.device = "cuda" if cuda else "cpu"
        self.dtype = dtype
        self.config = self.model.config
        self.model.to(self.device).eval()
        self.size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        self.loaded_at = datetime.now(timezone.utc)
        return self

    def load_weights(self) -> float:
        """Reload the weights after :meth:`unload` (from the local cache): seconds it took."""
        if self.model is not None:
            return 0.0
        t0 = time.perf_counter()
        from transformers import BlipForConditionalGeneration
        try:
            model = BlipForConditionalGeneration.from_pretrained(self.source, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot reload model {self.source}: {str(exc).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        self.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        self.loaded_at = datetime.now(timezone.utc)
        log.info("model %s reloaded in %.2f s", self.source, self.load_duration_ns / 1e9)
        return self.load_duration_ns / 1e9

    def unload(self) -> None:
        """Drop the weights (the processor stays: it is small and :meth:`prepare` needs it)."""
        if self.model is None:
            return
        self.model = None
        import gc
        gc.collect()
        if self.device == "cuda":
            import torch
            torch.cuda.empty_cache()
        log.info("model %s unloaded", self.source)

    def _load_error(self, exc: Exception, offline: bool) -> str:
        if self.local:
            return (f"cannot load model from {self.source}: {str(exc).splitlines()[0]} (the directory must hold a "
                    f"BLIP captioning model and its processor, saved with save_pretrained)")
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        why = ("the Hugging Face Hub is off (HF_HUB_OFFLINE=1)" if offline
               else f"it could not be downloaded ({str(exc).splitlines()[0]})")
        return (f"cannot load model {self.source}: its weights are not in the local Hugging Face cache "
                f"({cache}) and {why}. On a machine with internet run `huggingface-cli download {self.source}` "
                f"(or `hf download {self.source}`) and copy the cache here, or pass --model DIR with a "
                f"directory saved with save_pretrained")

    # -- inference --------------------------------------------------------------------------
    def prepare(self, image_bytes: bytes, prompt: str) -> dict:
        """Decode the image and build the model inputs. Raises RequestError(400) for a bad image."""
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(image_bytes))
            image.load()
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise RequestError(400, "Failed to load image or audio file") from None
        prompt = prompt.strip()
        if prompt:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        out = {}
        for k, v in inputs.items():
            if k == "pixel_values":
                v = v.to(self.device, dtype=self.dtype)
            else:
                v = v.to(self.device)
            out[k] = v
        return out

    def max_new_tokens(self, inputs: dict, num_predict: int | None) -> int:
        """Tokens to generate: ``num_predict`` (default :data:`DEFAULT_MAX_NEW_TOKENS`), capped
        so prompt plus answer fit the text model's position limit."""
        limit = int(getattr(self.config.text_config, "max_position_embeddings", 512))
        prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
        room = max(1, limit - prompt_len)
        n = num_predict if num_predict and num_predict > 0 else DEFAULT_MAX_NEW_TOKENS
        return min(n, room)

    def _kwargs(self, job: "Job", jobs: list["Job"]) -> dict:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        kwargs: dict[str, Any] = {"max_new_tokens": job.max_new}
        if job.temperature is not None and job.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(job.temperature), num_beams=1)
        elif job.stream:
            kwargs.update(do_sample=False, num_beams=1)
        else:
            kwargs.update(do_sample=False, num_beams=DEFAULT_NUM_BEAMS)
        if job.seed is not None:
            torch.manual_seed(int(job.seed))

        class Stop(StoppingCriteria):
            """Per request: stop its row once it is cancelled (client gone) or past its deadline."""

            def __call__(self, input_ids, scores, **kw):
                now = time.monotonic()
                flags = []
                for j in jobs:
                    if not j.cancel.is_set() and now > j.deadline:
                        j.timed_out = True
                        j.cancel.set()
                    flags.append(j.cancel.is_set())
                n = input_ids.shape[0]
                if n % len(jobs):
                    return torch.full((n,), all(flags), dtype=torch.bool, device=input_ids.device)
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device).repeat_interleave(n // len(jobs))
        kwargs["stopping_criteria"] = StoppingCriteriaList([Stop()])
        return kwargs

    def _finish(self, job: "Job", ids: list[int]) -> None:
        """Fill in ``job.result`` from the new token ids of its row."""
        eos = self.config.text_config.sep_token_id
        if eos in ids:
            ids = ids[:ids.index(eos) + 1]
        res = job.result
        res.eval_count = len(ids)
        ended_on_eos = bool(ids) and ids[-1] == eos
        res.done_reason = "length" if res.eval_count >= job.max_new and not ended_on_eos else "stop"
        res.ended_at = time.perf_counter()

    def generate_batch(self, jobs: list["Job"]) -> None:
        """One batched ``generate`` for non-streaming jobs sharing :attr:`Job.key` (same prompt
        length and generation settings); fills in each job's result."""
        import torch

        first = jobs[0]
        inputs = {k: torch.cat([j.inputs[k] for j in jobs]) for k in first.inputs}
        kwargs = self._kwargs(first, jobs)
        t0 = time.perf_counter()
        for j in jobs:
            j.result.started_at = t0
            j.result.batch_size = len(jobs)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        t1 = time.perf_counter()
        for i, j in enumerate(jobs):
            j.result.first_token_at = t1
            ids = sequences[i][first.prompt_len:].tolist()
            self._finish(j, ids)
            eos = self.config.text_config.sep_token_id
            kept = ids[:ids.index(eos) + 1] if eos in ids else ids
            j.result.text = self.processor.decode(kept, skip_special_tokens=True).strip()

    def generate_stream(self, job: "Job") -> None:
        """Greedy (or sampled) ``generate`` for one streaming job, feeding ``job.streamer``."""
        import torch

        kwargs = self._kwargs(job, [job])
        job.result.started_at = time.perf_counter()
        try:
            with torch.inference_mode():
                sequences = self.model.generate(**job.inputs, streamer=job.streamer, **kwargs)
        except BaseException:
            job.streamer.end()
            raise
        self._finish(job, sequences[0][job.prompt_len:].tolist())


# -- scheduling ------------------------------------------------------------------------------------
_FOREVER_ISO = "2318-01-01T00:00:00Z"
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive`` → seconds to stay loaded after a request; ``None`` = forever.

    A number is seconds; a string is a Go duration (``"5m"``, ``"1h30m"``, ``"10s"``,
    ``"-1"``) or a bare number of seconds; 0 unloads at once, a negative value keeps the model
    loaded forever. Raises RequestError(400) for anything else.
    """
    import re

    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(value)} into Go struct field .keep_alive "
                                f"of type api.Duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        s = value.strip()
        try:
            seconds = float(s)
        except ValueError:
            m = re.fullmatch(r"([-+]?)((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)", s)
            if not m:
                raise RequestError(400, f'time: invalid duration "{value}"') from None
            seconds = sum(float(n) * _DURATION_UNITS[u]
                          for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", m.group(2)))
            if m.group(1) == "-":
                seconds = -seconds
    return None if seconds < 0 else seconds


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


@dataclass(eq=False)
class Job:
    """One request for the model worker: a generation (batched, or streamed) or a load/unload."""

    inputs: dict | None
    num_predict: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stream: bool = False
    keep_alive: Any = _UNSET             # seconds, None = forever, _UNSET = the server's default
    deadline: float = float("inf")       # time.monotonic()
    max_new: int = 0
    prompt_len: int = 1
    streamer: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult = field(default_factory=GenerationResult)
    error: BaseException | None = None
    timed_out: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)
    done_reason: str = ""                # for load/unload jobs
    _loop: Any = None
    _started: Any = None
    _done: Any = None

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one batched ``generate``."""
        if self.inputs is None or self.stream:
            return ("solo", id(self))
        return ("batch", self.prompt_len, self.max_new, self.temperature if (self.temperature or 0) > 0 else None,
                self.seed)

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
        if self.finished.is_set():
            return
        self.error = error
        if self.result.ended_at is None:
            self.result.ended_at = time.perf_counter()
        self.finished.set()
        if error is not None and self.streamer is not None:
            self.streamer.end()
        self._call(self._started, None, error)
        self._call(self._done, self.result, error)


class Scheduler:
    """The single model worker: a bounded queue, micro-batching, timeouts and ``keep_alive``.

    * Non-streaming generations that arrive within ``batch_window_s`` of the oldest waiting one
      (or while a batch runs) and share :attr:`Job.key` run as one batched ``generate`` of up
      to ``max_batch`` images; different settings or prompt lengths go to separate batches.
    * Streaming generations run one at a time on the same worker (batching them would make
      every stream wait for the slowest), in arrival order with the batches.
    * More than ``max_queue`` waiting requests (0: no limit) → :class:`Busy` (503).
    * A request past ``request_timeout_s`` (waiting plus generating) is withdrawn from the
      queue, or its generation stops at the next token → :class:`RequestTimeout` (504).
    * After the last request the model stays loaded for that request's ``keep_alive`` (the
      server's default unless given), then the worker unloads it; the next request reloads it.
    """

    def __init__(self, captioner: BlipCaptioner, max_batch: int = 8, batch_window_s: float = 0.01,
                 max_queue: int = 32, request_timeout_s: float = 120.0, keep_alive: Any = "5m") -> None:
        self.captioner = captioner
        self.max_batch = max(1, int(max_batch))
        self.batch_window_s = max(0.0, float(batch_window_s))
        self.max_queue = int(max_queue)
        self.request_timeout_s = float(request_timeout_s) if request_timeout_s and request_timeout_s > 0 else None
        self.default_keep_alive = parse_keep_alive(keep_alive)
        self.cond = threading.Condition()
        self.queue: list[Job] = []
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
    def new_job(self, inputs: dict | None, opts: tuple = (None, None, None), stream: bool = False,
                keep_alive: Any = _UNSET) -> Job:
        """Queue a generation (``inputs`` None = load/unload only); ``opts`` is (num_predict,
        temperature, seed). Raises :class:`Busy` (503) when the queue is full."""
        num_predict, temperature, seed = opts
        job = Job(inputs, num_predict, temperature, seed, stream, keep_alive)
        if self.request_timeout_s is not None:
            job.deadline = job.enqueued_at + self.request_timeout_s
        if inputs is not None:
            job.max_new = self.captioner.max_new_tokens(inputs, num_predict)
            ids = inputs.get("input_ids")
            # BLIP's generate drops the trailing [SEP] of the prompt and starts with [BOS].
            job.prompt_len = ids.shape[1] - 1 if ids is not None else 1
            job.result.prompt_tokens = job.prompt_len
        if stream:
            from transformers import TextIteratorStreamer
            wait = (self.request_timeout_s or 600) + 30
            job.streamer = TextIteratorStreamer(self.captioner.processor.tokenizer, skip_prompt=True, timeout=wait,
                                                skip_special_tokens=True)
        return job

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (from the event loop). Raises Busy when the queue is full."""
        import asyncio

        job._loop = asyncio.get_running_loop()
        job._started = job._loop.create_future()
        job._done = job._loop.create_future()
        for fut in (job._started, job._done):
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())   # no "never retrieved" noise
        with self.cond:
            if self.max_queue > 0 and len(self.queue) >= self.max_queue:
                self.rejected += 1
                waves = len(self.queue) / self.max_batch + (1 if self.busy else 0)
                retry = max(1, int(-(-self._batch_s * max(1.0, waves) // 1)))
                raise Busy(f"server busy: {len(self.queue)} requests are waiting (the limit is {self.max_queue}); "
                           f"retry in {retry} s", retry)
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
        with self.cond:
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
        job.finished.wait()
        if job.timed_out:
            return self._timeout_error(job)
        return job.error

    # -- keep_alive ------------------------------------------------------------------------------
    def _touch(self, keep_alive: Any) -> None:
        """Expire the model ``keep_alive`` seconds from now (None: never)."""
        if keep_alive is _UNSET:
            keep_alive = self.default_keep_alive
        if keep_alive is None:
            self.expires_at, self.expires_wall = None, None
        else:
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

    def _take(self) -> list[Job] | None:
        """Under the lock: wait for work; return the next batch (None to stop)."""
        while True:
            while not self.queue and not self.stopping:
                timeout = None
                if self.captioner.loaded and self.expires_at is not None:
                    timeout = self.expires_at - time.monotonic()
                    if timeout <= 0:
                        self.captioner.unload()
                        self.unloads += 1
                        continue
                self.cond.wait(timeout)
            if self.stopping:
                return None
            first = self.queue[0]
            key = first.key
            if key[0] == "batch" and self.max_batch > 1:
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
        while True:
            with self.cond:
                batch = self._take()
            if batch is None:
                return
            try:
                self._work(batch)
            except BaseException as exc:  # noqa: BLE001 — reported to the clients
                log.exception("generation failed")
                for j in batch:
                    j.finish(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            finally:
                with self.cond:
                    self.busy = False
                    self._touch(batch[-1].keep_alive)
                    if batch[-1].keep_alive == 0 and not self.queue and self.captioner.loaded:
                        self.captioner.unload()
                        self.unloads += 1

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
        if first.inputs is None:   # load / unload request
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
            j.mark_started()
        if first.stream:
            self.captioner.generate_stream(first)
        else:
            self.captioner.generate_batch(live)
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
        if self.captioner.loaded:
            return
        self.captioner.load_weights()
        with self.cond:
            self.loads += 1

    def stats(self) -> dict:
        """Batching and queue counters (``mean_batch_size``, ``recent_batch_sizes``, ``queued``,
        ``rejected``, ``timeouts``, ``loads``, ``unloads``, ``loaded``, …)."""
        with self.cond:
            sizes = list(self.batch_sizes)
            return {"batches": self.batches, "batched_requests": self.batched_requests,
                    "mean_batch_size": self.batched_requests / self.batches if self.batches else 0.0,
                    "max_batch_size": max(sizes) if sizes else 0, "recent_batch_sizes": sizes[-50:],
                    "queued": len(self.queue), "busy": self.busy, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "rejected": self.rejected, "timeouts": self.timeouts,
                    "loads": self.loads, "unloads": self.unloads, "loaded": self.captioner.loaded}


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


def _parse_body(raw: bytes) -> dict:
    if not raw.strip():
        raise RequestError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid character in request body: {exc}") from None
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


def _options(body: dict) -> tuple[int | None, float | None, int | None]:
    opts = _field(body, "options", (dict,), "map[string]interface {}", {})
    def num(key, cast):
        v = opts.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(400, f"option {key!r} must be a number, not {_go_type(v)}")
        return cast(v)
    return num("num_predict", int), num("temperature", float), num("seed", int)


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


# -- the app ----------------------------------------------------------------------------------------
def create_app(captioner: BlipCaptioner, *, max_batch: int = DEFAULT_MAX_BATCH,
               batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE):
    """The FastAPI app serving ``captioner`` (already loaded) through a :class:`Scheduler`
    (``app.state.scheduler``); the keyword arguments are the scheduler's settings."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    app = FastAPI(title="vision-host serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    served = normalize_model_name(captioner.name)
    scheduler = Scheduler(captioner, max_batch=max_batch, batch_window_s=batch_window_ms / 1000.0,
                          max_queue=max_queue, request_timeout_s=request_timeout_s, keep_alive=keep_alive)
    app.state.scheduler = scheduler
    app.router.on_shutdown.append(scheduler.stop)

    def headers_of(exc: Exception | None) -> dict | None:
        return {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None

    def err(status: int, message: str, exc: Exception | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, media_type="application/json; charset=utf-8",
                            headers=headers_of(exc))

    def oai_err(status: int, message: str, exc: Exception | None = None) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 503: "server_error",
                504: "server_error"}.get(status, "api_error")
        code = {503: "server_busy", 504: "timeout"}.get(status)
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                            status_code=status, headers=headers_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return err(exc.status_code, str(exc.detail))

    def check_model(name: Any) -> None:
        if not isinstance(name, str) or normalize_model_name(name) != served:
            raise RequestError(404, f"model '{name or ''}' not found")

    def details() -> dict:
        return {"parent_model": "", "format": "safetensors", "family": captioner.family,
                "families": [captioner.family], "parameter_size": _param_size(captioner),
                "quantization_level": "F16" if captioner.device == "cuda" else "F32"}

    def model_entry() -> dict:
        return {"name": served, "model": served, "modified_at": captioner.loaded_at.isoformat(),
                "size": captioner.size, "digest": "", "details": details()}

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

    @app.get("/api/ps")
    def ps():
        """The model while it is loaded (with ``expires_at``), and, as an extra field the
        clients ignore, ``vision_host``: the scheduler's statistics (batch sizes, queue)."""
        models = []
        if captioner.loaded:
            entry = model_entry()
            entry.update(expires_at=scheduler.expires_iso(),
                         size_vram=captioner.size if captioner.device == "cuda" else 0)
            models.append(entry)
        return {"models": models, "vision_host": scheduler.stats()}

    @app.post("/api/show")
    async def show(request: Request):
        try:
            body = _parse_body(await request.body())
            check_model(body.get("model") or body.get("name"))
        except RequestError as exc:
            return err(exc.status, exc.message)
        return {"license": "", "modelfile": f"# served by vision-host serve\nFROM {captioner.source}\n",
                "parameters": "", "template": "{{ .Prompt }}", "details": details(),
                "model_info": {"general.architecture": captioner.family, "general.basename": captioner.source},
                "capabilities": ["completion", "vision"], "modified_at": captioner.loaded_at.isoformat()}

    def metrics(res: GenerationResult) -> dict:
        end = res.ended_at or time.perf_counter()
        first = res.first_token_at or end
        return {"total_duration": int((end - res.started_at + res.lock_wait_s) * 1e9),
                "load_duration": int(res.lock_wait_s * 1e9),
                "prompt_eval_count": res.prompt_tokens,
                "prompt_eval_duration": int((first - res.started_at) * 1e9),
                "eval_count": res.eval_count,
                "eval_duration": int((end - first) * 1e9)}

    async def ollama_reply(kind: str, name: str, inputs: dict | None, opts: tuple, stream: bool, keep_alive: Any):
        """The /api/generate or /api/chat answer (``kind`` "response" or "message")."""
        def piece_obj(text: str, done: bool) -> dict:
            obj: dict[str, Any] = {"model": name, "created_at": _now()}
            if kind == "response":
                obj["response"] = text
            else:
                obj["message"] = {"role": "assistant", "content": text}
            obj["done"] = done
            return obj

        job = scheduler.new_job(inputs, opts, stream=stream and inputs is not None, keep_alive=keep_alive)
        scheduler.submit(job)
        if inputs is None:   # nothing to caption: Ollama's "load" (or, with keep_alive 0, "unload") answer
            await scheduler.wait_done(job)
            obj = piece_obj("", True)
            obj["done_reason"] = job.done_reason
            return JSONResponse(obj, media_type="application/json; charset=utf-8")
        if not stream:
            res = await scheduler.wait_done(job)
            obj = piece_obj(res.text, True)
            obj.update(done_reason=res.done_reason, **metrics(res))
            return JSONResponse(obj, media_type="application/json; charset=utf-8")
        await scheduler.wait_started(job)

        def lines() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.streamer:
                    if first:
                        job.result.first_token_at = job.result.first_token_at or time.perf_counter()
                        piece = piece.lstrip()
                    if not piece:
                        continue
                    first = False
                    job.result.text += piece
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

    async def answer(kind: str, name: str, inputs, opts, stream: bool, keep_alive: Any):
        try:
            return await ollama_reply(kind, name, inputs, opts, stream, keep_alive)
        except RequestError as exc:
            return err(exc.status, exc.message, exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            return err(500, str(exc))

    async def prepared(image: bytes | None, prompt: str):
        if image is None:
            raise RequestError(400, f"model '{captioner.name}' captions images: add one to \"images\"")
        return await run_in_threadpool(captioner.prepare, image, prompt)

    @app.post("/api/generate")
    async def generate(request: Request):
        try:
            body = _parse_body(await request.body())
            name = _field(body, "model", (str,), "string", "")
            check_model(name)
            prompt = _field(body, "prompt", (str,), "string", "")
            images = [_b64_image(s) for s in _field(body, "images", (list,), "[]api.ImageData", [])]
            stream = _field(body, "stream", (bool,), "bool", True)
            opts = _options(body)
            keep_alive = _keep_alive(body)
            if not prompt and not images:
                inputs = None
            else:
                inputs = await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return err(exc.status, exc.message)
        return await answer("response", name, inputs, opts, stream, keep_alive)

    @app.post("/api/chat")
    async def chat(request: Request):
        try:
            body = _parse_body(await request.body())
            name = _field(body, "model", (str,), "string", "")
            if not name:
                raise RequestError(400, "model is required")
            check_model(name)
            messages = _field(body, "messages", (list,), "[]api.Message", [])
            stream = _field(body, "stream", (bool,), "bool", True)
            opts = _options(body)
            keep_alive = _keep_alive(body)
            prompt, images = "", []
            for m in messages:
                if not isinstance(m, dict):
                    raise RequestError(400, f"json: cannot unmarshal {_go_type(m)} into Go value of type api.Message")
                content = _field(m, "content", (str,), "string", "")
                if m.get("role", "user") == "user" and content.strip():
                    prompt = content
                images += [_b64_image(s) for s in _field(m, "images", (list,), "[]api.ImageData", [])]
            inputs = None if not messages else await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return err(exc.status, exc.message)
        return await answer("message", name, inputs, opts, stream, keep_alive)

    # -- OpenAI compatibility ----------------------------------------------------------------
    def oai_model(name: str) -> dict:
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(captioner.loaded_at.timestamp()), "owned_by": owner}

    @app.get("/v1/models")
    def v1_models():
        return {"object": "list", "data": [oai_model(served)]}

    @app.get("/v1/models/{model:path}")
    def v1_model(model: str):
        if normalize_model_name(model) != served:
            return oai_err(404, f"model '{normalize_model_name(model)}' not found")
        return oai_model(model)

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request):
        try:
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
            inputs = await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return oai_err(exc.status, exc.message)
        cid = f"chatcmpl-{int(time.time() * 1000) % 1000}"
        created = int(time.time())
        finish = {"stop": "stop", "length": "length"}

        def usage(res: GenerationResult) -> dict:
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.eval_count,
                    "total_tokens": res.prompt_tokens + res.eval_count}

        job = scheduler.new_job(inputs, (max_tokens, temperature, seed), stream=stream)
        try:
            scheduler.submit(job)
            if stream:
                await scheduler.wait_started(job)
            else:
                res = await scheduler.wait_done(job)
        except RequestError as exc:
            return oai_err(exc.status, exc.message, exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            return oai_err(500, str(exc))
        if not stream:
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                                 "system_fingerprint": "fp_ollama",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                              "finish_reason": finish.get(res.done_reason, "stop")}],
                                 "usage": usage(res)})

        def chunk(delta: dict, reason: str | None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        def events() -> Iterator[bytes]:
            first = True
            try:
                for piece in job.streamer:
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

    return app


def _param_size(captioner: BlipCaptioner) -> str:
    n = captioner.n_params
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
          request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE) -> None:
    """Bind ``host:port`` (first, so a taken port fails fast), load the model, serve until stopped.

    ``max_batch``: most images in one batched ``generate``; ``batch_window_ms``: how long the
    worker waits for more requests to batch with the oldest one; ``max_queue``: waiting
    requests beyond which new ones get 503 + ``Retry-After`` (0: no limit);
    ``request_timeout_s``: limit on waiting plus generating, then 504 (0: none);
    ``keep_alive``: default idle time before the model is unloaded (``"5m"``, seconds, 0,
    negative = never), overridden per request by Ollama's ``keep_alive``.

    Raises:
        ServeError: port taken, model not loadable, serve extra missing.
    """
    try:
        import uvicorn
    except ImportError:
        raise ServeError("the serve extra is not installed: pip install 'vision-host[serve]'") from None
    try:
        parse_keep_alive(keep_alive)
    except RequestError as exc:
        raise ServeError(f"--keep-alive {keep_alive}: {exc.message} (give e.g. 5m, 30s, 0 or -1)") from None
    sock = bind_socket(host, port)
    try:
        captioner = BlipCaptioner(model)
        print(f"vision-host serve: loading {captioner.source} …", file=status, flush=True)
        captioner.load()
        app = create_app(captioner, max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         request_timeout_s=request_timeout_s, keep_alive=keep_alive)
        shown = f"[{host}]" if ":" in host else host
        print(f"vision-host serve: {normalize_model_name(captioner.name)} ({captioner.source}, {captioner.device}) "
              f"loaded in {captioner.load_duration_ns / 1e9:.1f} s; Ollama API on http://{shown}:{port} "
              f"(OpenAI API under /v1)", file=status, flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                                timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
