"""The acceptance figures group completions by the language's canonical name, as the
metrics label them: by the client's raw id, every made-up language was a row of its own
(2,700 requests with random ids grew ``/v1/stats`` from 9 KB to 129 KB, kept 90 days)."""

from __future__ import annotations

import httpx

from tests.fakes.upstreams import FakeUpstream


async def test_acceptance_rows_are_by_canonical_language(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    for language in ("typescriptreact", "javascript", "zzqxvbnm", "wwqpaxe"):
        body = {"language": language, "segments": {"prefix": "let x = ", "suffix": ""}}
        response = await keel.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
    rows = (await keel.get("/v1/stats/completions")).json()["data"]
    served = {row["language"]: row["served"] for row in rows}
    assert served == {"javascript-typescript": 2, "unknown": 2}, rows
