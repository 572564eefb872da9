"""The model worker: one thread runs every generation, batching the requests that can share
one ``generate`` call, with a bounded queue, timeouts and Ollama's ``keep_alive``.

* **Micro-batching**: requests that arrive within ``batch_window_ms`` (10 ms) of the oldest
  waiting one, or while a batch runs, share one batched ``generate`` of up to ``max_batch``
  (8) requests when their decoding settings, ``num_predict``, ``seed`` and number of images
  for the model match (BLIP also needs equal prompt lengths; BLIP-2 and LLaVA pad prompts on
  the left; a grid of frames counts as one image). Streamed rows get their words as they are
  generated. Batch sizes are in ``/api/ps`` under the extra field ``vision_host``
  (``mean_batch_size``, ...), and so are the images: ``images`` (sent by the requests
  generated for), ``model_images`` (the images the model got for them) and ``grids``
  (requests answered on a grid of their frames); a batch is counted as it starts, so a
  request's answer never comes before its count.
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
* **Embeddings** (``/api/embed``, ``/v1/embeddings``) share the queue, its limit, the timeout
  and ``keep_alive``: each request is a job of its own (:meth:`Scheduler.new_embedding_job`),
  never batched with generations; its inputs are run through the text side in chunks
  (:meth:`.models.base.VisionLanguageModel.embed`) and a timed-out one stops between chunks.
  They are counted in ``/api/ps``'s ``embed_requests`` and ``embedded_inputs``.
* The model worker survives any exception: that batch's requests get 500, the rest go on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .errors import Busy, InternalError, RequestError, RequestTimeout
from .models.base import EmbeddingInputs, EmbeddingStopped, Prepared, VisionLanguageModel
from .models.settings import GenerationSettings
from .models.streaming import GenerationRow, TextQueue
from .parsing import MAX_KEEP_ALIVE_S, parse_keep_alive

log = logging.getLogger(__name__)

#: Scheduling defaults (see :class:`Scheduler` and :func:`.app.serve`).
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WINDOW_MS = 10.0
DEFAULT_MAX_QUEUE = 32
DEFAULT_REQUEST_TIMEOUT_S = 120.0
DEFAULT_KEEP_ALIVE = "5m"


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


#: A :class:`Job`'s ``keep_alive`` when its request gave none: the server's default.
SERVER_DEFAULT: Any = object()


class Reservation:
    """A place in the :class:`Scheduler`'s queue, taken (:meth:`Scheduler.reserve`) before a
    request's images are decoded (one place for all of them), so a full queue refuses the
    request before that cost; handed
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
    """One request for the model worker: a generation (a row of a batch, streamed or not),
    an embedding (``embedding`` set: its vectors come in :attr:`vectors`) or, with ``prepared``
    and ``embedding`` None, a load/unload."""

    prepared: Prepared | None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    #: The streamed reply's text pieces (None: the reply is not streamed).
    streamed_reply: TextQueue | None = None
    #: The request's output format (:class:`.structured.Constraint`; None: free text).
    constraint: Any = None
    keep_alive: Any = SERVER_DEFAULT     # seconds, None = forever
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
    #: An embedding request's inputs (None: not an embedding) and, once done, its vectors.
    embedding: EmbeddingInputs | None = None
    vectors: list | None = None
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
        if self.cancel.is_set():
            return
        if self.constraint is not None and not self.constraint.complete(text):
            # the token budget ran out inside the JSON: never answer it as if it were whole
            self.finish(RequestError(500, f"the answer reached its limit of {tokens} tokens before its JSON was "
                                          f"complete: raise num_predict (max_tokens on /v1) for this format"))
            return
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
        if error is not None and self.streamed_reply is not None:
            self.streamed_reply.end()
        self._call(self._started, None, error)
        self._call(self._done, self.result, error)


class Scheduler:
    """The single model worker: a bounded queue, micro-batching, timeouts and ``keep_alive``.

    * Generations that arrive within ``batch_window_s`` of the oldest waiting one (or while a
      batch runs) and share :attr:`Job.key` (decoding settings, ``num_predict``, ``seed``,
      the number of images the model gets, and for BLIP the prompt's token length) run as one
      batched ``generate`` of up to ``max_batch`` requests. Streamed and non-streamed
      requests share batches when their decoding matches (streaming is greedy or sampled,
      never beam search); each streamed row gets its words as they are generated and its
      final line as soon as it ends.
    * More than ``max_queue`` waiting requests (0: no limit) → :class:`Busy` (503); a request
      whose images are being decoded holds a :class:`Reservation` and counts as waiting.
    * A request past ``request_timeout_s`` (waiting plus generating) is withdrawn from the
      queue, or its generation stops at the next token → :class:`RequestTimeout` (504).
    * After the last request the model stays loaded for that request's ``keep_alive`` (the
      server's default unless given), then the worker unloads it; the next request reloads it.
    * The worker survives any exception: the failing batch's requests get :class:`InternalError`
      (500), the failure is logged, and the next batch runs.
    """

    def __init__(self, model: VisionLanguageModel, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_window_s: float = DEFAULT_BATCH_WINDOW_MS / 1000.0, max_queue: int = DEFAULT_MAX_QUEUE,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: Any = DEFAULT_KEEP_ALIVE) -> None:
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.batch_window_s = max(0.0, float(batch_window_s))
        self.max_queue = int(max_queue)
        self.request_timeout_s = float(request_timeout_s) if request_timeout_s and request_timeout_s > 0 else None
        self.default_keep_alive = parse_keep_alive(keep_alive)
        self.cond = threading.Condition()
        self.queue: list[Job] = []
        #: Requests holding a :class:`Reservation` (decoding their images), not queued yet.
        self.reserved = 0
        self.busy = False
        self.stopping = False
        #: ``time.monotonic()`` at which the idle model is unloaded; None = never.
        self.expires_at: float | None = None
        #: The same moment in UTC (``/api/ps``'s ``expires_at``); None = never.
        self.expires_wall: datetime | None = None
        self._touch(self.default_keep_alive)
        # statistics
        self.batch_sizes: list[int] = []
        self.batches = 0
        self.batched_requests = 0
        #: Answer tokens generated, and the seconds spent in generate (tokens/s for /metrics).
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.rejected = 0
        self.timeouts = 0
        self.loads = 0
        self.unloads = 0
        self.images = 0         # images sent by the requests given to generate
        self.model_images = 0   # images the model got for them (a grid is one)
        self.grids = 0          # requests whose images were tiled into one grid
        self.embed_requests = 0   # embedding requests run
        self.embedded_inputs = 0  # their inputs (texts)
        self._batch_s = 0.5   # moving average of one batch's duration, for Retry-After
        self.thread = threading.Thread(target=self._run, name="vision-host-model", daemon=True)
        self.thread.start()

    # -- the request side --------------------------------------------------------------------
    def new_job(self, prepared: Prepared | None, settings: GenerationSettings | None = None,
                streamed: bool = False, keep_alive: Any = SERVER_DEFAULT, constraint: Any = None) -> Job:
        """A generation for ``prepared`` inputs (None = load/unload only), to :meth:`submit`;
        ``settings`` default to :class:`GenerationSettings`'s; ``constraint``: the answer's
        output format (:mod:`.structured`; per row, so it does not split batches)."""
        settings = settings or GenerationSettings()
        job = Job(prepared, settings, keep_alive=keep_alive, constraint=constraint)
        if self.request_timeout_s is not None:
            job.deadline = job.enqueued_at + self.request_timeout_s
        if prepared is None:
            job.key = ("solo", id(job))
            return job
        job.max_new = self.model.max_new_tokens(prepared, settings)
        job.decoding = self.model.decoding(settings, streamed)
        job.key = self.model.batch_key(prepared, job.decoding, job.max_new, settings.seed)
        job.result.prompt_tokens = prepared.prompt_tokens
        if streamed:
            job.streamed_reply = TextQueue(timeout_s=(self.request_timeout_s or 600) + 30)
        return job

    def new_embedding_job(self, inputs: EmbeddingInputs, keep_alive: Any = SERVER_DEFAULT) -> Job:
        """An embedding of ``inputs`` (a request's texts, tokenised), to :meth:`submit`; it runs
        alone (never batched with generations) and its vectors come in :attr:`Job.vectors`."""
        job = Job(None, keep_alive=keep_alive, embedding=inputs)
        if self.request_timeout_s is not None:
            job.deadline = job.enqueued_at + self.request_timeout_s
        job.key = ("solo", "embed", id(job))
        job.result.prompt_tokens = inputs.tokens
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
        """A place in the queue for a request about to decode its images (any thread).

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
        if keep_alive is SERVER_DEFAULT:
            keep_alive = self.default_keep_alive
        if keep_alive is None or not keep_alive <= MAX_KEEP_ALIVE_S:   # (NaN never gets here)
            self.expires_at, self.expires_wall = None, None
        else:
            keep_alive = max(0.0, float(keep_alive))
            self.expires_at = time.monotonic() + keep_alive
            self.expires_wall = datetime.now(timezone.utc) + timedelta(seconds=keep_alive)

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
        if first.embedding is not None:   # an embedding request (always alone)
            self._embed(first)
            return
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
        with self.cond:   # counted as the batch starts: before any of its rows can be answered
            self.batches += 1
            self.batched_requests += len(live)
            self.batch_sizes.append(len(live))
            del self.batch_sizes[:-1000]
            for j in live:
                self.images += j.prepared.images
                self.model_images += j.prepared.model_images
                self.grids += j.prepared.grid is not None
        self.model.generate(live, first.decoding, first.max_new, first.settings.seed)
        with self.cond:
            took = time.perf_counter() - t0
            self._batch_s = 0.7 * self._batch_s + 0.3 * took
            self.generated_tokens += sum(j.result.eval_count or 0 for j in live)
            self.generate_seconds += took
        for j in live:
            if j.timed_out:
                j.finish(self._timeout_error(j))
            elif j.cancel.is_set():
                j.finish(RequestError(499, "cancelled"))
            else:
                j.finish()

    def _embed(self, job: Job) -> None:
        """Run an embedding job: its vectors, or its timeout / cancellation between chunks."""
        self._ensure_loaded([job])
        job.result.lock_wait_s += time.monotonic() - job.enqueued_at
        job.result.started_at = time.perf_counter()
        job.mark_started()
        with self.cond:
            self.embed_requests += 1
            self.embedded_inputs += len(job.embedding.ids)
        try:
            job.vectors = self.model.embed(job.embedding, job.should_stop)
        except EmbeddingStopped:
            job.finish(self._timeout_error(job) if job.timed_out else RequestError(499, "cancelled"))
            return
        job.result.ended_at = time.perf_counter()
        job.finish()

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
        ``reserved`` (decoding their images), ``rejected``, ``timeouts``, ``loads``, ``unloads``,
        ``loaded``, ``images``, ``model_images``, ``grids``, …)."""
        with self.cond:
            sizes = list(self.batch_sizes)
            return {"batches": self.batches, "batched_requests": self.batched_requests,
                    "mean_batch_size": self.batched_requests / self.batches if self.batches else 0.0,
                    "max_batch_size": max(sizes) if sizes else 0, "recent_batch_sizes": sizes[-50:],
                    "queued": len(self.queue), "reserved": self.reserved, "busy": self.busy, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "rejected": self.rejected, "timeouts": self.timeouts,
                    "loads": self.loads, "unloads": self.unloads, "loaded": self.model.loaded,
                    "images": self.images, "model_images": self.model_images, "grids": self.grids,
                    "embed_requests": self.embed_requests, "embedded_inputs": self.embedded_inputs}


