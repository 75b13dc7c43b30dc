"""keel: a self-hosted AI coding-assistant server that keeps answering."""

from __future__ import annotations

import datetime as _dt
import functools as _functools
import os as _os
from pathlib import Path as _Path


@_functools.cache
def _version() -> str:
    # importlib.metadata costs ~45 ms to import: read only when asked, so that a model
    # worker (which imports keel.errors) and quick CLI commands start without it.
    from importlib import metadata

    try:
        return metadata.version("keel")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0.0.0"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'keel' has no attribute {name!r}")


def build_info() -> dict[str, str]:
    """Version facts for /v1/health and ``keel_build_info``. The git sha is
    ``KEEL_GIT_SHA`` where set (a packaged build), else the commit of the git checkout
    keel runs from (``make serve`` in a clone), read once."""
    stamp = _os.path.getmtime(__file__)
    when = _dt.datetime.fromtimestamp(stamp, tz=_dt.UTC)
    return {
        "build_date": when.date().isoformat(),
        "build_timestamp": when.isoformat(),
        "git_sha": _os.environ.get("KEEL_GIT_SHA") or _checkout_sha() or "unknown",
        "version": _version(),
    }


@_functools.cache
def _checkout_sha() -> str | None:
    # src/keel/__init__.py in a clone; in site-packages there is no .git above.
    return checkout_sha(_Path(__file__).resolve().parents[2])


def checkout_sha(root: _Path) -> str | None:
    """The commit checked out in the git work tree at ``root``, read from its files (no
    git program needed): a branch's loose or packed ref, or a detached HEAD; a worktree's
    ``.git`` file is followed. None where there is no checkout or it cannot be read."""
    try:
        git = root / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = root / git.read_text("utf-8").strip().removeprefix("gitdir:").strip()
        common = git / "commondir"  # a worktree's branches live in the main .git
        refs = [git, git / common.read_text("utf-8").strip()] if common.is_file() else [git]
        head = (git / "HEAD").read_text("utf-8").strip()
        if not head.startswith("ref:"):
            return _sha(head)
        ref = head.removeprefix("ref:").strip()
        for place in refs:
            if (place / ref).is_file():
                return _sha((place / ref).read_text("utf-8").strip())
        for place in refs:
            if (place / "packed-refs").is_file():
                for line in (place / "packed-refs").read_text("utf-8").splitlines():
                    sha, _, name = line.partition(" ")
                    if name == ref:
                        return _sha(sha)
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _sha(text: str) -> str | None:
    hexdigits = set("0123456789abcdef")
    return text if len(text) in (40, 64) and set(text) <= hexdigits else None
