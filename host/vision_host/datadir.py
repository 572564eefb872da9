"""Where vision-host keeps what outlives a run (the caption history, the event outbox, downloaded
processors and models): ``vision_host_data()``, the user's data directory / ``vision-host``.

The user's data directory is ``$XDG_DATA_HOME`` when set to an absolute path, else
``~/.local/share`` on Linux and other Unix systems (the XDG Base Directory specification),
``~/Library/Application Support`` on macOS, and ``%LOCALAPPDATA%`` on Windows (the home
directory's ``AppData/Local`` when unset). Nothing is created here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["user_data_dir", "vision_host_data"]


def user_data_dir() -> Path:
    """The user's data directory (see the module docstring)."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ["LOCALAPPDATA"]) if os.environ.get("LOCALAPPDATA") else home / "AppData" / "Local"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"


def vision_host_data(*parts: str) -> Path:
    """The user's data directory / ``vision-host`` / ``parts`` (e.g. ``vision_host_data("history.sqlite3")``)."""
    return user_data_dir().joinpath("vision-host", *parts)
