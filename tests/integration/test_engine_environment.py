"""A local engine's threads spin only briefly at their barriers (``GOMP_SPINCOUNT``), unless
the user set it: at libgomp's default, one busy process beside keel's 2-thread engine on 2
cores took its decoding from 100 to ~1 token a second (keel.workers.supervisor's
``ENGINE_ENVIRONMENT``; the speed itself is the benchmarks' to measure)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keel.models.registry import embedded_model_path
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor

pytestmark = pytest.mark.integration


def environ_of(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


async def environment_of_a_worker() -> list[bytes]:
    """The environment a worker was started with (``/proc``: as it was at its exec)."""
    supervisor = WorkerSupervisor(WorkerSpec(str(embedded_model_path())), name="env-test")
    await supervisor.start()
    try:
        for _ in range(5000):
            if (pid := supervisor.pid) is not None:
                return await asyncio.to_thread(environ_of, pid)
            await asyncio.sleep(0.001)
        raise AssertionError("no worker started")
    finally:
        await supervisor.stop()


async def test_the_engine_spins_briefly_unless_the_user_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert b"GOMP_SPINCOUNT=1000" in await environment_of_a_worker()
    monkeypatch.setenv("GOMP_SPINCOUNT", "250000")
    environment = await environment_of_a_worker()
    assert b"GOMP_SPINCOUNT=250000" in environment
    assert b"GOMP_SPINCOUNT=1000" not in environment
