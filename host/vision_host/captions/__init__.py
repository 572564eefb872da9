"""One home for what the model says.

* :mod:`.event` — :class:`CaptionEvent`: one completed caption (stream, frame, times, model,
  prompt, text, latency, structured fields), created once by the stream's pipeline;
  :class:`AlertEvent`: an alert rule's edge (off → on → off), published on the same bus;
  :class:`SummaryEvent`: a periodic summary of the captions (:mod:`..history.summaries`).
* :mod:`.bus` — :class:`CaptionBus` publishes each event to every :class:`CaptionSubscriber`
  (one per run; per-stream subscribers also get their stream's timeline: ticks, gaps, the end).
* subscribers: :mod:`.tracks` (WebVTT, SubRip, JSON Lines files and a recording's subtitle
  stream), :mod:`.stats` (per-stream counts); the viewer's lives in :mod:`vision_host.viewer`.

A new subscriber is one class: subclass :class:`CaptionSubscriber`, override ``add(event)``,
and subscribe an instance where the run is wired (:mod:`vision_host.runner`).
"""

from .alerts import AlertRule, AlertRuleError, AlertRules, parse_alert_flag, parse_alert_table
from .bus import CaptionBus, CaptionSubscriber
from .event import AlertEvent, CaptionEvent, SummaryEvent, iso_utc
from .stats import CaptionCounts, CaptionStats
from .tracks import (CAPTION_FORMATS, CaptionTrack, CaptionTrackError, JsonLinesTrack, SrtTrack, SubtitleStreamTrack,
                     VttTrack, open_track)

__all__ = ["AlertEvent", "AlertRule", "AlertRuleError", "AlertRules",
           "CAPTION_FORMATS", "CaptionBus", "CaptionCounts", "CaptionEvent", "CaptionStats", "CaptionSubscriber",
           "CaptionTrack", "CaptionTrackError", "JsonLinesTrack", "SrtTrack", "SubtitleStreamTrack", "SummaryEvent",
           "VttTrack",
           "iso_utc", "open_track", "parse_alert_flag", "parse_alert_table"]
