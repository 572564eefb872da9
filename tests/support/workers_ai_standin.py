"""A stand-in for Cloudflare Workers AI's LLaVA endpoint, for tests (Cloudflare is out of reach).

It speaks the REST wire protocol of ``POST /client/v4/accounts/{account_id}/ai/run/{model}``
for ``@cf/llava-hf/llava-1.5-7b-hf`` (Cloudflare's Workers AI model page and REST API docs):

* ``Authorization: Bearer <token>`` is required; a missing or wrong token answers 401 in
  the v4 API envelope, ``{"result": null, "success": false, "errors": [{"code": 10000,
  "message": "Authentication error"}], "messages": []}``.
* Input, JSON: ``image`` (required: the image file's bytes as an array of integers 0–255),
  ``prompt`` or ``messages`` (exactly one of them), ``max_tokens`` (default 512),
  ``temperature``. The model does not stream.
* Success: 200 ``{"result": {"description": "..."}, "success": true, "errors": [],
  "messages": []}``.
* Input errors answer 400 with ``success: false`` and one entry in ``errors`` (code 5006,
  a message naming the problem); an unknown model answers 400 with code 5007 ``No such
  model …``; other paths 404. The codes follow Cloudflare's documented ranges; the exact
  message wording of the real service is approximated.

Failure modes (``failure=``): ``None``; ``"http500"`` (500, ``code 3043`` "Internal server
error" in the envelope); ``"hang"`` (never answers until :meth:`stop`).

The reply text is ``reply`` (a string, or ``reply(prompt, jpeg_bytes)``), cut to
``max_tokens`` words; every request is kept in ``requests`` (``path``, ``headers``,
``body``, decoded ``image`` bytes).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

MODEL = "@cf/llava-hf/llava-1.5-7b-hf"


@dataclass
class WorkersRequest:
    path: str
    headers: dict
    body: dict | None
    image: bytes = b""


@dataclass
class WorkersAIStandin:
    """Start with ``WorkersAIStandin(token=…)``; ``run_url`` is the account's ``…/ai/run``."""

    token: str = "cf-test-token"
    account: str = "0123456789abcdef0123456789abcdef"
    reply: object = "A person walks past a wooden table"
    latency_s: float = 0.0
    failure: str | None = None
    requests: list = field(default_factory=list)

    def __post_init__(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, code: int, message: str) -> None:
                self._send(status, {"result": None, "success": False,
                                    "errors": [{"code": code, "message": message}], "messages": []})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                prefix = f"/client/v4/accounts/{standin.account}/ai/run/"
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                record = WorkersRequest(self.path, dict(self.headers.items()), body)
                standin.requests.append(record)
                if not self.path.startswith(prefix):
                    return self._error(404, 7003, "Could not route to " + self.path)
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    return self._error(401, 10000, "Authentication error")
                if self.path[len(prefix):] != MODEL:
                    return self._error(400, 5007, f"No such model {self.path[len(prefix):]} or task")
                if not isinstance(body, dict):
                    return self._error(400, 5006, "Error: the request body is not a JSON object")
                image = body.get("image")
                if not isinstance(image, list) or not all(isinstance(v, int) and 0 <= v <= 255 for v in image):
                    return self._error(400, 5006, "Error: required properties at '/' are 'image' "
                                                  "(an array of integers 0-255)")
                if ("prompt" in body) == ("messages" in body):
                    return self._error(400, 5006, "Error: exactly one of 'prompt' and 'messages' is required")
                record.image = bytes(image)
                if cv2.imdecode(np.frombuffer(record.image, np.uint8), cv2.IMREAD_COLOR) is None:
                    return self._error(400, 5006, "Error: the image could not be decoded")
                if standin.failure == "http500":
                    return self._error(500, 3043, "Internal server error")
                if standin.failure == "hang":
                    standin._stopped.wait()
                    return
                if standin.latency_s:
                    standin._stopped.wait(standin.latency_s)
                prompt = body.get("prompt") or ""
                text = standin.reply(prompt, record.image) if callable(standin.reply) else standin.reply
                words = text.split(" ")[: int(body.get("max_tokens", 512))]
                self._send(200, {"result": {"description": " ".join(words)}, "success": True,
                                 "errors": [], "messages": []})

        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def run_url(self) -> str:
        """``http://127.0.0.1:PORT/client/v4/accounts/ACCOUNT/ai/run``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/client/v4/accounts/{self.account}/ai/run"

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
