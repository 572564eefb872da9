"""The viewer's JSON API, events and access control over real HTTP, against a real run of the
``ollama`` processor on the shipped clip and the Ollama stand-in (the page itself is tested in
Chromium in test_viewer_browser.py)."""

from __future__ import annotations

import json
import re
import socket
import time

import cv2
import numpy as np
import pytest
import requests

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for
from vision_host.viewer import _MAX_BACKLOG, _Subscriber, is_loopback


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


def test_pausing_captions_stops_requests_and_resuming_brings_them_back(run, standin):
    wait_for(lambda: standin.requests, 10, "a first request")
    assert requests.post(run.base + "/api/config", json={"set": {"ollama-paused": "true"}}, timeout=5).ok
    time.sleep(1.0)                                    # the request in flight may still finish
    paused_at = len(standin.requests)
    time.sleep(2.5)
    assert len(standin.requests) == paused_at
    assert requests.post(run.base + "/api/config", json={"set": {"ollama-paused": "false"}}, timeout=5).ok
    wait_for(lambda: len(standin.requests) > paused_at, 10, "requests after resuming")


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


def test_snapshot_png_is_the_annotated_frame(run):
    wait_for(lambda: requests.get(run.base + "/api/state", timeout=5).json()["streams"][0]["captions"]["completed"],
             10, "a caption")
    reply = requests.get(run.base + "/snapshot/0.png", timeout=5)
    assert reply.headers["Content-Type"] == "image/png"
    png = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (360, 640, 3)
    assert requests.get(run.base + "/snapshot.png", timeout=5).status_code == 200
    assert requests.get(run.base + "/snapshot/4.png", timeout=5).status_code == 404


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


def test_a_given_token_is_required_on_loopback_too(standin):
    run = Run(standin, "--token", "s3cret")
    try:
        assert requests.get(run.base + "/api/state", timeout=5).status_code == 401
        assert requests.get(run.base + "/api/state?token=s3cret", timeout=5).ok
        assert not any("s3cret" in line and "viewer at" not in line for line in run.lines)
    finally:
        run.stop()


def test_a_viewer_that_stops_reading_is_dropped_without_waiting_for_it():
    a, b = socket.socketpair()
    try:
        sub = _Subscriber(a)
        started = time.perf_counter()
        for i in range(_MAX_BACKLOG + 10):
            sub.push(b"event: state\ndata: {}\n\n")
        assert time.perf_counter() - started < 0.05          # pushing never waits on the viewer
        assert sub.dropped and len(sub.events) == _MAX_BACKLOG
        assert b.recv(1) == b""                              # its connection was shut down
    finally:
        a.close()
        b.close()


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::")
