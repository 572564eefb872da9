"""Prometheus ``/metrics``, ``/healthz`` and ``/readyz``: a real ``vision-host run -o mjpeg``
(the ``ollama`` processor on the shipped clip, paced, against the Ollama stand-in) scraped
over HTTP and parsed with prometheus-client's own text parser, and ``vision-host serve``'s
``/metrics`` after a real request to a tiny BLIP."""

from __future__ import annotations

import base64

import cv2
import pytest
import requests
from prometheus_client import parser as prometheus_parser

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for


class Run(RunProcess):
    """``vision-host run -p ollama`` on the clip, its viewer on a free port, serving."""

    def __init__(self, ollama_url: str, *extra: str):
        port = free_port()
        super().__init__(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"127.0.0.1:{port}",
                          "-c", f"ollama-url={ollama_url}", "-c", "ollama-interval-ms=300", *extra], port)
        self.wait_until_serving()


def scrape(base: str, headers: dict | None = None) -> dict[str, dict[tuple, float]]:
    """``/metrics`` parsed: sample name → {sorted label items: value}."""
    reply = requests.get(base + "/metrics", headers=headers or {}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[str, dict[tuple, float]] = {}
    for family in prometheus_parser.text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
def standin():
    server = OllamaStandin(latency_s=0.2, token_delay_s=0.005)
    yield server
    server.stop()


@pytest.fixture
def run(standin, tmp_path):
    r = Run(standin.url, "--history", str(tmp_path / "history.sqlite3"))
    yield r
    r.stop()


@pytest.mark.slow
def test_metrics_move_while_the_run_goes_on(run):
    first = wait_for(lambda: (m := scrape(run.base)) and value(m, "vision_host_caption_latency_seconds_count",
                                                                  stream="0") >= 1 and m, 20, "a first caption")
    second = wait_for(lambda: (m := scrape(run.base))
                      and value(m, "vision_host_caption_latency_seconds_count", stream="0")
                      > value(first, "vision_host_caption_latency_seconds_count", stream="0") and m,
                      20, "another caption")
    s = {"stream": "0"}
    sp = {"stream": "0", "processor": "ollama"}
    assert value(second, "vision_host_frames_out_total", **s) > value(first, "vision_host_frames_out_total", **s) > 0
    assert value(second, "vision_host_processor_calls_total", **sp) > value(first, "vision_host_processor_calls_total",
                                                                               **sp)
    # the histograms agree with their counters: every call and every frame gap is in a bucket
    calls = value(second, "vision_host_processor_calls_total", **sp)
    assert value(second, "vision_host_processor_call_duration_seconds_count", **sp) == calls
    assert value(second, "vision_host_processor_call_duration_seconds_bucket", le="+Inf", **sp) == calls
    assert value(second, "vision_host_processor_call_duration_seconds_sum", **sp) > 0
    frames = value(second, "vision_host_frames_out_total", **s)
    assert value(second, "vision_host_frame_gap_seconds_count", **s) in (frames - 1, frames - 2, frames)
    # paced at 29.8 fps: most gaps are between 20 and 40 ms
    gaps_40 = value(second, "vision_host_frame_gap_seconds_bucket", le="0.04", **s)
    gaps_20 = value(second, "vision_host_frame_gap_seconds_bucket", le="0.02", **s)
    assert gaps_40 - gaps_20 > 0.5 * value(second, "vision_host_frame_gap_seconds_count", **s)
    # the stand-in answers in 0.2 s plus its tokens: latencies between 0.1 and 1 s
    assert value(second, "vision_host_caption_latency_seconds_bucket", le="0.1", **s) == 0
    completed = value(second, "vision_host_caption_request_outcomes_total", outcome="completed", **s)
    assert value(second, "vision_host_caption_latency_seconds_bucket", le="1.0", **s) == completed
    assert value(second, "vision_host_caption_requests_total", trigger="interval", **s) >= completed
    assert value(second, "vision_host_caption_fair_share_wait_seconds_count", **s) >= completed
    assert value(second, "vision_host_source_state", state="live", **s) == 1
    assert value(second, "vision_host_source_state", state="reconnecting", **s) == 0
    assert value(second, "vision_host_processor_disabled", **sp) == 0
    assert 20 < value(second, "vision_host_fps", **s) < 40
    # the history sink: its captions delivered, counted under the sink's kind
    sink = next(k for k in second["vision_host_sink_delivered_total"] if ("sink", "history") in k)
    wait_for(lambda: scrape(run.base)["vision_host_sink_delivered_total"][sink] >= 1, 10, "a caption in the history")
    assert ("sink", "history") in next(iter(second["vision_host_sink_queue_depth"]))


@pytest.mark.slow
def test_health_and_readiness_of_a_run_that_captions(run):
    assert requests.get(run.base + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = wait_for(lambda: (r := requests.get(run.base + "/readyz", timeout=5)).status_code == 200 and r, 20,
                     "the run to be ready")
    assert ready.json() == {"status": "ready"}


@pytest.mark.slow
def test_the_readiness_window_is_a_flag(standin):
    """--ready-within-s sets how long a stream may go without a frame: at 1 ms, the paced clip's
    33 ms between frames make the stream not ready, with the window in the reason."""
    run = Run(standin.url, "--no-history", "--ready-within-s", "0.001")
    try:
        body = wait_for(lambda: (r := requests.get(run.base + "/readyz", timeout=5)).status_code == 503
                        and "no frame for" in r.text and r.json(), 20, "a not-ready answer about frames")
        assert body["streams"][0]["reason"].endswith("ready within 0.001 s)")
    finally:
        run.stop()


@pytest.mark.slow
def test_readiness_fails_with_the_reason_when_the_vision_server_is_unreachable(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"          # nothing listens there
    run = Run(closed, "--no-history")
    try:
        assert requests.get(run.base + "/healthz", timeout=5).status_code == 200
        # (a 503 Response is falsy: wait for its JSON)
        body = wait_for(lambda: (r := requests.get(run.base + "/readyz", timeout=5)).status_code == 503
                        and "failed" in r.text and r.json(), 20, "a not-ready answer naming the failed requests")
        assert body["status"] == "not ready" and body["streams"][0]["stream"] == "0"
        assert "not answering" in body["streams"][0]["reason"]
        m = scrape(run.base)
        assert value(m, "vision_host_caption_request_outcomes_total", stream="0", outcome="failed") >= 1
        assert value(m, "vision_host_caption_request_outcomes_total", stream="0", outcome="completed") == 0
        assert value(m, "vision_host_frames_out_total", stream="0") > 0      # the video goes on regardless
    finally:
        run.stop()


@pytest.mark.slow
def test_with_a_token_metrics_need_it_and_health_answers_without_saying_more(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    run = Run(closed, "--no-history", "--token", "s3cret")
    try:
        assert requests.get(run.base + "/metrics", timeout=5).status_code == 401
        assert requests.get(run.base + "/metrics?token=wrong", timeout=5).status_code == 401
        # the stream's counters appear once its source is open and its pipeline runs
        wait_for(lambda: "vision_host_frames_out_total" in scrape(run.base, {"Authorization": "Bearer s3cret"}), 20,
                 "the stream's frame counter, read with the token")
        assert requests.get(run.base + "/healthz", timeout=5).json() == {"status": "ok"}
        # without the token: the verdict only; with it, the reasons too
        anonymous = wait_for(lambda: (r := requests.get(run.base + "/readyz", timeout=5)).status_code == 503
                             and r.json(), 10, "not ready")
        assert anonymous == {"status": "not ready"}
        told = requests.get(run.base + "/readyz", headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert told.status_code == 503 and told.json()["streams"][0]["stream"] == "0"
        # only GET is public; other routes and methods still need the token
        assert requests.post(run.base + "/readyz", timeout=5).status_code == 401
        assert requests.get(run.base + "/api/state", timeout=5).status_code == 401
        # and the Host rule still applies to the public paths
        assert requests.get(run.base + "/healthz", headers={"Host": "evil.example"}, timeout=5).status_code == 421
    finally:
        run.stop()


def test_a_histogram_fed_from_the_newest_samples_bins_each_once_and_counts_what_it_missed():
    from vision_host.metrics import _Binned, _ring_newest

    ring = [0.0] * 4
    for call, us in enumerate([10, 20, 30, 40, 50, 60]):    # calls 4 and 5 overwrote 0 and 1
        ring[call % 4] = us
    assert _ring_newest(ring, 6) == [30, 40, 50, 60] and _ring_newest(ring, 2) == [ring[0], ring[1]]
    hist = _Binned((25e-6, 45e-6))
    hist.feed(2, [10, 20], 1e-6)
    hist.feed(2, [10, 20], 1e-6)                            # nothing new: nothing binned twice
    assert hist.counts == [2, 0, 0] and hist.missed == 0
    hist.feed(8, _ring_newest(ring, 6), 1e-6)               # 6 new, only 4 still kept
    assert hist.counts == [2, 2, 2] and hist.missed == 2 and hist.seen == 8
    assert abs(hist.sum - 210e-6) < 1e-12


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 86_401, True, "10"])
def test_the_readiness_window_is_checked(bad):
    from vision_host.metrics import Readiness

    with pytest.raises(ValueError, match="give a number of seconds above 0 and at most 86400"):
        Readiness(None, None, bad)


# --------------------------------------------------------------------------- vision-host serve


@pytest.mark.slow
def test_serve_metrics_count_a_request_and_its_batch(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import serve_process
    from tiny_models import build_tiny_blip

    model = build_tiny_blip(tmp_path_factory.mktemp("model") / "tiny-blip")
    cap = cv2.VideoCapture(str(SAMPLE_CLIP))
    ok, frame = cap.read()
    cap.release()
    assert ok
    image = base64.b64encode(cv2.imencode(".jpg", frame)[1].tobytes()).decode()
    with serve_process(model, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        before = scrape(url)
        assert value(before, "vision_host_serve_batches_total") == 0
        assert value(before, "vision_host_serve_queue_depth") == 0
        reply = requests.post(url + "/api/generate", json={"model": "tiny-blip", "prompt": "a photo of",
                                                           "images": [image], "stream": False,
                                                           "options": {"num_predict": 3}}, timeout=60)
        assert reply.status_code == 200, reply.text
        bad = requests.post(url + "/api/generate", json={"model": "tiny-blip", "prompt": "x", "images": ["!!!"]},
                            timeout=30)
        assert bad.status_code == 400
        after = scrape(url)
        assert value(after, "vision_host_serve_requests_total", api="ollama", outcome="ok") == 1
        assert value(after, "vision_host_serve_requests_total", api="ollama", outcome="client_error") == 1
        assert value(after, "vision_host_serve_batches_total") == 1
        assert value(after, "vision_host_serve_batch_size_count") == 1
        assert value(after, "vision_host_serve_batch_size_bucket", le="1.0") == 1
        assert value(after, "vision_host_serve_images_total") == 1
        assert value(before, "vision_host_serve_generated_tokens_total") == 0
        assert value(after, "vision_host_serve_generated_tokens_total") == reply.json()["eval_count"] >= 1
        assert value(after, "vision_host_serve_generate_seconds_total") > 0
        assert value(after, "vision_host_serve_model_loaded") == 1
