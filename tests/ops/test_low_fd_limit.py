"""keel under an open-file limit too low for what it runs (a container's, a unit's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import KeelProcess
from tests.ports import free_port

LIMIT = 24


def test_a_worker_that_cannot_start_for_lack_of_files_says_so(tmp_path: Path) -> None:
    """It said "cannot start worker: [Errno -1] Unknown error -1" (uvloop's word for
    EMFILE), then "crashed 5 times", of a worker that never started, and advised a reload,
    which cannot raise a process's limit."""
    port = free_port()
    log = tmp_path / "keel.log"
    script = f'ulimit -Sn {LIMIT}; ulimit -Hn {LIMIT}; exec "$@"'
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["sh", "-c", script, "sh", sys.executable, "-m", "keel", "serve"]
            + ["--port", str(port)],
            env={**os.environ, "KEEL_ROOT": str(tmp_path / "root")},
            stdout=err,
            stderr=err,
        )
    server = KeelProcess(process, f"http://127.0.0.1:{port}", tmp_path / "root", log)
    try:  # its log, not HTTP: with 24 files, what else keel opens races the engine's start
        deadline = time.monotonic() + 90
        while "giving up on the worker" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        server.stop()
    said = log.read_text()
    assert f"the open-file limit is {LIMIT}" in said and "keel takes 8 client connections" in said
    gave_up = next(line for line in said.splitlines() if "giving up on the worker" in line)
    assert f"as many files open as its open-file limit ({LIMIT}) allows" in gave_up
    assert "failed 5 times" in gave_up and "crashed" not in gave_up
