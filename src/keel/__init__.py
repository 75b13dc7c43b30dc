"""keel: a self-hosted AI coding-assistant server that keeps answering."""

from __future__ import annotations

import datetime as _dt
import functools as _functools
import os as _os


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
    """Version facts for /v1/health; the git sha comes from ``KEEL_GIT_SHA`` when packaged."""
    stamp = _os.path.getmtime(__file__)
    when = _dt.datetime.fromtimestamp(stamp, tz=_dt.UTC)
    return {
        "build_date": when.date().isoformat(),
        "build_timestamp": when.isoformat(),
        "git_sha": _os.environ.get("KEEL_GIT_SHA", "unknown"),
        "version": _version(),
    }
