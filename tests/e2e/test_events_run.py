"""`vision-host run` with its events wired from a run file: an alert rule over structured answers,
a signed webhook, a real MQTT broker with Home Assistant discovery, the caption history and the
stats, all fed by one run on real footage with the stand-in answering in JSON."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import itertools
import json
import threading

import pytest

from conftest import SAMPLE_CLIP
from mosquitto import Mosquitto, Subscriber, mosquitto_binary
from ollama_standin import OllamaStandin
from vision_host.cli import main

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"a secret of at least 24 bytes!!").decode()


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 recording (headers, body) of each POST, answering 204."""

    def __init__(self):
        self.posts: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def _verified(headers: dict, body: bytes) -> bool:
    """Standard Webhooks: v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), key = the base64 after whsec_."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig == "v1," + expected for sig in headers["webhook-signature"].split())


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
def test_a_run_sends_captions_and_alert_edges_to_the_webhook_the_broker_and_the_history(tmp_path, monkeypatch, capsys):
    # Answers in blocks: a person for three requests, then nobody for three, and so on.
    answers = itertools.cycle(['{"person": true, "count": 2}'] * 3 + ['{"person": false, "count": 0}'] * 3)
    lock = threading.Lock()

    def reply(prompt, jpeg):
        with lock:
            return next(answers)

    server = OllamaStandin(latency_s=0.01, reply=reply)
    receiver = Receiver()
    broker = Mosquitto(tmp_path / "broker").start()
    subscriber = Subscriber(broker.port, ["vision-host/#", "homeassistant/#"])
    monkeypatch.setenv("DOOR_HOOK_SECRET", SECRET)
    history, stats = tmp_path / "history.sqlite3", tmp_path / "stats.json"
    run_file = tmp_path / "door.toml"
    run_file.write_text(f"""
[main]
source = "{SAMPLE_CLIP}"
output = "file"
destination = "{tmp_path / 'door.mp4'}"
stats = "{stats}"

[processing]
pipeline = ["ollama"]

[config]
ollama-url = "{server.url}"
ollama-interval-ms = "0"
ollama-format = "json"

[[alert]]
name = "person"
when = "fields.person == true"

[[webhook]]
url = "{receiver.url}"
secret-env = "DOOR_HOOK_SECRET"

[mqtt]
url = "{broker.url}"
node-id = "door-test"

[events]
outbox = "{tmp_path / 'outbox.sqlite3'}"

[history]
path = "{history}"
""")
    try:
        rc = main(["run", "-f", str(run_file), "--no-pace", "--max-frames", "240"])
        err = capsys.readouterr().err
        assert rc == 0, err

        # -- the webhook: every event, signed, in order; the edges follow the answers
        events = [json.loads(body) for _, body in receiver.posts]
        assert all(_verified(headers, body) for headers, body in receiver.posts)
        captions = [e for e in events if e["type"] == "caption"]
        edges = [e for e in events if e["type"] == "alert"]
        result = json.loads(stats.read_text())
        assert len(captions) == result["captions"]["completed"] >= 6
        expected, on = [], False
        for e in events:                       # replay the rule on the captions as they came
            if e["type"] != "caption":
                continue
            match = e["fields"]["person"] is True
            if match != on:
                on = match
                expected.append(("ON" if on else "OFF", e["id"]))
        got = []
        for e in edges:
            caption_index = next(i for i, c in enumerate(events) if c["type"] == "caption" and
                                 c["time"] == e["caption"]["time"] and c["text"] == e["caption"]["text"])
            got.append((e["state"], events[caption_index]["id"]))
        assert got == expected and len(got) >= 2
        # each edge comes right after the caption that caused it
        for e in edges:
            before = events[events.index(e) - 1]
            assert before["type"] == "caption" and before["frame_index"] == e["caption"]["frame_index"]

        # -- the broker: the captions, the alert state (retained), the discovery configs
        subscriber.wait(lambda ms: len([m for m in ms if m.topic == "vision-host/0/caption"]) >= len(captions),
                        20, "every caption on the broker")
        ids = [json.loads(m.payload)["id"] for m in subscriber.on("vision-host/0/caption")]
        assert list(dict.fromkeys(ids)) == [c["id"] for c in captions]     # same ids as the webhook's, in order
        states = [m.payload.decode() for m in subscriber.on("vision-host/0/alert/person")]
        assert states[0] == "OFF" and states[1:] == [s for s, _ in expected]
        configs = [m for m in subscriber.messages if m.topic.startswith("homeassistant/")]
        sensor = next(json.loads(m.payload) for m in configs if "/binary_sensor/" in m.topic and m.payload)
        assert sensor["state_topic"] == "vision-host/0/alert/person" and sensor["payload_on"] == "ON"
        kinds = {m.topic.split("/")[1] for m in configs}
        assert kinds == {"sensor", "image", "binary_sensor"}
        assert all(subscriber.on(t)[-1].payload == b"" for t in {m.topic for m in configs})   # removed on exit
        assert subscriber.on("vision-host/status")[-1].payload == b"offline"

        # -- the history: every caption, searchable by the command
        assert main(["history", "list", "--history", str(history), "--json", "--kind", "caption", "--limit", "1000"]) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in listed] == [c["text"] for c in captions]
        assert main(["history", "list", "--history", str(history), "--json", "--kind", "alert", "--limit", "1000"]) == 0
        assert [r["state"] for r in map(json.loads, capsys.readouterr().out.splitlines())] == [s for s, _ in expected]

        # -- the stats
        assert result["events"]["alerts"]["fired"] == sum(1 for s, _ in expected if s == "ON")
        kinds = {s["kind"]: s for s in result["events"]["sinks"]}
        assert kinds["webhook"]["delivered"] == len(events) and kinds["webhook"]["dropped"] == 0
        assert kinds["history"]["delivered"] == len(captions) + len(edges)
    finally:
        subscriber.close()
        broker.kill()
        receiver.shutdown()
        server.stop()


def test_event_settings_errors_stop_the_run_before_it_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    base = ["run", "-p", "ollama", "-s", str(SAMPLE_CLIP), "-o", "file", "-d", str(tmp_path / "x.mp4"),
            "-c", "ollama-url=http://127.0.0.1:9", "--no-history"]
    cases = [(["--alert", "bad=fields.count >="], "bad"),
             (["--alert", "a=text.contains('x')", "--alert", "a=true"], "two alert rules are named 'a'"),
             (["--mqtt", "http://127.0.0.1:1883"], "mqtt"),
             (["--webhook", "ftp://127.0.0.1/x"], "http"),
             (["--webhook", "http://user:pw@127.0.0.1/x"], "secret")]
    for flags, why in cases:
        rc = main(base + flags)
        err = capsys.readouterr().err
        assert rc == 2 and why in err, (flags, err)
    run_file = tmp_path / "bad.toml"
    run_file.write_text('[[webhook]]\nurl = "http://127.0.0.1:9/x"\nsecret-env = "NO_SUCH_SECRET"\n')
    rc = main(base + ["-f", str(run_file)])
    err = capsys.readouterr().err
    assert rc == 2 and "NO_SUCH_SECRET" in err, err
    assert not (tmp_path / "x.mp4").exists()
