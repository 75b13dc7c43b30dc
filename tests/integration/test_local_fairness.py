"""Users sharing the embedded model: a slot that frees goes to the caller holding fewest.

keel admits eight requests at once to a local model of two slots; the engine's slots then
went in arrival order, so one key's burst held a colleague's completion behind all of it
(measured, one key sending sixteen completions at a time: the colleague's p50 7.2 s
against 0.34 s alone)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import PRECOMPUTE_OFF, KeelProcess, running_keel

ALICE, BOB = "alice-key-0001", "bobby-key-0002"
CONFIG = f'{PRECOMPUTE_OFF}[auth]\napi_keys = ["{ALICE}", "{BOB}"]\n'
BURST = 6
"""Alice's completions sent at once: two run in the engine's two slots, four wait."""
TOKENS = 12


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    with running_keel(tmp_path_factory.mktemp("fair"), CONFIG) as server:
        yield server


def _complete(server: KeelProcess, key: str, prompt: str, started: threading.Event) -> None:
    """One streamed OpenAI completion of exactly TOKENS tokens; ``started`` is set at its
    first token."""
    body = {"model": "x", "prompt": prompt, "max_tokens": TOKENS, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                started.set()


def test_a_colleagues_completion_goes_before_one_keys_queued_burst(shared: KeelProcess) -> None:
    finished: list[str] = []
    starts = [threading.Event() for _ in range(BURST + 1)]

    def send(who: str, key: str, at: int) -> None:
        _complete(shared, key, f"{who} {at}: 1, 2, 3, 4,", starts[at])
        finished.append(who)

    alice = [
        threading.Thread(target=send, args=("alice", ALICE, at), daemon=True) for at in range(BURST)
    ]
    for thread in alice:
        thread.start()
    # Two of Alice's run (the slots' first tokens came), the other four wait in the engine.
    deadline = time.monotonic() + 60
    while sum(event.is_set() for event in starts[:BURST]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    bob = threading.Thread(target=send, args=("bob", BOB, BURST), daemon=True)
    bob.start()
    for thread in [*alice, bob]:
        thread.join(120)
    assert sorted(finished) == ["alice"] * BURST + ["bob"]
    # In arrival order Bob's ran after all six of Alice's had a slot: at least four of
    # them done before his. Going first among the waiting, his ran beside Alice's third.
    before_bob = finished.index("bob")
    assert before_bob <= 3, finished
