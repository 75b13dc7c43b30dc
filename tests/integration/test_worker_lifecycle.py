"""Real processes and real signals: the worker dies, keel keeps serving."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keel.models.registry import embedded_model_path
from keel.ops.ports import LISTENING, socket_inodes, tcp_inodes
from tests.conftest import KeelProcess, free_port, running_keel, start_keel
from tests.forked import run_keel

pytestmark = pytest.mark.integration

LONG = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500, "temperature": 0}


@pytest.fixture
def keel(tmp_path: Path) -> Iterator[KeelProcess]:
    with running_keel(tmp_path / "root") as server:
        yield server


def test_killing_the_worker_mid_request_fails_it_clearly_then_recovers(keel: KeelProcess) -> None:
    pid = keel.worker_pid()
    result: dict[str, httpx.Response] = {}

    def request() -> None:
        result["response"] = httpx.post(f"{keel.url}/v1/completions", json=LONG, timeout=120)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(1.0)  # the generation is under way
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    response = result["response"]
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "worker_crashed"
    assert "SIGKILL" in error["message"] or "killed" in error["message"]

    # The next request waits for the restarted worker and is served by it.
    after = httpx.post(
        f"{keel.url}/v1/completions",
        json={"language": "python", "segments": {"prefix": "def square(x):\n"}},
        timeout=120,
    )
    assert after.status_code == 200, after.text
    assert keel.worker_pid() != pid
    status = httpx.get(f"{keel.url}/ready", timeout=10).json()["roles"]["completion"]
    assert status["restarts"] == 1


def test_killed_mid_stream_ends_with_an_error_event(keel: KeelProcess) -> None:
    pid = keel.worker_pid()
    with (
        httpx.Client(base_url=keel.url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        assert response.status_code == 200
        lines = []
        for line in response.iter_lines():
            if not line:
                continue  # the blank line after an event: the worker was killed once already
            lines.append(line)
            if len(lines) == 3:
                os.kill(pid, signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    assert '"worker_crashed"' in lines[-2]


def test_a_worker_does_not_hold_keels_port(keel: KeelProcess) -> None:
    """keel's listening socket stays in keel: a worker that inherited it would keep the
    port bound while it outlives keel, and a restarted keel would find it busy."""
    listening = tcp_inodes(LISTENING, port=int(keel.url.rsplit(":", 1)[1]))
    assert listening
    assert not socket_inodes(keel.worker_pid()) & listening


def test_busy_port_is_exit_75_and_never_another_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_keel(
            ["serve", "--port", str(port)], {**os.environ, "KEEL_ROOT": str(tmp_path)}, timeout=120
        )
    assert result.returncode == 75, result.stderr
    assert f"port {port}" in result.stderr and "in use" in result.stderr


def test_missing_model_file_is_exit_69(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[model.completion.local]\nmodel_id = "no-such-model"\n')
    env = {**os.environ, "KEEL_ROOT": str(tmp_path)}
    result = run_keel(["serve", "--port", str(free_port())], env, timeout=120)
    assert result.returncode == 69
    assert "no-such-model" in result.stderr


def test_unloadable_model_file_is_reported_once_not_restarted(tmp_path: Path) -> None:
    bad = tmp_path / "models" / "broken.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_keel(tmp_path, '[model.chat.local]\nmodel_id = "broken"\n')
    try:
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{server.url}/ready", timeout=5).json()["roles"]["chat"]
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if status["state"] == "failed":
                break
            time.sleep(0.2)
        assert status["state"] == "failed"
        assert status["restarts"] == 0
        assert "broken.gguf" in str(status["last_error"])
        # the header's own diagnosis, not the engine's "check the input params"
        assert "unsupported GGUF version 0" in str(status["last_error"]), status
        assert "reload (SIGHUP" in str(status["last_error"]), status  # shown where it is read
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 503
        said = response.json()["error"]["message"]
        assert "gave up" in said and "reload (SIGHUP" in said, said  # and what brings it back
        assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
        assert status["pid"] is None  # no worker runs (it showed the dead one's)
        # Read at the scrape, as /ready judges it: set only on a check's transition, it
        # read 1 for a worker keel had given up on (and stayed 0 after a restart).
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert f'keel_provider_healthy{{provider="{status["provider"]}"}} 0.0' in metrics
        # not sent again to the worker keel gave up on: it failed at once again, logged
        # twice, and counted a retry and two failures
        retried = f'keel_retries_total{{provider="{status["provider"]}"}} '
        assert not [
            line
            for line in metrics.splitlines()
            if line.startswith(retried) and line != retried + "0.0"
        ], metrics
        # The file mended, a reload starts the worker afresh (the given-up one was kept,
        # failed, and every chat a 503 until keel restarted).
        shutil.copyfile(embedded_model_path(), bad)
        reloaded = httpx.post(f"{server.url}/v1/admin/reload", timeout=60)
        assert reloaded.status_code == 200, reloaded.text
        answer = {}
        for _ in range(300):
            response = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                timeout=30,
            )
            if response.status_code == 200:
                answer = response.json()
                break
            time.sleep(0.2)
        assert answer["choices"][0]["message"]["content"], answer
    finally:
        server.stop()


@pytest.fixture
def own_python(tmp_path: Path) -> Path:
    """A Python of keel's venv at a place of its own: a copy of the interpreter, with
    the venv's packages (keel among them)."""
    venv = tmp_path / "venv"
    python = venv / "bin" / "python3"
    python.parent.mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), python)
    shutil.copy2(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    packages = Path(sysconfig.get_paths()["purelib"])
    site = venv / packages.relative_to(sys.prefix)
    site.parent.mkdir(parents=True)
    site.symlink_to(packages)
    return python


def test_a_worker_keel_cannot_run_is_given_up_on_at_once_naming_it(
    tmp_path: Path, own_python: Path
) -> None:
    """Its Python made unrunnable under a running keel (an upgrade, a chmod), a worker
    that died could not be started again: "cannot start worker: [Errno 13] Permission
    denied", no path (uvloop drops it), tried five times with backoff."""
    root = tmp_path / "root"
    root.mkdir()
    port = free_port()
    log = root / "keel.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(own_python), "-m", "keel", "serve", "--port", str(port)],
            env={**os.environ, "KEEL_ROOT": str(root)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = KeelProcess(process, f"http://127.0.0.1:{port}", root, log)
    try:
        server.wait_ready()
        own_python.chmod(0o644)
        os.kill(server.worker_pid(), signal.SIGKILL)
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline and status.get("state") != "failed":
            time.sleep(0.2)
            status = httpx.get(f"{server.url}/ready", timeout=5).json()["roles"]["completion"]
        assert status["state"] == "failed", status
        assert status["restarts"] == 1, status  # the kill's restart, and no more
        said = str(status["last_error"])
        assert f"{own_python}, the Python keel runs on" in said, said
        assert "Permission denied" in said and "make it executable" in said, said
    finally:
        server.stop()
