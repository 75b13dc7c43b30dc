"""A fast fake OpenAI-compatible upstream for the benchmarks, run as its own process.

``tests/fakes/upstreams.py`` is built for fault injection inside tests (one
thread, ``Connection: close``, every request recorded); this one is built to
be cheap per request so that the gateway in front of it is what gets measured:
a raw ``asyncio.Protocol`` (on uvloop when installed), HTTP/1.1 keep-alive,
answers prebuilt as bytes. It serves::

    POST .../chat/completions   OpenAI chat, JSON or SSE (``"stream": true``)
    POST .../completions        OpenAI legacy completions, JSON or SSE
    POST .../embeddings         one fixed vector
    GET  .../models, .../health
    GET  /_bench/stats          requests counted per method and path, by mode;
                                connections accepted
    POST /_bench/mode           {"mode": "normal" | "error500" | "hang"}
    POST /_bench/reset          zero the counters

``--starlette`` serves the same answers from a Starlette app on uvicorn
(httptools, uvloop) instead: the "fast fake upstream" the gateway issue was
measured against, a Python web framework's floor rather than raw asyncio's
(its stream is one ``StreamingResponse`` chunk per event).

Run: ``python bench/upstream.py --port 8101 [--tokens 8] [--token-delay 0] [--starlette]``.
It prints ``ready <port>`` once listening and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from collections.abc import Coroutine
from typing import Any

MODES = ("normal", "error500", "hang")


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunked(frames: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(payload: object, status: str = "200 OK") -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = _head(status, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    return head + body


class Answers:
    """Every answer the fake can give, built once."""

    def __init__(self, tokens: list[str], model: str = "fake-model") -> None:
        self.tokens = tokens
        text = "".join(tokens)
        self.plain: dict[bool, bytes] = {}
        self.stream_head = _head(
            "200 OK", {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        )
        self.frames: dict[bool, list[bytes]] = {}
        for chat in (True, False):
            kind = "chat.completion" if chat else "text_completion"
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            usage = {"prompt_tokens": 8, "completion_tokens": len(tokens), "total_tokens": 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self.plain[chat] = _json_response(
                {
                    "id": "cmpl-fake",
                    "object": kind,
                    "created": 1700000000,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            frames = []
            for token in tokens:
                part = {"delta": {"content": token}} if chat else {"text": token}
                frames.append(
                    _sse(
                        {
                            "id": "cmpl-fake",
                            "object": chunk_kind,
                            "created": 1700000000,
                            "model": model,
                            "choices": [{"index": 0, "finish_reason": None, **part}],
                        }
                    )
                )
            end = {"delta": {}} if chat else {"text": ""}
            frames.append(
                _sse(
                    {
                        "id": "cmpl-fake",
                        "object": chunk_kind,
                        "created": 1700000000,
                        "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop", **end}],
                    }
                )
            )
            frames.append(b"data: [DONE]\n\n")
            self.frames[chat] = frames
        self.models = _json_response({"object": "list", "data": [{"id": model, "object": "model"}]})
        self.health = _json_response({"status": "ok"})
        self.embeddings = _json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": model,
            }
        )
        self.error500 = _json_response(
            {"error": {"message": "fake upstream error", "type": "server_error", "code": 500}},
            "500 Internal Server Error",
        )
        self.not_found = _json_response({"error": {"message": "no such route"}}, "404 Not Found")


class State:
    def __init__(self, answers: Answers, token_delay: float) -> None:
        self.answers = answers
        self.token_delay = token_delay
        self.mode = "normal"
        self.counts: Counter[str] = Counter()
        self.connections = 0
        self.hanging: set[asyncio.Transport] = set()


class HttpProtocol(asyncio.Protocol):
    """One keep-alive connection; requests are answered in order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.state.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.state.hanging.discard(self.transport)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = self.buffer[end + 4 : total]
            self.buffer = self.buffer[total:]
            method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
            self.handle(method, target.split("?", 1)[0], body)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def handle(self, method: str, path: str, body: bytes) -> None:
        state, answers = self.state, self.state.answers
        if path.startswith("/_bench/"):
            self.control(method, path, body)
            return
        state.counts[f"{state.mode} {method} {path}"] += 1
        if method == "GET":
            if path.endswith("/models"):
                self.write(answers.models)
            elif path.endswith("/health"):
                self.write(answers.health)
            else:
                self.write(answers.not_found)
            return
        if state.mode == "hang":
            assert self.transport is not None
            state.hanging.add(self.transport)
            self.busy = True  # never answer on this connection
            return
        if state.mode == "error500":
            self.write(answers.error500)
            return
        if path.endswith("/embeddings"):
            self.write(answers.embeddings)
            return
        if path.endswith("/completions"):
            chat = path.endswith("/chat/completions")
            stream = b'"stream":true' in body.replace(b" ", b"")
            if not stream:
                self.write(answers.plain[chat])
            elif state.token_delay > 0:
                self.busy = True
                asyncio.ensure_future(self.slow_stream(answers.frames[chat]))
            else:
                self.write(answers.stream_head + _chunked(answers.frames[chat]))
            return
        self.write(answers.not_found)

    async def slow_stream(self, frames: list[bytes]) -> None:
        self.write(self.state.answers.stream_head)
        for frame in frames:
            await asyncio.sleep(self.state.token_delay)
            self.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        self.write(b"0\r\n\r\n")
        self.busy = False
        if self.buffer:
            self.data_received(b"")

    def control(self, method: str, path: str, body: bytes) -> None:
        state = self.state
        if path == "/_bench/stats":
            stats = {"mode": state.mode, "counts": dict(state.counts)}
            stats["connections"] = state.connections
            self.write(_json_response(stats))
        elif path == "/_bench/reset" and method == "POST":
            state.counts.clear()
            state.connections = 0
            self.write(_json_response({"ok": True}))
        elif path == "/_bench/mode" and method == "POST":
            mode = json.loads(body or b"{}").get("mode", "normal")
            if mode not in MODES:
                self.write(_json_response({"error": f"mode must be one of {MODES}"}, "400 Bad"))
                return
            state.mode = mode
            if mode != "hang":
                for transport in list(state.hanging):
                    transport.close()
                state.hanging.clear()
            self.write(_json_response({"mode": mode}))
        else:
            self.write(self.state.answers.not_found)


async def serve(port: int, state: State) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(state), "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def serve_starlette(port: int, state: State) -> None:
    """The answers from a Starlette app (chat and legacy completions, plain or streamed)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    # The same answers as objects, serialized per request as a Python server would.
    plain = {
        chat: json.loads(body.split(b"\r\n\r\n", 1)[1])
        for chat, body in state.answers.plain.items()
    }
    chunks = {
        chat: [json.loads(frame[6:]) for frame in frames[:-1]]
        for chat, frames in state.answers.frames.items()
    }

    async def completions(request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        state.counts[f"normal POST {request.url.path}"] += 1
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse(plain[chat])

        async def events() -> Any:
            for chunk in chunks[chat]:
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def stats(request: Request) -> Response:
        return JSONResponse({"mode": "normal", "counts": dict(state.counts), "connections": 0})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/_bench/stats", stats),
        ]
    )
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop"
    )
    print(f"ready {port}", flush=True)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between frames")
    parser.add_argument("--starlette", action="store_true", help="a Starlette app on uvicorn")
    args = parser.parse_args(argv)
    words = ["def", " add", "(a", ",", " b", "):", "\n   ", " return", " a", " +", " b", "\n"]
    tokens = [words[i % len(words)] for i in range(args.tokens)]
    state = State(Answers(tokens), args.token_delay)
    if args.starlette:
        serve_starlette(args.port, state)
    else:
        run_fast(serve(args.port, state))
    return 0


def run_fast(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
