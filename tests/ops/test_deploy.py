"""The shipped systemd unit keeps the promises the runbook and DESIGN.md make."""

from __future__ import annotations

from pathlib import Path

from keel.errors import NO_RESTART
from keel.restart import RestartPolicy

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "keel.service"


def directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_restarts_crashes_but_not_unfixable_exits() -> None:
    unit = directives()
    assert unit["Restart"] == ["on-failure"]
    assert float(unit["RestartSec"][0]) > 0
    assert {int(code) for code in unit["RestartPreventExitStatus"][0].split()} == set(NO_RESTART)
    policy = RestartPolicy()
    assert int(unit["StartLimitBurst"][0]) == policy.start_limit
    assert float(unit["StartLimitIntervalSec"][0]) == policy.start_window


def test_the_unit_checks_before_starting_and_drains_on_stop() -> None:
    unit = directives()
    # reported, never blocking: doctor is stricter than serve (a Redis refusing keel's
    # password failed it while keel serves), and systemd retries a failed ExecStartPre
    assert unit["ExecStartPre"][0].startswith("-") and unit["ExecStartPre"][0].endswith(
        "keel doctor"
    )
    assert "keel serve" in unit["ExecStart"][0]
    assert unit["Type"] == ["exec"]
    # the start check asks the port the config sets (it asked 8080, whatever the config)
    assert unit["ExecStartPost"][0].endswith("keel wait --timeout 120")
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to keel alone, so it can drain
    assert int(unit["TimeoutStopSec"][0]) > 30  # longer than the default grace period


def test_systemctl_reload_is_keels_reload() -> None:
    assert directives()["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
