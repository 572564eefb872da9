"""A scripted HTTP server on 127.0.0.1 for replies no real vision server sends on purpose."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ReplyServer:
    """Answers every POST with :attr:`status`, :attr:`content_type` and the body :attr:`chunks`
    (one HTTP chunk each, chunked transfer encoding; empty chunks are skipped), then closes the
    connection. The three attributes may be changed between requests.

    Attributes:
        url: base URL, ``http://127.0.0.1:PORT``.
        served: replies sent in full so far.
    """

    def __init__(self, status: int = 200, content_type: str = "application/x-ndjson", chunks=()):
        self.status, self.content_type, self.chunks = status, content_type, list(chunks)
        self.served = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, content_type, chunks = outer.status, outer.content_type, list(outer.chunks)
                self.close_connection = True
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for chunk in chunks:
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                    outer.served += 1
                except OSError:          # the host hung up (e.g. past its size cap)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join the server thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()
