"""Summaries of the caption history (``vision-host summarize``, ``[[summary]]`` tables) against
real servers on 127.0.0.1: the Ollama stand-in's text-only chat on both APIs, chunking of a
2 000-caption window, a model's refusal passed on, the CLI on a history the test fills, the
periodic summaries through a real webhook receiver and a real mosquitto broker, and (slow)
``vision-host serve`` with a tiny random-weight LLaVA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mosquitto import MISSING_REASON, Mosquitto, Subscriber, mosquitto_binary
from ollama_standin import OllamaStandin
from vision_host.captions import (
    CaptionBus,
    CaptionEvent,
    CaptionSubscriber,
    SummaryEvent,
)
from vision_host.cli import main
from vision_host.history import HistoryStore
from vision_host.history.summaries import (
    DEFAULT_MAX_CHUNK_CHARS,
    Caption,
    PeriodicSummaries,
    SummaryError,
    SummarySchedule,
    caption_lines,
    parse_summary_table,
    summarize,
)
from vision_host.sinks.outbox import Outbox
from vision_host.sinks.payloads import event_json
from vision_host.sinks.webhook import WebhookSettings, WebhookSink

WAIT_S = 20.0
#: What vision-host serve answers for a model that cannot chat (the stand-in says it the same way).
REFUSAL = "blip:latest cannot chat: it only captions images. Summaries need a model that can chat, such as llava"


def at(hour: int, minute: int, second: int) -> float:
    """Today's local HH:MM:SS as seconds since the epoch."""
    return datetime.now().replace(hour=hour, minute=minute, second=second, microsecond=0).timestamp()


def few_captions() -> list[Caption]:
    return [Caption(at(10, 0, 0), "door", "a red car parks in front of the door"),
            Caption(at(10, 0, 30), "yard", "a dog crosses the yard"),
            Caption(at(10, 1, 5), "door", "a man in a blue coat rings the bell")]


def chats(server: OllamaStandin) -> list:
    return [r for r in server.requests if r.path in ("/api/chat", "/v1/chat/completions")]


# -- one window, both APIs ----------------------------------------------------------------------

def test_a_short_window_is_one_text_only_chat_on_the_ollama_api(standin):
    captions = few_captions()
    summary = summarize(captions, {"url": standin.url, "api": "generate"}, model="llava")
    [request] = chats(standin)
    assert request.path == "/api/chat" and request.images == ()
    assert request.body["stream"] is False and request.body["model"] == "llava"
    assert request.body["options"]["num_predict"] > 0
    [message] = request.body["messages"]
    assert message["role"] == "user" and "images" not in message
    for line in ("10:00:00 [door] a red car parks in front of the door", "10:00:30 [yard] a dog crosses the yard",
                 "10:01:05 [door] a man in a blue coat rings the bell"):
        assert line in message["content"]
    assert "MOMENTS" in message["content"]           # the prompt asks for the moments and their times
    assert (summary.chunks, summary.requests, summary.caption_count) == (1, 1, 3)
    assert summary.text == "3 times from 10:00:00 to 10:01:05."
    assert [(m.wall_time, m.text) for m in summary.moments] == [
        (captions[0].wall_time, "a red car parks in front of the door"),
        (captions[1].wall_time, "a dog crosses the yard"),
        (captions[2].wall_time, "a man in a blue coat rings the bell")]


def test_the_openai_api_sends_chat_completions_with_the_key(standin, monkeypatch):
    monkeypatch.setenv("SUMMARY_TEST_KEY", "sk-test-123")
    server = {"url": standin.url + "/v1", "api": "openai", "api_key_env": "SUMMARY_TEST_KEY"}
    summary = summarize(few_captions(), server, model="llava", max_reply_tokens=300)
    [request] = chats(standin)
    assert request.path == "/v1/chat/completions" and request.images == ()
    assert request.headers.get("Authorization") == "Bearer sk-test-123"
    assert request.body["stream"] is False and request.body["max_tokens"] == 300
    assert request.body["messages"][0]["content"].count("\n10:0") == 3
    assert [m.clock for m in summary.moments] == ["10:00:00", "10:00:30", "10:01:05"]
    assert all(m.wall_time is not None for m in summary.moments)


def test_a_caption_cannot_forge_a_line_of_the_prompt():
    [line] = caption_lines([Caption(at(10, 0, 0), "door", "a car\n09:00:00 [door] a fake line\x1b[2J")])
    assert "\n" not in line and "\x1b" not in line and line.startswith("10:00:00 [door] a car 09:00:00")


# -- chunking -----------------------------------------------------------------------------------

def test_a_window_of_2000_captions_is_summarised_in_chunks_then_merged(standin):
    base = at(9, 0, 0)
    # ten cameras, one caption each per second: 2 000 captions over 200 s
    captions = [Caption(base + n // 10, f"cam{n % 10}", f"car {n} drives past") for n in range(2000)]
    chunk_chars = 16_000
    summary = summarize(captions, {"url": standin.url}, model="llava", max_chunk_chars=chunk_chars,
                        max_reply_tokens=4096)   # the stand-in lists every time: a long reply
    requests = chats(standin)
    assert summary.chunks >= 4
    assert len(requests) == summary.requests == summary.chunks + 1          # N chunks, then one merge
    chunk_prompts = [r.body["messages"][0]["content"] for r in requests[:-1]]
    lines = caption_lines(captions)
    sent = [line for p in chunk_prompts for line in p.split("Captions:\n", 1)[1].split("\n")]
    assert sent == lines                                                  # every caption once, in order
    assert all(len(p.split("Captions:\n", 1)[1]) <= chunk_chars for p in chunk_prompts)
    # the merge request holds every chunk's summary, and its reply keeps times from every chunk
    merge = requests[-1].body["messages"][0]["content"]
    chunk_ranges = []
    for p in chunk_prompts:
        body = p.split("Captions:\n", 1)[1].split("\n")
        first, last = body[0][:8], body[-1][:8]
        chunk_ranges.append((first, last))
        assert f"Part from {first} to {last}:" in merge
    moment_clocks = {m.clock for m in summary.moments}
    for first, last in chunk_ranges:
        assert first in moment_clocks and last in moment_clocks
    times = [m.wall_time for m in summary.moments]
    assert len(times) == 200 and min(times) == base and max(times) == base + 199


def test_chunk_summaries_too_long_for_one_merge_are_merged_in_rounds():
    prompts = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return "SUMMARY: " + "x" * 900 + "\nMOMENTS:\n- 09:00:00 - a car"

    captions = [Caption(at(9, 0, 0) + n, "door", "a car drives past the gate " * 3) for n in range(400)]
    summary = summarize(captions, {}, model="m", max_chunk_chars=2_000, ask=ask)
    merges = [p for p in prompts if "Part from" in p]
    assert summary.chunks == len(prompts) - len(merges) > 8
    assert len(merges) > 1 and all(len(p) < 2_000 + 1_000 for p in merges)    # each fits one request
    assert summary.moments[0].text == "a car"


def test_a_window_too_long_is_refused_before_any_request(standin):
    captions = [Caption(at(9, 0, 0) + n, "door", "w" * 400) for n in range(1200)]
    with pytest.raises(SummaryError, match="shorter window"):
        summarize(captions, {"url": standin.url}, model="llava", max_chunk_chars=1_000)
    assert chats(standin) == []


# -- refusals and failures ----------------------------------------------------------------------

@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_model_that_cannot_chat_gets_the_servers_sentence(standin, api):
    standin.text_only_error = REFUSAL
    with pytest.raises(SummaryError) as caught:
        summarize(few_captions(), {"url": standin.url, "api": api}, model="llava")
    assert REFUSAL in str(caught.value) and standin.url in str(caught.value)


def test_unreachable_server_unknown_model_and_workers_ai_are_sentences(standin):
    with OllamaStandin() as gone:
        dead_url = gone.url
    with pytest.raises(SummaryError, match="cannot reach the server at .* start it"):
        summarize(few_captions(), {"url": dead_url}, model="llava", timeout_s=5)
    with pytest.raises(SummaryError, match="has no model 'nope'.*ollama pull nope"):
        summarize(few_captions(), {"url": standin.url}, model="nope")
    with pytest.raises(SummaryError, match="Workers AI"):
        summarize(few_captions(), {"url": standin.url, "api": "workers-ai"}, model="llava")
    standin.latency_s = 3
    with pytest.raises(SummaryError, match="did not answer .* within 0.5 s"):
        summarize(few_captions(), {"url": standin.url}, model="llava", timeout_s=0.5)


# -- the CLI ------------------------------------------------------------------------------------

@pytest.fixture
def history(tmp_path):
    """A history with captions of the last ten minutes (door and yard) and one from two hours ago."""
    path = tmp_path / "history.sqlite3"
    now = time.time()
    with HistoryStore(path) as store:
        store.add_caption(CaptionEvent("an old caption", 0, now - 7200, 0, "cam", stream=0, stream_name="door"))
        for n in range(6):
            name = "door" if n % 2 == 0 else "yard"
            store.add_caption(CaptionEvent(f"event number {n} on the {name}", n, now - 600 + n * 60, n, "cam",
                                           model="llava", stream=n % 2, stream_name=name))
    return path


def test_cli_prints_the_summary_and_the_moments(history, standin, capsys):
    code = main(["summarize", "--since", "1h", "--history", str(history), "--url", standin.url])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("Summary of 6 captions from ")
    assert "6 times from" in out and "Notable moments:" in out
    assert "event number 0 on the door" in out and "event number 5 on the yard" in out
    assert "an old caption" not in chats(standin)[0].body["messages"][0]["content"]

    code = main(["summarize", "--since", "1h", "--stream", "yard", "--history", str(history), "--url", standin.url,
                 "--api", "openai", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["caption_count"] == 3 and result["requests"] == 1 and result["model"] == "llava"
    assert [m["text"] for m in result["moments"]] == [f"event number {n} on the yard" for n in (1, 3, 5)]
    assert all(m["time"].endswith("Z") for m in result["moments"])
    assert chats(standin)[-1].path == "/v1/chat/completions"


def test_cli_empty_window_refusal_and_bad_flags(history, standin, capsys):
    assert main(["summarize", "--since", "1h", "--stream", "garage", "--history", str(history),
                 "--url", standin.url]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("No captions of stream garage between ") and "nothing to summarise" in out
    assert chats(standin) == []

    standin.text_only_error = REFUSAL
    assert main(["summarize", "--since", "1h", "--history", str(history), "--url", standin.url]) == 1
    _, err = capsys.readouterr()
    assert REFUSAL in err and err.startswith("vision-host: ")

    assert main(["summarize", "--since", "soon", "--history", str(history)]) == 2
    assert "cannot read the time 'soon'" in capsys.readouterr().err
    assert main(["summarize", "--since", "1h", "--history", str(history.parent / "none.sqlite3")]) == 2
    assert "no caption history at" in capsys.readouterr().err


def test_cli_keeps_the_latest_captions_when_the_window_holds_too_many(history, standin, capsys):
    assert main(["summarize", "--since", "1h", "--history", str(history), "--url", standin.url,
                 "--max-captions", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "more than 2 captions" in err
    result = json.loads(out)
    assert result["caption_count"] == 2 and result["window_cut"] is True
    assert [m["text"] for m in result["moments"]] == ["event number 4 on the door", "event number 5 on the yard"]


@pytest.mark.slow
def test_cli_process_uses_ollama_host(history, standin):
    env = dict(os.environ, OLLAMA_HOST=standin.url.removeprefix("http://"))
    done = subprocess.run([sys.executable, "-m", "vision_host", "summarize", "--since", "1h", "--history",
                           str(history)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Summary of 6 captions" in done.stdout and len(chats(standin)) == 1


# -- [[summary]] tables ---------------------------------------------------------------------------

def test_summary_tables_are_checked():
    s = parse_summary_table({"every": "15m"}, "[[summary]] number 1")
    assert (s.name, s.every_s, s.streams, s.sinks, s.prompt) == ("summary", 900.0, (), {"mqtt", "webhook"}, None)
    s = parse_summary_table({"every": "1d", "streams": ["door"], "sinks": ["mqtt"], "name": "daily",
                             "max-captions": 50, "prompt": "Be brief."}, "t")
    assert (s.every_s, s.streams, s.sinks, s.max_captions, s.prompt) == (86400.0, ("door",), {"mqtt"}, 50, "Be brief.")
    for table, words in [({"every": "30s"}, "use 1 minute"), ({"every": "8d"}, "7 days"),
                         ({"every": "hourly"}, "a duration"), ({}, "has no every"),
                         ({"every": "1h", "sinks": ["email"]}, "sinks in t"),
                         ({"every": "1h", "max-captions": 0}, "max-captions in t"),
                         ({"every": "1h", "every-s": 1, "stream": "x"}, "unknown keys 'every-s', 'stream' in t")]:
        with pytest.raises(ValueError, match=words):
            parse_summary_table(table, "t")


class Recorder(CaptionSubscriber):
    def __init__(self):
        self.summaries: list[SummaryEvent] = []
        self.cond = threading.Condition()

    def add(self, event):
        pass

    def summary(self, event):
        with self.cond:
            self.summaries.append(event)
            self.cond.notify_all()

    def wait(self, n: int) -> list[SummaryEvent]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.summaries) >= n, WAIT_S), f"{len(self.summaries)} summaries"
            return list(self.summaries)


def caption(n: int, name: str, stream: int = 0, text: str | None = None) -> CaptionEvent:
    return CaptionEvent(text or f"{name} caption {n}", n, time.time(), n, "cam", model="llava", stream=stream,
                        stream_name=name)


def test_periodic_window_is_bounded_and_counts_what_it_dropped(standin):
    bus = CaptionBus()
    recorder = bus.subscribe(Recorder())
    clock = [0.0]
    summaries = PeriodicSummaries([SummarySchedule(name="door", every_s=60, streams=("door",), max_captions=3)],
                                  bus, {"url": standin.url, "model": "llava"}, clock=lambda: clock[0])
    try:
        for n in range(5):
            bus.publish(caption(n, "door"))
            bus.publish(caption(n, "yard", stream=1))
        assert chats(standin) == []
        clock[0] = 61.0                                # the period ends
        [event] = recorder.wait(1)
    finally:
        summaries.close()
    assert (event.name, event.caption_count, event.dropped, event.streams) == ("door", 3, 2, ("door",))
    prompt = chats(standin)[0].body["messages"][0]["content"]
    assert "door caption 4" in prompt and "door caption 1" not in prompt and "yard" not in prompt
    assert bus.summaries_published == 1 and summaries.states()[0]["published"] == 1


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason=MISSING_REASON)
def test_periodic_summaries_reach_a_webhook_and_the_broker(tmp_path, standin):
    received, cond = [], threading.Condition()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with cond:
                received.append(json.loads(body))
                cond.notify_all()
            self.send_response(204)
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    broker = Mosquitto(tmp_path / "broker").start()
    from vision_host.sinks.mqtt import MqttSettings, MqttSink
    subscriber = Subscriber(broker.port, ["vision-host/summary/#"])
    bus = CaptionBus()
    webhook = bus.subscribe(WebhookSink(WebhookSettings(f"http://127.0.0.1:{httpd.server_address[1]}/hook"),
                                        tmp_path / "outbox.sqlite3", backoff_base_s=0.05, backoff_cap_s=0.2))
    mqtt = bus.subscribe(MqttSink(MqttSettings(host="127.0.0.1", port=broker.port, node_id="t", discovery=False),
                                  Outbox(tmp_path / "mqtt.sqlite3", "mqtt"), [(0, "door")], []))
    schedules = [SummarySchedule(name="door watch", every_s=0.5, streams=("door",)),
                 SummarySchedule(name="yard", every_s=0.5, streams=("yard",), sinks=frozenset({"mqtt"}))]
    summaries = PeriodicSummaries(schedules, bus, {"url": standin.url, "api": "chat", "model": "llava"})
    try:
        for n in range(3):
            bus.publish(caption(n, "door", text=f"a van stops at the door ({n})"))
        bus.publish(caption(9, "yard", stream=1))
        with cond:   # the webhook takes every kind of event by default: captions too
            assert cond.wait_for(lambda: any(b["type"] == "summary" for b in received), WAIT_S), \
                "no summary reached the webhook"
        message = subscriber.wait(lambda ms: next((m for m in ms if m.topic == "vision-host/summary/door watch"), None),
                                  WAIT_S, "the summary on the broker")
        subscriber.wait(lambda ms: any(m.topic == "vision-host/summary/yard" for m in ms), WAIT_S, "the yard summary")
    finally:
        summaries.close()
        webhook.close()
        mqtt.close()
        subscriber.close()
        broker.kill()
        httpd.shutdown()
        httpd.server_close()
    assert [b["text"] for b in received if b["type"] == "caption"][:3] == [f"a van stops at the door ({n})"
                                                                           for n in range(3)]
    hook = next(b for b in received if b["type"] == "summary")
    assert hook["type"] == "summary" and hook["name"] == "door watch" and hook["streams"] == ["door"]
    assert hook["caption_count"] == 3 and hook["model"] == "llava" and " times from " in hook["text"]
    assert hook["moments"][0]["text"].startswith("a van stops at the door")
    assert all(m["time"] is not None for m in hook["moments"])
    assert all(b.get("name") != "yard" for b in received)             # that one goes to mqtt only
    on_broker = json.loads(message.payload)
    assert on_broker["type"] == "summary" and on_broker["id"] == hook["id"] and not message.retain


def test_summary_payload_shape():
    event = SummaryEvent(name="n", streams=("door",), since=0.0, until=3600.0, text="t",
                         moments=((60.0, "a"), (None, "b")), model="llava", caption_count=2)
    body = event_json(event)
    assert body == {"id": event.id, "type": "summary", "name": "n", "streams": ["door"],
                    "since": "1970-01-01T00:00:00.000Z", "until": "1970-01-01T01:00:00.000Z",
                    "time": "1970-01-01T01:00:00.000Z", "text": "t",
                    "moments": [{"time": "1970-01-01T00:01:00.000Z", "text": "a"}, {"time": None, "text": "b"}],
                    "model": "llava", "caption_count": 2, "dropped": 0}


def test_the_default_chunk_fits_a_small_context():
    # about four characters a token: a chunk, the instructions and a reply fit 2 048 tokens
    from vision_host.history.summaries import CHUNK_PROMPT, DEFAULT_MAX_REPLY_TOKENS
    assert (DEFAULT_MAX_CHUNK_CHARS + len(CHUNK_PROMPT)) / 4 + DEFAULT_MAX_REPLY_TOKENS < 2048


# -- vision-host serve with a tiny LLaVA (and BLIP's refusal) ------------------------------------

@pytest.mark.slow
def test_summaries_against_vision_host_serve(tmp_path):
    for module in ("torch", "transformers", "fastapi", "uvicorn", "PIL"):
        pytest.importorskip(module)
    from tiny_models import build_tiny_blip, build_tiny_llava

    llava = build_tiny_llava(tmp_path / "tiny-llava")
    blip = build_tiny_blip(tmp_path / "tiny-blip")
    captions = few_captions()[:2]
    from test_serve import serve_process

    with serve_process(llava, tmp_path / "llava.log") as url:
        for api in ("ollama", "openai"):
            summary = summarize(captions, {"url": url, "api": api}, model="tiny-llava", max_reply_tokens=16,
                                timeout_s=120)
            assert summary.requests == 1 and summary.caption_count == 2
            assert summary.reply.strip()                    # the tiny model's nonsense words, but an answer
    with serve_process(blip, tmp_path / "blip.log") as url:
        with pytest.raises(SummaryError, match="cannot answer text-only requests") as caught:
            summarize(captions, {"url": url}, model="tiny-blip", timeout_s=60)
        assert "refused the summary request" in str(caught.value)


def test_the_run_checks_and_starts_its_summary_tables(standin):
    from vision_host.cli.event_settings import EventSettings, event_settings
    from vision_host.cli.settings import UsageError
    from vision_host.sinks.event_sinks import EventSinks, EventSinksError

    with pytest.raises(UsageError, match=r"every in \[\[summary\]\] number 2 is '30s': use 1 minute"):
        event_settings({"history": False, "summary_tables": [{"every": "1h"}, {"every": "30s"}]}, ["door"])
    settings = event_settings({"history": False, "summary_tables": [{"every": "1h", "streams": ["door"]}],
                               "config": {"ollama-url": standin.url, "ollama-model": "llava"}}, ["door"])
    bus = CaptionBus()
    sinks = EventSinks(settings, bus, [(0, "door")])
    try:
        assert isinstance(sinks.summaries, PeriodicSummaries) and sinks.summaries.model == "llava"
        bus.publish(caption(0, "door"))
        assert sinks.summaries.states()[0]["captions"] == 1
    finally:
        sinks.close()
    for tables, server, words in [([{"every": "1h"}, {"every": "2h"}], {}, "two \\[\\[summary\\]\\] tables"),
                                  ([{"every": "1h"}], {"api": "workers-ai"}, "Workers AI")]:
        with pytest.raises(EventSinksError, match=words) as caught:
            EventSinks(EventSettings(summaries=tuple(tables), server=server), CaptionBus(), [(0, "door")])
        assert caught.value.usage
