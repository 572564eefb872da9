"""``vision-host summarize``: a summary of what the cameras saw in a window of the caption
history, written by a model that can chat (:mod:`..history.summaries`).

It reads the captions (not the alert edges) of the window from the history, read-only (a run
may be writing it meanwhile), sends them as text to the server (Ollama's ``/api/chat``, or
OpenAI's chat completions with ``--api openai``; ``vision-host serve`` with LLaVA answers
both) and prints the summary and the notable moments with their local times, or with
``--json`` one JSON object: ``{"text", "moments": [{"time" (ISO 8601 UTC or null), "clock"
(as the model wrote it), "text"}], "model", "caption_count", "since", "until" (ISO 8601 UTC),
"chunks", "requests", "window_cut" (true: only the latest --max-captions were read)}``.

The window holds at most ``--max-captions`` captions (default 5 000): the latest are kept and
a line on stderr says how many were left out. No captions in the window: a sentence, exit
status 0. Errors print one sentence: exit status 2 for bad flags, 1 when the history cannot be
read or the server fails (its own sentence, e.g. a model that cannot chat, is passed on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from .settings import UsageError, positive_int

#: Captions one summary reads at most, by default (the latest of the window).
DEFAULT_MAX_CAPTIONS = 5_000
#: The most ``--max-captions`` may be.
MAX_CAPTIONS = 50_000

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def add_parser(sub) -> None:
    """Add ``summarize`` to the subcommands ``sub``."""
    from ..history.summaries import (
        DEFAULT_MAX_CHUNK_CHARS,
        DEFAULT_TIMEOUT_S,
        DEFAULT_URL,
    )

    p = sub.add_parser("summarize", help="summarise what the cameras saw in a window of the caption history, with "
                                         "the times of notable moments (a model that can chat writes it)")
    p.add_argument("--since", metavar="WHEN", required=True,
                   help="the window's start: a duration before now (30m, 1h, 1d) or an ISO 8601 time "
                        "(2026-12-01T15:00:00Z; without a zone: local time)")
    p.add_argument("--until", metavar="WHEN", help="the window's end (as --since; default: now)")
    p.add_argument("--stream", metavar="S", help="only stream S (its name or index)")
    p.add_argument("--history", metavar="PATH",
                   help="the history database (default: vision-host/history.sqlite3 in the user's data directory, "
                        "where run records it)")
    p.add_argument("--url", metavar="URL",
                   help=f"the server (default $OLLAMA_HOST, else {DEFAULT_URL})")
    p.add_argument("--api", choices=("ollama", "openai"), default="ollama",
                   help="ollama (POST /api/chat, the default) or openai (POST /v1/chat/completions)")
    p.add_argument("--model", metavar="M", default="llava", help="a model that can chat (default llava)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    p.add_argument("--max-captions", type=positive_int, default=DEFAULT_MAX_CAPTIONS, metavar="N",
                   help=f"captions read at most, the latest of the window (default {DEFAULT_MAX_CAPTIONS}, "
                        f"at most {MAX_CAPTIONS})")
    p.add_argument("--chunk-chars", type=positive_int, default=DEFAULT_MAX_CHUNK_CHARS, metavar="N",
                   help=f"characters of captions per request (default {DEFAULT_MAX_CHUNK_CHARS}, about 1 000 tokens: "
                        f"fits a small model's context); longer windows are summarised in chunks, then merged")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds one request may take (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_summarize)


def cmd_summarize(args: argparse.Namespace) -> int:
    """``vision-host summarize``: prints the summary; 0 (also for an empty window), 1 when the
    history or the server fails, 2 for bad flags."""
    from ..history import HistoryError, HistoryStore, default_history_path, parse_when
    from ..history.summaries import (
        MAX_CHUNK_CHARS,
        MIN_CHUNK_CHARS,
        Caption,
        SummaryError,
        ollama_host_url,
        summarize,
    )

    if args.max_captions > MAX_CAPTIONS:
        raise UsageError(f"--max-captions {args.max_captions} is too many: use at most {MAX_CAPTIONS}")
    if not MIN_CHUNK_CHARS <= args.chunk_chars <= MAX_CHUNK_CHARS:
        raise UsageError(f"--chunk-chars {args.chunk_chars} is out of range: use {MIN_CHUNK_CHARS} to "
                         f"{MAX_CHUNK_CHARS}")
    if not 0.1 <= args.timeout <= 3600:
        raise UsageError(f"--timeout {args.timeout:g} is out of range: use 0.1 to 3600 seconds")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise UsageError(f"--api-key-env {args.api_key_env}: that variable is not set: export {args.api_key_env}=…")
    now = time.time()
    try:
        since = parse_when(args.since, now)
        until = now if args.until is None else parse_when(args.until, now)
    except HistoryError as exc:
        raise UsageError(str(exc)) from None
    if until < since:
        raise UsageError(f"--until ({args.until}) is before --since ({args.since}): give a window that ends after "
                         f"it starts")
    path = Path(args.history) if args.history else default_history_path()
    if not path.is_file():
        raise UsageError(f"no caption history at {path}: give the database with --history PATH "
                         f"(vision-host run records one unless --no-history)")
    try:
        with HistoryStore(path, read_only=True) as store:
            records = store.list(stream=args.stream, since=since, until=until, limit=args.max_captions + 1,
                                 kind="caption")
    except HistoryError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    left_out = 0
    if len(records) > args.max_captions:
        records = records[1:]
        left_out = 1   # at least; counting them all would read the whole window
        print(f"vision-host: the window holds more than {args.max_captions} captions: summarising the latest "
              f"{args.max_captions} (raise --max-captions, up to {MAX_CAPTIONS}, or give a shorter window)",
              file=sys.stderr)
    captions = [Caption(r["wall_time_unix"], r["stream_name"] or str(r["stream"]), r["text"])
                for r in records if r["text"].strip()]
    where = f" of stream {args.stream}" if args.stream else ""
    if not captions:
        print(f"No captions{where} between {_local(since)} and {_local(until)}: nothing to summarise "
              f"(vision-host history list shows what is recorded).")
        return 0
    server = {"url": args.url or ollama_host_url(os.environ.get("OLLAMA_HOST")), "api": args.api,
              "api_key_env": args.api_key_env}
    try:
        summary = summarize(captions, server, model=args.model, max_chunk_chars=args.chunk_chars,
                            timeout_s=args.timeout, since=since, until=until)
    except SummaryError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from ..captions.event import iso_utc
        print(json.dumps({"text": summary.text,
                          "moments": [{"time": None if m.wall_time is None else iso_utc(m.wall_time),
                                       "clock": m.clock, "text": m.text} for m in summary.moments],
                          "model": summary.model, "caption_count": summary.caption_count,
                          "since": iso_utc(since), "until": iso_utc(until), "chunks": summary.chunks,
                          "requests": summary.requests, "window_cut": left_out > 0}, ensure_ascii=False))
        return 0
    print(f"Summary of {summary.caption_count} captions{where} from {_local(since)} to {_local(until)} "
          f"({summary.model}, {summary.requests} request{'s' * (summary.requests != 1)}):")
    print(_clean(summary.text))
    if summary.moments:
        print("\nNotable moments:")
        for m in summary.moments:
            when = _local(m.wall_time) if m.wall_time is not None else m.clock
            print(f"  {_clean(when)}  {_clean(m.text)}")
    return 0


def _local(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


def _clean(text: str) -> str:
    """A model's text fit for a terminal: control characters as spaces."""
    return _CONTROL.sub(" ", text).strip()
