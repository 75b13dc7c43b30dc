"""The memory a new worker may take counts keel's control group's limit (a container's).

The host's 22,520 MiB were counted inside a 1,200 MiB group: a load that needed 4,126 MiB
was started, the kernel killed its worker, and the client got a 400 ``invalid_model``.
The kernel's files are given here as a tree, as /proc and /sys/fs/cgroup show them."""

from __future__ import annotations

from pathlib import Path

import pytest

from keel.models.manager import mem_available

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
    stat = f"{inactive} {100 * MIB}\nother 7\n"  # page cache the kernel drops first: free
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
