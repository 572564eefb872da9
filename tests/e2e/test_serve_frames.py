"""``vision-host serve`` with several images per request: consecutive moments of one video.

LLaVA gets every frame (one ``<image>`` each, the images as a list), BLIP and BLIP-2 one grid
of them; LLaVA's and BLIP-2's prompts start with a sentence saying what the images are. Tiny
random-weight models (:mod:`tiny_models`) run through the real classes: the official
``ollama`` and ``openai`` clients against a real server process, and ``prepare`` on the real
processors. What the model saw is read from the answers' prompt token counts, the prepared
inputs, and the image counters of ``/api/ps``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading

import pytest

import jsonschema  # noqa: E402  (a main dependency: never skipped)
test_serve = pytest.importorskip("test_serve")      # skips with the same rules (serve extra present)
import ollama  # noqa: E402
import openai  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from tiny_models import BUILDERS  # noqa: E402
from vision_host.serve.models import open_model  # noqa: E402
from vision_host.serve.models.base import FRAMES_NOTE, GRID_NOTE, frames_note  # noqa: E402
from vision_host.serve.models.grid import compose_grid, grid_geometry  # noqa: E402

pytestmark = pytest.mark.slow   # loads tiny BLIP, BLIP-2 and LLaVA models
_WAIT_S = 60
#: Image tokens per image of the tiny LLaVA (2×2 patches) and the tiny BLIP-2 (4 queries).
IMAGE_TOKENS = 4
SCHEMA = {"type": "object", "properties": {"person": {"type": "boolean"}, "count": {"type": "integer"}},
          "required": ["person", "count"]}
COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 40, 200)]


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _tokens(text: str) -> int:
    """Tokens of ``text`` for the tiny models' word-level tokenizers (words and punctuation runs)."""
    return len(re.findall(r"\w+|[^\w\s]+", text))


def _data_url(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def _oai_messages(prompt: str, images: list[bytes]) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": prompt}] + [
        {"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]}]


def _stats(url: str) -> dict:
    return requests.get(url + "/api/ps", timeout=_WAIT_S).json()["vision_host"]


def _counted(before: dict, after: dict) -> tuple[int, int, int]:
    """(images sent, images encoded by the model, grids) between two ``/api/ps`` readings."""
    return tuple(after[k] - before[k] for k in ("images", "model_images", "grids"))


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    """Three frames, oldest first: red, green (wider), blue."""
    return [_jpeg(COLORS[0]), _jpeg(COLORS[1], (64, 40)), _jpeg(COLORS[2])]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("frames")
    return {family: BUILDERS[family](root / f"tiny-{family}") for family in ("blip", "blip2", "llava")}


@pytest.fixture(scope="module")
def llava_server(model_dirs, tmp_path_factory):
    """A tiny LLaVA served with ``--max-images 4``."""
    with test_serve.serve_process(model_dirs["llava"], tmp_path_factory.mktemp("llava") / "serve.log",
                                  "--max-images", "4") as url:
        yield url


@pytest.fixture(scope="module")
def blip2_server(model_dirs, tmp_path_factory):
    """A tiny BLIP-2 served with the default limits (8 images)."""
    with test_serve.serve_process(model_dirs["blip2"], tmp_path_factory.mktemp("blip2") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def loaded(model_dirs) -> dict:
    """The tiny models loaded in this process, for ``prepare``."""
    return {family: open_model(str(path)).load() for family, path in model_dirs.items()}


# -- the grid --------------------------------------------------------------------------------------
def test_grid_geometry_and_order():
    for n, cols, rows in ((1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (5, 3, 2), (6, 3, 2), (7, 3, 3),
                          (8, 3, 3), (9, 3, 3), (10, 4, 3)):
        g = grid_geometry(n, (64, 48))
        assert (g.cols, g.rows, g.tile_width, g.tile_height) == (cols, rows, 64, 48), n
        assert g.size == (cols * 64, rows * 48)
    g = grid_geometry(5, (64, 48))
    assert [g.box(i) for i in range(5)] == [(0, 0), (64, 0), (128, 0), (0, 48), (64, 48)]
    # over the pixel limit the tiles shrink together, keeping their aspect
    g = grid_geometry(4, (1000, 500), max_pixels=500_000)   # 2 000 000 pixels: tiles halved
    assert g.size[0] * g.size[1] <= 500_000 and (g.tile_width, g.tile_height) == (500, 250)
    for bad in ((0, (10, 10)), (2, (0, 10))):
        with pytest.raises(ValueError):
            grid_geometry(*bad)

    # oldest top left, left to right then top to bottom; each tile the newest frame's size; the rest black
    images = [Image.new("RGB", size, c) for c, size in zip(COLORS, ((20, 10), (40, 30), (30, 30), (16, 12),
                                                                    (32, 24)))]
    canvas, g = compose_grid(iter(images), 5, images[-1].size)
    assert canvas.size == (96, 48) and (g.cols, g.rows) == (3, 2)
    for i, color in enumerate(COLORS):
        x, y = g.box(i)
        assert canvas.getpixel((x + 16, y + 12)) == color, i
    assert canvas.getpixel((2 * 32 + 16, 24 + 12)) == (0, 0, 0)
    with pytest.raises(ValueError):
        compose_grid(images[:2], 3, (32, 24))


def test_the_sentence_about_the_frames():
    assert frames_note("what?", 1, False) == "" and frames_note("what?", 1, True) == ""
    assert frames_note("what?", 3, False) == FRAMES_NOTE == "The images are consecutive moments of one video, " \
                                                            "oldest first. "
    assert frames_note("what?", 3, True) == GRID_NOTE
    assert frames_note("These are CONSECUTIVE Moments: what changed?", 3, False) == ""


# -- prepare on the real processors -------------------------------------------------------------------
def test_llava_prepare_gives_each_frame_its_image_tokens(loaded, frames):
    llava = loaded["llava"]
    image_id = llava.config.image_token_id
    one = llava.prepare(frames[-1], "what is there?")
    many = llava.prepare(frames, "what is there?")
    assert (one.model_images, one.images, one.grid) == (1, 1, None)
    assert int((one.tensors["input_ids"] == image_id).sum()) == IMAGE_TOKENS
    assert (many.model_images, many.images, many.grid) == (3, 3, None)
    assert tuple(many.tensors["pixel_values"].shape[:2]) == (3, 3)
    assert int((many.tensors["input_ids"] == image_id).sum()) == 3 * IMAGE_TOKENS
    text = llava.processor.tokenizer.decode(many.tensors["input_ids"][0])
    assert text.count("<image>") == 3 * IMAGE_TOKENS and "ASSISTANT" in text
    assert many.length == one.length + 2 * IMAGE_TOKENS + _tokens(FRAMES_NOTE)
    # a prompt that already says so gets no sentence
    said = llava.prepare(frames, "consecutive moments: what is there?")
    assert said.length == one.length + 2 * IMAGE_TOKENS + _tokens("consecutive moments:")
    # one image: the batch key of today; several batch only with as many
    key = llava.batch_key(one, (), 8, None)
    assert key == llava.batch_key(llava.prepare(frames[0], "what?"), (), 8, None)
    assert llava.batch_key(many, (), 8, None) != key
    assert llava.batch_key(many, (), 8, None) == llava.batch_key(llava.prepare(frames[::-1], "what?"), (), 8, None)
    # a raw prompt: one <image> per frame put first, or exactly as many given
    raw = llava.prepare(frames, "USER: what? ASSISTANT:", raw=True)
    assert int((raw.tensors["input_ids"] == image_id).sum()) == 3 * IMAGE_TOKENS
    from vision_host.serve.models.base import BadPrompt
    with pytest.raises(BadPrompt, match="2 <image> placeholders for 3"):
        llava.prepare(frames, "<image> <image> what?", raw=True)


def test_llava_falls_back_to_a_grid_when_the_frames_do_not_fit(loaded, frames, monkeypatch):
    llava = loaded["llava"]
    prompt = "consecutive moments: what is there?"   # no sentence either way: the lengths differ by the images
    many = llava.prepare(frames, prompt)
    monkeypatch.setattr(llava, "position_limit", lambda: many.length)   # the three frames' prompt is too long
    on_grid = llava.prepare(frames, prompt)
    assert (on_grid.model_images, on_grid.images) == (1, 3) and on_grid.grid is not None
    assert on_grid.length == many.length - 2 * IMAGE_TOKENS
    assert (on_grid.grid.cols, on_grid.grid.rows) == (2, 2)


def test_blip2_and_blip_prepare_one_image_of_the_grids_size(loaded, frames, monkeypatch):
    for family in ("blip2", "blip"):
        model = loaded[family]
        seen: list = []
        real = model.processor

        class Spy:
            """The processor, recording the images it is given."""

            def __call__(self, images=None, **kw):
                seen.append(images)
                return real(images=images, **kw)

            def __getattr__(self, name):
                return getattr(real, name)
        monkeypatch.setattr(model, "processor", Spy())
        one = model.prepare(frames[0], "what is there?")
        many = model.prepare(frames, "what is there?")
        assert isinstance(seen[0], Image.Image) and seen[0].size == (48, 40)
        assert isinstance(seen[1], Image.Image) and seen[1].size == (2 * 48, 2 * 40), family   # the last frame's tiles
        assert seen[1].getpixel((10, 10))[0] > 150 and seen[1].getpixel((48 + 10, 10))[1] > 150   # red, then green
        assert seen[1].getpixel((48 + 10, 40 + 10)) == (0, 0, 0)                                  # no fourth frame
        assert (many.model_images, many.images) == (1, 3) and (many.grid.cols, many.grid.rows) == (2, 2)
        note = _tokens(GRID_NOTE) if family == "blip2" else 0   # BLIP's prompt is a caption's prefix: no sentence
        assert many.length == one.length + note, family
        monkeypatch.undo()


def test_each_image_is_held_to_the_pixel_limit_before_any_is_decoded(loaded, frames):
    from vision_host.serve.models.base import BadImage, ImageTooLarge
    big = _jpeg(COLORS[3], (200, 200))
    with pytest.raises(ImageTooLarge, match=r"image 2 of 3: the image is 200×200 pixels"):
        loaded["llava"].prepare([frames[0], big, frames[2]], "what?", max_pixels=10_000)
    with pytest.raises(BadImage, match="image 3 of 3: Failed to load image"):
        loaded["blip2"].prepare([frames[0], frames[1], b"not an image"], "what?")
    cut = frames[1][:len(frames[1]) // 2]   # a JPEG whose header reads but whose data ends early
    for family in ("blip2", "llava"):
        with pytest.raises(BadImage, match="image 2 of 3: Failed to load image"):
            loaded[family].prepare([frames[0], cut, frames[2]], "what?")


# -- over HTTP, with the official clients --------------------------------------------------------------
def test_llava_sees_every_frame_through_ollama_and_openai(llava_server, frames):
    url, name = llava_server, "tiny-llava"
    client = ollama.Client(host=url)
    one = client.generate(model=name, prompt="what is there?", images=[frames[0]], stream=False,
                          options={"num_predict": 6})
    before = _stats(url)
    whole = client.generate(model=name, prompt="what is there?", images=frames, stream=False,
                            options={"num_predict": 6})
    assert whole.done and whole.response.strip()
    assert whole.prompt_eval_count == one.prompt_eval_count + 2 * IMAGE_TOKENS + _tokens(FRAMES_NOTE)
    assert _counted(before, _stats(url)) == (3, 3, 0)

    parts = list(client.generate(model=name, prompt="what is there?", images=frames, stream=True,
                                 options={"num_predict": 6}))
    assert "".join(p.response for p in parts).strip() == whole.response   # greedy either way
    reply = client.chat(model=name, messages=[{"role": "user", "content": "what is there?", "images": frames}],
                        stream=False, options={"num_predict": 6})
    assert reply.message.content == whole.response and reply.prompt_eval_count == whole.prompt_eval_count

    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    before = _stats(url)
    done = oai.chat.completions.create(model=name, messages=_oai_messages("what is there?", frames), max_tokens=6)
    assert done.choices[0].message.content == whole.response
    assert done.usage.prompt_tokens == whole.prompt_eval_count
    assert _counted(before, _stats(url)) == (3, 3, 0)
    # beam search keeps each row's frames together
    beams = client.generate(model=name, prompt="what is there?", images=frames, stream=False,
                            options={"num_predict": 4, "num_beams": 2})
    assert beams.done and beams.prompt_eval_count == whole.prompt_eval_count


def test_llava_batches_frames_only_with_as_many_and_answers_as_alone(llava_server, frames):
    url, name = llava_server, "tiny-llava"
    cases = [(frames, "what is there?"), ([frames[0]], "what is there?"), (frames[::-1], "is there a man?"),
             ([frames[1]], "describe this image"), (frames[:2], "what?"), (frames, "what?")]
    barrier = threading.Barrier(len(cases))
    answers: list = [None] * len(cases)

    def one(i: int) -> None:
        images, prompt = cases[i]
        barrier.wait(10)
        try:
            answers[i] = ollama.Client(host=url).generate(model=name, prompt=prompt, images=images, stream=False,
                                                          options={"num_predict": 8}).response
        except Exception as exc:  # noqa: BLE001 — reported below
            answers[i] = exc
    before = _stats(url)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_WAIT_S)
    assert all(isinstance(a, str) for a in answers), answers
    after = _stats(url)
    assert _counted(before, after) == (3 + 1 + 3 + 1 + 2 + 3, 13, 0)
    client = ollama.Client(host=url)
    alone = [client.generate(model=name, prompt=p, images=im, stream=False, options={"num_predict": 8}).response
             for im, p in cases]
    assert answers == alone


def test_a_format_holds_with_several_frames(llava_server, blip2_server, frames):
    for url, name in ((llava_server, "tiny-llava"), (blip2_server, "tiny-blip2")):
        client = ollama.Client(host=url)
        answer = client.generate(model=name, prompt="how many people?", images=frames, format=SCHEMA,
                                 stream=False, options={"num_predict": 40}).response
        jsonschema.validate(json.loads(answer), SCHEMA)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}
        done = oai.chat.completions.create(model=name, messages=_oai_messages("who is there?", frames),
                                           max_tokens=40, response_format=fmt)
        jsonschema.validate(json.loads(done.choices[0].message.content), SCHEMA)


def test_blip2_answers_several_frames_on_a_grid(blip2_server, frames):
    url, name = blip2_server, "tiny-blip2"
    client = ollama.Client(host=url)
    one = client.generate(model=name, prompt="what is there?", images=[frames[0]], stream=False,
                          options={"num_predict": 6})
    before = _stats(url)
    whole = client.generate(model=name, prompt="what is there?", images=frames, stream=False,
                            options={"num_predict": 6})
    assert whole.done and whole.response.strip()
    assert whole.prompt_eval_count == one.prompt_eval_count + _tokens(GRID_NOTE)   # one image's tokens, the sentence
    assert _counted(before, _stats(url)) == (3, 1, 1)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    done = oai.chat.completions.create(model=name, messages=_oai_messages("what is there?", frames), max_tokens=6)
    assert done.choices[0].message.content == whole.response


def test_too_many_images_are_refused_in_each_apis_shape(llava_server, blip2_server):
    """``--max-images 4`` on the LLaVA server, the default 8 on the BLIP-2 one: one more is 400."""
    five = [_jpeg(c) for c in COLORS]
    b64 = [base64.b64encode(im).decode() for im in five]
    needle = "above this server's limit of 4 per request (--max-images)"
    bodies = {"/api/generate": {"model": "tiny-llava", "prompt": "what?", "images": b64, "stream": False},
              "/api/chat": {"model": "tiny-llava", "stream": False,
                            "messages": [{"role": "user", "content": "what?", "images": b64}]},
              "/v1/chat/completions": {"model": "tiny-llava", "messages": _oai_messages("what?", five)}}
    for path, body in bodies.items():
        r = requests.post(llava_server + path, json=body, timeout=_WAIT_S)
        message = test_serve._assert_error(r, 400, needle)
        assert message.startswith("the request has 5 images"), message
    client = ollama.Client(host=llava_server)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny-llava", prompt="what?", images=five)
    assert err.value.status_code == 400 and "--max-images" in err.value.error
    with pytest.raises(openai.BadRequestError) as oerr:
        openai.OpenAI(base_url=llava_server + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="tiny-llava", messages=_oai_messages("what?", five), max_tokens=4)
    assert "--max-images" in oerr.value.body["message"] and oerr.value.body["type"] == "invalid_request_error"
    assert client.generate(model="tiny-llava", prompt="what?", images=five[:4], stream=False,
                           options={"num_predict": 2}).done   # at the limit: answered
    assert _stats(llava_server)["max_images"] == 4

    nine = five + five[:4]
    r = requests.post(blip2_server + "/api/generate", json={"model": "tiny-blip2", "prompt": "what?", "stream": False,
                                                            "images": [base64.b64encode(im).decode() for im in nine]},
                      timeout=_WAIT_S)
    test_serve._assert_error(r, 400, "the request has 9 images, above this server's limit of 8 per request")
    before = _stats(blip2_server)
    done = ollama.Client(host=blip2_server).generate(model="tiny-blip2", prompt="what?", images=nine[:8],
                                                     stream=False, options={"num_predict": 2})
    assert done.done and _counted(before, _stats(blip2_server)) == (8, 1, 1)


def test_the_max_images_flag_is_checked_at_start(model_dirs):
    import subprocess
    r = subprocess.run(test_serve._serve_cmd("--model", str(model_dirs["blip"]), "--port",
                                             str(test_serve._free_port()), "--max-images", "0"),
                       env=test_serve._env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--max-images" in r.stderr and "Traceback" not in r.stderr, r.stderr
