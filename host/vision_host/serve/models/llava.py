"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``, model type ``llava``): the prompt and the image go
through the processor's chat template (``USER: <image>\\n… ASSISTANT:``, the model card's
prompt format). Greedy by default. Its Llama text model is decoder-only: prompts are padded on
the left, so any prompts batch together."""

from __future__ import annotations

from .base import VisionLanguageModel


class Llava(VisionLanguageModel):
    """LLaVA-1.5: the processor's chat template, one image and one user turn."""

    family = "llava"
    model_type = "llava"
    model_class = "LlavaForConditionalGeneration"

    def prompt_text(self, prompt: str, raw: bool) -> str:
        if raw:
            return prompt if "<image>" in prompt else f"<image>\n{prompt}"
        prompt = prompt or "Describe this image."
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return f"USER: <image>\n{prompt} ASSISTANT:"   # llava-1.5's prompt format
