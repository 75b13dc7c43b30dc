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
    """The environment a ready worker was started with (``/proc``: as it was at its exec;
    read from a worker just spawned, it was once empty in `make test`)."""
    supervisor = WorkerSupervisor(WorkerSpec(str(embedded_model_path())), name="env-test")
    await supervisor.start()
    try:
        await supervisor.wait_ready(60)
        assert supervisor.pid is not None
        return await asyncio.to_thread(environ_of, supervisor.pid)
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
