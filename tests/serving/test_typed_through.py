"""Typing through a suggestion, and joining a generation in flight, against a fake
llama.cpp server: what the editor gets, and that the model was asked once."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.serving.conftest import model_calls, state_of

SUGGESTION = "compute(a, b)"


def tabby(prefix: str, suffix: str = "\n", *, agent: str = "editor/1") -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": suffix, "filepath": "pkg/a.py"},
        "user": agent,
    }


async def complete(keel: httpx.AsyncClient, body: dict[str, object]) -> tuple[str, str]:
    response = await keel.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text, response.headers.get("x-keel-source", "superseded")


async def served(keel: httpx.AsyncClient, source: str) -> float:
    metrics = (await keel.get("/metrics")).text
    found = re.search(rf'keel_completions_served_total\{{source="{source}"\}} (\S+)', metrics)
    assert found is not None, metrics
    return float(found.group(1))


async def test_typing_the_suggestion_is_answered_with_its_rest_and_no_model_work(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    assert await complete(keel, tabby("x = ")) == (SUGGESTION, "model")
    for typed in ("c", "comp", "compute(a, "):
        text, source = await complete(keel, tabby("x = " + typed))
        assert (text, source) == (SUGGESTION[len(typed) :], "cache")
    assert model_calls(llamacpp) == 1
    assert await served(keel, "cache") == 3
    assert await complete(keel, tabby("x = ")) == (SUGGESTION, "model")  # asked again
    assert await served(keel, "model") == 2
    # asked again where the cache answered (tabby-agent's other choices): the model, not
    # the same text replayed from further back
    assert (await complete(keel, tabby("x = compu")))[1] == "cache"
    assert (await complete(keel, tabby("x = compu")))[1] == "model"
    assert await served(keel, "model") == 3


async def test_typing_something_else_asks_the_model(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    await complete(keel, tabby("x = "))
    assert (await complete(keel, tabby("x = y")))[1] == "model"  # not what was suggested
    assert (await complete(keel, tabby("x = c", "\nz = 1\n")))[1] == "model"  # suffix changed
    assert (await complete(keel, tabby("x = c", agent="other/1")))[1] == "model"  # another editor
    assert (await complete(keel, tabby("x = " + SUGGESTION)))[1] == "model"  # all typed
    debug = {**tabby("x = c"), "debug_options": {"return_prompt": True}}
    assert (await complete(keel, debug))[1] == "model"  # wants its own prompt back
    alone = {
        **tabby("x = co"),
        "debug_options": {"disable_retrieval_augmented_code_completion": True},
    }
    assert (await complete(keel, alone))[1] == "model"  # the model alone, without snippets
    assert model_calls(llamacpp) == 7


async def test_windows_newlines_type_through_too(keel: httpx.AsyncClient) -> None:
    prefix = "a = 1\r\nb = 2\r\nx = "
    await complete(keel, tabby(prefix, "\r\n"))
    assert await complete(keel, tabby(prefix + "comp", "\r\n")) == ("ute(a, b)", "cache")


async def produced(keel: httpx.AsyncClient, text: str) -> None:
    """Until a running generation has produced ``text``."""
    flights = state_of(keel).completion.flights
    for _ in range(500):
        if any(flight.produced.startswith(text) for flight in flights):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no generation produced {text!r}")


async def test_a_keystroke_that_follows_the_running_generation_joins_it(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    llamacpp.behave(Behaviour.stall(delay=1.0), times=1)  # the keystroke comes in its pause
    first = asyncio.create_task(complete(keel, tabby("x = ")))
    await produced(keel, "compute")
    second = await complete(keel, tabby("x = comp"))
    assert second == ("ute(a, b)", "inflight")
    assert await first == ("", "superseded")  # the editor waits for the newer request only
    assert model_calls(llamacpp) == 1  # whose answer came from the older one's generation
    for _ in range(100):  # the upstream writes its last chunk after keel has the text
        if llamacpp.completed:
            break
        await asyncio.sleep(0.01)
    assert llamacpp.disconnects == 0 and llamacpp.completed == 1
    assert await served(keel, "inflight") == 1


async def test_a_keystroke_that_departs_from_it_supersedes_it(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    llamacpp.behave(Behaviour.stall(delay=30.0), times=1)  # it would end only when cancelled
    first = asyncio.create_task(complete(keel, tabby("x = ")))
    await produced(keel, "compute")
    assert await complete(keel, tabby("x = y")) == (SUGGESTION, "model")
    assert await first == ("", "superseded")
    await llamacpp.wait_for(lambda: llamacpp.disconnects == 1)  # its generation was cancelled
    assert not list(state_of(keel).completion.flights)


async def test_nothing_is_computed_ahead_on_a_model_server(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """Precompute is for an idle local engine; a model server's time is someone's money."""
    await complete(keel, tabby("x = "))
    assert not list(state_of(keel).completion.flights)
    assert model_calls(llamacpp) == 1
