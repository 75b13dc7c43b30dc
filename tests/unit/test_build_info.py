"""The commit keel reports (/v1/health's ``version.git_sha``, ``keel_build_info``) is the
one checked out where it runs: it read "unknown" in every clone, where ``make serve`` runs
keel from its source tree. Checked against repositories git itself makes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import keel
from keel import build_info, checkout_sha


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "a").write_text("a\n")
    git(root, "add", "a")
    git(root, "commit", "-q", "-m", "one")
    return root


def test_a_branchs_loose_and_packed_ref_and_a_detached_head(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    assert checkout_sha(repo) == head
    git(repo, "pack-refs", "--all")  # as a fresh clone has them
    assert not (repo / ".git/refs/heads/main").exists()
    assert checkout_sha(repo) == head
    (repo / "a").write_text("b\n")
    git(repo, "commit", "-q", "-am", "two")
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    assert checkout_sha(repo) == head


def test_a_worktree_reads_its_own_branch(repo: Path, tmp_path: Path) -> None:
    git(repo, "pack-refs", "--all")
    tree = tmp_path / "tree"
    git(repo, "worktree", "add", "-q", "-b", "side", str(tree))
    (tree / "a").write_text("side\n")
    git(tree, "commit", "-q", "-am", "side")
    assert checkout_sha(tree) == git(tree, "rev-parse", "HEAD") != checkout_sha(repo)


def test_no_checkout_or_an_unreadable_one_is_none(repo: Path, tmp_path: Path) -> None:
    assert checkout_sha(tmp_path / "nothing") is None
    (repo / ".git/HEAD").write_text("not a commit\n")
    assert checkout_sha(repo) is None


def test_keel_reports_the_commit_it_runs_from(monkeypatch: pytest.MonkeyPatch) -> None:
    source = Path(keel.__file__).resolve().parents[2]
    in_a_clone = (source / ".git").exists()  # as make test runs; an installed keel has none
    monkeypatch.delenv("KEEL_GIT_SHA", raising=False)
    expected = git(source, "rev-parse", "HEAD") if in_a_clone else "unknown"
    assert build_info()["git_sha"] == expected
    monkeypatch.setenv("KEEL_GIT_SHA", "0123abc")  # a packaged build says its own
    assert build_info()["git_sha"] == "0123abc"
