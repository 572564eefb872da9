"""BLIP (``Salesforce/blip-image-captioning-large``, model type ``blip``): conditional
captioning, as its model card shows. The prompt is the text prefix of the caption (``"a photo
of"``; empty = an unconditional caption) and the answer is the continuation. Beam search with
3 beams by default. Its text decoder's positions are absolute, so padding a shorter prompt
would change its answer: BLIP batches only prompts of equal token length.

Several images (consecutive moments of one video) are captioned as one grid of them (see
:mod:`.grid`), oldest top left; the prompt gets no sentence about them, since it is the
caption's beginning.

BLIP answers no text-only request (:attr:`Blip.chats_text` False: a captioner has no language
model to chat with). Its embeddings come from its text decoder's BERT run without the image
(no cross-attention), with the causal self-attention it was trained with and ``[CLS]`` swapped
for its BOS (``[DEC]``) as its ``generate`` does."""

from __future__ import annotations

from typing import Any, Sequence

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
    chats_text = False        # a captioner: nothing answers a request without an image

    def _special_ids(self) -> None:
        super()._special_ids()
        self.eos_ids = {self._text_config().sep_token_id}

    def prepare(self, images: bytes | Sequence[bytes], prompt: str, raw: bool = False,
                max_pixels: int | None = None) -> Prepared:
        prepared = super().prepare(images, prompt, raw, max_pixels)
        # BLIP's generate swaps [CLS] for its BOS and drops the trailing [SEP].
        prepared.prompt_tokens = prepared.length - 1
        return prepared

    def text_hidden_states(self, input_ids: Any, attention_mask: Any) -> Any:
        """The text decoder's BERT on the text alone (no image, causal self-attention)."""
        input_ids = input_ids.clone()
        input_ids[:, 0] = self._text_config().bos_token_id   # [CLS] → [DEC], as BLIP's generate does
        out = self.model.text_decoder.bert(input_ids=input_ids, attention_mask=attention_mask, is_decoder=True,
                                           use_cache=False)
        return out.last_hidden_state

    def answer_start(self, padded_length: int) -> int:
        return padded_length - 1
