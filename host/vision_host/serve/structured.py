"""Structured output: Ollama's ``format`` and OpenAI's ``response_format``, honoured with
constrained decoding by lm-format-enforcer (``lmformatenforcer``).

* **Why lm-format-enforcer**: pure Python (no compiled extension to match to torch or the
  platform), JSON Schema in, and it works token by token on any tokenizer from the decoded
  text of each token, so the same code constrains LLaVA's Llama and BLIP-2's OPT tokenizers.
  Its own transformers integration module does not import under transformers 5 (a moved
  module), so we use its core (``TokenEnforcer``) through our own logits processor
  (:class:`RowConstraints`), which is also what makes the constraint per batch row.
* **Per row**: each request has its own :class:`Constraint` (or none); a batched ``generate``
  masks, at every step, only the scores of the constrained rows (and their beams) to the
  tokens their enforcer allows, so constrained and unconstrained requests share batches.
* **Token budget**: the constraint does not shorten the answer. A constrained answer that
  reaches ``num_predict`` (``max_tokens``) before its JSON closes is never returned as text: the
  request fails with **500** and a sentence saying to raise ``num_predict`` / ``max_tokens``
  (a streamed reply, whose 200 went out, ends with that error as its last line or event).
* **Families**: LLaVA and BLIP-2 (language-model decoders) follow a format; BLIP, a captioner,
  cannot: such a request gets **400** naming the families that can.

Refusals (400, in the API's error shape): Ollama ``format`` other than ``"json"`` or a JSON
Schema object; OpenAI ``response_format`` of another ``type``, or ``json_schema`` without
``schema``; a schema lm-format-enforcer cannot compile.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from .errors import RequestError

#: The families whose models can follow a format (``--model`` aliases).
STRUCTURED_FAMILIES = ("llava", "blip2")
#: ``format: "json"`` and ``{"type": "json_object"}``: any JSON object.
ANY_OBJECT = {"type": "object"}


class Constraint:
    """A request's output format: a JSON Schema (``{"type": "object"}`` for plain JSON mode),
    checked to compile when made."""

    def __init__(self, schema: dict, where: str) -> None:
        self.schema = schema
        try:
            self.parser()
        except ImportError as exc:
            raise RequestError(500, f"structured output needs lm-format-enforcer ({exc.name} is missing): "
                                    f"pip install 'vision-host[serve]'") from None
        except Exception as exc:  # noqa: BLE001 — any failure to compile is the schema's
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise RequestError(400, f"invalid JSON schema in {where}: {reason}") from None

    def parser(self) -> Any:
        """A fresh lm-format-enforcer parser for this schema (probed once, so that a schema it
        cannot handle fails here)."""
        from lmformatenforcer import JsonSchemaParser

        parser = JsonSchemaParser(self.schema)
        parser.get_allowed_characters()
        return parser

    @staticmethod
    def complete(text: str) -> bool:
        """Whether ``text`` is a whole JSON value (what a constrained answer must be)."""
        try:
            json.loads(text)
        except ValueError:
            return False
        return True


def ollama_format(value: Any) -> Constraint | None:
    """Ollama's ``format``: absent, null or ``""`` → none; ``"json"`` → any JSON object; an
    object → that JSON Schema. Raises :class:`RequestError` 400 otherwise (Ollama's words)."""
    if value is None or value == "":
        return None
    if value == "json":
        return Constraint(ANY_OBJECT, "format")
    if isinstance(value, dict):
        return Constraint(value, "format")
    shown = json.dumps(value)[:64]
    raise RequestError(400, f'invalid format: {shown}; expected "json" or a valid JSON Schema object')


def openai_response_format(value: Any) -> Constraint | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (or absent) → none; ``json_object``
    → any JSON object; ``json_schema`` → its ``json_schema.schema``. Raises
    :class:`RequestError` 400 otherwise (OpenAI's words)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError(400, "Invalid type for 'response_format': expected an object, but got "
                                f"{type(value).__name__} instead.")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(ANY_OBJECT, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError(400, "Missing required parameter: 'response_format.json_schema'.")
        schema = spec.get("schema")
        if schema is None:
            raise RequestError(400, "Missing required parameter: 'response_format.json_schema.schema'.")
        if not isinstance(schema, dict):
            raise RequestError(400, "Invalid type for 'response_format.json_schema.schema': expected an object.")
        return Constraint(schema, "response_format")
    raise RequestError(400, f"Invalid value: {json.dumps(kind)[:64]}. Supported values are: 'text', "
                            f"'json_object', and 'json_schema'.")


def refuse_unless_supported(family: str, supported: bool, name: str) -> None:
    """400 when the model (BLIP) cannot follow a format."""
    if not supported:
        raise RequestError(400, f"model '{name}' is a {family} captioner, which cannot follow a format or JSON "
                                f"schema; structured output needs a language-model decoder: the families "
                                f"{' and '.join(STRUCTURED_FAMILIES)}")


def tokenizer_data(tokenizer: Any, eos_ids: Sequence[int]) -> Any:
    """lm-format-enforcer's per-tokenizer tables (built once per model: a pass over the
    vocabulary). Each regular token's text is decoded after a ``0`` token, so that a token that
    starts a word keeps its leading space (the library's own recipe)."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    token_0 = tokenizer.encode("0", add_special_tokens=False)[-1]
    special = set(tokenizer.all_special_ids)
    regular = []
    for idx in range(len(tokenizer)):
        if idx in special:
            continue
        after_0 = tokenizer.decode([token_0, idx])[1:]
        alone = tokenizer.decode([idx])
        regular.append((idx, after_0, len(after_0) > len(alone)))

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens).rstrip("\ufffd")
    return TokenEnforcerTokenizerData(regular, decode, list(eos_ids), False, len(tokenizer))


def enforcer(data: Any, constraint: Constraint) -> Any:
    """A fresh token enforcer for one request."""
    from lmformatenforcer import TokenEnforcer

    return TokenEnforcer(data, constraint.parser())


class RowConstraints:
    """A ``generate`` logits processor: row ``i``'s scores (beams included) keep only the tokens
    ``enforcers[i]`` allows; rows without one are left alone. ``done_ids``: tokens after which
    a row has finished (end of sequence, padding), no longer constrained."""

    def __init__(self, enforcers: Sequence[Any], done_ids: set[int]) -> None:
        self.enforcers = list(enforcers)
        self.done_ids = done_ids
        self.steps = 0

    def __call__(self, input_ids, scores):
        import torch

        n = input_ids.shape[0]
        beams = max(1, n // len(self.enforcers))
        first = self.steps == 0
        self.steps += 1
        for i in range(n):
            e = self.enforcers[min(i // beams, len(self.enforcers) - 1)]
            if e is None:
                continue
            row = input_ids[i].tolist()
            if not first and row[-1] in self.done_ids:
                continue
            allowed = e.get_allowed_tokens(row).allowed_tokens
            allowed = [t for t in allowed if t < scores.shape[1]]
            mask = torch.full_like(scores[i], float("-inf"))
            mask[allowed] = 0
            scores[i] = scores[i] + mask
        return scores
