"""The caption history written out: :func:`export` as JSON Lines, CSV or WebVTT, oldest first,
from a :class:`.store.HistoryStore` (``vision-host history export``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import TextIO

from .store import HistoryError, HistoryStore

__all__ = ["CSV_COLUMNS", "EXPORT_FORMATS", "export"]

#: The formats :func:`export` writes.
EXPORT_FORMATS = ("jsonl", "csv", "vtt")
#: Columns of the CSV export, in order (``fields`` as a JSON text, empty cells for None).
CSV_COLUMNS = ("id", "kind", "time", "wall_time_unix", "stream", "stream_name", "text", "model", "latency_ms",
               "stream_time_s", "frame_index", "source", "prompt", "fields", "fields_error", "thumbnail",
               "alert", "state", "reason", "expression", "caption_id")


def export(store: HistoryStore, fmt: str, out: TextIO, stream: str | int | None = None, since: float | None = None,
           until: float | None = None, *, kind: str | None = None, max_cue_s: float = 10.0,
           min_cue_s: float = 1.0) -> int:
    """Write the events of ``store`` matching the filters to ``out``, oldest first, as ``fmt``:

    * ``jsonl``: one record (see :mod:`.store`) per line, UTF-8 JSON.
    * ``csv``: RFC 4180, a header row of :data:`CSV_COLUMNS`, one row per record (``fields``
      as JSON text, None as an empty cell).
    * ``vtt``: WebVTT (https://www.w3.org/TR/webvtt1/); time 0 is the first event written
      (a ``NOTE`` says when, in UTC); each event is a cue whose identifier is its id, from its
      time to the next event of the same stream, at least ``min_cue_s`` and at most
      ``max_cue_s`` s. Cue text: the caption cleaned and escaped as in :class:`.VttTrack`
      (one cue, no markup), prefixed ``[stream name]`` when several streams are written;
      an alert edge reads ``ALERT name ON: reason``.

    Returns how many events it wrote.

    Raises:
        HistoryError: an unknown format, a bad filter, or the database cannot be read.
    """
    if fmt not in EXPORT_FORMATS:
        raise HistoryError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    if not 0.001 <= min_cue_s <= max_cue_s:
        raise HistoryError(f"cue durations need 0.001 <= min_cue_s <= max_cue_s, got {min_cue_s}, {max_cue_s}")
    records = store.iter_records(stream, since, until, kind=kind)
    written = 0
    if fmt == "jsonl":
        for record in records:
            out.write(_json_line(record) + "\n")
            written += 1
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        for record in records:
            writer.writerow([_csv_cell(record.get(column)) for column in CSV_COLUMNS])
            written += 1
    else:
        ends, streams = store.cue_ends(stream, since, until, kind=kind)
        written = _export_vtt(out, records, ends, len(streams) > 1, max_cue_s, min_cue_s)
    return written


def _export_vtt(out: TextIO, records: Iterator[dict], ends: dict, several: bool, max_cue_s: float,
                min_cue_s: float) -> int:
    from ..captions.tracks import clean_cue_text   # the caption tracks' cleaning, shared

    out.write("WEBVTT\n\n")
    start = None
    written = 0
    for record in records:
        t = record["wall_time_unix"]
        if start is None:
            start = t
            out.write(f"NOTE 00:00:00.000 is {record['time']} (UTC)\n\n")
        if record["kind"] == "caption":
            text = clean_cue_text(record["text"])
        else:
            text = clean_cue_text(f"ALERT {record['alert']} {record['state']}: {record['reason'] or ''}")
        if not text:
            continue
        if several:
            text = clean_cue_text(f"[{record['stream_name'] or record['stream']}] ") + " " + text
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        nxt = ends.get(record["id"])
        length = max_cue_s if nxt is None else min(max(nxt - t, min_cue_s), max_cue_s)
        begin_ms = round((t - start) * 1000)
        out.write(f"{record['id']}\n{_vtt_time(begin_ms)} --> {_vtt_time(begin_ms + round(length * 1000))}\n"
                  f"{text}\n\n")
        written += 1
    return written


def _json_line(record: dict) -> str:
    """``record`` as one JSON line; NEL, U+2028 and U+2029 escaped so no reader splits it."""
    line = json.dumps(record, ensure_ascii=False)
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _vtt_time(ms: int) -> str:
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    seconds, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{ms:03d}"
