"""The one ASGI middleware around every request: its id, its body limit, its metrics
and the status page's figures.

One layer instead of four, because each pure-ASGI layer wraps ``send`` (and
some ``receive``) in a closure of its own and every message of every request
went through all of them: on the proxy path that was a measurable share of
keel's added latency. What it does, in the order a request meets it:

- **request id**: the client's ``X-Request-ID`` if it is sane, else a new one;
  echoed in the response and set in :data:`keel.ops.logging.request_id`, so
  every log line of the request carries it.
- **body limit**: a declared ``Content-Length`` over ``max_body_bytes`` is a
  413 before the app sees it; a body without one (chunked) is counted as it
  is read and refused once it goes over. The 413 goes through the one error
  renderer, after the body is read and dropped up to :data:`DRAIN_FACTOR` times
  the limit: clients send their whole body before they read an answer, and a
  connection closed on unread bytes reached them as a reset, not a 413.
- **metrics**: every request counted and timed to its last byte (a stream to
  its last chunk, not its headers), labelled by route template (``other`` for
  unmatched paths, so a scanner cannot blow up the label set), role, and the
  provider that served it (a fallback says so with
  :func:`keel.serving.lifecycle.note_provider`).
- **status page**: model routes only (the page's own polling would drown
  them) feed :class:`~keel.ops.stats.RequestStats`; a superseded completion
  (``X-Keel-Superseded``: the editor moved on) is left out of the latencies,
  as it says nothing about how fast the model is.
- **access log**: a request answered 4xx (info) or 5xx (warning) is logged with
  its method, path, status and time, under its request id; a success is not
  (the metrics count every request).
- **direct routes**: a ``POST`` to a model route goes from here straight to its
  endpoint (:class:`DirectRoutes`); every other request takes the app's own way.
- **CORS**: a browser page whose origin ``server.cors_allowed_origins`` allows
  may call keel (its preflight answered here, its answers readable); any other
  origin's preflight is a 403 saying which setting to change.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, ExceptionHandler, Message, Receive, Scope, Send

from keel.api.errors import ERROR_CODE_KEY, error_response
from keel.auth import forwarded_for
from keel.config import Role
from keel.errors import (
    ClientDisconnected,
    Forbidden,
    PayloadTooLarge,
    RequestError,
    UnsupportedEncoding,
    failed,
)
from keel.ops.logging import request_id
from keel.serving.lifecycle import (
    FAILURE_KEY,
    KEY_LIMITED,
    PROVIDER_KEY,
    SUPERSEDED_KEY,
    header_text,
)
from keel.serving.streaming import OUTCOME, STOPPING, stopped

if TYPE_CHECKING:
    from keel.api.access import GuardedRoute

ROLE_BY_ROUTE: dict[str, Role] = {
    "/v1/completions": "completion",
    "/infill": "completion",
    "/completion": "completion",  # llama.cpp's native shape (keel.api.llamacpp)
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embedding",
    # The same routes without /v1 (keel.api.openai).
    "/completions": "completion",
    "/chat/completions": "chat",
    "/v1beta/chat/completions": "chat",  # Tabby's
    "/embeddings": "embedding",
}

log = logging.getLogger("keel.access")

REQUEST_ID_HEADER = b"x-request-id"
CACHE_HEADER = b"cache-control"
NO_STORE = (CACHE_HEADER, b"no-store")
"""On every answer that sets no caching of its own: keel's answers carry completions of
private code, PIDs, model paths and upstream errors, and a key sent as ``x-api-key``
rather than ``Authorization`` left a shared cache in front nothing forbidding it to
keep ``/v1/stats`` and serve it to callers without a key."""
PROVIDER_HEADER = b"x-keel-provider"
DRAIN_FACTOR = 4
"""An over-limit body up to this many times ``max_body_bytes`` is read (and dropped)
before the 413; a bigger one is refused unread, on a connection closed after it."""
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_PORT = re.compile(r":\d+$")
CORS_EXPOSED = b"X-Request-ID, X-Keel-Provider, X-Keel-Source, X-Keel-Superseded, Retry-After"
"""keel's own answer headers and ``Retry-After``, readable by a page (a browser shows a
page only the CORS-safelisted ones otherwise, such as ``Content-Type``: a chat UI calling
keel directly never saw when to retry after a 429 or a 503)."""


class CorsPolicy:
    """Which browser origins may call keel (``server.cors_allowed_origins``)."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.any = "*" in allowed
        self.allowed = {origin.lower() for origin in allowed if "://*." not in origin}
        self.subdomains = tuple(  # "https://*.example.com": ("https://", ".example.com")
            (scheme + "://", "." + rest[2:])
            for scheme, _, rest in (origin.lower().partition("://") for origin in allowed)
            if rest.startswith("*.")
        )

    def allows(self, origin: str) -> bool:
        """An origin listed as sent, or listed without its port (all its ports), or a
        subdomain of one listed as ``scheme://*.domain`` (with its port, or any)."""
        origin = origin.lower()
        if self.any or origin in self.allowed:
            return True
        bare = _PORT.sub("", origin)
        return bare in self.allowed or any(
            sent.startswith(scheme) and sent.endswith(domain)
            for scheme, domain in self.subdomains
            for sent in (origin, bare)
        )

    def welcomes(self, origin: str, host: bytes) -> bool:
        """Whether a request a page at ``origin`` sent is served: an allowed origin's, or
        keel's own pages' (the status page, addressed by ``host``). A browser sends
        some requests without asking first (a ``text/plain`` POST): refused only at the
        preflight, another site's page drove a keel with no keys (CSRF)."""
        own = origin.partition("://")[2].lower() == host.decode("latin-1").lower()
        return own or self.allows(origin)

    def refusal(self, origin: str) -> Response:
        return error_response(
            Forbidden(
                f"pages from {origin} may not call keel from a browser; add the origin "
                "to server.cors_allowed_origins"
            )
        )

    def preflight(self, origin: str, scope: Scope) -> Response:
        """The answer to a browser's preflight ``OPTIONS`` from ``origin`` (the grant
        itself is added to every answer to an allowed origin)."""
        if not self.allows(origin):
            return self.refusal(origin)
        asked = dict(scope["headers"]).get(b"access-control-request-headers", b"")
        return Response(
            status_code=204,
            headers={
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": asked.decode("latin-1"),
                "access-control-max-age": "600",
            },
        )


class _Response:
    """The ``send`` of one request: adds its id (and a CORS grant), ``no-store`` where
    the answer sets no caching, and the provider that
    served it (``X-Keel-Provider``, where the serving code noted one and did not set it),
    notes its status."""

    __slots__ = ("send", "added", "state", "status", "started")

    def __init__(self, send: Send, added: list[tuple[bytes, bytes]], state: dict[str, Any]):
        self.send = send
        self.added = added
        self.state = state
        self.status = 500
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = int(message["status"]), True
            headers = list(message.get("headers", ()))
            names = {name.lower() for name, _ in headers}
            headers.extend(self.added)
            if CACHE_HEADER not in names:
                headers.append(NO_STORE)
            provider = self.state.get(PROVIDER_KEY)
            if provider is not None and PROVIDER_HEADER not in names:
                headers.append((PROVIDER_HEADER, header_text(provider).encode("ascii")))
            message["headers"] = headers
        await self.send(message)


class DirectRoutes:
    """The model routes, called from the middleware itself.

    Between the middleware and an endpoint, Starlette and FastAPI run, for every
    request, an exception layer, an exit-stack layer, the router's search, and two
    more exit stacks around the endpoint, none of which a
    :class:`~keel.api.access.GuardedRoute` uses (it takes only the request and
    checks its access inline): ~10% of a proxied request's CPU, measured at c=32.
    A ``POST`` to such a route's path calls its handler here, with what those
    layers give it: the app's exception handlers, applied as its exception layer
    applies them (the last resort, a 500, stays the server-error layer's, outside
    this middleware), and the scope's ``route``, ``endpoint`` and ``path_params``.
    """

    def __init__(
        self, routes: Iterable[GuardedRoute], handlers: Mapping[Any, ExceptionHandler]
    ) -> None:
        self.routes = {route.path: route for route in routes if route.methods == {"POST"}}
        by_type = {key: value for key, value in handlers.items() if isinstance(key, type)}
        by_status = {key: value for key, value in handlers.items() if isinstance(key, int)}
        by_type.pop(Exception, None)
        by_status.pop(500, None)
        self.handlers = (by_type, by_status)

    def app(self, scope: Scope) -> ASGIApp | None:
        """The ASGI app that serves ``scope`` directly, or None (the app's way)."""
        route = self.routes.get(scope["path"]) if scope["method"] == "POST" else None
        if route is None:
            return None
        handler = route.direct

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
            scope["starlette.exception_handlers"] = self.handlers
            request = Request(scope, receive, send)

            async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
                response = await handler(request)
                await response(scope, receive, send)

            await wrap_app_handling_exceptions(endpoint, request)(scope, receive, send)

        return serve


class KeelMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        cors: CorsPolicy,
        direct: DirectRoutes | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.cors = cors
        self.direct = direct or DirectRoutes((), {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        declared: int | None = None
        given: str | None = None
        origin: str | None = None
        host = b""
        hosts = 0
        coded = False  # a Transfer-Encoding other than chunked alone (gzip, chunked)
        waits = False  # Expect: 100-continue, the body not sent until keel says so
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == REQUEST_ID_HEADER:
                text = value.decode("latin-1")
                given = text if _SANE_ID.fullmatch(text) else None
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value
                hosts += 1
            elif name == b"expect":  # (a 1.0 client is sent no 100: it sends its body)
                waits = value.lower() == b"100-continue" and scope["http_version"] != "1.0"
            elif name == b"transfer-encoding":
                coded = value.strip().lower() != b"chunked"
        current = given or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = current
        added = [(REQUEST_ID_HEADER, current.encode("latin-1"))]
        if origin is not None and self.cors.allows(origin):
            added += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-expose-headers", CORS_EXPOSED),
                (b"vary", b"Origin"),
            ]
        response = _Response(send, added, state)
        token = request_id.set(current)
        served = scope
        try:
            if hosts != 1 and (hosts or scope["http_version"] != "1.0") or coded:
                await error_response(_unframed(hosts, coded))(scope, receive, response)
            elif origin is not None and scope["method"] == "OPTIONS":
                await self.cors.preflight(origin, scope)(scope, receive, response)
            elif origin is not None and not self.cors.welcomes(origin, host):
                await self.cors.refusal(origin)(scope, receive, response)
            elif declared is not None and declared > self.max_body_bytes:
                await self._reject(scope, receive, response, declared=declared, unsent=waits)
            else:
                # HEAD is GET without the body, which the server leaves out: it was a 405
                # on every route, /health and /ready too (uptime monitors send HEAD)
                served = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope
                app = self.direct.app(served) or self.app
                if declared is not None:
                    # The server delivers no more than the declared length.
                    await app(served, receive, response)
                else:
                    await self._limited(app, served, receive, response)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if STOPPING not in exc.args or response.started or task is None or task.uncancel():
                raise
            await error_response(stopped())(scope, receive, response)  # not begun: a 503
        finally:
            # a HEAD's route is its GET's, found on the copy routed (it was "other")
            routed = scope if served is scope else {**served, "method": scope["method"]}
            self._record(routed, response, time.perf_counter() - start)
            request_id.reset(token)

    async def _limited(
        self, app: ASGIApp, scope: Scope, receive: Receive, response: _Response
    ) -> None:
        """A body of undeclared length (chunked), counted as it is read. The app answers
        one over the limit (its 413), and the rest of the body is then dropped as
        :meth:`_reject` does (all of a 2 GB body was read, the connection kept)."""
        received = 0
        ended = over = False

        async def limited_receive() -> Message:
            nonlocal received, ended, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    over = True
                    raise self._too_large()
            return message

        async def send(message: Message) -> None:
            if over and message["type"] == "http.response.start":
                budget = DRAIN_FACTOR * self.max_body_bytes - received
                if not ended and not await _drained(receive, budget):
                    message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            await response(message)

        try:
            await app(scope, limited_receive, send)
        except PayloadTooLarge:
            if not response.started:
                await self._reject(scope, receive, response, read=received, ended=ended)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is over the limit of {self.max_body_bytes} bytes "
            "(server.max_body_bytes); send less context"
        )

    async def _reject(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        declared: int = 0,
        read: int = 0,
        ended: bool = False,
        unsent: bool = False,
    ) -> None:
        """The 413, once the rest of the body is read and dropped if the whole body is
        within :data:`DRAIN_FACTOR` times the limit; else at once, closing the connection.
        ``unsent``: the client waits to be told to send it (``Expect: 100-continue``, as
        curl sends a big body), so it is refused at once and never sent."""
        refusal = error_response(self._too_large())
        budget = DRAIN_FACTOR * self.max_body_bytes - read
        if unsent or (not ended and (declared > budget or not await _drained(receive, budget))):
            refusal.headers["connection"] = "close"
        await refusal(scope, receive, send)

    @staticmethod
    def _record(scope: Scope, response: _Response, seconds: float) -> None:
        keel = getattr(getattr(scope.get("app"), "state", None), "keel", None)
        if keel is None:
            return  # before the lifespan built the state
        route = getattr(scope.get("route"), "path", None)
        if route is None:  # refused before routing (a body over the limit, an origin): a
            # model route's refusal is its route's and role's (it was "other", role "")
            route = scope["path"] if scope["path"] in ROLE_BY_ROUTE else "other"
        role = ROLE_BY_ROUTE.get(route)
        provider = ""
        state = scope.get("state") or {}
        status = state.get(OUTCOME) or response.status  # a stream counts as it ended
        if role is not None:
            # The provider that served it; none for a request none served (a refusal, a
            # 503, a cached answer): counted as the primary's, they looked like its traffic.
            provider = state.get(PROVIDER_KEY) or ""
            if state.get(SUPERSEDED_KEY):
                keel.metrics.superseded(role)
            else:
                ours = not state.get(KEY_LIMITED)  # a key over its own limit: the client's
                keel.stats.record(role=role, status=status, seconds=seconds, keel=ours)
        keel.metrics.request(
            route=route,
            method=scope["method"],
            status=status,
            seconds=seconds,
            role=role or "",
            provider=provider,
        )
        if status >= 400:  # refusals and failures reach the log, with the request id
            begun = response.started and status != response.status  # (a body refused: not)
            _log_line(scope, state, status, begun=begun, seconds=seconds)


def _unframed(hosts: int, coded: bool) -> RequestError:
    """Why a request whose Host or Transfer-Encoding keel cannot take is refused: two
    Hosts were judged apart (the loopback check read the first, the CORS check the last),
    none was a 403 "not to ''", and a gzip body read as plain JSON."""
    if coded:
        return UnsupportedEncoding(
            "the request body is compressed (a Transfer-Encoding other than chunked), which "
            "keel does not read; send it uncompressed, with Transfer-Encoding: chunked alone "
            "or a Content-Length"
        )
    if hosts:
        return RequestError(
            "the request has more than one Host header; send one", code="invalid_host"
        )
    return RequestError(
        "the request has no Host header, which HTTP/1.1 requires; send one naming the "
        "address keel is called at (Host: localhost:8080)",
        code="missing_host",
    )


PROBES = frozenset({"/ready", "/health/deep"})
"""The routes whose 503 is an answer (not ready), logged as a refusal: a readiness probe
wrote a WARNING every few seconds for as long as a backend was down. (``/health`` and
Tabby's ``/v1/health`` answer 200 while keel runs: a 5xx from them is a failure.)"""


def _log_line(
    scope: Scope, state: dict[str, Any], status: int, *, begun: bool, seconds: float
) -> None:
    """A refusal's or failure's line, with the error code the client got (a full queue's
    429, ``overloaded``, and a key's over its limit, ``rate_limited``, logged alike) and
    why keel failed it (once: the error handler said it in a line of its own, two WARNINGs
    a request through an outage)."""
    route = getattr(scope.get("route"), "path", None)
    failing = failed(status) and route not in PROBES
    why = state.get(FAILURE_KEY)
    # A client that left (an editor dropping the keystroke before the last, as
    # tabby-agent does) is no refusal an operator acts on: 316 of a soak's 327 lines.
    left = state.get(ERROR_CODE_KEY) == ClientDisconnected.code
    client = scope["client"][0] if scope.get("client") else ""
    headers = (
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
    )
    client = forwarded_for(client, headers) or client  # whom a proxy here asked for
    (log.warning if failing else log.debug if left else log.info)(
        "%s %s -> %d in %.0f ms%s%s%s%s%s",
        scope["method"],
        # as sent (percent-encoded): a decoded "%0a" wrote a forged line
        scope.get("raw_path", b"").decode("latin-1") or scope.get("path", ""),
        status,
        seconds * 1000,
        " (a stream begun with 200)" if begun else "",
        # whose request (a key's id, never the key): one key throttled and a full
        # queue looked alike
        f" key={key}" if (key := state.get("key_id")) else "",
        f" code={code}" if (code := state.get(ERROR_CODE_KEY)) else "",
        # whom (behind a proxy on this machine, the address it forwarded for): a client
        # trying keys, or one sending bad requests, could not be traced
        f" client={client}" if client else "",
        f": {' '.join(why.splitlines())}" if why else "",  # a backend's text, one line
    )


async def _drained(receive: Receive, budget: int) -> bool:
    """Whether the rest of the request body ended within ``budget`` bytes, read and
    dropped (False: it did not, or the client left)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if budget < 0:
            return False
        if not message.get("more_body", False):
            return True
