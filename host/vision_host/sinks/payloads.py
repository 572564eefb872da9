"""The JSON shape of the events sinks deliver, defined once: :func:`event_json`.

A caption event (:class:`~vision_host.captions.CaptionEvent`)::

    {"id": "6f1c…",                 # the message id (receivers dedupe on it; same on every retry)
     "type": "caption",
     "stream": 0,                   # stream index
     "stream_name": "door",         # or null
     "time": "2026-12-01T15:01:22.123Z",   # when it completed, ISO 8601 UTC, milliseconds
     "text": "a person at the door",       # the model's reply (untrusted text)
     "fields": {"person": true},    # the structured answer, or null
     "fields_error": null,          # why a reply meant to be structured is not, or null
     "model": "llava",              # or null
     "latency_ms": 812.4,           # request to completion, or null
     "prompt": "What is happening?",       # or null
     "frame_index": 1234,           # frame it completed on (0 = first written)
     "stream_time_s": 41.367}       # seconds of output video at completion

An alert event (:class:`~vision_host.captions.AlertEvent`)::

    {"id": "…", "type": "alert", "stream": 0, "stream_name": "door",
     "time": "2026-12-01T15:01:24.000Z",   # when the edge happened
     "name": "person",              # the rule's name
     "state": "ON",                 # "ON" or "OFF", the state entered
     "reason": "held for 2 s",
     "expression": "fields.person",
     "caption": {…} | null}         # the caption that caused the edge: the caption object
                                    # above without "id" (it was its own message), or null

A summary event (:class:`~vision_host.captions.SummaryEvent`, :mod:`..history.summaries`)::

    {"id": "…", "type": "summary",
     "name": "hourly",              # the [[summary]] table's name
     "streams": ["door"],           # the streams it covers; [] = every stream
     "since": "2026-12-01T14:00:00.000Z", "until": "2026-12-01T15:00:00.000Z",   # the window
     "time": "2026-12-01T15:00:00.000Z",    # when it was made (= until)
     "text": "A car parked; two people walked past.",   # the model's summary (untrusted text)
     "moments": [{"time": "2026-12-01T14:05:12.000Z", "text": "a car parks"}],   # time may be null
     "model": "llava", "caption_count": 1200,
     "dropped": 0}                  # captions left out: the window held more than max-captions

Numbers that are not finite (NaN, infinity) become null, so every payload is strict JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from ..captions.event import AlertEvent, CaptionEvent, SummaryEvent, iso_utc

__all__ = ["dumps", "event_bytes", "event_json"]


def event_json(event: CaptionEvent | AlertEvent | SummaryEvent, message_id: str | None = None) -> dict:
    """``event`` as the JSON object above (a dict of JSON types); ``message_id`` is its ``id``
    (the event's own :attr:`~.CaptionEvent.id` when None).

    Raises:
        TypeError: ``event`` is not a CaptionEvent, an AlertEvent or a SummaryEvent.
    """
    message_id = message_id or event.id
    if isinstance(event, CaptionEvent):
        return {"id": message_id, **_caption(event)}
    if isinstance(event, AlertEvent):
        return {"id": message_id, "type": "alert", "stream": event.stream, "stream_name": event.stream_name,
                "time": event.wall_time_iso, "name": event.name, "state": event.state, "reason": event.reason,
                "expression": event.expression,
                "caption": _caption(event.caption) if event.caption is not None else None}
    if isinstance(event, SummaryEvent):
        return {"id": message_id, "type": "summary", "name": event.name, "streams": list(event.streams),
                "since": iso_utc(event.since), "until": iso_utc(event.until), "time": event.wall_time_iso,
                "text": event.text,
                "moments": [{"time": None if t is None or not math.isfinite(t) else iso_utc(t), "text": text}
                            for t, text in event.moments],
                "model": event.model, "caption_count": event.caption_count, "dropped": event.dropped}
    raise TypeError(f"event_json takes a CaptionEvent, an AlertEvent or a SummaryEvent, not {type(event).__name__}")


def event_bytes(event: CaptionEvent | AlertEvent | SummaryEvent, message_id: str | None = None) -> bytes:
    """:func:`event_json` serialized: compact UTF-8 JSON (what sinks put in the outbox)."""
    return dumps(event_json(event, message_id))


def dumps(obj) -> bytes:
    """``obj`` (JSON types) as compact UTF-8 JSON bytes; text that is not valid Unicode (lone
    surrogates) is written as ``\\u`` escapes instead of failing."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def _caption(event: CaptionEvent) -> dict:
    """The caption object without its id."""
    return {"type": "caption", "stream": event.stream, "stream_name": event.stream_name,
            "time": event.wall_time_iso, "text": event.text, "fields": _plain(event.fields),
            "fields_error": event.fields_error, "model": event.model,
            "latency_ms": _number(event.latency_ms, 1), "prompt": event.prompt,
            "frame_index": event.frame_index, "stream_time_s": _number(event.stream_time_s, 3)}


def _number(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _plain(value):
    """A structured answer as plain JSON types (mappings → dicts, tuples → lists, non-finite → null)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
