"""A Tabby completion admitted before a config reload is still the editor's request: its
next keystroke, sent after the reload, supersedes it, and ``/v1/providers`` goes on
counting. Each reload built a superseder of its own: the older request ran to its end
beside the newer one, and the count began again at 0."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.serving.conftest import build_app, llamacpp_config, model_calls

PREFIX = "def total(items):\n    result = 0\n    for item in items:\n        result += "


def tabby(prefix: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": "\n    return result\n", "filepath": "src/app.py"},
    }


async def test_a_keystroke_after_a_reload_supersedes_the_request_before_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "keel"
    with FakeUpstream(tokens=("item", ".price")) as llamacpp:
        llamacpp.behave(Behaviour.stall(delay=30.0), times=1)  # the older one, until cancelled
        app = build_app(root, llamacpp_config(llamacpp.url))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=30
            ) as http:
                older = asyncio.create_task(http.post("/v1/completions", json=tabby(PREFIX)))
                for _ in range(100):
                    if model_calls(llamacpp) == 1:
                        break
                    await asyncio.sleep(0.02)
                assert model_calls(llamacpp) == 1, "the older request reached the backend"

                changed = llamacpp_config(llamacpp.url).replace(
                    "probe_interval_seconds = 60", "probe_interval_seconds = 61"
                )
                (root / "config.toml").write_text(changed)
                reloaded = await http.post("/v1/admin/reload")
                assert reloaded.status_code == 200, reloaded.text

                newer = await http.post("/v1/completions", json=tabby(PREFIX + "i"))
                superseded = await older
                assert superseded.headers.get("x-keel-superseded") == "1", superseded.text
                assert superseded.json()["choices"][0]["text"] == ""
                assert newer.status_code == 200 and "x-keel-superseded" not in newer.headers
                providers = (await http.get("/v1/providers")).json()
                assert providers["superseded"] == 1
