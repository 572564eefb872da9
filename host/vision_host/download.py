"""Downloading wasmVision's well-known processors and models (``vision-host download``).

The catalogue (:data:`CATALOGUE`) is a small table of the names wasmVision's ``download``
command knows: its processors (``guest/processors.go``) and models (``models/models.go``,
the style-transfer networks, YuNet, YOLO and the OpenCV zoo's networks), plus SFace (OpenCV
zoo, not in wasmVision's list). Each entry names the file it is saved as (the name
``wasm:cv/dnn`` looks up, see :data:`vision_host.runtime.dnn.KNOWN_MODELS`), where it is
published, and its sha256 where one is published:

- processors: wasmVision's repository at commit ``efb0077c`` (its ``dev`` branch, April 2025;
  wasmVision itself fetches ``raw/refs/heads/dev`` or ``raw/refs/tags/VERSION``). The URL is
  pinned to that commit so the file cannot change under its checksum; the sha256 is that of the
  file in that commit (Git content-addresses it).
- models on GitHub (``onnx/models`` at ``b1eeaa1a``, ``opencv/opencv_zoo`` at ``966be4cb``):
  those repositories keep the files in Git LFS, whose pointer files publish each file's sha256
  and size (``oid sha256:…``, ``size …``); the URLs are pinned to those commits.
- the YOLOv8 files on Hugging Face (``cabelo/yolov8``) have no checksum we could read:
  ``sha256`` is None, and the download prints the sha256 it computed and says it was not verified.

The downloader (:func:`download`) streams with ``requests`` into ``NAME.part`` next to the
destination, hashing as it writes; a later run resumes a ``.part`` with ``Range: bytes=N-``
when the server answers 206 (and starts again from zero on 200); the finished file is checked
and renamed into place atomically, and a checksum mismatch deletes it. Sizes are capped
(:data:`DEFAULT_MAX_BYTES`), connect and read times are bounded, and only ``http``/``https``
URLs without user names or passwords are fetched. Errors are :class:`DownloadError` with one
sentence naming the URL and what to do. Nothing here loads OpenCV or wasmtime.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple, TextIO
from urllib.parse import unquote, urlsplit

from .datadir import vision_host_data

__all__ = ["CATALOGUE", "DEFAULT_MAX_BYTES", "DownloadError", "DownloadResult", "Entry", "Progress",
           "check_url", "default_dir", "download", "entry_for_url", "find_entry"]

KINDS = ("processor", "model")

#: Largest file downloaded unless told otherwise (``--max-size``): 2 GiB.
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
#: Seconds to wait for the connection, and for each read from it (``--timeout``).
DEFAULT_CONNECT_TIMEOUT_S = 15.0
DEFAULT_READ_TIMEOUT_S = 60.0
#: Longest URL accepted, in characters.
MAX_URL_CHARS = 2048
#: Longest file name accepted (most file systems' limit), in bytes of UTF-8.
MAX_FILENAME_BYTES = 255
_CHUNK = 256 * 1024


class Entry(NamedTuple):
    """One catalogue entry (or a download given by URL).

    Attributes:
        kind: ``"processor"`` or ``"model"``.
        name: wasmVision's name for it (``asciify``, ``candy-9``, ``yunet_2023mar``).
        filename: the file it is saved as in the processors or models directory.
        url: where it is published (https).
        sha256: 64 lowercase hex digits, or None where no checksum is published.
        size: its size in bytes where published, else None.
        aliases: other names accepted for it (wasmVision's older names).
    """
    kind: str
    name: str
    filename: str
    url: str
    sha256: str | None
    size: int | None = None
    aliases: tuple[str, ...] = ()


_WV = "https://github.com/wasmvision/wasmvision/raw/efb0077c7711c487561b20166606e5a8af269843/processors"
_STYLE = ("https://github.com/onnx/models/raw/b1eeaa1ac722dcc1cd1a8284bde34393dab61c3d"
          "/validated/vision/style_transfer/fast_neural_style/model")
_ZOO = "https://github.com/opencv/opencv_zoo/raw/966be4cb6eefc2a4f586ed0581bf4bbaa2533070/models"
_YOLO = "https://huggingface.co/cabelo/yolov8/resolve/main"


def _processor(name: str, sha256: str, size: int) -> Entry:
    return Entry("processor", name, f"{name}.wasm", f"{_WV}/{name}.wasm", sha256, size)


def _style(name: str, sha256: str, size: int) -> Entry:
    return Entry("model", name, f"{name}.onnx", f"{_STYLE}/{name}.onnx", sha256, size)


def _zoo(name: str, filename: str, path: str, sha256: str, size: int, aliases: tuple[str, ...] = ()) -> Entry:
    return Entry("model", name, filename, f"{_ZOO}/{path}", sha256, size, aliases)


#: The well-known processors and models: name, file, published URL, sha256 (None: not published), size.
CATALOGUE: tuple[Entry, ...] = (
    _processor("asciify", "e9f7a367fb809d0f8336abc2e679ee9f9d79aff27375848f56c9e5dfa513a405", 3132),
    _processor("blur", "7f176e95b9afc8fa8f0f2ee796bfa4bf6488ddb17277b221adb8080f15d6f179", 1184),
    _processor("blurc", "5cf70a43cc5877feb21e144d2b9c4d549b14fcffc1328f60cd0a6bd52c01bd87", 13990),
    _processor("blurrs", "4418dc67651e693ac5e58f536555db983322002b2ace6940b3218f816f3373f6", 34328),
    _processor("captions", "95669e47aa389d7ebee5375022e7fdc07a7ff32870eff73ab4b747d67a90125d", 64731),
    _processor("edge-detect", "9cc110e775d5349fefd5f1a9177ab0a9f223bbb3fef0fda678ca0ea63e3469a9", 4982),
    _processor("face-counter", "19e03afa513e927a3a3c91befc5d2234f84139593c72eaf6117201c072f65145", 70065),
    _processor("face-expression", "c9d4b6fc358106d3a1849e4101cef3c3cea8570f537f18c4a0d528f73ba63d0c", 19727),
    _processor("faceblur", "9d429d8a9a07ae5b1d887bb5ec248f6d7ece9820ad5c621ced3d3a56664037c2", 4111),
    _processor("facedetectyn", "b6fd93afc84f078d98634737934d19d417af64ec1a80a6d3dc219a8a7f6bb630", 7344),
    _processor("gaussianblur", "1d920e648cd58d2165adedd73c6934c29e425d8dd4ba52c8a5ab891c8c758b30", 1007),
    _processor("hello", "41db9307abb1f139bb024538165fd087703e5ad26e9ef611936aab8e22b0b585", 3830),
    _processor("object-detector", "bf86b730f9c2dfca06240b941f02892a7b44fa63f408b8e6e6ed0de4f4015fa2", 20711),
    _processor("ollama", "2863dc15869c7c7debc7cea7f511b252792e805e2cc15998d6ab61126567939e", 14351),
    _processor("style-transfer", "3622c537d4cd446302ce113713f2c8beeb13bf0775998215869345e72cb333c9", 4974),
    _style("candy-9", "9d11a3529d1e547da6ae07201d93484dbab2ec0a3614535752c8f40f0fe2968a", 6728029),
    _style("candy-8", "e3c6f442e12014c5fec12b4307c14ca303df185cda19f67522afeef40c4d22b8", 6726529),
    _style("mosaic-9", "fa646dedade881243f8d5a2ceb7de2b93675b21fc24f7482894ac4851a9a0a47", 6728029),
    _style("mosaic-8", "8547ad01962f2709c2ca6732345c74d14cb1dd79c09c92365ac113cdb6c2eac5", 6726529),
    _style("pointilism-9", "5ee2b8d4d6bc60a777f54e0fe96a1b717360a004b79d56c67390d4a975b14d98", 6728029),
    _style("pointilism-8", "09fb31931c1826daf42552e451a908d068486a3ca946324a3ece758d51f46cad", 6726529),
    _style("rain-princess-9", "4162912e6f75fedef6f810ae989b9e10d3d5d43308dab34b027c850cf255e152", 6728029),
    _style("rain-princess-8", "bf13b623576021a77dab6aa54c366d0900e8f55909be27cf4a40248d6ff6e097", 6726529),
    _style("udnie-9", "8656b6ce7dec8f22ee13c2d557d6b67bd6f550dde88d0f2e7c9972aeb765cc0d", 6728029),
    _style("udnie-8", "31f8c5457a0d850b55564b018f6e494e49b3392c50eee6662799a47491b4a933", 6726529),
    _zoo("yunet_2023mar", "face_detection_yunet_2023mar.onnx",
         "face_detection_yunet/face_detection_yunet_2023mar.onnx",
         "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4", 232589,
         aliases=("face_detection_yunet_2023mar",)),
    _zoo("sface_2021dec", "face_recognition_sface_2021dec.onnx",
         "face_recognition_sface/face_recognition_sface_2021dec.onnx",
         "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79", 38696353,
         aliases=("face_recognition_sface_2021dec",)),
    *(Entry("model", f"yolov8{v}", f"yolov8{v}.onnx", f"{_YOLO}/yolov8{v}.onnx", None) for v in "nsmlx"),
    _zoo("yolox", "object_detection_yolox_2022nov.onnx", "object_detection_yolox/object_detection_yolox_2022nov.onnx",
         "c5c2d13e59ae883e6af3b45daea64af4833a4951c92d116ec270d9ddbe998063", 35858002),
    # wasmVision saves this one as face_… while the zoo's file is facial_… (kept: dnn looks up face_…)
    _zoo("mobilefacenet_2022july", "face_expression_recognition_mobilefacenet_2022july.onnx",
         "facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july.onnx",
         "4f61307602fc089ce20488a31d4e4614e3c9753a7d6c41578c854858b183e1a9", 4791892),
    _zoo("mobilefacenet_2022july_int8", "facial_expression_recognition_mobilefacenet_2022july_int8.onnx",
         "facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july_int8.onnx",
         "f0d7093aff10e2638c734c5f18a6a7eabd2b9239b20bdb9b8090865a6f69a1ed", 1364007),
    _zoo("mobilefacenet_2022july_int8bq", "facial_expression_recognition_mobilefacenet_2022july_int8bq.onnx",
         "facial_expression_recognition/facial_expression_recognition_mobilefacenet_2022july_int8bq.onnx",
         "0c3eaf9d0a7d442c0aa3beb3234243e1cdff9ad8871fb3cec346e90874caf57d", 1376702),
    _zoo("dexined_2024sep", "edge_detection_dexined_2024sep.onnx", "edge_detection_dexined/edge_detection_dexined_2024sep.onnx",
         "a50d01dc8481549c7dedb9eb3e0123b810a016520df75e4669a504609982cdd0", 47235563),
)

_HEX64 = re.compile(r"[0-9a-f]{64}")


class DownloadError(Exception):
    """A download failed or was refused; the message is one sentence naming the URL or file and
    what to do (exit status 1)."""


class DownloadResult(NamedTuple):
    """What :func:`download` did.

    Attributes:
        path: the file in place.
        size: its size in bytes.
        sha256: its sha256 (64 lowercase hex digits).
        verified: the sha256 matched a published one (False: none was given).
        resumed_from: bytes of an earlier ``.part`` kept (0: downloaded from the start).
        skipped: the file was already there and nothing was downloaded.
    """
    path: Path
    size: int
    sha256: str
    verified: bool
    resumed_from: int = 0
    skipped: bool = False


def find_entry(kind: str, name: str, catalogue: tuple[Entry, ...] | None = None) -> Entry | None:
    """The catalogue entry of ``kind`` called ``name`` (its name, an alias, or its file name,
    with or without the extension), or None."""
    for entry in CATALOGUE if catalogue is None else catalogue:
        if entry.kind == kind and name in (entry.name, *entry.aliases, entry.filename, Path(entry.filename).stem):
            return entry
    return None


def check_url(url: str) -> str:
    """``url`` if it may be fetched: http or https, a host, no user name or password, no spaces
    or control characters, at most :data:`MAX_URL_CHARS` characters.

    Raises:
        DownloadError: which rule it breaks, and what to do.
    """
    if len(url) > MAX_URL_CHARS:
        raise DownloadError(f"the URL is {len(url)} characters long, more than {MAX_URL_CHARS}: give a shorter URL")
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise DownloadError(f"the URL {url!r} contains spaces or control characters: percent-encode them (%20)")
    try:
        parts = urlsplit(url)
        _ = parts.port                 # a bad port raises here
    except ValueError as exc:
        raise DownloadError(f"{url} is not a valid URL ({exc}): give an http:// or https:// URL") from None
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"{url} is not an http:// or https:// URL: only those are downloaded")
    if not parts.hostname:
        raise DownloadError(f"{url} names no host: give a URL such as https://example.org/file.onnx")
    if "@" in parts.netloc:
        raise DownloadError(f"{url.split('//', 1)[0]}//…@{parts.hostname}: a URL with a user name or password "
                            f"is refused (it would be printed and stored in logs): remove the part before @")
    return url


def entry_for_url(kind: str, url: str, sha256: str | None = None) -> Entry:
    """An :class:`Entry` for a download given by URL: its file name is the last part of the
    URL's path (a processor's must end in ``.wasm``).

    Raises:
        DownloadError: the URL is refused (:func:`check_url`), names no usable file, or
            ``sha256`` is not 64 hex digits.
    """
    check_url(url)
    filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if (not filename or filename in (".", "..") or "/" in filename or "\\" in filename
            or re.search(r"[\x00-\x1f\x7f]", filename) or len(filename.encode()) > MAX_FILENAME_BYTES):
        raise DownloadError(f"{url} does not end in a usable file name: give the URL of the file itself "
                            f"(…/name.onnx or …/name.wasm)")
    if kind == "processor" and not filename.endswith(".wasm"):
        raise DownloadError(f"{url} does not name a .wasm file: a processor's URL ends in NAME.wasm")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _HEX64.fullmatch(sha256):
            raise DownloadError(f"--sha256 {sha256!r} is not a sha256: give its 64 hexadecimal digits")
    return Entry(kind, Path(filename).stem, filename, url, sha256)


def default_dir(kind: str) -> Path:
    """Where downloads of ``kind`` go unless ``--dir`` says otherwise: processors to
    ``$VISION_HOST_PROCESSORS_DIR`` when set (``run`` searches it), else the user's data
    directory / ``vision-host`` / ``processors``; models to the data directory /
    ``vision-host`` / ``models``."""
    if kind == "processor" and os.environ.get("VISION_HOST_PROCESSORS_DIR"):
        return Path(os.environ["VISION_HOST_PROCESSORS_DIR"])
    return vision_host_data("processors" if kind == "processor" else "models")


def _mib(n: float) -> str:
    return f"{n / 1024 ** 2:.1f} MiB" if n >= 1024 ** 2 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n:.0f} B"


class Progress:
    """A progress display on ``stream`` (default: standard error): a bar redrawn in place at most
    every ``interval_s`` on a terminal; elsewhere (a log, a pipe) one line each time another
    tenth is done, or every ``interval_s`` × 50 when the total is unknown.

    Args:
        label: what is downloaded (a name).
        stream: where to write.
        interval_s: least seconds between two redraws of the bar.
    """

    def __init__(self, label: str, stream: TextIO | None = None, interval_s: float = 0.1):
        self.label = re.sub(r"[\x00-\x1f\x7f]", "?", label)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.done = self.total = self._start_done = 0
        self._known = False
        self._last = 0.0
        self._tenth = -1
        self._t0 = time.monotonic()

    def start(self, done: int, total: int | None) -> None:
        """Begin at ``done`` bytes of ``total`` (None: unknown)."""
        self.done, self.total, self._known = done, total or 0, bool(total)
        self._t0 = self._last = time.monotonic()
        self._start_done = done
        self._tenth = self.done * 10 // self.total if self._known else -1
        if not self.tty:
            more = f" of {_mib(self.total)}" if self._known else ""
            self._line(f"{self.label}: downloading{' from ' + _mib(done) if done else ''}{more}")
        else:
            self._draw()

    def update(self, n: int) -> None:
        """``n`` more bytes were written."""
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last >= self.interval_s:
                self._last = now
                self._draw()
        elif self._known:
            tenth = min(10, self.done * 10 // self.total)
            if tenth > self._tenth and tenth < 10:
                self._tenth = tenth
                self._line(f"{self.label}: {tenth * 10}% ({_mib(self.done)} of {_mib(self.total)})")
        elif now - self._last >= self.interval_s * 50:
            self._last = now
            self._line(f"{self.label}: {_mib(self.done)}")

    def close(self) -> None:
        """The end: the bar at its final state and a newline, or a last line."""
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._line(f"{self.label}: {_mib(self.done)} done")

    def _rate(self) -> str:
        elapsed = time.monotonic() - self._t0
        return f"{_mib((self.done - self._start_done) / elapsed)}/s" if elapsed > 0.2 else ""

    def _draw(self) -> None:
        if self._known:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label} [{bar:<30}] {frac:4.0%} {_mib(self.done)}/{_mib(self.total)} {self._rate()}"
        else:
            text = f"\r{self.label} {_mib(self.done)} {self._rate()}"
        self.stream.write(text.ljust(79) if len(text) < 79 else text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path`` (64 lowercase hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes FIRST-LAST/TOTAL`` as (FIRST, TOTAL or None for ``*``), else None."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def download(url: str, dest: Path, *, sha256: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
             connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
             force: bool = False, progress: Progress | None = None, session=None) -> DownloadResult:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if one is there.

    Args:
        url: an http(s) URL (checked by :func:`check_url`); redirects are followed.
        dest: the file to write; its directory is created if missing.
        sha256: the expected sha256 (64 hex digits), or None to accept any content.
        max_bytes: refuse or stop a file larger than this many bytes (default 2 GiB).
        connect_timeout_s, read_timeout_s: the longest wait for the connection and for each read.
        force: download again even when ``dest`` exists, and drop any ``.part``.
        progress: where progress is shown (None: nowhere).
        session: a ``requests.Session`` to use (default: a new one).

    Returns:
        A :class:`DownloadResult`. An existing ``dest`` (without ``force``) is kept and
        reported as skipped when it matches ``sha256`` or none is given.

    Raises:
        DownloadError: the URL is refused; the server cannot be reached, times out, answers
            an error status or breaks off (the ``.part`` is kept for a later resume); the file
            is larger than ``max_bytes`` (the ``.part`` is deleted); the checksum does not match
            (the file is deleted); ``dest`` exists with other content (use ``force``); the
            directory cannot be written.
    """
    import requests

    check_url(url)
    if max_bytes < 1:
        raise DownloadError(f"the size limit must be at least 1 byte, not {max_bytes}")
    if connect_timeout_s <= 0 or read_timeout_s <= 0:
        raise DownloadError("timeouts must be greater than 0 seconds")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the directory {dest.parent} ({exc.strerror}): "
                            f"choose another with --dir") from None
    if dest.exists() and not force:
        if not dest.is_file():
            raise DownloadError(f"{dest} exists and is not a file: remove it or choose another directory with --dir")
        digest = file_sha256(dest)
        if sha256 is None or digest == sha256:
            return DownloadResult(dest, dest.stat().st_size, digest, sha256 is not None, skipped=True)
        raise DownloadError(f"{dest} already exists but its sha256 is {digest}, not the published {sha256}: "
                            f"run again with --force to replace it")
    if force:
        part.unlink(missing_ok=True)

    timeout = (connect_timeout_s, read_timeout_s)
    own = session is None
    session = session or requests.Session()
    try:
        for _attempt in range(2):       # the second only after the server refused the range (416)
            offset = part.stat().st_size if part.is_file() else 0
            if offset > max_bytes:
                part.unlink()
                offset = 0
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                resp = session.get(url, headers=headers, stream=True, timeout=timeout)
            except requests.exceptions.ConnectTimeout:
                raise DownloadError(f"cannot reach {url}: no connection within {connect_timeout_s:g} s (offline? "
                                    f"check the network, or raise --timeout)") from None
            except requests.exceptions.ConnectionError as exc:
                raise DownloadError(f"cannot reach {url} (offline? {_reason(exc)}): check the network and "
                                    f"run the command again") from None
            except requests.exceptions.Timeout:
                raise DownloadError(f"{url} sent nothing for {read_timeout_s:g} s: try again later, or raise "
                                    f"--timeout") from None
            except requests.exceptions.RequestException as exc:
                raise DownloadError(f"cannot download {url}: {_reason(exc)}") from None
            with resp:
                if resp.status_code == 416 and offset:
                    rng = _content_range(resp.headers.get("Content-Range", "").replace("*/", "0-0/"))
                    if rng and rng[1] == offset:        # the .part is the whole file already
                        return _finish(url, part, dest, sha256, offset, None)
                    part.unlink(missing_ok=True)        # larger than the file, or stale: start again
                    continue
                if resp.status_code not in (200, 206):
                    reason = re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", str(resp.reason or ""))[:100]
                    raise DownloadError(f"{url} answered HTTP {resp.status_code} {reason}".rstrip()
                                        + (": no such file there; check the name or URL" if resp.status_code == 404
                                           else ": try again later, or check the URL"))
                total: int | None = None
                if resp.status_code == 206:
                    rng = _content_range(resp.headers.get("Content-Range"))
                    if rng is None or rng[0] != offset:
                        offset = 0                      # not the range asked for: start again on a fresh request
                        part.unlink(missing_ok=True)
                        continue
                    total = rng[1]
                else:
                    offset = 0                          # the server ignored Range: from the start
                    length = resp.headers.get("Content-Length", "")
                    total = int(length) if length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise DownloadError(f"{url} is {total} bytes, more than the limit of {max_bytes} bytes: "
                                        f"raise --max-size to download it")
                return _stream(url, resp, part, dest, offset, total, sha256, max_bytes, progress, read_timeout_s)
        raise DownloadError(f"{url} refused to resume the download twice: run again with --force to start over")
    finally:
        if own:
            session.close()


def _reason(exc: BaseException) -> str:
    """The innermost reason of a requests error, short (e.g. ``Connection refused``)."""
    text = str(exc)
    if "IncompleteRead" in text or "incomplete" in text.lower():
        return "the server closed the connection early"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1)
    return text.rsplit(":", 1)[-1].strip(" ')\"") or type(exc).__name__


def _stream(url, resp, part: Path, dest: Path, offset: int, total: int | None, sha256: str | None,
            max_bytes: int, progress: Progress | None, read_timeout_s: float) -> DownloadResult:
    """Write ``resp``'s body to ``part`` (appending after ``offset`` bytes), then :func:`_finish`."""
    import requests
    import urllib3

    hasher = hashlib.sha256()
    try:
        if offset:
            with open(part, "rb") as f:
                for _ in range(0, offset, _CHUNK):
                    hasher.update(f.read(_CHUNK))
        out = open(part, "ab" if offset else "wb")     # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise DownloadError(f"cannot write {part} ({exc.strerror}): choose another directory with --dir") from None
    written = offset
    if progress:
        progress.start(offset, total)
    raw = resp.raw
    # read1 hands over what has arrived, so a connection that breaks off keeps every byte received
    # for the resume; read(n) and iter_content would drop the last partial chunk (urllib3 1.x: no read1)
    chunks = (iter(lambda: raw.read1(_CHUNK, decode_content=True), b"") if hasattr(raw, "read1")
              else resp.iter_content(_CHUNK))
    with out:
        while True:
            try:
                chunk = next(chunks, b"")
            except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
                raise DownloadError(f"{url} stopped sending for {read_timeout_s:g} s after {written} bytes: run "
                                    f"the command again to resume from there") from None
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise DownloadError(f"the download of {url} broke off after {written} bytes ({_reason(exc)}): "
                                    f"run the command again to resume from there") from None
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                out.close()
                part.unlink(missing_ok=True)
                raise DownloadError(f"{url} sent more than the limit of {max_bytes} bytes: stopped and "
                                    f"deleted the partial file; raise --max-size to download it")
            try:
                out.write(chunk)
            except OSError as exc:
                raise DownloadError(f"cannot write {part} ({exc.strerror}): free some space or choose another "
                                    f"directory with --dir") from None
            hasher.update(chunk)
            if progress:
                progress.update(len(chunk))
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise DownloadError(f"cannot write {part} ({exc.strerror}): free some space or choose another "
                                f"directory with --dir") from None
    if total is not None and written != total:
        raise DownloadError(f"the download of {url} broke off after {written} of {total} bytes: run the "
                            f"command again to resume from there")
    if progress:
        progress.close()
    return _finish(url, part, dest, sha256, offset, hasher.hexdigest())


def _finish(url: str, part: Path, dest: Path, sha256: str | None, offset: int,
            digest: str | None) -> DownloadResult:
    """Check ``part``'s sha256 (``digest``, or computed) and rename it to ``dest``."""
    digest = digest or file_sha256(part)
    size = part.stat().st_size
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file was "
                            f"deleted (the server sent something else: try again later, or report it)")
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise DownloadError(f"cannot move {part} to {dest} ({exc.strerror}): remove {dest} or choose another "
                            f"directory with --dir") from None
    return DownloadResult(dest, size, digest, sha256 is not None, offset)
