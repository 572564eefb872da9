"""Build small WebAssembly test modules from WAT text.

``driver_module`` makes a processor that imports chosen host functions and re-exports each
as ``call:<module>#<name>``, so tests can call host functions directly with exact arguments
and inspect guest memory. It has a bump allocator as ``cabi_realloc`` (never frees) and an
identity ``process``.
"""

from __future__ import annotations

import wasmtime

from vision_host.runtime.linking import HOST_FUNCTIONS

_WAT_TYPES = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}


def driver_module(functions: list[tuple[str, str]], heap_start: int = 4096) -> bytes:
    """Core wasm bytes of a driver for ``functions`` ((module, name) pairs)."""
    imports, wrappers = [], []
    for i, key in enumerate(functions):
        spec = HOST_FUNCTIONS[key]
        params = " ".join(_WAT_TYPES[c] for c in spec.params)
        results = " ".join(_WAT_TYPES[c] for c in spec.results)
        sig = (f"(param {params})" if params else "") + (f" (result {results})" if results else "")
        imports.append(f'(import "{spec.module}" "{spec.name}" (func $h{i} {sig}))')
        args = " ".join(f"(local.get {j})" for j in range(len(spec.params)))
        wrappers.append(f'(func (export "call:{spec.module}#{spec.name}") {sig} (call $h{i} {args}))')
    wat = f"""
(module
  {' '.join(imports)}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const {heap_start}))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get 2))))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.const 4)))))
    (local.get $p))
  (func (export "process") (param i32) (result i32) (local.get 0))
  {' '.join(wrappers)}
)"""
    return wasmtime.wat2wasm(wat)


def module(wat: str) -> bytes:
    """Core wasm bytes of ``wat``."""
    return wasmtime.wat2wasm(wat)
