"""Video files: :class:`FileOutput` (mp4v through OpenCV) and :class:`RecordingOutput`
(H.264 through PyAV, with segments and muxed subtitles), and :func:`make` for ``-o file``."""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from . import FILE_CODECS, encoding
from .base import LIVE_OUTPUTS, Output, OutputError, check_frame, frame_rate_or_default

__all__ = ["FileOutput", "RecordingOutput", "encoder_thread_pays", "make"]

log = logging.getLogger("vision_host.outputs")

_warned_no_pyav = False  # make() said once that it writes mp4v because PyAV is missing

#: Frames a file output holds for its encoder thread besides the one being encoded: the frame
#: loop runs on while they wait, and waits itself only when the encoder is this far behind.
QUEUED_FRAMES = 2


def encoder_thread_pays(streams: int) -> bool:
    """Whether the file outputs of a run of ``streams`` streams should encode on threads of
    their own: when this process may use more cores than there are streams. Otherwise every core
    already runs a frame loop and its decoder, and a thread per output only adds a frame copy and
    two thread switches per frame (measured by ``vision-host bench --streams 4`` on 2 cores:
    600 frames/s for the four streams with encoder threads, 700 without)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return streams < cores


class FileOutput(Output):
    """Write frames to an MP4 file with :class:`cv2.VideoWriter` (fourcc ``mp4v``).

    The file plays at the source frame rate given to :meth:`open` (30 frames/s
    when that is ≤ 0 or NaN). Frames whose size differs from the one given to
    :meth:`open` are resized (``cv2.INTER_AREA``) so every frame in the file
    has the same size. :meth:`close` releases the writer, which finalizes the
    MP4; a file that was never closed is not playable.

    With ``encoder_thread`` (the default), encoding runs on a thread of its
    own, so the frame loop never waits on the encoder unless it falls
    :data:`QUEUED_FRAMES` frames behind (then :meth:`write` waits for it: no
    frame is dropped). :meth:`write` copies the frame into one of
    ``QUEUED_FRAMES + 1`` reused buffers; an encoder error is raised by the
    next :meth:`write` or by :meth:`close`. Without it, :meth:`write` encodes
    (see :func:`encoder_thread_pays` for when each is faster).

    Subclasses (:class:`RecordingOutput`) keep :meth:`open`, :meth:`write` and
    :meth:`close` and replace the three steps ``_start()``, ``_append(frame)``
    (on the encoder thread; :attr:`frames_encoded` is the frame's number) and
    ``_finish()``.

    Args:
        path: the ``.mp4`` file to create or overwrite; missing folders are created.
        encoder_thread: encode on a thread of the output's own.

    Attributes:
        fps: frames/s of the file (after :meth:`open`).
        size: ``(width, height)`` px given to :meth:`open`.
        frames_written: frames given to :meth:`write`.
        frames_encoded: frames the encoder thread has taken so far.
        paths: the files written so far (``[path]`` once opened).

    Raises:
        OutputError: from :meth:`open` when the folder cannot be created or
            the file cannot be opened for writing; from :meth:`write` or
            :meth:`close` when the encoder failed.
    """

    FOURCC = "mp4v"

    def __init__(self, path: str | os.PathLike[str], *, encoder_thread: bool = True) -> None:
        self.path = Path(path)
        self.encoder_thread = encoder_thread
        self.fps = 0.0
        self.size: tuple[int, int] = (0, 0)  # (width, height) px
        self.frames_written = 0
        self.frames_encoded = 0
        self.paths: list[Path] = []
        self.closed = False
        self._opened = False
        self._writer: cv2.VideoWriter | None = None
        self._free: queue.SimpleQueue = queue.SimpleQueue()      # buffers write() may fill
        self._queued: queue.SimpleQueue = queue.SimpleQueue()    # filled buffers, None: the end
        self._encoder: threading.Thread | None = None
        self._encoded = threading.Condition()                    # notified at each frame encoded
        self._failure: BaseException | None = None               # the encoder's error
        self._failure_reported = False                           # raised by write() or close() once
        self._failed_at = 0                                      # the number of the frame that failed

    def describe(self) -> str:
        """E.g. ``MP4 file out.mp4 (mp4v, 29.83 fps)``."""
        fps = f", {self.fps:.2f} fps" if self.fps else ""
        return f"MP4 file {self.path} ({self.FOURCC}{fps})"

    def open(self, width: int, height: int, fps: float) -> None:
        """Start the file for ``width``×``height`` px at ``fps`` frames/s.

        Raises:
            OutputError: the parent directory cannot be created, or the file does not open.
            RuntimeError: already opened.
        """
        if self._opened:
            raise RuntimeError(f"{type(self).__name__}.open() called twice")
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: the folder {parent} cannot be created "
                              f"({exc.strerror}); pick another -d path") from None
        self.fps = frame_rate_or_default(fps)
        self.size = (int(width), int(height))
        self._start()
        self._opened = True
        if not self.encoder_thread:
            return
        for _ in range(QUEUED_FRAMES + 1):
            self._free.put(self._new_buffer())
        self._encoder = threading.Thread(target=self._encode, name="vision-host-file-encoder", daemon=True)
        self._encoder.start()
        LIVE_OUTPUTS.add(self)    # stopped before interpreter exit: an FFmpeg encoder must not be cut off

    def write(self, frame: np.ndarray) -> None:
        """Append one H×W×3 uint8 BGR frame, resized to the open() size if needed (a copy is
        queued for the encoder thread; the caller may reuse ``frame`` at once).

        Raises:
            ValueError: not an H×W×3 uint8 array.
            RuntimeError: before :meth:`open` or after :meth:`close`.
            OutputError: the encoder failed on an earlier frame (the file stops there).
        """
        if self._failure is not None:
            self._raise_failure()
        if not self._opened:
            raise RuntimeError(f"{type(self).__name__}.write() needs open() first and no close() before it")
        check_frame(frame)
        w, h = self.size
        if self._encoder is None:
            if frame.shape[0] != h or frame.shape[1] != w:
                frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            self._append(frame)
            self.frames_written += 1
            self.frames_encoded += 1
            return
        buffer = self._free.get()       # waits only while the encoder is QUEUED_FRAMES frames behind
        if self._failure is not None:
            self._free.put(buffer)
            self._raise_failure()
        bh, bw = buffer.shape[:2]                # the open() size, or a crop of it (see _new_buffer)
        if frame.shape[0] == h and frame.shape[1] == w:
            np.copyto(buffer, frame[:bh, :bw])   # the one copy
        elif (bh, bw) == (h, w) and buffer.flags.c_contiguous:
            cv2.resize(frame, (w, h), dst=buffer, interpolation=cv2.INTER_AREA)
        else:
            np.copyto(buffer, cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)[:bh, :bw])
        self._queued.put(buffer)
        self.frames_written += 1

    def close(self) -> None:
        """Encode the frames still queued and finalize the file(s). Idempotent.

        Raises:
            OutputError: the encoder failed and no :meth:`write` has said so yet.
        """
        self.closed = True
        encoder, self._encoder = self._encoder, None
        if encoder is not None:
            self._queued.put(None)
            encoder.join()
            LIVE_OUTPUTS.discard(self)
        if self._opened:
            self._opened = False
            self._finish()
        if self._failure is not None and not self._failure_reported:
            self._raise_failure()

    def wait_encoded(self, frames: int, timeout_s: float = 10.0) -> bool:
        """Wait until the encoder thread has taken ``frames`` frames (or failed, or ended);
        False when it has not within ``timeout_s`` s."""
        encoder = self._encoder
        with self._encoded:
            return self._encoded.wait_for(lambda: self.frames_encoded >= frames or self._failure is not None
                                          or encoder is None or not encoder.is_alive(), timeout_s)

    def _encode(self) -> None:
        """The encoder thread: ``_append`` each queued frame, in order, until the end mark; after
        a failure the frames still coming are not encoded (their buffers go back to :meth:`write`)."""
        while (buffer := self._queued.get()) is not None:
            try:
                if self._failure is None:
                    self._append(buffer)
            except BaseException as exc:   # noqa: BLE001 - raised to the caller by write()/close()
                self._failed_at = self.frames_encoded
                self._failure = exc
                self.closed = True          # the pipeline stops on its next frame
            finally:
                self._free.put(buffer)
                with self._encoded:
                    self.frames_encoded += 1
                    self._encoded.notify_all()

    def _raise_failure(self) -> None:
        """Raise the encoder's failure as an :class:`OutputError` (as it is, the first time, when
        it is one)."""
        failure, first = self._failure, not self._failure_reported
        self._failure_reported = True
        if first and isinstance(failure, OutputError):
            raise failure
        raise OutputError(f"encoding {self.path} failed at frame {self._failed_at} ({failure}): the recording "
                          f"holds the frames before it") from failure

    def _new_buffer(self) -> np.ndarray:
        """A buffer :meth:`write` copies a frame into for the encoder thread: H×W×3 uint8 of the
        open() size, or smaller (a frame's last rows and columns are then cropped)."""
        return np.empty((self.size[1], self.size[0], 3), np.uint8)

    def _start(self) -> None:
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.FOURCC), self.fps, self.size)
        if not writer.isOpened():
            writer.release()
            raise OutputError(
                f"cannot open {self.path} for writing as MP4 video: give a writable file path ending in .mp4"
            )
        self._writer = writer
        self.paths = [self.path]

    def _append(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def _finish(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.release()


_CONTAINERS = {".mp4": ("MP4", "mov_text"), ".mkv": ("Matroska", "subrip")}  # extension → (label, subtitle codec)
_CUE_TIME_BASE = Fraction(1, 1000)  # subtitle timestamps in ms
# How long (seconds of video) a finished segment stays open for late cues
# starting in it; captions arrive seconds after the frames they describe.
_CUE_GRACE_S = 10.0
# The text subtitle encoders refuse to open without an ASS header; this is
# FFmpeg's default style. For mov_text it becomes the tx3g sample description.
_ASS_HEADER = b"""[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, \
Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, \
MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""


class _Segment:
    """One open container: a file, its H.264 stream and its optional subtitle stream."""

    def __init__(self, path: Path, index: int, first_frame: int, end_frame: float) -> None:
        self.path = path
        self.index = index
        self.first_frame = first_frame  # frame number (from 0 over the whole recording) of its first frame
        self.end_frame = end_frame  # frame number that starts the next segment; inf when not segmenting
        self.container = None
        self.video = None
        self.subtitles = None
        self.cue_end = 0  # end of the last cue muxed, in _CUE_TIME_BASE ticks from the segment start


class RecordingOutput(FileOutput):
    """Record H.264 video (libx264, yuv420p) into ``.mp4`` or ``.mkv`` through PyAV.

    Encoding: preset ``veryfast``, CRF 23, frame rate = the ``fps`` given to
    :meth:`open`; frame *n* has pts *n* in a 1/fps time base, so the file plays
    at the source speed whatever the wall-clock timing was. ``.mp4`` files are
    written with ``movflags=+faststart`` (index at the front; rewritten at
    close). Colours are tagged BT.601 limited range, which is what the
    BGR→YUV conversion produces.

    Sizes: yuv420p needs an even width and height, so an odd-sized frame loses
    its last column and/or row (cropping keeps the other pixels exactly;
    padding would add a line, scaling would blur). :attr:`encoded_size` is the
    size in the file. As in :class:`FileOutput`, frames whose size differs from
    :meth:`open`'s are resized first.

    Per frame, :meth:`write` copies the frame once into a reused buffer; the
    encoder converts it to YUV (a new frame each time, so the buffer is free
    again when :meth:`write` returns) and encodes on its own threads.

    Segments: with ``segment_seconds``, a new file starts every
    ``round(segment_seconds * fps)`` frames (counted in video time, not wall
    time), named from ``path``: ``out.mp4`` → ``out-000.mp4``, ``out-001.mp4``,
    … Each segment has its own encoder, so it starts with a keyframe and plays
    on its own once finished. :attr:`paths` lists the files started so far.

    Subtitles: with ``subtitles=True`` the file(s) get a text subtitle stream
    (``mov_text`` in .mp4, ``subrip`` in .mkv), filled by :meth:`add_subtitle`.
    A finished segment stays open for cues for 10 s of video after its end
    (without subtitles it is finalized at once). :meth:`add_subtitle` may be
    called from another thread than :meth:`write`; a lock serializes them.
    FFmpeg's muxer holds up to 10 s of video packets while it waits for the
    sparse subtitle stream, so cues up to that late are still interleaved in
    time order in the file; later ones are muxed fine, just out of file order.

    Args:
        path: the ``.mp4`` or ``.mkv`` file to create or overwrite (the segment
            name pattern when segmenting); missing folders are created.
        segment_seconds: seconds of video per file, or None for one file.
        subtitles: add a subtitle stream for :meth:`add_subtitle`.
        encoder_thread: encode on a thread of the output's own (see :class:`FileOutput`).

    Attributes:
        encoded_size: ``(width, height)`` px in the file (after :meth:`open`).
        cues_written: cues muxed by :meth:`add_subtitle`.
        cues_dropped: cues that could not be placed (see :meth:`add_subtitle`).

    Raises:
        OutputError: from the constructor when PyAV is not installed or the
            extension is not .mp4/.mkv; from :meth:`open` when the folder or
            the file cannot be created.
        ValueError: ``segment_seconds`` is not a positive number.
    """

    FOURCC = "h264"

    def __init__(
        self, path: str | os.PathLike[str], *, segment_seconds: float | None = None, subtitles: bool = False,
        encoder_thread: bool = True,
    ) -> None:
        super().__init__(path, encoder_thread=encoder_thread)
        self._av = encoding.import_av()
        if self._av is None:
            raise OutputError(f"cannot record H.264 to {self.path}: {encoding.NO_PYAV_ADVICE}, or use the mp4v codec")
        kind = _CONTAINERS.get(self.path.suffix.lower())
        if kind is None:
            raise OutputError(f"cannot record H.264 to {self.path}: give a file path ending in .mp4 or .mkv")
        self._container_label, self._subtitle_codec = kind
        if segment_seconds is not None and not (math.isfinite(segment_seconds) and segment_seconds > 0):
            raise ValueError(f"segment_seconds must be a positive number of seconds, got {segment_seconds}")
        self.segment_seconds = segment_seconds
        self.subtitles = bool(subtitles)
        self.encoded_size: tuple[int, int] = (0, 0)
        self.cues_written = 0
        self.cues_dropped = 0
        self._segment_frames = 0  # frames per segment, 0 = one file
        self._grace_frames = 0
        self._rate = Fraction(30)
        self._seg: _Segment | None = None  # receives frames
        self._prev: _Segment | None = None  # finished, still open for late cues
        self._frame = None  # reused bgr24 av.VideoFrame of encoded_size
        self._canvas: np.ndarray | None = None  # H×W×3 view of _frame's pixels
        self._lock = threading.Lock()  # write() and add_subtitle() may run on different threads

    def describe(self) -> str:
        """E.g. ``MP4 file out.mp4 (h264, 29.83 fps, with subtitles)`` or ``MP4 files out-NNN.mp4 (…)``."""
        details = [self.FOURCC] + ([f"{self.fps:.2f} fps"] if self.fps else [])
        if self.segment_seconds:
            details.append(f"a new file every {self.segment_seconds:g} s")
        if self.subtitles:
            details.append("with subtitles")
        where = f"files {self._segment_path('NNN')}" if self.segment_seconds else f"file {self.path}"
        return f"{self._container_label} {where} ({', '.join(details)})"

    def add_subtitle(self, start_s: float, end_s: float, text: str) -> bool:
        """Show ``text`` from ``start_s`` to ``end_s`` (seconds of video: frame *n* is at *n*/fps).

        The cue goes to the segment containing ``start_s``, its times made
        relative to that segment's start and its end clipped at the segment's
        end. Cues may arrive late, after their frames were written. Within a
        file cues are kept in order and never overlap: a cue starting before
        the previous cue's end starts at that end instead, and is dropped when
        nothing is left of it. Also dropped (counted in :attr:`cues_dropped`,
        logged): empty text, a cue whose segment is finalized already or not
        started yet, and cues after :meth:`close`. Text longer than 65535 UTF-8
        bytes is cut.

        Returns:
            True when the cue was muxed.

        Raises:
            RuntimeError: the output was made without ``subtitles=True``.
            ValueError: ``start_s`` or ``end_s`` is not a finite number.
        """
        if not self.subtitles:
            raise RuntimeError("add_subtitle() needs RecordingOutput(..., subtitles=True)")
        if not (math.isfinite(start_s) and math.isfinite(end_s)):
            raise ValueError(f"cue times must be finite seconds, got {start_s!r}..{end_s!r}")
        utf8 = text.strip().encode("utf-8")[:0xFFFF].decode("utf-8", "ignore").encode("utf-8")
        payload = utf8
        if self._subtitle_codec == "mov_text":  # 3GPP timed text sample: 16-bit big-endian length, UTF-8 text
            payload = len(utf8).to_bytes(2, "big") + utf8
        start_s = max(0.0, start_s)
        first_frame = math.floor(start_s * self._rate + 1e-9)
        self.wait_encoded(min(first_frame + 1, self.frames_written))   # its segment opened, if written
        with self._lock:
            owners = [s for s in (self._seg, self._prev) if s and s.first_frame <= first_frame < s.end_frame]
            seg = owners[0] if owners else None
            if seg is None or not utf8 or end_s <= start_s:
                return self._drop_cue(start_s, end_s, "it is empty, or its file is finished or not started")
            seg_start_s = seg.first_frame / self._rate
            start = max(round((start_s - seg_start_s) / _CUE_TIME_BASE), seg.cue_end)
            end = round((min(end_s, seg.end_frame / self._rate) - seg_start_s) / _CUE_TIME_BASE)
            if end <= start:
                return self._drop_cue(start_s, end_s, "earlier cues cover it")
            packet = self._av.Packet(payload)
            packet.stream = seg.subtitles
            packet.time_base = _CUE_TIME_BASE
            packet.pts = packet.dts = start
            packet.duration = end - start
            seg.container.mux(packet)
            seg.cue_end = end
            self.cues_written += 1
            return True

    def _drop_cue(self, start_s: float, end_s: float, why: str) -> bool:
        self.cues_dropped += 1
        log.info("subtitle cue %.2f..%.2f s dropped: %s", start_s, end_s, why)
        return False

    def _segment_path(self, index: int | str) -> Path:
        if not self.segment_seconds:
            return self.path
        suffix = f"{index:03d}" if isinstance(index, int) else index
        return self.path.with_name(f"{self.path.stem}-{suffix}{self.path.suffix}")

    def _start(self) -> None:
        self.encoded_size = encoding.even_size(*self.size)
        self._rate = Fraction(self.fps).limit_denominator(1001)
        if self.segment_seconds:
            self._segment_frames = max(1, round(self.segment_seconds * self.fps))
        self._grace_frames = round(_CUE_GRACE_S * self.fps) if self.subtitles else 0
        self._frame, self._canvas = self._video_frame()
        self._buffer_frames = {}
        self.paths = []
        self._seg = self._open_segment(0, 0)

    def _video_frame(self):
        """A bgr24 ``av.VideoFrame`` of :attr:`encoded_size` and an H×W×3 view of its pixels."""
        frame = self._av.VideoFrame(*self.encoded_size, "bgr24")
        plane = frame.planes[0]
        w, h = self.encoded_size
        return frame, np.lib.stride_tricks.as_strided(np.frombuffer(plane, np.uint8), (h, w, 3), (plane.line_size, 3, 1))

    def _new_buffer(self) -> np.ndarray:
        """The pixels of a video frame of its own: the encoder thread encodes the buffer
        :meth:`write` filled as it is, with no second copy (:meth:`_append`)."""
        frame, pixels = self._video_frame()
        self._buffer_frames[id(pixels)] = (frame, pixels)
        return pixels

    def _open_segment(self, index: int, first_frame: int) -> _Segment:
        end_frame = first_frame + self._segment_frames if self._segment_frames else math.inf
        seg = _Segment(self._segment_path(index), index, first_frame, end_frame)
        av = self._av
        options = {"movflags": "+faststart"} if self.path.suffix.lower() == ".mp4" else {}
        try:
            seg.container = av.open(str(seg.path), "w", container_options=options)
            seg.video = encoding.add_h264_stream(seg.container, self._rate, self.encoded_size)
            if self.subtitles:
                seg.subtitles = seg.container.add_stream(self._subtitle_codec)
                seg.subtitles.time_base = _CUE_TIME_BASE
                seg.subtitles.codec_context.subtitle_header = _ASS_HEADER
            seg.container.start_encoding()  # opens the encoders and writes the header: errors surface here
        except (OSError, av.FFmpegError) as exc:
            if seg.container is not None:
                seg.container.close()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise OutputError(
                f"cannot open {seg.path} for writing as {self._container_label} video ({reason}): "
                "give a writable file path ending in .mp4 or .mkv"
            ) from None
        self.paths.append(seg.path)
        return seg

    def _append(self, frame: np.ndarray) -> None:
        n = self.frames_encoded
        with self._lock:
            if n >= self._seg.end_frame:  # roll: flush this file's video, start the next file
                done = self._seg
                done.container.mux(done.video.encode(None))
                if self._prev is not None:
                    self._prev.container.close()
                self._prev, self._seg = done, None
                try:
                    self._seg = self._open_segment(done.index + 1, n)
                except OutputError:
                    self.closed, self._opened = True, False  # the recording stops here; earlier files are kept
                    self._finish_locked()
                    raise
            if self._prev is not None and n >= self._prev.end_frame + self._grace_frames:
                self._prev.container.close()  # writes the trailer: that file is complete
                self._prev = None
            own = self._buffer_frames.get(id(frame))
            if own is not None and own[1] is frame:   # a buffer of the encoder thread's: encoded as it is
                video_frame = own[0]
            else:                                     # the frame loop's own frame: the one copy
                w, h = self.encoded_size
                self._canvas[...] = frame[:h, :w]     # crops an odd last row/column
                video_frame = self._frame
            video_frame.pts = n - self._seg.first_frame
            self._seg.container.mux(self._seg.video.encode(video_frame))

    def _finish(self) -> None:
        with self._lock:
            self._finish_locked()

    def _finish_locked(self) -> None:
        seg, prev = self._seg, self._prev
        self._seg = self._prev = None
        try:
            if seg is not None:
                seg.container.mux(seg.video.encode(None))
        finally:
            for s in (prev, seg):
                if s is not None:
                    s.container.close()


def make(destination: str | None, *, codec: str | None = None, segment_seconds: float | None = None,
         subtitles: bool = False, encoder_thread: bool = True, **_unused) -> FileOutput:
    """``-o file``: record to the path ``destination`` (required).

    ``codec="h264"`` (the default) records with :class:`RecordingOutput`, which also takes
    ``segment_seconds`` and ``subtitles``; ``codec="mp4v"`` writes with :class:`FileOutput`.
    ``encoder_thread`` goes to either.
    Without PyAV, ``h264`` falls back to ``mp4v`` with a warning (logged once). The other
    :func:`~vision_host.outputs.make_output` options do not apply.

    Raises:
        OutputError: no path, an unknown codec, segments or subtitles without PyAV or with
            ``mp4v``, or an extension the H.264 recorder does not write (not .mp4/.mkv).
    """
    global _warned_no_pyav
    if not destination:
        raise OutputError("-o file needs a file to write: add -d out.mp4")
    codec_norm = (codec or "h264").strip().lower()
    if codec_norm not in FILE_CODECS:
        raise OutputError(f"unknown codec {codec!r}: use one of {', '.join(FILE_CODECS)}")
    if codec_norm == "h264" and encoding.import_av() is None:
        if segment_seconds or subtitles:
            raise OutputError(f"segments and subtitles need H.264 recording: {encoding.NO_PYAV_ADVICE}")
        if not _warned_no_pyav:
            _warned_no_pyav = True
            log.warning("PyAV is not installed: writing mp4v with OpenCV instead of H.264; to record H.264, %s",
                        encoding.NO_PYAV_ADVICE)
        codec_norm = "mp4v"
    if codec_norm == "mp4v":
        if segment_seconds or subtitles:
            raise OutputError("segments and subtitles need H.264 recording: leave out the mp4v codec")
        return FileOutput(destination, encoder_thread=encoder_thread)
    return RecordingOutput(destination, segment_seconds=segment_seconds, subtitles=subtitles,
                           encoder_thread=encoder_thread)
