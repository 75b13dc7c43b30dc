"""A keel started at a lower priority (``nice``, ``chrt --idle``) runs its engines at it.

A worker has a session of its own, hence an autogroup of its own where Linux schedules
by autogroup, and a nice counts only within its autogroup: each engine weighed as much
as every other session on the machine, whatever keel's own priority."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keel.workers.worker import EMBEDDING_NICE, IDLE_GROUP_NICE

pytestmark = pytest.mark.integration

# A keel's supervisor in a process of its own, which lowers its own priority first (its
# first argument: a nice increment, or "idle"): what each worker it starts runs at.
SCRIPT = r"""
import asyncio, json, os, sys
from pathlib import Path
from keel.models.registry import embedded_model_path
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor

if sys.argv[1] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
else:
    os.nice(int(sys.argv[1]))

def priority(pid):
    threads = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads.add(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    autogroup = Path(f"/proc/{pid}/autogroup")
    group = int(autogroup.read_text().split()[-1]) if autogroup.exists() else None
    return {"threads": sorted(threads), "group": group, "policy": os.sched_getscheduler(pid)}

async def main():
    found = {}
    for role in sys.argv[2:]:
        spec = WorkerSpec(str(embedded_model_path()), threads=1, embedding=role == "embedding")
        worker = WorkerSupervisor(spec, name=role, oom_kills=lambda: None)
        await worker.start()
        try:
            await worker.wait_ready(60)
            found[role] = priority(worker.pid)
        finally:
            await worker.stop()
    print(json.dumps(found))

asyncio.run(main())
"""


def workers_started_at(lower: str, *roles: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, lower, *roles],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, dict[str, object]] = json.loads(done.stdout)
    return found


def test_a_niced_keel_runs_its_engines_at_its_nice() -> None:
    found = workers_started_at("5", "completion", "embedding")
    completion, embedding = found["completion"], found["embedding"]
    keel = min(19, os.nice(0) + 5)  # the tests' own nice, 5 lower
    assert completion["threads"] == [keel], completion
    assert embedding["threads"] == [min(19, keel + EMBEDDING_NICE)], embedding
    if Path("/proc/self/autogroup").exists():
        assert completion["group"] == keel, found
        assert embedding["group"] == min(19, keel + EMBEDDING_NICE), found


def test_a_keel_in_the_idle_class_runs_its_engines_in_it() -> None:
    completion = workers_started_at("idle", "completion")["completion"]
    assert completion["policy"] == os.SCHED_IDLE, completion
    if Path("/proc/self/autogroup").exists():
        assert completion["group"] == IDLE_GROUP_NICE, completion
