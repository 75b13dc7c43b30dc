"""A prompt over the embedded model's context is the caller's 400, with the
numbers, and takes nothing away from anyone else (issue 13's six requests that
opened the local breaker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PRECOMPUTE_OFF, KeelProcess, running_keel

pytestmark = pytest.mark.integration

LONG = "x = 1\n" * 8000


def test_over_long_prompts_are_400s_and_the_local_breaker_stays_closed(
    keel_server: KeelProcess,
) -> None:
    with keel_server.client() as client:
        for _ in range(8):
            response = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 4})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert error["prompt_tokens"] > error["context_size"] > 0
            chat = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 4}
            response = client.post("/v1/chat/completions", json=chat)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "context_length_exceeded"
            assert response.json()["error"]["param"] == "messages"  # chat has no prompt
        body = {
            "language": "python",
            "segments": {"prefix": "def add(a, b):\n    ", "suffix": "\n", "filepath": "o.py"},
        }
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/ready").status_code == 200
        roles = client.get("/v1/providers").json()["roles"]
    for role in ("completion", "chat"):
        for provider in roles[role]["providers"]:
            assert provider["breaker"] == "closed" and provider["healthy"], provider


def test_a_small_context_is_the_prompt_budget_not_a_refusal_per_keystroke(
    tmp_path: Path,
) -> None:
    """A local model's ``context_size`` of 512 under the default budget of 1,024: every
    completion in a long file was built over the context, refused by the engine and
    built again at half (``prompts_shrunk`` one a request, a log line a keystroke). The
    context is the budget now, less the answer's tokens."""
    config = (
        '[model.completion.local]\nmodel_id = "SmolLM2-135M-Instruct"\ncontext_size = 512\n'
        + PRECOMPUTE_OFF
    )
    prefix = "".join(f"def handler_{i}(request):\n    return request.json()\n\n" for i in range(60))
    body = {"language": "python", "segments": {"prefix": prefix, "suffix": "\n"}}
    with running_keel(tmp_path, config) as keel, keel.client() as client:
        for _ in range(3):
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
        providers = client.get("/v1/providers").json()["roles"]["completion"]["providers"]
        log = keel.log.read_text()
    local = next(p for p in providers if p["name"].startswith("local/"))
    assert local["prompts_shrunk"] == 0, local
    assert "exceeds the available context size" not in log


def test_a_limit_past_the_context_left_is_a_400_naming_it(keel_server: KeelProcess) -> None:
    """A short prompt and ``max_tokens`` over what the context leaves: the engine ended
    the answer where the context did, ``finish_reason: length`` as if the client's own
    limit had been used (OpenAI and vLLM refuse it, and so does keel for them). The
    error names the field the client sent (``max_completion_tokens`` was called
    ``max_tokens``, which the client had not sent)."""
    asks = [
        ("/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 4000}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000},
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4000},
        ),
    ]
    with keel_server.client() as client:
        for path, body in asks:
            response = client.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            (sent,) = set(body) - {"prompt", "messages"}
            assert (error["code"], error["param"]) == ("context_length_exceeded", sent)
            assert 0 < error["prompt_tokens"] < error["context_size"], error
            assert f"ask for fewer tokens ({sent})" in error["message"], error
        roles = client.get("/v1/providers").json()["roles"]
    for role in ("completion", "chat"):
        for provider in roles[role]["providers"]:
            assert provider["breaker"] == "closed" and provider["healthy"], provider


def _local(client: httpx.Client) -> dict[str, Any]:
    providers = client.get("/v1/providers").json()["roles"]["completion"]["providers"]
    return next(p for p in providers if p["name"].startswith("local/"))


@pytest.mark.parametrize(
    "line",
    ["a" * 49_000 + "\U00020000" * 1_000, " " * 49_000 + "\U0001f9d1\u200d\U0001f4bb" * 300],
    ids=["cjk-after-ascii", "emoji-after-spaces"],
)
def test_a_cursor_line_over_the_budget_ending_denser_than_it_starts_is_cut_to_fit(
    keel_server: KeelProcess, line: str
) -> None:
    """A cursor line over the prompt's budget is cut by characters in proportion to its
    count. Where the part kept is denser than the rest (ASCII, then characters of
    several tokens each) the cut kept 4,268 tokens for a 672-token budget: refused by
    the engine, at half the budget still 4,005, a failure of the provider's; five such
    keystrokes opened the local breaker for every user. The cut is counted again until
    it fits: served at the budget, no prompt built again, no failure."""
    with keel_server.client() as client:
        before = _local(client)
        for n in range(2):
            body = {"language": "python", "segments": {"prefix": f"{line}{n}", "suffix": "\n"}}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
        after = _local(client)
    assert after["prompts_shrunk"] == before["prompts_shrunk"], after
    assert after["breaker"] == "closed" and after["healthy"], after
    assert after["last_error"] == before["last_error"], after
