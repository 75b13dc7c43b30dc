"""The memory a new worker may take counts keel's control group's limit (a container's).

The host's 22,520 MiB were counted inside a 1,200 MiB group: a load that needed 4,126 MiB
was started, the kernel killed its worker, and the client got a 400 ``invalid_model``.
The kernel's files are given here as a tree, as /proc and /sys/fs/cgroup show them."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.config import Paths, Settings
from keel.models.manager import mem_available
from keel.ops.doctor import check_fit, group_trouble
from keel.providers.catalog import build_providers

MIB = 2**20


def host(tmp_path: Path, available_mib: int) -> Path:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_mib * 1024} kB\n")
    return meminfo


def group(place: Path, files: dict[str, str]) -> None:
    place.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (place / name).write_text(text)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_groups_limit_below_the_hosts_memory_is_what_is_available(
    tmp_path: Path, version: str
) -> None:
    mount = tmp_path / "cgroup"
    if version == "v1":
        cgroups = "4:memory:/box\n0::/\n"
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        top = mount / "memory"
        unlimited = str(2**63 - 4096)
    else:
        cgroups = "0::/box\n"
        names = ("memory.max", "memory.current", "inactive_file")
        top = mount
        unlimited = "max"
    limit, usage, inactive = names
    group(top, {limit: unlimited, usage: str(5000 * MIB), "memory.stat": f"{inactive} 0\n"})
    # page cache, which the kernel drops before it kills: free (a file read twice,
    # the model file among them, was counted used)
    active = inactive.replace("inactive", "active")
    stat = f"{inactive} {60 * MIB}\n{active} {40 * MIB}\nother 7\n"
    group(top / "box", {limit: str(1200 * MIB), usage: str(300 * MIB), "memory.stat": stat})
    (tmp_path / "self").write_text(cgroups)
    available = mem_available(host(tmp_path, 22_520), tmp_path / "self", mount)
    assert available == (1200 - 300 + 100) * MIB
    # the host's, where it is less; and the host's alone in a group with no limit
    assert mem_available(host(tmp_path, 800), tmp_path / "self", mount) == 800 * MIB
    (top / "box" / limit).write_text(unlimited)
    assert mem_available(host(tmp_path, 22_520), tmp_path / "self", mount) == 22_520 * MIB


def test_a_limit_on_a_group_above_keels_counts_too(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's group, above the container's own."""
    mount = tmp_path / "cgroup"
    group(mount / "pod", {"memory.max": str(1024 * MIB), "memory.current": str(900 * MIB)})
    group(mount / "pod" / "app", {"memory.max": "max", "memory.current": str(800 * MIB)})
    for place in (mount / "pod", mount / "pod" / "app"):
        (place / "memory.stat").write_text("inactive_file 0\n")
    (tmp_path / "self").write_text("0::/pod/app\n")
    assert mem_available(host(tmp_path, 22_520), tmp_path / "self", mount) == 124 * MIB


def test_the_default_models_start_in_a_group_their_estimate_overruns(tmp_path: Path) -> None:
    """The estimate counts each generating engine's prompt cache full: the embedded
    model's three roles were estimated at 919 MiB and used 437 MiB, and a 900 MiB
    container where they ran refused to start them (exit 69). Said, not refused."""
    mount = tmp_path / "cgroup"
    files = {"memory.max": str(900 * MIB), "memory.current": str(100 * MIB)}
    group(mount / "box", {**files, "memory.stat": "inactive_file 0\n"})
    (tmp_path / "self").write_text("0::/box\n")
    providers = build_providers(Settings(), Paths(tmp_path / "root")).unique()
    check_fit(providers)  # the host's memory: no refusal
    said = group_trouble(providers, tmp_path / "self", mount)
    assert said is not None and "raise the limit" in said, said
    (mount / "box" / "memory.max").write_text(str(4096 * MIB))
    assert group_trouble(providers, tmp_path / "self", mount) is None
