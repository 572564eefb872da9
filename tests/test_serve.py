"""``vision-host serve``: the official ``ollama`` and ``openai`` clients against a real server.

A tiny random-weight BLIP (hidden 32, 2 layers, image 32×32, a 30-word vocabulary) is built
at test time and saved with ``save_pretrained``; the server runs it through the real code
path (BlipProcessor, BlipForConditionalGeneration.generate, the batch streamer). The
answers are nonsense words from that vocabulary. No network is used.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import cv2
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("PIL")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "media" / "bottle-detection.mp4"
from tiny_models import WORDS, build_tiny_blip  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "host"), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the Hub in tests
    env.update(extra)
    return env


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_host", "serve", *args]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("model") / "tiny-blip")


@contextlib.contextmanager
def serve_process(model: Path | str, log_path: Path, *args: str, env: dict | None = None) -> Iterator[str]:
    """``vision-host serve --model model`` on a free port until the block ends: its base URL.
    Its stdout and stderr go to ``log_path``; ``env`` defaults to :func:`_env`."""
    port = _free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(_serve_cmd("--model", str(model), "--port", str(port), *args),
                            stdout=log, stderr=subprocess.STDOUT, env=env or _env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vision-host serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if requests.get(url + "/", timeout=1).text == "Ollama is running":
                    break
            except (requests.ConnectionError, requests.Timeout):   # bound before the model is loaded
                pass
            assert time.monotonic() < deadline, "vision-host serve did not start within 60 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_blip):
    """``vision-host serve --model <tiny BLIP dir>`` on a free port: yields its base URL."""
    with serve_process(tiny_blip, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def frame_jpeg() -> bytes:
    """Frame 30 of the shipped clip as JPEG."""
    cap = cv2.VideoCapture(str(CLIP))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
    ok, frame = cap.read()
    cap.release()
    assert ok, f"cannot read {CLIP}"
    return cv2.imencode(".jpg", frame)[1].tobytes()


def _words(text: str) -> list[str]:
    return text.split()


# -- Ollama API ---------------------------------------------------------------------------------
def test_root_version_list_show(server):
    assert requests.get(server + "/").text == "Ollama is running"
    assert requests.get(server + "/api/version").json()["version"]
    client = ollama.Client(host=server)
    listed = client.list()
    assert [m.model for m in listed.models] == ["tiny-blip:latest"]
    assert listed.models[0].details.family == "blip"
    shown = client.show("tiny-blip")
    assert "vision" in shown.capabilities and shown.details.family == "blip"


def test_generate_stream_and_not(server, frame_jpeg):
    client = ollama.Client(host=server)
    parts = list(client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=True,
                                 options={"num_predict": 6}))
    assert len(parts) >= 2 and all(not p.done for p in parts[:-1])
    final = parts[-1]
    assert final.done and final.done_reason in ("stop", "length")
    assert final.eval_count and final.eval_count <= 6 and final.prompt_eval_count == 4
    assert final.total_duration > 0 and final.eval_duration >= 0 and final.load_duration is not None
    streamed = "".join(p.response for p in parts)
    assert streamed.strip() and set(_words(streamed)) <= set(WORDS)

    whole = client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                            options={"num_predict": 6, "temperature": 0})
    assert whole.done and whole.done_reason in ("stop", "length")
    assert 0 < len(_words(whole.response)) <= 6 and set(_words(whole.response)) <= set(WORDS)
    # Unconditional captioning (empty prompt) with a length cap.
    short = client.generate(model="tiny-blip:latest", prompt="", images=[frame_jpeg], stream=False,
                            options={"num_predict": 1})
    assert short.eval_count == 1 and short.done_reason in ("stop", "length")


def test_generate_raw_ndjson(server, frame_jpeg):
    import base64
    import json
    r = requests.post(server + "/api/generate", stream=True, json={
        "model": "tiny-blip", "prompt": "a picture of", "images": [base64.b64encode(frame_jpeg).decode()],
        "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.iter_lines() if line]
    assert set(lines[0]) == {"model", "created_at", "response", "done"} and lines[0]["done"] is False
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"):
        assert isinstance(lines[-1][key], int)


def test_chat(server, frame_jpeg):
    client = ollama.Client(host=server)
    messages = [{"role": "user", "content": "a photo of", "images": [frame_jpeg]}]
    parts = list(client.chat(model="tiny-blip", messages=messages, stream=True, options={"num_predict": 4}))
    assert parts[-1].done and parts[-1].message.role == "assistant"
    assert "".join(p.message.content for p in parts).strip()
    reply = client.chat(model="tiny-blip", messages=messages, stream=False, options={"num_predict": 4})
    assert reply.message.role == "assistant" and reply.message.content.strip() and reply.done


def test_errors(server, frame_jpeg):
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="llava", prompt="hi", images=[frame_jpeg], stream=False)
    assert exc.value.status_code == 404 and "model 'llava' not found" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404
    r = requests.post(server + "/api/generate", json={"model": "tiny-blip", "prompt": "x", "images": ["!!!"]})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = requests.post(server + "/api/generate", json={"model": "tiny-blip", "prompt": "x", "images": ["aGVsbG8="]})
    assert r.status_code == 400 and r.json() == {"error": "Failed to load image or audio file"}
    r = requests.post(server + "/api/generate", data=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(server + "/api/generate", data=b"")
    assert r.status_code == 400 and r.json() == {"error": "missing request body"}
    r = requests.post(server + "/api/generate", json={"model": "tiny-blip", "prompt": "a photo"})
    assert r.status_code == 400 and "images" in r.json()["error"]


# -- OpenAI API ---------------------------------------------------------------------------------
def test_openai(server, frame_jpeg):
    import base64
    client = openai.OpenAI(base_url=server + "/v1", api_key="ollama")
    assert [m.id for m in client.models.list()] == ["tiny-blip:latest"]
    url = "data:image/jpeg;base64," + base64.b64encode(frame_jpeg).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a photo of"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    done = client.chat.completions.create(model="tiny-blip", messages=messages, max_tokens=5)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content.strip() and done.choices[0].finish_reason in ("stop", "length")
    assert 0 < done.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model="tiny-blip", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and set(_words(text)) <= set(WORDS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 5
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-blip", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}])


# -- start-up errors ----------------------------------------------------------------------------
def test_offline_uncached_model_is_a_clear_error(tmp_path):
    r = subprocess.run(_serve_cmd("--model", "someone/not-cached-blip", "--port", str(_free_port())),
                       env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hub")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "someone/not-cached-blip" in r.stderr and "download" in r.stderr and "--model DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(_serve_cmd("--model", "blip", "--port", str(port)), env=_env(),
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert f"port {port}" in r.stderr and "--port" in r.stderr and "Traceback" not in r.stderr


def test_run_does_not_import_torch():
    code = ("import sys, vision_host.cli as c; c.build_parser().parse_args(['serve']); "
            "import vision_host.server; "
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'fastapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr


@pytest.mark.parametrize("api", ["generate", "chat", "openai"])
def test_the_ollama_processor_captions_real_footage_through_each_protocol(server, tmp_path, api):
    """End to end: `vision-host run -p ollama` on the shipped clip against `vision-host serve`."""
    # an empty request loads the model (an earlier test may have unloaded it) and keeps it
    requests.post(server + "/api/generate", json={"model": "tiny-blip", "keep_alive": -1}, timeout=60)
    stats_path = tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(REPO / "media" / "bottle-detection.mp4"),
         "-c", f"ollama-url={server}", "-c", "ollama-model=tiny-blip", "-c", f"ollama-api={api}",
         "-c", "ollama-interval-ms=200", "-c", "ollama-max-tokens=5", "--max-frames", "150",
         "-o", "file", "-d", str(tmp_path / "out.mp4"), "--stats", str(stats_path)],
        capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    stats = json.loads(stats_path.read_text())
    assert stats["frames_out"] == 150
    assert stats["captions"]["completed"] >= 1, result.stderr
    assert stats["captions"]["failed"] == 0, result.stderr
    assert stats["processors"]["ollama"]["errors"] == 0


# -- scheduling: micro-batching, bounded queue, timeouts, keep_alive -----------------------------
def _stats(url: str) -> dict:
    return requests.get(url + "/api/ps").json()["vision_host"]


def test_parallel_clients_are_micro_batched(server, frame_jpeg):
    """16 official clients at once, each with a real JPEG: all answered, in shared batches."""
    import threading

    before = _stats(server)
    n = 16
    barrier = threading.Barrier(n)
    replies, errors = [None] * n, []

    def one(i: int) -> None:
        try:
            client = ollama.Client(host=server)
            barrier.wait(10)
            replies[i] = client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                                         options={"num_predict": 8})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(r is not None and r.done and r.response.strip() for r in replies)
    assert all(set(_words(r.response)) <= set(WORDS) and 0 < r.eval_count <= 8 for r in replies)
    after = _stats(server)
    batches = after["batches"] - before["batches"]
    served = after["batched_requests"] - before["batched_requests"]
    assert served == n
    mean = served / batches
    print(f"mean batch size {mean:.2f} ({n} clients, {batches} batches, sizes {after['recent_batch_sizes'][-batches:]})")
    assert mean > 1 and after["max_batch_size"] <= 8
    # A batched answer is the answer the request gets alone (beam search, same settings).
    alone = ollama.Client(host=server).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg],
                                                stream=False, options={"num_predict": 8})
    assert {r.response for r in replies} == {alone.response}


def test_keep_alive_unloads_and_the_next_request_reloads(server, frame_jpeg):
    client = ollama.Client(host=server)
    assert [m.model for m in client.ps().models] == ["tiny-blip:latest"]
    assert client.ps().models[0].expires_at is not None
    # keep_alive=0 on a real request: answered, then unloaded.
    r = client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                        options={"num_predict": 3}, keep_alive=0)
    assert r.done and r.response.strip()
    deadline = time.monotonic() + 5
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ps().models == [] and not _stats(server)["loaded"]
    assert [m.model for m in client.list().models] == ["tiny-blip:latest"]   # still served
    loads = _stats(server)["loads"]
    # The next request reloads it, and keeps it for its keep_alive ("10m").
    r = client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                        options={"num_predict": 3}, keep_alive="10m")
    assert r.done and r.response.strip() and r.load_duration > 0
    ps = client.ps().models
    assert [m.model for m in ps] == ["tiny-blip:latest"] and _stats(server)["loads"] == loads + 1
    left = ps[0].expires_at.timestamp() - time.time()
    assert 500 < left <= 600
    # Ollama's way to unload without a prompt, then to load again; bad durations are a 400.
    assert client.generate(model="tiny-blip", keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    assert client.generate(model="tiny-blip", keep_alive=-1).done_reason == "load"
    assert client.ps().models[0].expires_at.year > 2200
    with pytest.raises(ollama.ResponseError) as exc:
        client.generate(model="tiny-blip", prompt="x", images=[frame_jpeg], keep_alive="soon")
    assert exc.value.status_code == 400 and "invalid duration" in exc.value.error
    client.generate(model="tiny-blip", keep_alive="5m")   # back to the default for the other tests


@pytest.fixture(scope="module")
def slow_server(tiny_blip):
    """An in-process server with a queue of 2, no batching, a 1.5 s request timeout and a
    decoder slowed to ~50 ms a step (so the queue fills and long requests time out)."""
    import threading

    import uvicorn
    from vision_host.server import bind_socket, create_app
    from vision_host.vlm import open_model

    captioner = open_model(str(tiny_blip)).load()
    captioner.model.text_decoder.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    app = create_app(captioner, max_batch=1, max_queue=2, request_timeout_s=1.5, keep_alive=-1)
    port = _free_port()
    sock = bind_socket("127.0.0.1", port)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield url, app.state.scheduler
    srv.should_exit = True
    thread.join(10)
    sock.close()


def test_a_full_queue_answers_503_with_retry_after(slow_server, frame_jpeg):
    import base64
    import threading

    url, scheduler = slow_server
    n = 10
    barrier = threading.Barrier(n)
    ok, busy, raw_busy, other = [], [], [], []
    b64 = base64.b64encode(frame_jpeg).decode()

    def one(i: int) -> None:
        try:
            barrier.wait(10)
            if i % 2:
                r = requests.post(url + ("/api/generate" if i % 4 == 1 else "/v1/chat/completions"), timeout=30,
                                  json={"model": "tiny-blip", "prompt": "a photo of", "images": [b64], "stream": False,
                                        "options": {"num_predict": 4}} if i % 4 == 1 else
                                  {"model": "tiny-blip", "max_tokens": 4, "messages": [{"role": "user", "content": [
                                      {"type": "text", "text": "a photo of"},
                                      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64}}]}]})
                (ok if r.status_code == 200 else raw_busy if r.status_code == 503 else other).append(r)
            else:
                ok.append(ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg],
                                                           stream=False, options={"num_predict": 4}))
        except ollama.ResponseError as exc:
            (busy if exc.status_code == 503 else other).append(exc)
        except Exception as exc:  # noqa: BLE001
            other.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not other, other
    assert 3 <= len(ok) and busy and raw_busy, (len(ok), len(busy), len(raw_busy))
    assert all("server busy" in e.error for e in busy)
    for r in raw_busy:
        assert int(r.headers["Retry-After"]) >= 1
        body = r.json()
        if r.url.endswith("/api/generate"):
            assert body["error"].startswith("server busy: ")
        else:
            assert body["error"]["type"] == "server_error" and body["error"]["message"].startswith("server busy: ")
    assert scheduler.stats()["rejected"] == len(busy) + len(raw_busy)


def test_a_request_past_its_timeout_is_stopped(slow_server, frame_jpeg):
    url, scheduler = slow_server
    while scheduler.stats()["busy"] or scheduler.stats()["queued"]:
        time.sleep(0.05)
    client = ollama.Client(host=url)
    t0 = time.monotonic()
    with pytest.raises(ollama.ResponseError) as exc:   # ~60 steps × 50 ms = 3 s > 1.5 s
        client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                        options={"num_predict": 60, "temperature": 0.8, "seed": 1})
    assert exc.value.status_code == 504 and "timed out after 1.5 s" in exc.value.error
    assert 1.4 < time.monotonic() - t0 < 2.5
    time.sleep(0.3)   # the generation stopped at the next token: the worker is free again
    assert not scheduler.stats()["busy"] and scheduler.stats()["timeouts"] >= 1
    # Streaming: the stream ends with Ollama's error line.
    with pytest.raises(ollama.ResponseError) as exc:
        for _ in client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=True,
                                 options={"num_predict": 60}):
            pass
    assert "timed out" in exc.value.error
    # A short request still works.
    r = client.generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                        options={"num_predict": 2})
    assert r.done and r.eval_count <= 2
