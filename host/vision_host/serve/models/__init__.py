"""The vision-language models behind ``vision-host serve``: BLIP, BLIP-2 and LLaVA-1.5.

Each family is a :class:`.base.VisionLanguageModel` over Hugging Face ``transformers``, one
module each: ``blip`` (conditional captioning, the prompt is the caption's prefix), ``blip2``
(``"Question: … Answer:"``) and ``llava`` (the processor's chat template). BLIP-2 and LLaVA are
decoder-only language models behind a vision encoder; their prompts are padded on the left, so
any prompts batch together and each row's answer is the one it gets alone. ``settings``: a
request's decoding options and the server's limits on them; ``streaming``: a batch's tokens as
each streamed row's words; ``grid``: several frames tiled into one image (BLIP, BLIP-2); ``hub``:
where the weights come from (a directory saved with ``save_pretrained``, the local Hugging Face
cache, or the Hub on first use).

This module names the models (``--model``: an alias, a Hub id or a directory) and opens them.
Importing it (and ``settings``, ``hub``, ``base``) never imports torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import VisionLanguageModel
from .blip import Blip
from .blip2 import Blip2
from .hub import ModelLoadError, from_local_or_hub, quiet_transformers
from .llava import Llava
from .settings import (DEFAULT_MAX_BEAMS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS_LIMIT, DEFAULT_MAX_TOP_K,
                       GenerationLimits, GenerationSettings)

__all__ = ["DEFAULT_MAX_BEAMS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_NEW_TOKENS_LIMIT", "DEFAULT_MAX_TOP_K",
           "DEFAULT_MODEL", "FAMILIES", "MODEL_ALIASES", "GenerationLimits", "GenerationSettings", "ModelLoadError",
           "VisionLanguageModel", "normalize_model_name", "open_model", "resolve_model"]

#: Short names accepted by ``--model``.
MODEL_ALIASES = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "llava": "llava-hf/llava-1.5-7b-hf",
}
DEFAULT_MODEL = "blip"
#: The families served, by the ``model_type`` of their ``config.json``.
FAMILIES: dict[str, type[VisionLanguageModel]] = {cls.model_type: cls for cls in (Blip, Blip2, Llava)}


def normalize_model_name(name: str) -> str:
    """Ollama's matching: case-insensitive, and a name without a tag means ``:latest``."""
    name = (name or "").strip().lower()
    if not name:
        return ""
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def resolve_model(spec: str) -> tuple[str, str, bool]:
    """``--model`` → ``(served name, source, is_local_dir)``.

    ``spec`` is an alias (:data:`MODEL_ALIASES`), a local directory saved with
    ``save_pretrained``, or a Hugging Face Hub id (``owner/name``).

    Raises:
        ModelLoadError: a path that is not a directory.
    """
    spec = spec.strip()
    if spec.lower() in MODEL_ALIASES:
        return spec.lower(), MODEL_ALIASES[spec.lower()], False
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name.lower() or "model", str(path.resolve()), True
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelLoadError(f"--model {spec}: no such directory (give a directory saved with "
                             f"save_pretrained, a Hugging Face Hub id, or one of {', '.join(MODEL_ALIASES)})")
    return spec.lower(), spec, False


def open_model(spec: str = DEFAULT_MODEL) -> VisionLanguageModel:
    """The model for ``--model`` (alias, Hub id or directory), its family read from its
    ``config.json`` (the local copy first, then the Hub); not loaded yet.

    Raises:
        ModelLoadError: the serve extra is missing, the config cannot be had, or the model
            is not BLIP, BLIP-2 or LLaVA.
    """
    name, source, local = resolve_model(spec)
    try:
        import torch  # noqa: F401
        from transformers import AutoConfig
    except ImportError as exc:
        raise ModelLoadError(f"the serve extra is not installed ({exc.name} is missing): "
                             f"pip install 'vision-host[serve]'") from None

    def read():
        with quiet_transformers():
            return AutoConfig.from_pretrained(source, local_files_only=True)
    config = from_local_or_hub(source, local, read)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(f"model {source} is a {config.model_type!r} model: vision-host serve runs "
                             f"BLIP, BLIP-2 and LLaVA models ({', '.join(sorted(FAMILIES))}), e.g. --model blip")
    return family(name, source, local, config)
