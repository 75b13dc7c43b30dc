"""Liveness and readiness for supervisors and load balancers.

These routes are public: anyone gets the status code and a one-word state per
role. Model paths, PIDs, error texts, upstream URLs and request counts go only
to a caller with a valid key on the same request (``/v1/providers`` has more).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from keel.api.access import PUBLIC, USER, holds_key
from keel.api.state import app_state
from keel.config import ROLES
from keel.ops.metrics import USABLE_STATES
from keel.schemas.openapi import ERRORS
from keel.schemas.ops import DeepHealthReport, Liveness, ProvidersSnapshot, Readiness

router = APIRouter(responses=ERRORS)


@router.get(
    "/health", dependencies=[PUBLIC], response_model=None, responses={200: {"model": Liveness}}
)
async def liveness() -> dict[str, str]:
    """The process answers; says nothing about models (that is /ready)."""
    return {"status": "ok"}


@router.get(
    "/health/deep",
    dependencies=[PUBLIC],
    responses={
        200: {"model": DeepHealthReport},
        503: {"model": DeepHealthReport, "description": "A role failed its check."},
    },
)
async def deep_health(
    request: Request, timeout: float | None = Query(None, gt=0, le=300)
) -> JSONResponse:
    """200 when each role's provider generated a token within ``timeout`` seconds
    (default 10), else 503.

    Findings are cached for a few seconds (``age_seconds`` says how old), so
    polling this is cheap; the probe itself is real work. Only a key's holder chooses
    ``timeout``; one shorter than the default is probed afresh and not cached.
    """
    state = app_state(request)
    details = holds_key(request)
    findings = await state.deep_health.check(
        state.providers, state.metrics, timeout=timeout if details else None
    )
    now = state.deep_health.now()
    ok = all(finding.ok for finding in findings)
    roles: dict[str, dict[str, object]] = {}
    for finding in findings:
        shown = finding.to_json(now)
        if not details:
            shown = {key: shown[key] for key in ("ok", "seconds", "age_seconds")}
        roles[finding.role] = shown
    body = {
        "status": "ok" if ok else "failing",
        "ttl_seconds": state.deep_health.ttl,
        "roles": roles,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get(
    "/ready",
    dependencies=[PUBLIC],
    responses={
        200: {"model": Readiness},
        503: {"model": Readiness, "description": "A role has no provider that can serve."},
    },
)
async def readiness(
    request: Request,
    any_role: bool = Query(
        False,
        alias="any",
        description="Ready when one role can serve (a load balancer's readiness: replicas "
        "share their backends, so one role's outage would take every replica out).",
    ),
) -> JSONResponse:
    """200 when every role (``?any=true``: one role) has a provider that can serve
    now, else 503 naming why."""
    state = app_state(request)
    roles: dict[str, dict[str, object]] = {}
    details = holds_key(request)
    for role in ROLES:
        router = state.routing.routers[role]
        primary = router.groups[0][0]
        why = router.why_unusable()
        usable = why is None
        status = primary.provider.status()
        # The primary's state; one that reads as fine is not shown as such while the
        # primary cannot be counted on (a backend failing every request said "ok"), or
        # while the role cannot serve at all.
        shown = str(status.get("state", "unknown"))
        if shown in USABLE_STATES:
            shown = primary.trouble() or (shown if usable else "unavailable")
        if details:
            roles[role] = {"provider": primary.name, "usable": usable, **status, "state": shown}
            serving = next((e.name for e in router.endpoints if e.usable()), None)
            if serving not in (None, primary.name):
                roles[role]["serving"] = serving
            if why is not None:
                roles[role]["why"] = why
        else:
            roles[role] = {"usable": usable, "state": shown}
    usable_roles = [role["usable"] for role in roles.values()]
    ready = any(usable_roles) if any_role else all(usable_roles)
    body = {"status": "ready" if ready else "not_ready", "roles": roles}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/v1/providers",
    dependencies=[USER],
    response_model=None,
    responses={200: {"model": ProvidersSnapshot}},
)
async def providers(request: Request) -> dict[str, object]:
    """Each provider's breaker, health, last error and recent latency, per role; and
    the shared state (per-key limits, keys, events) with whether its store answers."""
    state = app_state(request)
    shared = state.shared_state()
    retriever = state.completion.prompts.retriever
    repositories = retriever.status() if retriever is not None else {}
    return {**state.routing.snapshot(), "shared_state": shared, "repositories": repositories}
