"""`docker run --user 12345` (OpenShift likewise): no HOME, a uid with no passwd entry,
no KEEL_ROOT. pathlib's "Could not determine home directory." ended `keel serve` in a
traceback, exit 1, which a supervisor retries for ever; now one `keel:` line says to set
KEEL_ROOT, exit 78, as for any data root keel cannot use (tests/ops/test_data_root.py)."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from tests.ops.test_data_root import KEEL, assert_one_line_78


def has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize(
    "command", [["serve", "--port", "1"], ["config", "check"], ["doctor", "--port", "1"]]
)
def test_no_home_directory_and_no_keel_root(command: list[str]) -> None:
    """Run as a uid with no passwd entry in a user namespace of its own (util-linux's
    unshare; no root needed), as a container's random uid is."""
    uid = next(uid for uid in range(12345, 13345) if not has_passwd_entry(uid))
    as_uid = ["unshare", "--user", f"--map-user={uid}", f"--map-group={uid}"]
    env = {name: value for name, value in os.environ.items() if name not in ("HOME", "KEEL_ROOT")}
    result = subprocess.run(
        [*as_uid, *KEEL, *command], capture_output=True, text=True, env=env, timeout=120
    )
    assert_one_line_78(result, f"no home directory for uid {uid} to hold", "set KEEL_ROOT")
