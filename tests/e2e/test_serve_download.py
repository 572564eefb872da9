"""``vision-host serve --model OWNER/NAME``: a model not in the local cache is downloaded from
the Hugging Face Hub on first use (with a progress bar on stderr), then served.

The Hub is :class:`hf_hub_standin.HubStandin` (``HF_ENDPOINT`` points at it), serving a tiny
random-weight BLIP built at test time as ``someone/tiny-blip``; huggingface_hub's real
``snapshot_download`` talks to it over HTTP. Each server gets its own ``HF_HOME`` /
``HF_HUB_CACHE`` under the test's temporary directory. No network beyond 127.0.0.1 is used.
"""

import base64
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

test_serve = pytest.importorskip("test_serve")   # skips as tests/test_serve.py does (torch, transformers, …)
requests = pytest.importorskip("requests")
cv2 = pytest.importorskip("cv2")

from hf_hub_standin import HubStandin  # noqa: E402
from tiny_models import WORDS, build_tiny_blip  # noqa: E402

REPO_ID = "someone/tiny-blip"


def _hub_env(tmp: Path, hub_url: str, offline: bool) -> dict:
    """Environment for a ``vision-host serve`` run against the stand-in with its own cache."""
    env = test_serve._env(HF_HUB_OFFLINE="1" if offline else "0", HF_ENDPOINT=hub_url,
                          HF_HOME=str(tmp / "hf"), HF_HUB_CACHE=str(tmp / "hub"))
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY")]))
    return env


@contextlib.contextmanager
def served(model: str, env: dict, log_dir: Path) -> Iterator[SimpleNamespace]:
    """``vision-host serve --model model`` with ``env`` on a free port until the block ends.

    Yields a namespace with ``url`` and ``stderr()`` (what the server wrote so far).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "serve.log"
    with test_serve.serve_process(model, log, env=env) as url:
        yield SimpleNamespace(url=url, stderr=log.read_text)


def _frame_jpeg() -> bytes:
    cap = cv2.VideoCapture(str(test_serve.CLIP))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
    ok, frame = cap.read()
    cap.release()
    assert ok, f"cannot read {test_serve.CLIP}"
    return cv2.imencode(".jpg", frame)[1].tobytes()


def _generate(url: str) -> dict:
    """A real non-streamed ``/api/generate`` request with a frame of the shipped clip."""
    r = requests.post(url + "/api/generate", timeout=30, json={
        "model": REPO_ID, "prompt": "a photo of", "stream": False,
        "images": [base64.b64encode(_frame_jpeg()).decode()], "options": {"num_predict": 3}})
    assert r.status_code == 200, r.text
    return r.json()


def _check_answer(answer: dict) -> None:
    assert answer["done"] is True and answer["done_reason"] in ("stop", "length")
    assert 0 < answer["eval_count"] <= 3
    words = answer["response"].split()
    assert words and set(words) <= set(WORDS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("model") / "tiny-blip")


@pytest.fixture(scope="module")
def hub(model_dir) -> Iterator[HubStandin]:
    """The stand-in Hub serving the tiny BLIP as ``someone/tiny-blip`` (3 tree entries a page,
    so the listing is paginated)."""
    with HubStandin(model_dir, REPO_ID, page_size=3) as standin:
        yield standin


@pytest.fixture(scope="module")
def first_start(tmp_path_factory, hub) -> SimpleNamespace:
    """The first ``vision-host serve --model someone/tiny-blip`` on an empty cache: downloads,
    answers one ``/api/generate``, stops. Its stderr, answer, cache dir and the requests the
    stand-in saw."""
    tmp = tmp_path_factory.mktemp("first")
    hub.clear()
    env = _hub_env(tmp, hub.url, offline=False)
    t0 = time.monotonic()
    with served(REPO_ID, env, tmp / "logs") as server:
        answer = _generate(server.url)
        stderr = server.stderr()
    return SimpleNamespace(tmp=tmp, stderr=stderr, answer=answer, requests=list(hub.requests),
                           seconds=time.monotonic() - t0)


@pytest.mark.slow
def test_first_start_downloads_with_progress_bar_and_serves(first_start, hub, model_dir):
    stderr = first_start.stderr
    assert f"model {REPO_ID} is not in the local Hugging Face cache: downloading it" in stderr, stderr
    assert "Fetching" in stderr and "%|" in stderr, f"no download progress bar on stderr:\n{stderr}"
    assert "Traceback" not in stderr
    _check_answer(first_start.answer)
    assert first_start.answer["model"].startswith(REPO_ID)

    # The files landed in HF_HUB_CACHE, as huggingface_hub lays out its cache.
    repo_cache = first_start.tmp / "hub" / "models--someone--tiny-blip"
    assert (repo_cache / "refs" / "main").read_text() == hub.commit
    snapshot = repo_cache / "snapshots" / hub.commit
    served_files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "model.safetensors" in served_files
    for name in served_files:   # all match the download patterns (*.json, *.safetensors, *.txt)
        assert (snapshot / name).read_bytes() == (model_dir / name).read_bytes(), name
    weights = hub.repo.files["model.safetensors"]
    assert (repo_cache / "blobs" / weights.sha256).is_file()   # LFS blobs are named by sha256
    assert not (first_start.tmp / "hf" / "hub").exists()   # HF_HUB_CACHE wins over HF_HOME/hub

    # The stand-in saw the real protocol: repo info, the paginated tree, HEAD + GET per file,
    # the weights through the LFS redirect to the CDN.
    seen = [(r.server, r.method, r.path) for r in first_start.requests]
    assert ("hub", "GET", f"/api/models/{REPO_ID}/revision/main") in seen
    trees = [r for r in first_start.requests if r.path == f"/api/models/{REPO_ID}/tree/{hub.commit}"]
    assert len(trees) >= 2 and all(r.query.get("recursive") == "true" for r in trees)
    assert ("hub", "HEAD", f"/{REPO_ID}/resolve/{hub.commit}/model.safetensors") in seen
    assert ("cdn", "GET", f"/cdn/{weights.sha256}") in seen
    assert ("hub", "GET", f"/{REPO_ID}/resolve/{hub.commit}/config.json") in seen
    assert first_start.seconds < 30


@pytest.mark.slow
def test_second_start_offline_loads_from_cache(first_start, hub, tmp_path):
    hub.clear()
    env = _hub_env(first_start.tmp, hub.url, offline=True)   # the first start's cache
    with served(REPO_ID, env, tmp_path / "logs") as server:
        answer = _generate(server.url)
        stderr = server.stderr()
    _check_answer(answer)
    assert "downloading" not in stderr and "Fetching" not in stderr, stderr
    assert hub.requests == [], [(r.method, r.path) for r in hub.requests]


@pytest.mark.slow
def test_missing_repo_exits_with_a_clear_message(hub, tmp_path):
    hub.clear()
    env = _hub_env(tmp_path, hub.url, offline=False)
    port = test_serve._free_port()
    proc = subprocess.run(test_serve._serve_cmd("--model", "someone/missing", "--port", str(port)),
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "cannot load model someone/missing" in proc.stderr, proc.stderr
    assert "has no repository someone/missing" in proc.stderr, proc.stderr
    # It asked the Hub, which answered 404 RepoNotFound, and fetched nothing.
    repo_requests = [(r.method, r.path) for r in hub.requests if r.path != "/api/agent-harnesses"]
    assert repo_requests == [("GET", "/api/models/someone/missing/revision/main")]
    assert not (tmp_path / "hub" / "models--someone--missing" / "snapshots").exists()


_PROTOCOL_CHECK = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
api = HfApi()
out = {"sha": api.model_info(sys.argv[1]).sha,
       "tree": sorted(f.path for f in api.list_repo_tree(sys.argv[1], recursive=True)),
       "config": open(hf_hub_download(sys.argv[1], "config.json"), "rb").read().hex()}
for kind, call in [("entry", lambda: hf_hub_download(sys.argv[1], "nope.json")),
                   ("revision", lambda: hf_hub_download(sys.argv[1], "config.json", revision="v9")),
                   ("repo", lambda: api.model_info("someone/missing"))]:
    try:
        call()
    except (RemoteEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError) as exc:
        out[kind] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.mark.slow
def test_standin_speaks_the_hub_protocol(hub, model_dir, tmp_path):
    """huggingface_hub's own client (in a subprocess, so HF_ENDPOINT applies) against the stand-in."""
    env = _hub_env(tmp_path, hub.url, offline=False)
    proc = subprocess.run([sys.executable, "-c", _PROTOCOL_CHECK, REPO_ID], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sha"] == hub.commit
    assert out["tree"] == sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert bytes.fromhex(out["config"]) == (model_dir / "config.json").read_bytes()
    assert (out["entry"], out["revision"], out["repo"]) == (
        "RemoteEntryNotFoundError", "RevisionNotFoundError", "RepositoryNotFoundError")
