"""Sandbox limits: deadlines, memory caps, network allow-list, ABI faults, load errors."""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import pytest

from vision_host.runtime import NetworkPolicy, ProcessorLoadError, SandboxLimits
from wat import driver_module, module

LOOP_FOREVER = module("""
(module (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32) (loop $spin (br $spin)) (local.get 0)))""")

GROW_EACH_FRAME = module("""
(module (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32)
    (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
    (local.get 0)))""")

DRAW_THEN_TRAP = module("""
(module
  (import "wasm:cv/cv" "rectangle" (func $rect (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32)
    (call $rect (local.get 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 100)
                (i32.const 255) (i32.const 0) (i32.const 0) (i32.const 255) (i32.const 5) (i32.const 64))
    unreachable))""")

RETURNS_UNKNOWN_HANDLE = module("""
(module (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32) (i32.const 424242)))""")

WASI_HELLO = module("""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasi\\n")
  (func (export "process") (param i32) (result i32)
    (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.get 0)))""")


def test_a_processor_that_loops_forever_is_interrupted_and_the_video_goes_on(runtime_factory, real_frame):
    rt = runtime_factory(limits=SandboxLimits(call_timeout_ms=20, max_consecutive_failures=3))
    p = rt.load_bytes(LOOP_FOREVER, "spinner")
    started = time.perf_counter()
    outs = [p.process(real_frame) for _ in range(5)]
    elapsed = time.perf_counter() - started
    assert all(o is real_frame for o in outs)            # frames pass on unchanged
    assert p.disabled and p.stats.errors == 3
    assert "deadline" in p.last_error
    assert elapsed < 1.0                                  # 3 interrupted calls, then pass-through


def test_memory_past_the_cap_stops_the_processor(runtime_factory, real_frame):
    rt = runtime_factory(limits=SandboxLimits(memory_limit_bytes=4 * 1024 * 1024))
    p = rt.load_bytes(GROW_EACH_FRAME, "grower")
    results = [p.process(real_frame) for _ in range(12)]
    assert all(r is real_frame for r in results)
    assert p.memory_bytes <= 4 * 1024 * 1024
    assert p.stats.errors == 5 and p.disabled
    assert "trapped" in p.last_error


def test_a_failed_call_does_not_leave_partial_drawing_once_suspect(runtime_factory, real_frame):
    rt = runtime_factory()
    p = rt.load_bytes(DRAW_THEN_TRAP, "scribbler")
    frame = real_frame.copy()
    p.process(frame)                                      # first failure: drawn in place, then trapped
    second = real_frame.copy()
    out = p.process(second)
    assert out is second and np.array_equal(second, real_frame)


def test_returning_an_unknown_handle_is_an_abi_error(runtime_factory, real_frame):
    p = runtime_factory().load_bytes(RETURNS_UNKNOWN_HANDLE, "liar")
    assert p.process(real_frame) is real_frame
    assert "unknown or dropped mat handle 424242" in p.last_error
    assert len(p.ctx.mats) == 0                           # nothing leaks in the handle table


def test_wasi_stdout_goes_to_the_logger(runtime_factory, real_frame, caplog):
    p = runtime_factory().load_bytes(WASI_HELLO, "talker")
    with caplog.at_level(logging.INFO, logger="vision_host.processor.talker"):
        p.process(real_frame)
    assert "hello from wasi" in caplog.text


def test_destination_not_allowed(driver, real_frame, caplog):
    d = driver([("vision-host:platform/fetch", "post-frame"), ("wasmvision:platform/http", "get")],
               policy=NetworkPolicy(allowed={"127.0.0.1:11434"}))
    h = d.mats.insert(real_frame)
    ret = d.retarea()
    with caplog.at_level(logging.ERROR):
        d.call("vision-host:platform/fetch", "post-frame", *d.put_str("http://203.0.113.9:11434/api/generate"),
               *d.put_str("application/json"), *d.put(b'{"images":["%IMAGE%"]}'), h, 672, 80, ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 0          # fetch-error.destination-not-allowed
    assert "not an allowed destination" in caplog.text
    d.call("wasmvision:platform/http", "get", *d.put_str("http://203.0.113.9/"), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 1          # http-error.destination-not-allowed
    d.call("vision-host:platform/fetch", "post-frame", *d.put_str("file:///etc/passwd"),
           *d.put_str(""), *d.put(b""), h, 0, 80, ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 1          # invalid-url
    # urllib.parse reads the host as the allowed 127.0.0.1:11434, HTTP clients as 127.0.0.1:9
    sneaky = "http://127.0.0.1:9\\@127.0.0.1:11434/api/generate"
    d.call("vision-host:platform/fetch", "post-frame", *d.put_str(sneaky),
           *d.put_str("application/json"), *d.put(b'{"images":["%IMAGE%"]}'), h, 672, 80, ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 1          # invalid-url
    d.call("wasmvision:platform/http", "get", *d.put_str(sneaky), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 2          # http-error.invalid-url


@pytest.mark.parametrize("wasm, expected", [
    (b"not wasm at all", "is not a WebAssembly module"),
    (driver_module([("wasmvision:platform/logging", "info")])[:50], "is not a valid WebAssembly module"),
    (module('(module (memory (export "memory") 1) (func (export "other")))'), "does not export `process`"),
    (module('(module (import "wasm:cv/cv" "no-such-filter" (func (param i32))) (memory (export "memory") 1)'
            ' (func (export "process") (param i32) (result i32) (local.get 0)))'),
     "imports wasm:cv/cv#no-such-filter, which vision-host does not provide"),
    (module('(module (import "wasm:cv/mat" "[method]mat.cols" (func (param i32 i32))) (memory (export "memory") 1)'
            ' (func (export "process") (param i32) (result i32) (local.get 0)))'),
     "imports wasm:cv/mat#[method]mat.cols with type (i32, i32) -> ()"),
])
def test_broken_modules_fail_to_load_with_a_sentence(runtime_factory, wasm, expected):
    with pytest.raises(ProcessorLoadError, match=re.escape(expected)):
        runtime_factory().load_bytes(wasm, "broken")


def test_compiled_modules_are_cached(runtime_factory, tmp_path):
    wasm = driver_module([("wasm:cv/mat", "[method]mat.cols")])
    first = runtime_factory(cache_dir=tmp_path)
    first.load_bytes(wasm, "a")
    assert first.cache_hits == 0 and len(list(tmp_path.glob("*.cwasm"))) == 1
    second = runtime_factory(cache_dir=tmp_path)
    p = second.load_bytes(wasm, "a")
    assert second.cache_hits == 1
    assert p.process(np.zeros((4, 4, 3), np.uint8)).shape == (4, 4, 3)


# wasmCV before 2025-03 returned `mat` where it now returns result<mat, error-result>, and
# nothing where it now returns result<_, error-result>: wasmVision's published processors
# import that form, so the host links whichever one a module asks for.
LEGACY_BLUR = module("""
(module
  (import "wasm:cv/cv" "gaussian-blur" (func $gblur (param i32 i32 i32 f32 f32 i32) (result i32)))
  (import "wasm:cv/cv" "rectangle" (func $rect (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (global $k (mut i32) (i32.const 9))
  (func (export "process") (param i32) (result i32)
    (local $out i32)
    (local.set $out (call $gblur (local.get 0) (global.get $k) (global.get $k) (f32.const 0) (f32.const 0) (i32.const 4)))
    (call $rect (local.get $out) (i32.const 10) (i32.const 10) (i32.const 50) (i32.const 50)
                (i32.const 255) (i32.const 0) (i32.const 0) (i32.const 255) (i32.const 2))
    (global.set $k (i32.const 8))             ;; an even kernel next time: OpenCV refuses it
    (local.get $out)))""")


def test_pre_2025_wasm_cv_imports_are_linked_and_errors_logged_once(runtime_factory, real_frame, caplog):
    import cv2
    p = runtime_factory().load_bytes(LEGACY_BLUR, "legacy")
    out = p.process(real_frame)
    expected = cv2.GaussianBlur(real_frame, (9, 9), 0)
    cv2.rectangle(expected, (10, 10), (50, 50), (0, 0, 255, 255), 2)
    assert np.array_equal(out, expected)
    with caplog.at_level(logging.ERROR):
        outs = [p.process(real_frame) for _ in range(3)]
    # no error channel in that form: the failed blur gives an empty mat (logged once), and the
    # frame passes on unchanged because an empty mat is not a frame
    assert all(o is real_frame for o in outs)
    logged = [r.getMessage() for r in caplog.records if "gaussian-blur failed" in r.getMessage()]
    assert len(logged) == 1 and "ksize" in logged[0]


SLOW_HOST_CALLS = module("""
(module
  (import "wasm:cv/cv" "blur" (func $blur (param i32 i32 i32 i32)))
  (import "wasm:cv/mat" "[resource-drop]mat" (func $drop (param i32)))
  (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32)
    (local $i i32)
    (loop $again                                   ;; 200 large blurs: far over 20 ms of host time
      (call $blur (local.get 0) (i32.const 61) (i32.const 61) (i32.const 64))
      (call $drop (i32.load (i32.const 68)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (global.get $n))))
    (local.get 0))
  (global $n (export "n") (mut i32) (i32.const 200)))""")


def test_the_deadline_counts_processor_code_not_host_functions(runtime_factory, real_frame):
    p = runtime_factory(limits=SandboxLimits(call_timeout_ms=20)).load_bytes(SLOW_HOST_CALLS, "heavy")
    started = time.perf_counter()
    assert p.process(real_frame) is real_frame
    assert time.perf_counter() - started > 0.06       # host time well past the 20 ms deadline…
    assert p.last_error is None                        # …is not the processor's fault


def test_a_hard_wall_clock_cap_still_stops_a_call_spent_in_host_functions(runtime_factory, real_frame):
    p = runtime_factory(limits=SandboxLimits(call_timeout_ms=20, call_hard_timeout_ms=50)).load_bytes(
        SLOW_HOST_CALLS, "heavy")
    p.exports["n"].set_value(p.store, 100000)
    started = time.perf_counter()
    assert p.process(real_frame) is real_frame
    assert time.perf_counter() - started < 1.0
    assert "call ran for over 50 ms including host functions" in p.last_error


def _bad_pointer_logger(address: int) -> bytes:
    """A processor whose every call passes ``address`` (out of bounds) to logging.info."""
    return module(f"""
(module
  (import "wasmvision:platform/logging" "info" (func $info (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "process") (param i32) (result i32)
    (call $info (i32.const {address}) (i32.const 16)) (local.get 0)))""")


def test_streams_on_threads_each_get_their_own_host_function_errors(runtime_factory, real_frame):
    """Two processors failing at once on two threads (two streams): each call reports its own
    ABI error, never the other thread's (wasmtime-py keeps the last host exception in one global)."""
    import threading

    runtime = runtime_factory(limits=SandboxLimits(max_consecutive_failures=1_000_000))
    other = runtime.add_stream("1")
    processors = [runtime.load_bytes(_bad_pointer_logger(0x7FFF0000), "a"),
                  runtime.load_bytes(_bad_pointer_logger(0x7FFE0000), "b", stream=other)]
    frame = real_frame[:32, :32].copy()

    def hammer(p):
        for _ in range(3000):
            p.process(frame)
    threads = [threading.Thread(target=hammer, args=(p,)) for p in processors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, own in zip(processors, ("2147418112", "2147352576"), strict=True):
        assert p.stats.errors == 3000
        assert all(own in kind for kind in p._errors_by_kind), (p.name, list(p._errors_by_kind))


@pytest.mark.slow
def test_a_host_function_that_waited_can_still_return_a_string(runtime_factory, real_frame):
    """A blocking ``post-image`` that takes 100 ms (five times the 20 ms guest budget) returns
    its text through the guest's allocator: that re-entry must not count the wait as guest
    time (wasmVision's processors block like this)."""
    from vision_host.bench import BENCH_CAPTION, WASM, LatencyServer

    server = LatencyServer(0.1)
    try:
        cfg = {"ollama-url": server.url, "ollama-interval-ms": "0"}
        p = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg)).load(WASM / "ollama-blocking.wasm")
        started = time.perf_counter()
        p.process(real_frame.copy())
        assert time.perf_counter() - started >= 0.1
        assert p.last_error is None and p.stats.errors == 0
        assert p.runtime.processor_store.get("captions", "caption") == BENCH_CAPTION
    finally:
        server.stop()
