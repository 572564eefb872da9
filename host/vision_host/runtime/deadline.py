"""Call deadlines: how a processor call that runs away is stopped.

wasmtime's epoch interruption (``Config.epoch_interruption``; wasmtime's documentation of
``Engine::increment_epoch`` and ``Store::set_epoch_deadline``): an :class:`EpochClock`
advances the engine's epoch every :data:`EPOCH_TICK_S` s, and a store's epoch deadline, set
in ticks from now, traps the guest's code once reached.

Where the C library has POSIX timers (Linux), the clock is native: a ``timer_create`` timer
with ``SIGEV_THREAD`` notification (POSIX.1-2008, ``timer_create(2)``) has the C library call
``wasmtime_engine_increment_epoch(engine)`` on a thread of its own at every tick, so the epoch
advances without Python's global interpreter lock. A quick processor's calls can then hold
the lock (see :mod:`.processor`): with four streams on two cores, releasing and taking it back
around each call of a few µs cost a sixth of the frames. Elsewhere a Python thread ticks, and
every call releases the lock. A child made by ``fork()`` inherits neither timers nor threads,
and must not start native timers (glibc's are not fork-safe): its clocks tick from Python
threads (``os.register_at_fork``). A :class:`CallDeadline` arms one
processor's deadline for each call, in one of the two modes of
:meth:`.engine.SandboxLimits.deadlines_ms`: one wall-clock deadline for the whole call, host
functions included, or a budget of the processor's own code (re-armed after each host
function) under a wall-clock cap checked whenever the processor calls the host.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import math
import os
import sys
import threading
import time
import weakref

import wasmtime
from wasmtime import _bindings as _ffi

#: Seconds between two epoch ticks: the resolution of every deadline.
EPOCH_TICK_S = 0.005

#: wasmtime's shared library as a ctypes.PyDLL: its functions are called holding Python's
#: interpreter lock (for C calls that never block, or wasm calls that are known to be quick).
WASMTIME_HOLDING_GIL = ctypes.PyDLL(_ffi.dll._name, handle=_ffi.dll._handle)

# wasmtime's C call, through a fresh function pointer without argtypes: the store's context
# and the ticks are passed as prepared ctypes objects (cheaper than the bindings' checks);
# it only stores a number, so it keeps the interpreter lock.
_set_epoch_deadline = WASMTIME_HOLDING_GIL["wasmtime_context_set_epoch_deadline"]
_set_epoch_deadline.restype = None


class CallTimeout(Exception):
    """A processor call ran past its wall-clock cap (host functions included)."""


class _SigVal(ctypes.Union):
    _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]


class _SigEvent(ctypes.Structure):
    """``struct sigevent`` as Linux lays it out (64 bytes; the thread fields of its union)."""

    _fields_ = [("sigev_value", _SigVal), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("sigev_notify_function", ctypes.c_void_p), ("sigev_notify_attributes", ctypes.c_void_p),
                ("_reserved", ctypes.c_char * 32)]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_SIGEV_THREAD = 2
_CLOCK_MONOTONIC = 1
#: Native timers running, by id: (the timer, its engine). The engine stays referenced here while
#: its timer runs, so it is never freed under a tick, even when its clock is dropped unclosed.
_LIVE_TIMERS: dict[int, tuple[ctypes.c_void_p, wasmtime.Engine]] = {}
#: Engines whose native timer was deleted, kept alive for a while: a tick's thread started just
#: before the deletion may still be calling into the engine. (time.monotonic() retired, engine)
_RETIRED: list[tuple[float, wasmtime.Engine]] = []
_RETIRED_KEEP_S = 5.0


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library (the process's own symbols), loaded once."""
    return ctypes.CDLL(None, use_errno=True)


def _delete_timer(key: int) -> None:
    """Delete native timer ``key`` (no-op when gone) and retire its engine."""
    entry = _LIVE_TIMERS.pop(key, None)
    if entry is None:
        return
    timer, engine = entry
    _libc().timer_delete(timer)
    now = time.monotonic()
    _RETIRED[:] = [(t, e) for t, e in _RETIRED if now - t < _RETIRED_KEEP_S] + [(now, engine)]


#: Every clock not closed (started again in a forked child: see _after_fork_in_child).
_CLOCKS: weakref.WeakSet = weakref.WeakSet()
#: A native timer was started in this process (the C library's timer thread then exists).
_TIMER_STARTED = False
#: This process was forked from one with native timers: it must not start any (see below).
_FORKED_FROM_TIMERS = False


def _after_fork_in_child() -> None:
    """In a child made by ``fork()``: POSIX timers are not inherited (``fork(2)``) and only the
    forking thread goes on, so no inherited clock ticks and a runaway would never be stopped.

    Nor may the child start native timers when the parent had some: the C library's timer
    thread (glibc's) may have held the lock ``timer_create`` takes at the moment of the fork,
    and a child that asks for a timer then waits for ever. So every clock not closed starts
    again with a Python thread (a clock with a thread is not native: processor calls release
    the interpreter lock, so the thread ticks through a runaway), and so does every clock made
    in the child. The parent's timer ids are forgotten, never deleted (the child's own timers
    may reuse them)."""
    global _FORKED_FROM_TIMERS
    _FORKED_FROM_TIMERS = _FORKED_FROM_TIMERS or _TIMER_STARTED
    _LIVE_TIMERS.clear()
    _RETIRED.clear()
    for clock in list(_CLOCKS):
        clock.native = False
        clock._start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _delete_timers_at_exit() -> None:
    """Stop every native timer before the interpreter frees the engines (a clock not closed)."""
    for key in list(_LIVE_TIMERS):
        _delete_timer(key)


def _native_timer(engine: wasmtime.Engine) -> ctypes.c_void_p | None:
    """Start a POSIX timer calling ``wasmtime_engine_increment_epoch(engine)`` every
    :data:`EPOCH_TICK_S` s on threads of the C library; None where there is none (not Linux)."""
    global _TIMER_STARTED
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8 or _FORKED_FROM_TIMERS:
        return None
    try:
        libc = _libc()
        create, settime = libc.timer_create, libc.timer_settime
    except (OSError, AttributeError):
        return None
    event = _SigEvent()
    event.sigev_notify = _SIGEV_THREAD
    event.sigev_notify_function = ctypes.cast(_ffi.dll.wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    event.sigev_value.sival_ptr = ctypes.cast(engine.ptr(), ctypes.c_void_p).value
    timer = ctypes.c_void_p()
    if create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
        return None
    _TIMER_STARTED = True
    tick = _TimeSpec(0, round(EPOCH_TICK_S * 1e9))
    if settime(timer, 0, ctypes.byref(_ITimerSpec(tick, tick)), None) != 0:
        libc.timer_delete(timer)
        return None
    return timer


class EpochClock:
    """Advances ``engine``'s epoch every :data:`EPOCH_TICK_S` s until :meth:`close`: from a
    native timer where the C library has POSIX timers (:attr:`native`), else from a daemon
    thread.

    Attributes:
        native: the epoch advances without Python's interpreter lock (a wasm call may hold it).
        epoch: with the thread, ticks so far as the clock counts them (the engine's count is
            this or one more); with the native timer, 0 (not counted: calls arm every time).
    """

    def __init__(self, engine: wasmtime.Engine):
        self.engine = engine
        self.epoch = 0
        self._stop = threading.Event()
        self.native = False
        self._thread: threading.Thread | None = None
        self._start(first=True)
        _CLOCKS.add(self)

    def _start(self, first: bool = False) -> None:
        """Start ticking: the native timer where there is one (first start only), else the
        thread (again in a forked child, where neither is inherited)."""
        if self._stop.is_set():
            return
        timer = _native_timer(self.engine) if first else None
        if timer is not None:
            self.native = True
            _LIVE_TIMERS[id(self)] = (timer, self.engine)
        else:
            self._thread = threading.Thread(target=self._tick, name="vision-host-epoch", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()
            self.epoch += 1

    @staticmethod
    def ticks(ms: float) -> int:
        """Epoch ticks covering ``ms`` milliseconds (at least 1, plus one for the tick under way)."""
        return max(1, math.ceil(ms / (EPOCH_TICK_S * 1000.0))) + 1

    def close(self) -> None:
        """Stop ticking (deadlines armed from now on never fire). Idempotent."""
        self._stop.set()
        _CLOCKS.discard(self)
        if self._thread is not None:
            self._thread.join()
        _delete_timer(id(self))

    def __del__(self) -> None:
        _delete_timer(id(self))     # a clock dropped unclosed: its timer must not tick on


class CallDeadline:
    """The epoch deadline of one processor's store, armed for each of its calls.

    Args:
        clock: the run's :class:`EpochClock`.
        store: the processor's store (its epoch deadline is what this arms).

    Attributes:
        metered: True during a call whose processor's own code has a budget of its own
            (``call_timeout_ms`` below the wall-clock cap): host functions then go through
            :meth:`host_call` (or :meth:`timed`), which keeps their time out of the budget and
            checks the cap. Otherwise the one wall-clock deadline armed by :meth:`arm` covers
            the whole call.
    """

    def __init__(self, clock: EpochClock, store: wasmtime.Store):
        self.clock = clock
        self.store = store
        self._context = ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
        self.metered = False
        # Accounting of the current metered call (s, time.perf_counter()).
        self._budget_s = self._hard_s = self._guest_s = 0.0
        self._call_started = self._resumed = 0.0
        # The epoch tick (EpochClock.epoch) before which the armed deadline cannot fire; -1:
        # unknown (armed for something else), so the next call arms its own.
        self._armed = -1
        self._wall = (0.0, 0)          # (wall-clock deadline in ms, its epoch ticks), cached
        self._ticks: dict[int, ctypes.c_uint64] = {}

    def arm(self, own_ms: float, wall_ms: float) -> bool:
        """Arm the deadline of the call about to start (``(own_ms, wall_ms)`` as
        :meth:`.engine.SandboxLimits.deadlines_ms` gives them); True when the call is metered
        (``own_ms < wall_ms``: then call :meth:`begin_metered` right before it).

        With one wall-clock deadline and the thread's clock, the armed epoch deadline is reused
        while it falls in [deadline, deadline + a quarter of it] from now, and re-armed
        otherwise (about four times per deadline span): a call is never interrupted before its
        deadline and always by 1.25× it (plus a tick), and most calls skip the C call. With
        the native clock every call arms its deadline.
        """
        if own_ms < wall_ms:
            _set_epoch_deadline(self._context, self._ticks_of(self.clock.ticks(own_ms)))
            self._armed = -1
            return True
        if self.clock.native:          # ticks are not counted here: arm every call (a fraction of a µs)
            _set_epoch_deadline(self._context, self._ticks_of(self.clock.ticks(wall_ms)))
            return False
        if self._wall[0] != wall_ms:
            self._wall = (wall_ms, self.clock.ticks(wall_ms))
        ticks = self._wall[1]
        earliest = self.clock.epoch + ticks
        if not earliest <= self._armed <= earliest + (ticks >> 2):
            _set_epoch_deadline(self._context, self._ticks_of(ticks + (ticks >> 2)))
            self._armed = earliest + (ticks >> 2)
        return False

    def begin_metered(self, own_ms: float, wall_ms: float) -> float:
        """A metered call starts now, with ``own_ms`` of its own code and ``wall_ms`` in all;
        returns its start (``time.perf_counter()``, s). Set :attr:`metered` False when it ends."""
        self.metered = True
        self._budget_s, self._hard_s, self._guest_s = own_ms / 1000.0, wall_ms / 1000.0, 0.0
        started = self._call_started = self._resumed = time.perf_counter()
        return started

    def host_call(self, impl, ctx, slots, get, n: int):
        """Call host function ``impl(ctx, *arguments)`` during a metered call, the ``n``
        arguments read from ``slots`` by ``get``: the wall-clock cap is checked on entry, the
        time inside is kept out of the guest's budget, and the epoch deadline is re-armed to
        the guest time left on return.

        Raises:
            CallTimeout: the call ran past its wall-clock cap before this host call.
        """
        entered = time.perf_counter()
        self._guest_s += entered - self._resumed
        if entered - self._call_started > self._hard_s:
            raise CallTimeout(f"call ran for over {self._hard_s * 1000:g} ms including host functions "
                              f"and was stopped")
        try:
            return impl(ctx, *get(slots)) if n > 1 else impl(ctx, get(slots)) if n else impl(ctx)
        finally:
            self._resumed = time.perf_counter()
            self.rearm()

    def timed(self, impl, ctx):
        """``impl`` bound to ``ctx``, kept out of the guest's budget in a metered call as
        :meth:`host_call` does (for host functions called with Python arguments)."""
        perf_counter = time.perf_counter

        def call(*args):
            if not self.metered:
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
                self.rearm()
        return call

    def rearm(self) -> None:
        """In a metered call, set the epoch deadline to the guest time left (host functions
        run outside it; before re-entering the guest, e.g. its allocator, it must be re-armed).
        Otherwise nothing: the call's one wall-clock deadline stands."""
        if self.metered:
            left_ms = (self._budget_s - self._guest_s) * 1000.0
            self.store.set_epoch_deadline(self.clock.ticks(left_ms) if left_ms > 0 else 1)
            self._armed = -1

    def _ticks_of(self, ticks: int) -> ctypes.c_uint64:
        """``ticks`` as the C value the deadline is set with (cached)."""
        found = self._ticks.get(ticks)
        if found is None:
            if len(self._ticks) > 64:
                self._ticks.clear()
            found = self._ticks[ticks] = ctypes.c_uint64(ticks)
        return found
