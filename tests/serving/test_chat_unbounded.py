"""A streamed answer has no limit as a whole, only its backend's first-token and stall
limits (as the README says): a chat was cut at 300 s while the backend still sent
tokens, a slow model's long answer or a reasoning model's minutes of thought, and an
OpenAI completion at ``completion_timeout`` (the non-streamed ones are in
tests/chaos/test_breaker_and_budget.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from keel.serving.streaming import stream_response


async def _slow_pieces() -> AsyncIterator[str]:
    for index in range(4):
        await asyncio.sleep(0.1)
        yield f"w{index} "


async def _served() -> str:
    stream = await stream_response(
        _slow_pieces(), head=list, chunk=lambda text: {"text": text}, tail=_no_tail
    )
    sent: list[bytes] = []

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body":
            sent.append(bytes(message["body"]))  # type: ignore[arg-type]

    await stream({"type": "http"}, receive, send)  # type: ignore[arg-type]
    return b"".join(sent).decode()


async def _no_tail() -> list[dict[str, object]]:
    return []


async def test_a_stream_runs_to_its_end() -> None:
    whole = await _served()
    assert "w3" in whole and "error" not in whole and whole.endswith("data: [DONE]\n\n"), whole
