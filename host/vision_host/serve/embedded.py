"""``ollama-url=embedded``: ``vision-host run`` captions with its own ``vision-host serve``.

:func:`falls_back_to_embedded` decides whether a run with no vision server configured uses
the embedded one; :func:`embedded_server_for` starts it for the run (an
:class:`EmbeddedServer`, a child process on a free loopback port), points the run's
``ollama-…`` settings at it and stops it when the run ends. Importing this module loads no
model code (no torch, transformers or web framework): the model names are checked through
:mod:`.models`, imported when needed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

#: The ``ollama-url`` value that asks for the embedded server.
EMBEDDED = "embedded"
#: The model the embedded server loads when ``ollama-model`` is not given.
DEFAULT_EMBEDDED_MODEL = "blip"
#: ``vision-host serve`` aliases that are also models of Ollama's library: such a name means Ollama.
OLLAMA_LIBRARY_ALIASES = frozenset({"llava"})


class EmbeddedServerError(Exception):
    """The embedded vision server could not start: the message says what to do (exit status 1)."""


class EmbeddedModelError(ValueError):
    """``ollama-model`` names nothing the embedded server can serve (a directory that does not
    exist, an unknown alias): the message says why (a usage error, exit status 2)."""


def serves_unambiguously(model: str) -> bool:
    """Whether ``ollama-model`` can only mean the embedded server: a ``serve`` alias that no
    Ollama library model has (``blip``, ``blip-base``, ``blip2``), a directory, or a Hugging
    Face Hub id (``owner/name``, no ``:tag``). ``llava``, ``bakllava``, ``moondream``, … mean Ollama."""
    from .models import MODEL_ALIASES

    name = model.strip()
    if name.lower() in MODEL_ALIASES:
        return name.lower() not in OLLAMA_LIBRARY_ALIASES
    if Path(name).expanduser().is_dir():
        return True
    owner, slash, repo = name.partition("/")
    return bool(slash and owner and repo and "/" not in repo and ":" not in name and owner.lower() != "hf.co")


def falls_back_to_embedded(config: dict[str, str]) -> bool:
    """For a run with no Ollama configured (no ``ollama-url``, no ``$OLLAMA_HOST``): whether to
    use the embedded server, said on stderr when so. Yes when nothing answers on Ollama's port
    11434 on this machine, the serve extra is installed (torch, transformers, fastapi, uvicorn)
    and ``ollama-model`` (``config``'s, if given) can only mean it (:func:`serves_unambiguously`;
    an Ollama model name means the user expects Ollama)."""
    import importlib.util
    import socket

    model = config.get("ollama-model")
    if model and not serves_unambiguously(model):
        return False
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "fastapi", "uvicorn")):
        return False
    try:
        with socket.create_connection(("127.0.0.1", 11434), timeout=0.2):
            return False   # something (Ollama) listens there
    except OSError:
        pass
    print("vision-host: no Ollama configured (ollama-url, OLLAMA_HOST) or running on localhost:11434: "
          "using the embedded vision server (ollama-url=embedded)", file=sys.stderr)
    return True


class EmbeddedServer:
    """``ollama-url=embedded``: ``vision-host serve`` in a child process on a free loopback
    port, for machines with no vision server. :meth:`start` waits until the server answers
    (its model loaded, downloaded first if need be, with the server's own progress output), so
    a model that cannot load stops the run before any frame is written.

    Args:
        model: ``--model`` of the server (alias, Hub id or directory).
    Attributes:
        name: the model's name as the server reports it (``blip:latest``).
        label: how messages name this server (``the embedded vision server (blip:latest)``).
        url: the server's base URL once started (``http://127.0.0.1:PORT``), else "".
    Raises:
        EmbeddedModelError: the model name cannot be served.
    """

    def __init__(self, model: str):
        from .models import ModelLoadError, normalize_model_name, resolve_model   # no torch import
        try:
            self.name = normalize_model_name(resolve_model(model)[0])
        except ModelLoadError as exc:
            raise EmbeddedModelError(str(exc)) from None
        self.model = model
        self.label = f"the embedded vision server ({self.name})"
        self.proc = None
        self.url = ""

    def start(self, poll_s: float = 0.1) -> str:
        """Start the server and wait until it answers Ollama's ``GET /api/version`` (checked
        every ``poll_s`` s; as long as loading takes, Ctrl-C stops it); returns its base URL.

        Raises:
            EmbeddedServerError: the server exited before answering (its message is above).
        """
        import socket
        import subprocess
        import time

        import requests

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vision_host", "serve", "--model", self.model,
                                      "--host", "127.0.0.1", "--port", str(port)], stdin=subprocess.DEVNULL)
        print(f"vision-host: starting {self.label}; the video starts when it has loaded the model …",
              file=sys.stderr, flush=True)
        while True:
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.label} could not start (vision-host serve --model {self.model} exited with status "
                    f"{self.proc.returncode}; its message is above): nothing was run. Fix what it says, give "
                    f"another model with -c ollama-model=…, or point -c ollama-url= at a running server")
            try:
                if requests.get(self.url + "/api/version", timeout=1).ok:
                    return self.url
            except requests.RequestException:
                pass
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop the server process (terminate, then kill after 5 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except Exception:   # noqa: BLE001 - subprocess.TimeoutExpired
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def embedded_server_for(config: dict[str, str]) -> Iterator[EmbeddedServer | None]:
    """With ``config``'s ``ollama-url`` set to :data:`EMBEDDED`: start an :class:`EmbeddedServer`
    for its ``ollama-model`` (default :data:`DEFAULT_EMBEDDED_MODEL`), set ``ollama-url``,
    ``ollama-model`` and (unless given) ``ollama-server-name`` in ``config`` to it, say so on
    stderr, yield it, and stop it on leaving. Otherwise yield None and change nothing.

    Raises:
        EmbeddedModelError: the model name cannot be served (nothing started).
        EmbeddedServerError: the server could not start.
    """
    if config.get("ollama-url", "").strip().lower() != EMBEDDED:
        yield None
        return
    embedded = EmbeddedServer(config.get("ollama-model") or DEFAULT_EMBEDDED_MODEL)
    try:
        config["ollama-url"] = embedded.start()
        config["ollama-model"] = embedded.name
        config.setdefault("ollama-server-name", embedded.label)
        print(f"vision-host: embedded vision server for {embedded.name} at {config['ollama-url']}", file=sys.stderr)
        yield embedded
    finally:
        embedded.stop()
