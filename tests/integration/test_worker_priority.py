"""A keel started at a lower priority (``nice``, ``chrt --idle``) runs its engines at it.

A worker has a session of its own, hence an autogroup of its own where Linux schedules
by autogroup, and a nice counts only within its autogroup: each engine weighed as much
as every other session on the machine, whatever keel's own priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keel.workers.worker import EMBEDDING_NICE, IDLE_GROUP_NICE
from tests.conftest import niceness, wait_or_kill

pytestmark = pytest.mark.integration

# A keel's supervisor in a process of its own, which lowers its own priority first (its
# first argument: a nice increment, or "idle"), starts a worker for each role named
# after it, says their pids once they are ready, and stops them when its stdin closes.
SCRIPT = r"""
import asyncio, json, os, sys
from keel.models.registry import embedded_model_path
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor

if sys.argv[1] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
else:
    os.nice(int(sys.argv[1]))

async def main():
    workers = {}
    try:
        for role in sys.argv[2:]:
            spec = WorkerSpec(str(embedded_model_path()), threads=1, embedding=role == "embedding")
            workers[role] = WorkerSupervisor(spec, name=role, oom_kills=lambda: None)
            await workers[role].start()
            await workers[role].wait_ready(60)
        print(json.dumps({role: worker.pid for role, worker in workers.items()}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
    finally:
        for worker in workers.values():
            await worker.stop()

asyncio.run(main())
"""


@contextmanager
def workers_started_at(lower: str, *roles: str) -> Iterator[dict[str, int]]:
    """The pids of the ready workers for ``roles``, started by a supervisor at ``lower``."""
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT, lower, *roles],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        try:
            line = process.stdout.readline()
            assert line, f"the supervisor exited {process.wait()} before its workers were ready"
            yield json.loads(line)
        finally:
            process.stdin.close()
            wait_or_kill(process, 30)


def test_a_niced_keel_runs_its_engines_at_its_nice() -> None:
    keel = min(19, os.nice(0) + 5)  # the tests' own nice, 5 lower
    lower = min(19, keel + EMBEDDING_NICE)
    with workers_started_at("5", "completion", "embedding") as pids:
        completion, embedding = niceness(pids["completion"]), niceness(pids["embedding"])
    assert completion[0] == {keel} and embedding[0] == {lower}, (completion, embedding)
    if Path("/proc/self/autogroup").exists():
        assert (completion[1], embedding[1]) == (keel, lower)


def test_a_keel_in_the_idle_class_runs_its_engines_in_it() -> None:
    with workers_started_at("idle", "completion") as pids:
        policy = os.sched_getscheduler(pids["completion"])
        completion = niceness(pids["completion"])
    assert policy == os.SCHED_IDLE, policy
    if Path("/proc/self/autogroup").exists():
        assert completion[1] == IDLE_GROUP_NICE, completion
