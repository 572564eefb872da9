"""The settings of ``vision-host run``: one table, :data:`RUN_KEYS`, lists every run key with
its flag, its place in a run file, its type, range, default and help.

From the table come the ``run`` command's flags (:func:`add_run_arguments`), the keys a run
file accepts (:data:`FILE_KEYS`, read by :mod:`.run_file`), the number checks
(:func:`check_numbers`), the viewer's limits (:func:`viewer_limits`) and the typed settings
object (:class:`RunSettings`, built by :func:`build_settings`). A new run key is one entry in
:data:`RUN_KEYS`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any

from ..outputs import FILE_CODECS, OUTPUT_KINDS

DEFAULT_OLLAMA_URL = "http://localhost:11434"
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


class UsageError(Exception):
    """Bad flags, config or file: the message says what to fix (exit status 2)."""


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0. Raises argparse.ArgumentTypeError."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def whole_number_up_to(most: int):
    """argparse type: a whole number from 1 to ``most`` (:func:`positive_int` with a bound).
    Raises argparse.ArgumentTypeError."""
    def parse(text: str) -> int:
        value = positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"{text} is more than {most}")
        return value
    return parse


def number_in(low: float, high: float, unit: str, *, above_low: bool = False):
    """argparse type: a number of ``unit`` (e.g. ``"seconds"``) from ``low`` (or, with
    ``above_low``, above it) to ``high``; NaN and infinities are refused like any number out
    of range. Raises argparse.ArgumentTypeError."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not ((low < value) if above_low else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f"{text}: give {unit} from {'above ' if above_low else ''}{low:g} "
                                             f"to {high:g}")
        return value
    return parse


def setup_logging(level: str) -> None:
    """Log to stderr at ``level`` (a key of :data:`LOG_LEVELS`); urllib3 at warnings only."""
    logging.basicConfig(level=LOG_LEVELS[level], format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(LOG_LEVELS[level])
    logging.getLogger("urllib3").setLevel(logging.WARNING)


# -- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunKey:
    """One setting of ``vision-host run``.

    Attributes:
        name: its :class:`RunSettings` attribute and argparse dest (``processor_timeout_ms``).
        flags: its command-line flags (``("--processor-timeout-ms",)``). A ``bool`` key's flag
            sets it True, or False when the flag is ``--no-NAME`` (``--no-pace``).
        file: ``TABLE.KEY`` in a run file (``"sandbox.processor-timeout-ms"``); None: the
            command line only.
        kind: ``str``, ``int``, ``float``, ``bool``; ``list`` (a repeatable flag; a file gives
            one value or a list); ``dict`` (repeatable ``KEY=VALUE`` flag; a file gives a list
            of ``"KEY=VALUE"`` strings).
        help, metavar: the flag's help text and placeholder.
        least: ``int``/``float``: the least value accepted (checked for files and flags alike).
        most: ``int``/``float``: the largest value accepted (None: no bound but finiteness).
        default: the value when neither the flag nor the file gives one.
        choices: the values the flag accepts (argparse checks them).
        group: title of the flag's group in ``--help`` (None: the general options).
        merge: ``list``: the file's and the flags' values are joined, not replaced by the flags'.
        limit: a viewer limit: ``"server.FIELD"`` (:class:`.webserver.ServerLimits`) or
            ``"config.FIELD"`` (:class:`.viewer.ConfigLimits`).
        flag_type: the flag's argparse type when not the one ``kind`` and ``least`` give.
    """

    name: str
    flags: tuple[str, ...]
    file: str | None
    kind: type
    help: str
    metavar: str | None = None
    least: float | None = None
    most: float | None = None
    default: Any = None
    choices: tuple[str, ...] | None = None
    group: str | None = None
    merge: bool = False
    limit: str | None = None
    flag_type: Any = None

    def argparse_type(self):
        """The ``type=`` of the flag: whole numbers above 0 for counts from 1, else ``kind``."""
        if self.flag_type is not None:
            return self.flag_type
        if self.kind is int:
            return positive_int if (self.least or 0) >= 1 else int
        return float if self.kind is float else None


_VIEWER = "the viewer and its HTTP server (-o mjpeg)"
_LIVE = "live sources (cameras, rtsp://, http(s):// MJPEG or HLS)"
_EVENTS = "events: alert rules, MQTT (Home Assistant), webhooks, history"

#: Every key of ``vision-host run``, in the order of ``--help``.
RUN_KEYS: tuple[RunKey, ...] = (
    RunKey("processor", ("-p", "--processor"), "processing.pipeline", list, metavar="NAME|PATH",
           help="processor to run, repeatable, chained in order (name from wasm/ or a .wasm path)"),
    RunKey("config", ("-c", "--config"), "processing.configuration", dict, metavar="KEY=VALUE",
           help="processor setting, repeatable (e.g. ollama-model=llava)"),
    RunKey("source", ("-s", "--source"), "main.source", list, metavar="SOURCE",
           help="0 (first camera, the default), a device path, a video file, rtsp://… or http(s)://… "
                "stream; repeat for several streams, each with its own processors and outputs"),
    RunKey("output", ("-o", "--output"), "main.output", str, choices=OUTPUT_KINDS, default="mjpeg",
           help="where frames go (default mjpeg): a browser, a video file, an RTSP server, a window"),
    RunKey("destination", ("-d", "--destination"), "main.destination", str,
           help="mjpeg: [HOST]:PORT (default :8080 on 127.0.0.1); file: a path; rtsp: rtsp://HOST:PORT/PATH "
                "(with several streams, file and rtsp destinations get -NAME appended per stream)"),
    RunKey("stats", ("--stats",), "main.stats", str, metavar="FILE", help="write a JSON summary of the run to FILE"),
    RunKey("codec", ("--codec",), "main.codec", str, choices=FILE_CODECS,
           help="-o file: H.264 through PyAV (default when installed) or OpenCV's mp4v"),
    RunKey("segment_seconds", ("--segment-seconds",), "main.segment-seconds", float, least=0.1, metavar="S",
           help="-o file: start a new file every S seconds of video (out-000.mp4, out-001.mp4, …)"),
    RunKey("subtitles", ("--subtitles",), "main.subtitles", bool,
           help="-o file: mux the captions into the video as a subtitle stream (mov_text in .mp4, SubRip in .mkv)"),
    RunKey("captions", ("--captions",), "main.captions", str, metavar="FILE",
           help="write every completed caption to FILE as it happens: .vtt (WebVTT), .srt (SubRip) or "
                ".jsonl (JSON Lines with times, frame, source, model, latency)"),
    RunKey("max_frames", ("--max-frames",), "main.max-frames", int, least=1, metavar="N", help="stop after N frames"),
    RunKey("caption_drain_s", ("--caption-drain-s",), "main.caption-drain-s", float, least=0, default=30.0,
           metavar="S", help="when a video file ends, wait up to S seconds for the captions still being "
                             "answered, so they reach the caption track, the history and the sinks "
                             "(default 30; 0: end at once)"),
    RunKey("pace", ("--no-pace",), "main.pace", bool, default=True,
           help="read files as fast as possible instead of at their frame rate"),
    RunKey("logging", ("--logging",), "main.logging", str, choices=tuple(LOG_LEVELS), default="warn",
           help="log level (default warn)"),
    RunKey("processors_dir", ("--processors-dir",), "processing.directory", str, metavar="DIR",
           help="extra directory of NAME.wasm processors"),
    RunKey("allow", ("--allow",), "sandbox.allow", list, merge=True, metavar="HOST:PORT",
           help="let processors reach this destination too (besides the *-url config values)"),
    # whole milliseconds on the command line (as ever), any number from 1 in a run file
    RunKey("processor_timeout_ms", ("--processor-timeout-ms",), "sandbox.processor-timeout-ms", float, least=1,
           flag_type=positive_int, metavar="MS",
           help="deadline of one processor call (default 1000, host functions included)"),
    RunKey("memory_limit_mb", ("--memory-limit-mb",), "sandbox.memory-limit-mb", int, least=1, metavar="MB",
           help="linear-memory cap per processor (default 256)"),
    RunKey("models_dir", ("--models-dir",), "models.directory", str, metavar="DIR",
           help="directory of model files processors may load by name (dnn, face detectors); default: where "
                "`vision-host download model` puts them, when it exists"),
    RunKey("no_cache", ("--no-cache",), None, bool, default=False, help="do not use the compiled-module cache"),
    RunKey("token", ("--token",), None, str, metavar="TOKEN",
           help="mjpeg: every request to the viewer needs ?token=TOKEN (or Authorization: Bearer); "
                "bound beyond 127.0.0.1 a random one is made and printed when none is given "
                "(also $VISION_HOST_TOKEN)"),
    RunKey("max_vision_requests", ("--max-vision-requests",), "main.max-vision-requests", int, least=1, metavar="N",
           help="caption requests running at once across all streams, served round-robin with one per "
                "stream at most (default 2)"),
    RunKey("allow_host", ("--allow-host",), "main.allow-host", list, group=_VIEWER, metavar="NAME",
           help="answer requests whose Host is NAME too (repeatable); by default only this machine's "
                "loopback names and addresses, the -d address, and the host name when bound to all "
                "interfaces are answered, others get 421 (DNS rebinding)"),
    RunKey("mcp", ("--mcp",), "server.mcp-enable", bool, default=False, group=_VIEWER,
           help="also serve MCP (Model Context Protocol) for agents at /mcp on the viewer's address, with "
                "the viewer's token: the frames, captions, questions to the vision model, the prompt, "
                "alerts and the history (-o mjpeg only)"),
    RunKey("mcp_max_sessions", ("--mcp-max-sessions",), "server.mcp-max-sessions", int, least=1, default=32,
           group=_VIEWER, metavar="N", help="--mcp: sessions open at once (default 32); one more is answered 503"),
    RunKey("mcp_ask_timeout_s", ("--mcp-ask-timeout-s",), "server.mcp-ask-timeout-s", float, least=1, default=60.0,
           group=_VIEWER, metavar="S", help="--mcp: an ask not answered by the vision server in S seconds is "
                                            "cancelled and reported (default 60)"),
    RunKey("ready_within_s", ("--ready-within-s",), "server.ready-within-s", float, least=0.001, most=86_400,
           default=10.0, group=_VIEWER, metavar="S",
           help="/readyz: a stream that delivered no frame for S seconds is not ready (default 10)"),
    RunKey("viewer_max_connections", ("--viewer-max-connections",), "main.viewer-max-connections", int, least=1,
           group=_VIEWER, limit="server.max_connections", metavar="N",
           help="open connections in all (default 256); more are answered 503 and closed"),
    RunKey("viewer_max_connections_per_client", ("--viewer-max-connections-per-client",),
           "main.viewer-max-connections-per-client", int, least=1, group=_VIEWER,
           limit="server.max_connections_per_client", metavar="N",
           help="open connections from one client address (default 64); more are answered 503 and closed"),
    RunKey("viewer_header_timeout_s", ("--viewer-header-timeout-s",), "main.viewer-header-timeout-s", float,
           least=0.001, group=_VIEWER, limit="server.header_timeout_s", metavar="S",
           help="a connection that has not sent a complete request head in S seconds is closed (default 10)"),
    RunKey("viewer_body_timeout_s", ("--viewer-body-timeout-s",), "main.viewer-body-timeout-s", float,
           least=0.001, group=_VIEWER, limit="server.body_timeout_s", metavar="S",
           help="a request body not received in full S seconds after its head is answered 408 (default 10)"),
    RunKey("viewer_max_body_bytes", ("--viewer-max-body-bytes",), "main.viewer-max-body-bytes", int, least=1,
           group=_VIEWER, limit="server.max_body_bytes", metavar="N",
           help="largest request body (POST /api/config) in bytes (default 65536); larger: 413"),
    RunKey("viewer_max_added_keys", ("--viewer-max-added-keys",), "main.viewer-max-added-keys", int, least=1,
           group=_VIEWER, limit="config.max_added_keys", metavar="N",
           help="config keys the API may add to a stream beyond those it started with (default 64)"),
    RunKey("viewer_max_key_bytes", ("--viewer-max-key-bytes",), "main.viewer-max-key-bytes", int, least=1,
           group=_VIEWER, limit="config.max_key_bytes", metavar="N",
           help="longest config key the API takes, in UTF-8 bytes (default 128)"),
    RunKey("viewer_max_value_bytes", ("--viewer-max-value-bytes",), "main.viewer-max-value-bytes", int, least=1,
           group=_VIEWER, limit="config.max_value_bytes", metavar="N",
           help="longest config value the API takes, in UTF-8 bytes (default 4096)"),
    RunKey("alert", ("--alert",), None, list, group=_EVENTS, metavar="NAME=EXPR",
           help="alert rule, repeatable: NAME turns ON when a caption makes the CEL expression EXPR true, "
                "e.g. --alert 'smoke=text.contains(\"smoke\")' or --alert 'crowd=fields.count >= 3'; "
                "[[alert]] tables in a run file add for-s, cooldown-s, clear-after-s and streams"),
    RunKey("mqtt", ("--mqtt",), None, str, group=_EVENTS, metavar="URL",
           help="publish captions, alert states and snapshots to this MQTT broker, with Home Assistant "
                "discovery: mqtt://[USER:PASSWORD@]HOST[:1883] or mqtts://…; an [mqtt] table in a run "
                "file sets the rest"),
    RunKey("webhook", ("--webhook",), None, list, group=_EVENTS, metavar="URL",
           help="POST every caption and alert event as JSON to URL, repeatable; [[webhook]] tables in a "
                "run file choose the events and sign them (secret-env)"),
    RunKey("outbox", ("--outbox",), "events.outbox", str, group=_EVENTS, metavar="PATH",
           help="SQLite file where events wait while the broker or a webhook is unreachable, delivered "
                "in order later, also after a restart (default: vision-host/outbox.sqlite3 in the "
                "user's data directory)"),
    RunKey("outbox_max_events", ("--outbox-max-events",), "events.outbox-max-events", int, least=1,
           default=10_000, group=_EVENTS, metavar="N",
           help="events kept waiting per sink (default 10000); past it the oldest are dropped and counted"),
    RunKey("history_path", ("--history",), "history.path", str, group=_EVENTS, metavar="PATH",
           help="SQLite file where every caption and alert edge is kept with a thumbnail, for "
                "`vision-host history` (default: vision-host/history.sqlite3 in the user's data directory)"),
    RunKey("embed_model", ("--embed-model",), "history.embed-model", str, group=_EVENTS, metavar="MODEL",
           help="also store a text embedding of each caption, asked of the vision server (Ollama "
                "/api/embed, OpenAI /v1/embeddings) with MODEL (e.g. nomic-embed-text), for "
                "`vision-host history search --semantic`"),
    RunKey("history", ("--no-history",), "history.enabled", bool, default=True, group=_EVENTS,
           help="keep no caption history"),
    RunKey("history_retention_days", ("--history-retention-days",), "history.retention-days", float, least=0,
           default=30.0, group=_EVENTS, metavar="DAYS",
           help="history older than DAYS is deleted (default 30; 0 keeps everything)"),
    RunKey("history_max_mb", ("--history-max-mb",), "history.max-mb", float, least=0, default=1024.0,
           group=_EVENTS, metavar="MB",
           help="the history's size limit; past it the oldest events are deleted (default 1024; 0: no limit)"),
    RunKey("rtsp_transport", ("--rtsp-transport",), "main.rtsp-transport", str, choices=("tcp", "udp"), group=_LIVE,
           help="RTSP transport (default tcp)"),
    RunKey("source_retries", ("--source-retries",), "main.source-retries", int, least=0, group=_LIVE, metavar="N",
           help="attempts to open, and to reopen after a drop, before giving up (default 5, 0 = forever)"),
    RunKey("source_timeout_s", ("--source-timeout-s",), "main.source-timeout-s", float, least=0.001, group=_LIVE,
           metavar="S", help="a stream sending no frame this long is reopened (default 5)"),
    RunKey("camera_size", ("--camera-size",), "main.camera-size", str, group=_LIVE, metavar="WxH",
           help="ask the webcam for this frame size, e.g. 1280x720"),
    RunKey("camera_fps", ("--camera-fps",), "main.camera-fps", float, least=0.001, group=_LIVE, metavar="FPS",
           help="ask the webcam for this frame rate"),
    RunKey("camera_fourcc", ("--camera-fourcc",), "main.camera-fourcc", str, group=_LIVE, metavar="CODE",
           help="ask the webcam for this pixel format, e.g. MJPG"),
)

_KEYS = {k.name: k for k in RUN_KEYS}

def _file_keys() -> dict[str, dict[str, RunKey]]:
    tables: dict[str, dict[str, RunKey]] = {"main": {}}
    for key in RUN_KEYS:
        if key.file:
            table, _, name = key.file.partition(".")
            tables.setdefault(table, {})[name] = key
    return tables


#: Run-file tables → their keys (the file's names) → the run key; ``[main]`` first.
FILE_KEYS = _file_keys()

#: wasmVision's run-file keys that vision-host does not support, accepted with one warning and
#: ignored: the TOML sources of its ``run`` flags ``--capture``, ``--width``, ``--height``,
#: ``--cuda-enable``, ``--datastorage``, ``--processor-download``, ``--models-download``,
#: and ``--mcp-port`` (wasmVision's ``cmd/wasmvision/flags.go``): MCP is served at ``/mcp`` on
#: the viewer's port (``-d``), so ``[server] mcp-port`` has nothing to set (``mcp-enable`` is
#: ``--mcp``).
WASMVISION_ONLY_KEYS: dict[str, frozenset[str]] = {
    "main": frozenset({"capture", "width", "height", "cuda-enable", "datastorage"}),
    "processing": frozenset({"download"}),
    "models": frozenset({"downloads"}),
    "server": frozenset({"mcp-port"}),
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for each :data:`RUN_KEYS` entry that has one. Every flag defaults to None
    (not given), so that :func:`build_settings` can tell it from the run file's value."""
    groups: dict[str | None, Any] = {None: parser}
    for key in RUN_KEYS:
        if key.group not in groups:
            groups[key.group] = parser.add_argument_group(key.group)
        options: dict[str, Any] = {"dest": key.name, "help": key.help}
        if key.kind is bool:
            negative = key.flags[-1] == "--no-" + key.name.replace("_", "-")
            options.update(action="store_false" if negative else "store_true", default=None)
        else:
            options.update(metavar=key.metavar, choices=key.choices, type=key.argparse_type())
            if key.kind in (list, dict):
                options["action"] = "append"
        groups[key.group].add_argument(*key.flags, **options)


# -- checks --------------------------------------------------------------------------------------
def check_numbers(values: dict) -> None:
    """Turn the numeric settings in ``values`` (by :attr:`RunKey.name`; from run files, where
    TOML may give any type, or from flags) into numbers of their kind, in place.

    Raises:
        UsageError: not a finite number of the key's kind (``nan`` and ``inf`` parse as floats,
            on the command line and in TOML alike), or below its least value; names the key.
    """
    for key in RUN_KEYS:
        value = values.get(key.name)
        if key.kind not in (int, float) or value is None:
            continue
        kind, least, name = key.kind, key.least, key.name.replace("_", "-")
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = kind(value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if not math.isfinite(number):
                raise ValueError
        except (ValueError, OverflowError):
            raise UsageError(f"{name} = {value!r}: give a {'whole' if kind is int else 'finite'} number "
                             f"of at least {least:g}") from None
        if number < least:
            raise UsageError(f"{name} = {value!r}: give a number of at least {least:g}")
        if key.most is not None and number > key.most:
            raise UsageError(f"{name} = {value!r}: give a number from {least:g} to {key.most:g}")
        values[key.name] = number


def viewer_limits(values: Mapping[str, Any]):
    """The viewer's limits from ``values`` (by :attr:`RunKey.name`: ``viewer_max_connections``,
    …; missing or None ones keep their defaults): a :class:`.webserver.ServerLimits` and a
    :class:`.viewer.ConfigLimits`.

    Raises:
        UsageError: a limit that is not a number above 0 (whole where a count), naming its flag.
    """
    from ..viewer import ConfigLimits
    from ..webserver import ServerLimits

    given: dict[str, dict] = {"server": {}, "config": {}}
    for key in RUN_KEYS:
        if key.limit and values.get(key.name) is not None:
            kind, _, name = key.limit.partition(".")
            given[kind][name] = values[key.name]
    try:
        return ServerLimits(**given["server"]), ConfigLimits(**given["config"])
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        flag = next((k.flags[-1] for k in RUN_KEYS if k.limit and k.limit.endswith("." + name)), "--" + name)
        raise UsageError(f"{flag}{str(exc)[len(name):]}") from None


def refuse_url_credentials(config: dict[str, str]) -> None:
    """Refuse ``*-url`` settings with a userinfo (``http://user:pass@host``): the host never
    sends it, and it would be shown wherever the URL is. Raises UsageError."""
    from ..sources import redact_url

    for key, value in config.items():
        if key.endswith("-url") and redact_url(value) != value:
            prefix = key[: -len("-url")]
            raise UsageError(f"{key}={redact_url(value)}: credentials in the URL are not sent to the server; "
                             f"put the API key in an environment variable and name it with "
                             f"-c {prefix}-api-key-env=VARIABLE")


def resolve_formats(config: dict[str, str]) -> None:
    """``*-format`` settings (``ollama-format``): ``@PATH`` replaced, in place, by the JSON
    Schema read from that file; a schema given inline or in a file is checked once here, so a
    bad one stops the run before it starts (see :mod:`..captions.structured`). Raises UsageError."""
    from ..captions.structured import FormatError, read_format_value

    for key, value in config.items():
        if key.endswith("-format"):
            try:
                config[key] = read_format_value(value, key)
            except FormatError as exc:
                raise UsageError(str(exc)) from None


def ollama_host_url(value: str | None) -> str | None:
    """Ollama's ``OLLAMA_HOST`` (``host``, ``host:port`` or a URL) as a base URL."""
    if not value:
        return None
    value = value.strip().rstrip("/")
    if "://" not in value:
        value = "http://" + value
    scheme, _, rest = value.partition("://")
    host = rest.split("/", 1)[0]
    if host.startswith("0.0.0.0"):
        host = "127.0.0.1" + host[len("0.0.0.0"):]
    if ":" not in host.rsplit("]", 1)[-1]:
        host += ":11434"
    return f"{scheme}://{host}"


def live_options(values: Mapping[str, Any]):
    """:class:`.sources.LiveOptions` from the run settings ``values`` (numbers already checked
    by :func:`check_numbers`). Raises UsageError for bad values."""
    from ..sources import LiveOptions

    opts = LiveOptions()
    transport = values.get("rtsp_transport")
    if transport:
        choices = _KEYS["rtsp_transport"].choices
        if transport not in choices:
            raise UsageError(f"rtsp-transport {transport!r}: use {_either(choices)}")
        opts.rtsp_transport = transport
    if values.get("source_retries") is not None:
        opts.retries = values["source_retries"]
    if values.get("source_timeout_s") is not None:
        opts.stall_timeout_s = values["source_timeout_s"]
    if values.get("camera_size"):
        w, sep, h = str(values["camera_size"]).lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise UsageError(f"--camera-size {values['camera_size']!r}: give WIDTHxHEIGHT, e.g. 1280x720")
        opts.width, opts.height = int(w), int(h)
    if values.get("camera_fps"):
        opts.fps = values["camera_fps"]
    if values.get("camera_fourcc"):
        if len(str(values["camera_fourcc"])) != 4:
            raise UsageError(f"--camera-fourcc {values['camera_fourcc']!r}: give four characters, e.g. MJPG")
        opts.fourcc = str(values["camera_fourcc"])
    return opts


def _either(choices) -> str:
    """``("a", "b", "c")`` → ``"a, b or c"``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _as_list(value) -> list:
    """A run file's one value or list of them, as a list (None: empty)."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


# -- the settings object -------------------------------------------------------------------------
_KIND_ANNOTATIONS = {str: "str | None", int: "int | None", float: "float | None", bool: "bool | None",
                     list: "list[str] | None", dict: "dict[str, str]"}


class RunSettings(make_dataclass(
        "_RunSettingsFields",
        [(k.name, _KIND_ANNOTATIONS[k.kind]) for k in RUN_KEYS]
        + [("streams", "list[StreamSpec]"), ("live_options", "LiveOptions"), ("events", "EventSettings")],
        frozen=True)):
    """The checked settings of one ``vision-host run``, made by :func:`build_settings`.

    One attribute per :data:`RUN_KEYS` entry, named by its ``name`` (``settings.max_frames``,
    ``settings.processor_timeout_ms``): the flag's value, else the run file's, else the key's
    default (None when it has none); numbers are numbers of the key's kind and within range;
    ``config`` holds the processor settings (the file's, then each ``-c`` laid over them);
    list keys are lists. Besides them:

    Attributes:
        streams: the run's streams (:class:`.runner.StreamSpec`), destinations and caption
            tracks already derived per stream.
        live_options: how live sources are opened (:class:`.sources.LiveOptions`).
        events: alert rules, MQTT, webhooks, outbox and history
            (:class:`.event_settings.EventSettings`).
    """

    def viewer_limits(self):
        """:func:`viewer_limits` of these settings: (ServerLimits, ConfigLimits). Raises UsageError."""
        return viewer_limits(vars(self))


def build_settings(args: argparse.Namespace) -> RunSettings:
    """The run's settings: the run file (``args.file``, if any) under the flags, checked, with
    the defaults applied. With ``-p ollama`` and no vision server configured, ``ollama-url`` is
    ``$OLLAMA_HOST``, else the embedded server when :func:`.serve.embedded.falls_back_to_embedded`
    says so, else :data:`DEFAULT_OLLAMA_URL`.

    Raises:
        UsageError: what is wrong, in a sentence saying what to do.
    """
    from .run_file import load_run_file, parse_config_pairs, stream_specs

    values = load_run_file(args.file) if args.file else {}
    config = dict(values.pop("config", {}))
    config.update(parse_config_pairs(args.config or []))
    for key in RUN_KEYS:
        given = getattr(args, key.name, None)
        if key.kind is list and key.name in values:
            values[key.name] = _as_list(values[key.name])
        if key.merge:
            values[key.name] = values.get(key.name, []) + (given or [])
        elif given is not None and key.kind is not dict:
            values[key.name] = given
    check_numbers(values)
    refuse_url_credentials(config)
    resolve_formats(config)
    if "ollama-url" not in config:
        configured = ollama_host_url(os.environ.get("OLLAMA_HOST"))
        config["ollama-url"] = configured or DEFAULT_OLLAMA_URL
        if not configured and "ollama" in (values.get("processor") or []):
            from ..serve.embedded import EMBEDDED, falls_back_to_embedded
            if falls_back_to_embedded(config):
                config["ollama-url"] = EMBEDDED
    names = [Path(p).stem for p in values.get("processor") or []]
    if "ollama" in names and "captions" in names[names.index("ollama") + 1:]:
        # wasmVision's layout: the captions processor draws what ollama stores, so ollama draws nothing.
        config.setdefault("ollama-overlay", "false")
    values["config"] = config
    for key in RUN_KEYS:
        if key.default is not None:
            values.setdefault(key.name, key.default)
    if not values.get("models_dir"):
        from ..download import default_dir
        if default_dir("model").is_dir():     # where `vision-host download model` puts them
            values["models_dir"] = str(default_dir("model"))
    if values.get("models_dir") and not Path(values["models_dir"]).is_dir():
        raise UsageError(f"--models-dir {values['models_dir']} is not a directory: create it and put the "
                         f"model files processors load by name there")
    if values["output"] not in OUTPUT_KINDS:
        raise UsageError(f"unknown output {values['output']!r}: use {_either(OUTPUT_KINDS)}")
    if values["logging"] not in LOG_LEVELS:
        raise UsageError(f"unknown logging level {values['logging']!r}: use {_either(tuple(LOG_LEVELS))}")
    if not values.get("processor"):
        raise UsageError("no processor given: add -p NAME (e.g. -p ollama), repeatable")
    options = live_options(values)    # checked here, once, not in each stream's thread
    streams = stream_specs(values)
    for spec in streams:
        refuse_url_credentials(spec.config)
        resolve_formats(spec.config)
    output = values["output"]
    if output in ("file", "rtsp") and not all(s.destination for s in streams):
        raise UsageError("-o file needs -d PATH.mp4 for the video file to write" if output == "file"
                         else "-o rtsp needs -d rtsp://HOST:PORT/PATH of the RTSP server to publish to")
    if output != "file" and (values.get("segment_seconds") or values.get("subtitles")):
        raise UsageError("--segment-seconds and --subtitles apply to -o file only")
    if values.get("mcp") and output != "mjpeg":
        raise UsageError(f"--mcp serves MCP at /mcp on the viewer's address, which -o {output} has none of: "
                         f"use -o mjpeg (the default), or leave out --mcp")
    if output == "display" and len(streams) > 1:
        raise UsageError("-o display shows one stream; with several sources use -o mjpeg (every stream on one page)")
    from .event_settings import event_settings
    events = event_settings(values, [s.name for s in streams])
    return RunSettings(**{k.name: values.get(k.name) for k in RUN_KEYS}, streams=streams, live_options=options,
                       events=events)
