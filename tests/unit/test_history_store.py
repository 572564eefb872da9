"""The caption history database: search by words in relevance order, filters, FTS5 syntax
safety, exports that parse back, pruning by age and size, concurrent writers, clear errors."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import sqlite3
import sys
import threading
import unicodedata

import numpy as np
import pytest
import webvtt

from vision_host.captions import CaptionEvent
from vision_host.captions.event import AlertEvent
from vision_host.history import HistoryError, HistoryStore, default_history_path, export, parse_when

T0 = 1_796_083_200.0   # 2026-12-01T00:00:00Z, seconds since the epoch

FILLER = ["a quiet street with parked bicycles", "a person walking a dog", "an empty room with a chair",
          "trees moving in the wind", "a white van at the gate", "two people talking near a door",
          "a bottle on a table", "the lights are off", "a cat sleeping on a sofa", "rain on the window"]


def caption(text: str, t: float = 0.0, stream: int = 0, name: str | None = "yard", frame=None, **extra) -> CaptionEvent:
    return CaptionEvent(text, t, T0 + t, round(t * 30), "rtsp://camera/1", model="llava", latency_ms=812.5,
                        stream=stream, stream_name=name, prompt="describe", frame=frame, **extra)


@pytest.fixture
def store(tmp_path):
    with HistoryStore(tmp_path / "history.sqlite3") as s:
        yield s


@pytest.fixture
def filled(store):
    """Filler captions on two streams plus the red cars (ids in the order written)."""
    for i, text in enumerate(FILLER * 3):
        store.add_caption(caption(text, t=i, stream=i % 2, name=("yard", "door")[i % 2]))
    ids = {
        "buried": store.add_caption(caption("a long view of a street with trees, people, a bicycle, a bus stop and "
                                            "far away at the end of the road a red car", t=100)),
        "plain": store.add_caption(caption("a red car", t=101, stream=1, name="door")),
        "strong": store.add_caption(caption("red car, red car", t=102)),
        "blue": store.add_caption(caption("a blue car", t=103)),
    }
    return store, ids


def test_search_finds_every_word_in_relevance_order(filled):
    store, ids = filled
    hits = store.search("red car")
    assert [h["id"] for h in hits] == [ids["strong"], ids["plain"], ids["buried"]]
    assert hits[0]["rank"] <= hits[1]["rank"] <= hits[2]["rank"]
    assert hits[1]["text"] == "a red car" and hits[1]["stream_name"] == "door" and hits[1]["model"] == "llava"
    assert hits[1]["time"] == "2026-12-01T00:01:41.000Z" and hits[1]["latency_ms"] == 812.5
    assert [h["id"] for h in store.search("RED car", limit=1)] == [ids["strong"]]   # case-insensitive, limit
    assert store.search("red bicycle") == [] or all("bicycle" in h["text"] for h in store.search("red bicycle"))
    assert [h["id"] for h in store.search("car")][:1] == [ids["strong"]]


def test_equal_matches_are_ranked_newest_first(store):
    for text in FILLER:
        store.add_caption(caption(text))
    old = store.add_caption(caption("a red car", t=10))
    new = store.add_caption(caption("a red car", t=20))
    assert [h["id"] for h in store.search("red car")] == [new, old]


def test_stream_time_and_kind_filters(filled):
    store, ids = filled
    assert [h["id"] for h in store.search("red car", stream="door")] == [ids["plain"]]
    assert [h["id"] for h in store.search("red car", stream=1)] == [ids["plain"]]
    assert [h["id"] for h in store.search("red car", stream="0")] == [ids["strong"], ids["buried"]]
    assert store.search("red car", stream="garage") == []
    assert [h["id"] for h in store.search("red car", since=T0 + 101)] == [ids["strong"], ids["plain"]]
    assert [h["id"] for h in store.search("red car", until=T0 + 101)] == [ids["plain"], ids["buried"]]
    assert [h["id"] for h in store.search("red car", since=T0 + 100.5, until=T0 + 101.5)] == [ids["plain"]]
    store.add_alert(AlertEvent("red car", "ON", 0, "yard", T0 + 104, "held for 2 s", expression="'red car' in text"))
    assert [h["kind"] for h in store.search("red car", kind="alert")] == ["alert"]
    assert all(h["kind"] == "caption" for h in store.search("red car", kind="caption"))
    with pytest.raises(HistoryError, match="caption or alert"):
        store.search("red", kind="person")


HOSTILE = ['"', '""', "'", "NEAR(", "NEAR(red car", "*", "-", "-red", "AND", "OR", "NOT", "red OR", "red NOT car",
           "(", ")", "{red}", "text:red", "^red", "+", "red*", "*car", '"red" car"', "a\\b", "%", "_", "--",
           "😀", "é", "日本語", "\u202e", "\x00", "red\x00car", "\ud800"]


@pytest.mark.parametrize("query", HOSTILE)
def test_any_plain_query_is_searched_as_words_never_a_syntax_error(filled, query):
    store, ids = filled
    if not query.replace("\x00", "").strip():
        with pytest.raises(HistoryError, match="nothing to search for"):
            store.search(query)
        return
    hits = store.search(query)
    words = _words(query.replace("\x00", " "))
    for hit in hits:   # whatever matched holds every word of the query
        assert set(words) <= set(_words(hit["text"])), (query, hit["text"])
    if words == ["red"] or words == ["red", "car"]:
        assert {ids["strong"], ids["plain"], ids["buried"]} <= {h["id"] for h in hits}


def _words(text: str) -> list[str]:
    """The words of ``text`` as the index sees them, roughly: letters and digits, lower case, no diacritics."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return re.findall(r"[^\W_]+", plain)


def test_words_inside_syntax_still_match(filled):
    store, ids = filled
    assert ids["strong"] in [h["id"] for h in store.search('"red')]
    assert ids["strong"] in [h["id"] for h in store.search("-red car*")]
    assert store.search("NEAR(red car") == []      # "near" is a word no caption holds
    assert store.search("red OR car") == []        # so is "or"


def test_unicode_words_match_without_case_or_diacritics(store):
    cafe = store.add_caption(caption("Ein Café an der Straße, Kinder spielen 😀"))
    store.add_caption(caption("a plain street"))
    assert [h["id"] for h in store.search("cafe")] == [cafe]
    assert [h["id"] for h in store.search("CAFÉ straße")] == [cafe]
    assert store.get(cafe)["text"] == "Ein Café an der Straße, Kinder spielen 😀"


def test_raw_queries_use_fts5_syntax_and_errors_are_sentences(filled):
    store, ids = filled
    assert {h["id"] for h in store.search("red OR blue", raw=True)} == {ids["strong"], ids["plain"], ids["buried"],
                                                                       ids["blue"]}
    assert {h["id"] for h in store.search('"red car" NOT buried', raw=True)} >= {ids["strong"], ids["plain"]}
    for bad in ('"', "NEAR(", "red AND", "*", "(red"):
        with pytest.raises(HistoryError, match="not valid FTS5 query syntax.*without --raw"):
            store.search(bad, raw=True)
    with pytest.raises(HistoryError, match="nothing to search for"):
        store.search("   ")


def test_records_keep_every_field_and_link_alerts_to_their_caption(store):
    frame = np.full((360, 640, 3), 90, np.uint8)
    cap = caption("a person at the door\nwith a parcel", t=5, fields={"person": True, "count": 1}, frame=frame)
    cap_id = store.add_caption(cap)
    bad = store.add_caption(caption("not json", t=6, fields_error="the reply is not JSON"))
    alert_id = store.add_alert(AlertEvent("parcel", "ON", 0, "yard", T0 + 5.5, "held for 2 s", caption=cap,
                                          expression="person"))
    timer = store.add_alert(AlertEvent("parcel", "OFF", 0, "yard", T0 + 40, "cleared after 30 s without a match"))
    record = store.get(cap_id)
    assert record == {"id": cap_id, "kind": "caption", "time": "2026-12-01T00:00:05.000Z", "wall_time_unix": T0 + 5,
                      "stream": 0, "stream_name": "yard", "text": "a person at the door\nwith a parcel",
                      "model": "llava", "stream_time_s": 5.0, "frame_index": 150, "source": "rtsp://camera/1",
                      "latency_ms": 812.5, "prompt": "describe", "fields": {"person": True, "count": 1},
                      "fields_error": None, "thumbnail": True}
    assert store.get(bad)["fields_error"] == "the reply is not JSON" and store.get(bad)["thumbnail"] is False
    alert = store.get(alert_id)
    assert (alert["kind"], alert["alert"], alert["state"], alert["reason"], alert["expression"], alert["caption_id"]) \
        == ("alert", "parcel", "ON", "held for 2 s", "person", cap_id)
    assert store.get(timer)["caption_id"] is None
    assert store.get(99999) is None and store.thumbnail(99999) is None and store.thumbnail(bad) is None
    assert store.thumbnail(cap_id)[:2] == b"\xff\xd8"
    assert [r["id"] for r in store.list()] == [cap_id, alert_id, bad, timer]
    assert [r["id"] for r in store.list(limit=2)] == [bad, timer]          # the latest, oldest first
    assert [r["id"] for r in store.list(kind="alert")] == [alert_id, timer]


HOSTILE_TEXTS = ["a red car, parked", 'he said "stop"; then left', "line one\nline two\r\nline three",
                 "<b>bold</b> & --> arrow", "\n\nNOTE not a note\n\n00:00:01.000 --> 00:00:02.000\nfake cue",
                 "tab\there, comma, quote\" end", "Straße 😀 \u2028 sep \x85 nel", ""]


def _export(store, fmt, **filters) -> str:
    out = io.StringIO(newline="")
    export(store, fmt, out, **filters)
    return out.getvalue()


@pytest.fixture
def hostile(store):
    ids = [store.add_caption(caption(text, t=i * 3, stream=i % 2, name=("yard", "door")[i % 2],
                                     fields={"n": i} if i == 2 else None))
           for i, text in enumerate(HOSTILE_TEXTS)]
    ids.append(store.add_alert(AlertEvent("car", "ON", 0, "yard", T0 + 1, "held for 2 s")))
    return store, ids


def test_jsonl_export_parses_back_to_the_records(hostile):
    store, ids = hostile
    text = _export(store, "jsonl")
    lines = text.splitlines()   # every kind of line break splits: none may be inside a record
    assert [json.loads(line) for line in lines] == store.list(limit=1000)
    assert len(lines) == len(ids)
    assert [json.loads(line)["id"] for line in _export(store, "jsonl", stream="door").splitlines()] == ids[1:8:2]


def test_csv_export_parses_back_to_the_records(hostile):
    store, _ = hostile
    rows = list(csv.DictReader(io.StringIO(_export(store, "csv"), newline="")))
    records = store.list(limit=1000)
    assert [int(r["id"]) for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records):
        assert row["text"] == record["text"] and row["kind"] == record["kind"]
        assert float(row["wall_time_unix"]) == record["wall_time_unix"]
        assert (json.loads(row["fields"]) if row["fields"] else None) == record.get("fields")
    assert rows[1]["alert"] == "car" and rows[1]["state"] == "ON"


def test_vtt_export_is_one_cue_per_event_that_webvtt_readers_parse(hostile):
    store, ids = hostile
    text = _export(store, "vtt")
    assert text.startswith("WEBVTT\n\nNOTE 00:00:00.000 is 2026-12-01T00:00:00.000Z (UTC)\n\n")
    cues = list(webvtt.from_buffer(io.StringIO(text)))
    expected = [r for r in store.list(limit=1000) if r["text"].strip() or r["kind"] == "alert"]
    assert [int(c.identifier) for c in cues] == [r["id"] for r in expected]   # the blank caption makes no cue
    starts = [c.start_in_seconds for c in cues]
    assert starts == sorted(starts) and starts[0] == 0
    assert all(1 <= c.end_in_seconds - c.start_in_seconds <= 10 for c in cues)
    by_id = {int(c.identifier): html.unescape(c.text) for c in cues}
    assert by_id[ids[3]] == "[door] <b>bold</b> & --> arrow"
    assert by_id[ids[4]] == "[yard] NOTE not a note\n00:00:01.000 --> 00:00:02.000\nfake cue"
    assert by_id[ids[-1]] == "[yard] ALERT car ON: held for 2 s"
    one = list(webvtt.from_buffer(io.StringIO(_export(store, "vtt", stream="yard"))))
    assert html.unescape(one[0].text) == "a red car, parked"        # one stream: no prefix
    with pytest.raises(HistoryError, match="jsonl, csv, vtt"):
        export(store, "xml", io.StringIO())


def test_retention_prunes_events_older_than_the_days_and_counts_them(store):
    now = T0 + 30 * 86400
    for days in (10, 5, 4, 1, 0):
        store.add_caption(caption(f"caption from {days} days ago", t=30 * 86400 - days * 86400))
    store.add_alert(AlertEvent("old", "ON", 0, "yard", now - 6 * 86400, "held"))
    assert store.prune(retention_days=4.5, now=now) == 3
    assert [r["text"] for r in store.list()] == ["caption from 4 days ago", "caption from 1 days ago",
                                                 "caption from 0 days ago"]
    assert store.search("caption days") and not store.search("old")   # the index follows the deletes
    assert store.prune(retention_days=4.5, now=now) == 0
    assert store.prune(retention_days=0, now=now) == 0   # 0: no limit
    with pytest.raises(HistoryError, match="retention-days"):
        store.prune(retention_days=-1)


def test_size_limit_prunes_the_oldest_first_and_counts_them(store):
    rng = np.random.default_rng(7)
    for i in range(60):
        store.add_caption(caption(f"noisy frame number {i}", t=i, frame=rng.integers(0, 256, (360, 640, 3), np.uint8)))
    before = store.used_bytes()
    assert before > 256 * 1024, "thumbnails of noise should take room"
    removed = store.prune(max_mb=0.125)
    left = store.list(limit=1000)
    assert removed == 60 - len(left) and 0 < removed < 60
    assert store.used_bytes() <= 0.125 * 1024 * 1024
    assert [r["text"] for r in left] == [f"noisy frame number {i}" for i in range(removed, 60)]   # the newest kept
    assert store.prune(max_mb=0.125) == 0
    page_count = store._conn.execute("PRAGMA page_count").fetchone()[0]
    free = store._conn.execute("PRAGMA freelist_count").fetchone()[0]
    assert free <= page_count // 10, "freed pages are handed back (incremental vacuum)"


def test_four_threads_write_one_file_at_once_without_locking_errors(tmp_path):
    path = tmp_path / "h.sqlite3"
    shared = HistoryStore(path)
    errors = []

    def write(index: int, own: bool) -> None:
        try:
            store = HistoryStore(path) if own else shared
            for i in range(40):
                store.add_caption(caption(f"stream {index} caption {i}", t=i, stream=index, name=f"cam{index}"))
            if own:
                store.close()
        except Exception as exc:   # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i, i % 2 == 0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert shared.count() == 160
    assert len(shared.search("caption", stream="cam2", limit=100)) == 40
    shared.close()


def test_a_folder_that_cannot_be_made_is_a_sentence(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(HistoryError, match=r"cannot create the folder .* --history PATH, or turn history off "
                                           r"with --no-history"):
        HistoryStore(tmp_path / "file" / "history.sqlite3")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_sentence(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(HistoryError, match="read-only path.*--history PATH"):
            HistoryStore(folder / "history.sqlite3")
    finally:
        folder.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_path_where_no_file_can_be_made_is_a_sentence():
    with pytest.raises(HistoryError, match="history database /proc/self/history.sqlite3.*--no-history"):
        HistoryStore("/proc/self/history.sqlite3")


def test_a_newer_schema_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "h.sqlite3"
    HistoryStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(HistoryError, match="written by a newer vision-host .schema 7; this one reads up to 1.: "
                                           "upgrade vision-host"):
        HistoryStore(path)


def test_other_files_are_refused_with_a_sentence(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is no database at all" * 100)
    with pytest.raises(HistoryError, match="is not a SQLite database"):
        HistoryStore(junk)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(HistoryError, match="holds tables but no vision-host history"):
        HistoryStore(other)


def test_reopening_keeps_the_events_and_settings_are_checked(tmp_path):
    path = tmp_path / "h.sqlite3"
    with HistoryStore(path) as store:
        first = store.add_caption(caption("a red car"))
    with HistoryStore(path) as store:
        assert [h["id"] for h in store.search("red")] == [first]
        with pytest.raises(HistoryError, match="1 to 100000"):
            store.list(limit=0)
    with pytest.raises(HistoryError, match="is closed"):
        store.add_caption(caption("late"))
    with pytest.raises(HistoryError, match="16 to 1024"):
        HistoryStore(path, thumbnail_px=8)


def test_times_are_durations_before_now_or_iso_8601():
    now = T0
    assert parse_when("2h", now) == now - 7200
    assert parse_when("30m", now) == now - 1800
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("90s", now) == now - 90
    assert parse_when("1.5h", now) == now - 5400
    assert parse_when("2026-12-01T00:00:00Z") == T0
    assert parse_when("2026-12-01T02:00:00+02:00") == T0
    assert parse_when("2026-12-01T00:00:00.500Z") == T0 + 0.5
    assert isinstance(parse_when("2026-12-01"), float)
    for bad in ("yesterday", "2x", "-2h", "", "2026-13-01"):
        with pytest.raises(HistoryError, match="duration before now .90s, 30m, 2h, 7d. or an ISO 8601 time"):
            parse_when(bad, now)


def test_the_default_path_is_under_the_users_data_directory(monkeypatch, tmp_path):
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
        assert default_history_path() == tmp_path / "vision-host" / "history.sqlite3"
        monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert default_history_path() == tmp_path / ".local" / "share" / "vision-host" / "history.sqlite3"
    else:
        assert default_history_path().parts[-2:] == ("vision-host", "history.sqlite3")


def test_a_read_only_store_reads_while_a_writer_writes_and_changes_nothing(tmp_path):
    path = tmp_path / "h.sqlite3"
    with pytest.raises(HistoryError, match="no caption history at"):
        HistoryStore(path, read_only=True)
    assert not path.exists()
    with HistoryStore(path) as writer:
        writer.add_caption(caption("a red car"))
        with HistoryStore(path, read_only=True) as reader:
            assert [h["text"] for h in reader.search("car")] == ["a red car"]
            writer.add_caption(caption("a second red car", t=1))
            assert len(reader.search("car")) == 2        # sees each commit
            with pytest.raises(HistoryError, match="open read-only"):
                reader.add_caption(caption("not stored"))
            with pytest.raises(HistoryError, match="open read-only"):
                reader.prune(retention_days=1, now=T0 + 10 * 86400)
    with HistoryStore(path, read_only=True) as reader:   # no writer left
        assert reader.count() == 2
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(HistoryError, match="holds no vision-host history"):
        HistoryStore(other, read_only=True)
