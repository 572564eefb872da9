"""The run's wasm runtime: the engine, sandbox limits, the module cache, the video streams'
shared state, and loading processors.

Processors are core WebAssembly modules (WASI preview 1) run by wasmtime. A
:class:`Runtime` compiles them (through a cache), checks their imports against the host
functions (:mod:`.linking`) and instantiates each as a :class:`~.processor.Processor` for
one :class:`StreamContext`; every call into a processor runs under a deadline
(:mod:`.deadline`, :class:`SandboxLimits`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from . import accessors as _accessors
from . import overlay as _overlay
from .deadline import EpochClock
from .fetch import FairShare, FetchStats
from .linking import HOST_FUNCTIONS, host_function_for, type_text
from .platform import ProcessorStore
from .policy import NetworkPolicy
from .processor import Processor, ProcessorLoadError

log = logging.getLogger("vision_host.runtime")

#: True in a process made by ``fork()`` from one that imported this module: wasmtime compiles
#: on a thread pool (rayon's) that ``fork()`` does not copy, so an engine made before the fork
#: waits for ever when it compiles in the child, and engines made in the child compile on the
#: calling thread.
_FORKED = False


def _after_fork_in_child() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

WASI_MODULE = "wasi_snapshot_preview1"
#: Wall-clock cap on one ``process`` call when :attr:`SandboxLimits.call_hard_timeout_ms` is
#: not given and ``call_timeout_ms`` is smaller (ms).
DEFAULT_WALL_MS = 1000.0


@dataclass
class SandboxLimits:
    """Per-instance limits.

    The deadline of a call is there to stop a runaway (an endless loop, a processor stuck
    retrying), not to judge speed: a slow processor is reported (its cost in the stats, the
    frame rate, dropped frames on live sources), never interrupted for being slow. By default
    one ``process`` call may run 1 s, the processor's own code and the host functions it
    calls together; a call past that is interrupted and the frame passes on unchanged.

    Attributes:
        call_timeout_ms: deadline of one ``process`` call in ms (default 1000). At or above the
            wall-clock cap (below) it is that cap: one wall-clock deadline, host functions
            included. Below it, it counts the processor's own code only (an epoch deadline,
            re-armed after each host function; time inside host functions such as OpenCV
            calls is not counted), and the wall-clock cap still bounds the whole call.
        call_hard_timeout_ms: wall-clock cap on one ``process`` call, host functions included,
            in ms; None (the default): the larger of 1000 and ``call_timeout_ms``. Enforced by
            the epoch deadline in the processor's code (which stops it at the cap with the native
            clock, else between the cap and 1.25 × the cap, plus a 5 ms tick: the thread clock's
            armed deadline is reused across calls) and, when
            the processor's own code has a budget, checked whenever it calls the host (a single
            host function that blocks is not interrupted; the call stops once it returns).
        init_timeout_ms: deadline for instantiation and ``_initialize``.
        memory_limit_bytes: cap on the instance's linear memory; ``memory.grow`` fails past it.
        max_consecutive_failures: failed calls in a row after which the processor is disabled.
        max_live_mats: mats one instance may hold at once.
    """

    call_timeout_ms: float = 1000.0
    call_hard_timeout_ms: float | None = None
    init_timeout_ms: float = 2000.0
    memory_limit_bytes: int = 256 * 1024 * 1024
    max_consecutive_failures: int = 5
    max_live_mats: int = 1024

    def deadlines_ms(self) -> tuple[float, float]:
        """``(own_code_ms, wall_ms)`` of one call: the budget of the processor's own code
        and the wall-clock cap on the whole call (``own_code_ms`` ≥ ``wall_ms`` means the
        one wall-clock deadline ``wall_ms``, host functions included)."""
        own = self.call_timeout_ms
        hard = self.call_hard_timeout_ms
        return own, (hard if hard is not None else (own if own > DEFAULT_WALL_MS else DEFAULT_WALL_MS))


def default_cache_dir() -> Path:
    """Where compiled modules are cached: ``$VISION_HOST_CACHE_DIR`` or the XDG cache dir."""
    if env := os.environ.get("VISION_HOST_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vision-host" / "modules"


def is_locked_key(key: str) -> bool:
    """Config keys that may not change at run time: they decide what processors may reach."""
    return key.endswith("-url") or key.endswith("-api-key-env")


class StreamContext:
    """What the processors of one video stream share: their config, the ``processor-store``
    and ``frame-store``, the frame sequence number, caption statistics, and the stream's lane
    in the vision server's round-robin share (:class:`.fetch.FairShare`).

    Each stream of a run (one per source) has its own processor instances, so one camera's
    captions never leak into another's store.

    Args:
        index: the stream's number (0, 1, …): its lane and its ``/stream/N``.
        name: what messages and caption tracks call the stream.
        config: the run's ``-c`` settings with this stream's own settings laid over them (used
            as given, not copied: stream 0 shares the runtime's dict).
    """

    def __init__(self, index: int, name: str, config: dict[str, str]):
        self.index = index
        self.name = name
        self.config = config
        #: Grows with every :meth:`set_config` (``vision-host:platform/config-watch.version``).
        self.config_version = 0
        self.processor_store = ProcessorStore()
        self.frame_store = ProcessorStore()
        self.frame_seq = 0
        self.fetch_stats = FetchStats()
        self._config_lock = threading.Lock()

    def set_config(self, values: dict[str, str]) -> dict[str, str]:
        """Change config values while the stream runs; processors that watch
        ``config-watch.version`` read them on their next frame. An empty value removes the key
        (the processor's default applies). Returns a copy of the new config.

        Raises:
            ValueError: a key that widens the sandbox (``*-url``, ``*-api-key-env``: the network
                allow-list is fixed at start), a key that is not lowercase letters, digits and
                ``-``, or a value that is not a string of at most 4096 characters.
        """
        for key, value in values.items():
            if not isinstance(key, str) or not key or len(key) > 100 or not all(c.islower() or c.isdigit() or c == "-" for c in key):
                raise ValueError(f"config key {key!r}: use lowercase letters, digits and '-' (e.g. ollama-prompt)")
            if is_locked_key(key):
                raise ValueError(f"{key} cannot change while running: the network allow-list is fixed at start; "
                                 f"restart with -c {key}=…")
            if not isinstance(value, str) or len(value) > 4096:
                raise ValueError(f"config value of {key}: give a string of at most 4096 characters")
        with self._config_lock:
            for key, value in values.items():
                if value == "":
                    self.config.pop(key, None)
                else:
                    self.config[key] = value
            self.config_version += 1
            return dict(self.config)

    def config_snapshot(self) -> dict[str, str]:
        """A copy of :attr:`config` taken under the lock :meth:`set_config` holds, for readers on
        other threads (the viewer's)."""
        with self._config_lock:
            return dict(self.config)

    def next_frame(self) -> int:
        """Start a new frame (the pipeline calls this once per frame); returns its sequence
        number. ``frame-store`` data older than the previous frame is dropped."""
        self.frame_seq += 1
        self.frame_store.prune_before(self.frame_seq - 1)
        return self.frame_seq


class Runtime:
    """Shared state of one run: the engine, its epoch clock, the module cache, the network
    policy, the HTTP worker pool, the fair share of the vision server, and the streams
    (:class:`StreamContext`; stream 0 always exists and is what :attr:`processor_store` and
    :attr:`fetch_stats` refer to).

    Args:
        config: ``-c key=value`` settings, visible to processors through ``get-config``.
        policy: network policy for processor HTTP (default: from ``*-url`` config keys).
        limits: sandbox limits applied to every instance.
        cache_dir: compiled-module cache (None disables caching).
        wasm_accessors: serve the ``wasm:cv/mat`` data accessors inside wasm (:mod:`.accessors`;
            default); False sends every call to the host's Python implementations.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, config: dict[str, str] | None = None, policy: NetworkPolicy | None = None,
                 limits: SandboxLimits | None = None, cache_dir: Path | None = None,
                 println=None, models_dir: Path | None = None, wasm_accessors: bool = True):
        self.config = dict(config or {})
        #: Serve the wasm:cv/mat data accessors inside wasm (:mod:`.accessors`) for processors
        #: loaded from now on; False: every accessor call goes to the host's Python code.
        self.wasm_accessors = wasm_accessors
        self._accessor_module: wasmtime.Module | None = None
        self.policy = policy or NetworkPolicy.from_config(self.config)
        self.limits = limits or SandboxLimits()
        self.cache_dir = cache_dir
        self.models_dir = Path(models_dir) if models_dir else None
        self.streams = [StreamContext(0, "0", self.config)]
        self.fair_share = FairShare(self.policy.max_frame_requests)
        self.println = println or (lambda text: print(text, flush=True))
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="vision-host-http")
        cfg = wasmtime.Config()
        cfg.epoch_interruption = True
        cfg.memory_may_move = False   # GuestMemory caches each memory's base address
        #: The engine compiles on wasmtime's thread pool (not in a forked child: see _FORKED).
        self.parallel_compilation = not _FORKED
        cfg.parallel_compilation = self.parallel_compilation
        self._pid = os.getpid()
        self.engine = wasmtime.Engine(cfg)
        #: Advances the engine's epoch, by which every call deadline is measured.
        self.clock = EpochClock(self.engine)
        self.compile_ms = 0.0
        self.cache_hits = 0
        _overlay.warm_up()

    def add_stream(self, name: str, config: dict[str, str] | None = None) -> StreamContext:
        """A new stream (index = the number of streams so far) with the run's config and
        ``config`` laid over it; load its processors with ``load(..., stream=it)``."""
        stream = StreamContext(len(self.streams), name, {**self.config, **(config or {})})
        self.streams.append(stream)
        return stream

    @property
    def processor_store(self) -> ProcessorStore:
        """Stream 0's ``processor-store``."""
        return self.streams[0].processor_store

    @property
    def fetch_stats(self) -> FetchStats:
        """Stream 0's caption-request statistics."""
        return self.streams[0].fetch_stats

    def _check_can_compile(self) -> None:
        """Raise ProcessorLoadError in a process forked from the one that made this runtime,
        where its engine would wait for ever for its compiler's threads (see _FORKED)."""
        if self.parallel_compilation and os.getpid() != self._pid:
            raise ProcessorLoadError("this runtime was made before the process forked, and its compiler's threads "
                                     "stayed in the parent: make the runtime in this process (or use "
                                     "multiprocessing's spawn start method) to load processors here")

    def accessor_module(self) -> wasmtime.Module:
        """The compiled helper module of :mod:`.accessors` (compiled once per runtime)."""
        if self._accessor_module is None:
            self._check_can_compile()
            self._accessor_module = wasmtime.Module(self.engine, wasmtime.wat2wasm(_accessors.HELPER_WAT))
        return self._accessor_module

    # -- compilation -------------------------------------------------------------------
    def compile(self, wasm: bytes, origin: str) -> wasmtime.Module:
        """Compile ``wasm`` (bytes of a core module), through the cache when enabled.

        Raises:
            ProcessorLoadError: the bytes are not a valid WebAssembly module.
        """
        started = time.perf_counter()
        key = hashlib.sha256(wasm + wasmtime.__name__.encode() + _engine_fingerprint()).hexdigest()
        cached = self.cache_dir / f"{key}.cwasm" if self.cache_dir else None
        if cached is not None and cached.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(cached))
                self.cache_hits += 1
                self.compile_ms += (time.perf_counter() - started) * 1000
                return module
            except wasmtime.WasmtimeError:
                log.info("compiled-module cache entry %s is stale; recompiling", cached.name)
        if wasm[:4] != b"\0asm":
            raise ProcessorLoadError(f"{origin} is not a WebAssembly module (it does not start "
                                     f"with the \\0asm magic bytes): rebuild it or pick the right file")
        self._check_can_compile()
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            # wasmtime's text is "failed to parse WebAssembly module\n\nCaused by:\n    <cause>":
            # keep the cause (e.g. "unexpected end-of-file (at offset 0x3c)" for a truncated
            # file), which the first lines alone never reach.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "Caused by:"]
            raise ProcessorLoadError(f"{origin} is not a valid WebAssembly module ({': '.join(lines[:3])}): "
                                     f"the file is truncated or corrupt; rebuild it (python processor/build.py) "
                                     f"or copy it again") from None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(module.serialize())
                os.replace(tmp, cached)
            except OSError as exc:
                log.debug("could not write compiled-module cache %s: %s", cached, exc)
        self.compile_ms += (time.perf_counter() - started) * 1000
        return module

    def check_imports(self, module: wasmtime.Module, origin: str) -> list[str]:
        """Problems with the module's imports and exports, as sentences (empty if none)."""
        problems = []
        for imp in module.imports:
            if imp.module == WASI_MODULE:
                continue
            spec = HOST_FUNCTIONS.get((imp.module, imp.name))
            if spec is None:
                problems.append(f"imports {imp.module}#{imp.name}, which vision-host does not provide")
            elif not isinstance(imp.type, wasmtime.FuncType):
                problems.append(f"imports {imp.module}#{imp.name} as a non-function")
            elif host_function_for(imp.module, imp.name, imp.type) is None:
                problems.append(f"imports {imp.module}#{imp.name} with type {type_text(imp.type)}, "
                                f"but the host provides {type_text(spec.functype())}")
        exports = {e.name: e.type for e in module.exports}
        process = exports.get("process")
        if process is None:
            problems.append("does not export `process` (expected `process(frame: u32) -> u32`)")
        elif not isinstance(process, wasmtime.FuncType) or type_text(process) != "(i32) -> (i32)":
            problems.append("exports `process` with the wrong type (expected (i32) -> (i32))")
        if "memory" not in exports:
            problems.append("does not export its `memory`")
        return problems

    def load(self, path: Path, name: str | None = None, stream: StreamContext | None = None) -> Processor:
        """Compile (or fetch from the cache), check and instantiate the processor at ``path``
        for ``stream`` (default stream 0).

        Raises:
            ProcessorLoadError: unreadable file, invalid module, wrong imports/exports, or a
                trap during initialisation.
        """
        path = Path(path)
        name = name or path.stem
        try:
            wasm = path.read_bytes()
        except OSError as exc:
            raise ProcessorLoadError(f"cannot read processor {path}: {exc.strerror}") from None
        return self.load_bytes(wasm, name, str(path), stream)

    def load_bytes(self, wasm: bytes, name: str, origin: str = "<bytes>",
                   stream: StreamContext | None = None) -> Processor:
        """Like :meth:`load` for a module already in memory (``origin`` names it in errors)."""
        module = self.compile(wasm, origin)
        problems = self.check_imports(module, origin)
        if problems:
            raise ProcessorLoadError(f"processor {name} ({origin}) cannot run here: " + "; ".join(problems))
        return Processor(self, name, Path(origin), module, stream or self.streams[0])

    def close(self) -> None:
        """Stop the epoch clock and the HTTP workers (requests in flight are abandoned)."""
        self.clock.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=1)
def _engine_fingerprint() -> bytes:
    import importlib.metadata
    try:
        version = importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"wasmtime {version} epoch static-memory {sys.platform}".encode()

