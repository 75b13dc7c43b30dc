"""`make serve` and `make test` on a machine whose python3 is older than keel needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OLD_PYTHON = """#!/bin/sh
# A Python 3.10, as far as the Makefile can tell: it asks the version, and the check fails.
case "$1" in
  --version) echo "Python 3.10.13" ;;
  -c) exit 1 ;;
  *) echo "not expected: $*" >&2; exit 3 ;;
esac
"""


def test_an_old_python_is_refused_by_name_before_a_venv_is_made(tmp_path: Path) -> None:
    """uv's "No solution found ... Python>=3.11" came after a 3.10 venv was made, and
    every later run, with the right Python too, kept that venv and failed the same way."""
    for name in ("Makefile", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / "python3.10"
    python.write_text(OLD_PYTHON)
    python.chmod(0o755)
    old_venv = tmp_path / ".venv" / "bin"
    old_venv.mkdir(parents=True)
    (old_venv / "python").symlink_to(python)

    done = subprocess.run(
        ["make", "--no-print-directory", "install", f"PYTHON={python}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode != 0
    assert (
        f"keel needs Python 3.11 or newer, and {python} is Python 3.10.13; "
        "name one: make install PYTHON=python3.12"
    ) in done.stderr
    assert not (tmp_path / ".venv").exists()  # the old venv went; no new one was made
