"""Every route declares who may call it: public, user or admin.

A route states its access with ``dependencies=[PUBLIC]`` (or ``USER``,
``ADMIN``); a test walks every route of the app and fails on one without a
declaration, so no endpoint is left open by omission. Keys are accepted as
``Authorization: Bearer``, ``x-api-key``, ``api-key`` or ``x-admin-key``. With no keys
configured at all (only allowed on a loopback address) every check passes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from keel.api.middleware import ROLE_BY_ROUTE
from keel.api.state import app_state
from keel.auth import Access, Identity, forwarded_for, is_loopback
from keel.errors import AuthenticationError, Forbidden, RateLimited, RequestError
from keel.providers.base import CACHE_FIGURES_SHOWN
from keel.router.admission import CALLER
from keel.serving.lifecycle import KEY_LIMITED

DOCS_PATHS = frozenset({"/docs", "/openapi.json"})
"""The API documentation routes (keel.api.docs, FastAPI's document): public, not APIRoutes."""


def presented_keys(request: Request) -> list[str]:
    keys = []
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    # api-key: Azure OpenAI's header, which clients set up "Azure style" send (Open WebUI,
    # LibreChat): refused, every request of theirs was a 401
    for header in ("x-api-key", "api-key", "x-admin-key"):
        value = request.headers.get(header, "").strip()
        if value:
            keys.append(value)
    return keys


def _unidentified(request: Request, presented: list[str]) -> str:
    """Why no key was taken: none valid, none sent, or an Authorization header in another
    form than ``Bearer <key>`` (it was "missing API key" with the key right there)."""
    how = "send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
    if presented:
        return f"invalid API key: {how}"
    if authorization := request.headers.get("authorization", "").strip():
        scheme = authorization.partition(" ")[0]
        if scheme.lower() == "bearer":  # "Bearer" and nothing: an unset $KEEL_KEY
            return f"the Bearer key is empty (an unset variable?): {how}"
        if authorization.split(None, 1)[0].lower() == "bearer":  # "Bearer\t<key>"
            return (
                "the Authorization header separates Bearer from the key with another "
                f"character than a space (a tab?), not 'Bearer <key>': {how}"
            )
        named = scheme.isalpha() and len(scheme) <= 16  # a scheme's word, never a key's part
        form = (
            "a key with no scheme"
            if scheme == authorization
            else f"scheme {scheme!r}"
            if named
            else "another scheme"
        )
        return f"the Authorization header holds {form}, not 'Bearer <key>': {how}"
    return f"missing API key: {how}"


def holds_key(request: Request) -> bool:
    """Does ``request`` carry a valid key? Public routes show their details only then.

    With no keys configured (loopback only) every caller addressing keel by a loopback
    name holds one: a web page pointing its own name at this machine (DNS rebinding) read
    ``/ready``'s and ``/health/deep``'s details (worker PIDs, model paths, errors) and
    chose the deep check's timeout.
    """
    state = app_state(request)
    if not state.keys.enabled:
        return state.settings.auth.allow_unauthenticated_remote or (
            _loopback_named(request) and _forwarded_for(request) is None
        )
    return state.keys.identify(presented_keys(request)) is not None


class Require:
    """The dependency behind each declaration; ``level`` is what the route needs."""

    def __init__(self, level: Access) -> None:
        self.level = level

    async def __call__(self, request: Request) -> Identity:
        if self.level is Access.PUBLIC:
            return Identity(Access.PUBLIC, None)
        state = app_state(request)
        store = state.keys
        if not store.enabled:
            if not state.settings.auth.allow_unauthenticated_remote:
                _addressed_to_loopback(request)
            CACHE_FIGURES_SHOWN.set(not state.shared_by_several())
            return Identity(Access.ADMIN, None)
        presented = presented_keys(request)
        identity = store.identify(presented)
        if identity is None:
            raise AuthenticationError(_unidentified(request, presented))
        if self.level is Access.ADMIN and identity.access is not Access.ADMIN:
            reason = (
                "this route needs the admin key ('x-admin-key: <key>')"
                if store.has_admin
                else "this route needs the admin key, and none is configured ([auth] admin_key)"
            )
            raise Forbidden(reason)
        request.state.key_id = identity.key_id
        CALLER.set(identity.key_id)  # a freed slot goes to the caller running fewest
        CACHE_FIGURES_SHOWN.set(not state.shared_by_several())
        limiter = state.rate_limiter
        # Model work is limited; the status page, a metrics scrape and the editor's
        # events are not, or a busy key would blind its own monitoring.
        if limiter is not None and identity.key_id is not None and is_model_route(request):
            wait = await limiter.acquire(identity.key_id)
            if wait > 0:
                role = ROLE_BY_ROUTE[request.scope["path"]]
                state.metrics.rejected(role, "key_rate_limited")
                setattr(request.state, KEY_LIMITED, True)
                raise RateLimited(
                    f"rate limit of {state.settings.auth.requests_per_minute} requests per "
                    "minute for this key reached; retry later",
                    retry_after=wait,
                )
        return identity


THIS_MACHINE = frozenset({"0.0.0.0", "::", "localhost."})
"""Host names that reach only this machine besides the loopback ones: the unspecified
addresses (Twinny's default host is 0.0.0.0) and localhost's fully qualified form. No
web page can be served from them, so none can rebind its name to keel through them."""


def _loopback_named(request: Request) -> bool:
    """Whether the request's Host is a name that reaches only this machine."""
    with contextlib.suppress(ValueError):  # a malformed host
        name = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""  # no port
        return is_loopback(name) or name in THIS_MACHINE
    return False


def _forwarded_for(request: Request) -> str | None:
    """The address a proxy on this machine forwarded ``request`` for, if another's."""
    client = request.client.host if request.client is not None else ""
    return forwarded_for(client, request.headers.items())


def _addressed_to_loopback(request: Request) -> None:
    """With no keys (keel on loopback), a request must be addressed to a loopback name:
    a web page that points its own name at 127.0.0.1 (DNS rebinding) reads and drives a
    keel its browser's same-origin rule then takes for the page's own. Nor may a proxy
    on this machine have forwarded it for another: a keyless keel behind nginx answered
    anyone on the network, admin routes included."""
    if (remote := _forwarded_for(request)) is not None:
        raise Forbidden(
            f"this keel has no keys, so it answers only this machine's clients, and a "
            f"proxy forwarded this request for {remote}: configure [auth] api_keys (or set "
            "[auth] allow_unauthenticated_remote = true if the proxy decides who may "
            "reach keel)"
        )
    if _loopback_named(request):
        return
    host = request.headers.get("host", "")
    if not host:  # an HTTP/1.0 request may have none: it was a 403 "not to ''"
        raise RequestError(
            "the request has no Host header: this keel has no keys, so it answers only "
            "requests addressed to localhost, 127.0.0.1, [::1] or 0.0.0.0; send "
            "'Host: localhost'",
            code="missing_host",
        )
    raise Forbidden(
        f"this keel has no keys, so it answers only requests addressed to localhost, "
        f"127.0.0.1, [::1] or 0.0.0.0, not to {host!r} (a page pointing its own name at "
        "this machine could drive it); configure [auth] api_keys to serve other names"
    )


def is_model_route(request: Request) -> bool:
    return request.scope.get("path") in ROLE_BY_ROUTE


class GuardedRoute(APIRoute):
    """A route whose endpoint takes only the request and returns a response (the
    model routes): its declared access is checked inline, the same check with the
    same errors, not through FastAPI's dependency solver, which cost ~10% of a
    proxied request's CPU (measured at c=32). Anything else is refused at startup.
    ``direct`` is that handler, which :class:`keel.api.middleware.DirectRoutes` calls."""

    direct: Callable[[Request], Coroutine[Any, Any, Response]]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        access = declared_access(self)
        if access is None or list(inspect.signature(self.endpoint).parameters) != ["request"]:
            raise TypeError(f"{self.path}: a GuardedRoute takes only the request, with access")
        require, endpoint = Require(access), self.endpoint

        async def handler(request: Request) -> Response:
            await require(request)
            response: Response = await endpoint(request)
            return response

        self.direct = handler
        return handler


class MetricsAccess(Require):
    """A user's route, public with ``[auth] public_metrics``."""

    def __init__(self) -> None:
        super().__init__(Access.USER)

    async def __call__(self, request: Request) -> Identity:
        state = app_state(request)
        if state.settings.auth.public_metrics:
            if not state.keys.enabled and not state.settings.auth.allow_unauthenticated_remote:
                _addressed_to_loopback(request)  # as every other route of a keyless keel
            return Identity(Access.PUBLIC, None)
        return await super().__call__(request)


PUBLIC: Any = Depends(Require(Access.PUBLIC))
USER: Any = Depends(Require(Access.USER))
ADMIN: Any = Depends(Require(Access.ADMIN))


def declared_access(route: BaseRoute) -> Access | None:
    """The access a route declares, or None if it declares none."""
    if not isinstance(route, APIRoute):
        return Access.PUBLIC if getattr(route, "path", None) in DOCS_PATHS else None
    levels = [
        dependency.call.level
        for dependency in route.dependant.dependencies
        if isinstance(dependency.call, Require)
    ]
    return levels[0] if len(levels) == 1 else None


KEY_HEADERS = ("x-api-key", "api-key", "x-admin-key")
SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A user key (`[auth] api_keys`, a keys file, `keel keys`) or the admin "
        "key; asked for only where keel has keys configured.",
    },
    **{
        header: {"type": "apiKey", "in": "header", "name": header, "description": "As bearer."}
        for header in KEY_HEADERS
    },
}
"""The ways to present a key; in an operation's ``security`` the role names (OpenAPI 3.1
lets a scheme that is not OAuth's name them) say which key: ``user`` (a user key or the
admin key) or ``admin``."""


def document_access(app: FastAPI) -> None:
    """Adds to ``app``'s OpenAPI document how a key is presented and, for each operation,
    which key it needs (none, a user key, the admin key): the document said nothing of
    keys, so a generated client sent none and met 401s."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for route in app.routes:
                level = declared_access(route)
                if not isinstance(route, APIRoute) or level is None:
                    continue
                needs = [] if level is Access.PUBLIC else [str(level)]
                security = [{scheme: needs} for scheme in SECURITY_SCHEMES] if needs else []
                operations = schema["paths"].get(route.path_format, {})
                for method in route.methods or ():
                    if method.lower() in operations:
                        operations[method.lower()]["security"] = security
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
