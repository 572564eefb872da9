"""The frame loop: source → processors → outputs, with its metrics and status line.

One thread runs the loop. Nothing in it waits on the network: processors talk to vision
servers through the runtime's non-blocking fetch interface. The summary written by
``--stats`` uses the keys documented in the README (``frames_in``, ``max_frame_gap_ms``, …).
"""

from __future__ import annotations

import bisect
import json
import logging
import resource
import threading
import time
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from .captions import CaptionBus, CaptionEvent, CaptionStats
from .captions.structured import FormatError, StructuredFormat
from .outputs import Output
from .runtime import Processor, Runtime
from .sources import Source

log = logging.getLogger("vision_host.pipeline")

#: Upper bounds (s, inclusive) of the frame-gap histogram's buckets (:attr:`Pipeline.gap_counts`;
#: Prometheus' ``vision_host_frame_gap_seconds``): 1/200 s up to 10 s, one more bucket beyond.
FRAME_GAP_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _percentile(values, q: float) -> float | None:
    return round(float(np.percentile(np.fromiter(values, float), q)), 1) if values else None


def rss_bytes() -> int:
    """Resident set size of this process in bytes (current, from /proc; peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Pipeline:
    """Runs frames from ``source`` through ``processors`` into ``outputs``.

    Args:
        source: where frames come from (H×W×3 uint8 BGR).
        processors: the chain, in order.
        outputs: every output gets every frame leaving the chain.
        runtime: the runtime the processors belong to (for caption statistics).
        status: stream for the one-line status (None or not a terminal: silent).
        caption_bus: the run's caption bus (:class:`.captions.CaptionBus`; None: one of its own).
            Each completed caption (a new ``captions/caption`` in the processor store) is
            published on it once as a :class:`.captions.CaptionEvent`, and this stream's
            timeline (every frame, the source's outages, the end) goes to the subscribers of
            this stream. Its times are the output video's (frames written / the source's fps),
            so outages take no time in it.
        model: the model named in caption events when the processor does not store one as
            ``captions/model`` (the ``ollama`` processor does).
        stream: the stream these processors belong to (default: the runtime's stream 0); its
            processor store and caption statistics are the ones read here.
        drain_s: when a source that is not live (a video file) ends or ``max_frames`` is
            reached, caption requests still in flight get up to this long (s) to complete: no
            new request starts (``ollama-paused`` is set meanwhile), the processors keep being
            called on a copy of the last frame so they take in the replies (nothing is written,
            nothing counted as a frame), and the captions are published as usual, so they reach
            the caption track, the history and the sinks. 0: the run ends at once.

    Attributes:
        caption_stats: this stream's caption counts (:class:`.captions.CaptionStats`, a
            subscriber of the bus).
    """

    def __init__(self, source: Source, processors: list[Processor], outputs: list[Output],
                 runtime: Runtime, status: TextIO | None = None, caption_bus: CaptionBus | None = None,
                 model: str | None = None, stream=None, drain_s: float = 0.0):
        self.source = source
        self.drain_s = drain_s
        self.stream = stream or runtime.streams[0]
        self.processors = processors
        self.outputs = outputs
        self.runtime = runtime
        self.status = status if status is not None and status.isatty() else None
        self.stop_event = threading.Event()
        self.frames_in = 0
        self.frames_out = 0
        self.max_gap_s = 0.0
        #: Wall-clock gap between the last two frames leaving the chain (s), None before two.
        self.last_gap_s: float | None = None
        #: time.time() when the first frame left the chain (start-up measurements), else None.
        self.first_frame_unix: float | None = None
        self.started = 0.0
        self.ended = 0.0
        self._last_out: float | None = None
        #: Frame gaps counted per bucket of :data:`FRAME_GAP_BUCKETS_S` (not cumulative; the last
        #: entry: above 10 s), and their sum in s; one list increment per frame (read by
        #: :mod:`.metrics` at scrape time).
        self.gap_counts = [0] * (len(FRAME_GAP_BUCKETS_S) + 1)
        self.gap_sum_s = 0.0
        self._status_due = 0.0
        self.rss_start = rss_bytes()
        self.caption_bus = caption_bus if caption_bus is not None else CaptionBus()
        self.caption_stats = CaptionStats()   # subscribed for each run (the end of a run closes its stream's subscribers)
        self.model = model
        self._store_version = self.stream.processor_store.version
        self._last_caption: str | None = None
        self._format_value = ""         # the ollama/format last seen, and what it became
        self._format: StructuredFormat | FormatError | None = None
        self._captions_completed = 0
        self._in_gap = False
        self._last_frame: np.ndarray | None = None
        #: ``(frame, time.monotonic())``: the newest source frame before the processors (a copy,
        #: H×W×3 uint8 BGR), or None. Copied only until :attr:`input_wanted_until` (a
        #: ``time.monotonic()`` time a reader sets, the MCP server's ``images://input``): a
        #: processor may draw into the source's frame in place, so without a copy the input is
        #: lost, and nobody pays for the copy while nobody reads it.
        self.last_input: tuple[np.ndarray, float] | None = None
        self.input_wanted_until = 0.0
        self._gap_frame: np.ndarray | None = None
        self._gap_shown = 0.0

    @property
    def last_frame_at(self) -> float | None:
        """``time.perf_counter()`` when the last frame left the chain (None before the first)."""
        return self._last_out

    def stop(self) -> None:
        """Ask the loop to finish after the current frame (thread-safe)."""
        self.stop_event.set()

    def run(self, max_frames: int | None = None) -> dict:
        """Run until the source ends, ``max_frames`` frames, :meth:`stop`, or a closed window.

        Returns the statistics dict (see :meth:`summary`).
        """
        self.started = time.perf_counter()
        self.caption_bus.subscribe(self.caption_stats, stream=self.stream.index)
        try:
            while not self.stop_event.is_set():
                if max_frames is not None and self.frames_in >= max_frames:
                    break
                frame = self.source.read()
                if frame is None:
                    if self.source.ended or not self.source.live:
                        break
                    self._show_gap()   # reconnecting: tell the viewers, keep processors and outputs
                    continue
                if self._in_gap:
                    self._in_gap = False
                    self._gap_frame = None
                    self.caption_bus.resume(self.stream.index, self.frames_out / self.source.fps)
                self.frames_in += 1
                self.stream.next_frame()
                if self.input_wanted_until and time.monotonic() < self.input_wanted_until:
                    self.last_input = (frame.copy(), time.monotonic())
                for processor in self.processors:
                    frame = processor.process(frame)
                now = time.perf_counter()
                if self._last_out is not None:
                    self.last_gap_s = now - self._last_out
                    self.max_gap_s = max(self.max_gap_s, self.last_gap_s)
                    self.gap_counts[bisect.bisect_left(FRAME_GAP_BUCKETS_S, self.last_gap_s)] += 1
                    self.gap_sum_s += self.last_gap_s
                self._last_out = now
                for output in self.outputs:
                    output.write(frame)
                self._last_frame = frame
                if not self.frames_out:
                    self.first_frame_unix = time.time()
                self.frames_out += 1
                if self.stream.processor_store.version != self._store_version:
                    self._caption_check()
                self.caption_bus.tick(self.stream.index, self.frames_out / self.source.fps)
                if any(getattr(o, "closed", False) for o in self.outputs):
                    break
                if self.status is not None and now >= self._status_due:
                    self._status_due = now + 0.5
                    self._print_status(now)
            self.ended = time.perf_counter()    # the video's time: a drain below is not in it
            if self.drain_s > 0 and not self.stop_event.is_set() and not self.source.live \
                    and not any(getattr(o, "closed", False) for o in self.outputs):
                self.drain_captions(self.drain_s)
        finally:
            self.ended = self.ended or time.perf_counter()
            self.caption_bus.end_stream(self.stream.index, self.frames_out / self.source.fps)
            if self.status is not None:
                self.status.write("\r\x1b[2K")
                self.status.flush()
        return self.summary()

    def _requests_in_flight(self) -> int:
        """Requests the stream's processors started and have not taken in yet."""
        return sum(p.ctx.fetch.in_flight for p in self.processors
                   if not getattr(p, "disabled", False) and getattr(getattr(p, "ctx", None), "fetch", None))

    def drain_captions(self, limit_s: float) -> None:
        """See ``drain_s`` in the class docstring: wait up to ``limit_s`` s (or a :meth:`stop`)
        for the requests in flight, with no new one started."""
        if self._last_frame is None or not self._requests_in_flight():
            return
        paused = self.stream.config_snapshot().get("ollama-paused", "")
        self.stream.set_config({"ollama-paused": "true"})
        deadline = time.monotonic() + limit_s
        try:
            while self._requests_in_flight() and time.monotonic() < deadline and not self.stop_event.is_set():
                frame = self._last_frame.copy()
                for processor in self.processors:
                    frame = processor.process(frame)
                if self.stream.processor_store.version != self._store_version:
                    self._caption_check()
                self.stop_event.wait(0.02)     # the replies arrive on worker threads; poll 50 times a second
        finally:
            self.stream.set_config({"ollama-paused": paused})

    def _caption_check(self) -> None:
        """The processor store changed: a new ``captions/caption`` is published as a caption event."""
        self._store_version = self.stream.processor_store.version
        text = self.stream.processor_store.get("captions", "caption")
        fs = self.stream.fetch_stats     # two counters, read one at a time: no copy of its lists here
        completed = fs.completed
        if text is None or (text == self._last_caption and completed == self._captions_completed):
            return
        self._last_caption, self._captions_completed = text, completed
        store = self.stream.processor_store
        fields, fields_error = self._structured(store.get("ollama", "format") or "", text)
        self.caption_bus.publish(CaptionEvent(
            text=text, stream_time_s=self.frames_out / self.source.fps, wall_time=time.time(),
            frame_index=self.frames_out - 1, source=self.source.name,
            model=store.get("captions", "model") or self.model, latency_ms=fs.last_latency_ms,
            stream=self.stream.index, stream_name=self.stream.name, prompt=store.get("ollama", "prompt"),
            fields=fields, fields_error=fields_error,
            frame=self._last_frame.copy() if self.caption_bus.frames_wanted and self._last_frame is not None else None))

    def _structured(self, format_value: str, text: str) -> tuple[dict | None, str | None]:
        """``text`` as a structured answer when the processor asked for one (its ``ollama/format``
        in force: ``json`` or a schema; see :mod:`.captions.structured`), else ``(None, None)``."""
        if not format_value:
            return None, None
        if format_value != self._format_value:    # first use, or changed while running (the viewer)
            self._format_value = format_value
            try:
                self._format = StructuredFormat(format_value)
            except FormatError as exc:
                self._format = exc
        if isinstance(self._format, FormatError):
            return None, str(self._format)
        return self._format.parse(text)

    def _show_gap(self) -> None:
        """While a live source reconnects: the last frame with a "reconnecting" band, to the
        live outputs (MJPEG, window) twice a second; files get nothing (no frame is invented)."""
        now = time.perf_counter()
        if not self._in_gap:
            self._in_gap = True
            self.caption_bus.gap(self.stream.index, self.frames_out / self.source.fps, self.source.state)
        if self.status is not None and now >= self._status_due:
            self._status_due = now + 0.5
            self._print_status(now)
        if self._last_frame is None or now - self._gap_shown < 0.5:
            return
        self._gap_shown = now
        if self._gap_frame is None:
            self._gap_frame = self._last_frame.copy()
            h, w = self._gap_frame.shape[:2]
            band = max(24, h // 12)
            cv2.rectangle(self._gap_frame, (0, 0), (w, band), (0, 0, 160), -1)
            text = f"reconnecting to {self.source.name} ..."
            cv2.putText(self._gap_frame, text, (8, int(band * 0.7)), cv2.FONT_HERSHEY_SIMPLEX,
                        band / 40, (255, 255, 255), max(1, band // 20), cv2.LINE_AA)
        for output in self.outputs:
            if output.live_view:
                output.write(self._gap_frame)

    def _print_status(self, now: float) -> None:
        line = self.status_text(now)
        self.status.write("\r\x1b[2K" + line[: 200])
        self.status.flush()

    def status_text(self, now: float | None = None, short: bool = False) -> str:
        """The status line: fps, frames, captions, last caption latency and last error
        (``short``: the stream's name, fps and captions, for one stream of several)."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.started, 1e-9) if self.started else 1e-9
        captions = self.caption_stats.snapshot()
        if short:
            state = "" if self.source.state == "live" else f" {self.source.state.upper()}"
            return f"{self.stream.name}: {self.frames_out / elapsed:4.1f} fps {captions.completed} captions{state}"
        parts = [f"{self.frames_out / elapsed:5.1f} fps", f"{self.frames_out} frames",
                 f"{captions.completed} captions"]
        if self.source.state != "live":
            parts.insert(0, self.source.state.upper())
        if captions.last_latency_ms is not None:
            parts.append(f"last caption {captions.last_latency_ms / 1000:.1f} s")
        errors = [f"{p.name}: {p.last_error}" for p in self.processors if p.last_error]
        server_error = self.stream.fetch_stats.last_error    # one counter: no snapshot needed
        if server_error:
            errors.append(f"server: {server_error}")
        if errors:
            parts.append("last error: " + errors[-1])
        return " | ".join(parts)

    def summary(self) -> dict:
        """Statistics of the run so far.

        Keys: ``stream`` (its name), ``source`` (the source, password redacted), ``frames_in``,
        ``frames_out``, ``frames_dropped`` (live sources), ``frames_undecodable`` (frames of a
        damaged file that could not be decoded and were skipped, a missing tail included; 0 for
        live sources), ``source_error`` (a sentence when the file could not be read to its end,
        e.g. truncated, or a recording whose connection was lost; else None), ``duration_s``,
        ``reconnects``,
        ``source_state`` (live sources: how often the stream came back, and
        ``live``/``reconnecting``/``ended``), ``reconnect_gaps_s`` (how long each reconnection
        took), ``fps``, ``max_frame_gap_ms`` (largest wall-clock gap between consecutive frames
        leaving the chain), ``processors`` (per name: ``calls``, ``mean_us``, ``p99_us``,
        ``errors``, ``disabled``, ``memory_bytes``), ``captions`` (``completed``, ``last`` and
        ``invalid`` (structured answers that were not: see ``ollama-format``): the captions
        published on the caption bus, :attr:`caption_stats`; from the processors'
        requests to the vision server, :class:`.runtime.fetch.FetchStats`: ``started``,
        ``failed``, ``latency_ms_p50``, ``latency_ms_p95``, ``wait_ms_p50`` and ``wait_ms_max``
        (ms a frame request waited for its turn at the vision server, see
        :class:`.runtime.fetch.FairShare`); from the ``ollama`` processor's counters in the
        processor store: ``requests_by_trigger`` (``{"interval": n, "change": n, "heartbeat":
        n}``: the requests it started, by what started them, see ``ollama-trigger``) and
        ``frames_unchanged`` (frames its change check found unchanged; 0 when absent)),
        ``first_frame_unix`` (when the first frame
        left the chain, Unix time in s), ``rss_bytes_start``, ``rss_bytes_end``.
        """
        end = self.ended or time.perf_counter()
        duration = max(end - self.started, 1e-9) if self.started else 0.0
        processors: dict[str, dict] = {}
        for p in self.processors:
            key = p.name
            n = 2
            while key in processors:
                key, n = f"{p.name}#{n}", n + 1
            processors[key] = {**p.stats.summary(), "disabled": p.disabled, "memory_bytes": p.memory_bytes}
        captions = self.caption_stats.snapshot()
        fs = self.stream.fetch_stats.snapshot()
        latencies = list(fs.latencies_ms)
        waits = list(fs.waits_ms)
        store = self.stream.processor_store

        def ollama_count(key: str) -> int:
            value = store.get("ollama-stats", key)
            try:
                return int(value) if value is not None else 0
            except ValueError:
                return 0
        return {
            "stream": self.stream.name,
            "source": self.source.name,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "frames_dropped": self.source.frames_dropped,
            "frames_undecodable": getattr(self.source, "frames_undecodable", 0),
            "source_error": getattr(self.source, "source_error", None),
            "reconnects": self.source.reconnects,
            "source_state": self.source.state,
            "reconnect_gaps_s": [round((end or time.monotonic()) - start, 3)
                                 for start, end in getattr(self.source, "gaps", [])],
            "duration_s": round(duration, 3),
            "fps": round(self.frames_out / duration, 2) if duration else 0.0,
            "max_frame_gap_ms": round(self.max_gap_s * 1000, 1),
            "processors": processors,
            "captions": {
                "started": fs.started,
                "completed": captions.completed,
                "failed": fs.failed,
                "latency_ms_p50": _percentile(latencies, 50),
                "latency_ms_p95": _percentile(latencies, 95),
                "wait_ms_p50": _percentile(waits, 50),
                "wait_ms_max": round(max(waits), 1) if waits else None,
                "invalid": captions.invalid,
                "requests_by_trigger": {t: ollama_count(f"requests-{t}") for t in ("interval", "change", "heartbeat")},
                "frames_unchanged": ollama_count("frames-unchanged"),
                "last": captions.last,
            },
            "first_frame_unix": self.first_frame_unix,
            "rss_bytes_start": self.rss_start,
            "rss_bytes_end": rss_bytes(),
        }


def write_stats(path: Path, stats: dict) -> None:
    """Write ``stats`` as indented JSON to ``path`` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2) + "\n")


def format_summary(stats: dict) -> str:
    """A few human-readable lines summarising ``stats`` for the end of a run (with a line for
    ``frames_undecodable`` when non-zero and one for ``source_error`` when set; the captions
    line says what started the requests when ``ollama-trigger=change`` was used)."""
    lines = [f"{stats['frames_out']} frames in {stats['duration_s']:.1f} s ({stats['fps']:.1f} fps), "
             f"largest gap between frames {stats['max_frame_gap_ms']:.0f} ms"]
    if stats.get("frames_undecodable"):
        lines.append(f"  source: {stats['frames_undecodable']} frames could not be decoded and were skipped")
    if stats.get("source_error"):
        lines.append(f"  source error: {stats['source_error']}")
    for name, p in stats["processors"].items():
        state = " (disabled)" if p["disabled"] else ""
        lines.append(f"  processor {name}: {p['calls']} calls, mean {p['mean_us']:.0f} µs, p99 {p['p99_us']:.0f} µs, "
                     f"{p['errors']} errors{state}")
    c = stats["captions"]
    if c["started"]:
        lat = f", latency p50 {c['latency_ms_p50']:.0f} ms" if c["latency_ms_p50"] is not None else ""
        by = c.get("requests_by_trigger") or {}
        trig = ""
        if by.get("change") or by.get("heartbeat") or c.get("frames_unchanged"):
            trig = (f"; requests: {by.get('change', 0)} on change, {by.get('heartbeat', 0)} heartbeat, "
                    f"{by.get('interval', 0)} interval, {c.get('frames_unchanged', 0)} unchanged frames skipped")
        lines.append(f"  captions: {c['completed']} completed, {c['failed']} failed{lat}{trig}")
        if c["last"]:
            lines.append(f"  last caption: {c['last']}")
    return "\n".join(lines)


__all__ = ["FRAME_GAP_BUCKETS_S", "Pipeline", "format_summary", "rss_bytes", "write_stats"]
