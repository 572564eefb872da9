"""The live viewer page (``host/vision_host/viewer.html``) in a real headless Chromium.

A real ``vision-host run -p ollama`` on the shipped clip serves the page; the stand-in Ollama
server answers the captions and records what the page's controls changed. Chromium is
Debian's ``/usr/bin/chromium`` driven by Playwright (``pip install playwright``; no
``playwright install``: the browser is the system one). Skipped only when either is missing.

Artifacts: full-page screenshots go to the test's ``tmp_path`` and, when
``$VISION_HOST_ARTIFACTS`` is set, are copied into that folder as well.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from conftest import SAMPLE_CLIP, missing_system_package
from ollama_standin import OllamaStandin, default_caption
from run_process import RunProcess, free_port, wait_for

pytestmark = pytest.mark.slow   # starts Chromium: the page is checked in the full run

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CAPTION = re.compile(r"a 640x360 scene with mean brightness \d+")
NEW_PROMPT = "Count the bottles on the table, in five words."
DEFAULT_PROMPT = "Describe what is in this picture in highly complimentary terms using 6 words or less."


def _save_artifact(path: Path) -> Path | None:
    """Copy ``path`` into ``$VISION_HOST_ARTIFACTS`` when it is set; returns the copy."""
    folder = os.environ.get("VISION_HOST_ARTIFACTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, Path(folder) / path.name))


def _local_only(urls: list[str], base: str) -> list[str]:
    """The URLs that went anywhere but ``base`` (data: and blob: URLs never leave the page)."""
    return [u for u in urls if not u.startswith((base + "/", "data:", "blob:"))]


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(missing_system_package("chromium"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def captioned_run(browser):
    """One stream of the shipped clip (40 s, paced) with captions every second from the stand-in."""
    standin = OllamaStandin(latency_s=0.5, models=["llava:latest", "moondream:latest"])
    replies: list[str] = []

    def reply(prompt: str, jpeg: bytes | None) -> str:
        text = default_caption(prompt, jpeg)
        replies.append(text)
        return text

    standin.reply = reply
    standin.replies = replies
    port = free_port()
    run = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f":{port}",
                "-c", f"ollama-url={standin.url}", "-c", "ollama-interval-ms=1000"], port)
    try:
        run.wait_until_serving()
        run.standin = standin
        yield run
    finally:
        run.stop()
        standin.stop()


@pytest.fixture(scope="module")
def page(browser, captioned_run):
    """The viewer open on ``captioned_run``; ``page.urls`` lists every URL it requested."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.urls = []
    page.errors = []
    page.on("request", lambda r: page.urls.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(captioned_run.base + "/")
    try:
        yield page
    finally:
        context.close()


def _generate_requests(standin: OllamaStandin, after: float = 0.0) -> list:
    return [r for r in standin.requests if r.path == "/api/generate" and r.arrived > after]


def _wait_status(page, kind: str = "ok") -> str:
    page.wait_for_selector(f'#control-status[data-kind="{kind}"]')
    return page.inner_text("#control-status")


# -- the page on loopback ----------------------------------------------------------------------
@pytest.mark.slow
def test_the_page_shows_moving_video_and_requests_nothing_from_elsewhere(page, captioned_run):
    img = page.locator('[data-stream="0"] img')
    page.wait_for_function("document.querySelector('[data-stream=\"0\"] img').naturalWidth > 0")
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [640, 360]
    assert img.get_attribute("src") == "/stream/0"
    first = cv2.imdecode(np.frombuffer(img.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    time.sleep(1.0)
    second = cv2.imdecode(np.frombuffer(img.screenshot(), np.uint8), cv2.IMREAD_COLOR)
    assert first.shape == second.shape and first.shape[0] > 100
    assert np.abs(first.astype(int) - second).mean() > 1.0, "the video did not move in 1 s"

    page.wait_for_selector('#connection[data-status="connected"]')
    assert page.locator('[data-stream="0"] .badge').inner_text() == "live"
    assert page.inner_text('#stats [data-stat="fps"]') not in ("", "–")
    assert page.urls and not _local_only(page.urls, captioned_run.base), page.urls
    assert not page.errors


def test_a_caption_appears_in_the_history_when_the_vision_server_answers(page, captioned_run):
    standin = captioned_run.standin
    shown = page.locator("#captions li").count()
    # a caption pushed over the event stream after the page loaded
    page.wait_for_function(f"document.querySelectorAll('#captions li').length > {shown}", timeout=8_000)
    newest = page.locator("#captions li").first
    text = newest.locator(".text").inner_text()
    assert CAPTION.fullmatch(text), text
    assert text in standin.replies
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", newest.locator("time").inner_text())
    assert re.match(r"0\.\d s", newest.locator(".meta").inner_text())   # latency ≈ 0.5 s, one decimal
    ids = [int(i) for i in page.locator("#captions li").evaluate_all("els => els.map(e => e.dataset.id)")]
    assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids)), "newest first, each once"


def test_the_fields_show_the_values_in_force_when_nobody_set_them(page, captioned_run):
    """The run sets no model and no prompt: the fields show the ollama processor's own
    defaults (they live in its Zig source; it reports them in the state's `in_force`), not
    "default"; the interval given with -c shows as given; a removed key shows its default."""
    page.wait_for_function("document.querySelector('#model').value !== ''")
    assert page.input_value("#model") == "llava"
    assert page.get_attribute("#model", "data-source") == "processor"
    assert "not set" in page.get_attribute("#model", "title")
    assert page.input_value("#prompt") == DEFAULT_PROMPT
    assert page.input_value("#interval") == "1000"
    assert page.get_attribute("#interval", "data-source") == "config"
    assert not page.is_checked("#pause")

    base = captioned_run.base
    try:
        assert requests.post(base + "/api/config", json={"set": {"ollama-interval-ms": ""}}, timeout=5).ok
        page.wait_for_function("document.querySelector('#interval').value === '3000'")
        assert page.get_attribute("#interval", "data-source") == "processor"
    finally:
        assert requests.post(base + "/api/config", json={"set": {"ollama-interval-ms": "1000"}}, timeout=5).ok
    page.wait_for_function("document.querySelector('#interval').value === '1000'")
    assert not page.errors


@pytest.mark.slow
def test_a_prompt_and_a_model_changed_in_the_page_reach_the_next_requests(page, captioned_run):
    standin = captioned_run.standin
    page.fill("#prompt", "x" * 5000)              # the server refuses it: its sentence is shown
    page.click("#apply-prompt")
    assert "prompt not applied: config value of ollama-prompt" in _wait_status(page, "error")
    assert "ollama-prompt" not in requests.get(captioned_run.base + "/api/config", timeout=5).json()["config"]

    page.fill("#prompt", NEW_PROMPT)
    page.click("#apply-prompt")
    assert "prompt applied" in _wait_status(page)
    applied = time.monotonic()
    later = wait_for(lambda: _generate_requests(standin, applied + 0.2), 5, "a caption request after the change")
    assert later[0].body["prompt"] == NEW_PROMPT
    assert requests.get(captioned_run.base + "/api/config?stream=0", timeout=5).json()["config"]["ollama-prompt"] \
        == NEW_PROMPT

    page.fill("#model", "moondream")
    page.press("#model", "Enter")
    assert "model applied" in _wait_status(page)
    applied = time.monotonic()
    later = wait_for(lambda: _generate_requests(standin, applied + 0.2), 5, "a caption request after the model change")
    assert later[0].body["model"] == "moondream"
    assert later[0].body["prompt"] == NEW_PROMPT
    # the controls keep what the server holds
    page.wait_for_timeout(1200)   # a state event or two
    assert page.input_value("#prompt") == NEW_PROMPT
    assert page.input_value("#model") == "moondream"
    assert page.get_attribute("#model", "data-source") == "config"
    assert all(r.body["prompt"] == NEW_PROMPT for r in _generate_requests(standin, applied + 0.2))


@pytest.mark.slow
def test_pause_stops_caption_requests_and_resume_brings_them_back(page, captioned_run):
    standin = captioned_run.standin
    page.check("#pause")
    assert "pause applied" in _wait_status(page)
    paused = time.monotonic()
    time.sleep(3.3)
    assert not _generate_requests(standin, paused + 0.3), "a caption request arrived while paused"
    assert page.is_checked("#pause")
    assert page.locator('#stats [data-stat="paused"]').count() == 1

    page.uncheck("#pause")
    assert "resume applied" in _wait_status(page)
    resumed = time.monotonic()
    wait_for(lambda: _generate_requests(standin, resumed), 3, "a caption request after resuming")
    assert not page.is_checked("#pause")


def test_snapshot_downloads_a_png_of_the_stream(page, tmp_path):
    with page.expect_download() as info:
        page.click("#snapshot")
    download = info.value
    assert re.fullmatch(r"vision-host-0-\d{8}-\d{6}\.png", download.suggested_filename), download.suggested_filename
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    data = saved.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.shape == (360, 640, 3)


def test_full_page_screenshot(page, captioned_run, tmp_path):
    page.wait_for_selector("#captions li")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert cv2.imread(str(shot)).shape[1] == 1400
    copy = _save_artifact(shot)
    print(f"viewer screenshot: {shot}" + (f" (copied to {copy})" if copy else ""))
    # everything the page asked for over the whole module came from the vision-host server
    assert not _local_only(page.urls, captioned_run.base), page.urls
    assert not page.errors


# -- beyond loopback: the token ------------------------------------------------------------------
@pytest.mark.slow
def test_a_non_loopback_bind_needs_the_printed_token_and_the_page_works_with_it(browser, tmp_path):
    standin = OllamaStandin(latency_s=0.3)
    port = free_port()
    run = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-s", str(SAMPLE_CLIP), "-d", f"0.0.0.0:{port}",
                "-c", f"ollama-url={standin.url}", "-c", "ollama-interval-ms=1000"], port)
    context = None
    try:
        found = wait_for(lambda: re.search(rf"http://\S+:{port}/\?token=(\S+)", run.stderr), 30,
                      "the viewer's address with its token on stderr")
        token = found.group(1)
        run.wait_until_serving()
        base = run.base

        for path in ("/", "/api/state", "/stream/0", "/api/captions", "/snapshot/0.png"):
            resp = requests.get(base + path, timeout=5, stream=True)
            assert resp.status_code == 401, (path, resp.status_code)
            assert "token" in resp.json()["error"]
            resp.close()
        assert requests.get(base + "/api/state?token=wrong" + token, timeout=5).status_code == 401
        resp = requests.post(base + "/api/config", json={"set": {"ollama-paused": "true"}}, timeout=5)
        assert resp.status_code == 401
        assert requests.get(f"{base}/api/config?stream=0&token={token}", timeout=5).json()["config"].get(
            "ollama-paused") in (None, "false"), "a POST without the token changed nothing"
        ok = requests.get(base + "/api/state", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert ok.status_code == 200 and len(ok.json()["streams"]) == 2
        assert not any(h.lower().startswith("access-control-") for h in ok.headers)
        foreign = requests.post(f"{base}/api/config?token={token}", json={"set": {"ollama-paused": "true"}},
                                headers={"Origin": "http://evil.example"}, timeout=5)
        assert foreign.status_code == 403 and "error" in foreign.json()

        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(10_000)
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(f"{base}/?token={token}")
        page.wait_for_function("[...document.querySelectorAll('#streams img')].length === 2 && "
                               "[...document.querySelectorAll('#streams img')].every(i => i.naturalWidth === 640)")
        page.wait_for_selector('#connection[data-status="connected"]')
        assert page.locator("#stats .stream-stats").count() == 2
        assert page.locator('[data-stream="1"] .badge').inner_text() == "live"
        assert page.is_visible("#stream-select")
        assert page.locator("#stream-select option").all_inner_texts() == ["all streams", "0", "1"]
        assert page.input_value("#stream-select") == "all"
        page.check("#pause")                        # "all streams": one POST without a stream
        assert "pause applied for all streams" in _wait_status(page)
        for index in (0, 1):
            config = requests.get(f"{base}/api/config?stream={index}&token={token}", timeout=5).json()["config"]
            assert config["ollama-paused"] == "true", (index, config)
        page.uncheck("#pause")
        assert "resume applied for all streams" in _wait_status(page)
        page.wait_for_selector("#captions li .stream", timeout=8_000)   # two streams: each entry names its stream
        shot = tmp_path / "viewer-two-streams.png"
        page.screenshot(path=str(shot), full_page=True)
        _save_artifact(shot)
        assert urls and not _local_only(urls, base), urls
        assert all(f"token={token}" in u for u in urls if u.startswith("http")), urls

        # the page's own message when its token is not (or no longer) accepted
        html = requests.get(f"{base}/?token={token}", timeout=5).content
        stale = context.new_page()
        stale.route(f"{base}/?token=stale", lambda route: route.fulfill(
            status=200, content_type="text/html; charset=utf-8", body=html))
        stale.goto(f"{base}/?token=stale")
        stale.wait_for_selector("#auth.shown")
        assert "needs the token printed at its start: open /?token=" in stale.inner_text("#auth")
        assert stale.locator('#connection[data-status="disconnected"]').count() == 1
        stale.close()

        # the server goes away: the page says so (its EventSource keeps trying by itself)
        run.stop()
        page.wait_for_selector('#connection[data-status="disconnected"]', timeout=15_000)
    finally:
        if context is not None:
            context.close()
        run.stop()
        standin.stop()
