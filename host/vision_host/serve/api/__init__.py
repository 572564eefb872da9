"""One module per API the server speaks: ``ollama`` (Ollama's api.md), ``openai`` (OpenAI's
chat completions) and ``workers_ai`` (Workers AI's LLaVA schema). Each has ``routes(served)``:
the API's FastAPI router over the :class:`~vision_host.serve.served_model.ServedModel`, with
its request parsing and response shapes; its error shape is in ``serve/errors.py``. These
modules import FastAPI at the top: only ``create_app`` (``serve/app.py``) imports them."""
