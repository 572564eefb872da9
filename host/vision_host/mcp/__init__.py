"""MCP (Model Context Protocol) for agents: the run's server at ``/mcp`` on the viewer
(:mod:`.service`), its ``ask`` requests to the vision server (:mod:`.ask`), and the stdio
bridge of ``vision-host mcp --attach`` (:mod:`.bridge`).

Importing this package loads neither the ``mcp`` SDK nor OpenCV; the modules do.
"""

from __future__ import annotations

__all__ = ["McpLimits", "McpService"]


def __getattr__(name: str):
    if name in __all__:
        from . import service
        return getattr(service, name)
    raise AttributeError(name)
