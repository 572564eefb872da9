"""Finding processors (``-p NAME``), and the ``vision-host list`` and ``info`` commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import __version__
from .settings import UsageError

#: The built processors: the package's ``wasm/`` (in the source tree, a link to the project's ``wasm/``).
REPO_WASM_DIR = (Path(__file__).resolve().parent.parent / "wasm").resolve()


def processor_dirs(extra: str | None = None) -> list[Path]:
    """Directories searched for ``NAME.wasm``, in order: the project's ``wasm/``, then
    ``$VISION_HOST_PROCESSORS_DIR``, then where ``vision-host download processor`` puts them
    (the user's data directory / ``vision-host/processors``), then ``--processors-dir``."""
    from ..datadir import vision_host_data

    dirs = [REPO_WASM_DIR]
    if env := os.environ.get("VISION_HOST_PROCESSORS_DIR"):
        dirs.append(Path(env))
    dirs.append(vision_host_data("processors"))
    if extra:
        dirs.append(Path(extra))
    return dirs


def known_processors(extra: str | None = None) -> dict[str, Path]:
    """Processor names found in :func:`processor_dirs` (first directory wins): every
    ``NAME.wasm`` entry, regular file or not (:func:`not_a_regular_file` tells)."""
    found: dict[str, Path] = {}
    for d in processor_dirs(extra):
        if d.is_dir():
            for f in sorted(d.glob("*.wasm")):
                found.setdefault(f.stem, f)
    return found


def not_a_regular_file(path: Path) -> str | None:
    """None for a regular file (a link to one included), else what ``path`` is instead, as a
    sentence: reading a FIFO would block the run forever, reading a directory fails."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return f"{path} is {kind}, not a .wasm file: remove it or give the path of a processor file"


def resolve_processor(spec: str, extra_dir: str | None = None) -> Path:
    """Path of processor ``spec``: a ``.wasm`` path, or a name looked up in :func:`processor_dirs`.

    Raises:
        UsageError: no such file or name (the message lists the known names), or the path is
            not a regular file (a FIFO, a directory, a device).
    """
    if spec.endswith(".wasm") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UsageError(f"processor file {spec} does not exist")
        if problem := not_a_regular_file(path):
            raise UsageError(f"processor {problem}")
        return path
    known = known_processors(extra_dir)
    if spec in known:
        if problem := not_a_regular_file(known[spec]):
            raise UsageError(f"processor {spec}: {problem}")
        return known[spec]
    names = ", ".join(known) or "none"
    raise UsageError(f"unknown processor {spec!r}: known processors are {names} "
                     f"(or give a path to a .wasm file, or fetch a published one: vision-host download "
                     f"processor NAME; more are found in $VISION_HOST_PROCESSORS_DIR)")


def add_parsers(sub) -> None:
    """Add ``list`` and ``info`` to the subcommands ``sub``."""
    lst = sub.add_parser("list", help="list the processors found, checking their imports")
    lst.add_argument("--processors-dir", metavar="DIR")
    lst.set_defaults(handler=cmd_list)
    sub.add_parser("info", help="print the video capture and writer backends, and the runtime's versions"
                   ).set_defaults(handler=cmd_info)


def cmd_list(args: argparse.Namespace) -> int:
    """``vision-host list``: every processor found, with its imports checked; exit status 1
    when none is found or one cannot run."""
    from ..runtime import ProcessorLoadError, Runtime

    found = known_processors(args.processors_dir)
    if not found:
        print("no processors found in " + ", ".join(str(d) for d in processor_dirs(args.processors_dir)))
        return 1
    bad = 0
    with Runtime(cache_dir=None) as runtime:
        for name, path in found.items():
            if problem := not_a_regular_file(path):
                problems = [problem]
            else:
                try:
                    module = runtime.compile(path.read_bytes(), str(path))
                    problems = runtime.check_imports(module, str(path))
                except ProcessorLoadError as exc:
                    problems = [str(exc)]
                except OSError as exc:
                    problems = [f"cannot read {path}: {exc.strerror}"]
            bad += bool(problems)
            print(f"{name:16} {path}  {'ok' if not problems else 'CANNOT RUN: ' + '; '.join(problems)}")
    return 1 if bad else 0


def cmd_info(args: argparse.Namespace) -> int:
    """``vision-host info``: versions, OpenCV's video I/O backends, and where things are looked up."""
    import importlib.metadata
    import platform

    import cv2

    from ..runtime import default_cache_dir

    def backends(ids) -> str:
        return " ".join(cv2.videoio_registry.getBackendName(b) for b in ids) or "none"

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        cuda = cv2.cuda.getCudaEnabledDeviceCount()
    except (AttributeError, cv2.error):
        cuda = 0
    print(f"vision-host {__version__} {platform.system().lower()}/{platform.machine()} "
          f"Python {platform.python_version()}")
    print(f"OpenCV {cv2.__version__}, wasmtime {version('wasmtime')}")
    print(f"Camera backends: {backends(cv2.videoio_registry.getCameraBackends())}")
    print(f"Stream backends: {backends(cv2.videoio_registry.getStreamBackends())}")
    print(f"Writer backends: {backends(cv2.videoio_registry.getWriterBackends())}")
    print(f"CUDA devices for OpenCV: {cuda}")
    print(f"Processor directories: {', '.join(str(d) for d in processor_dirs(None))}")
    print(f"Compiled-module cache: {default_cache_dir()}")
    return 0
