"""Webhooks: caption and alert events POSTed as JSON to an HTTP(S) URL, signed, retried, in order.

Configured with ``--webhook URL`` or one ``[[webhook]]`` table per receiver in a run file
(:func:`parse_webhook_flag`, :func:`parse_webhook_table`; keys in :data:`WEBHOOK_KEYS`)::

    [[webhook]]
    url = "https://example.net/vision"
    events = ["alert", "caption"]     # default: all three, "summary" included
    secret-env = "VISION_WEBHOOK_SECRET"   # the variable holding the signing secret
    timeout-s = 5                     # connect and read timeout of one attempt
    streams = ["door"]                # stream names (or indices); default: every stream
    max-age-s = 259200                # give up on a message this old (default 3 days)

Event types: ``caption``, ``alert`` and ``summary`` (a periodic summary, sent only when its
``[[summary]]`` table's ``sinks`` name ``webhook``; :mod:`..history.summaries`). A webhook
receives all three unless ``events`` says otherwise: summaries exist only where a run file asks
for them, so asking once is enough. A webhook with ``streams`` gets a summary that covers every
stream or one of its streams.

Delivery: :class:`WebhookSink` is a caption subscriber of every stream. ``add`` / ``alert`` put
the event into a bounded in-memory queue and return (overflow counted in ``dropped``); the
sink's own thread moves queued events into its :class:`~.outbox.Outbox` (on disk) and POSTs
them one at a time, oldest first, so a receiver sees them in order. Each webhook has its own
thread and HTTP session: a receiver that hangs delays only its own deliveries. The body is
:func:`~.payloads.event_bytes` (``Content-Type: application/json``); redirects are not followed.

Answers: 2xx = delivered (removed from the outbox). 408, 429, 5xx, a timeout or a connection
error = retried, the same message again, after an exponential backoff with full jitter (a delay
drawn uniformly from 0 to min(cap, base × 2^(failures−1)), base 1 s, cap 60 s), or after the
``Retry-After`` of a 429 or 503 (seconds or an HTTP date, at most the cap). 410 Gone = the
receiver wants no more webhooks: this webhook stops for the rest of the run (logged; what is
pending stays in the outbox, new events are counted as dropped). Any other answer (3xx, other
4xx) = the receiver refuses the message: it is dropped, counted and logged, and the next one
goes. Retrying goes on until the message is delivered, refused, older than ``max-age-s``
(dropped, counted) or pushed out by the outbox's bound (the oldest dropped, counted). What is
not delivered at exit stays in the outbox and the next run with the same URL delivers it.

Signature: the Standard Webhooks specification, version 1.0.0
(https://www.standardwebhooks.com, text at
https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md).
Every request carries

* ``webhook-id``: the message id, the same on every attempt (the ``id`` of the JSON body;
  receivers dedupe on it); a uuid4 hex, so it holds no ``.``;
* ``webhook-timestamp``: the attempt's time, integer Unix seconds (new on each retry: receivers
  reject stale timestamps against replays);
* ``webhook-signature``: ``v1,`` + the base64 of HMAC-SHA256(key, ``"{id}.{timestamp}.{body}"``)
  over the exact body bytes sent (the header is a space-delimited list of signatures in the
  spec; one is sent). Sent only when a secret is configured.

The secret is read from the environment variable named by ``secret-env`` when the sink starts.
As the spec serializes symmetric secrets, ``whsec_`` followed by base64 is decoded to the key
bytes; any other string is used as the key itself (its UTF-8 bytes). The key must be 24 to 512
bytes (the spec asks for at least 24 random bytes). Make one with
``python -c "import base64, secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())"``.

Errors at start (bad URL or table, a secret variable that is not set, a bad secret) raise
:class:`WebhookError` (a ValueError) with a sentence saying what to fix.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import logging
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..captions.bus import CaptionSubscriber
from ..captions.event import AlertEvent, CaptionEvent, SummaryEvent
from .outbox import DEFAULT_MAX_MESSAGES, Outbox, OutboxError, default_outbox_path
from .payloads import event_bytes

__all__ = ["EVENT_TYPES", "WEBHOOK_KEYS", "WebhookError", "WebhookSettings", "WebhookSink", "parse_webhook_flag",
           "parse_webhook_table", "redact_url", "sign", "signing_key"]

log = logging.getLogger(__name__)

#: The event types a webhook can receive.
EVENT_TYPES = frozenset({"caption", "alert", "summary"})
#: Keys of a ``[[webhook]]`` table.
WEBHOOK_KEYS = frozenset({"url", "events", "secret-env", "timeout-s", "streams", "max-age-s"})
#: The variable ``--webhook URL`` takes its secret from, when that variable is set.
FLAG_SECRET_ENV = "VISION_HOST_WEBHOOK_SECRET"
#: Bounds of the settings.
DEFAULT_TIMEOUT_S, MIN_TIMEOUT_S, MAX_TIMEOUT_S = 5.0, 0.1, 300.0
DEFAULT_MAX_AGE_S, MIN_MAX_AGE_S, MAX_MAX_AGE_S = 3 * 86400.0, 1.0, 30 * 86400.0
MAX_URL_CHARS = 2000
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 512
#: Events waiting in memory for the delivery thread, per webhook, before new ones are dropped.
DEFAULT_QUEUE_SIZE = 1000


class WebhookError(ValueError):
    """A webhook cannot be configured or started; the message says what to fix."""


@dataclass(frozen=True)
class WebhookSettings:
    """One webhook receiver.

    Attributes:
        url: ``http://`` or ``https://`` URL, no user:password part.
        events: the event types it receives, a subset of :data:`EVENT_TYPES` (default: all).
        secret_env: name of the environment variable holding the signing secret, or None
            (requests are then unsigned).
        timeout_s: connect and read timeout of one attempt, seconds.
        streams: the stream names (or indices, as text) it receives, or None for every stream.
        max_age_s: a message older than this (since it was queued) is dropped, not sent.
    """

    url: str
    events: frozenset = EVENT_TYPES
    secret_env: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    streams: tuple[str, ...] | None = None
    max_age_s: float = DEFAULT_MAX_AGE_S

    @property
    def sink_name(self) -> str:
        """The webhook's queue name in an outbox file: ``webhook:`` + the first 16 hex digits of
        the URL's SHA-256 (the same URL finds its pending messages in the next run)."""
        return "webhook:" + hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]


def _check_url(url, where: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise WebhookError(f"{where}: the webhook url must be an http:// or https:// URL")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise WebhookError(f"{where}: the webhook url is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port                       # raises ValueError for a bad port
    except ValueError as exc:
        raise WebhookError(f"{where}: the webhook url {redact_url(url)!r} is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookError(f"{where}: the webhook url must start with http:// or https://, "
                           f"not {parts.scheme + '://' if parts.scheme else 'nothing'}")
    if "@" in parts.netloc:
        raise WebhookError(f"{where}: the webhook url must not hold a user or password (user:password@): "
                           f"put the signing secret in an environment variable and name it with secret-env")
    if not parts.hostname:
        raise WebhookError(f"{where}: the webhook url {url!r} has no host")
    if parts.fragment:
        raise WebhookError(f"{where}: the webhook url has a #fragment, which is never sent: remove it")
    return url


def _number(value, key: str, low: float, high: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise WebhookError(f"{key} in {where} must be a number of seconds from {low:g} to {high:g}, not {value!r}")
    return float(value)


def parse_webhook_table(table, where: str) -> WebhookSettings:
    """A run file's ``[[webhook]]`` table (keys :data:`WEBHOOK_KEYS`) → :class:`WebhookSettings`.

    ``where`` names the table in messages (e.g. ``"[[webhook]] number 1 in run.toml"``).

    Raises:
        WebhookError: not a table, an unknown key, a missing or bad url, events not a list of
            "caption"/"alert"/"summary", a bad secret-env name, a number out of range, streams not a list.
    """
    if not isinstance(table, Mapping):
        raise WebhookError(f"{where} must be a table with at least url = \"https://…\"")
    unknown = set(table) - WEBHOOK_KEYS
    if unknown:
        raise WebhookError(f"unknown key {sorted(unknown)[0]!r} in {where}: known keys are {', '.join(sorted(WEBHOOK_KEYS))}")
    if "url" not in table:
        raise WebhookError(f"{where} has no url: give the receiver's http:// or https:// URL")
    url = _check_url(table["url"], where)
    events = table.get("events", sorted(EVENT_TYPES))
    if isinstance(events, str):
        events = [events]
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events) \
            or not set(events) <= EVENT_TYPES:
        raise WebhookError(f"events in {where} must be a non-empty list of \"caption\", \"alert\" and "
                           f"\"summary\", not {events!r}")
    secret_env = table.get("secret-env")
    if secret_env is not None and (not isinstance(secret_env, str)
                                   or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,199}", secret_env)):
        raise WebhookError(f"secret-env in {where} must be the name of an environment variable "
                           f"(letters, digits, _), not {secret_env!r}")
    timeout_s = _number(table.get("timeout-s", DEFAULT_TIMEOUT_S), "timeout-s", MIN_TIMEOUT_S, MAX_TIMEOUT_S, where)
    max_age_s = _number(table.get("max-age-s", DEFAULT_MAX_AGE_S), "max-age-s", MIN_MAX_AGE_S, MAX_MAX_AGE_S, where)
    streams = table.get("streams")
    if streams is not None:
        if not isinstance(streams, list) or not streams \
                or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in streams):
            raise WebhookError(f"streams in {where} must be a non-empty list of stream names, not {streams!r}")
        streams = tuple(str(s) for s in streams)
    return WebhookSettings(url, frozenset(events), secret_env, timeout_s, streams, max_age_s)


def parse_webhook_flag(url: str) -> WebhookSettings:
    """``--webhook URL`` → :class:`WebhookSettings` with the defaults (both event types, every
    stream), signed with the secret in ``$VISION_HOST_WEBHOOK_SECRET`` when that variable is set.

    Raises:
        WebhookError: a bad URL (see :func:`parse_webhook_table`).
    """
    url = _check_url(url, "--webhook")
    return WebhookSettings(url, secret_env=FLAG_SECRET_ENV if os.environ.get(FLAG_SECRET_ENV) else None)


def redact_url(url: str) -> str:
    """``url`` without user:password, query string and fragment (for logs and health)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a URL that cannot be parsed)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: ``whsec_`` + base64 decoded (Standard Webhooks), else the
    string's UTF-8 bytes.

    Raises:
        WebhookError: bad base64 after ``whsec_``, or a key outside 24…512 bytes.
    """
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            raise WebhookError("the webhook secret starts with whsec_ but the rest is not base64: give whsec_ "
                               "followed by the base64 of random bytes, or a plain string") from None
    else:
        key = secret.encode("utf-8")
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise WebhookError(f"the webhook secret is {len(key)} bytes: use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                           f"random bytes (e.g. whsec_ + the base64 of 32 random bytes)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode("utf-8") + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header (delay seconds or HTTP date) → seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookSink(CaptionSubscriber):
    """Delivers caption and alert events to one webhook (see the module docstring).

    Args:
        settings: the receiver.
        outbox: the outbox to queue in (the sink takes it over and closes it when its thread
            ends), or the path of an outbox file (None: :func:`.default_outbox_path`), opened
            for :attr:`WebhookSettings.sink_name` with ``max_messages``.
        max_messages: the outbox bound when the sink opens the outbox.
        queue_size: events waiting in memory for the delivery thread (1 … 1 000 000).
        backoff_base_s, backoff_cap_s: the retry backoff (see the module docstring); tests make
            them small.
        start: start the delivery thread now (else call :meth:`start`).

    Raises:
        WebhookError: the secret variable is not set, or the secret is unusable.
        OutboxError: the outbox file cannot be opened.

    Attributes (counters, read from any thread): delivered, dropped (refused, too old,
    pushed out of the outbox, or over the in-memory queue), failures (failed attempts).
    """

    def __init__(self, settings: WebhookSettings, outbox: Outbox | str | Path | None = None, *,
                 max_messages: int = DEFAULT_MAX_MESSAGES, queue_size: int = DEFAULT_QUEUE_SIZE,
                 backoff_base_s: float = 1.0, backoff_cap_s: float = 60.0, start: bool = True):
        if not 1 <= queue_size <= 1_000_000:
            raise ValueError(f"queue_size must be 1 to 1000000, not {queue_size}")
        if not (0 < backoff_base_s <= backoff_cap_s <= 3600):
            raise ValueError("the backoff needs 0 < base <= cap <= 3600 s")
        self.settings = settings
        self.url = redact_url(settings.url)
        self._key = None
        if settings.secret_env:
            secret = os.environ.get(settings.secret_env)
            if not secret:
                raise WebhookError(f"the webhook {self.url} is signed with the secret in ${settings.secret_env}, "
                                   f"which is not set: export {settings.secret_env}=whsec_… (or remove secret-env)")
            self._key = signing_key(secret)
        if not isinstance(outbox, Outbox):
            outbox = Outbox(default_outbox_path() if outbox is None else outbox, settings.sink_name, max_messages)
        self.outbox = outbox
        self._base, self._cap = backoff_base_s, backoff_cap_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._session = None
        self.delivered = 0
        self.dropped = 0
        self.failures = 0
        self.overflow = 0                      # of dropped: over the in-memory queue
        self.disabled = False                  # a 410 Gone stopped this webhook
        self.connected: bool | None = None     # None: no attempt yet
        self.last_status: int | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"webhook {self.url}", daemon=True)
        self._started = False
        self._pending_at_close = 0
        if start:
            self.start()

    def start(self) -> None:
        """Start the delivery thread (once)."""
        if not self._started:
            self._started = True
            self._thread.start()

    # -- the frame loop's side: never blocks -------------------------------------------------------

    def _wanted(self, kind: str, stream: int, stream_name: str | None) -> bool:
        s = self.settings
        if kind not in s.events or self._stop.is_set():
            return False
        return s.streams is None or str(stream) in s.streams or (stream_name is not None and stream_name in s.streams)

    def _offer(self, event) -> None:
        if self.disabled:
            self._count("dropped")
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count("dropped")
            if self._count("overflow") == 1:
                log.warning("webhook %s: more than %d events wait for the delivery thread; dropping new ones "
                            "(counted in its dropped figure)", self.url, self._queue.maxsize)
            return
        self._wake.set()

    def add(self, event: CaptionEvent) -> None:
        """Queue a caption event for delivery (if this webhook takes captions of its stream)."""
        if self._wanted("caption", event.stream, event.stream_name):
            self._offer(event)

    def alert(self, event: AlertEvent) -> None:
        """Queue an alert edge for delivery (if this webhook takes alerts of its stream)."""
        if self._wanted("alert", event.stream, event.stream_name):
            self._offer(event)

    def summary(self, event: SummaryEvent) -> None:
        """Queue a periodic summary for delivery (if its ``sinks`` name ``webhook``, this webhook
        takes summaries, and the summary covers every stream or one of this webhook's)."""
        s = self.settings
        if "webhook" not in event.sinks or "summary" not in s.events or self._stop.is_set():
            return
        if s.streams is None or not event.streams or set(event.streams) & set(s.streams):
            self._offer(event)

    def _count(self, counter: str, n: int = 1) -> int:
        """Add ``n`` to counter attribute ``counter`` (frame loops and the delivery thread share
        ``dropped``); returns the new value."""
        with self._count_lock:
            value = getattr(self, counter) + n
            setattr(self, counter, value)
        return value

    # -- the delivery thread -----------------------------------------------------------------------

    def _drain(self) -> None:
        """Move the events waiting in memory into the outbox, in order."""
        with self._drain_lock:
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    return
                kind = "alert" if isinstance(event, AlertEvent) else \
                    "summary" if isinstance(event, SummaryEvent) else "caption"
                message_id = event.id
                before = self.outbox.dropped
                try:
                    self.outbox.put(kind, event_bytes(event, message_id), message_id=message_id)
                except OutboxError as exc:
                    self._count("dropped")
                    self._error(str(exc))
                if self.outbox.dropped > before:                  # the oldest, pushed out by the bound
                    self._count("dropped", self.outbox.dropped - before)

    def _run(self) -> None:
        import requests
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"vision-host/{_version()}"
        streak = 0                             # failed attempts of the current message in a row
        try:
            while True:
                self._drain()
                if self._stop.is_set() or self.disabled:
                    return
                try:
                    pending = self.outbox.peek(1)
                except OutboxError as exc:
                    self._error(str(exc))
                    self._sleep(self._cap)
                    continue
                if not pending:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                message = pending[0]
                if time.time() - message.created > self.settings.max_age_s:
                    self._give_up(message, f"older than max-age-s ({self.settings.max_age_s:g} s)")
                    continue
                outcome, delay = self._attempt(message)
                if outcome == "delivered":
                    streak = 0
                    self._remove(message)
                    self.delivered += 1
                elif outcome == "refused":
                    streak = 0
                    self._give_up(message, self.last_error or "refused")
                elif outcome == "gone":
                    self.disabled = True
                    log.error("webhook %s answered 410 Gone: it wants no more webhooks; not sending to it for the "
                              "rest of this run (%d messages stay in the outbox)", self.url, len(self.outbox))
                    return
                else:
                    streak += 1
                    if streak == 1:
                        log.warning("webhook %s: delivery failed (%s); retrying with backoff, in order",
                                    self.url, self.last_error)
                    if delay is None:
                        delay = random.uniform(0, min(self._cap, self._base * 2 ** (streak - 1)))
                    self._sleep(min(delay, self._cap))
        except Exception as exc:      # a bug must not end the run silently
            log.exception("webhook %s: the delivery thread stopped (%s); undelivered messages stay in the outbox",
                          self.url, exc)
        finally:
            self._drain()
            self._session.close()
            self._close_outbox()

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (or until stopped), moving newly queued events into the outbox meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()
            self._drain()

    def _attempt(self, message) -> tuple[str, float | None]:
        """POST ``message`` once → ("delivered" | "refused" | "gone" | "retry", Retry-After delay or None)."""
        import requests
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": message.message_id,
                   "webhook-timestamp": str(timestamp)}
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, message.message_id, timestamp, message.payload)
        try:
            self.outbox.attempted(message.row_id)
        except OutboxError:
            pass
        timeout = self.settings.timeout_s
        try:
            with self._session.post(self.settings.url, data=message.payload, headers=headers,
                                    timeout=(timeout, timeout), allow_redirects=False, stream=True) as reply:
                status = reply.status_code
                retry_after = _retry_after(reply.headers.get("Retry-After")) if status in (429, 503) else None
                location = reply.headers.get("Location")
        except requests.RequestException as exc:
            self.connected = False
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {_short(exc)}"
            return "retry", None
        self.connected, self.last_status = True, status
        if 200 <= status < 300:
            if self.last_error is not None:
                log.info("webhook %s: delivering again (HTTP %d)", self.url, status)
            self.last_error = None
            return "delivered", None
        self.failures += 1
        if status == 410:
            self.last_error = "HTTP 410 Gone"
            return "gone", None
        if status in (408, 429) or 500 <= status < 600:
            self.last_error = f"HTTP {status}"
            return "retry", retry_after
        if 300 <= status < 400:
            self.last_error = (f"HTTP {status}: the URL redirects"
                               + (f" to {redact_url(location)}: give that URL instead" if location else ""))
        else:
            self.last_error = f"HTTP {status}: the receiver refuses the message"
        return "refused", None

    def _give_up(self, message, why: str) -> None:
        self._remove(message)
        self._count("dropped")
        log.warning("webhook %s: dropped message %s (%s, %d attempts)", self.url, message.message_id, why,
                    message.attempts + 1)

    def _remove(self, message) -> None:
        try:
            self.outbox.remove(message.row_id)
        except OutboxError as exc:
            self._error(str(exc))

    def _error(self, text: str) -> None:
        """An outbox failure: logged when it differs from the last error."""
        if text != self.last_error:
            log.error("webhook %s: %s", self.url, text)
        self.last_error = text

    # -- status and shutdown -----------------------------------------------------------------------

    def health(self) -> dict:
        """The webhook's state for the viewer and stats: ``url`` (no query string), ``connected``
        (None before the first attempt), ``last_status`` (HTTP status of the last answer),
        ``queued`` (in memory + in the outbox), ``delivered``, ``dropped``, ``failures``,
        ``last_error`` (None once delivering again), ``disabled`` (a 410 Gone)."""
        try:
            pending = len(self.outbox)
        except OutboxError:          # closed
            pending = self._pending_at_close
        return {"url": self.url, "connected": self.connected, "last_status": self.last_status,
                "queued": self._queue.qsize() + pending, "delivered": self.delivered, "dropped": self.dropped,
                "failures": self.failures, "last_error": self.last_error, "disabled": self.disabled}

    def close(self, end_time_s: float | None = None, timeout_s: float = 5.0) -> None:
        """Stop delivering: wait up to ``timeout_s`` for an attempt in progress, then return.
        What was not delivered stays in the outbox for the next run. Idempotent; the bus calls it
        with ``end_time_s`` (unused)."""
        self._stop.set()
        self._wake.set()
        if self._started:
            self._thread.join(max(0.0, timeout_s))
            if self._thread.is_alive():
                self._drain()         # keep what waits in memory; the thread closes the outbox when its attempt ends
                log.warning("webhook %s: an attempt was still in progress at exit; undelivered messages stay in "
                            "the outbox for the next run", self.url)
        else:
            self._drain()
            self._close_outbox()

    def _close_outbox(self) -> None:
        """Close the outbox, keeping its pending count for :meth:`health`."""
        try:
            self._pending_at_close = len(self.outbox)
        except OutboxError:
            pass
        self.outbox.close()


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "…"


def _version() -> str:
    from .. import __version__
    return __version__
