"""Semantic search of the caption history: a real :class:`CaptionEmbedder` asks the Ollama
stand-in (``/api/embed`` and ``/v1/embeddings``, deterministic bag-of-words vectors) for the
captions' embeddings through a real :class:`HistoryRecorder`, the store keeps them beside the
captions, and ``search_semantic`` / ``vision-host history search --semantic`` rank by cosine
similarity. One slow test embeds with ``vision-host serve``'s tiny BLIP instead.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import requests

from ollama_standin import EMBED_DIM, OllamaStandin
from vision_host.captions import CaptionEvent
from vision_host.cli import main
from vision_host.history import HistoryError, HistoryRecorder, HistoryStore, start_history
from vision_host.history.embeddings import CaptionEmbedder, EmbeddingError, embed_endpoint

EMBED = "nomic-embed-text"
OTHER = "all-minilm"
T0 = 1_790_000_000.0   # a fixed wall time (2026-09-21): the filters' times are exact
CAPTIONS = [   # (text, seconds after T0, stream, name)
    ("a person stands at the front door", 0, 0, "porch"),
    ("a red car parks on the street", 60, 0, "porch"),
    ("a dog runs across the lawn", 120, 1, "garden"),
    ("an empty street at night", 180, 1, "garden"),
    ("a person with a parcel at the back door", 240, 1, "garden"),
]


def caption(text: str, t: float, stream: int = 0, name: str = "porch") -> CaptionEvent:
    return CaptionEvent(text, t - T0, t, round((t - T0) * 25), "clip", model="llava", latency_ms=300.0,
                        stream=stream, stream_name=name)


@pytest.fixture
def standin():
    server = OllamaStandin(models=["llava", EMBED, OTHER])
    try:
        yield server
    finally:
        server.stop()


def embed_requests(server: OllamaStandin) -> list:
    return [r for r in server.requests if r.path in ("/api/embed", "/v1/embeddings")]


def record(path: Path, server_cfg: dict, model: str, captions, **kw) -> HistoryRecorder:
    """Store ``captions`` through a recorder embedding with ``model``; returns the closed recorder."""
    kw.setdefault("retention_days", None)   # T0 is long ago: no pruning here
    recorder = HistoryRecorder(HistoryStore(path), embedder=CaptionEmbedder(server_cfg, model), **kw)
    try:
        for text, dt, stream, name in captions:
            recorder.add(caption(text, T0 + dt, stream, name))
        assert recorder.flush(30), "the recorder did not write its captions within 30 s"
    finally:
        recorder.close()
    return recorder


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_the_caption_sharing_the_words_ranks_first_through_each_api(tmp_path, standin, api, monkeypatch):
    monkeypatch.setenv("VH_TEST_EMBED_KEY", "sk-test-123")
    cfg = {"url": standin.url, "api_key_env": "VH_TEST_EMBED_KEY"} | ({"api": "openai"} if api == "openai" else {})
    path = tmp_path / "h.sqlite3"
    recorder = record(path, cfg, EMBED, CAPTIONS)
    assert (recorder.committed, recorder.embedded, recorder.embed_failures) == (5, 5, 0)
    sent = embed_requests(standin)
    assert {r.path for r in sent} == {"/api/embed" if api == "ollama" else "/v1/embeddings"}
    assert sorted(t for r in sent for t in r.body["input"]) == sorted(c[0] for c in CAPTIONS)
    assert all(r.headers.get("Authorization") == "Bearer sk-test-123" for r in sent)
    assert all(r.body["model"] == EMBED for r in sent)

    query = CaptionEmbedder(cfg, EMBED).embed(["someone at the door"])
    assert query.shape == (1, EMBED_DIM) and query.dtype == np.float32
    with HistoryStore(path, read_only=True) as store:
        assert store.embedding_models() == [{"model": EMBED, "dim": EMBED_DIM, "count": 5}]
        hits = store.search_semantic(query[0], EMBED, limit=5)
    texts = [h["text"] for h in hits]
    assert set(texts[:2]) == {CAPTIONS[0][0], CAPTIONS[4][0]}, texts   # both share "door" (and "person")
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.3 > scores[2], scores
    assert hits[0]["kind"] == "caption" and "rank" not in hits[0]


def test_several_texts_go_in_one_request_up_to_the_batch_size(standin):
    embedder = CaptionEmbedder({"url": standin.url}, EMBED, batch_size=2)
    vectors = embedder.embed([c[0] for c in CAPTIONS])
    assert vectors.shape == (5, EMBED_DIM)
    assert [len(r.body["input"]) for r in embed_requests(standin)] == [2, 2, 1]
    norms = np.linalg.norm(vectors, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    # the url ending in /v1 is the OpenAI base: /v1/embeddings, not /v1/v1/embeddings
    CaptionEmbedder({"url": standin.url + "/v1", "api": "openai"}, EMBED).embed(["x"])
    assert embed_requests(standin)[-1].path == "/v1/embeddings"


def test_filters_come_first_and_models_are_never_mixed(tmp_path, standin):
    path = tmp_path / "h.sqlite3"
    cfg = {"url": standin.url}
    record(path, cfg, EMBED, CAPTIONS)
    # another model embeds one more caption sharing the words: its vector is never compared with EMBED's
    record(path, cfg, OTHER, [("a person knocking at the door", 300, 0, "porch")])
    query = CaptionEmbedder(cfg, EMBED).embed(["person at the door"])[0]
    with HistoryStore(path) as store:
        everything = store.search_semantic(query, EMBED, limit=100)
        assert len(everything) == 5 and "knocking" not in " ".join(h["text"] for h in everything)
        garden = store.search_semantic(query, EMBED, stream="garden", limit=100)
        assert [h["text"] for h in garden][0] == CAPTIONS[4][0] and {h["stream_name"] for h in garden} == {"garden"}
        assert len(garden) == 3
        assert [h["text"] for h in store.search_semantic(query, EMBED, stream=0, limit=1)] == [CAPTIONS[0][0]]
        window = store.search_semantic(query, EMBED, since=T0 + 60, until=T0 + 180, limit=100)
        assert sorted(h["text"] for h in window) == sorted(c[0] for c in CAPTIONS[1:4])
        other = store.search_semantic(CaptionEmbedder(cfg, OTHER).embed(["person at the door"])[0], OTHER)
        assert [h["text"] for h in other] == ["a person knocking at the door"]
        assert store.embedding_model(EMBED + ":latest") == EMBED   # Ollama's default tag
        with pytest.raises(HistoryError, match=r"no captions .* embedded with model 'mxbai'.*holds vectors of "
                                               r"all-minilm, nomic-embed-text"):
            store.search_semantic(query, "mxbai")
        with pytest.raises(HistoryError, match="dimension 64, the query's has 32: the model changed"):
            store.search_semantic(query[:32], EMBED)
        with pytest.raises(HistoryError, match="all zeros"):
            store.search_semantic(np.zeros(EMBED_DIM), EMBED)
        # pruning an event deletes its vectors with it (a trigger)
        assert store.prune(retention_days=1, now=T0 + 86400 + 90) == 2
        assert store.embedding_models() == [{"model": EMBED, "dim": EMBED_DIM, "count": 3},
                                            {"model": OTHER, "dim": EMBED_DIM, "count": 1}]


def test_a_failed_embedding_keeps_the_caption_for_word_search_and_counts(tmp_path, standin, caplog):
    caplog.set_level(logging.INFO, "vision_host.history.recorder")
    path = tmp_path / "h.sqlite3"
    recorder = record(path, {"url": standin.url}, "nope", CAPTIONS[:2])   # a model the server lacks
    recorder_b = record(path, {"url": standin.url}, "nope", CAPTIONS[2:4])
    assert (recorder.committed, recorder.embedded, recorder.embed_failures) == (2, 0, 2)
    assert (recorder_b.committed, recorder_b.embed_failures) == (2, 2)
    pulls = [r.getMessage() for r in caplog.records if "ollama pull nope" in r.getMessage()]
    assert len(pulls) == 2, pulls   # once per recorder, not once per caption
    assert 'model "nope" not found, try pulling it first' in pulls[0]
    with HistoryStore(path, read_only=True) as store:
        assert [h["text"] for h in store.search("red car")] == [CAPTIONS[1][0]]
        assert store.embedding_models() == []


def test_a_server_that_does_not_answer_pauses_embedding_without_losing_captions(tmp_path, standin, caplog):
    standin.failure = "hang"
    path = tmp_path / "h.sqlite3"
    recorder = HistoryRecorder(HistoryStore(path), embedder=CaptionEmbedder({"url": standin.url}, EMBED,
                                                                            timeout_s=0.5),
                               embed_retry_s=3600, retention_days=None)
    try:
        recorder.add(caption(CAPTIONS[0][0], T0))
        assert recorder.flush(30)
        assert recorder.embed_failures == 1
        recorder.add(caption(CAPTIONS[1][0], T0 + 60))
        assert recorder.flush(30)
    finally:
        recorder.close()
    assert (recorder.committed, recorder.embedded, recorder.embed_failures) == (2, 0, 2)
    assert len(embed_requests(standin)) == 1, "the paused embedder asked again"
    assert any("did not answer within 0.5 s" in r.getMessage() and "asking again every 3600 s" in r.getMessage()
               for r in caplog.records)
    with HistoryStore(path, read_only=True) as store:
        assert store.count() == 2 and [h["text"] for h in store.search("door")] == [CAPTIONS[0][0]]


def test_embedder_errors_are_sentences(standin):
    with pytest.raises(ValueError, match="user name or password"):
        CaptionEmbedder({"url": "http://me:secret@127.0.0.1:1"}, EMBED)
    with pytest.raises(ValueError, match="not supported with ollama-api=workers-ai"):
        CaptionEmbedder({"url": "https://api.cloudflare.com/client/v4", "api": "workers-ai"}, EMBED)
    with pytest.raises(ValueError, match="VH_NO_SUCH_KEY .* is not set"):
        CaptionEmbedder({"url": standin.url, "api_key_env": "VH_NO_SUCH_KEY"}, EMBED)
    with pytest.raises(ValueError, match="needs a model name"):
        CaptionEmbedder({"url": standin.url}, " ")
    with pytest.raises(ValueError, match="not an http"):
        CaptionEmbedder({"url": "ftp://127.0.0.1"}, EMBED)
    with pytest.raises(EmbeddingError, match="has no model nope .*pull it: ollama pull nope") as info:
        CaptionEmbedder({"url": standin.url}, "nope").embed(["x"])
    assert info.value.kind == "model"
    with pytest.raises(EmbeddingError, match="has no model nope .*give a model the server has"):
        CaptionEmbedder({"url": standin.url, "api": "openai"}, "nope").embed(["x"])
    standin.failure = "http500"
    with pytest.raises(EmbeddingError, match="answered HTTP 500: llama runner process has terminated"):
        CaptionEmbedder({"url": standin.url}, EMBED).embed(["x"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EmbeddingError, match=r"cannot reach the embedding server http://127.0.0.1:\d+ "
                                             r"\(connection refused\): start it") as info:
        CaptionEmbedder({"url": f"http://127.0.0.1:{port}"}, EMBED).embed(["x"])
    assert info.value.kind == "unreachable"
    assert embed_endpoint("http://h:1/", "chat") == "http://h:1/api/embed"


def test_wrong_shapes_are_sentences():
    from reply_server import ReplyServer

    replies = [({"embeddings": [[0.1, 0.2]]}, "gave 1 vectors for 2 texts"),
               ({"embeddings": [[0.1, 0.2], [0.3]]}, r"dimensions \[1, 2\]"),
               ({"embeddings": [[0.1, "x"], [0.3, 0.4]]}, "without a list of number vectors"),
               ({"nothing": 1}, "without a list of number vectors in 'embeddings'")]
    server = ReplyServer(200, "application/json")
    try:
        for body, message in replies:
            server.chunks = [json.dumps(body).encode()]
            with pytest.raises(EmbeddingError, match=message) as info:
                CaptionEmbedder({"url": server.url}, EMBED).embed(["a", "b"])
            assert info.value.kind == "shape"
        server.chunks = [b"<html>not json</html>"]
        with pytest.raises(EmbeddingError, match="not JSON .* is it an Ollama server"):
            CaptionEmbedder({"url": server.url}, EMBED).embed(["a"])
    finally:
        server.stop()


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["history", "search", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_searches_by_meaning_and_prints_the_score(tmp_path, standin, capsys, monkeypatch):
    path = tmp_path / "h.sqlite3"
    record(path, {"url": standin.url}, EMBED, CAPTIONS)
    before = len(embed_requests(standin))
    status, out, err = _cli(capsys, "--semantic", "parcel at the door", "--embed-model", EMBED, "--url", standin.url,
                            "--history", str(path), "--limit", "3")
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].endswith(f"#5  {CAPTIONS[4][0]}"), lines
    first, second = (float(line.split()[0]) for line in lines[:2])
    assert 1 >= first > second
    assert embed_requests(standin)[before].body["input"] == ["parcel at the door"]

    # $OLLAMA_HOST is the default server; --json carries the score; the filters apply
    monkeypatch.setenv("OLLAMA_HOST", standin.url.removeprefix("http://"))
    status, out, err = _cli(capsys, "--semantic", "dog", "--embed-model", EMBED, "--history", str(path), "--json",
                            "--stream", "garden", "--since", "2026-09-21T00:00:00Z")
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["text"] == CAPTIONS[2][0] and records[0]["score"] > 0.5
    assert {r["stream_name"] for r in records} == {"garden"}

    # without --semantic: the word search as before
    status, out, _ = _cli(capsys, "red", "car", "--history", str(path))
    assert status == 0 and out.splitlines()[0].endswith(f"#2  {CAPTIONS[1][0]}")


def test_cli_mistakes_are_sentences(tmp_path, standin, capsys):
    path = tmp_path / "h.sqlite3"
    record(path, {"url": standin.url}, EMBED, CAPTIONS[:1])
    asked = len(embed_requests(standin))
    status, _, err = _cli(capsys, "--semantic", "door", "--history", str(path))
    assert status == 2 and "--semantic needs --embed-model MODEL" in err
    status, _, err = _cli(capsys, "door", "--embed-model", EMBED, "--history", str(path))
    assert status == 2 and "--embed-model only go with --semantic" in err
    status, _, err = _cli(capsys, "--semantic", "door", "--embed-model", EMBED, "--raw", "--history", str(path))
    assert status == 2 and "does not go with --semantic" in err
    status, _, err = _cli(capsys, "--semantic", "door", "--embed-model", "mxbai", "--url", standin.url,
                          "--history", str(path))
    assert status == 1 and "no captions" in err and "holds vectors of nomic-embed-text" in err
    assert len(embed_requests(standin)) == asked, "the server was asked although no vectors of that model exist"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, _, err = _cli(capsys, "--semantic", "door", "--embed-model", EMBED, "--url", f"http://127.0.0.1:{port}",
                          "--history", str(path))
    assert status == 1 and "cannot reach the embedding server" in err
    status, _, err = _cli(capsys, "--semantic", "door", "--embed-model", EMBED, "--url", "http://u:p@127.0.0.1:1",
                          "--history", str(path))
    assert status == 2 and "user name or password" in err


def test_start_history_passes_the_embedder_on(tmp_path, standin):
    recorder = start_history(tmp_path / "h.sqlite3", retention_days=None,
                             embedder=CaptionEmbedder({"url": standin.url}, EMBED))
    try:
        recorder.add(caption("a cat on the porch", T0))
        assert recorder.flush(30)
        assert recorder.embedded == 1
    finally:
        recorder.close()


# -- vision-host serve ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_semantic_search_with_vision_host_serve_tiny_blip(tmp_path, api):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("fastapi")
    from test_serve import serve_process
    from tiny_models import build_tiny_blip

    with serve_process(build_tiny_blip(tmp_path / "tiny-blip"), tmp_path / "serve.log") as url:
        model = requests.get(url + "/api/tags", timeout=10).json()["models"][0]["name"]
        cfg = {"url": url} | ({"api": "openai"} if api == "openai" else {})
        path = tmp_path / "h.sqlite3"
        words = [("a man with a red bottle on the table", 0, 0, "porch"),
                 ("two green glass of water", 60, 0, "porch"),
                 ("a woman in blue", 120, 1, "garden")]
        recorder = record(path, cfg, model, words)
        assert (recorder.embedded, recorder.embed_failures) == (3, 0)
        with HistoryStore(path, read_only=True) as store:
            [stored] = store.embedding_models()
            query = CaptionEmbedder(cfg, model).embed(["a man with a red bottle on the table"])[0]
            assert stored["count"] == 3 and stored["dim"] == query.shape[0] >= 8
            hits = store.search_semantic(query, model)
        assert len(hits) == 3 and hits[0]["text"] == words[0][0] and hits[0]["score"] > 0.99
