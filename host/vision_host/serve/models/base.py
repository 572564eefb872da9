"""What every model family shares (:class:`VisionLanguageModel`): loading through
transformers' ``from_pretrained``, decoding a request's images and building its inputs, batched
``generate`` with per-row stopping and streaming, and unloading after ``keep_alive``. The
families (``blip.py``, ``blip2.py``, ``llava.py``) set their transformers classes and prompt.

Several images in one request are consecutive moments of one video, oldest first
(:meth:`VisionLanguageModel.prepare`). A family whose processor takes several images with one
placeholder each (:attr:`VisionLanguageModel.many_images`: LLaVA) gets them all, one
``<image>`` each; the others (BLIP, BLIP-2), and LLaVA when that prompt would not fit its
positions, get one grid of them (:mod:`.grid`). LLaVA's and BLIP-2's prompts then start with
:data:`FRAMES_NOTE` (or, on a grid, :data:`GRID_NOTE`) unless they already speak of
"consecutive moments"; BLIP's prompt is the caption's prefix and gets none. One image is
answered exactly as before.

Text-only requests (no image: summaries, chat about earlier answers) go to the language model
alone (:meth:`VisionLanguageModel.prepare_text`): LLaVA's through its chat template with no
image part, BLIP-2's OPT in its ``Question: … Answer:`` turns; a captioner (BLIP,
:attr:`VisionLanguageModel.chats_text` False) cannot answer them. Embeddings
(:meth:`VisionLanguageModel.embed`) are the attention-masked mean of the last hidden state of
the family's text side (:meth:`VisionLanguageModel.text_hidden_states`), L2-normalised.

CUDA with float16 when present, CPU with float32 otherwise. torch and transformers are
imported inside methods, so importing this module stays light.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

from .grid import Grid, compose_grid
from .hub import ModelLoadError, from_local_or_hub, quiet_transformers
from .settings import DEFAULT_MAX_NEW_TOKENS, GenerationSettings
from .streaming import GenerationRow, RowStreamer

log = logging.getLogger(__name__)

#: Image formats :meth:`VisionLanguageModel.prepare` opens (Pillow's names; MPO is the JPEG of
#: many phone cameras, a format of its own in older Pillows). Others (TIFF, EPS, PSD, …) are
#: refused: a smaller attack surface.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP")
#: Put before the prompt of a request whose several images the model gets one by one (LLaVA).
FRAMES_NOTE = "The images are consecutive moments of one video, oldest first. "
#: Put before the prompt of a request whose several images the model gets as one grid.
GRID_NOTE = ("The image is a grid of consecutive moments of one video, oldest first, left to right then "
             "top to bottom. ")


def frames_note(prompt: str, images: int, grid: bool) -> str:
    """The sentence that tells the model what a request's ``images`` are (:data:`FRAMES_NOTE`,
    or :data:`GRID_NOTE` when they were tiled into a ``grid``): empty for one image, or when
    ``prompt`` already speaks of "consecutive moments" (in any case)."""
    if images < 2 or "consecutive moments" in prompt.lower():
        return ""
    return GRID_NOTE if grid else FRAMES_NOTE


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


class BadPrompt(ValueError):
    """A ``raw`` prompt whose image placeholders do not match the images the model gets."""


@dataclass
class Prepared:
    """One request's model inputs, on the model's device.

    ``tensors``: ``input_ids`` and ``attention_mask`` (1×L int64), ``pixel_values``
    (M×3×H×W, the model's dtype: M images, 1 but for LLaVA with several); ``prompt_tokens``:
    L as Ollama counts it; ``images``: how many images the request sent; ``grid``: how they
    were tiled into the one image the model got (None: not tiled).
    """

    tensors: dict
    prompt_tokens: int
    images: int = 1
    grid: Grid | None = None

    @property
    def model_images(self) -> int:
        """M: the images the model encodes for this row (``pixel_values``' rows; 0 for a
        text-only row, which has no ``pixel_values``)."""
        pixels = self.tensors.get("pixel_values")
        return 0 if pixels is None else int(pixels.shape[0])

    @property
    def length(self) -> int:
        """L: the prompt's length in tokens (image tokens included)."""
        return int(self.tensors["input_ids"].shape[1])


@dataclass
class EmbeddingInputs:
    """One embedding request's texts as token ids (each at most the text model's positions),
    built off the model worker by :meth:`VisionLanguageModel.tokenize_for_embedding`;
    ``truncated``: how many inputs were cut to fit."""

    ids: list
    truncated: int = 0

    @property
    def tokens(self) -> int:
        """All inputs' tokens (Ollama's ``prompt_eval_count``, OpenAI's ``prompt_tokens``)."""
        return sum(len(i) for i in self.ids)


class EmbeddingStopped(Exception):
    """:meth:`VisionLanguageModel.embed` stopped between chunks (cancelled or past the deadline)."""


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
    #: Whether a request's output format (JSON, a JSON Schema) can constrain its answer: a
    #: language-model decoder (see :mod:`..structured`).
    follows_formats = True
    #: Whether the processor takes several images, one placeholder each, in one prompt (else
    #: several images are tiled into one grid).
    many_images = False
    #: Whether a prompt with several images starts with :func:`frames_note`'s sentence (not
    #: for a captioner, whose prompt is the caption's beginning).
    notes_frames = True
    #: Whether the language model answers a request without images (text-only chat); a
    #: captioner cannot.
    chats_text = True
    #: Whether the family has a text side to embed texts with (:meth:`embed`).
    embeds_text = True
    #: Texts run through the text side at once by :meth:`embed` (a request's inputs go in
    #: chunks of this many).
    embed_chunk = 16

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
        self._format_data = None   # lm-format-enforcer's tables for the tokenizer, built on first use

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

        def read():
            with quiet_transformers():
                proc = processor_cls.from_pretrained(self.source, local_files_only=True)
                mod = model_cls.from_pretrained(self.source, local_files_only=True, dtype=self.dtype)
            return proc, mod

        self.processor, self.model = from_local_or_hub(self.source, self.local, read)
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
            with quiet_transformers():
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
    def prompt_text(self, prompt: str, raw: bool, images: int = 1, note: str = "") -> str:
        """The text the processor gets for a user's ``prompt`` (``raw``: as it is) asked about
        ``images`` images, with ``note`` (:func:`frames_note`, or empty) before the question."""
        return note + prompt

    def note_for(self, prompt: str, raw: bool, images: int, grid: bool) -> str:
        """:func:`frames_note` for this family's prompt (empty for a ``raw`` prompt, sent as it
        is, and for a family without :attr:`notes_frames`)."""
        return "" if raw or not self.notes_frames else frames_note(prompt, images, grid)

    def prepare(self, images: bytes | Sequence[bytes], prompt: str, raw: bool = False,
                max_pixels: int | None = None) -> Prepared:
        """Decode the images (of :data:`IMAGE_FORMATS`; one as bytes, or several, oldest
        first) and build the model inputs.

        ``max_pixels``: the most pixels (width × height) each image may decode to (None: no
        limit but Pillow's own); read from every image's header, before any is decoded. One
        image goes to the processor as it is. Several go as a list with one placeholder each
        when the family takes that (:attr:`many_images`) and the prompt fits the positions,
        else as one grid (:func:`.grid.compose_grid`, at most ``max_pixels`` pixels; decoded
        one at a time); the prompt then starts with :meth:`note_for`'s sentence.

        Raises:
            BadImage: the bytes are not an image of those formats (or no image at all).
            ImageTooLarge: an image has more than ``max_pixels`` pixels (nothing decoded).
            PromptTooLong: the prompt's tokens (with the images') fill the model's positions.
            BadPrompt: a ``raw`` prompt's image placeholders do not match the images.
        """
        frames = [images] if isinstance(images, (bytes, bytearray, memoryview)) else list(images)
        n = len(frames)
        if not n:
            raise BadImage("no image was given")
        which = [f"image {i + 1} of {n}: " if n > 1 else "" for i in range(n)]
        opened = [self._open_image(b, max_pixels, which[i]) for i, b in enumerate(frames)]
        prompt = prompt.strip()
        if n == 1:
            return self._inputs([self._decode_image(opened[0])], self.prompt_text(prompt, raw), 1)
        last_size = opened[-1].size
        if self.many_images:
            decoded = [self._decode_image(im, which[i]) for i, im in enumerate(opened)]
            try:
                return self._inputs(decoded, self.prompt_text(prompt, raw, n, self.note_for(prompt, raw, n, False)), n)
            except PromptTooLong as exc:
                log.info("%d images do not fit the prompt (%s): answering on a grid of them", n, exc)
            tiles: Any = (decoded.pop(0) for _ in range(n))   # each frame freed once pasted
        else:
            tiles = (self._decode_image(im, which[i]) for i, im in enumerate(opened))
        image, grid = compose_grid(tiles, n, last_size, max_pixels)
        prepared = self._inputs([image], self.prompt_text(prompt, raw, 1, self.note_for(prompt, raw, n, True)), n)
        prepared.grid = grid
        return prepared

    def text_prompt(self, turns: Sequence[tuple[str, str]], raw: bool = False) -> str:
        """The text the language model gets for a text-only chat: ``turns`` are ``(role,
        text)`` pairs, oldest first, roles ``system``, ``user`` and ``assistant``; ``raw``: the
        last user text as it is. Families that chat override it (:attr:`chats_text`)."""
        raise BadPrompt(f"model {self.name} ({self.family}) cannot answer text-only requests")

    def prepare_text(self, turns: Sequence[tuple[str, str]], raw: bool = False) -> Prepared:
        """The model inputs of a text-only chat (no image: :meth:`text_prompt`'s text through
        the tokenizer alone), on the model's device; ``images`` 0, no ``pixel_values``.

        Raises:
            BadPrompt: the family cannot chat without an image (:attr:`chats_text`), or the
                turns have no text.
            PromptTooLong: the prompt fills the text model's positions.
        """
        if not self.chats_text:
            raise BadPrompt(f"model {self.name} ({self.family}) cannot answer text-only requests")
        if not any(text.strip() for _, text in turns):
            raise BadPrompt("the request has neither an image nor any text: send a prompt, or images to describe")
        text = self.text_prompt(turns, raw)
        encoded = self.processor.tokenizer(text, return_tensors="pt")
        tensors = {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask")}
        prepared = Prepared(tensors, int(tensors["input_ids"].shape[1]), images=0)
        if prepared.length >= self.position_limit():
            raise PromptTooLong(f"the prompt is {prepared.length} tokens; model {self.name} takes "
                                f"{self.position_limit()} positions for prompt and answer: shorten the prompt "
                                f"or the chat history")
        return prepared

    # -- embeddings -----------------------------------------------------------------------------
    def tokenize_for_embedding(self, texts: Sequence[str], truncate: bool = True) -> EmbeddingInputs:
        """Token ids of each of ``texts`` for :meth:`embed` (any thread), the tokenizer's own
        special tokens included. An input longer than the text model's positions is cut at
        its end when ``truncate`` (Ollama's default).

        Raises:
            PromptTooLong: an input is too long and ``truncate`` is False (Ollama's 400 "the
                input length exceeds the context length").
        """
        limit = self.position_limit()
        ids = list(self.processor.tokenizer(list(texts))["input_ids"]) if texts else []
        truncated = 0
        for i, row in enumerate(ids):
            if len(row) > limit:
                if not truncate:
                    raise PromptTooLong(f"the input length exceeds the context length: input {i} is {len(row)} "
                                        f"tokens, model {self.name} takes {limit}; shorten it or allow truncate")
                ids[i] = list(row[:limit])
                truncated += 1
            else:
                ids[i] = list(row)
        return EmbeddingInputs(ids, truncated)

    def text_hidden_states(self, input_ids: Any, attention_mask: Any) -> Any:
        """The last hidden state (B×L×H) of the family's text side for right-padded
        ``input_ids`` and ``attention_mask`` (B×L). Here: the language model's (BLIP-2's OPT,
        LLaVA's Llama), its base model run without the language-model head."""
        lm = getattr(self.model, "language_model", None)
        if lm is None:   # transformers 5's LLaVA keeps it under .model
            lm = self.model.model.language_model
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def embedding_size(self) -> int:
        """H: the length of :meth:`embed`'s vectors (the text side's hidden size)."""
        return int(self._text_config().hidden_size)

    def embed(self, inputs: EmbeddingInputs, should_stop: Any = None) -> list[list[float]]:
        """One vector per input (model worker thread only): the attention-masked mean of
        :meth:`text_hidden_states` over its tokens, in float32, L2-normalised (unit length, as
        Ollama's embeddings are). Inputs go :attr:`embed_chunk` at a time, padded on the right
        so that a text's vector does not depend on the texts it is batched with.

        Raises:
            EmbeddingStopped: ``should_stop()`` said so between chunks.
        """
        import torch

        vectors: list[list[float]] = []
        for start in range(0, len(inputs.ids), self.embed_chunk):
            if should_stop is not None and should_stop():
                raise EmbeddingStopped()
            rows = inputs.ids[start:start + self.embed_chunk]
            length = max(1, max(len(r) for r in rows))
            ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                hidden = self.text_hidden_states(ids, mask).float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            vectors.extend(pooled.cpu().tolist())
        return vectors

    @staticmethod
    def _open_image(image_bytes: bytes, max_pixels: int | None, which: str = ""):
        """The image's header (Pillow's lazy image), checked against ``max_pixels``; ``which``
        starts the error messages (``"image 2 of 3: "``)."""
        from PIL import Image, UnidentifiedImageError

        Image.init()   # register every plugin (WEBP), so that formats= can name them
        formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]   # (newer Pillows open MPO as JPEG)
        try:
            image = Image.open(io.BytesIO(image_bytes), formats=formats)   # the header only
        except Image.DecompressionBombError as exc:   # over Pillow's own limit (2 × MAX_IMAGE_PIXELS)
            raise ImageTooLarge(f"{which}the image is too large to decode: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise BadImage(f"{which}Failed to load image or audio file") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLarge(which + str(ImageTooLarge.of(width, height, max_pixels)))
        return image

    @staticmethod
    def _decode_image(image, which: str = ""):
        """Decode an opened image (:meth:`_open_image`) as RGB, freeing the decoded original;
        ``which`` starts the error message."""
        from PIL import Image

        try:
            image.load()
            rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise BadImage(f"{which}Failed to load image or audio file") from None
        image.close()
        return rgb

    def _inputs(self, images: list, text: str, sent: int) -> Prepared:
        """The processor's inputs for ``images`` (decoded; one goes alone, not as a list) and
        ``text``, on the model's device; ``sent``: the images the request sent."""
        inputs = self.processor(images=images[0] if len(images) == 1 else images, text=text, return_tensors="pt")
        tensors = {}
        for key in ("input_ids", "attention_mask", "pixel_values"):
            value = inputs[key]
            tensors[key] = value.to(self.device, dtype=self.dtype) if key == "pixel_values" else value.to(self.device)
        prepared = Prepared(tensors, int(tensors["input_ids"].shape[1]), images=sent)
        if prepared.length >= self.position_limit():
            whose = "image's" if len(images) == 1 else f"{len(images)} images'"
            raise PromptTooLong(f"the prompt is {prepared.length} tokens with the {whose}; model {self.name} takes "
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

    def decoding(self, settings: GenerationSettings, streamed: bool) -> tuple:
        """``generate`` keyword arguments (as a hashable tuple of pairs) for these settings:
        sampling, else greedy when the reply is ``streamed``, else beam search with ``num_beams``."""
        kw: dict[str, Any] = {}
        if settings.sampling:
            kw.update(do_sample=True, temperature=settings.temperature, num_beams=1)
            if settings.top_p is not None:
                kw["top_p"] = settings.top_p
            if settings.top_k is not None:
                kw["top_k"] = settings.top_k
        else:
            beams = 1 if streamed else (settings.num_beams or self.default_num_beams)
            kw.update(do_sample=False, num_beams=beams)
            if beams > 1 and settings.length_penalty is not None:
                kw["length_penalty"] = settings.length_penalty
        if settings.repetition_penalty is not None:
            kw["repetition_penalty"] = settings.repetition_penalty
        if settings.min_length:
            kw["min_new_tokens"] = settings.min_length
        return tuple(sorted(kw.items()))

    def batch_key(self, prepared: Prepared, decoding: tuple, max_new: int, seed: int | None) -> tuple:
        """Requests with equal keys can share one batched ``generate`` (and the same number of
        images for the model: a grid counts as one)."""
        return (None if self.pads_prompts else prepared.length, decoding, max_new, seed, prepared.model_images)

    def collate(self, rows: Sequence[Prepared]) -> tuple[dict, int]:
        """Stack the rows' inputs, padding prompts on the left: ``(tensors, padded length)``."""
        import torch

        length = max(r.length for r in rows)
        ids, masks = [], []
        for r in rows:
            pad = length - r.length
            ids.append(torch.nn.functional.pad(r.tensors["input_ids"], (pad, 0), value=self.pad_id))
            masks.append(torch.nn.functional.pad(r.tensors["attention_mask"], (pad, 0), value=0))
        tensors = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
        if rows[0].model_images:   # (a batch is all text-only rows or all rows with images)
            tensors["pixel_values"] = torch.cat([r.tensors["pixel_values"] for r in rows])
        return tensors, length

    def generator(self, inputs: dict) -> Any:
        """The module whose ``generate`` answers ``inputs`` (:meth:`collate`'s): the model."""
        return self.model

    def generate(self, rows: Sequence[GenerationRow], decoding: tuple, max_new: int, seed: int | None) -> None:
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
        constraints = self.row_constraints(rows)
        if constraints is not None:
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([constraints])
        streamer = None
        if any(r.streamed_reply is not None for r in rows):
            streamer = kwargs["streamer"] = RowStreamer(self, rows)
        started = time.perf_counter()
        for r in rows:
            r.started(started)
        try:
            with torch.inference_mode():
                sequences = self.generator(inputs).generate(**inputs, **kwargs)
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

    def row_constraints(self, rows: Sequence[GenerationRow]) -> Any:
        """The logits processor that holds each row with an output format to it (None: no row
        has one); see :mod:`..structured`."""
        if not any(getattr(r, "constraint", None) is not None for r in rows):
            return None
        from .. import structured

        if self._format_data is None:
            self._format_data = structured.tokenizer_data(self.processor.tokenizer, sorted(self.eos_ids))
        enforcers = [None if getattr(r, "constraint", None) is None
                     else structured.enforcer(self._format_data, r.constraint) for r in rows]
        return structured.RowConstraints(enforcers, self.eos_ids | {self.pad_id})

    def cut(self, ids: list[int]) -> list[int]:
        """A row's new token ids up to and including its first end-of-sequence token."""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[:i + 1]
        return ids


