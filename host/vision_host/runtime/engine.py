"""The wasm runtime: engine, sandbox limits, module cache, and processor instances.

Processors are core WebAssembly modules (WASI preview 1) run by wasmtime. Each one gets its
own store, memory cap, mat table, WASI context (no preopened directories, no environment,
stdout/stderr to the logger) and linker holding exactly the host functions it imports.
Every call into a processor runs under an epoch deadline; a call that traps, overruns or
breaks the ABI lets the frame pass unchanged, is logged once with a count, and a processor
that keeps failing is disabled while the video goes on.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import ctypes
import functools
import hashlib
import importlib
import logging
import math
import operator
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wasmtime
from wasmtime import _bindings as _ffi
from wasmtime import _func as _wasmtime_func

from . import accessors as _accessors
from . import overlay as _overlay
from .abi import AbiError, GuestMemory
from .canon import CORE_CTYPES, build_host_functions, build_legacy_functions
from .fetch import FairShare, FetchClient, FetchError, FetchStats, NetworkPolicy
from .handles import HandleTable
from .platform import ProcessorStore

log = logging.getLogger("vision_host.runtime")

WASI_MODULE = "wasi_snapshot_preview1"
EPOCH_TICK_S = 0.005
MAT_RESOURCE = "wasm:cv/mat.mat"

#: Modules whose ``@implements`` functions make up the host side of the contract.
INTERFACE_MODULES = ("platform", "cv", "objdetect", "dnn", "features2d", "fetch", "overlay")


def wit_dir() -> Path:
    """The WIT contract: ``$VISION_HOST_WIT_DIR``, else the package's ``wasm/wit`` (in the
    source tree a link to the project's ``wasm/``)."""
    if env := os.environ.get("VISION_HOST_WIT_DIR"):
        return Path(env)
    return Path(__file__).resolve().parents[1] / "wasm" / "wit"


for _module in INTERFACE_MODULES:
    importlib.import_module(f".{_module}", __package__)

#: Every host function a processor may import, by (module, name): the WIT contract's
#: functions paired with their implementations.
HOST_FUNCTIONS = build_host_functions(wit_dir())
#: The same functions in wasmCV's pre-2025 form (no error results), linked when a module
#: imports that core signature (wasmVision's published processors do).
LEGACY_FUNCTIONS = build_legacy_functions(wit_dir())


def host_function_for(module: str, name: str, functype: wasmtime.FuncType):
    """The host function to link for an import of ``module``/``name`` with core type
    ``functype``, or None when the host has none of that type."""
    spec = HOST_FUNCTIONS.get((module, name))
    if spec is None:
        return None
    if _type_text(functype) == _type_text(spec.functype()):
        return spec
    legacy = LEGACY_FUNCTIONS.get((module, name))
    if legacy is not None and _type_text(functype) == _type_text(legacy.functype()):
        return legacy
    return None


class CallTimeout(Exception):
    """A processor call ran past its wall-clock cap (host functions included)."""


class ProcessorLoadError(Exception):
    """A processor could not be loaded; the message says which file and what to fix."""


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
            the epoch deadline in the processor's code (which stops it between the cap and
            1.25 × the cap, plus a 5 ms tick: the armed deadline is reused across calls) and, when
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


def _type_text(ty) -> str:
    return f"({', '.join(map(str, ty.params))}) -> ({', '.join(map(str, ty.results))})"


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

    def next_frame(self) -> int:
        """Start a new frame (the pipeline calls this once per frame); returns its sequence
        number. ``frame-store`` data older than the previous frame is dropped."""
        self.frame_seq += 1
        self.frame_store.prune_before(self.frame_seq - 1)
        return self.frame_seq


class Runtime:
    """Shared state of one run: the engine, its epoch ticker, the module cache, the network
    policy, the HTTP worker pool, the fair share of the vision server, and the streams
    (:class:`StreamContext`; stream 0 always exists and is what :attr:`processor_store`,
    :attr:`fetch_stats` and :meth:`next_frame` refer to).

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
        self.engine = wasmtime.Engine(cfg)
        self._stop = threading.Event()
        #: Epoch ticks so far, as the ticker counts them (the engine's count is this or one more).
        self.epoch = 0
        self._ticker = threading.Thread(target=self._tick, name="vision-host-epoch", daemon=True)
        self._ticker.start()
        self.compile_ms = 0.0
        self.cache_hits = 0
        _overlay.warm_up()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()
            self.epoch += 1

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
    def frame_store(self) -> ProcessorStore:
        """Stream 0's ``frame-store``."""
        return self.streams[0].frame_store

    @property
    def frame_seq(self) -> int:
        """Stream 0's frame sequence number."""
        return self.streams[0].frame_seq

    @property
    def fetch_stats(self) -> FetchStats:
        """Stream 0's caption-request statistics."""
        return self.streams[0].fetch_stats

    def next_frame(self) -> int:
        """Stream 0's :meth:`StreamContext.next_frame`."""
        return self.streams[0].next_frame()

    def accessor_module(self) -> wasmtime.Module:
        """The compiled helper module of :mod:`.accessors` (compiled once per runtime)."""
        if self._accessor_module is None:
            self._accessor_module = wasmtime.Module(self.engine, wasmtime.wat2wasm(_accessors.HELPER_WAT))
        return self._accessor_module

    def ticks(self, ms: float) -> int:
        """Epoch ticks covering ``ms`` milliseconds (at least 1)."""
        return max(1, math.ceil(ms / (EPOCH_TICK_S * 1000.0))) + 1

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
                problems.append(f"imports {imp.module}#{imp.name} with type {_type_text(imp.type)}, "
                                f"but the host provides {_type_text(spec.functype())}")
        exports = {e.name: e.type for e in module.exports}
        process = exports.get("process")
        if process is None:
            problems.append("does not export `process` (expected `process(frame: u32) -> u32`)")
        elif not isinstance(process, wasmtime.FuncType) or _type_text(process) != "(i32) -> (i32)":
            problems.append("exports `process` with the wrong type (expected (i32) -> (i32))")
        if "memory" not in exports:
            problems.append("does not export its `memory`")
        return problems

    def load(self, path: Path, name: str | None = None, stream: StreamContext | None = None) -> "Processor":
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
                   stream: StreamContext | None = None) -> "Processor":
        """Like :meth:`load` for a module already in memory (``origin`` names it in errors)."""
        module = self.compile(wasm, origin)
        problems = self.check_imports(module, origin)
        if problems:
            raise ProcessorLoadError(f"processor {name} ({origin}) cannot run here: " + "; ".join(problems))
        return Processor(self, name, Path(origin), module, stream or self.streams[0])

    def close(self) -> None:
        """Stop the ticker and the HTTP workers (requests in flight are abandoned)."""
        self._stop.set()
        self._ticker.join()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "Runtime":
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


@dataclass
class ProcessorStats:
    """Per-processor call statistics (µs) and failure counts."""

    calls: int = 0
    errors: int = 0
    total_us: float = 0.0
    recent_us: list = field(default_factory=lambda: [0.0] * 4096)    # a ring of the last 4096 calls

    def add(self, us: float) -> None:
        self.recent_us[self.calls & 4095] = us
        self.calls += 1
        self.total_us += us

    def summary(self) -> dict:
        """``{"calls", "mean_us", "p99_us", "errors"}`` (p99 over the last 4096 calls)."""
        n = min(self.calls, len(self.recent_us))
        p99 = float(np.percentile(self.recent_us[:n], 99)) if n else 0.0
        return {"calls": self.calls, "mean_us": round(self.total_us / self.calls, 1) if self.calls else 0.0,
                "p99_us": round(p99, 1), "errors": self.errors}


class InstanceContext:
    """What host functions see of the processor calling them (passed as their first argument)."""

    def __init__(self, runtime: Runtime, name: str, stream: StreamContext):
        self.name = name
        self.runtime = runtime
        self.stream = stream
        self.config = stream.config
        self.processor_store = stream.processor_store
        self.frame_store = stream.frame_store
        self.models_dir = runtime.models_dir
        self.println = runtime.println
        self.log = logging.getLogger(f"vision_host.processor.{name}")
        self._limit = runtime.limits.max_live_mats
        self._tables: dict[str, HandleTable] = {}
        self.mats = self.table(MAT_RESOURCE)
        self.frame_handle = 0          # handle of the frame being processed, and its sequence
        self.frame_number = 0
        self.fetch = FetchClient(runtime.policy, runtime.pool, stream.fetch_stats, runtime.fair_share, stream.index)
        self.memory: GuestMemory | None = None
        #: The in-wasm mat accessors (:class:`.accessors.MatAccessors`), or None; while
        #: ``accessors_live``, they hold copies of mat data that host functions must flush first.
        self.accessors: _accessors.MatAccessors | None = None
        self.accessors_live = False
        self._logged: set[str] = set()

    def table(self, resource: str) -> HandleTable:
        """This instance's handle table for ``resource`` (``"<interface>.<resource>"``)."""
        found = self._tables.get(resource)
        if found is None:
            found = self._tables[resource] = HandleTable(resource.rsplit(".", 1)[-1], self._limit)
        return found

    def frame_seq(self, handle: int) -> int | None:
        """The run-wide frame number of the frame this instance knows as ``handle``, or None
        when ``handle`` is not the frame being processed."""
        return self.frame_number if handle == self.frame_handle and handle else None

    def log_once(self, message: str, level: int = logging.ERROR) -> None:
        """Log ``message`` with the processor's logger the first time this instance hits it."""
        if message not in self._logged:
            self._logged.add(message)
            self.log.log(level, "%s", message)

    def note_fetch_error(self, url: str, code: FetchError) -> None:
        """Log a refused destination once per URL, with what to do about it."""
        if code == FetchError.DESTINATION_NOT_ALLOWED:
            self.log_once(f"processor {self.name} tried to reach {url}, which is not an allowed destination: "
                          f"set a *-url config key to it or pass --allow HOST:PORT")


class _Exports(collections.abc.Mapping):
    """A read-only view of an instance's exports whose functions call ``after()`` when they
    return (or raise)."""

    def __init__(self, exports, after):
        self._exports = exports
        self._after = after

    def __getitem__(self, name: str):
        item = self._exports[name]
        return _AfterCall(item, self._after) if isinstance(item, wasmtime.Func) else item

    def __iter__(self):
        return iter(self._exports)

    def __len__(self) -> int:
        return len(self._exports)


class _AfterCall:
    """A wasm function (attributes forwarded) that calls ``after()`` once a call returns."""

    __slots__ = ("func", "after")

    def __init__(self, func: wasmtime.Func, after):
        self.func = func
        self.after = after

    def __call__(self, store, *args):
        try:
            return self.func(store, *args)
        finally:
            self.after()

    def __getattr__(self, name: str):
        return getattr(self.func, name)


class Processor:
    """One instantiated processor: call :meth:`process` once per frame.

    Raises (from the constructor):
        ProcessorLoadError: instantiation or ``_initialize`` trapped or timed out.
    """

    def __init__(self, runtime: Runtime, name: str, path: Path, module: wasmtime.Module,
                 stream: StreamContext | None = None):
        self.runtime = runtime
        self.stream = stream = stream or runtime.streams[0]
        self.name = name
        self.path = path
        self.stats = ProcessorStats()
        self.disabled = False
        self.last_error: str | None = None
        self._consecutive = 0
        self._suspect = False
        self._slow_logged = False
        self._errors_by_kind: dict[str, int] = {}
        self.ctx = ctx = InstanceContext(runtime, name, stream)
        self._callbacks: list = []     # C callbacks of the linked host functions, kept alive
        # Deadline accounting of the current process call (s). `_metered`: the processor's own
        # code has a budget of its own (call_timeout_ms below the wall-clock cap), so host
        # functions are timed and the epoch deadline re-armed after each; otherwise the one
        # wall-clock deadline armed at the start of the call covers everything.
        self._in_call = self._metered = False
        self._budget_s = self._hard_s = self._guest_s = 0.0
        self._call_started = self._resumed = 0.0
        # The epoch tick (Runtime.epoch) before which the armed epoch deadline cannot fire; -1:
        # unknown (armed for something else), so the next call arms its own.
        self._armed = -1
        self._wall = (0.0, 0)          # (wall-clock deadline in ms, its epoch ticks), cached
        self.store = store = wasmtime.Store(runtime.engine)
        store.set_limits(memory_size=runtime.limits.memory_limit_bytes)
        wasi = wasmtime.WasiConfig()
        wasi.argv = [name]
        wasi.stdout_custom = self._guest_output(logging.INFO)
        wasi.stderr_custom = self._guest_output(logging.WARNING)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(runtime.engine)
        linker.define_wasi()
        store.set_epoch_deadline(runtime.ticks(runtime.limits.init_timeout_ms))
        served = _accessors.served_imports(module, HOST_FUNCTIONS) if runtime.wasm_accessors else {}
        if served:
            try:
                ctx.accessors = _accessors.MatAccessors(
                    ctx, store, runtime.accessor_module(),
                    lambda helper_linker, spec, as_module, flush: _define(helper_linker, spec, self, self._callbacks,
                                                                          as_module, flush),
                    HOST_FUNCTIONS)
            except wasmtime.WasmtimeError as exc:     # e.g. a memory cap below the helper's memory
                log.info("processor %s: mat accessors stay in the host (%s)", name, str(exc).splitlines()[0])
                ctx.accessors = None
        for imp in module.imports:
            spec = (host_function_for(imp.module, imp.name, imp.type)
                    if isinstance(imp.type, wasmtime.FuncType) else None)
            if spec is None:
                continue
            if ctx.accessors is not None and imp.module == _accessors.MAT and imp.name in served:
                linker.define(store, imp.module, imp.name, ctx.accessors.exports[imp.name])
            else:
                _define(linker, spec, self, self._callbacks)
        try:
            instance = linker.instantiate(store, module)
            exports = instance.exports(store)
            memory = exports["memory"]
            ctx.memory = GuestMemory(store, memory, _maybe(exports, "cabi_realloc"), _maybe(exports, "malloc"),
                                     _maybe(exports, "free"))
            ctx.memory.rearm = self._rearm
            ctx.memory.after_guest = self._flush_accessors
            for start in ("_initialize", "_start"):
                func = _maybe(exports, start)
                if func is not None:
                    self._run_start(func, start)
                    break
        except ProcessorLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any trap during start-up
            raise ProcessorLoadError(f"processor {name} ({path}) failed while starting: {_describe(exc)}") from None
        #: The instance's exports; a function called through them from outside :meth:`process`
        #: (tests, tools) writes back what the processor wrote through the in-wasm accessors
        #: when it returns, as every return from the processor's code to the host does.
        self.exports = _Exports(exports, self._flush_accessors)
        self._process = exports["process"]
        # What one process call needs, prepared once: wasmtime's unchecked call (the export's
        # type, (i32) -> (i32), was checked at load) with its argument/result slot, the trap
        # slot, and the store's context.
        self._context = ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
        self._func_ref = ctypes.byref(self._process._func)
        self._ticks: dict[int, ctypes.c_uint64] = {}
        self._raw = (_ffi.wasmtime_val_raw_t * 1)()
        self._new_trap_slot()

    def _new_trap_slot(self) -> None:
        self._trap = ctypes.POINTER(_ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)

    def _timed(self, impl):
        """``impl`` bound to this instance. In a metered call (see ``__init__``) the time it
        takes is kept out of the guest's budget: on return the epoch deadline is reset to the
        guest time left, and the wall-clock cap is checked on entry."""
        ctx = self.ctx
        perf_counter = time.perf_counter

        def call(*args):
            if not self._metered:
                return impl(ctx, *args)
            entered = perf_counter()
            self._guest_s += entered - self._resumed
            if entered - self._call_started > self._hard_s:
                raise CallTimeout(f"call ran for over {self._hard_s * 1000:g} ms including host functions "
                                  f"and was stopped")
            try:
                return impl(ctx, *args)
            finally:
                self._resumed = perf_counter()
                self._rearm()
        return call

    def _flush_accessors(self) -> None:
        """Write what the processor wrote through the in-wasm accessors back into the mats and
        drop their copies (before host code that may read or change a mat)."""
        if self.ctx.accessors_live:
            self.ctx.accessors.flush()

    def _metered_host_call(self, impl, slots, get, n: int):
        """Call host function ``impl`` with the arguments in ``slots`` during a metered call:
        the wall-clock cap is checked on entry, the time inside is kept out of the guest's
        budget, and the epoch deadline is re-armed to the guest time left on return."""
        entered = time.perf_counter()
        self._guest_s += entered - self._resumed
        if entered - self._call_started > self._hard_s:
            raise CallTimeout(f"call ran for over {self._hard_s * 1000:g} ms including host functions "
                              f"and was stopped")
        try:
            return impl(self.ctx, *get(slots)) if n > 1 else impl(self.ctx, get(slots)) if n else impl(self.ctx)
        finally:
            self._resumed = time.perf_counter()
            self._rearm()

    def _rearm(self) -> None:
        """In a metered call, set the epoch deadline to the guest time left (host functions
        run outside it; before re-entering the guest, e.g. its allocator, it must be re-armed).
        Otherwise nothing: the call's one wall-clock deadline stands."""
        if self._metered:
            left_ms = (self._budget_s - self._guest_s) * 1000.0
            self.store.set_epoch_deadline(self.runtime.ticks(left_ms) if left_ms > 0 else 1)
            self._armed = -1

    def _run_start(self, func, which: str) -> None:
        try:
            func(self.store)
        except wasmtime.ExitTrap as exc:
            if exc.code != 0:
                raise ProcessorLoadError(f"processor {self.name} exited with status {exc.code} in {which}") from None

    def _guest_output(self, level: int):
        logger = logging.getLogger(f"vision_host.processor.{self.name}")

        def write(data: bytes) -> int:
            for line in data.decode("utf-8", "replace").splitlines():
                if line.strip():
                    logger.log(level, "%s", line)
            return len(data)
        return write

    @property
    def memory_bytes(self) -> int:
        """Current size of the instance's linear memory in bytes."""
        return self.ctx.memory.size if self.ctx.memory else 0

    def process(self, frame: np.ndarray) -> np.ndarray:
        """Run the processor on ``frame`` (H×W×3 uint8 BGR) and return the frame to pass on.

        Never raises for processor faults: a failed call (a trap, a call past its deadline,
        an ABI violation) returns the input frame (copied beforehand once the processor has
        failed before, so partial drawing is undone) and counts an error; after
        ``max_consecutive_failures`` in a row the processor is disabled and every later frame
        passes through untouched. A slow call that ends within its deadline is not a failure
        (its time is in :attr:`stats`; the first one over :data:`SLOW_CALL_MS` is logged once).
        """
        if self.disabled:
            return frame
        original = frame
        if self._suspect:
            frame = frame.copy()
        ctx = self.ctx
        mats = ctx.mats
        handle = mats.insert(frame)
        ctx.frame_handle, ctx.frame_number = handle, self.stream.frame_seq
        own_ms, wall_ms = self.runtime.limits.deadlines_ms()
        metered = own_ms < wall_ms
        if metered:
            _set_epoch_deadline(self._context, self._ticks_of(own_ms))
            self._armed = -1
        else:
            # One wall-clock deadline. The armed epoch deadline is reused while it falls in
            # [deadline, deadline + a quarter of it] from now, and re-armed otherwise (about
            # four times per deadline span): a call is never interrupted before its deadline
            # and always by 1.25× it (plus a tick), and most frames skip the C call.
            if self._wall[0] != wall_ms:
                self._wall = (wall_ms, self.runtime.ticks(wall_ms))
            ticks = self._wall[1]
            earliest = self.runtime.epoch + ticks
            if not earliest <= self._armed <= earliest + (ticks >> 2):
                _set_epoch_deadline(self._context, self._ticks_of_count(ticks + (ticks >> 2)))
                self._armed = earliest + (ticks >> 2)
        memory = ctx.memory
        if memory._blocks:
            memory.reset_arena()      # may call the guest's free: under this call's deadline
        raw = self._raw
        raw[0].i32 = handle
        _HOST_EXCEPTION.value = None
        if metered:
            self._metered = True
            self._budget_s, self._hard_s, self._guest_s = own_ms / 1000.0, wall_ms / 1000.0, 0.0
            started = self._call_started = self._resumed = time.perf_counter()
        else:
            started = time.perf_counter()
        self._in_call = True
        error = _call_unchecked(self._context, self._func_ref, raw, _ONE, self._trap_ref)
        elapsed_us = (time.perf_counter() - started) * 1e6
        self._in_call = self._metered = False
        self.stats.add(elapsed_us)
        try:
            if ctx.accessors_live:
                ctx.accessors.flush()
            if error or self._trap:
                raise self._call_error(error)
            out_handle = raw[0].i32 & 0xFFFF_FFFF
            result = mats.get(out_handle)
        except Exception as exc:  # noqa: BLE001 - traps, timeouts and ABI errors alike
            exc = _host_exception(exc)
            mats.discard(handle)
            mats.drop_from(handle + 1)   # mats created by the failed call
            mats.release_closed()
            self._failed(exc)
            return original
        mats.discard(handle)
        mats.discard(out_handle)
        mats.release_closed()
        self._consecutive = 0
        if elapsed_us > SLOW_CALL_MS * 1000 and not self._slow_logged:
            self._slow_logged = True
            deadline = f"{wall_ms:g} ms" if own_ms >= wall_ms else f"{own_ms:g} ms of its own code, {wall_ms:g} ms in all"
            log.warning("processor %s took %.0f ms on one frame: it runs within its deadline (%s), but the video "
                        "goes at most %.3g frames/s with it (live sources skip frames meanwhile)",
                        self.name, elapsed_us / 1000, deadline, 1e6 / elapsed_us)
        if not isinstance(result, np.ndarray) or result.ndim < 2 or result.size == 0:
            self._failed(AbiError(f"returned an empty or invalid mat (handle {out_handle})"))
            return original
        return result

    def _ticks_of(self, ms: float) -> ctypes.c_uint64:
        """:meth:`Runtime.ticks` of ``ms`` as the C value the deadline is set with (cached)."""
        return self._ticks_of_count(self.runtime.ticks(ms))

    def _ticks_of_count(self, ticks: int) -> ctypes.c_uint64:
        """``ticks`` as the C value the deadline is set with (cached)."""
        found = self._ticks.get(ticks)
        if found is None:
            if len(self._ticks) > 64:
                self._ticks.clear()
            found = self._ticks[ticks] = ctypes.c_uint64(ticks)
        return found

    def _call_error(self, error) -> BaseException:
        """The exception of a failed unchecked call (``error`` from the call, or the trap in
        the trap slot, which is then taken and the slot renewed)."""
        if error:
            exc = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))
        else:
            exc = wasmtime.Trap._from_ptr(self._trap)
            self._new_trap_slot()
        own = _host_exception(exc)
        if _wasmtime_func.LAST_EXCEPTION is own:      # consumed here, not by a later checked call
            _wasmtime_func.LAST_EXCEPTION = None
        return own

    def _failed(self, exc: BaseException) -> None:
        own_ms, wall_ms = self.runtime.limits.deadlines_ms()
        why = _describe(exc, own_ms if own_ms < wall_ms else None, wall_ms)
        cap = self.runtime.limits.memory_limit_bytes
        if isinstance(exc, wasmtime.Trap) and self.memory_bytes >= 0.75 * cap:
            # A guest whose allocation failed (memory.grow refused past the cap) usually traps
            # with its own message (an `unreachable`, an out-of-memory panic) that does not say
            # so; a trap with memory near the cap very likely is that: say it. (The request
            # that failed may have been larger than what is left, hence "near".)
            why += (f"; its memory is near its {cap / 2**20:g} MiB cap (raise it with --memory-limit-mb "
                    f"if the processor needs more)")
        self.stats.errors += 1
        self._consecutive += 1
        self._suspect = True
        self.last_error = why
        count = self._errors_by_kind.get(why, 0) + 1
        self._errors_by_kind[why] = count
        if count == 1 or (count & (count - 1)) == 0 and count >= 16:
            log.error("processor %s: %s; the frame passes on unchanged%s", self.name, why,
                      "" if count == 1 else f" ({count} times so far)")
        if self._consecutive >= self.runtime.limits.max_consecutive_failures:
            self.disabled = True
            # It is never called again: release the mats (and other host objects) it held,
            # or a processor disabled for leaking them would keep them for the whole run.
            for table in self.ctx._tables.values():
                table.drop_from(0)
            log.error("processor %s disabled after %d failed calls in a row (last: %s); the video goes on "
                      "without it", self.name, self._consecutive, why)

    def close(self) -> None:
        """Cancel the processor's HTTP requests."""
        self.ctx.fetch.close()


# wasmtime's "unchecked" API: raw values, no per-call type checks. Host functions are defined
# with unchecked callbacks, and ``process`` is called with ``wasmtime_func_call_unchecked``
# (its type was checked at load), through the ctypes functions themselves.
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _env: None)
_UNCHECKED = getattr(_ffi, "wasmtime_func_unchecked_callback_t", None)
_define_unchecked = getattr(_ffi, "wasmtime_linker_define_func_unchecked", None)
# Fresh function pointers without argtypes: arguments are passed as prepared ctypes objects,
# which costs a third of what the bindings' checked conversions do per call.
_call_unchecked = _ffi.dll["wasmtime_func_call_unchecked"]
_call_unchecked.restype = ctypes.c_void_p       # wasmtime_error_t * (None: no error)
_set_epoch_deadline = _ffi.dll["wasmtime_context_set_epoch_deadline"]
_set_epoch_deadline.restype = None
_ONE = ctypes.c_size_t(1)
#: A call that took longer than this (ms) is logged once per processor as slow (not a failure).
SLOW_CALL_MS = 100.0


_SLOT_BYTES = ctypes.sizeof(_ffi.wasmtime_val_raw_t)


@functools.lru_cache(maxsize=None)
def _slots_type(param_types: tuple, result_type) -> type:
    """A ctypes structure laid over wasmtime's raw argument array (one 16-byte slot per
    argument, the result in slot 0): field ``aK`` reads argument K as ``param_types[K]``,
    ``ret`` writes the result as ``result_type``."""
    fields = []
    for k in range(max(len(param_types), 1 if result_type is not None else 0)):
        members = [(f"a{k}", param_types[k])] if k < len(param_types) else []
        if k == 0 and result_type is not None:
            members.append(("ret", result_type))
        members.append(("_bytes", ctypes.c_byte * _SLOT_BYTES))
        fields.append((f"s{k}", type(f"Slot{k}", (ctypes.Union,), {"_fields_": members})))
    return type("Slots", (ctypes.Structure,), {"_anonymous_": [f for f, _ in fields], "_fields_": fields})


def _define(linker: wasmtime.Linker, spec, proc: "Processor", keep: list, as_module: str | None = None,
            flush: bool = True) -> None:
    """Define host function ``spec`` in ``linker`` for processor ``proc`` (under ``as_module``
    instead of its own interface when given).

    With ``flush`` (and unless its interface never touches mats, :data:`.accessors.NO_MAT_INTERFACES`)
    the call first writes back what the processor wrote through the in-wasm mat accessors
    and drops their copies, so the host function sees current mats and the processor then
    reads what it changed.

    Uses wasmtime's unchecked callback (arguments and result as raw values in one array),
    read and written through a ctypes structure of the function's own slot types; a function
    with a :attr:`~.canon.HostFunction.direct` form gets its arguments lifted by that
    structure and calls its implementation with no canonical-ABI layer in between. Falls back
    to ``define_func`` when this wasmtime-py does not expose the unchecked API. The C callback
    is appended to ``keep``, which must outlive the linker's instances.
    """
    if _UNCHECKED is None or _define_unchecked is None:
        timed = proc._timed(spec.impl if spec.impl is not None else spec.direct[1])

        def checked(*args):
            if flush and spec.module not in _accessors.NO_MAT_INTERFACES:
                proc._flush_accessors()
            return timed(*args)
        linker.define_func(as_module or spec.module, spec.name, spec.functype(), checked)
        return
    if spec.direct is not None:
        param_types, impl = spec.direct
    else:
        param_types, impl = tuple(CORE_CTYPES[c] for c in spec.params), spec.impl
    has_result = bool(spec.results)
    slots = _slots_type(param_types, CORE_CTYPES[spec.results] if has_result else None)
    n = len(param_types)
    get = operator.attrgetter(*[f"a{k}" for k in range(n)]) if n else None
    ctx = proc.ctx
    Trap = wasmtime.Trap
    flushing = flush and spec.module not in _accessors.NO_MAT_INTERFACES

    def callback(_env, _caller, raw, _n):
        try:
            r = raw[0]
            if flushing and ctx.accessors_live:
                ctx.accessors.flush()
            if proc._metered:
                value = proc._metered_host_call(impl, r, get, n)
            elif n > 1:
                value = impl(ctx, *get(r))
            elif n:
                value = impl(ctx, get(r))
            else:
                value = impl(ctx)
            if has_result:
                r.ret = value
            return 0
        except BaseException as exc:   # noqa: BLE001 - re-raised by wasmtime-py on return
            _HOST_EXCEPTION.value = exc
            _wasmtime_func.LAST_EXCEPTION = exc
            return ctypes.cast(Trap("python exception")._consume(), ctypes.c_void_p).value

    c_callback = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(slots),
                                  ctypes.c_size_t)(callback)
    keep.append(c_callback)
    module, name = (as_module or spec.module).encode(), spec.name.encode()
    functype = spec.functype()     # must outlive the call: the C side borrows its pointer
    error = _define_unchecked(linker.ptr(), ctypes.create_string_buffer(module), len(module),
                              ctypes.create_string_buffer(name), len(name), functype.ptr(),
                              ctypes.cast(c_callback, _UNCHECKED), None, _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


#: The exception a host function raised on this thread, by the unchecked callback. wasmtime-py
#: keeps it in one global for all threads, which streams on other threads may overwrite
#: before it is re-raised; this copy is per thread.
_HOST_EXCEPTION = threading.local()


def _host_exception(raised: BaseException) -> BaseException:
    """The exception that really ended a call on this thread: the host function's own when
    one raised (``raised`` may then be another thread's, or a bare trap), else ``raised``."""
    own = getattr(_HOST_EXCEPTION, "value", None)
    if own is None:
        return raised
    _HOST_EXCEPTION.value = None
    return own


def _maybe(exports, name: str):
    try:
        return exports[name]
    except KeyError:
        return None


def _describe(exc: BaseException, own_code_ms: float | None = None, wall_ms: float | None = None) -> str:
    """One sentence for a failed call: ``own_code_ms`` is the budget of the processor's own
    code when the call had one, ``wall_ms`` its wall-clock deadline (both in ms)."""
    if isinstance(exc, AbiError):
        return f"ABI violation: {exc}"
    if isinstance(exc, CallTimeout):
        return str(exc)
    if isinstance(exc, wasmtime.Trap):
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            if own_code_ms:
                return (f"call exceeded its {own_code_ms:g} ms deadline (time in the processor's own code) "
                        f"and was interrupted")
            if wall_ms:
                return f"call exceeded its {wall_ms:g} ms deadline (host functions included) and was interrupted"
            return "call exceeded its deadline and was interrupted"
        return f"trapped ({_trap_cause(str(exc))})"
    if isinstance(exc, wasmtime.ExitTrap):
        return f"called proc_exit({exc.code})"
    return f"failed: {type(exc).__name__}: {exc}"


def _trap_cause(text: str) -> str:
    """The sentence of a wasmtime trap's text that says what happened.

    wasmtime formats a trap as "error while executing at wasm backtrace:", the frames, then
    "Caused by:" and the cause ("wasm trap: wasm `unreachable` instruction executed"); the
    first line alone says nothing, so the cause is taken, with the innermost frame (which
    names the function when the module has a name section) after it.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Caused by:" in lines:
        at = lines.index("Caused by:")
        cause = "; ".join(lines[at + 1:]) or "trap"
        frames = [line for line in lines[1:at] if line[:1].isdigit()]
        if frames:
            cause += f" in {frames[0].split(' - ', 1)[-1]}"
        return cause
    return lines[0] if lines else "trap"
