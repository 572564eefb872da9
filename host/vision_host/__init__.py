"""vision-host: run WebAssembly frame processors over live video.

Data flows one way: :mod:`~vision_host.sources` (capture) → :mod:`~vision_host.pipeline`
(the frame loop) → :mod:`~vision_host.runtime` (sandboxed processors) →
:mod:`~vision_host.outputs`. :mod:`~vision_host.cli` is the ``vision-host`` command.
"""

__version__ = "0.1.0"
