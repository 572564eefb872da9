"""The sandboxed processor runtime: the run, its streams and loading (:mod:`.engine`), one
processor instance and its calls (:mod:`.processor`), call deadlines by epoch interruption
(:mod:`.deadline`), the host functions and how they are linked (:mod:`.linking`), the WIT
contract reader (:mod:`.wit`), the canonical ABI's host functions (:mod:`.canon`) and
per-type lifting and lowering (:mod:`.canon_codecs`), guest memory (:mod:`.abi`), resource
handles (:mod:`.handles`), the ``wasm:cv/mat`` data accessors served inside wasm
(:mod:`.accessors`), the network policy (:mod:`.policy`), and one module per imported
interface: :mod:`.platform` (wasmvision:platform), :mod:`.cv`, :mod:`.objdetect`, :mod:`.dnn`,
:mod:`.features2d` (wasm:cv), :mod:`.fetch` and :mod:`.overlay` (vision-host:platform)."""

from .engine import Runtime, SandboxLimits, StreamContext, default_cache_dir
from .policy import NetworkPolicy
from .processor import Processor, ProcessorLoadError

__all__ = ["NetworkPolicy", "Processor", "ProcessorLoadError", "Runtime", "SandboxLimits", "StreamContext",
           "default_cache_dir"]
