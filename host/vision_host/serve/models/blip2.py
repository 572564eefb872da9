"""BLIP-2 (``Salesforce/blip2-opt-2.7b``, model type ``blip-2``): a question is sent in the
model card's ``"Question: … Answer:"`` template; an empty prompt gives a caption; ``raw`` sends
the prompt as it is. Greedy by default. Its OPT text model is decoder-only: prompts are padded
on the left, so any prompts batch together.

BLIP-2 takes one image: several (consecutive moments of one video) are tiled into one grid
(:mod:`.grid`, oldest top left) and a question starts with :data:`.base.GRID_NOTE` (``"The
image is a grid of consecutive moments of one video, oldest first, left to right then top to
bottom. Question: … Answer:"``) unless it already speaks of "consecutive moments"; an empty
prompt (a caption) and a ``raw`` one are sent as they are."""

from __future__ import annotations

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

    def load(self) -> "Blip2":
        if self.config is not None and not getattr(self.config, "use_decoder_only_language_model", True):
            raise ModelLoadError(f"model {self.source} is BLIP-2 with an encoder-decoder text model (Flan-T5), "
                                 f"which vision-host serve does not run: use an OPT one, e.g. --model blip2")
        return super().load()
