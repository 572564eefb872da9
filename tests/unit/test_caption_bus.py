"""The caption bus: one event a caption, to every subscriber; per-stream timelines; failures contained."""

import logging
import threading

import pytest

from vision_host.captions import CaptionBus, CaptionEvent, CaptionStats, CaptionSubscriber, SubtitleStreamTrack, open_track


def _event(text: str, stream: int = 0, t: float = 1.0, latency_ms: float | None = 40.0) -> CaptionEvent:
    return CaptionEvent(text, t, 1_700_000_000.0 + t, round(t * 30), "camera", model="llava", latency_ms=latency_ms,
                        stream=stream)


class _Recorder(CaptionSubscriber):
    def __init__(self):
        self.calls = []

    def add(self, event):
        self.calls.append(("add", event.stream, event.text))

    def tick(self, stream_time_s):
        self.calls.append(("tick", stream_time_s))

    def gap(self, stream_time_s, reason, wall_time=None):
        self.calls.append(("gap", stream_time_s, reason))

    def resume(self, stream_time_s, wall_time=None):
        self.calls.append(("resume", stream_time_s))

    def close(self, end_time_s=None):
        self.calls.append(("close", end_time_s))


def test_a_stream_subscriber_gets_its_stream_and_timeline_an_everyone_subscriber_every_caption():
    bus = CaptionBus()
    door, yard, everyone = _Recorder(), _Recorder(), _Recorder()
    bus.subscribe(door, stream=0)
    bus.subscribe(yard, stream=1)
    bus.subscribe(everyone)
    bus.publish(_event("a person", stream=0))
    bus.tick(0, 1.5)
    bus.gap(1, 2.0, "reconnecting")
    bus.publish(_event("a cat", stream=1))
    bus.resume(1, 2.0)
    bus.end_stream(0, 3.0)
    bus.publish(_event("late", stream=0))        # its subscribers are gone
    bus.close()
    assert door.calls == [("add", 0, "a person"), ("tick", 1.5), ("close", 3.0)]
    assert yard.calls == [("gap", 2.0, "reconnecting"), ("add", 1, "a cat"), ("resume", 2.0), ("close", None)]
    assert everyone.calls == [("add", 0, "a person"), ("add", 1, "a cat"), ("add", 0, "late"), ("close", None)]
    assert bus.published == 3


def test_ticks_reach_subscribers_that_join_or_leave_while_the_stream_runs():
    """tick sees the stream's subscribers as they are at each tick (one joining, one leaving),
    and its list leaves out a subscriber that does not override tick."""
    class Quiet(CaptionSubscriber):        # takes captions, no tick of its own
        def __init__(self):
            self.added = 0

        def add(self, event):
            self.added += 1
    bus = CaptionBus()
    quiet, early, late = Quiet(), _Recorder(), _Recorder()
    bus.subscribe(quiet, stream=0)
    bus.subscribe(early, stream=0)
    bus.tick(0, 0.1)
    bus.subscribe(late, stream=0)
    bus.tick(0, 0.2)
    bus.unsubscribe(early)
    bus.tick(0, 0.3)
    bus.publish(_event("a dog"))
    assert early.calls == [("tick", 0.1), ("tick", 0.2)]
    assert late.calls == [("tick", 0.2), ("tick", 0.3), ("add", 0, "a dog")]
    assert quiet.added == 1 and bus.failures == 0
    assert bus._tickers[0][1] == (late,)          # quiet, whose tick is the base no-op, is not called


def test_a_failing_subscriber_is_logged_once_and_the_others_still_get_every_event(caplog):
    class Broken(CaptionSubscriber):
        def add(self, event):
            raise OSError(28, "No space left on device")

    bus = CaptionBus()
    bus.subscribe(Broken(), stream=0)
    after = bus.subscribe(_Recorder(), stream=0)
    with caplog.at_level(logging.WARNING, logger="vision_host.captions.bus"):
        for text in ("one", "two", "three"):
            bus.publish(_event(text))
    assert [c[2] for c in after.calls] == ["one", "two", "three"]
    assert bus.failures == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Broken" in warnings[0] and "No space left" in warnings[0]


def test_only_caption_subscribers_can_subscribe():
    class Duck:
        def add(self, event):
            pass

    with pytest.raises(TypeError, match="CaptionSubscriber"):
        CaptionBus().subscribe(Duck())


def test_subscribing_while_streams_publish_loses_no_event():
    bus = CaptionBus()
    counts = [bus.subscribe(CaptionStats(), stream=i) for i in range(4)]
    reached, resume = threading.Barrier(5), threading.Barrier(5)   # the four streams and this thread

    def publish(stream):
        for n in range(2000):
            if n == 1000:               # halfway: wait for the first subscriber
                reached.wait()
                resume.wait()
            bus.publish(_event(f"{stream}:{n}", stream=stream))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    reached.wait()
    first = bus.subscribe(_Recorder())   # before the second half: it must get all of it
    resume.wait()
    late = [bus.subscribe(_Recorder()) for _ in range(50)]   # while the streams publish
    for t in threads:
        t.join()
    assert [c.snapshot().completed for c in counts] == [2000] * 4
    # from the moment it subscribed, a subscriber got every event of every stream, in order: per
    # stream, a run of consecutive numbers that ends with the last one published
    for r in [first, *late]:
        for stream in range(4):
            got = [int(text.split(":")[1]) for _, i, text in r.calls if i == stream]
            assert not got or got == list(range(got[0], 2000)), (stream, got[:5])
    for stream in range(4):
        assert [c for c in first.calls if c[1] == stream] == [("add", stream, f"{stream}:{n}") for n in range(1000, 2000)]


def test_caption_stats_keeps_count_last_text_and_latency():
    stats = CaptionStats()
    assert stats.snapshot().completed == 0 and stats.snapshot().last is None
    stats.add(_event("first", latency_ms=120.0))
    stats.add(_event("second", t=4.0, latency_ms=None))
    snap = stats.snapshot()
    assert (snap.completed, snap.last, snap.last_latency_ms, snap.last_wall_time) == (2, "second", None, 1_700_000_004.0)


def test_a_file_track_on_the_bus_writes_the_stream_timeline(tmp_path):
    bus = CaptionBus()
    track = bus.subscribe(open_track(tmp_path / "c.vtt"), stream=2)
    bus.publish(_event("a red car", stream=2, t=1.0))
    bus.publish(_event("not this stream", stream=0, t=1.5))
    bus.gap(2, 2.0, "reconnecting")
    bus.resume(2, 2.0)
    bus.end_stream(2, 6.0)
    assert track.closed
    assert (tmp_path / "c.vtt").read_text() == "WEBVTT\n\n00:00:01.000 --> 00:00:02.000\na red car\n\n"


def test_the_subtitle_stream_track_needs_no_file():
    cues = []
    track = SubtitleStreamTrack(lambda start, end, text: cues.append((start, end, text)))
    assert track.path is None
    track.add(_event("a red car", t=1.0))
    track.add(_event("a blue car", t=3.0))
    track.close(5.0)
    assert track.closed and cues == [(1.0, 3.0, "a red car"), (3.0, 5.0, "a blue car")]


def test_frames_are_wanted_only_while_a_subscriber_asks_and_alerts_reach_stream_and_everyone():
    from vision_host.captions import AlertEvent as _  # noqa: F401  (exported)
    from vision_host.captions.bus import CaptionBus, CaptionSubscriber
    from vision_host.captions.event import AlertEvent

    class Plain(CaptionSubscriber):
        def __init__(self):
            self.alerts = []

        def add(self, event):
            pass

        def alert(self, event):
            self.alerts.append(event)

    class Framed(Plain):
        wants_frames = True

    bus = CaptionBus()
    plain, framed, other = Plain(), Framed(), Plain()
    bus.subscribe(plain)
    assert bus.frames_wanted is False
    bus.subscribe(framed, stream=1)
    bus.subscribe(other, stream=2)
    assert bus.frames_wanted is True
    edge = AlertEvent(name="door", state="ON", stream=1, stream_name="front", wall_time=0.0, reason="matched")
    bus.publish_alert(edge)
    assert plain.alerts == [edge] and framed.alerts == [edge] and other.alerts == []
    assert bus.alerts_published == 1
    bus.end_stream(1)
    assert bus.frames_wanted is False
