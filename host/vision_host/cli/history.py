"""``vision-host history``: search, list, export and show the caption history that ``run``
records (see :mod:`..history`).

Output: one line per event, ``TIME  STREAM  #ID  TEXT`` (local time; an alert edge's text is
``ALERT name ON: reason``; control characters in a caption are shown as spaces, so a reply
cannot drive the terminal), or with ``--json`` one JSON record per line (the fields of
:mod:`..history.store`). ``search --semantic`` ranks captions by meaning instead of words: the
query's embedding is asked of the server (``--url``, ``--api``, ``--embed-model``: the model
that recorded the vectors, :mod:`..history.embeddings`) and compared with the stored ones; each
line then starts with the cosine similarity, ``0.873  TIME  STREAM  #ID  TEXT``. Errors print one
sentence: exit status 2 for bad flags, 1 when the history cannot be read, the event is missing or
the embedding server fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path

from .settings import UsageError, positive_int

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def add_parser(sub) -> None:
    """Add ``history`` (with ``search``, ``list``, ``export``, ``show``) to the subcommands ``sub``."""
    history = sub.add_parser("history", help="search, list, export or show the captions and alerts that runs "
                                             "recorded (the caption history)")
    history.set_defaults(handler=lambda args: _help(history))
    actions = history.add_subparsers(dest="history_command", metavar="ACTION")

    def common(parser: argparse.ArgumentParser, filters: bool = True) -> None:
        parser.add_argument("--history", metavar="PATH",
                            help="the history database (default: vision-host/history.sqlite3 in the user's data "
                                 "directory, where run records it)")
        if filters:
            parser.add_argument("--stream", metavar="S", help="only stream S (its name or index)")
            parser.add_argument("--since", metavar="WHEN",
                                help="only events at or after WHEN: a duration before now (90s, 30m, 2h, 7d) or an "
                                     "ISO 8601 time (2026-12-01T15:00:00Z; without a zone: local time)")
            parser.add_argument("--until", metavar="WHEN", help="only events at or before WHEN (as --since)")
            parser.add_argument("--kind", choices=("caption", "alert"), help="only captions or only alert edges")

    search = actions.add_parser("search", help="events holding all the words (or, with --semantic, captions "
                                               "closest in meaning), best match first")
    search.add_argument("words", nargs="+", metavar="WORDS", help='what to look for, e.g. "red car"')
    common(search)
    search.add_argument("--limit", type=positive_int, default=20, metavar="N", help="most hits (default 20)")
    search.add_argument("--raw", action="store_true",
                        help="WORDS are SQLite FTS5 query syntax (OR, NOT, NEAR, \"phrases\", prefix*) instead of "
                             "plain words")
    search.add_argument("--semantic", action="store_true",
                        help="rank captions by meaning (cosine similarity of text embeddings) instead of words; "
                             "needs --embed-model, and captions recorded with run --embed-model")
    search.add_argument("--embed-model", metavar="MODEL",
                        help="the embedding model that recorded the vectors (e.g. nomic-embed-text)")
    search.add_argument("--url", metavar="URL",
                        help="the embedding server (default $OLLAMA_HOST, else http://localhost:11434)")
    search.add_argument("--api", choices=("ollama", "openai"), default="ollama",
                        help="ollama (POST /api/embed, default) or openai (POST /v1/embeddings)")
    search.add_argument("--api-key-env", metavar="VAR",
                        help="environment variable holding the server's API key (sent as a Bearer token)")
    search.add_argument("--embed-timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for the query's embedding (default 30)")
    search.add_argument("--json", action="store_true", help="one JSON record per line")
    search.set_defaults(handler=cmd_search)

    listing = actions.add_parser("list", help="the latest events, oldest first")
    common(listing)
    listing.add_argument("--limit", type=positive_int, default=50, metavar="N", help="most events (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON record per line")
    listing.set_defaults(handler=cmd_list)

    export = actions.add_parser("export", help="write the events as JSON Lines, CSV or WebVTT, oldest first")
    export.add_argument("--format", choices=("jsonl", "csv", "vtt"), default="jsonl",   # history.export.EXPORT_FORMATS
                        help="jsonl (default), csv or vtt")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: standard output)")
    common(export)
    export.set_defaults(handler=cmd_export)

    show = actions.add_parser("show", help="one event in full, and its thumbnail")
    show.add_argument("id", type=positive_int, metavar="ID", help="the event's id (search and list print it)")
    show.add_argument("--thumbnail", metavar="FILE", help="write the caption's thumbnail (JPEG) to FILE")
    show.add_argument("--json", action="store_true", help="print the record as one JSON object")
    common(show, filters=False)
    show.set_defaults(handler=cmd_show)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _open(args: argparse.Namespace):
    """The store named by ``--history`` (or the default), which must exist already, opened
    read-only (a run may be writing it meanwhile).

    Raises:
        UsageError: no history there.
    """
    from ..history import HistoryStore, default_history_path

    path = Path(args.history) if args.history else default_history_path()
    if not path.is_file():
        raise UsageError(f"no caption history at {path}: give the database with --history PATH "
                         f"(vision-host run records one unless --no-history)")
    return HistoryStore(path, read_only=True)


def _filters(args: argparse.Namespace) -> dict:
    from ..history import HistoryError, parse_when

    try:
        since = None if args.since is None else parse_when(args.since)
        until = None if args.until is None else parse_when(args.until)
    except HistoryError as exc:
        raise UsageError(str(exc)) from None
    return {"stream": args.stream, "since": since, "until": until, "kind": args.kind}


def _run(args: argparse.Namespace, work) -> int:
    """Open the store, run ``work(store)``, close it; a :class:`HistoryError` is one sentence and
    exit status 1."""
    from ..history import HistoryError

    try:
        store = _open(args)
    except HistoryError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    try:
        return work(store)
    except HistoryError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def format_line(record: dict) -> str:
    """``TIME  STREAM  #ID  TEXT`` for one record (local time, control characters as spaces)."""
    when = datetime.fromtimestamp(record["wall_time_unix"]).strftime("%Y-%m-%d %H:%M:%S")
    stream = record["stream_name"] or str(record["stream"])
    if record["kind"] == "alert":
        text = f"ALERT {record['alert']} {record['state']}: {record['reason'] or ''}"
    else:
        text = record["text"]
    return _CONTROL.sub(" ", f"{when}  {stream}  #{record['id']}  {text}").strip()


def _print_records(records: list[dict], as_json: bool) -> None:
    for record in records:
        if as_json:
            print(json.dumps(record, ensure_ascii=False))
        elif "score" in record:
            print(f"{record['score']:.3f}  {format_line(record)}")
        else:
            print(format_line(record))


def cmd_search(args: argparse.Namespace) -> int:
    """``vision-host history search WORDS``: prints the hits; 0 (even with none), 1 on errors
    (with ``--semantic`` also when the embedding server fails), 2 for bad flags."""
    filters = _filters(args)
    if not args.semantic:
        given = [flag for flag, value in (("--embed-model", args.embed_model), ("--url", args.url),
                                          ("--api-key-env", args.api_key_env)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only go with --semantic: add --semantic to search by meaning")

        def work(store) -> int:
            _print_records(store.search(" ".join(args.words), limit=args.limit, raw=args.raw, **filters), args.json)
            return 0

        return _run(args, work)
    if args.raw:
        raise UsageError("--raw is FTS5 word syntax and does not go with --semantic: drop one of the two")
    if filters.pop("kind") == "alert":
        raise UsageError("--semantic searches captions only (alert edges have no embeddings): drop --kind alert")
    if not args.embed_model:
        raise UsageError("--semantic needs --embed-model MODEL: the embedding model the run recorded the captions "
                         "with (vision-host run --embed-model MODEL)")
    if not 0.1 <= args.embed_timeout <= 600:
        raise UsageError(f"--embed-timeout {args.embed_timeout:g} is out of range: use 0.1 to 600 seconds")
    from ..history.embeddings import CaptionEmbedder, EmbeddingError
    from .settings import ollama_host_url

    url = args.url or ollama_host_url(os.environ.get("OLLAMA_HOST")) or "http://localhost:11434"
    server = {"url": url, "api": "openai" if args.api == "openai" else "generate"}
    if args.api_key_env:
        server["api_key_env"] = args.api_key_env
    try:
        embedder = CaptionEmbedder(server, args.embed_model, timeout_s=args.embed_timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def work(store) -> int:
        model = store.embedding_model(args.embed_model)   # fails before asking the server
        try:
            vector = embedder.embed([" ".join(args.words)])[0]
        except EmbeddingError as exc:
            print(f"vision-host: {exc}", file=sys.stderr)
            return 1
        finally:
            embedder.close()
        _print_records(store.search_semantic(vector, model, limit=args.limit, **filters), args.json)
        return 0

    return _run(args, work)


def cmd_list(args: argparse.Namespace) -> int:
    """``vision-host history list``: prints the latest events; 0, or 1 on errors."""
    filters = _filters(args)

    def work(store) -> int:
        _print_records(store.list(limit=args.limit, **filters), args.json)
        return 0

    return _run(args, work)


def cmd_export(args: argparse.Namespace) -> int:
    """``vision-host history export``: writes the events; 0, or 1 on errors (the count goes to
    stderr when writing a file)."""
    filters = _filters(args)

    from ..history.export import export

    def work(store) -> int:
        if args.output is None:
            export(store, args.format, sys.stdout, **filters)
            return 0
        try:
            # csv writes its own CRLF row ends: no newline translation
            with open(args.output, "w", encoding="utf-8", newline="") as out:
                count = export(store, args.format, out, **filters)
        except OSError as exc:
            print(f"vision-host: cannot write {args.output} ({exc.strerror or exc}): give another -o FILE",
                  file=sys.stderr)
            return 1
        print(f"vision-host: {count} events written to {args.output}", file=sys.stderr)
        return 0

    return _run(args, work)


def cmd_show(args: argparse.Namespace) -> int:
    """``vision-host history show ID``: prints the event (``key: value`` lines, or ``--json``)
    and writes its thumbnail with ``--thumbnail``; 0, or 1 when it or its thumbnail is missing."""

    def work(store) -> int:
        record = store.get(args.id)
        if record is None:
            print(f"vision-host: no event #{args.id} in {store.path}: find ids with history search or list",
                  file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        else:
            for key, value in record.items():
                if value is not None:
                    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
                    print(f"{key}: {_CONTROL.sub(' ', text)}")
        if args.thumbnail:
            data = store.thumbnail(args.id)
            if data is None:
                print(f"vision-host: event #{args.id} has no thumbnail (alert edges and captions recorded without "
                      f"a frame have none)", file=sys.stderr)
                return 1
            try:
                Path(args.thumbnail).write_bytes(data)
            except OSError as exc:
                print(f"vision-host: cannot write {args.thumbnail} ({exc.strerror or exc}): give another "
                      f"--thumbnail FILE", file=sys.stderr)
                return 1
        return 0

    return _run(args, work)
