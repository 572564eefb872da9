"""The HTTP host functions (non-blocking fetch and wasmVision's blocking http) against local servers."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import socket
import struct
import threading
import time

import pytest

from ollama_standin import OllamaStandin
from vision_host.runtime import NetworkPolicy
from vision_host.runtime.fetch import FairShare, FetchClient, FetchError, FetchErrorResult, FetchStats

F, H = "vision-host:platform/fetch", "wasmvision:platform/http"


def _fetch_driver(driver, standin, **limits):
    host = standin.url.split("//")[1]
    return driver([(F, "post-frame"), (F, "start"), (F, "poll"), (F, "cancel"), (H, "get"), (H, "post"),
                   (H, "post-image")], policy=NetworkPolicy(allowed={host}, **limits))


def _poll_all(d, rid, timeout_s=5.0):
    """Poll until done; returns (status, body) or raises with the fetch-error."""
    ret = d.retarea()
    body = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d.call(F, "poll", rid, ret)
        if d.u8(ret) == 1:
            raise LookupError(FetchError(d.u8(ret + 4)).name)
        status, done, ptr, n = struct.unpack("<HBxII", d.mem.read(ret + 4, 12))
        body += d.mem.read(ptr, n)
        if done:
            return status, body
        time.sleep(0.01)
    raise AssertionError("request did not finish")


def _post_frame(d, url, frame_handle, template=b'{"model":"llava","prompt":"hi","images":["%IMAGE%"]}', max_side=0):
    ret = d.retarea()
    d.call(F, "post-frame", *d.put_str(url), *d.put_str("application/json"), *d.put(template),
           frame_handle, max_side, 85, ret)
    return d.u8(ret), d.u32(ret + 4) if d.u8(ret) == 0 else d.u8(ret + 4)


def test_post_frame_streams_ndjson_and_releases_the_id(driver, standin, real_frame):
    d = _fetch_driver(driver, standin)
    ok, rid = _post_frame(d, standin.url + "/api/generate", d.mats.insert(real_frame), max_side=320)
    assert ok == 0
    status, body = _poll_all(d, rid)
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert status == 200 and lines[-1]["done"] is True
    assert "".join(x["response"] for x in lines).startswith("a 320x180 scene")
    assert (standin.requests[0].width, standin.requests[0].height) == (320, 180)
    with pytest.raises(LookupError, match="UNKNOWN_REQUEST"):
        _poll_all(d, rid)


@pytest.mark.slow
def test_errors_are_reported_once_per_request(driver, standin, real_frame):
    d = _fetch_driver(driver, standin, max_response_bytes=100)
    frame = d.mats.insert(real_frame)
    _, rid = _post_frame(d, standin.url + "/api/generate", frame)
    with pytest.raises(LookupError, match="RESPONSE_TOO_LARGE"):
        _poll_all(d, rid)
    standin.failure = "hang"
    limited = _fetch_driver(driver, standin, max_in_flight=2, read_timeout_s=0.5)
    frame = limited.mats.insert(real_frame)
    ids = [_post_frame(limited, standin.url + "/api/generate", frame) for _ in range(3)]
    assert [i[0] for i in ids] == [0, 0, 1] and ids[2][1] == FetchError.TOO_MANY_REQUESTS
    with pytest.raises(LookupError, match="TIMEOUT"):
        _poll_all(limited, ids[0][1])
    limited.call(F, "cancel", ids[1][1])
    assert limited.ctx.fetch.in_flight == 0
    limited.call(F, "cancel", 999)                         # unknown ids are ignored


def test_blocking_http_get_post_and_post_image(driver, standin, real_frame):
    d = _fetch_driver(driver, standin)
    ret = d.retarea()
    d.call(H, "get", *d.put_str(standin.url + "/"), ret)
    assert d.u8(ret) == 0 and d.string_at(ret) == "Ollama is running"
    body = json.dumps({"model": "llava", "prompt": "hi", "stream": False}).encode()
    d.call(H, "post", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"), *d.put(body), ret)
    assert d.u8(ret) == 0 and json.loads(d.string_at(ret))["done"] is True
    template = b'{"model":"llava","prompt":"describe","stream":false,"images":["%IMAGE%"]}'
    d.call(H, "post-image", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"),
           *d.put(template), *d.put_str("response"), d.mats.insert(real_frame), ret)
    assert d.u8(ret) == 0 and d.string_at(ret).startswith("a 640x360 scene")
    d.call(H, "post-image", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"),
           *d.put(template), *d.put_str("nosuchfield"), d.mats.insert(real_frame), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 4            # http-error.runtime-error
    standin.failure = "http500"
    d.call(H, "post", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"), *d.put(body), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 3            # request-error


def test_the_first_image_placeholder_decides_the_encoding(real_frame):
    from vision_host.runtime.fetch import frame_jpeg_body
    as_numbers = json.loads(frame_jpeg_body(real_frame, 320, 80, b'{"image":%IMAGE_BYTES%,"prompt":"a %IMAGE% b"}')())
    assert as_numbers["prompt"] == "a %IMAGE% b"                     # the prompt's text is left alone
    assert bytes(as_numbers["image"])[:3] == b"\xff\xd8\xff"         # a JPEG, as numbers
    as_base64 = json.loads(frame_jpeg_body(real_frame, 320, 80, b'{"images":["%IMAGE%"],"p":"%IMAGE_BYTES%"}')())
    assert as_base64["p"] == "%IMAGE_BYTES%"
    assert base64.b64decode(as_base64["images"][0])[:3] == b"\xff\xd8\xff"


# -- the allow-list judges exactly where the request goes -----------------------------------------


class _Listener:
    """A TCP listener on 127.0.0.1 that records every connection and every HTTP request it gets
    (method, target, headers with lowercased names), and answers each with ``200 ok`` once
    :attr:`release` is set (at once unless ``hold``).

    Attributes:
        url: ``http://127.0.0.1:PORT``; port: the port.
        connections: connections accepted so far; requests: ``(method, target, headers)`` in order of arrival.
    """

    def __init__(self, hold: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.changed = threading.Condition()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.changed:
                self.connections += 1
                self.changed.notify_all()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target = (lines[0].split(" ") + ["", ""])[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                left = int(headers.get("content-length", "0") or 0) - len(rest)
                while left > 0 and (chunk := conn.recv(min(left, 65536))):
                    left -= len(chunk)
            except (OSError, ValueError):
                return
            with self.changed:
                self.requests.append((method, target, headers))
                self.changed.notify_all()
            self.release.wait(30)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nok")
            except OSError:
                pass

    def paths(self) -> list[str]:
        """The request targets seen so far, in order of arrival."""
        with self.changed:
            return [target for _, target, _ in self.requests]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` holds (checked on every connection or request); False on timeout."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def stop(self) -> None:
        """Answer every held request, stop accepting, and join the accept thread."""
        self.release.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join()


@pytest.fixture
def listeners():
    """Two recording listeners: ``a`` (allowed, holds the API key) and ``b`` (not allowed)."""
    a, b = _Listener(), _Listener()
    yield a, b
    a.stop()
    b.stop()


SECRET = "sk-test-9d2e4b"
TO_A = "A"                 # expected: the request goes to the allowed listener A, with its key
NA, BAD = FetchError.DESTINATION_NOT_ALLOWED, FetchError.INVALID_URL
HTTP_CODE = {NA: 1, BAD: 2}  # wasmvision http-error cases


def _crafted_urls(a: int, b: int) -> list[tuple[str, object]]:
    """URLs that try to reach port ``b`` (or send A's key elsewhere) while only ``127.0.0.1:a`` is allowed."""
    return [
        (f"http://127.0.0.1:{b}\\@127.0.0.1:{a}/x", BAD),      # the review's case: urlsplit says :a, requests :b
        (f"HTTP://127.0.0.1:{b}\\@127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b}\\\\@127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b}/\\@127.0.0.1:{a}/x", BAD),     # a backslash anywhere
        (f"http:\\\\127.0.0.1:{b}/x", BAD),
        (f"http:/127.0.0.1:{b}/x", BAD),
        (f"http://127.0.0.1:{b}@127.0.0.1:{a}/x", BAD),        # userinfo
        (f"http://127.0.0.1:{a}@127.0.0.1:{b}/x", BAD),
        (f"http://user:pw@127.0.0.1:{a}/x", BAD),
        (f"http://@127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b}%40127.0.0.1:{a}/x", BAD),      # percent-encoded authority
        (f"http://127.0.0.1%3A{b}@127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b}\t@127.0.0.1:{a}/x", BAD),      # whitespace and control characters
        (f"http://127.0.0.1:{b}\n@127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b} @127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1\t:{a}/x", BAD),
        (f"http://127.0.0.1:{a}/x\r\nHost: 127.0.0.1:{b}", BAD),
        (f"http://127.0.0.1:{a}#@127.0.0.1:{b}/x", TO_A),      # a fragment: every parser says :a
        (f"http://127.0.0.1:{a}?@127.0.0.1:{b}/x", TO_A),      # a query: legitimately :a
        (f"HTTP://127.0.0.1:{a}/x", TO_A),                    # schemes are case-insensitive
        (f"http://[::ffff:127.0.0.1]:{b}/x", NA),
        (f"http://[::ffff:127.0.0.1]:{a}/x", NA),             # another spelling is another destination
        (f"http://[::1%25lo]:{b}/x", BAD),                    # IPv6 zone id
        (f"http://[::1%lo]:{b}/x", BAD),
        (f"http://127.0.0.1:+{a}/x", BAD),                    # ports: sign, leading zero, range, empty, two
        (f"http://127.0.0.1:-{a}/x", BAD),
        (f"http://127.0.0.1:0{a}/x", BAD),
        (f"http://127.0.0.1:{a + 65536}/x", BAD),
        ("http://127.0.0.1:/x", BAD),
        (f"http://127.0.0.1:{a}:{b}/x", BAD),
        (f"http://127.0.0.1:{b}x/x", BAD),
        (f"http://127.1:{b}/x", BAD),                         # IPv4 spellings inet_aton accepts
        (f"http://0x7f.0.0.1:{b}/x", BAD),
        (f"http://2130706433:{b}/x", BAD),
        (f"http://\uff11\uff12\uff17.0.0.1:{b}/x", BAD),      # non-ASCII (fullwidth digits)
        (f"http://127.0.0.1:{b}\u3002@127.0.0.1:{a}/x", BAD),
        (f"ftp://127.0.0.1:{a}/x", BAD),                      # other schemes, no scheme
        (f"//127.0.0.1:{a}/x", BAD),
        (f"127.0.0.1:{a}/x", BAD),
        (f"http://127.0.0.1:{b}/x", NA),
        (f"http://localhost:{b}/x", NA),
        (f"http://127.0.0.1:{a}/x", TO_A),
    ]


def _key_policy(url: str) -> NetworkPolicy:
    return NetworkPolicy.from_config({"ollama-url": url, "ollama-api-key-env": "VH_TEST_KEY"},
                                     environ={"VH_TEST_KEY": SECRET})


def _start_get(d, url: str) -> tuple[int, int]:
    ret = d.retarea()
    d.call(F, "start", *d.put_str("GET"), *d.put_str(url), *d.put_str(""), *d.put(b""), ret)
    return d.u8(ret), (d.u32(ret + 4) if d.u8(ret) == 0 else d.u8(ret + 4))


def test_crafted_urls_never_reach_another_destination_nor_get_the_key(driver, listeners):
    """Only 127.0.0.1:A is allowed and holds the API key; every crafted URL is either refused or
    goes to A. Listener B (a real server) must see no connection at all, through both the
    non-blocking ``fetch.start`` and the blocking ``http.get``."""
    a, b = listeners
    d = driver([(F, "start"), (F, "poll"), (H, "get")], policy=_key_policy(a.url))
    to_a = 0
    for url, expected in _crafted_urls(a.port, b.port):
        ok, value = _start_get(d, url)
        if expected == TO_A:
            assert ok == 0, (url, FetchError(value).name)
            assert _poll_all(d, value) == (200, b"ok"), url
        else:
            assert (ok, FetchError(value)) == (1, expected), url
        ret = d.retarea()
        d.call(H, "get", *d.put_str(url), ret)
        if expected == TO_A:
            assert d.u8(ret) == 0 and d.mem.read(*struct.unpack("<II", d.mem.read(ret + 4, 8))) == b"ok", url
            to_a += 2
        else:
            assert (d.u8(ret), d.u8(ret + 4)) == (1, HTTP_CODE[expected]), url
        assert b.connections == 0 and b.requests == [], url
        assert len(a.requests) == to_a, url
    assert all(h.get("authorization") == f"Bearer {SECRET}" for _, _, h in a.requests)
    assert [t for _, t, _ in a.requests[:6]] == ["/", "/", f"/?@127.0.0.1:{b.port}/x", f"/?@127.0.0.1:{b.port}/x",
                                                "/x", "/x"]


def test_the_key_goes_only_to_the_scheme_host_and_port_it_was_given_for(driver, listeners):
    """A key given for https://127.0.0.1:A is not sent with http://127.0.0.1:A (same host and port)."""
    a, _ = listeners
    https_policy = _key_policy(f"https://127.0.0.1:{a.port}")
    assert set(https_policy.credentials) == {f"https://127.0.0.1:{a.port}"}
    d = driver([(F, "start"), (F, "poll"), (H, "get")], policy=https_policy)
    ok, rid = _start_get(d, a.url + "/plain")
    assert ok == 0 and _poll_all(d, rid) == (200, b"ok")
    ret = d.retarea()
    d.call(H, "get", *d.put_str(a.url + "/blocking"), ret)
    assert d.u8(ret) == 0
    assert [(t, "authorization" in h) for _, t, h in a.requests] == [("/plain", False), ("/blocking", False)]


@pytest.mark.parametrize("url, rebuilt, destination", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080/", "127.0.0.1:8080"),
    ("HTTPS://Example.COM/a/b?c=d#frag", "https://example.com:443/a/b?c=d", "example.com:443"),
    ("http://[::1]:11434/api?x=@y", "http://[::1]:11434/api?x=@y", "[::1]:11434"),
    ("http://[0:0:0:0:0:0:0:1]/", "http://[::1]:80/", "[::1]:80"),
    ("http://my_host.lan:9/%41", "http://my_host.lan:9/%41", "my_host.lan:9"),
])
def test_urls_are_parsed_once_and_rebuilt(url, rebuilt, destination):
    from vision_host.runtime.policy import parse_request_url
    target = parse_request_url(url)
    assert (target.url, target.destination) == (rebuilt, destination)


# -- cancelled requests and the per-processor queue ---------------------------------------------------
def _finish(client: FetchClient, rid: int, timeout_s: float = 10.0) -> tuple[int, bytes]:
    body = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, done, chunk = client.poll(rid)
        body += chunk
        if done:
            return status, body
        time.sleep(0.005)
    raise AssertionError("request did not finish")


@pytest.fixture
def held():
    """A listener that holds every request until the test sets ``release``, and a worker pool."""
    server = _Listener(hold=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    yield server, pool
    server.stop()
    pool.shutdown(wait=True, cancel_futures=True)


def test_a_cancelled_request_that_has_not_started_is_never_sent(held):
    server, pool = held
    policy = NetworkPolicy(allowed={server.url.split("//")[1]}, max_in_flight=3, max_running=1)
    client = FetchClient(policy, pool, FetchStats(), FairShare(2), lane=0)

    def get(path):
        return client.start("GET", server.url + path, "", lambda: b"")
    first = get("/1")
    assert server.wait_for(lambda: len(server.requests) == 1)
    second = get("/2")                       # waits in the processor's queue: one running at a time
    client.cancel(second)
    assert client.pending == 1               # dropped from the queue at once
    client.cancel(first)                     # still held by the server: it counts until it ends
    assert client.in_flight == 0 and client.pending == 1
    third, fourth = get("/3"), get("/4")
    with pytest.raises(FetchErrorResult) as refused:
        get("/5")
    assert refused.value.code == FetchError.TOO_MANY_REQUESTS
    # frame requests: a stream's second one waits in the fair share and is withdrawn when cancelled
    other = FetchClient(policy, pool, FetchStats(), FairShare(2), lane=1)
    frames = [other.start("POST", server.url + f"/frame{i}", "", lambda: b"{}", is_image=True) for i in (1, 2)]
    assert server.wait_for(lambda: "/frame1" in server.paths())
    other.cancel(frames[1])
    assert other.pending == 1
    server.release.set()
    assert _finish(client, third) == (200, b"ok") and _finish(client, fourth) == (200, b"ok")
    assert _finish(other, frames[0]) == (200, b"ok")
    assert sorted(server.paths()) == ["/1", "/3", "/4", "/frame1"]     # /2 and /frame2 never sent


def test_a_flood_of_cancelled_requests_stays_bounded_and_cannot_delay_another_streams_caption(held):
    """Four processors (streams 0-3) each start and cancel 500 requests against a server that holds
    every request; stream 4's caption request must reach the server while the flood is on (the
    flood waits for it halfway), at most ``max_running`` of each flooder's requests may reach the
    server, and none once it answers."""
    server, pool = held
    policy = NetworkPolicy(allowed={server.url.split("//")[1]})
    share = FairShare(policy.max_frame_requests)
    flooders = [FetchClient(policy, pool, FetchStats(), share, lane) for lane in range(4)]
    captioner = FetchClient(policy, pool, FetchStats(), share, lane=4)
    caption = None
    for i in range(500):
        if i == 250:
            caption = captioner.start("POST", server.url + "/caption", "application/json", lambda: b"{}",
                                      is_image=True)
            assert server.wait_for(lambda: "/caption" in server.paths()), \
                f"the caption request waits behind the flood: the server saw {len(server.requests)} others"
        for n, client in enumerate(flooders):
            try:
                rid = client.start("GET", f"{server.url}/flood{n}/{i}", "", lambda: b"")
            except FetchErrorResult as err:
                assert err.code == FetchError.TOO_MANY_REQUESTS
                continue
            client.cancel(rid)
    during = server.paths()
    flood = [p for p in during if p.startswith("/flood")]
    for n in range(4):
        assert len([p for p in flood if p.startswith(f"/flood{n}/")]) <= policy.max_running, during
    assert during.index("/caption") <= len(flood)
    server.release.set()
    assert _finish(captioner, caption) == (200, b"ok")
    for n, client in enumerate(flooders):    # the flooders still work, and their queues are empty
        assert _finish(client, client.start("GET", f"{server.url}/after{n}", "", lambda: b"")) == (200, b"ok")
    assert [p for p in server.paths() if p.startswith("/flood")] == flood   # nothing cancelled was sent later


def test_a_request_cancelled_mid_reply_ends_quietly(caplog):
    """Cancelling a request whose reply is streaming closes its response under the worker's
    read: the worker ends without a "HTTP worker failed" traceback and counts nothing as done."""
    server = OllamaStandin(token_delay_s=0.05)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    try:
        policy = NetworkPolicy(allowed={server.url.split("//")[1]})
        client = FetchClient(policy, pool, FetchStats(), FairShare(2), lane=0)
        body = json.dumps({"model": "llava", "prompt": "hi", "images": [], "stream": True}).encode()
        for _ in range(5):
            rid = client.start("POST", server.url + "/api/generate", "application/json", lambda: body)
            received = b""
            deadline = time.monotonic() + 10
            while not received:                    # the reply has started
                assert time.monotonic() < deadline, "no reply"
                received += client.poll(rid)[2]
                time.sleep(0.005)
            client.cancel(rid)
        deadline = time.monotonic() + 10
        while client.pending:                      # the workers let go of every request
            assert time.monotonic() < deadline, "a cancelled request never ended"
            time.sleep(0.005)
    finally:
        server.stop()
        pool.shutdown(wait=True)
    assert not [r for r in caplog.records if "HTTP worker failed" in r.getMessage()]
