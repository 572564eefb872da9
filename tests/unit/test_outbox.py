"""The delivery outbox: order, the bound, replace, restart, shared files, threads, unusable files."""

import logging
import os
import sqlite3
import threading

import pytest

from vision_host.sinks.outbox import Outbox, OutboxError, OutboxMessage, default_outbox_path


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "outbox.sqlite3"


def _payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.peek(10_000)]


def test_messages_come_back_oldest_first_and_leave_when_removed(path):
    box = Outbox(path, "webhook")
    stored = [box.put("caption", b"m%d" % i) for i in range(5)]
    assert len(box) == 5 and bool(box)
    peeked = box.peek(3)
    assert [m.payload for m in peeked] == [b"m0", b"m1", b"m2"]
    assert peeked[0] == stored[0] and isinstance(peeked[0], OutboxMessage)
    assert len({m.message_id for m in stored}) == 5 and all(len(m.message_id) == 32 for m in stored)
    box.attempted(peeked[0].row_id)
    box.attempted(peeked[0].row_id)
    assert box.peek(1)[0].attempts == 2
    box.remove(peeked[0].row_id)
    box.remove(peeked[0].row_id)             # gone already: no-op
    assert _payloads(box) == [b"m1", b"m2", b"m3", b"m4"]
    assert len(box) == 4
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.put("caption", b"late")


def test_given_ids_retain_and_time_are_kept(path):
    box = Outbox(path, "mqtt")
    m = box.put("vision-host/door/alert/person", b"ON", message_id="abc", retain=True)
    (back,) = box.peek()
    assert back == m and back.message_id == "abc" and back.retain is True and back.attempts == 0
    assert abs(back.created - m.created) < 1e-6 and back.created > 1.7e9
    box.close()


def test_past_the_bound_the_oldest_are_dropped_counted_and_logged_once_per_burst(path, caplog):
    box = Outbox(path, "webhook", max_messages=3)
    with caplog.at_level(logging.WARNING, logger="vision_host.sinks.outbox"):
        for i in range(7):
            box.put("caption", b"m%d" % i)
        assert _payloads(box) == [b"m4", b"m5", b"m6"]
        assert box.dropped == 4
        full = [r for r in caplog.records if "is full for" in r.getMessage()]
        assert len(full) == 1                                    # once when the burst starts
        box.remove(box.peek(1)[0].row_id)                        # delivered: the burst ends, its total is logged
        totals = [r for r in caplog.records if "dropped 4 oldest" in r.getMessage()]
        assert len(totals) == 1
        box.put("caption", b"m7")                                # room again: nothing dropped
        box.put("caption", b"m8")                                # a new burst
        assert box.dropped == 5 and _payloads(box) == [b"m6", b"m7", b"m8"]
        box.close()
    assert len([r for r in caplog.records if "is full for" in r.getMessage()]) == 2
    assert any("dropped 1 oldest" in r.getMessage() for r in caplog.records)


def test_replace_keeps_only_the_latest_of_a_topic_without_counting_drops(path):
    box = Outbox(path, "mqtt")
    box.put("snap", b"jpeg-1", replace=True)
    box.put("caption", b"c1")
    box.put("snap", b"jpeg-2", replace=True)
    box.put("snap", b"jpeg-3", replace=True)
    assert [(m.topic, m.payload) for m in box.peek()] == [("caption", b"c1"), ("snap", b"jpeg-3")]
    assert box.dropped == 0
    box.close()


def test_a_restart_sees_what_was_pending_in_order(path):
    box = Outbox(path, "webhook")
    for i in range(4):
        box.put("caption", b"m%d" % i, message_id=f"id{i}")
    box.remove(box.peek(1)[0].row_id)
    box.close()
    again = Outbox(path, "webhook")
    assert [(m.message_id, m.payload) for m in again.peek()] == [("id1", b"m1"), ("id2", b"m2"), ("id3", b"m3")]
    newer = again.put("caption", b"m4")
    assert newer.row_id > again.peek()[-2].row_id and _payloads(again)[-1] == b"m4"
    again.close()


def test_row_ids_are_never_reused_after_the_queue_empties(path):
    box = Outbox(path, "webhook")
    first = box.put("caption", b"a")
    box.remove(first.row_id)
    box.close()
    box = Outbox(path, "webhook")
    assert box.put("caption", b"b").row_id > first.row_id
    box.close()


def test_two_sinks_share_one_file_each_seeing_its_own_queue(path):
    hook, mqtt = Outbox(path, "webhook:a"), Outbox(path, "mqtt", max_messages=2)
    hook.put("caption", b"h1")
    for i in range(3):
        mqtt.put("t", b"q%d" % i)
    hook.put("caption", b"h2")
    assert _payloads(hook) == [b"h1", b"h2"] and len(hook) == 2 and hook.dropped == 0
    assert _payloads(mqtt) == [b"q1", b"q2"] and mqtt.dropped == 1
    hook.remove(mqtt.peek(1)[0].row_id)          # another sink's row: not this sink's to remove
    assert len(mqtt) == 2
    hook.close()
    mqtt.close()
    again = Outbox(path, "webhook:a")
    assert _payloads(again) == [b"h1", b"h2"]
    again.close()


def test_four_threads_put_at_once_on_one_outbox_and_on_four(path):
    common = Outbox(path, "common")
    own = [Outbox(path, f"own-{n}") for n in range(4)]
    errors = []

    def work(n):
        try:
            for i in range(50):
                common.put("t", b"%d-%d" % (n, i))
                own[n].put("t", b"%d" % i)
        except Exception as exc:                 # e.g. sqlite3's "database is locked"
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(common) == 200
    for n in range(4):
        mine = [p for p in _payloads(common) if p.startswith(b"%d-" % n)]
        assert mine == [b"%d-%d" % (n, i) for i in range(50)]          # each thread's puts in its order
        assert _payloads(own[n]) == [b"%d" % i for i in range(50)]
    for box in (common, *own):
        box.close()


def test_a_directory_that_cannot_be_made_is_an_error_sentence(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    with pytest.raises(OutboxError, match=r"cannot create the directory of the delivery outbox .*not-a-dir.*writable"):
        Outbox(blocker / "outbox.sqlite3", "webhook")


def test_a_path_that_is_a_directory_or_not_a_database_is_an_error_sentence(tmp_path):
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(OutboxError, match=r"cannot open the delivery outbox .*dir\.sqlite3.*choose another outbox file"):
        Outbox(tmp_path / "dir.sqlite3", "webhook")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is no SQLite file, just text " * 200)
    with pytest.raises(OutboxError, match=r"junk\.sqlite3.*move that file away"):
        Outbox(junk, "webhook")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to read-only directories anyway")
def test_a_read_only_directory_is_an_error_sentence(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutboxError, match=r"delivery outbox .*ro.*writable"):
            Outbox(ro / "outbox.sqlite3", "webhook")
    finally:
        ro.chmod(0o700)


def test_a_read_only_file_is_an_error_sentence_on_write(path):
    Outbox(path, "webhook").close()
    box = Outbox(path, "webhook")
    box._conn.close()
    box._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    with pytest.raises(OutboxError, match=r"cannot write to the delivery outbox .*writable"):
        box.put("caption", b"x")
    box.close()


def test_bad_arguments_are_refused(path):
    with pytest.raises(ValueError, match="bound"):
        Outbox(path, "webhook", max_messages=0)
    with pytest.raises(ValueError, match="sink name"):
        Outbox(path, "")
    box = Outbox(path, "webhook")
    with pytest.raises(TypeError, match="bytes"):
        box.put("caption", "text")
    with pytest.raises(ValueError, match="peek"):
        box.peek(0)
    box.close()


def test_the_default_path_follows_xdg_on_linux(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_outbox_path() == tmp_path / "xdg" / "vision-host" / "outbox.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_outbox_path() == tmp_path / "home" / ".local" / "share" / "vision-host" / "outbox.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_outbox_path() == tmp_path / "home" / ".local" / "share" / "vision-host" / "outbox.sqlite3"
