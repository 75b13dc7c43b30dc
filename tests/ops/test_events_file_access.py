"""An events SQLite file keel's user cannot write (root's, left by a run as root; a
read-only mount) was taken at start: SQLite opened it read-only without a word, keel
said "serving on", answered POST /v1/events 200 and dropped every event
(``keel_events_dropped_total{reason="write_failed"}``), and `keel doctor` said
"events ok". Now it is the config error any unusable events file is: exit 78 from
``keel serve`` and ``keel doctor``, naming the file, why, and what to do."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel.config import EventsConfig, Paths
from keel.events import events_file_issue
from tests.ops.test_data_root import KEEL, run


def events_file(root: Path) -> Path:
    """A real events database in ``root``, as a keel run before left it."""
    path = root / "events.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    return path


def test_an_events_file_on_a_read_only_mount_is_a_config_error(tmp_path: Path) -> None:
    """SQLite opened it read-only without a word: keel said "serving on", answered
    POST /v1/events 200 and dropped every event; `keel doctor` said "events ok"."""
    root = tmp_path / "keel"
    root.mkdir()
    path = events_file(root)
    read_only = f"mount --bind {path} {path} && mount -o remount,bind,ro {path}"
    for command in (["serve", "--port", "1"], ["doctor", "--port", "1"]):
        shell = ["unshare", "-rm", "sh", "-c", f'{read_only} && exec "$@"', "sh"]
        result = run([*shell, *KEEL, *command], root)
        assert result.returncode == 78, result.stdout + result.stderr
        said = result.stdout + result.stderr
        assert "events.database_url" in said and "Traceback" not in said, said
        assert f"{path} is on a read-only file system" in said, said


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A data root any user can reach and write (pytest's tmp_path is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="keel-shared-"))
    root.chmod(0o777)
    try:
        yield root
    finally:
        shutil.rmtree(root)


def test_an_events_file_of_another_user_is_a_config_error(shared_root: Path) -> None:
    """keel run once as root, then as its service user: root's 0644 file in a 0777
    root. The check runs in a process of the service user's (nobody here), as
    `keel serve` and `keel doctor` run it at start."""
    root = shared_root
    path = events_file(root)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, with keel already imported
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            issue = events_file_issue(EventsConfig(), Paths(root))
            os.write(write, (issue.message if issue else "none").encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as said:
        message = said.read()
    os.waitpid(pid, 0)
    assert f"the events database {path} cannot be used" in message, message
    assert "owned by root (mode 0644) and keel runs as nobody" in message, message
    assert f"chown nobody {path}" in message, message
    assert events_file_issue(EventsConfig(), Paths(root)) is None  # root may write it
