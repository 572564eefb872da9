"""Summaries of what the cameras saw: a window of captions sent, as text, to a model that can
chat, which answers with a short summary and the times of the notable moments.

* :func:`summarize` — one window, now: ``vision-host summarize --since 1h`` (:mod:`..cli.summarize`).
* :class:`PeriodicSummaries` — a run's ``[[summary]]`` tables (:func:`parse_summary_table`):
  every ``every`` it summarises the captions of the past period and publishes a
  :class:`.captions.SummaryEvent` on the caption bus, which the MQTT sink
  (``PREFIX/summary/NAME``) and the webhooks (``"type": "summary"``) deliver.

The requests (text only, no image, ``stream: false``):

* Ollama (``api`` ``ollama``, ``generate`` or ``chat``): ``POST {url}/api/chat`` with
  ``{"model", "messages": [{"role": "user", "content": PROMPT}], "stream": false,
  "options": {"num_predict": max_reply_tokens, "temperature": 0}}``; the reply is
  ``message.content`` (https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion).
* OpenAI's chat completions (``api`` ``openai``): ``POST {url}/v1/chat/completions``
  (``{url}/chat/completions`` when the URL ends in ``/v1``) with ``{"model", "messages",
  "stream": false, "max_tokens", "temperature": 0}`` and, with ``api_key_env``,
  ``Authorization: Bearer $VAR``; the reply is ``choices[0].message.content``.
* ``vision-host serve`` answers both with a model that can chat (LLaVA); a model that cannot
  (BLIP) is refused with a 400 whose sentence says which can, and that sentence is passed on.

The prompt: each caption is one line ``HH:MM:SS [stream] text`` (local time; the date too,
``YYYY-MM-DD HH:MM:SS``, when the window spans more than one day; control characters and
newlines in a caption become spaces, so a caption cannot forge a line, and a caption is cut at
:data:`MAX_LINE_CHARS`). The instructions ask for::

    SUMMARY: a few sentences
    MOMENTS:
    - HH:MM:SS - what happened

and the reply is read leniently: every line that starts with a time (after ``-``, ``*`` or a
number) is a moment, the rest is the summary text. A moment's time is matched to the window
(the day of the window it falls in), else it is kept without a time.

Chunks: a window whose lines are longer than ``max_chunk_chars`` (default
:data:`DEFAULT_MAX_CHUNK_CHARS` = 4 000 characters, about 1 000 tokens, so that one chunk, the
instructions and a reply of :data:`DEFAULT_MAX_REPLY_TOKENS` fit the 2 048-token context of a
small model) is cut, at line ends, into chunks of at most that many characters; each chunk is
summarised by one request, then one merge request (the merge instructions and the chunk
summaries, each headed by its part's time range) makes the summary. When the chunk summaries
do not fit one merge request they are merged in groups that do, and the groups' summaries
again, until one is left. At most :data:`MAX_CHUNKS` chunks: a longer window is refused before
any request with a sentence saying what to do.

Errors are :class:`SummaryError` with one sentence: the server unreachable, a timeout, an
unknown model (404), a refusal (its own sentence passed on), a reply that is not the API's JSON.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..captions.bus import CaptionBus, CaptionSubscriber
from ..captions.event import CaptionEvent, SummaryEvent

__all__ = ["DEFAULT_MAX_CHUNK_CHARS", "DEFAULT_MAX_REPLY_TOKENS", "DEFAULT_TIMEOUT_S", "DEFAULT_URL", "SUMMARY_KEYS",
           "Caption", "Moment", "PeriodicSummaries", "Summary", "SummaryError", "SummarySchedule", "caption_lines",
           "chat", "ollama_host_url", "parse_duration", "parse_summary_table", "summarize"]

log = logging.getLogger(__name__)

#: The server when neither the settings nor ``$OLLAMA_HOST`` name one (Ollama's default address).
DEFAULT_URL = "http://localhost:11434"
#: Characters of caption lines (or part summaries) in one request, by default.
DEFAULT_MAX_CHUNK_CHARS = 4_000
#: Bounds of ``max_chunk_chars``.
MIN_CHUNK_CHARS, MAX_CHUNK_CHARS = 500, 1_000_000
#: Most chunks one summary sends (a longer window is refused before any request).
MAX_CHUNKS = 100
#: Longest caption text in a line; longer ones are cut (characters).
MAX_LINE_CHARS = 500
#: Tokens a reply may have (``num_predict`` / ``max_tokens``), by default.
DEFAULT_MAX_REPLY_TOKENS = 400
#: Connect and read timeout of one request, by default (s): a small model on a CPU is slow.
DEFAULT_TIMEOUT_S = 300.0
#: Longest reply read (characters); a longer one is cut.
MAX_REPLY_CHARS = 20_000
#: Keys of a ``[[summary]]`` table.
SUMMARY_KEYS = frozenset({"every", "streams", "sinks", "name", "max-captions", "prompt"})
#: Where summaries can go.
SUMMARY_SINKS = ("mqtt", "webhook")
#: Bounds of ``every`` (s): one minute to seven days.
MIN_EVERY_S, MAX_EVERY_S = 60.0, 7 * 86400.0
#: Default and bounds of ``max-captions`` (captions a schedule keeps for its window).
DEFAULT_MAX_CAPTIONS, MAX_MAX_CAPTIONS = 10_000, 1_000_000
#: Longest ``prompt`` override (characters).
MAX_PROMPT_CHARS = 4_000
#: How long :meth:`PeriodicSummaries.close` waits for a summary in progress (s).
DEFAULT_CLOSE_WAIT_S = 10.0

CHUNK_PROMPT = (
    "These are captions a vision model wrote about camera footage, one per line: the time, the camera in "
    "brackets, then what it saw. Write a short summary (at most five sentences) of what happened, then the "
    "notable moments (arrivals, departures, anything unusual), one per line with its time as written. Answer "
    "exactly in this form:\nSUMMARY: <the summary>\nMOMENTS:\n- <time> - <what happened>")
MERGE_PROMPT = (
    "These are summaries of consecutive parts of a camera log, each with its notable moments and their times. "
    "Merge them into one short summary (at most five sentences) of the whole, then the notable moments of the "
    "whole, one per line with its time as written. Answer exactly in this form:\nSUMMARY: <the summary>\n"
    "MOMENTS:\n- <time> - <what happened>")

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MOMENT = re.compile(r"^\s*(?:[-*\u2022]|\d{1,3}[.)])?\s*[\[*]*((?:\d{4}-\d{2}-\d{2}[ T])?\d{1,2}:\d{2}(?::\d{2})?)"
                     r"[\]*]*\s*(?:[-\u2013\u2014:|]\s*)?(.*)$")
_SUMMARY_HEAD = re.compile(r"^\s*\**\s*(summary|moments|notable moments)\s*\**\s*:?\s*\**\s*", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_DURATION_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


class SummaryError(Exception):
    """A summary could not be made: the message says why and what to do."""


@dataclass(frozen=True)
class Caption:
    """One caption of a window: ``wall_time`` (seconds since the epoch), ``stream`` (its name or
    index as text), ``text``."""

    wall_time: float
    stream: str
    text: str


@dataclass(frozen=True)
class Moment:
    """A notable moment: ``wall_time`` (seconds since the epoch; None when the model's time
    matched no time of the window), ``clock`` (the time as the model wrote it), ``text``."""

    wall_time: float | None
    clock: str
    text: str


@dataclass(frozen=True)
class Summary:
    """What :func:`summarize` returns.

    Attributes:
        text: the summary (the model's words, moments taken out).
        moments: the notable moments, in the model's order.
        model: the model asked.
        caption_count: captions summarised.
        since, until: the window, seconds since the epoch (the first and last caption's times
            unless the caller gave others).
        chunks: chunk requests sent; requests: every request sent (chunks and merges).
        reply: the last reply as the model wrote it.
    """

    text: str
    moments: tuple[Moment, ...]
    model: str
    caption_count: int
    since: float
    until: float
    chunks: int
    requests: int
    reply: str


# -- the requests -------------------------------------------------------------------------------

def ollama_host_url(value: str | None) -> str:
    """``$OLLAMA_HOST`` as a base URL: ``host``, ``host:port`` or a URL; scheme http and port
    11434 when missing (as Ollama's clients read it); :data:`DEFAULT_URL` when unset or empty."""
    value = (value or "").strip()
    if not value:
        return DEFAULT_URL
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "http", value
    host, _, path = rest.partition("/")
    has_port = "]:" in host if host.startswith("[") else ":" in host
    if not has_port:
        host += ":" + ("443" if scheme == "https" else "11434")
    return f"{scheme}://{host}" + (f"/{path}".rstrip("/") if path else "")


def _server_url(server: Mapping) -> str:
    """The server's base URL: its ``url``, else ``$OLLAMA_HOST``, else :data:`DEFAULT_URL` (as
    the run's ollama processor finds it)."""
    url = str(server.get("url") or "").strip().rstrip("/") or ollama_host_url(os.environ.get("OLLAMA_HOST"))
    if url.lower() == "embedded":
        raise SummaryError("the run's embedded vision server has no address yet: summaries need a running server "
                           "(ollama-url=http://…)")
    if "://" not in url:
        url = "http://" + url
    return url


def _api(server: Mapping) -> str:
    """``ollama`` or ``openai`` from the server's ``api`` (generate and chat mean Ollama's /api/chat)."""
    api = str(server.get("api") or "ollama").strip().lower()
    if api in ("ollama", "generate", "chat"):
        return "ollama"
    if api == "openai":
        return "openai"
    if api == "workers-ai":
        raise SummaryError("summaries cannot use Workers AI (ollama-api=workers-ai): point them at an Ollama or "
                           "OpenAI-compatible server that has a model that can chat (vision-host serve with LLaVA, "
                           "Ollama with llava)")
    raise SummaryError(f"unknown API {api!r} for summaries: use ollama or openai")


def _error_text(reply) -> str:
    """The server's error sentence from a refusal (Ollama's ``{"error": "..."}``, OpenAI's
    ``{"error": {"message"}}``, Workers AI's ``errors[0].message``), else the body's start."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("message"):
            return str(errors[0]["message"])
    text = _CONTROL.sub(" ", reply.text or "").strip()
    return text[:300] or f"HTTP {reply.status_code}"


def chat(server: Mapping, model: str, prompt: str, *, max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS,
         timeout_s: float = DEFAULT_TIMEOUT_S, session=None) -> str:
    """Ask ``model`` on ``server`` (``{"url", "api", "api_key_env"}``) ``prompt`` as one
    text-only user message, streaming off; returns the reply text (at most
    :data:`MAX_REPLY_CHARS`).

    Raises:
        SummaryError: unreachable, timed out, refused (the server's sentence), not the API's JSON.
    """
    import requests

    url, api = _server_url(server), _api(server)
    headers = {"Content-Type": "application/json"}
    key_env = server.get("api_key_env")
    if key_env:
        key = os.environ.get(str(key_env))
        if not key:
            raise SummaryError(f"the API key variable {key_env} is not set: export {key_env}=… or leave the key out")
        headers["Authorization"] = f"Bearer {key}"
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        endpoint = url + "/api/chat"
        body = {"model": model, "messages": messages, "stream": False,
                "options": {"num_predict": max_reply_tokens, "temperature": 0}}
    else:
        endpoint = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        body = {"model": model, "messages": messages, "stream": False, "max_tokens": max_reply_tokens,
                "temperature": 0}
    poster = session or requests
    try:
        reply = poster.post(endpoint, json=body, headers=headers, timeout=(min(timeout_s, 30.0), timeout_s))
    except requests.Timeout:
        raise SummaryError(f"the server at {url} did not answer the summary request within {timeout_s:g} s: try again, "
                           f"summarise a shorter window, or use a faster model") from None
    except requests.RequestException as exc:
        raise SummaryError(f"cannot reach the server at {url} ({type(exc).__name__}): start it (ollama serve, "
                           f"vision-host serve --model llava) or give its address with --url") from None
    status = reply.status_code
    if status != 200:
        message = _error_text(reply)
        if status == 404 and "not found" in message.lower() and "model" in message.lower():
            raise SummaryError(f"the server at {url} has no model {model!r} ({message}): pull it (ollama pull "
                               f"{model}) or give another with --model")
        if status == 404:
            raise SummaryError(f"{endpoint} does not exist ({message}): is {url} an "
                               f"{'Ollama' if api == 'ollama' else 'OpenAI-compatible'} server? Check --url and --api")
        if status in (401, 403):
            raise SummaryError(f"the server at {url} refused the credentials (HTTP {status}: {message}): set the "
                               f"API key's variable (--api-key-env)")
        if status == 400:
            raise SummaryError(f"the server at {url} refused the summary request: {message}")
        raise SummaryError(f"the server at {url} failed the summary request (HTTP {status}: {message})")
    try:
        data = reply.json()
        text = data["message"]["content"] if api == "ollama" else data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise SummaryError(f"the server at {url} answered the summary request with something that is not "
                           f"{'Ollama' if api == 'ollama' else 'OpenAI'}'s chat JSON: check --api") from None
    if not isinstance(text, str):
        raise SummaryError(f"the server at {url} answered the summary request without text")
    return text[:MAX_REPLY_CHARS]


# -- lines, chunks, replies ---------------------------------------------------------------------

def _clock_format(captions: Sequence[Caption]) -> str:
    if not captions:
        return "%H:%M:%S"
    first = datetime.fromtimestamp(captions[0].wall_time).date()
    last = datetime.fromtimestamp(captions[-1].wall_time).date()
    return "%H:%M:%S" if first == last else "%Y-%m-%d %H:%M:%S"


def caption_lines(captions: Sequence[Caption]) -> list[str]:
    """``captions`` (oldest first) as prompt lines ``HH:MM:SS [stream] text`` (module docstring)."""
    fmt = _clock_format(captions)
    lines = []
    for c in captions:
        text = _CONTROL.sub(" ", c.text).strip()
        if len(text) > MAX_LINE_CHARS:
            text = text[:MAX_LINE_CHARS - 1] + "…"
        stream = _CONTROL.sub(" ", c.stream).strip()[:64]
        lines.append(f"{datetime.fromtimestamp(c.wall_time).strftime(fmt)} [{stream}] {text}")
    return lines


def _chunks(lines: list[str], limit: int) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    size = 0
    for line in lines:
        if chunks[-1] and size + len(line) + 1 > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += len(line) + 1
    return [c for c in chunks if c]


def _parse_reply(reply: str) -> tuple[str, list[tuple[str, str]]]:
    """(summary text, [(clock, text)]) of a reply (lenient; module docstring)."""
    text_lines, moments = [], []
    for raw in reply.splitlines():
        line = _CONTROL.sub(" ", raw).strip()
        if not line:
            continue
        match = _MOMENT.match(line)
        if match:
            moments.append((match.group(1), match.group(2).strip(" -*") or "(no description)"))
            continue
        head = _SUMMARY_HEAD.match(line)
        if head:
            line = line[head.end():].strip()
            if not line:
                continue
        text_lines.append(line)
    text = " ".join(text_lines).strip()
    return text, moments


def _resolve(clock: str, since: float, until: float) -> float | None:
    """The wall time of ``clock`` (``[YYYY-MM-DD ]HH:MM[:SS]``, local) within [since, until]
    (a minute of slack either side), or None."""
    date_part, _, time_part = clock.replace("T", " ").rpartition(" ")
    try:
        parts = [int(p) for p in time_part.split(":")]
        hour, minute, second = parts[0], parts[1], parts[2] if len(parts) > 2 else 0
        if date_part:
            days = [datetime.strptime(date_part, "%Y-%m-%d").date()]
        else:
            first, last = datetime.fromtimestamp(since).date(), datetime.fromtimestamp(until).date()
            days = [first + timedelta(days=n) for n in range((last - first).days + 1)][:400]
        for day in days:
            when = datetime(day.year, day.month, day.day, hour, minute, second).timestamp()
            if since - 60 <= when <= until + 60:
                return when
    except (ValueError, IndexError, OverflowError):
        return None
    return None


def summarize(captions: Iterable[Caption], server: Mapping, *, model: str,
              max_chunk_chars: int = DEFAULT_MAX_CHUNK_CHARS, max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS,
              timeout_s: float = DEFAULT_TIMEOUT_S, prompt: str | None = None, since: float | None = None,
              until: float | None = None, ask: Callable[[str], str] | None = None) -> Summary:
    """Summarise ``captions`` (oldest first) with ``model`` on ``server`` (``{"url", "api"
    (ollama|generate|chat|openai), "api_key_env"}``): one request per chunk of at most
    ``max_chunk_chars`` characters of lines, then merges (module docstring). ``prompt``
    replaces the chunk instructions; ``since``/``until`` (seconds since the epoch) widen the
    window the moments' times are matched in (default: the first and last caption); ``ask``
    replaces the HTTP request (``ask(prompt) -> reply``).

    Raises:
        SummaryError: no captions, a setting out of range, a window of more than
            :data:`MAX_CHUNKS` chunks, or a request that failed (see :func:`chat`).
    """
    captions = sorted(captions, key=lambda c: c.wall_time)
    if not captions:
        raise SummaryError("there are no captions to summarise")
    if isinstance(max_chunk_chars, bool) or not isinstance(max_chunk_chars, int) \
            or not MIN_CHUNK_CHARS <= max_chunk_chars <= MAX_CHUNK_CHARS:
        raise SummaryError(f"max_chunk_chars {max_chunk_chars!r} is out of range: use {MIN_CHUNK_CHARS} to "
                           f"{MAX_CHUNK_CHARS}")
    if isinstance(max_reply_tokens, bool) or not isinstance(max_reply_tokens, int) \
            or not 16 <= max_reply_tokens <= 8192:
        raise SummaryError(f"max_reply_tokens {max_reply_tokens!r} is out of range: use 16 to 8192")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and 0.1 <= timeout_s <= 3600):
        raise SummaryError(f"timeout {timeout_s!r} s is out of range: use 0.1 to 3600")
    if not model:
        raise SummaryError("no model to ask for the summary: give one with --model (e.g. llava)")
    if ask is None:
        _server_url(server), _api(server)          # refuse a bad server before chunking
        import requests
        session = requests.Session()

        def ask(text: str) -> str:
            return chat(server, model, text, max_reply_tokens=max_reply_tokens, timeout_s=timeout_s,
                        session=session)
    else:
        session = None
    since = captions[0].wall_time if since is None else min(since, captions[0].wall_time)
    until = captions[-1].wall_time if until is None else max(until, captions[-1].wall_time)
    lines = caption_lines(captions)
    chunks = _chunks(lines, max_chunk_chars)
    if len(chunks) > MAX_CHUNKS:
        raise SummaryError(f"the window holds {len(captions)} captions ({sum(len(line) + 1 for line in lines)} "
                           f"characters), more than {MAX_CHUNKS} requests of {max_chunk_chars} characters: summarise "
                           f"a shorter window (--since/--until) or one stream (--stream)")
    instructions = (prompt or CHUNK_PROMPT).strip()
    requests_sent = 0
    try:
        parts = []
        for chunk in chunks:
            reply = ask(f"{instructions}\n\nCaptions:\n" + "\n".join(chunk))
            requests_sent += 1
            parts.append((chunk[0].split(" [", 1)[0], chunk[-1].split(" [", 1)[0], reply.strip()))
        # merge until one is left: groups of part summaries that fit one request
        while len(parts) > 1:
            share = max_chunk_chars // 2 - 100         # two parts always fit one merge: each round halves
            blocks = [f"Part from {first} to {last}:\n{_cut(text, share)}" for first, last, text in parts]
            groups: list[list[int]] = [[]]
            size = 0
            for n, block in enumerate(blocks):
                if groups[-1] and size + len(block) + 2 > max_chunk_chars:
                    groups.append([])
                    size = 0
                groups[-1].append(n)
                size += len(block) + 2
            merged = []
            for group in groups:
                if len(group) == 1:
                    merged.append(parts[group[0]])
                    continue
                reply = ask(f"{MERGE_PROMPT}\n\n" + "\n\n".join(blocks[n] for n in group))
                requests_sent += 1
                merged.append((parts[group[0]][0], parts[group[-1]][1], reply.strip()))
            parts = merged
    finally:
        if session is not None:
            session.close()
    final = parts[0][2]
    text, moments = _parse_reply(final)
    return Summary(text=text or final.strip(), moments=tuple(Moment(_resolve(clock, since, until), clock, what)
                                                             for clock, what in moments),
                   model=model, caption_count=len(captions), since=since, until=until, chunks=len(chunks),
                   requests=requests_sent, reply=final)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rsplit("\n", 1)[0] + "…"


# -- [[summary]] tables -------------------------------------------------------------------------

def parse_duration(value, what: str) -> float:
    """``"15m"``, ``"1h"``, ``"1d"``, ``"90s"``, ``"2w"`` (or a number of seconds) → seconds.

    Raises:
        ValueError: not a duration (the sentence names ``what``).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"{what} must be a duration such as \"15m\", \"1h\" or \"1d\", not {value!r}")
    return float(match.group(1)) * _DURATION_S[match.group(2).lower()]


@dataclass(frozen=True)
class SummarySchedule:
    """One ``[[summary]]`` table, checked (:func:`parse_summary_table`).

    Attributes:
        name: the summary's name (topic level, webhook ``name``); default ``"summary"``.
        every_s: the period and the window, seconds (the table allows 60 s to 7 days; code and
            tests may use less).
        streams: the stream names (or indices as text) whose captions it summarises; () = every stream.
        sinks: where it goes, a subset of ``{"mqtt", "webhook"}``.
        max_captions: captions kept for one window; past it the oldest are dropped and counted.
        prompt: instructions replacing the default chunk instructions, or None.
    """

    name: str = "summary"
    every_s: float = 3600.0
    streams: tuple[str, ...] = ()
    sinks: frozenset[str] = frozenset(SUMMARY_SINKS)
    max_captions: int = DEFAULT_MAX_CAPTIONS
    prompt: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.every_s, (int, float)) and math.isfinite(self.every_s) and self.every_s > 0):
            raise ValueError(f"summary {self.name!r}: every must be a positive duration, not {self.every_s!r}")
        if isinstance(self.max_captions, bool) or not isinstance(self.max_captions, int) \
                or not 1 <= self.max_captions <= MAX_MAX_CAPTIONS:
            raise ValueError(f"summary {self.name!r}: max-captions must be a whole number from 1 to "
                             f"{MAX_MAX_CAPTIONS}, not {self.max_captions!r}")


def parse_summary_table(table, where: str) -> SummarySchedule:
    """A run file's ``[[summary]]`` table (keys :data:`SUMMARY_KEYS`) → :class:`SummarySchedule`;
    ``where`` names the table in messages (``"[[summary]] number 1"``).

    Keys: ``every`` (required: a duration, ``"15m"``, ``"1h"``, ``"1d"``; 1 min to 7 d),
    ``streams`` (stream names; default every stream), ``sinks`` (``"mqtt"``, ``"webhook"``;
    default both), ``name`` (default ``"summary"``), ``max-captions`` (captions kept for one
    window, 1 to 1 000 000; default 10 000), ``prompt`` (instructions replacing the default).

    Raises:
        ValueError: not a table, an unknown key (all named), a missing or bad value.
    """
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table such as every = \"1h\"")
    unknown = sorted(set(table) - SUMMARY_KEYS)
    if unknown:
        raise ValueError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {where}: known "
                         f"keys are {', '.join(sorted(SUMMARY_KEYS))}")
    if "every" not in table:
        raise ValueError(f"{where} has no every: say how often to summarise, e.g. every = \"1h\"")
    every_s = parse_duration(table["every"], f"every in {where}")
    if not MIN_EVERY_S <= every_s <= MAX_EVERY_S:
        raise ValueError(f"every in {where} is {table['every']!r}: use 1 minute (\"1m\") to 7 days (\"7d\")")
    name = table.get("name", "summary")
    if not isinstance(name, str) or not name.strip() or len(name) > 64 or _CONTROL.search(name):
        raise ValueError(f"name in {where} must be a short text (1 to 64 characters, no control characters), "
                         f"not {name!r}")
    streams = table.get("streams", [])
    if isinstance(streams, str):
        streams = [streams]
    if not isinstance(streams, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in streams):
        raise ValueError(f"streams in {where} must be a list of stream names, not {streams!r}")
    sinks = table.get("sinks", list(SUMMARY_SINKS))
    if isinstance(sinks, str):
        sinks = [sinks]
    if not isinstance(sinks, list) or not sinks or not all(isinstance(s, str) for s in sinks) \
            or not set(sinks) <= set(SUMMARY_SINKS):
        raise ValueError(f"sinks in {where} must be a non-empty list of \"mqtt\" and \"webhook\", not {sinks!r}")
    max_captions = table.get("max-captions", DEFAULT_MAX_CAPTIONS)
    if isinstance(max_captions, bool) or not isinstance(max_captions, int) \
            or not 1 <= max_captions <= MAX_MAX_CAPTIONS:
        raise ValueError(f"max-captions in {where} must be a whole number from 1 to {MAX_MAX_CAPTIONS}, "
                         f"not {max_captions!r}")
    prompt = table.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS):
        raise ValueError(f"prompt in {where} must be a text of 1 to {MAX_PROMPT_CHARS} characters")
    return SummarySchedule(name=name.strip(), every_s=every_s, streams=tuple(str(s) for s in streams),
                           sinks=frozenset(sinks), max_captions=max_captions, prompt=prompt)


# -- the run's periodic summaries ---------------------------------------------------------------

@dataclass
class _Window:
    schedule: SummarySchedule
    captions: collections.deque
    since: float
    due: float                       # monotonic
    dropped: int = 0
    worker: threading.Thread | None = None
    published: int = 0
    failures: int = 0
    last_error: str | None = None
    skipped: int = field(default=0)  # periods whose summary was still being made


class PeriodicSummaries(CaptionSubscriber):
    """A run's ``[[summary]]`` schedules: keeps each one's window of captions in memory and,
    every ``every``, summarises it on a thread of its own and publishes a
    :class:`.captions.SummaryEvent` on ``bus``. Subscribes itself to every stream of ``bus``.

    ``add`` (the frame loops) only appends to a bounded deque under a lock. One timer thread
    starts the summaries; each runs on its own thread (one at a time per schedule: a period that
    comes while the last summary is still being made is folded into the next window). A window
    with no captions publishes nothing. A failed summary is logged (once per distinct error) and
    its captions are gone; the next period tries again. At the end of the run the window in
    progress is not summarised.

    Args:
        tables: the ``[[summary]]`` tables (checked with :func:`parse_summary_table`) or
            :class:`SummarySchedule` objects (which may have a period under a minute: tests).
        bus: the run's caption bus.
        server: the run's vision server, ``{"url", "api", "model", "api_key_env"}`` (model
            default ``llava``). It is read at each summary: ``vision-host run`` fills in the
            embedded server's address and model (``ollama-url=embedded``) once it has started.
        history_path: the run's caption history (or None); not read: the windows are kept in
            memory so summaries work with the history off.
        clock, wall: monotonic and wall clocks (s), for tests.
        summarize_fn: replaces :func:`summarize` (tests).

    Raises:
        ValueError: a bad table, two schedules of one name, or a server summaries cannot use
            (Workers AI).
    """

    def __init__(self, tables: Iterable, bus: CaptionBus, server: Mapping | None = None, history_path=None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 summarize_fn: Callable[..., Summary] = summarize, close_wait_s: float = DEFAULT_CLOSE_WAIT_S):
        schedules = [t if isinstance(t, SummarySchedule) else parse_summary_table(t, f"[[summary]] number {n + 1}")
                     for n, t in enumerate(tables)]
        names = [s.name for s in schedules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two [[summary]] tables are named {twice[0]!r}: give each its own name")
        self.server = server if server is not None else {}
        try:
            _api(self.server)
        except SummaryError as exc:
            raise ValueError(str(exc)) from None
        self.history_path = history_path
        self._clock, self._wall, self._summarize = clock, wall, summarize_fn
        self._close_wait_s = close_wait_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        now, wall_now = clock(), wall()
        self._windows = [_Window(s, collections.deque(maxlen=s.max_captions), wall_now, now + s.every_s)
                         for s in schedules]
        self._errors_logged: set[str] = set()
        self._closed = False
        self._abandoned = False          # close() stopped waiting: a late summary is not published
        self._bus = bus
        self._timer = threading.Thread(target=self._tick_loop, name="summaries", daemon=True)
        self._timer.start()
        bus.subscribe(self)

    @property
    def model(self) -> str:
        """The model asked: the server's ``model``, else ``llava`` (read at each summary)."""
        return str(self.server.get("model") or "llava")

    # -- the frame loops' side
    def add(self, event: CaptionEvent) -> None:
        """Append the caption to the window of each schedule that covers its stream (never blocks)."""
        if self._closed:
            return
        name = event.stream_name or str(event.stream)
        caption = Caption(event.wall_time, name, event.text)
        with self._lock:
            for w in self._windows:
                streams = w.schedule.streams
                if streams and name not in streams and str(event.stream) not in streams:
                    continue
                if len(w.captions) == w.captions.maxlen:
                    w.dropped += 1
                w.captions.append(caption)

    # -- the timer and the summaries
    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            with self._lock:
                soonest = min((w.due for w in self._windows), default=now + 60)
                due = [w for w in self._windows if w.due <= now]
            for w in due:
                self._start(w, now)
            if not due:
                self._stop.wait(min(max(soonest - now, 0.01), 0.5))

    def _start(self, w: _Window, now: float) -> None:
        with self._lock:
            w.due = now + w.schedule.every_s
            if w.worker is not None and w.worker.is_alive():
                w.skipped += 1                      # the captions wait for the next window
                return
            captions, dropped, since = list(w.captions), w.dropped, w.since
            w.captions.clear()
            w.dropped = 0
            until = self._wall()
            w.since = until
        if not captions:
            return
        w.worker = threading.Thread(target=self._summarise, args=(w, captions, dropped, since, until),
                                    name=f"summary {w.schedule.name}", daemon=True)
        w.worker.start()

    def _summarise(self, w: _Window, captions: list[Caption], dropped: int, since: float, until: float) -> None:
        s = w.schedule
        try:
            summary = self._summarize(captions, self.server, model=self.model, prompt=s.prompt, since=since,
                                      until=until)
        except Exception as exc:   # noqa: BLE001 - a failed summary must not end the timer or the run
            text = str(exc) if isinstance(exc, SummaryError) else f"{type(exc).__name__}: {exc}"
            with self._lock:
                w.failures += 1
                w.last_error = text
                new = text not in self._errors_logged
                self._errors_logged.add(text)
            if new:
                log.warning("summary %r of %d captions failed: %s", s.name, len(captions), text)
            return
        if self._abandoned:
            return
        event = SummaryEvent(name=s.name, streams=s.streams, since=since, until=until, text=summary.text,
                             moments=tuple((m.wall_time, m.text) for m in summary.moments), model=summary.model,
                             caption_count=len(captions), sinks=s.sinks, dropped=dropped)
        with self._lock:
            w.published += 1
        self._bus.publish_summary(event)
        if dropped:
            log.info("summary %r left out the oldest %d captions (over max-captions = %d)", s.name, dropped,
                     s.max_captions)

    def states(self) -> list[dict]:
        """Each schedule: ``{"name", "captions" (in the window now), "dropped", "published",
        "failures", "skipped", "last_error"}``."""
        with self._lock:
            return [{"name": w.schedule.name, "captions": len(w.captions), "dropped": w.dropped,
                     "published": w.published, "failures": w.failures, "skipped": w.skipped,
                     "last_error": w.last_error} for w in self._windows]

    def close(self, end_time_s: float | None = None) -> None:
        """Stop the timer; wait up to ``close_wait_s`` for summaries being made (their events are
        published if they finish in time). Idempotent; the bus calls it at its close."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._timer.join(5)
        deadline = time.monotonic() + self._close_wait_s
        for w in self._windows:
            if w.worker is not None:
                w.worker.join(max(0.0, deadline - time.monotonic()))
                if w.worker.is_alive():
                    log.warning("summary %r was still being made at exit: it is not published", w.schedule.name)
        self._abandoned = True
        try:
            self._bus.unsubscribe(self)
        except Exception:   # noqa: BLE001 - a bus being closed
            pass
