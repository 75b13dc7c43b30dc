"""keel serve --supervise with real child processes and real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from keel.cli import build_parser
from keel.ops.supervise import forwarded_argv
from tests.conftest import free_port, start_keel

BROKEN_BY_AN_UPGRADE = 'raise ImportError("uvicorn broke in an upgrade")\n'
"""A library the server needs that no longer imports, as after an upgrade (the crash loop
our users lived through): keel exits 1 at every start. A host keel cannot bind is a
config error now (78), which is not restarted."""


def supervised(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "keel", "serve", "--supervise", *args]


def env(root: Path) -> dict[str, str]:
    return {**os.environ, "KEEL_ROOT": str(root)}


def test_the_child_gets_every_serve_option_but_the_supervisors() -> None:
    parser = build_parser()
    argv = ["serve", "--supervise", "--config", "x.toml", "--port", "9", "--start-limit", "3"]
    args = parser.parse_args(argv)
    assert forwarded_argv(args.serve_parser, args) == ["--config", "x.toml", "--port", "9"]


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--start-window", "-5", "more than 0"),  # gave unbounded restarts
        ("--start-window", "0", "more than 0"),
        ("--start-window", "nan", "more than 0"),
        ("--restart-backoff", "-1", "0 or more"),  # said "restart in -8.0s"
        ("--restart-backoff", "nan", "0 or more"),
        ("--restart-backoff", "inf", "0 or more"),
        ("--start-limit", "0", "1 or more starts"),
        ("--start-limit", "-3", "1 or more starts"),
    ],
)
def test_supervisor_options_out_of_range_are_usage_errors(
    tmp_path: Path, option: str, value: str, said: str
) -> None:
    refused = subprocess.run(
        supervised(tmp_path, f"{option}={value}"),
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stderr
    assert f"argument {option}: " in refused.stderr and said in refused.stderr
    assert "started keel" not in refused.stderr


@pytest.mark.integration
def test_a_crash_loop_stops_at_the_start_limit(tmp_path: Path) -> None:
    broken = tmp_path / "site"
    broken.mkdir()
    (broken / "uvicorn.py").write_text(BROKEN_BY_AN_UPGRADE)
    command = supervised(tmp_path, "--port", str(free_port()))
    result = subprocess.run(
        [*command, "--restart-backoff", "0.05"],
        env={**env(tmp_path), "PYTHONPATH": str(broken)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stderr
    assert result.returncode == 1, output
    assert len(re.findall(r"started keel, pid \d+", output)) == 5, output
    assert "5 starts within 300s; giving up" in output
    assert "uvicorn broke in an upgrade" in output  # the child's own error, above the verdict
    # The child learns how often it was restarted (KEEL_SUPERVISOR_RESTARTS).
    assert "after 4 restart(s)" in output
    assert "restart 5" not in output


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_unfixable_exit_is_not_retried(tmp_path: Path, log_format: str) -> None:
    """With ``--log-format json`` every line is an object: the supervisor's own lines
    were plain text among them."""
    (tmp_path / "config.toml").write_text('[server]\nport = "eighty"\n')
    result = subprocess.run(
        supervised(tmp_path, "--restart-backoff", "0.05", "--log-format", log_format),
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 78, result.stderr
    assert len(re.findall(r"started keel, pid \d+", result.stderr)) == 1, result.stderr
    assert "exited with 78 (config error)" in result.stderr
    assert "not restarting" in result.stderr
    if log_format == "json":
        said = [json.loads(line) for line in result.stderr.splitlines()]  # each an object
        ours = [entry for entry in said if entry.get("logger") == "keel.supervisor"]
        assert [entry["level"] for entry in ours] == ["INFO", "ERROR"], said


def _completion_role(port: int) -> dict[str, object]:
    role: dict[str, object] = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).json()[
        "roles"
    ]["completion"]
    return role


@pytest.mark.integration
def test_sighup_reloads_and_sigterm_stops_the_child(tmp_path: Path) -> None:
    """SIGHUP (the documented reload, and what a closing terminal sends) reaches keel
    through the supervisor, which keeps running; a worker ignores it (``systemctl kill
    -s HUP`` signals the whole unit). It stopped both for good, silently."""
    port = free_port()
    log = tmp_path / "supervisor.log"
    (tmp_path / "config.toml").write_text("[model.chat]\nmax_concurrent = 4\n")
    process = supervised_keel(tmp_path, port, log)
    try:
        match = re.search(r"started keel, pid (\d+)", log.read_text())
        assert match, log.read_text()
        child = int(match.group(1))
        # A worker's pid is known from its spawn; it ignores SIGHUP once its own code runs,
        # which the interpreter's start comes before: signalled then, it died (a flake).
        deadline = time.monotonic() + 120
        while (role := _completion_role(port))["state"] != "ready":
            assert time.monotonic() < deadline, role
            time.sleep(0.1)
        worker = role["pid"]
        os.kill(worker, signal.SIGHUP)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config reloaded" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert Path(f"/proc/{worker}").exists() and "restarting" not in log.read_text()
        assert log.read_text().count("started keel") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "SIGTERM: stopping keel" in text
    assert "keel stopped (cleanly)" in text
    assert not Path(f"/proc/{child}").exists(), "the child outlived the supervisor"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.integration
def test_a_sighup_while_keel_starts_is_no_crash(tmp_path: Path) -> None:
    """Before the app can reload (its handler comes with the lifespan), a SIGHUP (one a
    --supervise passes on, a closing terminal's) ended keel: the supervisor counted a
    crash. Now it is nothing to do."""
    dead = "http://127.0.0.1:9/v1"
    config = "".join(
        f"[model.{role}]\nembedded_last_resort = false\n[model.{role}.http]\n"
        f'kind = "openai/{role}"\napi_endpoint = "{dead}"\nmodel_name = "m"\n'
        for role in ("completion", "chat", "embedding")
    )
    server = start_keel(tmp_path, config)
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in server.log.read_text():  # cmd_serve is past its imports
            assert time.monotonic() < deadline and server.process.poll() is None, (
                server.log.read_text()
            )
            time.sleep(0.005)
        server.process.send_signal(signal.SIGHUP)
        server.wait_ready(path="/health")
        assert server.process.poll() is None
    finally:
        server.stop()


@pytest.mark.integration
def test_ctrl_c_stops_the_supervised_keel_cleanly(tmp_path: Path) -> None:
    """Ctrl-C reaches keel as SIGINT, which it ends with 130 (128 + SIGINT) once drained:
    the supervisor called that stop "exit code 130" and exited 130, a failure to a
    script, where SIGTERM's was "cleanly" and 0."""
    log = tmp_path / "supervisor.log"
    process = supervised_keel(tmp_path, free_port(), log)
    try:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "keel stopped (cleanly)" in log.read_text(), log.read_text()


def supervised_keel(root: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``keel serve --supervise`` on ``port``, its output in ``log``, once keel answers."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            supervised(root, "--port", str(port)),
            env=env(root),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while "started keel" not in log.read_text() or not _answers(port):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            process.wait()
            raise AssertionError(log.read_text())
        time.sleep(0.2)
    return process


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
