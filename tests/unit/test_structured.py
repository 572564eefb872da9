"""Structured answers (captions.structured): a reply parsed and checked against the user's schema;
`ollama-format=@PATH` read once at start; every bad value refused with a sentence."""

import json

import pytest

from vision_host.captions import CaptionBus, CaptionEvent, CaptionStats
from vision_host.captions.structured import MAX_SCHEMA_BYTES, FormatError, StructuredFormat, read_format_value
from vision_host.cli.settings import UsageError, resolve_formats

DOOR = {"type": "object", "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0}},
        "required": ["person", "count"]}


def test_a_reply_matching_the_schema_gives_its_fields():
    fmt = StructuredFormat(json.dumps(DOOR))
    assert fmt.parse('{"person": true, "count": 2}') == ({"person": True, "count": 2}, None)


@pytest.mark.parametrize("reply, why", [
    ("A man at the door.", "not JSON"),
    ('["person"]', "not an object"),
    ('{"person": "yes", "count": 2}', "at person: 'yes' is not of type 'boolean'"),
    ('{"person": true}', "'count' is a required property"),
    ('{"person": true, "count": -1}', "at count: -1 is less than the minimum of 0"),
    ('{"person": true, "count": NaN}', "at count"),   # Python's json reads NaN; the schema still refuses it
])
def test_a_reply_that_is_not_a_valid_structured_answer_says_why(reply, why):
    fields, error = StructuredFormat(json.dumps(DOOR)).parse(reply)
    assert fields is None and why in error


def test_json_accepts_any_object_and_nothing_else():
    fmt = StructuredFormat("json")
    assert fmt.parse('{"anything": [1, 2]}') == ({"anything": [1, 2]}, None)
    assert fmt.parse("42")[0] is None and "not an object" in fmt.parse("42")[1]


@pytest.mark.parametrize("value, why", [
    ("yaml", "not json and not a JSON Schema"),
    ("[1, 2]", "must be a JSON object"),
    ('{"type": "objekt"}', "not a valid JSON Schema at type"),
    ('{"properties": {"count": {"minimum": "zero"}}}', "properties/count/minimum"),
])
def test_a_bad_format_value_is_refused_with_where_and_why(value, why):
    with pytest.raises(FormatError, match="ollama-format") as exc:
        StructuredFormat(value)
    assert why in str(exc.value)


def test_a_schema_file_is_read_once_at_start_as_compact_json(tmp_path):
    path = tmp_path / "door.json"
    path.write_text(json.dumps(DOOR, indent=4))
    config = {"ollama-format": f"@{path}", "ollama-model": "llava"}
    resolve_formats(config)
    assert json.loads(config["ollama-format"]) == DOOR and "\n" not in config["ollama-format"]
    assert config["ollama-model"] == "llava"
    assert read_format_value("json") == "json" and read_format_value("") == ""


@pytest.mark.parametrize("content, why", [
    (None, "cannot read the schema file"),
    (b"{not json", "the file is not JSON"),
    (b"\xff\xfe", "the file is not JSON"),
    (b'{"type": 12}', "not a valid JSON Schema"),
    (b" " * (MAX_SCHEMA_BYTES + 1), "over 256 KiB"),
])
def test_a_bad_schema_file_stops_the_run_with_a_sentence(tmp_path, content, why):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match="ollama-format=@") as exc:
        resolve_formats({"ollama-format": f"@{path}"})
    assert why in str(exc.value)


def test_caption_stats_count_invalid_structured_answers():
    bus, stats = CaptionBus(), CaptionStats()
    bus.subscribe(stats, stream=0)
    for fields, error in (({"person": True}, None), (None, "the reply is not JSON"), (None, None)):
        bus.publish(CaptionEvent("x", 1.0, 1.0, 30, "cam", fields=fields, fields_error=error))
    assert (stats.snapshot().completed, stats.snapshot().invalid) == (3, 1)
