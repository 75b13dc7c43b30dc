"""OpenAI-compatible kinds against the fake upstream: what is sent, what is read."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from keel.config import DEFAULT_MODELS, HttpModelConfig, http_table_issues
from keel.errors import UpstreamProtocolError
from keel.providers import http_base
from keel.providers.base import (
    ChatCall,
    ChatMessage,
    ChatProvider,
    CompletionCall,
    CompletionProvider,
    EmbeddingProvider,
    GenerationParams,
    Reported,
)
from keel.providers.http import build_http_provider
from keel.providers.http_openai import CallNumbering, tool_call_parts
from tests.fakes.upstreams import FINGERPRINT, Behaviour, FakeUpstream

PARAMS = GenerationParams(max_tokens=16, temperature=0.2, stop=("\n\n",), seed=7, top_p=0.9)


async def collect(pieces) -> list[str]:
    return [piece async for piece in pieces]


async def test_openai_completion_sends_prefix_and_suffix(upstream: FakeUpstream, make_provider):
    provider = make_provider("openai/completion", model_name="gpt-3.5-turbo-instruct")
    assert isinstance(provider, CompletionProvider)
    assert provider.supports_suffix is True
    assert provider.prompt_template is None

    call = CompletionCall(
        prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))", params=PARAMS
    )
    assert "".join(await collect(provider.stream_completion(call))) == "Hello, world"

    request = upstream.last_request
    assert (request.method, request.path) == ("POST", "/v1/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json == {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": "def add(a, b):\n    ",
        "suffix": "\n\nprint(add(1, 2))",
        "max_tokens": 16,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize("kind", ["openai/legacy_completion_no_fim", "vllm/completion"])
async def test_prompt_only_kinds_send_no_suffix(upstream: FakeUpstream, make_provider, kind):
    template = "<PRE> {prefix} <SUF>{suffix} <MID>"
    provider = make_provider(
        kind,
        model_name="codellama-7b",
        prompt_template=template,
        additional_stop_words=["<EOT>"],
        max_input_length=1024,
    )
    assert provider.supports_suffix is False
    assert provider.prompt_template == template
    assert provider.stop_words == ("<EOT>",)
    assert provider.max_input_length == 1024

    call = CompletionCall(prompt="<PRE> x <SUF> <MID>", params=GenerationParams(max_tokens=8))
    assert "".join(await collect(provider.stream_completion(call))) == "Hello, world"
    request = upstream.last_request
    assert request.path == "/v1/completions"
    assert request.json == {
        "model": "codellama-7b",
        "prompt": "<PRE> x <SUF> <MID>",
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_openai_caps_stop_sequences_at_four_but_vllm_does_not(
    upstream: FakeUpstream, make_provider
):
    stops = ("\n\n", "\ndef", "\nclass", "\nif", "\n#")
    call = CompletionCall(prompt="x", params=GenerationParams(max_tokens=4, stop=stops))
    await collect(make_provider("openai/completion").stream_completion(call))
    assert upstream.last_request.json["stop"] == list(stops[:4])
    await collect(make_provider("vllm/completion").stream_completion(call))
    assert upstream.last_request.json["stop"] == list(stops)


async def test_no_model_name_leaves_model_out(upstream: FakeUpstream, make_provider):
    provider = make_provider("openai/completion", api_key=None)
    assert provider.info.model == "openai/completion"
    await collect(provider.stream_completion(CompletionCall("x", GenerationParams(max_tokens=1))))
    assert "model" not in upstream.last_request.json
    assert "authorization" not in upstream.last_request.headers


@pytest.mark.parametrize(
    ("kind", "seed_field", "asked"),
    [
        ("openai/chat", "seed", {"stream_options": {"include_usage": True}}),
        ("mistral/chat", "random_seed", {}),  # Mistral's sends its usage unasked
    ],
)
async def test_chat_streams_deltas(upstream: FakeUpstream, make_provider, kind, seed_field, asked):
    provider = make_provider(kind, model_name="chat-model")
    assert isinstance(provider, ChatProvider)
    call = ChatCall(
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")), params=PARAMS
    )
    assert "".join(await collect(provider.stream_chat(call))) == "Hello, world"
    request = upstream.last_request
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json == {
        "model": "chat-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 16,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n"],
        seed_field: 7,
        "stream": True,
        **asked,
    }


async def test_mistral_chat_defaults_model():
    config = HttpModelConfig(kind="mistral/chat", api_key="k")
    provider = build_http_provider("chat", config, name="m", timeout=1.0)
    try:
        assert provider.info.model == "codestral-latest"
        assert provider.info.endpoint == "https://api.mistral.ai/v1"
    finally:
        await provider.aclose()


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        ("openai/embedding", "text-embedding-3-small"),
        ("voyage/embedding", None),
        ("mistral/embedding", None),
    ],
)
async def test_embeddings(upstream: FakeUpstream, make_provider, kind, model):
    provider = make_provider(kind, model_name=model)
    assert isinstance(provider, EmbeddingProvider)
    vectors = await provider.embed(["a", "bcd"])
    assert vectors == [[1.0, 0.0, 0.5], [3.0, 1.0, 0.5]]
    request = upstream.last_request
    assert request.path == "/v1/embeddings"
    assert request.headers["authorization"] == "Bearer sk-test"
    expected_model = model or DEFAULT_MODELS[kind]
    assert request.json == {"input": ["a", "bcd"], "model": expected_model}
    assert provider.info.model == expected_model


async def test_azure_kinds_call_their_deployment_with_its_key_header(
    upstream: FakeUpstream, make_provider
):
    """Tabby's ``azure/chat`` and ``azure/embedding``: the resource's endpoint, the
    deployment as ``model_name``, the key as ``api-key`` (Azure refuses a key sent as a
    bearer token), Tabby's ``api-version`` unless the endpoint names its own."""
    chat = make_provider("azure/chat", model_name="gpt 4o")
    call = ChatCall(messages=(ChatMessage("user", "Hi"),), params=PARAMS)
    assert "".join(await collect(chat.stream_chat(call))) == "Hello, world"
    request = upstream.last_request
    assert request.path == "/openai/deployments/gpt%204o/chat/completions"
    assert request.query == "api-version=2024-02-01"
    assert request.headers["api-key"] == "sk-test"
    assert "authorization" not in request.headers
    assert request.json["messages"] == [{"role": "user", "content": "Hi"}]

    embedding = make_provider(
        "azure/embedding",
        model_name="embed",
        endpoint=f"{upstream.url}/?api-version=2024-10-21",
    )
    assert await embedding.embed(["a"]) == [[1.0, 0.0, 0.5]]
    request = upstream.last_request
    assert (request.path, request.query) == (
        "/openai/deployments/embed/embeddings",
        "api-version=2024-10-21",
    )
    assert request.headers["api-key"] == "sk-test"


@pytest.mark.parametrize("kind", ["azure/chat", "azure/embedding"])
def test_azure_kinds_need_the_deployment(kind):
    role = "chat" if kind == "azure/chat" else "embedding"
    issues = http_table_issues(role, kind, "https://r.openai.azure.com", None)
    assert [issue.key for issue in issues] == ["model_name"]


async def test_an_endpoints_query_stays_at_the_end_of_each_url(
    upstream: FakeUpstream, make_provider
):
    """A backend taking a ?key= credential (or Azure's ?api-version=) got the route
    after its query ("/v1?key=K/completions": the key read "K/completions"); a
    fragment swallowed the route."""
    provider = make_provider("openai/embedding", endpoint=f"{upstream.url}/v1/?key=K&v=2#x")
    assert await provider.embed(["a"]) == [[1.0, 0.0, 0.5]]
    request = upstream.last_request
    assert (request.path, request.query) == ("/v1/embeddings", "key=K&v=2")
    fragment = make_provider("openai/embedding", endpoint=f"{upstream.url}/v1#x")
    await fragment.embed(["a"])
    assert (upstream.last_request.path, upstream.last_request.query) == ("/v1/embeddings", "")


async def test_embed_nothing_sends_nothing(upstream: FakeUpstream, make_provider):
    assert await make_provider("openai/embedding").embed([]) == []
    assert upstream.requests == []


async def test_embeddings_are_returned_in_input_order(make_provider):
    """OpenAI may answer ``data`` out of order; ``index`` says where each belongs."""
    with FakeUpstream() as shuffled:
        shuffled.behave(
            Behaviour.respond(
                200,
                {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]},
            )
        )
        provider = make_provider("openai/embedding", endpoint=shuffled.url + "/v1")
        assert await provider.embed(["x", "y"]) == [[1.0], [2.0]]


async def test_shared_client_is_not_closed(upstream: FakeUpstream):
    async with aiohttp.ClientSession() as client:
        config = HttpModelConfig(kind="openai/embedding", api_endpoint=upstream.url + "/v1")
        provider = build_http_provider("embedding", config, name="shared", timeout=1, client=client)
        await provider.aclose()
        assert not client.closed
        assert await provider.embed(["a"]) == [[1.0, 0.0, 0.5]]


@pytest.mark.parametrize(
    "calls",
    [
        "read_file",
        [["read_file"]],
        [{"index": "0"}],
        [{"index": 0, "function": "read_file"}],
        [{"index": 0, "function": {"name": "read_file", "arguments": {"path": "a"}}}],
    ],
)
def test_tool_calls_a_backend_garbles_are_a_protocol_error(calls: object) -> None:
    with pytest.raises(UpstreamProtocolError, match="unexpected tool_calls"):
        tool_call_parts(calls, "backend")


def test_tool_call_parts_are_taken_as_sent() -> None:
    calls = [
        {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"name": None, "arguments": '{"a"'}},
    ]
    assert tool_call_parts(calls, "backend") == calls


def _numbered(*deltas: list[dict[str, object]]) -> list[object]:
    numbering = CallNumbering()
    return [part["index"] for delta in deltas for part in numbering.number(delta)]


def test_tool_call_parts_without_an_index_are_numbered_call_by_call() -> None:
    def call(name: str | None = None, args: str = "", **more: object) -> dict[str, object]:
        return {"function": {"name": name, "arguments": args}, **more}

    # Ollama: each call whole, with its id
    assert _numbered([call("a", "{}", id="x")], [call("b", "{}", id="y")]) == [0, 1]
    # OpenAI-style parts without index: id and name first, then argument pieces
    assert _numbered([call("a", id="x")], [call(args="{")], [call(args="}")]) == [0, 0, 0]
    # Gemini: an empty id on every part; a second named part begins a call
    assert _numbered([call("a", "{}", id="")], [call("b", "{}", id="")]) == [0, 1]
    # two calls in one delta, no ids
    assert _numbered([call("a", "{}"), call("b", "{}")]) == [0, 1]
    # indexed, then a part naming an earlier call by its id
    assert _numbered(
        [call("a", id="x", index=0)], [call("b", id="y", index=1)], [call(args="1", id="x")]
    ) == [0, 1, 0]


async def test_an_attempt_starts_with_nothing_reported(upstream: FakeUpstream, make_provider):
    """A fallback's answer is not told what a failed attempt's backend had counted."""
    provider = make_provider("openai/chat", model_name="chat-model")
    call = ChatCall(messages=(ChatMessage("user", "Hi"),), params=PARAMS)
    call.reported.note_usage({"prompt_tokens": 900, "completion_tokens": 40})
    call.reported.finish_reason = "length"  # as a failed attempt's backend left them
    call.reported.model = "failed-model"
    call.reported.system_fingerprint = "fp_failed"
    assert "".join(await collect(provider.stream_chat(call))) == "Hello, world"
    # this backend's word only: no usage in its stream, the model it named
    said = Reported(finish_reason="stop", model="fake-model", system_fingerprint=FINGERPRINT)
    assert call.reported == said


async def test_an_embedding_with_nan_is_the_backends_fault(make_provider):
    """A Python backend's bare ``NaN`` (Ollama's bge-m3 has sent it) was read as a float
    and went to the client as ``null`` in a 200, into a vector store."""
    with FakeUpstream() as broken:
        broken.behave(Behaviour.respond(200, '{"data": [{"index": 0, "embedding": [0.1, NaN]}]}'))
        provider = make_provider("openai/embedding", endpoint=broken.url + "/v1")
        with pytest.raises(UpstreamProtocolError, match="finite numbers"):
            await provider.embed(["a"])


async def oversized_answer(chunked: bool, size: int) -> tuple[asyncio.Server, str]:
    """A backend whose whole answer is ``size`` bytes of JSON-looking text: announced by
    Content-Length, or chunked with no length, sent until the client leaves."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
        writer.write(head.encode())
        piece = b"[" + b"0.5," * 16_383 + b"0]"
        try:
            for _ in range(size // len(piece) + 1):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            # Not close(): a transport closed with unsent bytes waits to send them, and
            # the test's loop ends first (an unclosed transport for the garbage collector).
            writer.transport.abort()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_answer_past_the_limit_is_refused_unread(make_provider, monkeypatch, chunked):
    """A backend's whole answer is read up to ANSWER_BODY_LIMIT only: 600 MiB from a
    llama.cpp server with ``--pooling none`` (a vector per token) made keel 1.75 GB
    resident. Announced too long, it is refused before a byte is read."""
    if chunked:
        monkeypatch.setattr(http_base, "ANSWER_BODY_LIMIT", 2**20)
    size = http_base.ANSWER_BODY_LIMIT + 1
    server, endpoint = await oversized_answer(chunked, size if chunked else 2**40)
    try:
        provider = make_provider("openai/embedding", endpoint=endpoint)
        with pytest.raises(UpstreamProtocolError, match="an answer over"):
            await provider.embed(["a"])
    finally:
        server.close()


@pytest.mark.parametrize(("kind", "passed"), [("openai/chat", True), ("mistral/chat", False)])
async def test_openais_own_fields_go_to_openais_api_alone(
    upstream: FakeUpstream, make_provider, kind: str, passed: bool
):
    fields = {"service_tier": "flex", "store": False, "metadata": {"a": "b"}, "verbosity": "low"}
    call = ChatCall((ChatMessage("user", "Hi"),), PARAMS, passed_on=fields)
    await collect(make_provider(kind).stream_chat(call))
    sent = upstream.last_request.json
    expected = fields if passed else {"verbosity": "low"}
    assert {name: sent[name] for name in fields if name in sent} == expected
