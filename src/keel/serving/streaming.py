"""Server-sent events for streamed generations.

The first piece is awaited before the response starts, so a provider that
fails before producing anything gets a real HTTP error status. A failure
after text was sent ends the stream with an error event in OpenAI's form,
then ``[DONE]``; the upstream stream is always closed, which cancels its work.

A generation stream with nothing to send for :data:`HEARTBEAT_SECONDS` (a long
prefill, a queue for admission, a stall between pieces) sends an SSE comment,
``: keep-alive``, committing the 200 first if no piece came yet: a reverse proxy's
read timeout (nginx's ``proxy_read_timeout``, 60 s) cut a stream whose first token
took longer, a 504 at the proxy. A failure after such a commit is the stream's
error event and ``[DONE]``, as a failure mid-way is. The stream's one timer (the
write-stall check) sees to it: nothing more a piece.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from keel import jsoncodec
from keel.errors import KeelError, Unavailable, internal_error
from keel.providers.base import close_stream
from keel.router.attempt import UNDERWAY, Underway
from keel.serving.lifecycle import FAILURE_KEY, PROVIDER_KEY

log = logging.getLogger("keel.serving")


def sse(data: object) -> bytes:
    return b"data: " + jsoncodec.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"

STOPPING = "keel is stopping"
"""The message of the cancel a stopping server sends the requests still running as its
grace period ends (:class:`keel.ops.server.Server`): they end with an answer."""


OUTCOME = "stream_outcome"
"""The request state's key for how a stream that began with a 200 ended, when not well:
the status of the error it ended with, 499 when the client left. The request metrics and
the access log count it so (a stream cut by a stall counted as a 200: the 5xx alert
never saw one)."""


WRITE_STALL_SECONDS = 30.0
"""How long a stream's write may wait on a client that takes none of it before the
connection is dropped: one that stopped reading (or read a byte a second) held its
admission slot, and the generation, for as long as it kept the socket open."""

STALL_CHECK_SECONDS = 5.0
"""How often a stream looks for a write stuck that long (one timer a stream, not one a
write)."""

CLOSING_WRITE_SECONDS = 0.5
"""How long the closing event of a stream keel's stop cuts short may wait on its client
(less than :data:`keel.ops.server.END_MARGIN`)."""

HEARTBEAT_SECONDS = 15.0
"""How long a generation stream may send nothing before it sends ``: keep-alive`` (and
commits its 200, if no piece came yet): well within a reverse proxy's read timeout
(nginx's default 60 s, Cloudflare's 100 s)."""

KEEP_ALIVE: Message = {"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True}
"""The heartbeat: an SSE comment, which clients skip."""

ABORT = "keel.abort"
"""The scope's ``extensions`` key of a callable that drops the connection at once
(:class:`keel.ops.http_limits.HeadLimitedProtocol` gives it)."""


def stopped() -> Unavailable:
    return Unavailable(
        f"{STOPPING} (its shutdown grace period is over): the answer is cut short; "
        "send the request again"
    )


def progress_stopped() -> Unavailable:
    return Unavailable(
        f"{STOPPING} (its shutdown grace period is over): this was stopped before it "
        "finished; send the request again once keel is back"
    )


class EventStream(Response):
    """A server-sent-events response; a client that leaves cancels it.

    One plain task waits for the client's disconnect and cancels the request's
    task, which closes the body (and with it the generation upstream). Starlette's
    StreamingResponse does the same through an anyio task group and cancel scopes
    (under uvicorn's ASGI 2.3), a cost paid for every stream.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        *,
        progress: dict[str, object] | None = None,
        release: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``progress``: this is a progress stream (a model load or download, TabbyAPI's
        events), and these are the fields of its error event (``status: error`` and the
        model or role). Cut short by keel's stop, it ends with that error event alone,
        no ``[DONE]`` (TabbyAPI sends none, and its clients read every line as JSON);
        a generation stream (None) ends with OpenAI's error event and ``[DONE]``.
        ``release``: what lets go of the work behind ``chunks`` (a generation begun), for
        a stream closed before its first chunk is asked for, whose generator runs none
        of its own cleanup."""
        self.chunks = chunks
        self.release = release
        self.progress = progress
        self.failed: int | None = None
        """The status of the error the stream ended with (see :data:`OUTCOME`)."""
        self.why: str | None = None
        """Why it ended so, for the request's one access-log line (it had a line of its
        own too: two warnings for one stalled stream, and the access line said no why)."""
        self.status_code = 200
        self.background = None
        # no-store: the answer is private code, as every answer of keel's (no-cache let a
        # cache keep it)
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        left = done = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not done:  # a cancel now could only land after the try below
                left = True
                task.cancel("client disconnected")

        def drop() -> None:
            abort = (scope.get("extensions") or {}).get(ABORT)
            if abort is not None:
                abort()  # the write returns, the watcher sees the client gone
            elif not done:
                watcher.cancel()
                task.cancel("client disconnected")

        watcher = asyncio.get_running_loop().create_task(watch())
        state = scope.setdefault("state", {})
        write = _Writes(send, drop, self.raw_headers, state, generation=self.progress is None)
        try:
            await self._chunks(write)
            done = True
            await write(b"", False)
        except asyncio.CancelledError as exc:
            if left:
                self.failed = 499
                if task.uncancel() > 0:
                    raise
            elif STOPPING in exc.args and write.started and task.uncancel() == 0:
                log.warning("stream cut short: %s", STOPPING)
                self.failed = stopped().status_code
                done = True
                try:  # before the server's own cancel at the grace's end: a traceback
                    async with asyncio.timeout(CLOSING_WRITE_SECONDS):
                        await write(self._closing(), False)
                except TimeoutError:  # a client taking none of it
                    drop()
            else:
                raise
        except Exception as exc:  # before its first piece, after a heartbeat's commit
            if not write.started:
                raise  # answered with its own status
            done = True
            await write(self._failing(exc), False)
        finally:
            if self.failed is not None:
                state[OUTCOME] = self.failed
                if self.why is not None:
                    state[FAILURE_KEY] = self.why
            write.close()
            watcher.cancel()
            await self.close()  # left mid-way: the generation is closed now

    async def _chunks(self, write: _Writes) -> None:
        """The first chunk before the 200 (a failure before it has its own status), unless
        a heartbeat committed it; then the others. The start is watched as the body is:
        behind answers a pipelining client never read, it waited for ever, holding the
        request's admission slot and its upstream. A progress stream's 200 goes first, as
        its errors are events of its own (and its clients read no heartbeat)."""
        if self.progress is not None:
            await write.begin()
        first = await anext(self.chunks, b"")
        await write.begin()
        if first:
            await write(first, True)
        async for chunk in self.chunks:
            await write(chunk, True)

    async def close(self) -> None:
        """Close the chunks, and what is behind them though none was asked for."""
        await self.chunks.aclose()
        if self.release is not None:
            await self.release()

    def _failing(self, exc: Exception) -> bytes:
        """The last event of a stream failed before its first piece, once a heartbeat
        committed its 200."""
        if not isinstance(exc, KeelError):
            log.exception("stream ended by an unexpected error", exc_info=exc)
            exc = internal_error()
        self.failed, self.why = exc.status_code, f"{type(exc).__name__}: {exc.message}"
        return sse(exc.to_body()) + DONE

    def _closing(self) -> bytes:
        """The last event of a stream keel's stop cuts short."""
        if self.progress is None:
            return sse(stopped().to_body()) + DONE
        return sse({**progress_stopped().to_body(), **self.progress})


class _Writes:
    """A stream's writes, watched by one timer a stream (not one a write): a write stuck
    on a client that takes none of it for :data:`WRITE_STALL_SECONDS` calls ``drop``;
    for a generation (``underway``), :data:`HEARTBEAT_SECONDS` without a write send
    ``: keep-alive`` once a provider works on it (the
    ``start`` first, if not sent)."""

    def __init__(
        self,
        send: Send,
        drop: Callable[[], None],
        headers: list[tuple[bytes, bytes]],
        state: dict[str, Any],
        *,
        generation: bool,
    ) -> None:
        self.send, self.drop, self.state = send, drop, state
        self.start: Message = {"type": "http.response.start", "status": 200, "headers": headers}
        self.underway: Underway | None = None
        if generation:  # its attempts say when a provider works on it (this task's context)
            self.underway = Underway()
            UNDERWAY.set(self.underway)
        self.started = False
        self.loop = asyncio.get_running_loop()
        self.since: float | None = None
        """When the write under way began (None: none is)."""
        self.last = self.loop.time()
        """When the last write began (the stream, before any)."""
        self.beating: asyncio.Task[None] | None = None
        self.every = min(STALL_CHECK_SECONDS, HEARTBEAT_SECONDS)
        self.checker = self.loop.call_later(self.every, self.look)

    async def begin(self) -> None:
        """The 200 and its headers, once."""
        if not self.started:
            self.started = True
            await self.message(self.start)

    async def __call__(self, body: bytes, more: bool) -> None:
        if self.beating is not None:  # its writes go first
            await self.beating
            self.beating = None
        await self.message({"type": "http.response.body", "body": body, "more_body": more})

    async def message(self, message: Message) -> None:
        self.since = self.last = self.loop.time()
        await self.send(message)
        self.since = None

    def look(self) -> None:
        now = self.loop.time()
        if self.since is not None and now - self.since >= WRITE_STALL_SECONDS:
            log.warning("a client took none of its stream for %.0f s: dropped", WRITE_STALL_SECONDS)
            self.drop()
            return
        quiet = self.since is None and now - self.last >= HEARTBEAT_SECONDS
        # Before its first piece, only while a provider works on it: waiting for a slot,
        # its refusal (a 429, Retry-After) is still to come with its own status.
        beats = self.underway is not None and (self.started or self.underway.working)
        if beats and quiet and (self.beating is None or self.beating.done()):
            self.beating = self.loop.create_task(self.beat())
        self.checker = self.loop.call_later(self.every, self.look)

    async def beat(self) -> None:
        if not self.started and self.underway is not None:  # X-Keel-Provider: the one on it
            self.state.setdefault(PROVIDER_KEY, self.underway.provider)
        await self.begin()
        await self.message(KEEP_ALIVE)

    def close(self) -> None:
        self.checker.cancel()
        if self.beating is not None:
            self.beating.cancel()


async def stream_response(
    pieces: AsyncIterator[str],
    *,
    head: Callable[[], list[dict[str, object]]],
    chunk: Callable[[str], dict[str, object]],
    tail: Callable[[], Awaitable[list[dict[str, object]]]],
) -> EventStream:
    """An SSE response: the events ``head()`` gives once the first piece is in (the
    provider that serves is known then), one ``chunk(text)`` per piece, then the
    events ``tail()`` gives once the pieces are done (finish reason, usage). The head
    goes out with the first piece and the tail with ``[DONE]``: fewer writes, the same
    events. The first piece is awaited as the response is sent (see
    :class:`EventStream`): a failure before it is raised, to be answered with its own
    status. The stream has no time limit as a whole: the client asked for its length,
    and the router holds the backend to its first-token and stall limits.
    """
    iterator = aiter(pieces)

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            first = await anext(iterator, None)
        except BaseException:
            await close_stream(pieces)
            raise
        opening = b""
        try:
            opening = b"".join([sse(event) for event in head()])
            if first is not None:
                yield opening + sse(chunk(first))
                opening = b""
                async for piece in iterator:
                    yield sse(chunk(piece))
            closing = b"".join([sse(event) for event in await tail()])
        except KeelError as exc:
            stream.failed, stream.why = exc.status_code, f"{type(exc).__name__}: {exc.message}"
            closing = sse(exc.to_body())
        except Exception:  # a bug: the client still gets an error event and its end
            log.exception("stream ended by an unexpected error")
            error = internal_error()
            stream.failed = error.status_code
            closing = sse(error.to_body())
        finally:
            await close_stream(pieces)
        yield opening + closing + DONE

    stream = EventStream(events(), release=functools.partial(close_stream, pieces))
    return stream
