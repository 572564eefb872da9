#!/usr/bin/env python3
"""Builds the Zig processors into wasm/<name>.wasm: the one build command.

    python processor/build.py            # build every processor/<name>/main.zig
    python processor/build.py hello      # build only the named processors
    python processor/build.py --check    # build into a temp dir; exit 1 listing the
                                         # wasm/ files that differ, or when the generated
                                         # processor/sdk/wit.zig is stale (CI)
    python processor/build.py --test     # run the SDK's native Zig unit tests and compile
                                         # every generated binding for wasm32

Before building, processor/sdk/wit.zig (the WIT bindings) is regenerated from wasm/wit/ by
processor/bindgen.py; `--check` only compares it and fails when it differs.

Each processor is one `zig build-exe` (Zig from the `ziglang` PyPI package, run as
`sys.executable -m ziglang`), with the SDK (processor/sdk/vh.zig) as module "vh":

    zig build-exe -fno-entry --export=process --export=cabi_realloc --stack 1048576
        -target wasm32-wasi -O ReleaseSmall --dep vh -Mroot=processor/<name>/main.zig
        -target wasm32-wasi -O ReleaseSmall -Mvh=processor/sdk/vh.zig
        -femit-bin=wasm/<name>.wasm

The result is a WASI preview 1 reactor module (no `_start`) exporting only `process`,
`memory` and `cabi_realloc` (and `_initialize` when main.zig defines it: `--export=_initialize`
is added for such processors), importing only functions of the WIT world
`vision-host:platform/processor` (wasm/wit/). Builds are deterministic (same bytes on every
rebuild). Zig's caches live outside the repository, under the system temp dir
(override with $VH_ZIG_CACHE_DIR).

The SDK module "vh" is vh.zig plus the files it imports from processor/sdk/: wit.zig
(generated), canon.zig (canonical-ABI runtime) and json.zig.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bindgen  # noqa: E402  (processor/bindgen.py)

ROOT = Path(__file__).resolve().parents[1]
PROCESSORS = ROOT / "processor"
SDK = PROCESSORS / "sdk"
OUT = ROOT / "wasm"

#: Bytes of linear memory reserved for the stack (the default would be 16 MiB).
STACK_SIZE = 1024 * 1024


def zig_cache_dir() -> Path:
    """Zig's cache directory, outside the repository; kept between builds for speed
    (the cache is content-addressed, so it never changes the output)."""
    env = os.environ.get("VH_ZIG_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "vision-host-zig-cache"


def processor_names() -> list[str]:
    """Every directory processor/<name>/ holding a main.zig, except the SDK."""
    return sorted(
        p.parent.name for p in PROCESSORS.glob("*/main.zig") if p.parent != SDK
    )


def zig_cmd(*args: str) -> list[str]:
    cache = zig_cache_dir()
    return [
        sys.executable, "-m", "ziglang", *args,
        "--cache-dir", str(cache / "local"),
        "--global-cache-dir", str(cache / "global"),
    ]


def build_one(name: str, out_dir: Path) -> Path:
    """Compiles processor/<name>/main.zig to out_dir/<name>.wasm; raises on failure."""
    out = out_dir / f"{name}.wasm"
    target = ["-target", "wasm32-wasi", "-O", "ReleaseSmall"]
    source = PROCESSORS / name / "main.zig"
    # A processor that defines `export fn _initialize` (start-up work the host runs once,
    # under its longer start-up deadline) has it exported too.
    init = ["--export=_initialize"] if "export fn _initialize(" in source.read_text(encoding="utf-8") else []
    cmd = zig_cmd(
        "build-exe",
        "-fno-entry",
        "--export=process",
        "--export=cabi_realloc",
        *init,
        "--stack", str(STACK_SIZE),
        "--name", name,
        f"-femit-bin={out}",
        *target, "--dep", "vh", f"-Mroot={source}",
        *target, f"-Mvh={SDK / 'vh.zig'}",
    )
    # Run from a temp dir so nothing (e.g. a stray .zig-cache) lands in the repository.
    with tempfile.TemporaryDirectory(prefix="vh-zig-") as cwd:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building {name} failed:\n{res.stderr}{res.stdout}")
    return out


def run_tests() -> int:
    """Runs the native unit tests of the SDK's pure-Zig helpers, then compiles every
    generated wrapper of wit.zig for wasm32 (Zig only compiles what is used, so a processor
    build alone would not catch a broken wrapper)."""
    status = 0
    for src in [SDK / "json.zig", SDK / "canon.zig"]:
        with tempfile.TemporaryDirectory(prefix="vh-zig-") as cwd:
            res = subprocess.run(zig_cmd("test", str(src)), cwd=cwd)
        status |= res.returncode
    with tempfile.TemporaryDirectory(prefix="vh-zig-") as cwd:
        res = subprocess.run(zig_cmd("build-obj", "-target", "wasm32-wasi", "-O", "ReleaseSmall",
                                     f"-femit-bin={Path(cwd) / 'bindings.o'}",
                                     str(SDK / "bindings_check.zig")), cwd=cwd)
    if res.returncode == 0:
        print("wit.zig: every wrapper compiles")
    status |= res.returncode
    return status


def sync_bindings(check: bool) -> bool:
    """Regenerates processor/sdk/wit.zig from wasm/wit/ (or, with `check`, only compares).
    Returns False when `check` finds it stale."""
    text, _ = bindgen.generate()
    current = bindgen.OUT.read_text(encoding="utf-8") if bindgen.OUT.exists() else ""
    if current == text:
        return True
    if check:
        return False
    bindgen.OUT.write_text(text, encoding="utf-8")
    print(f"{bindgen.OUT.relative_to(ROOT)} regenerated from wasm/wit/")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="processors to build (default: all)")
    ap.add_argument("--check", action="store_true",
                    help="build into a temp dir and fail if wasm/ differs")
    ap.add_argument("--test", action="store_true", help="run the SDK unit tests")
    args = ap.parse_args(argv)

    if args.test:
        return run_tests()

    names = args.names or processor_names()
    unknown = [n for n in names if n not in processor_names()]
    if unknown:
        print(f"no such processor: {', '.join(unknown)}", file=sys.stderr)
        return 2

    if args.check:
        with tempfile.TemporaryDirectory(prefix="vh-wasm-") as tmp:
            stale = []
            if not sync_bindings(check=True):
                stale.append(f"{bindgen.OUT.relative_to(ROOT)} (run `python processor/bindgen.py`)")
            for name in names:
                built = build_one(name, Path(tmp))
                committed = OUT / built.name
                if not committed.exists() or not filecmp.cmp(built, committed, shallow=False):
                    stale.append(str(committed.relative_to(ROOT)))
        if stale:
            print("out of date (run `python processor/build.py`):", file=sys.stderr)
            for path in stale:
                print(f"  {path}", file=sys.stderr)
            return 1
        print(f"{len(names)} processor(s) up to date")
        return 0

    sync_bindings(check=False)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vh-wasm-") as tmp:
        for name in names:
            built = build_one(name, Path(tmp))
            dest = OUT / built.name
            shutil.copyfile(built, dest)  # whole file at once: no half-written wasm/
            print(f"{dest.relative_to(ROOT)}  {dest.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
