"""``vision-host mcp --attach URL``: MCP over stdio, forwarded to a running instance's ``/mcp``.

For MCP clients that launch a command (and speak JSON-RPC on its stdin/stdout) rather than
connect to a URL. Each message the client writes is sent to the instance over Streamable
HTTP (the SDK's client transport: sessions, SSE replies, the protocol version header), and
each message from the instance is written back, unchanged, so the client sees the
instance's own resources and tools. The instance's token goes as ``Authorization: Bearer``.

Before serving, one request checks that the instance answers at that URL and accepts the
token, so a wrong address or token is a sentence on stderr and exit status 1, not a client
waiting for replies that never come. Logs go to stderr (stdout is the protocol's).
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

__all__ = ["BridgeError", "mcp_url", "run_bridge"]

log = logging.getLogger("vision_host.mcp")


class BridgeError(Exception):
    """The instance cannot be reached or refuses us; the message says what to do."""


def mcp_url(url: str) -> str:
    """The ``/mcp`` endpoint of ``url``: the instance's address (``http://127.0.0.1:8080``,
    its viewer's address) or the endpoint itself; a bare ``HOST:PORT`` gets ``http://``.

    Raises:
        BridgeError: not an http(s) URL with a host.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BridgeError(f"--attach {url!r}: give the running instance's address, e.g. http://127.0.0.1:8080 "
                          f"(its viewer's address; MCP is at /mcp there)")
    path = parts.path.rstrip("/")
    if not path.endswith("/mcp"):
        path += "/mcp"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


async def _check(url: str, headers: dict[str, str], timeout_s: float) -> None:
    """One GET of the endpoint: it must exist and take the token (any other answer is fine:
    a GET without a session is refused by the protocol, not by the server)."""
    import httpx2

    try:
        async with httpx2.AsyncClient(headers=headers, timeout=timeout_s) as client:
            response = await client.get(url, headers={"accept": "text/event-stream"})
    except httpx2.HTTPError as exc:
        raise BridgeError(f"cannot reach {url} ({exc.__class__.__name__}: {exc}): is `vision-host run … --mcp` "
                          f"running there?") from None
    if response.status_code == 401:
        raise BridgeError(f"{url} needs the token the instance printed at its start: give it with --token T "
                          f"(or $VISION_HOST_TOKEN)")
    if response.status_code in (404, 421):
        raise BridgeError(f"{url} answered {response.status_code}: start the instance with --mcp (and -o mjpeg), "
                          f"and attach to the address it printed")


async def run_bridge(url: str, token: str | None, connect_timeout_s: float = 10.0) -> None:
    """Serve MCP on this process's stdin/stdout, forwarding to ``url`` (:func:`mcp_url`), until
    the client closes stdin or the instance goes away.

    Raises:
        BridgeError: the instance cannot be reached or refuses the token (checked first).
    """
    import anyio
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.stdio import stdio_server

    endpoint = mcp_url(url)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    await _check(endpoint, headers, connect_timeout_s)
    # the SDK's own timeouts: a reply stream may stay open a long time between events
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
    async with http, streamable_http_client(endpoint, http_client=http) as (remote_in, remote_out), \
            stdio_server() as (local_in, local_out), anyio.create_task_group() as tg:
        async def forward(source, sink, where: str) -> None:
            async for message in source:
                if isinstance(message, Exception):      # a line that is not JSON-RPC, a transport error
                    log.warning("MCP bridge: %s: %s", where, message)
                    continue
                await sink.send(message)
            tg.cancel_scope.cancel()      # one side has ended: so does the bridge

        tg.start_soon(forward, local_in, remote_out, "from the client")
        tg.start_soon(forward, remote_in, local_out, f"from {endpoint}")
