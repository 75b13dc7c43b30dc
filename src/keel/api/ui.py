"""The status page (``GET /``, ``/ui``) and the figures it draws (``GET /v1/stats``).

The page and its script and stylesheet are package data under ``keel/ui``:
no build step, nothing fetched from elsewhere (the Content-Security-Policy
says so to the browser too). The page itself is public; every figure it
shows comes from routes that need a key, which the page asks for.
"""

from __future__ import annotations

import asyncio
import os
import time
from importlib import resources

from fastapi import APIRouter, Request, Response

from keel.api.access import PUBLIC, USER
from keel.api.state import AppState, app_state
from keel.config import ROLES
from keel.errors import Unavailable
from keel.ops.stats import rss_bytes
from keel.schemas.openapi import ERRORS

router = APIRouter(responses=ERRORS)

ACCEPTANCE_WINDOW_SECONDS = 86400

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_ASSETS = {"keel.js": "text/javascript", "keel.css": "text/css"}


def _asset(name: str) -> str:
    return resources.files("keel").joinpath("ui").joinpath(name).read_text(encoding="utf-8")


def _page_response(name: str, media_type: str) -> Response:
    return Response(
        _asset(name),
        media_type=f"{media_type}; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/", dependencies=[PUBLIC], include_in_schema=False)
@router.get("/ui", dependencies=[PUBLIC], include_in_schema=False)
async def page() -> Response:
    return _page_response("index.html", "text/html")


@router.get("/ui/keel.js", dependencies=[PUBLIC], include_in_schema=False)
async def script() -> Response:
    return _page_response("keel.js", _ASSETS["keel.js"])


@router.get("/ui/keel.css", dependencies=[PUBLIC], include_in_schema=False)
async def stylesheet() -> Response:
    return _page_response("keel.css", _ASSETS["keel.css"])


def acceptance_by_language(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Fold :meth:`EventStore.acceptance` rows (per language and provider) by language."""
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        entry = totals.setdefault(
            str(row["language"]), {"served": 0, "viewed": 0, "selected": 0, "dismissed": 0}
        )
        for key in entry:
            value = row.get(key)
            entry[key] += value if isinstance(value, int) else 0
    ordered = sorted(totals.items(), key=lambda item: (-item[1]["served"], item[0]))
    folded: list[dict[str, object]] = [
        {
            "language": language,
            **counts,
            "acceptance_rate": (
                round(counts["selected"] / counts["viewed"], 4) if counts["viewed"] else None
            ),
        }
        for language, counts in ordered
    ]
    return folded


def models_and_memory(state: AppState) -> list[dict[str, object]]:
    """Every provider in use, the roles it serves, and for a local worker its process."""
    roles_of: dict[int, list[str]] = {}
    for role in ROLES:
        for group in state.providers.chains[role]:
            for entry in group:
                roles_of.setdefault(id(entry.provider), []).append(role)
    found = []
    for provider in state.providers.unique():
        status = provider.status()
        pid = status.get("pid")
        # counted on, as the metric is, across the workers a reload replaced
        restarts = state.metrics.worker_restarts(provider) if "restarts" in status else None
        found.append(
            {
                "provider": provider.name,
                "kind": provider.info.kind,
                "model": provider.info.model,
                "endpoint": provider.info.endpoint,
                "roles": roles_of.get(id(provider), []),
                "state": _routed_state(state, provider, status.get("state")),
                "pid": pid if isinstance(pid, int) else None,
                "restarts": restarts if isinstance(restarts, int) else None,
                "rss_bytes": rss_bytes(pid) if isinstance(pid, int) else None,
            }
        )
    return found


def _routed_state(state: AppState, provider: object, worker: object) -> object:
    """A provider's state as its requests find it: a backend with no process of ours is
    "ok" to itself, and was shown so in green while every request to it failed."""
    if worker not in ("ok", "ready"):
        return worker
    endpoints = (e for r in state.routing.routers.values() for e in r.endpoints)
    troubles = (e.trouble() for e in endpoints if e.provider is provider)
    return next((trouble for trouble in troubles if trouble), worker)


@router.get("/v1/stats", dependencies=[USER])
async def stats(request: Request) -> dict[str, object]:
    """Everything the status page draws, in one call (a page polling two routes would
    spend twice the key's rate limit): the providers as ``/v1/providers`` gives them,
    the last hour's requests, errors and completion latency per minute, acceptance by
    language over the last day (recomputed at most every 30 s), the models in use with
    their processes' memory, worker restarts, and the shared state's stores."""
    state = app_state(request)
    now = time.time()

    async def acceptance() -> list[dict[str, object]] | None:
        since = now - ACCEPTANCE_WINDOW_SECONDS
        try:
            rows = await asyncio.to_thread(state.events.acceptance, since, now)
        except Unavailable:  # the events database is down: the rest of the page still draws,
            return None  # and says so (with [], it said "no completions served")
        return acceptance_by_language(rows)

    models = models_and_memory(state)
    return {
        "now": now,
        "providers": state.routing.snapshot(),
        "uptime_seconds": round(time.monotonic() - state.started, 1),
        "series": state.stats.series(),
        "summary": state.stats.summary(),
        "acceptance": await state.acceptance.get(acceptance),
        "acceptance_window_seconds": ACCEPTANCE_WINDOW_SECONDS,
        "shared_state": state.shared_state(),
        "server": {"pid": os.getpid(), "rss_bytes": rss_bytes(os.getpid())},
        "models": models,
        "worker_restarts": sum(r for m in models if isinstance(r := m["restarts"], int)),
    }
