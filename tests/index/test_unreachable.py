"""A checkout keel cannot look at costs its own snippets, nothing else.

A dead mount (a crashed sshfs: ``ENOTCONN``), a hung one (an NFS server that stopped
answering: a ``stat`` that never returns) and a path the system refuses (``EACCES``
for a parent keel may no longer enter; here ``ENAMETOOLONG``, which root meets too)
made every completion a 500, ``keel serve`` fail to start, and, hung, froze every
route of the server. The mounts are real FUSE mounts that no daemon serves (root and
``/dev/fuse``, as on the development and CI machines).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keel.config import IndexConfig, Paths, RepositoryConfig
from keel.errors import KeelError
from keel.index.retrieve import HUNG_SECONDS, RepositoryRetriever
from keel.index.walk import is_directory
from tests.index.test_retrieve import PREFIX

ASK = {
    "prefix": PREFIX,
    "filepath": "report.py",
    "git_url": "https://github.com/example/weather",
    "language": "python",
}


def _fuse_usable() -> bool:
    return os.geteuid() == 0 and os.access("/dev/fuse", os.R_OK | os.W_OK)


@contextmanager
def unserved_mount(target: Path) -> Iterator[int]:
    """A FUSE filesystem at ``target`` that nobody answers: every look inside it waits
    (a hung mount) until the ``/dev/fuse`` descriptor it yields is closed, which makes
    it a dead mount (``ENOTCONN``)."""
    assert _fuse_usable(), "a FUSE mount needs root and /dev/fuse (the test machines have both)"
    target.mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"keel-test", str(target).encode(), b"fuse", 0, options) != 0:
        os.close(fd)
        raise AssertionError(f"FUSE mount refused: {os.strerror(ctypes.get_errno())}")
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture(params=["dead mount", "refused path"])
def unreachable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A checkout path whose ``stat`` raises an error pathlib does not swallow."""
    if request.param == "refused path":
        yield tmp_path / ("x" * 300) / "repo"  # ENAMETOOLONG
        return
    with unserved_mount(tmp_path / "mnt") as fd:
        os.close(fd)
        yield tmp_path / "mnt" / "repo"


def _retriever(repo: Path, other: Path, data: Path) -> RepositoryRetriever:
    return RepositoryRetriever.from_settings(
        [
            RepositoryConfig(name="other", path=str(other)),
            RepositoryConfig(
                name="weather", path=str(repo), git_url="https://github.com/example/weather"
            ),
        ],
        IndexConfig(min_score=0.0),
        Paths(data),
    )


async def test_a_checkout_keel_cannot_look_at_costs_its_snippets_only(
    unreachable: Path, repo: Path, tmp_path: Path
) -> None:
    with pytest.raises(OSError):
        os.stat(unreachable)  # what broke keel: pathlib's is_dir() raised it
    assert not is_directory(unreachable)
    built = _retriever(repo, unreachable, tmp_path / "data")  # `keel serve` starts
    built.update("weather")
    with pytest.raises(KeelError, match="not a directory keel can enter"):
        built.update("other")  # `keel index` says which, and goes on to the next
    built.state()  # asked by every completion, before any search: it raised
    assert await built.retrieve(**ASK)  # the other repository's snippets
    inside = {
        "prefix": PREFIX,
        "filepath": str(unreachable / "a.py"),
        "git_url": None,
        "language": "python",
    }
    assert await built.retrieve(**inside) == []
    assert built.state()[0][2] is False


async def test_a_hung_checkout_never_holds_up_the_server(repo: Path, tmp_path: Path) -> None:
    with unserved_mount(tmp_path / "mnt") as fd:
        # the old code hung with it: the mount dies in 30 s whatever happens
        ends = threading.Timer(30, os.close, [fd])
        ends.daemon = True
        ends.start()
        try:
            await _ask_while_hung(repo, tmp_path)
        finally:
            ends.cancel()


async def _ask_while_hung(repo: Path, tmp_path: Path) -> None:
    hung = tmp_path / "mnt" / "repo"
    started = time.monotonic()
    built = _retriever(repo, hung, tmp_path / "data")  # `keel serve` waited to start
    assert time.monotonic() - started < HUNG_SECONDS + 5
    built.update("weather")
    started = time.monotonic()
    built.state()  # on the event loop, per completion: it waited on the mount
    assert time.monotonic() - started < 1
    assert await built.retrieve(**ASK)  # others' snippets, while the look waits
    inside = {
        "prefix": PREFIX,
        "filepath": str(hung / "a.py"),
        "git_url": None,
        "language": "python",
    }
    started = time.monotonic()
    assert await built.retrieve(**inside) == []
    assert time.monotonic() - started < HUNG_SECONDS + 5
    assert built.state()[0][2] is False  # hung that long: not there
    assert await built.retrieve(**inside) == []  # at once, with no second look
    assert time.monotonic() - started < HUNG_SECONDS + 5
