"""The MCP server of ``vision-host run … --mcp``, through the official SDK's own client: over
Streamable HTTP at ``/mcp`` (with the viewer's token) and over stdio through ``vision-host mcp
--attach``, against one real run of the ``ollama`` processor on the shipped clip (paced,
640×360) with the Ollama stand-in as its vision server, an alert rule and a history file."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import cv2
import httpx2
import numpy as np
import pytest
import requests
from conftest import REPO, SAMPLE_CLIP
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for
from vision_host.cli import main
from vision_host.cli.run_file import load_run_file

TOKEN = "mcp-test-token"
INVALID_PARAMS = -32602


@pytest.fixture(scope="module")
def standin():
    server = OllamaStandin(latency_s=0.2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run(standin, tmp_path_factory):
    """One run for the module (the clip lasts 40 s): --mcp, a token, an alert rule, a history."""
    port = free_port()
    history = tmp_path_factory.mktemp("mcp") / "history.sqlite3"
    r = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"127.0.0.1:{port}", "--mcp", "--token", TOKEN,
                    "-c", f"ollama-url={standin.url}", "-c", "ollama-interval-ms=500", "--history", str(history),
                    "--alert", 'scene=text.contains("scene")'], port)
    r.wait_until_serving()
    yield r
    r.stop()


def _session(run, work, client: Client | None = None):
    """Run ``await work(client)`` in a session of the SDK's client: over Streamable HTTP with the
    token unless ``client`` is given."""
    async def go():
        async with httpx2.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}, timeout=30) as http, \
                (client or Client(streamable_http_client(run.base + "/mcp", http_client=http))) as c:
            return await work(c)
    return asyncio.run(go())


def _jpeg(data: bytes) -> np.ndarray:
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "the JPEG does not decode"
    return image


@pytest.mark.slow
def test_without_the_token_mcp_is_refused_401(run):
    reply = requests.post(run.base + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=5)
    assert reply.status_code == 401 and "token" in reply.json()["error"]
    assert requests.get(run.base + "/mcp?token=wrong", timeout=5).status_code == 401


@pytest.mark.slow
def test_resources_are_listed_and_both_frames_read_as_jpeg_of_the_stream_size(run):
    async def work(c):
        listed = (await c.list_resources()).resources
        templates = (await c.list_resource_templates()).resource_templates
        images = {}
        for uri in ("images://input", "images://output", "images://input/0", "images://output/0"):
            contents = (await c.read_resource(uri)).contents
            assert len(contents) == 1 and contents[0].mime_type == "image/jpeg"
            images[uri] = base64.b64decode(contents[0].blob)
        return listed, templates, images

    listed, templates, images = _session(run, work)
    assert {(r.uri, r.name, r.mime_type) for r in listed} == {("images://input", "input", "image/jpeg"),
                                                               ("images://output", "output", "image/jpeg")}
    assert {t.uri_template for t in templates} == {"images://input/{stream}", "images://output/{stream}"}
    for uri, data in images.items():
        assert _jpeg(data).shape == (360, 640, 3), uri


@pytest.mark.slow
def test_every_tool_answers_over_http(run, standin):
    wait_for(lambda: requests.get(run.base + "/api/captions", params={"token": TOKEN}, timeout=5).json()["captions"],
             15, "a first caption")
    schema = {"type": "object", "properties": {"bottles": {"type": "integer"}}, "required": ["bottles"]}

    async def work(c):
        tools = {t.name: t for t in (await c.list_tools()).tools}
        out = {"tools": tools}
        for name, args in (("list_streams", {}), ("latest_captions", {"stream": 0, "limit": 3}),
                           ("ask", {"stream": "0", "question": "How many bottles are there?"}),
                           ("ask_schema", {"stream": 0, "question": "Count the bottles.", "schema": schema}),
                           ("snapshot", {"stream": 0}), ("snapshot_input", {"stream": 0, "which": "input"}),
                           ("alert_states", {}), ("search_history", {"query": "scene", "since": "1h"}),
                           ("summarize", {"since": "10m", "stream": 0})):
            out[name] = await c.call_tool(name.removesuffix("_schema").removesuffix("_input"), args)
        return out

    got = _session(run, work)
    tools = got.pop("tools")
    assert set(tools) == {"list_streams", "latest_captions", "ask", "snapshot", "set_prompt", "alert_states",
                          "search_history", "summarize"}
    for tool in tools.values():      # usable without docs: a sentence and described arguments
        assert len(tool.description) > 40, tool.name
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), (tool.name, name)
    assert not any(result.is_error for result in got.values())

    stream = got["list_streams"].structured_content["streams"][0]
    assert (stream["index"], stream["name"], stream["width"], stream["height"]) == (0, "0", 640, 360)
    assert stream["state"] == "live" and stream["model"] == "llava" and stream["prompt"]

    captions = got["latest_captions"].structured_content["captions"]
    assert 1 <= len(captions) <= 3 and all(c["text"].startswith("a 640x360 scene") for c in captions)

    answer = got["ask"].structured_content
    assert answer["answer"].startswith("a 640x360 scene with mean brightness") and answer["model"] == "llava"
    asked = [r for r in standin.requests if r.body and r.body.get("prompt") == "How many bottles are there?"]
    assert len(asked) == 1 and asked[0].path == "/api/generate" and (asked[0].width, asked[0].height) == (640, 360)
    assert asked[0].body["stream"] is False and "format" not in asked[0].body
    structured = got["ask_schema"].structured_content
    assert structured["fields"] == {"bottles": 1} and structured["fields_error"] is None
    assert [r.body["format"] for r in standin.requests if r.body and r.body.get("prompt") == "Count the bottles."] \
        == [schema]

    for name in ("snapshot", "snapshot_input"):
        (image,) = got[name].content
        assert image.type == "image" and image.mime_type == "image/jpeg"
        assert _jpeg(base64.b64decode(image.data)).shape == (360, 640, 3)

    (alerts,) = got["alert_states"].structured_content["streams"]
    assert alerts["index"] == 0 and [(a["name"], a["state"]) for a in alerts["alerts"]] == [("scene", "ON")]

    hits = got["search_history"].structured_content["results"]
    assert any(h["kind"] == "caption" and "scene" in h["text"] for h in hits)

    # the captions, as text, to the stream's server with the model in force
    summary = got["summarize"].structured_content
    assert summary["caption_count"] >= 1 and summary["model"] == "llava" and summary["window_cut"] is False
    assert summary["text"].strip()
    chats = [r for r in standin.requests if r.path == "/api/chat"]
    assert len(chats) == 1 and "a 640x360 scene" in chats[0].body["messages"][0]["content"]


@pytest.mark.slow
def test_set_prompt_changes_the_prompt_the_vision_server_then_receives(run, standin):
    async def work(c):
        return await c.call_tool("set_prompt", {"stream": 0, "prompt": "Name the colours."})

    result = _session(run, work)
    assert not result.is_error and result.structured_content == {"stream": 0, "prompt": "Name the colours."}
    wait_for(lambda: any(r.body and r.body.get("prompt") == "Name the colours." for r in standin.requests), 15,
             "a caption request with the new prompt")


@pytest.mark.slow
def test_bad_arguments_are_mcp_errors_that_say_what_to_do(run):
    async def work(c):
        errors = []
        for name, args in (("latest_captions", {"stream": 7}), ("ask", {"stream": "garage", "question": "what?"}),
                           ("latest_captions", {"stream": 0, "limit": 0}), ("ask", {"stream": 0, "question": " "}),
                           ("search_history", {"query": "x", "since": "yesterday-ish"})):
            with pytest.raises(MCPError) as caught:
                await c.call_tool(name, args)
            errors.append(caught.value.error)
        with pytest.raises(MCPError) as caught:
            await c.read_resource("images://output/9")
        errors.append(caught.value.error)
        return errors

    errors = _session(run, work)
    assert all(e.code == INVALID_PARAMS for e in errors), errors
    messages = [e.message for e in errors]
    assert messages[0] == "there is no stream 7: the streams are 0 (0)"
    assert messages[1] == "there is no stream 'garage': the streams are 0 (0)"
    assert messages[2] == "limit = 0: give a whole number from 1 to 500"
    assert "empty" in messages[3] and "ISO 8601" in messages[4] and "no stream '9'" in messages[5]


@pytest.mark.slow
def test_stdio_through_mcp_attach_reaches_the_same_server(run):
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO),
                                   args=["-m", "vision_host", "mcp", "--attach", run.base, "--token", TOKEN])

    async def work(c):
        tools = [t.name for t in (await c.list_tools()).tools]
        image = base64.b64decode((await c.read_resource("images://input")).contents[0].blob)
        captions = await c.call_tool("latest_captions", {"limit": 1})
        with pytest.raises(MCPError) as caught:
            await c.call_tool("snapshot", {"stream": 3})
        return tools, image, captions, caught.value.error

    tools, image, captions, error = _session(run, work, Client(params))
    assert "ask" in tools and "search_history" in tools
    assert _jpeg(image).shape == (360, 640, 3)
    assert len(captions.structured_content["captions"]) == 1
    assert error.code == INVALID_PARAMS and "no stream 3" in error.message


@pytest.mark.slow
def test_mcp_attach_with_a_wrong_token_says_so_and_exits_1(run):
    done = subprocess.run([sys.executable, "-m", "vision_host", "mcp", "--attach", run.base, "--token", "wrong"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert "needs the token the instance printed at its start: give it with --token T" in done.stderr


def test_mcp_needs_the_mjpeg_output(tmp_path, capsys):
    status = main(["run", "-p", "ollama", "-s", str(SAMPLE_CLIP), "-o", "file", "-d", str(tmp_path / "x.mp4"), "--mcp"])
    assert status == 2
    assert "--mcp serves MCP at /mcp on the viewer's address, which -o file has none of: use -o mjpeg" \
        in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_a_run_file_turns_mcp_on_and_ignores_the_mcp_port(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[main]\nsource = "x.mp4"\n[server]\nmcp-enable = true\nmcp-port = 8081\n')
    settings = load_run_file(str(path))
    assert settings["mcp"] is True and "mcp-port" not in str(settings)
    assert "ignoring [server] mcp-port" in capsys.readouterr().err


@pytest.mark.parametrize("api", ["generate", "chat", "openai", "workers-ai"])
def test_ask_speaks_each_protocol_of_the_ollama_processor(api, monkeypatch):
    """``ask``'s request, for each ``ollama-api``, through a real fetch client (policy, pool, fair
    share) to the stand-ins: the frame and the question arrive, the answer comes back."""
    import concurrent.futures

    from vision_host.mcp.ask import AskError, AskSettings, send_question
    from vision_host.runtime import NetworkPolicy
    from vision_host.runtime.fetch import FairShare, FetchClient, FetchStats
    from workers_ai_standin import WorkersAIStandin

    frame = np.full((48, 64, 3), 100, np.uint8)
    server = WorkersAIStandin(reply="a grey square") if api == "workers-ai" else OllamaStandin()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        url = server.run_url if api == "workers-ai" else server.url
        config = {"ollama-url": url}
        if api == "workers-ai":
            monkeypatch.setenv("CF_TOKEN", server.token)
            config["ollama-api-key-env"] = "CF_TOKEN"
        policy = NetworkPolicy.from_config(config)
        client = FetchClient(policy, pool, FetchStats(), FairShare(1), 0)
        model = "@cf/llava-hf/llava-1.5-7b-hf" if api == "workers-ai" else "llava"
        settings = AskSettings(url=url, api=api, model=model)
        answer, latency_ms = asyncio.run(send_question(client, settings, frame, "What %IMAGE% is this?",
                                                       max_tokens=50, schema=None, timeout_s=10))
        assert latency_ms > 0
        if api == "workers-ai":
            assert answer == "a grey square"
            (request,) = server.requests
            assert request.body["prompt"] == "What %IMAGE% is this?"
            assert cv2.imdecode(np.frombuffer(request.image, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)
            with pytest.raises(AskError, match="cannot answer in a JSON schema"):
                asyncio.run(send_question(client, settings, frame, "n?", max_tokens=5, schema={"type": "object"},
                                          timeout_s=10))
        else:
            assert answer == "a 64x48 scene with mean brightness 100"
            (request,) = server.requests
            assert request.path == {"generate": "/api/generate", "chat": "/api/chat",
                                    "openai": "/v1/chat/completions"}[api]
            assert "What %IMAGE% is this?" in json.dumps(request.body) and request.image_shapes == ((48, 64, 3),)
            server.failure = "http500"
            with pytest.raises(AskError, match="answered HTTP 500: llama runner process has terminated"):
                asyncio.run(send_question(client, settings, frame, "again?", max_tokens=5, schema=None, timeout_s=10))
        assert client.in_flight == 0
    finally:
        server.stop()
        pool.shutdown()


def test_ask_gives_up_after_its_timeout_and_releases_the_request():
    import concurrent.futures

    from vision_host.mcp.ask import AskError, AskSettings, send_question
    from vision_host.runtime import NetworkPolicy
    from vision_host.runtime.fetch import FairShare, FetchClient, FetchStats

    server = OllamaStandin(failure="hang")
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        client = FetchClient(NetworkPolicy.from_config({"ollama-url": server.url}), pool, FetchStats(), FairShare(1), 0)
        with pytest.raises(AskError, match=r"did not answer within 0\.3 s"):
            asyncio.run(send_question(client, AskSettings(server.url, "generate", "llava"), np.zeros((16, 16, 3), np.uint8),
                                      "hello?", max_tokens=5, schema=None, timeout_s=0.3))
        server.wait_for_requests(1)       # it was sent, and is cancelled: nobody holds its id any more
        assert client.in_flight == 0
    finally:
        server.stop()                     # ends the connection the worker still waits on
        pool.shutdown()


@pytest.mark.slow
def test_mcp_max_sessions_refuses_one_more_session_with_503(standin):
    """--mcp-max-sessions 1: the first session opens; a second one is answered 503 until it closes."""
    port = free_port()
    r = RunProcess(["-p", "ollama", "-s", str(SAMPLE_CLIP), "-d", f"127.0.0.1:{port}", "--mcp",
                    "--mcp-max-sessions", "1", "--no-history", "-c", f"ollama-url={standin.url}"], port)
    r.wait_until_serving()
    try:
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                 "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                            "clientInfo": {"name": "limit-test", "version": "1"}}}
        first = requests.post(r.base + "/mcp", json=hello, headers=headers, timeout=10)
        assert first.status_code == 200 and first.headers.get("mcp-session-id"), first.text
        second = requests.post(r.base + "/mcp", json=hello, headers=headers, timeout=10)
        assert second.status_code == 503, (second.status_code, second.text)
        requests.delete(r.base + "/mcp", headers={**headers, "mcp-session-id": first.headers["mcp-session-id"]},
                        timeout=10)
        third = requests.post(r.base + "/mcp", json=hello, headers=headers, timeout=10)
        assert third.status_code == 200, third.text
    finally:
        r.stop()
