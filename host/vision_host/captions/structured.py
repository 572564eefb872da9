"""Structured answers: a caption that should be a JSON object (``ollama-format``), parsed and
checked once, when its :class:`.CaptionEvent` is created.

``ollama-format`` is empty (plain text), ``json`` (any JSON object) or a JSON Schema (an
object, any draft the ``jsonschema`` package knows; the schema's ``$schema`` picks it, else
the latest). The schema is the user's (trusted); the reply is the model's (untrusted): it is
parsed with Python's ``json`` (RFC 8259) and validated, never evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FormatError", "StructuredFormat", "read_format_value"]

#: Largest schema file ``ollama-format=@PATH`` reads, bytes.
MAX_SCHEMA_BYTES = 256 * 1024


class FormatError(ValueError):
    """An ``ollama-format`` value that is neither empty, ``json`` nor a valid JSON Schema object;
    the message says what is wrong."""


class StructuredFormat:
    """What a structured answer must be, from an ``ollama-format`` value.

    Args:
        value: ``"json"`` or a JSON Schema as JSON text (an object).

    Raises:
        FormatError: ``value`` is not JSON, not an object, or not a valid schema (the message
            gives ``jsonschema``'s reason and where in the schema).
    """

    def __init__(self, value: str):
        self.value = value
        self._validator = None
        if value == "json":
            return
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise FormatError(f"ollama-format is not json and not a JSON Schema: {exc}") from None
        if not isinstance(schema, dict):
            raise FormatError("ollama-format: a JSON Schema must be a JSON object, e.g. "
                              '{"type": "object", "properties": {"person": {"type": "boolean"}}}')
        from jsonschema import exceptions, validators

        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "the top"
            raise FormatError(f"ollama-format: not a valid JSON Schema at {where}: {exc.message}") from None
        self._validator = cls(schema)

    def parse(self, text: str) -> tuple[dict | None, str | None]:
        """The reply ``text`` as ``(fields, None)`` when it is a JSON object that the schema
        accepts, else ``(None, why)``: not JSON, not an object, or the first schema violation
        (with its place in the reply)."""
        try:
            fields = json.loads(text)
        except ValueError as exc:
            return None, f"the reply is not JSON ({exc})"
        if not isinstance(fields, dict):
            return None, f"the reply is JSON but not an object ({type(fields).__name__})"
        if self._validator is not None:
            error = next(iter(self._validator.iter_errors(fields)), None)
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "the top"
                return None, f"the reply does not match the schema at {where}: {error.message}"
        return fields, None


def read_format_value(value: str, key: str = "ollama-format") -> str:
    """An ``ollama-format`` value as the processor gets it: ``@PATH`` replaced by the schema in
    that file (compact JSON), other values as they are; a schema is checked.

    Raises:
        FormatError: the file cannot be read, is over :data:`MAX_SCHEMA_BYTES`, or the schema
            is invalid (see :class:`StructuredFormat`).
    """
    named = key
    if value.startswith("@"):
        named = f"{key}={value}"
        path = Path(value[1:]).expanduser()
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SCHEMA_BYTES + 1)
        except OSError as exc:
            raise FormatError(f"{key}={value}: cannot read the schema file ({exc.strerror})") from None
        if len(data) > MAX_SCHEMA_BYTES:
            raise FormatError(f"{key}={value}: the schema file is over {MAX_SCHEMA_BYTES // 1024} KiB")
        try:
            value = json.dumps(json.loads(data.decode("utf-8")), separators=(",", ":"), ensure_ascii=False)
        except (UnicodeDecodeError, ValueError) as exc:
            raise FormatError(f"{key}={'@' + str(path)}: the file is not JSON ({exc})") from None
    if value.strip() in ("", "json"):
        return value.strip()
    try:
        StructuredFormat(value)
    except FormatError as exc:
        raise FormatError(str(exc).replace("ollama-format", named, 1)) from None
    return value
