"""Call deadlines: how a processor call that runs away is stopped.

wasmtime's epoch interruption (``Config.epoch_interruption``; wasmtime's documentation of
``Engine::increment_epoch``, ``Store::set_epoch_deadline`` and
``Store::epoch_deadline_callback``): when the engine's epoch reaches a store's epoch deadline,
the guest's code stops at its next check and the store's deadline callback decides: go on
(with a new deadline) or end the call with an error. A :class:`CallDeadline` arms one
processor's deadline for each call and holds that callback; its calls end in
:class:`DeadlineExpired` once their time is up.

Where the C library has POSIX timers (Linux), the clock is native: each :class:`CallDeadline`
owns a one-shot ``timer_create`` timer with ``SIGEV_THREAD`` notification (POSIX.1-2008,
``timer_create(2)``), set to fire by each call's deadline, whose expiry has the C library
call ``wasmtime_engine_increment_epoch(engine)`` on a thread of its own, without Python's
global interpreter lock. The store's deadline is the next epoch; since the epoch is the
engine's, another call's expiry may reach it first, and the callback then lets the call go on
until its own time is up. A timer set for an earlier call that fires before a later call's
time is set on from the callback, so while calls end in time a processor's timer is set about
once per deadline span, and nothing ticks (a ticking timer would start a thread of the C
library for every tick, 200 a second, which cost a few points of the frame rate of four
streams on two cores). A quick processor's calls can hold the interpreter lock (see
:mod:`.processor`): with four streams on two cores, releasing and taking it back around each
call of a few µs cost a sixth of the frames.

Elsewhere an :class:`EpochClock` thread of Python's advances the epoch every
:data:`EPOCH_TICK_S` s, deadlines are counted in its ticks, and every call releases the lock.
A child made by ``fork()`` inherits neither timers nor threads, and must not start native
timers (glibc's are not fork-safe): its clocks tick from Python threads
(``os.register_at_fork``). A :class:`CallDeadline` arms a call in one of the two modes of
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

from .abi import WASMTIME_HOLDING_GIL

#: Seconds between two ticks of a Python thread's clock: the resolution of deadlines where
#: the clock is not native (a native deadline fires at its time).
EPOCH_TICK_S = 0.005

# wasmtime's C call, through a fresh function pointer without argtypes: the store's context
# and the ticks are passed as prepared ctypes objects (cheaper than the bindings' checks);
# it only stores a number, so it keeps the interpreter lock.
_set_epoch_deadline = WASMTIME_HOLDING_GIL["wasmtime_context_set_epoch_deadline"]
_set_epoch_deadline.restype = None


class CallTimeout(Exception):
    """A processor call ran past its wall-clock cap (host functions included)."""


class DeadlineExpired(Exception):
    """A call reached the deadline its :class:`CallDeadline` armed (the guest's code was
    stopped by the epoch-deadline callback)."""


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
#: Native timers, by the id of their CallDeadline: (the timer, its engine). The engine stays
#: referenced here while its timer exists, so it is never freed under an expiry, even when the
#: deadline is dropped unclosed.
_LIVE_TIMERS: dict[int, tuple[ctypes.c_void_p, wasmtime.Engine]] = {}
#: Engines whose native timer was deleted, kept alive for a while: an expiry's thread started
#: just before the deletion may still be calling into the engine. (time.monotonic() retired, engine)
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
    """Delete every native timer before the interpreter frees the engines (a deadline not closed)."""
    for key in list(_LIVE_TIMERS):
        _delete_timer(key)


def _native_timers_available() -> bool:
    """POSIX timers can run deadlines here: Linux, 64-bit (the ``sigevent`` layout above), and
    not a child forked from a process that had native timers."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8 or _FORKED_FROM_TIMERS:
        return False
    try:
        libc = _libc()
        return bool(libc.timer_create and libc.timer_settime and libc.timer_delete)
    except (OSError, AttributeError):
        return False


@functools.cache
def _timer_settime():
    """``timer_settime`` called holding the interpreter lock (a system call that never blocks)."""
    settime = ctypes.PyDLL(None, use_errno=True)["timer_settime"]
    settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_ITimerSpec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return settime


def _native_timer(engine: wasmtime.Engine) -> ctypes.c_void_p | None:
    """A new POSIX timer, not yet set, that calls ``wasmtime_engine_increment_epoch(engine)``
    on a thread of the C library when it expires; None when the C library refuses one."""
    global _TIMER_STARTED
    if not _native_timers_available():
        return None
    event = _SigEvent()
    event.sigev_notify = _SIGEV_THREAD
    event.sigev_notify_function = ctypes.cast(_ffi.dll.wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    event.sigev_value.sival_ptr = ctypes.cast(engine.ptr(), ctypes.c_void_p).value
    timer = ctypes.c_void_p()
    if _libc().timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
        return None
    _TIMER_STARTED = True
    return timer


class EpochClock:
    """The run's clock of call deadlines for ``engine`` until :meth:`close`: native (one-shot
    POSIX timers, one per :class:`CallDeadline`, :attr:`native`) where the C library has them,
    else a daemon thread advancing the epoch every :data:`EPOCH_TICK_S` s.

    Attributes:
        native: deadlines fire from native timers, without Python's interpreter lock (a wasm
            call may hold it); the epoch only advances when one fires.
        epoch: with the thread, ticks so far as the clock counts them (the engine's count is
            this or one more); native, 0 (not counted).
        closed: :meth:`close` was called: no deadline armed from now on fires.
    """

    def __init__(self, engine: wasmtime.Engine):
        self.engine = engine
        self.epoch = 0
        self._stop = threading.Event()
        self.closed = False
        self.native = _native_timers_available()
        self._thread: threading.Thread | None = None
        if not self.native:
            self._start()
        _CLOCKS.add(self)

    def _start(self) -> None:
        """Tick from a Python thread (where there are no native timers, or in a forked child,
        which inherits no thread)."""
        if self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._tick, name="vision-host-epoch", daemon=True)
        self._thread.start()

    def use_thread(self) -> None:
        """Give up native timers (the C library refused one): tick from a thread from now on."""
        if self.native:
            self.native = False
            self._start()

    def _tick(self) -> None:
        while not self._stop.wait(EPOCH_TICK_S):
            self.engine.increment_epoch()
            self.epoch += 1

    @staticmethod
    def ticks(ms: float) -> int:
        """Thread ticks covering ``ms`` milliseconds (at least 1, plus one for the tick under way)."""
        return max(1, math.ceil(ms / (EPOCH_TICK_S * 1000.0))) + 1

    def close(self) -> None:
        """Stop (deadlines armed from now on never fire). Idempotent."""
        self.closed = True
        self._stop.set()
        _CLOCKS.discard(self)
        if self._thread is not None:
            self._thread.join()


#: wasmtime's epoch-deadline callback type (``wasmtime_store_epoch_deadline_callback``).
_DEADLINE_CALLBACK = _ffi._wasmtime_store_epoch_deadline_callback.argtypes[1]
_NO_FINALIZER = _ffi._wasmtime_store_epoch_deadline_callback.argtypes[3]()
_CONTINUE = 0           # wasmtime_update_deadline_kind_t: WASMTIME_UPDATE_DEADLINE_CONTINUE
_NS_PER_S = 1_000_000_000
_NEXT_EPOCH = ctypes.c_uint64(1)      # a native call's store deadline: the epoch's next move


class CallDeadline:
    """The epoch deadline of one processor's store, armed for each of its calls.

    Args:
        clock: the run's :class:`EpochClock`.
        store: the processor's store (its epoch deadline is what this arms; its epoch-deadline
            callback is set here).

    Attributes:
        metered: True during a call whose processor's own code has a budget of its own
            (``call_timeout_ms`` below the wall-clock cap): host functions then go through
            :meth:`host_call` (or :meth:`timed`), which keeps their time out of the budget and
            checks the cap. Otherwise the one wall-clock deadline armed by :meth:`arm` covers
            the whole call.
        expired: the call armed last was stopped at its deadline (its error is then wasmtime's
            for the callback's refusal: read this to tell, and say :class:`DeadlineExpired`).
    """

    def __init__(self, clock: EpochClock, store: wasmtime.Store):
        self.clock = clock
        self.store = store
        self._context = ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
        self.metered = False
        self.expired = False
        # Accounting of the current metered call (s, time.perf_counter()).
        self._budget_s = self._hard_s = self._guest_s = 0.0
        self._call_started = self._resumed = 0.0
        # The thread clock's tick (EpochClock.epoch) before which the armed deadline cannot
        # fire; -1: unknown (armed for something else), so the next call arms its own.
        self._armed = -1
        self._wall = (0.0, 0)          # (wall-clock deadline in ms, its epoch ticks), cached
        self._ticks: dict[int, ctypes.c_uint64] = {}
        # Native: the timer (made at the first call), and when the armed call's time is up
        # (time.perf_counter(), s).
        self._timer: ctypes.c_void_p | None = None
        self._expiry = 0.0             # when the timer set last expires (time.perf_counter(), s)
        self._due = math.inf
        mine = weakref.ref(self)

        def on_deadline(_context, _data, delta, kind):
            me = mine()
            if me is not None and me._fired():
                delta[0] = 1           # not this call's time yet: go on to the next epoch
                kind[0] = _CONTINUE
                return 0
            if me is not None:
                me.expired = True
            return ctypes.cast(_ffi.wasmtime_error_new(b"the call reached its deadline"), ctypes.c_void_p).value

        # Kept by the store, which calls it (and may outlive this object: the callback then ends
        # the call, which no one can arm any more).
        store._vision_host_deadline_callback = callback = _DEADLINE_CALLBACK(on_deadline)
        _ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, _NO_FINALIZER)

    def arm(self, own_ms: float, wall_ms: float) -> bool:
        """Arm the deadline of the call about to start (``(own_ms, wall_ms)`` as
        :meth:`.engine.SandboxLimits.deadlines_ms` gives them); True when the call is metered
        (``own_ms < wall_ms``: then call :meth:`begin_metered` right before it).

        Native, the store's deadline is the next epoch and the timer fires by the call's time
        (see :meth:`_arm_native`): the call is stopped when its time is up, not before.
        With the thread's clock and one wall-clock deadline, the armed epoch deadline is reused
        while it falls in [deadline, deadline + a quarter of it] from now, and re-armed
        otherwise (about four times per deadline span): a call is never interrupted before its
        deadline and always by 1.25× it (plus a tick), and most calls skip the C call.
        """
        self.expired = False
        if self.clock.native:
            self._arm_native(min(own_ms, wall_ms))
            return own_ms < wall_ms
        if own_ms < wall_ms:
            _set_epoch_deadline(self._context, self._ticks_of(self.clock.ticks(own_ms)))
            self._armed = -1
            return True
        if self._wall[0] != wall_ms:
            self._wall = (wall_ms, self.clock.ticks(wall_ms))
        ticks = self._wall[1]
        earliest = self.clock.epoch + ticks
        if not earliest <= self._armed <= earliest + (ticks >> 2):
            _set_epoch_deadline(self._context, self._ticks_of(ticks + (ticks >> 2)))
            self._armed = earliest + (ticks >> 2)
        return False

    def _arm_native(self, ms: float) -> None:
        """Stop the guest's code ``ms`` ms from now. The timer is set only when the one set for
        an earlier call would fire later than this call's deadline, or has fired: while calls
        end in time it is set about once per deadline span, and when it fires early for the
        call under way, :meth:`_fired` sets it on to the call's own time."""
        now = time.perf_counter()
        due = self._due = now + ms / 1000.0
        _set_epoch_deadline(self._context, _NEXT_EPOCH)
        if self.clock.closed or now < self._expiry <= due:
            return
        if self._timer is None:
            self._timer = _native_timer(self.clock.engine)
            if self._timer is None:          # refused (a limit of the C library): tick from a thread
                self.clock.use_thread()
                self._armed = -1
                _set_epoch_deadline(self._context, self._ticks_of(self.clock.ticks(ms)))
                return
            _LIVE_TIMERS[id(self)] = (self._timer, self.clock.engine)
        self._set_timer(ms, now)

    def _set_timer(self, ms: float, now: float) -> None:
        """Set the timer to expire ``ms`` ms after ``now`` (time.perf_counter(), read before;
        at least 1 µs: a zero time unsets a timer).

        Raises:
            OSError: the C library refused (an invalid timer).
        """
        ns = max(1000, round(ms * 1e6)) if math.isfinite(ms) else 10 ** 15
        spec = _ITimerSpec(_TimeSpec(0, 0), _TimeSpec(ns // _NS_PER_S, ns % _NS_PER_S))
        if _timer_settime()(self._timer, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timer_settime failed for a call deadline")
        self._expiry = now + ms / 1000.0

    def _fired(self) -> bool:
        """The epoch reached the store's deadline (a timer fired, this one or another
        processor's): True when the call under way may go on (its time is not up; the timer is
        set on to it if it was this one that fired)."""
        if not self.clock.native:
            return False
        now = time.perf_counter()
        if now >= self._due:
            return False
        if self._expiry <= now and self._timer is not None:
            try:
                self._set_timer((self._due - now) * 1000.0, now)
            except OSError:
                return False                 # no timer would stop it: stop it now
        return True

    def close(self) -> None:
        """Delete the native timer (a later call makes another). Idempotent."""
        self._timer = None
        self._expiry = 0.0
        _delete_timer(id(self))

    def __del__(self) -> None:
        _delete_timer(id(self))     # dropped unclosed: its timer must not outlive it

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
        """In a metered call, set the deadline to the guest time left (host functions run
        outside it; before re-entering the guest, e.g. its allocator, it must be re-armed).
        Otherwise nothing: the call's one wall-clock deadline stands."""
        if self.metered:
            left_ms = (self._budget_s - self._guest_s) * 1000.0
            if self.clock.native:
                self._arm_native(max(left_ms, 0.0))
            else:
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
