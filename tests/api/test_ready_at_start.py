"""A backend down when keel starts is known at once: ``/ready`` says which and why,
within a second, not after the two failed probes (a minute) it took, and the status
page's table calls it unhealthy."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.api.conftest import USER, USER_KEY, build_app, serving
from tests.fakes.upstreams import FakeUpstream
from tests.serving.conftest import llamacpp_config


def config(live: str, dead: str) -> str:
    """The serving tests' config (everything from ``live``), but chat from ``dead``."""
    chat = f'api_endpoint = "{live}/v1"\nmodel_name = "fake-chat"'
    assert chat in llamacpp_config(live)
    keyed = f'[auth]\napi_keys = ["{USER_KEY}"]\n' + llamacpp_config(live)
    return keyed.replace(chat, f'api_endpoint = "{dead}/v1"\nmodel_name = "x"')


async def test_a_backend_down_at_start_makes_ready_say_why_at_once(tmp_path: Path) -> None:
    with FakeUpstream() as live:
        app = build_app(tmp_path / "keel", config(live.url, "http://127.0.0.1:1"))
        async with serving(app) as client:
            for _ in range(100):
                ready = await client.get("/ready", headers=USER)
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.02)
            assert ready.status_code == 503, ready.text
            chat = ready.json()["roles"]["chat"]
            assert chat["usable"] is False and "cannot connect to 127.0.0.1:1" in chat["why"]
            assert ready.json()["roles"]["completion"]["usable"] is True
            # Without a key: the role's state says it cannot serve (it said "ok").
            public = (await client.get("/ready")).json()["roles"]
            assert public["chat"] == {"usable": False, "state": "unhealthy"}, public
            # A load balancer's readiness: ready while a role can serve (the pods
            # share the dead backend: all of them out would stop completions too).
            assert (await client.get("/ready?any=true")).status_code == 200
            # The status page's table says so too (it showed the dead backend "ok").
            stats = (await client.get("/v1/stats", headers=USER)).json()
            states = {m["provider"]: m["state"] for m in stats["models"]}
            assert states[chat["provider"]] == "unhealthy", states
            others = [v for k, v in states.items() if k != chat["provider"]]
            assert others and "unhealthy" not in others, states
        # No request was sent to the live backend: only connections opened.
        assert not live.requests, live.requests
