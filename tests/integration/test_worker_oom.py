"""A worker the kernel kills for memory is reported as such and not restarted.

The OOM killer is observed through the kernel's ``oom_kill`` counter
(/proc/vmstat); the test stands in for the kernel at that boundary, and
everything else is real: a real worker process, a real SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from keel.errors import WorkerCrashed, WorkerUnavailable
from keel.models.registry import embedded_model_path
from keel.providers.base import CompletionCall, GenerationParams
from keel.providers.local import LocalProvider
from keel.workers.supervisor import (
    WorkerSpec,
    WorkerState,
    WorkerSupervisor,
    cgroup_oom_kills,
    kernel_oom_kills,
    worker_oom_kills,
)

pytestmark = pytest.mark.integration


def test_the_counters_are_readable_here() -> None:
    assert isinstance(kernel_oom_kills(), int)
    assert isinstance(worker_oom_kills(), int)


def test_the_control_groups_own_count_is_read_in_either_version(tmp_path: Path) -> None:
    """The host's count alone took a worker killed by hand for an OOM kill whenever any
    process on the host had been OOM-killed: keel's own control group's count is read
    first (cgroup v2's ``memory.events``; v1's ``memory.oom_control``, at the mount's
    root where a container's namespace shows its own group so)."""
    cgroups = tmp_path / "cgroup"
    v2 = tmp_path / "sys" / "system.slice" / "keel.service"
    v2.mkdir(parents=True)
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    cgroups.write_text("0::/system.slice/keel.service\n")
    assert cgroup_oom_kills(str(cgroups), str(tmp_path / "sys")) == 2
    cgroups.write_text("0::/\n")  # the root group: no count of its own
    assert cgroup_oom_kills(str(cgroups), str(tmp_path / "sys")) is None
    v1 = tmp_path / "sys" / "memory"
    v1.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    cgroups.write_text("9:cpu:/\n4:memory:/docker/abc\n0::/\n")
    assert cgroup_oom_kills(str(cgroups), str(tmp_path / "sys")) == 5  # namespaced: the root
    (v1 / "docker" / "abc").mkdir(parents=True)
    (v1 / "docker" / "abc" / "memory.oom_control").write_text("oom_kill 1\n")
    assert cgroup_oom_kills(str(cgroups), str(tmp_path / "sys")) == 1
    assert cgroup_oom_kills(str(tmp_path / "missing"), str(tmp_path / "sys")) is None


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
            assert supervisor.state is WorkerState.FAILED and supervisor.killed_for_memory
            assert supervisor.restarts == 0
            with pytest.raises(WorkerUnavailable, match="OOM"):
                await supervisor.wait_ready(1)
        else:
            assert "being restarted" in crashed.value.message
            await supervisor.wait_ready(60)  # a restart on a loaded machine can take a while
            assert supervisor.pid != pid and supervisor.restarts == 1
            assert not supervisor.killed_for_memory
    finally:
        await provider.aclose()
