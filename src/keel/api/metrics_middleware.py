"""Count every request and time it to its last byte, by route template.

Pure ASGI (no ``BaseHTTPMiddleware``) so a streamed response is timed until
its last chunk is sent, not until its headers are. The route label is the
matched template (``/v1/completions``), or ``other`` for unmatched paths, so a
scanner cannot blow up the label set. Role and provider come from the route;
a handler that served a request from another provider (a fallback) says so
with :func:`keel.serving.lifecycle.note_provider`.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.config import Role
from keel.serving.lifecycle import PROVIDER_KEY

ROLE_BY_ROUTE: dict[str, Role] = {
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embedding",
}



class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status, time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        keel = getattr(scope["app"].state, "keel", None)
        if keel is None:
            return  # before the lifespan built the state
        route = getattr(scope.get("route"), "path", None) or "other"
        role = ROLE_BY_ROUTE.get(route, "")
        provider = ""
        if role:
            state = scope.get("state") or {}
            provider = state.get(PROVIDER_KEY) or keel.providers.for_role(role).name
        keel.metrics.request(
            route=route,
            method=scope["method"],
            status=status,
            seconds=seconds,
            role=role,
            provider=provider,
        )
