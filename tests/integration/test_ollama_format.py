"""`ollama-format` and `ollama-overlay-template`: structured answers from the real `ollama`
processor (wasm/ollama.wasm) in the sandbox, on real frames, against the stand-ins."""

from __future__ import annotations

import functools
import json
import logging

import jsonschema
import pytest
import vision_host.runtime.overlay as overlay_module
from ollama_driver import feed_until, load_ollama
from ollama_standin import default_caption

LOGGER = "vision_host.processor.ollama"

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "activity": {"type": "string"},
        "mood": {"type": "string", "enum": ["calm", "busy"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["count", "activity"],
}
SCHEMA_TEXT = json.dumps(SCHEMA, separators=(",", ":"))

_processor = functools.partial(load_ollama, ollama_interval_ms=100)
_run_until = feed_until


@pytest.fixture
def overlay_texts(monkeypatch):
    """Every text the overlay host function drew, in order."""
    texts: list[str] = []
    draw = overlay_module.draw_caption

    def spy(frame, text, *args, **kwargs):
        texts.append(text)
        return draw(frame, text, *args, **kwargs)
    monkeypatch.setattr(overlay_module, "draw_caption", spy)
    return texts






def _caption(rt, p, frame):
    store = rt.processor_store
    _run_until(p, frame, lambda: store.get("captions", "caption") is not None)
    return store.get("captions", "caption")


@pytest.mark.parametrize("api, path", [("generate", "/api/generate"), ("chat", "/api/chat"),
                                       ("openai", "/v1/chat/completions")])
@pytest.mark.parametrize("fmt", ["json", "schema"])
def test_the_request_asks_for_json_and_the_caption_is_the_json_text(runtime_factory, standin, real_frame,
                                                                     api, path, fmt):
    rt, p = _processor(runtime_factory, standin.url, ollama_api=api,
                       ollama_format="json" if fmt == "json" else SCHEMA_TEXT)
    caption = _caption(rt, p, real_frame)
    req = standin.requests[0]
    assert req.path == path
    if api == "openai":
        assert "format" not in req.body
        assert req.body["response_format"] == ({"type": "json_object"} if fmt == "json" else
                                               {"type": "json_schema",
                                                "json_schema": {"name": "caption", "schema": SCHEMA}})
    else:
        assert "response_format" not in req.body
        assert req.body["format"] == ("json" if fmt == "json" else SCHEMA)
    obj = json.loads(caption)                            # stored as the model wrote it: the JSON text
    if fmt == "json":
        assert obj == {"caption": default_caption("", req.images[0])}
    else:
        jsonschema.validate(obj, SCHEMA)
        assert set(obj) == set(SCHEMA["properties"]) and obj["mood"] == "calm"
    assert rt.processor_store.get("ollama", "format") == ("json" if fmt == "json" else SCHEMA_TEXT)
    assert p.last_error is None


@pytest.mark.parametrize("api", ["generate", "chat", "openai"])
def test_no_format_sends_no_field_and_stores_an_empty_format(runtime_factory, standin, real_frame, api):
    rt, p = _processor(runtime_factory, standin.url, ollama_api=api)
    caption = _caption(rt, p, real_frame)
    body = standin.requests[0].body
    assert "format" not in body and "response_format" not in body
    assert caption == default_caption("", standin.requests[0].images[0])
    assert rt.processor_store.get("ollama", "format") == ""


def test_the_format_changes_live_and_is_stored(runtime_factory, standin, real_frame):
    rt, p = _processor(runtime_factory, standin.url, ollama_format=" JSON ")
    p.process(real_frame.copy())
    assert rt.processor_store.get("ollama", "format") == "json"
    rt.streams[0].set_config({"ollama-format": SCHEMA_TEXT})
    p.process(real_frame.copy())
    assert rt.processor_store.get("ollama", "format") == SCHEMA_TEXT
    _run_until(p, real_frame, lambda: any(r.body["format"] == SCHEMA for r in standin.requests))
    assert standin.requests[0].body["format"] == "json"       # the first, before the change


@pytest.mark.slow
def test_workers_ai_is_not_asked_for_json_and_says_so_once(runtime_factory, real_frame, monkeypatch, caplog):
    from workers_ai_standin import WorkersAIStandin
    workers = WorkersAIStandin(token="cf-5e6b1d")
    try:
        monkeypatch.setenv("VH_TEST_CF_TOKEN", workers.token)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            rt, p = _processor(runtime_factory, workers.run_url, ollama_api="workers-ai",
                               ollama_model="@cf/llava-hf/llava-1.5-7b-hf", ollama_api_key_env="VH_TEST_CF_TOKEN",
                               ollama_format="json")
            _run_until(p, real_frame, lambda: len(workers.requests) >= 2, timeout_s=15)
    finally:
        workers.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    sentence = [m for m in errors if "Workers AI's LLaVA cannot be asked for JSON" in m]
    assert len(sentence) == 1 and "captions stay plain text" in sentence[0]
    for req in workers.requests:
        assert "format" not in req.body and "response_format" not in req.body
    assert rt.processor_store.get("ollama", "format") == ""


@pytest.mark.parametrize("value", ["xml", "[1, 2]", '"json"', "{not json"])
def test_an_invalid_format_is_reported_once_and_plain_text_used(runtime_factory, standin, real_frame, caplog,
                                                                 value):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        rt, p = _processor(runtime_factory, standin.url, ollama_format=value)
        caption = _caption(rt, p, real_frame)
        for _ in range(5):
            p.process(real_frame.copy())
    reports = [r.getMessage() for r in caplog.records if "ollama-format" in r.getMessage()]
    assert len(reports) == 1 and f'config ollama-format="{value}" is invalid' in reports[0]
    assert "format" not in standin.requests[0].body
    assert caption == default_caption("", standin.requests[0].images[0])
    assert rt.processor_store.get("ollama", "format") == ""


TEMPLATE = "{count} people · {activity} {{{mood}}} {tags} {missing} {nothing} {share}"


def test_the_overlay_template_shows_the_fields(runtime_factory, standin, real_frame, overlay_texts):
    standin.token_delay_s = 0.01
    standin.reply = ('{"count": 3, "activity": "waiting \\"in\\" line ☕", "mood": "calm",'
                     ' "tags": [ "a", { "b" : 1 } ], "nothing": null, "share": 0.25e1, "count": 4}')
    rt, p = _processor(runtime_factory, standin.url, ollama_format=SCHEMA_TEXT,
                       ollama_overlay_template=TEMPLATE)
    caption = _caption(rt, p, real_frame)
    assert caption == standin.reply                        # the caption itself is the JSON text
    p.process(real_frame.copy())
    # the last "count" wins, as in JSON readers; strings decoded, numbers as written
    assert overlay_texts[-1] == '4 people · waiting "in" line ☕ {calm} ["a",{"b":1}] ? ? 0.25e1'
    assert all(t == overlay_texts[-1] for t in overlay_texts), "no partial JSON drawn while streaming"


def test_the_overlay_template_falls_back_to_the_text_for_a_non_json_reply(runtime_factory, standin, real_frame,
                                                                         overlay_texts):
    standin.reply = '{"count": 2}'
    rt, p = _processor(runtime_factory, standin.url, ollama_overlay_template="{count} people")
    assert _caption(rt, p, real_frame) == standin.reply
    p.process(real_frame.copy())
    assert overlay_texts[-1] == "2 people"
    for reply in ("Two people wait in line", '["a JSON array", "is not an object"]', '{"count": 3'):
        standin.reply = reply
        _run_until(p, real_frame, lambda r=reply: rt.processor_store.get("captions", "caption") == r)
        p.process(real_frame.copy())
        assert overlay_texts[-1] == reply                  # not a JSON object: the text as it is


def test_the_overlay_template_changes_live(runtime_factory, standin, real_frame, overlay_texts):
    standin.reply = '{"count": 2, "activity": "talking"}'
    rt, p = _processor(runtime_factory, standin.url, ollama_format="json", ollama_interval_ms=60000)
    _caption(rt, p, real_frame)
    p.process(real_frame.copy())
    assert overlay_texts[-1] == standin.reply              # no template: the text as it is
    rt.streams[0].set_config({"ollama-overlay-template": "{activity}: {count}"})
    p.process(real_frame.copy())
    assert overlay_texts[-1] == "talking: 2"               # applied to the caption already there
