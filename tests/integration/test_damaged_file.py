"""A video file damaged in the middle, or cut short, through `vision-host run`.

The damaged copies are made here from media/bottle-detection.mp4 (640×360, 1189 frames at
29.83 fps, H.264 with a keyframe every 250 frames): one with two stretches of its ``mdat`` box
overwritten with random bytes (about 20 frames of one GOP, and the packets around the keyframe
at frame 750), one rewritten with its ``moov`` box first (as ``-movflags +faststart`` does) and
then cut at 60 % of its bytes, so its index is whole but its tail is gone.

What FFmpeg makes of them (measured with ``ffprobe -count_frames`` of FFmpeg 5.1, and with
the FFmpeg 8 inside opencv-python 4.14, which agree): 1161 frames of the damaged copy, 732 of
the truncated one. Before vision-host read past damage, a run of the damaged copy
ended at frame 524 with exit status 0 and nothing said.
"""

from __future__ import annotations

import json
import logging
import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest

from conftest import SAMPLE_CLIP, needs_ffprobe
from vision_host.cli import main
from vision_host.sources import FileSource

CLIP_FRAMES = 1189


# -- making damaged copies ----------------------------------------------------------------------
def _boxes(data: bytes | bytearray, start: int = 0, end: int | None = None):
    """(type, offset, header length, size) of each MP4 box between ``start`` and ``end``."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
        elif size == 0:
            size = end - at
        yield kind, at, header, size
        at += size


def _garble(data: bytes, offset: int, length: int, seed: int) -> bytes:
    """``data`` with ``length`` bytes at ``offset`` replaced by (seeded) random bytes."""
    damaged = bytearray(data)
    damaged[offset:offset + length] = random.Random(seed).randbytes(length)
    return bytes(damaged)


def _moov_first(data: bytes) -> bytes:
    """The MP4 ``data`` with its ``moov`` box moved before ``mdat`` (chunk offsets moved along),
    so that cutting the file's end leaves an index that still opens."""
    top = list(_boxes(data))
    _, at, _, size = next(b for b in top if b[0] == b"moov")
    mdat = next(b for b in top if b[0] == b"mdat")[1]
    assert at > mdat, "the clip's moov already comes first"
    moov = bytearray(data[at:at + size])

    def shift(start: int, end: int) -> None:
        for kind, at, header, size in _boxes(moov, start, end):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift(at + header, at + size)
            elif kind in (b"stco", b"co64"):
                fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
                for i in range(struct.unpack(">I", moov[at + 12:at + 16])[0]):
                    p = at + 16 + i * width
                    moov[p:p + width] = struct.pack(fmt, struct.unpack(fmt, moov[p:p + width])[0] + len(moov))

    shift(8, len(moov))
    before = b"".join(data[a:a + s] for k, a, _, s in top if a < mdat)
    after = b"".join(data[a:a + s] for k, a, _, s in top if a >= mdat and k != b"moov")
    return before + bytes(moov) + after


def make_damaged(path: Path) -> Path:
    """A copy of the clip with two stretches of its mdat box overwritten (4000 bytes 41 % in,
    8000 bytes 60 % in)."""
    data = SAMPLE_CLIP.read_bytes()
    _, at, header, size = next(b for b in _boxes(data) if b[0] == b"mdat")
    payload = at + header
    for offset, length, seed in ((199_952, 4000, 7), (293_952, 8000, 8)):
        assert offset + length < size - header
        data = _garble(data, payload + offset, length, seed)
    path.write_bytes(data)
    return path


def make_truncated(path: Path) -> Path:
    """A moov-first copy of the clip cut at 60 % of its bytes (the tail of its mdat is gone)."""
    data = _moov_first(SAMPLE_CLIP.read_bytes())
    path.write_bytes(data[:int(len(data) * 0.6)])
    return path


def ffprobe_frames(path: Path) -> int:
    """Frames FFmpeg decodes from ``path`` (``ffprobe -count_frames``)."""
    out = subprocess.run(["ffprobe", "-v", "quiet", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return int(out.strip())


# -- running them -------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    rc: int
    stats: dict
    warnings: list[str]
    stderr: str
    written: int      # frames in the output file


def _run(path: Path, out_dir: Path, capsys) -> Run:
    out, stats_path = out_dir / f"{path.stem}-out.mp4", out_dir / f"{path.stem}-stats.json"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("vision_host.sources")
    logger.addHandler(handler)
    try:
        rc = main(["run", "-p", "hello", "-s", str(path), "-o", "file", "-d", str(out), "--no-pace",
                   "--stats", str(stats_path)])
    finally:
        logger.removeHandler(handler)
    stderr = capsys.readouterr().err
    cap = cv2.VideoCapture(str(out))
    written = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    return Run(path, rc, json.loads(stats_path.read_text()), [r.getMessage() for r in records], stderr, written)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(kind)``: the run of the ``"damaged"``, ``"truncated"`` or ``"clean"`` clip, each
    made (and run) once for this module."""
    tmp = tmp_path_factory.mktemp("damaged")
    made: dict[str, Run] = {}

    def get(kind: str, capsys) -> Run:
        if kind not in made:
            path = {"damaged": lambda: make_damaged(tmp / "damaged.mp4"),
                    "truncated": lambda: make_truncated(tmp / "truncated.mp4"),
                    "clean": lambda: SAMPLE_CLIP}[kind]()
            made[kind] = _run(path, tmp, capsys)
        return made[kind]
    return get


@pytest.mark.slow
def test_a_file_damaged_midway_is_read_past_the_damage_and_the_loss_counted(runs, capsys):
    run = runs("damaged", capsys)
    stats = run.stats
    assert run.rc == 0, run.stderr
    # the damage costs about 30 frames; before, the run stopped at the first damaged frame (524)
    assert CLIP_FRAMES - 40 <= stats["frames_out"] < CLIP_FRAMES, stats
    assert stats["frames_in"] == stats["frames_out"] == run.written
    assert stats["frames_undecodable"] > 0
    assert stats["frames_out"] + stats["frames_undecodable"] == CLIP_FRAMES   # every frame accounted for
    assert stats["source_error"] is None
    damaged = [m for m in run.warnings if "is damaged at frame" in m]
    assert len(damaged) == 1, run.warnings                                    # once, at the first damage
    assert f"{run.path.name} is damaged at frame 524:" in damaged[0], damaged
    assert f"{stats['frames_undecodable']} frames could not be decoded" in run.stderr   # the summary says so


@pytest.mark.slow
def test_a_truncated_file_says_it_could_not_be_read_to_its_end(runs, capsys):
    run = runs("truncated", capsys)
    stats = run.stats
    assert stats["source_error"] is not None, stats
    assert f"{run.path.name} could not be read past frame" in stats["source_error"]
    assert f"of {CLIP_FRAMES}: the rest of the file is damaged" in stats["source_error"]
    # 60 % of the bytes hold about 62 % of the frames
    assert 650 <= stats["frames_out"] <= 760, stats
    assert stats["frames_out"] == run.written
    assert stats["frames_undecodable"] == CLIP_FRAMES - stats["frames_out"]
    assert any(stats["source_error"] in m for m in run.warnings), run.warnings
    assert stats["source_error"] in run.stderr
    assert run.rc != 0, "a file that could not be read to its end fails the run"


@pytest.mark.slow
@needs_ffprobe
@pytest.mark.parametrize("kind", ["damaged", "truncated"])
def test_as_many_frames_are_written_as_ffmpeg_decodes(runs, capsys, kind):
    run = runs(kind, capsys)
    decodable = ffprobe_frames(run.path)
    # measured: exactly as many (1161 of the damaged copy, 732 of the truncated one); before, the
    # run ended at the first failed read (524 and 730 frames)
    assert decodable - 1 <= run.stats["frames_out"] <= decodable, (run.stats["frames_out"], decodable)


@pytest.mark.slow
def test_an_undamaged_clip_has_no_undecodable_frames_and_no_source_error(runs, capsys):
    run = runs("clean", capsys)
    assert run.rc == 0, run.stderr
    assert run.stats["frames_out"] == CLIP_FRAMES
    assert run.stats["frames_undecodable"] == 0 and run.stats["source_error"] is None
    assert not run.warnings
    assert "could not be decoded" not in run.stderr and "source error" not in run.stderr


@pytest.mark.slow
def test_the_source_stays_ended_and_counts_skipped_frames_as_it_goes(tmp_path, caplog):
    path = make_damaged(tmp_path / "damaged.mp4")
    source = FileSource(str(path), pace=False)
    try:
        read = 0
        while source.read() is not None:
            read += 1
            if read == 600:                                  # past the first damage, before the second
                assert 0 < source.frames_undecodable < 10 and source.source_error is None
        assert source.ended and source.source_error is None
        assert read + source.frames_undecodable == CLIP_FRAMES
        warnings = len(caplog.records)
        assert source.read() is None and source.read() is None     # it stays ended, and says nothing more
        assert len(caplog.records) == warnings
    finally:
        source.close()
