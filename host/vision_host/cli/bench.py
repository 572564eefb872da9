"""``vision-host bench``: speed on a real clip (see :mod:`..bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .settings import UsageError, number_in, whole_number_up_to

#: ``--streams``: at most this many streams (each a decoder, an encoder and threads of its own).
MAX_STREAMS = 64
#: ``--latency-ms``: at most this long (ms): the blocking comparison stalls this long per caption.
MAX_LATENCY_MS = 60_000.0
#: ``--soak-frames``: at most this many frames (about an hour at this machine's speed).
MAX_SOAK_FRAMES = 10_000_000


#: The real clip ``vision-host bench`` runs on by default (``media/``, linked into the package and
#: shipped in the wheel with its attribution).
DEFAULT_CLIP = Path(__file__).resolve().parent.parent / "media" / "bottle-detection.mp4"


def add_parser(sub) -> None:
    """Add ``bench`` to the subcommands ``sub``."""
    bench = sub.add_parser("bench", help="measure speed on a real clip: pipeline vs OpenCV, blocking vs non-blocking "
                                         "captions, processor and caption overheads, start-up, a soak")
    bench.add_argument("-s", "--source", metavar="FILE", help="the clip (default: the one the project ships)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--latency-ms", type=number_in(0, MAX_LATENCY_MS, "milliseconds"), default=2000, metavar="MS",
                       help="the local vision server's latency for the blocking comparison (default 2000, "
                            f"at most {MAX_LATENCY_MS:.0f})")
    bench.add_argument("--soak-frames", type=whole_number_up_to(MAX_SOAK_FRAMES), default=50_000, metavar="N",
                       help=f"frames of the memory soak (default 50000, at most {MAX_SOAK_FRAMES})")
    bench.add_argument("--quick", action="store_true", help="shorter scenarios, rougher figures")
    bench.add_argument("--streams", type=whole_number_up_to(MAX_STREAMS), default=1, metavar="N",
                       help="also run N unpaced -p ollama streams at once against N plain OpenCV threads "
                            f"(interleaved rounds): fps of all streams and the ratio (at most {MAX_STREAMS})")
    bench.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """``vision-host bench``: prints the table (or ``--json``); returns 0.

    Raises:
        UsageError: the clip is missing.
    """
    import json

    from ..bench import format_table, run_bench

    clip = Path(args.source) if args.source else DEFAULT_CLIP
    if not clip.is_file():
        raise UsageError(f"no clip at {clip}: give one with -s FILE" if args.source else
                         "the shipped clip is not installed with the package: give one with -s FILE")
    result = run_bench(str(clip), latency_ms=args.latency_ms, soak_frames=args.soak_frames, quick=args.quick,
                       streams=args.streams,
                       progress=lambda text: print(f"vision-host bench: {text} …", file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
