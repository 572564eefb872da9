"""The viewer's JSON API, events and access control over real HTTP, against a real run of the
``ollama`` processor on the shipped clip and the Ollama stand-in (the page itself is tested in
Chromium in test_viewer_browser.py)."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import requests

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for
from vision_host.captions import CaptionEvent
from vision_host.outputs import MjpegOutput
from vision_host.runtime.engine import StreamContext
from vision_host.viewer import _MAX_BACKLOG, Viewer, is_loopback


class Run(RunProcess):
    """``vision-host run -p ollama`` on the clip, its viewer on a free port, serving."""

    def __init__(self, server: OllamaStandin, *extra: str, bind: str = "127.0.0.1"):
        port = free_port()
        super().__init__(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"{bind}:{port}",
                          "-c", f"ollama-url={server.url}", "-c", "ollama-interval-ms=500", *extra], port)
        self.wait_until_serving()


@pytest.fixture
def standin():
    server = OllamaStandin(latency_s=0.3, token_delay_s=0.01)
    yield server
    server.stop()


@pytest.fixture
def run(standin):
    r = Run(standin)
    yield r
    r.stop()


@pytest.mark.slow
def test_state_reports_the_stream_its_processors_and_captions(run, standin):
    # a request counts as completed when its last byte arrives; the caption is stored on the next frame
    state = wait_for(lambda: (s := requests.get(run.base + "/api/state", timeout=5).json())["streams"][0]["captions"]
                     ["last"] and s, 10, "a caption")
    stream = state["streams"][0]
    assert stream["name"] == "0" and stream["state"] == "live" and stream["mjpeg"] == "/stream/0"
    assert stream["source"].endswith("bottle-detection.mp4")
    assert stream["fps"] > 20 and stream["frames_out"] > 0 and 20 < stream["frame_gap_ms"] < 60
    assert [p["name"] for p in stream["processors"]] == ["ollama"]
    assert stream["processors"][0]["calls"] > 0 and stream["processors"][0]["last_error"] is None
    assert stream["captions"]["last"].startswith("a 640x360 scene")
    assert stream["captions"]["last_latency_ms"] >= 300 and stream["captions"]["server_error"] is None
    assert stream["config"]["ollama-url"] == standin.url


DEFAULT_PROMPT = "Describe what is in this picture in highly complimentary terms using 6 words or less."


def _stream0(run) -> dict:
    return requests.get(run.base + "/api/state", timeout=5).json()["streams"][0]


@pytest.mark.slow
def test_state_shows_the_settings_in_force_with_the_processors_own_defaults(run, standin):
    """Keys nobody set still have a value in force (the ollama processor's defaults, which
    live in its Zig source): /api/state's `in_force` carries what the processor stored."""
    stream = wait_for(lambda: (s := _stream0(run))["in_force"] and s, 10, "the settings in force")
    assert "ollama-model" not in stream["config"] and "ollama-prompt" not in stream["config"]
    in_force = stream["in_force"]
    assert in_force["ollama-model"] == "llava" and in_force["ollama-prompt"] == DEFAULT_PROMPT
    assert in_force["ollama-interval-ms"] == "500" and in_force["ollama-paused"] == "false"
    assert in_force["ollama-url"] == standin.url and in_force["ollama-server-name"] == "Ollama"

    # a key removed through the API is back at the processor's default; a set one is in force
    reply = requests.post(run.base + "/api/config", json={"set": {"ollama-interval-ms": "", "ollama-model": "moondream",
                                                                  "ollama-paused": "true"}}, timeout=5)
    assert reply.status_code == 200, reply.text
    in_force = wait_for(lambda: (f := _stream0(run)["in_force"])["ollama-interval-ms"] == "3000" and f, 10,
                        "the default interval in force")
    assert in_force["ollama-model"] == "moondream" and in_force["ollama-paused"] == "true"
    assert "ollama-interval-ms" not in _stream0(run)["config"]


@pytest.mark.slow
def test_captions_history_lists_completed_captions_oldest_first(run):
    captions = wait_for(lambda: len(c := requests.get(run.base + "/api/captions", timeout=5).json()["captions"]) >= 2
                        and c, 10, "two captions")
    assert [c["id"] for c in captions] == sorted(c["id"] for c in captions)
    first = captions[0]
    assert first["stream"] == 0 and first["stream_name"] == "0" and first["text"].startswith("a 640x360 scene")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["wall_time"])
    assert first["latency_ms"] >= 300 and first["model"] == "llava"
    assert len(requests.get(run.base + "/api/captions?limit=1", timeout=5).json()["captions"]) == 1
    assert requests.get(run.base + "/api/captions?stream=1", timeout=5).json()["captions"] == []


@pytest.mark.slow
def test_a_prompt_changed_through_the_api_reaches_the_server_in_the_next_request(run, standin):
    wait_for(lambda: standin.requests, 10, "a first request")
    reply = requests.post(run.base + "/api/config", json={"set": {"ollama-prompt": "Count the bottles."}}, timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.json()["config"]["ollama-prompt"] == "Count the bottles."
    changed_at = len(standin.requests)
    wait_for(lambda: len(standin.requests) >= changed_at + 2, 10, "two requests after the change")
    # the first may have left before the change arrived; every later one has the new prompt
    later = [r.body["prompt"] for r in standin.requests[changed_at + 1:]]
    assert later and all(p == "Count the bottles." for p in later), later
    got = requests.get(run.base + "/api/config?stream=0", timeout=5).json()
    assert got["config"]["ollama-prompt"] == "Count the bottles." and got["locked"] == ["ollama-url"]


@pytest.mark.slow
def test_pausing_captions_stops_requests_and_resuming_brings_them_back(run, standin):
    wait_for(lambda: standin.requests, 10, "a first request")
    assert requests.post(run.base + "/api/config", json={"set": {"ollama-paused": "true"}}, timeout=5).ok
    time.sleep(1.0)                                    # the request in flight may still finish
    paused_at = len(standin.requests)
    time.sleep(2.5)
    assert len(standin.requests) == paused_at
    assert requests.post(run.base + "/api/config", json={"set": {"ollama-paused": "false"}}, timeout=5).ok
    wait_for(lambda: len(standin.requests) > paused_at, 10, "requests after resuming")


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    ({"set": {"ollama-url": "http://elsewhere:1"}}, 400, "network allow-list is fixed"),
    ({"set": {"ollama-prompt": 5}}, 400, "give a string"),
    ({"set": {"Bad Key": "x"}}, 400, "lowercase letters"),
    ({"set": {}}, 400, "give {"),
    ({"stream": 3, "set": {"ollama-prompt": "x"}}, 404, "there is no stream 3"),
])
def test_bad_config_changes_are_refused_with_a_reason(run, body, status, message):
    reply = requests.post(run.base + "/api/config", json=body, timeout=5)
    assert reply.status_code == status and message in reply.json()["error"]


@pytest.mark.slow
def test_other_origins_cannot_drive_the_controls(run):
    reply = requests.post(run.base + "/api/config", json={"set": {"ollama-prompt": "x"}},
                          headers={"Origin": "http://evil.example"}, timeout=5)
    assert reply.status_code == 403
    form = requests.post(run.base + "/api/config", data="set=x",
                         headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=5)
    assert form.status_code == 415                # a plain HTML form cannot post JSON
    state = requests.get(run.base + "/api/state", headers={"Origin": "http://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in state.headers   # so no foreign page can read it
    assert requests.get(run.base + "/api/config", timeout=5).json()["config"].get("ollama-prompt") is None


@pytest.mark.slow
def test_events_stream_state_every_second_and_each_caption(run):
    events: list[tuple[str, dict]] = []
    with requests.get(run.base + "/api/events", stream=True, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        name, started = None, time.monotonic()
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
            kinds = [e[0] for e in events]
            if kinds.count("state") >= 3 and "caption" in kinds or time.monotonic() - started > 15:
                break
    kinds = [e[0] for e in events]
    assert kinds[0] == "state" and kinds.count("state") >= 3, kinds
    caption = next(data for kind, data in events if kind == "caption")
    assert caption["text"].startswith("a 640x360 scene") and caption["stream"] == 0


@pytest.mark.slow
def test_snapshot_png_is_the_annotated_frame(run):
    wait_for(lambda: requests.get(run.base + "/api/state", timeout=5).json()["streams"][0]["captions"]["completed"],
             10, "a caption")
    reply = requests.get(run.base + "/snapshot/0.png", timeout=5)
    assert reply.headers["Content-Type"] == "image/png"
    png = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (360, 640, 3)
    assert requests.get(run.base + "/snapshot.png", timeout=5).status_code == 200
    assert requests.get(run.base + "/snapshot/4.png", timeout=5).status_code == 404


@pytest.mark.slow
def test_beyond_loopback_every_request_needs_the_printed_token(standin):
    run = Run(standin, bind="0.0.0.0")
    try:
        line = next(line for line in run.lines if "viewer at" in line)
        token = re.search(r"\?token=([\w-]+)", line).group(1)
        for path in ("/", "/api/state", "/api/captions", "/api/events", "/stream/0", "/snapshot/0.png",
                     "/snapshot.jpg"):
            reply = requests.get(run.base + path + "?token=wrong", timeout=5)
            assert reply.status_code == 401, path
            assert "token" in reply.json()["error"]
        assert requests.post(run.base + "/api/config", json={"set": {"ollama-prompt": "x"}},
                             timeout=5).status_code == 401
        assert requests.get(f"{run.base}/api/state?token={token}", timeout=5).ok
        assert requests.get(run.base + "/api/state", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok
        assert requests.post(f"{run.base}/api/config?token={token}", json={"set": {"ollama-prompt": "x"}},
                             timeout=5).ok
    finally:
        run.stop()


@pytest.mark.slow
def test_a_given_token_is_required_on_loopback_too(standin):
    run = Run(standin, "--token", "s3cret")
    try:
        assert requests.get(run.base + "/api/state", timeout=5).status_code == 401
        assert requests.get(run.base + "/api/state?token=s3cret", timeout=5).ok
        assert not any("s3cret" in line and "viewer at" not in line for line in run.lines)
    finally:
        run.stop()


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::")


# -- the server's rules, over real HTTP to an in-process viewer ----------------------------------
class Served:
    """An :class:`MjpegOutput` with a :class:`Viewer` on a free port, in this process: one
    stream (config ``ollama-url``, ``ollama-prompt``), one 640×360 frame written, no pipeline."""

    def __init__(self, bind: str = "127.0.0.1:0", token: str | None = None, **output_options):
        self.stream = StreamContext(0, "0", {"ollama-url": "http://127.0.0.1:9", "ollama-prompt": "Describe."})
        self.runtime = SimpleNamespace(streams=[self.stream])
        self.out = MjpegOutput(bind, **output_options)
        self.viewer = Viewer(self.runtime, self.out, token)
        self.out.open(640, 360, 30)
        self.out.write(_FRAME)
        self.port = self.out.port
        self.base = f"http://127.0.0.1:{self.port}"

    def caption(self, text: str) -> None:
        self.viewer.caption_subscriber.add(CaptionEvent(text, 1.0, time.time(), 30, "camera", model="llava",
                                                        latency_ms=12.0, stream=0))

    def close(self) -> None:
        self.viewer.close()
        self.out.close()


_FRAME = np.full((360, 640, 3), 90, np.uint8)


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def http(port: int, head: str, body: bytes = b"", source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """One request on a fresh connection (``head``: the request line and headers, without the
    blank line; ``Connection: close`` is added); returns (status, headers, body) once the
    server has closed. A connection closed without an answer fails the test."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(head.encode("latin-1") + b"\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data, "the server closed the connection without an answer"
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while payload:
            size, _, payload = payload.partition(b"\r\n")
            n = int(size, 16)
            decoded, payload = decoded + payload[:n], payload[n + 2:]
            if n == 0:
                break
        payload = decoded
    return int(lines[0].split()[1]), headers, payload


def _post_json(port: int, body: bytes, host: str | None = None, extra: str = "", source: str = "127.0.0.1"):
    host = host or f"127.0.0.1:{port}"
    return http(port, f"POST /api/config HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}{extra}", body, source)


_ROUTES = ["/", "/index.html", "/api/state", "/api/captions", "/api/config?stream=0", "/api/events", "/stream",
           "/stream/0", "/stream/0.mjpg", "/snapshot.jpg", "/snapshot/0.jpg", "/snapshot.png", "/snapshot/0.png"]


def test_a_host_that_is_not_this_server_gets_421_on_every_route_and_changes_nothing(served):
    """DNS rebinding: a page at rebind.attacker.example whose name now resolves to 127.0.0.1
    sends Host: rebind.attacker.example:PORT (and its own Origin). Bound to loopback with no
    token, nothing may be read or changed that way."""
    port = served.port
    served.caption("a secret caption")
    attacker = f"rebind.attacker.example:{port}"
    for path in _ROUTES:
        status, headers, body = http(port, f"GET {path} HTTP/1.1\r\nHost: {attacker}\r\n"
                                           f"Origin: http://{attacker}")
        assert status == 421, (path, status)
        assert "rebind.attacker.example" in json.loads(body)["error"] and b"secret" not in body
        assert not any(h.startswith("access-control-") for h in headers)
    status, _, body = _post_json(port, b'{"set": {"ollama-prompt": "Read me the screen."}}', host=attacker,
                                 extra=f"\r\nOrigin: http://{attacker}")
    assert status == 421 and json.loads(body)["error"]
    assert served.stream.config["ollama-prompt"] == "Describe."
    for host in ("rebind.attacker.example", "127.0.0.1.attacker.example", "localhost.attacker.example",
                 "192.168.1.20", "127.1", "[::2]:1", "127.0.0.1:80:80", "", "local host"):
        assert http(port, f"GET /api/state HTTP/1.1\r\nHost: {host}")[0] in (400, 421), host


def test_loopback_names_and_addresses_are_answered_with_or_without_the_port(served):
    port = served.port
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "localhost.", "127.0.0.2",
                 f"127.255.0.9:{port}", "[::1]", f"[::1]:{port}"):
        status, _, body = http(port, f"GET /api/state HTTP/1.1\r\nHost: {host}")
        assert status == 200 and json.loads(body)["streams"][0]["index"] == 0, host
    origin = f"http://localhost:{port}"
    status, _, _ = _post_json(port, b'{"set": {"ollama-prompt": "Count."}}', host=f"localhost:{port}",
                              extra=f"\r\nOrigin: {origin}")
    assert status == 200 and served.stream.config["ollama-prompt"] == "Count."


def test_bound_to_all_interfaces_the_host_name_the_address_and_allowed_names_are_answered():
    """Bound to 0.0.0.0, the Host may be this machine's host name (the address printed at
    start), the address the connection came in on, a loopback name, or an --allow-host name;
    any other name gets 421 (a token is required there too, checked after the Host)."""
    served = Served(bind="0.0.0.0:0", token="t0ken", allowed_hosts=["cam.example", "Viewer.Example:8080"])
    try:
        port = served.port
        for host in (socket.gethostname(), f"{socket.gethostname()}:{port}", "127.0.0.1", "localhost",
                     f"cam.example:{port}", "viewer.example"):
            assert http(port, f"GET /api/state?token=t0ken HTTP/1.1\r\nHost: {host}")[0] == 200, host
            assert http(port, f"GET /api/state HTTP/1.1\r\nHost: {host}")[0] == 401, host
        for host in ("rebind.attacker.example", f"other.example:{port}", "cam.example.attacker"):
            assert http(port, f"GET /api/state?token=t0ken HTTP/1.1\r\nHost: {host}")[0] == 421, host
    finally:
        served.close()


def test_the_allow_host_and_limit_flags_reach_the_server():
    """`vision-host run --allow-host NAME --viewer-…` → the settings → start_viewer."""
    from vision_host.cli import UsageError, build_parser
    from vision_host.cli.settings import viewer_limits
    from vision_host.runner import start_viewer

    args = build_parser().parse_args([
        "run", "-p", "ollama", "--allow-host", "cam.example", "--allow-host", "door.example",
        "--viewer-max-connections", "50", "--viewer-max-connections-per-client", "3",
        "--viewer-header-timeout-s", "2.5", "--viewer-body-timeout-s", "1.5", "--viewer-max-body-bytes", "1000",
        "--viewer-max-added-keys", "2", "--viewer-max-key-bytes", "20", "--viewer-max-value-bytes", "30"])
    stream = StreamContext(0, "0", {"ollama-url": "http://127.0.0.1:9"})
    runtime = SimpleNamespace(streams=[stream])
    out = MjpegOutput("127.0.0.1:0")
    viewer = start_viewer(runtime, out, None, *viewer_limits(vars(args)), allowed_hosts=args.allow_host)
    try:
        limits = out.limits
        assert (limits.max_connections, limits.max_connections_per_client, limits.header_timeout_s,
                limits.body_timeout_s, limits.max_body_bytes) == (50, 3, 2.5, 1.5, 1000)
        assert (viewer.limits.max_added_keys, viewer.limits.max_key_bytes, viewer.limits.max_value_bytes) == (2, 20, 30)
        port = out.port
        assert http(port, "GET /api/state HTTP/1.1\r\nHost: door.example")[0] == 200
        assert _post_json(port, b'{"set": {"a": "1", "b": "2", "c": "3"}}')[0] == 400     # 3 added keys > 2
        assert _post_json(port, b'{"set": {"ollama-prompt": "' + b"x" * 31 + b'"}}')[0] == 400
        assert _post_json(port, b'{"set": {"' + b"k" * 21 + b'": "x"}}')[0] == 400
        assert _post_json(port, b'{"set": {"ollama-prompt": "' + b"x" * 1000 + b'"}}')[0] == 413
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            status, _, body = http(port, "GET /api/state HTTP/1.1\r\nHost: 127.0.0.1")
            assert status == 503 and "maximum of 3 connections" in json.loads(body)["error"]
        finally:
            for s in held:
                s.close()
    finally:
        viewer.close()
        out.close()
    bad = vars(build_parser().parse_args(["run", "-p", "ollama", "--viewer-header-timeout-s", "0"]))
    with pytest.raises(UsageError, match=r"--viewer-header-timeout-s = 0\.0: give a number above 0"):
        viewer_limits(bad)


DEEP = b'{"set": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"


@pytest.mark.parametrize("request_text, body, status, message", [
    ("GET /api/captions?stream=%C2%B2", b"", 400, "stream must be a whole number"),         # '²'.isdigit()
    ("GET /api/config?stream=%C2%B2", b"", 400, "stream must be a whole number"),
    ("GET /api/captions?limit=" + "9" * 5000, b"", 400, "limit must be a whole number"),
    ("GET /api/captions?limit=-1", b"", 400, "limit must be a whole number from 1"),
    ("GET /api/captions?limit=0", b"", 400, "limit must be a whole number from 1"),
    ("GET /api/config?stream=" + "1" * 5000, b"", 400, "stream must be a whole number"),
    ("POST /api/config", DEEP, 400, "nested too deeply"),                                       # RecursionError
    ("POST /api/config", b'{"set": {"ollama-prompt": "\xff\xfe"}}', 400, "not UTF-8"),
    ("POST /api/config", b'{"set": {"ollama-prompt": "\\ud800"}}', 400, "lone surrogates"),
    ("POST /api/config", b'{"stream": ' + b"9" * 5000 + b', "set": {"a": "b"}}', 400, "not JSON"),
    ("POST /api/config", b'{"stream": true, "set": {"ollama-prompt": "x"}}', 400, "stream number"),
    ("POST /api/config", b'{"set": {"ollama-prompt": "' + b"x" * 70_000 + b'"}}', 413, "over 65536 bytes"),
    ("POST /api/config", b"[1, 2", 400, "not JSON"),
])
def test_malformed_requests_get_a_json_error_never_a_dropped_connection(served, caplog, request_text, body, status,
                                                                       message):
    caplog.set_level(logging.WARNING)
    head = f"{request_text} HTTP/1.1\r\nHost: 127.0.0.1:{served.port}"
    if request_text.startswith("POST"):
        head += f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    got, headers, payload = http(served.port, head, body)
    assert got == status, payload[:200]
    assert headers["content-type"].startswith("application/json")
    assert message in json.loads(payload)["error"]
    assert served.stream.config == {"ollama-url": "http://127.0.0.1:9", "ollama-prompt": "Describe."}
    assert http(served.port, "GET /api/state HTTP/1.1\r\nHost: 127.0.0.1")[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_requests_that_cannot_be_parsed_or_bodies_too_big_to_read_get_a_json_error(served):
    port = served.port
    for raw in (b"GARBAGE\r\n\r\n", b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                b"POST /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), (raw, answer[:100])
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith("bad request")
    # over the cap by Content-Length (nothing is read) and by a chunked body (read up to the cap)
    status, _, body = http(port, f"POST /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                 f"\r\nContent-Length: {10 ** 12}")
    assert status == 413 and "over 65536 bytes" in json.loads(body)["error"]
    chunk = b"x" * 40_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    status, _, body = http(port, "POST /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                 "\r\nTransfer-Encoding: chunked", chunked)
    assert status == 413


def test_the_caption_limit_keeps_the_newest(served):
    for i in range(5):
        served.caption(f"caption {i}")
    status, _, body = http(served.port, "GET /api/captions?limit=2 HTTP/1.1\r\nHost: 127.0.0.1")
    assert status == 200 and [c["text"] for c in json.loads(body)["captions"]] == ["caption 3", "caption 4"]
    status, _, body = http(served.port, "GET /api/captions?limit=999999&stream=0 HTTP/1.1\r\nHost: 127.0.0.1")
    assert [c["text"] for c in json.loads(body)["captions"]] == [f"caption {i}" for i in range(5)]


@pytest.mark.slow
def test_a_body_that_does_not_arrive_in_time_gets_408():
    from vision_host.webserver import ServerLimits

    served = Served(limits=ServerLimits(body_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(b"POST /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"set\": ")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert 0.4 < time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert "did not arrive within 0.5 s" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert served.stream.config["ollama-prompt"] == "Describe."
    finally:
        served.close()


def test_keys_added_while_running_are_capped_and_so_are_key_and_value_sizes(served):
    """200 POSTs of 60 new 1 KB keys each grew /api/state to 12 MB: a stream may now hold 64
    keys beyond those it started with (keys removed again no longer count), keys of 128 bytes
    and values of 4096 bytes (UTF-8) at most."""
    port = served.port
    refused = 0
    for i in range(200):
        body = json.dumps({"set": {f"extra-{i}-{k}": "v" * 1000 for k in range(60)}}).encode()
        status, _, reply = _post_json(port, body)
        if status == 400:
            assert "at most 64 may be added" in json.loads(reply)["error"]
            refused += 1
    assert refused == 199                          # the first 60 fit, then no 60 more
    status, _, state = http(port, "GET /api/state HTTP/1.1\r\nHost: 127.0.0.1")
    assert status == 200 and len(state) < 300_000, len(state)
    added = [k for k in served.stream.config if k.startswith("extra-")]
    assert len(added) == 60
    assert _post_json(port, json.dumps({"set": {f"more-{k}": "x" for k in range(4)}}).encode())[0] == 200
    assert _post_json(port, b'{"set": {"one-more": "x"}}')[0] == 400               # 65 added
    assert _post_json(port, b'{"set": {"one-more": "x", "more-0": ""}}')[0] == 200  # one removed, one added
    assert _post_json(port, b'{"set": {"ollama-prompt": ""}}')[0] == 200           # a key the run started with
    assert _post_json(port, b'{"set": {"ollama-prompt": "back"}}')[0] == 200       # … may come back

    status, _, reply = _post_json(port, json.dumps({"set": {"ollama-prompt": "é" * 2049}}).encode())  # 4098 bytes
    assert status == 400 and "config value of ollama-prompt: give a string of at most 4096 bytes" in \
        json.loads(reply)["error"]
    assert _post_json(port, json.dumps({"set": {"ollama-prompt": "é" * 2048}}).encode())[0] == 200
    status, _, reply = _post_json(port, json.dumps({"set": {"k" * 129: "x"}}).encode())
    assert status == 400 and "at most 128 bytes" in json.loads(reply)["error"]


@pytest.mark.slow
def test_a_viewer_that_stops_reading_its_events_is_dropped_without_delaying_the_others(served):
    """An event stream whose reader stalls (a 4 KiB receive buffer, never read) is closed once
    it falls 64 events behind; broadcasting never waits for it and another reader gets all."""
    port = served.port
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    received: list[bytes] = []
    done = threading.Event()

    def read_events() -> None:
        with requests.get(f"http://127.0.0.1:{port}/api/events", stream=True, timeout=10) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: big"):
                    received.append(line)
                    if len(received) == 200:
                        break
        done.set()

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    wait_for(lambda: len(served.viewer._subscribers) == 2, 5, "two event streams")
    big = b"event: x\ndata: big " + b"x" * 20_000 + b"\n\n"
    spent = 0.0
    for sent in range(20, 201, 20):       # in bursts the reader takes in before the next
        started = time.perf_counter()
        for _ in range(20):
            served.viewer._broadcast(big)
        spent += time.perf_counter() - started
        wait_for(lambda: len(received) >= sent, 10, f"the reading viewer to get {sent} events")
    assert spent < 0.5, f"broadcasting 200 events took {spent:.2f} s"
    assert done.wait(10) and len(received) == 200, len(received)
    stalled.settimeout(10)
    closed, deadline = False, time.monotonic() + 10
    try:
        while time.monotonic() < deadline and not closed:   # what was in flight, then the close
            closed = stalled.recv(1 << 20) == b""
    except ConnectionResetError:
        closed = True
    stalled.close()
    assert closed, "the viewer that stopped reading still gets events"
    wait_for(lambda: len(served.viewer._subscribers) == 0, 5, "both event streams to end")
    assert _MAX_BACKLOG == 64


@pytest.mark.slow
def test_the_token_never_reaches_the_log(standin):
    """--logging debug logs every request: with ?token=, Authorization: Bearer, a POST and the
    event stream, no line but the one printing the address holds the token."""
    run = Run(standin, "--token", "s3cret-t0ken", "--logging", "debug")
    try:
        assert requests.get(run.base + "/api/state?token=s3cret-t0ken", timeout=5).ok
        assert requests.get(run.base + "/api/state?stream=0&token=s3cret-t0ken&x=1", timeout=5).ok
        assert requests.get(run.base + "/api/config", headers={"Authorization": "Bearer s3cret-t0ken"}, timeout=5).ok
        assert requests.post(run.base + "/api/config?token=s3cret-t0ken", json={"set": {"ollama-prompt": "x"}},
                             timeout=5).ok
        assert requests.get(run.base + "/api/state?token=s3cret-t0kenX", timeout=5).status_code == 401
        with requests.get(run.base + "/api/events?token=s3cret-t0ken", stream=True, timeout=5) as events:
            next(events.iter_lines())
        wait_for(lambda: sum("/api/state?token=" in line for line in run.lines) >= 2, 10, "the requests' log lines")
    finally:
        run.stop()
    leaked = [line for line in run.lines if "s3cret-t0ken" in line and "viewer at" not in line]
    assert not leaked, leaked
    assert any("GET /api/state?token=…" in line for line in run.lines)


@pytest.mark.slow
def test_allow_host_and_a_viewer_limit_given_to_run_are_in_force(standin):
    """`vision-host run --allow-host NAME --viewer-max-added-keys 1`: NAME is answered, another
    name gets 421, and the second added key is refused."""
    run = Run(standin, "--allow-host", "camera.example.test", "--viewer-max-added-keys", "1")
    try:
        port = int(run.base.rsplit(":", 1)[1])
        assert http(port, "GET /api/state HTTP/1.1\r\nHost: camera.example.test\r\n")[0] == 200
        assert http(port, "GET /api/state HTTP/1.1\r\nHost: other.example.test\r\n")[0] == 421
        assert requests.post(run.base + "/api/config", json={"set": {"extra-one": "1"}}, timeout=5).ok
        refused = requests.post(run.base + "/api/config", json={"set": {"extra-two": "2"}}, timeout=5)
        assert refused.status_code == 400 and "error" in refused.json()
    finally:
        run.stop()
