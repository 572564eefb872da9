"""The end of a video file does not lose the caption being answered: the run waits for it
(``--caption-drain-s``, default 30 s) with no new request started, and its caption reaches the
track; with 0 the run ends at once and says the server had not answered."""

from __future__ import annotations

import json

import pytest

from conftest import PEOPLE_CLIP
from ollama_standin import OllamaStandin
from vision_host.cli import main

pytestmark = pytest.mark.slow


def _run(tmp_path, server: OllamaStandin, *flags: str) -> tuple[int, dict, list[dict]]:
    track, stats = tmp_path / "people.jsonl", tmp_path / "stats.json"
    rc = main(["run", "-p", "ollama", "-s", str(PEOPLE_CLIP), "--no-pace", "-o", "file", "-d", str(tmp_path / "o.mp4"),
               "--captions", str(track), "--stats", str(stats), "--no-history", "-c", f"ollama-url={server.url}",
               "-c", "ollama-interval-ms=0", *flags])
    records = [json.loads(line) for line in track.read_text().splitlines()] if track.exists() else []
    return rc, json.loads(stats.read_text()), [r for r in records if r["event"] == "caption"]


def test_the_caption_in_flight_when_the_file_ends_reaches_the_track(tmp_path, capsys):
    server = OllamaStandin(latency_s=1.0, reply="two people by the door")
    try:
        rc, stats, captions = _run(tmp_path, server)
    finally:
        server.stop()
    assert rc == 0, capsys.readouterr().err
    assert [c["text"] for c in captions] == ["two people by the door"]
    assert stats["captions"]["completed"] == 1 and stats["frames_out"] == 31
    assert len(server.requests) == 1           # paused while draining: no new request, though interval is 0
    assert stats["duration_s"] < 1.0           # the wait is not the video's time (31 unpaced frames)


def test_with_no_drain_the_run_ends_at_once_and_says_the_server_had_not_answered(tmp_path, capsys):
    server = OllamaStandin(latency_s=3.0, reply="never seen")
    try:
        rc, stats, captions = _run(tmp_path, server, "--caption-drain-s", "0")
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert rc == 1 and "had not answered when the run ended" in err, err
    assert captions == [] and stats["captions"]["completed"] == 0
