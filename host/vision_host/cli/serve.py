"""``vision-host serve``: a vision model over Ollama's API (see :mod:`..serve`)."""

from __future__ import annotations

import argparse
import sys

from .settings import LOG_LEVELS, positive_int, setup_logging


def add_parser(sub) -> None:
    """Add ``serve`` to the subcommands ``sub``."""
    srv = sub.add_parser("serve", help="serve a vision model (BLIP, BLIP-2, LLaVA-1.5) over Ollama's API, "
                                       "OpenAI's under /v1 and Workers AI's under /ai/run")
    srv.add_argument("--model", default="blip", metavar="ID|PATH",
                     help="alias (blip = Salesforce/blip-image-captioning-large, blip2 = Salesforce/blip2-opt-2.7b, "
                          "llava = llava-hf/llava-1.5-7b-hf), Hugging Face Hub id, "
                          "or a directory saved with save_pretrained (default blip)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=positive_int, default=11434, help="port to listen on (default 11434, Ollama's)")
    srv.add_argument("--logging", choices=list(LOG_LEVELS), default="warn", help="log level (default warn)")
    srv.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                     help="most concurrent requests run as one batch (default 8)")
    srv.add_argument("--batch-window-ms", type=float, default=10.0, metavar="MS",
                     help="how long a batch waits for more requests (default 10, at most 10000)")
    srv.add_argument("--max-queue", type=int, default=32, metavar="N",
                     help="requests that may wait; more are answered 503 with Retry-After (default 32, 0 = no limit)")
    srv.add_argument("--request-timeout-s", type=float, default=120.0, metavar="S",
                     help="a request waiting and generating longer gets 504 (default 120, 0 = none)")
    srv.add_argument("--keep-alive", default="5m", metavar="DURATION",
                     help="unload the model after this idle time (Ollama's keep_alive: 5m, 300, 0, -1; default 5m)")
    srv.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="default generation option, as Ollama's options (num_predict, temperature, top_p, top_k, "
                          "seed, num_beams, min_length, max_length, length_penalty, repeat_penalty); "
                          "requests override it; repeatable")
    lim = srv.add_argument_group("limits on requests (beyond them: 400, or 413 for sizes)")
    lim.add_argument("--max-beams", type=positive_int, default=8, metavar="N",
                     help="largest num_beams a request may ask for (default 8)")
    lim.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                     help="largest num_predict / max_tokens / max_length / min_length, in tokens (default 512)")
    lim.add_argument("--max-top-k", type=positive_int, default=1000, metavar="N",
                     help="largest top_k (default 1000)")
    lim.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                     help="largest request body in MiB, from Content-Length or counted as it arrives; larger: 413 "
                          "(default 32)")
    lim.add_argument("--max-image-pixels", type=positive_int, default=40_000_000, metavar="N",
                     help="most pixels (width x height, read from the image's header before decoding) an image may "
                          "have; more: 413 (default 40000000)")
    lim.add_argument("--max-images", type=positive_int, default=8, metavar="N",
                     help="most images in one request (frames of one video, oldest first: LLaVA gets them all, "
                          "BLIP and BLIP-2 one grid of them); more: 400 (default 8)")
    lim.add_argument("--max-embed-inputs", type=positive_int, default=256, metavar="N",
                     help="most texts in one /api/embed or /v1/embeddings request; more: 400 (default 256)")
    lim.add_argument("--max-prompt-chars", type=positive_int, default=32768, metavar="N",
                     help="longest prompt in characters, checked before tokenising (default 32768)")
    lim.add_argument("--decode-threads", type=positive_int, default=2, metavar="N",
                     help="requests whose images are decoded at once; other requests wait their turn in the queue "
                          "(default 2)")
    lim.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages of ORIGIN (e.g. http://localhost:3000) use the server (repeatable); "
                          "requests with any other Origin header but the server's own get 403")
    lim.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also answer requests whose Host header is NAME (besides localhost, this machine's "
                          "addresses and the --host name); others get 403, which stops DNS rebinding; repeatable")
    srv.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """``vision-host serve``: runs until stopped; returns the exit status (1: the server could
    not start, 2: a bad ``--option``)."""
    from ..serve.app import ServeError, serve

    setup_logging(args.logging)
    options = {}
    for pair in args.option:
        key, sep, value = pair.partition("=")
        try:
            options[key.strip()] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            sep = ""
        if not sep:
            print(f"vision-host: --option {pair}: give KEY=NUMBER, e.g. --option num_beams=5", file=sys.stderr)
            return 2
    try:
        serve(args.model, args.host, args.port, log_level={"warn": "warning"}.get(args.logging, args.logging),
              max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
              request_timeout_s=args.request_timeout_s, keep_alive=args.keep_alive, options=options,
              max_beams=args.max_beams, max_new_tokens=args.max_new_tokens, max_top_k=args.max_top_k,
              max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
              max_prompt_chars=args.max_prompt_chars, decode_threads=args.decode_threads,
              allow_origins=args.allow_origin, allow_hosts=args.allow_host, max_images=args.max_images,
              max_embed_inputs=args.max_embed_inputs)
    except ServeError as exc:
        print(f"vision-host: {exc}", file=sys.stderr)
        return 1
    return 0
