"""The MJPEG output's web app: the video, snapshots, the page, and (with a viewer) its API and events.

:func:`build_app` makes one Starlette app from the output's streams and the optional
:class:`.viewer.Viewer`; :class:`.webserver.BackgroundServer` serves it. Later services (an MCP
endpoint, Prometheus ``/metrics``) mount on the same app.

Every request passes :class:`AccessRules` first, in this order:

1. **Host** (DNS rebinding, RFC 9110 §7.2 / §15.5.20): a ``Host`` header that does not name this
   server is answered ``421 Misdirected Request``. It names this server when it is a loopback
   name or address (``localhost``, any ``127.x.y.z``, ``[::1]``), the address the connection
   arrived on, the address or name given with ``-d``, this machine's host name when bound to all
   interfaces (the address printed at start), or a name given with ``--allow-host``; the port
   may be there or not. HTTP/1.0 requests without ``Host`` (no browser sends those) pass.
2. **Token**: when the server has one, ``?token=T`` or ``Authorization: Bearer T`` (compared in
   constant time) or ``401``; except on :data:`PUBLIC_PATHS` (the orchestrators' health probes,
   which rarely carry a token), which learn from ``request.state.token_ok`` whether it was given
   and then say no more than ``{"status": …}`` (:mod:`.metrics`).
3. **Origin**: a request other than GET/HEAD whose ``Origin`` is not this server's own
   (``scheme://`` + the ``Host`` it was sent to) is answered ``403``.

Errors are JSON ``{"error": "…"}`` (the video routes' 404/410/503 are one line of text). No
CORS header is ever sent. Each request is logged at debug level with its query redacted.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .webserver import ServerLimits, redact

__all__ = ["PUBLIC_PATHS", "AccessRules", "HostRule", "build_app", "json_response", "text_response"]

log = logging.getLogger(__name__)

BOUNDARY = "frame"
_SNAPSHOT_FILE = re.compile(r"([0-9]{1,6})\.(jpg|png)")
_STREAM_FILE = re.compile(r"([0-9]{1,6})(?:\.mjpg)?")
_PORT = re.compile(r"[0-9]{0,5}")
#: Paths answered without the token (GET only; the Host rule still applies): ``/healthz`` and
#: ``/readyz``, which reveal only ``{"status": …}`` to a request without it.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def _json_bytes(obj) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate somewhere (a caption a server sent as "\ud800")
        return json.dumps(obj).encode("ascii")


def json_response(status: int, obj, headers: dict[str, str] | None = None) -> Response:
    """``obj`` as ``application/json; charset=utf-8`` (UTF-8, RFC 8259), never cached."""
    return Response(_json_bytes(obj), status, {"cache-control": "no-store", **(headers or {})},
                    media_type="application/json; charset=utf-8")


def text_response(status: int, text: str) -> Response:
    """One line of ``text/plain; charset=utf-8``, never cached."""
    return Response((text + "\n").encode("utf-8"), status, {"cache-control": "no-store"},
                    media_type="text/plain; charset=utf-8")


# --------------------------------------------------------------------------- access rules


def _host_of(value: str) -> str | None:
    """The host of a ``Host`` header value (``host[:port]``, ``[v6]:port``), lowercased and
    without a trailing dot; None when it is not of that form."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
    elif ":" in value:
        host, _, port = value.partition(":")
        rest = ":" + port
    else:
        host, rest = value, ""
    if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
        return None
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    return host or None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


class HostRule:
    """Which ``Host`` header values name this server (see the module docstring).

    Args:
        bind_host: the address or name listened on (``-d``'s host: ``127.0.0.1``, ``0.0.0.0``,
            ``::``, ``myhost.lan``, …).
        allowed: more names (or addresses) to answer for, as given with ``--allow-host``
            (a ``:port`` after one is ignored).
    """

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()):
        bind = (_host_of(bind_host) or bind_host).strip("[]").lower()
        self.wildcard = bind in ("", "0.0.0.0", "::")
        names = {h for h in (_host_of(a) for a in allowed) if h}
        if self.wildcard:
            names.add(socket.gethostname().lower())
        elif _address(bind) is None:
            names.add(bind)
        self.names = frozenset(names)
        self.addresses = frozenset(a for a in (_address(n) for n in names | {bind}) if a is not None)

    def allows(self, host_header: str | None, local_address: str | None) -> bool:
        """True when ``host_header`` (the request's ``Host``) names this server, reached at
        ``local_address`` (the address the connection arrived on); None passes (HTTP/1.0)."""
        if host_header is None:
            return True
        host = _host_of(host_header)
        if host is None:
            return False
        if host == "localhost" or host in self.names:
            return True
        address = _address(host)
        if address is None:
            return False
        if address.is_loopback or address in self.addresses:
            return True
        local = _address(local_address) if local_address else None
        return local is not None and address == local


def _token_given(scope, headers: dict[bytes, bytes]) -> str:
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if name == "token" and value:
            return value
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return ""


class AccessRules:
    """ASGI middleware checking Host, token and Origin on every HTTP request (module docstring).

    Args:
        app: the ASGI app behind it.
        host_rule: which ``Host`` values name this server.
        token: a callable returning the token every request must carry, or None for none
            (looked up per request: the viewer may set it after the app is built).
    """

    def __init__(self, app, host_rule: HostRule, token=lambda: None):
        self.app = app
        self.host_rule = host_rule
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw_host = headers.get(b"host")
        host = None if raw_host is None else raw_host.decode("latin-1")
        server = scope.get("server")
        token = self.token()
        refusal = None
        token_ok = token is None or hmac.compare_digest(_token_given(scope, headers).encode("utf-8", "replace"),
                                                        token.encode("utf-8"))
        public = scope["path"] in PUBLIC_PATHS and scope["method"] in ("GET", "HEAD")
        if not self.host_rule.allows(host, server[0] if server else None):
            refusal = json_response(421, {"error": f"this server does not answer for the host {host!r}: open it by its "
                                                    f"address (e.g. http://127.0.0.1:PORT/), or start vision-host with "
                                                    f"--allow-host NAME for a name of yours"},
                                    {"connection": "close"})
        elif not token_ok and not public:
            refusal = json_response(401, {"error": "this server needs the token printed at its start: open "
                                                   "/?token=… or send Authorization: Bearer …"})
        elif scope["method"] not in ("GET", "HEAD") and b"origin" in headers:
            origin = headers[b"origin"].decode("latin-1")
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme != scope.get("scheme", "http") or host is None \
                    or parts.netloc.lower() != host.lower():
                refusal = json_response(403, {"error": f"requests from {origin} are not allowed"})
        scope.setdefault("state", {})["token_ok"] = token_ok
        status = []

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            if refusal is not None:
                await refusal(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            if log.isEnabledFor(logging.DEBUG):
                client = scope.get("client")
                query = scope.get("query_string", b"").decode("latin-1")
                log.debug("%s %s %s -> %s (%.1f ms)", client[0] if client else "-", scope["method"],
                          redact(scope["path"] + ("?" + query if query else "")), status[0] if status else "-",
                          (time.perf_counter() - started) * 1e3)


# --------------------------------------------------------------------------- the app


class VideoChannel(Protocol):
    """What :func:`build_app` needs of one MJPEG stream (``outputs.mjpeg._MjpegChannel`` is one)."""

    index: int
    name: str
    finished: bool

    def parts(self):
        """An async iterator of multipart parts (bytes), the newest JPEG each, until the stream ends."""

    async def snapshot_async(self) -> bytes | None:
        """The newest frame as JPEG (encoded if needed), None before the first frame."""


def _no_stream(channels: Sequence[VideoChannel], index: int) -> Response:
    last = len(channels) - 1
    return text_response(404, f"there is no stream {index}: this server has streams 0 to {last} (see / for all of them)"
                         if last else f"there is no stream {index}: this server has only stream 0 (/stream)")


_STREAM_HEADERS = {"cache-control": "no-cache, no-store, must-revalidate", "pragma": "no-cache",
                   "x-accel-buffering": "no"}


def build_app(channels: Sequence[VideoChannel], viewer=None, *, index_html: bytes, host_rule: HostRule,
              limits: ServerLimits | None = None) -> Starlette:
    """The Starlette app serving ``channels`` (stream N = ``channels[N]``) and ``viewer``'s routes.

    Routes:

    * ``GET /``, ``/index.html`` — the viewer's page, or ``index_html`` (a grid of the streams)
      without a viewer.
    * ``GET /stream``, ``/stream.mjpg`` (stream 0), ``/stream/N``, ``/stream/N.mjpg`` —
      ``multipart/x-mixed-replace; boundary=frame``; each part is ``--frame``,
      ``Content-Type: image/jpeg``, ``Content-Length: N``, a blank line, N bytes of JPEG and
      CRLF. 410 once the stream has ended, 404 for a stream that does not exist.
    * ``GET /snapshot.jpg``, ``/snapshot/N.jpg`` — the newest frame as JPEG (503 before the first).
    * ``GET /snapshot.png``, ``/snapshot/N.png`` and ``/api/…`` — the viewer's (404 without one).

    Args:
        channels: the streams (see :class:`VideoChannel`).
        viewer: the :class:`.viewer.Viewer`, or None (then only the video and the grid page).
        index_html: the page at ``/`` without a viewer.
        host_rule: which ``Host`` values are answered (:class:`HostRule`).
        limits: the server's :class:`.webserver.ServerLimits` (the viewer reads
            ``max_body_bytes``); defaults when None.

    Returns:
        the app, wrapped in :class:`AccessRules`; ``app.state.limits`` holds ``limits`` and
        ``app.state.connections`` (set by the server's owner) the open connections.
    """

    def channel_of(number: str | None):
        index = int(number) if number is not None else 0
        return (channels[index], None) if index < len(channels) else (None, _no_stream(channels, index))

    async def index(request: Request) -> Response:
        page = viewer.page if viewer is not None else None
        return Response(page if page is not None else index_html, 200, {"cache-control": "no-store"},
                        media_type="text/html; charset=utf-8")

    async def stream(request: Request) -> Response:
        name = request.path_params.get("name")
        if name is not None:
            match = _STREAM_FILE.fullmatch(name)
            if match is None:
                return json_response(404, {"error": "not found"})
            name = match.group(1)
        channel, missing = channel_of(name)
        if missing is not None:
            return missing
        if channel.finished:
            return text_response(410, f"stream {channel.index} ({channel.name}) has ended")
        media_type = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        if request.method == "HEAD":
            return Response(b"", 200, _STREAM_HEADERS, media_type=media_type)
        return StreamingResponse(channel.parts(), 200, _STREAM_HEADERS, media_type=media_type)

    async def snapshot(request: Request) -> Response:
        name = request.path_params.get("name")
        if name is None:
            number, kind = None, request.url.path.rsplit(".", 1)[-1]
        else:
            match = _SNAPSHOT_FILE.fullmatch(name)
            if match is None:
                return json_response(404, {"error": "not found"})
            number, kind = match.groups()
        channel, missing = channel_of(number)
        if kind == "png":
            if viewer is None:
                return json_response(404, {"error": "not found"})
            if missing is not None:
                return json_response(404, {"error": f"there is no stream {number}: streams are 0 to "
                                                    f"{len(channels) - 1}"})
            return await viewer.snapshot_png(request, channel.index)
        if missing is not None:
            return missing
        jpeg = await channel.snapshot_async()
        if jpeg is None:
            return text_response(503, "no frame has been written yet")
        return Response(jpeg, 200, {"cache-control": "no-store"}, media_type="image/jpeg")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/index.html", index, methods=["GET"]),
        Route("/stream", stream, methods=["GET"]),
        Route("/stream.mjpg", stream, methods=["GET"]),
        Route("/stream/{name}", stream, methods=["GET"]),
        Route("/snapshot.jpg", snapshot, methods=["GET"]),
        Route("/snapshot.png", snapshot, methods=["GET"]),
        Route("/snapshot/{name}", snapshot, methods=["GET"]),
    ]
    if viewer is not None:
        routes += viewer.routes()

    async def not_found(request: Request, exc) -> Response:
        return json_response(404, {"error": f"not found: {request.url.path}"})

    async def not_allowed(request: Request, exc) -> Response:
        return json_response(405, {"error": f"{request.method} is not allowed on {request.url.path}"},
                             dict(getattr(exc, "headers", None) or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return json_response(500, {"error": "internal error: the server's log says more"})

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed, 500: server_error})
    app.state.limits = limits or ServerLimits()
    app.state.connections = None
    app.add_middleware(AccessRules, host_rule=host_rule,
                       token=(lambda: viewer.token) if viewer is not None else (lambda: None))
    return app


async def read_body(request: Request, max_bytes: int) -> bytes | Response:
    """The request's body, or the error :class:`Response` to answer instead: 413 over
    ``max_bytes`` (by ``Content-Length`` before reading, else while reading), 400 for a
    ``Content-Length`` that is not a number or a body that ended early."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit() or len(declared) > 18:
            return json_response(400, {"error": "bad request: Content-Length is not a number"},
                                 {"connection": "close"})
        if int(declared) > max_bytes:
            return json_response(413, {"error": f"the body is over {max_bytes} bytes"}, {"connection": "close"})
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                return json_response(413, {"error": f"the body is over {max_bytes} bytes"}, {"connection": "close"})
            chunks.append(chunk)
    except Exception:  # noqa: BLE001 - starlette's ClientDisconnect: nobody reads the answer
        return json_response(400, {"error": "bad request: the body ended early"}, {"connection": "close"})
    return b"".join(chunks)
