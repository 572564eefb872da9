"""Caption tracks (vision_host.captions) read back with real parsers: webvtt-py, pysrt, json, and
FFmpeg's own SubRip / WebVTT demuxers (through PyAV, when installed)."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pysrt
import pytest
import webvtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vision_host
from vision_host.captions import CaptionEvent, CaptionTrackError, SubtitleStreamTrack, open_track

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

MAX_CUE_S = 10.0  # open_track's default: a cue's provisional end is its start + this

# Cues expected in the WebVTT/SubRip tracks: (start_s, end_s, displayed text, frame at which the
# cue is on disk (a caption: when it completed, ending at start + MAX_CUE_S until its end is
# known), frame at which its end is final; None: at close).
EXPECTED = [
    (1.0, 4.0, "A person holds a green bottle", 30, 120),
    (4.0, 7.5, "Café ☕ — 日本語のテキスト 🍾", 120, 225),
    (7.5, 9.0, "Tom & Jerry <b>not bold</b> --> arrow", 225, 270),
    (9.0, 10.0, "Line one\nLine two\nline three", 270, 279),  # lasts min_cue_s, not 0.3 s
    (10.0, 20.0, "Too soon after the last one", 279, 600),  # delayed to 10.0, capped at 10 s
    (22.0, 24.0, "After a long quiet stretch", 660, GAP_FRAME),  # ended by the gap
    (24.0, 27.5, "[reconnecting]", RESUME_FRAME, RESUME_FRAME),  # the gap itself, written at resume
    (28.0, 31.0, "Back after reconnecting", 840, None),  # ended by close(31.0)
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


def ffmpeg_cues(path: Path) -> list[tuple[float, float, str]]:
    """The cues FFmpeg's demuxer for the file's format finds (players built on FFmpeg see these)."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        cues = [(float(packet.pts * stream.time_base), float((packet.pts + packet.duration) * stream.time_base),
                 bytes(packet).decode("utf-8")) for packet in container.demux(stream) if packet.size]
    return [(start, end, html.unescape(text) if path.suffix == ".vtt" else text) for start, end, text in cues]


_VTT_TIMING = re.compile(r"\d{2,}:\d{2}:\d{2}\.\d{3} --> \d{2,}:\d{2}:\d{2}\.\d{3}")
_SRT_TIMING = re.compile(r"\d{2,}:\d{2}:\d{2},\d{3} --> \d{2,}:\d{2}:\d{2},\d{3}")
# Line breaks of str.splitlines() (pysrt reads lines through codecs, which breaks on all of them)
# other than LF, the only one the tracks write.
_OTHER_LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def assert_well_formed(path: Path) -> int:
    """Check the file against the format's grammar, stricter than any reader; return its cue count.

    WebVTT (https://www.w3.org/TR/webvtt1/, "WebVTT file structure" and "WebVTT cue text"): the
    header, then blocks separated by one blank line, each a timing line and one or more text lines
    with no "-->", no "<", and "&" only in the references &amp; &lt; &gt;. SubRip: blocks of the
    index (1, 2, …), a timing line and one or more non-blank text lines without "-->".
    """
    raw = path.read_bytes().decode("utf-8")  # strict: valid UTF-8 throughout
    assert not any(c in raw for c in _OTHER_LINE_BREAKS)
    if path.suffix == ".vtt":
        assert raw.startswith("WEBVTT\n\n")
        raw = raw[len("WEBVTT\n\n"):]
    if not raw:
        return 0
    assert raw.endswith("\n\n") and "\n\n\n" not in raw
    blocks = [block.split("\n") for block in raw[:-2].split("\n\n")]
    for number, lines in enumerate(blocks, 1):
        if path.suffix == ".srt":
            assert lines[0] == str(number), lines
            lines = lines[1:]
        assert (_VTT_TIMING if path.suffix == ".vtt" else _SRT_TIMING).fullmatch(lines[0]), lines
        assert len(lines) >= 2 and all(line.strip() for line in lines[1:]), lines
        assert not any("-->" in line for line in lines[1:]), lines
        if path.suffix == ".vtt":
            assert not any("<" in line for line in lines[1:]), lines
            assert not any(re.search(r"&(?!amp;|lt;|gt;)", line) for line in lines[1:]), lines
    return len(blocks)


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_timed_track_cues_and_each_caption_on_disk_as_soon_as_it_completes(tmp_path, suffix):
    path = tmp_path / f"captions{suffix}"
    track = open_track(path)
    read = READERS[suffix]
    arrow = "-->" if suffix == ".vtt" else "->"  # SubRip cannot escape it
    expected = [(start, end, text.replace("-->", arrow), *frames) for start, end, text, *frames in EXPECTED]
    checked = []

    def on_frame(frame):
        on_disk = [(start, end if final is not None and final <= frame else start + MAX_CUE_S, text)
                   for start, end, text, written, final in expected if written <= frame]
        if frame in CAPTIONS or frame in (GAP_FRAME, RESUME_FRAME, 599, 600):
            assert read(path) == on_disk, f"frame {frame}"  # a separate handle sees every caption
            assert assert_well_formed(path) == len(on_disk)
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
        assert READERS[suffix](path) == [(1.0, 11.0, "a long one"), (20.0, 30.0, "much later")]
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


# --------------------------------------------------------------------------- hostile replies

# A model's reply is untrusted text. Each: (reply, text a reader shows, SubRip's text if it differs).
# The only changes are those the formats force: line breaks normalised, blank lines and control
# characters dropped, lines stripped, and in SubRip a run of "-" ending in ">" shortened to "->"
# (SubRip has no escaping); WebVTT shows every other character as sent (escaped in the file).
HOSTILE = {
    "arrow": ("a ---> b", "a ---> b", "a -> b"),
    "arrows": ("---->x-->y--->", "---->x-->y--->", "->x->y->"),
    "spaced arrow": ("a -- > b --\t>", "a -- > b --\t>", None),
    "blank line and cue": ("\n\n1\n00:00:00,000 --> 99:00:00,000\nINJECTED",
                           "1\n00:00:00,000 --> 99:00:00,000\nINJECTED", "1\n00:00:00,000 -> 99:00:00,000\nINJECTED"),
    "cue without blank line": ("seen\n2\n00:00:00,000 ---> 99:00:00,000\nINJECTED",  # FFmpeg's SubRip demuxer
                               "seen\n2\n00:00:00,000 ---> 99:00:00,000\nINJECTED",   # starts a cue at any
                               "seen\n2\n00:00:00,000 -> 99:00:00,000\nINJECTED"),    # timing line
    "webvtt timing": ("x\n00:00:00.000 --> 99:00:00.000 line:0\nINJECTED",
                      "x\n00:00:00.000 --> 99:00:00.000 line:0\nINJECTED", "x\n00:00:00.000 -> 99:00:00.000 line:0\nINJECTED"),
    "crlf": ("top\r\n\r\n2\r\n00:00:00,000 --> 99:00:00,000\r\nINJECTED\r\n",
             "top\n2\n00:00:00,000 --> 99:00:00,000\nINJECTED", "top\n2\n00:00:00,000 -> 99:00:00,000\nINJECTED"),
    "lone cr": ("top\r\r2\r00:00:00,000 ---> 99:00:00,000\rINJECTED",
                "top\n2\n00:00:00,000 ---> 99:00:00,000\nINJECTED", "top\n2\n00:00:00,000 -> 99:00:00,000\nINJECTED"),
    "nul": ("a\x00b --\x00> c\x00\n\x00\n\x00d\x7f\x9b", "ab --> c\nd", "ab -> c\nd"),
    "unicode line breaks": ("top\u2028\u20282\u202800:00:00,000 ---> 99:00:00,000\u2029\u2029INJECTED\x85\x85end",
                            "top\n2\n00:00:00,000 ---> 99:00:00,000\nINJECTED\nend",
                            "top\n2\n00:00:00,000 -> 99:00:00,000\nINJECTED\nend"),
    "other line breaks": ("a\x0b\x0cb\x1c\x1d\x1ec", "a\nb\nc", None),
    "whitespace lines": ("a\n \t \n\u3000\u00a0\nb", "a\nb", None),  # blank to SubRip readers
    "block keywords": ("NOTE not a comment\nSTYLE\n::cue { color: red }\nREGION\nid:fake\nWEBVTT",
                       "NOTE not a comment\nSTYLE\n::cue { color: red }\nREGION\nid:fake\nWEBVTT", None),
    "markup": ("<b>bold</b> <c.red>x</c> <00:00:01.000> <v Bob>hi", "<b>bold</b> <c.red>x</c> <00:00:01.000> <v Bob>hi",
               None),
    "entities": ("&amp; &lt; &#62; & &nbsp &", "&amp; &lt; &#62; & &nbsp &", None),
    "lone surrogate": ("bad \ud800 half \udfff", "bad \ufffd half \ufffd", None),  # not encodable: U+FFFD
    "long": ("word " * 40_000 + "\n" + "\n".join(f"line {i}" for i in range(2000)),
             ("word " * 40_000).strip() + "\n" + "\n".join(f"line {i}" for i in range(2000)), None),
}


def hostile_track(path: Path, reply: str) -> None:
    """A benign caption at 1 s, ``reply`` at 3 s, a benign one at 6 s, the video ending at 8 s."""
    with open_track(path) as track:
        track.add(event(30, "before"))
        track.add(event(90, reply))
        track.add(event(180, "after"))
        track.close(8.0)


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_no_reply_can_add_split_or_retime_a_cue(tmp_path, suffix, case):
    reply, shown, srt_shown = HOSTILE[case]
    shown = srt_shown if suffix == ".srt" and srt_shown is not None else shown
    path = tmp_path / f"hostile{suffix}"
    hostile_track(path, reply)
    expected = [(1.0, 3.0, "before"), (3.0, 6.0, shown), (6.0, 8.0, "after")]
    assert assert_well_formed(path) == 3
    assert READERS[suffix](path) == expected


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_ffmpeg_reads_one_cue_per_hostile_reply(tmp_path, suffix, case):
    """FFmpeg's demuxers (what mpv, ffmpeg and ffplay read files with) see exactly the cues written."""
    reply, shown, srt_shown = HOSTILE[case]
    shown = srt_shown if suffix == ".srt" and srt_shown is not None else shown
    if suffix == ".srt":  # FFmpeg's SubRip demuxer reads a line 4095 bytes at a time (ASCII here)
        shown = "\n".join("\n".join(line[i:i + 4095] for i in range(0, len(line), 4095)) for line in shown.split("\n"))
    path = tmp_path / f"hostile{suffix}"
    hostile_track(path, reply)
    assert ffmpeg_cues(path) == [(1.0, 3.0, "before"), (3.0, 6.0, shown), (6.0, 8.0, "after")]


def displayed(reply: str, suffix: str) -> str:
    """What a reader should show for ``reply`` (the rules written out above :data:`HOSTILE`)."""
    reply = re.sub("[\ud800-\udfff]", "\ufffd", reply)
    lines = (re.sub("[\x00-\x08\x0a-\x1f\x7f-\x9f]", "", line).strip() for line in reply.splitlines())
    text = "\n".join(line for line in lines if line)
    return re.sub("-{2,}>", "->", text) if suffix == ".srt" else text


_HOSTILE_PIECES = ["-", "--", ">", "-->", " ", "\t", "<", "&", "amp;", "\n", "\r", "\r\n", "\u2028", "\u2029", "\x85",
                   "\x00", "\x0b", "\x1c", "\x7f", "\ud800", "\u3000", "0", "1", ":", ",", ".", "NOTE", "é", "🍾"]


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=st.lists(st.one_of(st.sampled_from(_HOSTILE_PIECES), st.characters(codec=None)), max_size=40).map("".join))
def test_any_reply_gives_one_cue_with_its_text(tmp_path, reply):
    for suffix in (".vtt", ".srt"):
        path = tmp_path / f"fuzz{suffix}"
        hostile_track(path, reply)
        shown = displayed(reply, suffix)
        middle = [(3.0, 6.0, shown)] if shown else []  # a blank reply makes no cue
        expected = [(1.0, 3.0 if shown else 6.0, "before"), *middle, (6.0, 8.0, "after")]
        assert assert_well_formed(path) == len(expected)
        assert READERS[suffix](path) == expected


def test_jsonl_keeps_every_reply_whole_on_one_line(tmp_path):
    """JSON Lines keeps the text exactly (lone surrogates, which UTF-8 cannot hold, become U+FFFD),
    and U+2028, U+2029 and U+0085 are written escaped, so readers that split lines on them too
    (str.splitlines) still see one record a line."""
    path = tmp_path / "hostile.jsonl"
    replies = [reply for reply, _, _ in HOSTILE.values()]
    with open_track(path) as track:
        for i, reply in enumerate(replies):
            track.add(event(30 * (i + 1), reply))
            track.gap(30 * (i + 1) / FPS, f"lost\u2028{reply[:20]}")
        track.close(100.0)
    raw = path.read_bytes().decode("utf-8")
    lines = raw.splitlines()
    assert raw.split("\n") == [*lines, ""]
    records = [json.loads(line) for line in lines]
    assert [r["text"] for r in records if r["event"] == "caption"] == [
        re.sub("[\ud800-\udfff]", "\ufffd", reply) for reply in replies]
    assert [r["event"] for r in records] == ["caption", "gap", *["resume", "caption", "gap"] * (len(replies) - 1), "end"]
    assert [r["reason"] for r in records if r["event"] == "gap"] == [
        re.sub("[\ud800-\udfff]", "\ufffd", f"lost\u2028{reply[:20]}") for reply in replies]


def test_subtitle_stream_track_gets_each_cue_once_its_end_is_known():
    """A recording's subtitle stream (SubRip in Matroska: extracted to .srt as it is) gets SubRip's
    cue text, and each cue once, with its final times."""
    cues = []
    track = SubtitleStreamTrack(lambda start_s, end_s, text: cues.append((start_s, end_s, text)))
    track.add(event(30, "a ---> b\n\n2\n00:00:00,000 --> 99:00:00,000\u2028\u2028c"))
    assert cues == []
    track.add(event(60, "<b>x</b> & y"))
    assert cues == [(1.0, 2.0, "a -> b\n2\n00:00:00,000 -> 99:00:00,000\nc")]
    track.gap(3.0, "reconnecting")
    track.resume(4.5)
    track.add(event(150, "last"))
    track.tick(100.0)
    track.close(120.0)
    assert cues[1:] == [(2.0, 3.0, "<b>x</b> & y"), (3.0, 4.5, "[reconnecting]"), (5.0, 15.0, "last")]
    assert track.cues_written == 3


# --------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_each_caption_is_on_disk_when_it_completes_and_only_the_tail_is_rewritten(tmp_path, suffix):
    """Read from another handle while the track stays open, as a killed process leaves it: the
    last caption is there ending at start + max_cue_s, and is corrected when its end is known."""
    path = tmp_path / f"live{suffix}"
    track = open_track(path, max_cue_s=10.0, min_cue_s=1.0)
    read = READERS[suffix]
    done = []
    steps = [
        (lambda: None, []),
        (lambda: track.add(CaptionEvent("A", 1.0, WALL0, 30, SOURCE)), [(1.0, 11.0, "A")]),
        (lambda: track.add(CaptionEvent("B", 4.0, WALL0, 120, SOURCE)), [(1.0, 4.0, "A"), (4.0, 14.0, "B")]),
        (lambda: track.add(CaptionEvent("C", 4.3, WALL0, 129, SOURCE)), [(4.0, 5.0, "B"), (5.0, 15.0, "C")]),
        (lambda: track.tick(15.0), [(5.0, 15.0, "C")]),
        (lambda: track.add(CaptionEvent("D", 16.0, WALL0, 480, SOURCE)), [(5.0, 15.0, "C"), (16.0, 26.0, "D")]),
        (lambda: track.gap(18.0, "reconnecting"), [(16.0, 18.0, "D")]),
        (lambda: track.resume(20.0), [(16.0, 18.0, "D"), (18.0, 20.0, "[reconnecting]")]),
        (lambda: track.add(CaptionEvent("E", 21.0, WALL0, 630, SOURCE)), [(18.0, 20.0, "[reconnecting]"),
                                                                         (21.0, 31.0, "E")]),
        (lambda: track.close(22.5), [(21.0, 22.5, "E")]),
    ]
    before = b""
    for n, (step, tail) in enumerate(steps):
        step()
        now = path.read_bytes()
        cues = read(path)
        assert assert_well_formed(path) == len(cues), f"step {n}"
        assert cues[len(cues) - len(tail):] == tail, f"step {n}"
        assert [c for c in cues[:len(cues) - len(tail)]] == done[:len(cues) - len(tail)], f"step {n}"
        # All but the last cue of the previous state are untouched bytes.
        kept = before[:before.rstrip(b"\n").rfind(b"\n\n") + 2] if before.count(b"-->") else before
        assert now.startswith(kept), f"step {n}"
        before, done = now, cues
    assert done == [(1.0, 4.0, "A"), (4.0, 5.0, "B"), (5.0, 15.0, "C"), (16.0, 18.0, "D"),
                    (18.0, 20.0, "[reconnecting]"), (21.0, 22.5, "E")]
    assert track.cues_written == 5


class _KilledBeforeTruncate(Exception):
    pass


class _DiesAtTruncate:
    """The track's file, but the process "dies" (stops) where it would truncate."""

    def __init__(self, file):
        self._real = file

    def truncate(self, *args):
        raise _KilledBeforeTruncate

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.mark.parametrize("suffix", [".vtt", ".srt"])
def test_a_cue_rewritten_shorter_leaves_no_stray_bytes_even_if_killed_before_the_truncate(tmp_path, suffix):
    """An end time one digit shorter than the provisional one (100 h into the video): the corrected
    cue is written over the old one, then the file is cut after it; a kill in between leaves only
    an extra line end, and the cue is there with one of its two ends at every moment."""
    stamp = {".vtt": "99:59:58.000\na\n\n", ".srt": "99:59:58,000\na\n\n"}[suffix]
    path = tmp_path / f"hundred{suffix}"
    with open_track(path) as track:
        track.add(CaptionEvent("a", 359_995.0, WALL0, 0, SOURCE))  # 99:59:55 → provisional 100:00:05
        assert READERS[suffix](path) == [(359_995.0, 360_005.0, "a")]
        track.gap(359_998.0, "reconnecting")
        assert path.read_text(encoding="utf-8").endswith(" --> " + stamp)
        assert assert_well_formed(path) == 1
    path = tmp_path / f"killed{suffix}"
    track = open_track(path)
    track.add(CaptionEvent("a", 359_995.0, WALL0, 0, SOURCE))
    track._file = _DiesAtTruncate(track._file)
    with pytest.raises(_KilledBeforeTruncate):
        track.gap(359_998.0, "reconnecting")
    assert path.read_text(encoding="utf-8").endswith(" --> " + stamp + "\n")
    assert READERS[suffix](path) == [(359_995.0, 359_998.0, "a")]


_CHILD = """
import json, sys
from vision_host.captions import CaptionEvent, open_track
track = open_track(sys.argv[1])
for i, (t, text) in enumerate(json.loads(sys.argv[2])):
    track.add(CaptionEvent(text, t, 1700000000.0 + t, round(t * 30), "camera"))
    print("added", i, flush=True)
    sys.stdin.readline()  # the test says when to go on, or kills this process here
track.close()
"""
CRASH_CAPTIONS = [(1.0, "first"), (2.5, "second"), (2.8, "third --->")]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
@pytest.mark.parametrize("suffix", [".vtt", ".srt", ".jsonl"])
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_leaves_every_completed_caption_in_the_file(tmp_path, suffix, kill_after):
    """A process writing a track is killed (SIGKILL: no cleanup) right after its Nth ``add``."""
    path = tmp_path / f"killed{suffix}"
    package_dir = Path(vision_host.__file__).resolve().parents[1]   # host/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_dir), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), json.dumps(CRASH_CAPTIONS)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for i in range(kill_after):
            if i:
                proc.stdin.write("\n")  # go on to the next caption
                proc.stdin.flush()
            line = proc.stdout.readline()  # blocks until the child printed it (or died)
            assert line == f"added {i}\n", line or proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    if suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [(r["stream_time_s"], r["text"]) for r in records] == CRASH_CAPTIONS[:kill_after]
        return
    third = "third --->" if suffix == ".vtt" else "third ->"
    expected = {1: [(1.0, 11.0, "first")],
                3: [(1.0, 2.5, "first"), (2.5, 3.5, "second"), (3.5, 13.5, third)]}[kill_after]
    assert assert_well_formed(path) == kill_after
    assert READERS[suffix](path) == expected
