"""Webhooks against real HTTP receivers on 127.0.0.1: signatures, retries, order, hangs, restarts."""

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vision_host.captions import AlertEvent, CaptionBus, CaptionEvent
from vision_host.sinks.outbox import Outbox
from vision_host.sinks.webhook import (WebhookError, WebhookSettings, WebhookSink, parse_webhook_flag,
                                       parse_webhook_table, redact_url)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
WAIT_S = 15.0


class Receiver:
    """A webhook receiver on 127.0.0.1. ``script``: what to answer to each request in turn (an
    HTTP status, ``(status, headers)`` or ``"hang"`` = never answer until :meth:`stop`); then 200.

    Attributes:
        url: its URL. requests: (headers as a lower-case dict, body bytes, arrival monotonic time)
        in arrival order. in_flight: requests received but not answered yet.
    """

    def __init__(self, script=(), port: int = 0):
        self.script = list(script)
        self.requests = []
        self.in_flight = 0
        self.cond = threading.Condition()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.cond:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                    step = outer.script.pop(0) if outer.script else 200
                    outer.in_flight += 1
                    outer.cond.notify_all()
                try:
                    if step == "hang":
                        outer.release.wait(60)
                        step = 200
                    status, headers = step if isinstance(step, tuple) else (step, {})
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:       # the sender gave up (its timeout)
                    pass
                finally:
                    with outer.cond:
                        outer.in_flight -= 1
                        outer.cond.notify_all()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook?token=abc"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def wait(self, predicate, what: str, timeout: float = WAIT_S):
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self), timeout):
                pytest.fail(f"timed out waiting for {what}; requests so far: {len(self.requests)}")

    def wait_requests(self, n: int, timeout: float = WAIT_S):
        self.wait(lambda r: len(r.requests) >= n, f"{n} requests", timeout)
        return self.requests[:n]

    def bodies(self):
        return [json.loads(body) for _, body, _ in self.requests]

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


@pytest.fixture
def receivers():
    made = []

    def make(script=(), port=0):
        made.append(Receiver(script, port))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def sinks(tmp_path):
    """Makes WebhookSinks on one outbox file in tmp_path with a fast backoff; closes them after."""
    made = []

    def make(url, **kw):
        settings_kw = {k: kw.pop(k) for k in ("events", "secret_env", "timeout_s", "streams", "max_age_s") if k in kw}
        kw.setdefault("backoff_base_s", 0.02)
        kw.setdefault("backoff_cap_s", 0.2)
        sink = WebhookSink(WebhookSettings(url, **settings_kw), kw.pop("outbox", tmp_path / "outbox.sqlite3"), **kw)
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.close(timeout_s=2)


def _caption(text: str, stream: int = 0, name: str | None = "door", **kw) -> CaptionEvent:
    return CaptionEvent(text, 1.5, 1_764_601_282.123, 45, "camera", model="llava", latency_ms=812.44, stream=stream,
                        stream_name=name, prompt="What happens?", **kw)


def _wait_until(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _verify(secret: str, headers: dict, body: bytes, tolerance_s: int = 300) -> bool:
    """Standard Webhooks verification, written from the spec independently of the sender."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for candidate in headers["webhook-signature"].split(" "):
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True
    return False


@pytest.mark.parametrize("secret", [SECRET, "a plain string secret of 32 chars"])
def test_the_signature_verifies_and_the_body_is_the_caption_json(receivers, sinks, monkeypatch, secret):
    monkeypatch.setenv("HOOK_SECRET", secret)
    receiver = receivers()
    sink = sinks(receiver.url, secret_env="HOOK_SECRET")
    sink.add(_caption("a person at the door", fields={"person": True}))
    ((headers, body, _),) = receiver.wait_requests(1)
    assert headers["content-type"] == "application/json"
    assert headers["webhook-signature"].startswith("v1,")
    assert _verify(secret, headers, body)
    assert not _verify(secret, headers, body.replace(b"person at", b"cat at"))          # the verifier can fail
    wrong = "whsec_" + base64.b64encode(bytes(32)).decode() if secret.startswith("whsec_") else secret + "x"
    assert not _verify(wrong, headers, body)
    event = json.loads(body)
    assert event == {"id": headers["webhook-id"], "type": "caption", "stream": 0, "stream_name": "door",
                     "time": "2025-12-01T15:01:22.123Z", "text": "a person at the door", "fields": {"person": True},
                     "fields_error": None, "model": "llava", "latency_ms": 812.4, "prompt": "What happens?",
                     "frame_index": 45, "stream_time_s": 1.5}
    _wait_until(lambda: sink.health()["delivered"] == 1, "the delivery to be counted")
    health = sink.health()
    assert health["url"] == redact_url(receiver.url) and "token" not in health["url"]
    assert health["connected"] is True and health["last_status"] == 200 and health["queued"] == 0


def test_an_alert_carries_its_caption_and_filters_pick_events_and_streams(receivers, sinks):
    receiver = receivers()
    sink = sinks(receiver.url, events=frozenset({"alert"}), streams=("door",))
    bus = CaptionBus()
    bus.subscribe(sink)
    cause = _caption("a person")
    bus.publish(cause)                                                     # a caption: not taken
    bus.publish_alert(AlertEvent("intruder", "ON", 1, "yard", 1_764_601_283.0, "held for 2 s", None, "person"))
    bus.publish_alert(AlertEvent("intruder", "ON", 0, "door", 1_764_601_283.0, "held for 2 s", cause, "person"))
    bus.publish_alert(AlertEvent("intruder", "OFF", 0, "door", 1_764_601_290.0, "cleared", None, "person"))
    receiver.wait_requests(2)
    on, off = receiver.bodies()[:2]
    assert on["type"] == "alert" and on["name"] == "intruder" and on["state"] == "ON" and on["stream_name"] == "door"
    assert on["reason"] == "held for 2 s" and on["expression"] == "person" and on["time"] == "2025-12-01T15:01:23.000Z"
    assert on["caption"]["text"] == "a person" and "id" not in on["caption"] and on["caption"]["type"] == "caption"
    assert off["state"] == "OFF" and off["caption"] is None
    _wait_until(lambda: sink.health()["delivered"] == 2, "two deliveries")
    assert len(receiver.requests) == 2 and "signature" not in " ".join(receiver.requests[0][0])   # no secret: unsigned


def test_500_three_times_then_200_delivers_once_with_the_same_id(receivers, sinks):
    receiver = receivers([500, 502, 503])
    sink = sinks(receiver.url)
    sink.add(_caption("first"))
    tries = receiver.wait_requests(4)
    ids = {headers["webhook-id"] for headers, _, _ in tries}
    assert len(ids) == 1 and ids == {json.loads(tries[0][1])["id"]}
    sink.add(_caption("second"))              # the next one goes once the first is through: no duplicate between
    receiver.wait_requests(5)
    assert [b["text"] for b in receiver.bodies()] == ["first"] * 4 + ["second"]
    _wait_until(lambda: sink.health()["delivered"] == 2, "two deliveries")
    health = sink.health()
    assert health["failures"] == 3 and health["dropped"] == 0 and health["last_error"] is None


def test_a_hanging_receiver_delays_neither_another_webhook_nor_the_frame_loop(receivers, sinks):
    stuck, fine = receivers(["hang"]), receivers()
    bus = CaptionBus()
    hanging = bus.subscribe(sinks(stuck.url, timeout_s=60))
    bus.subscribe(sinks(fine.url))
    bus.publish(_caption("one"))
    stuck.wait(lambda r: r.in_flight == 1, "the first request to hang")
    for text in ("two", "three", "four"):
        bus.publish(_caption(text))           # returns while the receiver still holds the first request
    assert stuck.in_flight == 1 and len(stuck.requests) == 1 and not stuck.release.is_set()
    fine.wait_requests(4)
    assert [b["text"] for b in fine.bodies()] == ["one", "two", "three", "four"]
    _wait_until(lambda: hanging.health()["queued"] == 4, "the hanging webhook to hold all four")
    stuck.release.set()                       # the receiver answers at last: the rest follow, in order
    stuck.wait_requests(4)
    assert [b["text"] for b in stuck.bodies()] == ["one", "two", "three", "four"]


@pytest.mark.slow
def test_a_receiver_that_times_out_is_retried_with_the_same_id(receivers, sinks):
    receiver = receivers(["hang"])
    sink = sinks(receiver.url, timeout_s=1)
    sink.add(_caption("slow"))
    first, second = receiver.wait_requests(2)
    assert first[0]["webhook-id"] == second[0]["webhook-id"]
    assert second[2] - first[2] >= 0.9        # the retry came after the 1 s read timeout
    _wait_until(lambda: sink.health()["delivered"] == 1, "the retry to be delivered")
    assert sink.health()["failures"] == 1


def test_a_receiver_down_at_start_gets_everything_in_order_once_up(receivers, sinks):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = sinks(f"http://127.0.0.1:{port}/hook")
    for text in ("a", "b", "c"):
        sink.add(_caption(text))
    _wait_until(lambda: sink.health()["failures"] >= 2, "failed connection attempts")
    health = sink.health()
    assert health["connected"] is False and "ConnectionError" in health["last_error"] and health["queued"] == 3
    receiver = receivers(port=port)
    receiver.wait_requests(3)
    assert [b["text"] for b in receiver.bodies()] == ["a", "b", "c"]
    _wait_until(lambda: sink.health()["delivered"] == 3, "three deliveries")


def test_a_restart_delivers_what_was_pending_with_the_same_ids(receivers, tmp_path):
    receiver = receivers([503] * 1000)
    path = tmp_path / "outbox.sqlite3"
    settings = WebhookSettings(receiver.url)
    sink = WebhookSink(settings, path, backoff_base_s=0.02, backoff_cap_s=0.2)
    for text in ("a", "b", "c"):
        sink.add(_caption(text))
    receiver.wait_requests(2)
    _wait_until(lambda: sink.health()["queued"] == 3, "all three in the outbox")
    sink.close(timeout_s=5)
    assert not sink._thread.is_alive()
    first_id = receiver.requests[0][0]["webhook-id"]
    with receiver.cond:
        receiver.script = []                  # the receiver is well again
        seen = len(receiver.requests)
    again = WebhookSink(settings, path, backoff_base_s=0.02, backoff_cap_s=0.2)
    try:
        receiver.wait_requests(seen + 3)
        delivered = receiver.requests[seen:]
        assert [json.loads(b)["text"] for _, b, _ in delivered] == ["a", "b", "c"]
        assert delivered[0][0]["webhook-id"] == first_id
        _wait_until(lambda: again.health()["delivered"] == 3, "three deliveries")
        assert again.health()["queued"] == 0
    finally:
        again.close(timeout_s=5)
    check = Outbox(path, settings.sink_name)
    assert len(check) == 0
    check.close()


def test_a_refused_message_is_dropped_and_counted_not_retried(receivers, sinks, caplog):
    receiver = receivers([400])
    sink = sinks(receiver.url)
    sink.add(_caption("bad"))
    sink.add(_caption("good"))
    receiver.wait_requests(2)
    _wait_until(lambda: sink.health()["delivered"] == 1, "the second to be delivered")
    assert [b["text"] for b in receiver.bodies()] == ["bad", "good"]
    health = sink.health()
    assert health["dropped"] == 1 and health["failures"] == 1 and health["queued"] == 0
    assert any("dropped message" in r.getMessage() and "HTTP 400" in r.getMessage() for r in caplog.records)


def test_410_gone_stops_the_webhook_keeping_what_was_pending(receivers, sinks):
    receiver = receivers([410])
    sink = sinks(receiver.url)
    sink.add(_caption("one"))
    receiver.wait_requests(1)
    _wait_until(lambda: sink.health()["disabled"], "the webhook to stop")
    sink.add(_caption("two"))
    health = sink.health()
    assert health["queued"] == 1 and health["dropped"] == 1 and len(receiver.requests) == 1


@pytest.mark.slow
def test_retry_after_of_a_429_is_honoured(receivers, sinks):
    receiver = receivers([(429, {"Retry-After": "2"})])
    sink = sinks(receiver.url, backoff_cap_s=10)
    sink.add(_caption("later"))
    first, second = receiver.wait_requests(2)
    assert second[2] - first[2] >= 1.5
    assert first[0]["webhook-id"] == second[0]["webhook-id"]


def test_a_full_memory_queue_drops_new_events_and_counts_them(receivers, tmp_path):
    receiver = receivers()
    sink = WebhookSink(WebhookSettings(receiver.url), tmp_path / "o.sqlite3", queue_size=2, start=False)
    for text in ("a", "b", "c", "d"):
        sink.add(_caption(text))
    assert sink.health()["dropped"] == 2
    sink.start()
    receiver.wait_requests(2)
    assert [b["text"] for b in receiver.bodies()] == ["a", "b"]
    sink.close(timeout_s=5)


def test_a_secret_variable_that_is_not_set_is_an_error_at_start(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_HOOK_SECRET", raising=False)
    with pytest.raises(WebhookError, match=r"\$NO_SUCH_HOOK_SECRET, which is not set: export NO_SUCH_HOOK_SECRET"):
        WebhookSink(WebhookSettings("http://127.0.0.1:9/x", secret_env="NO_SUCH_HOOK_SECRET"), tmp_path / "o.sqlite3")
    monkeypatch.setenv("SHORT_SECRET", "short")
    with pytest.raises(WebhookError, match="5 bytes: use 24 to 512"):
        WebhookSink(WebhookSettings("http://127.0.0.1:9/x", secret_env="SHORT_SECRET"), tmp_path / "o.sqlite3")
    monkeypatch.setenv("BAD_SECRET", "whsec_not base64!")
    with pytest.raises(WebhookError, match="not base64"):
        WebhookSink(WebhookSettings("http://127.0.0.1:9/x", secret_env="BAD_SECRET"), tmp_path / "o.sqlite3")


def test_webhook_tables_and_flags_are_checked():
    where = "[[webhook]] number 1 in run.toml"
    settings = parse_webhook_table({"url": "https://example.net/hook", "events": ["alert"], "secret-env": "HOOK_KEY",
                                    "timeout-s": 2, "streams": ["door", 1], "max-age-s": 3600}, where)
    assert settings == WebhookSettings("https://example.net/hook", frozenset({"alert"}), "HOOK_KEY", 2.0,
                                       ("door", "1"), 3600.0)
    assert parse_webhook_table({"url": "http://h/x"}, where).events == frozenset({"alert", "caption", "summary"})
    bad = [({"url": "https://u:p@example.net/"}, "user or password.*secret-env"),
           ({"url": "ftp://example.net/"}, "http:// or https://"),
           ({"url": "example.net/hook"}, "http:// or https://"),
           ({"url": "https://example.net:99999/"}, "not a valid URL"),
           ({"url": "https://example.net/#x"}, "fragment"),
           ({}, "has no url"),
           ({"url": "https://e/", "secret": "x"}, "unknown key 'secret' in \\[\\[webhook\\]\\] number 1 in run.toml"),
           ({"url": "https://e/", "events": ["caption", "frame"]}, "events in"),
           ({"url": "https://e/", "timeout-s": 0}, "timeout-s in .* from 0.1 to 300"),
           ({"url": "https://e/", "secret-env": "not a name"}, "secret-env in"),
           ({"url": "https://e/", "streams": "door"}, "streams in")]
    for table, message in bad:
        with pytest.raises(WebhookError, match=message):
            parse_webhook_table(table, where)
    with pytest.raises(WebhookError, match="--webhook: .*user or password"):
        parse_webhook_flag("https://user:secret@example.net/")
    assert parse_webhook_flag("https://example.net/hook?x=1").url == "https://example.net/hook?x=1"
    assert redact_url("https://example.net:8443/hook?token=s3cret#f") == "https://example.net:8443/hook"
