"""The request guard in front of every route: a web page must not drive the server, and a
request must not exhaust it. Origins (RFC 6454's ``Origin`` header) are compared as
``scheme://host:port`` with the port always written; what is refused is answered in the
request's API's error shape (:mod:`.errors`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from .errors import BodyTooLarge, RequestError, api_of, error_response


def normalize_origin(origin: str) -> str | None:
    """An ``Origin`` header (or ``--allow-origin`` value) as ``scheme://host:port`` in lower
    case with the port always written; None when it is not an http(s) origin (``null``, a
    path, a bad port)."""
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
    norm = normalize_origin(origin)
    if norm is None:
        return False
    if norm in allowed:
        return True
    if not server:
        return False
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


class RequestGuard:
    """ASGI middleware in front of every route; what it refuses never reaches a route.

    * A ``Host`` header that does not name this server (:class:`.webapp.HostRule`: ``localhost``,
      a loopback address, the address the connection came in on, the name listened on, the
      machine's name when listening on every interface, or one of ``allowed_hosts``): **403**,
      as Ollama answers. A web page that rebinds its own name to this machine's address (DNS
      rebinding) sends its own name, so it can read nothing, not even ``GET /api/tags``.
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

    def __init__(self, app: Any, *, max_body_bytes: int | None = None, allowed_origins: frozenset = frozenset(),
                 bind_host: str = "127.0.0.1", allowed_hosts: Sequence[str] = ()) -> None:
        from ..webapp import HostRule

        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = allowed_origins
        self.host_rule = HostRule(bind_host, allowed_hosts)

    def refusal(self, scope: dict) -> RequestError | None:
        """Why the request is refused before its route, or None."""
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host")
        local = scope.get("server")
        if not self.host_rule.allows(host, str(local[0]) if local else None):
            return RequestError(403, f"Host {host[:100]!r} does not name this server (a web page using DNS rebinding "
                                     f"sends its own name): reach it as localhost or by its address, or start it "
                                     f"with --allow-host NAME to answer to that name")
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
