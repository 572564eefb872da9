"""Where a model's files come from: a local directory saved with ``save_pretrained``, the local
Hugging Face cache, or the Hugging Face Hub on first use (with progress bars on stderr; never
with ``HF_HUB_OFFLINE=1``); and the message when none of them has the model.

The Hub is reached through ``huggingface_hub``'s ``snapshot_download`` (the Hub's HTTP API);
its errors are ``OSError``s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

#: Files fetched from the Hub on first use (weights as safetensors; ``*.bin`` only without them).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

Loaded = TypeVar("Loaded")


class ModelLoadError(Exception):
    """The model cannot be loaded (not cached and not downloadable, unsupported family,
    serve extra missing): the message names the model and what to do."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids reaching the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (e.g. "Loading weights") inside."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def download(source: str) -> str:
    """Fetch ``source`` from the Hugging Face Hub into the local cache, with progress bars on
    stderr; returns the snapshot directory. Safetensors weights only, unless the repository
    has none. Raises OSError (huggingface_hub's errors are OSErrors) when it cannot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    log.warning("model %s is not in the local Hugging Face cache: downloading it", source)
    enable_progress_bars()
    path = snapshot_download(source, allow_patterns=HUB_FILES)
    if not any(Path(path).rglob("*.safetensors")):
        path = snapshot_download(source, allow_patterns=HUB_FILES + ["*.bin"])
    return path


def from_local_or_hub(source: str, local: bool, read: Callable[[], Loaded]) -> Loaded:
    """``read()`` (which opens ``source``'s files with ``local_files_only``); when they are not
    there, :func:`download` them and read again (not for a ``local`` directory, nor with the
    Hub off).

    Raises:
        ModelLoadError: :func:`load_error`'s message, for an ``OSError`` or ``ValueError``.
    """
    try:
        try:
            return read()
        except OSError:
            if local or hub_offline():
                raise
            download(source)
            return read()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(load_error(source, local, exc)) from None


def load_error(source: str, local: bool, exc: Exception) -> str:
    """The message for a model that cannot be loaded: what is missing and how to fetch it."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if local:
        return (f"cannot load model from {source}: {first} (the directory must hold a BLIP, BLIP-2 or LLaVA model "
                f"and its processor, saved with save_pretrained)")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        GatedRepoError = RepositoryNotFoundError = ()
    if isinstance(exc, GatedRepoError):   # a subclass of RepositoryNotFoundError: test it first
        return (f"cannot load model {source}: it is a gated repository on the Hugging Face Hub; accept its terms on "
                f"its page and set HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"cannot load model {source}: the Hugging Face Hub has no repository {source} (check the id; for a "
                f"private repository set HF_TOKEN), or pass --model DIR with a directory saved with save_pretrained")
    why = ("the Hugging Face Hub is off (HF_HUB_OFFLINE=1)" if hub_offline()
           else f"it could not be downloaded ({first})")
    return (f"cannot load model {source}: its weights are not in the local Hugging Face cache ({cache}) and {why}. "
            f"On a machine with internet run `hf download {source}` and copy the cache here, or pass --model DIR "
            f"with a directory saved with save_pretrained")
