"""HTTP for processors: the non-blocking ``vision-host:platform/fetch`` interface and the
network policy that every processor request (blocking or not) obeys.

Requests run on host worker threads (``requests`` with streaming bodies); the processor
polls once per frame for the bytes that arrived, so ``process`` never waits on the network.
The policy: every URL is parsed once, strictly (:func:`parse_request_url` refuses URLs that
HTTP clients and URL parsers read differently), and the request goes to the URL rebuilt from
the parsed parts; only destinations on the allow-list (by default the ``host:port`` of every
``*-url`` config value), credentials only to the exact ``scheme://host:port`` they were given
for, no redirects, no proxies from the environment, a connect timeout, a read timeout between
bytes, a response size cap, and per processor a cap on requests in flight and on requests
running at once, in its own queue, so that one processor's flood cannot delay another's (a
cancelled request that has not started is never sent). WIT: ``wasm/wit/vision-host.wit``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import enum
import ipaddress
import logging
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import cv2
import numpy as np
import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from .canon import ErrResult, implements

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


# -- URLs: parsed once, strictly, and rebuilt ------------------------------------------------
#: Printable ASCII without space: every character of an accepted URL is in this range.
_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)"
                  r"(?P<query>\?[^#]*)?(?:#.*)?")
_HOST_AND_PORT = re.compile(r"(?P<host>[^:\[\]]+|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[0-9]*))?")
_REG_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class RequestTarget:
    """Where a request goes, as parsed once by :func:`parse_request_url`.

    Attributes:
        scheme: ``"http"`` or ``"https"`` (lowercase).
        host: a lowercase DNS name (letters, digits, ``-``, ``_`` in dot-separated labels), a
            dotted-quad IPv4 address, or an IPv6 address in brackets in its compressed form
            (``"[::1]"``).
        port: 1-65535 (80 or 443 when the URL gave none).
        target: the path (``"/"`` when empty) and the query (with its ``?``) exactly as given;
            the fragment is dropped (it is never sent).
    """

    scheme: str
    host: str
    port: int
    target: str

    @property
    def destination(self) -> str:
        """``host:port``: what the allow-list holds."""
        return f"{self.host}:{self.port}"

    @property
    def origin(self) -> str:
        """``scheme://host:port``: what a credential is given for."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL that is sent: rebuilt from the parsed parts, the port always explicit."""
        return f"{self.origin}{self.target}"

    def same_destination(self, url: str) -> bool:
        """Whether urllib3 (which opens the connection) reads ``url`` as this scheme, host and
        port, without userinfo."""
        try:
            parsed = parse_url(url)
        except (LocationParseError, ValueError):
            return False
        port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme or "", 0)
        return (parsed.scheme, parsed.host, port, parsed.auth) == (self.scheme, self.host, self.port, None)


def parse_request_url(url: str) -> RequestTarget | None:
    """Parse an absolute http(s) URL strictly, or return None when it is refused.

    Refused, because HTTP clients and URL parsers read such URLs differently (WHATWG browsers,
    ``urllib.parse``, urllib3 and ``inet_aton`` each disagree on some): any character outside
    printable ASCII (whitespace, control characters, non-ASCII), a backslash anywhere; a scheme
    other than http/https (either case) or not followed by ``//``; userinfo (any ``@`` before
    the path) or ``%`` in the authority; an empty host; a host that is not a DNS name, a
    dotted-quad IPv4 address or a bracketed IPv6 address (so no zone ids, no ``127.1``,
    ``0x7f.0.0.1`` or ``2130706433`` spellings); an empty port, a port with a sign or a leading
    zero, or outside 1-65535.
    """
    if not isinstance(url, str) or not _PRINTABLE.fullmatch(url) or "\\" in url:
        return None
    m = _URL.fullmatch(url)
    if m is None:
        return None
    scheme = m["scheme"].lower()
    authority = m["authority"]
    if scheme not in _DEFAULT_PORTS or "@" in authority or "%" in authority:
        return None
    hp = _HOST_AND_PORT.fullmatch(authority)
    if hp is None:
        return None
    if hp["ipv6"] is not None:
        try:
            host = f"[{ipaddress.IPv6Address(hp['ipv6'])}]"
        except ValueError:
            return None
    else:
        host = hp["host"].lower()
        if not _REG_NAME.fullmatch(host):
            return None
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):    # an IPv4 address: canonical form only
            try:
                if str(ipaddress.IPv4Address(host)) != host:
                    return None
            except ValueError:
                return None
    if hp["port"] is None:
        port = _DEFAULT_PORTS[scheme]
    elif _PORT.fullmatch(hp["port"]) and int(hp["port"]) <= 65535:
        port = int(hp["port"])
    else:
        return None
    return RequestTarget(scheme, host, port, (m["path"] or "/") + (m["query"] or ""))


def url_destination(url: str) -> str | None:
    """``host:port`` of an absolute http(s) URL (default ports filled in; see
    :func:`parse_request_url` for the URLs refused), else None."""
    target = parse_request_url(url)
    return None if target is None else target.destination


def url_origin(url: str) -> str | None:
    """``scheme://host:port`` of an absolute http(s) URL (as :func:`url_destination`), else None."""
    target = parse_request_url(url)
    return None if target is None else target.origin


@dataclass
class NetworkPolicy:
    """What processors may reach and how long they may wait.

    Attributes:
        allowed: ``host:port`` destinations processors may call (either scheme), as
            :attr:`RequestTarget.destination` writes them (``"127.0.0.1:11434"``,
            ``"[::1]:8080"``).
        credentials: ``Authorization`` header value per origin ``scheme://host:port``
            (:attr:`RequestTarget.origin`), added by the host to every request to exactly that
            scheme, host and port (processors never see it; it is never logged).
        connect_timeout_s / read_timeout_s: seconds to connect, and between received bytes.
        max_response_bytes: replies longer than this are cut off with ``response-too-large``.
        max_in_flight: non-blocking requests one processor may have at once: those started
            and not yet released by ``poll`` or ``cancel``, plus those cancelled but still
            queued or being sent on a worker. Beyond it ``start`` fails with
            ``too-many-requests``.
        max_running: a processor's plain (non-frame) requests being sent or received at once
            on the shared worker threads; the others wait in the processor's own queue (a
            cancelled one is dropped from it and never sent). Frame requests are bounded by
            the fair share instead (one per stream).
        max_frame_requests: frame (caption) requests running at once across all streams;
            each stream has at most one running, and waiting streams are served round-robin
            (:class:`FairShare`). That many worker threads are kept for them: plain requests
            of all processors together never occupy more than the rest.
        max_poll_bytes: most body bytes one ``poll`` hands the processor; the rest waits for
            the next polls (``done`` comes with the last byte). A fast server can deliver
            megabytes between two frames: handed over at once they cost the processor more
            than its per-call deadline to parse, and an interrupted call leaks what it had
            allocated (found by the 20 MB drill in tests/test_drills.py).

    Raises (from the constructor):
        PolicyError: a credential key that is not a ``scheme://host:port`` origin.
    """

    allowed: set[str] = field(default_factory=set)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_response_bytes: int = 8 * 1024 * 1024
    max_in_flight: int = 4
    max_running: int = 2
    max_frame_requests: int = 2
    max_poll_bytes: int = 64 * 1024
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        normalized = {}
        for origin, value in self.credentials.items():
            target = parse_request_url(origin)
            if target is None or target.target != "/" or origin.rstrip("/").count("/") != 2:
                raise PolicyError(f"a credential is given for {origin!r}: credentials are keyed by "
                                  f"scheme://host:port")
            normalized[target.origin] = value
        self.credentials = normalized

    @classmethod
    def from_config(cls, config: dict[str, str], extra_allowed: list[str] = (), environ=None,
                    **limits) -> NetworkPolicy:
        """Allow the destination of every ``*-url`` config value, plus ``extra_allowed``
        (``HOST:PORT`` or URLs).

        A ``PREFIX-api-key-env=NAME`` setting makes the host send ``Authorization: Bearer
        $NAME`` (read from ``environ``, default the host's environment) with every request
        to the origin (scheme, host and port) of ``PREFIX-url``: the key stays outside the
        sandbox.

        Raises:
            PolicyError: an ``-api-key-env`` setting without a matching ``-url``, or naming
                an environment variable that is not set.
        """
        import os
        environ = os.environ if environ is None else environ
        allowed = {d for k, v in config.items() if k.endswith("-url") and (d := url_destination(v))}
        for item in extra_allowed:
            as_host_port = url_destination(f"http://{item}/") if re.fullmatch(r".+:[0-9]+", item) else None
            allowed.add(url_destination(item) or as_host_port or item.lower())
        credentials = {}
        for key, name in config.items():
            if not key.endswith("-api-key-env"):
                continue
            url_key = key[: -len("-api-key-env")] + "-url"
            origin = url_origin(config.get(url_key, ""))
            if origin is None:
                raise PolicyError(f"{key} needs {url_key} set to the server's http(s) URL")
            secret = environ.get(name, "").strip()
            if not secret:
                raise PolicyError(f"{key}={name}: the environment variable {name} is not set; "
                                  f"export it with the API key")
            credentials[origin] = f"Bearer {secret}"
        return cls(allowed=allowed, credentials=credentials, **limits)

    def resolve(self, url: str) -> RequestTarget:
        """The parsed target of ``url`` when it may be requested.

        Raises:
            FetchErrorResult: ``invalid-url`` (refused by :func:`parse_request_url`) or
                ``destination-not-allowed`` (well-formed, but its ``host:port`` is not allowed).
        """
        target = parse_request_url(url)
        if target is None:
            raise FetchErrorResult(FetchError.INVALID_URL)
        if target.destination not in self.allowed:
            raise FetchErrorResult(FetchError.DESTINATION_NOT_ALLOWED)
        return target

    def check(self, url: str) -> FetchError | None:
        """None when ``url`` may be requested, else the error to report (see :meth:`resolve`)."""
        try:
            self.resolve(url)
        except FetchErrorResult as err:
            return err.code
        return None


class PolicyError(ValueError):
    """A network setting that cannot work; the message says what to fix."""


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


class FetchStats:
    """Counts of frame (caption) requests and their start-to-finish latencies in ms."""

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


class FairShare:
    """Round-robin admission of frame (caption) requests from several streams to the vision
    servers: at most one request per stream runs at once, at most ``limit`` in all, and when
    a slot frees the next waiting stream after the one served last gets it. A busy stream
    therefore waits at most one round of the others and cannot starve them.

    Requests are queued per stream (lane) and started on the caller's worker pool; while
    queued, ``poll`` reports status 0 and no bytes (the processor simply sees no answer yet).

    Args:
        limit: frame requests running at once across all streams (≥ 1).
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
        #: for frame jobs: what the :class:`FairShare` calls when the stream's turn comes
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
    """Runs one processor's HTTP requests on a shared worker pool under a :class:`NetworkPolicy`.

    Every URL is parsed once (:func:`parse_request_url`); the request is sent to the URL rebuilt
    from the parsed parts, and only after urllib3 reads that URL as the same scheme, host and
    port. The processor's requests wait in its own queue and reach the pool's workers through
    a dispatcher shared by every client of that pool (at most ``policy.max_running`` plain
    requests of one processor on workers at once; see :class:`_Dispatcher`). A cancelled
    request that has not started is dropped and never sent.

    Args:
        policy: destinations and limits.
        pool: the run's worker threads (shared by every processor).
        stats: where caption-request counts go (shared by the stream's processors).
        fair_share: admission of frame requests across streams (default: one of its own).
        lane: this processor's stream index in ``fair_share``.
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
                refuses the URL (:meth:`NetworkPolicy.resolve`), ``invalid-url`` for a method
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
        if is_image:
            with self.stats._lock:
                self.stats.started += 1
            # frame requests take turns at the vision server; the stream's turn queues the job
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
        with self.stats._lock:
            self.stats.waits_ms.append((req.dispatched - req.started) * 1000.0)
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


class FetchErrorResult(Exception):
    """A fetch call's error result, carrying the ``fetch-error`` case."""

    def __init__(self, code: FetchError):
        super().__init__(code.name)
        self.code = code


def frame_jpeg_body(frame: np.ndarray, max_side: int, quality: int, template: bytes):
    """Prepare a body builder for ``post-frame``.

    Downscales ``frame`` (H×W×3 uint8 BGR, or H×W) now, on the caller's thread, so that the
    longer side is at most ``max_side`` px (0 = no limit), copying it either way; returns a
    function that, on a worker thread, encodes it as JPEG at ``quality`` (1–100), base64s it
    and substitutes it for the first ``%IMAGE%`` in ``template``; when ``%IMAGE_BYTES%``
    comes first, it is replaced instead by the JPEG's bytes as a JSON array of numbers
    (``[255,216,…]``, Workers AI's image field).
    """
    h, w = frame.shape[:2]
    longer = max(h, w)
    if max_side and longer > max_side:
        scale = max_side / longer
        small = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    else:
        small = frame.copy()
    quality = min(100, max(1, quality))

    def build() -> bytes:
        ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        at_bytes = template.find(b"%IMAGE_BYTES%")
        at_base64 = template.find(b"%IMAGE%")
        if at_bytes >= 0 and (at_base64 < 0 or at_bytes <= at_base64):
            numbers = b"[" + b",".join(b"%d" % v for v in jpeg.ravel().tolist()) + b"]"
            return template[:at_bytes] + numbers + template[at_bytes + len(b"%IMAGE_BYTES%"):]
        return template.replace(b"%IMAGE%", base64.b64encode(jpeg.tobytes()), 1)

    return build


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


__all__ = ["FairShare", "FetchClient", "FetchError", "FetchErrorResult", "FetchStats", "NetworkPolicy", "PolicyError",
           "RequestTarget", "frame_jpeg_body", "parse_request_url", "url_destination", "url_origin"]
