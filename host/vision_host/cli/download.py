"""``vision-host download``: fetch wasmVision's well-known processors and models, or any
``.wasm`` / model file by URL, into the processors or models directory (see :mod:`..download`).

``download processor NAME|URL …`` and ``download model NAME|URL …`` as in wasmVision;
``download list`` prints the catalogue. Progress goes to standard error, one result line per
file to standard output. Errors print one sentence: exit status 2 for bad flags or an unknown
name, 1 when a download fails (offline, HTTP error, too large, checksum mismatch).
"""

from __future__ import annotations

import argparse
import re
import sys

from .settings import UsageError, number_in

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def size_bytes(text: str) -> int:
    """argparse type: a size in bytes, ``1048576``, ``500M``, ``2G`` or ``1.5GiB`` (K, M, G, T:
    powers of 1024); at least 1 byte. Raises argparse.ArgumentTypeError."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes or a number with K, M or G (e.g. 2G)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte")
    return value


#: argparse type: seconds above 0, at most a day.
positive_seconds = number_in(0, 86400, "seconds", above_low=True)


def add_parser(sub) -> None:
    """Add ``download`` (with ``processor``, ``model`` and ``list``) to the subcommands ``sub``."""
    from ..download import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S

    download = sub.add_parser("download", help="download wasmVision's well-known processors and models "
                                               "(or a file by URL), checked by sha256")
    download.set_defaults(handler=lambda args: _help(download))
    kinds = download.add_subparsers(dest="download_kind", metavar="WHAT")
    for kind, flag in (("processor", "--processors-dir"), ("model", "--models-dir")):
        p = kinds.add_parser(kind, help=f"download {kind}s by name (see download list) or URL")
        p.add_argument("names", nargs="+", metavar="NAME|URL",
                       help=f"a well-known {kind}'s name, or the http(s) URL of a "
                            f"{'.wasm file' if kind == 'processor' else 'model file'}")
        p.add_argument("--dir", flag, dest="dir", metavar="DIR",
                       help=f"where to put it (default: vision-host/{kind}s in the user's data directory"
                            + (", or $VISION_HOST_PROCESSORS_DIR when set)" if kind == "processor" else ")"))
        p.add_argument("--force", action="store_true",
                       help="download again even if the file is there, starting over rather than resuming")
        p.add_argument("--sha256", metavar="HEX",
                       help="for a URL: the sha256 the file must have (a well-known name's is in the catalogue)")
        p.add_argument("--max-size", type=size_bytes, default=None, metavar="SIZE",
                       help="refuse or stop a file larger than SIZE (bytes, or with K, M, G; default 2G)")
        p.add_argument("--timeout", type=positive_seconds, default=None, metavar="S",
                       help=f"seconds to wait for the connection (default {DEFAULT_CONNECT_TIMEOUT_S:g}) and "
                            f"for each read (default {DEFAULT_READ_TIMEOUT_S:g})")
        p.set_defaults(handler=cmd_download, kind=kind)
    lst = kinds.add_parser("list", help="the well-known processors and models, with where they come from")
    lst.add_argument("what", nargs="?", choices=("processors", "models"), help="only processors or only models")
    lst.set_defaults(handler=cmd_list)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_list(args: argparse.Namespace) -> int:
    """``vision-host download list``: the catalogue, one entry per line (name, file, size,
    whether its sha256 is pinned, URL)."""
    from ..download import CATALOGUE, default_dir

    for kind in ("processor", "model"):
        if args.what and args.what != kind + "s":
            continue
        print(f"{kind}s (into {default_dir(kind)}):")
        for e in (e for e in CATALOGUE if e.kind == kind):
            size = f"{e.size:>10}" if e.size is not None else f"{'?':>10}"
            aka = f" (also {', '.join(e.aliases)})" if e.aliases else ""
            print(f"  {e.name:32} {size}  {'sha256' if e.sha256 else 'no sha256'}  {e.url}{aka}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """``vision-host download processor|model NAME|URL …``: each in turn; stops at the first
    failure (exit status 1)."""
    from pathlib import Path

    from ..download import (
        CATALOGUE,
        DEFAULT_CONNECT_TIMEOUT_S,
        DEFAULT_MAX_BYTES,
        DEFAULT_READ_TIMEOUT_S,
        DownloadError,
        Progress,
        default_dir,
        download,
        entry_for_url,
        find_entry,
    )

    entries = []
    for spec in args.names:
        try:
            if "://" in spec:
                entries.append(entry_for_url(args.kind, spec, args.sha256))
                continue
        except DownloadError as exc:
            raise UsageError(str(exc)) from None
        entry = find_entry(args.kind, spec)
        if entry is None:
            known = ", ".join(e.name for e in CATALOGUE if e.kind == args.kind)
            raise UsageError(f"unknown {args.kind} {spec!r}: the well-known {args.kind}s are {known} "
                             f"(or give an http(s) URL; see vision-host download list)")
        if args.sha256:
            raise UsageError(f"--sha256 is for a URL: the {args.kind} {entry.name} has its checksum in the catalogue")
        entries.append(entry)
    directory = Path(args.dir).expanduser() if args.dir else default_dir(args.kind)
    timeout = args.timeout
    for entry in entries:
        dest = directory / entry.filename
        try:
            result = download(entry.url, dest, sha256=entry.sha256, force=args.force,
                              max_bytes=args.max_size or DEFAULT_MAX_BYTES,
                              connect_timeout_s=timeout or DEFAULT_CONNECT_TIMEOUT_S,
                              read_timeout_s=timeout or DEFAULT_READ_TIMEOUT_S,
                              progress=Progress(entry.name, sys.stderr))
        except DownloadError as exc:
            print(f"vision-host: {args.kind} {entry.name}: {exc}", file=sys.stderr)
            return 1
        if result.skipped:
            how = "sha256 ok" if result.verified else "not checked: no published sha256; --force downloads it again"
            print(f"{args.kind} {entry.name} is already in {result.path} ({how})")
            continue
        resumed = f", resumed after {result.resumed_from} bytes" if result.resumed_from else ""
        if result.verified:
            print(f"downloaded {args.kind} {entry.name} to {result.path} ({result.size} bytes{resumed}, sha256 ok)")
        else:
            print(f"downloaded {args.kind} {entry.name} to {result.path} ({result.size} bytes{resumed}); "
                  f"its sha256 is {result.sha256}, NOT verified: no published checksum to compare with "
                  f"(check it against the publisher's, or pass --sha256 next time)")
    return 0
