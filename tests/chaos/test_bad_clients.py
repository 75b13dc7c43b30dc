"""No request can hurt other users: a storm of bad requests takes no provider
away, and a client that leaves takes its work with it.

The primary is a fake llama.cpp-style backend with a small context window: a
prompt over it gets llama.cpp's own 400 (``exceed_context_size_error`` with
``n_prompt_tokens`` and ``n_ctx``), as the embedded engine and a remote
llama.cpp server answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import (
    PRIMARY_TEXT,
    PRIMARY_TOKENS,
    Keel,
    chain_config,
    fallback_name,
    live,
    primary_name,
)
from tests.fakes.upstreams import FakeUpstream, RecordedRequest, _head

pytestmark = pytest.mark.integration

CONTEXT = 512
"""The fake's context window, in (estimated) tokens: bytes / 3."""


class SmallContextUpstream(FakeUpstream):
    """Answers a prompt over :data:`CONTEXT` tokens as llama.cpp's server does."""

    async def _respond(
        self,
        request: RecordedRequest,
        behaviour: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        body = request.json if request.method == "POST" else None
        text = json.dumps(body.get("prompt") or body.get("messages")) if body else ""
        tokens = len(text) // 3
        if tokens <= CONTEXT:
            await super()._respond(request, behaviour, reader, writer)
            return
        error = {
            "code": 400,
            "message": f"request ({tokens} tokens) exceeds the available context size "
            f"({CONTEXT} tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": tokens,
            "n_ctx": CONTEXT,
        }
        raw = json.dumps({"error": error}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        writer.write(_head(400, headers) + raw)
        await writer.drain()


LONG = "chaos " + "x = 1\n" * 2000

OVER_LONG: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": LONG, "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}),
]

MALFORMED: list[tuple[str, Any]] = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b'{"prompt": "chaos", "model": "\\ud800"}'),
    ("/v1/completions", {"prompt": "chaos", "temperature": 7}),
    ("/v1/completions", {"prompt": ["chaos", "two"], "max_tokens": 8}),
    ("/v1/completions", {"prompt": "chaos", "max_tokens": -1}),
    ("/v1/completions", {"language": "py thon", "segments": {"prefix": "x", "suffix": ""}}),
    ("/v1/completions", {"language": "python"}),
    ("/v1/completions", [1, 2, 3]),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "chaos"}]}),
]


def post(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json"}
        return http.post(path, content=body, headers=headers)
    return http.post(path, json=body)


def test_a_poison_storm_hurts_no_one(keel_factory: Callable[[str], Keel]) -> None:
    primary = SmallContextUpstream(tokens=PRIMARY_TOKENS).start()
    # The same window: an over-long prompt goes on to the fallback, which refuses it too.
    fallback = SmallContextUpstream(tokens=("fallback",)).start()
    try:
        routing = {"breaker_consecutive_failures": 3, "probe_interval_seconds": 600}
        keel = keel_factory(chain_config(primary.url, fallback.url, routing=routing))
        jobs: list[tuple[str, str, Any]] = []
        for n in range(100):
            jobs.append(("normal", "/v1/completions", None))
            if n % 2 == 0:
                jobs.append(("long", *OVER_LONG[(n // 2) % len(OVER_LONG)]))
            else:
                jobs.append(("malformed", *MALFORMED[(n // 2) % len(MALFORMED)]))

        def run(index: int, job: tuple[str, str, Any]) -> tuple[str, httpx.Response]:
            kind, path, body = job
            if kind == "normal":  # one file each: nothing supersedes anything
                return kind, keel.tabby(filepath=f"src/file{index}.py")
            return kind, post(keel.http, path, body)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, range(len(jobs)), jobs))
    finally:
        primary.stop()
        fallback.stop()

    normal = [r for kind, r in results if kind == "normal"]
    assert len(normal) == 100
    primary_state = keel.endpoint("completion", primary_name("completion"))
    for response in normal:
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == PRIMARY_TEXT, primary_state
        assert response.headers["x-keel-provider"] == primary_name("completion")
    bad = [(kind, r) for kind, r in results if kind != "normal"]
    assert len(bad) == 100
    for kind, response in bad:
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}
        if kind == "long":
            assert response.status_code == 400
            assert error["code"] == "context_length_exceeded", error
            assert error["context_size"] == CONTEXT and error["prompt_tokens"] > CONTEXT
    for role in ("completion", "chat"):
        for name in (primary_name(role), fallback_name(role)):
            state = keel.endpoint(role, name)
            assert state["breaker"] == "closed" and state["healthy"], state
            assert state["last_error"] is None, state
    for backend in (primary, fallback):  # never cut and sent again; malformed: never sent
        over_long_sent = sum(1 for r in backend.requests if len(r.body) > CONTEXT * 3)
        assert over_long_sent == 50, "each over-long prompt reached each backend once"
    assert live(fallback) == 50, "only the over-long prompts went on to the fallback"
    assert keel.endpoint("completion", fallback_name("completion"))["breaker"] == "closed"


def raw_request(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send one request on a socket of our own, to close it without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "chaos first", "max_tokens": 60},
        {"prompt": "chaos first", "max_tokens": 60, "stream": True},
        {
            "language": "python",
            "segments": {"prefix": "chaos_first = ", "suffix": "\n", "filepath": "a.py"},
        },
    ],
    ids=["openai", "openai-stream", "tabby"],
)
def test_a_client_that_leaves_takes_its_work_with_it(
    body: dict[str, Any], keel_factory: Callable[[str], Keel]
) -> None:
    """A request is cancelled when its client disconnects (its upstream stream closed
    within a token or two), and the one queued behind it starts at once; a streamed one
    is left after its first event, mid-stream."""
    slow = FakeUpstream(tokens=("x",) * 40, token_delay=0.25).start()
    try:
        settings = {"max_concurrent": 1, "queue_size": 4, "queue_timeout": 30}
        routing = {"probe_interval_seconds": 600}
        config = chain_config(slow.url, None, routing=routing, role_settings=settings)
        keel = keel_factory(config)

        leaving = raw_request(keel.url, "/v1/completions", body)
        keel.wait_for("the first request running", lambda: live(slow) == 1, 5)
        if body.get("stream"):  # the head, then the first event: the stream is under way
            leaving.settimeout(5)
            received = b""
            while b"data: {" not in received:
                chunk = leaving.recv(65536)
                assert chunk, f"the stream ended before its first event: {received!r}"
                received += chunk
        queued: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("r", keel.completion()))
        waiter.start()
        keel.wait_for(
            "the second request queued",
            lambda: keel.providers()["roles"]["completion"]["admission"]["waiting"] == 1,
            5,
        )
        leaving.close()
        left = time.monotonic()
        keel.wait_for("the upstream stream closed", lambda: slow.disconnects == 1, 5)
        keel.wait_for("the queued request started", lambda: live(slow) == 2, 5)
        started_after = time.monotonic() - left
        slow.token_delay = 0.0
        waiter.join(30)
    finally:
        slow.stop()
    # Served in full, the first request alone would take 40 x 0.25 s = 10 s.
    assert started_after < 3.0, f"the queued request waited {started_after:.1f}s"
    assert queued["r"].status_code == 200, queued["r"].text
    admission = keel.providers()["roles"]["completion"]["admission"]
    assert admission["active"] == 0 and admission["waiting"] == 0
    state = keel.endpoint("completion", primary_name("completion"))
    assert state["breaker"] == "closed" and state["last_error"] is None
    if "segments" in body:
        return  # a Tabby answer is generated apart from its request, for whoever waits
    # Counted as the provider's 499, streamed or not (a plain one had no provider)
    left_on = [
        line
        for line in keel.http.get("/metrics").text.splitlines()
        if line.startswith("keel_requests_total{") and 'status="499"' in line
    ]
    assert left_on and all(f'provider="{primary_name("completion")}"' in m for m in left_on), (
        left_on
    )


def test_a_client_that_leaves_mid_body_is_a_499_not_a_server_error(
    backends: tuple[FakeUpstream, FakeUpstream], keel_factory: Callable[[str], Keel]
) -> None:
    """A client gone before its body was read (a cancelled upload, a dropped network)
    left a 500 and two tracebacks, counted among the server's errors."""
    keel = keel_factory(chain_config(backends[0].url, None))
    host, port = keel.url.removeprefix("http://").split(":")
    for path, chunked in [("/v1/completions", False), ("/v1/events", True)]:
        sock = socket.create_connection((host, int(port)))
        length = "Transfer-Encoding: chunked" if chunked else "Content-Length: 1000"
        part = b'a\r\n{"prompt":\r\n' if chunked else b'{"prompt":'
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{length}\r\n\r\n"
        sock.sendall(head.encode() + part)
        time.sleep(0.3)
        sock.close()
    keel.wait_for(
        "both requests ended",
        lambda: keel.http.get("/metrics").text.count('status="499"') >= 2,
        10,
    )
    metrics = [
        line
        for line in keel.http.get("/metrics").text.splitlines()
        if line.startswith("keel_requests_total{")
    ]
    assert not [line for line in metrics if 'status="500"' in line], metrics
    assert "Traceback" not in keel.log() and "unexpected error" not in keel.log(), keel.log()
    assert keel.http.get("/v1/stats").json()["summary"]["errors"] == 0
