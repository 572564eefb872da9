"""``vision-host serve``: the official ``ollama`` and ``openai`` clients against a real server.

A tiny random-weight BLIP (hidden 32, 2 layers, image 32×32, a 30-word vocabulary) is built
at test time and saved with ``save_pretrained``; the server runs it through the real code
path (BlipProcessor, BlipForConditionalGeneration.generate, the batch streamer). The
answers are nonsense words from that vocabulary. No network is used.
"""

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

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
# These tests hold the model's generate call at a gate they open themselves (GatedGenerate), so
# the queue is in a known state when the next request arrives, however busy the machine is. No
# test waits on the clock except for the timeout it tests; _WAIT_S only bounds waits for events.
_WAIT_S = 120


def _stats(url: str) -> dict:
    return requests.get(url + "/api/ps").json()["vision_host"]


class GatedGenerate:
    """Stands in for a loaded model's ``generate`` on the server's worker thread: each call
    waits until :attr:`gate` is set, then runs the real ``generate``. :attr:`entered` receives
    each call's rows (the server's jobs) when it reaches the gate, :attr:`returned` when the
    real ``generate`` is over. The gate starts open."""

    def __init__(self, real) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.entered: queue.Queue = queue.Queue()
        self.returned: queue.Queue = queue.Queue()

    def close(self) -> None:
        """Hold the next calls at the gate, and forget the earlier ones."""
        self.gate.clear()
        for q in (self.entered, self.returned):
            while not q.empty():
                q.get_nowait()

    def __call__(self, rows, decoding, max_new, seed) -> None:
        rows = list(rows)
        self.entered.put(rows)
        if not self.gate.wait(_WAIT_S):
            raise RuntimeError("the test never opened the gate")
        try:
            self.real(rows, decoding, max_new, seed)
        finally:
            self.returned.put(rows)


@contextlib.contextmanager
def gated_server(model_dir: Path, **settings: Any) -> Iterator[tuple[str, Any, GatedGenerate]]:
    """:func:`vision_host.server.create_app` for ``model_dir`` (``keep_alive`` forever, the
    scheduler ``settings``), its ``generate`` behind a :class:`GatedGenerate`, served by
    uvicorn in this process: yields (base URL, scheduler, gate)."""
    import uvicorn
    from vision_host.server import bind_socket, create_app
    from vision_host.vlm import open_model

    model = open_model(str(model_dir)).load()
    gated = model.generate = GatedGenerate(model.generate)
    app = create_app(model, keep_alive=-1, **settings)
    sock = bind_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        # the socket listens already: this request waits in its backlog until uvicorn serves it
        assert requests.get(url + "/", timeout=_WAIT_S).text == "Ollama is running"
        yield url, app.state.scheduler, gated
    finally:
        gated.gate.set()
        srv.should_exit = True
        thread.join(_WAIT_S)
        sock.close()


@pytest.fixture(scope="module")
def batching_server(tiny_blip):
    """Batches of up to 8; the request timeout (not under test) far away."""
    with gated_server(tiny_blip, max_batch=8, max_queue=32, request_timeout_s=600) as served:
        yield served


@pytest.fixture(scope="module")
def queue_server(tiny_blip):
    """A queue of 2, no batching; the request timeout (not under test) far away."""
    with gated_server(tiny_blip, max_batch=1, max_queue=2, request_timeout_s=600) as served:
        yield served


@pytest.fixture(scope="module")
def timeout_server(tiny_blip):
    """No batching, a 1.5 s request timeout."""
    with gated_server(tiny_blip, max_batch=1, request_timeout_s=1.5) as served:
        yield served


def _wait_queued(scheduler, n: int) -> None:
    """Wait until ``n`` requests wait in ``scheduler``'s queue (it is notified of each)."""
    with scheduler.cond:
        assert scheduler.cond.wait_for(lambda: len(scheduler.queue) == n, _WAIT_S), scheduler.stats()


def test_parallel_clients_are_micro_batched(batching_server, frame_jpeg):
    """16 official clients at once, each with a real JPEG: all answered, in shared batches.
    The first batch is held in ``generate`` until the other requests wait in the queue."""
    url, scheduler, gated = batching_server
    assert scheduler.wait_idle(_WAIT_S)
    before = scheduler.stats()
    n = 16
    replies, errors = [None] * n, []

    def one(i: int) -> None:
        try:
            replies[i] = ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg],
                                                          stream=False, options={"num_predict": 8})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    gated.close()
    try:
        for t in threads:
            t.start()
        first = gated.entered.get(timeout=_WAIT_S)
        _wait_queued(scheduler, n - len(first))
    finally:
        gated.gate.set()
    for t in threads:
        t.join(_WAIT_S)
    assert not errors, errors
    assert all(r is not None and r.done and r.response.strip() for r in replies)
    assert all(set(_words(r.response)) <= set(WORDS) and 0 < r.eval_count <= 8 for r in replies)
    after = scheduler.stats()
    batches = after["batches"] - before["batches"]
    served = after["batched_requests"] - before["batched_requests"]
    assert served == n
    print(f"mean batch size {served / batches:.2f} ({n} clients, {batches} batches, "
          f"sizes {after['recent_batch_sizes'][-batches:]})")
    # the held batch, then the other 16 - len(first) in batches of at most 8
    assert batches <= 1 + -(-(n - len(first)) // 8) and after["max_batch_size"] <= 8
    # A batched answer is the answer the request gets alone (beam search, same settings).
    alone = ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg],
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
    # the worker unloads just after the answer went out; _WAIT_S bounds the wait, it is no delay
    deadline = time.monotonic() + _WAIT_S
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


def test_a_full_queue_answers_503_with_retry_after(queue_server, frame_jpeg):
    """One request held in ``generate`` and two waiting (the queue's limit): each API refuses
    the next at once (503, ``Retry-After``, its own error shape); the three are answered."""
    import base64

    url, scheduler, gated = queue_server
    assert scheduler.wait_idle(_WAIT_S)
    rejected = scheduler.stats()["rejected"]
    b64 = base64.b64encode(frame_jpeg).decode()
    generate_body = {"model": "tiny-blip", "prompt": "a photo of", "images": [b64], "stream": False,
                     "options": {"num_predict": 4}}
    openai_body = {"model": "tiny-blip", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a photo of"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64}}]}]}
    workers_ai_body = {"prompt": "a photo of", "image": list(frame_jpeg), "max_tokens": 4}

    def ollama_call():
        return ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg],
                                                stream=False, options={"num_predict": 4})

    held = {"ollama": ollama_call,
            "generate": lambda: requests.post(url + "/api/generate", json=generate_body, timeout=_WAIT_S),
            "openai": lambda: requests.post(url + "/v1/chat/completions", json=openai_body, timeout=_WAIT_S)}
    answers, errors = {}, []

    def ask(name: str) -> None:
        try:
            answers[name] = held[name]()
        except Exception as exc:  # noqa: BLE001
            errors.append((name, exc))
    threads = [threading.Thread(target=ask, args=(name,)) for name in held]
    gated.close()
    try:
        threads[0].start()
        gated.entered.get(timeout=_WAIT_S)          # the first is in generate, held at the gate
        for t in threads[1:]:
            t.start()
        _wait_queued(scheduler, 2)                   # the other two fill the queue
        with pytest.raises(ollama.ResponseError) as exc:
            ollama_call()
        assert exc.value.status_code == 503 and exc.value.error.startswith("server busy: ")
        r = requests.post(url + "/api/generate", json=generate_body, timeout=_WAIT_S)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"].startswith("server busy: ")
        r = requests.post(url + "/v1/chat/completions", json=openai_body, timeout=_WAIT_S)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_busy"
        assert error["message"].startswith("server busy: ")
        r = requests.post(url + "/ai/run/tiny-blip", json=workers_ai_body, timeout=_WAIT_S)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["success"] is False and r.json()["errors"][0]["code"] == 3040
        assert scheduler.stats()["queued"] == 2 and gated.returned.empty()
    finally:
        gated.gate.set()
    for t in threads:
        t.join(_WAIT_S)
    assert not errors, errors
    assert answers["ollama"].done and answers["ollama"].eval_count <= 4
    assert answers["generate"].status_code == 200 and answers["generate"].json()["done"] is True
    assert answers["openai"].status_code == 200
    assert answers["openai"].json()["choices"][0]["message"]["role"] == "assistant"
    assert scheduler.stats()["rejected"] == rejected + 4


def test_a_complete_row_is_not_timed_out_while_its_batch_generates():
    """A row whose answer ended (its end-of-sequence token) keeps it when the rest of its
    batch generates past the row's deadline; a row still generating is timed out."""
    from vision_host.server import Job

    done = Job(None, deadline=time.monotonic() - 1)
    done.finished("a photo", 2, "stop", time.perf_counter())
    assert not done.should_stop() and not done.timed_out and done.error is None
    late = Job(None, deadline=time.monotonic() - 1)
    assert late.should_stop() and late.timed_out


def test_a_request_past_its_timeout_is_stopped(timeout_server, frame_jpeg):
    """504 at ``request_timeout_s`` (1.5 s) while the generation is held in ``generate`` (so
    the timeout answered, not the generation's end), which then stops at its next token; a
    request queued behind another is withdrawn at its timeout; a stream past its timeout ends
    with Ollama's error line."""
    url, scheduler, gated = timeout_server
    assert scheduler.wait_idle(_WAIT_S)
    timeouts = scheduler.stats()["timeouts"]
    ask = {"model": "tiny-blip", "prompt": "a photo of", "images": [frame_jpeg], "options": {"num_predict": 60}}

    # 1. A running generation: the 504 comes at the timeout, the generation stops at its next token.
    gated.close()
    try:
        t0 = time.monotonic()
        with pytest.raises(ollama.ResponseError) as exc:
            ollama.Client(host=url).generate(stream=False, **ask)
        assert exc.value.status_code == 504 and "timed out after 1.5 s" in exc.value.error
        assert time.monotonic() - t0 > 1.4
        [job] = gated.entered.get(timeout=_WAIT_S)   # it had reached generate ...
        assert gated.returned.empty()                # ... and was still held there
    finally:
        gated.gate.set()
    assert gated.returned.get(timeout=_WAIT_S) == [job]
    assert job.result.eval_count <= 1                # not 60
    assert scheduler.wait_idle(_WAIT_S) and scheduler.stats()["timeouts"] == timeouts + 1

    # 2. A stream held in generate, and a request queued behind it: the queued one gets its 504
    # at its timeout (the stream's, earlier, has passed too); the stream then ends with the error line.
    streamed: dict = {}

    def stream() -> None:
        try:
            streamed["parts"] = list(ollama.Client(host=url).generate(stream=True, **ask))
        except Exception as exc:  # noqa: BLE001
            streamed["error"] = exc
    streamer = threading.Thread(target=stream)
    gated.close()
    try:
        streamer.start()
        gated.entered.get(timeout=_WAIT_S)
        with pytest.raises(ollama.ResponseError) as exc:
            ollama.Client(host=url).generate(stream=False, **ask)
        assert exc.value.status_code == 504 and "timed out" in exc.value.error
        assert gated.entered.empty()                 # withdrawn from the queue, never generated
    finally:
        gated.gate.set()
    streamer.join(_WAIT_S)
    assert isinstance(streamed.get("error"), ollama.ResponseError), streamed
    assert "timed out" in streamed["error"].error
    assert scheduler.wait_idle(_WAIT_S) and scheduler.stats()["timeouts"] == timeouts + 3

    # 3. A short request still works.
    r = ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[frame_jpeg], stream=False,
                                         options={"num_predict": 2})
    assert r.done and r.eval_count <= 2
