"""How one request is decoded (:class:`GenerationSettings`, from Ollama's ``options``) and the
server's bounds on it (:class:`GenerationLimits`). Option names follow Ollama's api.md
(``num_predict``, ``repeat_penalty``, …) and transformers' ``generate`` where they differ."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: New tokens when the request does not say (Ollama's ``num_predict``, OpenAI's ``max_tokens``).
DEFAULT_MAX_NEW_TOKENS = 40
#: Default limits on a request's generation options (see :class:`GenerationLimits`).
DEFAULT_MAX_BEAMS = 8
DEFAULT_MAX_NEW_TOKENS_LIMIT = 512
DEFAULT_MAX_TOP_K = 1000
#: Integer options must fit a signed 64-bit integer (Ollama's Go ``int``); the seed may also be
#: an unsigned 64-bit one (what ``torch.manual_seed`` takes).
_INT64 = (-2 ** 63, 2 ** 63 - 1)
_SEED = (-2 ** 63, 2 ** 64 - 1)


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
