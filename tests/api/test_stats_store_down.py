"""The status page's figures with the events database down: acceptance is unknown
(null), not empty, and the store's state comes with it (the page said "No completions
served in the last 24 hours")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.api.conftest import USER, Backends, build_app, serving


async def test_acceptance_is_unknown_while_the_events_database_is_down(
    backends: Backends, tmp_path: Path
) -> None:
    dead = '\n[events]\ndatabase_url = "postgresql://keel@127.0.0.1:1/keel"\n'
    app = build_app(tmp_path / "keel", backends.config() + dead)
    async with serving(app) as client:
        for _ in range(100):
            stats = (await client.get("/v1/stats", headers=USER)).json()
            events = stats["shared_state"]["events"]
            if events["up"] is False:
                break
            await asyncio.sleep(0.05)
        assert events["up"] is False and events["store"] == "postgres"
        assert stats["acceptance"] is None
