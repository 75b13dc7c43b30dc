"""A chat answer has no limit as a whole, only its backend's first-token and stall
limits (as the README says): it was cut at 300 s while the backend still sent tokens,
a slow model's long answer or a reasoning model's minutes of thought, and, not
streamed, all of it was lost as a 504 (which the openai SDK sent twice more)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from keel.serving.streaming import stream_response


async def _slow_pieces() -> AsyncIterator[str]:
    for index in range(4):
        await asyncio.sleep(0.1)
        yield f"w{index} "


async def _served(timeout: float | None) -> str:
    stream = await stream_response(
        _slow_pieces(),
        head=list,
        chunk=lambda text: {"text": text},
        tail=_no_tail,
        timeout=timeout,
        role="chat",
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


async def test_a_stream_with_no_limit_runs_to_its_end() -> None:
    cut = await _served(0.15)
    assert "upstream_timeout" in cut and "w3" not in cut, cut
    whole = await _served(None)
    assert "w3" in whole and "error" not in whole and whole.endswith("data: [DONE]\n\n"), whole
