"""Request bodies as strict JSON, their fields checked the way Ollama's Go server checks them
(its ``json: cannot unmarshal …`` messages), and Ollama's ``keep_alive`` durations (api.md's
``keep_alive``: Go's ``time.ParseDuration`` syntax or seconds). Every refusal is a
:class:`.errors.RequestError` 400, which the request's API gives its shape."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import RequestError

#: Go's longest ``time.Duration`` (about 292 years), in seconds: a longer ``keep_alive`` means forever.
MAX_KEEP_ALIVE_S = (2 ** 63 - 1) / 1e9
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
#: A ``\\uD800``–``\\uDFFF`` escape: a request whose JSON has one is checked for lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def go_type(v: Any) -> str:
    """The Go JSON type name of a parsed JSON value (``string``, ``number``, ``object``, …), as
    Go's ``json: cannot unmarshal`` errors name it."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    """A request body as strict JSON (RFC 8259), for every API.

    Refused, with :class:`RequestError` 400 (the caller's API gives it its shape): bytes that
    are not UTF-8 JSON; ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, though Python's
    parser takes them); JSON nested too deeply for the parser (Python's recursion limit, about
    a thousand levels: far beyond any request); a string with a lone UTF-16 surrogate
    (``"\\ud800"``), which no UTF-8 text can hold.
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, "invalid request body: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid character in request body: {str(exc)[:200]}") from None
    if _SURROGATE_ESCAPE.search(raw):   # rare: then check each string (pairs are fine, lone halves not)
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "invalid request body: a string holds a lone UTF-16 surrogate") from None
        except RecursionError:
            raise RequestError(400, "invalid request body: JSON nested too deeply") from None
    return body


def json_object(raw: bytes) -> dict:
    """A request's body as a JSON object (see :func:`parse_json`), as Ollama's server reads
    one (also for its OpenAI routes). Raises :class:`RequestError` 400 for an empty body or
    another JSON type."""
    if not raw.strip():
        raise RequestError(400, "missing request body")
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError(400, f"json: cannot unmarshal {go_type(body)} into Go value of type api.Request")
    return body


def typed_field(body: dict, key: str, types: tuple, gotype: str, default: Any = None) -> Any:
    """``body[key]`` when it is one of ``types`` (``bool`` only when listed), ``default`` when
    absent or null. Raises :class:`RequestError` 400 naming ``gotype`` (the Go field's type)."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise RequestError(400, f"json: cannot unmarshal {go_type(value)} into Go struct field .{key} of type {gotype}")
    return value


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive`` → seconds to stay loaded after a request; ``None`` = forever.

    A number is seconds; a string is a Go duration (``"5m"``, ``"1h30m"``, ``"10s"``,
    ``"-1"``) or a bare number of seconds; 0 unloads at once, a negative value keeps the model
    loaded forever, and so does one longer than Go's longest duration (:data:`MAX_KEEP_ALIVE_S`,
    about 292 years: Ollama's "forever" date).

    Raises:
        RequestError: 400 for anything else: another JSON type, a string that is no duration,
            NaN or infinity.
    """
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise RequestError(400, f"json: cannot unmarshal {go_type(value)} into Go struct field .keep_alive "
                                f"of type api.Duration")
    seconds: int | float
    if isinstance(value, (int, float)):
        seconds = value
    else:
        s = value.strip()
        if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", s):
            seconds = float(s)   # a huge exponent gives inf, refused below
        else:
            m = re.fullmatch(r"([-+]?)((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)", s)
            if not m:
                raise RequestError(400, f'time: invalid duration "{value[:64]}"')
            seconds = sum(float(n) * _DURATION_UNITS[u]
                          for n, u in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", m.group(2)))
            if m.group(1) == "-":
                seconds = -seconds
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise RequestError(400, f"keep_alive must be a finite duration or number of seconds, not {str(value)[:64]}")
    if seconds < 0 or seconds > MAX_KEEP_ALIVE_S:   # ints compare exactly, however large
        return None
    return float(seconds)
