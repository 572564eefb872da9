"""The vision-language models behind ``vision-host serve``: BLIP, BLIP-2 and LLaVA-1.5.

Each family is a :class:`VisionLanguageModel` over Hugging Face ``transformers``:

* **BLIP** (``Salesforce/blip-image-captioning-large``, model type ``blip``): conditional
  captioning; the prompt is the text prefix of the caption (``"a photo of"``; empty = an
  unconditional caption) and the answer is the continuation. Beam search with 3 beams by
  default. Its text decoder's positions are absolute, so padding a shorter prompt would
  change its answer: BLIP batches only prompts of equal token length.
* **BLIP-2** (``Salesforce/blip2-opt-2.7b``, ``blip-2``): a question is sent in the model
  card's ``"Question: … Answer:"`` template; an empty prompt gives a caption; ``raw``
  sends the prompt as it is. Greedy by default.
* **LLaVA-1.5** (``llava-hf/llava-1.5-7b-hf``, ``llava``): the prompt and the image go
  through the processor's chat template (``USER: <image>\\n… ASSISTANT:``). Greedy by
  default.

BLIP-2 and LLaVA are decoder-only language models behind a vision encoder; their prompts
are padded on the left, so any prompts batch together and each row's answer is the one it
gets alone. CUDA with float16 when present, CPU with float32 otherwise.

Weights come from a local directory saved with ``save_pretrained``, the local Hugging Face
cache, or the Hub on first use (with a progress bar on stderr; not with
``HF_HUB_OFFLINE=1``). torch and transformers are imported inside methods, so importing
this module stays light.
"""

from __future__ import annotations

import io
import logging
import math
import os
import queue
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

log = logging.getLogger("vision_host.vlm")

#: Short names accepted by ``--model``.
MODEL_ALIASES = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip2": "Salesforce/blip2-opt-2.7b",
    "llava": "llava-hf/llava-1.5-7b-hf",
}
DEFAULT_MODEL = "blip"
#: New tokens when the request does not say (Ollama's ``num_predict``, OpenAI's ``max_tokens``).
DEFAULT_MAX_NEW_TOKENS = 40
#: Image formats :meth:`VisionLanguageModel.prepare` opens (Pillow's names; MPO is the JPEG of
#: many phone cameras, a format of its own in older Pillows). Others (TIFF, EPS, PSD, …) are
#: refused: a smaller attack surface.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP")
#: Default limits on a request's generation options (see :class:`GenerationLimits`).
DEFAULT_MAX_BEAMS = 8
DEFAULT_MAX_NEW_TOKENS_LIMIT = 512
DEFAULT_MAX_TOP_K = 1000
#: Integer options must fit a signed 64-bit integer (Ollama's Go ``int``); the seed may also be
#: an unsigned 64-bit one (what ``torch.manual_seed`` takes).
_INT64 = (-2 ** 63, 2 ** 63 - 1)
_SEED = (-2 ** 63, 2 ** 64 - 1)
#: Files fetched from the Hub on first use (weights as safetensors; ``*.bin`` only without them).
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class ModelLoadError(Exception):
    """The model cannot be loaded (not cached and not downloadable, unsupported family,
    serve extra missing): the message names the model and what to do."""


class BadImage(ValueError):
    """The request's image bytes are not a decodable image (or not of :data:`IMAGE_FORMATS`)."""


class ImageTooLarge(BadImage):
    """The image's header says it decodes to more pixels than allowed; nothing was decoded."""

    @classmethod
    def of(cls, width: int, height: int, limit: int) -> "ImageTooLarge":
        """The error for a ``width``×``height`` image over ``limit`` pixels."""
        return cls(f"the image is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels), above "
                   f"this server's limit of {limit / 1e6:.1f} megapixels (--max-image-pixels)")


class PromptTooLong(ValueError):
    """The prompt (with the image's tokens and the model's template) leaves no room for an
    answer in the text model's positions."""


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


# -- generation settings ------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """How to decode one request; hashable, so equal settings can share a batch.

    ``num_predict``: most new tokens; ``temperature`` > 0 samples (with ``top_p``, ``top_k``),
    else greedy or beam search with ``num_beams``; ``min_length`` / ``max_length``: bounds on
    the answer in tokens (the prompt not counted); ``length_penalty`` (beam search) and
    ``repetition_penalty`` as in transformers' ``generate``; ``seed`` for sampling.
    """

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    num_beams: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None

    #: Ollama option names (and transformers' where they differ) → field.
    OPTION_NAMES = {"num_predict": "num_predict", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "seed": "seed", "num_beams": "num_beams", "min_length": "min_length",
                    "max_length": "max_length", "length_penalty": "length_penalty",
                    "repeat_penalty": "repetition_penalty", "repetition_penalty": "repetition_penalty"}
    _INTS = frozenset({"num_predict", "top_k", "seed", "num_beams", "min_length", "max_length"})

    @classmethod
    def from_options(cls, options: dict, base: "GenerationSettings | None" = None,
                     limits: "GenerationLimits | None" = None) -> "GenerationSettings":
        """Settings from Ollama-style ``options`` over ``base``; unknown keys are ignored (as
        Ollama does); ``limits`` (default :class:`GenerationLimits`'s) bound the costly ones.

        Raises:
            ValueError: naming the key, for a value that is not a finite number, does not fit a
                64-bit integer (``seed``: signed or unsigned), or is out of range: ``num_beams``
                and ``top_k`` from 1 to their limit, ``num_predict`` and ``max_length`` up to
                ``max_new_tokens``, ``min_length`` from 0 to it, ``top_p`` in (0, 1],
                ``repeat_penalty`` above 0.
        """
        limits = limits or GenerationLimits()
        values = dict(base.__dict__) if base is not None else {}
        given: dict[str, str] = {}   # field → the option name the request used
        for key, value in options.items():
            name = cls.OPTION_NAMES.get(key)
            if name is None or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"option {key!r} must be a number, not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"option {key!r} must be a finite number, not {value}")
            if name in cls._INTS:
                value = int(value)
                low, high = _SEED if name == "seed" else _INT64
                if not low <= value <= high:
                    raise ValueError(f"option {key!r} does not fit a 64-bit integer")
            else:
                try:
                    value = float(value)
                except OverflowError:
                    raise ValueError(f"option {key!r} is too large a number") from None
            values[name] = value
            given[name] = key
        settings = cls(**values)

        def key_of(name: str) -> str:
            return given.get(name, name)
        for name, limit, flag in (("num_beams", limits.max_beams, "--max-beams"),
                                  ("top_k", limits.max_top_k, "--max-top-k")):
            v = getattr(settings, name)
            if v is not None and v < 1:
                raise ValueError(f"option {key_of(name)!r} must be at least 1")
            if v is not None and v > limit:
                raise ValueError(f"option {key_of(name)!r} is {v}, above this server's limit of {limit} ({flag})")
        for name in ("num_predict", "max_length", "min_length"):
            v = getattr(settings, name)
            if v is not None and v > limits.max_new_tokens:
                raise ValueError(f"option {key_of(name)!r} is {v}, above this server's limit of "
                                 f"{limits.max_new_tokens} new tokens (--max-new-tokens)")
        if settings.min_length is not None and settings.min_length < 0:
            raise ValueError(f"option {key_of('min_length')!r} must be at least 0")
        if settings.top_p is not None and not 0 < settings.top_p <= 1:
            raise ValueError(f"option {key_of('top_p')!r} must be in (0, 1]")
        if settings.repetition_penalty is not None and settings.repetition_penalty <= 0:
            raise ValueError(f"option {key_of('repetition_penalty')!r} must be positive")
        return settings

    @property
    def sampling(self) -> bool:
        """Whether these settings sample (``temperature`` > 0) rather than search."""
        return self.temperature is not None and self.temperature > 0


@dataclass(frozen=True)
class GenerationLimits:
    """Upper bounds on a request's generation options (``vision-host serve``'s ``--max-beams``,
    ``--max-new-tokens``, ``--max-top-k``): beyond them :meth:`GenerationSettings.from_options`
    refuses the request rather than letting one request hold the model worker.

    ``max_beams``: ``num_beams``; ``max_new_tokens``: ``num_predict`` (OpenAI's and Workers
    AI's ``max_tokens``), ``max_length`` and ``min_length``, in tokens; ``max_top_k``: ``top_k``.

    Raises:
        ValueError: a limit below 1.
    """

    max_beams: int = DEFAULT_MAX_BEAMS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_top_k: int = DEFAULT_MAX_TOP_K

    def __post_init__(self) -> None:
        for name in ("max_beams", "max_new_tokens", "max_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")


@dataclass
class Prepared:
    """One request's model inputs, on the model's device.

    ``tensors``: ``input_ids`` and ``attention_mask`` (1×L int64), ``pixel_values``
    (1×3×H×W, the model's dtype); ``prompt_tokens``: L as Ollama counts it.
    """

    tensors: dict
    prompt_tokens: int

    @property
    def length(self) -> int:
        """L: the prompt's length in tokens (image tokens included)."""
        return int(self.tensors["input_ids"].shape[1])


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


# -- the models ---------------------------------------------------------------------------------
class VisionLanguageModel:
    """A captioning / visual question answering model, loaded through ``from_pretrained``.

    Only the serving worker thread calls :meth:`generate`, :meth:`load_weights` and
    :meth:`unload`; :meth:`prepare` (image decoding, tokenising) runs on any thread, also
    while the weights are unloaded. Subclasses set the transformers classes and the prompt.
    """

    family = ""
    model_type = ""
    model_class = ""
    #: Whether prompts of different lengths can share a batch (left padding).
    pads_prompts = True
    #: Beams for a non-streamed, non-sampled answer unless the request says.
    default_num_beams = 1
    #: Whether ``generate`` takes the padding id from us (BLIP's sets its own).
    pass_pad_id = True

    def __init__(self, name: str, source: str, local: bool, config: Any = None) -> None:
        self.name, self.source, self.local = name, source, local
        self.config = config
        self.loaded_at = datetime.now(timezone.utc)
        self.load_duration_ns = 0
        self.model = self.processor = None
        self.dtype = None
        self.device = "cpu"
        self.size = 0
        self.n_params = 0
        self.eos_ids: set[int] = set()
        self.pad_id = 0

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory (False after a keep_alive unload)."""
        return self.model is not None

    # -- loading ------------------------------------------------------------------------------
    def _classes(self):
        import transformers
        return getattr(transformers, self.model_class), transformers.AutoProcessor

    def load(self) -> "VisionLanguageModel":
        """Load the processor and weights: local directory or cache first, then the Hub.

        Raises:
            ModelLoadError: not cached and not downloadable, not of this family.
        """
        t0 = time.perf_counter()
        import torch
        model_cls, processor_cls = self._classes()
        cuda = torch.cuda.is_available()
        self.dtype = torch.float16 if cuda else torch.float32
        self.device = "cuda" if cuda else "cpu"

        def attempt():
            with _quiet_transformers():
                proc = processor_cls.from_pretrained(self.source, local_files_only=True)
                mod = model_cls.from_pretrained(self.source, local_files_only=True, dtype=self.dtype)
            return proc, mod

        try:
            try:
                self.processor, self.model = attempt()
            except OSError:
                if self.local or hub_offline():
                    raise
                download(self.source)
                self.processor, self.model = attempt()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(load_error(self.source, self.local, exc)) from None
        if self.model.config.model_type != self.model_type:
            raise ModelLoadError(f"model {self.source} is a {self.model.config.model_type!r} model, not {self.family}")
        self.config = self.model.config
        self.model.to(self.device).eval()
        self.size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._special_ids()
        self.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        self.loaded_at = datetime.now(timezone.utc)
        return self

    def _special_ids(self) -> None:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self._text_config(), "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.processor.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)

    def _text_config(self):
        return getattr(self.config, "text_config", self.config)

    def load_weights(self) -> float:
        """Reload the weights after :meth:`unload` (from the same files): seconds it took.

        Raises:
            ModelLoadError: the files are gone.
        """
        if self.model is not None:
            return 0.0
        t0 = time.perf_counter()
        model_cls, _ = self._classes()
        try:
            with _quiet_transformers():
                model = model_cls.from_pretrained(self.source, local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot reload model {self.source}: {str(exc).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        self.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        self.loaded_at = datetime.now(timezone.utc)
        log.info("model %s reloaded in %.2f s", self.source, self.load_duration_ns / 1e9)
        return self.load_duration_ns / 1e9

    def unload(self) -> None:
        """Drop the weights (the processor stays: it is small and :meth:`prepare` needs it)."""
        if self.model is None:
            return
        self.model = None
        import gc
        gc.collect()
        if self.device == "cuda":
            import torch
            torch.cuda.empty_cache()
        log.info("model %s unloaded", self.source)

    # -- requests -------------------------------------------------------------------------------
    def prompt_text(self, prompt: str, raw: bool) -> str:
        """The text the processor gets for a user's ``prompt`` (``raw``: as it is)."""
        return prompt

    def prepare(self, image_bytes: bytes, prompt: str, raw: bool = False,
                max_pixels: int | None = None) -> Prepared:
        """Decode the image (of :data:`IMAGE_FORMATS`) and build the model inputs.

        ``max_pixels``: the most pixels (width × height) the image may decode to (None: no
        limit but Pillow's own); read from the image's header, before anything is decoded.

        Raises:
            BadImage: the bytes are not an image of those formats.
            ImageTooLarge: the image has more than ``max_pixels`` pixels (nothing decoded).
            PromptTooLong: the prompt's tokens (with the image's) fill the model's positions.
        """
        from PIL import Image, UnidentifiedImageError

        Image.init()   # register every plugin (WEBP), so that formats= can name them
        formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]   # (newer Pillows open MPO as JPEG)
        try:
            image = Image.open(io.BytesIO(image_bytes), formats=formats)   # the header only
        except Image.DecompressionBombError as exc:   # over Pillow's own limit (2 × MAX_IMAGE_PIXELS)
            raise ImageTooLarge(f"the image is too large to decode: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise BadImage("Failed to load image or audio file") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge.of(width, height, max_pixels)
        try:
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise BadImage("Failed to load image or audio file") from None
        text = self.prompt_text(prompt.strip(), raw)
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        tensors = {}
        for key in ("input_ids", "attention_mask", "pixel_values"):
            value = inputs[key]
            tensors[key] = value.to(self.device, dtype=self.dtype) if key == "pixel_values" else value.to(self.device)
        prepared = Prepared(tensors, int(tensors["input_ids"].shape[1]))
        if prepared.length >= self.position_limit():
            raise PromptTooLong(f"the prompt is {prepared.length} tokens with the image's; model {self.name} takes "
                                f"{self.position_limit()} positions for prompt and answer: shorten the prompt")
        return prepared

    def answer_start(self, padded_length: int) -> int:
        """Where the new tokens start in a row of ``generate``'s output."""
        return padded_length

    def position_limit(self) -> int:
        """Most positions (prompt plus answer) the text model takes."""
        return int(getattr(self._text_config(), "max_position_embeddings", 2048) or 2048)

    def max_new_tokens(self, prepared: Prepared, settings: GenerationSettings) -> int:
        """Tokens to generate: ``num_predict`` (default :data:`DEFAULT_MAX_NEW_TOKENS`) and
        ``max_length``, capped so prompt plus answer fit the text model's positions."""
        n = settings.num_predict if settings.num_predict and settings.num_predict > 0 else DEFAULT_MAX_NEW_TOKENS
        if settings.max_length and settings.max_length > 0:
            n = min(n, settings.max_length)
        return max(1, min(n, self.position_limit() - prepared.length))

    def decoding(self, settings: GenerationSettings, stream: bool) -> tuple:
        """``generate`` keyword arguments (as a hashable tuple of pairs) for these settings:
        sampling, else greedy when streaming, else beam search with ``num_beams``."""
        kw: dict[str, Any] = {}
        if settings.sampling:
            kw.update(do_sample=True, temperature=settings.temperature, num_beams=1)
            if settings.top_p is not None:
                kw["top_p"] = settings.top_p
            if settings.top_k is not None:
                kw["top_k"] = settings.top_k
        else:
            beams = 1 if stream else (settings.num_beams or self.default_num_beams)
            kw.update(do_sample=False, num_beams=beams)
            if beams > 1 and settings.length_penalty is not None:
                kw["length_penalty"] = settings.length_penalty
        if settings.repetition_penalty is not None:
            kw["repetition_penalty"] = settings.repetition_penalty
        if settings.min_length:
            kw["min_new_tokens"] = settings.min_length
        return tuple(sorted(kw.items()))

    def batch_key(self, prepared: Prepared, decoding: tuple, max_new: int, seed: int | None) -> tuple:
        """Requests with equal keys can share one batched ``generate``."""
        return (None if self.pads_prompts else prepared.length, decoding, max_new, seed)

    def collate(self, rows: Sequence[Prepared]) -> tuple[dict, int]:
        """Stack the rows' inputs, padding prompts on the left: ``(tensors, padded length)``."""
        import torch

        length = max(r.length for r in rows)
        ids, masks = [], []
        for r in rows:
            pad = length - r.length
            ids.append(torch.nn.functional.pad(r.tensors["input_ids"], (pad, 0), value=self.pad_id))
            masks.append(torch.nn.functional.pad(r.tensors["attention_mask"], (pad, 0), value=0))
        pixels = torch.cat([r.tensors["pixel_values"] for r in rows])
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks), "pixel_values": pixels}, length

    def generate(self, rows: Sequence["GenerationRow"], decoding: tuple, max_new: int, seed: int | None) -> None:
        """One batched ``generate`` for ``rows`` (equal :meth:`batch_key`); streamed rows get
        their text pieces as tokens arrive. Fills in each row's result."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs, length = self.collate([r.prepared for r in rows])
        kwargs = dict(decoding)
        kwargs["max_new_tokens"] = max_new
        if self.pass_pad_id:
            kwargs["pad_token_id"] = self.pad_id
        if seed is not None:
            torch.manual_seed(int(seed))

        class Stop(StoppingCriteria):
            """Per row: stop once it is cancelled (client gone) or past its deadline."""

            def __call__(self, input_ids, scores, **kw):
                flags = [r.should_stop() for r in rows]
                n = input_ids.shape[0]
                if n % len(rows):
                    return torch.full((n,), all(flags), dtype=torch.bool, device=input_ids.device)
                return torch.tensor(flags, dtype=torch.bool, device=input_ids.device).repeat_interleave(n // len(rows))
        kwargs["stopping_criteria"] = StoppingCriteriaList([Stop()])
        streamer = None
        if any(r.stream is not None for r in rows):
            streamer = kwargs["streamer"] = RowStreamer(self, rows)
        started = time.perf_counter()
        for r in rows:
            r.started(started)
        try:
            with torch.inference_mode():
                sequences = self.model.generate(**inputs, **kwargs)
        finally:
            if streamer is not None:
                streamer.end()
        ended = time.perf_counter()
        start = self.answer_start(length)
        for i, r in enumerate(rows):
            ids = self.cut(sequences[i][start:].tolist())
            ended_on_eos = bool(ids) and ids[-1] in self.eos_ids
            text = self.processor.decode(ids, skip_special_tokens=True).strip()
            reason = "length" if len(ids) >= max_new and not ended_on_eos else "stop"
            r.finished(text, len(ids), reason, ended)

    def cut(self, ids: list[int]) -> list[int]:
        """A row's new token ids up to and including its first end-of-sequence token."""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[:i + 1]
        return ids


class Blip(VisionLanguageModel):
    """BLIP conditional captioning: the prompt is the caption's prefix; 3 beams by default."""

    family = "blip"
    model_type = "blip"
    model_class = "BlipForConditionalGeneration"
    pads_prompts = False
    default_num_beams = 3
    pass_pad_id = False

    def _special_ids(self) -> None:
        super()._special_ids()
        self.eos_ids = {self._text_config().sep_token_id}

    def prepare(self, image_bytes: bytes, prompt: str, raw: bool = False,
                max_pixels: int | None = None) -> Prepared:
        prepared = super().prepare(image_bytes, prompt, raw, max_pixels)
        # BLIP's generate swaps [CLS] for its BOS and drops the trailing [SEP].
        prepared.prompt_tokens = prepared.length - 1
        return prepared

    def answer_start(self, padded_length: int) -> int:
        return padded_length - 1


class Blip2(VisionLanguageModel):
    """BLIP-2 with a decoder-only text model (OPT): questions in ``Question: … Answer:``.

    Raises (from :meth:`load`) ModelLoadError for the Flan-T5 (encoder-decoder) checkpoints.
    """

    family = "blip-2"
    model_type = "blip-2"
    model_class = "Blip2ForConditionalGeneration"

    def prompt_text(self, prompt: str, raw: bool) -> str:
        if raw or not prompt:
            return prompt
        return f"Question: {prompt} Answer:"

    def load(self) -> "Blip2":
        if self.config is not None and not getattr(self.config, "use_decoder_only_language_model", True):
            raise ModelLoadError(f"model {self.source} is BLIP-2 with an encoder-decoder text model (Flan-T5), "
                                 f"which vision-host serve does not run: use an OPT one, e.g. --model blip2")
        return super().load()


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


FAMILIES: dict[str, type[VisionLanguageModel]] = {cls.model_type: cls for cls in (Blip, Blip2, Llava)}


class GenerationRow(Protocol):
    """What :meth:`VisionLanguageModel.generate` needs of one request (the server's ``Job``):
    its inputs, its :class:`TextQueue` when streamed, whether to stop now (cancelled or past
    its deadline), and where to put the start (``time.perf_counter()`` s) and the answer
    (text, new tokens counted with the end token, ``"stop"``/``"length"``, end time)."""

    prepared: Prepared
    stream: TextQueue | None

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
        self.done = [r.stream is None for r in rows]
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
                self.rows[i].stream.end()
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
            self.rows[i].stream.put(text[self.sent[i]:end])
            self.sent[i] = end
        return text

    def end(self) -> None:
        """``generate`` returned (or failed): send what is left and end the open streams."""
        for i, r in enumerate(self.rows):
            if not self.done[i]:
                self._flush(i, final=True)
                r.stream.end()


# -- loading helpers ----------------------------------------------------------------------------
def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids reaching the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class _quiet_transformers:
    """Silence transformers' warnings and progress bars (e.g. "Loading weights") inside."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity(self.level)
        hf_logging.enable_progress_bar()
        return False


def download(source: str) -> str:
    """Fetch ``source`` from the Hugging Face Hub into the local cache, with progress bars on
    stderr; returns the snapshot directory. Safetensors weights only, unless the repository
    has none. Raises OSError (huggingface_hub's errors are OSErrors) when it cannot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    log.warning("model %s is not in the local Hugging Face cache: downloading it", source)
    enable_progress_bars()
    path = snapshot_download(source, allow_patterns=_HUB_FILES)
    if not any(Path(path).rglob("*.safetensors")):
        path = snapshot_download(source, allow_patterns=_HUB_FILES + ["*.bin"])
    return path


def load_error(source: str, local: bool, exc: Exception) -> str:
    """The message for a model that cannot be loaded: what is missing and how to fetch it."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if local:
        return (f"cannot load model from {source}: {first} (the directory must hold a BLIP, BLIP-2 or LLaVA model "
                f"and its processor, saved with save_pretrained)")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        GatedRepoError = RepositoryNotFoundError = ()
    if isinstance(exc, GatedRepoError):   # a subclass of RepositoryNotFoundError: test it first
        return (f"cannot load model {source}: it is a gated repository on the Hugging Face Hub; accept its terms on "
                f"its page and set HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"cannot load model {source}: the Hugging Face Hub has no repository {source} (check the id; for a "
                f"private repository set HF_TOKEN), or pass --model DIR with a directory saved with save_pretrained")
    why = ("the Hugging Face Hub is off (HF_HUB_OFFLINE=1)" if hub_offline()
           else f"it could not be downloaded ({first})")
    return (f"cannot load model {source}: its weights are not in the local Hugging Face cache ({cache}) and {why}. "
            f"On a machine with internet run `hf download {source}` and copy the cache here, or pass --model DIR "
            f"with a directory saved with save_pretrained")


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
    try:
        try:
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(source, local_files_only=True)
        except OSError:
            if local or hub_offline():
                raise
            download(source)
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(load_error(source, local, exc)) from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelLoadError(f"model {source} is a {config.model_type!r} model: vision-host serve runs "
                             f"BLIP, BLIP-2 and LLaVA models ({', '.join(sorted(FAMILIES))}), e.g. --model blip")
    return family(name, source, local, config)
