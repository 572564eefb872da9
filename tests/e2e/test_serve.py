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

from conftest import REPO  # noqa: E402

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


class ServerURL(str):
    """A server's base URL (a ``str``), with the server process's id as :attr:`pid`."""

    pid: int


@contextlib.contextmanager
def serve_process(model: Path | str, log_path: Path, *args: str, env: dict | None = None) -> Iterator[ServerURL]:
    """``vision-host serve --model model`` on a free port until the block ends: its base URL
    (with ``.pid``). Its stdout and stderr go to ``log_path``; ``env`` defaults to :func:`_env`."""
    port = _free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(_serve_cmd("--model", str(model), "--port", str(port), *args),
                            stdout=log, stderr=subprocess.STDOUT, env=env or _env())
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.pid = proc.pid
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
@pytest.mark.slow
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
    json_type = {"Content-Type": "application/json"}
    r = requests.post(server + "/api/generate", data=b"{not json", headers=json_type)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(server + "/api/generate", data=b"", headers=json_type)
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
@pytest.mark.slow
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
            "import vision_host.serve.app, vision_host.serve.models, vision_host.serve.scheduler; "
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'fastapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False", "False", "False"], out.stderr


@pytest.mark.slow
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
    waits until :attr:`gate` is set, then runs the real ``generate`` (or, while :attr:`failures`
    holds exceptions, raises the next one instead). :attr:`entered` receives each call's rows
    (the server's jobs) when it reaches the gate, :attr:`returned` when the call is over. The
    gate starts open."""

    def __init__(self, real) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.entered: queue.Queue = queue.Queue()
        self.returned: queue.Queue = queue.Queue()
        self.failures: queue.Queue = queue.Queue()

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
            if not self.failures.empty():
                raise self.failures.get_nowait()
            self.real(rows, decoding, max_new, seed)
        finally:
            self.returned.put(rows)


@contextlib.contextmanager
def gated_server(model_dir: Path, **settings: Any) -> Iterator[tuple[str, Any, GatedGenerate]]:
    """:func:`vision_host.serve.app.create_app` for ``model_dir`` (``keep_alive`` forever, the
    scheduler ``settings``), its ``generate`` behind a :class:`GatedGenerate`, served by
    uvicorn in this process: yields (base URL, scheduler, gate)."""
    import uvicorn
    from vision_host.serve.app import bind_socket, create_app
    from vision_host.serve.models import open_model

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    from vision_host.serve.scheduler import Job

    done = Job(None, deadline=time.monotonic() - 1)
    done.finished("a photo", 2, "stop", time.perf_counter())
    assert not done.should_stop() and not done.timed_out and done.error is None
    late = Job(None, deadline=time.monotonic() - 1)
    assert late.should_stop() and late.timed_out


@pytest.mark.slow
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


# -- safety: request limits, strict input, origins and content types, a worker that survives ----
# Every request here goes over real HTTP to 127.0.0.1. Limits under test are small on
# ``limited_server`` (each one's flag) and the defaults on ``server``.
_GEN, _OAI, _CF = "/api/generate", "/v1/chat/completions", "/ai/run/tiny-blip"
_JSON = {"Content-Type": "application/json"}
_LIMIT_FLAGS = ("--max-beams", "2", "--max-new-tokens", "16", "--max-top-k", "5", "--max-body-mb", "1",
                "--max-image-pixels", "1000000", "--max-prompt-chars", "200", "--decode-threads", "1",
                "--allow-origin", "http://app.example:3000", "--allow-host", "app.example")


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, tiny_blip):
    """``vision-host serve`` with every request limit set small by its flag (:data:`_LIMIT_FLAGS`)."""
    with serve_process(tiny_blip, tmp_path_factory.mktemp("limited") / "serve.log", *_LIMIT_FLAGS) as url:
        yield url


@pytest.fixture(scope="module")
def sturdy_server(tiny_blip):
    """No batching, a 15 s request timeout: a model worker that died would show as a 504 soon."""
    with gated_server(tiny_blip, max_batch=1, request_timeout_s=15) as served:
        yield served


def _png_1bit(width: int, height: int) -> bytes:
    """An all-black 1-bit grayscale PNG of ``width``×``height``, compressed row by row with
    zlib: 12000×12000 is about 17 kB of file and 144 megapixels decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)   # filter type 0, then the row's bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _bodies(image: bytes, prompt: str = "a photo of") -> dict[str, dict]:
    """The same small request (3 new tokens) in each API's schema: path → JSON body."""
    import base64

    b64 = base64.b64encode(image).decode()
    return {_GEN: {"model": "tiny-blip", "prompt": prompt, "images": [b64], "stream": False,
                   "options": {"num_predict": 3}},
            _OAI: {"model": "tiny-blip", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}]}]},
            _CF: {"image": b64, "prompt": prompt, "max_tokens": 3}}


def _raw_json(body: dict, value: str) -> bytes:
    """``body`` as JSON text with its ``"@V@"`` string written as ``value`` (``NaN``,
    ``Infinity``, ``1e400``: what a client may send, though not all of it is JSON)."""
    text = json.dumps(body)
    assert text.count('"@V@"') == 1
    return text.replace('"@V@"', value).encode()


def _assert_error(r, status: int, needle: str = "") -> str:
    """``r`` is a ``status`` error in its API's shape (by its path): Ollama's ``{"error": str}``,
    OpenAI's ``{"error": {"message", "type", ...}}``, Workers AI's ``{"success": false,
    "errors": [{"code", "message"}]}``; ``needle`` is in its message, which is returned."""
    from urllib.parse import urlsplit

    path = urlsplit(r.url).path
    assert r.status_code == status, (path, r.status_code, r.text[:500])
    body = r.json()
    if path.startswith("/v1/"):
        assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
        assert body["error"]["type"] == ("invalid_request_error" if status < 500 else
                                         "server_error" if status in (503, 504) else "api_error"), body
        message = body["error"]["message"]
    elif "/ai/run/" in path:
        assert body["success"] is False and body["result"] is None and len(body["errors"]) == 1, body
        assert body["errors"][0]["code"] == (5006 if status < 500 else {503: 3040, 504: 3007}.get(status, 3043))
        message = body["errors"][0]["message"]
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        message = body["error"]
    assert needle in message, message
    return message


def _answered(url: str, image: bytes, **extra: Any) -> None:
    """A normal request to ``url`` is answered (the model worker serves)."""
    r = ollama.Client(host=url).generate(model="tiny-blip", prompt="a photo of", images=[image], stream=False,
                                         options={"num_predict": 2}, **extra)
    assert r.done and r.response.strip()


@pytest.mark.slow
def test_no_keep_alive_stops_the_model_worker(sturdy_server, frame_jpeg):
    """8. Huge ``keep_alive`` values mean forever; NaN and infinity are 400; none of them (nor
    a text/plain one from a foreign page) leaves the worker dead: the next request is answered."""
    url, scheduler, gated = sturdy_server
    body = {**_bodies(frame_jpeg)[_GEN], "keep_alive": "@V@"}
    for value in ("1e12", "1e300", str(10 ** 400), '"1e300"', '"99999999999999h"', "-1e300"):
        r = requests.post(url + _GEN, data=_raw_json(body, value), headers=_JSON, timeout=_WAIT_S)
        assert r.status_code == 200 and r.json()["done"], (value, r.text)
        assert ollama.Client(host=url).ps().models[0].expires_at.year > 2200, value   # Ollama's "forever"
        _answered(url, frame_jpeg)
        r = requests.post(url + _GEN, data=_raw_json({"model": "tiny-blip", "keep_alive": "@V@"}, value),
                          headers=_JSON, timeout=_WAIT_S)   # a load request
        assert r.status_code == 200 and r.json()["done_reason"] == "load", (value, r.text)
        _answered(url, frame_jpeg)
    for value in ("NaN", "Infinity", "-Infinity", "1e400", '"NaN"', '"inf"', '"-Infinity"', '"1e400"'):
        r = requests.post(url + _GEN, data=_raw_json(body, value), headers=_JSON, timeout=_WAIT_S)
        _assert_error(r, 400)
        _answered(url, frame_jpeg)
    # What any web page can send: text/plain from its own origin.
    r = requests.post(url + _GEN, data=_raw_json(body, "1e300"), timeout=_WAIT_S,
                      headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example"})
    _assert_error(r, 403, "origin")
    _answered(url, frame_jpeg)
    assert scheduler.thread.is_alive()


@pytest.mark.slow
def test_the_model_worker_survives_any_exception(sturdy_server, frame_jpeg, monkeypatch):
    """8. A generation that raises answers 500 in its API's shape; unloading that raises (in
    the worker's own bookkeeping after an answer) is logged; the worker serves on."""
    url, scheduler, gated = sturdy_server
    assert scheduler.wait_idle(_WAIT_S)
    for path, body in _bodies(frame_jpeg).items():
        gated.failures.put(RuntimeError("boom"))
        r = requests.post(url + path, json=body, timeout=_WAIT_S)
        _assert_error(r, 500, "boom")
        _answered(url, frame_jpeg)

    def broken_unload() -> None:
        raise RuntimeError("cannot unload")
    monkeypatch.setattr(scheduler.model, "unload", broken_unload)
    _answered(url, frame_jpeg, keep_alive=0)   # answered; then the worker's unload raises
    assert scheduler.wait_idle(_WAIT_S)
    monkeypatch.undo()
    _answered(url, frame_jpeg)
    assert scheduler.thread.is_alive()


@pytest.mark.slow
def test_a_full_queue_refuses_before_decoding(queue_server, frame_jpeg, monkeypatch):
    """9. With the queue full, a request gets 503 in each API without its image being decoded."""
    url, scheduler, gated = queue_server
    assert scheduler.wait_idle(_WAIT_S)
    decoded: queue.Queue = queue.Queue()
    real_prepare = scheduler.model.prepare

    def spy(image, *args):
        decoded.put(len(image))
        return real_prepare(image, *args)
    monkeypatch.setattr(scheduler.model, "prepare", spy)
    errors: list = []

    def held() -> None:
        try:
            _answered(url, frame_jpeg)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=held) for _ in range(3)]
    gated.close()
    try:
        threads[0].start()
        gated.entered.get(timeout=_WAIT_S)   # one in generate
        for t in threads[1:]:
            t.start()
        _wait_queued(scheduler, 2)            # two waiting: the queue is full
        while not decoded.empty():
            decoded.get_nowait()
        large = _png_1bit(6000, 6000)         # 36 megapixels: under the pixel limit, yet costly to decode
        for path, body in _bodies(large).items():
            r = requests.post(url + path, json=body, timeout=_WAIT_S)
            _assert_error(r, 503, "server busy")
            assert int(r.headers["Retry-After"]) >= 1
        assert decoded.empty(), "a refused request's image was decoded"
    finally:
        gated.gate.set()
    for t in threads:
        t.join(_WAIT_S)
    assert not errors, errors


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def _reset_peak_rss(pid: int) -> None:
    """Make the process's peak resident memory its present one (Linux's ``clear_refs`` 5), when allowed."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads memory use from Linux's /proc")
def test_a_decompression_bomb_is_refused_from_its_header(server, frame_jpeg):
    """9. A 17 kB PNG of 12000×12000 pixels (144 megapixels) sent three times at once, once to
    each API: 413 from its header, and the server's peak memory barely moves."""
    bomb = _png_1bit(12000, 12000)
    assert len(bomb) < 30_000
    _answered(server, frame_jpeg)   # the server's memory in use after a normal request
    _reset_peak_rss(server.pid)
    before = _peak_rss_mb(server.pid)
    answers: dict = {}

    def send(path: str, body: dict) -> None:
        answers[path] = requests.post(server + path, json=body, timeout=_WAIT_S)
    threads = [threading.Thread(target=send, args=item) for item in _bodies(bomb).items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_WAIT_S)
    for path in (_GEN, _OAI, _CF):
        _assert_error(answers[path], 413, "12000×12000 pixels")
    grown = _peak_rss_mb(server.pid) - before
    print(f"three 144-megapixel PNGs refused; the server's peak memory grew by {grown:.1f} MiB")
    assert grown < 150, f"the server's peak memory grew by {grown:.0f} MiB"
    _answered(server, frame_jpeg)


@pytest.mark.slow
def test_the_pixel_limit_follows_its_flag(limited_server):
    """9. ``--max-image-pixels 1000000``: 1000×1000 is answered, 1001×1000 refused (413)."""
    r = requests.post(limited_server + _GEN, json=_bodies(_png_1bit(1000, 1000))[_GEN], timeout=_WAIT_S)
    assert r.status_code == 200 and r.json()["done"], r.text
    for path, body in _bodies(_png_1bit(1001, 1000)).items():
        r = requests.post(limited_server + path, json=body, timeout=_WAIT_S)
        _assert_error(r, 413, "--max-image-pixels")


def _post_unfinished(url: str, path: str, headers: dict, chunks: tuple = ()) -> tuple[int, dict]:
    """POST ``path`` with these headers and, when given, ``chunks`` of a chunked body that is
    never finished (no last chunk): the answer's status and JSON. A server that waited for
    the rest of the body would never answer (the socket's timeout then fails the test)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(key, value)
        conn.endheaders()
        for c in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(c), c))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_a_body_over_the_size_limit_is_refused_unread(server, limited_server):
    """9. 413 from ``Content-Length`` alone (default 32 MiB; ``--max-body-mb 1``), and from a
    chunked body once 1 MiB of it has come; the rest is never waited for."""
    for path in (_GEN, _OAI, _CF):
        status, body = _post_unfinished(server, path, {"Content-Length": str(32 * 2 ** 20 + 1)})
        assert status == 413 and "32 MiB" in json.dumps(body), body
        status, body = _post_unfinished(limited_server, path, {"Content-Length": str(2 ** 20 + 1)})
        assert status == 413 and "1 MiB" in json.dumps(body), body
    status, body = _post_unfinished(limited_server, _OAI, {"Transfer-Encoding": "chunked"},
                                    (b"[" + b" " * (2 ** 16 - 1),) + (b" " * 2 ** 16,) * 16)
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    status, body = _post_unfinished(limited_server, _CF, {"Transfer-Encoding": "chunked"}, (b"x" * 2 ** 16,) * 17)
    assert status == 413 and body["success"] is False, body
    r = requests.post(limited_server + _GEN, json={"model": "tiny-blip", "prompt": "x" * 2 ** 20}, timeout=_WAIT_S)
    _assert_error(r, 413, "--max-body-mb")
    assert requests.get(limited_server + "/", timeout=_WAIT_S).text == "Ollama is running"


@pytest.mark.slow
def test_costly_options_are_capped(server, limited_server, frame_jpeg):
    """10. ``num_beams``, ``num_predict`` / ``max_tokens`` / ``max_length`` / ``min_length`` and
    ``top_k`` past their limits (defaults 8, 512, 1000; and as set by their flags) are 400 in
    each API's shape, before anything runs."""
    bodies = _bodies(frame_jpeg)
    for options, flag in (({"num_beams": 20_000}, "--max-beams"), ({"num_beams": 9}, "--max-beams"),
                          ({"num_predict": 513}, "--max-new-tokens"), ({"max_length": 513}, "--max-new-tokens"),
                          ({"min_length": 513}, "--max-new-tokens"), ({"top_k": 1001, "temperature": 1},
                                                                      "--max-top-k")):
        r = requests.post(server + _GEN, json={**bodies[_GEN], "options": options}, timeout=_WAIT_S)
        _assert_error(r, 400, flag)
    with pytest.raises(openai.BadRequestError) as exc:
        openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="tiny-blip", messages=bodies[_OAI]["messages"], max_tokens=513)
    assert "--max-new-tokens" in str(exc.value)
    for extra, flag in (({"max_tokens": 513}, "--max-new-tokens"), ({"top_k": 1001}, "--max-top-k")):
        r = requests.post(server + _CF, json={**bodies[_CF], **extra}, timeout=_WAIT_S)
        _assert_error(r, 400, flag)
    r = requests.post(server + _GEN, json={**bodies[_GEN], "options": {"num_beams": 8, "num_predict": 2}},
                      timeout=_WAIT_S)
    assert r.status_code == 200, r.text   # at the limit: answered
    assert _stats(server)["limits"] == {"max_beams": 8, "max_new_tokens": 512, "max_top_k": 1000,
                                        "max_body_bytes": 32 * 2 ** 20, "max_image_pixels": 40_000_000,
                                        "max_prompt_chars": 32_768, "decode_threads": 2}

    # The flags: --max-beams 2 --max-new-tokens 16 --max-top-k 5.
    for options, status in (({"num_beams": 3}, 400), ({"num_beams": 2}, 200), ({"num_predict": 17}, 400),
                            ({"num_predict": 16, "num_beams": 1}, 200), ({"top_k": 6, "temperature": 1}, 400),
                            ({"top_k": 5, "temperature": 1, "num_predict": 2}, 200)):
        r = requests.post(limited_server + _GEN, json={**bodies[_GEN], "options": options}, timeout=_WAIT_S)
        assert r.status_code == status, (options, r.text)
    cf = {k: v for k, v in bodies[_CF].items() if k != "max_tokens"}   # Workers AI's default 512, capped at 16
    r = requests.post(limited_server + _CF, json=cf, timeout=_WAIT_S)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert _stats(limited_server)["limits"] == {"max_beams": 2, "max_new_tokens": 16, "max_top_k": 5,
                                                "max_body_bytes": 2 ** 20, "max_image_pixels": 1_000_000,
                                                "max_prompt_chars": 200, "decode_threads": 1}


@pytest.mark.slow
def test_bad_numbers_and_text_are_400_in_each_apis_shape(server, limited_server, frame_jpeg):
    """11. Not-finite numbers, integers past 64 bits, a lone surrogate, a prompt past the
    model's positions (or ``--max-prompt-chars``), JSON nested 50 000 deep: 400, never 500."""
    bodies = _bodies(frame_jpeg)

    def post(path: str, data: bytes, url: str = server):
        return requests.post(url + path, data=data, headers=_JSON, timeout=_WAIT_S)
    gen_options = {**bodies[_GEN], "options": {"num_predict": "@V@"}}
    for value in ("Infinity", "-Infinity", "NaN", "1e400", str(2 ** 80)):
        _assert_error(post(_GEN, _raw_json(gen_options, value)), 400)
    _assert_error(post(_GEN, _raw_json({**bodies[_GEN], "options": {"repeat_penalty": "@V@"}}, "NaN")), 400)
    _assert_error(post(_GEN, _raw_json({**bodies[_GEN], "options": {"seed": "@V@"}}, str(2 ** 80))), 400, "seed")
    _assert_error(post(_GEN, _raw_json({**bodies[_GEN], "options": {"temperature": "@V@"}}, "1e400")), 400)
    _assert_error(post(_OAI, _raw_json({**bodies[_OAI], "seed": "@V@"}, str(2 ** 80))), 400, "seed")
    _assert_error(post(_OAI, _raw_json({**bodies[_OAI], "temperature": "@V@"}, "NaN")), 400)
    _assert_error(post(_OAI, _raw_json({**bodies[_OAI], "top_p": "@V@"}, "1e400")), 400)
    _assert_error(post(_CF, _raw_json({**bodies[_CF], "max_tokens": "@V@"}, "1e400")), 400)
    _assert_error(post(_CF, _raw_json({**bodies[_CF], "seed": "@V@"}, str(2 ** 80))), 400, "seed")
    deep = b"[" * 50_000 + b"]" * 50_000
    for path, body in _bodies(frame_jpeg, prompt="\ud800").items():
        _assert_error(post(path, json.dumps(body).encode()), 400, "surrogate")   # json.dumps writes "\ud800"
        _assert_error(post(path, deep), 400, "nested")
        _assert_error(post(path, b'{"model": ' + deep + b"}"), 400, "nested")
    for path, body in _bodies(frame_jpeg, prompt="a photo of " * 30).items():   # tiny BLIP: 64 positions
        _assert_error(post(path, json.dumps(body).encode()), 400, "positions")
    for path, body in _bodies(frame_jpeg, prompt="a " * 16_385).items():        # 32 770 characters
        _assert_error(post(path, json.dumps(body).encode()), 400, "--max-prompt-chars")
    for path, body in _bodies(frame_jpeg, prompt="a " * 101).items():           # --max-prompt-chars 200
        _assert_error(post(path, json.dumps(body).encode(), limited_server), 400, "--max-prompt-chars")
    pair = _bodies(frame_jpeg, prompt="a photo of \U0001f600")[_GEN]   # a surrogate pair is one character
    assert "\\ud83d\\ude00" in json.dumps(pair)
    assert post(_GEN, json.dumps(pair).encode()).status_code == 200
    for path, body in bodies.items():
        assert post(path, json.dumps(body).encode()).status_code == 200, path


@pytest.mark.slow
def test_web_pages_cannot_drive_the_server(server, limited_server, frame_jpeg):
    """12. POSTs that are not ``application/json`` get 415 (a page can send text/plain and form
    types without a CORS preflight); requests with a foreign ``Origin`` get 403, GET too; the
    server's own origin, no ``Origin`` at all, and ``--allow-origin`` origins are served."""
    from urllib.parse import urlsplit

    port = urlsplit(server).port
    bodies = _bodies(frame_jpeg)
    for path, body in bodies.items():
        data = json.dumps(body).encode()
        for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = requests.post(server + path, data=data, headers=headers, timeout=_WAIT_S)
            _assert_error(r, 415, "application/json")
    for origin in ("https://evil.example", "null", f"http://evil.example:{port}", f"http://localhost:{port + 1}",
                   f"http://127.0.0.1.evil.example:{port}", "http://app.example:3000"):
        for path, body in bodies.items():
            r = requests.post(server + path, json=body, headers={"Origin": origin}, timeout=_WAIT_S)
            _assert_error(r, 403, "origin")
        for path in ("/", "/api/tags", "/api/ps", "/v1/models"):
            r = requests.get(server + path, headers={"Origin": origin}, timeout=_WAIT_S)
            assert r.status_code == 403, (origin, path, r.text)
        r = requests.options(server + _GEN, timeout=_WAIT_S, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"https://localhost:{port}"):
        r = requests.post(server + _GEN, json=bodies[_GEN], headers={"Origin": origin}, timeout=_WAIT_S)
        assert r.status_code == 200, (origin, r.text)
    assert requests.get(server + "/", timeout=_WAIT_S).text == "Ollama is running"
    assert ollama.Client(host=server).list().models and openai.OpenAI(base_url=server + "/v1",
                                                                      api_key="unused").models.list().data
    # --allow-origin http://app.example:3000
    r = requests.post(limited_server + _GEN, json=bodies[_GEN], headers={"Origin": "http://app.example:3000"},
                      timeout=_WAIT_S)
    assert r.status_code == 200, r.text
    r = requests.post(limited_server + _GEN, json=bodies[_GEN], headers={"Origin": "http://app.example:3001"},
                      timeout=_WAIT_S)
    _assert_error(r, 403, "origin")
    # --allow-host app.example: a name the server answers to besides its own
    lport = urlsplit(limited_server).port
    assert requests.get(limited_server + "/", headers={"Host": f"app.example:{lport}"}, timeout=_WAIT_S).status_code == 200
    assert requests.get(limited_server + "/", headers={"Host": f"app2.example:{lport}"}, timeout=_WAIT_S).status_code == 403


def test_a_host_that_does_not_name_the_server_gets_403_so_dns_rebinding_reads_nothing(server, frame_jpeg):
    """A page whose name an attacker rebinds to 127.0.0.1 reaches the server as same-origin (no
    foreign ``Origin``) but sends its own name as ``Host``: every route answers 403 in its API's
    shape and nothing runs; localhost and the server's addresses, with or without the port, are
    served (as Ollama's own host check does)."""
    from urllib.parse import urlsplit

    port = urlsplit(server).port
    bodies = _bodies(frame_jpeg)
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"app.example:{port}",
                 f"10.1.2.3:{port}"):
        for path in ("/", "/api/version", "/api/tags", "/api/ps", "/v1/models"):
            r = requests.get(server + path, headers={"Host": host}, timeout=_WAIT_S)
            assert r.status_code == 403 and "does not name this server" in r.text and "--allow-host" in r.text, \
                (host, path, r.status_code, r.text)
        for path, body in bodies.items():
            r = requests.post(server + path, json=body, headers={"Host": host}, timeout=_WAIT_S)
            _assert_error(r, 403, "does not name this server")
    assert requests.get(server + "/api/ps", timeout=_WAIT_S).json()["models"] is not None
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        r = requests.get(server + "/", headers={"Host": host}, timeout=_WAIT_S)
        assert r.status_code == 200 and r.text == "Ollama is running", (host, r.text)


def test_images_are_decoded_decode_threads_at_a_time(tiny_blip, frame_jpeg):
    """9. ``decode_threads=1``: a second request waits (holding its place in the queue) while
    the first one's image is decoded; both are answered."""
    with gated_server(tiny_blip, max_batch=1, decode_threads=1, request_timeout_s=600) as (url, scheduler, _):
        entered: queue.Queue = queue.Queue()
        gate = threading.Event()
        real_prepare = scheduler.model.prepare

        def held_prepare(*args):
            entered.put(args)
            assert gate.wait(_WAIT_S)
            return real_prepare(*args)
        scheduler.model.prepare = held_prepare
        errors: list = []

        def ask() -> None:
            try:
                _answered(url, frame_jpeg)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=ask) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            entered.get(timeout=_WAIT_S)   # the first is decoding
            with scheduler.cond:           # the second holds its place in the queue ...
                assert scheduler.cond.wait_for(lambda: scheduler.reserved == 2, _WAIT_S), scheduler.stats()
            assert entered.empty()         # ... and waits for the decoder
        finally:
            gate.set()
        for t in threads:
            t.join(_WAIT_S)
        assert not errors, errors
        assert entered.qsize() == 1   # the second one's decode


@pytest.mark.slow
def test_limit_flags_are_checked_at_start(tmp_path):
    """A limit that is no positive number (or a window, timeout, queue or port out of its range,
    NaN and infinities included), an ``--allow-origin`` that is no origin, or a default option
    past its limit stops ``serve`` at once with a message naming the flag."""
    for args, needle in ((("--max-body-mb", "0"), "--max-body-mb"), (("--max-body-mb", "nan"), "--max-body-mb"),
                         (("--max-beams", "0"), "--max-beams"), (("--allow-origin", "evil"), "--allow-origin"),
                         (("--option", "num_beams=9"), "--max-beams"),
                         (("--batch-window-ms", "inf"), "--batch-window-ms must be a number from 0 to 10000"),
                         (("--batch-window-ms", "nan"), "--batch-window-ms"), (("--batch-window-ms", "-1"), "--batch-window-ms"),
                         (("--request-timeout-s", "nan"), "--request-timeout-s must be a number of seconds"),
                         (("--request-timeout-s", "-5"), "--request-timeout-s"),
                         (("--max-queue", "-1"), "--max-queue must be a whole number, 0 (no limit) or more"),
                         (("--port", "70000"), "--port must be from 1 to 65535, not 70000"),
                         (("--max-new-tokens", "8", "--option", "num_predict=9"), "--max-new-tokens")):
        r = subprocess.run(_serve_cmd("--model", str(tmp_path), "--port", str(_free_port()), *args), env=_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.slow
def test_keep_alive_and_json_parsing_units():
    """The parsers behind items 8 and 11, without a server."""
    from vision_host.serve.errors import RequestError
    from vision_host.serve.parsing import parse_json, parse_keep_alive

    assert parse_keep_alive("5m") == 300 and parse_keep_alive(0) == 0 and parse_keep_alive(-1) is None
    for forever in (1e12, 1e300, 10 ** 400, "1e300", "99999999999999h", -1e300):
        assert parse_keep_alive(forever) is None
    for bad in (float("nan"), float("inf"), "nan", "inf", "1e400", "soon", True, [1]):
        with pytest.raises(RequestError) as exc:
            parse_keep_alive(bad)
        assert exc.value.status == 400
    assert parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    for bad in (b"NaN", b'{"a": Infinity}', b'"\\ud800"', b'{"a": ["\\udfff"]}', b"[" * 50_000, b"{nope"):
        with pytest.raises(RequestError) as exc:
            parse_json(bad)
        assert exc.value.status == 400
