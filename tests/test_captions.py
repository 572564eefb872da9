"""Caption tracks (vision_host.captions) read back with real parsers: webvtt-py, pysrt, json."""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

import pysrt
import pytest
import webvtt

from vision_host.captions import CaptionEvent, CaptionTrackError, open_track

FPS = 30
WALL0 = 1_700_000_000.0  # wall clock of frame 0
SOURCE = "media/bottle-detection.mp4"

# A run at 30 fps: frame index → what happens on that frame.
CAPTIONS = {
    30: "A person holds a green bottle",
    120: "Café ☕ — 日本語のテキスト 🍾",
    225: "Tom & Jerry <b>not bold</b> --> arrow",
    270: "Line one\n\nLine two\r\nline three  ",
    279: "Too soon after the last one",  # 0.3 s later: shorter than min_cue_s (1 s)
    660: "After a long quiet stretch",  # the previous cue hits max_cue_s (10 s) before this
    840: "Back after reconnecting",
}
GAP_FRAME, RESUME_FRAME, LAST_FRAME = 720, 825, 930

# Cues expected in the WebVTT/SubRip tracks: (start_s, end_s, displayed text, frame at which
# the cue must be on disk; None: at close).
EXPECTED = [
    (1.0, 4.0, "A person holds a green bottle", 120),
    (4.0, 7.5, "Café ☕ — 日本語のテキスト 🍾", 225),
    (7.5, 9.0, "Tom & Jerry <b>not bold</b> --> arrow", 270),
    (9.0, 10.0, "Line one\nLine two\nline three", 279),  # lasts min_cue_s, not 0.3 s
    (10.0, 20.0, "Too soon after the last one", 600),  # delayed to 10.0, capped at 10 s by tick
    (22.0, 24.0, "After a long quiet stretch", GAP_FRAME),  # ended by the gap
    (24.0, 27.5, "[reconnecting]", RESUME_FRAME),  # the gap itself
    (28.0, 31.0, "Back after reconnecting", None),  # ended by close(31.0)
]


def event(frame: int, text: str) -> CaptionEvent:
    t = frame / FPS
    return CaptionEvent(text=text, stream_time_s=t, wall_time=WALL0 + t + 0.25, frame_index=frame,
                        source=SOURCE, model="llava", latency_ms=1234.56)


def run_loop(track, on_frame) -> None:
    """Drive ``track`` like the frame loop, calling ``on_frame(frame)`` after every frame."""
    for frame in range(LAST_FRAME):
        t = frame / FPS
        track.tick(t)
        if frame in CAPTIONS:
            track.add(event(frame, CAPTIONS[frame]))
        if frame == GAP_FRAME:
            track.gap(t, "reconnecting", wall_time=WALL0 + t)
        if frame == RESUME_FRAME:
            track.resume(t, wall_time=WALL0 + t)
        on_frame(frame)
    track.close(LAST_FRAME / FPS)


def vtt_cues(path: Path) -> list[tuple[float, float, str]]:
    return [(c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000, html.unescape(c.raw_text))
            for c in webvtt.read(str(path))]


def srt_cues(path: Path) -> list[tuple[float, float, str]]:
    subs = pysrt.open(str(path), encoding="utf-8")
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    return [(s.start.ordinal / 1000, s.end.ordinal / 1000, s.text) for s in subs]


READERS = {".vtt": vtt_cues, ".srt": srt_cues}


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_timed_track_cues_and_each_cue_on_disk_as_soon_as_its_end_is_known(tmp_path, suffix):
    path = tmp_path / f"captions{suffix}"
    track = open_track(path)
    read = READERS[suffix]
    arrow = "-->" if suffix == ".vtt" else "->"  # SubRip cannot escape it
    expected = [(start, end, text.replace("-->", arrow), frame) for start, end, text, frame in EXPECTED]
    checked = []

    def on_frame(frame):
        due = [c[:3] for c in expected if c[3] is not None and c[3] <= frame]
        if frame in CAPTIONS or frame in (GAP_FRAME, RESUME_FRAME, 599, 600):
            assert read(path) == due, f"frame {frame}"  # a separate handle sees every finished cue
            checked.append(frame)

    run_loop(track, on_frame)
    assert len(checked) == len(CAPTIONS) + 4
    assert read(path) == [c[:3] for c in expected]
    assert track.cues_written == len(CAPTIONS)
    assert track.closed


def test_vtt_file_follows_webvtt_syntax(tmp_path):
    path = tmp_path / "c.vtt"
    run_loop(open_track(path), lambda frame: None)
    raw = path.read_bytes().decode("utf-8")
    assert raw.startswith("WEBVTT\n\n")
    assert "00:00:07.500 --> 00:00:09.000\nTom &amp; Jerry &lt;b&gt;not bold&lt;/b&gt; --&gt; arrow\n\n" in raw
    blocks = raw.split("\n\n")
    assert all(block.count("-->") == 1 for block in blocks[1:] if block)  # only in timing lines
    assert "\r" not in raw


def test_srt_file_follows_subrip_syntax(tmp_path):
    path = tmp_path / "c.srt"
    run_loop(open_track(path), lambda frame: None)
    raw = path.read_text(encoding="utf-8")
    assert raw.startswith("1\n00:00:01,000 --> 00:00:04,000\nA person holds a green bottle\n\n2\n")
    assert "3\n00:00:07,500 --> 00:00:09,000\nTom & Jerry <b>not bold</b> -> arrow\n\n" in raw
    assert srt_cues(path)[2][2] == "Tom & Jerry <b>not bold</b> -> arrow"


def test_jsonl_records_every_caption_and_the_gap_at_once(tmp_path):
    path = tmp_path / "captions.jsonl"
    track = open_track(path)
    seen = []

    def on_frame(frame):
        if frame in CAPTIONS or frame in (GAP_FRAME, RESUME_FRAME):
            with open(path, encoding="utf-8") as other:
                lines = other.read().splitlines()
            seen.append(len(lines))
            assert json.loads(lines[-1])["stream_time_s"] == round(frame / FPS, 3)

    run_loop(track, on_frame)
    assert seen == list(range(1, len(seen) + 1))
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["event"] for r in records] == ["caption"] * 6 + ["gap", "resume", "caption", "end"]
    captions = [r for r in records if r["event"] == "caption"]
    assert [r["text"] for r in captions] == list(CAPTIONS.values())
    first = captions[1]
    assert set(first) == {"event", "stream_time_s", "wall_time", "wall_time_unix", "frame_index", "source",
                          "model", "latency_ms", "stream", "text"}
    assert first["frame_index"] == 120 and first["stream_time_s"] == 4.0 and first["stream"] == 0
    assert first["source"] == SOURCE and first["model"] == "llava" and first["latency_ms"] == 1234.6
    assert first["wall_time"] == "2023-11-14T22:13:24.250Z"
    assert datetime.fromisoformat(first["wall_time"]) == datetime.fromtimestamp(WALL0 + 4.25, timezone.utc)
    assert first["wall_time_unix"] == WALL0 + 4.25
    gap, resume, end = records[6], records[7], records[9]
    assert gap["stream_time_s"] == 24.0 and gap["reason"] == "reconnecting"
    assert resume["stream_time_s"] == 27.5 and resume["gap_s"] == 3.5
    assert end["stream_time_s"] == 31.0
    assert track.cues_written == len(CAPTIONS)


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_captions_at_the_same_time_never_give_empty_or_overlapping_cues(tmp_path, suffix):
    path = tmp_path / f"same{suffix}"
    with open_track(path, min_cue_s=0.5) as track:
        for text in ["first", "second", "third"]:
            track.add(event(60, text))  # all complete at 2.0 s
        track.add(event(63, "fourth"))  # 2.1 s
        track.close(5.0)
    assert READERS[suffix](path) == [(2.0, 2.5, "first"), (2.5, 3.0, "second"), (3.0, 3.5, "third"),
                                     (3.5, 5.0, "fourth")]


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_cue_timing_edges(tmp_path, suffix):
    path = tmp_path / f"edges{suffix}"
    track = open_track(path, max_cue_s=4.0)
    track.add(event(0, "  \n "))  # blank: no cue
    track.add(CaptionEvent("an hour in", 3725.5, WALL0, 111_765, SOURCE))
    size = path.stat().st_size
    for frame in range(1, 120):  # ticks before the cue is due leave the file alone
        track.tick(3725.5 + frame / FPS)
    assert path.stat().st_size == size
    track.tick(3729.5)
    track.gap(3730.0, "source lost")
    track.close(3731.0)  # the gap still open at the end is a cue too
    track.close(3731.0)  # idempotent
    assert READERS[suffix](path) == [(3725.5, 3729.5, "an hour in"), (3730.0, 3731.0, "[source lost]")]
    stamp = "01:02:05.500" if suffix == ".vtt" else "01:02:05,500"
    assert stamp in path.read_text(encoding="utf-8")
    with pytest.raises(CaptionTrackError, match="closed"):
        track.add(event(10, "late"))


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_close_without_end_time_gives_the_pending_cue_max_cue_s(tmp_path, suffix):
    path = tmp_path / f"open{suffix}"
    with open_track(path, max_cue_s=6.0) as track:
        track.add(event(90, "last words"))
    assert READERS[suffix](path) == [(3.0, 9.0, "last words")]


def test_unknown_extension_names_the_three_formats(tmp_path):
    with pytest.raises(CaptionTrackError) as error:
        open_track(tmp_path / "captions.txt")
    assert isinstance(error.value, ValueError)
    assert all(ext in str(error.value) for ext in (".vtt", ".srt", ".jsonl"))
    assert not (tmp_path / "captions.txt").exists()


def test_bad_durations_are_refused(tmp_path):
    with pytest.raises(CaptionTrackError, match="min_cue_s"):
        open_track(tmp_path / "c.vtt", max_cue_s=1.0, min_cue_s=2.0)


@pytest.mark.parametrize("name", ["deep/er/captions.vtt", "x/y/CAPTIONS.SRT", "runs/1/captions.jsonl"])
def test_missing_parent_folders_are_created(tmp_path, name):
    path = tmp_path / name
    with open_track(path) as track:
        track.add(event(30, "hello"))
        assert track.path == path
    assert path.is_file()
    assert "hello" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_a_caption_outliving_max_cue_s_ends_there_even_without_ticks(tmp_path, suffix):
    path = tmp_path / f"long{suffix}"
    with open_track(path, max_cue_s=10.0) as track:
        track.add(event(30, "a long one"))  # 1.0 s
        track.add(event(600, "much later"))  # 20.0 s: no tick in between
        assert READERS[suffix](path) == [(1.0, 11.0, "a long one")]
        track.close(21.0)
    assert READERS[suffix](path) == [(1.0, 11.0, "a long one"), (20.0, 21.0, "much later")]


@pytest.mark.parametrize("suffix", [".vtt", ".srt", ".jsonl"])
def test_a_caption_after_a_gap_without_resume_ends_the_gap(tmp_path, suffix):
    path = tmp_path / f"implicit{suffix}"
    with open_track(path) as track:
        track.add(event(30, "before"))
        track.gap(2.0, "reconnecting")
        track.add(event(150, "after"))  # 5.0 s, no resume() call
        track.close(6.0)
    if suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [(r["event"], r["stream_time_s"]) for r in records] == [
            ("caption", 1.0), ("gap", 2.0), ("resume", 5.0), ("caption", 5.0), ("end", 6.0)]
        assert records[2]["gap_s"] == 3.0
    else:
        assert READERS[suffix](path) == [(1.0, 2.0, "before"), (2.0, 5.0, "[reconnecting]"), (5.0, 6.0, "after")]


def test_jsonl_video_ending_in_a_gap_records_no_resume(tmp_path):
    path = tmp_path / "ends-in-gap.jsonl"
    with open_track(path) as track:
        track.gap(3.0, "source lost")
        track.close(4.0)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["event"], r["stream_time_s"]) for r in records] == [("gap", 3.0), ("end", 4.0)]
    assert track.cues_written == 0
