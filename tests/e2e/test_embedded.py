"""`ollama-url=embedded`: `vision-host run` starts its own `vision-host serve` and captions with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_CLIP

test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import tiny_models  # noqa: E402


@pytest.mark.slow
def test_run_with_an_embedded_server_captions_real_footage_and_stops_it(tmp_path):
    model_dir = tiny_models.build_tiny_blip(tmp_path / "tiny-embedded")
    stats = tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
         "-c", "ollama-url=embedded", "-c", f"ollama-model={model_dir}", "-c", "ollama-interval-ms=200",
         "-c", "ollama-max-tokens=5", "--max-frames", "240", "-o", "file", "-d", str(tmp_path / "out.mp4"),
         "--stats", str(stats)],
        capture_output=True, text=True, timeout=180, env=test_serve._env())
    assert result.returncode == 0, result.stderr
    assert "embedded vision server for tiny-embedded:latest at http://127.0.0.1:" in result.stderr
    summary = json.loads(stats.read_text())
    assert summary["frames_out"] == 240
    assert summary["captions"]["completed"] >= 1, result.stderr
    left = subprocess.run(["pgrep", "-f", str(model_dir)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the embedded server must stop with the run"


@pytest.mark.slow
def test_an_embedded_model_that_cannot_exist_is_refused_before_the_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
                             "-c", "ollama-url=embedded", "-c", f"ollama-model={tmp_path}/missing/dir"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "no such directory" in result.stderr


@pytest.mark.slow
def test_serve_flags_reach_the_server(tmp_path):
    model_dir = tiny_models.build_tiny_blip(tmp_path / "tiny-flags")
    result = subprocess.run([sys.executable, "-m", "vision_host", "serve", "--model", str(model_dir),
                             "--port", str(test_serve._free_port()), "--keep-alive", "soon"],
                            capture_output=True, text=True, timeout=120, env=test_serve._env())
    assert result.returncode == 1 and "--keep-alive" in result.stderr, result.stderr


@pytest.mark.slow
def test_with_no_ollama_configured_or_running_run_uses_the_embedded_server(tmp_path):
    _nothing_on_ollamas_port()
    model_dir = tiny_models.build_tiny_blip(tmp_path / "tiny-fallback")
    env = test_serve._env()
    env.pop("OLLAMA_HOST", None)
    stats = tmp_path / "stats.json"
    result = subprocess.run(
        [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
         "-c", f"ollama-model={model_dir}", "-c", "ollama-interval-ms=200", "-c", "ollama-max-tokens=5",
         "--max-frames", "240", "-o", "file", "-d", str(tmp_path / "out.mp4"), "--stats", str(stats)],
        capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert "no Ollama configured" in result.stderr and "embedded vision server for tiny-fallback" in result.stderr
    assert json.loads(stats.read_text())["captions"]["completed"] >= 1, result.stderr
    # An Ollama model name means Ollama is expected, `llava` too (also a serve alias): no fallback;
    # the run says no caption completed and how to start Ollama, and ends non-zero.
    for model in ("bakllava", "llava", "LLaVA"):
        result = subprocess.run(
            [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
             "-c", f"ollama-model={model}", "--max-frames", "10", "-o", "file", "-d", str(tmp_path / "o2.mp4")],
            capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 1 and "embedded vision server for" not in result.stderr, result.stderr
        assert "no caption completed" in result.stderr and f"ollama pull {model}" in result.stderr


def _nothing_on_ollamas_port() -> None:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            pytest.skip("something listens on Ollama's port 11434 here")
    except OSError:
        pass


@pytest.mark.slow
def test_the_readme_command_with_no_server_and_no_weights_stops_before_writing(tmp_path):
    """The README's main command on a machine with no Ollama and no way to download BLIP: the
    embedded server's own message, exit status 1, no video written, and no waiting on the clip."""
    _nothing_on_ollamas_port()
    env = test_serve._env(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    env.pop("OLLAMA_HOST", None)
    out = tmp_path / "out" / "annotated.mp4"
    result = subprocess.run([sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
                             "-o", "file", "-d", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert "using the embedded vision server" in result.stderr
    assert "cannot load model Salesforce/blip-image-captioning-large" in result.stderr   # the server's message
    assert "the embedded vision server (blip:latest) could not start" in result.stderr
    assert not out.exists() and "frames in" not in result.stderr


@pytest.mark.parametrize("model, embedded", [
    ("blip", True), ("BLIP-base", True), ("blip2", True), ("Salesforce/blip-image-captioning-base", True),
    ("llava", False), ("llava:13b", False), ("bakllava", False), ("moondream", False),
    ("library/llava:latest", False), ("hf.co/owner/model", False),
])
def test_only_a_name_that_cannot_mean_ollama_picks_the_embedded_server(model, embedded):
    from vision_host.serve.embedded import serves_unambiguously
    assert serves_unambiguously(model) is embedded


def test_a_model_directory_picks_the_embedded_server(tmp_path):
    from vision_host.serve.embedded import serves_unambiguously
    assert serves_unambiguously(str(tmp_path))
