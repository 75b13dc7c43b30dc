"""The thinnest Python gateways: the floors keel's proxy path is measured against.

A raw ASGI app on the server keel runs on (uvicorn, uvloop, httptools, no access
log, the collector tuned as ``keel serve`` tunes it) that sends each chat request
to one upstream over the client keel uses (one pooled keep-alive ``aiohttp``
session). No routing, validation, auth, limits, metrics, timeouts, stop words or
retries. Two modes:

- ``relay``: the request's bytes go up and the answer's bytes come back as they
  arrive. What a Python gateway in one process cannot go below.
- ``stream-up`` (keel's design): the upstream is always asked for a stream (so a
  stall between tokens can be noticed and a client's leaving stops the work on
  every backend, llama.cpp's server included, which stops a generation only when
  a streamed write fails); its events are parsed, and the client gets a JSON
  answer or its own events, re-encoded.

    python bench/floor_proxy.py --port P --upstream http://127.0.0.1:U [--mode stream-up]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import aiohttp
import uvicorn

JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]
UP = {"content-type": "application/json"}


def make_app(upstream: str, mode: str) -> Any:
    session: aiohttp.ClientSession | None = None

    async def lifespan(receive: Any, send: Any) -> None:
        nonlocal session
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=0)
                session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await session.close()  # type: ignore[union-attr]
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay(scope: dict[str, Any], body: bytes, send: Any) -> None:
        assert session is not None
        url = upstream + scope["path"]
        async with session.request(scope["method"], url, data=body or None, headers=UP) as up:
            kind = up.headers["content-type"].encode()
            start = {"type": "http.response.start", "status": up.status}
            await send({**start, "headers": [(b"content-type", kind)]})
            async for piece in up.content.iter_any():
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def stream_up(scope: dict[str, Any], body: bytes, send: Any) -> None:
        assert session is not None
        request = json.loads(body)
        streamed = request.get("stream", False)
        sent = {"model": request["model"], "messages": request["messages"], "stream": True}
        texts: list[str] = []
        if streamed:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
        async with session.post(upstream + scope["path"], data=json.dumps(sent), headers=UP) as up:
            rest = b""
            async for piece in up.content.iter_any():
                *lines, rest = (rest + piece).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: {"):
                        continue
                    text = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    if not streamed:
                        texts.append(text)
                        continue
                    event = {
                        "object": "chat.completion.chunk",
                        "choices": [{"delta": {"content": text}}],
                    }
                    out = b"data: " + json.dumps(event).encode() + b"\n\n"
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        if streamed:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        message = {"role": "assistant", "content": "".join(texts)}
        answer = {
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    handle = stream_up if mode == "stream-up" else relay

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "POST":
            await handle(scope, body, send)
        else:  # the bench's readiness probe, relayed
            await relay(scope, body, send)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--mode", choices=("relay", "stream-up"), default="relay")
    args = parser.parse_args()
    gc.collect()  # the heap as `keel serve` leaves it (keel.cli.settle_heap)
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    uvicorn.run(
        make_app(args.upstream.rstrip("/"), args.mode),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
