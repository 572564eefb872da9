"""Run files (``vision-host run -f run.toml``) and the run's streams.

A run file is TOML in wasmVision's layout (``[main]``, ``[processing]``, ``[models]``,
``[server]``) plus vision-host's ``[sandbox]``, ``[events]`` and ``[history]``, a ``config``
table of processor settings, ``[[source]]`` tables (one per stream), and the event tables:
``[[alert]]`` (one per alert rule), ``[mqtt]``, ``[[webhook]]`` (one per receiver),
``[[summary]]`` (one per periodic summary). Its keys are those of :data:`.settings.FILE_KEYS`;
wasmVision's keys that vision-host does not support (:data:`.settings.WASMVISION_ONLY_KEYS`)
are ignored with one warning on stderr.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..runner import StreamSpec
from .settings import FILE_KEYS, WASMVISION_ONLY_KEYS, UsageError

#: Keys of a ``[[source]]`` table (one per stream).
STREAM_KEYS = {"url", "name", "destination", "captions", "config"}

#: The event tables of a run file → the setting that holds them as given (checked by
#: :func:`.event_settings.event_settings`): ``[[alert]]`` and ``[[webhook]]`` are arrays of
#: tables, ``[mqtt]`` one table.
EVENT_TABLES = {"alert": ("alert_tables", list), "webhook": ("webhook_tables", list), "mqtt": ("mqtt_table", dict),
                "summary": ("summary_tables", list)}


def parse_config_pairs(pairs: list[str], where: str = "-c") -> dict[str, str]:
    """``["key=value", …]`` → dict. Raises UsageError for an item without ``=`` or key."""
    config = {}
    for item in pairs:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{where} {item!r} is not key=value: write it like -c ollama-model=llava")
        config[key.strip()] = value.strip()
    return config


def load_run_file(path: str) -> dict:
    """Read a run file (TOML) into flat settings named like :class:`.settings.RunSettings`'s
    attributes (``processor``, ``max_frames``, ``config``, …), values as the file gives them;
    its ``[[source]]`` tables as ``source_tables`` (a list of :class:`.runner.StreamSpec`); the
    event tables as given, under the names of :data:`EVENT_TABLES`.

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
    ignored = []
    tables = list(FILE_KEYS) + [t for t in WASMVISION_ONLY_KEYS if t not in FILE_KEYS]
    for table, value in doc.items():
        if table == "source" and isinstance(value, list):
            settings["source_tables"] = [_stream_table(item, n, path) for n, item in enumerate(value)]
            continue
        if table in EVENT_TABLES:
            name, kind = EVENT_TABLES[table]
            if not isinstance(value, kind) or (kind is list and not all(isinstance(v, dict) for v in value)):
                raise UsageError(f"{table} in {path} must be " + (f"[[{table}]] tables (one per {table})"
                                                                  if kind is list else f"one [{table}] table"))
            settings[name] = value
            continue
        if table == "config":
            if isinstance(value, dict):
                settings["config"].update({k: str(v) for k, v in value.items()})
            elif isinstance(value, list):
                settings["config"].update(parse_config_pairs(value, f"config in {path}:"))
            else:
                raise UsageError(f"config in {path} must be a table or a list of \"key=value\" strings")
            continue
        if table not in tables or not isinstance(value, dict):
            raise UsageError(f"unknown table [{table}] in {path}: known tables are "
                             f"{', '.join('[' + t + ']' for t in tables)}, [mqtt], [[source]], "
                             f"[[alert]], [[webhook]], [[summary]] and config")
        ours, theirs = FILE_KEYS.get(table, {}), WASMVISION_ONLY_KEYS.get(table, frozenset())
        for name, item in value.items():
            if name in theirs:
                ignored.append(f"[{table}] {name}")
            elif name not in ours:
                raise UsageError(f"unknown key {name!r} in [{table}] of {path}: known keys are "
                                 f"{', '.join(sorted({*ours, *theirs}))}")
            elif ours[name].kind is dict:
                settings["config"].update(parse_config_pairs(item, f"{name} in {path}:"))
            else:
                settings[ours[name].name] = item
    if "source_tables" in settings and not isinstance(settings.get("source", []), list):
        del settings["source"]    # [[source]] tables replace a single [main] source (a list replaces them)
    if ignored:
        print(f"vision-host: ignoring {', '.join(ignored)} in {path}: wasmVision settings that vision-host "
              f"does not support", file=sys.stderr)
    return settings


def _stream_table(item, n: int, path: str) -> StreamSpec:
    """One ``[[source]]`` table of a run file. Raises UsageError for unknown or missing keys."""
    where = f"[[source]] number {n + 1} in {path}"
    if not isinstance(item, dict):
        raise UsageError(f"{where} must be a table")
    unknown = set(item) - STREAM_KEYS
    if unknown:
        raise UsageError(f"unknown key {sorted(unknown)[0]!r} in {where}: known keys are {', '.join(sorted(STREAM_KEYS))}")
    if "url" not in item:
        raise UsageError(f"{where} has no url: give what -s takes (camera index, device, file or stream URL)")
    config = item.get("config", {})
    if not isinstance(config, dict):
        raise UsageError(f"config in {where} must be a table of processor settings")
    return StreamSpec(str(item["url"]), str(item.get("name", n)), item.get("destination"), item.get("captions"),
                      {k: str(v) for k, v in config.items()})


def per_stream_path(path: str, name: str) -> str:
    """``out.mp4`` → ``out-NAME.mp4``; a URL or a name without suffix gets ``-NAME`` appended."""
    if "://" in path:
        return f"{path.rstrip('/')}-{name}"
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{name}{p.suffix}"))


def stream_specs(values: dict) -> list[StreamSpec]:
    """The run's streams from its settings ``values``: ``source`` (``-s``, repeatable, or the
    run file's ``[main] source``) or the file's ``[[source]]`` tables (``source_tables``), or
    camera 0. With several, ``destination`` (``-o file``, ``rtsp``) and ``captions`` are derived
    per stream with :func:`per_stream_path` unless a table gives its own.

    Raises:
        UsageError: duplicate or unusable names, or a destination/captions path shared by two streams.
    """
    sources = values.get("source")
    if sources:
        specs = [StreamSpec(str(url), str(n)) for n, url in enumerate(sources)]
    elif values.get("source_tables"):
        specs = list(values["source_tables"])
    else:
        specs = [StreamSpec("0", "0")]
    names = [s.name for s in specs]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UsageError(f"stream name {name!r}: use letters, digits, '.', '_' and '-' only")
    if len(set(names)) != len(names):
        raise UsageError(f"two streams are named {next(n for n in names if names.count(n) > 1)!r}: give each its own name")
    several = len(specs) > 1
    for spec in specs:
        if spec.destination is None and values.get("destination"):
            if not several:
                spec.destination = values["destination"]
            elif values.get("output") in ("file", "rtsp"):
                spec.destination = per_stream_path(values["destination"], spec.name)
        if spec.captions is None and values.get("captions"):
            spec.captions = per_stream_path(values["captions"], spec.name) if several else values["captions"]
    for what in ("destination", "captions"):
        used = [getattr(s, what) for s in specs if getattr(s, what)]
        if len(set(used)) != len(used):
            raise UsageError(f"two streams write the same {what} {next(u for u in used if used.count(u) > 1)}: "
                             f"give each [[source]] its own")
    return specs
