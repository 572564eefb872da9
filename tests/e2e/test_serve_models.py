"""``vision-host serve`` with BLIP-2 and LLaVA-1.5, left-padded batching, and the Workers AI schema.

Tiny random-weight models (:mod:`tiny_models`) go through the real classes and the real
``from_pretrained`` path; the official ``ollama`` and ``openai`` clients and plain HTTP talk
to a real server process.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import pytest

jsonschema = pytest.importorskip("jsonschema")
test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import ollama  # noqa: E402
import openai  # noqa: E402
import requests  # noqa: E402

from conftest import SAMPLE_CLIP  # noqa: E402
from tiny_models import BUILDERS, LM_WORDS, WORDS  # noqa: E402

frame_jpeg = test_serve.frame_jpeg   # the module-scoped fixture: frame 30 of the shipped clip
pytestmark = pytest.mark.slow   # loads tiny BLIP-2 and LLaVA models: the fast tier covers serve through test_serve


def _words(text: str) -> set[str]:
    return set(text.replace(":", " : ").replace("?", " ? ").replace(".", " . ").replace(",", " , ").split())


@pytest.fixture(scope="module", params=["blip2", "llava"])
def family_server(request, tmp_path_factory):
    """(family, served name, base URL) of a running server for a tiny BLIP-2 or LLaVA."""
    family = request.param
    model_dir = BUILDERS[family](tmp_path_factory.mktemp(family) / f"tiny-{family}")
    with test_serve.serve_process(model_dir, model_dir.parent / "serve.log") as url:
        yield family, f"tiny-{family}", url


@pytest.mark.slow
def test_each_protocol_answers_with_the_model(family_server, frame_jpeg):
    family, name, url = family_server
    client = ollama.Client(host=url)
    assert [m.model for m in client.list().models] == [f"{name}:latest"]
    assert client.show(name).details.family == {"blip2": "blip-2", "llava": "llava"}[family]

    parts = list(client.generate(model=name, prompt="what is there?", images=[frame_jpeg], stream=True,
                                 options={"num_predict": 6}))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length") and 0 < parts[-1].eval_count <= 6
    streamed = "".join(p.response for p in parts[:-1])
    whole = client.generate(model=name, prompt="what is there?", images=[frame_jpeg], stream=False,
                            options={"num_predict": 6})
    # Greedy decoding either way: the streamed words are the whole answer's.
    assert streamed.strip() == whole.response and _words(whole.response) <= set(LM_WORDS)
    # The prompt went through the family's template, after 4 image tokens (4 queries, or 2×2 patches).
    template_tokens = {"blip2": 4 + len("</s> Question : what is there ? Answer :".split()),
                       "llava": 4 + len("<s> USER : what is there ? ASSISTANT :".split())}[family]
    assert whole.prompt_eval_count == template_tokens

    reply = client.chat(model=name, messages=[{"role": "user", "content": "describe this image",
                                               "images": [frame_jpeg]}], stream=False, options={"num_predict": 4})
    assert reply.message.role == "assistant" and reply.message.content.strip()

    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    data_url = "data:image/jpeg;base64," + base64.b64encode(frame_jpeg).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is there?"},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]
    chunks = list(oai.chat.completions.create(model=name, messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == whole.response

    r = requests.post(f"{url}/ai/run/{name}", json={"image": list(frame_jpeg), "prompt": "what is there?",
                                                    "max_tokens": 6}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"result": {"description": whole.response}, "success": True, "errors": [], "messages": []}


@pytest.mark.slow
def test_prompts_of_any_length_share_a_batch_and_get_their_own_answers(family_server, frame_jpeg):
    """Left padding: 8 different prompts (3 of them streamed) in one batch answer exactly as alone."""
    family, name, url = family_server
    prompts = ["what?", "what is there?", "describe this image", "is there a red bottle on the table?",
               "what is in the hand of the man?", "a photo of", "two glass of water", "is this a woman?"]
    before = requests.get(url + "/api/ps").json()["vision_host"]
    barrier = threading.Barrier(len(prompts))
    answers: list = [None] * len(prompts)

    def one(i: int) -> None:
        client = ollama.Client(host=url)
        barrier.wait(10)
        if i % 3 == 1:
            parts = list(client.generate(model=name, prompt=prompts[i], images=[frame_jpeg], stream=True,
                                         options={"num_predict": 8}))
            answers[i] = "".join(p.response for p in parts).strip()
        else:
            answers[i] = client.generate(model=name, prompt=prompts[i], images=[frame_jpeg], stream=False,
                                         options={"num_predict": 8}).response
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 10   # a streamed row ends before the rest of its batch is counted
    while True:
        after = requests.get(url + "/api/ps").json()["vision_host"]
        if after["batched_requests"] - before["batched_requests"] >= len(prompts) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    batches = after["batches"] - before["batches"]
    assert after["batched_requests"] - before["batched_requests"] == len(prompts)
    assert batches < len(prompts), after["recent_batch_sizes"]
    client = ollama.Client(host=url)
    alone = [client.generate(model=name, prompt=p, images=[frame_jpeg], stream=False,
                             options={"num_predict": 8}).response for p in prompts]
    assert answers == alone
    assert len(set(alone)) > 1   # the prompts matter


@pytest.mark.slow
def test_blip_batches_only_prompts_of_equal_length(test_server_blip, frame_jpeg):
    """BLIP's absolute positions: different prompt lengths run in separate batches, and every
    answer is still the one it gets alone."""
    url = test_server_blip
    prompts = ["a", "a photo", "a photo of", "a picture of a"] * 2
    before = requests.get(url + "/api/ps").json()["vision_host"]
    barrier = threading.Barrier(len(prompts))
    answers: list = [None] * len(prompts)

    def one(i: int) -> None:
        client = ollama.Client(host=url)
        barrier.wait(10)
        answers[i] = client.generate(model="tiny-blip", prompt=prompts[i], images=[frame_jpeg], stream=False,
                                     options={"num_predict": 5}).response
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = requests.get(url + "/api/ps").json()["vision_host"]
    sizes = after["recent_batch_sizes"][-(after["batches"] - before["batches"]):]
    assert sum(sizes) == len(prompts) and len(sizes) >= 4   # four lengths: at least four batches
    client = ollama.Client(host=url)
    assert answers == [client.generate(model="tiny-blip", prompt=p, images=[frame_jpeg], stream=False,
                                       options={"num_predict": 5}).response for p in prompts]
    assert all(_words(a) <= set(WORDS) for a in answers)


@pytest.fixture(scope="module")
def test_server_blip(tmp_path_factory):
    model_dir = BUILDERS["blip"](tmp_path_factory.mktemp("blip") / "tiny-blip")
    with test_serve.serve_process(model_dir, model_dir.parent / "serve.log", "--option", "repeat_penalty=1.3") as url:
        yield url


def test_generation_options(test_server_blip, frame_jpeg):
    url = test_server_blip
    b64 = base64.b64encode(frame_jpeg).decode()
    body = {"model": "tiny-blip", "prompt": "a photo of", "images": [b64], "stream": False}
    r = requests.post(url + "/api/generate", json={**body, "options": {"num_predict": 6, "num_beams": 1,
                                                                        "min_length": 6, "repeat_penalty": 1.0}})
    assert r.status_code == 200 and r.json()["eval_count"] == 6   # min_length forces 6 new tokens
    r = requests.post(url + "/api/generate", json={**body, "options": {"num_beams": 0}})
    assert r.status_code == 400 and "num_beams" in r.json()["error"]
    r = requests.post(url + "/api/generate", json={**body, "options": {"repeat_penalty": "high"}})
    assert r.status_code == 400 and "repeat_penalty" in r.json()["error"]
    r = requests.post(url + "/api/generate", json={**body, "options": {"max_length": 2, "num_predict": 10}})
    assert r.status_code == 200 and r.json()["eval_count"] <= 2


def test_workers_ai_schema_and_its_errors(test_server_blip, frame_jpeg):
    url = test_server_blip
    for path in ("/ai/run/tiny-blip", "/client/v4/accounts/0123abcd/ai/run/tiny-blip"):
        r = requests.post(url + path, json={"image": list(frame_jpeg), "prompt": "a photo of", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["success"] is True
        text = r.json()["result"]["description"]
        assert text and _words(text) <= set(WORDS) and len(text.split()) <= 4
    # messages instead of prompt, base64 instead of an array, and a binary upload
    r = requests.post(url + "/ai/run/tiny-blip", json={"image": base64.b64encode(frame_jpeg).decode(),
                                                       "messages": [{"role": "user", "content": "a photo of"}]})
    assert r.status_code == 200 and r.json()["result"]["description"]
    r = requests.post(url + "/ai/run/tiny-blip", data=frame_jpeg, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["result"]["description"]

    def error(path: str, **kw) -> tuple[int, int, str]:
        r = requests.post(url + path, **kw)
        body = r.json()
        assert body["success"] is False and body["result"] is None and len(body["errors"]) == 1
        return r.status_code, body["errors"][0]["code"], body["errors"][0]["message"]

    status, code, message = error("/ai/run/tiny-blip", json={"image": list(frame_jpeg), "prompt": "x",
                                                             "messages": [{"role": "user", "content": "x"}]})
    assert (status, code) == (400, 5006) and "exactly one of 'prompt' and 'messages'" in message
    status, code, message = error("/ai/run/tiny-blip", json={"prompt": "x"})
    assert (status, code) == (400, 5006) and "'image'" in message
    status, code, message = error("/ai/run/tiny-blip", json={"image": [1, 2, 300], "prompt": "x"})
    assert (status, code) == (400, 5006)
    status, code, message = error("/ai/run/tiny-blip", json={"image": list(b"not an image"), "prompt": "x"})
    assert (status, code) == (400, 5006) and "image" in message
    status, code, message = error("/ai/run/@cf/meta/llama-3-8b-instruct", json={"image": [1], "prompt": "x"})
    assert (status, code) == (400, 5007) and "No such model" in message


@pytest.mark.slow
def test_the_ollama_processor_through_workers_ai_and_llava_chat(test_server_blip, tmp_path):
    """End to end on the shipped clip: the Workers AI protocol against serve (BLIP), and the
    chat protocol against serve (LLaVA)."""
    llava_dir = BUILDERS["llava"](tmp_path / "tiny-llava")
    with test_serve.serve_process(llava_dir, tmp_path / "llava.log") as llava_url:
        for url, model, api in ((test_server_blip + "/ai/run", "tiny-blip", "workers-ai"),
                                (llava_url, "tiny-llava", "chat")):
            stats_path = tmp_path / f"{api}.json"
            result = subprocess.run(
                [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
                 "-c", f"ollama-url={url}", "-c", f"ollama-model={model}", "-c", f"ollama-api={api}",
                 "-c", "ollama-interval-ms=200", "-c", "ollama-max-tokens=5", "--max-frames", "120",
                 "-o", "file", "-d", str(tmp_path / f"{api}.mp4"), "--stats", str(stats_path)],
                capture_output=True, text=True, timeout=120, env=test_serve._env())
            assert result.returncode == 0, result.stderr
            stats = json.loads(stats_path.read_text())
            assert stats["frames_out"] == 120
            assert stats["captions"]["completed"] >= 1 and stats["captions"]["failed"] == 0, result.stderr
            assert stats["processors"]["ollama"]["errors"] == 0


@pytest.mark.slow
def test_a_model_of_another_kind_is_refused_clearly(tmp_path):
    from transformers import BertConfig, BertModel
    model_dir = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(model_dir)
    r = subprocess.run(test_serve._serve_cmd("--model", str(model_dir), "--port", str(test_serve._free_port())),
                       env=test_serve._env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "'bert' model" in r.stderr and "BLIP, BLIP-2 and LLaVA" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(test_serve._serve_cmd("--model", str(model_dir), "--option", "bogus=1"),
                       env=test_serve._env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--option bogus" in r.stderr, r.stderr


# -- structured output: Ollama's format, OpenAI's response_format --------------------------------

SCHEMA = {"type": "object", "properties": {"person": {"type": "boolean"}, "count": {"type": "integer"}},
          "required": ["person", "count"]}


def _jpeg(color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_schema_holds_every_answer_in_a_batch_with_free_text(family_server, frame_jpeg):
    """Constrained (schema, "json", json_object; streamed and not; both APIs) and free-text
    requests share one batch: every constrained answer parses and validates, the free one is
    the answer it gets alone."""
    family, name, url = family_server
    images = [frame_jpeg, _jpeg((200, 30, 30)), _jpeg((20, 40, 220))]
    n_predict = 40
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def oai_messages(prompt: str, image: bytes) -> list:
        data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
        return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}

    def ollama_generate(prompt, image, fmt, stream):
        client = ollama.Client(host=url)
        if stream:
            return "".join(p.response for p in client.generate(model=name, prompt=prompt, images=[image], stream=True,
                                                                format=fmt, options={"num_predict": n_predict}))
        return client.generate(model=name, prompt=prompt, images=[image], stream=False, format=fmt,
                               options={"num_predict": n_predict}).response

    def ollama_chat(prompt, image, fmt, stream):
        client = ollama.Client(host=url)
        messages = [{"role": "user", "content": prompt, "images": [image]}]
        if stream:
            return "".join(p.message.content for p in client.chat(model=name, messages=messages, stream=True,
                                                                   format=fmt, options={"num_predict": n_predict}))
        return client.chat(model=name, messages=messages, stream=False, format=fmt,
                           options={"num_predict": n_predict}).message.content

    def openai_chat(prompt, image, fmt, stream):
        kw = dict(model=name, messages=oai_messages(prompt, image), max_tokens=n_predict, response_format=fmt)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(stream=True, **kw)
                           if c.choices)
        return oai.chat.completions.create(**kw).choices[0].message.content

    # (call, prompt, image, format, streamed, expectation)
    cases = [(ollama_generate, "what is there?", images[0], SCHEMA, False, "schema"),
             (ollama_generate, "is there a man?", images[1], SCHEMA, True, "schema"),
             (ollama_chat, "how many people?", images[2], SCHEMA, False, "schema"),
             (ollama_chat, "describe this image", images[0], SCHEMA, True, "schema"),
             (openai_chat, "who is there?", images[1], schema_format, False, "schema"),
             (openai_chat, "count the people", images[2], schema_format, True, "schema"),
             (ollama_generate, "what is in the image?", images[2], "json", False, "object"),
             (openai_chat, "what is there?", images[1], {"type": "json_object"}, True, "object"),
             (ollama_generate, "what is there?", images[0], None, False, "free")]
    before = requests.get(url + "/api/ps").json()["vision_host"]
    barrier = threading.Barrier(len(cases))
    answers: list = [None] * len(cases)

    def one(i: int) -> None:
        call, prompt, image, fmt, stream, _ = cases[i]
        barrier.wait(10)
        try:
            answers[i] = call(prompt, image, fmt, stream)
        except Exception as exc:  # noqa: BLE001 — reported by the assertions below
            answers[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 10
    while True:
        after = requests.get(url + "/api/ps").json()["vision_host"]
        if after["batched_requests"] - before["batched_requests"] >= len(cases) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after["batches"] - before["batches"] < len(cases), after["recent_batch_sizes"]   # they shared batches
    for (call, prompt, _, fmt, stream, expect), answer in zip(cases, answers):
        assert isinstance(answer, str), (call.__name__, stream, answer)
        if expect == "free":
            assert answer == ollama_generate(prompt, images[0], None, False)   # the constraints were per row
            continue
        value = json.loads(answer)
        assert isinstance(value, dict), answer
        if expect == "schema":
            jsonschema.validate(value, SCHEMA)


@pytest.mark.slow
def test_a_constrained_answer_that_runs_out_of_tokens_is_an_error(family_server, frame_jpeg):
    family, name, url = family_server
    client = ollama.Client(host=url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=name, prompt="what is there?", images=[frame_jpeg], format=SCHEMA,
                        options={"num_predict": 3})
    assert err.value.status_code == 500 and "before its JSON was complete" in err.value.error
    parts = list(client.generate(model=name, prompt="what is there?", images=[frame_jpeg], format=SCHEMA,
                                 stream=True, options={"num_predict": 40}))
    jsonschema.validate(json.loads("".join(p.response for p in parts)), SCHEMA)


@pytest.mark.slow
def test_invalid_formats_are_refused(family_server, frame_jpeg):
    family, name, url = family_server
    b64 = base64.b64encode(frame_jpeg).decode()
    body = {"model": name, "prompt": "what is there?", "images": [b64], "stream": False}
    for fmt, words in (("xml", 'invalid format: "xml"; expected "json" or a valid JSON Schema object'),
                       (3, 'invalid format: 3'),
                       ({"type": 5}, "invalid JSON schema in format"),
                       ({"type": "string", "pattern": "[a-"}, "invalid JSON schema in format")):
        for path, extra in (("/api/generate", {}), ("/api/chat", {"messages": [{"role": "user", "content": "x",
                                                                                  "images": [b64]}]})):
            r = requests.post(url + path, json={**body, **extra, "format": fmt}, timeout=60)
            assert r.status_code == 400 and set(r.json()) == {"error"} and words in r.json()["error"], (fmt, r.text)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {
        "url": "data:image/jpeg;base64," + b64}}]}]
    for fmt, words in (({"type": "json_schema", "json_schema": {"name": "x"}},
                        "Missing required parameter: 'response_format.json_schema.schema'."),
                       ({"type": "xml"}, "Invalid value: \"xml\". Supported values are: 'text', 'json_object', "
                                          "and 'json_schema'."),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                        "required": 3}}},
                        "invalid JSON schema in response_format")):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=name, messages=messages, max_tokens=4, response_format=fmt)
        assert err.value.status_code == 400 and words in err.value.body["message"], (fmt, err.value.body)
        assert err.value.body["type"] == "invalid_request_error"
    # "text" is no constraint
    reply = oai.chat.completions.create(model=name, messages=messages, max_tokens=4, response_format={"type": "text"})
    assert reply.choices[0].message.content


def test_blip_refuses_a_format_naming_the_families_that_follow_one(test_server_blip, frame_jpeg):
    url = test_server_blip
    client = ollama.Client(host=url)
    for fmt in (SCHEMA, "json"):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], format=fmt)
        assert err.value.status_code == 400
        assert "cannot follow a format" in err.value.error and "llava and blip2" in err.value.error
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    data_url = "data:image/jpeg;base64," + base64.b64encode(frame_jpeg).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a photo of"},
                                             {"type": "image_url", "image_url": {"url": data_url}}]}]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny-blip", messages=messages, max_tokens=4,
                                    response_format={"type": "json_object"})
    assert "llava and blip2" in err.value.body["message"]
    # without a format BLIP answers as ever, also with {"type": "text"}
    reply = oai.chat.completions.create(model="tiny-blip", messages=messages, max_tokens=4,
                                        response_format={"type": "text"})
    assert reply.choices[0].message.content
