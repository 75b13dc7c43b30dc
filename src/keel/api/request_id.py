"""A request id for every request: the client's ``X-Request-ID`` if it is sane,
else a new one; echoed in the response and put on every log line of the request."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.ops.logging import request_id

HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _from_client(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == HEADER.encode():
            text = value.decode("latin-1")
            return text if _SANE.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        current = _from_client(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = current

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = current
            await send(message)

        token = request_id.set(current)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
