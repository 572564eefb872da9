"""``vision-host run`` as a child process for tests that talk to its viewer over HTTP."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import requests

from conftest import REPO


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``condition()`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


class RunProcess:
    """``python -m vision_host run ARGS`` whose stderr is read on a thread into :attr:`lines`."""

    def __init__(self, args: list[str], port: int):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "vision_host", "run", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.extend(part for part in line.split("\r") if part.strip())

    @property
    def stderr(self) -> str:
        """What the run printed on stderr so far."""
        return "\n".join(self.lines)

    def wait_until_serving(self, timeout_s: float = 30) -> None:
        """Until the viewer answers (any status: a token may be needed)."""
        def answers() -> bool:
            try:
                requests.get(self.base + "/api/state", timeout=2)
                return True
            except requests.ConnectionError:
                assert self.proc.poll() is None, self.stderr
                return False
        wait_for(answers, timeout_s, f"the viewer at {self.base}", 0.2)

    def stop(self) -> None:
        """Ctrl-C, then kill after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
