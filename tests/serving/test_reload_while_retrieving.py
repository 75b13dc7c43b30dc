"""A config reload while a Tabby completion reads its repository snippets, before it asks
for an admission slot: the provider the reload replaces waits for it.

The retrieval runs on the retriever's own threads (``searches``); the test holds them
all, so the completion is held in exactly that phase. What keel did before: the request counted
nowhere, the reload stopped the provider at once, and the request then went to a
stopped provider.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import httpx
import pytest

from keel.index.retrieve import SEARCH_THREADS
from tests.fakes.upstreams import FakeUpstream
from tests.index.conftest import write_repo
from tests.index.test_retrieve import PREFIX
from tests.serving.conftest import build_app, llamacpp_config, model_calls

PROVIDER = "completion/llama.cpp/completion"


def config(completion: str, others: str, repo: Path) -> str:
    """Completion from llama.cpp's API at ``completion``, the rest from ``others``, and
    one indexed repository."""
    return llamacpp_config(completion, others=others) + (
        f'\n[[repositories]]\nname = "weather"\npath = "{repo}"\n'
        'git_url = "https://github.com/example/weather"\n\n'
        "[index]\nrefresh_seconds = 0\nmin_score = 0.0\n"
    )


def tabby(prefix: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {
            "prefix": prefix,
            "suffix": "\n",
            "filepath": "reports/weekly.py",
            "git_url": "https://github.com/example/weather",
        },
        "debug_options": {"return_snippets": True},
    }


async def indexed(http: httpx.AsyncClient) -> None:
    """Once the repository's index (built in the background at start) gives snippets."""
    for _ in range(300):
        answer = await http.post("/v1/completions", json=tabby(PREFIX))
        assert answer.status_code == 200, answer.text
        if answer.json()["debug_data"]["snippets"]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the repository was not indexed within 30 s")


async def test_a_reload_waits_for_a_completion_reading_its_snippets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keel.router")
    repo = write_repo(tmp_path / "repo")
    root = tmp_path / "keel"

    def stopped() -> bool:
        return f"stopped {PROVIDER}" in caplog.messages

    with (
        FakeUpstream(tokens=("old",)) as old,
        FakeUpstream(tokens=("new",)) as new,
        FakeUpstream() as others,
    ):
        app = build_app(root, config(old.url, others.url, repo))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=30
            ) as http:
                await indexed(http)
                sent = model_calls(old)
                loop = asyncio.get_running_loop()
                retriever = app.state.keel.completion.prompts.retriever
                release = threading.Event()
                holding = [
                    loop.run_in_executor(retriever.searches, release.wait)
                    for _ in range(SEARCH_THREADS)
                ]
                try:
                    # another line: its snippets are not the ones chosen for PREFIX's
                    request = asyncio.create_task(
                        http.post("/v1/completions", json=tabby("# weekly\n" + PREFIX))
                    )
                    await asyncio.sleep(0.5)  # in process, it reaches the thread in ms
                    assert not request.done() and model_calls(old) == sent, "not held"

                    (root / "config.toml").write_text(config(new.url, others.url, repo))
                    reloaded = await http.post("/v1/admin/reload")
                    assert reloaded.status_code == 200, reloaded.text
                    assert reloaded.json()["stopping"] == [PROVIDER]
                    await asyncio.sleep(0.5)  # the replaced provider's stop checks every 0.1 s
                    assert not stopped(), "stopped under a request on its way to it"
                finally:
                    release.set()
                    await asyncio.gather(*holding)
                answer = await request
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"] == "old"
                assert model_calls(old) == sent + 1
                for _ in range(50):
                    if stopped():
                        break
                    await asyncio.sleep(0.1)
                assert stopped(), "the replaced provider is stopped once the request ended"
                later = await http.post("/v1/completions", json=tabby(PREFIX))
                assert later.json()["choices"][0]["text"] == "new"
