"""Feed the status page's :class:`~keel.ops.stats.RequestStats` with model requests.

Pure ASGI, like the metrics middleware, so a streamed completion is timed to
its last byte. Only the model routes count (the page's own polling would
otherwise drown them), and a superseded completion (``X-Keel-Superseded``:
the editor moved on and got an empty answer at once) is left out of the
latencies, since it says nothing about how fast the model is.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.api.metrics_middleware import ROLE_BY_ROUTE

SUPERSEDED_HEADER = b"x-keel-superseded"


class StatsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        superseded = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, superseded
            if message["type"] == "http.response.start":
                status = int(message["status"])
                superseded = any(
                    name.lower() == SUPERSEDED_HEADER for name, _ in message.get("headers", [])
                )
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if not superseded:
                self._record(scope, status, time.perf_counter() - start)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        keel = getattr(scope["app"].state, "keel", None)
        route = getattr(scope.get("route"), "path", None)
        role = ROLE_BY_ROUTE.get(route or "")
        if keel is None or role is None:
            return
        keel.stats.record(role=role, status=status, seconds=seconds)
