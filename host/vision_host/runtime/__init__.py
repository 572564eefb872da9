"""The sandboxed processor runtime: engine, instances and linking (:mod:`.engine`), the WIT
contract reader (:mod:`.wit`), canonical-ABI lifting and lowering (:mod:`.canon`), guest
memory (:mod:`.abi`), resource handles (:mod:`.handles`), the ``wasm:cv/mat`` data accessors
served inside wasm (:mod:`.accessors`), and one module per imported
interface: :mod:`.platform` (wasmvision:platform), :mod:`.cv`, :mod:`.objdetect`, :mod:`.dnn`,
:mod:`.features2d` (wasm:cv), :mod:`.fetch` and :mod:`.overlay` (vision-host:platform)."""

from .engine import Processor, ProcessorLoadError, Runtime, SandboxLimits, StreamContext, default_cache_dir
from .fetch import NetworkPolicy

__all__ = ["NetworkPolicy", "Processor", "ProcessorLoadError", "Runtime", "SandboxLimits", "StreamContext",
           "default_cache_dir"]
