"""H.264 recording through PyAV (RecordingOutput): files, segments, subtitle tracks.

Every test writes real frames of media/bottle-detection.mp4 (640×360, 29.83
frames/s) and reads the result back with PyAV; one test also asks ffprobe.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

av = pytest.importorskip("av")

from conftest import SAMPLE_CLIP as BOTTLE, needs_ffprobe  # noqa: E402
from vision_host.outputs import encoding, recording  # noqa: E402
from vision_host.outputs import FileOutput, OutputError, RecordingOutput, make_output  # noqa: E402

N_FRAMES = 150


_BITS, _CELL = 8, 16  # frame-number stamp: 8 black/white cells of 16×16 px along the top-left edge


def stamp(frame: np.ndarray, number: int) -> np.ndarray:
    """``frame`` with ``number`` (0..255) drawn as a binary stamp in its top-left corner (in place)."""
    for bit in range(_BITS):
        frame[:_CELL, bit * _CELL:(bit + 1) * _CELL] = 255 if number >> bit & 1 else 0
    return frame


def stamped_number(frame: np.ndarray) -> int:
    """The number :func:`stamp` drew into a (decoded) frame."""
    return sum(1 << bit for bit in range(_BITS) if frame[4:12, bit * _CELL + 4:bit * _CELL + 12].mean() > 128)


@pytest.fixture(scope="module")
def clip() -> tuple[list[np.ndarray], float]:
    """The first 150 frames (360×640×3 uint8 BGR) of the bottle clip, each stamped with its index, and the fps.

    The clip barely moves, so the stamp is what tells frames apart.
    """
    cap = cv2.VideoCapture(str(BOTTLE))
    assert cap.isOpened(), f"cannot read {BOTTLE}"
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while len(frames) < N_FRAMES:
        ok, frame = cap.read()
        assert ok, f"{BOTTLE} has fewer than {N_FRAMES} frames"
        frames.append(stamp(frame, len(frames)))
    cap.release()
    return frames, fps


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two same-shaped uint8 images, in grey levels (0..255)."""
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def record(path: Path, frames: list[np.ndarray], fps: float, **kwargs) -> RecordingOutput:
    """Write ``frames`` through a RecordingOutput at ``fps`` and close it."""
    out = RecordingOutput(path, **kwargs)
    h, w = frames[0].shape[:2]
    out.open(w, h, fps)
    for f in frames:
        out.write(f)
    out.close()
    return out


class Probe:
    """What PyAV reads back from a video file.

    Attributes:
        codec: the video codec name, e.g. ``"h264"``.
        fps: the video stream's average frame rate (frames/s).
        size: ``(width, height)`` px.
        frames: decoded frames, H×W×3 uint8 BGR.
        key_frames: for each decoded frame, whether it is a keyframe.
        duration_s: the video stream's duration in seconds (frame count / fps for our files).
        subtitle_codec: the subtitle stream's codec name, or None without one.
        cues: ``(start_s, end_s, text)`` of every non-empty subtitle packet.
    """

    def __init__(self, path: Path) -> None:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            self.codec = video.codec_context.name
            self.fps = float(video.average_rate)
            self.size = (video.codec_context.width, video.codec_context.height)
            self.subtitle_codec = None
            if container.streams.subtitles:
                sub = container.streams.subtitles[0]
                # PyAV names the codec after its decoder: FFmpeg's "srt" decoder reads codec id subrip
                self.subtitle_codec = {"srt": "subrip"}.get(sub.codec.name, sub.codec.name)
            self.frames, self.key_frames, pts = [], [], []
            for frame in container.decode(video):
                self.frames.append(frame.to_ndarray(format="bgr24"))
                self.key_frames.append(frame.key_frame)
                pts.append(frame.time)
            self.duration_s = (max(pts) - min(pts)) + 1 / self.fps if pts else 0.0
            self.first_pts_s = min(pts) if pts else None
            self.cues = []
            if self.subtitle_codec:
                container.seek(0)
                for packet in container.demux(container.streams.subtitles[0]):
                    if packet.size == 0 or packet.pts is None:
                        continue
                    payload = bytes(packet)
                    if self.subtitle_codec == "mov_text":  # 16-bit big-endian length, then UTF-8 text
                        n = int.from_bytes(payload[:2], "big")
                        text = payload[2:2 + n].decode("utf-8")
                    else:
                        text = payload.decode("utf-8")
                    if text:
                        start = float(packet.pts * packet.time_base)
                        self.cues.append((start, start + float(packet.duration * packet.time_base), text))


# --------------------------------------------------------------------------- video


@pytest.mark.slow
@pytest.mark.parametrize("name", ["out.mp4", "out.mkv"])
def test_h264_file_has_every_frame_at_the_source_rate(tmp_path, clip, name):
    frames, fps = clip
    frames = frames[:120]
    path = tmp_path / "new" / "dir" / name  # missing folders are created
    out = record(path, frames, fps)
    assert out.paths == [path] and out.frames_written == 120
    assert out.encoded_size == (640, 360)
    assert name in out.describe() and "h264" in out.describe()
    back = Probe(path)
    assert back.codec == "h264"
    assert back.size == (640, 360)
    assert back.fps == pytest.approx(fps, abs=0.01)
    assert len(back.frames) == 120
    assert back.duration_s == pytest.approx(120 / fps, abs=0.5 / fps)
    assert back.key_frames[0]
    diffs = [mad(a, b) for a, b in zip(back.frames, frames)]
    assert max(diffs) < 10.0, f"decoded frames differ from the written ones: max MAD {max(diffs):.1f}"
    assert [stamped_number(f) for f in back.frames] == list(range(120)), "frames lost, repeated or out of order"


def test_mp4_is_faststart(tmp_path, clip):
    frames, fps = clip
    path = tmp_path / "fast.mp4"
    record(path, frames[:30], fps)
    head = path.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat")), (
        "the moov index must come before the media data (movflags=+faststart)"
    )


def test_odd_sizes_lose_the_last_row_and_column(tmp_path, clip):
    frames, fps = clip
    odd = [cv2.resize(f, (641, 361), interpolation=cv2.INTER_AREA) for f in frames[:20]]
    path = tmp_path / "odd.mp4"
    out = record(path, odd, fps)
    assert out.size == (641, 361) and out.encoded_size == (640, 360)
    back = Probe(path)
    assert back.size == (640, 360) and len(back.frames) == 20
    assert max(mad(a, b[:360, :640]) for a, b in zip(back.frames, odd)) < 10.0


def test_frames_of_another_size_are_resized(tmp_path, clip):
    frames, fps = clip
    out = RecordingOutput(tmp_path / "small.mkv")
    out.open(320, 180, fps)
    for f in frames[:10]:
        out.write(f)
    out.close()
    back = Probe(tmp_path / "small.mkv")
    assert back.size == (320, 180) and len(back.frames) == 10
    assert mad(back.frames[5], cv2.resize(frames[5], (320, 180), interpolation=cv2.INTER_AREA)) < 10.0


@pytest.mark.parametrize("size", [(640, 360), (641, 361)], ids=["even", "odd"])
def test_the_encoder_thread_encodes_the_buffer_write_filled(tmp_path, clip, size):
    """write() makes the one copy of a frame, into a buffer that is a video frame's own pixels
    (cropped to an even size): the encoder thread encodes it as it is, and the canvas the frame
    loop's own frames are copied into is never written."""
    frames, fps = clip
    frames = [f if f.shape[1::-1] == size else cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames[:40]]
    out = RecordingOutput(tmp_path / "queued.mp4")
    out.open(*size, fps)
    out._canvas[...] = 7
    for f in frames:
        out.write(f)
    out.close()
    assert (out._canvas == 7).all()
    back = Probe(tmp_path / "queued.mp4")
    assert back.size == (640, 360) and len(back.frames) == 40
    assert max(mad(a, b[:360, :640]) for a, b in zip(back.frames, frames)) < 10.0
    assert [stamped_number(f) for f in back.frames] == list(range(40)), "frames lost, repeated or out of order"


def test_caller_may_reuse_the_frame_buffer(tmp_path, clip):
    frames, fps = clip
    path = tmp_path / "reuse.mp4"
    out = RecordingOutput(path)
    out.open(640, 360, fps)
    buf = np.empty_like(frames[0])
    for f in frames[:30]:
        buf[...] = f
        out.write(buf)
    buf[...] = 0  # scribbling over the buffer after write() must not change the file
    out.close()
    back = Probe(path)
    assert max(mad(a, b) for a, b in zip(back.frames, frames[:30])) < 10.0


def test_a_slow_encoder_never_holds_up_write_until_it_is_queued_frames_behind(tmp_path, clip):
    """write() hands the frame to the encoder thread and returns; it waits only when
    QUEUED_FRAMES frames wait already (no frame is dropped), and the file has every frame in order."""
    frames, fps = clip
    out = RecordingOutput(tmp_path / "slow.mp4")
    out.open(640, 360, fps)
    gate, taken = threading.Event(), threading.Event()
    encode = out._append

    def held_encode(frame):          # the real encoder, held back until the test opens the gate
        taken.set()
        gate.wait(30)
        encode(frame)
    out._append = held_encode
    for f in frames[:recording.QUEUED_FRAMES + 1]:    # one taken by the encoder, the rest queued
        out.write(f)
    assert taken.wait(10)
    assert out.frames_written == recording.QUEUED_FRAMES + 1 and out.frames_encoded == 0
    assert out._free.empty(), "every buffer is queued or encoding: the next write() must wait"
    blocked = threading.Thread(target=out.write, args=(frames[recording.QUEUED_FRAMES + 1],))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive(), "write() did not wait for the encoder with QUEUED_FRAMES frames queued"
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    for f in frames[recording.QUEUED_FRAMES + 2:40]:
        out.write(f)
    out.close()
    assert out.frames_encoded == 40
    assert [stamped_number(f) for f in Probe(out.path).frames] == list(range(40))


def test_an_encoder_failure_is_raised_by_the_next_write_and_the_file_before_it_is_kept(tmp_path, clip):
    """The next segment's file cannot be opened (a folder holds its name): the encoder thread
    fails there, the next write() raises an OutputError naming it, the output is closed for the
    pipeline, close() does not raise it again, and the first segment is complete."""
    frames, _ = clip
    path = tmp_path / "out.mp4"
    (tmp_path / "out-001.mp4").mkdir()
    out = RecordingOutput(path, segment_seconds=1.0)
    out.open(640, 360, 10.0)
    for f in frames[:10]:                  # the first segment: 10 frames at 10 frames/s
        out.write(f)
    out.write(frames[10])                  # starts the second segment, on the encoder thread
    assert out.wait_encoded(11)
    assert out.closed, "the pipeline is not told to stop"
    with pytest.raises(OutputError, match="out-001.mp4"):
        out.write(frames[11])
    with pytest.raises(OutputError, match="failed at frame 10 .*holds the frames before it"):
        out.write(frames[12])
    out.close()                            # reported already: no second error
    assert [stamped_number(f) for f in Probe(tmp_path / "out-000.mp4").frames] == list(range(10))


# --------------------------------------------------------------------------- segments


@pytest.mark.slow
def test_segments_roll_every_n_seconds_and_each_plays_alone(tmp_path, clip):
    frames, _ = clip
    path = tmp_path / "rec" / "out.mp4"
    out = record(path, frames, 30.0, segment_seconds=2)
    names = ["out-000.mp4", "out-001.mp4", "out-002.mp4"]
    assert [p.name for p in out.paths] == names
    assert sorted(p.name for p in path.parent.iterdir()) == names, "no file under the plain destination name"
    assert "out-NNN.mp4" in out.describe() and "every 2 s" in out.describe()
    counts = []
    for i, p in enumerate(out.paths):
        back = Probe(p)
        assert back.codec == "h264" and back.fps == pytest.approx(30.0)
        assert back.key_frames[0], f"{p.name} does not start with a keyframe"
        assert back.first_pts_s == pytest.approx(0.0, abs=1e-3), f"{p.name} does not start at time 0"
        numbers = [stamped_number(f) for f in back.frames]
        assert numbers == list(range(60 * i, 60 * i + len(numbers))), f"{p.name} holds the wrong frames"
        assert max(mad(a, frames[n]) for a, n in zip(back.frames, numbers)) < 10.0
        counts.append(len(back.frames))
    assert counts == [60, 60, 30] and sum(counts) == N_FRAMES


def test_segment_length_is_counted_in_video_time(tmp_path, clip):
    frames, _ = clip
    out = record(tmp_path / "out.mkv", frames[:25], 10.0, segment_seconds=1.0)
    assert [p.name for p in out.paths] == ["out-000.mkv", "out-001.mkv", "out-002.mkv"]
    assert [len(Probe(p).frames) for p in out.paths] == [10, 10, 5]


# --------------------------------------------------------------------------- subtitles


@pytest.mark.slow
@pytest.mark.parametrize(("name", "codec"), [("subs.mp4", "mov_text"), ("subs.mkv", "subrip")])
def test_subtitle_cues_are_muxed_into_the_file(tmp_path, clip, name, codec):
    frames, fps = clip
    path = tmp_path / name
    out = RecordingOutput(path, subtitles=True)
    out.open(640, 360, fps)
    for i, f in enumerate(frames):
        out.write(f)
        if i == 80:  # captions arrive seconds after the frames they describe
            assert out.add_subtitle(0.5, 1.5, "a green bottle")
            assert out.add_subtitle(1.2, 2.0, "überlappend: starts at 1.5")  # overlaps: starts at the previous end
            assert not out.add_subtitle(1.0, 1.4, "covered by earlier cues")  # dropped
            assert not out.add_subtitle(2.0, 2.0, "empty span")
            assert not out.add_subtitle(2.0, 3.0, "   ")
        if i == 120:
            assert out.add_subtitle(3.0, 99.0, "a hand\nreaches in")  # may outlast the video
    out.close()
    assert (out.cues_written, out.cues_dropped) == (3, 3)
    assert not out.add_subtitle(4.0, 5.0, "after close")
    back = Probe(path)
    assert back.subtitle_codec == codec
    assert len(back.frames) == N_FRAMES, "subtitles must not cost video frames"
    assert [c[2] for c in back.cues] == ["a green bottle", "überlappend: starts at 1.5", "a hand\nreaches in"]
    expected = [(0.5, 1.5), (1.5, 2.0), (3.0, 99.0)]
    for (start, end, _), (want_start, want_end) in zip(back.cues, expected):
        assert start == pytest.approx(want_start, abs=0.002) and end == pytest.approx(want_end, abs=0.002)


@pytest.mark.slow
def test_cues_go_to_the_segment_holding_their_start(tmp_path, clip, monkeypatch):
    frames, _ = clip
    monkeypatch.setattr(recording, "_CUE_GRACE_S", 1.0)  # a finished segment takes late cues for 1 s of video
    path = tmp_path / "seg.mkv"
    out = RecordingOutput(path, segment_seconds=2, subtitles=True)
    out.open(640, 360, 30.0)
    for i, f in enumerate(frames):
        out.write(f)
        if i == 64:  # segment 1 started at frame 60; segment 0 is still open for late cues
            assert out.add_subtitle(1.5, 2.5, "end clipped at 2 s")
            assert out.add_subtitle(2.25, 3.0, "in segment 1")
            assert not out.add_subtitle(4.5, 5.0, "ahead of the video: its file has not started")
        if i == 100:  # frame 90 was segment 0's last chance
            assert not out.add_subtitle(1.9, 2.0, "too late for segment 0")
    out.close()
    assert len(out.paths) == 3
    cues = [Probe(p).cues for p in out.paths]
    assert [[c[2] for c in seg] for seg in cues] == [["end clipped at 2 s"], ["in segment 1"], []]
    assert cues[0][0][:2] == pytest.approx((1.5, 2.0), abs=0.002)
    assert cues[1][0][:2] == pytest.approx((0.25, 1.0), abs=0.002), "times are relative to the segment's start"
    assert all(Probe(p).subtitle_codec == "subrip" for p in out.paths)


def test_add_subtitle_needs_subtitles_and_finite_times(tmp_path):
    out = RecordingOutput(tmp_path / "x.mp4")
    with pytest.raises(RuntimeError, match="subtitles=True"):
        out.add_subtitle(0, 1, "x")
    out = RecordingOutput(tmp_path / "y.mp4", subtitles=True)
    with pytest.raises(ValueError):
        out.add_subtitle(float("nan"), 1, "x")


@needs_ffprobe
def test_ffprobe_sees_h264_and_the_subtitle_stream(tmp_path, clip):
    frames, fps = clip
    path = tmp_path / "probe.mp4"
    out = RecordingOutput(path, subtitles=True)
    out.open(640, 360, fps)
    for f in frames[:60]:
        out.write(f)
    out.add_subtitle(0.2, 1.0, "hello")
    out.close()
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    streams = {s["codec_type"]: s for s in json.loads(proc.stdout)["streams"]}
    assert streams["video"]["codec_name"] == "h264"
    assert streams["video"]["pix_fmt"] == "yuv420p"
    assert int(streams["video"]["nb_read_frames"]) == 60
    assert Fraction(streams["video"]["avg_frame_rate"]) == pytest.approx(fps, abs=0.01)
    assert streams["subtitle"]["codec_name"] == "mov_text"


# --------------------------------------------------------------------------- factory, fallback, errors


def test_make_output_picks_the_codec(tmp_path, clip):
    frames, fps = clip
    default = make_output("file", str(tmp_path / "a.mp4"))
    assert isinstance(default, RecordingOutput) and isinstance(default, FileOutput)
    seg = make_output("file", str(tmp_path / "b.mkv"), codec="H264", segment_seconds=5, subtitles=True)
    assert isinstance(seg, RecordingOutput) and seg.segment_seconds == 5 and seg.subtitles
    cv = make_output("file", str(tmp_path / "c.mp4"), codec="mp4v")
    assert type(cv) is FileOutput
    cv.open(640, 360, fps)
    for f in frames[:30]:
        cv.write(f)
    cv.close()
    back = Probe(tmp_path / "c.mp4")
    assert back.codec == "mpeg4" and len(back.frames) == 30
    assert max(mad(a, b) for a, b in zip(back.frames, frames)) < 10.0
    with pytest.raises(OutputError, match="h264, mp4v"):
        make_output("file", str(tmp_path / "d.mp4"), codec="vp9")
    with pytest.raises(OutputError, match="leave out the mp4v codec"):
        make_output("file", str(tmp_path / "e.mp4"), codec="mp4v", subtitles=True)


def test_without_pyav_file_falls_back_to_opencv_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(encoding, "import_av", lambda: None)
    monkeypatch.setattr(recording, "_warned_no_pyav", False)
    with caplog.at_level(logging.WARNING, logger=recording.log.name):
        first = make_output("file", str(tmp_path / "a.mp4"))
        second = make_output("file", str(tmp_path / "b.mp4"), codec="h264")
    assert type(first) is FileOutput and type(second) is FileOutput
    warnings = [r for r in caplog.records if "PyAV is not installed" in r.getMessage()]
    assert len(warnings) == 1 and "pip install" in warnings[0].getMessage()
    with pytest.raises(OutputError, match="pip install"):
        make_output("file", str(tmp_path / "c.mp4"), segment_seconds=10)
    with pytest.raises(OutputError, match="pip install"):
        RecordingOutput(tmp_path / "d.mp4")


def test_unwritable_destinations_raise_output_error(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    missing = blocker / "sub" / "out.mp4"
    with pytest.raises(OutputError, match="cannot be created") as info:
        RecordingOutput(missing).open(640, 360, 30)
    assert str(missing.parent) in str(info.value)
    a_dir = tmp_path / "a-directory.mp4"
    a_dir.mkdir()
    with pytest.raises(OutputError, match="give a writable file path") as info:
        RecordingOutput(a_dir).open(640, 360, 30)
    assert str(a_dir) in str(info.value)
    with pytest.raises(OutputError, match=r"ending in \.mp4 or \.mkv"):
        RecordingOutput(tmp_path / "out.avi")
    with pytest.raises(ValueError):
        RecordingOutput(tmp_path / "out.mp4", segment_seconds=0)


def test_life_cycle_errors(tmp_path, clip):
    frames, _ = clip
    out = RecordingOutput(tmp_path / "x.mp4")
    with pytest.raises(RuntimeError):
        out.write(frames[0])
    out.open(640, 360, float("nan"))  # unknown rate: 30 frames/s
    assert out.fps == 30.0
    with pytest.raises(RuntimeError):
        out.open(640, 360, 30)
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        out.write(np.zeros((360, 640), np.uint8))
    out.write(frames[0])
    out.close()
    out.close()  # idempotent
    assert out.closed
    with pytest.raises(RuntimeError):
        out.write(frames[0])
    assert len(Probe(tmp_path / "x.mp4").frames) == 1


@pytest.mark.slow
def test_write_cost_per_frame(tmp_path, clip, capsys):
    """Median ms per write() for 640×360 back to back (the encoder thread's pace once its queue
    is full): H.264 (PyAV) vs mp4v (OpenCV); printed with -s."""
    frames, fps = clip

    def median_ms(out) -> float:
        out.open(640, 360, fps)
        times = []
        for f in frames:
            t0 = time.perf_counter()
            out.write(f)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out.close()
        close_ms = (time.perf_counter() - t0) * 1e3
        return float(np.median(times) * 1e3), close_ms

    h264, h264_close = median_ms(RecordingOutput(tmp_path / "h.mp4"))
    mp4v, mp4v_close = median_ms(FileOutput(tmp_path / "m.mp4"))
    with capsys.disabled():
        print(f"\nwrite() 640x360 median: h264 {h264:.2f} ms (close {h264_close:.0f} ms),"
              f" mp4v {mp4v:.2f} ms (close {mp4v_close:.0f} ms)")
    assert h264 < 30.0
