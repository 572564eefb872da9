"""BLIP-2 (``Salesforce/blip2-opt-2.7b``, model type ``blip-2``): a question is sent in the
model card's ``"Question: … Answer:"`` template; an empty prompt gives a caption; ``raw`` sends
the prompt as it is. Greedy by default. Its OPT text model is decoder-only: prompts are padded
on the left, so any prompts batch together.

BLIP-2 takes one image: several (consecutive moments of one video) are tiled into one grid
(:mod:`.grid`, oldest top left) and a question starts with :data:`.base.GRID_NOTE` (``"The
image is a grid of consecutive moments of one video, oldest first, left to right then top to
bottom. Question: … Answer:"``) unless it already speaks of "consecutive moments"; an empty
prompt (a caption) and a ``raw`` one are sent as they are.

Without an image (text-only chat) the OPT language model answers alone (its own ``generate``):
the turns are written ``{system} Question: {user} Answer: {assistant} Question: {user} Answer:``
(:meth:`Blip2.text_prompt`). Embeddings are OPT's last hidden state (:mod:`.base`)."""

from __future__ import annotations

from typing import Any, Sequence

from .base import VisionLanguageModel
from .hub import ModelLoadError


class Blip2(VisionLanguageModel):
    """BLIP-2 with a decoder-only text model (OPT): questions in ``Question: … Answer:``.

    Raises (from :meth:`load`) ModelLoadError for the Flan-T5 (encoder-decoder) checkpoints.
    """

    family = "blip-2"
    model_type = "blip-2"
    model_class = "Blip2ForConditionalGeneration"

    def prompt_text(self, prompt: str, raw: bool, images: int = 1, note: str = "") -> str:
        if raw or not prompt:
            return prompt
        return f"{note}Question: {prompt} Answer:"

    def text_prompt(self, turns: Sequence[tuple[str, str]], raw: bool = False) -> str:
        """``{system} Question: {user} Answer: {assistant} … Question: {user} Answer:`` (``raw``:
        the last user text as it is)."""
        if raw:
            return next((t for r, t in reversed(turns) if r == "user"), "")
        parts = []
        for role, text in turns:
            text = text.strip()
            if role == "system":
                parts.append(text)
            elif role == "assistant":
                parts.append(text)
            else:
                parts.append(f"Question: {text} Answer:")
        if turns and turns[-1][0] == "assistant":   # nothing asked after the last answer: ask to go on
            parts.append("Question: Answer:")
        return " ".join(p for p in parts if p)

    def generator(self, inputs: dict) -> Any:
        """BLIP-2's own ``generate`` for rows with an image; its OPT's for text-only rows."""
        return self.model if "pixel_values" in inputs else self.model.language_model

    def load(self) -> "Blip2":
        if self.config is not None and not getattr(self.config, "use_decoder_only_language_model", True):
            raise ModelLoadError(f"model {self.source} is BLIP-2 with an encoder-decoder text model (Flan-T5), "
                                 f"which vision-host serve does not run: use an OPT one, e.g. --model blip2")
        return super().load()
