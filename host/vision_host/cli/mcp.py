"""``vision-host mcp --attach URL``: a running instance's MCP server over stdio (see
:mod:`..mcp.bridge`), for MCP clients that launch a command."""

from __future__ import annotations

import argparse
import os
import sys

from .settings import LOG_LEVELS, setup_logging


def add_parser(sub) -> None:
    """Add ``mcp`` to the subcommands ``sub``."""
    cmd = sub.add_parser("mcp", help="speak MCP on stdin/stdout for an MCP client, forwarded to a running "
                                     "`vision-host run … --mcp`")
    cmd.add_argument("--attach", required=True, metavar="URL",
                     help="the running instance's viewer address, e.g. http://127.0.0.1:8080 (MCP is at /mcp)")
    cmd.add_argument("--token", metavar="TOKEN",
                     help="the instance's token, when it has one (default $VISION_HOST_TOKEN)")
    cmd.add_argument("--connect-timeout-s", type=float, default=10.0, metavar="S",
                     help="how long the first request to the instance may take (default 10)")
    cmd.add_argument("--logging", choices=list(LOG_LEVELS), default="warn", help="log level on stderr (default warn)")
    cmd.set_defaults(handler=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    """Run the bridge until the client closes stdin; 1 when the instance cannot be reached."""
    import anyio

    from ..mcp.bridge import BridgeError, mcp_url, run_bridge
    from .settings import UsageError

    if not args.connect_timeout_s > 0:
        raise UsageError(f"--connect-timeout-s {args.connect_timeout_s:g}: give a number of seconds above 0")
    try:
        mcp_url(args.attach)
    except BridgeError as exc:
        raise UsageError(str(exc)) from None
    setup_logging(args.logging)
    token = args.token or os.environ.get("VISION_HOST_TOKEN") or None
    try:
        anyio.run(run_bridge, args.attach, token, args.connect_timeout_s)
    except BridgeError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    return 0
