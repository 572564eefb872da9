"""BLIP (``Salesforce/blip-image-captioning-large``, model type ``blip``): conditional
captioning, as its model card shows. The prompt is the text prefix of the caption (``"a photo
of"``; empty = an unconditional caption) and the answer is the continuation. Beam search with
3 beams by default. Its text decoder's positions are absolute, so padding a shorter prompt
would change its answer: BLIP batches only prompts of equal token length.

Several images (consecutive moments of one video) are captioned as one grid of them (see
:mod:`.grid`), oldest top left; the prompt gets no sentence about them, since it is the
caption's beginning."""

from __future__ import annotations

from typing import Sequence

from .base import Prepared, VisionLanguageModel


class Blip(VisionLanguageModel):
    """BLIP conditional captioning: the prompt is the caption's prefix; 3 beams by default."""

    family = "blip"
    model_type = "blip"
    model_class = "BlipForConditionalGeneration"
    pads_prompts = False
    default_num_beams = 3
    pass_pad_id = False
    follows_formats = False   # a captioner: no language-model decoder to hold to a JSON format
    notes_frames = False      # the prompt is the caption's prefix: no sentence before it

    def _special_ids(self) -> None:
        super()._special_ids()
        self.eos_ids = {self._text_config().sep_token_id}

    def prepare(self, images: bytes | Sequence[bytes], prompt: str, raw: bool = False,
                max_pixels: int | None = None) -> Prepared:
        prepared = super().prepare(images, prompt, raw, max_pixels)
        # BLIP's generate swaps [CLS] for its BOS and drops the trailing [SEP].
        prepared.prompt_tokens = prepared.length - 1
        return prepared

    def answer_start(self, padded_length: int) -> int:
        return padded_length - 1
