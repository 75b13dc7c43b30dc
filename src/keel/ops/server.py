"""uvicorn's server, ending the requests still running as the shutdown grace ends.

On SIGTERM uvicorn stops accepting, waits up to ``timeout_graceful_shutdown`` for
requests and streams in flight, then cancels them: a stream stopped there ended
with no end (no error event, no ``[DONE]``: the OpenAI SDK raises a connection
error) and every one logged a traceback. A moment before the grace ends, keel
cancels them itself with :data:`~keel.serving.streaming.STOPPING`: a stream ends
with an error event and ``[DONE]``, a request not yet answered gets a 503 saying
to send it again (:class:`keel.api.middleware.KeelMiddleware`).

It wakes once a second while idle, for the ``Date`` header, and at once when a signal
tells it to stop: uvicorn's loop woke ten times a second to see whether to stop.

Its HTTP parser is uvicorn's httptools one (uvicorn's ``auto``; httptools comes with
``uvicorn[standard]``) with a cap on a request's head:
:class:`keel.ops.http_limits.HeadLimitedProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from keel.ops.http_limits import HeadLimitedProtocol
from keel.serving.streaming import STOPPING

log = logging.getLogger("keel")

END_MARGIN = 1.0
"""Seconds before the grace ends that the requests still running are ended (at most a
fifth of the grace), time for their last writes."""


_stopping: list[Callable[[], object]] = []


@contextlib.contextmanager
def on_stop(callback: Callable[[], object]) -> Iterator[None]:
    """``callback`` called (on the loop) as keel begins to stop (SIGTERM, Ctrl-C), while
    in this block: for work the stop throws away, which would otherwise hold the stop
    for the whole grace (a model load: 39 s with the default 30)."""
    _stopping.append(callback)
    try:
        yield
    finally:
        _stopping.remove(callback)


OWN_FDS = 64
"""File descriptors kept for keel's own use (~25 at rest: listeners, workers' pipes,
files, its loop) whatever the clients do."""
FD_HEADROOM = 2
"""Of the rest, each client connection may need this many: its own, and one to the model
server it is sent on to. Half of all went to clients before: at a limit of 128, 64
clients, 64 backend sockets and keel's own ran out, and the backend was blamed for
keel's "Too many open files" (its breaker counted it; the fallback served)."""
LOW_FD_LIMIT = 1024


def max_connections(limit: int) -> int:
    """The client connections keel takes at once with ``limit`` file descriptors."""
    return max(8, (limit - OWN_FDS) // FD_HEADROOM)


def raise_fd_limit() -> int:
    """Raise the open-file limit to what the system allows keel (as Go's runtime does: a
    systemd service starts at 1,024); the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        if config.http in ("auto", "httptools"):
            config.http = HeadLimitedProtocol
            limit = raise_fd_limit()
            HeadLimitedProtocol.max_connections = max_connections(limit)
            if limit < LOW_FD_LIMIT:
                log.warning(
                    "the open-file limit is %d, the most this system lets keel raise it to, "
                    "so keel takes %d client connections at once (a 503 for the next): raise "
                    "it (ulimit -n; systemd LimitNOFILE=; docker --ulimit nofile=) to %d or "
                    "more",
                    limit,
                    HeadLimitedProtocol.max_connections,
                    LOW_FD_LIMIT,
                )
        super().__init__(config)
        self._woken: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._hurried = False

    async def main_loop(self) -> None:
        """uvicorn's, with one tick a second instead of ten (each tick updates the
        ``Date`` header every tenth time and checks whether to stop): a signal to stop
        wakes it at once. An idle keel woke its event loop 10 times a second for this."""
        wake = asyncio.Event()
        self._woken = (asyncio.get_running_loop(), wake)
        should_exit = await self.on_tick(0)
        while not should_exit:
            with contextlib.suppress(TimeoutError):  # the next second begins
                await asyncio.wait_for(wake.wait(), 1 - time.time() % 1)
            should_exit = await self.on_tick(0)  # 0: the Date header is updated

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first SIGTERM or SIGINT begins the drain; a second ends it at once, each
        request still running with its answer, as the grace's end does (uvicorn's force
        exit on a second Ctrl-C cut streams with neither an error event nor ``[DONE]``
        and logged a CancelledError traceback each; a second SIGTERM did nothing). The
        process ends as the first signal asked. A third is uvicorn's: a Ctrl-C forces."""
        if self.should_exit and not self._hurried and self._woken is not None:
            self._hurried = True
            loop, _ = self._woken
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing runs
                loop.call_soon_threadsafe(self._end_requests, "a second signal")
            return
        super().handle_exit(sig, frame)
        if self._woken is not None:
            loop, wake = self._woken
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to wake
                loop.call_soon_threadsafe(wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for callback in list(_stopping):
            callback()
        grace = self.config.timeout_graceful_shutdown
        ending = None
        if grace:
            delay = grace - min(END_MARGIN, grace / 5)
            ending = asyncio.get_running_loop().call_later(
                delay, self._end_requests, "shutdown grace over"
            )
        try:
            await super().shutdown(sockets)
        finally:
            if ending is not None:
                ending.cancel()

    def _end_requests(self, why: str) -> None:
        tasks = [task for task in self.server_state.tasks if not task.done()]
        if tasks:
            log.warning("%s: ending %d request(s) still running", why, len(tasks))
        for task in tasks:
            task.cancel(msg=STOPPING)
