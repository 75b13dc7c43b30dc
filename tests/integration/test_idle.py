"""An idle keel lets the machine sleep: a laptop runs it all day, mostly waiting.

Measured, a default keel idle for 60 s: its event loop woke 10 times a second (uvicorn's
loop, to see whether to stop) and each engine ~100 times a second (the engine's listener
watching the connection keel's liveness checks kept open), 1.1 CPU-s a minute in all
for nothing; now the loop wakes once a second (for the ``Date`` header; a signal wakes
it at once) and that connection closes after 0.25 s unused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import KeelProcess

pytestmark = pytest.mark.integration

QUIET = 4.0
"""Seconds the keel is watched idle."""


def voluntary_switches(pid: int, threads: str = "*") -> int:
    """How many times the threads of ``pid`` matching ``threads`` (a glob of thread ids)
    went to sleep, so far."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob(f"{threads}/status"):
        try:
            text = status.read_text()
        except OSError:  # a thread that ended since the listing
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def test_an_idle_keel_and_its_engines_wake_seldom(keel_server: KeelProcess) -> None:
    """The shared keel, between the requests of its tests: its event loop and its
    engines are woken by keel's liveness checks (two calls per engine every 5 s) and a
    clock tick a second, no more. Before, over the same 4 s: the event loop at least 40
    times, each engine at least 400."""
    keel = keel_server.process.pid
    engines = [keel_server.worker_pid(role) for role in ("completion", "embedding")]
    time.sleep(0.5)  # a liveness check under way, if any, ends and its connection closes
    before = [voluntary_switches(keel, str(keel))] + [voluntary_switches(e) for e in engines]
    time.sleep(QUIET)
    after = [voluntary_switches(keel, str(keel))] + [voluntary_switches(e) for e in engines]
    loop, *engine_wakes = [b - a for a, b in zip(before, after, strict=True)]
    # 4 ticks and one liveness check of each engine (a few wakes each) at most.
    assert loop < 25, f"keel's event loop slept and woke {loop} times in {QUIET} s"
    for wakes in engine_wakes:
        assert wakes < 100, f"an engine's threads slept and woke {wakes} times in {QUIET} s"
