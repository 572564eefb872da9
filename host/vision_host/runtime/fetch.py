"""HTTP for processors: the non-blocking ``vision-host:platform/fetch`` interface and the
network policy that every processor request (blocking or not) obeys.

Requests run on host worker threads (``requests`` with streaming bodies); the processor
polls once per frame for the bytes that arrived, so ``process`` never waits on the network.
The policy: only destinations on the allow-list (by default the ``host:port`` of every
``*-url`` config value), no redirects, no proxies from the environment, a connect timeout,
a read timeout between bytes, a response size cap, and a cap on requests in flight per
processor. WIT: ``wasm/wit/vision-host.wit``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import cv2
import numpy as np
import requests

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


def url_destination(url: str) -> str | None:
    """``host:port`` of an absolute http(s) URL (default ports filled in), else None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.hostname.lower()}:{port or (443 if parts.scheme == 'https' else 80)}"


@dataclass
class NetworkPolicy:
    """What processors may reach and how long they may wait.

    Attributes:
        allowed: ``host:port`` destinations processors may call.
        credentials: ``Authorization`` header value per destination, added by the host to
            every request there (processors never see it; it is never logged).
        connect_timeout_s / read_timeout_s: seconds to connect, and between received bytes.
        max_response_bytes: replies longer than this are cut off with ``response-too-large``.
        max_in_flight: non-blocking requests one processor may have running at once.
        max_frame_requests: frame (caption) requests running at once across all streams;
            each stream has at most one running, and waiting streams are served round-robin
            (:class:`FairShare`).
        max_poll_bytes: most body bytes one ``poll`` hands the processor; the rest waits for
            the next polls (``done`` comes with the last byte). A fast server can deliver
            megabytes between two frames: handed over at once they cost the processor more
            than its per-call deadline to parse, and an interrupted call leaks what it had
            allocated (found by the 20 MB drill in tests/test_drills.py).
    """

    allowed: set[str] = field(default_factory=set)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_response_bytes: int = 8 * 1024 * 1024
    max_in_flight: int = 4
    max_frame_requests: int = 2
    max_poll_bytes: int = 64 * 1024
    credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: dict[str, str], extra_allowed: list[str] = (), environ=None,
                    **limits) -> "NetworkPolicy":
        """Allow the destination of every ``*-url`` config value, plus ``extra_allowed``.

        A ``PREFIX-api-key-env=NAME`` setting makes the host send ``Authorization: Bearer
        $NAME`` (read from ``environ``, default the host's environment) with every request
        to the destination of ``PREFIX-url``: the key stays outside the sandbox.

        Raises:
            PolicyError: an ``-api-key-env`` setting without a matching ``-url``, or naming
                an environment variable that is not set.
        """
        import os
        environ = os.environ if environ is None else environ
        allowed = {d for k, v in config.items() if k.endswith("-url") and (d := url_destination(v))}
        for item in extra_allowed:
            allowed.add(url_destination(item) or item.lower())
        credentials = {}
        for key, name in config.items():
            if not key.endswith("-api-key-env"):
                continue
            url_key = key[: -len("-api-key-env")] + "-url"
            dest = url_destination(config.get(url_key, ""))
            if dest is None:
                raise PolicyError(f"{key} needs {url_key} set to the server's http(s) URL")
            secret = environ.get(name, "").strip()
            if not secret:
                raise PolicyError(f"{key}={name}: the environment variable {name} is not set; "
                                  f"export it with the API key")
            credentials[dest] = f"Bearer {secret}"
        return cls(allowed=allowed, credentials=credentials, **limits)

    def check(self, url: str) -> FetchError | None:
        """None when ``url`` may be requested, else the error to report."""
        dest = url_destination(url)
        if dest is None:
            return FetchError.INVALID_URL
        if dest not in self.allowed:
            return FetchError.DESTINATION_NOT_ALLOWED
        return None


class PolicyError(ValueError):
    """A network setting that cannot work; the message says what to fix."""


@dataclass(eq=False)
class _Request:
    id: int
    url: str
    is_image: bool
    started: float
    dispatched: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: int = 0
    body: bytearray = field(default_factory=bytearray)
    received: int = 0
    done: bool = False
    error: FetchError | None = None
    cancelled: bool = False
    response: requests.Response | None = None


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


class FetchClient:
    """Runs one processor's HTTP requests on a shared worker pool under a :class:`NetworkPolicy`.

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

    # -- request lifecycle -------------------------------------------------------------
    def start(self, method: str, url: str, content_type: str, make_body, is_image: bool = False,
              prepare: bool = False) -> int:
        """Start a request; ``make_body()`` runs on the worker and returns the body bytes.

        With ``prepare``, ``make_body()`` runs here, after the policy checks, and returns the
        function the worker calls (used by ``post-frame`` to copy the frame before returning).

        Returns the request id. Raises:
            FetchErrorResult: when the policy refuses the URL or too many are in flight.
        """
        refused = self.policy.check(url)
        if refused is not None:
            raise FetchErrorResult(refused)
        if method not in ("GET", "POST"):
            raise FetchErrorResult(FetchError.INVALID_URL)
        if len(self._requests) >= self.policy.max_in_flight:
            raise FetchErrorResult(FetchError.TOO_MANY_REQUESTS)
        if prepare:
            make_body = make_body()
        req = _Request(self._next_id, url, is_image, time.monotonic())
        self._next_id += 1
        self._requests[req.id] = req
        if is_image:
            with self.stats._lock:
                self.stats.started += 1
        if is_image:   # frame requests take turns at the vision server
            lane = self.lane
            self.fair_share.submit(lane, lambda: self._pool.submit(self._run_shared, req, method, content_type,
                                                                   make_body, lane))
        else:
            self._pool.submit(self._run, req, method, content_type, make_body)
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
            if req.error is not None:
                del self._requests[request_id]
                raise FetchErrorResult(req.error)
            limit = max(1, self.policy.max_poll_bytes)
            chunk = bytes(req.body[:limit])
            del req.body[:limit]
            status, done = req.status, req.done and not req.body
        if done:
            del self._requests[request_id]
        return status, done, chunk

    def cancel(self, request_id: int) -> None:
        """Abandon a request and close its connection; unknown ids are ignored."""
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

    def close(self) -> None:
        """Cancel every request in flight."""
        for rid in list(self._requests):
            self.cancel(rid)

    @property
    def in_flight(self) -> int:
        """Requests started and not yet released by poll or cancel."""
        return len(self._requests)

    # -- blocking use (wasmvision:platform/http) ---------------------------------------
    def blocking(self, method: str, url: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        """Perform a whole request on the calling thread under the same policy.

        Returns ``(status, body)``. Raises FetchErrorResult like :meth:`poll`.
        """
        refused = self.policy.check(url)
        if refused is not None:
            raise FetchErrorResult(refused)
        req = _Request(0, url, False, time.monotonic())
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

    def _run_shared(self, req: _Request, method: str, content_type: str, make_body, lane: int) -> None:
        """A frame request's turn has come (see :class:`FairShare`)."""
        try:
            req.dispatched = time.monotonic()
            with self.stats._lock:
                self.stats.waits_ms.append((req.dispatched - req.started) * 1000.0)
            if not req.cancelled:
                self._run(req, method, content_type, make_body)
        finally:
            self.fair_share.done(lane)

    def _run(self, req: _Request, method: str, content_type: str, make_body) -> None:
        try:
            body = make_body()
        except Exception as exc:  # noqa: BLE001 - reported to the processor, logged here
            log.error("could not build the request body for %s: %s", req.url, exc)
            with req.lock:
                req.error = FetchError.RUNTIME_ERROR
            self.stats.finish(req, False, f"runtime error: {exc}")
            return
        self._transfer(req, method, content_type, body)
        if req.error is not None:
            self.stats.finish(req, False, req.error.name.lower().replace("_", "-"))
        elif not req.cancelled:
            self.stats.finish(req, 200 <= req.status < 300, None if req.status < 300 else f"HTTP {req.status}")

    def _transfer(self, req: _Request, method: str, content_type: str, body: bytes) -> None:
        policy = self.policy
        try:
            headers = {"Content-Type": content_type} if content_type else {}
            credential = policy.credentials.get(url_destination(req.url) or "")
            if credential:
                headers["Authorization"] = credential
            resp = self._session().request(
                method, req.url, data=body if method == "POST" else None, headers=headers,
                stream=True, allow_redirects=False,
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
        except (requests.exceptions.RequestException, OSError, ValueError):
            with req.lock:
                if not req.cancelled:
                    req.error = FetchError.REQUEST_ERROR
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
           "frame_jpeg_body", "url_destination"]
