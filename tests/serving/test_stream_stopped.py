"""How a stream still running when keel's shutdown grace ends is closed, by its kind.

A progress stream (a model load or download) ended with a generation's closing: an
error event without its ``status``/``model`` fields, then ``[DONE]``, which TabbyAPI
does not send and its clients parse as JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

from keel.serving.streaming import STOPPING, EventStream, sse


async def _forever() -> AsyncGenerator[bytes, None]:
    yield sse({"status": "downloading"})
    await asyncio.Event().wait()
    yield b""  # never reached


async def _cut_by_stop(stream: EventStream) -> bytes:
    """Serve ``stream`` to a client that stays, cancel it as keel's stop does, and
    return what the client was sent."""
    sent: list[bytes] = []
    first = asyncio.Event()
    stay = asyncio.Event()

    async def receive() -> dict[str, object]:
        await stay.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(bytes(message["body"]))  # type: ignore[arg-type]
            first.set()

    task = asyncio.create_task(stream({"type": "http"}, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(first.wait(), 10)
    task.cancel(STOPPING)
    await asyncio.wait_for(task, 10)
    return b"".join(sent)


def _events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


async def test_a_progress_stream_ends_with_its_own_error_event_and_no_done() -> None:
    fields = {"status": "error", "model": "org/repo:file.gguf"}
    stream = EventStream(_forever(), progress=fields)
    events = _events(await _cut_by_stop(stream))
    assert "[DONE]" not in events, events
    last = json.loads(events[-1])
    assert last["status"] == "error" and last["model"] == "org/repo:file.gguf", last
    assert last["error"]["message"].startswith(STOPPING), last
    assert stream.failed == 503


async def test_a_generation_stream_still_ends_with_done() -> None:
    stream = EventStream(_forever())
    events = _events(await _cut_by_stop(stream))
    assert events[-1] == "[DONE]", events
    assert json.loads(events[-2])["error"]["code"] == "unavailable"
