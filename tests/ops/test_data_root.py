"""A data root keel cannot use (``KEEL_ROOT`` naming a file, a directory keel's user
cannot enter or write, a read-only file system, a full disk) crashed ``keel serve``
with a traceback (exit 1, or uvicorn's 3 from SQLite's "unable to open database file"),
which a supervisor restarts for ever; ``config check``, ``doctor`` and ``models list``
crashed on a root they could not enter. Now: one ``keel:`` line naming the path and
what to do, exit 78; ``keel config check`` warns (the root is this machine's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.forked import run_keel
from tests.ports import free_port

KEEL = [sys.executable, "-m", "keel"]


def keel(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """``keel <args>`` with ``root`` its data root (forked: tests/forked.py)."""
    return run_keel(args, {**os.environ, "KEEL_ROOT": str(root)}, timeout=120)


def run(command: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """``command``, a ``python -m keel`` in namespaces of its own (exec'd: a fork of the
    template would share the template's)."""
    env = {**os.environ, "KEEL_ROOT": str(root)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def as_unprivileged(command: list[str]) -> list[str]:
    """``command`` run without root's right to enter any directory: in a user namespace
    where keel's user is nobody (files stay owned by the real user, mode 000 holds)."""
    if os.geteuid() != 0:
        return command
    return ["unshare", "-U", "--map-user=65534", "--map-group=65534", *command]


def on_tmpfs(command: list[str], root: Path, options: str, fill: bool | int = False) -> list[str]:
    """``command`` with ``root`` a tmpfs mounted with ``options`` (a mount namespace of
    its own, nothing mounted on this machine), filled (``True``), or with ``fill`` KiB
    written to it."""
    fill_it = ""
    if fill is True:
        fill_it = f" && (cat /dev/zero > {root}/fill 2>/dev/null; true)"
    elif fill:
        fill_it = f" && dd if=/dev/zero of={root}/fill bs=1k count={fill} status=none"
    script = f'mount -t tmpfs -o {options} tmpfs {root}{fill_it} && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", *command]


def assert_one_line_78(result: subprocess.CompletedProcess[str], *said: str) -> None:
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("keel: ")]
    assert len(lines) == 1, result.stderr
    for text in said:
        assert text in lines[0], lines[0]


def test_a_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.write_text("not a directory")
    served = keel(["serve", "--port", "1"], root)
    assert_one_line_78(served, f"data root {root}", "is a file", "KEEL_ROOT")
    checked = keel(["config", "check"], root)
    assert checked.returncode == 0, checked.stderr
    assert f"warning: data root {root}" in checked.stderr and "exit 78" in checked.stderr
    doctor = keel(["doctor", "--port", "1"], root)
    assert doctor.returncode == 78, doctor.stdout + doctor.stderr
    assert "is a file, not a directory" in doctor.stdout


def test_a_root_keels_user_cannot_enter(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    root = locked / "keel"
    root.mkdir()
    locked.chmod(0)
    try:
        for command in (["serve", "--port", "1"], ["config", "check"], ["models", "list"]):
            result = run(as_unprivileged([*KEEL, *command]), root)
            assert_one_line_78(result, f"data root {root}", "cannot enter or write", "KEEL_ROOT")
        doctor = run(as_unprivileged([*KEEL, "doctor", "--port", "1"]), root)
        assert doctor.returncode == 78, doctor.stdout + doctor.stderr
        assert "Traceback" not in doctor.stderr and "cannot enter or write" in doctor.stdout
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(
    ("options", "fill", "said"),
    [("ro", False, "read-only file system"), ("size=64k", True, "disk is full")],
)
def test_a_read_only_or_full_root(tmp_path: Path, options: str, fill: bool, said: str) -> None:
    root = tmp_path / "keel"
    root.mkdir()
    served = run(on_tmpfs([*KEEL, "serve", "--port", "1"], root, options, fill), root)
    assert_one_line_78(served, f"data root {root}", said)
    checked = run(on_tmpfs([*KEEL, "config", "check"], root, options, fill), root)
    assert checked.returncode == 0, checked.stderr
    assert f"warning: data root {root}" in checked.stderr and said in checked.stderr


@pytest.mark.parametrize("events", ["not a database", "a directory", "an unwritable place"])
def test_an_events_file_keel_cannot_use_is_a_config_error(tmp_path: Path, events: str) -> None:
    """`config check` said ok and `doctor` "all checks passed"; `keel serve` then failed
    in its lifespan with SQLite's traceback, exit 3, which supervisors retry."""
    root = tmp_path / "keel"
    root.mkdir()
    url = "sqlite:///events.sqlite3"
    if events == "not a database":
        (root / "events.sqlite3").write_text("notes, not a database\n")
    elif events == "a directory":
        (root / "events.sqlite3").mkdir()
    else:
        url = "sqlite:////proc/keel-events.sqlite3"
    (root / "config.toml").write_text(f'[events]\ndatabase_url = "{url}"\n')
    served = keel(["serve", "--port", "1"], root)
    assert served.returncode == 78, served.stderr
    assert "events.database_url" in served.stderr and "Traceback" not in served.stderr
    checked = keel(["config", "check"], root)
    assert checked.returncode == 0 and "events.database_url" in checked.stderr, checked.stderr
    doctor = keel(["doctor"], root)
    assert doctor.returncode == 78 and "events.database_url" in doctor.stdout, doctor.stdout


def test_a_port_keel_may_not_bind_is_a_config_error(tmp_path: Path) -> None:
    """A port below 1024 without the privilege exited 1 ("crashed"), which supervisors
    and systemd's Restart=on-failure retried, and said nothing of what to do."""
    root = tmp_path / "keel"
    root.mkdir(mode=0o777)
    (root / "config.toml").write_text("[server]\nport = 80\n")
    os.chmod(root / "config.toml", 0o666)
    served = run(as_unprivileged([*KEEL, "serve"]), root)
    assert served.returncode == 78, served.stderr
    assert "server.port" in served.stderr and "CAP_NET_BIND_SERVICE" in served.stderr
    flagged = run(as_unprivileged([*KEEL, "serve", "--port", "81"]), root)
    assert flagged.returncode == 78 and "--port" in flagged.stderr, flagged.stderr
    doctor = run(as_unprivileged([*KEEL, "doctor"]), root)
    assert "CAP_NET_BIND_SERVICE" in doctor.stdout, doctor.stdout


def test_a_nearly_full_root_is_said_before_serving(tmp_path: Path) -> None:
    """32 KiB free: the data root's write check passed and `doctor` said "events ok";
    `keel serve` said "serving on", then SQLite's "database or disk is full" ended it in
    a traceback, uvicorn's exit 3 (which supervisors retry), with the advice to move a
    sound file away."""
    root = tmp_path / "keel"
    root.mkdir()
    port = str(free_port())  # a port it could serve on, as it did before it failed
    served = run(on_tmpfs([*KEEL, "serve", "--port", port], root, "size=64k", 32), root)
    assert served.returncode == 78, served.stderr
    assert "Traceback" not in served.stderr and "serving on" not in served.stderr
    assert "events.database_url" in served.stderr and "move it away" not in served.stderr
    assert "its disk is full: free some space there" in served.stderr
    doctor = run(on_tmpfs([*KEEL, "doctor", "--port", "1"], root, "size=64k", 32), root)
    assert doctor.returncode == 78, doctor.stdout + doctor.stderr
    assert "its disk is full" in doctor.stdout


def test_a_root_behind_a_file_or_a_dangling_link_is_named_as_such(tmp_path: Path) -> None:
    """Both read "it is a file, not a directory", of a path that was neither."""
    (tmp_path / "notes.toml").write_text("")
    behind = tmp_path / "notes.toml" / "sub" / "keel"
    served = keel(["serve", "--port", "1"], behind)
    assert_one_line_78(served, f"a part of its path, {tmp_path / 'notes.toml'}, is a file")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    served = keel(["serve", "--port", "1"], link)
    assert_one_line_78(served, f"{link} is a symbolic link to nothing ({tmp_path / 'gone'})")
