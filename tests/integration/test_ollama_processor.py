"""The `ollama` processor (wasm/ollama.wasm) against a local server speaking Ollama's API."""

from __future__ import annotations

import base64
import functools
import logging
import socket
import time

import cv2
import numpy as np
import pytest

from conftest import CAR_CLIP, REPO
from ollama_driver import OLLAMA_WASM, feed_until, load_ollama
from ollama_standin import OllamaStandin
from vision_host.runtime import NetworkPolicy


_processor = functools.partial(load_ollama, ollama_interval_ms=100)
_run_until = feed_until


@pytest.fixture
def standin():
    server = OllamaStandin(models=["llava:latest", "bakllava:latest"])
    yield server
    server.stop()






def test_streams_a_caption_into_the_store_and_onto_the_frame(runtime_factory, standin, real_frame):
    standin.token_delay_s = 0.05
    standin.reply = lambda prompt, jpeg: "Bottles stand proud, gleaming blue caps"
    rt, p = _processor(runtime_factory, standin.url)
    store = rt.processor_store
    assert np.array_equal(p.process(real_frame.copy()), real_frame)     # nothing drawn before a caption
    partial_seen = []

    def done():
        out = p.process(real_frame.copy())
        if store.get("captions", "caption") is None and not np.array_equal(out, real_frame):
            partial_seen.append(out)                                   # tokens shown while streaming
        return store.get("captions", "caption") is not None
    out = _run_until(p, real_frame, done)
    assert store.get("captions", "caption") == "Bottles stand proud, gleaming blue caps"
    assert partial_seen, "the caption should grow on screen while tokens arrive"
    assert not np.array_equal(out, real_frame)
    assert (np.abs(out[-40:].astype(int) - real_frame[-40:]).mean()) > 10      # band at the bottom
    assert np.array_equal(out[:200], real_frame[:200])
    req = standin.requests[0]
    assert req.path == "/api/generate" and req.body["stream"] is True and req.body["model"] == "llava"
    assert req.body["options"]["num_predict"] == 40
    assert rt.fetch_stats.completed >= 1


@pytest.mark.slow
def test_one_request_in_flight_and_the_current_frame_is_sent(runtime_factory, standin):
    standin.latency_s = 0.5
    rt, p = _processor(runtime_factory, standin.url, ollama_interval_ms=0, ollama_image_max_side=320)
    cap = cv2.VideoCapture(str(CAR_CLIP))
    frames = [cap.read()[1] for _ in range(40)]
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 1.3:
        p.process(frames[i % 40].copy())
        i += 1
        time.sleep(0.01)
        assert rt.fetch_stats.started - rt.fetch_stats.completed - rt.fetch_stats.failed <= 1
    assert 2 <= len(standin.requests) <= 3
    first = standin.requests[0]
    assert max(first.width, first.height) == 320          # downscaled to the max side
    jpeg = base64.b64decode(first.body["images"][0])
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    expected = cv2.resize(frames[0], (320, 180), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded.astype(int) - expected).mean() < 4   # it is the frame that was current


def test_prompt_is_escaped_exactly(runtime_factory, standin, real_frame):
    prompt = 'Say "hi"\\ then\nnew line, tab\there, café ☕ 日本, and %IMAGE% literally'
    rt, p = _processor(runtime_factory, standin.url, ollama_prompt=prompt, ollama_model="bakllava")
    _run_until(p, real_frame, lambda: len(standin.requests) >= 1)
    body = standin.requests[0].body
    assert body["prompt"] == prompt and body["model"] == "bakllava"
    assert standin.requests[0].width == 640                 # %IMAGE% in the prompt did not steal the image


def test_unicode_caption_survives_and_is_drawn(runtime_factory, standin, real_frame):
    standin.reply = lambda prompt, jpeg: 'Jolies bouteilles "bleues" — très élégantes ✨'
    rt, p = _processor(runtime_factory, standin.url)
    _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    assert rt.processor_store.get("captions", "caption") == 'Jolies bouteilles "bleues" — très élégantes ✨'


@pytest.mark.parametrize("failure, setup, message", [
    ("model", lambda s: None, "model mistral not found: run `ollama pull mistral`"),
    ("http500", lambda s: setattr(s, "failure", "http500"), "server error 500: llama runner process has terminated"),
    ("malformed", lambda s: setattr(s, "failure", "malformed"), "malformed reply from"),
    ("midstream", lambda s: setattr(s, "failure", "midstream_error"), "error from Ollama: llama runner"),
    ("reset", lambda s: setattr(s, "failure", "reset"), "connection"),
])
def test_server_failures_are_shown_and_logged_once(runtime_factory, standin, real_frame, caplog,
                                                   failure, setup, message):
    setup(standin)
    model = "mistral" if failure == "model" else "llava"
    rt, p = _processor(runtime_factory, standin.url, ollama_model=model)
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        out = _run_until(p, real_frame, lambda: rt.fetch_stats.failed + rt.fetch_stats.completed >= 3
                         and message.split(":")[0] in caplog.text, timeout_s=15)
    assert message in caplog.text
    assert caplog.text.count(message) == 1                    # logged once, not per frame
    assert not np.array_equal(out, real_frame)                # the problem is shown on the video
    assert p.stats.errors == 0 and not p.disabled             # the processor itself is healthy


@pytest.mark.slow
def test_unreachable_server_backs_off_and_recovers(runtime_factory, real_frame, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rt, p = _processor(runtime_factory, url)
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "retrying in 2 s" in caplog.text, timeout_s=6)
        attempts = rt.fetch_stats.failed
        assert attempts == 2 and "cannot reach Ollama at " + url + ", retrying in 1 s" in caplog.text
        server = OllamaStandin(port=port)          # the server comes up where the processor looks
        try:
            _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None, timeout_s=8)
        finally:
            server.stop()
    assert "is answering" in caplog.text


@pytest.mark.slow
def test_timeout_cancels_the_request(runtime_factory, standin, real_frame, caplog):
    standin.failure = "hang"
    rt, p = _processor(runtime_factory, standin.url, ollama_timeout_ms=1000)
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "timed out" in caplog.text, timeout_s=5)
    assert f"Ollama at {standin.url} timed out" in caplog.text
    assert p.ctx.fetch.in_flight <= 1


def test_not_allowed_destination_stops_requests(runtime_factory, real_frame, caplog):
    cfg = {"ollama-url": "http://198.51.100.7:11434", "ollama-interval-ms": "0"}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy(allowed={"127.0.0.1:11434"}))
    p = rt.load(OLLAMA_WASM)
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            p.process(real_frame.copy())
    assert "http://198.51.100.7:11434 is not an allowed destination" in caplog.text
    assert caplog.text.count("not an allowed destination") == 2   # host's hint + processor's state, once each


def test_invalid_config_values_fall_back_with_one_error(runtime_factory, standin, real_frame, caplog):
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        rt, p = _processor(runtime_factory, standin.url, ollama_max_tokens="lots", ollama_font_scale="-3")
        for _ in range(5):
            p.process(real_frame.copy())
    assert "ollama-max-tokens" in caplog.text and "ollama-font-scale" in caplog.text
    _run_until(p, real_frame, lambda: len(standin.requests) >= 1)
    assert standin.requests[0].body["options"]["num_predict"] == 40


@pytest.mark.parametrize("api, path", [("chat", "/api/chat"), ("openai", "/v1/chat/completions")])
def test_other_wire_protocols_stream_the_same_caption(runtime_factory, standin, real_frame, api, path):
    """`ollama-api=chat` speaks Ollama's /api/chat (NDJSON `message.content`); `openai`
    speaks OpenAI chat completions (SSE `choices[0].delta.content`, `data: [DONE]`), here
    as Ollama's own /v1 serves them. Both stream under the stand-in's chunk cutting."""
    standin.token_delay_s = 0.02
    standin.reply = lambda prompt, jpeg: "Two people pass the table, café ☕ open"
    rt, p = _processor(runtime_factory, standin.url, ollama_api=api, ollama_model="bakllava",
                       ollama_prompt='Say "what" you %IMAGE% see', ollama_max_tokens=25)
    store = rt.processor_store
    out = _run_until(p, real_frame, lambda: store.get("captions", "caption") is not None)
    assert store.get("captions", "caption") == "Two people pass the table, café ☕ open"
    assert p.last_error is None
    req = standin.requests[0]
    assert req.path == path and req.body["stream"] is True and req.body["model"] == "bakllava"
    (message,) = req.body["messages"]
    if api == "chat":
        assert message["content"] == 'Say "what" you %IMAGE% see'
        jpeg = base64.b64decode(message["images"][0])
        assert req.body["options"]["num_predict"] == 25
    else:
        image, text = message["content"]
        assert text == {"type": "text", "text": 'Say "what" you %IMAGE% see'}
        assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
        jpeg = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
        assert req.body["max_tokens"] == 25
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (360, 640, 3)
    assert not np.array_equal(out, real_frame)


@pytest.mark.parametrize("api", ["chat", "openai"])
def test_other_protocols_report_unknown_models_and_server_errors(runtime_factory, standin, real_frame, api, caplog):
    rt, p = _processor(runtime_factory, standin.url, ollama_api=api, ollama_model="nosuch")
    with caplog.at_level(logging.WARNING):
        _run_until(p, real_frame, lambda: any("nosuch" in r.getMessage() for r in caplog.records))
    expected = "model nosuch not found" + (": run `ollama pull nosuch`" if api == "chat"
                                          else f" on the OpenAI-compatible server at {standin.url}")
    assert any(expected in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    # A runner error after streaming began: Ollama's /api sends {"error": …} as the last
    # NDJSON line; its /v1 just ends the SSE stream without a finish_reason or [DONE].
    standin.failure, standin.failure_message = "midstream_error", "the runner crashed"
    caplog.clear()
    rt, p = _processor(runtime_factory, standin.url, ollama_api=api, ollama_model="llava")
    expected = "the runner crashed" if api == "chat" else f"malformed reply from {standin.url}"
    with caplog.at_level(logging.WARNING):
        _run_until(p, real_frame, lambda: any(expected in r.getMessage() for r in caplog.records))
    assert rt.processor_store.get("captions", "caption") is None
    if api == "openai":            # servers that send an SSE error event instead
        standin.sse_error_events = True
        caplog.clear()
        rt, p = _processor(runtime_factory, standin.url, ollama_api=api, ollama_model="llava")
        with caplog.at_level(logging.WARNING):
            _run_until(p, real_frame, lambda: any("server error: the runner crashed" in r.getMessage()
                                                  for r in caplog.records))


def test_an_unknown_api_is_reported_and_the_default_used(runtime_factory, standin, real_frame, caplog):
    with caplog.at_level(logging.ERROR):
        rt, p = _processor(runtime_factory, standin.url, ollama_api="grpc")
        _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    assert any('ollama-api="grpc" is invalid (expected generate, chat, openai or workers-ai); using the default generate'
               in r.getMessage() for r in caplog.records)
    assert standin.requests[0].path == "/api/generate"


def test_an_api_key_from_the_environment_is_sent_by_the_host_and_never_shown(runtime_factory, standin, real_frame,
                                                                              caplog, monkeypatch):
    """`ollama-api-key-env=NAME`: the host reads $NAME and sends `Authorization: Bearer …` to
    the `ollama-url` destination only; the processor (and the logs) never see the key."""
    secret = "sk-test-5f3a9c1e"
    monkeypatch.setenv("VH_TEST_API_KEY", secret)
    cfg = {"ollama-url": standin.url, "ollama-interval-ms": "100", "ollama-api-key-env": "VH_TEST_API_KEY"}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    p = rt.load(OLLAMA_WASM)
    with caplog.at_level(logging.DEBUG):
        _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    assert standin.requests[0].headers.get("Authorization") == f"Bearer {secret}"
    assert secret not in caplog.text and secret not in repr(rt.policy)


def test_api_key_settings_that_cannot_work_are_refused_with_a_sentence(monkeypatch):
    from vision_host.runtime.policy import PolicyError
    monkeypatch.delenv("VH_UNSET_KEY", raising=False)
    with pytest.raises(PolicyError, match="the environment variable VH_UNSET_KEY is not set"):
        NetworkPolicy.from_config({"ollama-url": "http://127.0.0.1:1", "ollama-api-key-env": "VH_UNSET_KEY"})
    with pytest.raises(PolicyError, match="workers-api-key-env needs workers-url set"):
        NetworkPolicy.from_config({"workers-api-key-env": "HOME"})
    other = NetworkPolicy.from_config({"ollama-url": "http://127.0.0.1:1", "other-url": "http://127.0.0.1:2",
                                       "ollama-api-key-env": "HOME"})
    assert set(other.credentials) == {"http://127.0.0.1:1"}    # never sent to another destination


@pytest.fixture
def workers():
    from workers_ai_standin import WorkersAIStandin
    server = WorkersAIStandin(token="cf-5e6b1d")
    yield server
    server.stop()


def _workers_processor(runtime_factory, workers, monkeypatch, **config):
    monkeypatch.setenv("VH_TEST_CF_TOKEN", workers.token)
    return _processor(runtime_factory, workers.run_url, ollama_api="workers-ai",
                      ollama_model="@cf/llava-hf/llava-1.5-7b-hf", ollama_api_key_env="VH_TEST_CF_TOKEN", **config)


@pytest.mark.slow
def test_workers_ai_gets_the_frame_as_byte_numbers_and_a_bearer_token(runtime_factory, workers, real_frame,
                                                                      monkeypatch):
    workers.reply = lambda prompt, jpeg: f"A frame of {len(jpeg)} bytes about {prompt}"
    cfg = {"ollama-url": workers.run_url, "ollama-interval-ms": "100", "ollama-api": "workers-ai",
           "ollama-model": "@cf/llava-hf/llava-1.5-7b-hf", "ollama-api-key-env": "VH_TEST_CF_TOKEN",
           "ollama-prompt": "what %IMAGE_BYTES% is this?", "ollama-max-tokens": "30"}
    monkeypatch.setenv("VH_TEST_CF_TOKEN", workers.token)
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    p = rt.load(OLLAMA_WASM)
    out = _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    req = workers.requests[0]
    assert req.headers["Authorization"] == f"Bearer {workers.token}"
    assert req.body["prompt"] == "what %IMAGE_BYTES% is this?" and req.body["max_tokens"] == 30
    decoded = cv2.imdecode(np.frombuffer(req.image, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (360, 640, 3)
    assert rt.processor_store.get("captions", "caption") == \
        f"A frame of {len(req.image)} bytes about what %IMAGE_BYTES% is this?"
    assert not np.array_equal(out, real_frame)


@pytest.mark.slow
@pytest.mark.parametrize("setup, expected", [
    (lambda w, mp: setattr(w, "token", "rotated"), "refused the credentials (HTTP 401)"),
    (lambda w, mp: setattr(w, "failure", "http500"), "server error 500: Internal server error"),
])
def test_workers_ai_failures_are_reported(runtime_factory, workers, real_frame, monkeypatch, caplog, setup, expected):
    rt, p = _workers_processor(runtime_factory, workers, monkeypatch)
    setup(workers, monkeypatch)
    with caplog.at_level(logging.WARNING):
        _run_until(p, real_frame, lambda: any(expected in r.getMessage() for r in caplog.records))
    assert rt.processor_store.get("captions", "caption") is None


@pytest.mark.slow
def test_workers_ai_unknown_model_reads_the_envelope_error(runtime_factory, workers, real_frame, monkeypatch, caplog):
    monkeypatch.setenv("VH_TEST_CF_TOKEN", workers.token)
    rt, p = _processor(runtime_factory, workers.run_url, ollama_api="workers-ai", ollama_model="@cf/nosuch",
                       ollama_api_key_env="VH_TEST_CF_TOKEN")
    with caplog.at_level(logging.WARNING):
        _run_until(p, real_frame, lambda: any("No such model @cf/nosuch" in r.getMessage() for r in caplog.records))


# -- how messages name the server (`ollama-server-name`) -------------------------------------
def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _processor_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vision_host.processor.ollama"]


@pytest.mark.parametrize("api, name, expected", [
    ("generate", None, "Ollama"),
    ("chat", None, "Ollama"),
    ("openai", None, "the OpenAI-compatible server"),
    ("workers-ai", None, "Workers AI"),
    ("openai", "the embedded vision server (blip)", "the embedded vision server (blip)"),
    ("generate", "vLLM on the GPU box", "vLLM on the GPU box"),
])
def test_messages_name_the_server_as_configured(runtime_factory, real_frame, caplog, api, name, expected):
    """The status text and the log name the server after `ollama-server-name`, else after
    `ollama-api`; never "Ollama" for a server that is not one."""
    url = _closed_port_url()
    extra = {"ollama_api": api, **({"ollama_server_name": name} if name else {})}
    rt, p = _processor(runtime_factory, url, **extra)
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        out = _run_until(p, real_frame, lambda: "retrying in" in caplog.text, timeout_s=5)
    messages = _processor_messages(caplog)
    assert f"cannot reach {expected} at {url}, retrying in 1 s" in messages, messages
    assert not np.array_equal(out, real_frame), "the problem is shown on the video"
    if expected != "Ollama":
        assert not [m for m in messages if "Ollama" in m], messages


@pytest.mark.slow
def test_a_timeout_names_the_configured_server(runtime_factory, standin, real_frame, caplog):
    standin.failure = "hang"
    name = "the embedded vision server (blip)"
    rt, p = _processor(runtime_factory, standin.url, ollama_timeout_ms=1000, ollama_server_name=f"  {name} ")
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "timed out" in caplog.text, timeout_s=5)
    messages = _processor_messages(caplog)
    assert f"{name} at {standin.url} timed out" in messages, messages
    assert not [m for m in messages if "Ollama" in m], messages


@pytest.mark.slow
def test_recovery_names_the_configured_server(runtime_factory, real_frame, caplog):
    url = _closed_port_url()
    rt, p = _processor(runtime_factory, url, ollama_api="chat", ollama_server_name="the lab server")
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "retrying in 1 s" in caplog.text, timeout_s=5)
        server = OllamaStandin(port=int(url.rsplit(":", 1)[1]))    # the server comes up where it looks
        try:
            _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None, timeout_s=8)
        finally:
            server.stop()
    messages = _processor_messages(caplog)
    assert f"the lab server at {url} is answering again (model llava)" in messages, messages
    assert not [m for m in messages if "Ollama" in m], messages


def test_a_missing_model_on_a_named_server_gets_no_ollama_pull_hint(runtime_factory, standin, real_frame, caplog):
    rt, p = _processor(runtime_factory, standin.url, ollama_model="mistral",
                       ollama_server_name="the embedded vision server (blip)")
    with caplog.at_level(logging.WARNING, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "not found" in caplog.text)
    assert f"model mistral not found on the embedded vision server (blip) at {standin.url}" in \
        _processor_messages(caplog)
    assert "ollama pull" not in caplog.text


@pytest.mark.slow
def test_the_server_name_can_change_while_running(runtime_factory, real_frame, caplog):
    url = _closed_port_url()
    rt, p = _processor(runtime_factory, url)
    with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
        _run_until(p, real_frame, lambda: "retrying in 1 s" in caplog.text, timeout_s=5)
        rt.streams[0].set_config({"ollama-server-name": "the lab server"})
        _run_until(p, real_frame, lambda: "cannot reach the lab server" in caplog.text, timeout_s=5)
    assert f"cannot reach the lab server at {url}, retrying in 2 s" in _processor_messages(caplog)


# -- `ollama-overlay` ----------------------------------------------------------------------
def test_overlay_false_draws_nothing_but_stores_captions_and_keeps_asking(runtime_factory, standin, real_frame):
    """wasmVision's layout (`-p ollama -p captions`): ollama only stores the caption, the
    `captions` processor draws it; `ollama-overlay` changes live."""
    standin.reply = lambda prompt, jpeg: f"caption number {len(standin.requests)}"
    rt, p = _processor(runtime_factory, standin.url, ollama_overlay="false")
    store = rt.processor_store
    drawn = []

    def two_captions():
        drawn.append(not np.array_equal(p.process(real_frame.copy()), real_frame))
        return (store.get("captions", "caption") or "").endswith("2")
    _run_until(p, real_frame, two_captions)
    assert not any(drawn), "ollama-overlay=false must leave every frame untouched"
    assert store.get("captions", "model") == "llava"

    rt.streams[0].set_config({"ollama-overlay": "true"})          # live, like every other key
    out = p.process(real_frame.copy())
    assert (np.abs(out[-40:].astype(int) - real_frame[-40:]).mean()) > 10      # the band is back
    rt.streams[0].set_config({"ollama-overlay": "FALSE "})
    assert np.array_equal(p.process(real_frame.copy()), real_frame)


def test_an_invalid_overlay_value_is_reported_and_the_default_used(runtime_factory, standin, real_frame, caplog):
    standin.reply = lambda prompt, jpeg: "Bottles stand proud"
    with caplog.at_level(logging.ERROR, logger="vision_host.processor.ollama"):
        rt, p = _processor(runtime_factory, standin.url, ollama_overlay="maybe")
        _run_until(p, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    assert 'config ollama-overlay="maybe" is invalid (expected true or false); using the default true' in caplog.text
    out = p.process(real_frame.copy())
    assert not np.array_equal(out, real_frame)


# -- the settings in force, in the processor store ----------------------------------------
DEFAULT_PROMPT = "Describe what is in this picture in highly complimentary terms using 6 words or less."


TRIGGER_DEFAULTS = {"trigger": "interval", "change-threshold": "0.01", "min-interval-ms": "1000"}
REGION_DEFAULTS = {"region": "", "show-region": "false"}
FRAMES_DEFAULTS = {"frames": "1", "frames-span-ms": "2000", "frames-layout": "images"}


def _in_force(rt) -> dict[str, str]:
    """The settings in force (processor "ollama" in the store; its counters are under "ollama-stats")."""
    store = rt.processor_store
    return {key: store.get("ollama", key) for key in store.keys("ollama")}


def test_the_settings_in_force_are_stored_at_start_and_after_each_change(runtime_factory, standin, real_frame,
                                                                         caplog):
    cfg = {"ollama-url": standin.url}
    rt = runtime_factory(config=cfg, policy=NetworkPolicy.from_config(cfg))
    p = rt.load(OLLAMA_WASM)
    p.process(real_frame.copy())
    assert _in_force(rt) == {"url": standin.url, "api": "generate", "server-name": "Ollama", "model": "llava",
                             "prompt": DEFAULT_PROMPT, "interval-ms": "3000", "paused": "false", "overlay": "true",
                             "format": "", **TRIGGER_DEFAULTS, **REGION_DEFAULTS, **FRAMES_DEFAULTS}

    rt.streams[0].set_config({"ollama-model": " bakllava ", "ollama-interval-ms": "1500", "ollama-paused": "true",
                              "ollama-prompt": "How many bottles?", "ollama-api": "openai",
                              "ollama-overlay": "false"})
    assert _in_force(rt)["model"] == "llava", "read again on the next frame, not before"
    p.process(real_frame.copy())
    assert _in_force(rt) == {"url": standin.url, "api": "openai", "server-name": "the OpenAI-compatible server",
                             "model": "bakllava", "prompt": "How many bottles?", "interval-ms": "1500",
                             "paused": "true", "overlay": "false", "format": "", **TRIGGER_DEFAULTS, **REGION_DEFAULTS, **FRAMES_DEFAULTS}

    # removed keys fall back to the defaults; invalid values are reported and the default is in force
    with caplog.at_level(logging.ERROR, logger="vision_host.processor.ollama"):
        rt.streams[0].set_config({"ollama-model": "", "ollama-interval-ms": "soon", "ollama-paused": "",
                                  "ollama-prompt": "", "ollama-api": "", "ollama-overlay": "",
                                  "ollama-server-name": "the lab server"})
        p.process(real_frame.copy())
    assert "ollama-interval-ms" in caplog.text
    assert _in_force(rt) == {"url": standin.url, "api": "generate", "server-name": "the lab server",
                             "model": "llava", "prompt": DEFAULT_PROMPT, "interval-ms": "3000", "paused": "false",
                             "overlay": "true", "format": "", **TRIGGER_DEFAULTS, **REGION_DEFAULTS, **FRAMES_DEFAULTS}


def test_with_the_captions_processor_after_it_one_caption_is_drawn(runtime_factory, standin, real_frame):
    """`-p ollama -p captions` with ollama-overlay=false (what the CLI sets for that chain):
    the caption appears once, drawn by `captions` at the top; the bottom stays untouched."""
    standin.reply = lambda prompt, jpeg: "What a stunning row of bottles"
    rt, ollama = _processor(runtime_factory, standin.url, ollama_overlay="false")
    captions = rt.load(REPO / "wasm" / "captions.wasm")

    _run_until(ollama, real_frame, lambda: rt.processor_store.get("captions", "caption") is not None)
    out = captions.process(ollama.process(real_frame.copy()))
    changed = np.any(out != real_frame, axis=2)
    rows = np.nonzero(changed.any(axis=1))[0]
    assert rows.size and rows.max() < 40, f"drawn on rows {rows.min()}-{rows.max()}: only the top caption expected"


# -- replies at the edges of JSON: read exactly as the hand-written reader did ---------------
_DEEP = b'{"response":"deep","context":' + b"[" * 63 + b"]" * 63 + b',"done":true}\n'
_TOO_DEEP = b'{"response":"deep","context":' + b"[" * 64 + b"]" * 64 + b',"done":true}\n'
MALFORMED = "malformed reply from URL"


@pytest.mark.slow
@pytest.mark.parametrize("api, status, chunks, expected", [
    # captions: lone surrogates and bad UTF-8 become U+FFFD, keys are compared decoded,
    # a character or a line may be cut between chunks, nesting up to 64 levels
    ("generate", 200, [b'{"response":"a\\ud800b\\udc00\\ud83d\\ude00","done":true}\n'], "caption: a\ufffdb\ufffd\U0001f600"),
    ("generate", 200, [b'{"resp\\u006fnse":"keys","d\\u006fne":true}\n'], "caption: keys"),
    ("generate", 200, [b'{"response":"caf', b'\xc3', b'\xa9 ok","do', b'ne":true}'], "caption: caf\u00e9 ok"),
    ("generate", 200, [b'{"response":"x\xff\xc3(","done":true}\n'], "caption: x\ufffd\ufffd("),
    ("generate", 200, [_DEEP], "caption: deep"),
    ("generate", 200, [b'{"response":"last","done":false,"response":" wins","done":true}\n'], "caption: wins"),
    ("chat", 200, [b'{"message":{"content":"in chat","role":"assistant"},"response":5,"done":true}\n'],
     "caption: in chat"),
    ("openai", 200, [b'data: {"choices":[{"delta":{"content":null}}]}\n\n',
                     b'data: {"choices":[{"delta":{"content":"open"},"finish_reason":null}]}\n\n',
                     b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n',
                     b'data: {"choices":[{"delta":{},"finish_reason":"stop"},{"delta":5}]}\n\n'], "caption: open"),
    # malformed: too deep, wrong types, text after the object, a chat message without content
    ("generate", 200, [_TOO_DEEP], MALFORMED),
    ("generate", 200, [b'{"response":5,"done":true}\n'], MALFORMED),
    ("generate", 200, [b'{"response":"x","done":"yes"}\n'], MALFORMED),
    ("generate", 200, [b'{"response":"x","done":true} {}\n'], MALFORMED),
    ("generate", 200, [b'{"model":"llava"}\n'], MALFORMED),
    ("chat", 200, [b'{"message":{"role":"assistant"},"done":true}\n'], MALFORMED),
    ("openai", 200, [b'data: {"choices":{"0":{}}}\n\n'], MALFORMED),
    ("openai", 200, [b'data: {"choices":[{"delta":{"content":7}}]}\n\n'], MALFORMED),
    # errors: a line's "error" of any type, an error reply read as far as it is JSON
    ("generate", 200, [b'{"error":{"code":1}}\n'], "error from Ollama: "),
    ("generate", 500, [b'{"error":"out of memory"}\n{"error":"again"}\n'], "server error 500: out of memory"),
    ("openai", 503, [b'{"error":{"message":"overloaded","type":"x"}} <html>'], "server error 503: overloaded"),
    ("openai", 500, [b'{"success":false,"errors":[{"code":7,"message":"quota \\u2014 spent"}]}'],
     "server error 500: quota \u2014 spent"),
    ("openai", 200, [b'data: {"error":{"message":"bad image"},"choices":[]}\n\n'], "server error: bad image"),
    ("generate", 500, [b'<html>502</html>'], "server error 500"),
])
def test_edge_case_replies_give_the_caption_or_message(runtime_factory, real_frame, caplog, api, status, chunks,
                                                       expected):
    """Replies no real server sends on purpose, each read to the caption or the message the
    processor has always given (its reader was replaced by std.json's scanner)."""
    from reply_server import ReplyServer
    server = ReplyServer(status, "text/event-stream" if api == "openai" else "application/x-ndjson", chunks)
    try:
        rt, p = _processor(runtime_factory, server.url, ollama_api=api, ollama_interval_ms=60000)
        expected = expected.replace("URL", server.url)
        outcomes = ("caption: ", "malformed", "error", "server error")
        with caplog.at_level(logging.INFO, logger="vision_host.processor.ollama"):
            _run_until(p, real_frame, lambda: any(m.startswith(outcomes) for m in _processor_messages(caplog)))
            for _ in range(5):
                p.process(real_frame.copy())
        assert [m for m in _processor_messages(caplog) if m.startswith(outcomes)] == [expected]
        assert p.stats.errors == 0 and p.last_error is None
    finally:
        server.stop()
