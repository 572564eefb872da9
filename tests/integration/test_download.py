"""``vision-host download`` against a local HTTP server: checksums, resume, restarts, errors, limits.

The catalogue's real URLs are never contacted: downloads are given by URL, or the catalogue is
replaced by entries pointing at the local server.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from vision_host import download as dl
from vision_host.cli import main


class FileServer:
    """Serves :attr:`files` (path → bytes) on 127.0.0.1 over HTTP/1.0, honouring ``Range:
    bytes=N-`` with 206 unless :attr:`honour_range` is False; :attr:`break_after` (bytes) cuts
    the connection mid-body; :attr:`no_length` sends no Content-Length (the body ends at close).
    Every request's headers are kept in :attr:`requests` as (path, headers) pairs."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.break_after: int | None = None
        self.no_length = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                status, first = 200, 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m and outer.honour_range:
                    first = int(m.group(1))
                    if first >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                part = body[first:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
                if not outer.no_length:
                    self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                try:
                    if outer.break_after is not None:
                        self.wfile.write(part[:outer.break_after])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    for i in range(0, len(part), 65536):
                        self.wfile.write(part[i:i + 65536])
                except OSError:         # the client hung up (past its size limit)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()


def _blob(n: int, seed: int = 1) -> bytes:
    """``n`` bytes that differ from any other seed's."""
    out, block = bytearray(), hashlib.sha256(bytes([seed])).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["download", *argv])
    out, err = capsys.readouterr()
    return status, out, err


# --- the catalogue ----------------------------------------------------------------------------

def test_catalogue_entries_are_well_formed():
    seen: set[tuple[str, str]] = set()
    for e in dl.CATALOGUE:
        assert e.kind in dl.KINDS
        for name in (e.name, *e.aliases):
            assert (e.kind, name) not in seen, f"{e.kind} {name} twice"
            seen.add((e.kind, name))
        assert e.url.startswith("https://") and dl.check_url(e.url) == e.url
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256), e.name
        assert e.size is None or e.size > 0
        assert "/" not in e.filename and e.filename.endswith(".wasm" if e.kind == "processor" else ".onnx")
        if e.kind == "processor":
            assert e.filename == f"{e.name}.wasm"
    names = {e.name for e in dl.CATALOGUE}
    # the networks, and wasmVision's processors that vision-host runs
    assert {"yunet_2023mar", "sface_2021dec", "candy-9", "udnie-8", "style-transfer", "ollama", "captions"} <= names
    # GitHub URLs are pinned to a commit, so a pinned sha256 cannot go stale when a branch moves
    for e in dl.CATALOGUE:
        if e.url.startswith("https://github.com/"):
            assert re.search(r"/raw/[0-9a-f]{40}/", e.url), e.url


def test_catalogue_covers_the_models_dnn_loads_by_name():
    from vision_host.runtime.dnn import KNOWN_MODELS

    for name, known in KNOWN_MODELS.items():
        entry = dl.find_entry("model", name)
        assert entry is not None, f"dnn knows {name} but download does not"
        assert entry.filename == known.filename


def test_list_prints_the_catalogue(capsys):
    status, out, _ = _run(capsys, "list", "models")
    assert status == 0
    assert "yunet_2023mar" in out and "face_detection_yunet_2023mar.onnx" in out and "processors" not in out
    assert out.count("no sha256") == sum(1 for e in dl.CATALOGUE if e.kind == "model" and e.sha256 is None)


# --- downloads --------------------------------------------------------------------------------

def test_right_checksum_downloads_the_file(server, tmp_path, capsys):
    data = _blob(300_000)
    server.files["/m/net.onnx"] = data
    status, out, err = _run(capsys, "model", f"{server.url}/m/net.onnx", "--sha256", _sha(data).upper(),
                            "--dir", str(tmp_path / "models"))
    assert status == 0, err
    assert (tmp_path / "models" / "net.onnx").read_bytes() == data
    assert not (tmp_path / "models" / "net.onnx.part").exists()
    assert "sha256 ok" in out and "300000 bytes" in out
    assert "net: downloading of 293 KiB" in err and "net: 293 KiB done" in err    # progress, as lines
    assert server.requests[0][1].get("accept-encoding") == "identity"

    # again: nothing downloaded, the file is checked
    status, out, _ = _run(capsys, "model", f"{server.url}/m/net.onnx", "--sha256", _sha(data),
                          "--dir", str(tmp_path / "models"))
    assert status == 0 and "already in" in out and "sha256 ok" in out
    assert len(server.requests) == 1


def test_a_catalogue_name_downloads_into_the_directory(server, tmp_path, capsys, monkeypatch):
    data = b"\0asm\1\0\0\0" + _blob(5000)
    server.files["/p/hello.wasm"] = data
    monkeypatch.setattr(dl, "CATALOGUE", (
        dl.Entry("processor", "hello", "hello.wasm", f"{server.url}/p/hello.wasm", _sha(data), len(data)),
        dl.Entry("model", "nosum", "nosum.onnx", f"{server.url}/p/nosum.onnx", None)))
    server.files["/p/nosum.onnx"] = b"model bytes"
    monkeypatch.setenv("VISION_HOST_PROCESSORS_DIR", str(tmp_path / "procs"))
    status, out, err = _run(capsys, "processor", "hello.wasm")      # wasmVision accepts NAME.wasm too
    assert status == 0, err
    assert (tmp_path / "procs" / "hello.wasm").read_bytes() == data
    assert "downloaded processor hello" in out

    # no published checksum: the computed one is printed, and said to be unchecked
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    status, out, _ = _run(capsys, "model", "nosum")
    assert status == 0
    assert (tmp_path / "data" / "vision-host" / "models" / "nosum.onnx").read_bytes() == b"model bytes"
    assert _sha(b"model bytes") in out and "NOT verified" in out


def test_wrong_checksum_deletes_the_file(server, tmp_path, capsys):
    server.files["/m/net.onnx"] = _blob(70_000)
    url = f"{server.url}/m/net.onnx"
    status, _, err = _run(capsys, "model", url, "--sha256", _sha(b"something else"), "--dir", str(tmp_path))
    assert status == 1
    assert f"checksum mismatch for {url}" in err and "deleted" in err and _sha(b"something else") in err
    assert list(tmp_path.iterdir()) == []


def test_broken_download_resumes_with_a_range_request(server, tmp_path, capsys):
    data = _blob(400_000)
    server.files["/m/big.onnx"] = data
    url = f"{server.url}/m/big.onnx"
    server.break_after = 150_000
    status, _, err = _run(capsys, "model", url, "--sha256", _sha(data), "--dir", str(tmp_path))
    assert status == 1 and "broke off after 150000" in err and "resume" in err
    assert (tmp_path / "big.onnx.part").stat().st_size == 150_000
    assert not (tmp_path / "big.onnx").exists()

    server.break_after = None
    status, out, err = _run(capsys, "model", url, "--sha256", _sha(data), "--dir", str(tmp_path))
    assert status == 0, err
    assert server.requests[-1][1].get("range") == "bytes=150000-"
    assert (tmp_path / "big.onnx").read_bytes() == data
    assert not (tmp_path / "big.onnx.part").exists()
    assert "resumed after 150000 bytes" in out and "sha256 ok" in out


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    data = _blob(100_000)
    server.files["/m/net.onnx"] = data
    server.honour_range = False
    (tmp_path / "net.onnx.part").write_bytes(b"stale bytes from another file")
    status, out, err = _run(capsys, "model", f"{server.url}/m/net.onnx", "--sha256", _sha(data), "--dir", str(tmp_path))
    assert status == 0, err
    assert server.requests[-1][1].get("range") == f"bytes={len(b'stale bytes from another file')}-"
    assert (tmp_path / "net.onnx").read_bytes() == data
    assert "resumed" not in out


def test_a_whole_part_file_is_finished_on_416(server, tmp_path, capsys):
    data = _blob(20_000)
    server.files["/m/net.onnx"] = data
    (tmp_path / "net.onnx.part").write_bytes(data)
    status, _, err = _run(capsys, "model", f"{server.url}/m/net.onnx", "--sha256", _sha(data), "--dir", str(tmp_path))
    assert status == 0, err
    assert (tmp_path / "net.onnx").read_bytes() == data and len(server.requests) == 1


def test_force_downloads_again(server, tmp_path, capsys):
    server.files["/m/net.onnx"] = b"new"
    (tmp_path / "net.onnx").write_bytes(b"old")
    status, out, _ = _run(capsys, "model", f"{server.url}/m/net.onnx", "--dir", str(tmp_path))
    assert status == 0 and "already in" in out and (tmp_path / "net.onnx").read_bytes() == b"old"
    status, _, _ = _run(capsys, "model", f"{server.url}/m/net.onnx", "--dir", str(tmp_path), "--force")
    assert status == 0 and (tmp_path / "net.onnx").read_bytes() == b"new"


def test_404_names_the_url(server, tmp_path, capsys):
    url = f"{server.url}/m/missing.onnx"
    status, _, err = _run(capsys, "model", url, "--dir", str(tmp_path))
    assert status == 1
    assert f"{url} answered HTTP 404" in err and "check the name or URL" in err
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_says_offline(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/m/net.onnx"
    status, _, err = _run(capsys, "model", url, "--dir", str(tmp_path))
    assert status == 1
    assert f"cannot reach {url} (offline?" in err


def test_a_silent_server_times_out(tmp_path, capsys):
    with socket.socket() as listener:          # accepts connections (the kernel does) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/m/net.onnx"
        status, _, err = _run(capsys, "model", url, "--dir", str(tmp_path), "--timeout", "0.3")
    assert status == 1 and f"{url} sent nothing for 0.3 s" in err and "--timeout" in err


def test_too_large_is_refused_by_its_length(server, tmp_path, capsys):
    server.files["/m/net.onnx"] = _blob(5000)
    status, _, err = _run(capsys, "model", f"{server.url}/m/net.onnx", "--dir", str(tmp_path), "--max-size", "4K")
    assert status == 1 and "5000 bytes, more than the limit of 4096 bytes" in err and "--max-size" in err
    assert list(tmp_path.iterdir()) == []


def test_too_large_without_a_length_is_stopped(server, tmp_path, capsys):
    server.files["/m/net.onnx"] = _blob(3 * 1024 * 1024)
    server.no_length = True
    status, _, err = _run(capsys, "model", f"{server.url}/m/net.onnx", "--dir", str(tmp_path), "--max-size", "1M")
    assert status == 1 and "more than the limit of 1048576 bytes" in err and "deleted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, words", [
    ("ftp://example.org/net.onnx", "not an http:// or https:// URL"),
    ("https://user:secret@example.org/net.onnx", "user name or password"),
    ("https://example.org/", "usable file name"),
    ("nosuchmodel", "unknown model 'nosuchmodel'"),
])
def test_bad_names_and_urls_are_usage_errors(spec, words, tmp_path, capsys):
    status, _, err = _run(capsys, "model", spec, "--dir", str(tmp_path))
    assert status == 2 and words in err
    assert "secret" not in err


def test_a_processor_url_must_name_a_wasm_file(tmp_path, capsys):
    status, _, err = _run(capsys, "processor", "https://example.org/x.onnx", "--dir", str(tmp_path))
    assert status == 2 and "NAME.wasm" in err
    with pytest.raises(SystemExit):
        main(["download", "model", "x", "--max-size", "lots"])
    assert "is not a size" in capsys.readouterr().err


def test_progress_draws_a_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = dl.Progress("net", out, interval_s=0)
    p.start(0, 1000)
    for _ in range(10):
        p.update(100)
    p.close()
    text = out.getvalue()
    assert text.count("\r") >= 10 and "100%" in text and "#" * 30 in text and text.endswith("\n")

    lines = io.StringIO()
    p = dl.Progress("net", lines)
    p.start(0, 1000)
    for _ in range(10):
        p.update(100)
    p.close()
    assert "\r" not in lines.getvalue()
    assert [ln for ln in lines.getvalue().splitlines() if "%" in ln] == [f"net: {t}% ({t * 10} B of 1000 B)"
                                                                        for t in range(10, 100, 10)]


def test_download_function_refuses_bad_limits(tmp_path):
    with pytest.raises(dl.DownloadError, match="at least 1 byte"):
        dl.download("http://127.0.0.1:9/x", tmp_path / "x", max_bytes=0)
    with pytest.raises(dl.DownloadError, match="greater than 0"):
        dl.download("http://127.0.0.1:9/x", tmp_path / "x", connect_timeout_s=0)
    assert not os.listdir(tmp_path)
