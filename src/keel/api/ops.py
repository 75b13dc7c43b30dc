"""Liveness and readiness for supervisors and load balancers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from keel.api.state import app_state
from keel.config import ROLES

router = APIRouter()


@router.get("/health")
async def liveness() -> dict[str, str]:
    """The process answers; says nothing about models (that is /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def readiness(request: Request) -> JSONResponse:
    """200 when every role has a provider that can serve now, else 503 naming why."""
    providers = app_state(request).providers
    roles: dict[str, dict[str, object]] = {}
    ready = True
    for role in ROLES:
        provider = providers.for_role(role)
        status = provider.status()
        usable = status.get("state") in {"ok", "ready"}
        ready = ready and usable
        roles[role] = {"provider": provider.name, **status}
    body = {"status": "ready" if ready else "not_ready", "roles": roles}
    return JSONResponse(body, status_code=200 if ready else 503)
