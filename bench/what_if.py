"""Run ``keel serve`` with proposed performance fixes applied from outside.

The bench measures keel as it is; this runs the same keel with changes the
bench's findings propose, so their gain is measured side by side in the same
run rather than guessed. Each fix is a small patch of one keel function,
named in ``KEEL_WHAT_IF`` (comma-separated; default ``nodelay,uvloop,quiet``:
``drain`` is measured on demand, as it costs throughput at concurrency 32):

- ``nodelay``: ``keel.cli._bind`` creates its socket with ``proto=0``, so
  asyncio's ``_set_nodelay`` (which checks ``sock.proto == IPPROTO_TCP``)
  leaves Nagle's algorithm on for every accepted connection; a response
  written in two parts (head, then body) then waits for the client's delayed
  ACK, about 40 ms. Patched: the socket is created with ``IPPROTO_TCP``.
- ``drain``: ``HttpUpstream.sse_payloads`` stops reading at ``[DONE]`` (and
  ``stream_choice_text`` at ``finish_reason``), before the chunked body's
  last chunk, so httpx must drop the connection: one new TCP connection to the
  backend per request. Patched: the rest of a finished body is read (bounded
  by 50 ms) so the connection goes back to the pool. Measured: it saves the
  connect at concurrency 1 but costs about a third of the throughput at 32,
  where httpcore's pool bookkeeping (encode/httpx#3215) costs more than a connect.
- ``uvloop``: ``keel.cli.cmd_serve`` calls ``asyncio.run(server.serve())``,
  which bypasses uvicorn's loop setup, so keel runs on the stdlib loop even
  though uvloop is installed (``uvicorn[standard]``). Patched: ``uvloop.run``.
- ``quiet``: httpx logs one INFO line per upstream request into keel's log.
  Patched: the ``httpx`` logger at WARNING.

Only the bench runs this (``python bench/what_if.py serve --port N``); when a
fix has landed in keel its patch finds nothing to change and is skipped.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import sys
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

FIXES = ("nodelay", "uvloop", "quiet")


def patch_nodelay() -> bool:
    import keel.cli as cli

    original = cli._bind
    if "IPPROTO_TCP" in inspect.getsource(original):
        return False

    class TcpSocket(socket.socket):
        def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None):
            if fileno is None and type == socket.SOCK_STREAM and proto in (-1, 0):
                proto = socket.IPPROTO_TCP
            super().__init__(family, type, proto, fileno)

    class SocketModule:
        def __getattr__(self, name: str) -> Any:
            return TcpSocket if name == "socket" else getattr(socket, name)

    cli.socket = SocketModule()  # type: ignore[assignment]
    return True


def patch_drain() -> bool:
    from keel.providers import http_base

    upstream_class = http_base.HttpUpstream
    if "drain" in inspect.getsource(upstream_class.sse_payloads):
        return False

    async def sse_payloads(
        self: Any, path: str, body: Mapping[str, Any]
    ) -> AsyncGenerator[http_base.JsonObject, None]:
        async with (
            self.stream(path, body) as response,
            aclosing(http_base.response_lines(response)) as lines,
        ):
            payloads = http_base.iter_sse_json(lines, self.provider)
            finished = False
            try:
                async for payload in payloads:
                    yield payload
                finished = True
            except GeneratorExit:
                finished = True  # the reader has what it needs (finish_reason)
                raise
            finally:
                await payloads.aclose()
                if finished:
                    try:
                        async with asyncio.timeout(0.05):
                            async for _ in lines:
                                pass
                    except (TimeoutError, Exception):  # noqa: BLE001 - close as before
                        pass

    upstream_class.sse_payloads = sse_payloads  # type: ignore[method-assign]
    return True


def patch_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    import keel.cli as cli

    if "uvloop" in inspect.getsource(cli.cmd_serve):
        return False

    class AsyncioWithUvloop:
        def __getattr__(self, name: str) -> Any:
            return uvloop.run if name == "run" else getattr(asyncio, name)

    cli.asyncio = AsyncioWithUvloop()  # type: ignore[assignment]
    return True


def patch_quiet() -> bool:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return True


def main() -> int:
    wanted = [f for f in os.environ.get("KEEL_WHAT_IF", ",".join(FIXES)).split(",") if f]
    patches = {
        "nodelay": patch_nodelay,
        "drain": patch_drain,
        "uvloop": patch_uvloop,
        "quiet": patch_quiet,
    }
    applied = [name for name in wanted if patches[name]()]
    print(f"what_if: applied {applied or 'nothing'}", file=sys.stderr, flush=True)
    import keel.cli as cli

    result: int = cli.main()
    return result


if __name__ == "__main__":
    sys.exit(main())
