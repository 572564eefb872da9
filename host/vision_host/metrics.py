"""Prometheus ``/metrics`` and the orchestrators' ``/healthz`` and ``/readyz``.

``vision-host run -o mjpeg`` serves them on the viewer's server (:func:`metrics_routes`, added
to :attr:`.viewer.Viewer.extra_routes` before it starts); ``vision-host serve`` serves
``/metrics`` (:func:`add_serve_metrics`). Each run and each served app has its own
:class:`prometheus_client.CollectorRegistry` (never the library's global one), so several runs
in one process, and tests, do not collide.

Nothing is counted for the metrics alone except the frame-gap buckets of
:class:`.pipeline.Pipeline` (one list increment per frame, about 0.2 µs): the collectors read,
at scrape time, the counters the run keeps anyway (the pipelines' summaries, the processors'
:class:`.runtime.processor.ProcessorStats`, the streams' :class:`.runtime.fetch.FetchStats`, the
``ollama`` processor's ``ollama-stats`` counters, the event sinks' health, the serve
scheduler's counters). Histograms whose source keeps only its newest samples (processor call
durations and caption latencies: the newest 4096; fair-share waits: 4096; serve batch sizes:
1000) are built by the collector from the samples that arrived since the previous scrape; when
more arrived than are kept, the older ones are missing from the buckets (the ``_total``
counters stay exact, and ``vision_host_histogram_samples_missed_total`` counts them).

The exposition format is Prometheus text 0.0.4 (``text/plain; version=0.0.4; charset=utf-8``,
https://prometheus.io/docs/instrumenting/exposition_formats/). Names are ``vision_host_…`` with
the unit in the name (``_seconds``, ``_total``); labels ``stream`` (the stream's name),
``processor``, ``trigger``, ``outcome``, ``sink`` (with ``target``), ``api``.

Access: ``/metrics`` passes the viewer's access rules like every other route (send the token as
``Authorization: Bearer T``, Prometheus' ``authorization`` setting). ``/healthz`` and ``/readyz``
answer without the token (probes rarely carry one; the Host rule still applies): without it
they say only ``{"status": …}``; with it (or on a server without a token) ``/readyz`` also says
which stream is not ready and why.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .webapp import json_response

__all__ = ["CONTENT_TYPE", "DEFAULT_READY_WITHIN_S", "Readiness", "RunCollector", "ServeCollector",
           "ServeRequestCounter", "add_serve_metrics", "metrics_routes", "run_registry"]

#: The ``Content-Type`` of ``/metrics``: Prometheus text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: ``/readyz``: a stream that delivered no frame for this many seconds is not ready.
DEFAULT_READY_WITHIN_S = 10.0
_MAX_READY_WITHIN_S = 86_400.0

#: Bucket upper bounds (s) of the histograms built here.
PROCESSOR_CALL_BUCKETS_S = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25)
CAPTION_LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
CAPTION_WAIT_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_SOURCE_STATES = ("connecting", "live", "reconnecting", "ended")
_TRIGGERS = ("interval", "change", "heartbeat")


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs from per-bucket ``counts`` (one more than ``bounds``: +Inf)."""
    out, total = [], 0
    for bound, n in zip((*bounds, math.inf), counts, strict=True):
        total += n
        out.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
    return out


class _Binned:
    """A cumulative histogram fed from a source that keeps only its newest samples.

    Args:
        bounds: the buckets' upper bounds (inclusive), ascending.
    """

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.seen = 0
        self.missed = 0

    def feed(self, total: int, newest: Sequence[float], scale: float = 1.0) -> None:
        """The source has had ``total`` samples so far; ``newest`` are its newest, oldest first
        (each times ``scale`` is in the histogram's unit). Bins those not seen before."""
        new = total - self.seen
        if new <= 0:
            return
        take = newest[-new:] if new <= len(newest) else newest
        self.missed += new - len(take)
        for value in take:
            v = value * scale
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.sum += v
        self.seen = total

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        family.add_metric(labels, _buckets(self.bounds, self.counts), self.sum)


def _ring_newest(ring: Sequence[float], calls: int) -> list[float]:
    """The newest ``min(calls, len(ring))`` entries of ``ring`` (entry of call k at
    ``k % len(ring)``, as :class:`.runtime.processor.ProcessorStats` keeps them), oldest first."""
    size = len(ring)
    n = min(calls, size)
    return [ring[(calls - n + i) % size] for i in range(n)]


def _store_count(store, key: str) -> int:
    value = store.get("ollama-stats", key)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


class RunCollector:
    """Collects a run's metrics from its streams, pipelines and sinks at scrape time
    (a :class:`prometheus_client.registry.Collector`).

    Args:
        runtime: the run's :class:`.runtime.Runtime` (its streams).
        viewer: the run's :class:`.viewer.Viewer`: ``viewer.pipelines`` (index → the stream's
            :class:`.pipeline.Pipeline` once it runs), ``viewer.events`` (the event sinks, or None),
            ``viewer.started`` (``time.monotonic()`` at start).
    """

    def __init__(self, runtime, viewer):
        self.runtime = runtime
        self.viewer = viewer
        self._lock = threading.Lock()
        self._hists: dict[tuple, _Binned] = {}
        self._started: dict[int, int] = {}     # stream → caption requests started at the last scrape

    def _hist(self, key: tuple, bounds: Sequence[float]) -> _Binned:
        hist = self._hists.get(key)
        if hist is None:
            hist = self._hists[key] = _Binned(bounds)
        return hist

    def collect(self) -> Iterable:
        """The run's metric families, read now (prometheus_client's ``Collector`` protocol:
        called by the registry at each scrape of ``/metrics``)."""
        with self._lock:      # two scrapes at once must not bin the same samples twice
            return self._collect()

    def _collect(self) -> list:
        def counter(name, doc, labels):
            return CounterMetricFamily(name, doc, labels=labels)

        def gauge(name, doc, labels):
            return GaugeMetricFamily(name, doc, labels=labels)

        s, sp = ["stream"], ["stream", "processor"]
        frames_in = counter("vision_host_frames_in", "Frames read from the source.", s)
        frames_out = counter("vision_host_frames_out", "Frames that left the processor chain.", s)
        dropped = counter("vision_host_frames_dropped", "Frames a live source skipped to stay real-time.", s)
        fps = gauge("vision_host_fps", "Frames out per second, averaged since the stream started.", s)
        gaps = HistogramMetricFamily("vision_host_frame_gap_seconds",
                                     "Wall-clock gap between consecutive frames leaving the chain.", labels=s)
        reconnects = counter("vision_host_reconnects", "Times a live source came back after an outage.", s)
        state = gauge("vision_host_source_state", "1 for the source's current state, else 0.", ["stream", "state"])
        calls = counter("vision_host_processor_calls", "Frames a processor was called on.", sp)
        errors = counter("vision_host_processor_errors", "Processor calls that failed.", sp)
        disabled = gauge("vision_host_processor_disabled", "1 when the processor was disabled after errors.", sp)
        durations = HistogramMetricFamily("vision_host_processor_call_duration_seconds",
                                          "Duration of one processor call.", labels=sp)
        by_trigger = counter("vision_host_caption_requests", "Caption requests the ollama processor started, "
                             "by what started them.", ["stream", "trigger"])
        outcomes = counter("vision_host_caption_request_outcomes", "Caption requests finished, by outcome "
                           "(completed: a 2xx reply; failed: an error, a non-2xx status or cancelled).",
                           ["stream", "outcome"])
        in_flight = gauge("vision_host_caption_requests_in_flight", "Caption requests started and not finished.", s)
        captions = counter("vision_host_captions", "Captions published (completed and new).", s)
        latency = HistogramMetricFamily("vision_host_caption_latency_seconds",
                                        "Start-to-finish time of a completed caption request.", labels=s)
        waits = HistogramMetricFamily("vision_host_caption_fair_share_wait_seconds",
                                      "Time a caption request waited for its turn at the vision server.", labels=s)
        missed = counter("vision_host_histogram_samples_missed", "Samples that arrived faster than their source "
                         "keeps them between two scrapes and are missing from a histogram's buckets.",
                         ["histogram"])
        missed_by: dict[str, int] = {}

        for stream in self.runtime.streams:
            name = stream.name
            fs = stream.fetch_stats.snapshot()
            store = stream.processor_store
            pipeline = self.viewer.pipelines.get(stream.index)
            pkey = id(pipeline)
            for trigger in _TRIGGERS:
                by_trigger.add_metric([name, trigger], _store_count(store, f"requests-{trigger}"))
            outcomes.add_metric([name, "completed"], fs.completed)
            outcomes.add_metric([name, "failed"], fs.failed)
            in_flight.add_metric([name], max(0, fs.started - fs.completed - fs.failed))
            lat = self._hist(("latency", stream.index), CAPTION_LATENCY_BUCKETS_S)
            lat.feed(fs.completed, fs.latencies_ms, 1e-3)
            lat.add_to(latency, [name])
            wait = self._hist(("wait", stream.index), CAPTION_WAIT_BUCKETS_S)
            # waits are not counted apart: while none was let go, the ones kept are all of them;
            # after that, one per request started since the last scrape (each waits once)
            keep = stream.fetch_stats.waits_ms.maxlen
            started_before = self._started.get(stream.index, 0)
            wait.feed(len(fs.waits_ms) if len(fs.waits_ms) < keep else wait.seen + max(0, fs.started - started_before),
                      fs.waits_ms, 1e-3)
            self._started[stream.index] = fs.started
            wait.add_to(waits, [name])
            missed_by["caption_latency"] = missed_by.get("caption_latency", 0) + lat.missed
            missed_by["caption_fair_share_wait"] = missed_by.get("caption_fair_share_wait", 0) + wait.missed
            if pipeline is None:
                for st in _SOURCE_STATES:
                    state.add_metric([name, st], 1.0 if st == "connecting" else 0.0)
                captions.add_metric([name], 0)
                continue
            source = pipeline.source
            frames_in.add_metric([name], pipeline.frames_in)
            frames_out.add_metric([name], pipeline.frames_out)
            dropped.add_metric([name], source.frames_dropped)
            reconnects.add_metric([name], source.reconnects)
            current = source.state
            for st in _SOURCE_STATES:
                state.add_metric([name, st], 1.0 if st == current else 0.0)
            elapsed = (pipeline.ended or time.perf_counter()) - pipeline.started if pipeline.started else 0.0
            fps.add_metric([name], pipeline.frames_out / elapsed if elapsed > 0 else 0.0)
            gaps.add_metric([name], _buckets(_gap_bounds(), list(pipeline.gap_counts)), pipeline.gap_sum_s)
            captions.add_metric([name], pipeline.caption_stats.snapshot().completed)
            seen: set[str] = set()
            for position, proc in enumerate(pipeline.processors):
                label, n = proc.name, 2
                while label in seen:
                    label, n = f"{proc.name}#{n}", n + 1
                seen.add(label)
                st = proc.stats
                n_calls = st.calls            # read first: its ring entry is written before the count
                calls.add_metric([name, label], n_calls)
                errors.add_metric([name, label], st.errors)
                disabled.add_metric([name, label], 1.0 if proc.disabled else 0.0)
                hist = self._hist(("proc", stream.index, pkey, position), PROCESSOR_CALL_BUCKETS_S)
                hist.feed(n_calls, _ring_newest(st.recent_us, n_calls), 1e-6)
                hist.add_to(durations, [name, label])
                missed_by["processor_call_duration"] = missed_by.get("processor_call_duration", 0) + hist.missed
        for histogram, n in sorted(missed_by.items()):
            missed.add_metric([histogram], n)

        families = [frames_in, frames_out, dropped, fps, gaps, reconnects, state, calls, errors, disabled, durations,
                    by_trigger, outcomes, in_flight, captions, latency, waits, missed]
        families += self._sinks()
        uptime = GaugeMetricFamily("vision_host_uptime_seconds", "Seconds since the run started.",
                                   value=time.monotonic() - self.viewer.started)
        families.append(uptime)
        return families

    def _sinks(self) -> list:
        labels = ["sink", "target"]
        queued = GaugeMetricFamily("vision_host_sink_queue_depth", "Events waiting in an event sink's queue.",
                                   labels=labels)
        delivered = CounterMetricFamily("vision_host_sink_delivered", "Events an event sink delivered.", labels=labels)
        dropped = CounterMetricFamily("vision_host_sink_dropped", "Events an event sink dropped.", labels=labels)
        failures = CounterMetricFamily("vision_host_sink_failures", "Failed deliveries of an event sink.",
                                       labels=labels)
        connected = GaugeMetricFamily("vision_host_sink_connected", "1 when the sink is connected, 0 when not "
                                      "(absent before its first try).", labels=labels)
        events = self.viewer.events
        for h in events.sink_health() if events is not None else []:
            key = [str(h["kind"]), str(h["target"])]
            queued.add_metric(key, h["queued"] or 0)
            delivered.add_metric(key, h["delivered"] or 0)
            dropped.add_metric(key, h["dropped"] or 0)
            failures.add_metric(key, h["failures"] or 0)
            if h["connected"] is not None:
                connected.add_metric(key, 1.0 if h["connected"] else 0.0)
        return [queued, delivered, dropped, failures, connected]


def _gap_bounds() -> tuple[float, ...]:
    from .pipeline import FRAME_GAP_BUCKETS_S
    return FRAME_GAP_BUCKETS_S


class Readiness:
    """``/readyz``'s verdict: every stream delivering frames, and its vision server answering.

    A stream is ready when a frame left its chain within ``ready_within_s`` seconds, and, when it
    captions (its processors started a caption request, or the ``ollama`` processor stored its
    settings), its vision server completed a request: at least one so far, and, when requests
    finished since the previous check, at least one of those (a server that stopped answering
    makes the stream not ready again).

    Args:
        runtime, viewer: as for :class:`RunCollector`.
        ready_within_s: see above (default :data:`DEFAULT_READY_WITHIN_S`).

    Raises:
        ValueError: ``ready_within_s`` not a number above 0 and at most a day.
    """

    def __init__(self, runtime, viewer, ready_within_s: float = DEFAULT_READY_WITHIN_S):
        if isinstance(ready_within_s, bool) or not isinstance(ready_within_s, (int, float)) \
                or not 0 < ready_within_s <= _MAX_READY_WITHIN_S:
            raise ValueError(f"ready_within_s = {ready_within_s!r}: give a number of seconds above 0 and at most "
                             f"{_MAX_READY_WITHIN_S:.0f}")
        self.runtime = runtime
        self.viewer = viewer
        self.ready_within_s = float(ready_within_s)
        self._lock = threading.Lock()
        self._last: dict[int, tuple[int, int, bool]] = {}    # stream → (completed, failed, answering)

    def problems(self) -> list[dict]:
        """``[{"stream": name, "reason": sentence}]`` for each stream not ready (empty: ready)."""
        out = []
        now = time.perf_counter()
        with self._lock:
            for stream in self.runtime.streams:
                reason = self._stream_problem(stream, now)
                if reason:
                    out.append({"stream": stream.name, "reason": reason})
        return out

    def _stream_problem(self, stream, now: float) -> str | None:
        pipeline = self.viewer.pipelines.get(stream.index)
        if pipeline is None:
            return "not started: its source is still opening"
        source = pipeline.source
        last = pipeline.last_frame_at
        if source.ended or pipeline.ended:
            return "ended: its source delivers no more frames"
        if last is None:
            return "no frame yet"
        if now - last > self.ready_within_s:
            return (f"no frame for {now - last:.0f} s (source {source.state}; ready within "
                    f"{self.ready_within_s:g} s)")
        fs = stream.fetch_stats
        completed, failed = fs.completed, fs.failed
        captions = fs.started > 0 or bool(stream.processor_store.keys("ollama"))
        if not captions:
            return None
        before = self._last.get(stream.index)
        if before is None:
            answering = completed > 0
        elif completed > before[0]:
            answering = True
        elif failed > before[1]:
            answering = False
        else:
            answering = before[2] or completed > 0
        self._last[stream.index] = (completed, failed, answering)
        if answering:
            return None
        server = stream.processor_store.get("ollama", "server-name") or "the vision server"
        if not failed:
            return f"{server} has not answered a caption request yet"
        why = f"; last error: {fs.last_error}" if fs.last_error else ""
        return f"{server} is not answering ({failed} caption requests failed, {completed} completed{why})"


def run_registry(runtime, viewer) -> CollectorRegistry:
    """A registry of its own holding a :class:`RunCollector` for this run."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(runtime, viewer))
    return registry


def _metrics_response(registry: CollectorRegistry):
    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, registry)   # reading stats takes locks: not on the loop
        return Response(body, 200, {"cache-control": "no-store"}, media_type=CONTENT_TYPE)
    return metrics


def metrics_routes(viewer, runtime, *, ready_within_s: float = DEFAULT_READY_WITHIN_S,
                   registry: CollectorRegistry | None = None) -> list[Route]:
    """The routes ``GET /metrics``, ``/healthz`` and ``/readyz`` for the viewer's server
    (append them to ``viewer.extra_routes`` before the server starts).

    * ``/metrics``: every metric of :class:`RunCollector`, Prometheus text 0.0.4.
    * ``/healthz``: 200 ``{"status": "ok"}`` while the process serves.
    * ``/readyz``: 200 ``{"status": "ready"}``, or 503 ``{"status": "not ready", "streams":
      [{"stream", "reason"}]}`` (:class:`Readiness`; ``streams`` only with the token, or when
      the server has none).

    Args:
        viewer, runtime: the run's :class:`.viewer.Viewer` and :class:`.runtime.Runtime`
            (read at each request: pipelines attached later are seen).
        ready_within_s: see :class:`Readiness`.
        registry: where the collector goes (None: a new one, :func:`run_registry`).

    Raises:
        ValueError: ``ready_within_s`` out of range.
    """
    readiness = Readiness(runtime, viewer, ready_within_s)
    if registry is None:
        registry = run_registry(runtime, viewer)

    async def healthz(request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await asyncio.to_thread(readiness.problems)
        if not problems:
            return json_response(200, {"status": "ready"})
        body: dict = {"status": "not ready"}
        if request.scope.get("state", {}).get("token_ok", True):
            body["streams"] = problems
        return json_response(503, body)

    return [Route("/metrics", _metrics_response(registry), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"])]


# --------------------------------------------------------------------------- vision-host serve


def _api_of(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/ai/"):
        return "workers_ai"
    return "ollama"


def _outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    return {499: "cancelled", 503: "rejected", 504: "timeout"}.get(status, "client_error" if status < 500 else "error")


class ServeRequestCounter:
    """ASGI middleware counting ``vision-host serve``'s POST requests by API and outcome
    (``ok`` 2xx, ``client_error`` other 4xx, ``cancelled`` 499, ``rejected`` 503 (queue full),
    ``timeout`` 504, ``error`` other 5xx); the counts are read by :class:`ServeCollector`.
    Requests whose client went away before the answer started are not counted."""

    def __init__(self, app, counts: dict[tuple[str, str], int]):
        self.app = app
        self.counts = counts

    async def __call__(self, scope, receive, send) -> None:
        """ASGI entry (https://asgi.readthedocs.io/): count each POST by API and outcome once its
        answer starts, then pass everything to the app unchanged."""
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        api = _api_of(scope["path"])

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                key = (api, _outcome_of(message["status"]))
                self.counts[key] = self.counts.get(key, 0) + 1    # on the event loop only: no lock
            await send(message)

        await self.app(scope, receive, counted)


class ServeCollector:
    """``vision-host serve``'s metrics from its :class:`.serve.scheduler.Scheduler` at scrape time.

    Tokens are counted when the scheduler keeps ``generated_tokens`` and ``generate_seconds``
    (tokens/s is ``rate(vision_host_serve_generated_tokens_total)``).

    Args:
        scheduler: the app's scheduler (``app.state.scheduler``).
        counts: the request counts of :class:`ServeRequestCounter`.
    """

    def __init__(self, scheduler, counts: dict[tuple[str, str], int]):
        self.scheduler = scheduler
        self.counts = counts
        self._lock = threading.Lock()
        self._batches = _Binned(BATCH_SIZE_BUCKETS)

    def collect(self) -> Iterable:
        """serve's metric families, read from the scheduler's counters under its lock at each
        scrape (prometheus_client's ``Collector`` protocol)."""
        sch = self.scheduler
        with sch.cond:
            sizes = list(sch.batch_sizes)
            n_batches, queued, reserved, busy = sch.batches, len(sch.queue), sch.reserved, sch.busy
            counters = {k: getattr(sch, k) for k in ("batched_requests", "rejected", "timeouts", "loads", "unloads",
                                                     "images", "model_images", "grids")}
            tokens = getattr(sch, "generated_tokens", None)
            gen_s = getattr(sch, "generate_seconds", None)
        loaded = sch.model.loaded
        out: list = [
            GaugeMetricFamily("vision_host_serve_queue_depth", "Requests waiting for the model.", value=queued),
            GaugeMetricFamily("vision_host_serve_reserved", "Requests decoding their images before queueing.",
                              value=reserved),
            GaugeMetricFamily("vision_host_serve_busy", "1 while a batch generates.", value=1.0 if busy else 0.0),
            GaugeMetricFamily("vision_host_serve_model_loaded", "1 while the model's weights are loaded.",
                              value=1.0 if loaded else 0.0),
            CounterMetricFamily("vision_host_serve_batches", "Batched generate calls.", value=n_batches),
        ]
        docs = {"batched_requests": "Requests given to generate.",
                "rejected": "Requests refused with 503 (queue full).",
                "timeouts": "Requests that timed out (504).", "loads": "Times the model's weights were loaded.",
                "unloads": "Times the idle model was unloaded.", "images": "Images sent by generated requests.",
                "model_images": "Images the model got for them (a grid is one).",
                "grids": "Requests answered on a grid of their frames."}
        for key, value in counters.items():
            out.append(CounterMetricFamily(f"vision_host_serve_{key}", docs[key], value=value))
        with self._lock:
            self._batches.feed(n_batches, sizes)
            hist = HistogramMetricFamily("vision_host_serve_batch_size", "Requests in one batched generate call.",
                                         labels=[])
            self._batches.add_to(hist, [])
        out.append(hist)
        requests = CounterMetricFamily("vision_host_serve_requests", "POST requests answered, by API and outcome.",
                                       labels=["api", "outcome"])
        for (api, outcome), n in sorted(dict(self.counts).items()):
            requests.add_metric([api, outcome], n)
        out.append(requests)
        if tokens is not None:
            out.append(CounterMetricFamily("vision_host_serve_generated_tokens", "Tokens generated.", value=tokens))
        if gen_s is not None:
            out.append(CounterMetricFamily("vision_host_serve_generate_seconds", "Seconds spent generating.",
                                           value=gen_s))
        return out


def add_serve_metrics(app) -> None:
    """Serve ``GET /metrics`` on ``vision-host serve``'s FastAPI ``app`` (its scheduler in
    ``app.state.scheduler``) with a registry of its own, and count its requests by outcome."""
    counts: dict[tuple[str, str], int] = {}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(app.state.scheduler, counts))
    app.add_middleware(ServeRequestCounter, counts=counts)
    app.add_route("/metrics", _metrics_response(registry), methods=["GET"])
