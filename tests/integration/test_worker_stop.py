"""A worker stopped while it loads ends at once: it reads its stdin (the ready worker's
signal to stop) only once the engine is up, and a large model takes seconds from disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest

from keel.models.registry import embedded_model_path
from keel.workers.supervisor import WorkerSpec, WorkerState, WorkerSupervisor

pytestmark = pytest.mark.integration


def exists(pid: int) -> bool:
    """A process ``pid`` exists, a zombie not yet reaped included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_worker_stopped_while_it_loads_ends_at_once() -> None:
    supervisor = WorkerSupervisor(WorkerSpec(str(embedded_model_path())), name="stop-test")
    await supervisor.start()
    pid = None
    try:
        for _ in range(5000):  # its process exists well before its Python has started
            if (pid := supervisor.pid) is not None:
                break
            await asyncio.sleep(0.001)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a load that does not end (a model on a slow disk)
        assert supervisor.state in (WorkerState.STARTING, WorkerState.LOADING)
        started = time.monotonic()
        await supervisor.stop()
        took = time.monotonic() - started
    finally:
        if pid is not None and exists(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await supervisor.stop()
    assert supervisor.state is WorkerState.STOPPED
    assert not exists(pid), "the worker is gone, and reaped"
    # A ready worker's stop closes its stdin and waits up to 5 s before it kills.
    assert took < 4, f"the stop waited {took:.1f} s for a worker that was loading"


async def test_a_worker_that_dies_after_each_load_restarts_ever_later() -> None:
    """Killed each time it is ready: the restarts back off (0.5, 1, 2 s), where a reset
    for having been ready restarted it every 0.5 s until the start limit."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        await asyncio.sleep(0)

    supervisor = WorkerSupervisor(
        WorkerSpec(str(embedded_model_path()), threads=1),
        name="backoff-test",
        sleep=sleep,
        oom_kills=lambda: None,
    )
    await supervisor.start()
    try:
        for _ in range(3):
            await supervisor.wait_ready(60)
            assert supervisor.pid is not None
            os.kill(supervisor.pid, signal.SIGKILL)
            for _ in range(1000):  # it sees the death within a few ms
                if supervisor.state is not WorkerState.READY:
                    break
                await asyncio.sleep(0.01)
        await supervisor.wait_ready(60)
    finally:
        await supervisor.stop()
    assert delays == [0.5, 1.0, 2.0]
