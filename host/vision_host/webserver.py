"""uvicorn serving an ASGI app from a background thread, with bounds on what clients may hold.

The MJPEG output and the live viewer (:mod:`.webapp`) are one Starlette app served by uvicorn
(HTTP/1.1 through h11, RFC 9112) on its own thread and event loop; :class:`BackgroundServer`
starts and stops it. What uvicorn does not bound by itself is bounded here, by
:class:`ServerLimits`, in a small subclass of uvicorn's h11 protocol:

* connections in total and per client address: one beyond either is answered ``503`` with a
  JSON ``{"error"}`` body and closed as soon as it is accepted (nothing is read from it);
* the request head: a connection that has not sent a complete request head within
  ``header_timeout_s`` of its start (or of the end of its previous response) is closed;
* the request body: one not received in full within ``body_timeout_s`` of its head is answered
  ``408`` (RFC 9110 §15.5.9) and the connection closed;
* the listen backlog (2048, uvicorn's default), so back-to-back connects never wait for the
  kernel's SYN retry.

A request that h11 cannot parse is answered ``400`` with a JSON ``{"error"}`` body (uvicorn's own
answer is plain text). Tokens never reach a log line: uvicorn's access log is off, and
:func:`redact` (used by every log line here and by :class:`RedactTokens` on uvicorn's loggers)
hides ``token=…`` query values and ``Bearer …`` credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import threading
from dataclasses import dataclass, fields

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BackgroundServer", "RedactTokens", "ServerLimits", "redact"]

log = logging.getLogger(__name__)

#: Kernel send buffer per connection. Left alone, Linux grows it to megabytes (tens of video
#: frames), so a slow viewer would see frames seconds late; capped, its writes stop early and it
#: then gets the newest frame. 128 KiB still sustains ~20 MB/s at 10 ms RTT.
SEND_BUFFER_BYTES = 128 * 1024
#: A response still being sent when the server stops (a viewer that stopped reading) is cut
#: after this many seconds.
_SHUTDOWN_GRACE_S = 0.5

_TOKEN_IN_QUERY = re.compile(r"(?i)(\btoken=)[^&\s\"'#]*")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s\"',]+")


def redact(text: str) -> str:
    """``text`` with every ``token=VALUE`` query value and ``Bearer VALUE`` credential
    replaced by ``…`` (e.g. ``GET /api/state?token=…&stream=0``)."""
    return _BEARER.sub(r"\1…", _TOKEN_IN_QUERY.sub(r"\1…", text))


class RedactTokens(logging.Filter):
    """A :class:`logging.Filter` that rewrites a record's message through :func:`redact`
    (the arguments are merged into the message first); it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class _QuietClientErrors(logging.Filter):
    """Drops uvicorn's warnings about what a client sent (a malformed request, an Upgrade
    header): any client could fill the log with them. They are logged at debug level here."""

    QUIET = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and (record.msg in self.QUIET or
                                                           str(record.msg).startswith("No supported WebSocket")))


_REDACTING = RedactTokens()
for _name in ("uvicorn", "uvicorn.error", "uvicorn.access", "vision_host.webserver", "vision_host.webapp",
              "vision_host.viewer", "vision_host.outputs"):
    logging.getLogger(_name).addFilter(_REDACTING)
logging.getLogger("uvicorn.error").addFilter(_QuietClientErrors())


@dataclass(frozen=True)
class ServerLimits:
    """What one client, and all clients together, may hold of the server.

    Attributes:
        max_connections: open connections in total; one more is answered 503 and closed.
        max_connections_per_client: open connections from one client IP address; one more
            is answered 503 and closed.
        header_timeout_s: seconds a connection may take to send a complete request head (from
            its start, or from the end of its previous response); then it is closed.
        body_timeout_s: seconds a request may take to send its body after its head; then it
            is answered 408 and closed.
        max_body_bytes: largest request body an endpoint reads; a larger one is answered 413.
        backlog: the listen backlog (connections the kernel queues before they are accepted).

    Raises:
        ValueError: a limit that is not a finite number above 0 (whole where a count).
    """

    max_connections: int = 256
    max_connections_per_client: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_body_bytes: int = 64 * 1024
    backlog: int = 2048

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            whole = f.type in (int, "int")
            number = isinstance(value, int) if whole else isinstance(value, (int, float))
            if isinstance(value, bool) or not number or not 0 < value < math.inf:
                raise ValueError(f"{f.name} = {value!r}: give a {'whole ' if whole else ''}number above 0")


def _json_answer(status: int, reason: bytes, message: str) -> list[h11.Event]:
    body = json.dumps({"error": message}).encode()
    return [h11.Response(status_code=status, reason=reason, headers=[
        (b"content-type", b"application/json; charset=utf-8"), (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"), (b"connection", b"close")]), h11.Data(data=body), h11.EndOfMessage()]


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"content-length: %d\r\nretry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n%s"
            % (len(body), body))


#: How long a connection being closed keeps reading (and dropping) what the client still sends.
_LINGER_S = 2.0


class _LingeringTransport:
    """An asyncio transport whose :meth:`close` closes in stages (RFC 9112 §9.6): what is
    buffered is sent, then a FIN, and the connection is read (and what arrives dropped) until
    the client closes or :data:`_LINGER_S` passes. Closing at once with unread request bytes
    makes the kernel send a reset, which can destroy the answer before the client reads it
    (a 413, 421 or 503 sent while the client is still sending). Everything else is the
    wrapped transport's."""

    def __init__(self, transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self.lingering = False
        self.linger = True     # False: close() closes at once (the server is stopping)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def finish(self) -> None:
        """From now on close at once (the server is stopping), and end a linger under way."""
        self.linger = False
        if self.lingering:
            self._transport.close()

    def close(self) -> None:
        transport = self._transport
        if self.lingering or transport.is_closing():
            return
        if not self.linger or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        try:
            transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):   # pragma: no cover - the socket is already gone
            transport.close()
            return
        self._loop.call_later(_LINGER_S, transport.close)


class _ConnectionGuard:
    """The connections of one server, by client address (touched by its event loop only)."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.total = 0
        self.per_client: dict[str, int] = {}
        self.by_peer: dict[tuple, _GuardedH11Protocol] = {}
        self.refused = 0
        self.refusing: set[_LingeringTransport] = set()   # refused connections being closed

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; returns why it is refused instead (not counted)."""
        limits = self.limits
        if self.total >= limits.max_connections:
            why = f"the server has its maximum of {limits.max_connections} connections open: try again later"
        elif self.per_client.get(ip, 0) >= limits.max_connections_per_client:
            why = (f"{ip} has its maximum of {limits.max_connections_per_client} connections open: "
                   f"close some, then try again")
        else:
            self.total += 1
            self.per_client[ip] = self.per_client.get(ip, 0) + 1
            return None
        self.refused += 1
        return why

    def release(self, ip: str) -> None:
        self.total -= 1
        left = self.per_client[ip] - 1
        if left:
            self.per_client[ip] = left
        else:
            del self.per_client[ip]

    def abort(self, client) -> bool:
        """Close the connection of the request whose ASGI ``scope["client"]`` is ``client`` at
        once, dropping what it has not read; False when there is no such connection."""
        protocol = self.by_peer.get(tuple(client) if client else None)
        if protocol is None or protocol.transport is None:
            return False
        protocol.transport.abort()
        return True


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds of :class:`ServerLimits` (see the module docstring)."""

    guard: _ConnectionGuard   # set on the subclass :func:`_protocol_class` makes for one server

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._ip = ""
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None   # "head" or "body": what the armed deadline waits for

    # -- connections ------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        lingering = _LingeringTransport(transport, self.loop)
        why = self.guard.admit(ip)
        if why is not None:
            log.debug("refused a connection from %s: %s", ip, why)
            self.transport = lingering    # (uvicorn's connection_made is skipped: not a connection of the server's)
            self.guard.refusing.add(lingering)
            transport.write(_refusal(why))
            lingering.close()
            return
        self._admitted, self._ip = True, ip
        super().connection_made(lingering)
        self.guard.by_peer[self.client] = self
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._arm("head", self.guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            self.guard.refusing.discard(self.transport)
            return
        self._admitted = False
        self._disarm()
        self.guard.release(self._ip)
        if self.guard.by_peer.get(self.client) is self:
            del self.guard.by_peer[self.client]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:      # closing: what the client still sends is dropped
            return
        try:
            super().data_received(data)
        except Exception as exc:  # noqa: BLE001 - a request uvicorn cannot turn into a scope
            log.debug("unreadable request from %s: %s", self._ip, exc)
            self.send_400_response("the request cannot be read")
            return
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def send_400_response(self, msg: str) -> None:
        """Answer a request h11 could not parse with 400 and a JSON ``{"error"}``, then close."""
        log.debug("bad request from %s: %s", self._ip, msg)
        try:
            output = b"".join(self.conn.send(e) or b"" for e in _json_answer(
                400, b"Bad Request", f"bad request: {msg.rstrip('.').lower()} (HTTP/1.1, RFC 9112)"))
            self.transport.write(output)
        except h11.LocalProtocolError:
            pass
        self.transport.close()

    def shutdown(self) -> None:
        self.transport.finish()
        super().shutdown()
        if not self.transport.is_closing():   # a response still under way
            self.loop.call_later(_SHUTDOWN_GRACE_S, self.transport.abort)

    # -- deadlines --------------------------------------------------------------------------------
    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _follow(self) -> None:
        """Arm the deadline that fits where the client is: sending a head, a body, or nothing."""
        if not self._admitted or self.transport.is_closing():
            return
        theirs = self.conn.their_state
        if theirs is h11.IDLE and self.conn.our_state is h11.IDLE:
            if self._phase != "head":
                self._arm("head", self.guard.limits.header_timeout_s)
        elif theirs is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.guard.limits.body_timeout_s)
        elif self._phase is not None:
            self._disarm()

    def _deadline_passed(self) -> None:
        phase, self._deadline, self._phase = self._phase, None, None
        if not self._admitted or self.transport.is_closing():
            return
        limits = self.guard.limits
        if phase == "head" and self.conn.their_state is h11.IDLE:
            log.debug("closed a connection from %s: no complete request head in %g s", self._ip,
                      limits.header_timeout_s)
            self.transport.close()
        elif phase == "body" and self.conn.their_state is h11.SEND_BODY:
            log.debug("closed a connection from %s: its request body took over %g s", self._ip, limits.body_timeout_s)
            cycle = self.cycle
            if cycle is not None and not cycle.response_started:
                cycle.disconnected = True         # the app's reads end; what it sends is dropped
                cycle.message_event.set()
                try:
                    self.transport.write(b"".join(self.conn.send(e) or b"" for e in _json_answer(
                        408, b"Request Timeout",
                        f"the request body did not arrive within {limits.body_timeout_s:g} s")))
                except h11.LocalProtocolError:
                    pass
            self.transport.close()


def _protocol_class(guard: _ConnectionGuard) -> type[_GuardedH11Protocol]:
    return type("VisionHostH11Protocol", (_GuardedH11Protocol,), {"guard": guard})


class _ThreadServer(uvicorn.Server):
    """uvicorn's server without signal handling (signals belong to the main thread: the run's),
    that sets :attr:`ready` once it listens."""

    def __init__(self, config: uvicorn.Config, guard: _ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    async def shutdown(self, sockets=None) -> None:
        for transport in list(self.guard.refusing):
            transport.finish()
        await super().shutdown(sockets=sockets)

    def install_signal_handlers(self) -> None:   # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):                     # uvicorn >= 0.29
        yield


class BackgroundServer:
    """uvicorn serving ``app`` on an already bound socket, from its own thread and event loop.

    Args:
        app: the ASGI 3 application.
        sock: a bound TCP socket (not yet listening); the server owns it from :meth:`start`.
        limits: the bounds of :class:`ServerLimits`.
        name: the thread's name.

    Attributes:
        socket: the listening socket.
        loop: the server's event loop (set once :meth:`start` returned).
        connections: the open connections (an object with ``total``, ``per_client`` (by IP),
            ``refused`` and ``abort(scope_client)``); touch it from :attr:`loop` only.
    """

    def __init__(self, app, sock: socket.socket, limits: ServerLimits, name: str = "vision-host-http"):
        self.limits = limits
        self.connections = _ConnectionGuard(limits)
        self.socket = sock
        self.config = uvicorn.Config(
            app, http=_protocol_class(self.connections), ws="none", lifespan="off", log_config=None,
            access_log=False, proxy_headers=False, server_header=False, headers=[("server", "vision-host")],
            backlog=limits.backlog, timeout_keep_alive=5, timeout_graceful_shutdown=2)
        self.server = _ThreadServer(self.config, self.connections)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread and return once the server accepts connections.

        Raises:
            RuntimeError: the server did not start (its error is chained).
        """
        self._thread.start()
        ready = self.server.ready
        while not ready.wait(0.05):
            if not self._thread.is_alive() or timeout_s <= 0:
                break
            timeout_s -= 0.05
        if not ready.is_set() or self._error is not None:
            self.stop()
            raise RuntimeError(f"the HTTP server did not start: {self._error}") from self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start(), logged otherwise
            self._error = exc
            if self.server.ready.is_set():
                log.exception("the HTTP server stopped on an error")

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.socket])

    def call_soon(self, callback, *args) -> None:
        """Run ``callback(*args)`` on the server's loop (from any thread); nothing once it has stopped."""
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):   # the loop is closed
                loop.call_soon_threadsafe(callback, *args)

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop accepting, end every connection (a response still under way is cut after 0.5 s)
        and join the thread; returns False when it is still running after ``timeout_s`` s."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.socket.close()
        return not self._thread.is_alive()
