"""The engine's default threads stay within a cgroup CPU quota (``docker --cpus``, a
Kubernetes CPU limit): read from cgroup v2's ``cpu.max`` or v1's CFS files."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.workers.worker import cpu_quota


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 1), ("50000 100000", 1)],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpu_quota(tmp_path) == cpus


@pytest.mark.parametrize(("quota", "cpus"), [("-1", None), ("400000", 4), ("20000", 1)])
def test_cgroup_v1_quota(tmp_path: Path, quota: str, cpus: int | None) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == cpus


def test_no_cgroup_files_is_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("garbage")
    assert cpu_quota(tmp_path) is None
