"""The HTTP host functions (non-blocking fetch and wasmVision's blocking http) against local servers."""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest

from ollama_standin import OllamaStandin
from vision_host.runtime import NetworkPolicy
from vision_host.runtime.fetch import FetchError

F, H = "vision-host:platform/fetch", "wasmvision:platform/http"


@pytest.fixture
def standin():
    server = OllamaStandin()
    yield server
    server.stop()


def _fetch_driver(driver, standin, **limits):
    host = standin.url.split("//")[1]
    return driver([(F, "post-frame"), (F, "start"), (F, "poll"), (F, "cancel"), (H, "get"), (H, "post"),
                   (H, "post-image")], policy=NetworkPolicy(allowed={host}, **limits))


def _poll_all(d, rid, timeout_s=5.0):
    """Poll until done; returns (status, body) or raises with the fetch-error."""
    ret = d.retarea()
    body = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d.call(F, "poll", rid, ret)
        if d.u8(ret) == 1:
            raise LookupError(FetchError(d.u8(ret + 4)).name)
        status, done, ptr, n = struct.unpack("<HBxII", d.mem.read(ret + 4, 12))
        body += d.mem.read(ptr, n)
        if done:
            return status, body
        time.sleep(0.01)
    raise AssertionError("request did not finish")


def _post_frame(d, url, frame_handle, template=b'{"model":"llava","prompt":"hi","images":["%IMAGE%"]}', max_side=0):
    ret = d.retarea()
    d.call(F, "post-frame", *d.put_str(url), *d.put_str("application/json"), *d.put(template),
           frame_handle, max_side, 85, ret)
    return d.u8(ret), d.u32(ret + 4) if d.u8(ret) == 0 else d.u8(ret + 4)


def test_post_frame_streams_ndjson_and_releases_the_id(driver, standin, real_frame):
    d = _fetch_driver(driver, standin)
    ok, rid = _post_frame(d, standin.url + "/api/generate", d.mats.insert(real_frame), max_side=320)
    assert ok == 0
    status, body = _poll_all(d, rid)
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert status == 200 and lines[-1]["done"] is True
    assert "".join(x["response"] for x in lines).startswith("a 320x180 scene")
    assert (standin.requests[0].width, standin.requests[0].height) == (320, 180)
    with pytest.raises(LookupError, match="UNKNOWN_REQUEST"):
        _poll_all(d, rid)


def test_errors_are_reported_once_per_request(driver, standin, real_frame):
    d = _fetch_driver(driver, standin, max_response_bytes=100)
    frame = d.mats.insert(real_frame)
    _, rid = _post_frame(d, standin.url + "/api/generate", frame)
    with pytest.raises(LookupError, match="RESPONSE_TOO_LARGE"):
        _poll_all(d, rid)
    standin.failure = "hang"
    limited = _fetch_driver(driver, standin, max_in_flight=2, read_timeout_s=0.5)
    frame = limited.mats.insert(real_frame)
    ids = [_post_frame(limited, standin.url + "/api/generate", frame) for _ in range(3)]
    assert [i[0] for i in ids] == [0, 0, 1] and ids[2][1] == FetchError.TOO_MANY_REQUESTS
    with pytest.raises(LookupError, match="TIMEOUT"):
        _poll_all(limited, ids[0][1])
    limited.call(F, "cancel", ids[1][1])
    assert limited.ctx.fetch.in_flight == 0
    limited.call(F, "cancel", 999)                         # unknown ids are ignored


def test_blocking_http_get_post_and_post_image(driver, standin, real_frame):
    d = _fetch_driver(driver, standin)
    ret = d.retarea()
    d.call(H, "get", *d.put_str(standin.url + "/"), ret)
    assert d.u8(ret) == 0 and d.string_at(ret) == "Ollama is running"
    body = json.dumps({"model": "llava", "prompt": "hi", "stream": False}).encode()
    d.call(H, "post", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"), *d.put(body), ret)
    assert d.u8(ret) == 0 and json.loads(d.string_at(ret))["done"] is True
    template = b'{"model":"llava","prompt":"describe","stream":false,"images":["%IMAGE%"]}'
    d.call(H, "post-image", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"),
           *d.put(template), *d.put_str("response"), d.mats.insert(real_frame), ret)
    assert d.u8(ret) == 0 and d.string_at(ret).startswith("a 640x360 scene")
    d.call(H, "post-image", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"),
           *d.put(template), *d.put_str("nosuchfield"), d.mats.insert(real_frame), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 4            # http-error.runtime-error
    standin.failure = "http500"
    d.call(H, "post", *d.put_str(standin.url + "/api/generate"), *d.put_str("application/json"), *d.put(body), ret)
    assert d.u8(ret) == 1 and d.u8(ret + 4) == 3            # request-error


def test_the_first_image_placeholder_decides_the_encoding(real_frame):
    from vision_host.runtime.fetch import frame_jpeg_body
    as_numbers = json.loads(frame_jpeg_body(real_frame, 320, 80, b'{"image":%IMAGE_BYTES%,"prompt":"a %IMAGE% b"}')())
    assert as_numbers["prompt"] == "a %IMAGE% b"                     # the prompt's text is left alone
    assert bytes(as_numbers["image"])[:3] == b"\xff\xd8\xff"         # a JPEG, as numbers
    as_base64 = json.loads(frame_jpeg_body(real_frame, 320, 80, b'{"images":["%IMAGE%"],"p":"%IMAGE_BYTES%"}')())
    assert as_base64["p"] == "%IMAGE_BYTES%"
    assert base64.b64decode(as_base64["images"][0])[:3] == b"\xff\xd8\xff"
