"""Server-sent events for streamed generations.

The first piece is awaited before the response starts, so a provider that
fails before producing anything gets a real HTTP error status. A failure
after text was sent ends the stream with an error event in OpenAI's form,
then ``[DONE]``; the upstream stream is always closed, which cancels its work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from keel.errors import KeelError, UpstreamTimeout
from keel.providers.base import close_stream

log = logging.getLogger("keel.api")


def sse(data: object) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def with_timeout(
    pieces: AsyncIterator[str], timeout: float, provider: str
) -> AsyncIterator[str]:
    """Pieces of ``pieces``, failing with UpstreamTimeout once ``timeout`` has passed in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    iterator = aiter(pieces)
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    piece = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout(
                    f"generation took longer than {timeout:.0f}s", provider=provider
                ) from None
            yield piece
    finally:
        await close_stream(pieces)


async def collect(pieces: AsyncIterator[str]) -> tuple[str, int]:
    parts = [piece async for piece in pieces]
    return "".join(parts), len(parts)


async def stream_response(
    pieces: AsyncIterator[str],
    *,
    head: list[dict[str, object]],
    chunk: Callable[[str], dict[str, object]],
    tail: Callable[[int], dict[str, object]],
) -> StreamingResponse:
    """An SSE response: ``head`` events, one ``chunk(text)`` per piece, ``tail(count)``."""
    iterator = aiter(pieces)
    try:
        first: str | None = await anext(iterator)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await close_stream(pieces)
        raise

    async def events() -> AsyncIterator[bytes]:
        count = 0
        try:
            for event in head:
                yield sse(event)
            if first is not None:
                count += 1
                yield sse(chunk(first))
                async for piece in iterator:
                    count += 1
                    yield sse(chunk(piece))
            yield sse(tail(count))
        except KeelError as exc:
            log.warning("stream ended by %s: %s", type(exc).__name__, exc.message)
            yield sse(exc.to_body())
        finally:
            await close_stream(pieces)
        yield DONE

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
