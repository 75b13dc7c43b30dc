"""Typing speed through a real keel process with the embedded model: the
worker reuses the prompt prefix it holds, and a newer keystroke's request
cancels the older one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PRECOMPUTE_OFF, KeelProcess, running_keel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def typing_keel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    """keel with a prompt budget of 256 tokens (~140 read of a long file): what these tests
    read is their CPU, and at the default 1,024 a moved window read ~1,000 cold."""
    config = PRECOMPUTE_OFF + "max_input_length = 256\n"
    with running_keel(tmp_path_factory.mktemp("typing"), config) as server:
        yield server


SOURCE = Path(httpx.__file__).with_name("_models.py").read_text()


def generation_stats(server: KeelProcess) -> dict[str, object]:
    providers = httpx.get(f"{server.url}/v1/providers", timeout=10).json()
    local = next(p for p in providers["roles"]["completion"]["providers"] if p["kind"] == "local")
    stats: dict[str, object] = local["worker"]["generation"]
    return stats


def tabby(prefix: str, filepath: str) -> dict[str, object]:
    return {
        "language": "python",
        "segments": {"prefix": prefix, "suffix": "\n", "filepath": filepath},
        "temperature": 0,
    }


def evaluated_by(server: KeelProcess, client: httpx.Client, body: dict[str, object]) -> int:
    """Prompt tokens the worker actually read for one request (counter deltas, so a
    background health probe in between costs at most a couple of tokens)."""
    return read_for(server, client, body)[0]


def read_for(server: KeelProcess, client: httpx.Client, body: dict[str, object]) -> tuple[int, str]:
    """:func:`evaluated_by`, and the prompt keel built for the request."""
    before = generation_stats(server)["evaluated_tokens"]
    asked = {**body, "debug_options": {"return_prompt": True}}
    response = client.post("/v1/completions", json=asked)
    assert response.status_code == 200, response.text
    after = generation_stats(server)["evaluated_tokens"]
    assert isinstance(before, int) and isinstance(after, int)
    prompt: str = response.json()["debug_data"]["prompt"]
    return after - before, prompt


def test_next_keystroke_reuses_the_cached_prefix(typing_keel: KeelProcess) -> None:
    prefix = SOURCE[:1100]
    with typing_keel.client() as client:
        cold = evaluated_by(typing_keel, client, tabby(prefix, "a.py"))
        warm = evaluated_by(typing_keel, client, tabby(prefix + "x", "a.py"))
    assert cold > 100  # the whole prompt was read
    assert warm <= 8, warm  # only the new keystroke's tokens (and a probe's, at most)


def test_a_moved_window_reuses_the_cache_by_shifting_it(typing_keel: KeelProcess) -> None:
    """Four more lines typed: the window start jumps down, and the worker drops the
    lines that left the window from its KV cache instead of reading everything again."""
    lines = SOURCE.splitlines(keepends=True)
    before = "".join(lines[:400])  # far more than the local prompt budget
    after = "".join(lines[:404])
    with typing_keel.client() as client:
        cold, first = read_for(typing_keel, client, tabby(before, "moved.py"))
        moved, second = read_for(typing_keel, client, tabby(after, "moved.py"))
    assert cold > 100
    assert not second.startswith(first[:40]), "the window's start moved down"
    assert moved < cold / 2, (cold, moved)


def test_a_newer_keystroke_supersedes_the_older_request(typing_keel: KeelProcess) -> None:
    prefix = SOURCE[8000:9600]  # not cached: the first request has a long prefill
    responses: dict[str, httpx.Response] = {}

    def send(name: str, body: dict[str, object]) -> None:
        responses[name] = httpx.post(f"{typing_keel.url}/v1/completions", json=body, timeout=120)

    before = generation_stats(typing_keel)
    first = threading.Thread(target=send, args=("first", tabby(prefix, "b.py")))
    first.start()
    time.sleep(0.3)
    send("second", tabby(prefix + "d", "b.py"))
    first.join(60)
    assert responses["first"].status_code == 200
    assert responses["first"].headers.get("X-Keel-Superseded") == "1"
    assert responses["first"].json()["choices"] == [{"index": 0, "text": ""}]
    assert responses["second"].status_code == 200
    assert "X-Keel-Superseded" not in responses["second"].headers
    after = generation_stats(typing_keel)
    assert isinstance(after["cancelled"], int) and isinstance(before["cancelled"], int)
    assert isinstance(after["requests"], int) and isinstance(before["requests"], int)
    # The older one's engine work was cancelled, or (a loaded machine: still on its way
    # in keel 0.3 s on, seen once in a fresh clone's run) never began: only the newer
    # one ran. Never run to its end.
    ran = after["requests"] - before["requests"]
    assert after["cancelled"] > before["cancelled"] or ran == 1, (before, after)
