"""A streaming client that takes none of its answer is dropped, its slot freed.

A client that stopped reading a streamed chat (or read a byte a second) held its
admission slot, and the generation, for as long as it kept the socket open: a handful
of them locked a role, everyone else 429. Run on keel's own HTTP server (uvicorn with
keel's protocol) on a real loopback socket, whose flow control is what blocks a write;
the stall limit is shortened for the test.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest
from tests.api.conftest import USER, Backends, build_app, listening
from tests.fakes.upstreams import Behaviour

from keel.serving import streaming


def stalled_client(port: int, body: dict[str, object]) -> socket.socket:
    """A client that sends a streamed request and never reads its answer."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    client.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {USER['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    client.sendall(head.encode() + data)
    return client


async def test_a_client_taking_none_of_its_stream_frees_its_slot(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "WRITE_STALL_SECONDS", 1.0)
    monkeypatch.setattr(streaming, "STALL_CHECK_SECONDS", 0.2)
    chunk = {"choices": [{"index": 0, "delta": {"content": "x" * 200}}]}
    answer = f"data: {json.dumps(chunk)}\n\n" * 20_000 + "data: [DONE]\n\n"  # 5 MB
    sse = (("Content-Type", "text/event-stream"),)
    backends.fallback.behave(Behaviour.respond(200, answer, headers=sse))  # chat
    app = build_app(tmp_path / "keel", backends.config())
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 131072}
    try:
        async with listening(app) as url, httpx.AsyncClient(base_url=url) as http:
            port = int(url.rsplit(":", 1)[1])
            clients = [stalled_client(port, body) for _ in range(3)]

            async def active() -> int:
                providers = (await http.get("/v1/providers", headers=USER)).json()
                return int(providers["roles"]["chat"]["admission"]["active"])

            for _ in range(100):  # their generations run, their writes block
                if await active() == 3:
                    break
                await asyncio.sleep(0.05)
            assert await active() == 3
            for _ in range(100):  # dropped within the limit and a check
                if await active() == 0:
                    break
                await asyncio.sleep(0.1)
            assert await active() == 0, "the stalled clients still hold their slots"
            metrics = (await http.get("/metrics", headers=USER)).text
            assert 'route="/v1/chat/completions",status="499"' in metrics
            for client in clients:
                client.close()
    finally:
        backends.fallback.reset_behaviour()


async def test_a_stream_whose_start_cannot_be_written_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind answers a pipelining client never read, the server's write of a stream's
    start waits for the client: it was not watched as the body's writes are, and held
    the request's admission slot and its upstream generation for as long as the client
    kept the connection (70 s and counting, every other chat a 429). The server here is
    one whose every write waits so; the generation begun must be let go."""
    monkeypatch.setattr(streaming, "WRITE_STALL_SECONDS", 0.3)
    monkeypatch.setattr(streaming, "STALL_CHECK_SECONDS", 0.1)
    closed = asyncio.Event()

    async def pieces() -> AsyncGenerator[str, None]:
        try:
            yield "Hello"
            await asyncio.Event().wait()  # a generation under way
            yield "never"
        finally:
            closed.set()  # the generation, and the slot it holds, let go

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # the client never leaves
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        await asyncio.Event().wait()  # flow control: the client reads nothing

    async def tail() -> list[dict[str, object]]:
        return []

    stream = await streaming.stream_response(
        pieces(), head=list, chunk=lambda text: {"text": text}, tail=tail
    )
    scope = {"type": "http", "extensions": {}}
    serving = asyncio.create_task(stream(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(closed.wait(), 5)
    with pytest.raises(asyncio.CancelledError):
        await serving


async def test_a_client_taking_none_of_a_whole_answer_is_dropped(
    backends: Backends, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat answered whole (no streaming), 4 MB, to a client that reads none of it:
    the answer stayed in keel's memory for as long as the client kept its connection
    (20 such clients: 226 MB more, held 30 s after their answers were done)."""
    monkeypatch.setattr(streaming, "WRITE_STALL_SECONDS", 1.0)
    chunk = {"choices": [{"index": 0, "delta": {"content": "x" * 200}}]}
    answer = f"data: {json.dumps(chunk)}\n\n" * 20_000 + "data: [DONE]\n\n"
    sse = (("Content-Type", "text/event-stream"),)
    backends.fallback.behave(Behaviour.respond(200, answer, headers=sse))  # chat
    app = build_app(tmp_path / "keel", backends.config())
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 131072}
    try:
        async with listening(app) as url:
            client = stalled_client(int(url.rsplit(":", 1)[1]), body)
            await asyncio.sleep(4.0)  # the answer made, written, and taken none of
            client.settimeout(5.0)
            received, ended = 0, ""
            while not ended:
                try:
                    data = await asyncio.to_thread(client.recv, 1 << 20)
                except ConnectionResetError:
                    ended = "reset"
                except TimeoutError:
                    ended = "still open"
                else:
                    received += len(data)
                    ended = "" if data else "closed"
            client.close()
    finally:
        backends.fallback.reset_behaviour()
    assert ended in ("reset", "closed"), f"{ended} after {received:,} bytes"
    assert received < 4_000_000, "dropped before the whole answer went out"
