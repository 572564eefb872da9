"""What every API's routes share (:class:`ServedModel`): the model, its scheduler, the names it
answers to, the generation defaults and the request limits; the one path by which a request's
images (one, or several frames of one video, oldest first, or none: a text-only chat) and
prompt reach the model worker (:meth:`ServedModel.queue_generation`), and the one by which an
embedding request's texts do (:meth:`ServedModel.queue_embedding`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any, Sequence

from .errors import RequestError
from .models import normalize_model_name
from .models.base import BadImage, BadPrompt, ImageTooLarge, PromptTooLong, VisionLanguageModel
from .models.settings import GenerationLimits, GenerationSettings
from .scheduler import SERVER_DEFAULT, Job, Scheduler
from .structured import refuse_unless_supported

#: Most images one request may send unless the server says (``--max-images``).
DEFAULT_MAX_IMAGES = 8
#: Most texts one embedding request may send unless the server says (``--max-embed-inputs``).
DEFAULT_MAX_EMBED_INPUTS = 256
#: The families that answer text-only requests, as a refusal names them.
CHAT_FAMILIES = "a LLaVA or BLIP-2 model"


class ServedModel:
    """The model (loaded) that the routes of every API serve, through ``scheduler``.

    ``defaults``: the generation options a request's own override; ``limits``: bounds on a
    request's options (400 beyond); ``max_body_bytes``: the request body limit (the guard
    enforces it; listed in ``/api/ps``); ``max_image_pixels``: most pixels an image may decode
    to, read from its header (413 beyond, nothing decoded); ``max_prompt_chars``: longest prompt
    in characters, checked before tokenising (400); ``decode_threads``: images decoded (and
    prompts tokenised) at once, the others wait in the queue; ``max_images``: most images one
    request may send (400 beyond, before any is decoded); ``max_embed_inputs``: most texts one
    embedding request may send (400 beyond). None: no limit.
    """

    def __init__(self, model: VisionLanguageModel, scheduler: Scheduler, *, defaults: GenerationSettings,
                 limits: GenerationLimits, max_body_bytes: int | None, max_image_pixels: int | None,
                 max_prompt_chars: int | None, decode_threads: int,
                 max_images: int | None = DEFAULT_MAX_IMAGES,
                 max_embed_inputs: int | None = DEFAULT_MAX_EMBED_INPUTS) -> None:
        self.model = model
        self.scheduler = scheduler
        self.defaults = defaults
        self.limits = limits
        self.max_image_pixels = max_image_pixels
        self.max_prompt_chars = max_prompt_chars
        self.max_images = max_images
        self.max_embed_inputs = max_embed_inputs
        self.decode_slots = asyncio.Semaphore(int(decode_threads))
        #: The name the model is listed under (Ollama's ``NAME:latest``).
        self.name = normalize_model_name(model.name)
        #: Names a request may use: the served name, and the Hub id (also as Workers AI's ``@cf/…``).
        self.known = {self.name, normalize_model_name(model.source), normalize_model_name("@cf/" + model.source)}
        #: The request limits in force, as ``/api/ps`` lists them.
        self.limits_in_force = {"max_beams": limits.max_beams, "max_new_tokens": limits.max_new_tokens,
                                "max_top_k": limits.max_top_k, "max_body_bytes": max_body_bytes,
                                "max_image_pixels": max_image_pixels, "max_prompt_chars": max_prompt_chars,
                                "decode_threads": int(decode_threads)}

    def answers_to(self, name: str) -> bool:
        """Whether a request for model ``name`` is for this model (Ollama's name matching)."""
        return normalize_model_name(name) in self.known

    def check_model(self, name: Any) -> None:
        """Raises :class:`RequestError` 404 (``model 'x' not found``) unless ``name`` is this model's."""
        if not isinstance(name, str) or not self.answers_to(name):
            raise RequestError(404, f"model '{name or ''}' not found")

    def settings_of(self, options: dict) -> GenerationSettings:
        """A request's Ollama-style ``options`` over the server's defaults. Raises
        :class:`RequestError` 400 for a bad value or one past :attr:`limits`."""
        try:
            return GenerationSettings.from_options(options, self.defaults, self.limits)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    def check_image_count(self, count: int) -> None:
        """Raises :class:`RequestError` 400 when a request sends more than ``max_images`` images."""
        if self.max_images is not None and count > self.max_images:
            raise RequestError(400, f"the request has {count} images, above this server's limit of "
                                    f"{self.max_images} per request (--max-images): send at most "
                                    f"{self.max_images} frames per request")

    def refuse_text_only(self, field_name: str = "images") -> None:
        """Raises :class:`RequestError` 400 unless the model answers requests without images
        (a captioner, BLIP, does not): the sentence names the families that do."""
        model = self.model
        if not model.chats_text:
            raise RequestError(400, f"model {model.name} ({model.family}) captions images and cannot answer "
                                    f"text-only requests: use {CHAT_FAMILIES} for summaries, or add an image to "
                                    f"\"{field_name}\"")

    async def queue_generation(self, images: Sequence[bytes], prompt: str, settings: GenerationSettings, *,
                               raw: bool = False, streamed: bool = False, keep_alive: Any = SERVER_DEFAULT,
                               field_name: str = "images", constraint: Any = None,
                               turns: Sequence[tuple[str, str]] | None = None) -> Job:
        """Check the prompt and the number of ``images`` (one, or several frames of one video,
        oldest first), take a place in the queue, decode the images and tokenise
        (``decode_threads`` requests at once; a request's images one after another), queue the
        generation: its job (a ``streamed`` one's reply comes as text pieces; ``constraint``:
        its output format, see :mod:`.structured`). How the model gets several images:
        :meth:`.models.base.VisionLanguageModel.prepare`.

        No images: a text-only chat, answered by the language model alone
        (:meth:`.models.base.VisionLanguageModel.prepare_text`) from ``turns`` (``(role,
        text)`` pairs, oldest first: the chat's system, user and assistant messages; default
        the one user ``prompt``); ``max_prompt_chars`` then bounds all the turns' text.

        Raises:
            RequestError: 400 no image for a model that cannot chat without one (BLIP; the
                field named by ``field_name``), more than ``max_images``, a prompt too long,
                a bad image, a raw prompt whose image placeholders do not match, an output
                format the model cannot follow (BLIP); 413 an image over ``max_image_pixels``.
            Busy: the queue is full (503), before anything is decoded.
        """
        from starlette.concurrency import run_in_threadpool

        model = self.model
        if constraint is not None:
            refuse_unless_supported(model.family, model.follows_formats, model.name)
        if not images:
            self.refuse_text_only(field_name)
            turns = list(turns) if turns is not None else [("user", prompt)]
            chars = sum(len(text) for _, text in turns)
        else:
            chars = len(prompt)
        self.check_image_count(len(images))
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise RequestError(400, f"the prompt is {chars} characters, above this server's limit of "
                                    f"{self.max_prompt_chars} (--max-prompt-chars)")
        # one image goes as bytes, exactly as before several were taken
        given: bytes | list[bytes] = images[0] if len(images) == 1 else list(images)   # (none: text-only)
        with self.scheduler.reserve() as place:
            async with self.decode_slots:
                try:
                    if not images:
                        inputs = await run_in_threadpool(model.prepare_text, turns, raw)
                    else:
                        inputs = await run_in_threadpool(model.prepare, given, prompt, raw, self.max_image_pixels)
                except ImageTooLarge as exc:
                    raise RequestError(413, str(exc)) from None
                except (BadImage, PromptTooLong, BadPrompt) as exc:
                    raise RequestError(400, str(exc)) from None
            job = self.scheduler.new_job(inputs, settings, streamed=streamed, keep_alive=keep_alive,
                                         constraint=constraint)
            self.scheduler.submit(job, place)
        return job

    async def queue_embedding(self, texts: Sequence[str], *, truncate: bool = True,
                              keep_alive: Any = SERVER_DEFAULT) -> Job:
        """Check the number and size of ``texts``, take a place in the queue, tokenise them
        (``decode_threads`` requests at once; each cut to the model's positions when
        ``truncate``), queue the embedding: its job (vectors in :attr:`.scheduler.Job.vectors`).

        Raises:
            RequestError: 400 a model without a text side, more than ``max_embed_inputs`` texts, a text over
                ``max_prompt_chars`` characters, a text longer than the model's positions
                with ``truncate`` False (Ollama's "the input length exceeds the context
                length").
            Busy: the queue is full (503), before anything is tokenised.
        """
        from starlette.concurrency import run_in_threadpool

        if not self.model.embeds_text:
            raise RequestError(400, f"model {self.model.name} ({self.model.family}) has no text model to embed "
                                    f"texts with: serve a BLIP, BLIP-2 or LLaVA model for embeddings")
        if self.max_embed_inputs is not None and len(texts) > self.max_embed_inputs:
            raise RequestError(400, f"the request has {len(texts)} inputs, above this server's limit of "
                                    f"{self.max_embed_inputs} per request (--max-embed-inputs): send them in "
                                    f"several requests")
        if self.max_prompt_chars is not None:
            for i, text in enumerate(texts):
                if len(text) > self.max_prompt_chars:
                    raise RequestError(400, f"input {i} is {len(text)} characters, above this server's limit of "
                                            f"{self.max_prompt_chars} (--max-prompt-chars)")
        with self.scheduler.reserve() as place:
            async with self.decode_slots:
                try:
                    inputs = await run_in_threadpool(self.model.tokenize_for_embedding, list(texts), truncate)
                except PromptTooLong as exc:
                    raise RequestError(400, str(exc)) from None
            job = self.scheduler.new_embedding_job(inputs, keep_alive=keep_alive)
            self.scheduler.submit(job, place)
        return job

    def shaped(self, vectors: list[list[float]], dimensions: Any) -> list[list[float]]:
        """``vectors`` cut to their first ``dimensions`` numbers and L2-normalised again (as
        Ollama's ``dimensions`` does); None or 0: as they are.

        Raises:
            RequestError: 400 ``dimensions`` not a whole number from 1 to the vectors' length.
        """
        if dimensions is None or dimensions == 0:
            return vectors
        size = self.model.embedding_size()
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= size:
            raise RequestError(400, f"dimensions must be a whole number from 1 to {size} (the embedding size of "
                                    f"model {self.model.name}), not {dimensions!r}")
        out = []
        for v in vectors:
            cut = v[:dimensions]
            norm = math.sqrt(sum(x * x for x in cut))
            out.append([x / norm for x in cut] if norm > 0 else cut)
        return out
