"""Several frames per request keep memory flat: 50 000 frames through `-p ollama` with
ollama-frames=4 (the host's ring of kept copies in use, a request every 50 ms carrying four
JPEGs), the process's resident memory sampled as the frames leave the chain."""

from __future__ import annotations

import numpy as np
import pytest

from ollama_standin import OllamaStandin
from vision_host.bench import WASM, _runtime
from vision_host.pipeline import Pipeline, rss_bytes

pytestmark = pytest.mark.slow

FRAMES = 50_000


class GreyFrames:
    """A source of ``n`` 320×180 frames, a new array each (as a decoder gives), greys cycling."""

    live = False
    ended = False
    fps = 30.0
    width, height = 320, 180
    name = "grey frames"
    frames_dropped = frames_undecodable = reconnects = 0
    reconnect_gaps_s: list = []
    error = None
    state = "ended"

    def __init__(self, n: int):
        self.n, self.i = n, 0
        self.greys = [np.full((self.height, self.width, 3), v, np.uint8) for v in range(0, 250, 10)]

    def read(self):
        if self.i >= self.n:
            self.ended = True
            return None
        self.i += 1
        return self.greys[self.i % len(self.greys)].copy()

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


class MemorySampler:
    """An output recording the resident memory every 10 000 frames; it also makes the stand-in
    forget the request bodies it records (the stand-in's memory is not the host's)."""

    closed = False

    def __init__(self, server: OllamaStandin):
        self.server, self.count, self.rss = server, 0, {}

    def write(self, frame) -> None:
        self.count += 1
        if self.count % 500 == 0:
            self.server.clear_requests()
        if self.count % 10_000 == 0:
            self.rss[self.count] = rss_bytes()

    def close(self) -> None:
        pass


@pytest.mark.parametrize("layout", ["images", "grid"])
def test_memory_stays_flat_over_50_000_frames_with_four_frames_per_request(layout):
    server = OllamaStandin(latency_s=0.005, reply="a grey frame")
    sampler = MemorySampler(server)
    config = {"ollama-url": server.url, "ollama-interval-ms": "50", "ollama-frames": "4",
              "ollama-frames-span-ms": "300", "ollama-frames-layout": layout}
    try:
        with _runtime(config) as rt:
            processor = rt.load(WASM / "ollama.wasm")
            try:
                stats = Pipeline(GreyFrames(FRAMES), [processor], [sampler], rt).run()
            finally:
                processor.close()
    finally:
        server.stop()
    seen = [len(r.body.get("images", [])) for r in server.requests] if layout == "images" else []
    assert stats["frames_out"] == FRAMES and stats["captions"]["completed"] >= 20
    assert all(n == 4 for n in seen)
    growth = sampler.rss[FRAMES] - sampler.rss[10_000]
    assert growth < 3 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB from frame 10 000 to {FRAMES}: {sampler.rss}"
