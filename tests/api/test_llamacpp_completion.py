"""``POST /completion`` in llama.cpp server's native shape, as Continue's ``llama.cpp``
provider and Twinny's ``llamacpp`` provider call it, served through keel's OpenAI
completion serving to fake backends on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app
from tests.conftest import running_keel
from tests.fakes.upstreams import Behaviour, FakeUpstream, RecordedRequest
from tests.serving.conftest import llamacpp_config

TEXT = "Hello, world"
"""What the fake backends generate ("Hello", ",", " world")."""


def continue_body(**more: Any) -> dict[str, Any]:
    """What Continue's llama.cpp provider posts (LlamaCpp.ts: _streamComplete)."""
    return {
        "prompt": "def greet():\n    return '",
        "stream": True,
        "n_predict": 64,
        "stop": None,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "mirostat": 0,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "cache_prompt": True,
        **more,
    }


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a llama.cpp stream: each a ``data:`` line of JSON, no ``[DONE]``."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    blocks = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: {") for block in blocks), blocks
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


def upstream_calls(backends: Backends) -> list[RecordedRequest]:
    """The completion requests the fake backends received (the prober's left out)."""
    return [
        request
        for server in (backends.primary, backends.fallback)
        for request in server.requests
        if request.method == "POST" and request.path.endswith("/completions")
    ]


async def test_a_whole_answer_in_llamacpps_shape(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    before = len(upstream_calls(backends))
    answer = await client.post(
        "/completion", json=continue_body(stream=False, n_predict=16), headers=USER
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["content"] == TEXT and body["stop"] is True
    assert body["model"] == "fake-model"  # as the backend that answered named it
    assert body["tokens_predicted"] > 0 and body["tokens_evaluated"] > 0
    assert body["timings"]["predicted_n"] == body["tokens_predicted"]
    assert (body["stop_type"], body["stopping_word"], body["truncated"]) == ("eos", "", False)
    calls = upstream_calls(backends)[before:]
    assert len(calls) == 1
    sent = calls[0].json
    assert sent["prompt"].startswith("def greet():") and sent["max_tokens"] == 16
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9
    assert "top_k" not in sent and "mirostat" not in sent  # llama.cpp's own samplers: ignored


async def test_response_fields_pick_what_a_whole_answer_holds(
    client: httpx.AsyncClient,
) -> None:
    """As llama-server does (and keel's ``/infill``): only the fields asked for, a nested
    one under its path; a path that names nothing is left out. keel sent every field."""
    fields = ["content", "timings/predicted_n", "nope"]
    body = continue_body(stream=False, n_predict=16, response_fields=fields)
    answer = await client.post("/completion", json=body, headers=USER)
    assert answer.status_code == 200, answer.text
    assert set(answer.json()) == {"content", "timings/predicted_n"}, answer.json()
    assert answer.json()["content"] == TEXT
    nothing = await client.post("/completion", json={**body, "n_predict": 0}, headers=USER)
    assert set(nothing.json()) == {"content", "timings/predicted_n"}, nothing.json()


async def test_a_streamed_answer_as_continue_reads_it(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    answer = await client.post("/completion", json=continue_body(), headers=USER)
    assert answer.status_code == 200, answer.text
    assert "[DONE]" not in answer.text  # llama.cpp's /completion sends none
    *pieces, last = events(answer)
    assert pieces and all(piece == {"content": piece["content"], "stop": False} for piece in pieces)
    assert "".join(piece["content"] for piece in pieces) == TEXT
    assert last["stop"] is True and last["content"] == ""
    assert last["model"] == "fake-model" and last["stop_type"] == "eos"
    assert last["tokens_predicted"] > 0 and last["tokens_evaluated"] > 0


async def test_twinnys_max_tokens_caps_the_answer(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    """Twinny's llamacpp provider sends ``max_tokens`` where llama.cpp reads ``n_predict``."""
    before = len(upstream_calls(backends))
    twinny = {"prompt": "x = ", "stream": True, "temperature": 0.2, "max_tokens": 5}
    answer = await client.post("/completion", json=twinny, headers=USER)
    assert answer.status_code == 200, answer.text
    assert "".join(event["content"] for event in events(answer)) == TEXT
    default = await client.post(
        "/completion", json={"prompt": "y = ", "n_predict": -1}, headers=USER
    )
    assert default.status_code == 200, default.text
    capped, budget = (call.json["max_tokens"] for call in upstream_calls(backends)[before:])
    assert capped == 5 and budget > 5  # -1: keel's own budget, not llama.cpp's "no limit"


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings_are_honoured(
    client: httpx.AsyncClient, backends: Backends, stream: bool
) -> None:
    before = len(upstream_calls(backends))
    body = continue_body(stream=stream, stop=[","])
    answer = await client.post("/completion", json=body, headers=USER)
    assert answer.status_code == 200, answer.text
    if stream:
        *pieces, last = events(answer)
        content = "".join(piece["content"] for piece in pieces)
    else:
        last = answer.json()
        content = last["content"]
    assert content == "Hello"  # the fake ignores stop strings: keel cut the text itself
    # A "stop" with stop strings sent is the model's end or a stop string's: not said.
    assert last["stop"] is True and "stop_type" not in last
    assert [call.json["stop"] for call in upstream_calls(backends)[before:]] == [[","]]


@pytest.mark.parametrize("stream", [False, True])
async def test_n_predict_zero_answers_empty_at_once(
    client: httpx.AsyncClient, backends: Backends, stream: bool
) -> None:
    before = len(upstream_calls(backends))
    body = continue_body(stream=stream, n_predict=0)
    answer = await client.post("/completion", json=body, headers=USER)
    assert answer.status_code == 200, answer.text
    if stream:
        (last,) = events(answer)
    else:
        last = answer.json()
    assert (last["content"], last["stop"], last["tokens_predicted"]) == ("", True, 0)
    assert last["stop_type"] == "limit" and last["model"] == "primary-coder"
    assert len(upstream_calls(backends)) == before  # no model work


@pytest.mark.parametrize("prompt", [[1, 2, 3], ["a = ", "b = "], ["a = "], [[1, 2]]])
async def test_a_list_prompt_is_a_400_naming_prompt(
    client: httpx.AsyncClient, prompt: list[Any]
) -> None:
    answer = await client.post("/completion", json={"prompt": prompt}, headers=USER)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "prompt"
    assert "one string" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n_predict": -5}, "n_predict"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "temperature": 9}, "temperature"),
        # what changes the answer's meaning is refused, not ignored (served unconstrained)
        ({"prompt": "x", "grammar": 'root ::= "x"'}, "grammar"),
        ({"prompt": "x", "json_schema": {"type": "integer"}}, "json_schema"),
        ({"prompt": "x", "n_probs": 3}, "n_probs"),
    ],
)
async def test_bad_bodies_are_a_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    answer = await client.post("/completion", json=body, headers=USER)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


async def test_no_probabilities_asked_for_is_taken_in_any_spelling(
    client: httpx.AsyncClient,
) -> None:
    """``n_probs: 0.0`` was a 400 saying to leave it out; 0 was taken."""
    for none in (0, 0.0):
        body = {"prompt": "x = ", "n_predict": 2, "n_probs": none}
        answer = await client.post("/completion", json=body, headers=USER)
        assert answer.status_code == 200, answer.text


async def test_an_empty_prompt_is_told_what_this_route_takes(client: httpx.AsyncClient) -> None:
    """It was told to send the text after the cursor as ``suffix``, which /completion
    does not take."""
    answer = await client.post("/completion", json={"prompt": "", "n_predict": 2}, headers=USER)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt" and "suffix" not in error["message"], error


async def test_a_request_without_a_key_is_refused(client: httpx.AsyncClient) -> None:
    answer = await client.post("/completion", json={"prompt": "x = "})
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["type"] == "authentication_error"


async def test_it_is_counted_as_a_completion(client: httpx.AsyncClient) -> None:
    """Rate-limited and counted as a model route of the completion role."""
    answer = await client.post("/completion", json={"prompt": "x = "}, headers=USER)
    assert answer.status_code == 200, answer.text
    metrics = (await client.get("/metrics", headers=USER)).text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("keel_requests_total{") and 'route="/completion"' in line
    ]
    assert counted and all('role="completion"' in line for line in counted), counted


async def test_errors_before_and_after_the_stream_began(tmp_path: Path) -> None:
    """No provider answering: keel's one error shape with a 5xx. A failure after the
    first piece: llama.cpp's ``data: {"error": ...}``, ending the stream, no final
    object, no ``[DONE]``."""
    with FakeUpstream() as upstream:
        app = build_app(tmp_path / "keel", llamacpp_config(upstream.url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                upstream.behave(Behaviour.stream_error("engine crashed", after=1))
                cut = await http.post("/completion", json=continue_body())
                upstream.behave(Behaviour.error(503))
                refused = await http.post("/completion", json=continue_body())
    assert refused.status_code >= 500, refused.text
    assert {"message", "type", "code"} <= set(refused.json()["error"])
    assert cut.status_code == 200, cut.text
    first, failure = events(cut)
    assert first == {"content": "Hello", "stop": False}
    assert "engine crashed" in failure["error"]["message"]


@pytest.mark.integration
def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(tmp_path: Path) -> None:
    """A real keel process (no keys, on loopback): the client closes its socket after
    the first event, and keel closes its upstream stream (40 tokens, 10 s in full)
    within a token or two."""
    slow = FakeUpstream(tokens=("x",) * 40, token_delay=0.25)
    with slow, running_keel(tmp_path / "keel", llamacpp_config(slow.url)) as keel:
        host, port = keel.url.removeprefix("http://").split(":")
        data = json.dumps(continue_body(n_predict=40)).encode()
        head = (
            f"POST /completion HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=10) as leaving:
            leaving.sendall(head.encode() + data)
            received = b""
            while b'data: {"content"' not in received:
                chunk = leaving.recv(65536)
                assert chunk, f"the stream ended before its first event: {received!r}"
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), received
        deadline = time.monotonic() + 5
        while slow.disconnects < 1:
            assert time.monotonic() < deadline, "the upstream request ran on"
            time.sleep(0.05)
    generations = [r for r in slow.requests if r.method == "POST" and r.path == "/completion"]
    assert len(generations) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_n_indent_and_t_max_predict_ms_end_the_generation(
    tmp_path: Path, stream: bool
) -> None:
    """As on ``/infill`` and in llama.cpp's server: they were ignored, and the answer ran
    on past the block (and past the time) the client had asked it to end at."""
    lines = ("    a = 1", "\n", "    b = 2", "\n", "c = 3", "\n", "d = 4", "\n", "e = 5")
    with FakeUpstream(tokens=lines, token_delay=0.05) as upstream:
        app = build_app(tmp_path / "keel", llamacpp_config(upstream.url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                contents = []
                for more in ({"n_indent": 4}, {"t_max_predict_ms": 1}):
                    body = continue_body(stream=stream, prompt="def f():\n", **more)
                    answer = await http.post("/completion", json=body)
                    assert answer.status_code == 200, answer.text
                    if stream:
                        *pieces, last = events(answer)
                        contents.append("".join(piece["content"] for piece in pieces))
                    else:
                        last = answer.json()
                        contents.append(last["content"])
                    # ended by them, not by the model: keel cannot say "eos"
                    assert "stop_type" not in last, last
                for _ in range(100):  # the fake notices at its next token
                    if upstream.disconnects == 2:
                        break
                    await asyncio.sleep(0.02)
    # llama.cpp's server keeps the new line before the line it cuts, as keel has sent it
    assert contents == ["    a = 1\n    b = 2\n", "    a = 1\n"]
    assert upstream.disconnects == 2, "the rest of the answer was generated"
    # and the server is asked to check the time limit itself, token by token, as on /infill
    sent = [r.json for r in upstream.requests if r.path == "/completion"]
    assert "t_max_predict_ms" not in sent[0] and sent[1]["t_max_predict_ms"] == 1, sent
