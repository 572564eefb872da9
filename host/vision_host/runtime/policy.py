"""The network policy every processor request obeys, blocking or not: what a URL means and
whether it may be requested.

Every URL is parsed once, strictly (:func:`parse_request_url` refuses URLs that HTTP clients
and URL parsers read differently), and the request goes to the URL rebuilt from the parsed
parts (:class:`RequestTarget`), only after the HTTP client reads that URL as the same
destination (:meth:`RequestTarget.same_destination`). Only destinations on the allow-list
(by default the ``host:port`` of every ``*-url`` config value) may be reached; credentials go
only to the exact ``scheme://host:port`` they were given for; :class:`NetworkPolicy` also
holds the timeouts, the response size cap and the per-processor request caps that
:mod:`.fetch` enforces. Refusals are reported as ``vision-host:platform/fetch`` errors
(:class:`.fetch.FetchErrorResult`). URL syntax: RFC 3986, narrowed to what the WHATWG URL
Standard, ``urllib.parse`` and urllib3 all read the same way.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from .fetch import FetchError, FetchErrorResult


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
            the fair share instead (one running per lane).
        max_frame_requests: frame (caption) requests running at once across all lanes of the
            fair share (:class:`.fetch.FairShare`; a run gives each video stream one lane);
            each lane has at most one running, and waiting lanes are served round-robin. That
            many worker threads are kept for them: plain requests of all processors together
            never occupy more than the rest.
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


class PolicyError(ValueError):
    """A network setting that cannot work; the message says what to fix."""


__all__ = ["NetworkPolicy", "PolicyError", "RequestTarget", "parse_request_url", "url_destination", "url_origin"]
