"""`vision-host run` with ollama-format: the schema read from a file at start, sent by the processor,
each reply parsed and checked once by the host; the fields reach the caption track and the stats,
a reply that does not match is kept as text and counted, and the video never stops for it."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from vision_host.cli import main

DOOR = {"type": "object", "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0}},
        "required": ["person", "count"]}


def _run(tmp_path, server: OllamaStandin, fmt: str, frames: int = 90) -> tuple[int, dict, list[dict]]:
    track, stats = tmp_path / "door.jsonl", tmp_path / "stats.json"
    try:
        rc = main(["run", "-p", "ollama", "-s", str(SAMPLE_CLIP), "--no-pace", "--max-frames", str(frames),
                   "-o", "file", "-d", str(tmp_path / "door.mp4"), "--stats", str(stats), "--captions", str(track),
                   "-c", f"ollama-url={server.url}", "-c", "ollama-interval-ms=0", "-c", "ollama-model=llava",
                   "-c", f"ollama-format={fmt}"])
    finally:
        server.stop()
    records = [json.loads(line) for line in track.read_text().splitlines()]
    return rc, json.loads(stats.read_text()), [r for r in records if r["event"] == "caption"]


def test_answers_matching_the_schema_file_reach_the_track_as_fields(tmp_path, capsys):
    schema = tmp_path / "door.json"
    schema.write_text(json.dumps(DOOR, indent=2))
    server = OllamaStandin(latency_s=0.05, reply=lambda prompt, jpeg: '{"person": true, "count": 2}')
    rc, stats, captions = _run(tmp_path, server, f"@{schema}")
    assert rc == 0, capsys.readouterr().err
    sent = [r.body["format"] for r in server.requests]
    assert sent and all(f == DOOR for f in sent)                 # the file's schema, as Ollama's format
    assert captions and all(c["fields"] == {"person": True, "count": 2} and "fields_error" not in c for c in captions)
    assert stats["captions"]["completed"] == len(captions) >= 1 and stats["captions"]["invalid"] == 0


def test_a_reply_that_does_not_match_is_kept_as_text_counted_and_the_video_goes_on(tmp_path, capsys):
    # a server that does not honour the schema (the stand-in passes JSON objects through as they are)
    replies = iter(['{"person": "maybe", "count": 1}', '{"person": true, "count": -3}', '{"person": false}'] * 1000)
    server = OllamaStandin(latency_s=0.05, reply=lambda prompt, jpeg: next(replies))
    rc, stats, captions = _run(tmp_path, server, json.dumps(DOOR))
    assert rc == 0, capsys.readouterr().err
    assert stats["frames_out"] == 90 and len(captions) >= 2
    for c in captions:
        assert "fields" not in c and c["text"]
        assert c["fields_error"].startswith("the reply does not match the schema at ")
    assert stats["captions"]["invalid"] == len(captions) == stats["captions"]["completed"]


@pytest.mark.parametrize("value, why", [("@missing.json", "cannot read the schema file"),
                                        ('{"type": "objekt"}', "not a valid JSON Schema at type")])
def test_a_bad_format_stops_the_run_before_it_starts(tmp_path, capsys, value, why):
    rc = main(["run", "-p", "ollama", "-s", str(SAMPLE_CLIP), "-o", "file", "-d", str(tmp_path / "x.mp4"),
               "-c", "ollama-url=http://127.0.0.1:9", "-c", f"ollama-format={value}"])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "ollama-format" in err
    assert not (tmp_path / "x.mp4").exists()
