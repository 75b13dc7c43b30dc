"""keel: a self-hosted AI coding-assistant server that keeps answering."""

from __future__ import annotations

import datetime as _dt
import os as _os
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("keel")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"


def build_info() -> dict[str, str]:
    """Version facts for /v1/health; the git sha comes from ``KEEL_GIT_SHA`` when packaged."""
    stamp = _os.path.getmtime(__file__)
    when = _dt.datetime.fromtimestamp(stamp, tz=_dt.UTC)
    return {
        "build_date": when.date().isoformat(),
        "build_timestamp": when.isoformat(),
        "git_sha": _os.environ.get("KEEL_GIT_SHA", "unknown"),
        "version": __version__,
    }
