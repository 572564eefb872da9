"""One processor instance: its store, linking, calls and failures.

Each processor gets its own store, memory cap, mat table, WASI context (no preopened
directories, no environment, stdout/stderr to the logger) and linker holding exactly the
host functions it imports (:mod:`.linking`). Every call into it runs under its
:class:`~.deadline.CallDeadline`; a call that traps, overruns or breaks the ABI lets the
frame pass unchanged, is logged once with a count, and a processor that keeps failing is
disabled while the video goes on.
"""

from __future__ import annotations

import collections.abc
import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import wasmtime
from wasmtime import _bindings as _ffi
from wasmtime import _func as _wasmtime_func

from . import accessors as _accessors
from .abi import WASMTIME_HOLDING_GIL, AbiError, GuestMemory
from .deadline import CallDeadline, CallTimeout, DeadlineExpired
from .fetch import FetchClient, FetchError
from .frame_ring import FrameRing
from .handles import HandleTable
from .linking import (
    HOST_EXCEPTION,
    HOST_FUNCTIONS,
    define,
    host_exception,
    host_function_for,
)

if TYPE_CHECKING:
    from .engine import Runtime, StreamContext

log = logging.getLogger("vision_host.runtime")

MAT_RESOURCE = "wasm:cv/mat.mat"
#: A call that took longer than this (ms) is logged once per processor as slow (not a failure).
SLOW_CALL_MS = 100.0

# ``process`` is called with wasmtime's ``wasmtime_func_call_unchecked`` (raw values, no
# per-call type checks; its type was checked at load), through a fresh function pointer
# without argtypes: arguments are passed as prepared ctypes objects, which costs a third of
# what the bindings' checked conversions do per call.
#
# The call releases Python's interpreter lock (ctypes' default) unless the processor is quick:
# its last call took under QUICK_CALL_US and the deadline clock is native (its timers fire
# without the lock, so a runaway is still stopped at its deadline). Taking the lock back after a call of a
# few µs waits for whichever thread took it meanwhile: with four streams on two cores that cost
# a sixth of the frames (603 against 719 frames/s). A quick processor that turns into a runaway
# holds the lock (other Python threads wait) until its deadline stops it, once: its next call
# releases the lock.
#
# "Took" is the thread's CPU time when the call's wall time is over QUICK_CALL_US: on a busy
# host a quick call also waits, inside its host functions, for the lock other threads hold
# (a caption's blend releases it), and counting that wait would switch it to the releasing
# call, whose every host function then takes the lock back: several thread switches a frame.
_call_unchecked = _ffi.dll["wasmtime_func_call_unchecked"]
_call_unchecked.restype = ctypes.c_void_p       # wasmtime_error_t * (None: no error)
_call_unchecked_holding_gil = WASMTIME_HOLDING_GIL["wasmtime_func_call_unchecked"]
_call_unchecked_holding_gil.restype = ctypes.c_void_p
#: A processor whose last call took less than this (µs of wall time, else of its thread's CPU
#: time) keeps Python's interpreter lock during its next call, where the epoch clock is native
#: (see above).
QUICK_CALL_US = 1000.0
_ONE = ctypes.c_size_t(1)


class ProcessorLoadError(Exception):
    """A processor could not be loaded; the message says which file and what to fix."""


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
        #: Recent frame copies for post-frames (:class:`.frame_ring.FrameRing`), made by the first keep-frame.
        self.frame_ring: FrameRing | None = None
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

    Args:
        runtime: the run (engine, epoch clock, limits, network policy).
        name: what logs and statistics call it.
        path: where its module came from (for messages).
        module: the compiled module, its imports and exports already checked
            (:meth:`.engine.Runtime.check_imports`).
        stream: the video stream it serves (default stream 0).

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
        #: The next call keeps Python's interpreter lock (see QUICK_CALL_US).
        self._quick = False
        self.ctx = ctx = InstanceContext(runtime, name, stream)
        self._callbacks: list = []     # C callbacks of the linked host functions, kept alive
        self.store = store = wasmtime.Store(runtime.engine)
        #: The deadline of each call into the processor (its store's epoch deadline).
        self.deadline = deadline = CallDeadline(runtime.clock, store)
        store.set_limits(memory_size=runtime.limits.memory_limit_bytes)
        wasi = wasmtime.WasiConfig()
        wasi.argv = [name]
        wasi.stdout_custom = self._guest_output(logging.INFO)
        wasi.stderr_custom = self._guest_output(logging.WARNING)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(runtime.engine)
        linker.define_wasi()
        deadline.arm(runtime.limits.init_timeout_ms, runtime.limits.init_timeout_ms)   # start-up's
        served = _accessors.served_imports(module, HOST_FUNCTIONS) if runtime.wasm_accessors else {}
        if served:
            try:
                ctx.accessors = _accessors.MatAccessors(
                    ctx, store, runtime.accessor_module(),
                    lambda helper_linker, spec, as_module, flush: define(helper_linker, spec, ctx, deadline,
                                                                         self._callbacks, as_module, flush),
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
                define(linker, spec, ctx, deadline, self._callbacks)
        try:
            instance = linker.instantiate(store, module)
            exports = instance.exports(store)
            memory = exports["memory"]
            ctx.memory = GuestMemory(store, memory, _maybe(exports, "cabi_realloc"), _maybe(exports, "malloc"),
                                     _maybe(exports, "free"))
            ctx.memory.rearm = deadline.rearm
            ctx.memory.after_guest = self._flush_accessors
            for start in ("_initialize", "_start"):
                func = _maybe(exports, start)
                if func is not None:
                    self._run_start(func, start)
                    break
        except ProcessorLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any trap during start-up
            why = _describe(DeadlineExpired() if deadline.expired else exc)
            raise ProcessorLoadError(f"processor {name} ({path}) failed while starting: {why}") from None
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
        self._raw = (_ffi.wasmtime_val_raw_t * 1)()
        self._new_trap_slot()

    def _new_trap_slot(self) -> None:
        self._trap = ctypes.POINTER(_ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)

    def _flush_accessors(self) -> None:
        """Write what the processor wrote through the in-wasm accessors back into the mats and
        drop their copies (before host code that may read or change a mat)."""
        if self.ctx.accessors_live:
            self.ctx.accessors.flush()

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
        deadline = self.deadline
        metered = deadline.arm(own_ms, wall_ms)
        memory = ctx.memory
        if memory._blocks:
            memory.reset_arena()      # may call the guest's free: under this call's deadline
        raw = self._raw
        raw[0].i32 = handle
        HOST_EXCEPTION.value = None
        native = deadline.clock.native            # (not cached: a forked child's clock is not native)
        cpu_started = time.thread_time() if native else 0.0   # the quick rule's CPU time, where it applies
        started = deadline.begin_metered(own_ms, wall_ms) if metered else time.perf_counter()
        call = _call_unchecked_holding_gil if self._quick and native else _call_unchecked
        error = call(self._context, self._func_ref, raw, _ONE, self._trap_ref)
        elapsed_us = (time.perf_counter() - started) * 1e6
        self._quick = native and (elapsed_us < QUICK_CALL_US or
                                              (time.thread_time() - cpu_started) * 1e6 < QUICK_CALL_US)
        deadline.metered = False
        self.stats.add(elapsed_us)
        try:
            if ctx.accessors_live:
                ctx.accessors.flush()
            if error or self._trap:
                raise self._call_error(error)
            out_handle = raw[0].i32 & 0xFFFF_FFFF
            result = mats.get(out_handle)
        except Exception as exc:  # noqa: BLE001 - traps, timeouts and ABI errors alike
            exc = DeadlineExpired() if deadline.expired else host_exception(exc)
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
            limit = f"{wall_ms:g} ms" if own_ms >= wall_ms else f"{own_ms:g} ms of its own code, {wall_ms:g} ms in all"
            log.warning("processor %s took %.0f ms on one frame: it runs within its deadline (%s), but the video "
                        "goes at most %.3g frames/s with it (live sources skip frames meanwhile)",
                        self.name, elapsed_us / 1000, limit, 1e6 / elapsed_us)
        if not isinstance(result, np.ndarray) or result.ndim < 2 or result.size == 0:
            self._failed(AbiError(f"returned an empty or invalid mat (handle {out_handle})"))
            return original
        return result

    def _call_error(self, error) -> BaseException:
        """The exception of a failed unchecked call (``error`` from the call, or the trap in
        the trap slot, which is then taken and the slot renewed)."""
        if error:
            exc = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(_ffi.wasmtime_error_t)))
        else:
            exc = wasmtime.Trap._from_ptr(self._trap)
            self._new_trap_slot()
        own = host_exception(exc)
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
        """Cancel the processor's HTTP requests and delete its deadline's timer."""
        self.ctx.fetch.close()
        self.deadline.close()


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
    if isinstance(exc, DeadlineExpired):
        if own_code_ms:
            return (f"call exceeded its {own_code_ms:g} ms deadline (time in the processor's own code) "
                    f"and was interrupted")
        if wall_ms:
            return f"call exceeded its {wall_ms:g} ms deadline (host functions included) and was interrupted"
        return "call exceeded its deadline and was interrupted"
    if isinstance(exc, wasmtime.Trap):
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

