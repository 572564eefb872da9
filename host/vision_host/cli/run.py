"""``vision-host run``: its flags (from :data:`.settings.RUN_KEYS`) and the command, which
builds the settings, starts the embedded vision server when asked (:mod:`..serve.embedded`)
and hands the streams to :func:`..runner.run_streams`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .settings import UsageError, add_run_arguments, build_settings, setup_logging

RUN_EPILOG = """\
the ollama processor's settings (-c KEY=VALUE; the README lists them all):
  ollama-url=URL           the vision server (default $OLLAMA_HOST, else http://localhost:11434);
                           ollama-url=embedded starts vision-host serve for the run (pip install
                           'vision-host[serve]'), as happens when no Ollama is configured or running
                           and ollama-model is unset, blip, blip-base, blip2, a Hub id or a directory
  ollama-model=NAME        llava (default), bakllava, moondream, … (an Ollama model name means Ollama)
  ollama-api=API           generate (default), chat, openai, workers-ai
  ollama-prompt=TEXT       the question asked about each frame
  ollama-interval-ms=MS    least time between two requests (default 3000)
  ollama-api-key-env=VAR   environment variable holding the server's API key
  ollama-image-max-side=PX, ollama-jpeg-quality=Q, ollama-max-tokens=N, ollama-timeout-ms=MS,
  ollama-caption-placement=top|bottom, ollama-font-scale=S, ollama-max-lines=N,
  ollama-overlay=true|false, ollama-paused=true|false, ollama-server-name=TEXT

examples:
  vision-host run -p ollama -c ollama-model=bakllava                  webcam → http://127.0.0.1:8080/
  vision-host run -p ollama -s clip.mp4 -o file -d annotated.mp4      caption a recording
  vision-host run -p blur -p ollama                                   processors run in the order given
"""


def add_parser(sub) -> None:
    """Add ``run`` to the subcommands ``sub``."""
    run = sub.add_parser("run", help="capture frames, process them, send them to an output",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EPILOG)
    # -f is no run key: it names the file the keys come from
    run.add_argument("-f", "--file", metavar="RUN.toml", help="TOML file with the same settings")
    add_run_arguments(run)
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """``vision-host run``: returns the exit status (1: the run failed, see
    :func:`..runner.run_streams`; usage errors are raised as UsageError)."""
    from ..runner import network_policy, run_streams
    from ..runtime.policy import PolicyError
    from ..serve.embedded import EmbeddedModelError, EmbeddedServerError, embedded_server_for
    from .processors import resolve_processor

    settings = build_settings(args)
    setup_logging(settings.logging)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and `kill -INT` stop the run cleanly even when started in the background
        # (`vision-host run … &`), where the shell hands it SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with embedded_server_for(settings.config) as embedded:
            if embedded is not None:    # embeddings and summaries ask the server the processor uses
                settings.events.server.update(url=settings.config["ollama-url"], model=settings.config["ollama-model"])
            paths = [resolve_processor(spec, settings.processors_dir) for spec in settings.processor]
            try:
                policy = network_policy(settings.config, settings.allow, settings.streams,
                                        settings.max_vision_requests)
            except PolicyError as exc:
                raise UsageError(str(exc)) from None
            return run_streams(settings, paths, policy)
    except EmbeddedModelError as exc:
        raise UsageError(str(exc)) from None
    except EmbeddedServerError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
