"""Streamed answers: a batched ``generate``'s tokens become each streamed row's text pieces,
a word at a time (transformers' ``BaseStreamer`` protocol), through a :class:`TextQueue` from
the model worker thread to the HTTP response."""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    from .base import Prepared, VisionLanguageModel


class TextQueue:
    """The text pieces of one streamed answer, from the model worker to the HTTP response.

    Iterating yields pieces until :meth:`end`; waits at most ``timeout_s`` for each piece
    (then raises ``queue.Empty``).
    """

    def __init__(self, timeout_s: float) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.timeout_s = timeout_s

    def put(self, text: str) -> None:
        """Add the next piece (any thread)."""
        self._queue.put(text)

    def end(self) -> None:
        """No more pieces: iteration stops after those already put."""
        self._queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._queue.get(timeout=self.timeout_s)
            if piece is None:
                return
            yield piece


class GenerationRow(Protocol):
    """What :meth:`.base.VisionLanguageModel.generate` needs of one request (the scheduler's
    ``Job``): its inputs, its :class:`TextQueue` when its reply is streamed, whether to stop now
    (cancelled or past its deadline), its output format (``constraint``), and where to put the start (``time.perf_counter()`` s) and
    the answer (text, new tokens counted with the end token, ``"stop"``/``"length"``, end time)."""

    prepared: Prepared
    streamed_reply: TextQueue | None
    #: The request's output format (a :class:`..structured.Constraint`), or None.
    constraint: object | None

    def should_stop(self) -> bool: ...

    def started(self, at: float) -> None: ...

    def finished(self, text: str, tokens: int, reason: str, at: float) -> None: ...


class RowStreamer:
    """A ``generate`` streamer for a batch: each step's tokens (one per row) become text
    pieces in the streamed rows' :class:`TextQueue`, a word at a time, until the row's
    end-of-sequence token (transformers' ``BaseStreamer`` protocol: ``put`` gets the prompt
    first, then a ``(batch,)`` tensor per step; ``end`` once)."""

    def __init__(self, model: VisionLanguageModel, rows: Sequence[GenerationRow]) -> None:
        self.model = model
        self.rows = rows
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.sent = [0] * len(rows)
        self.done = [r.streamed_reply is None for r in rows]
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        step = value.reshape(len(self.rows), -1)[:, -1].tolist()
        for i, token in enumerate(step):
            if self.done[i]:
                continue
            if token in self.model.eos_ids:   # this row is complete: answer it now
                text = self._flush(i, final=True)
                self.rows[i].finished(text.strip(), len(self.tokens[i]) + 1, "stop", time.perf_counter())
                self.rows[i].streamed_reply.end()
                continue
            self.tokens[i].append(token)
            self._flush(i, final=False)

    def _flush(self, i: int, final: bool) -> str:
        """Send row ``i``'s new text up to the last whole word (all of it when ``final``);
        returns the row's text so far."""
        text = self.model.processor.decode(self.tokens[i], skip_special_tokens=True)
        if final:
            end = len(text)
            self.done[i] = True
        elif text.endswith("\n"):
            end = len(text)
        else:
            end = text.rfind(" ") + 1
            if text.endswith("\ufffd"):   # half of a multi-byte character
                end = min(end, len(text) - 1)
        if end > self.sent[i]:
            self.rows[i].streamed_reply.put(text[self.sent[i]:end])
            self.sent[i] = end
        return text

    def end(self) -> None:
        """``generate`` returned (or failed): send what is left and end the open streams."""
        for i, r in enumerate(self.rows):
            if not self.done[i]:
                self._flush(i, final=True)
                r.streamed_reply.end()
