"""The caption history recorder on the caption bus, with real parts: frames of the shipped
clips, the ``ollama`` processor against the Ollama stand-in, a child process killed with
SIGKILL, and the ``vision-host history`` command."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import CAR_CLIP, PEOPLE_CLIP, SAMPLE_CLIP
from ollama_driver import OLLAMA_WASM
from ollama_standin import OllamaStandin
from vision_host.captions import CaptionBus, CaptionEvent
from vision_host.captions.event import AlertEvent
from vision_host.cli import main
from vision_host.history import HistoryRecorder, HistoryStore, start_history
from vision_host.outputs.base import Output
from vision_host.pipeline import Pipeline
from vision_host.runtime import NetworkPolicy
from vision_host.sources import FileSource


def clip_frame(path, index: int = 0) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    for _ in range(index + 1):
        ok, frame = cap.read()
        assert ok, f"test media missing or short: {path}"
    cap.release()
    return frame


def caption(text: str, t: float, stream: int = 0, name: str = "street", frame=None) -> CaptionEvent:
    return CaptionEvent(text, t, time.time(), round(t * 25), "clip", model="llava", latency_ms=300.0, stream=stream,
                        stream_name=name, frame=frame)


def test_captions_with_real_frames_get_jpeg_thumbnails_of_at_most_160_px(tmp_path):
    path = tmp_path / "h.sqlite3"
    bus = CaptionBus()
    recorder = bus.subscribe(HistoryRecorder(HistoryStore(path)))
    assert bus.frames_wanted
    frames = {"car": clip_frame(CAR_CLIP, 80), "bottles": clip_frame(SAMPLE_CLIP, 10),
              "people": clip_frame(PEOPLE_CLIP, 5), "portrait": np.ascontiguousarray(clip_frame(CAR_CLIP, 80)
                                                                                     .transpose(1, 0, 2)),
              "tiny": clip_frame(SAMPLE_CLIP)[:40, :60].copy()}
    for i, (name, frame) in enumerate(frames.items()):
        bus.publish(caption(f"a frame of {name}", i, frame=frame))
    bus.publish_alert(AlertEvent("car", "ON", 0, "street", time.time(), "held for 2 s"))
    assert recorder.flush(10)
    bus.close()                                   # closes the recorder, which closes its store
    assert recorder.committed == 6 and recorder.lost == recorder.dropped == 0
    with HistoryStore(path) as store:
        for record in store.list(kind="caption"):
            name = record["text"].split()[-1]
            original = frames[name]
            data = store.thumbnail(record["id"])
            thumb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert data[:3] == b"\xff\xd8\xff" and thumb is not None
            h, w = original.shape[:2]
            expect = (h, w) if max(h, w) <= 160 else (round(h * 160 / max(h, w)), round(w * 160 / max(h, w)))
            assert thumb.shape[:2] == expect
            small = cv2.resize(original, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
            assert np.abs(thumb.astype(int) - small).mean() < 12, "the thumbnail shows the captioned frame"
        assert [r["alert"] for r in store.list(kind="alert")] == ["car"]


def test_a_full_disk_loses_those_events_only_logs_once_and_never_blocks_the_video(tmp_path, caplog):
    store = HistoryStore(tmp_path / "h.sqlite3")
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    # SQLite's page limit fails a write with the very error a full disk gives (SQLITE_FULL)
    store._conn.execute(f"PRAGMA max_page_count = {pages + 4}")
    recorder = HistoryRecorder(store)
    noise = np.random.default_rng(3).integers(0, 256, (432, 768, 3), np.uint8)
    with caplog.at_level(logging.WARNING, logger="vision_host.history.recorder"):
        for i in range(12):
            started = time.perf_counter()
            recorder.add(caption(f"noisy caption {i}", i, frame=noise))
            assert time.perf_counter() - started < 0.05, "add must only queue the event"
        assert recorder.flush(20)
    assert recorder.lost > 0 and recorder.committed + recorder.lost == 12
    warnings = [r.getMessage() for r in caplog.records if "the event is lost" in r.getMessage()]
    assert len(warnings) == 1 and "disk is full" in warnings[0] and "the video goes on" in warnings[0]
    store._conn.execute("PRAGMA max_page_count = 1000000")   # space again: writing resumes
    recorder.add(caption("after the disk was freed", 20))
    assert recorder.flush(10)
    assert store.search("freed")[0]["text"] == "after the disk was freed"
    recorder.close()


def test_a_path_that_cannot_hold_the_history_leaves_the_run_without_it(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="vision_host.history.recorder"):
        assert start_history(tmp_path / "file" / "h.sqlite3") is None
    assert "cannot create the folder" in caplog.text and "the video goes on without caption history" in caplog.text
    recorder = start_history(tmp_path / "ok.sqlite3", retention_days=7, max_mb=10)
    assert isinstance(recorder, HistoryRecorder) and recorder.retention_days == 7
    recorder.close()


def test_a_full_queue_drops_events_without_blocking_and_close_writes_the_rest(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    gate = threading.Event()
    real_add = store.add_caption
    store.add_caption = lambda event: (gate.wait(10), real_add(event))[1]   # a slow disk
    recorder = HistoryRecorder(store, queue_size=3)
    for i in range(10):
        recorder.add(caption(f"caption {i}", i))
    dropped = recorder.dropped
    assert 6 <= dropped <= 7       # 3 queued, and maybe 1 taken by the writer
    gate.set()
    recorder.close()               # writes what was queued
    recorder.add(caption("after close", 99))
    assert recorder.dropped == dropped + 1 and recorder.committed == 10 - dropped
    with HistoryStore(tmp_path / "h.sqlite3") as check:
        assert check.count() == recorder.committed


CHILD = """
import sys, time
import numpy as np
from vision_host.captions import CaptionBus, CaptionEvent
from vision_host.history import HistoryRecorder, HistoryStore

def committed(event, event_id):
    print(event_id, event.text, flush=True)

bus = CaptionBus()
bus.subscribe(HistoryRecorder(HistoryStore(sys.argv[1]), on_commit=committed, queue_size=1000))
frame = np.random.default_rng(1).integers(0, 256, (360, 640, 3), np.uint8)
for i in range(1_000_000):
    bus.publish(CaptionEvent(f"caption number {i}", i / 10, time.time(), i, "clip", frame=frame))
    time.sleep(0.001)
"""


@pytest.mark.slow
def test_sigkill_keeps_every_caption_whose_commit_completed(tmp_path):
    path = tmp_path / "h.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        stop_after = random.Random().randint(5, 120)
        deadline = time.monotonic() + 60
        while len(seen) < stop_after and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            seen.append(line.split(" ", 1))
        os.kill(child.pid, signal.SIGKILL)      # no clean-up runs: mid-write, mid-commit, anywhere
        seen += [line.split(" ", 1) for line in child.stdout.read().splitlines()]   # printed before the kill
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert len(seen) >= stop_after, f"the child printed only {len(seen)} commits"
    with HistoryStore(path) as store:
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for event_id, text in seen:
            record = store.get(int(event_id))
            assert record is not None and record["text"] == text.rstrip("\n"), f"commit {event_id} lost"
            assert record["thumbnail"]
        assert store.count() >= len(seen)
        last = seen[-1][1].rstrip("\n")
        assert store.search(last)[0]["text"] == last


class NullOutput(Output):
    """Takes frames and keeps nothing (the run needs an output)."""

    def open(self, width: int, height: int, fps: float) -> None:
        self.frames = 0

    def write(self, frame) -> None:
        self.frames += 1

    def close(self) -> None:
        self.closed = True

    def describe(self) -> str:
        return "nowhere"


def _reply(prompt: str, jpeg: bytes | None) -> str:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    brightness = round(float(img.mean()))
    if "street" in prompt:
        return f"a red car drives along the street, brightness {brightness}"
    return f"a person in a blue coat walks past the door, brightness {brightness}"


@pytest.mark.slow
def test_a_run_of_two_streams_on_real_clips_is_searchable_by_words_stream_and_time(runtime_factory, tmp_path):
    standin = OllamaStandin(reply=_reply)
    path = tmp_path / "h.sqlite3"
    try:
        config = {"ollama-url": standin.url, "ollama-interval-ms": "0", "ollama-min-interval-ms": "0",
                  "ollama-prompt": "describe the street"}
        rt = runtime_factory(config=config, policy=NetworkPolicy.from_config(config))
        streams = [rt.streams[0], rt.add_stream("door", {"ollama-prompt": "describe who is at the door"})]
        streams[0].name = "street"
        bus = CaptionBus()
        recorder = bus.subscribe(HistoryRecorder(HistoryStore(path)))
        started = time.time()
        pipelines = []
        for stream, clip in zip(streams, (CAR_CLIP, PEOPLE_CLIP)):
            source = FileSource(str(clip), pace=False)
            output = NullOutput()
            output.open(source.width, source.height, source.fps)
            processor = rt.load(OLLAMA_WASM, stream=stream)
            pipelines.append((Pipeline(source, [processor], [output], rt, caption_bus=bus, stream=stream), source))
        threads = [threading.Thread(target=p.run, args=(400,)) for p, _ in pipelines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for _, source in pipelines:
            source.close()
        assert recorder.flush(20)
        bus.close()
        ended = time.time()
    finally:
        standin.stop()
    published = [p.caption_stats.snapshot().completed for p, _ in pipelines]
    assert all(n >= 1 for n in published), f"captions per stream: {published}"
    assert recorder.committed == sum(published) and recorder.lost == 0
    with HistoryStore(path) as store:
        cars = store.search("red car", limit=1000)
        assert len(cars) == published[0] and {h["stream_name"] for h in cars} == {"street"}
        assert all(h["text"].startswith("a red car drives along the street") for h in cars)
        ranks = [h["rank"] for h in cars]
        assert ranks == sorted(ranks)
        people = store.search("blue coat", limit=1000)
        assert len(people) == published[1] and {h["stream"] for h in people} == {1}
        assert store.search("brightness", stream="door", limit=1000) == people or \
            {h["id"] for h in store.search("brightness", stream="door", limit=1000)} == {h["id"] for h in people}
        assert store.search("red car", stream="door") == []
        assert store.search("red car", until=started - 1) == [] and store.search("red car", since=ended + 1) == []
        assert len(store.search("red car", since=started, until=ended, limit=1000)) == published[0]
        for hit in cars + people:
            thumb = cv2.imdecode(np.frombuffer(store.thumbnail(hit["id"]), np.uint8), cv2.IMREAD_COLOR)
            assert thumb.shape == (90, 160, 3)       # 768x432 clips
            assert hit["model"] == "llava" and hit["latency_ms"] is not None


@pytest.fixture
def filled(tmp_path):
    path = tmp_path / "h.sqlite3"
    frame = clip_frame(CAR_CLIP, 80)
    with HistoryStore(path) as store:
        ids = {"old": store.add_caption(CaptionEvent("a red car, long ago", 1, time.time() - 3 * 86400, 1, "clip",
                                                     stream_name="street")),
               "car": store.add_caption(caption("a red car at the gate", 2, frame=frame)),
               "door": store.add_caption(caption("a red car\x1b[31m by the door", 3, stream=1, name="door")),
               "van": store.add_caption(caption("a white van", 4))}
    return path, ids


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_history_commands_search_list_export_and_show(filled, capsys, tmp_path):
    path, ids = filled
    history = ["history"]
    assert main([*history, "search", "red", "car", "--history", str(path), "--json"]) == 0
    assert {h["id"] for h in _lines(capsys)} == {ids["old"], ids["car"], ids["door"]}
    assert main([*history, "search", "red car", "--history", str(path), "--json", "--since", "1d"]) == 0
    assert {h["id"] for h in _lines(capsys)} == {ids["car"], ids["door"]}
    assert main([*history, "search", "red car", "--history", str(path), "--stream", "door"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"  door  #{ids['door']}  a red car [31m by the door" in out
    assert "\x1b" not in out, "a caption cannot drive the terminal"
    assert main([*history, "list", "--history", str(path), "--limit", "2", "--json"]) == 0
    assert [r["id"] for r in _lines(capsys)] == [ids["door"], ids["van"]]
    target = tmp_path / "out.csv"
    assert main([*history, "export", "--format", "csv", "-o", str(target), "--history", str(path)]) == 0
    assert "4 events written" in capsys.readouterr().err
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"), newline="")))
    assert [int(r["id"]) for r in rows] == [ids["old"], ids["car"], ids["door"], ids["van"]]
    assert main([*history, "export", "--format", "vtt", "--stream", "street", "--history", str(path)]) == 0
    assert capsys.readouterr().out.startswith("WEBVTT\n\n")
    thumb = tmp_path / "t.jpg"
    assert main([*history, "show", str(ids["car"]), "--thumbnail", str(thumb), "--history", str(path)]) == 0
    assert "text: a red car at the gate" in capsys.readouterr().out
    assert cv2.imread(str(thumb)).shape == (90, 160, 3)


def test_history_command_errors_are_sentences(filled, capsys, tmp_path):
    path, ids = filled
    assert main(["history", "show", "9999", "--history", str(path)]) == 1
    assert "no event #9999" in capsys.readouterr().err
    assert main(["history", "show", str(ids["van"]), "--thumbnail", str(tmp_path / "x.jpg"),
                 "--history", str(path)]) == 1
    assert "has no thumbnail" in capsys.readouterr().err
    assert main(["history", "search", "NEAR(", "--raw", "--history", str(path)]) == 1
    assert "not valid FTS5 query syntax" in capsys.readouterr().err
    assert main(["history", "search", "NEAR(", "--history", str(path)]) == 0      # plain words: no error
    assert main(["history", "list", "--since", "yesterday", "--history", str(path)]) == 2
    assert "duration before now" in capsys.readouterr().err
    assert main(["history", "list", "--history", str(tmp_path / "none.sqlite3")]) == 2
    assert "no caption history at" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite3").exists(), "reading never creates a database"


@pytest.mark.slow
def test_the_console_command_searches_a_filled_history(filled):
    path, ids = filled
    done = subprocess.run([sys.executable, "-m", "vision_host", "history", "search", "red car", "--history",
                           str(path), "--json", "--stream", "street"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    hits = [json.loads(line) for line in done.stdout.splitlines()]
    assert {h["id"] for h in hits} == {ids["old"], ids["car"]}
    assert all(h["rank"] <= 0 for h in hits)


@pytest.mark.slow
def test_the_history_commands_load_no_opencv(filled):
    path, _ = filled
    code = ("import sys; from vision_host.cli import main; "
            f"main(['history', 'search', 'red', '--history', {str(path)!r}]); print('cv2' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False" and "a red car at the gate" in done.stdout
