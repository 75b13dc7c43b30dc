"""Checkouts as they come: another user's (whose git config names programs), files keel
may not read, a bare repository, submodules. Real git, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from keel.config import IndexConfig, Paths, RepositoryConfig
from keel.index.retrieve import RepositoryRetriever
from keel.index.store import RepositoryIndex
from keel.index.walk import list_source_files
from tests.index.conftest import git
from tests.index.test_cli_and_server import config_for, run_keel
from tests.ops.test_data_root import as_unprivileged

KEEL = [sys.executable, "-m", "keel"]


def committed(root: Path) -> Path:
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "start")
    return root


def keel_root(tmp_path: Path, repo: Path) -> Path:
    root = tmp_path / "keel"
    root.mkdir()
    (root / "config.toml").write_text(config_for(repo))
    return root


def owned_by_another(root: Path) -> None:
    if os.geteuid() == 0:  # another owner than the one reading it
        for path in [root, *root.rglob("*")]:
            os.chown(path, 65534, 65534, follow_symlinks=False)


async def test_a_checkouts_git_config_runs_no_program(repo: Path, tmp_path: Path) -> None:
    """``core.fsmonitor`` set in the ``.git/config`` of a checkout another user owns ran
    its command as keel's user, at every `keel index` and refresh: git's ownership check,
    which keel turns off to read such a checkout, is there to stop exactly that."""
    marker = tmp_path / "PWNED"
    committed(repo)
    git(repo, "config", "core.fsmonitor", f"echo PWNED >> {marker}; false")
    owned_by_another(repo)
    root = keel_root(tmp_path, repo)

    indexed = run_keel(root, "index")
    assert indexed.returncode == 0, indexed.stderr
    assert "weather: 4 files" in indexed.stdout  # read by git all the same
    served = RepositoryRetriever.from_settings(  # the server's refresh: remotes, then files
        [RepositoryConfig(name="weather", path=str(repo))],
        IndexConfig(refresh_seconds=0),
        Paths(tmp_path / "served"),
    )
    await served.refresh_forever()
    assert served.states["weather"]["state"] == "ready"
    assert not marker.exists(), marker.read_text()


def test_a_file_keel_may_not_read_leaves_the_index_and_is_named(repo: Path, tmp_path: Path) -> None:
    """A file made unreadable (``chmod 000``, its mtime and size unchanged) kept its
    chunks in prompts for ever; one unreadable from the start was counted and indexed
    as nothing, named nowhere. keel runs as an unprivileged user here (root reads it)."""
    committed(repo)
    root = keel_root(tmp_path, repo)
    (repo / "tools" / "run.sh").chmod(0)
    first = subprocess.run(
        as_unprivileged([*KEEL, "index"]),
        capture_output=True,
        text=True,
        env={**os.environ, "KEEL_ROOT": str(root)},
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    assert "skipped tools/run.sh: cannot be read: permission denied" in first.stdout
    index = RepositoryIndex("weather", repo, root / "index" / "weather", max_file_bytes=10**6)
    index.reload()
    assert index.search(["celsius", "fahrenheit"])

    (repo / "weather" / "units.py").chmod(0)
    second = subprocess.run(
        as_unprivileged([*KEEL, "index"]),
        capture_output=True,
        text=True,
        env={**os.environ, "KEEL_ROOT": str(root)},
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert "skipped weather/units.py: cannot be read: permission denied" in second.stdout
    assert "1 removed" in second.stdout
    assert index.search(["celsius", "fahrenheit"]) == []


def test_a_bare_repository_is_refused_saying_what_to_point_at(repo: Path, tmp_path: Path) -> None:
    """Tabby's ``git_url = "file:///.../bare.git"`` of a ``git clone --bare`` was indexed
    as empty, called ready, exit 0."""
    committed(repo)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    root = tmp_path / "keel"
    root.mkdir()
    (root / "config.toml").write_text(f'[[repositories]]\ngit_url = "file://{bare}"\n')

    indexed = run_keel(root, "index")
    assert indexed.returncode != 0, indexed.stdout
    assert f"{bare} is a bare git repository" in indexed.stderr
    assert "point path at a checkout" in indexed.stderr

    checked = run_keel(root, "config", "check")
    assert checked.returncode == 0, checked.stderr
    assert "warning: repositories[0].path:" in checked.stderr
    assert f"{bare} is a bare git repository" in checked.stderr


def test_submodules_are_indexed_or_named(tmp_path: Path) -> None:
    """`git ls-files` lists a submodule as one name, and its code was passed over in
    silence; its files are listed now, and one not checked out is named as skipped. Its
    own git config runs no program either."""
    marker = tmp_path / "PWNED"
    library = tmp_path / "library"
    library.mkdir()
    (library / "ledger.py").write_text("def post_ledger_entry(amount):\n    return amount\n")
    committed(library)
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "app.py").write_text("def main():\n    return 1\n")
    committed(parent)
    git(parent, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(library), "lib")
    git(parent, "commit", "-qm", "with lib")
    git(parent / "lib", "config", "core.fsmonitor", f"echo PWNED >> {marker}; false")

    listed = [f.relpath for f in list_source_files(parent, max_file_bytes=10**6)]
    assert listed == ["app.py", "lib/ledger.py"]
    assert not marker.exists()

    clone = tmp_path / "clone"
    git(tmp_path, "-c", "protocol.file.allow=always", "clone", "-q", str(parent), str(clone))
    skipped: dict[str, str] = {}
    listed = [f.relpath for f in list_source_files(clone, max_file_bytes=10**6, skipped=skipped)]
    assert listed == ["app.py"]
    assert skipped == {"lib": "a git submodule not checked out (git submodule update --init)"}


@pytest.fixture(autouse=True)
def _readable_again(tmp_path: Path) -> object:
    """pytest removes tmp_path later: give back what a test took away."""
    yield
    for path in tmp_path.rglob("*"):
        if not path.is_symlink() and path.stat().st_mode & 0o777 == 0:
            path.chmod(0o644)
