"""keel doctor as a real process: findings, the table, --json and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keel.ops.doctor import DoctorOptions, run_checks
from tests.conftest import free_port
from tests.fakes.upstreams import Behaviour, FakeUpstream
from tests.forked import run_keel

pytestmark = pytest.mark.integration


def doctor(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_keel(
        ["doctor", *args], {**os.environ, "KEEL_ROOT": str(root), **(env or {})}, timeout=180
    )


def findings(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.returncode
    return {check["name"]: check for check in report["checks"]}


def test_a_healthy_setup_passes_with_a_readable_table(tmp_path: Path) -> None:
    result = doctor(tmp_path, "--port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    for name in ("config", "native library", "memory", "data root", "port"):
        assert any(line.startswith(name) and " ok " in line for line in lines), name
    assert "all checks passed (exit 0)" in result.stdout


def test_config_errors_and_missing_env_vars_are_exit_78(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[server]\nport = "eighty"\n\n[model.chat.http]\nkind = "openai/chat"\n'
        'api_endpoint = "http://127.0.0.1:1/v1"\napi_key = "${KEEL_TEST_NO_SUCH_KEY}"\n'
    )
    result = doctor(tmp_path, "--json")
    assert result.returncode == 78, result.stdout + result.stderr
    found = findings(result)
    assert found["config"]["status"] == "FAIL"
    assert "server.port" in found["config"]["detail"]
    assert found["env vars"]["status"] == "FAIL"
    assert "KEEL_TEST_NO_SUCH_KEY" in found["env vars"]["detail"]
    assert found["memory"]["status"] == "skip"


def test_env_vars_are_read_past_a_literal_dollar_and_a_byte_order_mark(tmp_path: Path) -> None:
    """A config with ``$$`` (a literal $) beside a reference crashed doctor (TypeError),
    and one saved with Notepad's byte-order mark had its references unchecked."""
    (tmp_path / "config.toml").write_text(
        '\ufeff[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "http://127.0.0.1:1/v1"\n'
        'api_key = "pa$$word${KEEL_TEST_NO_SUCH_KEY}"\n',
        encoding="utf-8",
    )
    result = doctor(tmp_path, "--json")
    assert result.returncode == 78, result.stdout + result.stderr
    found = findings(result)
    assert found["env vars"]["status"] == "FAIL"
    assert "KEEL_TEST_NO_SUCH_KEY" in found["env vars"]["detail"]


def test_an_open_bind_without_keys_fails_doctor_and_config_check_as_serve_refuses_it(
    tmp_path: Path,
) -> None:
    """``keel serve`` refuses to serve the network with no keys (exit 78): its pre-start
    checks say so too, rather than pass a config it will refuse."""
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\n')
    found = findings(doctor(tmp_path, "--json", "--port", str(free_port())))
    assert found["access"]["status"] == "FAIL" and "no keys" in found["access"]["detail"]
    env = {**os.environ, "KEEL_ROOT": str(tmp_path)}
    for command in (["config", "check", str(config)], ["serve", "--port", str(free_port())]):
        done = run_keel(command, env, timeout=180)
        assert done.returncode == 78 and "no keys are configured" in done.stderr, command
        assert str(config) in done.stderr  # the file, as every config error names it
    config.write_text('[server]\nhost = "0.0.0.0"\n\n[auth]\napi_keys = ["a-long-key-1"]\n')
    found = findings(doctor(tmp_path, "--json", "--port", str(free_port())))
    assert found["access"]["status"] == "ok", found["access"]


def test_a_keys_file_serve_would_not_take_fails_doctor(tmp_path: Path) -> None:
    """A keys file keel serve does not take (a key an older keel took, one character
    outside printable ASCII) leaves no key of it in force: every client refused. doctor
    warned and passed (exit 0), so a restart after an upgrade locked the team out."""
    (tmp_path / "config.toml").write_text('[auth]\nkeys_file = "keys.toml"\n')
    keys = tmp_path / "keys.toml"
    keys.write_text('api_keys = ["user-key-aaaa1111", "user-k\u00e9y-bad12345"]\n')
    result = doctor(tmp_path, "--json", "--port", str(free_port()))
    assert result.returncode == 78, result.stdout + result.stderr
    access = findings(result)["access"]
    assert access["status"] == "FAIL" and "api_keys[1]" in access["detail"], access
    keys.write_text('api_keys = ["user-key-aaaa1111"]\n')
    assert doctor(tmp_path, "--json", "--port", str(free_port())).returncode == 0


def test_a_model_file_that_is_not_gguf_is_exit_69(tmp_path: Path) -> None:
    bad = tmp_path / "models" / "junk.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"<html>not a model</html>")
    (tmp_path / "config.toml").write_text('[model.chat.local]\nmodel_id = "junk"\n')
    result = doctor(tmp_path, "--json", "--port", str(free_port()))
    assert result.returncode == 69, result.stdout + result.stderr
    found = findings(result)
    assert found["model junk"]["status"] == "FAIL"
    assert "junk.gguf" in found["model junk"]["detail"]
    assert "GGUF" in found["model junk"]["detail"]
    assert found["model SmolLM2-135M-Instruct"]["status"] == "ok"


def test_a_truncated_model_file_is_exit_69(tmp_path: Path) -> None:
    """An interrupted copy: a whole header, the tensors cut off. The engine would refuse
    it at load; doctor says so first, and why."""
    from keel.models.registry import embedded_model_path

    cut = tmp_path / "models" / "cut.gguf"
    cut.parent.mkdir(parents=True)
    with embedded_model_path().open("rb") as whole:
        cut.write_bytes(whole.read(3 * 2**20))
    (tmp_path / "config.toml").write_text('[model.chat.local]\nmodel_id = "cut"\n')
    result = doctor(tmp_path, "--json", "--port", str(free_port()))
    assert result.returncode == 69, result.stdout + result.stderr
    assert "truncated (3.0 MiB" in findings(result)["model cut"]["detail"]


def test_a_repository_path_that_is_not_there_is_a_warning(tmp_path: Path) -> None:
    """So is a bare repository, which has no files to index (config check and keel index
    said so; doctor called it fine)."""
    (tmp_path / "repo").mkdir()
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "bare.git")], check=True)
    (tmp_path / "config.toml").write_text(
        f'[[repositories]]\nname = "here"\npath = "{tmp_path / "repo"}"\n\n'
        '[[repositories]]\nname = "ghost"\npath = "/nonexistent/keel-ghost"\n\n'
        f'[[repositories]]\nname = "bare"\npath = "{tmp_path / "bare.git"}"\n'
    )
    result = doctor(tmp_path, "--json", "--port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr  # context is optional
    found = findings(result)["repositories"]
    assert found["status"] == "warn" and "ghost: /nonexistent/keel-ghost" in found["detail"]
    assert "bare git repository" in found["detail"], found["detail"]


def test_a_busy_port_is_exit_75_naming_the_holder(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = doctor(tmp_path, "--json", "--port", str(port))
    assert result.returncode == 75, result.stdout + result.stderr
    detail = findings(result)["port"]["detail"]
    assert f"port {port}" in detail and "in use" in detail
    assert f"pid {os.getpid()}" in detail  # this test process holds it


def test_not_enough_memory_is_a_finding(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 1024 kB\nMemAvailable: 1000 kB\n")
    env = {"KEEL_ROOT": str(tmp_path / "root")}
    report = run_checks(DoctorOptions(port=free_port(), meminfo=meminfo), environ=env)
    memory = next(check for check in report.checks if check.name == "memory")
    assert memory.status == "FAIL" and "available 1 MiB" in memory.detail
    assert report.exit_code == 69


def test_online_checks_each_http_provider(
    tmp_path: Path, upstream: FakeUpstream, dead_url: str
) -> None:
    with FakeUpstream() as rejecting:
        rejecting.behave(Behaviour.respond(401, {"error": {"message": "bad key"}}))
        (tmp_path / "config.toml").write_text(
            f'[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{upstream.url}/v1"\n'
            'model_name = "m"\n\n'
            f'[[model.chat.fallback]]\nkind = "openai/chat"\napi_endpoint = "{dead_url}/v1"\n'
            'model_name = "m"\n\n'
            f'[model.embedding.http]\nkind = "openai/embedding"\n'
            f'api_endpoint = "{rejecting.url}/v1"\nmodel_name = "e"\n'
        )
        result = doctor(tmp_path, "--json", "--online", "--port", str(free_port()))
    assert result.returncode == 69, result.stdout + result.stderr
    providers = {
        name: check for name, check in findings(result).items() if name.startswith("provider ")
    }
    assert len(providers) == 3, providers
    by_endpoint = {check["detail"].split("/v1")[0]: check for check in providers.values()}
    assert by_endpoint[upstream.url]["status"] == "ok"
    assert by_endpoint[dead_url]["status"] == "FAIL"
    assert "unreachable" in by_endpoint[dead_url]["detail"]
    assert by_endpoint[rejecting.url]["status"] == "FAIL"
    assert "not authorised" in by_endpoint[rejecting.url]["detail"]
