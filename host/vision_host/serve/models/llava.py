"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``, model type ``llava``): the prompt and the image go
through the processor's chat template (``USER: <image>\\n… ASSISTANT:``, the model card's
prompt format). Greedy by default. Its Llama text model is decoder-only: prompts are padded on
the left, so any prompts batch together.

Several images (consecutive moments of one video, oldest first) go to the model one by one:
the template gets one ``{"type": "image"}`` part per image (``USER: <image>\\n<image>\\n…``),
the processor the images as a list, and the question starts with :data:`.base.FRAMES_NOTE`
(``"The images are consecutive moments of one video, oldest first. "``) unless it already
speaks of "consecutive moments". Requests batch only with requests of as many images. When
that prompt would not fit the model's positions, the images are answered as one grid
(:mod:`.grid`) with :data:`.base.GRID_NOTE`. A ``raw`` prompt is sent as it is, with one
``<image>`` per image put first unless it has exactly that many.

Without an image (text-only chat) the Llama language model answers: the turns (system, user,
assistant) go through the same chat template with text parts only (``USER: … ASSISTANT: …
USER: … ASSISTANT:``; :meth:`Llava.text_prompt`); a ``raw`` prompt is sent as it is.
Embeddings are Llama's last hidden state (:mod:`.base`)."""

from __future__ import annotations

from typing import Sequence

from .base import BadPrompt, VisionLanguageModel

#: LLaVA's image placeholder in a prompt.
IMAGE_TOKEN = "<image>"


class Llava(VisionLanguageModel):
    """LLaVA-1.5: the processor's chat template, one user turn with one image part per image."""

    family = "llava"
    model_type = "llava"
    model_class = "LlavaForConditionalGeneration"
    many_images = True

    def prompt_text(self, prompt: str, raw: bool, images: int = 1, note: str = "") -> str:
        if raw:
            found = prompt.count(IMAGE_TOKEN)
            if not found:
                return f"{IMAGE_TOKEN}\n" * images + prompt
            if found != images:
                raise BadPrompt(f"the raw prompt has {found} {IMAGE_TOKEN} placeholders for {images} image(s): "
                                f"give one per image, or none to have them put first")
            return prompt
        prompt = note + (prompt or ("Describe these images." if images > 1 else "Describe this image."))
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": prompt}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return f"USER: {f'{IMAGE_TOKEN}{chr(10)}' * images}{prompt} ASSISTANT:"   # llava-1.5's prompt format

    def text_prompt(self, turns: Sequence[tuple[str, str]], raw: bool = False) -> str:
        """The turns through the chat template, text parts only, ending with the assistant's
        cue (``raw``: the last user text as it is)."""
        if raw:
            return next((t for r, t in reversed(turns) if r == "user"), "")
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": role, "content": [{"type": "text", "text": text.strip()}]}
                            for role, text in turns if text.strip()]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        parts = [text.strip() if role == "system" else f"{role.upper()}: {text.strip()}"
                 for role, text in turns if text.strip()]
        return " ".join(parts + ["ASSISTANT:"])   # llava-1.5's prompt format
