"""A fake model backend on a real loopback socket, with switchable faults.

:class:`FakeUpstream` is a small HTTP/1.1 server (``asyncio.start_server`` in
a thread of its own, so it serves sync and async tests alike and outlives any
one event loop) that speaks the protocols keel's HTTP providers use::

    POST .../chat/completions   OpenAI / Mistral chat   SSE, choices[0].delta.content (or
                                                        .tool_calls, given tools), [DONE]
    POST .../fim/completions    Mistral FIM             SSE, like chat
    POST .../completions        OpenAI / vLLM           SSE, choices[0].text, [DONE]
    POST .../completion         llama.cpp               SSE, {"content", "stop"}
    POST .../api/generate       Ollama                  NDJSON, {"response", "done"}
    POST .../api/embed          Ollama                  {"embeddings": [[...]]}
    POST .../embeddings         OpenAI / Voyage ({"input"}) or llama.cpp ({"content"})
    GET  .../health, .../models, .../api/tags

It writes every request down (:attr:`FakeUpstream.requests`) and behaves as
told by :meth:`FakeUpstream.behave`, for all requests or for the next few::

    upstream.behave(Behaviour.error(429, {"error": {"message": "slow down"}}, retry_after="7"))
    upstream.behave(Behaviour.cut(after=2), times=1)   # then back to normal

Streams are sent with chunked encoding and ``Connection: close``. The server
also notices when a client goes away mid-stream (:attr:`disconnects`), which
is how tests check that keel cancels upstream work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.ports import free_port

Mode = Literal[
    "normal",
    "status",
    "hang",
    "slow_first_token",
    "cut",
    "stall",
    "malformed_json",
    "broken_sse",
    "reset",
    "disconnect",
    "stream_error",
    "endless",
    "endless_event",
]


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with one request.

    - ``normal``: answer in the protocol of the path.
    - ``status``: answer ``status`` with ``body`` (dict as JSON, str as text)
      and ``Retry-After: retry_after`` when set.
    - ``hang``: read the request, then send nothing until the client leaves.
    - ``slow_first_token``: send the headers, wait ``delay`` s, then stream.
      (Non-streaming answers wait before the headers.)
    - ``cut``: send ``after`` stream frames, then close without ending the body.
    - ``stall``: send ``after`` stream frames, wait ``delay`` s (or until the client
      leaves), then send the rest: a generation caught in the middle, whatever the load.
    - ``malformed_json``: the first frame (or the JSON body) is not valid JSON.
    - ``broken_sse``: a 200 whose body is not an event stream (an HTML page).
    - ``reset``: read the request, then reset the connection (TCP RST).
    - ``disconnect``: read the request, then close without any answer.
    - ``stream_error``: a 200 stream that sends ``after`` frames, then an error
      object with ``body`` as its message, in the protocol's own way (OpenAI:
      ``data: {"error": {...}}``, llama.cpp: ``error: {...}``, Ollama:
      ``{"error": "..."}``), then ends the body.
    - ``endless``: a 200 stream of the answer's first frame again and again, until the
      client leaves: a backend that never stops, whatever ``max_tokens`` said.
    - ``endless_event``: a 200 event stream of ``data:`` lines that no blank line ever
      ends, until the client leaves.
    """

    mode: Mode = "normal"
    status: int = 500
    body: object = None
    retry_after: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    after: int = 1

    @classmethod
    def normal(cls) -> Behaviour:
        return cls()

    @classmethod
    def respond(
        cls,
        status: int,
        body: object = None,
        *,
        retry_after: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Behaviour:
        """Answer exactly ``status``, ``body`` and ``headers``, whatever was asked."""
        return cls("status", status=status, body=body, retry_after=retry_after, headers=headers)

    @classmethod
    def error(
        cls, status: int, body: object = None, *, retry_after: str | None = None
    ) -> Behaviour:
        """An error answer; ``body`` defaults to an OpenAI-shaped error object."""
        return cls.respond(status, body, retry_after=retry_after)

    @classmethod
    def hang(cls) -> Behaviour:
        return cls("hang")

    @classmethod
    def slow_first_token(cls, delay: float) -> Behaviour:
        return cls("slow_first_token", delay=delay)

    @classmethod
    def cut(cls, after: int = 1) -> Behaviour:
        return cls("cut", after=after)

    @classmethod
    def stall(cls, *, after: int = 1, delay: float) -> Behaviour:
        return cls("stall", after=after, delay=delay)

    @classmethod
    def malformed_json(cls) -> Behaviour:
        return cls("malformed_json")

    @classmethod
    def broken_sse(cls) -> Behaviour:
        return cls("broken_sse")

    @classmethod
    def reset(cls) -> Behaviour:
        return cls("reset")

    @classmethod
    def disconnect(cls) -> Behaviour:
        return cls("disconnect")

    @classmethod
    def stream_error(cls, message: str, *, after: int = 1, status: int = 500) -> Behaviour:
        return cls("stream_error", status=status, body=message, after=after)

    @classmethod
    def endless(cls) -> Behaviour:
        return cls("endless")

    @classmethod
    def endless_event(cls) -> Behaviour:
        return cls("endless_event")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased header names."""
    body: bytes
    query: str = ""
    """The target's query string, without its ``?``."""

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class _Answer:
    """A protocol's answer before faults are applied: frames for a stream or one body."""

    content_type: str
    frames: list[bytes] = field(default_factory=list)
    body: bytes | None = None
    status: int = 200
    malformed_frame: bytes = b""
    error_frame: Callable[[str, int], bytes] | None = None


def embedding_usage(texts: object) -> int:
    """The tokens the fake says it read for an embedding: 100 a text plus its length, a
    count no estimate of keel's gives."""
    items = texts if isinstance(texts, list) else [texts]
    return sum(100 + len(str(text)) for text in items)


MAX_DIMENSIONS = 3072
"""The largest vector the fake makes when asked (OpenAI's text-embedding-3-large's): a
fuzzer's 29,723,326,987 was a MemoryError in the fake, a dropped connection."""


class FakeUpstream:
    """A fake backend; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = ("Hello", ",", " world"),
        token_delay: float = 0.0,
        embedding_dim: int = 3,
        model: str = "fake-model",
        port: int = 0,
    ) -> None:
        """``port``: listen there (a backend coming back where it was); 0: on one of this
        xdist worker's own ports."""
        self.tokens = tokens
        self.token_delay = token_delay
        self.embedding_dim = embedding_dim
        self.model = model
        self.finish_reason: str | None = None
        """An OpenAI stream's last ``finish_reason`` (default: ``stop``, ``tool_calls``)."""
        self.usage: dict[str, Any] | None = None
        """``usage`` in an OpenAI stream's last chunk, as llama.cpp's server sends it."""
        self.usage_apart = False
        """``usage`` in a chunk of its own after the last one (``choices: []``), as OpenAI
        sends it for ``stream_options.include_usage`` and vLLM when told to."""
        self.answering = threading.Event()
        """Cleared by :meth:`hold`: each request is read and recorded, and its answer waits
        for :meth:`release`."""
        self.answering.set()
        self.reasoning: tuple[str, ...] = ()
        """``reasoning_content`` pieces a thinking chat model streams before its answer
        (vLLM with a reasoning parser, llama.cpp's server), one frame each."""
        self.indexed_calls = True
        """False: tool-call parts without ``index``, as Ollama's OpenAI API sends them."""
        self.call_ids = True
        """False: tool calls begun without an ``id``, as some OpenAI-compatible servers."""
        self.port = 0
        self._listen_port = port
        self.disconnects = 0
        """Streams the client abandoned before their end."""
        self.completed = 0
        """Answers sent in full."""
        self.errors: list[BaseException] = []
        """Unexpected exceptions inside the server; a test may assert it is empty."""
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._default = Behaviour()
        self._scripted: deque[Behaviour] = deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # --- control, from any thread -----------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise AssertionError("the fake upstream has received no request")
            return self._requests[-1]

    def behave(self, behaviour: Behaviour, *, times: int | None = None) -> None:
        """Use ``behaviour`` for the next ``times`` requests, or from now on if ``None``."""
        with self._lock:
            if times is None:
                self._default = behaviour
                self._scripted.clear()
            else:
                self._scripted.extend([behaviour] * times)

    def hold(self) -> None:
        """Keep the answers of the requests from now on until :meth:`release`."""
        self.answering.clear()

    def release(self) -> None:
        self.answering.set()

    def reset_behaviour(self) -> None:
        self.behave(Behaviour())

    async def wait_for(self, predicate: Callable[[], bool], within: float = 2.0) -> None:
        """Poll ``predicate`` from an async test until it holds (the server runs elsewhere)."""
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {within} s")
            await asyncio.sleep(0.01)

    def start(self) -> FakeUpstream:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="fake-upstream", daemon=True
        )
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the server thread -------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve(ready))

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        writers: set[asyncio.StreamWriter] = set()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Called as the connection is made: a writer is known before its task runs.
            writers.add(writer)
            task = asyncio.get_running_loop().create_task(self._on_connection(reader, writer))
            task.add_done_callback(lambda _: forget(writer))

        def forget(writer: asyncio.StreamWriter) -> None:
            # Closed with nothing left to send, its socket closes on the next turn; one
            # with an answer left to send is kept, to be aborted at the stop.
            if not writer.transport.get_write_buffer_size():
                writers.discard(writer)

        # A port of this worker's own range (tests/ports.py), not the kernel's pick: that
        # comes from the ephemeral range, where once this server stops, an outgoing
        # connection or another worker's server may take it, and a backend restarted
        # on its port would find it in use.
        port = self._listen_port or free_port()
        server = await asyncio.start_server(accepted, "127.0.0.1", port)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        # No more accepts; then the connections accepted a moment before get their
        # transports while the server is open. The task that makes one, run after the
        # close, failed the server's check in the transport's constructor (an error
        # asyncio swallows) and left the socket and the half-made transport to the
        # garbage collector; cancelled before its first step, it never wrapped the
        # socket at all. Either was a ResourceWarning in whatever test ran then: a
        # flaky error (three sockets, once in a fresh clone's run; 336 in 300 stops of
        # a fake that six clients connect to as it stops).
        loop = asyncio.get_running_loop()
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(2):
            await asyncio.sleep(0)
        server.close()
        # Every task of this loop, not only the registered ones: a connection accepted
        # a moment before the stop has a task that has not run its first line yet; its
        # transport was left open (a ResourceWarning at collection: a flaky test).
        # Aborted, not closed: a transport closed with an answer its client has not read
        # waits to send it first, and this loop ends before it would (an unclosed
        # transport for the garbage collector again). Again until nothing is left.
        while True:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            for writer in list(writers):
                writer.transport.abort()
            writers.clear()
            for _ in range(2):
                await asyncio.sleep(0)  # let the aborted transports close their sockets
            if not writers and len(asyncio.all_tasks()) == 1:
                break
        await server.wait_closed()

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._scripted.popleft() if self._scripted else self._default

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            with self._lock:
                self._requests.append(request)
            behaviour = self._next_behaviour()
            while not self.answering.is_set():  # noqa: ASYNC110 - set from the test's thread
                await asyncio.sleep(0.01)
            await self._respond(request, behaviour, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported through self.errors
            self.errors.append(exc)
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> RecordedRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        path, _, query = target.partition("?")
        return RecordedRequest(method, path, headers, body, query)

    # --- answering ---------------------------------------------------------------

    async def _respond(
        self,
        request: RecordedRequest,
        behaviour: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        mode = behaviour.mode
        if mode == "hang":
            await self._until_client_leaves(reader)
            return
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if mode == "disconnect":
            return
        if mode == "status":
            body = behaviour.body
            if body is None:
                body = {"error": {"message": "fake upstream error", "code": behaviour.status}}
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            kind = "text/plain" if isinstance(body, str) else "application/json"
            extra = dict(behaviour.headers)
            if behaviour.retry_after:
                extra["Retry-After"] = behaviour.retry_after
            await self._send_whole(writer, behaviour.status, kind, raw, extra)
            return

        answer = self._answer(request)
        if answer.body is not None:
            if mode == "slow_first_token":
                await asyncio.sleep(behaviour.delay)
            raw = answer.body
            if mode == "malformed_json":
                raw = raw[: max(1, len(raw) // 2)]
            elif mode == "broken_sse":
                raw, answer.content_type = b"<html><body>Bad Gateway</body></html>", "text/html"
            await self._send_whole(writer, answer.status, answer.content_type, raw)
            return
        await self._stream(answer, behaviour, reader, writer)

    async def _send_whole(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(extra or {})}
        writer.write(_head(status, headers) + body)
        await writer.drain()
        self.completed += 1

    async def _stream(
        self,
        answer: _Answer,
        behaviour: Behaviour,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        frames = list(answer.frames)
        if behaviour.mode == "malformed_json":
            frames[0] = answer.malformed_frame
        elif behaviour.mode == "broken_sse":
            frames = [b"<html><body>Bad Gateway</body></html>\n", b"\n"]
        elif behaviour.mode == "stream_error" and answer.error_frame is not None:
            error = answer.error_frame(str(behaviour.body), behaviour.status)
            frames = [*frames[: behaviour.after], error]
        headers = {"Content-Type": answer.content_type, "Transfer-Encoding": "chunked"}
        writer.write(_head(200, headers))
        await writer.drain()
        gone = asyncio.ensure_future(self._until_client_leaves(reader))
        if behaviour.mode in ("endless", "endless_event"):
            line = b"data: " + b"x" * 4000 + b"\n"
            frame = frames[0] if behaviour.mode == "endless" else line
            frames = itertools.repeat(b"".join(itertools.repeat(frame, 16)))
        try:
            for index, frame in enumerate(frames):
                if behaviour.mode == "cut" and index >= behaviour.after:
                    return  # close without the last chunk
                paused_at = behaviour.after if behaviour.mode == "stall" else 0
                pause = behaviour.delay if index == paused_at else self.token_delay
                if pause:
                    await asyncio.wait({gone}, timeout=pause)
                if gone.done():
                    self.disconnects += 1
                    return
                writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                try:
                    await writer.drain()
                except ConnectionError:
                    self.disconnects += 1
                    return
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.completed += 1
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)

    @staticmethod
    async def _until_client_leaves(reader: asyncio.StreamReader) -> None:
        while await reader.read(1024):
            pass

    def _answer(self, request: RecordedRequest) -> _Answer:
        path = request.path
        if request.method == "GET":
            if path.endswith("/health"):
                return _json_answer({"status": "ok"})
            if path.endswith("/api/tags"):
                return _json_answer({"models": [{"name": self.model}]})
            if path.endswith("/models"):
                return _json_answer({"object": "list", "data": [{"id": self.model}]})
            return _json_answer({"error": {"message": f"no route {path}"}}, status=404)
        try:
            body = request.json or {}
        except ValueError:
            return _json_answer({"error": {"message": "request body is not JSON"}}, status=400)
        if path.endswith("/chat/completions"):
            return self._openai_stream(body, chat=True)
        if path.endswith("/fim/completions"):
            return self._openai_stream(body, chat=True)
        if path.endswith("/completions"):
            return self._openai_stream(body, chat=False)
        if path.endswith("/completion"):
            return self._llamacpp_completion(body)
        if path.endswith("/api/generate"):
            return self._ollama_generate(body)
        if path.endswith("/api/embed"):
            vectors = self._vectors(body.get("input", []))
            read = embedding_usage(body.get("input", []))
            answer = {"model": body.get("model"), "embeddings": vectors, "prompt_eval_count": read}
            return _json_answer(answer)
        if path.endswith(("/embeddings", "/embedding")):
            if "content" in body:
                vectors = self._vectors(body["content"])
                return _json_answer([{"index": i, "embedding": [v]} for i, v in enumerate(vectors)])
            vectors = self._vectors(body.get("input", []))
            size = body.get("dimensions") or body.get("output_dimension")  # OpenAI's, Voyage's
            if isinstance(size, int) and size > MAX_DIMENSIONS:  # as OpenAI refuses it
                error = {"message": f"dimensions {size} is over {MAX_DIMENSIONS}"}
                return _json_answer({"error": {**error, "param": "dimensions"}}, status=400)
            if isinstance(size, int):
                vectors = [(vector + [0.5] * size)[:size] for vector in vectors]
            data = [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ]
            read = embedding_usage(body.get("input", []))
            usage = {"prompt_tokens": read, "total_tokens": read}
            answer = {"object": "list", "data": data, "model": body.get("model"), "usage": usage}
            return _json_answer(answer)
        return _json_answer({"error": {"message": f"no route {path}"}}, status=404)

    def _vectors(self, texts: object) -> list[list[float]]:
        """A deterministic vector per text: its length, then its position, then 0.5s."""
        items = texts if isinstance(texts, list) else [texts]
        vectors = []
        for index, text in enumerate(items):
            vector = [float(len(str(text))), float(index)] + [0.5] * self.embedding_dim
            vectors.append(vector[: self.embedding_dim])
        return vectors

    def _openai_stream(self, body: dict[str, Any], *, chat: bool) -> _Answer:
        text = "".join(self.tokens)
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            head = {"id": "cmpl-fake", "model": self.model, "system_fingerprint": FINGERPRINT}
            return _json_answer({**head, "choices": [choice]})
        payloads: list[dict[str, Any]] = []
        calls = _tool_call_deltas(body) if chat else []
        for thought in self.reasoning if chat else ():
            part = {"delta": {"content": None, "reasoning_content": thought}}
            payloads.append({"index": 0, "finish_reason": None, **part})
        for token in () if calls else self.tokens:
            part = {"delta": {"content": token}} if chat else {"text": token}
            payloads.append({"index": 0, "finish_reason": None, **part})
        for call in calls:
            if not self.indexed_calls:
                call = {key: value for key, value in call.items() if key != "index"}
            if not self.call_ids:
                call = {key: value for key, value in call.items() if key != "id"}
            payloads.append({"index": 0, "finish_reason": None, "delta": {"tool_calls": [call]}})
        finish = self.finish_reason or ("tool_calls" if calls else "stop")
        payloads.append(
            {"index": 0, "finish_reason": finish, **({"delta": {}} if chat else {"text": ""})}
        )
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"model": self.model, "system_fingerprint": FINGERPRINT}
        frames = [
            _sse({"id": "cmpl-fake", "object": kind, **head, "choices": [p]}) for p in payloads
        ]
        if self.usage is not None and self.usage_apart:
            frames.append(
                _sse({"id": "cmpl-fake", "object": kind, "choices": [], "usage": self.usage})
            )
        elif self.usage is not None:
            last = json.loads(frames[-1].removeprefix(b"data: "))
            frames[-1] = _sse({**last, "usage": self.usage})
        frames.append(b"data: [DONE]\n\n")
        return _Answer(
            "text/event-stream",
            frames,
            malformed_frame=_MALFORMED_SSE,
            error_frame=_openai_error_frame,
        )

    def _llamacpp_completion(self, body: dict[str, Any]) -> _Answer:
        if not body.get("stream"):
            return _json_answer({"content": "".join(self.tokens), "stop": True})
        frames = [_sse({"content": token, "stop": False}) for token in self.tokens]
        timings = llamacpp_timings(str(body.get("prompt", "")), len(self.tokens))
        frames.append(_sse({"content": "", "stop": True, "stop_type": "eos", "timings": timings}))
        return _Answer(
            "text/event-stream",
            frames,
            malformed_frame=_MALFORMED_SSE,
            error_frame=_llamacpp_error_frame,
        )

    def _ollama_generate(self, body: dict[str, Any]) -> _Answer:
        model = body.get("model")
        if not body.get("stream", True):
            return _json_answer({"model": model, "response": "".join(self.tokens), "done": True})
        frames = [_ndjson({"model": model, "response": t, "done": False}) for t in self.tokens]
        frames.append(
            _ndjson({"model": model, "response": "", "done": True, "done_reason": "stop"})
        )
        return _Answer(
            "application/x-ndjson",
            frames,
            malformed_frame=_MALFORMED_NDJSON,
            error_frame=lambda message, _status: _ndjson({"error": message}),
        )


def _tool_call_deltas(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat with ``tools`` calls them, as a model that calls tools streams it: the
    named ``tool_choice``, else the first tool, and the second too when there is one and
    ``parallel_tool_calls`` is not false. A call's first part brings its id and name,
    two more its arguments: ``{"call": <index>, "messages": <messages sent>}``."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return []
    names = [tool["function"]["name"] for tool in tools]
    if isinstance(choice, dict):
        names = [choice["function"]["name"]]
    elif body.get("parallel_tool_calls") is False:
        names = names[:1]
    deltas: list[dict[str, Any]] = []
    for index, name in enumerate(names[:2]):
        arguments = json.dumps({"call": index, "messages": len(body.get("messages", []))})
        half = len(arguments) // 2
        deltas.append(
            {
                "index": index,
                "id": f"call_{index}",
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
        )
        deltas += [
            {"index": index, "function": {"arguments": part}}
            for part in (arguments[:half], arguments[half:])
        ]
    return deltas


FINGERPRINT = "fp_fake"
"""The ``system_fingerprint`` the fake OpenAI-style answers carry, as OpenAI's do."""


def _json_answer(payload: object, status: int = 200) -> _Answer:
    return _Answer("application/json", body=json.dumps(payload).encode(), status=status)


_MALFORMED_SSE = b'data: {"choices": [{"text": "Hel\n\n'
_MALFORMED_NDJSON = b'{"response": "Hel\n'


def llamacpp_timings(prompt: str, generated: int) -> dict[str, float]:
    """What llama.cpp's server says of a generation in its last chunk, made up from the
    prompt: a token per 4 characters, half of them from its cache, 2 ms per token read."""
    total = max(1, len(prompt) // 4)
    cached = total // 2
    return {
        "cache_n": cached,
        "prompt_n": total - cached,
        "prompt_ms": 2.0 * (total - cached),
        "predicted_n": generated,
        "predicted_ms": 1.0 * generated,
    }


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _openai_error_frame(message: str, status: int) -> bytes:
    return _sse({"error": {"message": message, "type": "server_error", "code": status}})


def _llamacpp_error_frame(message: str, status: int) -> bytes:
    error = {"code": status, "message": message, "type": "server_error"}
    return b"error: " + json.dumps(error).encode() + b"\n\n"


def _ndjson(payload: object) -> bytes:
    return json.dumps(payload).encode() + b"\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def unused_port() -> int:
    """A loopback port with nothing listening, that no other test of this run is handed."""
    return free_port()
