"""The caption history in the viewer (``/api/history``, its thumbnails, and the page's History
panel), against a real ``vision-host run -p ollama`` on the shipped clip that records its history
to a file of the test's own, with the Ollama stand-in answering a cycle of known captions.

The page is driven in the system Chromium by Playwright, with test_viewer_browser.py's fixture
(skipped only when either is missing).
"""

from __future__ import annotations

import itertools
import re
import threading
from datetime import datetime, timedelta, timezone

import cv2
import numpy as np
import pytest
import requests

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for
from test_viewer_browser import _save_artifact, browser  # noqa: F401 - the Chromium fixture, shared

pytestmark = pytest.mark.slow   # each module starts a run of the clip

#: What the stand-in answers, in turn; the last one is hostile to a page that would parse it.
REPLIES = ["a red bicycle leans on the wall", "two green bottles on a wooden table", "a sleepy cat on the sofa",
           '<img src=x onerror="window.hacked=1"> a zebra & "quotes"']
EVENT_KEYS = {"id", "kind", "time", "stream", "stream_name", "text", "fields", "alert", "state", "reason",
              "thumbnail", "recording_time_s"}
TOKEN = "history-test-token"


@pytest.fixture(scope="module")
def history_run(tmp_path_factory):
    """One stream of the clip, captions every 0.3 s cycling through :data:`REPLIES`, an alert
    rule on "bicycle", the history in a file of its own; served on a free loopback port."""
    standin = OllamaStandin(latency_s=0.1)
    turn = itertools.cycle(REPLIES)
    lock = threading.Lock()

    def reply(prompt: str, jpeg: bytes | None) -> str:
        with lock:
            return next(turn)

    standin.reply = reply
    history = tmp_path_factory.mktemp("history") / "history.sqlite3"
    port = free_port()
    run = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-o", "mjpeg", "-d", f"127.0.0.1:{port}",
                      "-c", f"ollama-url={standin.url}", "-c", "ollama-interval-ms=300",
                      "--alert", 'bike=text.contains("bicycle")', "--history", str(history)], port)
    try:
        run.wait_until_serving()
        run.history = history
        # every reply stored (with its thumbnail) at least once, and an alert edge
        wait_for(lambda: {e["text"] for e in _events(run, limit=500) if e["kind"] == "caption"} >= set(REPLIES)
                 and any(e["kind"] == "alert" for e in _events(run, limit=500)), 30,
                 "every reply and an alert edge in /api/history")
        yield run
    finally:
        run.stop()
        standin.stop()


def _get(run, path: str, **params) -> requests.Response:
    return requests.get(run.base + path, params=params, timeout=10)


def _events(run, **params) -> list[dict]:
    resp = _get(run, "/api/history", **params)
    assert resp.status_code == 200, resp.text
    return resp.json()["events"]


def _newest_first(events: list[dict]) -> bool:
    keys = [(e["time"], e["id"]) for e in events]
    return keys == sorted(keys, reverse=True)


# -- /api/history --------------------------------------------------------------------------------
def test_the_history_lists_events_newest_first_with_thumbnails_and_the_time_in_the_recording(history_run):
    events = _events(history_run)
    assert 1 <= len(events) <= 100 and _newest_first(events)
    assert all(set(e) == EVENT_KEYS for e in events), events[0]
    captions = [e for e in events if e["kind"] == "caption"]
    assert captions and all(e["text"] in REPLIES for e in captions)
    for e in captions:
        assert e["stream"] == 0 and e["stream_name"] == "0"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"])
        assert e["thumbnail"] == f"/api/history/{e['id']}/thumbnail.jpg"
        assert e["alert"] is None and e["state"] is None and e["reason"] is None
        assert isinstance(e["recording_time_s"], float) and 0 <= e["recording_time_s"] < 60
    # the position in the output video grows with the wall time
    by_time = sorted(captions, key=lambda e: e["time"])
    assert [e["recording_time_s"] for e in by_time] == sorted(e["recording_time_s"] for e in by_time)

    alerts = [e for e in _events(history_run, limit=500) if e["kind"] == "alert"]
    assert alerts[0]["alert"] == "bike" and alerts[0]["state"] in ("ON", "OFF")
    assert alerts[0]["thumbnail"] is None and alerts[0]["recording_time_s"] is None and alerts[0]["text"] == ""


def test_a_thumbnail_is_the_captioned_frame_as_a_small_jpeg(history_run):
    caption = next(e for e in _events(history_run) if e["kind"] == "caption")
    resp = _get(history_run, caption["thumbnail"])
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/jpeg"
    assert resp.headers["cache-control"] == "private, max-age=3600"
    image = cv2.imdecode(np.frombuffer(resp.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (90, 160, 3)            # the 640x360 clip, longer side 160 px
    assert image.mean() > 5                       # a frame of the clip, not a black box


@pytest.mark.parametrize("path, status, message", [
    ("/api/history/999999999/thumbnail.jpg", 404, "there is no event 999999999 in the caption history"),
    ("/api/history/abc/thumbnail.jpg", 404, "ids are whole numbers"),
    ("/api/history/1234567890123456789012/thumbnail.jpg", 404, "ids are whole numbers"),
])
def test_an_unknown_thumbnail_is_404_with_a_sentence(history_run, path, status, message):
    resp = _get(history_run, path)
    assert resp.status_code == status
    assert message in resp.json()["error"]


def test_an_alert_edge_has_no_thumbnail(history_run):
    alert = next(e for e in _events(history_run, limit=500) if e["kind"] == "alert")
    resp = _get(history_run, f"/api/history/{alert['id']}/thumbnail.jpg")
    assert resp.status_code == 404 and "has no thumbnail" in resp.json()["error"]


def test_search_finds_every_word_and_the_filters_narrow_it(history_run):
    found = _events(history_run, q="bottles")
    assert found and all(e["text"] == REPLIES[1] for e in found) and _newest_first(found)
    assert all(e["text"] == REPLIES[1] for e in _events(history_run, q="WOODEN Bottles"))   # any order, any case
    assert _events(history_run, q="bottles cat") == []                                      # every word must occur
    assert {e["text"] for e in _events(history_run, q="zebra")} == {REPLIES[3]}
    assert len(_events(history_run, q="bottles", limit=1)) == 1
    assert len(_events(history_run, limit=2)) == 2

    assert _events(history_run, stream="0")                 # an index (also the name of the only stream)
    assert _events(history_run, stream="nosuch") == []
    unfiltered = _events(history_run, stream="", q="  ", since="", until="", limit=500)   # empty is none
    assert {e["kind"] for e in unfiltered} == {"caption", "alert"} and _newest_first(unfiltered)

    assert _events(history_run, since="1h", q="cat")
    assert _events(history_run, since="2020-01-01T00:00:00Z", q="cat")
    future = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _events(history_run, since=future) == []
    assert _events(history_run, until="2020-01-01") == []
    first = min(_events(history_run, limit=500), key=lambda e: (e["time"], e["id"]))
    assert all(e["time"] <= first["time"] for e in _events(history_run, until=first["time"], limit=500))


@pytest.mark.parametrize("params, message", [
    ({"limit": "0"}, "limit must be a whole number from 1 to 500"),
    ({"limit": "501"}, "limit must be a whole number from 1 to 500"),
    ({"limit": "ten"}, "limit must be a whole number from 1 to 500"),
    ({"limit": ""}, "limit must be a whole number from 1 to 500"),
    ({"limit": "-1"}, "limit must be a whole number from 1 to 500"),
    ({"since": "yesterday"}, "since 'yesterday' is not a time: give a duration before now"),
    ({"until": "12:99"}, "until '12:99' is not a time"),
    ({"since": "0001-01-01"}, None),   # a time the platform may not hold: 200 or a sentence, never 500
    ({"since": "1h", "until": "2h"}, "since is later than until"),
    ({"q": "x" * 501}, "q is 501 characters long: give at most 500"),
    ({"stream": "s" * 201}, "stream is 201 characters long: give at most 200"),
    ({"since": "9" * 65}, "since is 65 characters long: give at most 64"),
])
def test_bad_parameters_get_400_with_a_sentence(history_run, params, message):
    resp = _get(history_run, "/api/history", **params)
    if message is None:
        assert resp.status_code in (200, 400), resp.text
        return
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert message in resp.json()["error"]


@pytest.mark.parametrize("q", ['"', 'bottles"', "NEAR(bottles cat)", "*", "bott*", "-bottles", "bottles OR cat",
                               "AND", "'; DROP TABLE events; --", "\x00", "bottles\x00", "^bottles", "text:bottles",
                               "{text}: cat", "(", "\u202e\U0001F600 zebra", "%s%n", "a" * 500])
def test_hostile_searches_are_words_never_an_error(history_run, q):
    resp = _get(history_run, "/api/history", q=q)
    assert resp.status_code == 200, resp.text
    texts = {e["text"] for e in resp.json()["events"]}
    if q in ("bottles OR cat", "NEAR(bottles cat)"):
        assert texts == set()                  # "or" / "near" are words no caption holds
    if q in ('bottles"', "bottles\x00", "^bottles"):
        assert texts <= {REPLIES[1]}
    # the history is still whole
    assert {e["text"] for e in _events(history_run, limit=500) if e["kind"] == "caption"} >= set(REPLIES)


def test_a_search_that_is_not_utf8_is_searched_as_replacement_characters(history_run):
    resp = requests.get(history_run.base + "/api/history?q=%ED%A0%80%FF&stream=%C0", timeout=10)
    assert resp.status_code == 200 and resp.json() == {"events": []}


def test_the_history_answers_with_the_events_even_while_the_run_writes(history_run):
    """Readers never wait for the recorder: many searches at once all answer."""
    results: list[int] = []

    def search() -> None:
        results.append(_get(history_run, "/api/history", q="cat", limit="500").status_code)

    threads = [threading.Thread(target=search) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [200] * 12


# -- no history, and the token -------------------------------------------------------------------
def test_a_run_without_history_says_so_and_every_route_needs_the_token():
    port = free_port()
    run = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"127.0.0.1:{port}", "--token", TOKEN,
                      "-c", "ollama-url=http://127.0.0.1:9", "--no-history"], port)
    try:
        run.wait_until_serving()
        for path in ("/api/history", "/api/history?q=cat", "/api/history/1/thumbnail.jpg"):
            resp = requests.get(run.base + path, timeout=5)
            assert resp.status_code == 401, (path, resp.status_code)
            assert "token" in resp.json()["error"]
            assert requests.get(run.base + path + ("&" if "?" in path else "?") + "token=wrong" + TOKEN,
                                timeout=5).status_code == 401
        for path in ("/api/history", "/api/history/1/thumbnail.jpg"):
            resp = requests.get(run.base + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
            assert resp.status_code == 404, (path, resp.text)
            assert "this run keeps no caption history" in resp.json()["error"]
            assert "--no-history" in resp.json()["error"]
        resp = requests.get(run.base + "/api/history", params={"token": TOKEN, "limit": "0"}, timeout=5)
        assert resp.status_code == 400             # parameters are checked before the store is opened
    finally:
        run.stop()


def test_a_history_file_that_cannot_be_read_is_503_without_the_servers_paths(tmp_path):
    broken = tmp_path / "not-a-database.sqlite3"
    broken.write_bytes(b"this is not SQLite " * 100)
    port = free_port()
    run = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"127.0.0.1:{port}",
                      "-c", "ollama-url=http://127.0.0.1:9", "--history", str(broken)], port)
    try:
        run.wait_until_serving()
        for path in ("/api/history?q=cat", "/api/history/1/thumbnail.jpg"):
            resp = requests.get(run.base + path, timeout=5)
            assert resp.status_code == 503, (path, resp.text)
            error = resp.json()["error"]
            assert "the caption history cannot be read now: the server's log says why" in error
            assert str(tmp_path) not in error
        wait_for(lambda: "the viewer cannot read the caption history" in run.stderr, 10, "the reason in the log")
        assert "is not a SQLite database" in run.stderr
    finally:
        run.stop()


# -- the page ------------------------------------------------------------------------------------
def test_the_page_searches_the_history_and_shows_a_caption_with_its_frame(browser, history_run, tmp_path):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        urls: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: urls.append(r.url))
        page.goto(history_run.base + "/")
        page.wait_for_selector("#history-list .history-item")         # the timeline at load

        page.fill("#history-q", "wooden")                              # typed: searched after a pause
        page.wait_for_function("document.querySelectorAll('#history-list .history-item').length > 0 && "
                               "[...document.querySelectorAll('#history-list .history-item .text')]"
                               ".every(t => t.textContent === 'two green bottles on a wooden table')")
        item = page.locator("#history-list .history-item").first
        thumb = item.locator("img")
        page.wait_for_function("document.querySelector('#history-list .history-item img').naturalWidth === 160")
        assert re.fullmatch(r"/api/history/\d+/thumbnail\.jpg", thumb.get_attribute("src"))
        assert page.locator("#history-list .history-hour").count() >= 1
        assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", item.locator("time").inner_text())

        item.click()
        detail = page.locator("#history-detail")
        detail.wait_for(state="visible")
        assert detail.locator(".text").inner_text() == REPLIES[1]
        page.wait_for_function("document.querySelector('#history-detail img').naturalWidth === 160")
        assert re.search(r"at \d+:\d\d\.\d in the recording", detail.locator(".recording").inner_text())
        shot = tmp_path / "viewer-history.png"
        page.screenshot(path=str(shot), full_page=True)
        _save_artifact(shot)

        # a caption holding markup is shown as text, never parsed
        page.fill("#history-q", "zebra")
        page.press("#history-q", "Enter")
        page.wait_for_function("[...document.querySelectorAll('#history-list .history-item .text')]"
                               ".some(t => t.textContent.startsWith('<img src=x'))")
        page.locator("#history-list .history-item").first.click()
        page.wait_for_function("document.querySelector('#history-detail .text').textContent.includes('zebra')")
        assert page.locator("#history-detail .text").inner_text() == REPLIES[3]
        assert page.locator('#history img[src="x"]').count() == 0
        assert page.evaluate("window.hacked") is None

        page.fill("#history-q", "nothing matches these words")
        page.press("#history-q", "Enter")
        page.wait_for_selector("#history-status:has-text('No events')")
        assert page.locator("#history-list .history-item").count() == 0
        assert all(u.startswith((history_run.base + "/", "data:")) for u in urls), urls
        assert not errors, errors
    finally:
        context.close()
