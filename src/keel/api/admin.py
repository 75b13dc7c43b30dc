"""Control-plane routes that need the admin key (model routes live in models.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from keel.api.access import ADMIN
from keel.api.state import app_state
from keel.reload import reload_config
from keel.schemas.admin import ReloadRequest, ReloadResult
from keel.schemas.openapi import ERRORS, json_body

router = APIRouter(responses=ERRORS)


@router.post(
    "/v1/admin/reload",
    dependencies=[ADMIN],
    response_model=None,
    openapi_extra=json_body(ReloadRequest, required=False),
    responses={200: {"model": ReloadResult}},
)
async def reload(request: Request) -> dict[str, object]:
    """Re-read the config file; an invalid one changes nothing and is a 422 listing every
    error by key (:class:`~keel.errors.ConfigError`)."""
    state = app_state(request)
    return await reload_config(
        state, state.config_path, key_id=getattr(request.state, "key_id", None)
    )
