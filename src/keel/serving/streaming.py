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
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from keel.errors import KeelError, UpstreamTimeout
from keel.providers.base import close_stream

log = logging.getLogger("keel.serving")


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


async def stream_response(
    pieces: AsyncIterator[str],
    *,
    head: list[dict[str, object]],
    chunk: Callable[[str], dict[str, object]],
    tail: Callable[[], Awaitable[list[dict[str, object]]]],
) -> StreamingResponse:
    """An SSE response: ``head`` events, one ``chunk(text)`` per piece, then the
    events ``tail()`` gives once the pieces are done (finish reason, usage)."""
    iterator = aiter(pieces)
    try:
        first: str | None = await anext(iterator)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await close_stream(pieces)
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            for event in head:
                yield sse(event)
            if first is not None:
                yield sse(chunk(first))
                async for piece in iterator:
                    yield sse(chunk(piece))
            for event in await tail():
                yield sse(event)
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
