"""A stand-in for the Hugging Face Hub's HTTP API: one local directory served as a model repo.

:class:`HubStandin` serves a directory (e.g. one written by ``save_pretrained``) as the model
repository ``owner/name`` at one commit on the branch ``main``, over plain HTTP on
``127.0.0.1`` and a free port, with the standard library's
``http.server.ThreadingHTTPServer``. Point ``HF_ENDPOINT`` at :attr:`HubStandin.url` and
``huggingface_hub``'s ``snapshot_download`` / ``hf_hub_download`` (and through them
transformers' ``from_pretrained``) download from it as from huggingface.co.

The wire protocol follows the client code of huggingface_hub 2.4.0 (``hf_api.py``:
``model_info`` / ``repo_info`` and ``list_repo_tree``; ``utils/_pagination.py``;
``file_download.py``: ``get_hf_file_metadata``, ``_get_metadata_or_catch_error``,
``http_get``; ``utils/_http.py``: ``hf_raise_for_status``,
``_httpx2_follow_hub_redirects_with_backoff``). Endpoints (models only; ``REV`` is ``main``
or the commit sha, URL-quoted as the client sends it):

* ``GET /api/models/OWNER/NAME`` and ``GET /api/models/OWNER/NAME/revision/REV``: the
  model info JSON: ``id``, ``modelId``, ``author``, ``sha`` (the commit ``snapshot_download``
  pins), ``lastModified``, ``createdAt``, ``private``, ``gated``, ``disabled``, ``downloads``,
  ``likes``, ``tags``, ``library_name``, ``siblings`` (``rfilename``; with ``?blobs=true``
  also ``size``, ``blobId`` and ``lfs`` ``{sha256, size, pointerSize}``).
* ``GET /api/models/OWNER/NAME/tree/REV[/PATH]?recursive=…&expand=…``: the tree listing,
  a JSON list of ``{"type": "file", "oid", "size", "path"[, "lfs": {"oid", "size",
  "pointerSize"}]}`` and ``{"type": "directory", "oid", "size": 0, "path"}``; ``oid`` is the
  git blob sha1 (of the LFS pointer for LFS files), ``size`` the file's real size. Paginated
  by ``page_size`` entries with an RFC 8288 ``Link: <…&cursor=…>; rel="next"`` header, as the
  client's ``_paginate_pages`` follows. No ``xetHash``.
* ``HEAD`` / ``GET /OWNER/NAME/resolve/REV/FILE``: every answer carries ``X-Repo-Commit``.
  A regular file answers ``200`` with ``ETag: "<git blob sha1>"``, ``Content-Length``,
  ``Accept-Ranges: bytes`` (and the body for ``GET``; ``Range: bytes=N-`` gives ``206`` with
  ``Content-Range``). An LFS file (``*.safetensors``, ``*.bin``, … see ``lfs_patterns``)
  answers ``302 Found`` with ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size``, an ``ETag``
  and a ``Location`` on a second "CDN" server (another port, so another origin: the client
  takes the metadata from the redirect itself and downloads from ``Location``, as with the
  real Hub's CDN). The CDN serves ``GET`` / ``HEAD /cdn/SHA256`` with ``Content-Length``,
  ``Content-Disposition`` (the file name), ``ETag`` and ranges.
* ``GET /api/agent-harnesses``: the AI-agent harness registry that ``build_hf_headers``
  (``utils/_detect_agent.py``) fetches once a day for its user agent:
  ``{"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}}`` (no known harness).
* Errors as the Hub sends them, with ``X-Error-Code`` and ``X-Error-Message`` headers and a
  JSON ``{"error": …}`` body, which ``hf_raise_for_status`` maps to exceptions: an unknown
  repo → ``404``, ``RepoNotFound`` (``RepositoryNotFoundError``); an unknown revision →
  ``404``, ``RevisionNotFound`` (``RevisionNotFoundError``); a missing file or tree path →
  ``404``, ``EntryNotFound`` (``RemoteEntryNotFoundError``; with ``X-Repo-Commit`` so the
  client caches the absence).

No xet headers (``X-Xet-*``) and no ``xetHash`` are ever sent, so downloads are plain HTTP.
Every request (both servers) is recorded in :attr:`HubStandin.requests`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

#: Files stored with git LFS on the stand-in (as on the Hub, weights and other binaries).
DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx",
                        "*.gguf", "*.model", "*.npz", "*.zip")
#: What ``/api/agent-harnesses`` answers: a registry with no harness.
AGENT_HARNESSES = {"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}}
_TIMESTAMP = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class RecordedRequest:
    """One request a stand-in server received: ``server`` is ``"hub"`` or ``"cdn"``, ``path``
    the URL path decoded, ``query`` the parsed query string."""

    server: str
    method: str
    path: str
    query: dict
    headers: dict


@dataclass
class _RepoFile:
    path: str
    data_path: Path
    size: int
    blob_oid: str            # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None = None    # LFS files only
    pointer_size: int | None = None

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git_tree_oid(entries: list[tuple[str, str]]) -> str:
    # A stand-in tree id: stable, 40 hex digits (the client only stores it).
    return hashlib.sha1(("tree\0" + "\n".join(f"{n} {o}" for n, o in sorted(entries))).encode()).hexdigest()


@dataclass
class _Repo:
    repo_id: str
    files: dict[str, _RepoFile] = field(default_factory=dict)
    commit: str = ""

    def directories(self) -> set[str]:
        dirs = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def tree_oid(self, directory: str) -> str:
        prefix = directory + "/"
        return _git_tree_oid([(p, f.blob_oid) for p, f in self.files.items() if p.startswith(prefix)])


def _load_repo(repo_id: str, directory: Path, lfs_patterns: tuple[str, ...]) -> _Repo:
    repo = _Repo(repo_id)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if rel.startswith(".git/") or rel.startswith(".cache/"):
            continue
        data = file.read_bytes()
        if any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat) for pat in lfs_patterns):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            repo.files[rel] = _RepoFile(rel, file, len(data), _git_blob_oid(pointer), sha256, len(pointer))
        else:
            repo.files[rel] = _RepoFile(rel, file, len(data), _git_blob_oid(data))
    listing = "\n".join(f"{f.path} {f.blob_oid}" for f in repo.files.values())
    repo.commit = hashlib.sha1(f"commit {repo_id}\n{listing}".encode()).hexdigest()
    return repo


class HubStandin:
    """The Hugging Face Hub HTTP API for one model repository ``repo_id`` holding the files of
    ``directory`` (read once, at construction).

    ``url`` (set by :meth:`start`) is the endpoint to put in ``HF_ENDPOINT``; ``requests``
    lists every request received, in order. ``page_size``: entries per tree listing page.
    Usable as a context manager (start on enter, stop on exit).
    """

    def __init__(self, directory: str | Path, repo_id: str = "owner/name", *, page_size: int = 1000,
                 lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS) -> None:
        if repo_id.count("/") != 1:
            raise ValueError(f"repo_id must be owner/name, not {repo_id!r}")
        self.repo = _load_repo(repo_id, Path(directory), tuple(lfs_patterns))
        self.page_size = max(1, page_size)
        self.requests: list[RecordedRequest] = []
        self.url = ""
        self.cdn_url = ""
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def repo_id(self) -> str:
        """The served repository's id, ``owner/name``."""
        return self.repo.repo_id

    @property
    def commit(self) -> str:
        """The sha of the one commit served (what ``main`` resolves to)."""
        return self.repo.commit

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HubStandin":
        """Start the Hub server and its CDN server on free ports of 127.0.0.1."""
        if self._servers:
            return self
        hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "hub"))
        cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "cdn"))
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"
        for server in (hub, cdn):
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop both servers and close their sockets."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HubStandin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection -----------------------------------------------------------------------------
    def record(self, request: RecordedRequest) -> None:
        """Append ``request`` to :attr:`requests` (thread-safe; called by the handlers)."""
        with self._lock:
            self.requests.append(request)

    def requested(self, method: str | None = None, server: str | None = None) -> list[RecordedRequest]:
        """The recorded requests, optionally only those with this method and/or server."""
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (server is None or r.server == server)]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()


def _make_handler(standin: HubStandin, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.standin = standin
    Handler.role = role
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubStandin/1.0"
    standin: HubStandin
    role: str

    def log_message(self, format, *args):   # keep test output clean
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.head = head
        self.standin.record(RecordedRequest(self.role, self.command, unquote(split.path), dict(self.query),
                                            {k.lower(): v for k, v in self.headers.items()}))
        try:
            if self.role == "cdn":
                self._cdn()
            else:
                self._hub()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not self.head and body:
            self.wfile.write(body)

    def _json(self, value, headers: dict | None = None) -> None:
        self._send(200, json.dumps(value).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        extra = dict(headers or {})
        if code is not None:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), extra)

    def _repo_not_found(self) -> None:
        self._error(404, "RepoNotFound", "Repository not found")

    def _revision(self, revision: str) -> bool:
        """Whether ``revision`` names the served commit; else answers 404 RevisionNotFound."""
        if revision in ("main", self.standin.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # -- the Hub --------------------------------------------------------------------------------
    def _hub(self) -> None:
        # Keep %2F inside a segment (a quoted revision) apart from path separators.
        segments = [unquote(s) for s in self.raw_path.split("/")[1:]]
        repo_id = self.standin.repo_id
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            if "/".join(segments[2:4]) != repo_id:
                return self._repo_not_found()
            rest = segments[4:]
            if not rest:
                return self._model_info()
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info() if self._revision(rest[1]) else None
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(rest[1], "/".join(s for s in rest[2:] if s)) if self._revision(rest[1]) else None
            return self._error(404, None, "Not Found")
        if segments == ["api", "agent-harnesses"]:
            return self._json(AGENT_HARNESSES)
        if segments[:1] == ["api"]:
            if segments[1:2] in (["datasets"], ["spaces"], ["kernels"]) and len(segments) >= 4:
                return self._repo_not_found()
            return self._error(404, None, "Not Found")
        if len(segments) >= 5 and segments[2] == "resolve":
            if "/".join(segments[:2]) != repo_id:
                return self._repo_not_found()
            if not self._revision(segments[3]):
                return None
            return self._resolve("/".join(segments[4:]))
        if len(segments) >= 2 and segments[0] in ("datasets", "spaces") and "resolve" in segments:
            return self._repo_not_found()
        return self._error(404, None, "Not Found")

    def _model_info(self) -> None:
        repo = self.standin.repo
        owner = repo.repo_id.split("/")[0]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in repo.files.values():
            sibling: dict = {"rfilename": f.path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_oid)
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        info = {"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": owner,
                "sha": repo.commit, "lastModified": _TIMESTAMP, "createdAt": _TIMESTAMP, "private": False,
                "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": ["transformers"],
                "library_name": "transformers", "siblings": siblings}
        if blobs:
            info["usedStorage"] = sum(f.size for f in repo.files.values())
        self._json(info)

    def _tree(self, revision: str, path: str) -> None:
        repo = self.standin.repo
        dirs = repo.directories()
        if path and path not in dirs:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                               {"X-Repo-Commit": repo.commit})
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = path + "/" if path else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix):
                return False
            return recursive or "/" not in p[len(prefix):]

        entries = [{"type": "directory", "oid": repo.tree_oid(d), "size": 0, "path": d}
                   for d in sorted(dirs) if wanted(d)]
        entries += [self._file_entry(f) for p, f in sorted(repo.files.items()) if wanted(p)]
        entries.sort(key=lambda e: e["path"])
        try:
            start = int(self.query.get("cursor", "0") or 0)
        except ValueError:
            return self._error(400, None, "Invalid cursor")
        page = entries[start:start + self.standin.page_size]
        headers = {}
        if start + self.standin.page_size < len(entries):
            query = {k: v for k, v in self.query.items() if k != "cursor"}
            query["cursor"] = str(start + self.standin.page_size)
            next_url = f"{self.standin.url}{self.raw_path}?{urlencode(query)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(page, headers)

    @staticmethod
    def _file_entry(f: _RepoFile) -> dict:
        entry: dict = {"type": "file", "oid": f.blob_oid, "size": f.size, "path": f.path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        return entry

    def _resolve(self, filename: str) -> None:
        repo = self.standin.repo
        f = repo.files.get(filename)
        commit = {"X-Repo-Commit": repo.commit}
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit)
        if f.lfs:
            location = f"{self.standin.cdn_url}/cdn/{f.sha256}?filename={quote(f.path.rsplit('/', 1)[-1])}"
            body = f"Found. Redirecting to {location}".encode()
            return self._send(302, body, {**commit, "ETag": f'"{f.blob_oid}"', "X-Linked-Etag": f'"{f.sha256}"',
                                          "X-Linked-Size": str(f.size), "Location": location},
                              content_type="text/plain; charset=utf-8")
        self._file(f, {**commit, "ETag": f'"{f.blob_oid}"'})

    def _file(self, f: _RepoFile, headers: dict) -> None:
        """Answer with the file's bytes, honouring ``Range: bytes=N-`` / ``bytes=N-M``."""
        data = f.data_path.read_bytes()
        headers = {**headers, "Accept-Ranges": "bytes"}
        status = 200
        spec = self.headers.get("Range")
        if spec and spec.startswith("bytes="):
            first, _, last = spec[len("bytes="):].split(",")[0].strip().partition("-")
            try:
                start = int(first) if first else max(0, len(data) - int(last))
                end = int(last) if first and last else len(data) - 1
            except ValueError:
                start, end = 0, len(data) - 1
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
            status = 206
        self._send(status, data, headers, content_type="application/octet-stream")

    # -- the CDN --------------------------------------------------------------------------------
    def _cdn(self) -> None:
        parts = self.raw_path.split("/")
        by_sha = {f.sha256: f for f in self.standin.repo.files.values() if f.lfs}
        if len(parts) != 3 or parts[1] != "cdn" or parts[2] not in by_sha:
            return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
        f = by_sha[parts[2]]
        name = f.path.rsplit("/", 1)[-1]
        self._file(f, {"ETag": f'"{f.sha256}"',
                       "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"})
