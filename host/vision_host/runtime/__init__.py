"""The sandboxed processor runtime: engine and instances (:mod:`.engine`), canonical-ABI
helpers (:mod:`.abi`), mat handles (:mod:`.mats`), and one module per imported interface:
:mod:`.platform` (wasmvision:platform), :mod:`.cv` (wasm:cv), :mod:`.fetch` and
:mod:`.overlay` (vision-host:platform)."""

from .engine import Processor, ProcessorLoadError, Runtime, SandboxLimits, default_cache_dir
from .fetch import NetworkPolicy

__all__ = ["NetworkPolicy", "Processor", "ProcessorLoadError", "Runtime", "SandboxLimits", "default_cache_dir"]
