"""What the model said, once: :class:`CaptionEvent`, created when a caption completes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone

__all__ = ["AlertEvent", "CaptionEvent", "SummaryEvent", "iso_utc"]


@dataclass(frozen=True)
class CaptionEvent:
    """One completed caption, as every subscriber of the caption bus receives it.

    Created once per caption by the stream's :class:`.pipeline.Pipeline`, on its frame loop,
    when the processors store a new ``captions/caption``; never changed afterwards.

    Attributes:
        text: the caption (a model's reply: untrusted, may hold newlines, any characters).
        stream_time_s: position in the output video when it completed, seconds from the first
            frame (frames written / the source's fps, so source outages take no time in it).
        wall_time: when it completed, seconds since the epoch (``time.time()``).
        frame_index: index of the frame it completed on (0 = first frame written).
        source: the video source (``-s`` value, password redacted).
        model: the model that wrote it, if known (``captions/model`` or ``ollama-model``).
        latency_ms: request-to-completion time of the request that produced it, ms, if known.
        stream: index of the video stream (camera) it belongs to; 0 for a single source.
        stream_name: that stream's name (``--stream NAME=URL``, the ``[[stream]]`` table), if known.
        prompt: the prompt it answers (``ollama-prompt``), if known.
        fields: the structured answer (the reply parsed as a JSON object and, with a schema,
            validated: :mod:`.structured`) when ``ollama-format`` asks for one, else None.
        fields_error: why a reply that should have been structured is not (not JSON, not an
            object, or the first schema violation); None otherwise. The text is kept either way.
        id: this event's identifier, unique (a uuid4 in hex): every sink sends it as the
            event's ``id``, so the webhooks and the broker name one caption alike
            and a receiver recognises a re-sent one.
        frame: the frame the caption completed on, as the outputs got it (H×W×3 uint8 BGR, the
            overlay drawn), a copy owned by the event: read it, never write it. Only when a
            subscriber of the bus asked for frames (:attr:`.CaptionSubscriber.wants_frames`),
            else None. Encode it (JPEG) on the subscriber's own thread, not in ``add``.
    """

    text: str
    stream_time_s: float
    wall_time: float
    frame_index: int
    source: str
    model: str | None = None
    latency_ms: float | None = None
    stream: int = 0
    stream_name: str | None = None
    prompt: str | None = None
    fields: Mapping | None = None
    fields_error: str | None = None
    frame: Any = field(default=None, repr=False, compare=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def wall_time_iso(self) -> str:
        """:attr:`wall_time` as ISO 8601 UTC with milliseconds, e.g. ``2026-12-01T15:01:22.123Z``."""
        return iso_utc(self.wall_time)


@dataclass(frozen=True)
class AlertEvent:
    """An alert rule changed state on one stream (an edge of its off → on → off machine).

    Created by the alert rules (:mod:`.alerts`) and published on the caption bus
    (:meth:`.CaptionBus.publish_alert`), so every sink that receives captions receives alert
    edges the same way (:meth:`.CaptionSubscriber.alert`).

    Attributes:
        name: the rule's name (``[[alert]] name``, ``--alert NAME=EXPR``).
        state: ``"ON"`` or ``"OFF"``, the state entered.
        stream: index of the stream it concerns.
        stream_name: that stream's name, if known.
        wall_time: when the edge happened, seconds since the epoch.
        reason: why, in words (e.g. ``"held for 2 s"``, ``"cleared after 30 s without a match"``).
        caption: the caption event whose evaluation caused the edge, if one did (None for an
            edge made by a timer, such as ``clear-after-s``).
        expression: the rule's condition as written.
        id: this edge's identifier, unique (a uuid4 in hex), as :attr:`CaptionEvent.id`.
    """

    name: str
    state: str
    stream: int
    stream_name: str | None
    wall_time: float
    reason: str
    caption: CaptionEvent | None = None
    expression: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def wall_time_iso(self) -> str:
        """:attr:`wall_time` as ISO 8601 UTC with milliseconds (see :func:`iso_utc`)."""
        return iso_utc(self.wall_time)


@dataclass(frozen=True)
class SummaryEvent:
    """A periodic summary of what the cameras saw (a ``[[summary]]`` table's schedule).

    Created by :class:`.history.summaries.PeriodicSummaries` on its own thread and published
    on the caption bus (:meth:`.CaptionBus.publish_summary`), so the sinks receive it as they
    receive alert edges (:meth:`.CaptionSubscriber.summary`).

    Attributes:
        name: the schedule's name (``[[summary]] name``, default ``"summary"``).
        streams: the stream names (or indices, as text) it covers; empty: every stream.
        since, until: the window summarised, seconds since the epoch (``until`` is when it ended).
        text: the summary (a model's reply: untrusted text).
        moments: the notable moments, ``(wall time in seconds since the epoch or None when the
            model's time matched none in the window, what happened)``, in the model's order.
        model: the model that wrote it.
        caption_count: the captions summarised.
        sinks: where it goes: a subset of ``"mqtt"``, ``"webhook"``.
        dropped: captions of the window left out because it held more than its
            ``max-captions`` (the oldest went first).
        id: this event's identifier, unique (a uuid4 in hex), as :attr:`CaptionEvent.id`.
    """

    name: str
    streams: tuple[str, ...]
    since: float
    until: float
    text: str
    moments: tuple[tuple[float | None, str], ...] = ()
    model: str | None = None
    caption_count: int = 0
    sinks: frozenset[str] = frozenset({"mqtt", "webhook"})
    dropped: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    @property
    def wall_time_iso(self) -> str:
        """:attr:`until` as ISO 8601 UTC with milliseconds (see :func:`iso_utc`)."""
        return iso_utc(self.until)


def iso_utc(unix_s: float) -> str:
    """``unix_s`` (seconds since the epoch) as ISO 8601 / RFC 3339 UTC with milliseconds and a
    ``Z`` suffix, e.g. ``2026-12-01T15:01:22.123Z``."""
    return datetime.fromtimestamp(unix_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
