"""`ollama-url=embedded`: `vision-host run` starts its own `vision-host serve` and captions with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE_CLIP

test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import tiny_models  # noqa: E402


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


def test_an_embedded_model_that_cannot_exist_is_refused_before_the_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
                             "-c", "ollama-url=embedded", "-c", f"ollama-model={tmp_path}/missing/dir"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "no such directory" in result.stderr


def test_serve_flags_reach_the_server(tmp_path):
    model_dir = tiny_models.build_tiny_blip(tmp_path / "tiny-flags")
    result = subprocess.run([sys.executable, "-m", "vision_host", "serve", "--model", str(model_dir),
                             "--port", str(test_serve._free_port()), "--keep-alive", "soon"],
                            capture_output=True, text=True, timeout=120, env=test_serve._env())
    assert result.returncode == 1 and "--keep-alive" in result.stderr, result.stderr


def test_with_no_ollama_configured_or_running_run_uses_the_embedded_server(tmp_path):
    import socket
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            pytest.skip("something listens on Ollama's port 11434 here")
    except OSError:
        pass
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
    # An Ollama model name means Ollama is expected: no fallback, the processor reports the server.
    result = subprocess.run(
        [sys.executable, "-m", "vision_host", "run", "-p", "ollama", "-s", str(SAMPLE_CLIP),
         "-c", "ollama-model=bakllava", "--max-frames", "10", "-o", "file", "-d", str(tmp_path / "o2.mp4")],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and "embedded" not in result.stderr, result.stderr
