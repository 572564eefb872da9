"""Running the streams of one ``vision-host run``.

:func:`run_streams` takes the run's checked settings (:class:`.cli.settings.RunSettings`), the
processor files and the network policy, and builds the sandbox runtime, one processor chain
per stream (:class:`StreamSpec`), and with ``-o mjpeg`` one HTTP server with the live viewer
for all streams. Each stream (:class:`StreamRun`) runs on its own thread, a single one on the
calling thread, until its source ends, ``--max-frames``, or a stop signal
(:data:`STOP_SIGNALS`). Then everything is closed, each stream's summary printed on stderr
and ``--stats`` written. Heavy modules (OpenCV, wasmtime, the web server) load inside the
functions that need them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cli.settings import RunSettings
    from .runtime import NetworkPolicy

log = logging.getLogger("vision_host")

#: Signals that stop a run cleanly (files finalized, stats written); SIGHUP as when the terminal closes.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def network_policy(config: dict[str, str], allow: list[str], specs: list[StreamSpec],
                   max_vision_requests: int | None = None) -> NetworkPolicy:
    """What the run's processors may reach: the destination of every ``*-url`` setting, of
    the run (``config``) and of each stream's own (``specs``), plus ``allow`` (``--allow``
    ``HOST:PORT`` items); caption requests at once across all streams capped at
    ``max_vision_requests`` (None: the policy's default).

    Raises:
        PolicyError: an ``-api-key-env`` setting without its ``-url``, or naming an unset
            environment variable (see :meth:`.runtime.NetworkPolicy.from_config`).
    """
    from .runtime import NetworkPolicy

    policy = NetworkPolicy.from_config(config, allow)
    for spec in specs:   # a stream's own *-url settings are destinations too
        own = NetworkPolicy.from_config({**config, **spec.config})
        policy.allowed |= own.allowed
        policy.credentials.update(own.credentials)
    if max_vision_requests:
        policy.max_frame_requests = int(max_vision_requests)
    log.info("processors may reach: %s", ", ".join(sorted(policy.allowed)) or "nothing")
    return policy


class StreamRun:
    """One stream of a run: opens its source, output and caption tracks, runs its
    :class:`.pipeline.Pipeline`, and closes what it opened. With several streams each runs on
    its own thread; a stream that cannot open is reported and the others go on.

    Args:
        spec: the stream's configuration.
        settings: the run's settings (``pace``, ``live_options``, ``output``, ``codec``,
            ``segment_seconds``, ``subtitles``, ``max_frames``).
        processors: the stream's own processor chain (:class:`.runtime.Processor`).
        runtime: the run's :class:`.runtime.Runtime`; stream: the stream's
            :class:`.runtime.StreamContext` in it.
        caption_bus: the run's :class:`.captions.CaptionBus`; this stream's caption tracks
            subscribe to it for this stream while it runs.
        mjpeg, viewer: the run's :class:`.outputs.MjpegOutput` and :class:`.viewer.Viewer`
            (``-o mjpeg``), else None.
    """

    def __init__(self, spec: StreamSpec, settings: RunSettings, processors: list, runtime, stream, caption_bus,
                 mjpeg=None, viewer=None):
        self.spec, self.settings, self.processors, self.runtime, self.stream = spec, settings, processors, runtime, stream
        self.caption_bus, self.mjpeg, self.viewer = caption_bus, mjpeg, viewer
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
        and then :attr:`done`. ``status``: where the pipeline writes its live status line."""
        try:
            self._run(status)
        finally:
            self.done.set()

    def _run(self, status=None) -> None:
        from .captions import CaptionTrackError, SubtitleStreamTrack, open_track
        from .outputs import OutputError, make_output
        from .outputs.recording import encoder_thread_pays
        from .pipeline import Pipeline
        from .runtime import ProcessorLoadError
        from .sources import SourceError, open_source

        settings, spec, bus, index = self.settings, self.spec, self.caption_bus, self.stream.index
        source = output = track = None
        try:
            try:
                source = open_source(spec.url, pace=bool(settings.pace), live_options=settings.live_options)
                if self.mjpeg is not None:
                    output = self.mjpeg.stream(self.stream.index)
                else:
                    output = make_output(settings.output, spec.destination, codec=settings.codec,
                                         segment_seconds=settings.segment_seconds,
                                         subtitles=bool(settings.subtitles),
                                         encoder_thread=encoder_thread_pays(len(self.runtime.streams)))
                output.open(source.width, source.height, source.fps)
                if spec.captions:
                    track = bus.subscribe(open_track(spec.captions), stream=index)
                if settings.subtitles:
                    bus.subscribe(SubtitleStreamTrack(output.add_subtitle), stream=index)
            except (ProcessorLoadError, SourceError, OutputError, CaptionTrackError) as exc:
                self.error = str(exc)
                return
            except OSError as exc:
                self.error = f"cannot write the caption track {spec.captions}: {exc.strerror}"
                return
            where = f"the viewer at {self.mjpeg.url}" if len(self.runtime.streams) == 1 and self.mjpeg else output.describe()
            print(f"vision-host: {self.label}{source.describe()} → {' → '.join(p.name for p in self.processors)} → "
                  f"{where}" + (f" (captions → {track.path})" if track else ""), file=sys.stderr)
            self.pipeline = Pipeline(source, self.processors, [output], self.runtime, status=status, caption_bus=bus,
                                     model=self.stream.config.get("ollama-model"), stream=self.stream,
                                     drain_s=0.0 if source.live else self.settings.caption_drain_s)
            if self.viewer is not None:
                self.viewer.attach(self.stream.index, self.pipeline)
            if self.stop_requested.is_set():
                self.pipeline.stop()
            try:
                self.stats = self.pipeline.run(settings.max_frames)
            except KeyboardInterrupt:
                self.stats = self.pipeline.summary()
                raise
        finally:
            bus.end_stream(index)   # what the pipeline did not close (it ends its stream at the last frame's time)
            if output is not None:
                output.close()
            if source is not None:
                source.close()

    @property
    def label(self) -> str:
        """``[NAME] `` before this stream's messages when the run has several, else empty."""
        return f"[{self.spec.name}] " if len(self.runtime.streams) > 1 else ""


def run_streams(settings: RunSettings, processor_paths: list[Path], policy: NetworkPolicy) -> int:
    """Run every stream of ``settings`` (``settings.streams``) through its own instances of
    the processors at ``processor_paths`` (chained in order) until they end; returns the exit
    status: 1 when a stream could not open or run, a file could not be read to its end, or
    caption requests were made and none completed (:func:`run_problems`), else 0.

    The streams stop cleanly on :data:`STOP_SIGNALS` (handlers installed on the main thread
    only, restored at the end): the files are finalized and the stats written; a second signal
    only says so. Messages go to stderr, each prefixed with ``[NAME]`` when there are several
    streams.

    Raises:
        UsageError: a ``--viewer-…`` limit out of range (from ``settings.viewer_limits()``).
    """
    from .captions import CaptionBus
    from .outputs import MjpegOutput, OutputError
    from .pipeline import format_summary, write_stats
    from .runtime import ProcessorLoadError, Runtime, SandboxLimits, default_cache_dir
    from .sinks.event_sinks import EventSinks, EventSinksError

    specs = settings.streams
    limits = SandboxLimits()
    if settings.processor_timeout_ms:
        limits.call_timeout_ms = float(settings.processor_timeout_ms)
    if settings.memory_limit_mb:
        limits.memory_limit_bytes = int(settings.memory_limit_mb) * 1024 * 1024
    runtime = Runtime(settings.config, policy, limits, None if settings.no_cache else default_cache_dir(),
                      models_dir=settings.models_dir)
    streams = [runtime.streams[0]] + [runtime.add_stream(s.name, s.config) for s in specs[1:]]
    streams[0].name = specs[0].name
    streams[0].config.update(specs[0].config)     # after the others copied the run's config
    runs: list[StreamRun] = []
    chains: list[list] = []
    mjpeg = viewer = events = mcp_service = None
    caption_bus = CaptionBus()
    try:
        try:
            for stream in streams:
                chains.append([])
                for path in processor_paths:
                    chains[-1].append(runtime.load(path, Path(path).stem, stream))
            events = EventSinks(settings.events, caption_bus, [(s.index, s.name) for s in streams])
            if settings.output == "mjpeg":
                mjpeg = MjpegOutput(settings.destination or ":8080", stream_names=[s.name for s in specs])
                if settings.mcp:
                    from .mcp import McpLimits, McpService
                    mcp_service = McpService(limits=McpLimits(max_sessions=settings.mcp_max_sessions,
                                                              ask_timeout_s=settings.mcp_ask_timeout_s))
                viewer = start_viewer(runtime, mjpeg, settings.token, *settings.viewer_limits(),
                                      allowed_hosts=settings.allow_host or [], mcp=mcp_service,
                                      ready_within_s=settings.ready_within_s)
                viewer.events = events
                viewer.history_path = settings.events.history_path
                caption_bus.subscribe(viewer.caption_subscriber)
        except (ProcessorLoadError, OutputError) as exc:
            print(f"vision-host: {exc}", file=sys.stderr)
            return 1
        except EventSinksError as exc:
            print(f"vision-host: {exc}", file=sys.stderr)
            return 2 if exc.usage else 1
        runs = [StreamRun(spec, settings, chain, runtime, stream, caption_bus, mjpeg, viewer)
                for spec, chain, stream in zip(specs, chains, streams, strict=True)]
        _run_until_stopped(runs)
    finally:
        if events is not None:
            events.close()        # before the bus: the webhooks may drain their queues first
        caption_bus.close()
        for chain in chains:
            for p in chain:
                p.close()
        if mcp_service is not None:
            mcp_service.close()   # its sessions end before the server stops
        if viewer is not None:
            viewer.close()
        if mjpeg is not None:
            mjpeg.close()
        runtime.close()
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"vision-host: {r.label}{r.error}", file=sys.stderr)
    done = [r for r in runs if r.stats is not None]
    if settings.stats and done:
        stats = dict(done[0].stats) if len(runs) == 1 else \
            {"streams": [r.stats for r in done], "failed_streams": {r.spec.name: r.error for r in failed}}
        if events is not None:
            stats["events"] = events.summary()
        write_stats(Path(settings.stats), stats)
    status = 1 if failed else 0
    for r in done:
        prefix = f"stream {r.spec.name}: " if len(runs) > 1 else ""
        print(prefix + format_summary(r.stats), file=sys.stderr)
        if r.stats.get("source_error"):    # the summary says it: a file that could not be read to its end
            status = 1
        for problem in run_problems(r.stats, r.stream.fetch_stats.last_error, r.stream.config,
                                    r.stream.processor_store):
            print(f"vision-host: {r.label}{problem}", file=sys.stderr)
            status = 1
    return status


def _run_until_stopped(runs: list[StreamRun]) -> None:
    """Run ``runs`` (one on this thread, several each on its own) until all have ended, with
    :data:`STOP_SIGNALS` stopping them all."""
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
            runs[0].thread = threading.Thread(target=runs[0].run, name=f"vision-host-stream {runs[0].spec.name}",
                                              daemon=True)
            runs[0].thread.start()
            wait_for_streams(runs)
    except KeyboardInterrupt:
        for r in runs:
            r.stop()
    finally:
        for r in runs:
            if r.thread is not None:
                r.done.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_problems(stats: dict, last_error: str | None, config: dict, store) -> list[str]:
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


def start_viewer(runtime, mjpeg, token: str | None, server_limits=None, config_limits=None,
                 allowed_hosts: list[str] | str = (), mcp=None, ready_within_s: float | None = None):
    """Start ``mjpeg``'s server (an :class:`.outputs.MjpegOutput`) with the live viewer
    attached, so no request ever meets the plain server; returns the :class:`.viewer.Viewer`.
    Bound beyond loopback it always needs a token: ``token`` (``--token``),
    ``$VISION_HOST_TOKEN``, or a random one printed here.

    Args:
        server_limits: the server's :class:`.webserver.ServerLimits` (None: its defaults).
        config_limits: the viewer's :class:`.viewer.ConfigLimits` (None: its defaults).
        allowed_hosts: names answered in ``Host`` besides the default ones (``--allow-host``).
        mcp: an :class:`.mcp.McpService` to serve at ``/mcp`` (``--mcp``), or None.
        ready_within_s: ``/readyz``'s window (``--ready-within-s``; None: the default, see
            :class:`.metrics.Readiness`).

    Raises:
        OutputError: the port cannot be bound.
    """
    import secrets

    from .viewer import Viewer, is_loopback

    mjpeg.limits = server_limits
    mjpeg.allowed_hosts = [allowed_hosts] if isinstance(allowed_hosts, str) else [str(a) for a in allowed_hosts]
    token = token or os.environ.get("VISION_HOST_TOKEN") or None
    if token is None and not is_loopback(mjpeg.host):
        token = secrets.token_urlsafe(18)
    viewer = Viewer(runtime, mjpeg, token, limits=config_limits)
    from .metrics import DEFAULT_READY_WITHIN_S, metrics_routes
    viewer.extra_routes += metrics_routes(   # before mjpeg.start(), which fixes the routes
        viewer, runtime, ready_within_s=DEFAULT_READY_WITHIN_S if ready_within_s is None else ready_within_s)
    if mcp is not None:
        mcp.viewer = viewer
        viewer.extra_routes.append(mcp.route())
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


def wait_for_streams(runs: list[StreamRun]) -> None:
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
