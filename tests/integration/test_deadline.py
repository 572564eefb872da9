"""The call deadline stops runaways, not slow processors.

By default one ``process`` call may run 1 s, the processor's own code and the host functions
it calls together (:class:`~vision_host.runtime.SandboxLimits`). A processor that is slow but
finishes (wasmVision's published ``asciify`` reads every pixel through ``get-uchar-at``:
14 400 host calls a frame) runs on every frame and is only reported (its cost in the stats);
one that never returns is interrupted at the deadline, its frame passes on unchanged, and
after 5 such calls in a row it is disabled while the video goes on. No test here measures
time: the figures come from the benchmarks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import wasmtime

from vision_host.runtime import SandboxLimits
from vision_host.runtime import processor
from conftest import REPO
from wat import module

FRAMES = 300
CALLS = 14_400          # wasmVision's asciify: one get-uchar-at per pixel of a 160×90 grid


def _chatty(import_module: str, name: str, signature: str, call: str, grid=(160, 90)) -> bytes:
    """A processor making ``grid`` w × h host calls per frame (``call``, with ``$x``/``$y``
    the grid cell and ``$f`` the frame), summing their i32 results into the exported global
    ``sum``, and returning the frame."""
    w, h = grid
    return module(f"""(module
      (import "{import_module}" "{name}" (func $host {signature}))
      (memory (export "memory") 1)
      (global $sum (export "sum") (mut i32) (i32.const 0))
      (func (export "process") (param $f i32) (result i32)
        (local $x i32) (local $y i32)
        (global.set $sum (i32.const 0))
        (loop $rows
          (local.set $x (i32.const 0))
          (loop $cols
            (global.set $sum (i32.add (global.get $sum) {call}))
            (local.set $x (i32.add (local.get $x) (i32.const 1)))
            (br_if $cols (i32.lt_u (local.get $x) (i32.const {w}))))
          (local.set $y (i32.add (local.get $y) (i32.const 1)))
          (br_if $rows (i32.lt_u (local.get $y) (i32.const {h}))))
        (local.get $f)))""")


#: asciify's read: the blue value of the pixel at the grid cell's corner of the 640×360 frame
#: (row y·4, column x·4: get-uchar-at(row, col·3)).
ASCIIFY_LIKE = _chatty("wasm:cv/mat", "[method]mat.get-uchar-at", "(param i32 i32 i32) (result i32)",
                       "(call $host (local.get $f) (i32.mul (local.get $y) (i32.const 4)) "
                       "(i32.mul (local.get $x) (i32.const 12)))")
#: The same number of calls to a host function that always runs in Python (the clock).
CLOCK_READER = _chatty("wasmvision:platform/time", "now", "(param i32) (result i64)",
                       "(i32.wrap_i64 (i64.and (call $host (i32.const 0)) (i64.const 0)))")

LOOP_FOREVER = module("""(module (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32) (loop $spin (br $spin)) (local.get 0)))""")
#: A runaway that keeps calling the host: every call returns, the loop never ends.
LOOP_FOREVER_CALLING_THE_HOST = module("""(module
  (import "wasmvision:platform/time" "now" (func $now (param i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32)
    (loop $spin (drop (call $now (i32.const 0))) (br $spin)) (local.get 0)))""")


def test_the_default_deadline_is_one_second_for_the_whole_call():
    assert SandboxLimits().deadlines_ms() == (1000.0, 1000.0)
    # a budget for the processor's own code below the cap: counted apart, the cap stays 1 s
    assert SandboxLimits(call_timeout_ms=20).deadlines_ms() == (20, 1000.0)
    # a longer deadline raises the cap with it (--processor-timeout-ms 5000)
    assert SandboxLimits(call_timeout_ms=5000).deadlines_ms() == (5000, 5000)
    # an explicit cap is kept as it is
    assert SandboxLimits(call_hard_timeout_ms=500).deadlines_ms() == (1000.0, 500)
    assert SandboxLimits(call_timeout_ms=1000, call_hard_timeout_ms=60_000).deadlines_ms() == (1000, 60_000)


@pytest.mark.slow
@pytest.mark.parametrize("wasm", [ASCIIFY_LIKE, CLOCK_READER], ids=["get-uchar-at", "python-host-function"])
def test_a_processor_making_14400_host_calls_a_frame_is_never_disabled(runtime_factory, real_frame, wasm):
    p = runtime_factory(limits=SandboxLimits()).load_bytes(wasm, "chatty")
    frame = real_frame.copy()
    for _ in range(FRAMES):
        assert p.process(frame) is frame
    assert p.stats.calls == FRAMES and p.stats.errors == 0
    assert not p.disabled and p.last_error is None
    if wasm is ASCIIFY_LIKE:      # and it read what the frame holds
        assert p.exports["sum"].value(p.store) == int(real_frame[0:360:4, 0:640:4, 0].astype(np.int64).sum())


@pytest.mark.slow
def test_the_python_path_too_makes_14400_calls_a_frame_without_being_disabled(runtime_factory, real_frame):
    """The same asciify-style reads with the in-wasm accessors switched off: every call
    crosses into Python, as with a host that cannot link them."""
    rt = runtime_factory(limits=SandboxLimits())
    rt.wasm_accessors = False
    p = rt.load_bytes(ASCIIFY_LIKE, "chatty")
    assert p.ctx.accessors is None
    frame = real_frame.copy()
    for _ in range(FRAMES):
        assert p.process(frame) is frame
    assert p.stats.errors == 0 and not p.disabled
    assert p.exports["sum"].value(p.store) == int(real_frame[0:360:4, 0:640:4, 0].astype(np.int64).sum())


@pytest.mark.slow
@pytest.mark.parametrize("wasm", [LOOP_FOREVER, LOOP_FOREVER_CALLING_THE_HOST], ids=["spins", "calls-the-host"])
def test_a_runaway_is_interrupted_at_the_default_deadline_and_disabled(runtime_factory, real_frame, wasm, caplog):
    p = runtime_factory(limits=SandboxLimits()).load_bytes(wasm, "runaway")
    with caplog.at_level(logging.ERROR, logger="vision_host"):
        outs = [p.process(real_frame) for _ in range(7)]
    assert all(o is real_frame for o in outs)              # every frame goes on, unchanged
    assert p.disabled and p.stats.errors == 5 and p.stats.calls == 5
    assert p.last_error == "call exceeded its 1000 ms deadline (host functions included) and was interrupted"
    assert any("processor runaway disabled after 5 failed calls in a row" in r.getMessage() for r in caplog.records)


def test_a_slow_call_is_reported_once_not_failed(runtime_factory, real_frame, caplog, monkeypatch):
    """A call over SLOW_CALL_MS that ends within the deadline is logged once as slow (with the
    frame rate it allows) and counted as a normal call."""
    monkeypatch.setattr(processor, "SLOW_CALL_MS", 0.0)        # every call is "slow" here
    p = runtime_factory().load_bytes(CLOCK_READER, "slowpoke")
    with caplog.at_level(logging.WARNING, logger="vision_host"):
        for _ in range(3):
            p.process(real_frame)
    slow = [r.getMessage() for r in caplog.records if "processor slowpoke took" in r.getMessage()]
    assert len(slow) == 1 and "within its deadline (1000 ms)" in slow[0]
    assert p.stats.errors == 0 and p.last_error is None


#: Quick on its first three calls, then a runaway that never calls the host: the global ``calls``
#: counts the calls.
QUICK_THEN_RUNAWAY = module("""(module (memory (export "memory") 1)
  (global $calls (export "calls") (mut i32) (i32.const 0))
  (func (export "process") (param $f i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.gt_u (global.get $calls) (i32.const 3)) (then (loop $spin (br $spin))))
    (local.get $f)))""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native epoch clock needs POSIX timers")
def test_a_quick_processor_keeps_the_interpreter_lock_and_is_still_stopped_when_it_runs_away(runtime_factory,
                                                                                             real_frame):
    """On Linux the epoch ticks from a native timer, so a quick processor's calls keep Python's
    interpreter lock (no thread can tick the epoch in Python meanwhile), and a runaway among
    them is still interrupted at its deadline; its next call releases the lock again."""
    rt = runtime_factory(limits=SandboxLimits(call_timeout_ms=200, call_hard_timeout_ms=200))
    assert rt.clock.native and rt.clock._thread is None, "no Python thread ticks the epoch"
    p = rt.load_bytes(QUICK_THEN_RUNAWAY, "quick-then-runaway")
    assert not p._quick                                     # the first call releases the lock
    for _ in range(3):
        assert p.process(real_frame) is real_frame
        assert p._quick, "a call of a few µs: the next one keeps the lock"
    assert p.process(real_frame) is real_frame              # the runaway, called holding the lock
    assert p.stats.errors == 1 and p.exports["calls"].value(p.store) == 4
    assert p.last_error == "call exceeded its 200 ms deadline (host functions included) and was interrupted"
    assert not p._quick, "after a long call the next one releases the lock"


#: Logs one line (``info``, a host function in Python) per call, then returns the frame.
LOGS_A_LINE = module("""(module
  (import "wasmvision:platform/logging" "info" (func $info (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "waiting")
  (func (export "process") (param $f i32) (result i32)
    (call $info (i32.const 16) (i32.const 7)) (local.get $f)))""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native epoch clock needs POSIX timers")
def test_a_quick_call_that_waits_in_a_host_function_stays_quick(runtime_factory, real_frame):
    """A call is judged by its thread's CPU time once its wall time is over QUICK_CALL_US: on a
    busy host a quick call waits inside host functions for the interpreter lock other threads
    hold, and must not be switched to the releasing call for it. Here the host function
    (a log handler) waits 5 ms without using the CPU; a processor that uses 5 ms of CPU is not
    quick."""
    class Waits(logging.Handler):
        def emit(self, record):
            threading.Event().wait(0.005)

    handler = Waits()
    logger = logging.getLogger("vision_host.processor.waits")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        p = runtime_factory().load_bytes(LOGS_A_LINE, "waits")
        p.process(real_frame)          # the first call's one-off work (the logger's, the callback's) is real CPU
        for _ in range(3):
            assert p.process(real_frame) is real_frame
            assert p.stats.recent_us[p.stats.calls - 1] >= processor.QUICK_CALL_US and p._quick
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    busy = runtime_factory().load_bytes(_chatty("wasmvision:platform/time", "now", "(param i32) (result i64)",
                                                "(i32.wrap_i64 (i64.and (call $host (i32.const 0)) (i64.const 0)))",
                                                grid=(400, 100)), "busy")
    busy.process(real_frame)
    assert busy.stats.recent_us[0] >= processor.QUICK_CALL_US and not busy._quick


def test_a_start_up_that_runs_away_is_stopped_at_its_deadline_and_says_so(runtime_factory):
    """Instantiation and ``_initialize`` run under ``init_timeout_ms``: a start-up that never
    ends fails the load with a sentence, not a wasmtime error."""
    rt = runtime_factory(limits=SandboxLimits(init_timeout_ms=50))
    with pytest.raises(processor.ProcessorLoadError,
                       match="failed while starting: call exceeded its deadline and was interrupted$"):
        rt.load_bytes(module("""(module (memory (export "memory") 1)
          (func (export "_initialize") (loop $spin (br $spin)))
          (func (export "process") (param i32) (result i32) (local.get 0)))"""), "slow-start")


def test_a_closed_clock_fires_no_deadline_armed_after_it_and_closes_twice(runtime_factory):
    """A loop of 10⁸ iterations (tens of ms) under a 1 ms deadline: stopped while the clock
    runs, finished once it is closed."""
    from vision_host.runtime import deadline
    rt = runtime_factory()
    store = wasmtime.Store(rt.engine)
    count_down = wasmtime.Instance(store, wasmtime.Module(rt.engine, """(module (func (export "f") (result i32)
      (local $n i32) (local.set $n (i32.const 100000000))
      (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l (local.get $n)))
      (i32.const 7)))"""), []).exports(store)["f"]
    d = deadline.CallDeadline(rt.clock, store)
    d.arm(1, 1)
    with pytest.raises(wasmtime.WasmtimeError, match="reached its deadline"):
        count_down(store)
    assert d.expired
    rt.clock.close()
    rt.clock.close()
    d.arm(1, 1)
    assert count_down(store) == 7 and not d.expired


COUNT_DOWN = """(module (func (export "f") (param $n i32) (result i32)
  (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l (local.get $n)))
  (i32.const 7)))"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native epoch clock needs POSIX timers")
def test_a_native_deadline_fires_only_for_its_own_call_and_no_clock_ticks_meanwhile():
    """Native deadlines are one-shot timers: the epoch stays where it is while calls end in
    time (no thread of the C library is started for ticks), one call's expiry, which moves
    the engine's shared epoch, does not stop another store's call whose time is not up, and a
    timer set for an earlier, shorter deadline does not stop a later call before its own."""
    from vision_host.runtime import deadline
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    clock = deadline.EpochClock(engine)
    assert clock.native and clock._thread is None
    module = wasmtime.Module(engine, COUNT_DOWN)
    stores = [wasmtime.Store(engine) for _ in range(2)]
    deadlines = [deadline.CallDeadline(clock, s) for s in stores]
    funcs = [wasmtime.Instance(s, module, []).exports(s)["f"] for s in stores]
    probe = wasmtime.Store(engine)                        # no callback: any epoch move traps it
    spin = wasmtime.Instance(probe, module, []).exports(probe)["f"]
    probe.set_epoch_deadline(1)                           # from here, one move of the epoch is seen
    for _ in range(100):                                  # tens of ms of calls that end in time
        deadlines[0].arm(60_000, 60_000)
        assert funcs[0](stores[0], 1_000_000) == 7
    assert spin(probe, 1000) == 7, "the epoch moved although no call ran out of time"   # a 5 ms tick would trap
    results = []

    def long_call():
        deadlines[1].arm(60_000, 60_000)
        results.append(funcs[1](stores[1], 1_500_000_000))   # about a second: many expiries of the other

    t = threading.Thread(target=long_call)
    t.start()
    stopped = 0
    while t.is_alive():
        deadlines[0].arm(1, 1)                            # a runaway stopped at 1 ms, again and again
        with pytest.raises(wasmtime.WasmtimeError, match="reached its deadline"):
            funcs[0](stores[0], 2_000_000_000)
        stopped += 1
    t.join()
    assert results == [7] and not deadlines[1].expired and stopped > 1
    deadlines[0].arm(50, 50)
    deadlines[0].arm(300, 300)        # the timer set for 50 ms fires first: set on, not obeyed
    started = time.perf_counter()
    with pytest.raises(wasmtime.WasmtimeError, match="reached its deadline"):
        funcs[0](stores[0], 2_000_000_000)
    assert time.perf_counter() - started >= 0.3 - 0.001 and deadlines[0].expired
    clock.close()


def test_a_refused_native_timer_falls_back_to_the_thread_clock_and_still_stops_a_runaway(runtime_factory,
                                                                                      real_frame, monkeypatch):
    """Where ``timer_create`` refuses (a limit of the C library), the clock ticks from a Python
    thread from then on, and the call that asked is still stopped at its deadline."""
    from vision_host.runtime import deadline
    monkeypatch.setattr(deadline, "_native_timer", lambda engine: None)
    rt = runtime_factory(limits=SandboxLimits(call_timeout_ms=200, call_hard_timeout_ms=200))
    p = rt.load_bytes(LOOP_FOREVER, "runaway")        # its start-up's deadline asks first
    assert not rt.clock.native and rt.clock._thread is not None and rt.clock._thread.is_alive()
    p.process(real_frame)
    assert p.stats.errors == 1
    assert p.last_error == "call exceeded its 200 ms deadline (host functions included) and was interrupted"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native epoch clock needs POSIX timers")
def test_a_call_deadline_dropped_unclosed_deletes_its_timer_and_its_engine_outlives_the_last_expiry():
    import gc

    from vision_host.runtime import deadline
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    clock = deadline.EpochClock(engine)
    store = wasmtime.Store(engine)
    d = deadline.CallDeadline(clock, store)
    d.arm(1000, 1000)
    key = id(d)
    assert clock.native and deadline._LIVE_TIMERS[key][1] is engine   # the timer holds its engine
    del d
    gc.collect()
    assert key not in deadline._LIVE_TIMERS
    assert any(e is engine for _, e in deadline._RETIRED), "the engine is kept a while after its timer"
    f = wasmtime.Instance(store, wasmtime.Module(engine, COUNT_DOWN), []).exports(store)["f"]
    engine.increment_epoch()                              # the store outlives its deadline: its call ends
    with pytest.raises(wasmtime.WasmtimeError, match="reached its deadline"):
        f(store, 1000)
    clock.close()


def _in_forked_child(child) -> list[str]:
    """Run ``child()`` (returning a list of strings) in a process made by ``os.fork()``; its
    list, read back through a pipe. The child never returns into pytest; one that hangs is
    killed after 60 s and the test fails."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_end, "|".join(child()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline_s = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline_s:
        threading.Event().wait(0.05)                     # the child's exit is what is waited for
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    report = os.read(read_end, 65536).decode()
    os.close(read_end)
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0, (done[1], report)
    return report.split("|")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_still_stops_a_runaway_and_keeps_its_own_clocks(runtime_factory, real_frame):
    """fork() keeps neither POSIX timers nor threads, and a child must not start native timers
    (glibc's timer thread may hold, at the fork, the lock timer_create takes: the child would
    wait for ever). So the clocks tick from Python threads in the child: a runaway loaded before
    the fork is still interrupted there, a clock made there ticks, and closing the inherited
    clock does not stop it (the parent's timer ids are never deleted in the child)."""
    from vision_host.runtime import deadline
    rt = runtime_factory(limits=SandboxLimits(call_timeout_ms=200, call_hard_timeout_ms=200))
    p = rt.load_bytes(LOOP_FOREVER, "runaway")          # compiled here: the child only calls it
    p.process(real_frame)                                # in the parent, a native clock stops it
    assert p.stats.errors == 1
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    count_down = wasmtime.Instance(store, wasmtime.Module(engine, """(module (func (export "f") (result i32)
      (local $n i32) (local.set $n (i32.const 2000000000))
      (loop $l (local.set $n (i32.sub (local.get $n) (i32.const 1))) (br_if $l (local.get $n)))
      (i32.const 7)))"""), []).exports(store)["f"]

    def child() -> list[str]:
        p.process(real_frame)
        report = [p.last_error, str(rt.clock.native)]
        own = deadline.EpochClock(engine)                # the child's own clock, for another engine
        report.append(str(own.native))
        rt.clock.close()                                 # the inherited one, closed
        store.set_epoch_deadline(2)
        try:
            report.append(f"finished {count_down(store)}")
        except wasmtime.Trap:
            report.append("interrupted")
        own.close()
        return report

    assert _in_forked_child(child) == [
        "call exceeded its 200 ms deadline (host functions included) and was interrupted", "False", "False",
        "interrupted"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_forked_child_compiles_with_its_own_runtime_and_is_told_why_not_with_the_parents(runtime_factory,
                                                                                           real_frame):
    """wasmtime compiles on a thread pool that fork() does not copy: an engine made before the
    fork would wait for ever compiling in the child. A runtime made in the child compiles on
    the calling thread and runs the processor; the parent's refuses with a sentence."""
    from vision_host.runtime import NetworkPolicy
    from vision_host.runtime.engine import Runtime
    from vision_host.runtime.processor import ProcessorLoadError
    wasm = (REPO / "wasm" / "hello.wasm").read_bytes()
    parent = runtime_factory()
    parent.load_bytes(wasm, "hello")                     # the parent's compiler threads exist now
    assert parent.parallel_compilation

    def child() -> list[str]:
        report = []
        try:
            parent.load_bytes(wasm, "hello-again")
            report.append("compiled")
        except ProcessorLoadError as exc:
            report.append(str(exc))
        with Runtime({}, NetworkPolicy()) as own:
            p = own.load_bytes(wasm, "hello")
            report += [str(own.parallel_compilation), str(p.process(real_frame) is real_frame and not p.disabled)]
        return report

    assert _in_forked_child(child) == [
        "this runtime was made before the process forked, and its compiler's threads stayed in the parent: make "
        "the runtime in this process (or use multiprocessing's spawn start method) to load processors here",
        "False", "True"]
