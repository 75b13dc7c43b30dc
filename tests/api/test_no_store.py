"""keel's answers forbid caches to keep them: they carry completions of private code,
PIDs, model paths and upstream errors, and a key sent as ``x-api-key`` (not
``Authorization``) left a shared cache in front free to store ``/v1/stats`` and hand it
to callers without a key."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import USER_KEY, Backends, build_app, serving

KEYED = {"x-api-key": USER_KEY}


async def test_keyed_answers_say_no_store_and_the_page_shell_keeps_its_own(
    backends: Backends, tmp_path: Path
) -> None:
    app = build_app(tmp_path / "keel", backends.config())
    async with serving(app) as client:
        completion = {"prompt": "def add(a, b):", "max_tokens": 4}
        answers = {
            "/v1/stats": await client.get("/v1/stats", headers=KEYED),
            "/v1/providers": await client.get("/v1/providers", headers=KEYED),
            "/metrics": await client.get("/metrics", headers=KEYED),
            "/v1/completions": await client.post("/v1/completions", json=completion, headers=KEYED),
            "a refusal": await client.get("/v1/stats"),
        }
        for what, answer in answers.items():
            assert answer.headers.get("cache-control") == "no-store", (what, answer.headers)
        assert answers["/v1/stats"].status_code == 200
        assert answers["a refusal"].status_code == 401
        shell = await client.get("/")
        assert shell.status_code == 200
        assert shell.headers.get_list("cache-control") == ["no-cache"]
