"""The ``vision-host`` command: ``run``, ``list`` and ``version``.

Flags follow wasmVision's (``-p``, ``-c``, ``-f``, ``-s``, ``-o``, ``-d``, ``--logging``) so
its users feel at home; ``-f run.toml`` accepts wasmVision's TOML layout (``[main]``,
``[processing]``, ``config``) plus vision-host's own ``[sandbox]`` table. Command-line flags
override the file. Errors print one sentence saying what to do and exit with status 2
(usage) or 1 (runtime).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__

log = logging.getLogger("vision_host")

#: The built processors: the package's ``wasm/`` (in the source tree, a link to the project's ``wasm/``).
REPO_WASM_DIR = (Path(__file__).resolve().parent / "wasm").resolve()
DEFAULT_OLLAMA_URL = "http://localhost:11434"
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


class UsageError(Exception):
    """Bad flags, config or file: the message says what to fix."""


class EmbeddedServerError(Exception):
    """The embedded vision server could not start: the message says what to do (exit status 1)."""


# -- processors --------------------------------------------------------------------------
def processor_dirs(extra: str | None = None) -> list[Path]:
    """Directories searched for ``NAME.wasm``, in order: the project's ``wasm/``, then
    ``$VISION_HOST_PROCESSORS_DIR``, then ``--processors-dir``."""
    dirs = [REPO_WASM_DIR]
    if env := os.environ.get("VISION_HOST_PROCESSORS_DIR"):
        dirs.append(Path(env))
    if extra:
        dirs.append(Path(extra))
    return dirs


def known_processors(extra: str | None = None) -> dict[str, Path]:
    """Processor names found in :func:`processor_dirs` (first directory wins): every
    ``NAME.wasm`` entry, regular file or not (:func:`not_a_regular_file` tells)."""
    found: dict[str, Path] = {}
    for d in processor_dirs(extra):
        if d.is_dir():
            for f in sorted(d.glob("*.wasm")):
                found.setdefault(f.stem, f)
    return found


def not_a_regular_file(path: Path) -> str | None:
    """None for a regular file (a link to one included), else what ``path`` is instead, as a
    sentence: reading a FIFO would block the run forever, reading a directory fails."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return f"{path} is {kind}, not a .wasm file: remove it or give the path of a processor file"


def resolve_processor(spec: str, extra_dir: str | None = None) -> Path:
    """Path of processor ``spec``: a ``.wasm`` path, or a name looked up in :func:`processor_dirs`.

    Raises:
        UsageError: no such file or name (the message lists the known names), or the path is
            not a regular file (a FIFO, a directory, a device).
    """
    if spec.endswith(".wasm") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UsageError(f"processor file {spec} does not exist")
        if problem := not_a_regular_file(path):
            raise UsageError(f"processor {problem}")
        return path
    known = known_processors(extra_dir)
    if spec in known:
        if problem := not_a_regular_file(known[spec]):
            raise UsageError(f"processor {spec}: {problem}")
        return known[spec]
    names = ", ".join(known) or "none"
    raise UsageError(f"unknown processor {spec!r}: known processors are {names} "
                     f"(or give a path to a .wasm file; more are found in $VISION_HOST_PROCESSORS_DIR)")


# -- configuration ---------------------------------------------------------------------------
def parse_config_pairs(pairs: list[str], where: str = "-c") -> dict[str, str]:
    """``["key=value", …]`` → dict. Raises UsageError for an item without ``=`` or key."""
    config = {}
    for item in pairs:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{where} {item!r} is not key=value: write it like -c ollama-model=llava")
        config[key.strip()] = value.strip()
    return config


_FILE_KEYS = {
    "main": {"source", "output", "destination", "logging", "stats", "max-frames", "pace", "capture", "cuda-enable",
             "rtsp-transport", "captions", "codec", "segment-seconds", "subtitles", "source-retries",
             "source-timeout-s", "camera-size", "camera-fps", "camera-fourcc", "max-vision-requests", "allow-host",
             "viewer-max-connections", "viewer-max-connections-per-client", "viewer-header-timeout-s",
             "viewer-body-timeout-s", "viewer-max-body-bytes", "viewer-max-added-keys", "viewer-max-key-bytes",
             "viewer-max-value-bytes"},
    "processing": {"pipeline", "directory", "configuration", "download"},
    "sandbox": {"allow", "processor-timeout-ms", "memory-limit-mb"},
    "models": {"directory", "downloads"},
    "server": {"mcp-enable", "mcp-port"},
}
#: Keys of a ``[[source]]`` table (one per stream).
_STREAM_KEYS = {"url", "name", "destination", "captions", "config"}


def load_run_file(path: str) -> dict:
    """Read a run file (TOML) into flat settings named like the flags.

    Raises:
        UsageError: unreadable file, TOML syntax error (with line), unknown table or key.
    """
    try:
        import tomllib
    except ModuleNotFoundError:   # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read run file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"run file {path} is not valid TOML: {exc}") from None
    settings: dict = {"config": {}}
    for table, value in doc.items():
        if table == "source" and isinstance(value, list):
            settings["streams"] = [_stream_table(item, n, path) for n, item in enumerate(value)]
            continue
        if table == "config":
            if isinstance(value, dict):
                settings["config"].update({k: str(v) for k, v in value.items()})
            elif isinstance(value, list):
                settings["config"].update(parse_config_pairs(value, f"config in {path}:"))
            else:
                raise UsageError(f"config in {path} must be a table or a list of \"key=value\" strings")
            continue
        if table not in _FILE_KEYS or not isinstance(value, dict):
            raise UsageError(f"unknown table [{table}] in {path}: known tables are "
                             f"{', '.join('[' + t + ']' for t in _FILE_KEYS)} and config")
        for key, item in value.items():
            if key not in _FILE_KEYS[table]:
                raise UsageError(f"unknown key {key!r} in [{table}] of {path}: known keys are "
                                 f"{', '.join(sorted(_FILE_KEYS[table]))}")
            if table == "processing" and key == "configuration":
                settings["config"].update(parse_config_pairs(item, f"configuration in {path}:"))
            elif table == "processing" and key == "pipeline":
                settings["processor"] = list(item) if isinstance(item, list) else [item]
            elif table == "processing" and key == "directory":
                settings["processors_dir"] = str(item)
            elif table == "models" and key == "directory":
                settings["models_dir"] = str(item)
            else:
                settings[key.replace("-", "_")] = item
    return settings


def _stream_table(item, n: int, path: str) -> "StreamSpec":
    """One ``[[source]]`` table of a run file. Raises UsageError for unknown or missing keys."""
    where = f"[[source]] number {n + 1} in {path}"
    if not isinstance(item, dict):
        raise UsageError(f"{where} must be a table")
    unknown = set(item) - _STREAM_KEYS
    if unknown:
        raise UsageError(f"unknown key {sorted(unknown)[0]!r} in {where}: known keys are {', '.join(sorted(_STREAM_KEYS))}")
    if "url" not in item:
        raise UsageError(f"{where} has no url: give what -s takes (camera index, device, file or stream URL)")
    config = item.get("config", {})
    if not isinstance(config, dict):
        raise UsageError(f"config in {where} must be a table of processor settings")
    return StreamSpec(str(item["url"]), str(item.get("name", n)), item.get("destination"), item.get("captions"),
                      {k: str(v) for k, v in config.items()})


@dataclass
class StreamSpec:
    """One stream of a run: where its frames come from and where its results go.

    Attributes:
        url: what ``-s`` takes: camera index, device path, video file or stream URL.
        name: how messages, ``/stream/N`` captions and per-stream file names call it
            (letters, digits, ``.``, ``_``, ``-``; default its index).
        destination: its own ``-d`` (file path or ``rtsp://`` URL); None = derived from ``-d``.
        captions: its own caption track; None = derived from ``--captions``.
        config: processor settings laid over the run's ``-c`` settings for this stream.
    """

    url: str
    name: str
    destination: str | None = None
    captions: str | None = None
    config: dict[str, str] = field(default_factory=dict)


def per_stream_path(path: str, name: str) -> str:
    """``out.mp4`` → ``out-NAME.mp4``; a URL or a name without suffix gets ``-NAME`` appended."""
    if "://" in path:
        return f"{path.rstrip('/')}-{name}"
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix}"))


def _stream_specs(settings: dict) -> list[StreamSpec]:
    """The run's streams: ``-s`` (repeatable) or the run file's ``[[source]]`` tables, or the
    file's ``[main] source``. With several, ``-d`` (file, rtsp) and ``--captions`` are derived
    per stream with :func:`per_stream_path` unless a table gives its own.

    Raises:
        UsageError: duplicate or unusable names, or a destination/captions path shared by two streams.
    """
    import re
    sources = settings.get("source")
    if isinstance(sources, list) and sources:
        specs = [StreamSpec(str(url), str(n)) for n, url in enumerate(sources)]
    elif settings.get("streams"):
        specs = list(settings["streams"])
    else:
        specs = [StreamSpec(str(sources if sources not in (None, []) else "0"), "0")]
    names = [s.name for s in specs]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UsageError(f"stream name {name!r}: use letters, digits, '.', '_' and '-' only")
    if len(set(names)) != len(names):
        raise UsageError(f"two streams are named {next(n for n in names if names.count(n) > 1)!r}: give each its own name")
    several = len(specs) > 1
    for spec in specs:
        if spec.destination is None and settings.get("destination"):
            if not several:
                spec.destination = settings["destination"]
            elif settings.get("output") in ("file", "rtsp"):
                spec.destination = per_stream_path(settings["destination"], spec.name)
        if spec.captions is None and settings.get("captions"):
            spec.captions = per_stream_path(settings["captions"], spec.name) if several else settings["captions"]
    for what in ("destination", "captions"):
        used = [getattr(s, what) for s in specs if getattr(s, what)]
        if len(set(used)) != len(used):
            raise UsageError(f"two streams write the same {what} {next(u for u in used if used.count(u) > 1)}: "
                             f"give each [[source]] its own")
    return specs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


RUN_EPILOG = """\
the ollama processor's settings (-c KEY=VALUE; the README lists them all):
  ollama-url=URL           the vision server (default $OLLAMA_HOST, else http://localhost:11434);
                           ollama-url=embedded starts vision-host serve for the run (pip install
                           'vision-host[serve]'), as happens when no Ollama is configured or running
                           and ollama-model is unset, blip, blip-base, blip2, a Hub id or a directory
  ollama-model=NAME        llava (default), bakllava, moondream, … (an Ollama model name means Ollama)
  ollama-api=API           generate (default), chat, openai, workers-ai
  ollama-prompt=TEXT       the question asked about each frame
  ollama-interval-ms=MS    least time between two requests (default 3000)
  ollama-api-key-env=VAR   environment variable holding the server's API key
  ollama-image-max-side=PX, ollama-jpeg-quality=Q, ollama-max-tokens=N, ollama-timeout-ms=MS,
  ollama-caption-placement=top|bottom, ollama-font-scale=S, ollama-max-lines=N,
  ollama-overlay=true|false, ollama-paused=true|false, ollama-server-name=TEXT

examples:
  vision-host run -p ollama -c ollama-model=bakllava                  webcam → http://127.0.0.1:8080/
  vision-host run -p ollama -s clip.mp4 -o file -d annotated.mp4      caption a recording
  vision-host run -p blur -p ollama                                   processors run in the order given
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-host", description=(
        "Run WebAssembly frame processors over live video, e.g. "
        "vision-host run -p ollama -c ollama-model=bakllava"))
    parser.add_argument("--version", action="version", version=f"vision-host {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="capture frames, process them, send them to an output",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EPILOG)
    run.add_argument("-p", "--processor", action="append", metavar="NAME|PATH",
                     help="processor to run, repeatable, chained in order (name from wasm/ or a .wasm path)")
    run.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                     help="processor setting, repeatable (e.g. ollama-model=llava)")
    run.add_argument("-f", "--file", metavar="RUN.toml", help="TOML file with the same settings")
    run.add_argument("-s", "--source", action="append", metavar="SOURCE",
                     help="0 (first camera, the default), a device path, a video file, rtsp://… or http(s)://… "
                          "stream; repeat for several streams, each with its own processors and outputs")
    run.add_argument("-o", "--output", choices=["mjpeg", "file", "rtsp", "display"],
                     help="where frames go (default mjpeg): a browser, a video file, an RTSP server, a window")
    run.add_argument("-d", "--destination",
                     help="mjpeg: [HOST]:PORT (default :8080 on 127.0.0.1); file: a path; rtsp: rtsp://HOST:PORT/PATH "
                          "(with several streams, file and rtsp destinations get -NAME appended per stream)")
    run.add_argument("--stats", metavar="FILE", help="write a JSON summary of the run to FILE")
    run.add_argument("--codec", choices=["h264", "mp4v"],
                     help="-o file: H.264 through PyAV (default when installed) or OpenCV's mp4v")
    run.add_argument("--segment-seconds", type=float, metavar="S",
                     help="-o file: start a new file every S seconds of video (out-000.mp4, out-001.mp4, …)")
    run.add_argument("--subtitles", action="store_true", default=None,
                     help="-o file: mux the captions into the video as a subtitle stream (mov_text in .mp4, "
                          "SubRip in .mkv)")
    run.add_argument("--captions", metavar="FILE",
                     help="write every completed caption to FILE as it happens: .vtt (WebVTT), .srt (SubRip) or "
                          ".jsonl (JSON Lines with times, frame, source, model, latency)")
    run.add_argument("--max-frames", type=_positive_int, metavar="N", help="stop after N frames")
    run.add_argument("--no-pace", dest="pace", action="store_false", default=None,
                     help="read files as fast as possible instead of at their frame rate")
    run.add_argument("--logging", choices=list(LOG_LEVELS), help="log level (default warn)")
    run.add_argument("--processors-dir", metavar="DIR", help="extra directory of NAME.wasm processors")
    run.add_argument("--allow", action="append", default=[], metavar="HOST:PORT",
                     help="let processors reach this destination too (besides the *-url config values)")
    run.add_argument("--processor-timeout-ms", type=_positive_int, metavar="MS",
                     help="deadline of one processor call (default 1000, host functions included)")
    run.add_argument("--memory-limit-mb", type=_positive_int, metavar="MB",
                     help="linear-memory cap per processor (default 256)")
    run.add_argument("--models-dir", metavar="DIR",
                     help="directory of model files processors may load by name (dnn, face detectors)")
    run.add_argument("--no-cache", action="store_true", help="do not use the compiled-module cache")
    run.add_argument("--token", metavar="TOKEN",
                     help="mjpeg: every request to the viewer needs ?token=TOKEN (or Authorization: Bearer); "
                          "bound beyond 127.0.0.1 a random one is made and printed when none is given "
                          "(also $VISION_HOST_TOKEN)")
    viewer = run.add_argument_group("the viewer and its HTTP server (-o mjpeg)")
    viewer.add_argument("--allow-host", action="append", metavar="NAME",
                        help="answer requests whose Host is NAME too (repeatable); by default only this machine's "
                             "loopback names and addresses, the -d address, and the host name when bound to all "
                             "interfaces are answered, others get 421 (DNS rebinding)")
    viewer.add_argument("--viewer-max-connections", type=_positive_int, metavar="N",
                        help="open connections in all (default 256); more are answered 503 and closed")
    viewer.add_argument("--viewer-max-connections-per-client", type=_positive_int, metavar="N",
                        help="open connections from one client address (default 64); more are answered 503 and closed")
    viewer.add_argument("--viewer-header-timeout-s", type=float, metavar="S",
                        help="a connection that has not sent a complete request head in S seconds is closed "
                             "(default 10)")
    viewer.add_argument("--viewer-body-timeout-s", type=float, metavar="S",
                        help="a request body not received in full S seconds after its head is answered 408 "
                             "(default 10)")
    viewer.add_argument("--viewer-max-body-bytes", type=_positive_int, metavar="N",
                        help="largest request body (POST /api/config) in bytes (default 65536); larger: 413")
    viewer.add_argument("--viewer-max-added-keys", type=_positive_int, metavar="N",
                        help="config keys the API may add to a stream beyond those it started with (default 64)")
    viewer.add_argument("--viewer-max-key-bytes", type=_positive_int, metavar="N",
                        help="longest config key the API takes, in UTF-8 bytes (default 128)")
    viewer.add_argument("--viewer-max-value-bytes", type=_positive_int, metavar="N",
                        help="longest config value the API takes, in UTF-8 bytes (default 4096)")
    run.add_argument("--max-vision-requests", type=_positive_int, metavar="N",
                     help="caption requests running at once across all streams, served round-robin with one per "
                          "stream at most (default 2)")
    live = run.add_argument_group("live sources (cameras, rtsp://, http(s):// MJPEG or HLS)")
    live.add_argument("--rtsp-transport", choices=["tcp", "udp"], help="RTSP transport (default tcp)")
    live.add_argument("--source-retries", type=int, metavar="N",
                      help="attempts to open, and to reopen after a drop, before giving up (default 5, 0 = forever)")
    live.add_argument("--source-timeout-s", type=float, metavar="S",
                      help="a stream sending no frame this long is reopened (default 5)")
    live.add_argument("--camera-size", metavar="WxH", help="ask the webcam for this frame size, e.g. 1280x720")
    live.add_argument("--camera-fps", type=float, metavar="FPS", help="ask the webcam for this frame rate")
    live.add_argument("--camera-fourcc", metavar="CODE", help="ask the webcam for this pixel format, e.g. MJPG")

    bench = sub.add_parser("bench", help="measure speed on a real clip: pipeline vs OpenCV, blocking vs non-blocking "
                                         "captions, processor and caption overheads, start-up, a soak")
    bench.add_argument("-s", "--source", metavar="FILE", help="the clip (default: the one the project ships)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--latency-ms", type=float, default=2000, metavar="MS",
                       help="the local vision server's latency for the blocking comparison (default 2000)")
    bench.add_argument("--soak-frames", type=_positive_int, default=50_000, metavar="N",
                       help="frames of the memory soak (default 50000)")
    bench.add_argument("--quick", action="store_true", help="shorter scenarios, rougher figures")
    bench.add_argument("--streams", type=_positive_int, default=1, metavar="N",
                       help="also run N unpaced -p ollama streams at once against N plain OpenCV threads "
                            "(interleaved rounds): fps of all streams and the ratio")

    lst = sub.add_parser("list", help="list the processors found, checking their imports")
    lst.add_argument("--processors-dir", metavar="DIR")
    sub.add_parser("info", help="print the video capture and writer backends, and the runtime's versions")
    sub.add_parser("version", help="print the version")
    parser.commands = dict(sub.choices)

    srv = sub.add_parser("serve", help="serve a vision model (BLIP, BLIP-2, LLaVA-1.5) over Ollama's API, "
                                       "OpenAI's under /v1 and Workers AI's under /ai/run")
    srv.add_argument("--model", default="blip", metavar="ID|PATH",
                     help="alias (blip = Salesforce/blip-image-captioning-large, blip2 = Salesforce/blip2-opt-2.7b, "
                          "llava = llava-hf/llava-1.5-7b-hf), Hugging Face Hub id, "
                          "or a directory saved with save_pretrained (default blip)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=_positive_int, default=11434, help="port to listen on (default 11434, Ollama's)")
    srv.add_argument("--logging", choices=list(LOG_LEVELS), default="warn", help="log level (default warn)")
    srv.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                     help="most concurrent requests run as one batch (default 8)")
    srv.add_argument("--batch-window-ms", type=float, default=10.0, metavar="MS",
                     help="how long a batch waits for more requests (default 10)")
    srv.add_argument("--max-queue", type=int, default=32, metavar="N",
                     help="requests that may wait; more are answered 503 with Retry-After (default 32, 0 = no limit)")
    srv.add_argument("--request-timeout-s", type=float, default=120.0, metavar="S",
                     help="a request waiting and generating longer gets 504 (default 120, 0 = none)")
    srv.add_argument("--keep-alive", default="5m", metavar="DURATION",
                     help="unload the model after this idle time (Ollama's keep_alive: 5m, 300, 0, -1; default 5m)")
    srv.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="default generation option, as Ollama's options (num_predict, temperature, top_p, top_k, "
                          "seed, num_beams, min_length, max_length, length_penalty, repeat_penalty); "
                          "requests override it; repeatable")
    lim = srv.add_argument_group("limits on requests (beyond them: 400, or 413 for sizes)")
    lim.add_argument("--max-beams", type=_positive_int, default=8, metavar="N",
                     help="largest num_beams a request may ask for (default 8)")
    lim.add_argument("--max-new-tokens", type=_positive_int, default=512, metavar="N",
                     help="largest num_predict / max_tokens / max_length / min_length, in tokens (default 512)")
    lim.add_argument("--max-top-k", type=_positive_int, default=1000, metavar="N",
                     help="largest top_k (default 1000)")
    lim.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                     help="largest request body in MiB, from Content-Length or counted as it arrives; larger: 413 "
                          "(default 32)")
    lim.add_argument("--max-image-pixels", type=_positive_int, default=40_000_000, metavar="N",
                     help="most pixels (width x height, read from the image's header before decoding) an image may "
                          "have; more: 413 (default 40000000)")
    lim.add_argument("--max-prompt-chars", type=_positive_int, default=32768, metavar="N",
                     help="longest prompt in characters, checked before tokenising (default 32768)")
    lim.add_argument("--decode-threads", type=_positive_int, default=2, metavar="N",
                     help="images decoded at once; other requests wait their turn in the queue (default 2)")
    lim.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages of ORIGIN (e.g. http://localhost:3000) use the server (repeatable); "
                          "requests with any other Origin header but the server's own get 403")
    return parser


#: Numeric settings (also from run files, where TOML may give any type): name → (type, least value).
_NUMBERS = {"processor_timeout_ms": (float, 1), "memory_limit_mb": (int, 1), "max_frames": (int, 1),
            "segment_seconds": (float, 0.1), "source_retries": (int, 0), "source_timeout_s": (float, 0.001),
            "camera_fps": (float, 0.001), "max_vision_requests": (int, 1),
            "viewer_max_connections": (int, 1), "viewer_max_connections_per_client": (int, 1),
            "viewer_header_timeout_s": (float, 0.001), "viewer_body_timeout_s": (float, 0.001),
            "viewer_max_body_bytes": (int, 1), "viewer_max_added_keys": (int, 1), "viewer_max_key_bytes": (int, 1),
            "viewer_max_value_bytes": (int, 1)}


def _check_numbers(settings: dict) -> None:
    """Turn numeric settings into numbers. Raises UsageError naming the key and what it takes."""
    for key, (kind, least) in _NUMBERS.items():
        value = settings.get(key)
        if value is None:
            continue
        name = key.replace("_", "-")
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = kind(value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
        except ValueError:
            raise UsageError(f"{name} = {value!r}: give a {'whole ' if kind is int else ''}number "
                             f"of at least {least:g}") from None
        if number < least:
            raise UsageError(f"{name} = {value!r}: give a number of at least {least:g}")
        settings[key] = number


def _settings(args: argparse.Namespace) -> dict:
    """Merge the run file (if any) under the command-line flags, and apply defaults."""
    settings = load_run_file(args.file) if args.file else {"config": {}}
    config = dict(settings.pop("config"))
    config.update(parse_config_pairs(args.config))
    for key in ("processor", "source", "output", "destination", "stats", "max_frames", "pace", "logging",
                "processors_dir", "processor_timeout_ms", "memory_limit_mb", "models_dir", "rtsp_transport",
                "captions", "codec", "segment_seconds", "subtitles", "source_retries", "source_timeout_s", "camera_size",
                "camera_fps", "camera_fourcc", "max_vision_requests", "token", "allow_host", *_VIEWER_LIMITS):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    _check_numbers(settings)
    _refuse_url_credentials(config)
    allow = list(settings.get("allow", [])) + list(args.allow)
    settings["allow"] = allow
    if "ollama-url" not in config:
        configured = ollama_host_url(os.environ.get("OLLAMA_HOST"))
        config["ollama-url"] = configured or DEFAULT_OLLAMA_URL
        if not configured and "ollama" in (settings.get("processor") or []) and _embedded_fallback(config):
            config["ollama-url"] = EMBEDDED
    names = [Path(p).stem for p in settings.get("processor") or []]
    if "ollama" in names and "captions" in names[names.index("ollama") + 1:]:
        # wasmVision's layout: the captions processor draws what ollama stores, so ollama draws nothing.
        config.setdefault("ollama-overlay", "false")
    settings["config"] = config
    settings.setdefault("output", "mjpeg")
    settings.setdefault("logging", "warn")
    settings.setdefault("pace", True)
    if settings.get("models_dir") and not Path(settings["models_dir"]).is_dir():
        raise UsageError(f"--models-dir {settings['models_dir']} is not a directory: create it and put the "
                         f"model files processors load by name there")
    if settings["output"] not in ("mjpeg", "file", "display", "rtsp"):
        raise UsageError(f"unknown output {settings['output']!r}: use mjpeg, file, rtsp or display")
    if settings["logging"] not in LOG_LEVELS:
        raise UsageError(f"unknown logging level {settings['logging']!r}: use error, warn, info or debug")
    if not settings.get("processor"):
        raise UsageError("no processor given: add -p NAME (e.g. -p ollama), repeatable")
    settings["live_options"] = _live_options(settings)    # checked here, once, not in each stream's thread
    streams = settings["streams"] = _stream_specs(settings)
    for spec in streams:
        _refuse_url_credentials(spec.config)
    if settings["output"] in ("file", "rtsp") and not all(s.destination for s in streams):
        raise UsageError("-o file needs -d PATH.mp4 for the video file to write" if settings["output"] == "file"
                         else "-o rtsp needs -d rtsp://HOST:PORT/PATH of the RTSP server to publish to")
    if settings["output"] != "file" and (settings.get("segment_seconds") or settings.get("subtitles")):
        raise UsageError("--segment-seconds and --subtitles apply to -o file only")
    if settings["output"] == "display" and len(streams) > 1:
        raise UsageError("-o display shows one stream; with several sources use -o mjpeg (every stream on one page)")
    return settings


def _refuse_url_credentials(config: dict) -> None:
    """Refuse ``*-url`` settings with a userinfo (``http://user:pass@host``): the host never
    sends it, and it would be shown wherever the URL is. Raises UsageError."""
    from .sources import redact_url

    for key, value in config.items():
        if key.endswith("-url") and redact_url(value) != value:
            prefix = key[: -len("-url")]
            raise UsageError(f"{key}={redact_url(value)}: credentials in the URL are not sent to the server; "
                             f"put the API key in an environment variable and name it with "
                             f"-c {prefix}-api-key-env=VARIABLE")


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


EMBEDDED = "embedded"
DEFAULT_EMBEDDED_MODEL = "blip"


#: ``vision-host serve`` aliases that are also models of Ollama's library: such a name means Ollama.
OLLAMA_LIBRARY_ALIASES = frozenset({"llava"})


def serves_unambiguously(model: str) -> bool:
    """Whether ``ollama-model`` can only mean the embedded server: a ``serve`` alias that no
    Ollama library model has (``blip``, ``blip-base``, ``blip2``), a directory, or a Hugging
    Face Hub id (``owner/name``, no ``:tag``). ``llava``, ``bakllava``, ``moondream``, … mean Ollama."""
    from .vlm import MODEL_ALIASES

    name = model.strip()
    if name.lower() in MODEL_ALIASES:
        return name.lower() not in OLLAMA_LIBRARY_ALIASES
    if Path(name).expanduser().is_dir():
        return True
    owner, slash, repo = name.partition("/")
    return bool(slash and owner and repo and "/" not in repo and ":" not in name and owner.lower() != "hf.co")


def _embedded_fallback(config: dict) -> bool:
    """No Ollama configured: use the embedded server when nothing answers on Ollama's default
    port, the serve extra is installed and ``ollama-model`` (if given) can only mean it
    (:func:`serves_unambiguously`; an Ollama model name means the user expects Ollama)."""
    import importlib.util
    import socket

    model = config.get("ollama-model")
    if model and not serves_unambiguously(model):
        return False
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "fastapi", "uvicorn")):
        return False
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            return False   # something (Ollama) listens there
    except OSError:
        pass
    print("vision-host: no Ollama configured (ollama-url, OLLAMA_HOST) or running on localhost:11434: "
          "using the embedded vision server (ollama-url=embedded)", file=sys.stderr)
    return True


class EmbeddedServer:
    """``ollama-url=embedded``: ``vision-host serve`` in a child process on a free loopback
    port, for machines with no vision server. :meth:`start` waits until the server answers
    (its model loaded, downloaded first if need be, with the server's own progress output), so
    a model that cannot load stops the run before any frame is written.

    Args:
        model: ``--model`` of the server (alias, Hub id or directory).
    Attributes:
        name: the model's name as the server reports it (``blip:latest``).
        label: how messages name this server (``the embedded vision server (blip:latest)``).
    Raises (from :meth:`start`):
        UsageError: the model name cannot be served.
    """

    def __init__(self, model: str):
        from .server import ModelLoadError, normalize_model_name, resolve_model   # no torch import
        try:
            self.name = normalize_model_name(resolve_model(model)[0])
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from None
        self.model = model
        self.label = f"the embedded vision server ({self.name})"
        self.proc = None
        self.url = ""

    def start(self, poll_s: float = 0.1) -> str:
        """Start the server and wait until it answers Ollama's ``GET /api/version`` (checked
        every ``poll_s`` s; as long as loading takes, Ctrl-C stops it); returns its base URL.

        Raises:
            EmbeddedServerError: the server exited before answering (its message is above).
        """
        import socket
        import subprocess
        import time

        import requests

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vision_host", "serve", "--model", self.model,
                                      "--host", "127.0.0.1", "--port", str(port)], stdin=subprocess.DEVNULL)
        print(f"vision-host: starting {self.label}; the video starts when it has loaded the model …",
              file=sys.stderr, flush=True)
        while True:
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.label} could not start (vision-host serve --model {self.model} exited with status "
                    f"{self.proc.returncode}; its message is above): nothing was run. Fix what it says, give "
                    f"another model with -c ollama-model=…, or point -c ollama-url= at a running server")
            try:
                if requests.get(self.url + "/api/version", timeout=1).ok:
                    return self.url
            except requests.RequestException:
                pass
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop the server process (terminate, then kill after 5 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except Exception:   # noqa: BLE001 - subprocess.TimeoutExpired
            self.proc.kill()
            self.proc.wait()


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=LOG_LEVELS[level], format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(LOG_LEVELS[level])
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    """``vision-host run``: returns the exit status."""
    settings = _settings(args)
    _setup_logging(settings["logging"])
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and `kill -INT` stop the run cleanly even when started in the background
        # (`vision-host run … &`), where the shell hands it SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config = settings["config"]
    embedded = None
    try:
        if config.get("ollama-url", "").strip().lower() == EMBEDDED:
            embedded = EmbeddedServer(config.get("ollama-model") or DEFAULT_EMBEDDED_MODEL)
            config["ollama-url"] = embedded.start()
            config["ollama-model"] = embedded.name
            config.setdefault("ollama-server-name", embedded.label)
            print(f"vision-host: embedded vision server for {embedded.name} at {config['ollama-url']}",
                  file=sys.stderr)
        return _run_pipeline(args, settings)
    except EmbeddedServerError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            embedded.stop()


def _live_options(settings: dict):
    """:class:`.sources.LiveOptions` from the run settings. Raises UsageError for bad values."""
    from .sources import LiveOptions

    opts = LiveOptions()
    if settings.get("rtsp_transport"):
        if settings["rtsp_transport"] not in ("tcp", "udp"):
            raise UsageError(f"rtsp-transport {settings['rtsp_transport']!r}: use tcp or udp")
        opts.rtsp_transport = settings["rtsp_transport"]
    if settings.get("source_retries") is not None:      # ranges checked by _check_numbers
        opts.retries = settings["source_retries"]
    if settings.get("source_timeout_s") is not None:
        opts.stall_timeout_s = settings["source_timeout_s"]
    if settings.get("camera_size"):
        w, sep, h = str(settings["camera_size"]).lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise UsageError(f"--camera-size {settings['camera_size']!r}: give WIDTHxHEIGHT, e.g. 1280x720")
        opts.width, opts.height = int(w), int(h)
    if settings.get("camera_fps"):
        opts.fps = settings["camera_fps"]
    if settings.get("camera_fourcc"):
        if len(str(settings["camera_fourcc"])) != 4:
            raise UsageError(f"--camera-fourcc {settings['camera_fourcc']!r}: give four characters, e.g. MJPG")
        opts.fourcc = str(settings["camera_fourcc"])
    return opts


class _StreamRun:
    """One stream of a run: opens its source, output and caption tracks, runs its
    :class:`.pipeline.Pipeline`, and closes what it opened. With several streams each runs on
    its own thread (stream 0 on the main one); a stream that cannot open is reported and the
    others go on."""

    def __init__(self, spec: StreamSpec, settings: dict, processors: list, runtime, stream, mjpeg=None, viewer=None):
        self.spec, self.settings, self.processors, self.runtime, self.stream = spec, settings, processors, runtime, stream
        self.mjpeg, self.viewer = mjpeg, viewer
        self.pipeline = None
        self.stats: dict | None = None
        self.error: str | None = None
        self.stop_requested = threading.Event()
        #: Set when :meth:`run` has returned. Waited on instead of ``Thread.join``: a join that
        #: Ctrl-C interrupts can leave the thread marked stopped while it still runs (CPython < 3.13).
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def stop(self) -> None:
        """Ask the stream to end after its current frame (also before its pipeline exists)."""
        self.stop_requested.set()
        if self.pipeline is not None:
            self.pipeline.stop()

    def run(self, status=None) -> None:
        """Open, run to the end, close; sets :attr:`stats`, or :attr:`error` when opening failed,
        and then :attr:`done`."""
        try:
            self._run(status)
        finally:
            self.done.set()

    def _run(self, status=None) -> None:
        from .captions import CaptionTrackError, SubtitleStreamTrack, open_track
        from .outputs import OutputError, make_output
        from .pipeline import Pipeline
        from .runtime import ProcessorLoadError
        from .sources import SourceError, open_source

        settings, spec = self.settings, self.spec
        source = output = None
        tracks = []
        try:
            try:
                source = open_source(spec.url, pace=bool(settings["pace"]), live_options=settings["live_options"])
                if self.mjpeg is not None:
                    output = self.mjpeg.stream(self.stream.index)
                else:
                    output = make_output(settings["output"], spec.destination, codec=settings.get("codec"),
                                         segment_seconds=settings.get("segment_seconds"),
                                         subtitles=bool(settings.get("subtitles")))
                output.open(source.width, source.height, source.fps)
                if spec.captions:
                    tracks.append(open_track(spec.captions))
                if settings.get("subtitles"):
                    tracks.append(SubtitleStreamTrack(output.add_subtitle))
                if self.viewer is not None:
                    tracks.append(self.viewer.caption_feed(self.stream.index))
            except (ProcessorLoadError, SourceError, OutputError, CaptionTrackError) as exc:
                self.error = str(exc)
                return
            except OSError as exc:
                self.error = f"cannot write the caption track {spec.captions}: {exc.strerror}"
                return
            where = f"the viewer at {self.mjpeg.url}" if len(self.runtime.streams) == 1 and self.mjpeg else output.describe()
            print(f"vision-host: {self.label}{source.describe()} → {' → '.join(p.name for p in self.processors)} → "
                  f"{where}" + (f" (captions → {tracks[0].path})" if spec.captions else ""), file=sys.stderr)
            self.pipeline = Pipeline(source, self.processors, [output], self.runtime, status=status, captions=tracks,
                                     model=self.stream.config.get("ollama-model"), stream=self.stream)
            if self.viewer is not None:
                self.viewer.attach(self.stream.index, self.pipeline)
            if self.stop_requested.is_set():
                self.pipeline.stop()
            try:
                self.stats = self.pipeline.run(settings.get("max_frames"))
            except KeyboardInterrupt:
                self.stats = self.pipeline.summary()
                raise
        finally:
            for t in tracks:
                t.close()
            if output is not None:
                output.close()
            if source is not None:
                source.close()

    @property
    def label(self) -> str:
        """``[NAME] `` before this stream's messages when the run has several, else empty."""
        return f"[{self.spec.name}] " if len(self.runtime.streams) > 1 else ""


#: Signals that stop a run cleanly (files finalized, stats written); SIGHUP as when the terminal closes.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run_pipeline(args: argparse.Namespace, settings: dict) -> int:
    from .outputs import MjpegOutput, OutputError
    from .pipeline import format_summary, write_stats
    from .runtime import NetworkPolicy, ProcessorLoadError, Runtime, SandboxLimits, default_cache_dir
    from .runtime.fetch import PolicyError

    specs: list[StreamSpec] = settings["streams"]
    paths = [(spec, resolve_processor(spec, settings.get("processors_dir"))) for spec in settings["processor"]]
    limits = SandboxLimits()
    if settings.get("processor_timeout_ms"):
        limits.call_timeout_ms = float(settings["processor_timeout_ms"])
    if settings.get("memory_limit_mb"):
        limits.memory_limit_bytes = int(settings["memory_limit_mb"]) * 1024 * 1024
    config = settings["config"]
    try:
        policy = NetworkPolicy.from_config(config, settings["allow"])
        for spec in specs:   # a stream's own *-url settings are destinations too
            own = NetworkPolicy.from_config({**config, **spec.config})
            policy.allowed |= own.allowed
            policy.credentials.update(own.credentials)
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    if settings.get("max_vision_requests"):
        policy.max_frame_requests = int(settings["max_vision_requests"])
    log.info("processors may reach: %s", ", ".join(sorted(policy.allowed)) or "nothing")
    runtime = Runtime(config, policy, limits, None if args.no_cache else default_cache_dir(),
                      models_dir=settings.get("models_dir"))
    streams = [runtime.streams[0]] + [runtime.add_stream(s.name, s.config) for s in specs[1:]]
    streams[0].name = specs[0].name
    streams[0].config.update(specs[0].config)     # after the others copied the run's config
    runs: list[_StreamRun] = []
    chains: list[list] = []
    mjpeg = viewer = None
    try:
        try:
            for stream in streams:
                chains.append([])
                for _, path in paths:
                    chains[-1].append(runtime.load(path, Path(path).stem, stream))
            if settings["output"] == "mjpeg":
                mjpeg = MjpegOutput(settings.get("destination") or ":8080", stream_names=[s.name for s in specs])
                viewer = _start_viewer(runtime, mjpeg, settings.get("token"), settings)
        except (ProcessorLoadError, OutputError) as exc:
            print(f"vision-host: {exc}", file=sys.stderr)
            return 1
        runs = [_StreamRun(spec, settings, chain, runtime, stream, mjpeg, viewer)
                for spec, chain, stream in zip(specs, chains, streams, strict=True)]

        stopping: list[int] = []

        def on_signal(signum, frame):
            """Ctrl-C, SIGTERM, SIGHUP: the streams finish their frame, files are finalized and
            the stats written; a second signal only says that this is under way."""
            if stopping:
                try:
                    print("\nvision-host: stopping: finishing the files and the stats …", file=sys.stderr, flush=True)
                except OSError:   # the terminal is gone (SIGHUP)
                    pass
                return
            stopping.append(signum)
            for r in runs:
                r.stop()
            if runs[0].thread is None and runs[0].pipeline is None:
                raise KeyboardInterrupt   # still opening the source: nothing to finish yet
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS} if main_thread else {}
        try:
            for r in runs[1:]:
                r.thread = threading.Thread(target=r.run, name=f"vision-host-stream {r.spec.name}", daemon=True)
                r.thread.start()
            if len(runs) == 1:
                runs[0].run(status=sys.stderr)
            else:
                runs[0].thread = threading.Thread(target=runs[0].run, name=f"vision-host-stream {specs[0].name}",
                                                  daemon=True)
                runs[0].thread.start()
                _wait_for_streams(runs)
        except KeyboardInterrupt:
            for r in runs:
                r.stop()
        finally:
            for r in runs:
                if r.thread is not None:
                    r.done.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        for chain in chains:
            for p in chain:
                p.close()
        if viewer is not None:
            viewer.close()
        if mjpeg is not None:
            mjpeg.close()
        runtime.close()
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"vision-host: {r.label}{r.error}", file=sys.stderr)
    done = [r for r in runs if r.stats is not None]
    if settings.get("stats") and done:
        write_stats(Path(settings["stats"]), done[0].stats if len(runs) == 1 else
                    {"streams": [r.stats for r in done], "failed_streams": {r.spec.name: r.error for r in failed}})
    status = 1 if failed else 0
    for r in done:
        prefix = f"stream {r.spec.name}: " if len(runs) > 1 else ""
        print(prefix + format_summary(r.stats), file=sys.stderr)
        if r.stats.get("source_error"):    # the summary says it: a file that could not be read to its end
            status = 1
        for problem in _run_problems(r.stats, r.stream.fetch_stats.last_error, r.stream.config,
                                     r.stream.processor_store):
            print(f"vision-host: {r.label}{problem}", file=sys.stderr)
            status = 1
    return status


def _run_problems(stats: dict, last_error: str | None, config: dict, store) -> list[str]:
    """Sentences for what spoiled a stream's run beyond what its summary says, each making the
    exit status 1: caption requests made and none completed. The server is named as the
    ``ollama`` processor names it (the ``ollama``/``server-name`` and ``api`` it stores in
    ``store``, the stream's processor store), so the two never disagree."""
    problems = []
    captions = stats["captions"]
    if captions["started"] and not captions["completed"]:
        api = store.get("ollama", "api") or config.get("ollama-api", "generate")
        server = store.get("ollama", "server-name") or config.get("ollama-server-name") or "the vision server"
        failed = captions["failed"]
        why = (f"{failed} request{'s' * (failed > 1)} to {server} at {config.get('ollama-url')} failed"
               + (f" (last error: {last_error})" if last_error else "")) if failed else \
              f"{server} at {config.get('ollama-url')} had not answered when the run ended"
        hint = ""
        if api in ("generate", "chat") and "ollama-server-name" not in config:
            hint = (f" Start Ollama (`ollama serve`, then `ollama pull {config.get('ollama-model') or 'llava'}`), "
                    f"or caption with the embedded server: -c ollama-url=embedded")
        problems.append(f"no caption completed: {why}.{hint}")
    return problems


#: The viewer's limits: the flag's dest → (which limits: .webserver.ServerLimits or
#: .viewer.ConfigLimits, its field).
_VIEWER_LIMITS = {
    "viewer_max_connections": ("server", "max_connections"),
    "viewer_max_connections_per_client": ("server", "max_connections_per_client"),
    "viewer_header_timeout_s": ("server", "header_timeout_s"),
    "viewer_body_timeout_s": ("server", "body_timeout_s"),
    "viewer_max_body_bytes": ("server", "max_body_bytes"),
    "viewer_max_added_keys": ("config", "max_added_keys"),
    "viewer_max_key_bytes": ("config", "max_key_bytes"),
    "viewer_max_value_bytes": ("config", "max_value_bytes"),
}


def _start_viewer(runtime, mjpeg, token: str | None, settings: dict | None = None):
    """Start ``mjpeg``'s server with the live viewer attached (so no request ever meets the
    plain server). Bound beyond loopback it always needs a token: ``--token``,
    ``$VISION_HOST_TOKEN``, or a random one printed here.

    ``settings`` (the run's) may hold ``allow_host`` (names answered in ``Host`` besides the
    default ones, ``--allow-host``) and the limits of the ``--viewer-…`` flags, by their dests
    (``viewer_max_connections``, ``viewer_max_connections_per_client``, ``viewer_header_timeout_s``,
    ``viewer_body_timeout_s``, ``viewer_max_body_bytes``: :class:`.webserver.ServerLimits`;
    ``viewer_max_added_keys``, ``viewer_max_key_bytes``, ``viewer_max_value_bytes``:
    :class:`.viewer.ConfigLimits`); missing or None ones keep their defaults.

    Raises:
        OutputError: the port cannot be bound.
        UsageError: a limit that is not a number above 0 (whole where a count).
    """
    import secrets

    from .viewer import ConfigLimits, Viewer, is_loopback
    from .webserver import ServerLimits

    settings = settings or {}
    given: dict[str, dict] = {"server": {}, "config": {}}
    for key, (kind, name) in _VIEWER_LIMITS.items():
        if settings.get(key) is not None:
            given[kind][name] = settings[key]
    try:
        server_limits = ServerLimits(**given["server"])
        config_limits = ConfigLimits(**given["config"])
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        flag = next((k for k, (_, f) in _VIEWER_LIMITS.items() if f == name), name).replace("_", "-")
        raise UsageError(f"--{flag}{str(exc)[len(name):]}") from None
    allowed = settings.get("allow_host") or []
    mjpeg.limits = server_limits
    mjpeg.allowed_hosts = [allowed] if isinstance(allowed, str) else [str(a) for a in allowed]

    token = token or os.environ.get("VISION_HOST_TOKEN") or None
    if token is None and not is_loopback(mjpeg.host):
        token = secrets.token_urlsafe(18)
    viewer = Viewer(runtime, mjpeg, token, limits=config_limits)
    try:
        mjpeg.start()
    except Exception:
        viewer.close()
        raise
    shown = mjpeg.url.replace("://0.0.0.0:", f"://{_this_host()}:").replace("://[::]:", f"://{_this_host()}:")
    if token:
        print(f"vision-host: viewer at {shown}?token={token} (every request needs the token)", file=sys.stderr)
    else:
        print(f"vision-host: viewer at {shown}", file=sys.stderr)
    return viewer


def _this_host() -> str:
    import socket
    return socket.gethostname() or "127.0.0.1"


def _wait_for_streams(runs: list[_StreamRun]) -> None:
    """Wait on the main thread (so Ctrl-C reaches us) until every stream has ended, printing
    one status line for all of them four times a second when stderr is a terminal."""
    import time

    tty = sys.stderr.isatty()
    while not all(r.done.is_set() for r in runs):
        time.sleep(0.25)
        if tty:
            line = " | ".join(r.pipeline.status_text(short=True) for r in runs if r.pipeline is not None)
            sys.stderr.write("\r\x1b[2K" + line[:200])
            sys.stderr.flush()
    if tty:
        sys.stderr.write("\r\x1b[2K")
        sys.stderr.flush()


def cmd_list(args: argparse.Namespace) -> int:
    """``vision-host list``: every processor found, with its imports checked."""
    from .runtime import ProcessorLoadError, Runtime

    found = known_processors(args.processors_dir)
    if not found:
        print("no processors found in " + ", ".join(str(d) for d in processor_dirs(args.processors_dir)))
        return 1
    bad = 0
    with Runtime(cache_dir=None) as runtime:
        for name, path in found.items():
            if problem := not_a_regular_file(path):
                problems = [problem]
            else:
                try:
                    module = runtime.compile(path.read_bytes(), str(path))
                    problems = runtime.check_imports(module, str(path))
                except ProcessorLoadError as exc:
                    problems = [str(exc)]
                except OSError as exc:
                    problems = [f"cannot read {path}: {exc.strerror}"]
            bad += bool(problems)
            print(f"{name:16} {path}  {'ok' if not problems else 'CANNOT RUN: ' + '; '.join(problems)}")
    return 1 if bad else 0


def cmd_info(args: argparse.Namespace) -> int:
    """``vision-host info``: versions, OpenCV's video I/O backends, and where things are looked up."""
    import importlib.metadata
    import platform

    import cv2

    from .runtime import default_cache_dir

    def backends(ids) -> str:
        return " ".join(cv2.videoio_registry.getBackendName(b) for b in ids) or "none"

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        cuda = cv2.cuda.getCudaEnabledDeviceCount()
    except (AttributeError, cv2.error):
        cuda = 0
    print(f"vision-host {__version__} {platform.system().lower()}/{platform.machine()} "
          f"Python {platform.python_version()}")
    print(f"OpenCV {cv2.__version__}, wasmtime {version('wasmtime')}")
    print(f"Camera backends: {backends(cv2.videoio_registry.getCameraBackends())}")
    print(f"Stream backends: {backends(cv2.videoio_registry.getStreamBackends())}")
    print(f"Writer backends: {backends(cv2.videoio_registry.getWriterBackends())}")
    print(f"CUDA devices for OpenCV: {cuda}")
    print(f"Processor directories: {', '.join(str(d) for d in processor_dirs(None))}")
    print(f"Compiled-module cache: {default_cache_dir()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``vision-host serve``: an embedded vision server speaking Ollama's API (see :mod:`.server`)."""
    from .server import ServeError, serve

    _setup_logging(args.logging)
    options = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        try:
            options[key.strip()] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            sep = ""
        if not sep:
            print(f"vision-host: --option {pair}: give KEY=NUMBER, e.g. --option num_beams=5", file=sys.stderr)
            return 2
    try:
        serve(args.model, args.host, args.port, log_level={"warn": "warning"}.get(args.logging, args.logging),
              max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
              request_timeout_s=args.request_timeout_s, keep_alive=args.keep_alive, options=options,
              max_beams=args.max_beams, max_new_tokens=args.max_new_tokens, max_top_k=args.max_top_k,
              max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
              max_prompt_chars=args.max_prompt_chars, decode_threads=args.decode_threads,
              allow_origins=args.allow_origin)
    except ServeError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    return 0


#: The real clip ``vision-host bench`` runs on by default (``media/``, linked into the package and
#: shipped in the wheel with its attribution).
DEFAULT_CLIP = Path(__file__).resolve().parent / "media" / "bottle-detection.mp4"


def cmd_bench(args: argparse.Namespace) -> int:
    """``vision-host bench``: see :mod:`.bench`."""
    import json

    from .bench import format_table, run_bench

    clip = Path(args.source) if args.source else DEFAULT_CLIP
    if not clip.is_file():
        raise UsageError(f"no clip at {clip}: give one with -s FILE" if args.source else
                         "the shipped clip is not installed with the package: give one with -s FILE")
    result = run_bench(str(clip), latency_ms=args.latency_ms, soak_frames=args.soak_frames, quick=args.quick,
                       streams=args.streams,
                       progress=lambda text: print(f"vision-host bench: {text} …", file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vision-host``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands.get(args.command, parser)
        loose = [c for c in getattr(args, "config", None) or [] if "=" not in c]
        if loose:
            command.error(f"-c {loose[0]} {extra[0]}: write each setting as one KEY=VALUE word, "
                          f"e.g. -c {loose[0]}={extra[0]}")
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "version":
            print(f"vision-host {__version__}")
            return 0
        parser.print_help()
        return 2
    except UsageError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
