"""`keel models pull` and `keel models list` as a user runs them: a real keel process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.forked import fork_keel, run_keel
from tests.models.conftest import FILE, REPO
from tests.models.fake_hub import FakeHub
from tests.ops.test_data_root import KEEL, assert_one_line_78, on_tmpfs, run


def keel(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_keel(["models", *args], {**os.environ, "KEEL_ROOT": str(root), **env}, timeout=120)


@pytest.mark.whole_model
def test_pull_then_list_shows_the_models_header_facts(hub: FakeHub, tmp_path: Path) -> None:
    pulled = keel(tmp_path, "pull", f"{REPO}:{FILE}")
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled: tiny-coder-q4_1" in pulled.stdout
    assert '"model_name": "tiny-coder-q4_1"' in pulled.stdout
    # Not a terminal: progress is plain log lines, not a bar.
    assert f"{FILE}: 100% of 94 MiB" in pulled.stderr and "\r" not in pulled.stderr
    assert "checking the sha256" in pulled.stderr
    assert "HTTP Request" not in pulled.stderr, "a line per request to the hub is noise"
    listed = keel(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if "tiny-coder-q4_1" in line)
    assert line.split()[:4] == ["tiny-coder-q4_1", "llama", "93.8", "MiB"]
    assert "8192" in line and "no (prefix only)" in line
    assert keel(tmp_path).stdout == listed.stdout  # `keel models` is `keel models list`


def test_a_full_disk_exits_69_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    refused = keel(tmp_path, "pull", f"{REPO}:{FILE}", "--min-free-mib", str(2**40))
    assert refused.returncode == 69
    assert "not enough disk space" in refused.stderr and "nothing was downloaded" in refused.stderr
    assert hub.downloads() == []
    for bad in ("-5", "nan", "lots"):
        usage = keel(tmp_path, "pull", f"{REPO}:{FILE}", "--min-free-mib", bad)
        assert usage.returncode == 2 and "--min-free-mib" in usage.stderr, usage.stderr
    assert hub.downloads() == []  # a negative reserve was taken, and the pull ran


def test_hub_failures_are_one_clear_line(hub: FakeHub, tmp_path: Path) -> None:
    missing = keel(tmp_path, "pull", f"{REPO}:nope.gguf")
    assert missing.returncode == 2
    assert f"its GGUF files: {FILE}" in missing.stderr and "Traceback" not in missing.stderr
    offline = keel(tmp_path, "pull", f"{REPO}:{FILE}", HF_HUB_OFFLINE="1")
    assert offline.returncode == 1 and "HF_HUB_OFFLINE is set" in offline.stderr
    hub.token = "hf_secret"
    refused = keel(tmp_path, "pull", f"{REPO}:{FILE}")
    assert refused.returncode == 1 and "set HF_TOKEN" in refused.stderr
    assert "Traceback" not in refused.stderr
    allowed = keel(tmp_path, "pull", f"{REPO}:{FILE}", HF_TOKEN="hf_secret")
    assert allowed.returncode == 0, allowed.stderr


def test_a_token_pasted_with_smart_quotes_is_one_line_exit_78(hub: FakeHub, tmp_path: Path) -> None:
    """It cannot go in a header: the pull ended in a UnicodeEncodeError traceback."""
    hub.token = "hf_secret"
    for token in ("\u201chf_secret\u201d", "hf_s\tecret", "hf_s\u00e9cret"):
        refused = keel(tmp_path, "pull", f"{REPO}:{FILE}", HF_TOKEN=token)
        assert refused.returncode == 78, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("keel: HF_TOKEN holds characters"), lines
        assert "hf_s" not in refused.stderr  # the token is not shown
    assert hub.downloads() == []
    allowed = keel(tmp_path, "pull", f"{REPO}:{FILE}", HF_TOKEN=" hf_secret\n")
    assert allowed.returncode == 0, allowed.stderr


def test_a_models_directory_keel_cannot_write_is_one_line_exit_78(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A read-only one (a tmpfs mounted ro) crashed the pull with a traceback, "[Errno
    30] Read-only file system: '.../models/.downloads'", or was said to lack disk space;
    a file in its place with FileExistsError's."""
    root = tmp_path / "keel"
    models = root / "models"
    models.mkdir(parents=True)
    pull = [*KEEL, "models", "pull", f"{REPO}:{FILE}"]
    read_only = run(on_tmpfs(pull, models, "size=1m,ro"), root)
    assert_one_line_78(read_only, f"the models directory {models} is read-only: make it writable")
    models.rmdir()
    models.write_text("not a directory")
    a_file = keel(root, "pull", f"{REPO}:{FILE}")
    assert_one_line_78(a_file, f"the models directory {models} is not a directory: move it")
    assert hub.downloads() == []


def pull_under_way(hub: FakeHub, root: Path) -> subprocess.Popen[bytes]:
    """`keel models pull` forked, once its download has begun (on a slow link)."""
    hub.pause = 0.05  # ~20 MiB/s: the 94 MiB take seconds
    env = {**os.environ, "KEEL_ROOT": str(root)}
    out, err = root / "pull.out", root / "pull.err"
    pulling = fork_keel(["models", "pull", f"{REPO}:{FILE}"], env, out, err)
    staging = root / "models" / ".downloads"
    deadline = time.monotonic() + 60
    while not any(f.suffix == ".incomplete" and f.stat().st_size for f in staging.rglob("*")):
        assert time.monotonic() < deadline and pulling.poll() is None, "no download began"
        time.sleep(0.05)
    return pulling


@pytest.mark.whole_model
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_pull_stopped_by_sigterm_keeps_nothing(
    hub: FakeHub, tmp_path: Path, sent: signal.Signals, code: int
) -> None:
    """A pull killed as a service manager kills it, or hung up on as a terminal's close
    or a dropped ssh session does: the partial download is removed (it stayed in
    models/.downloads for good), as on Ctrl-C."""
    pulling = pull_under_way(hub, tmp_path)
    staging = tmp_path / "models" / ".downloads"
    pulling.send_signal(sent)
    pulling.wait(60)
    err = (tmp_path / "pull.err").read_text()
    assert pulling.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    assert not [f for f in staging.rglob("*") if f.is_file()], "a partial download was left"
    assert not list((tmp_path / "models").glob("*.gguf"))


@pytest.mark.whole_model
def test_what_a_pull_killed_outright_left_goes_with_the_next(hub: FakeHub, tmp_path: Path) -> None:
    """``kill -9`` (or a machine going down) leaves the partial download: it stayed for
    good, one more with each such pull. `keel doctor` told to remove a pull's directory
    while the pull ran, which broke the pull off."""
    from keel.models.pull import STAGING_DIR, abandoned_pulls

    staging = tmp_path / "models" / STAGING_DIR
    pulling = pull_under_way(hub, tmp_path)
    assert abandoned_pulls(staging) == [], "a pull under way is not abandoned"
    pulling.kill()
    pulling.wait(60)
    (left, what), *more = abandoned_pulls(staging)
    assert not more and what == f"{REPO}:{FILE}"
    assert sum(f.stat().st_size for f in left.rglob("*.incomplete")) > 0
    hub.pause = 0.0
    done = keel(tmp_path, "pull", f"{REPO}:{FILE}")
    assert done.returncode == 0, done.stderr
    assert not left.exists() and not any(staging.iterdir()), "nothing left behind"
