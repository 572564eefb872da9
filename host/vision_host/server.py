"""``vision-host serve``: an embedded vision server that speaks Ollama's API.

Ollama clients (the official ``ollama`` library, ``curl``, vision-host's own ``ollama``
processor) and OpenAI clients (through Ollama's ``/v1`` compatibility layer) work unchanged
against it. The model runs in-process with Hugging Face transformers:

* ``GET /`` → ``Ollama is running``; ``GET /api/version``; ``GET /api/tags``, ``GET /api/ps``
  (the loaded model, as ``NAME:latest``); ``POST /api/show``.
* ``POST /api/generate`` (``model``, ``prompt``, ``images`` as base64, ``stream`` default true,
  ``options.num_predict``, ``options.temperature``, ``options.seed``): NDJSON lines
  ``{"model","created_at","response","done":false}`` then a final ``"done":true`` line with
  ``done_reason`` (``"stop"``, or ``"length"`` when ``num_predict`` cut it short) and Ollama's
  metrics (durations in ns); ``"stream": false`` → one JSON object.
* ``POST /api/chat``: the same with ``messages[]`` (``content``, ``images``) and
  ``"message": {"role": "assistant", "content": ...}``.
* ``POST /v1/chat/completions`` (content parts with ``image_url`` data URLs; ``stream`` → SSE
  ``chat.completion.chunk`` events then ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``.
* Errors as Ollama sends them: ``{"error": "..."}`` — 404 ``model 'x' not found``, 400 for bad
  bodies and images (on ``/v1``, OpenAI's ``{"error": {"message", "type", ...}}``).

The model is BLIP image captioning (``BlipForConditionalGeneration`` + ``BlipProcessor``):
the image is captioned with the prompt as the text prefix (an empty prompt gives an
unconditional caption), and the reply is the continuation after that prefix. Without
streaming, beam search with 3 beams; when streaming, greedy decoding through
``TextIteratorStreamer`` on a worker thread so tokens are sent as they are generated. A
positive ``temperature`` samples instead. ``num_predict`` / ``max_tokens`` cap the new tokens
(default :data:`DEFAULT_MAX_NEW_TOKENS`). With several images the last one is captioned.

Limits of this first step: **one generation at a time** (a lock serialises requests; others
wait their turn, there is no queue limit or 503), no micro-batching, no ``keep_alive``
unloading (the model stays loaded for the life of the server), BLIP only.

torch and transformers are imported lazily (inside functions), so importing this module, and
``vision-host run``, never loads them.
"""


import base64
import binascii
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("vision_host.server")

#: Short names accepted by ``--model``.
MODEL_ALIASES = {
    "blip": "Salesforce/blip-image-captioning-large",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "blip-base": "Salesforce/blip-image-captioning-base",
}
DEFAULT_MODEL = "blip"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_MAX_NEW_TOKENS = 40
DEFAULT_NUM_BEAMS = 3
#: What ``/api/version`` answers: the Ollama API level this server follows.
OLLAMA_API_VERSION = "0.12.0"


class ServeError(Exception):
    """The server cannot start (port in use, model not loadable): the message says what to do."""


class ModelLoadError(ServeError):
    """The model's weights or processor cannot be loaded."""


class RequestError(Exception):
    """A request the server refuses: ``status`` and Ollama's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- model names -------------------------------------------------------------------------------
def normalize_model_name(name: str) -> str:
    """Ollama's matching: case-insensitive, and a name without a tag means ``:latest``."""
    name = (name or "").strip().lower()
    if not name:
        return ""
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def resolve_model(spec: str) -> tuple[str, str, bool]:
    """``--model`` → ``(served name, source, is_local_dir)``.

    ``spec`` is an alias (``blip``), a local directory saved with ``save_pretrained``, or a
    Hugging Face Hub id (``Salesforce/blip-image-captioning-large``).
    """
    spec = spec.strip()
    if spec.lower() in MODEL_ALIASES:
        return spec.lower(), MODEL_ALIASES[spec.lower()], False
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name.lower() or "model", str(path.resolve()), True
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        raise ModelLoadError(f"--model {spec}: no such directory (give a directory saved with "
                             f"save_pretrained, a Hugging Face Hub id, or one of {', '.join(MODEL_ALIASES)})")
    return spec.lower(), spec, False


# -- the model ----------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """What one generation produced (filled in as it runs)."""

    text: str = ""
    prompt_tokens: int = 0
    eval_count: int = 0
    done_reason: str = "stop"
    first_token_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    ended_at: float | None = None
    lock_wait_s: float = 0.0


class BlipCaptioner:
    """BLIP captioning on CPU (float32) or CUDA (float16), one generation at a time."""

    family = "blip"

    def __init__(self, spec: str = DEFAULT_MODEL) -> None:
        self.name, self.source, self.local = resolve_model(spec)
        self.lock = threading.Lock()
        self.loaded_at = datetime.now(timezone.utc)
        self.load_duration_ns = 0
        self.model = self.processor = None
        self.device = "cpu"
        self.size = 0

    def load(self) -> "BlipCaptioner":
        """Load the processor and weights (local cache first, then the Hub unless offline).

        Raises:
            ModelLoadError: not cached and not downloadable, or not a BLIP captioning model.
        """
        t0 = time.perf_counter()
        try:
            import torch
            from transformers import BlipForConditionalGeneration, BlipProcessor
        except ImportError as exc:
            raise ModelLoadError(f"the serve extra is not installed ({exc.name} is missing): "
                                 f"pip install 'vision-host[serve]'") from None
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        cuda = torch.cuda.is_available()
        dtype = torch.float16 if cuda else torch.float32
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

        def attempt(local_only: bool):
            proc = BlipProcessor.from_pretrained(self.source, local_files_only=local_only)
            mod = BlipForConditionalGeneration.from_pretrained(self.source, local_files_only=local_only, dtype=dtype)
            return proc, mod

        try:
            try:
                self.processor, self.model = attempt(True)
            except OSError:
                if self.local or offline:
                    raise
                log.warning("model %s is not in the local Hugging Face cache: downloading it", self.source)
                self.processor, self.model = attempt(False)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(self._load_error(exc, offline)) from None
        if getattr(self.model.config, "model_type", None) != "blip":
            raise ModelLoadError(f"model {self.source} is a {self.model.config.model_type!r} model: "
                                 f"vision-host serve runs BLIP captioning models (e.g. --model blip)")
        self.device = "cuda" if cuda else "cpu"
        self.model.to(self.device).eval()
        self.size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.load_duration_ns = int((time.perf_counter() - t0) * 1e9)
        self.loaded_at = datetime.now(timezone.utc)
        return self

    def _load_error(self, exc: Exception, offline: bool) -> str:
        if self.local:
            return (f"cannot load model from {self.source}: {str(exc).splitlines()[0]} (the directory must hold a "
                    f"BLIP captioning model and its processor, saved with save_pretrained)")
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        why = ("the Hugging Face Hub is off (HF_HUB_OFFLINE=1)" if offline
               else f"it could not be downloaded ({str(exc).splitlines()[0]})")
        return (f"cannot load model {self.source}: its weights are not in the local Hugging Face cache "
                f"({cache}) and {why}. On a machine with internet run `huggingface-cli download {self.source}` "
                f"(or `hf download {self.source}`) and copy the cache here, or pass --model DIR with a "
                f"directory saved with save_pretrained")

    # -- inference --------------------------------------------------------------------------
    def prepare(self, image_bytes: bytes, prompt: str) -> dict:
        """Decode the image and build the model inputs. Raises RequestError(400) for a bad image."""
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(image_bytes))
            image.load()
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise RequestError(400, "Failed to load image or audio file") from None
        prompt = prompt.strip()
        if prompt:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        else:
            inputs = self.processor(images=image, return_tensors="pt")
        import torch
        out = {}
        for k, v in inputs.items():
            if k == "pixel_values":
                v = v.to(self.device, dtype=next(self.model.parameters()).dtype)
            else:
                v = v.to(self.device)
            out[k] = v
        return out

    def _max_new_tokens(self, inputs: dict, num_predict: int | None) -> int:
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 512))
        prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
        room = max(1, limit - prompt_len)
        n = num_predict if num_predict and num_predict > 0 else DEFAULT_MAX_NEW_TOKENS
        return min(n, room)

    def generate(self, inputs: dict, num_predict: int | None = None, temperature: float | None = None,
                 seed: int | None = None, stream: bool = False,
                 cancel: threading.Event | None = None) -> Iterator[str | GenerationResult]:
        """Generate a caption: yields text pieces (as they come when ``stream``), then the
        :class:`GenerationResult`. Holds the lock (one generation at a time) while it runs;
        setting ``cancel`` stops the generation at the next token."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        result = GenerationResult()
        wait0 = time.perf_counter()
        with self.lock:
            result.lock_wait_s = time.perf_counter() - wait0
            result.started_at = time.perf_counter()
            max_new = self._max_new_tokens(inputs, num_predict)
            prompt_ids = inputs.get("input_ids")
            # BLIP's generate drops the trailing [SEP] of the prompt and starts with [BOS].
            prompt_len = prompt_ids.shape[1] - 1 if prompt_ids is not None else 1
            result.prompt_tokens = prompt_len
            eos = self.model.config.text_config.sep_token_id
            kwargs: dict[str, Any] = {"max_new_tokens": max_new}
            if temperature is not None and temperature > 0:
                kwargs.update(do_sample=True, temperature=float(temperature), num_beams=1)
            elif stream:
                kwargs.update(do_sample=False, num_beams=1)
            else:
                kwargs.update(do_sample=False, num_beams=DEFAULT_NUM_BEAMS)
            if seed is not None:
                torch.manual_seed(int(seed))

            class Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    stop = bool(cancel is not None and cancel.is_set())
                    return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
            kwargs["stopping_criteria"] = StoppingCriteriaList([Cancelled()])

            def finish(sequences) -> None:
                seq = sequences[0]
                new = seq[prompt_len:]
                result.eval_count = int(new.shape[0])
                ended_on_eos = result.eval_count > 0 and int(new[-1]) == eos
                result.done_reason = "length" if result.eval_count >= max_new and not ended_on_eos else "stop"
                result.ended_at = time.perf_counter()

            if not stream:
                with torch.inference_mode():
                    sequences = self.model.generate(**inputs, **kwargs)
                result.first_token_at = time.perf_counter()
                finish(sequences)
                result.text = self.processor.decode(sequences[0][prompt_len:], skip_special_tokens=True).strip()
                if result.text:
                    yield result.text
                yield result
                return

            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, timeout=600,
                                            skip_special_tokens=True)
            box: dict[str, Any] = {}

            def work() -> None:
                try:
                    with torch.inference_mode():
                        box["sequences"] = self.model.generate(**inputs, streamer=streamer, **kwargs)
                except BaseException as exc:  # noqa: BLE001 — reported to the client
                    box["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=work, name="vision-host-generate", daemon=True)
            worker.start()
            pieces: list[str] = []
            try:
                first = True
                for piece in streamer:
                    if not piece:
                        continue
                    if first:
                        result.first_token_at = time.perf_counter()
                        piece = piece.lstrip()
                        first = False
                        if not piece:
                            continue
                    pieces.append(piece)
                    yield piece
            finally:
                if cancel is not None and worker.is_alive():
                    cancel.set()
                worker.join()
            if "error" in box:
                raise box["error"]
            finish(box["sequences"])
            result.text = "".join(pieces)
            yield result


# -- request parsing ------------------------------------------------------------------------------
def _go_type(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _parse_body(raw: bytes) -> dict:
    if not raw.strip():
        raise RequestError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid character in request body: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(body)} into Go value of type api.Request")
    return body


def _field(body: dict, key: str, types: tuple, gotype: str, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(value)} into Go struct field .{key} of type {gotype}")
    return value


def _b64_image(s: Any) -> bytes:
    if not isinstance(s, str):
        raise RequestError(400, f"json: cannot unmarshal {_go_type(s)} into Go struct field .images of type string")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        bad = next((i for i, c in enumerate(s) if not (c.isalnum() or c in "+/=")), len(s))
        raise RequestError(400, f"illegal base64 data at input byte {bad}") from None


def _options(body: dict) -> tuple[int | None, float | None, int | None]:
    opts = _field(body, "options", (dict,), "map[string]interface {}", {})
    def num(key, cast):
        v = opts.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(400, f"option {key!r} must be a number, not {_go_type(v)}")
        return cast(v)
    return num("num_predict", int), num("temperature", float), num("seed", int)


def _decode_data_url(url: Any) -> bytes:
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise RequestError(400, "invalid message format")
    if url.startswith(("http://", "https://")):
        raise RequestError(400, "image URLs are not currently supported, please use base64 encoded data instead")
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise RequestError(400, "invalid image input")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid image input") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- the app ----------------------------------------------------------------------------------------
def create_app(captioner: BlipCaptioner):
    """The FastAPI app serving ``captioner`` (already loaded)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    app = FastAPI(title="vision-host serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    served = normalize_model_name(captioner.name)

    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, media_type="application/json; charset=utf-8")

    def oai_err(status: int, message: str) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            return PlainTextResponse("404 page not found", status_code=404)
        if exc.status_code == 405:
            return PlainTextResponse("405 method not allowed", status_code=405)
        return err(exc.status_code, str(exc.detail))

    def check_model(name: Any) -> None:
        if not isinstance(name, str) or normalize_model_name(name) != served:
            raise RequestError(404, f"model '{name or ''}' not found")

    def details() -> dict:
        return {"parent_model": "", "format": "safetensors", "family": captioner.family,
                "families": [captioner.family], "parameter_size": _param_size(captioner),
                "quantization_level": "F16" if captioner.device == "cuda" else "F32"}

    def model_entry() -> dict:
        return {"name": served, "model": served, "modified_at": captioner.loaded_at.isoformat(),
                "size": captioner.size, "digest": "", "details": details()}

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse)
    def root():
        return "Ollama is running"

    @app.get("/api/version")
    def version():
        return {"version": OLLAMA_API_VERSION}

    @app.get("/api/tags")
    def tags():
        return {"models": [model_entry()]}

    @app.get("/api/ps")
    def ps():
        entry = model_entry()
        entry.update(expires_at="0001-01-01T00:00:00Z", size_vram=captioner.size if captioner.device == "cuda" else 0)
        return {"models": [entry]}

    @app.post("/api/show")
    async def show(request: Request):
        try:
            body = _parse_body(await request.body())
            check_model(body.get("model") or body.get("name"))
        except RequestError as exc:
            return err(exc.status, exc.message)
        return {"license": "", "modelfile": f"# served by vision-host serve\nFROM {captioner.source}\n",
                "parameters": "", "template": "{{ .Prompt }}", "details": details(),
                "model_info": {"general.architecture": captioner.family, "general.basename": captioner.source},
                "capabilities": ["completion", "vision"], "modified_at": captioner.loaded_at.isoformat()}

    def metrics(res: GenerationResult) -> dict:
        end = res.ended_at or time.perf_counter()
        first = res.first_token_at or end
        return {"total_duration": int((end - res.started_at + res.lock_wait_s) * 1e9),
                "load_duration": int(res.lock_wait_s * 1e9),
                "prompt_eval_count": res.prompt_tokens,
                "prompt_eval_duration": int((first - res.started_at) * 1e9),
                "eval_count": res.eval_count,
                "eval_duration": int((end - first) * 1e9)}

    def ollama_reply(kind: str, name: str, inputs: dict | None, opts: tuple, stream: bool):
        """The /api/generate or /api/chat answer (``kind`` "response" or "message")."""
        def piece_obj(text: str, done: bool) -> dict:
            obj: dict[str, Any] = {"model": name, "created_at": _now()}
            if kind == "response":
                obj["response"] = text
            else:
                obj["message"] = {"role": "assistant", "content": text}
            obj["done"] = done
            return obj

        if inputs is None:   # nothing to caption: Ollama's "load" answer
            obj = piece_obj("", True)
            obj["done_reason"] = "load"
            return JSONResponse(obj, media_type="application/json; charset=utf-8")
        num_predict, temperature, seed = opts
        cancel = threading.Event()

        def lines() -> Iterator[bytes]:
            try:
                for item in captioner.generate(inputs, num_predict, temperature, seed, stream=True, cancel=cancel):
                    if isinstance(item, GenerationResult):
                        obj = piece_obj("", True)
                        obj["done_reason"] = item.done_reason
                        obj.update(metrics(item))
                    else:
                        obj = piece_obj(item, False)
                    yield (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            except GeneratorExit:
                cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001 — after the 200 went out: Ollama's last-line error
                log.exception("generation failed")
                yield (json.dumps({"error": str(exc)}, separators=(",", ":")) + "\n").encode()
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _nonstream_async(run: Callable, kind: str, name: str):
        res: GenerationResult = await run_in_threadpool(run)
        obj: dict[str, Any] = {"model": name, "created_at": _now()}
        if kind == "response":
            obj["response"] = res.text
        else:
            obj["message"] = {"role": "assistant", "content": res.text}
        obj.update(done=True, done_reason=res.done_reason, **metrics(res))
        return JSONResponse(obj, media_type="application/json; charset=utf-8")

    async def answer(kind: str, name: str, inputs, opts, stream: bool):
        if inputs is None or stream:
            return ollama_reply(kind, name, inputs, opts, stream)
        num_predict, temperature, seed = opts

        def run():
            res = None
            for item in captioner.generate(inputs, num_predict, temperature, seed, stream=False):
                res = item
            return res
        try:
            return await _nonstream_async(run, kind, name)
        except RequestError as exc:
            return err(exc.status, exc.message)
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            return err(500, str(exc))

    async def prepared(image: bytes | None, prompt: str):
        if image is None:
            raise RequestError(400, f"model '{captioner.name}' captions images: add one to \"images\"")
        return await run_in_threadpool(captioner.prepare, image, prompt)

    @app.post("/api/generate")
    async def generate(request: Request):
        try:
            body = _parse_body(await request.body())
            name = _field(body, "model", (str,), "string", "")
            check_model(name)
            prompt = _field(body, "prompt", (str,), "string", "")
            images = [_b64_image(s) for s in _field(body, "images", (list,), "[]api.ImageData", [])]
            stream = _field(body, "stream", (bool,), "bool", True)
            opts = _options(body)
            if not prompt and not images:
                inputs = None
            else:
                inputs = await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return err(exc.status, exc.message)
        return await answer("response", name, inputs, opts, stream)

    @app.post("/api/chat")
    async def chat(request: Request):
        try:
            body = _parse_body(await request.body())
            name = _field(body, "model", (str,), "string", "")
            if not name:
                raise RequestError(400, "model is required")
            check_model(name)
            messages = _field(body, "messages", (list,), "[]api.Message", [])
            stream = _field(body, "stream", (bool,), "bool", True)
            opts = _options(body)
            prompt, images = "", []
            for m in messages:
                if not isinstance(m, dict):
                    raise RequestError(400, f"json: cannot unmarshal {_go_type(m)} into Go value of type api.Message")
                content = _field(m, "content", (str,), "string", "")
                if m.get("role", "user") == "user" and content.strip():
                    prompt = content
                images += [_b64_image(s) for s in _field(m, "images", (list,), "[]api.ImageData", [])]
            inputs = None if not messages else await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return err(exc.status, exc.message)
        return await answer("message", name, inputs, opts, stream)

    # -- OpenAI compatibility ----------------------------------------------------------------
    def oai_model(name: str) -> dict:
        owner = name.split("/", 1)[0] if "/" in name else "library"
        return {"id": name, "object": "model", "created": int(captioner.loaded_at.timestamp()), "owned_by": owner}

    @app.get("/v1/models")
    def v1_models():
        return {"object": "list", "data": [oai_model(served)]}

    @app.get("/v1/models/{model:path}")
    def v1_model(model: str):
        if normalize_model_name(model) != served:
            return oai_err(404, f"model '{normalize_model_name(model)}' not found")
        return oai_model(model)

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request):
        try:
            raw = await request.body()
            if not raw.strip():
                raise RequestError(400, "EOF")
            body = _parse_body(raw)
            name = _field(body, "model", (str,), "string", "")
            messages = _field(body, "messages", (list,), "[]openai.Message", [])
            if not messages:
                raise RequestError(400, "[] is too short - 'messages'")
            stream = _field(body, "stream", (bool,), "bool", False)
            include_usage = bool((_field(body, "stream_options", (dict,), "openai.StreamOptions", {}) or {})
                                 .get("include_usage"))
            max_tokens = _field(body, "max_tokens", (int,), "int", None)
            if max_tokens is None:
                max_tokens = _field(body, "max_completion_tokens", (int,), "int", None)
            temperature = _field(body, "temperature", (int, float), "float64", None)
            seed = _field(body, "seed", (int,), "int", None)
            prompt, images = "", []
            for m in messages:
                if not isinstance(m, dict):
                    raise RequestError(400, "invalid message format")
                content = m.get("content")
                texts = []
                if isinstance(content, str):
                    texts.append(content)
                elif isinstance(content, list):
                    for part in content:
                        if not isinstance(part, dict):
                            raise RequestError(400, "invalid message format")
                        if part.get("type") == "text":
                            texts.append(str(part.get("text") or ""))
                        elif part.get("type") == "image_url":
                            images.append(_decode_data_url(part.get("image_url")))
                        else:
                            raise RequestError(400, "invalid message format")
                elif content is None and m.get("role") != "assistant":
                    raise RequestError(400, "invalid message content type: <nil>")
                if m.get("role", "user") == "user":
                    for t in texts:
                        if t.strip():
                            prompt = t
            if not name:
                raise RequestError(400, "model is required")
            check_model(name)
            inputs = await prepared(images[-1] if images else None, prompt)
        except RequestError as exc:
            return oai_err(exc.status, exc.message)
        cid = f"chatcmpl-{int(time.time() * 1000) % 1000}"
        created = int(time.time())
        finish = {"stop": "stop", "length": "length"}

        def usage(res: GenerationResult) -> dict:
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.eval_count,
                    "total_tokens": res.prompt_tokens + res.eval_count}

        if not stream:
            def run():
                res = None
                for item in captioner.generate(inputs, max_tokens, temperature, seed, stream=False):
                    res = item
                return res
            try:
                res = await run_in_threadpool(run)
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                return oai_err(500, str(exc))
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                                 "system_fingerprint": "fp_ollama",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                              "finish_reason": finish.get(res.done_reason, "stop")}],
                                 "usage": usage(res)})

        cancel = threading.Event()

        def chunk(delta: dict, reason: str | None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                   "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        def events() -> Iterator[bytes]:
            first = True
            try:
                for item in captioner.generate(inputs, max_tokens, temperature, seed, stream=True, cancel=cancel):
                    if isinstance(item, GenerationResult):
                        yield chunk({}, finish.get(item.done_reason, "stop"))
                        if include_usage:
                            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                                   "system_fingerprint": "fp_ollama", "choices": [], "usage": usage(item)}
                            yield f"data: {json.dumps(obj)}\n\n".encode()
                    else:
                        yield chunk({"role": "assistant", "content": item} if first else {"content": item}, None)
                        first = False
            except GeneratorExit:
                cancel.set()
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'api_error'}})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _param_size(captioner: BlipCaptioner) -> str:
    if captioner.model is None:
        return ""
    n = sum(p.numel() for p in captioner.model.parameters())
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0", "")
    return str(n)


# -- running --------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``. Raises ServeError naming ``--port`` when taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        import errno
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (is Ollama or another vision-host serve "
                             f"running?): stop it or pick another with --port") from None
        if exc.errno == errno.EACCES:
            raise ServeError(f"no permission to listen on port {port}: pick one above 1023 with --port") from None
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host and --port") from None
    return sock


def serve(model: str = DEFAULT_MODEL, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          log_level: str = "warning", status=sys.stderr) -> None:
    """Bind ``host:port`` (first, so a taken port fails fast), load the model, serve until stopped.

    Raises:
        ServeError: port taken, model not loadable, serve extra missing.
    """
    try:
        import uvicorn
    except ImportError:
        raise ServeError("the serve extra is not installed: pip install 'vision-host[serve]'") from None
    sock = bind_socket(host, port)
    try:
        captioner = BlipCaptioner(model)
        print(f"vision-host serve: loading {captioner.source} …", file=status, flush=True)
        captioner.load()
        app = create_app(captioner)
        shown = f"[{host}]" if ":" in host else host
        print(f"vision-host serve: {normalize_model_name(captioner.name)} ({captioner.source}, {captioner.device}) "
              f"loaded in {captioner.load_duration_ns / 1e9:.1f} s; Ollama API on http://{shown}:{port} "
              f"(OpenAI API under /v1)", file=status, flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug"),
                                timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
