"""Text embeddings of captions, for the history's semantic search: :class:`CaptionEmbedder`
asks a server for the vectors of a list of texts over HTTP.

Protocols (the request is JSON, the reply a JSON object):

* Ollama (``api`` ``generate``, ``chat`` or absent): ``POST {url}/api/embed`` with
  ``{"model", "input": [texts], "truncate": true}``; the reply's ``embeddings`` is one list of
  floats per text, in order (https://github.com/ollama/ollama/blob/main/docs/api.md, "Generate
  Embeddings"; Ollama 0.3.4 or later). Errors are ``{"error": "..."}``; an unknown model is 404
  ``model "x" not found, try pulling it first``.
* OpenAI (``api`` ``openai``): ``POST {url}/v1/embeddings`` (``{url}/embeddings`` when the url
  already ends in ``/v1``) with ``{"model", "input": [texts], "encoding_format": "float"}``;
  the reply's ``data`` is ``[{"object": "embedding", "index", "embedding": [floats]}]``
  (https://platform.openai.com/docs/api-reference/embeddings/create; Ollama's ``/v1`` and
  ``vision-host serve`` answer it too). Errors are ``{"error": {"message", "type", ...}}``.
* ``workers-ai`` is refused: its embedding models take another request shape.

The API key, when ``api_key_env`` names an environment variable, is sent as
``Authorization: Bearer KEY`` (never in the URL; a URL with ``user:password@`` is refused, and
redirects are not followed, so the key only goes where it was meant to).

Limits: at most ``batch_size`` texts per request (more are sent in several requests), each
text cut to ``max_chars`` characters, ``timeout_s`` per request (connect and each read), a reply
of at most ``max_reply_bytes``. Every vector must have the same dimension (1 to
:data:`MAX_DIM`) and finite values.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse

import numpy as np

__all__ = ["MAX_DIM", "CaptionEmbedder", "EmbeddingError", "embed_endpoint"]

#: The largest vector dimension accepted (the largest common embedding models have 4096).
MAX_DIM = 16384

_OLLAMA_APIS = (None, "", "generate", "chat", "ollama")


class EmbeddingError(Exception):
    """The server gave no usable vectors; the message says why and what to do.

    Attributes:
        kind: what went wrong, for logging once per kind: ``unreachable`` (no connection or no
            answer in time), ``model`` (the server has no such model), ``refused`` (an HTTP
            error status), ``shape`` (a reply that is not the vectors asked for).
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def embed_endpoint(url: str, api: str | None) -> str:
    """The embedding endpoint of the server at base ``url`` for ``api`` (see the module docstring).

    Raises:
        ValueError: ``api`` is ``workers-ai`` or unknown.
    """
    base = url.rstrip("/")
    api = (api or "").strip().lower() or None
    if api in _OLLAMA_APIS:
        return base + "/api/embed"
    if api == "openai":
        return base + ("/embeddings" if base.endswith("/v1") else "/v1/embeddings")
    if api == "workers-ai":
        raise ValueError("caption embeddings (--embed-model) are not supported with ollama-api=workers-ai: use an "
                         "Ollama or OpenAI-compatible server for them, or drop --embed-model")
    raise ValueError(f"unknown ollama-api {api!r} for caption embeddings: use generate, chat (Ollama) or openai")


class CaptionEmbedder:
    """Asks ``server`` for text embeddings with ``model`` (see the module docstring).

    Args:
        server: ``{"url", "api", "model", "api_key_env"}`` (keys may be missing): the base URL
            (default ``http://localhost:11434``), the API (``generate``/``chat``: Ollama,
            ``openai``), and the environment variable holding the API key. ``model`` is not used
            (that is the captioning model).
        model: the embedding model, e.g. ``nomic-embed-text``.
        timeout_s: seconds per request, connecting and each read (0.1 to 600).
        batch_size: most texts per request (1 to 2048).
        max_chars: each text is cut to this many characters (1 to 1000000).
        max_reply_bytes: the largest reply read (1 KiB to 1 GiB).

    Attributes:
        url: the endpoint the vectors are asked from. model: as given.

    Raises:
        ValueError: a setting the user must fix: no model, ``workers-ai``, a URL that is not
            http(s) or carries a user name or password, an API key variable that is not set,
            a limit out of range. Also ``url`` ``embedded`` when the embedded server's real
            address was not filled in first (the run must pass it).
    """

    def __init__(self, server: dict, model: str, *, timeout_s: float = 30.0, batch_size: int = 32,
                 max_chars: int = 8000, max_reply_bytes: int = 256 * 1024 * 1024):
        if not isinstance(model, str) or not model.strip():
            raise ValueError("--embed-model needs a model name, e.g. --embed-model nomic-embed-text")
        for name, value, low, high in (("timeout", timeout_s, 0.1, 600), ("batch size", batch_size, 1, 2048),
                                       ("max chars", max_chars, 1, 1_000_000),
                                       ("max reply bytes", max_reply_bytes, 1024, 1 << 30)):
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise ValueError(f"embedding {name} {value!r} is out of range: use {low} to {high}")
        server = dict(server or {})
        url = (server.get("url") or "http://localhost:11434").strip()
        if url.lower() == "embedded":
            raise ValueError("caption embeddings were asked of the embedded vision server before its address was "
                             "known: start it first and pass its URL (this is a vision-host bug; meanwhile start "
                             "vision-host serve yourself and give -c ollama-url=http://HOST:PORT)")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the embedding server URL {url!r} is not an http(s) URL: give e.g. "
                             f"http://localhost:11434")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the embedding server URL carries a user name or password: remove it and put the key "
                             "in an environment variable named by ollama-api-key-env (sent as a Bearer token)")
        if parts.query or parts.fragment:
            raise ValueError(f"the embedding server URL {url!r} has a query or fragment: give the base URL only")
        self.api = (server.get("api") or "").strip().lower() or None
        self.url = embed_endpoint(url, self.api)
        self.base_url = url.rstrip("/")
        self.model = model.strip()
        self.timeout_s, self.batch_size, self.max_chars = float(timeout_s), int(batch_size), int(max_chars)
        self.max_reply_bytes = int(max_reply_bytes)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key_env = server.get("api_key_env")
        if key_env:
            key = os.environ.get(key_env)
            if not key:
                raise ValueError(f"the environment variable {key_env} (ollama-api-key-env) that should hold the "
                                 f"embedding server's API key is not set: set it, or drop ollama-api-key-env")
            self._headers["Authorization"] = f"Bearer {key.strip()}"
        self._session = None
        self._lock = threading.Lock()   # one request at a time: a requests.Session is not thread-safe

    @property
    def openai(self) -> bool:
        """True when the server is asked as OpenAI's API (``/v1/embeddings``)."""
        return self.api == "openai"

    def embed(self, texts: list[str]) -> np.ndarray:
        """The vectors of ``texts``: a float32 array of shape (len(texts), d), row i for text i
        (as the server gives them; not normalised here). Several requests when there are more
        than ``batch_size`` texts.

        Raises:
            EmbeddingError: the server is unreachable or too slow, has no such model, refused the
                request, or answered something that is not one vector per text of one dimension.
        """
        texts = [str(t)[: self.max_chars] for t in texts]
        if not texts:
            return np.zeros((0, 0), np.float32)
        parts = [self._request(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1:
            raise EmbeddingError(f"{self.url} gave vectors of different dimensions {sorted(dims)} for model "
                                 f"{self.model}: the model changed while embedding; try again", "shape")
        return np.concatenate(parts)

    def close(self) -> None:
        """Close the HTTP connections (idempotent)."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    # -- one request --------------------------------------------------------------------------
    def _request(self, texts: list[str]) -> np.ndarray:
        import requests

        if self.openai:
            body = {"model": self.model, "input": texts, "encoding_format": "float"}
        else:
            body = {"model": self.model, "input": texts, "truncate": True}
        with self._lock:
            if self._session is None:
                self._session = requests.Session()
                self._session.trust_env = False   # no proxies from the environment for a local server
            try:
                resp = self._session.post(self.url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                          headers=self._headers, timeout=self.timeout_s, allow_redirects=False,
                                          stream=True)
                try:
                    raw = self._read(resp)
                finally:
                    resp.close()
            except requests.Timeout:
                raise EmbeddingError(f"the embedding server {self.base_url} did not answer within "
                                     f"{self.timeout_s:g} s: check that it runs and is not overloaded",
                                     "unreachable") from None
            except requests.ConnectionError as exc:
                raise EmbeddingError(f"cannot reach the embedding server {self.base_url} ({_reason(exc)}): start "
                                     f"it (ollama serve) or give its address (--url / ollama-url)",
                                     "unreachable") from None
            except requests.RequestException as exc:
                raise EmbeddingError(f"the request to the embedding server {self.base_url} failed ({exc})",
                                     "unreachable") from None
        if resp.status_code != 200:
            raise self._status_error(resp.status_code, raw)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise EmbeddingError(f"{self.url} answered something that is not JSON ({raw[:80]!r}): is it an "
                                 f"{'OpenAI-compatible' if self.openai else 'Ollama'} server?", "shape") from None
        return self._vectors(reply, len(texts))

    def _read(self, resp) -> bytes:
        data = bytearray()
        for chunk in resp.iter_content(65536):
            data += chunk
            if len(data) > self.max_reply_bytes:
                raise EmbeddingError(f"{self.url} sent more than {self.max_reply_bytes} bytes for "
                                     f"{self.batch_size} texts at most: not an embedding reply", "shape")
        return bytes(data)

    def _status_error(self, status: int, raw: bytes) -> EmbeddingError:
        message = _error_message(raw)
        if status == 404 and ("not found" in message.lower() and ("model" in message.lower())):
            hint = f"pull it: ollama pull {self.model}" if not self.openai else \
                "give a model the server has (--embed-model)"
            return EmbeddingError(f"the embedding server {self.base_url} has no model {self.model} ({message}): "
                                  f"{hint}", "model")
        if status in (404, 405):
            endpoint = "/v1/embeddings" if self.openai else "/api/embed"
            other = "ollama-api=openai (--api openai)" if not self.openai else "the Ollama API (--api ollama)"
            return EmbeddingError(f"the server {self.base_url} does not answer {endpoint} (HTTP {status}"
                                  f"{': ' + message if message else ''}): is it an "
                                  f"{'OpenAI-compatible' if self.openai else 'Ollama (0.3.4 or later)'} server? "
                                  f"Else try {other}", "refused")
        if status in (401, 403):
            return EmbeddingError(f"the embedding server {self.base_url} refused the request (HTTP {status}"
                                  f"{': ' + message if message else ''}): set its API key in the variable named "
                                  f"by ollama-api-key-env (--api-key-env)", "refused")
        if 300 <= status < 400:
            return EmbeddingError(f"the embedding server {self.base_url} redirects (HTTP {status}): give the URL it "
                                  f"redirects to", "refused")
        return EmbeddingError(f"the embedding server {self.base_url} answered HTTP {status}"
                              f"{': ' + message if message else ''} for model {self.model}", "refused")

    def _vectors(self, reply, n: int) -> np.ndarray:
        what = "data" if self.openai else "embeddings"
        try:
            if self.openai:
                items = reply["data"]
                if not isinstance(items, list):
                    raise TypeError
                if all(isinstance(i, dict) and isinstance(i.get("index"), int) for i in items):
                    items = sorted(items, key=lambda i: i["index"])
                rows = [i["embedding"] for i in items]
            else:
                rows = reply["embeddings"]
            if not isinstance(rows, list) or len(rows) != n:
                raise EmbeddingError(f"{self.url} gave {len(rows) if isinstance(rows, list) else 'no'} vectors for "
                                     f"{n} texts: not the reply asked for", "shape")
            if any(not isinstance(r, list) or isinstance(r, str) for r in rows):
                raise TypeError
            lengths = {len(r) for r in rows}
            if len(lengths) != 1 or not 1 <= next(iter(lengths)) <= MAX_DIM:
                raise EmbeddingError(f"{self.url} gave vectors of dimensions {sorted(lengths)[:5]}: they must all "
                                     f"have one dimension of 1 to {MAX_DIM}", "shape")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for r in rows for v in r):
                raise TypeError
            vectors = np.asarray(rows, dtype=np.float64)
        except (KeyError, TypeError, IndexError):
            raise EmbeddingError(f"{self.url} answered without a list of number vectors in {what!r}: is it an "
                                 f"{'OpenAI-compatible' if self.openai else 'Ollama'} embedding server?",
                                 "shape") from None
        if not np.isfinite(vectors).all() or np.abs(vectors).max(initial=0) > 3e38:
            raise EmbeddingError(f"{self.url} gave vectors with values that are not finite float32 numbers",
                                 "shape")
        return vectors.astype(np.float32)

    def __repr__(self) -> str:
        return f"CaptionEmbedder({self.url}, model={self.model!r})"


def _error_message(raw: bytes) -> str:
    """The error text of an Ollama (``{"error": "..."}``) or OpenAI (``{"error": {"message"}}``)
    reply, else the body's start."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace").strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error if error is not None else body)[:300]


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "timed out",
                   "Temporary failure in name resolution", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__

