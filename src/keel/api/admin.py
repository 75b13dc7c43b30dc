"""Control-plane routes that need the admin key (model routes live in models.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from keel.api.access import ADMIN
from keel.api.state import app_state
from keel.errors import ConfigError
from keel.reload import reload_config

router = APIRouter()


@router.post("/v1/admin/reload", dependencies=[ADMIN], response_model=None)
async def reload(request: Request) -> dict[str, object] | JSONResponse:
    """Re-read the config file; an invalid one changes nothing and lists every error."""
    state = app_state(request)
    try:
        return await reload_config(
            state, state.config_path, key_id=getattr(request.state, "key_id", None)
        )
    except ConfigError as exc:
        body = exc.to_body()
        body["error"]["issues"] = [  # type: ignore[index]
            {"key": issue.key, "message": issue.message} for issue in exc.issues
        ]
        body["error"]["type"] = "invalid_config"  # type: ignore[index]
        return JSONResponse(body, status_code=422)
