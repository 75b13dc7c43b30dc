"""The engine's default threads stay within a cgroup CPU quota (``docker --cpus``, a
Kubernetes CPU limit): read from cgroup v2's ``cpu.max`` or v1's CFS files; llama-server's
``LLAMA_ARG_THREADS`` sets them where the config does not."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from keel.workers.worker import THREADS_VARIABLE, _threads, cpu_quota


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


@pytest.mark.parametrize(
    ("configured", "variable", "threads"),
    [(None, "3", 3), (2, "3", 2), (None, " 4\n", 4)],
)
def test_llama_arg_threads_is_read_where_threads_is_not_configured(
    monkeypatch: pytest.MonkeyPatch, configured: int | None, variable: str, threads: int
) -> None:
    """llama-server's ``LLAMA_ARG_THREADS``, as llama.cpp's container images are
    configured; a configured ``threads`` wins."""
    monkeypatch.setenv(THREADS_VARIABLE, variable)
    assert _threads(argparse.Namespace(threads=configured)) == threads


@pytest.mark.parametrize("variable", ["0", "-2", "two", "", "1.5", "²"])
def test_a_llama_arg_threads_that_is_not_a_count_leaves_the_default(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    default = _threads(argparse.Namespace(threads=None))
    monkeypatch.setenv(THREADS_VARIABLE, variable)
    assert _threads(argparse.Namespace(threads=None)) == default
