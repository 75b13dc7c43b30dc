"""A worker the kernel kills for memory is reported as such and not restarted.

The OOM killer is observed through the kernel's ``oom_kill`` counter
(/proc/vmstat); the test stands in for the kernel at that boundary, and
everything else is real: a real worker process, a real SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from keel.errors import WorkerCrashed, WorkerUnavailable
from keel.models.registry import embedded_model_path
from keel.providers.base import CompletionCall, GenerationParams
from keel.providers.local import LocalProvider
from keel.workers.supervisor import WorkerSpec, WorkerState, WorkerSupervisor, kernel_oom_kills

pytestmark = pytest.mark.integration


def test_the_kernel_counter_is_readable_here() -> None:
    assert isinstance(kernel_oom_kills(), int)


@pytest.mark.parametrize("oom", [True, False])
async def test_sigkill_with_and_without_an_oom_kill(oom: bool) -> None:
    kills = {"count": 7}
    supervisor = WorkerSupervisor(
        WorkerSpec(str(embedded_model_path())), name="oom-test", oom_kills=lambda: kills["count"]
    )
    provider = LocalProvider(supervisor, name="oom-test", model="m", ready_timeout=60)
    await provider.start()
    try:
        await supervisor.wait_ready(60)
        pid = supervisor.pid
        assert pid is not None
        call = CompletionCall("1, 2, 3, 4,", GenerationParams(max_tokens=2000))
        stream = provider.stream_completion(call)
        await anext(stream)
        if oom:
            kills["count"] += 1  # what the kernel's counter does when it OOM-kills
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed) as crashed:
            async for _ in stream:
                pass
        for _ in range(100):
            if supervisor.state in (WorkerState.FAILED, WorkerState.READY) and (
                supervisor.pid != pid or supervisor.state is WorkerState.FAILED
            ):
                break
            await asyncio.sleep(0.1)
        if oom:
            assert "lack of memory" in crashed.value.message
            assert "will not be restarted" in crashed.value.message
            assert supervisor.state is WorkerState.FAILED
            assert supervisor.restarts == 0
            with pytest.raises(WorkerUnavailable, match="OOM"):
                await supervisor.wait_ready(1)
        else:
            assert "being restarted" in crashed.value.message
            await supervisor.wait_ready(60)  # a restart on a loaded machine can take a while
            assert supervisor.pid != pid and supervisor.restarts == 1
    finally:
        await provider.aclose()
