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

test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import ollama  # noqa: E402
import openai  # noqa: E402
import requests  # noqa: E402

from conftest import SAMPLE_CLIP  # noqa: E402
from tiny_models import BUILDERS, LM_WORDS, WORDS  # noqa: E402

frame_jpeg = test_serve.frame_jpeg   # the module-scoped fixture: frame 30 of the shipped clip
pytestmark = pytest.mark.slow   # loads tiny BLIP-2 and LLaVA models: the fast tier covers serve through test_serve


def _words(text: str) -> set[str]:
    return set(text.replace(":", " : ").replace("?", " ? ").replace(".", " . ").split())


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
