"""``vision-host serve``: a vision server speaking Ollama's, OpenAI's and Workers AI's APIs.

Ollama clients (the official ``ollama`` library, ``curl``, vision-host's own ``ollama``
processor), OpenAI clients and Workers AI clients work unchanged against it. The model (BLIP,
BLIP-2 or LLaVA-1.5) runs in-process with Hugging Face transformers. A model answers to its
served name (the alias or directory name), its Hub id, and, for Workers AI, ``@cf/`` + its Hub
id. Several images in one request are consecutive moments of one video, oldest first: LLaVA
gets them all, BLIP and BLIP-2 one grid of them (``models/base``, ``models/grid``). Without
images, LLaVA's and BLIP-2's language model answers text-only chats; ``/api/embed`` and
``/v1/embeddings`` embed texts with the family's text side.

* ``app``: ``create_app`` (the FastAPI app: one router per API behind the request guard and
  the error handlers) and ``serve`` (check the settings, bind, load, run uvicorn); the safety
  rules.
* ``api/``: one module per API, its routes, request parsing and response shapes: ``ollama``
  (Ollama's api.md), ``openai`` (OpenAI's chat completions), ``workers_ai`` (Workers AI's
  ``@cf/llava-hf/llava-1.5-7b-hf`` schema).
* ``served_model``: what every API's routes share (the model, its names, limits, and the path
  of a request's images and prompt to the model worker); ``scheduler``: the model worker (micro-batching,
  bounded queue, timeouts, ``keep_alive``); ``errors``: the error types and each API's error
  shape; ``guard``: origins, content types and body sizes; ``parsing``: strict JSON and
  ``keep_alive`` durations.
* ``models/``: the model families, their generation settings and the Hugging Face Hub download.
* ``embedded``: ``vision-host run``'s own server (``ollama-url=embedded``) in a child process.

Importing this package imports nothing but it; ``app``, ``models`` and ``scheduler`` import
neither torch, transformers, FastAPI nor uvicorn until a server is built.
"""
