"""Completions with no model work, against the embedded model: after a completion,
while the engine is idle, keel computes the completion the user gets after
accepting it; typing what was suggested then gets answers with no model work; a
newer real request cancels a precompute at once. And llama.vscode's /infill
session gets completions from it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from keel.config import EMBEDDED_MODEL_ID
from keel.serving.completion import CompletionServing
from tests.serving.conftest import build_app, state_of
from tests.serving.test_infill import replay

pytestmark = pytest.mark.integration

SOURCE = Path(httpx.__file__).with_name("_models.py").read_text()


def config(tmp: Path) -> str:
    """Completion from the embedded model; the other roles from nowhere reachable (unused).
    A prompt budget of 128 tokens: what is read is the CPU of these tests (the default
    1,024 read ~400-500 tokens of the file for each first request), not their claims."""
    return f"""
[server]
completion_timeout = 120

[completion]
max_input_length = 128

[model.completion.local]
model_id = "{EMBEDDED_MODEL_ID}"

[model.chat]
embedded_last_resort = false
[model.chat.http]
kind = "openai/chat"
api_endpoint = "http://127.0.0.1:9/v1"
model_name = "unused"

[model.embedding]
embedded_last_resort = false
[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "http://127.0.0.1:9/v1"
model_name = "unused"
"""


@pytest.fixture
async def keel(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(tmp_path / "keel", config(tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", timeout=120
        ) as http:
            yield http


def tabby(prefix: str, suffix: str = "\n") -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": suffix, "filepath": "httpx/_models.py"},
        "temperature": 0,
    }


async def complete(keel: httpx.AsyncClient, prefix: str) -> tuple[str, str]:
    response = await keel.post("/v1/completions", json=tabby(prefix))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"], response.headers["x-keel-source"]


async def landed(serving: CompletionServing, within: float = 60.0) -> None:
    """Until no generation runs (the precompute finished)."""
    for _ in range(int(within / 0.02)):
        if not list(serving.flights):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the precompute never finished")


async def suggested(keel: httpx.AsyncClient, start: int) -> tuple[str, str]:
    """A place in the file where the model suggests something, and the suggestion; each
    asked for once the last one's precompute has ended (see :func:`landed`), so that
    the engine is idle after it and its own precompute begins."""
    for cut in range(start, start + 4000, 97):
        await landed(state_of(keel).completion)
        prefix = SOURCE[: SOURCE.index("\n", cut) + 1] + "        "
        text, source = await complete(keel, prefix)
        assert source == "model"
        if len(text.strip()) > 3:
            return prefix, text
    raise AssertionError("the model suggested nothing anywhere")


def computed_ahead(serving: CompletionServing, prefix: str) -> bool:
    return any(serving.cache.holds(place, prefix, "\n") for place in serving.cache.known_places())


async def test_typing_the_suggestion_then_accepting_it_needs_no_model_work(
    keel: httpx.AsyncClient,
) -> None:
    serving = state_of(keel).completion
    start = 1846  # the first such place a scan from the top found (each before it, a read)
    while True:  # a place where the model also has something to say after the suggestion
        prefix, shown = await suggested(keel, start)
        await landed(serving)
        if computed_ahead(serving, prefix + shown):
            break
        start = SOURCE.index("\n", start + 200)
    for typed in range(1, len(shown) + 1):  # the user types what the suggestion said
        text, source = await complete(keel, prefix + shown[:typed])
        assert source in ("cache", "inflight"), (typed, source)
        if typed < len(shown):
            assert text == shown[typed:]
    assert text.strip(), "after all of it, the suggestion computed ahead"
    # shown now: the very same request again (a manual trigger) is the model's to answer
    assert (await complete(keel, prefix + shown))[1] == "model"


async def test_a_newer_real_request_cancels_a_precompute_at_once(
    keel: httpx.AsyncClient,
) -> None:
    serving = state_of(keel).completion
    await suggested(keel, 1361)  # the first place a scan from the top found one
    ahead = [flight for flight in serving.flights if flight.precompute]
    assert len(ahead) == 1, "a precompute started as soon as the engine was idle"
    await complete(keel, SOURCE[:200])  # somewhere else: it cannot use the precompute
    task = ahead[0].task
    assert task is not None and task.done() and task.cancelled()


async def test_a_llama_vscode_session_gets_completions_from_the_embedded_model(
    keel: httpx.AsyncClient,
) -> None:
    answers = await replay(keel)
    assert any(answer.json()["content"].strip() for answer in answers[1:])
    # What the engine said of the model's work: the prompt's tokens, those its cache
    # held, the time it read the rest (they were 0 whatever it read).
    first = answers[1].json()
    assert answers[1].headers["x-keel-source"] == "model"
    assert first["timings"]["prompt_n"] > 0 and first["timings"]["prompt_ms"] > 0, first
    assert first["tokens_evaluated"] == first["timings"]["prompt_n"] + first["timings"]["cache_n"]
    assert first["generation_settings"]["n_ctx"] == 2048  # the local model's, per slot
    assert {answer.headers.get("x-keel-source") for answer in answers[1:]} <= {
        "model",
        "cache",
        "inflight",
    }


async def test_a_request_with_its_own_ends_does_not_wait_for_a_precompute(
    keel: httpx.AsyncClient,
) -> None:
    """llama.vim's request after a suggestion was accepted lands on keel's precompute of
    it, which runs to keel's whole budget: the request joined it and waited past its own
    ``t_max_predict_ms`` (asked 150 ms, answered in 1.26 s in a review's test)."""
    serving = state_of(keel).completion
    for cut in range(1361, 1361 + 4000, 97):
        # The last place's precompute ended first: one cancelled but still winding down
        # (a loaded machine) kept the engine busy, and no precompute began after this one
        # (seen once in a fresh clone's run).
        await landed(serving)
        body = {"input_prefix": SOURCE[: SOURCE.index("\n", cut) + 1], "prompt": "        "}
        first = await keel.post("/infill", json=body)
        assert first.status_code == 200, first.text
        shown = first.json()["content"]
        if len(shown.strip()) > 3:
            break
    else:
        raise AssertionError("the model suggested nothing anywhere")
    ahead = [flight for flight in serving.flights if flight.precompute]
    assert len(ahead) == 1, "a precompute started as soon as the engine was idle"
    accepted = {"input_prefix": body["input_prefix"] + "        " + shown, "prompt": ""}
    second = await keel.post("/infill", json={**accepted, "t_max_predict_ms": 1})
    assert second.status_code == 200, second.text
    source = second.headers["x-keel-source"]
    assert source in ("model", "cache"), "it joined the precompute and waited for all of it"
    task = ahead[0].task
    assert source == "cache" or (task is not None and task.cancelled())


async def test_an_answer_ended_early_still_gives_the_engines_prompt_figures(
    keel: httpx.AsyncClient,
) -> None:
    """keel stops reading when a client's ends are met (here llama.vim's ``n_indent``, at
    the first line indented less than the cursor): the engine's figures come at the end
    of the generation, which such an answer never reads, and llama.vim showed an
    estimate with no prompt read. (``n_indent`` is keel's to apply, in the text:
    ``t_max_predict_ms: 1`` here let two lines through once, in a loaded suite run,
    where the engine's tokens came up joined in one piece.)"""

    def dedented(content: str) -> bool:
        later = content.split("\n")[1:]
        return any(line.strip() and len(line) - len(line.lstrip()) < 8 for line in later)

    for cut in range(1361, 1361 + 4000, 97):
        body = {"input_prefix": SOURCE[: SOURCE.index("\n", cut) + 1], "prompt": "        "}
        whole = await keel.post("/infill", json=body)
        assert whole.status_code == 200, whole.text
        if dedented(whole.json()["content"]):  # it goes on to a line indented less
            break
    else:
        raise AssertionError("the model wrote no line indented less anywhere")
    ended = await keel.post("/infill", json={**body, "n_indent": 8})
    figures = ended.json()
    assert ended.headers["x-keel-source"] == "model"
    assert not dedented(figures["content"]), "the answer ended at the line indented less"
    timings = figures["timings"]
    assert timings["cache_n"] > 0, figures  # the first request's prompt, in the slot
    assert figures["tokens_evaluated"] == timings["prompt_n"] + timings["cache_n"], figures


async def test_an_openai_completion_cancels_a_precompute_at_once(
    keel: httpx.AsyncClient,
) -> None:
    """A Tabby request cancelled one; an OpenAI completion on the same engine did not:
    idle-time work took the engine from a real request."""
    serving = state_of(keel).completion
    await suggested(keel, 1361)
    ahead = [flight for flight in serving.flights if flight.precompute]
    assert len(ahead) == 1, "a precompute started as soon as the engine was idle"
    short = {"prompt": "def add(a, b):", "max_tokens": 2}
    assert (await keel.post("/v1/completions", json=short)).status_code == 200
    task = ahead[0].task
    assert task is not None and task.done() and task.cancelled()
