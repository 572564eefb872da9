"""HTTP for processors: the non-blocking ``vision-host:platform/fetch`` interface, and the
client that also serves the blocking ``wasmvision:platform/http`` calls.

Requests run on host worker threads (``requests`` with streaming bodies); the processor
polls once per frame for the bytes that arrived, so ``process`` never waits on the network.
Every request obeys the :class:`~.policy.NetworkPolicy` (:mod:`.policy`: the URL parsed once,
the allow-list, credentials), goes to the URL rebuilt from the parsed parts with no
redirects and no proxies from the environment, under a connect timeout, a read timeout
between bytes and a response size cap. Per processor there is a cap on requests in flight
and on requests running at once, in its own queue, so that one processor's flood cannot
delay another's (a cancelled request that has not started is never sent); frame (caption)
requests take turns at the vision servers by lanes (:class:`FairShare`). ``keep-frame`` and
``post-frames`` (several recent frames in one request) keep their frames in a ring per
processor instance, :mod:`.frame_ring`. WIT:
``wasm/wit/vision-host.wit``.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import requests

from .canon import ErrResult, implements
from .frame_ring import (FrameRing, FrameRingError, FramesLayout, downscale, encode_jpeg, fill_image,
                         frames_jpeg_body, gather_frames)

if TYPE_CHECKING:
    from .policy import NetworkPolicy, RequestTarget

log = logging.getLogger("vision_host.fetch")


class FetchError(enum.IntEnum):
    """``vision-host:platform/fetch.fetch-error`` case indices."""

    DESTINATION_NOT_ALLOWED = 0
    INVALID_URL = 1
    CONNECTION_FAILED = 2
    TIMEOUT = 3
    RESPONSE_TOO_LARGE = 4
    REQUEST_ERROR = 5
    TOO_MANY_REQUESTS = 6
    UNKNOWN_REQUEST = 7
    RUNTIME_ERROR = 8


class FetchErrorResult(Exception):
    """A fetch call's error result, carrying the ``fetch-error`` case."""

    def __init__(self, code: FetchError):
        super().__init__(code.name)
        self.code = code


@dataclass(eq=False)
class _Request:
    id: int
    url: str
    is_image: bool
    started: float
    target: RequestTarget | None = None
    dispatched: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    received: int = 0
    done: bool = False
    error: FetchError | None = None
    cancelled: bool = False
    response: requests.Response | None = None
    job: _Job | None = None
    released: bool = False        # the id was released by poll or cancel
    job_over: bool = False        # its work ended, or was dropped before it started


@dataclass(frozen=True)
class FetchStatsSnapshot:
    """A consistent copy of :class:`FetchStats` (all fields taken under its lock at once).

    Attributes:
        started / completed / failed: frame requests started, finished with a 2xx reply,
            failed (an error, a non-2xx status, or cancelled).
        latencies_ms: start-to-finish ms of the newest completed requests, oldest first.
        waits_ms: ms each of the newest requests waited for its turn in the
            :class:`FairShare` before it was sent, oldest first.
        last_latency_ms: ms of the last completed request (None before the first).
        last_error: why the last failed request failed (None before the first failure).
    """

    started: int
    completed: int
    failed: int
    latencies_ms: tuple[float, ...]
    waits_ms: tuple[float, ...]
    last_latency_ms: float | None
    last_error: str | None


class FetchStats:
    """Counts of frame (caption) requests and their start-to-finish latencies in ms, updated
    by the fetch worker threads; thread-safe.

    The counters (``started``, ``completed``, ``failed``, ``last_latency_ms``,
    ``last_error``) may be read one at a time from any thread; for several at once, or for the
    latency and wait lists, take a :meth:`snapshot`. Only :class:`FetchClient` updates them,
    through :meth:`start`, :meth:`admitted` and :meth:`finish`.

    Args:
        keep: how many of the newest latencies and waits are kept.
    """

    def __init__(self, keep: int = 4096):
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.latencies_ms: deque[float] = deque(maxlen=keep)
        #: ms each frame request waited for its turn in the :class:`FairShare` before it was sent.
        self.waits_ms: deque[float] = deque(maxlen=keep)
        self.last_latency_ms: float | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def start(self, req: _Request) -> None:
        """Count a started frame request (others are ignored)."""
        if req.is_image:
            with self._lock:
                self.started += 1

    def admitted(self, req: _Request) -> None:
        """Record how long a frame request waited for its turn (``dispatched - started``, ms)."""
        with self._lock:
            self.waits_ms.append((req.dispatched - req.started) * 1000.0)

    def finish(self, req: _Request, ok: bool, why: str | None = None) -> None:
        """Count a finished frame request (others are ignored); ``why`` says why it failed."""
        if not req.is_image:
            return
        with self._lock:
            if ok:
                self.completed += 1
                latency = (time.monotonic() - req.started) * 1000.0
                self.latencies_ms.append(latency)
                self.last_latency_ms = latency
            else:
                self.failed += 1
                self.last_error = why

    def snapshot(self) -> FetchStatsSnapshot:
        """Every count and list as of one moment (see :class:`FetchStatsSnapshot`)."""
        with self._lock:
            return FetchStatsSnapshot(self.started, self.completed, self.failed, tuple(self.latencies_ms),
                                      tuple(self.waits_ms), self.last_latency_ms, self.last_error)


class FairShare:
    """Round-robin admission of frame (caption) requests from several lanes to the vision
    servers: at most one request per lane runs at once, at most ``limit`` in all, and when a
    slot frees the next waiting lane after the one served last gets it. A busy lane therefore
    waits at most one round of the others and cannot starve them. A lane is any int; the
    runtime gives each video stream of a run its own (the stream's index).

    Requests are queued per lane and started on the caller's worker pool; while queued,
    ``poll`` reports status 0 and no bytes (the processor simply sees no answer yet).

    Args:
        limit: frame requests running at once across all lanes (≥ 1).
    Attributes:
        order: lanes in the order their requests were started (the newest 4096), for checks.
    """

    def __init__(self, limit: int = 2):
        self.limit = max(1, int(limit))
        self.order: deque[int] = deque(maxlen=4096)
        self._lock = threading.Lock()
        self._waiting: dict[int, deque] = {}
        self._busy: set[int] = set()
        self._last = -1

    def submit(self, lane: int, start) -> None:
        """Queue ``start()`` (which must end by calling :meth:`done` with ``lane``, once)."""
        with self._lock:
            self._waiting.setdefault(lane, deque()).append(start)
            ready = self._admit()
        for run in ready:
            run()

    def withdraw(self, lane: int, start) -> bool:
        """Remove ``start`` (the very object given to :meth:`submit`) if it is still waiting;
        True when removed (it will never be called, and :meth:`done` must not be called for it)."""
        with self._lock:
            waiting = self._waiting.get(lane)
            if not waiting:
                return False
            for i, queued in enumerate(waiting):
                if queued is start:
                    del waiting[i]
                    return True
            return False

    def done(self, lane: int) -> None:
        """A request of ``lane`` finished: free its slot and start whoever is next."""
        with self._lock:
            self._busy.discard(lane)
            ready = self._admit()
        for run in ready:
            run()

    def _admit(self) -> list:
        ready = []
        while len(self._busy) < self.limit:
            lanes = sorted(lane for lane, q in self._waiting.items() if q and lane not in self._busy)
            if not lanes:
                break
            lane = next((lane for lane in lanes if lane > self._last), lanes[0])
            self._busy.add(lane)
            self._last = lane
            self.order.append(lane)
            ready.append(self._waiting[lane].popleft())
        return ready


class _Job:
    """One request's work for the :class:`_Dispatcher`: ``run()`` on a worker, then ``finish()``."""

    __slots__ = ("admission", "client", "frame", "req", "run", "state")

    def __init__(self, client: FetchClient, req: _Request, run, frame: bool):
        self.client, self.req, self.run, self.frame = client, req, run, frame
        self.state = "new"            # new → queued → running → over (or new/queued → over)
        #: for frame jobs: what the :class:`FairShare` calls when the lane's turn comes
        self.admission = (lambda: client._dispatcher.enqueue(self)) if frame else None

    def finish(self) -> None:
        """The work ended or was dropped: free the frame slot, update the processor's counts."""
        if self.frame:
            self.client.fair_share.done(self.client.lane)
        self.client._job_over(self.req)


class _Dispatcher:
    """Feeds one worker pool from the queues of every :class:`FetchClient` that shares it.

    Each client has its own FIFO queues (frame requests and plain requests); the pool only
    ever gets as many jobs as it has free workers, so its own FIFO never holds a backlog that
    a flooding processor could put in front of others. Frame jobs (already admitted by the
    :class:`FairShare`) go first; plain jobs are taken round-robin over the clients, at most
    ``policy.max_running`` per client at once, and at most ``workers - reserve`` in all, where
    ``reserve`` is the largest fair-share limit of its clients (so frame requests always find
    a worker). A cancelled job still queued is dropped, never sent.
    """

    def __init__(self, pool: concurrent.futures.Executor):
        self._pool = weakref.ref(pool)
        self.workers = max(1, int(getattr(pool, "_max_workers", 8)))
        self.reserve = 0
        self._lock = threading.Lock()
        self._busy = 0
        self._busy_plain = 0
        self._frame_ready: deque[FetchClient] = deque()
        self._plain_ready: deque[FetchClient] = deque()

    def register(self, client: FetchClient) -> None:
        """Keep workers for ``client``'s fair share of frame requests."""
        with self._lock:
            self.reserve = min(self.workers - 1, max(self.reserve, client.fair_share.limit))

    def enqueue(self, job: _Job) -> None:
        """Queue ``job`` in its client's queue (dropped at once when already cancelled)."""
        client = job.client
        with self._lock:
            if job.req.cancelled:
                job.state = "over"
                dropped = [job]
            else:
                dropped = []
                job.state = "queued"
                if job.frame:
                    client._frames.append(job)
                    self._mark_ready(client, True)
                else:
                    client._plain.append(job)
                    self._mark_ready(client, False)
        for gone in dropped:
            gone.finish()
        self.pump()

    def drop(self, job: _Job) -> bool:
        """Remove ``job`` if it is still queued; True when removed (and finished)."""
        with self._lock:
            if job.state != "queued":
                return False
            (job.client._frames if job.frame else job.client._plain).remove(job)
            job.state = "over"
        job.finish()
        return True

    def pump(self) -> None:
        """Hand queued jobs to free workers."""
        dropped: list[_Job] = []
        with self._lock:
            while self._busy < self.workers:
                job = self._next(self._frame_ready, True, dropped)
                if job is None and self._busy_plain < self.workers - self.reserve:
                    job = self._next(self._plain_ready, False, dropped)
                if job is None:
                    break
                pool = self._pool()
                try:
                    if pool is None:
                        raise RuntimeError("the worker pool is gone")
                    pool.submit(self._work, job)
                except RuntimeError:      # the pool was shut down: the run is ending
                    with job.req.lock:
                        job.req.error = FetchError.RUNTIME_ERROR
                    self._ended(job)
                    dropped.append(job)
                    continue
                job.state = "running"
                self._busy += 1
                if not job.frame:
                    self._busy_plain += 1
        for job in dropped:
            job.finish()

    def _mark_ready(self, client: FetchClient, frame: bool) -> None:
        if frame and not client._frame_ready:
            client._frame_ready = True
            self._frame_ready.append(client)
        elif not frame and not client._plain_ready and client._plain and client._running < client._max_running:
            client._plain_ready = True
            self._plain_ready.append(client)

    def _next(self, ready: deque, frame: bool, dropped: list) -> _Job | None:
        """The next job round-robin over the ready clients (cancelled ones go to ``dropped``)."""
        while ready:
            client = ready.popleft()
            queue = client._frames if frame else client._plain
            if frame:
                client._frame_ready = False
            else:
                client._plain_ready = False
                if client._running >= client._max_running:
                    continue             # back in line when one of its jobs ends
            job = None
            while queue and job is None:
                job = queue.popleft()
                if job.req.cancelled:
                    job.state = "over"
                    dropped.append(job)
                    job = None
            if job is not None and not frame:
                client._running += 1
            if queue:
                self._mark_ready(client, frame)
            if job is not None:
                return job
        return None

    def _ended(self, job: _Job) -> None:
        """Accounting of a job that leaves a worker (call with the lock held)."""
        job.state = "over"
        if not job.frame:
            job.client._running -= 1
            self._mark_ready(job.client, False)

    def _work(self, job: _Job) -> None:
        try:
            job.run()
        except Exception:  # a bug in the worker must not stop the dispatcher
            log.exception("HTTP worker failed for %s", job.req.url)
            with job.req.lock:
                if job.req.error is None and not job.req.done:
                    job.req.error = FetchError.RUNTIME_ERROR
        finally:
            with self._lock:
                self._busy -= 1
                if not job.frame:
                    self._busy_plain -= 1
                self._ended(job)
            job.finish()
            self.pump()


_DISPATCHERS: weakref.WeakKeyDictionary[concurrent.futures.Executor, _Dispatcher] = weakref.WeakKeyDictionary()
_DISPATCHERS_LOCK = threading.Lock()


def _dispatcher(pool: concurrent.futures.Executor) -> _Dispatcher:
    with _DISPATCHERS_LOCK:
        found = _DISPATCHERS.get(pool)
        if found is None:
            found = _DISPATCHERS[pool] = _Dispatcher(pool)
        return found


class FetchClient:
    """Runs one processor's HTTP requests on a shared worker pool under a
    :class:`~.policy.NetworkPolicy`.

    Every URL is parsed once (:func:`~.policy.parse_request_url`); the request is sent to the
    URL rebuilt from the parsed parts, and only after urllib3 reads that URL as the same
    scheme, host and port. The processor's requests wait in its own queue and reach the pool's workers through
    a dispatcher shared by every client of that pool (at most ``policy.max_running`` plain
    requests of one processor on workers at once; see :class:`_Dispatcher`). A cancelled
    request that has not started is dropped and never sent.

    Args:
        policy: destinations and limits.
        pool: the run's worker threads (shared by every processor).
        stats: where caption-request counts go (shared by the stream's processors).
        fair_share: admission of frame requests across lanes (default: one of its own).
        lane: this processor's lane in ``fair_share`` (the runtime passes its stream's index).
    """

    def __init__(self, policy: NetworkPolicy, pool: concurrent.futures.ThreadPoolExecutor,
                 stats: FetchStats | None = None, fair_share: FairShare | None = None, lane: int = 0):
        self.policy = policy
        self.stats = stats or FetchStats()
        self.fair_share = fair_share or FairShare(policy.max_frame_requests)
        self.lane = lane
        self._pool = pool
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._local = threading.local()
        self._lock = threading.Lock()
        self._active: set[_Request] = set()     # not released, or its job not over
        # the dispatcher's per-client state (guarded by the dispatcher's lock)
        self._frames: deque[_Job] = deque()
        self._plain: deque[_Job] = deque()
        self._running = 0
        self._max_running = max(1, int(policy.max_running))
        self._frame_ready = self._plain_ready = False
        self._dispatcher = _dispatcher(pool)
        self._dispatcher.register(self)

    # -- request lifecycle -------------------------------------------------------------
    def start(self, method: str, url: str, content_type: str, make_body, is_image: bool = False,
              prepare: bool = False) -> int:
        """Start a request; ``make_body()`` runs on the worker and returns the body bytes.

        With ``prepare``, ``make_body()`` runs here, after the policy checks, and returns the
        function the worker calls (used by ``post-frame`` to copy the frame before returning).

        Returns the request id. Raises:
            FetchErrorResult: ``invalid-url`` / ``destination-not-allowed`` when the policy
                refuses the URL (:meth:`.policy.NetworkPolicy.resolve`), ``invalid-url`` for a method
                other than GET/POST, ``too-many-requests`` when ``policy.max_in_flight`` of
                this processor's requests are unreleased, queued or running.
        """
        target = self.policy.resolve(url)
        if method not in ("GET", "POST"):
            raise FetchErrorResult(FetchError.INVALID_URL)
        with self._lock:
            if len(self._active) >= self.policy.max_in_flight:
                raise FetchErrorResult(FetchError.TOO_MANY_REQUESTS)
        if prepare:
            make_body = make_body()
        req = _Request(self._next_id, url, is_image, time.monotonic(), target)
        self._next_id += 1
        self._requests[req.id] = req
        with self._lock:
            self._active.add(req)
        self.stats.start(req)
        if is_image:
            # frame requests take turns at the vision server; the lane's turn queues the job
            req.job = _Job(self, req, lambda: self._run_shared(req, method, content_type, make_body), frame=True)
            self.fair_share.submit(self.lane, req.job.admission)
        else:
            req.job = _Job(self, req, lambda: self._run(req, method, content_type, make_body), frame=False)
            self._dispatcher.enqueue(req.job)
        return req.id

    def poll(self, request_id: int) -> tuple[int, bool, bytes]:
        """``(status, done, new_body_bytes)``; releases the id when done. At most
        ``policy.max_poll_bytes`` body bytes come back per call.

        Raises:
            FetchErrorResult: the request failed (reported once; the id is released), or the
                id is unknown.
        """
        req = self._requests.get(request_id)
        if req is None:
            raise FetchErrorResult(FetchError.UNKNOWN_REQUEST)
        with req.lock:
            error = req.error
            if error is None:
                limit = max(1, self.policy.max_poll_bytes)
                chunk = bytes(req.body[:limit])
                del req.body[:limit]
                status, done = req.status, req.done and not req.body
        if error is not None:
            del self._requests[request_id]
            self._release(req)
            raise FetchErrorResult(error)
        if done:
            del self._requests[request_id]
            self._release(req)
        return status, done, chunk

    def cancel(self, request_id: int) -> None:
        """Abandon a request: one not yet started is dropped and never sent, a running one has
        its connection closed. Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        with req.lock:
            req.cancelled = True
            resp = req.response
        if resp is not None:
            resp.close()
        if not req.done and req.error is None:
            self.stats.finish(req, False, "cancelled")
        job = req.job
        if job is not None:
            if job.frame and self.fair_share.withdraw(self.lane, job.admission):
                self._job_over(req)          # never admitted: it holds no slot in the fair share
            else:
                self._dispatcher.drop(job)   # still queued: dropped; running: ends on its own
        self._release(req)

    def close(self) -> None:
        """Cancel every request in flight."""
        for rid in list(self._requests):
            self.cancel(rid)

    @property
    def in_flight(self) -> int:
        """Requests started and not yet released by poll or cancel."""
        return len(self._requests)

    @property
    def pending(self) -> int:
        """Requests whose work is still queued or running on a worker (cancelled ones included)."""
        with self._lock:
            return sum(1 for req in self._active if not req.job_over)

    def _release(self, req: _Request) -> None:
        with req.lock:           # nobody reads it any more (up to max_response_bytes)
            req.body = bytearray()
        with self._lock:
            req.released = True
            if req.job_over:
                self._active.discard(req)

    def _job_over(self, req: _Request) -> None:
        with self._lock:
            req.job_over = True
            job, req.job = req.job, None
            if job is not None:  # no reference cycles: the request, its body and frame go at once
                job.admission = job.run = None
            if req.released:
                self._active.discard(req)

    # -- blocking use (wasmvision:platform/http) ---------------------------------------
    def blocking(self, method: str, url: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        """Perform a whole request on the calling thread under the same policy (URL parsing,
        allow-list, credentials, timeouts, size cap).

        Returns ``(status, body)``. Raises FetchErrorResult like :meth:`start` and :meth:`poll`.
        """
        target = self.policy.resolve(url)
        req = _Request(0, url, False, time.monotonic(), target)
        self._transfer(req, method, content_type, body)
        if req.error is not None:
            raise FetchErrorResult(req.error)
        return req.status, bytes(req.body)

    # -- worker side -------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc from the environment
            self._local.session = session
        return session

    def _run_shared(self, req: _Request, method: str, content_type: str, make_body) -> None:
        """A frame request's turn has come (see :class:`FairShare`); the slot is freed by its job."""
        req.dispatched = time.monotonic()
        if req.cancelled:
            return
        self.stats.admitted(req)
        self._run(req, method, content_type, make_body)

    def _run(self, req: _Request, method: str, content_type: str, make_body) -> None:
        if req.cancelled:
            return
        try:
            body = make_body()
        except Exception as exc:  # noqa: BLE001 - reported to the processor, logged here
            log.error("could not build the request body for %s: %s", req.url, exc)
            with req.lock:
                req.error = FetchError.RUNTIME_ERROR
            self.stats.finish(req, False, f"runtime error: {exc}")
            return
        self._transfer(req, method, content_type, body)
        if req.cancelled:       # counted by cancel
            return
        if req.error is not None:
            self.stats.finish(req, False, req.error.name.lower().replace("_", "-"))
        else:
            self.stats.finish(req, 200 <= req.status < 300, None if req.status < 300 else f"HTTP {req.status}")

    def _transfer(self, req: _Request, method: str, content_type: str, body: bytes) -> None:
        policy = self.policy
        target = req.target
        headers = {"Content-Type": content_type} if content_type else {}
        credential = policy.credentials.get(target.origin)
        if credential:
            headers["Authorization"] = credential
        session = self._session()
        try:
            prepared = session.prepare_request(requests.Request(
                method, target.url, data=body if method == "POST" else None, headers=headers))
        except (requests.exceptions.RequestException, ValueError):
            req.error = FetchError.INVALID_URL
            return
        if not target.same_destination(prepared.url):   # never send to what the policy did not judge
            log.warning("refused %s: the HTTP client reads it as another destination", req.url)
            req.error = FetchError.INVALID_URL
            return
        with req.lock:
            if req.cancelled:                          # cancelled before it was sent: never sent
                return
        try:
            resp = session.send(prepared, stream=True, allow_redirects=False, proxies={},
                                timeout=(policy.connect_timeout_s, policy.read_timeout_s))
        except requests.exceptions.Timeout:
            req.error = FetchError.TIMEOUT
            return
        except requests.exceptions.InvalidURL:
            req.error = FetchError.INVALID_URL
            return
        except requests.exceptions.RequestException:
            req.error = FetchError.CONNECTION_FAILED
            return
        with req.lock:
            if req.cancelled:
                resp.close()
                return
            req.response = resp
            req.status = resp.status_code
        try:
            for chunk in resp.iter_content(chunk_size=None):
                with req.lock:
                    if req.cancelled:
                        break
                    req.received += len(chunk)
                    if req.received > policy.max_response_bytes:
                        req.error = FetchError.RESPONSE_TOO_LARGE
                        break
                    req.body += chunk
            else:
                with req.lock:
                    req.done = True
        except requests.exceptions.Timeout:
            req.error = FetchError.TIMEOUT
        except (requests.exceptions.RequestException, OSError, ValueError, AttributeError) as exc:
            # A cancel closes the response under this read: http.client then meets its file
            # gone (AttributeError on None). That is the cancel, not a failure; anything else is.
            with req.lock:
                cancelled = req.cancelled
                if not cancelled:
                    req.error = FetchError.REQUEST_ERROR
            if isinstance(exc, AttributeError) and not cancelled:
                raise
        finally:
            resp.close()


def frame_jpeg_body(frame: np.ndarray, max_side: int, quality: int, template: bytes):
    """Prepare a body builder for ``post-frame``.

    Copies ``frame`` (H×W×3 uint8 BGR, or H×W) now, on the caller's thread (the frame loop:
    a copy, about a millisecond at 1080p, where downscaling there took 18 ms); returns a
    function that, on a worker thread, downscales the copy so that the longer side is at most
    ``max_side`` px (0 = no limit), encodes it as JPEG at ``quality`` (1–100), base64s it and
    substitutes it for the first ``%IMAGE%`` in ``template``; when ``%IMAGE_BYTES%`` comes
    first, it is replaced instead by the JPEG's bytes as a JSON array of numbers
    (``[255,216,…]``, Workers AI's image field). See :func:`.frame_ring.fill_image`.
    """
    taken = frame.copy()
    return lambda: fill_image(template, encode_jpeg(downscale(taken, max_side, copy=False), quality))


# -- host functions: vision-host:platform/fetch ------------------------------------------
_FETCH = "vision-host:platform/fetch"


def _started(ctx, url: str, start) -> int:
    try:
        return start()
    except FetchErrorResult as err:
        ctx.note_fetch_error(url, err.code)
        raise ErrResult(int(err.code)) from None


@implements(_FETCH, "post-frame")
def _post_frame(ctx, url, content_type, template, frame, max_side, quality):
    array = ctx.mats.get(frame)
    return _started(ctx, url, lambda: ctx.fetch.start(
        "POST", url, content_type, lambda: frame_jpeg_body(array, max_side, quality, template),
        is_image=True, prepare=True))


@implements(_FETCH, "keep-frame")
def _keep_frame(ctx, frame, max_side, capacity):
    array = ctx.mats.get(frame)                 # an unknown handle traps, as in post-frame
    ring = ctx.frame_ring
    if ring is None:
        ring = ctx.frame_ring = FrameRing()
    try:
        ring.keep(array, max_side, capacity)
    except FrameRingError as exc:
        ctx.log_once(f"keep-frame failed: {exc}")
        raise ErrResult(int(FetchError.RUNTIME_ERROR)) from None


@implements(_FETCH, "post-frames")
def _post_frames(ctx, url, content_type, template, frame, max_side, quality, count, span_ms, layout):
    array = ctx.mats.get(frame)

    def prepare():              # after the policy checks, during the call (see frame_ring)
        try:
            frames = gather_frames(ctx.frame_ring, array, max_side, count, span_ms / 1000.0)
            return frames_jpeg_body(frames, template, FramesLayout(layout), max_side, quality)
        except FrameRingError as exc:
            ctx.log_once(f"post-frames failed: {exc}")
            raise FetchErrorResult(FetchError.RUNTIME_ERROR) from None

    return _started(ctx, url, lambda: ctx.fetch.start("POST", url, content_type, prepare, is_image=True,
                                                      prepare=True))


@implements(_FETCH, "start")
def _start(ctx, method, url, content_type, body):
    return _started(ctx, url, lambda: ctx.fetch.start(method.upper(), url, content_type, lambda: body))


@implements(_FETCH, "poll")
def _poll(ctx, request_id):
    try:
        return ctx.fetch.poll(request_id)      # (status, done, body) = the progress record
    except FetchErrorResult as err:
        raise ErrResult(int(err.code)) from None


@implements(_FETCH, "cancel")
def _cancel(ctx, request_id):
    ctx.fetch.cancel(request_id)


__all__ = ["FairShare", "FetchClient", "FetchError", "FetchErrorResult", "FetchStats", "FetchStatsSnapshot",
           "frame_jpeg_body"]
