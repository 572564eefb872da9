"""The caption history: every caption event and alert edge of a run, stored in SQLite with a
full-text index and a thumbnail of the captioned frame (:mod:`.store`), written by a subscriber
of the caption bus (:mod:`.recorder`), read by ``vision-host history`` (:mod:`..cli.history`),
written out as JSON Lines, CSV or WebVTT (:mod:`.export`), served to the viewer (:mod:`.api`)
and summarised (:mod:`.summaries`).
With ``--embed-model`` the recorder also stores each caption's text embedding, asked of the
vision server (:mod:`.embeddings`), for ``history search --semantic``.

Importing this package loads no OpenCV (thumbnails import it when they are made) and no HTTP
client (:mod:`.embeddings` is imported where embeddings are asked for).
"""

from __future__ import annotations

from .recorder import HistoryRecorder, start_history
from .export import EXPORT_FORMATS, export
from .store import SCHEMA_VERSION, HistoryError, HistoryStore, default_history_path, parse_when

__all__ = ["EXPORT_FORMATS", "SCHEMA_VERSION", "HistoryError", "HistoryRecorder", "HistoryStore",
           "default_history_path", "export", "parse_when", "start_history"]
