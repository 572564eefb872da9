"""``vision-host serve`` without images: embeddings (``/api/embed``, ``/v1/embeddings``) and
text-only chat (``/api/chat``, ``/api/generate``, ``/v1/chat/completions``).

Tiny random-weight LLaVA, BLIP-2 and BLIP models (:mod:`tiny_models`) run through the real
classes in real server processes, driven by the official ``ollama`` and ``openai`` clients.
The vectors are checked for shape, unit length, determinism and order; the chats for an
answer and for the prompt the model got (its token count: the tiny tokenizers count words
and punctuation runs), which shows the history went through the family's chat format. BLIP,
a captioner, refuses text-only requests in each API's error shape.
"""

from __future__ import annotations

import base64
import math
import re
import struct
import threading

import pytest

test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import ollama  # noqa: E402
import openai  # noqa: E402
import requests  # noqa: E402

from tiny_models import BUILDERS  # noqa: E402

pytestmark = pytest.mark.slow   # loads tiny LLaVA, BLIP-2 and BLIP models in server processes
_WAIT_S = 60
#: The tiny models' hidden size: the length of their embeddings.
HIDDEN = 32
#: What a BLIP server answers to a request without an image.
BLIP_REFUSAL = ("model tiny-blip (blip) captions images and cannot answer text-only requests: use a LLaVA or "
                "BLIP-2 model for summaries")
TEXTS = ["a man with a red bottle", "two glass of water on the table", "a man with a red bottle", "green hand"]


def _tokens(text: str) -> int:
    """Tokens of ``text`` for the tiny models' word-level tokenizers (words and punctuation runs)."""
    return len(re.findall(r"\w+|[^\w\s]+", text))


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text")
    return {family: BUILDERS[family](root / f"tiny-{family}") for family in ("blip", "blip2", "llava")}


@pytest.fixture(scope="module")
def llava_server(model_dirs, tmp_path_factory):
    """A tiny LLaVA served with ``--max-embed-inputs 6``."""
    with test_serve.serve_process(model_dirs["llava"], tmp_path_factory.mktemp("llava") / "serve.log",
                                  "--max-embed-inputs", "6") as url:
        yield url


@pytest.fixture(scope="module")
def blip_server(model_dirs, tmp_path_factory):
    with test_serve.serve_process(model_dirs["blip"], tmp_path_factory.mktemp("blip") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def blip2_server(model_dirs, tmp_path_factory):
    with test_serve.serve_process(model_dirs["blip2"], tmp_path_factory.mktemp("blip2") / "serve.log") as url:
        yield url


def _ollama(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=_WAIT_S)


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=_WAIT_S)


def _check_vectors(vectors: list, n: int, size: int = HIDDEN) -> None:
    assert len(vectors) == n
    for v in vectors:
        assert len(v) == size and all(isinstance(x, float) for x in v)
        assert abs(_norm(v) - 1.0) < 1e-4


# -- embeddings ------------------------------------------------------------------------------------
def test_ollama_embed(llava_server):
    client = _ollama(llava_server)
    before = requests.get(llava_server + "/api/ps", timeout=_WAIT_S).json()["vision_host"]
    res = client.embed(model="tiny-llava", input=TEXTS)
    _check_vectors(res.embeddings, len(TEXTS))
    a, b, again, d = res.embeddings
    assert a == again                          # same text, same request: the same vector
    assert not _close(a, b, 1e-3) and not _close(a, d, 1e-3)
    assert res.model == "tiny-llava" and res.total_duration > 0
    assert res.prompt_eval_count == sum(1 + _tokens(t) for t in TEXTS)   # each with its <s>
    # the same text alone, and the inputs reversed: the same vectors, in the inputs' order
    alone = client.embed(model="tiny-llava", input=TEXTS[1])
    _check_vectors(alone.embeddings, 1)
    assert _close(alone.embeddings[0], b)
    backwards = client.embed(model="tiny-llava:latest", input=TEXTS[::-1]).embeddings
    assert all(_close(x, y) for x, y in zip(backwards, res.embeddings[::-1]))
    after = requests.get(llava_server + "/api/ps", timeout=_WAIT_S).json()["vision_host"]
    assert after["embed_requests"] - before["embed_requests"] == 3
    assert after["embedded_inputs"] - before["embedded_inputs"] == len(TEXTS) + 1 + len(TEXTS)
    # dimensions: the first numbers, normalised again
    short = client.embed(model="tiny-llava", input=TEXTS[:2], dimensions=8).embeddings
    _check_vectors(short, 2, 8)
    assert _close(short[0], [x / _norm(a[:8]) for x in a[:8]])


def test_ollama_embed_limits_and_errors(llava_server):
    client = _ollama(llava_server)
    url = llava_server + "/api/embed"
    # an empty input: Ollama's answer, no vectors
    for empty in ([], "", None):
        r = requests.post(url, json={"model": "tiny-llava", "input": empty}, timeout=_WAIT_S)
        assert r.status_code == 200 and r.json() == {"model": "tiny-llava", "embeddings": []}, r.text
    # longer than the model's 256 positions: cut by default, refused with truncate false
    long_text = "a man " * 200
    cut = client.embed(model="tiny-llava", input=[long_text, "a man"])
    _check_vectors(cut.embeddings, 2)
    assert cut.prompt_eval_count == 256 + 3
    with pytest.raises(ollama.ResponseError) as exc:
        client.embed(model="tiny-llava", input=[long_text], truncate=False)
    assert exc.value.status_code == 400 and "exceeds the context length" in exc.value.error
    # more inputs than --max-embed-inputs, inputs that are not text, bad dimensions, unknown model
    with pytest.raises(ollama.ResponseError) as exc:
        client.embed(model="tiny-llava", input=["a"] * 7)
    assert exc.value.status_code == 400 and "--max-embed-inputs" in exc.value.error
    assert len(client.embed(model="tiny-llava", input=["a"] * 6).embeddings) == 6
    for body, needle in (({"input": ["a", 1]}, "invalid input type"), ({"input": {"text": "a"}}, "invalid input type"),
                         ({"input": "a", "truncate": "no"}, "truncate"), ({"input": "a", "dimensions": 33}, "1 to 32"),
                         ({"input": "a", "dimensions": -1}, "dimensions")):
        r = requests.post(url, json={"model": "tiny-llava", **body}, timeout=_WAIT_S)
        assert r.status_code == 400 and needle in r.json()["error"], (body, r.text)
    with pytest.raises(ollama.ResponseError) as exc:
        client.embed(model="nope", input="a")
    assert exc.value.status_code == 404


def test_openai_embeddings(llava_server):
    client = _openai(llava_server)
    floats = client.embeddings.create(model="tiny-llava", input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == "tiny-llava"
    assert [d.index for d in floats.data] == list(range(len(TEXTS))) and all(d.object == "embedding"
                                                                               for d in floats.data)
    vectors = [d.embedding for d in floats.data]
    _check_vectors(vectors, len(TEXTS))
    assert vectors[0] == vectors[2] and not _close(vectors[0], vectors[1], 1e-3)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(1 + _tokens(t) for t in TEXTS)
    # the same vectors as Ollama's API gives
    native = _ollama(llava_server).embed(model="tiny-llava", input=TEXTS).embeddings
    assert all(_close(x, y) for x, y in zip(vectors, native))
    # base64: little-endian float32, asked for explicitly (a string back) or by default (the client decodes it)
    packed = client.embeddings.create(model="tiny-llava", input=TEXTS, encoding_format="base64")
    for d, v in zip(packed.data, vectors):
        raw = base64.b64decode(d.embedding)
        assert len(raw) == 4 * HIDDEN and _close(list(struct.unpack(f"<{HIDDEN}f", raw)), v, 1e-6)
    default = client.embeddings.create(model="tiny-llava", input=TEXTS[3])
    assert len(default.data) == 1 and _close(default.data[0].embedding, vectors[3], 1e-6)
    short = client.embeddings.create(model="tiny-llava", input="green hand", dimensions=4, encoding_format="float")
    _check_vectors([short.data[0].embedding], 1, 4)
    # errors in OpenAI's shape
    for kwargs, needle in (({"input": []}, "invalid input"), ({"input": [[1, 2, 3]]}, "invalid input"),
                           ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                           ({"input": ["a"] * 7}, "--max-embed-inputs"), ({"input": "a", "dimensions": 0}, None)):
        if needle is None:   # 0: none asked (the whole vector)
            assert len(client.embeddings.create(model="tiny-llava", encoding_format="float", **kwargs)
                       .data[0].embedding) == HIDDEN
            continue
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model="tiny-llava", **kwargs)
        assert exc.value.status_code == 400 and needle in exc.value.body["message"], kwargs
        assert exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="a")


# -- text-only chat --------------------------------------------------------------------------------
HISTORY = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is there ?"},
           {"role": "assistant", "content": "a man"}, {"role": "user", "content": "describe this image"}]
#: HISTORY through the tiny LLaVA's chat template (llava-1.5's: ``USER: … ASSISTANT: …``).
HISTORY_PROMPT = "be brief USER: what is there ? ASSISTANT: a man USER: describe this image ASSISTANT:"


def test_llava_answers_text_only_chats(llava_server, model_dirs):
    client = _ollama(llava_server)
    whole = client.chat(model="tiny-llava", messages=HISTORY, stream=False, options={"num_predict": 6})
    assert whole.message.role == "assistant" and whole.message.content.strip()
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.prompt_eval_count == 1 + _tokens(HISTORY_PROMPT)   # the whole history reached the model
    last_only = client.chat(model="tiny-llava", messages=HISTORY[-1:], stream=False, options={"num_predict": 6})
    assert last_only.prompt_eval_count == 1 + _tokens("USER: describe this image ASSISTANT:")
    parts = list(client.chat(model="tiny-llava", messages=HISTORY, stream=True, options={"num_predict": 6}))
    assert parts[-1].done and parts[-1].prompt_eval_count == whole.prompt_eval_count
    assert "".join(p.message.content for p in parts).strip() == whole.message.content   # greedy: the same words
    gen = client.generate(model="tiny-llava", prompt="what is there ?", system="be brief", stream=False,
                          options={"num_predict": 5})
    assert gen.response.strip() and gen.prompt_eval_count == 1 + _tokens("be brief USER: what is there ? ASSISTANT:")
    pieces = list(client.generate(model="tiny-llava", prompt="what is there ?", stream=True,
                                  options={"num_predict": 5}))
    assert pieces[-1].done and "".join(p.response for p in pieces).strip()
    # Ollama's rule still holds: neither prompt nor images is a load request
    assert client.generate(model="tiny-llava", prompt="").done_reason == "load"

    oai = _openai(llava_server)
    done = oai.chat.completions.create(model="tiny-llava", messages=HISTORY, max_tokens=6)
    assert done.choices[0].message.content.strip() and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == whole.prompt_eval_count
    chunks = list(oai.chat.completions.create(model="tiny-llava", messages=HISTORY, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == \
        done.choices[0].message.content
    parts_history = [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}] + HISTORY[1:]
    assert oai.chat.completions.create(model="tiny-llava", messages=parts_history, max_tokens=6) \
        .usage.prompt_tokens == whole.prompt_eval_count


def test_text_only_and_image_requests_at_once(llava_server):
    """A text-only chat and a question about an image sent together: both answered (they never
    share a batch: their model images differ)."""
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(jpeg, "JPEG")
    client = _ollama(llava_server)
    answers: dict = {}

    def ask(key: str, **kw) -> None:
        answers[key] = client.generate(model="tiny-llava", stream=False, options={"num_predict": 4}, **kw)
    threads = [threading.Thread(target=ask, args=("text",), kwargs={"prompt": "what is there ?"}),
               threading.Thread(target=ask, args=("image",), kwargs={"prompt": "what is there ?",
                                                                     "images": [jpeg.getvalue()]})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_WAIT_S)
    assert answers["text"].response.strip() and answers["image"].response.strip()
    assert answers["image"].prompt_eval_count > answers["text"].prompt_eval_count


def test_blip2_answers_text_only_and_embeds(blip2_server):
    client = _ollama(blip2_server)
    gen = client.generate(model="tiny-blip2", prompt="what is there ?", stream=False, options={"num_predict": 5})
    assert gen.response.strip() and gen.prompt_eval_count == 1 + _tokens("Question: what is there ? Answer:")
    chat = client.chat(model="tiny-blip2", messages=HISTORY, stream=False, options={"num_predict": 5})
    assert chat.message.content.strip()
    assert chat.prompt_eval_count == 1 + _tokens("be brief Question: what is there ? Answer: a man "
                                                 "Question: describe this image Answer:")
    streamed = list(_openai(blip2_server).chat.completions.create(
        model="tiny-blip2", messages=[{"role": "user", "content": "what is there ?"}], max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == gen.response
    res = client.embed(model="tiny-blip2", input=TEXTS)
    _check_vectors(res.embeddings, len(TEXTS))
    assert res.embeddings[0] == res.embeddings[2]


def test_blip_refuses_text_only_but_embeds(blip_server):
    client = _ollama(blip_server)
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="tiny-blip", messages=HISTORY, stream=False)
    assert exc.value.status_code == 400 and BLIP_REFUSAL in exc.value.error and '"images"' in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        list(client.chat(model="tiny-blip", messages=HISTORY, stream=True))
    assert exc.value.status_code == 400 and BLIP_REFUSAL in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="tiny-blip", prompt="summarise: a man, a bottle", stream=False)
    assert exc.value.status_code == 400 and BLIP_REFUSAL in exc.value.error
    assert client.generate(model="tiny-blip", prompt="").done_reason == "load"   # still Ollama's load request
    oai = _openai(blip_server)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as oexc:
            oai.chat.completions.create(model="tiny-blip", messages=HISTORY, stream=stream)
        assert BLIP_REFUSAL in oexc.value.body["message"] and oexc.value.body["type"] == "invalid_request_error"
    # its text decoder still embeds
    res = client.embed(model="tiny-blip", input=TEXTS)
    _check_vectors(res.embeddings, len(TEXTS))
    assert res.embeddings[0] == res.embeddings[2] and not _close(res.embeddings[0], res.embeddings[1], 1e-3)
    vectors = [d.embedding for d in oai.embeddings.create(model="tiny-blip", input=TEXTS).data]
    assert all(_close(x, y, 1e-5) for x, y in zip(vectors, res.embeddings))
