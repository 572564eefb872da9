"""Caption tracks written while the video runs: WebVTT, SubRip or JSON Lines; subscribers of
one stream on the caption bus (:mod:`.bus`).

One thread (the stream's frame loop, through the bus) drives a track; it is not thread-safe. Per frame it calls
``track.tick(stream_time_s)`` (O(1), no I/O), ``track.add(event)`` when a caption completed,
``track.gap(t, "reconnecting")`` / ``track.resume(t)`` around a source drop, and
``track.close(end_time_s)`` at the end. WebVTT and SubRip hold one timeline: with several streams
(``CaptionEvent.stream``), open one track per stream.

Timing of WebVTT / SubRip cues (times in seconds of stream time, kept as whole ms):

* caption k's cue starts when it completed and ends when caption k+1 completes, at a
  :meth:`~CaptionTrack.gap`, at :meth:`~CaptionTrack.close`, or ``max_cue_s`` after its
  start, whichever comes first; only one cue is ever pending (its end not known yet).
* every cue lasts at least ``min_cue_s``, and cues never overlap: a caption completing less
  than ``min_cue_s`` after the previous one starts when that one's cue ends (delayed,
  never dropped or merged). So no cue has zero or negative length.
* a gap ends the pending cue; :meth:`~CaptionTrack.resume` (or the next caption, or
  ``close``) then writes a ``[reason]`` cue covering the gap. JSON Lines records both ends.
* a blank caption (nothing left after the cleaning below) makes no cue.

Crash safety: what completed is in the file when :meth:`~CaptionTrack.add` (or ``gap``,
``resume``) returns, flushed to the operating system, so a process killed at any moment
(SIGKILL included: no clean-up runs) leaves every completed caption in a file that parses. A
caption's cue is written when it completes, ending provisionally at start + ``max_cue_s`` (its
latest possible end); when its end is known, only that last cue (the file's tail) is rewritten
in place. Nothing is fsync'ed: a power loss may still lose what the OS had not written out.

Cue text: a caption is untrusted text (a model's reply). Whatever it holds, it makes exactly one
cue (or none, if blank) with the times above and no other cue, comment or header: line breaks
(CR LF, CR, LF and every other break ``str.splitlines`` knows: VT, FF, FS, GS, RS, NEL, U+2028,
U+2029) become LF, control characters other than tab are dropped, each line is stripped of
whitespace and blank lines are dropped (a blank line ends a cue in both formats), and lone
surrogates (not encodable as UTF-8) become U+FFFD. Then each format escapes what its grammar needs
(see :class:`VttTrack`, :class:`SrtTrack`); nothing else of the text is changed. JSON Lines keeps
the text as it is (lone surrogates aside).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .bus import CaptionSubscriber
from .event import CaptionEvent, iso_utc

__all__ = ["CAPTION_FORMATS", "CaptionTrack", "CaptionTrackError", "JsonLinesTrack",
           "SrtTrack", "SubtitleStreamTrack", "VttTrack", "open_track"]


class CaptionTrackError(ValueError):
    """A caption track cannot be opened as asked (unknown extension, bad durations) or is closed."""


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters (Unicode category Cc) but tab; the line breaks among them are split on first.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def clean_cue_text(text: str) -> str:
    """Cue text before the format's escaping: lines split on every line break, control
    characters but tab dropped, lines stripped, blank lines dropped, lone surrogates → U+FFFD."""
    lines = (_CONTROL.sub("", line).strip() for line in _SURROGATE.sub("\ufffd", text).splitlines())
    return "\n".join(line for line in lines if line)


_SRT_ARROW = re.compile("-{2,}>")


def _srt_text(text: str) -> str:
    """SubRip cue text: :func:`clean_cue_text`, then every run of two or more "-" followed by ">"
    written "->", so no line holds "-->" and none can be read as a timing line."""
    return _SRT_ARROW.sub("->", clean_cue_text(text))


def _json_line(record: dict) -> str:
    """``record`` as one JSON text (RFC 8259) on one line: UTF-8 as is, but lone surrogates (not
    encodable) become U+FFFD and NEL, U+2028, U+2029 are written as ``\\uXXXX`` escapes (the same
    string), so readers that split lines on them too (``str.splitlines``) see one record a line."""
    line = _SURROGATE.sub("\ufffd", json.dumps(record, ensure_ascii=False))
    return line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class CaptionTrack(CaptionSubscriber):
    """Base of the track writers; build one with :func:`open_track`. A track follows one stream
    of the caption bus (``bus.subscribe(track, stream=INDEX)``), or is driven directly.

    Args:
        path: the file to write (truncated; missing parent folders are created); None for a
            track that hands its cues elsewhere (:class:`SubtitleStreamTrack`).
        max_cue_s: longest a caption cue stays on screen (WebVTT/SubRip), seconds.
        min_cue_s: shortest cue (WebVTT/SubRip), seconds; at least 1 ms, at most ``max_cue_s``.

    Attributes:
        path: the file written (UTF-8, LF line ends), or None.
        cues_written: captions written so far (gap cues and records not counted).
    """

    def __init__(self, path: str | Path | None, *, max_cue_s: float = 10.0, min_cue_s: float = 1.0):
        if not 0.001 <= min_cue_s <= max_cue_s:
            raise CaptionTrackError(f"caption cue durations need 0.001 <= min_cue_s <= max_cue_s, "
                                    f"got min_cue_s={min_cue_s}, max_cue_s={max_cue_s}")
        self.path = None if path is None else Path(path)
        self.max_cue_ms, self.min_cue_ms = _ms(max_cue_s), _ms(min_cue_s)
        self.cues_written = 0
        self._closed = False
        self._file = None   # bytes: the offsets of the tail rewrite are byte offsets
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._write(self._header())
        self._gap: tuple[int, str] | None = None  # (start ms, reason) of an open gap

    def _header(self) -> str:
        return ""

    def _write(self, text: str) -> int:
        """Append ``text`` (UTF-8) and flush it to the OS; return the byte offset it starts at."""
        offset = self._file.tell()
        if text:
            self._file.write(text.encode("utf-8"))
            self._file.flush()
        return offset

    def _check_open(self) -> None:
        if self._closed:
            raise CaptionTrackError(f"caption track {self.path or type(self).__name__} is closed")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def add(self, event: CaptionEvent) -> None:
        """Record a completed caption (an open gap ends at its time). Raises if closed."""
        self._check_open()
        if self._gap is not None:
            self.resume(event.stream_time_s, event.wall_time)
        self._caption(event)

    def gap(self, stream_time_s: float, reason: str, wall_time: float | None = None) -> None:
        """The video stops at ``stream_time_s``: the source dropped (``reason``: "reconnecting", …).

        A second gap before :meth:`resume` is recorded in JSON Lines only.
        """
        self._check_open()
        self._gap_started(_ms(stream_time_s), stream_time_s, reason, wall_time)
        if self._gap is None:
            self._gap = (_ms(stream_time_s), reason)

    def resume(self, stream_time_s: float, wall_time: float | None = None) -> None:
        """The video is back at ``stream_time_s`` after a :meth:`gap` (no-op without one)."""
        self._check_open()
        if self._gap is not None:
            (start_ms, reason), self._gap = self._gap, None
            self._gap_ended(start_ms, reason, stream_time_s, wall_time)

    def tick(self, stream_time_s: float) -> None:
        """Called every frame: writes the pending cue once it reached ``max_cue_s``. O(1)."""

    def close(self, end_time_s: float | None = None) -> None:
        """Write what is pending (ending at ``end_time_s``, the end of the video, if given) and close.

        Idempotent. Without ``end_time_s`` a pending cue runs its full ``max_cue_s`` and an open
        gap makes no cue; with it, an open gap's cue ends there (JSON Lines: just the end record).
        """
        if not self._closed:
            self._closed = True
            try:
                self._finish(end_time_s)
            finally:
                if self._file is not None:
                    self._file.close()

    def __enter__(self) -> CaptionTrack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # What each format writes.
    def _caption(self, event: CaptionEvent) -> None: ...
    def _gap_started(self, at_ms: int, stream_time_s: float, reason: str, wall_time: float | None) -> None: ...
    def _gap_ended(self, start_ms: int, reason: str, stream_time_s: float, wall_time: float | None) -> None: ...
    def _finish(self, end_time_s: float | None) -> None: ...


class JsonLinesTrack(CaptionTrack):
    """JSON Lines (https://jsonlines.org/): one UTF-8 JSON object per line, each written and
    flushed when it happens (see :func:`_json_line` for the text: kept as it is).

    Captions: ``{"event": "caption", "stream_time_s", "wall_time"`` (ISO 8601 UTC with ms),
    ``"wall_time_unix", "frame_index", "source", "model", "latency_ms", "stream", "text"}``, plus
    ``"fields"`` (the structured answer) or ``"fields_error"`` when ``ollama-format`` asked for one.
    Gaps: ``{"event": "gap", "stream_time_s", "wall_time", "wall_time_unix", "reason"}``, then
    ``{"event": "resume", …, "reason", "gap_s", "outage_s"}`` (``gap_s``: the gap in stream time,
    0 where the video skips the outage; ``outage_s``: in wall-clock time); ``close(end_time_s)``
    adds ``{"event": "end", …}``.
    """

    _gap_wall: float | None = None

    def _record(self, event: str, stream_time_s: float, wall_time: float | None, **fields) -> None:
        wall = time.time() if wall_time is None else wall_time
        record = {"event": event, "stream_time_s": round(stream_time_s, 3), "wall_time": iso_utc(wall),
                  "wall_time_unix": round(wall, 3), **fields}
        self._write(_json_line(record) + "\n")

    def _caption(self, event: CaptionEvent) -> None:
        latency = None if event.latency_ms is None else round(event.latency_ms, 1)
        structured = {k: v for k, v in (("fields", event.fields), ("fields_error", event.fields_error))
                      if v is not None}
        self._record("caption", event.stream_time_s, event.wall_time, frame_index=event.frame_index,
                     source=event.source, model=event.model, latency_ms=latency, stream=event.stream,
                     text=event.text, **structured)
        self.cues_written += 1

    def _gap_started(self, at_ms, stream_time_s, reason, wall_time) -> None:
        if self._gap is None:
            self._gap_wall = time.time() if wall_time is None else wall_time
        self._record("gap", stream_time_s, wall_time, reason=reason)

    def _gap_ended(self, start_ms, reason, stream_time_s, wall_time) -> None:
        gap_s = max(0, _ms(stream_time_s) - start_ms) / 1000
        wall = time.time() if wall_time is None else wall_time
        outage_s = None if self._gap_wall is None else round(wall - self._gap_wall, 3)
        self._record("resume", stream_time_s, wall, reason=reason, gap_s=gap_s, outage_s=outage_s)

    def _finish(self, end_time_s: float | None) -> None:
        if end_time_s is not None:
            self._record("end", end_time_s, None)


class _TimedTrack(CaptionTrack):
    """Cue timing shared by WebVTT, SubRip and the subtitle stream (see the module docstring).

    The cue of the last caption is pending until its end is known. File tracks write it when the
    caption completes, ending at start + ``max_cue_s``, and rewrite it in place (the file's tail)
    if it ends earlier; :class:`SubtitleStreamTrack` hands each cue over once, when it ends.
    """

    def __init__(self, path: str | Path, **durations):
        super().__init__(path, **durations)
        self._pending: tuple[int, str] | None = None  # (start ms, cue text) of the last caption's cue
        self._pending_at: tuple[int, bytes] = (0, b"")  # (byte offset, bytes) of its cue in the file
        self._due_s = float("inf")  # stream time at which the pending cue reaches max_cue_s
        self._last_end_ms = 0
        self._index = 0

    def _cue_text(self, text: str) -> str:
        """The text as the format writes it (see :func:`clean_cue_text`); "" for no cue."""
        return clean_cue_text(text)

    def _cue(self, index: int, start_ms: int, end_ms: int, text: str) -> str:
        raise NotImplementedError

    def _emit(self, start_ms: int, end_ms: int, text: str) -> None:
        """Append a cue whose end is known (a gap's)."""
        self._index += 1
        self._last_end_ms = end_ms
        self._write(self._cue(self._index, start_ms, end_ms, text))

    def _open_pending(self, start_ms: int, text: str) -> None:
        """A caption completed: append its cue, ending at its latest end (start + max_cue_s)."""
        self._index += 1
        data = self._cue(self._index, start_ms, start_ms + self.max_cue_ms, text)
        self._pending_at = (self._write(data), data.encode("utf-8"))
        self.cues_written += 1

    def _close_pending(self, start_ms: int, end_ms: int, text: str) -> None:
        """The pending cue ends at ``end_ms`` (ms; at most its provisional end): rewrite it if it moved.

        The cue is the file's tail, from the byte offset it was written at. The corrected cue (the
        same bytes but the end time) is written over it from that offset and flushed, and only
        then, if shorter, the file is cut after it. Cutting first would leave a moment without the
        cue; this way a kill between the two leaves the old cue's last bytes after the new one,
        which only happens for an end time one digit shorter than the provisional one (an end
        crossing 100 h: "100:00:05.000" → "99:59:58.000") and then is one more line end.
        """
        offset, old = self._pending_at
        new = self._cue(self._index, start_ms, end_ms, text).encode("utf-8")
        if new != old:
            self._file.seek(offset)
            self._file.write(new)
            self._file.flush()
            if len(new) < len(old):
                self._file.truncate()
            self._file.seek(0, os.SEEK_END)

    def _finish_pending(self, until_ms: int | None) -> None:
        if self._pending is None:
            return
        (start, text), self._pending, self._due_s = self._pending, None, float("inf")
        end = start + self.max_cue_ms if until_ms is None else min(until_ms, start + self.max_cue_ms)
        end = max(end, start + self.min_cue_ms)
        self._last_end_ms = end
        self._close_pending(start, end, text)

    def _caption(self, event: CaptionEvent) -> None:
        text = self._cue_text(event.text)
        if text:
            at_ms = _ms(event.stream_time_s)
            self._finish_pending(at_ms)
            start = max(at_ms, self._last_end_ms)
            self._pending, self._due_s = (start, text), (start + self.max_cue_ms) / 1000
            self._open_pending(start, text)

    def tick(self, stream_time_s: float) -> None:
        """Called every frame: the pending cue's end is final once it reached ``max_cue_s`` (its
        provisional end, already written: no I/O). O(1)."""
        if stream_time_s >= self._due_s:
            self._finish_pending(None)

    def _gap_started(self, at_ms, stream_time_s, reason, wall_time) -> None:
        if self._gap is None:
            self._finish_pending(at_ms)

    def _gap_ended(self, start_ms, reason, stream_time_s, wall_time) -> None:
        start_ms, end_ms = max(start_ms, self._last_end_ms), _ms(stream_time_s)
        if end_ms > start_ms:
            self._emit(start_ms, end_ms, self._cue_text(f"[{reason}]") or "[gap]")

    def _finish(self, end_time_s: float | None) -> None:
        if self._gap is not None and end_time_s is not None:  # the video ended in the gap
            (start_ms, reason), self._gap = self._gap, None
            self._gap_ended(start_ms, reason, end_time_s, None)
        self._finish_pending(None if end_time_s is None else _ms(end_time_s))


def _timestamp(ms: int, separator: str) -> str:
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    seconds, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{separator}{ms:03d}"


class VttTrack(_TimedTrack):
    """WebVTT per the W3C spec (https://www.w3.org/TR/webvtt1/): ``WEBVTT`` header, cues
    ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` (hours: two digits or more) each followed by a blank line,
    UTF-8, LF line ends.

    Cue text: :func:`clean_cue_text`, then ``&``, ``<``, ``>`` written as the character references
    ``&amp;``, ``&lt;``, ``&gt;`` ("WebVTT cue text": "&" and "<" may not appear otherwise; the
    cue payload may hold neither "-->" nor a blank line, "WebVTT file structure"). So a reply
    cannot form markup (tags, timestamps, entities), a timing line or the end of a cue, and shows
    every other character as sent; lines starting ``NOTE``, ``STYLE`` or ``REGION`` are plain text
    inside a cue.
    """

    def _header(self) -> str:
        return "WEBVTT\n\n"

    def _cue_text(self, text: str) -> str:
        return clean_cue_text(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def _cue(self, index: int, start_ms: int, end_ms: int, text: str) -> str:
        return f"{_timestamp(start_ms, '.')} --> {_timestamp(end_ms, '.')}\n{text}\n\n"


class SrtTrack(_TimedTrack):
    """SubRip (.srt): cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the text, then a
    blank line; UTF-8, LF line ends.

    SubRip has no formal specification; readers (FFmpeg's demuxer, pysrt, players) end a cue at a
    blank line, and some (FFmpeg) start one at any line holding a timing line. Nor has it any
    escaping: cue text is :func:`_srt_text` (no blank line, and no "-->": a run of "-" ending in
    ">" is written "->"), else as sent. Players may read ``<i>``-like tags in it.
    """

    def _cue_text(self, text: str) -> str:
        return _srt_text(text)

    def _cue(self, index: int, start_ms: int, end_ms: int, text: str) -> str:
        return f"{index}\n{_timestamp(start_ms, ',')} --> {_timestamp(end_ms, ',')}\n{text}\n\n"


#: Extensions accepted by :func:`open_track` and their writers.
CAPTION_FORMATS: dict[str, type[CaptionTrack]] = {".vtt": VttTrack, ".srt": SrtTrack, ".jsonl": JsonLinesTrack}


def open_track(path: str | Path, *, max_cue_s: float = 10.0, min_cue_s: float = 1.0) -> CaptionTrack:
    """Open a caption track at ``path``, its format chosen by the extension (case-insensitive).

    Raises:
        CaptionTrackError: the extension is not ``.vtt``, ``.srt`` or ``.jsonl``, or the
            durations are invalid. OSError: the file cannot be created.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in CAPTION_FORMATS:
        raise CaptionTrackError(f"cannot tell the caption format of {str(path)!r}: "
                                f"name the file .vtt (WebVTT), .srt (SubRip) or .jsonl (JSON Lines)")
    return CAPTION_FORMATS[suffix](path, max_cue_s=max_cue_s, min_cue_s=min_cue_s)


class SubtitleStreamTrack(_TimedTrack):
    """Cues timed as in :class:`VttTrack`, sent to a recording's subtitle stream instead of a
    file: ``add_subtitle(start_s, end_s, text)`` (e.g. ``RecordingOutput.add_subtitle``), once
    per cue, when its end is known (a muxer takes no correction). The text is SubRip's
    (:func:`_srt_text`): Matroska stores the stream as SubRip, which tools extract to .srt as it is.
    """

    def __init__(self, add_subtitle, *, max_cue_s: float = 10.0, min_cue_s: float = 1.0):
        self._add_subtitle = add_subtitle
        super().__init__(None, max_cue_s=max_cue_s, min_cue_s=min_cue_s)

    def _cue_text(self, text: str) -> str:
        return _srt_text(text)

    def _emit(self, start_ms: int, end_ms: int, text: str) -> None:
        self._last_end_ms = end_ms
        self._add_subtitle(start_ms / 1000, end_ms / 1000, text)

    def _open_pending(self, start_ms: int, text: str) -> None:
        pass

    def _close_pending(self, start_ms: int, end_ms: int, text: str) -> None:
        self.cues_written += 1
        self._add_subtitle(start_ms / 1000, end_ms / 1000, text)
