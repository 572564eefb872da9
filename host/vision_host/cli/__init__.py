"""The ``vision-host`` command: ``run``, ``bench``, ``list``, ``info``, ``version``, ``serve``,
``history``, ``summarize``, ``download`` and ``mcp``, one module each (:mod:`.run`, :mod:`.bench`,
:mod:`.processors` for list and info, :mod:`.serve`, :mod:`.history`, :mod:`.summarize`,
:mod:`.download`, :mod:`.mcp`); the run's settings, flags and run files in :mod:`.settings` and
:mod:`.run_file`, its event side in :mod:`.event_settings`.

Flags follow wasmVision's (``-p``, ``-c``, ``-f``, ``-s``, ``-o``, ``-d``, ``--logging``) so
its users feel at home; ``-f run.toml`` accepts wasmVision's TOML layout (``[main]``,
``[processing]``, ``config``) plus vision-host's own ``[sandbox]`` table. Command-line flags
override the file. Errors print one sentence saying what to do and exit with status 2
(usage) or 1 (runtime). Importing this package loads no OpenCV, wasmtime or model code.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, download, history, mcp, processors, run, serve, summarize
from .settings import UsageError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each subcommand's parser sets ``handler`` (its ``cmd_…``
    function), and ``parser.commands`` maps command names to their parsers."""
    parser = argparse.ArgumentParser(prog="vision-host", description=(
        "Run WebAssembly frame processors over live video, e.g. "
        "vision-host run -p ollama -c ollama-model=bakllava"))
    parser.add_argument("--version", action="version", version=f"vision-host {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parser(sub)
    bench.add_parser(sub)
    processors.add_parsers(sub)
    sub.add_parser("version", help="print the version").set_defaults(handler=_cmd_version)
    serve.add_parser(sub)
    history.add_parser(sub)
    summarize.add_parser(sub)
    download.add_parser(sub)
    mcp.add_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"vision-host {__version__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vision-host``; returns the exit status (0, 1 runtime failure, 2 usage,
    130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands.get(args.command, parser)
        loose = [c for c in getattr(args, "config", None) or [] if "=" not in c]
        if loose:
            command.error(f"-c {loose[0]} {extra[0]}: write each setting as one KEY=VALUE word, "
                          f"e.g. -c {loose[0]}={extra[0]}")
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = getattr(args, "handler", None)
    try:
        if handler is None:
            parser.print_help()
            return 2
        return handler(args)
    except UsageError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
