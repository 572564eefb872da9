"""A real MQTT broker for tests: Debian's ``mosquitto`` on a free 127.0.0.1 port, and a paho subscriber.

:class:`Mosquitto` writes a config (``listener PORT 127.0.0.1``, anonymous or a password file
made with ``mosquitto_passwd -b``, persistence in the test's directory so a broker stopped with
SIGTERM and started again keeps its persistent sessions), starts ``mosquitto -c CONF``, and
:meth:`~Mosquitto.start` returns once the port accepts a connection. :meth:`~Mosquitto.kill`
terminates it (the tests' "broker down"); starting it again reuses the same port.

:class:`Subscriber` is a paho client that records every message it receives (topic, payload,
retain flag) and lets a test wait for a condition on them.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from run_process import free_port, wait_for


def mosquitto_binary() -> str | None:
    """The mosquitto broker's path (Debian puts it in /usr/sbin, often off a user's PATH), or None."""
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if Path(p).exists()), None)


def mosquitto_passwd_binary() -> str | None:
    """``mosquitto_passwd``'s path, or None."""
    return shutil.which("mosquitto_passwd") or next((p for p in ("/usr/bin/mosquitto_passwd",)
                                                     if Path(p).exists()), None)


#: Why the broker tests skip where mosquitto is absent (the run's summary collects the apt hint).
MISSING_REASON = "the MQTT broker mosquitto is not installed (apt-get install mosquitto)"


class Mosquitto:
    """One mosquitto broker on 127.0.0.1:``port``, its files in ``directory``.

    Args:
        directory: where the config, password file, persistence and log go.
        users: ``{user: password}``: a password file and no anonymous access; None: anonymous.
        port: the port (a free one when None).
    """

    def __init__(self, directory: Path, users: dict[str, str] | None = None, port: int | None = None):
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise RuntimeError(MISSING_REASON)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users
        self.log_path = self.directory / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.conf = self.directory / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1",
                 # as root, mosquitto switches to this user: the test's own, who owns the directory
                 f"user {getpass.getuser()}",
                 "persistence true", f"persistence_location {self.directory}/",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice"]
        if users:
            passwd = self.directory / "passwd"
            tool = mosquitto_passwd_binary()
            if tool is None:
                raise RuntimeError("mosquitto_passwd is not installed (apt-get install mosquitto)")
            for n, (user, password) in enumerate(users.items()):
                args = [tool, "-b"] + (["-c"] if n == 0 else []) + [str(passwd), user, password]
                subprocess.run(args, check=True, capture_output=True, timeout=30)
            passwd.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines += ["allow_anonymous true"]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Mosquitto:
        """Start the broker; return once its port accepts a TCP connection."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the broker writes it until kill()
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self._log, stderr=self._log)

        def accepts() -> bool:
            assert self.proc.poll() is None, f"mosquitto exited ({self.proc.returncode}): {self.log()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        wait_for(accepts, timeout_s, f"mosquitto on port {self.port}", 0.05)
        return self

    def kill(self, timeout_s: float = 10.0) -> None:
        """Terminate the broker (SIGTERM: it saves its persistent sessions) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        """What the broker logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass(frozen=True)
class Received:
    """One message a :class:`Subscriber` got: topic, payload, the retain flag, arrival time (monotonic s)."""

    topic: str
    payload: bytes
    retain: bool
    at: float


class Subscriber:
    """A paho client (MQTT 3.1.1) subscribed to ``topics`` at QoS 1, recording what it receives.

    Args:
        port: the broker's port on 127.0.0.1.
        topics: topic filters, subscribed one SUBSCRIBE each, in order (so the retained messages
            of an earlier filter arrive before those of a later one).
        persistent: a persistent session (fixed ``client_id``, clean_session False): the broker
            keeps QoS 1 messages for it while it is disconnected, also across a broker restart.
        auth: ``(user, password)``.
    """

    def __init__(self, port: int, topics: list[str], *, client_id: str = "", persistent: bool = False,
                 auth: tuple[str, str] | None = None, timeout_s: float = 20.0):
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._pending_subs = len(topics)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(timeout_s), f"the test subscriber could not connect to 127.0.0.1:{port}"
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(timeout_s), f"no SUBACK for {topics}"

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._pending_subs -= 1
        if self._pending_subs <= 0:
            self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Received]:
        """The messages received on ``topic`` so far, in arrival order."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait(self, condition, timeout_s: float, what: str):
        """Until ``condition(messages)`` returns something truthy (returned); fail naming ``what``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = condition(list(self.messages))
                if value:
                    return value
                left = deadline - time.monotonic()
                assert left > 0, (f"timed out after {timeout_s} s waiting for {what}; got "
                                  f"{[(m.topic, m.payload[:60]) for m in self.messages][-20:]}")
                self._cond.wait(min(left, 0.5))

    def wait_payload(self, topic: str, payload: bytes, timeout_s: float = 20.0) -> Received:
        """The first message on ``topic`` with ``payload`` (waiting for it)."""
        return self.wait(lambda ms: next((m for m in ms if m.topic == topic and m.payload == payload), None),
                         timeout_s, f"{payload!r} on {topic}")

    def close(self) -> None:
        """Disconnect and stop its thread."""
        self.client.disconnect()
        self.client.loop_stop()
