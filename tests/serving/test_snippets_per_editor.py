"""Snippets are chosen once per edited line (the prompt's head stays the same while the
user types, so the engine reuses its cache), and per editor: another client's choice
holds the text of its files (a colleague's settings.py, a secret in it)."""

from __future__ import annotations

import gc
import tracemalloc

import httpx
import pytest

from keel.pipeline import completion
from tests.fakes.upstreams import FakeUpstream


def typing(prefix: str, secret: str, *, agent: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {
            "prefix": f"import os\n\ndef connect():\n    conn = {prefix}",
            "suffix": "\n",
            "filepath": "app.py",
            "relevant_snippets_from_recently_opened_files": [
                {"filepath": "settings.py", "body": f"DB_PASSWORD = '{secret}'\n"}
            ],
        },
        "user": agent,
        "debug_options": {"return_prompt": True, "return_snippets": True},
    }


async def prompt_of(keel: httpx.AsyncClient, body: dict[str, object], agent: str) -> str:
    response = await keel.post("/v1/completions", json=body, headers={"User-Agent": agent})
    assert response.status_code == 200, response.text
    prompt: str = response.json()["debug_data"]["prompt"]
    return prompt


async def test_another_editors_snippets_never_reach_a_prompt(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    alice = await prompt_of(keel, typing("", "alice-s3cret", agent="alice"), "vim")
    assert "alice-s3cret" in alice
    bob = await prompt_of(keel, typing("d", "bob-pw", agent="bob"), "vim")
    assert "bob-pw" in bob and "alice-s3cret" not in bob, bob
    # the same user agent from another user: its own too
    carol = await prompt_of(keel, typing("db", "carol-pw", agent="carol"), "code")
    assert "carol-pw" in carol and "alice-s3cret" not in carol, carol
    # one editor typing on along its line keeps its first choice: the head unchanged
    again = await prompt_of(keel, typing("d", "alice-changed", agent="alice"), "vim")
    assert again.split("def connect")[0] == alice.split("def connect")[0]


async def test_debug_data_lists_only_the_snippets_the_prompt_shows(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream
) -> None:
    """A language with no line comment (Markdown, JSON) shows the model no snippets;
    ``debug_data.snippets`` listed them anyway."""
    body = typing("", "pw", agent="dana")
    body["language"] = "markdown"
    response = await keel.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    debug = response.json()["debug_data"]
    assert "settings.py" not in debug["prompt"]
    assert not debug.get("snippets"), debug


async def test_the_snippets_kept_per_line_are_bounded_by_their_size(
    keel: httpx.AsyncClient, llamacpp: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choices kept per line were bounded by count alone (256): 256 requests with
    3.9 MB of declarations each held keel at 1.1 GB. Here, with the bound at 1 MB of
    text, 24 lines of 400 kB of snippets each (9.6 MB sent) leave keel holding about
    1 MB of them, not all."""
    monkeypatch.setattr(completion, "LINE_SNIPPET_CHARS", 2**20)
    body = "x = 1\n" * 66_000  # ~400 kB
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(24):
            request = typing("", "pw", agent="erin")
            segments = request["segments"]
            assert isinstance(segments, dict)
            segments["filepath"] = f"file_{index}.py"
            segments["declarations"] = [{"filepath": "big.py", "body": f"# {index}\n{body}"}]
            response = await keel.post("/v1/completions", json=request)
            assert response.status_code == 200, response.text
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 3 * 2**20, f"{held / 2**20:.1f} MiB held after 9.6 MB of snippets"
