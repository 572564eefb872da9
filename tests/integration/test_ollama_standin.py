"""The Ollama stand-in is faithful: the official ``ollama`` client works against it,
and its failure modes fail the way clients see real failures fail."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import cv2
import httpx
import ollama
import openai
import pytest
import requests

from ollama_standin import default_caption, ollama_standin  # noqa: F401 - ollama_standin is a fixture

from conftest import MEDIA


def first_frame_jpeg(name: str, index: int = 0) -> bytes:
    cap = cv2.VideoCapture(str(MEDIA / name))
    assert cap.isOpened(), f"test media missing: {MEDIA / name}"
    for _ in range(index + 1):
        ok, frame = cap.read()
        assert ok
    cap.release()
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def bottle_jpeg() -> bytes:
    return first_frame_jpeg("bottle-detection.mp4")  # 640x360


@pytest.fixture(scope="module")
def car_jpeg() -> bytes:
    return first_frame_jpeg("car-detection.mp4")  # 768x432


@pytest.fixture
def client(ollama_standin):
    with ollama.Client(host=ollama_standin.url, timeout=10) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- raw chunked reader


class RawResponse:
    """A tiny HTTP/1.1 response reader over a raw socket that keeps chunk boundaries."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.t_headers = 0.0

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> None:
        status_line = self._line()
        self.t_headers = time.monotonic()
        self.status = int(status_line.split()[1])
        while (line := self._line()) != b"":
            k, _, v = line.decode().partition(":")
            self.headers[k.strip().lower()] = v.strip()

    def read_chunks(self) -> list[bytes]:
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        while True:
            size = int(self._line(), 16)
            if size == 0:
                assert self._line() == b""
                return self.chunks
            self.chunks.append(self._exact(size))
            assert self._exact(2) == b"\r\n"


def raw_post(url: str, path: str, body: dict | bytes, timeout: float = 10) -> RawResponse:
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    return RawResponse(s)


# --------------------------------------------------------------------------- the official client


def test_root_version_list_show(ollama_standin, client):
    r = requests.get(ollama_standin.url, timeout=5)
    assert (r.status_code, r.text) == (200, "Ollama is running")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert requests.get(ollama_standin.url + "/api/version", timeout=5).json() == {"version": "0.12.6"}
    ollama_standin.models = ["llava", "moondream:1.8b"]
    listed = client.list()
    assert [m.model for m in listed.models] == ["llava:latest", "moondream:1.8b"]
    assert all(m.size > 0 and m.digest and m.modified_at and m.details.format == "gguf" for m in listed.models)
    shown = client.show("moondream:1.8b")
    assert "vision" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as info:
        client.show("nope")
    assert info.value.status_code == 404
    r = requests.get(ollama_standin.url + "/api/nope", timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")
    assert requests.get(ollama_standin.url + "/api/generate", timeout=5).status_code == 405


def test_generate_streams_caption_of_the_image(ollama_standin, client, bottle_jpeg):
    parts = list(client.generate(model="llava", prompt="Describe this frame.", images=[bottle_jpeg], stream=True))
    expected = default_caption("Describe this frame.", bottle_jpeg)
    assert expected.startswith("a 640x360 scene with mean brightness ")
    assert "".join(p.response for p in parts) == expected
    assert len(parts) >= 4, "the reply must arrive in several pieces"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.response == ""
    assert last.eval_count == len(parts) - 1
    assert last.prompt_eval_count > 576
    assert 0 < last.load_duration <= last.total_duration
    assert last.prompt_eval_duration > 0 and last.eval_duration > 0
    assert last.context
    (req,) = ollama_standin.requests
    assert req.path == "/api/generate" and req.method == "POST"
    assert req.body["model"] == "llava" and req.body["prompt"] == "Describe this frame."
    assert req.body.get("stream", True) is True
    assert req.body["images"] == [b64(bottle_jpeg)]
    assert req.image_shapes == ((360, 640, 3),)
    assert (req.width, req.height) == (640, 360)
    assert req.images == (bottle_jpeg,)


def test_generate_without_streaming_tells_frames_apart(ollama_standin, client, bottle_jpeg, car_jpeg):
    a = client.generate(model="llava:latest", prompt="What is here?", images=[bottle_jpeg], stream=False)
    b = client.generate(model="LLaVA", prompt="What is here?", images=[car_jpeg], stream=False)
    assert a.done and a.done_reason == "stop" and a.eval_count >= 4
    assert a.response == default_caption("", bottle_jpeg)
    assert b.response == default_caption("", car_jpeg)
    assert b.response.startswith("a 768x432 scene")
    assert a.response != b.response
    assert [r.body["stream"] for r in ollama_standin.requests] == [False, False]
    r = requests.post(
        ollama_standin.url + "/api/generate",
        json={"model": "llava", "prompt": "x", "images": [b64(car_jpeg)], "stream": False},
        timeout=5,
    )
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json()["response"] == b.response


def test_several_images_are_each_checked_and_recorded_in_order(ollama_standin, client, bottle_jpeg, car_jpeg):
    out = client.generate(model="llava", prompt="What changed?", images=[bottle_jpeg, car_jpeg, bottle_jpeg], stream=False)
    assert out.response == default_caption("", bottle_jpeg)              # the reply is of the first image
    assert out.prompt_eval_count == len("What changed?".split()) + 1 + 3 * 576
    client.chat(model="llava", messages=[{"role": "user", "content": "And now?", "images": [car_jpeg, bottle_jpeg]}])
    with openai.OpenAI(base_url=ollama_standin.url + "/v1", api_key="ollama", max_retries=0, timeout=10) as oai:
        oai.chat.completions.create(model="llava", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(car_jpeg)}},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(car_jpeg)}},
            {"type": "text", "text": "Which way?"}]}])
    generate, chat, v1 = ollama_standin.requests
    assert generate.images == (bottle_jpeg, car_jpeg, bottle_jpeg)
    assert generate.image_shapes == ((360, 640, 3), (432, 768, 3), (360, 640, 3))
    assert [img.shape for img in generate.decoded()] == list(generate.image_shapes)
    assert chat.images == (car_jpeg, bottle_jpeg) and v1.images == (car_jpeg, car_jpeg)
    assert json.loads(generate.raw) == generate.body
    # one image among several that does not decode fails the request, as Ollama does
    r = requests.post(ollama_standin.url + "/api/generate", timeout=5, json={
        "model": "llava", "prompt": "x", "stream": False, "images": [b64(car_jpeg), b64(b"not a picture")]})
    assert (r.status_code, r.json()) == (400, {"error": "Failed to load image or audio file"})
    assert ollama_standin.requests[-1].decoded()[1] is None


def test_chat_streams_and_not(ollama_standin, client, car_jpeg):
    messages = [
        {"role": "system", "content": "You caption frames."},
        {"role": "user", "content": "Caption this.", "images": [car_jpeg]},
    ]
    parts = list(client.chat(model="llava", messages=messages, stream=True))
    assert all(p.message.role == "assistant" for p in parts)
    text = "".join(p.message.content for p in parts)
    assert text == default_caption("", car_jpeg)
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == len(parts) - 1
    whole = client.chat(model="llava", messages=messages, stream=False)
    assert whole.message.content == text and whole.done
    reqs = ollama_standin.requests
    assert [r.path for r in reqs] == ["/api/chat", "/api/chat"]
    assert reqs[0].image_shapes == ((432, 768, 3),)
    assert reqs[0].body["messages"][1]["images"] == [b64(car_jpeg)]


def test_unknown_model_is_404_for_the_client(ollama_standin, client, bottle_jpeg):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="x", images=[bottle_jpeg])
    assert info.value.status_code == 404
    assert info.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope:7b", messages=[{"role": "user", "content": "hi"}])
    assert (info.value.status_code, info.value.error) == (404, "model 'nope:7b' not found")
    # models can change at runtime
    ollama_standin.models = ["moondream"]
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llava", prompt="x", stream=False)
    assert info.value.status_code == 404
    assert client.generate(model="moondream", prompt="x", stream=False).done


def test_num_predict_truncates_and_empty_prompt_loads_or_unloads(client, bottle_jpeg):
    parts = list(client.generate(model="llava", prompt="x", images=[bottle_jpeg], options={"num_predict": 2}, stream=True))
    assert len(parts) == 3 and parts[-1].done_reason == "length" and parts[-1].eval_count == 2
    assert "".join(p.response for p in parts) == " ".join(default_caption("", bottle_jpeg).split()[:2])
    assert client.generate(model="llava", prompt="").done_reason == "load"
    assert client.generate(model="llava", prompt="", keep_alive=0).done_reason == "unload"
    assert client.chat(model="llava", messages=[]).done_reason == "load"


def test_reply_text_or_callable(ollama_standin, client, bottle_jpeg):
    ollama_standin.reply = "a bottle on a conveyor belt"
    assert client.generate(model="llava", prompt="x", images=[bottle_jpeg], stream=False).response == (
        "a bottle on a conveyor belt"
    )
    seen = []

    def reply(prompt, jpeg):
        seen.append((prompt, jpeg))
        return f"{len(jpeg)} bytes for {prompt!r}"

    ollama_standin.reply = reply
    parts = list(client.generate(model="llava", prompt="count", images=[bottle_jpeg], stream=True))
    assert "".join(p.response for p in parts) == f"{len(bottle_jpeg)} bytes for 'count'"
    assert seen == [("count", bottle_jpeg)]


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "path, body, status, error",
    [
        ("/api/generate", b"", 400, "missing request body"),
        ("/api/generate", b"{not json", 400, "invalid character 'n' looking for beginning of value"),
        ("/api/generate", b"[1]", 400, "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 400, "model is required"),
        (
            "/api/generate",
            {"model": 7, "prompt": "x"},
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string",
        ),
        ("/api/generate", {"model": "llava", "prompt": "x", "images": ["ab!d"]}, 400, "illegal base64 data at input byte 2"),
        ("/api/generate", {"model": "llava", "prompt": "x", "images": ["abc"]}, 400, "illegal base64 data at input byte 0"),
        (
            "/api/generate",
            {"model": "llava", "prompt": "x", "images": [b64(b"plain text, not an image")]},
            400,
            "Failed to load image or audio file",
        ),
        (
            "/api/chat",
            {"model": "llava", "messages": [{"role": "user", "content": "x", "images": ["%%%"]}]},
            400,
            "illegal base64 data at input byte 0",
        ),
    ],
)
def test_bad_requests_fail_like_ollama(ollama_standin, path, body, status, error):
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    r = requests.post(ollama_standin.url + path, timeout=5, **kw)
    assert r.status_code == status
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.json() == {"error": error}
    assert ollama_standin.requests[-1].path == path


def test_client_sees_bad_image_as_400(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llava", prompt="x", images=[b"GIF89a but truncated"])
    assert (info.value.status_code, info.value.error) == (400, "Failed to load image or audio file")


# --------------------------------------------------------------------------- wire format & timing


def test_ndjson_lines_are_cut_and_merged_across_chunks(ollama_standin, bottle_jpeg):
    resp = raw_post(ollama_standin.url, "/api/generate", {"model": "llava", "prompt": "x", "images": [b64(bottle_jpeg)]})
    resp.read_head()
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    chunks = resp.read_chunks()
    resp.sock.close()
    body = b"".join(chunks)
    lines = [json.loads(x) for x in body.split(b"\n") if x]
    assert "".join(x["response"] for x in lines) == default_caption("", bottle_jpeg)
    assert lines[-1]["done"] is True and all(x["done"] is False for x in lines[:-1])
    assert all(set(x) >= {"model", "created_at", "response", "done"} for x in lines)
    assert any(not c.endswith(b"\n") for c in chunks), "no line was cut across chunks"
    assert any(c.count(b"\n") >= 2 for c in chunks), "no chunk carried two lines"


def test_one_line_per_chunk_when_asked(ollama_standin, bottle_jpeg):
    ollama_standin.split_chunks = False
    resp = raw_post(ollama_standin.url, "/api/chat", {"model": "llava", "messages": [{"role": "user", "content": "x"}]})
    resp.read_head()
    chunks = resp.read_chunks()
    resp.sock.close()
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
    assert json.loads(chunks[-1])["done"] is True


@pytest.mark.slow
def test_latency_and_token_delay(ollama_standin, bottle_jpeg):
    ollama_standin.latency_s = 0.3
    ollama_standin.token_delay_s = 0.05
    t0 = time.monotonic()
    resp = raw_post(ollama_standin.url, "/api/generate", {"model": "llava", "prompt": "x", "images": [b64(bottle_jpeg)]})
    resp.read_head()
    chunks = resp.read_chunks()
    t_end = time.monotonic()
    resp.sock.close()
    n_lines = b"".join(chunks).count(b"\n")
    assert resp.t_headers - t0 >= 0.3, "headers must wait for the first token, as with Ollama"
    assert t_end - t0 >= 0.3 + 0.05 * (n_lines - 1) - 0.01
    assert t_end - t0 < 0.3 + 0.05 * n_lines + 1.0
    (req,) = ollama_standin.requests
    assert t0 <= req.arrived <= resp.t_headers


# --------------------------------------------------------------------------- failure modes


def test_http500(ollama_standin, client):
    ollama_standin.failure = "http500"
    r = requests.post(ollama_standin.url + "/api/generate", json={"model": "llava", "prompt": "x"}, timeout=5)
    assert r.status_code == 500 and r.json() == {"error": "llama runner process has terminated: exit status 2"}
    with pytest.raises(ollama.ResponseError) as info:
        list(client.chat(model="llava", messages=[{"role": "user", "content": "x"}], stream=True))
    assert info.value.status_code == 500
    ollama_standin.failure = None  # recovers at runtime
    assert client.generate(model="llava", prompt="x", stream=False).done
    with pytest.raises(ValueError):
        ollama_standin.failure = "explode"


def test_malformed(ollama_standin, client):
    ollama_standin.failure = "malformed"
    with requests.post(
        ollama_standin.url + "/api/generate", json={"model": "llava", "prompt": "x"}, stream=True, timeout=5
    ) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    json.loads(lines[0])
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[1])
    with pytest.raises(json.JSONDecodeError):  # what the official client raises on such a line
        list(client.generate(model="llava", prompt="x", stream=True))
    with pytest.raises(json.JSONDecodeError):
        client.generate(model="llava", prompt="x", stream=False)


def test_hang_times_out_and_stop_is_prompt(ollama_standin):
    ollama_standin.failure = "hang"
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(ollama_standin.url + "/api/generate", json={"model": "llava", "prompt": "x"}, timeout=(2, 0.3))
    errors = []

    def hung():
        try:
            requests.post(ollama_standin.url + "/api/generate", json={"model": "llava", "prompt": "x"}, timeout=30)
        except requests.RequestException as e:
            errors.append(e)

    threads = [threading.Thread(target=hung) for _ in range(3)]
    for t in threads:
        t.start()
    ollama_standin.wait_for_requests(4)
    idle = socket.create_connection(("127.0.0.1", ollama_standin.port))  # connected, never sends
    t0 = time.monotonic()
    ollama_standin.stop()
    took = time.monotonic() - t0
    assert took < 1.0, f"stop() took {took:.2f} s with hung requests"
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(errors) == 3, "hung requests must fail once the stand-in stops"
    assert not [t for t in threading.enumerate() if t.name.startswith("ollama-standin") and t.is_alive()]
    idle.close()
    ollama_standin.stop()  # idempotent


def test_reset_mid_stream(ollama_standin, client):
    ollama_standin.failure = "reset"
    got = []
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        with requests.post(
            ollama_standin.url + "/api/generate", json={"model": "llava", "prompt": "x"}, stream=True, timeout=5
        ) as r:
            for line in r.iter_lines():
                got.append(json.loads(line))
    assert len(got) == 1 and got[0]["done"] is False, "the first piece arrives before the reset"
    with pytest.raises(httpx.TransportError):  # RemoteProtocolError / ReadError in the official client
        list(client.generate(model="llava", prompt="x", stream=True))
    with pytest.raises(httpx.TransportError):
        client.generate(model="llava", prompt="x", stream=False)


@pytest.mark.slow
def test_drip_sends_one_byte_per_chunk(ollama_standin, client, bottle_jpeg):
    ollama_standin.failure = "drip"
    resp = raw_post(ollama_standin.url, "/api/generate", {"model": "llava", "prompt": "x", "images": [b64(bottle_jpeg)]})
    resp.read_head()
    chunks = resp.read_chunks()
    resp.sock.close()
    assert all(len(c) == 1 for c in chunks) and len(chunks) > 100
    lines = [json.loads(x) for x in b"".join(chunks).split(b"\n") if x]
    assert "".join(x["response"] for x in lines) == default_caption("", bottle_jpeg)
    # the official client reassembles it, streaming or not
    parts = list(client.generate(model="llava", prompt="x", images=[bottle_jpeg], stream=True))
    assert "".join(p.response for p in parts) == default_caption("", bottle_jpeg)
    assert client.generate(model="llava", prompt="x", images=[bottle_jpeg], stream=False).response == (
        default_caption("", bottle_jpeg)
    )


def test_midstream_error_is_an_error_line(ollama_standin, client):
    ollama_standin.failure = "midstream_error"
    ollama_standin.failure_message = "an error was encountered while running the model"
    got = []
    with pytest.raises(ollama.ResponseError) as info:
        for p in client.generate(model="llava", prompt="x", stream=True):
            got.append(p.response)
    assert info.value.error == "an error was encountered while running the model"
    assert len(got) == 2
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llava", prompt="x", stream=False)
    assert info.value.status_code == 500


# --------------------------------------------------------------------------- concurrency & keep-alive


@pytest.mark.slow
def test_concurrent_keep_alive_clients(ollama_standin, bottle_jpeg, car_jpeg):
    ollama_standin.token_delay_s = 0.002
    jpegs = [bottle_jpeg, car_jpeg]
    results: list[tuple[int, str, str]] = []
    errors = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            with requests.Session() as s:
                for k in range(5):
                    jpeg = jpegs[(i + k) % 2]
                    with s.post(
                        ollama_standin.url + "/api/generate",
                        json={"model": "llava", "prompt": f"w{i}", "images": [b64(jpeg)]},
                        stream=True,
                        timeout=10,
                    ) as r:
                        text = "".join(json.loads(x)["response"] for x in r.iter_lines() if x)
                    with lock:
                        results.append((i, text, default_caption("", jpeg)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(results) == 40
    assert all(text == want for _, text, want in results)
    reqs = ollama_standin.requests
    assert len(reqs) == 40
    ports_per_worker = {}
    for r in reqs:
        ports_per_worker.setdefault(r.body["prompt"], set()).add(r.client[1])
    assert all(len(p) == 1 for p in ports_per_worker.values()), "a session's requests must share one connection"
    assert len({next(iter(p)) for p in ports_per_worker.values()}) == 8


# --------------------------------------------------------------------------- OpenAI compatibility (/v1)


@pytest.fixture
def frame_jpeg(real_frame) -> bytes:
    ok, buf = cv2.imencode(".jpg", real_frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


@pytest.fixture
def oai(ollama_standin):
    with openai.OpenAI(base_url=ollama_standin.url + "/v1", api_key="ollama", max_retries=0, timeout=10) as c:
        yield c


def image_message(jpeg: bytes, text: str = "Describe this frame.", plain_string: bool = False) -> list[dict]:
    url = "data:image/jpeg;base64," + b64(jpeg)
    part = {"type": "image_url", "image_url": url if plain_string else {"url": url}}
    return [
        {"role": "system", "content": "You caption frames."},
        {"role": "user", "content": [{"type": "text", "text": text}, part]},
    ]


def sse_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-40:]
    events = body[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


def test_openai_chat_with_an_image(ollama_standin, oai, frame_jpeg):
    want = default_caption("", frame_jpeg)
    assert want.startswith("a 640x360 scene with mean brightness ")
    done = oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), temperature=0)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.system_fingerprint == "fp_ollama" and done.model == "llava" and done.created > 0
    (choice,) = done.choices
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", want)
    assert choice.finish_reason == "stop"
    n = len(want.split())
    assert (done.usage.completion_tokens, done.usage.prompt_tokens) == (n, len("Describe this frame.".split()) + 1 + 576)
    assert done.usage.total_tokens == done.usage.prompt_tokens + n
    (req,) = ollama_standin.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.body["model"] == "llava" and "stream" not in req.body and req.body["temperature"] == 0
    assert {k.lower(): v for k, v in req.headers.items()}["authorization"] == "Bearer ollama"
    assert req.image_shapes == ((360, 640, 3),) and req.images == (frame_jpeg,)
    # image_url as a plain string works too, and the wire format is Ollama's
    r = requests.post(
        ollama_standin.url + "/v1/chat/completions",
        json={"model": "llava", "messages": image_message(frame_jpeg, plain_string=True)},
        timeout=5,
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": want}, "finish_reason": "stop"}


def test_openai_chat_streams_with_an_image(ollama_standin, oai, frame_jpeg):
    want = default_caption("", frame_jpeg)
    chunks = list(
        oai.chat.completions.create(
            model="llava", messages=image_message(frame_jpeg), stream=True, stream_options={"include_usage": True}
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    usage = [c for c in chunks if not c.choices]
    assert chunks == content + finish + usage and len(finish) == len(usage) == 1
    assert "".join(c.choices[0].delta.content for c in content) == want
    assert len(content) == len(want.split()) >= 4
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:]), "role only on the first delta, as Ollama"
    assert finish[0].choices[0].finish_reason == "stop" and finish[0].choices[0].delta.content is None
    assert usage[0].usage.completion_tokens == len(content)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.system_fingerprint == "fp_ollama" for c in chunks)
    assert all(c.model == "llava" for c in chunks)
    (req,) = ollama_standin.requests
    assert req.body["stream"] is True and req.image_shapes == ((360, 640, 3),)
    # without stream_options there is no usage chunk
    plain = list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True))
    assert plain[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in plain)


def test_openai_max_tokens_truncates_with_length(ollama_standin, oai, frame_jpeg):
    want = default_caption("", frame_jpeg).split()
    done = oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), max_tokens=2)
    assert done.choices[0].finish_reason == "length" and done.choices[0].message.content == " ".join(want[:2])
    assert done.usage.completion_tokens == 2
    chunks = list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), max_tokens=3, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " ".join(want[:3])
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    # Ollama reads max_tokens only: max_completion_tokens is accepted and ignored
    whole = oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), max_completion_tokens=2)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].message.content == " ".join(want)


def test_openai_models(ollama_standin, oai):
    ollama_standin.models = ["llava", "someone/moondream:1.8b"]
    listed = oai.models.list()
    assert [(m.id, m.object, m.owned_by) for m in listed.data] == [
        ("llava:latest", "model", "library"),
        ("someone/moondream:1.8b", "model", "someone"),
    ]
    assert all(m.created > 0 for m in listed.data)
    one = oai.models.retrieve("LLaVA")
    assert (one.id, one.owned_by) == ("LLaVA", "library")
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("nope")
    assert info.value.body["message"] == "model 'nope:latest' not found"
    assert info.value.body["type"] == "not_found_error"


def test_openai_unknown_model_is_not_found(oai, frame_jpeg):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="nope", messages=image_message(frame_jpeg))
    assert info.value.status_code == 404
    assert info.value.body == {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=image_message(frame_jpeg), stream=True)


def _parts(*parts: dict) -> dict:
    return {"model": "llava", "messages": [{"role": "user", "content": list(parts)}]}


_MW = "application/json; charset=utf-8"  # errors from Ollama's OpenAI middleware (gin's AbortWithStatusJSON)


@pytest.mark.parametrize(
    "body, message, content_type",
    [
        (b"", "EOF", _MW),
        ({"model": "llava", "messages": []}, "[] is too short - 'messages'", _MW),
        (
            _parts({"type": "image_url", "image_url": "http://x/a.jpg"}),
            "image URLs are not currently supported, please use base64 encoded data instead",
            _MW,
        ),
        (_parts({"type": "image_url", "image_url": {"url": "a.jpg"}}), "invalid image input", _MW),
        (_parts({"type": "image_url", "image_url": "data:image/jpeg;base64,%%"}), "invalid image input", _MW),
        (_parts({"type": "image_url", "image_url": {"uri": "data:;base64,"}}), "invalid message format", _MW),
        (_parts({"type": "video", "video": "x"}), "invalid message format", _MW),
        ({"model": "llava", "messages": [{"role": "user"}]}, "invalid message content type: <nil>", _MW),
        (
            {"model": "llava", "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
            "json: cannot unmarshal string into Go struct field ChatCompletionRequest.stream of type bool",
            _MW,
        ),
        # from the handler, rewritten by the middleware's writer
        ({"messages": [{"role": "user", "content": "x"}]}, "model is required", "application/json"),
        (
            _parts({"type": "image_url", "image_url": "data:;base64," + b64(b"not an image")}),
            "Failed to load image or audio file",
            "application/json",
        ),
    ],
)
def test_openai_bad_requests_fail_like_ollama(ollama_standin, body, message, content_type):
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    r = requests.post(ollama_standin.url + "/v1/chat/completions", timeout=5, **kw)
    assert (r.status_code, r.headers["Content-Type"]) == (400, content_type)
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def test_openai_http500(ollama_standin, oai, frame_jpeg):
    ollama_standin.failure = "http500"
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg))
    assert info.value.status_code == 500
    assert info.value.body == {
        "message": "llama runner process has terminated: exit status 2",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True)
    assert len(ollama_standin.requests) == 2, "max_retries=0: no retry"
    ollama_standin.failure = None
    assert oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg)).choices[0].finish_reason == "stop"


def test_openai_midstream_error(ollama_standin, oai, frame_jpeg):
    ollama_standin.failure = "midstream_error"
    ollama_standin.failure_message = "an error was encountered while running the model"
    # Ollama's own behaviour: one empty chunk, then the stream just ends, without a finish_reason;
    # the openai client raises nothing, so a consumer must check for the finish_reason itself
    chunks = list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True))
    words = default_caption("", frame_jpeg).split(" ")
    assert [c.choices[0].delta.content for c in chunks] == [words[0], " " + words[1], ""]
    assert all(c.choices[0].finish_reason is None for c in chunks)
    assert chunks[-1].model == ""
    text_only = {"model": "llava", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    resp = raw_post(ollama_standin.url, "/v1/chat/completions", text_only)
    resp.read_head()
    body = b"".join(resp.read_chunks())
    resp.sock.close()
    assert resp.status == 200 and b"[DONE]" not in body and b"error" not in body
    assert len(sse_events(body)) == 3
    # what OpenAI itself does, on request: an error event, which the client raises while iterating
    ollama_standin.sse_error_events = True
    got = []
    with pytest.raises(openai.APIError) as info:
        for c in oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True):
            got.append(c.choices[0].delta.content)
    assert info.value.message == "an error was encountered while running the model"
    assert info.value.body["type"] == "api_error"
    assert len(got) == 2
    # without streaming: a plain 500
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg))


def test_openai_sse_events_are_cut_and_merged_across_chunks(ollama_standin, frame_jpeg):
    resp = raw_post(
        ollama_standin.url,
        "/v1/chat/completions",
        {"model": "llava", "stream": True, "messages": image_message(frame_jpeg), "stream_options": {"include_usage": True}},
    )
    resp.read_head()
    assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
    chunks = resp.read_chunks()
    resp.sock.close()
    body = b"".join(chunks)
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = sse_events(body)
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    text = "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"])
    assert text == default_caption("", frame_jpeg)
    assert objs[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == len(objs) - 2
    assert any(not c.endswith(b"\n\n") for c in chunks), "no event was cut across chunks"
    assert any(c.count(b"data: ") >= 2 for c in chunks), "no chunk carried two events"


@pytest.mark.slow
def test_openai_drip_reset_and_malformed(ollama_standin, oai, frame_jpeg):
    want = default_caption("", frame_jpeg)
    ollama_standin.failure = "drip"
    chunks = list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg)).choices[0].message.content == want
    ollama_standin.failure = "reset"
    with pytest.raises(openai.APIConnectionError):
        list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg))
    ollama_standin.failure = "malformed"
    with pytest.raises(json.JSONDecodeError):
        list(oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=True))


def test_openai_latency_and_unknown_paths(ollama_standin, frame_jpeg):
    ollama_standin.latency_s = 0.2
    t0 = time.monotonic()
    body = {"model": "llava", "stream": True, "messages": image_message(frame_jpeg)}
    resp = raw_post(ollama_standin.url, "/v1/chat/completions", body)
    resp.read_head()
    resp.read_chunks()
    resp.sock.close()
    assert resp.t_headers - t0 >= 0.2, "headers wait for the first token, as with Ollama"
    assert requests.get(ollama_standin.url + "/v1/chat/completions", timeout=5).status_code == 405
    r = requests.get(ollama_standin.url + "/v1/nope", timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")


# --------------------------------------------------------------------------- structured answers

CAPTION_SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "activity": {"type": "string"},
        "mood": {"type": "string", "enum": ["calm", "busy"]},
        "outdoors": {"type": "boolean"},
        "share": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"type": "object", "properties": {"room": {"type": "string"}, "floor": {"type": "integer"}}},
    },
    "required": ["count", "activity"],
}


def _matches(instance, schema) -> bool:
    import jsonschema

    jsonschema.validate(instance, schema)
    return set(instance) == set(schema["properties"])            # every property, required or not


@pytest.mark.parametrize("stream", [True, False])
def test_format_json_and_schema_on_generate_and_chat(client, frame_jpeg, stream):
    caption = default_caption("", frame_jpeg)
    r = client.generate(model="llava", prompt="x", images=[b64(frame_jpeg)], format="json", stream=stream)
    text = "".join(p.response for p in r) if stream else r.response
    assert json.loads(text) == {"caption": caption}
    msgs = [{"role": "user", "content": "x", "images": [b64(frame_jpeg)]}]
    r = client.chat(model="llava", messages=msgs, format=CAPTION_SCHEMA, stream=stream)
    pieces = [p.message.content for p in r] if stream else [r.message.content]
    if stream:
        assert len([p for p in pieces if p]) > 5                     # streamed in pieces, like any reply
    obj = json.loads("".join(pieces))
    assert _matches(obj, CAPTION_SCHEMA)
    assert obj["activity"] == caption and obj["mood"] == "calm" and obj["where"]["floor"] == 1


def test_format_plain_is_unchanged_and_a_json_reply_is_kept(client, ollama_standin):
    assert client.generate(model="llava", prompt="x", format="").response == "there is no image to describe"
    ollama_standin.reply = '{"count": 3, "activity": "queueing"}'
    r = client.generate(model="llava", prompt="x", format=CAPTION_SCHEMA)
    assert json.loads(r.response) == {"count": 3, "activity": "queueing"}


@pytest.mark.parametrize("fmt, quoted", [("xml", '"\\"xml\\""'), (["json"], '"[\\"json\\"]"'), (3, '"3"')])
@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_an_invalid_format_is_refused_like_ollama(ollama_standin, path, fmt, quoted):
    body = {"model": "llava", "format": fmt, "stream": False}
    body.update({"prompt": "x"} if path == "/api/generate" else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(ollama_standin.url + path, json=body, timeout=10)
    assert r.status_code == 500
    # (raw HTTP: the ollama client itself only lets "", "json" or a dict through)
    assert r.json() == {"error": f'invalid format: {quoted}; expected "json" or a valid JSON Schema object'}


@pytest.mark.parametrize("stream", [True, False])
def test_response_format_on_openai(oai, frame_jpeg, stream):
    caption = default_caption("", frame_jpeg)

    def ask(response_format):
        r = oai.chat.completions.create(model="llava", messages=image_message(frame_jpeg), stream=stream,
                                        response_format=response_format)
        if stream:
            pieces = [c.choices[0].delta.content for c in r if c.choices and c.choices[0].delta.content]
            assert len(pieces) > 1
            return "".join(pieces)
        return r.choices[0].message.content

    assert json.loads(ask({"type": "json_object"})) == {"caption": caption}
    obj = json.loads(ask({"type": "json_schema", "json_schema": {"name": "caption", "schema": CAPTION_SCHEMA}}))
    assert _matches(obj, CAPTION_SCHEMA)
    # Ollama's compat layer: no name is fine, no schema is plain text, other types are ignored
    assert _matches(json.loads(ask({"type": "json_schema", "json_schema": {"schema": CAPTION_SCHEMA}})),
                    CAPTION_SCHEMA)
    assert ask({"type": "json_schema", "json_schema": {"name": "caption"}}) == caption
    assert ask({"type": "text"}) == caption


def test_response_format_refusals_like_ollama(ollama_standin, oai):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(model="llava", messages=msgs,
                                    response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": "yaml"}})
    assert e.value.body == {"message": 'invalid format: "\\"yaml\\""; expected "json" or a valid JSON Schema object',
                            "type": "api_error", "param": None, "code": None}
    r = httpx.post(ollama_standin.url + "/v1/chat/completions", timeout=10,
                   json={"model": "llava", "messages": msgs, "response_format": "json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "json: cannot unmarshal string into Go struct field ChatCompletionRequest.response_format "
        "of type openai.ResponseFormat")


@pytest.mark.parametrize("response_format, message, param, code", [
    ({"type": "xml"}, "Invalid value: 'xml'. Supported values are: 'json_object', 'json_schema', and 'text'.",
     "response_format.type", "invalid_value"),
    ({"type": "json_schema"}, "Missing required parameter: 'response_format.json_schema'.",
     "response_format.json_schema", "missing_required_parameter"),
    ({"type": "json_schema", "json_schema": {"schema": CAPTION_SCHEMA}},
     "Missing required parameter: 'response_format.json_schema.name'.",
     "response_format.json_schema.name", "missing_required_parameter"),
])
def test_response_format_refusals_like_openai(ollama_standin, oai, response_format, message, param, code):
    ollama_standin.openai_strict = True
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="llava", messages=[{"role": "user", "content": "x"}],
                                    response_format=response_format)
    assert e.value.status_code == 400
    assert e.value.body == {"message": message, "type": "invalid_request_error", "param": param, "code": code}
