"""``GET /metrics``: Prometheus text format, from the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from keel.api.access import MetricsAccess
from keel.api.state import app_state
from keel.ops.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(MetricsAccess())])
async def metrics(request: Request) -> Response:
    return Response(app_state(request).metrics.render(), media_type=CONTENT_TYPE)
