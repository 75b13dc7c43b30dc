from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.workers.worker import THREADS_VARIABLE
from tests.fakes.fixtures import dead_url, upstream  # noqa: F401
from tests.forked import Forked, fork_keel, run_keel
from tests.ports import free_port

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@dataclass
class KeelProcess:
    process: subprocess.Popen[bytes] | Forked
    url: str
    root: Path
    log: Path

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def worker_pid(self, role: str = "completion") -> int:
        ready = httpx.get(f"{self.url}/ready", timeout=10).json()
        pid: int = ready["roles"][role]["pid"]
        return pid

    def wait_ready(self, timeout: float = 120.0, path: str = "/ready") -> None:
        """Until ``path`` answers 200 (``/health``: serving, whatever its backends)."""
        deadline = time.monotonic() + timeout
        with self.client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"keel exited {self.process.returncode}: {self.log.read_text()}"
                    )
                try:
                    if client.get(path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"keel not ready after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            wait_or_kill(self.process, 20)


def wait_or_kill(process: subprocess.Popen[Any] | Forked, seconds: float) -> None:
    """Wait ``seconds`` for ``process`` to end (it was asked to), then kill it."""
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PRECOMPUTE_OFF = "[completion]\nprecompute = false\n"


def niceness(pid: int) -> tuple[set[int], int | None]:
    """The nice of each of ``pid``'s threads, and of its session's autogroup where Linux
    has autogroups (None where not)."""
    threads = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that ended since the listing
            continue
        threads.add(int(stat.rsplit(")", 1)[1].split()[16]))  # stat field 19, nice
    autogroup = Path(f"/proc/{pid}/autogroup")
    group = int(autogroup.read_text().split()[-1]) if autogroup.exists() else None
    return threads, group


def sse_events(text: str) -> list[Any]:
    """The JSON events of an OpenAI stream's body, which must end in ``[DONE]``."""
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def keel_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m keel <args>`` run to its end, its output as text (forked:
    tests/forked.py)."""
    return run_keel(args, env, timeout=60)


def start_keel(root: Path, config: str | None = None, *args: str) -> KeelProcess:
    """Start a real `keel serve` process on a free loopback port (forked from one that
    has imported keel: tests/forked.py)."""
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.toml").write_text(config)
    port = free_port()
    log = root / "keel.log"
    log.write_bytes(b"")
    env = {**os.environ, "KEEL_ROOT": str(root)}
    process = fork_keel(["serve", "--port", str(port), *args], env, log)
    return KeelProcess(process, f"http://127.0.0.1:{port}", root, log)


@contextlib.contextmanager
def running_keel(root: Path, config: str | None = None, *args: str) -> Iterator[KeelProcess]:
    """:func:`start_keel`, ready; stopped on the way out, whatever happened."""
    server = start_keel(root, config, *args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def keel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    """One keel process with the embedded model, shared by the tests that only read.

    Nothing is computed ahead (``precompute``), so that the worker's counters are what
    the tests' requests made (tests/integration/test_instant_completions.py covers it)."""
    with running_keel(tmp_path_factory.mktemp("keel-root"), PRECOMPUTE_OFF) as server:
        yield server


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (``make test``): two pytest workers for every core. A test waits on
    the processes, sockets and timers it starts (real Redis and PostgreSQL frozen and
    restarted, hubs that stall, keel stopping) much of its time, and more workers fill
    those waits: on 2 cores, fresh clones' `make test` took 256 and 252 s with 3 workers,
    271 and 276 s with 2 (2026-12-02); the suite of 2026-12-04 took 181 s of pytest with
    3 and 140 s with 4."""
    return max(1, len(os.sched_getaffinity(0)) * 2)


def _one_tls_context() -> None:
    """Every httpx client the tests make shares one verified TLS context.

    httpx builds a new one for each client, parsing a CA bundle again (certifi's, or
    ``SSL_CERT_FILE``'s): ~19 ms of CPU a client, measured, though the tests speak plain
    HTTP to loopback; ``httpx.get`` makes a client a call. A context is made to be
    shared; this one is the context httpx would build, once for each CA setting."""
    from httpx._transports import default

    build = default.create_ssl_context
    built: dict[tuple[str | None, ...], ssl.SSLContext] = {}

    def create_ssl_context(
        verify: Any = True, cert: Any = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if verify is not True or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        cas = ("SSL_CERT_FILE", "SSL_CERT_DIR")
        key = tuple(os.environ.get(name) if trust_env else None for name in cas)
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    default.create_ssl_context = create_ssl_context


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``), every engine a test starts runs one thread
    (``LLAMA_ARG_THREADS``, which keel reads where no ``threads`` is configured): each
    would otherwise take every core, and two 2-thread engines on 2 shared cores starved
    each other into 30 s timeouts.

    The workers are not pinned to cores: three pinned to two cores left one core to one
    worker and the other to two. Alternated on 2026-12-02, pytest alone on the warm tree
    took 181, 194 and 203 s pinned, 154, 179 and 189 s not; a fresh clone's whole `make
    test`, where mypy and the quality gate take the CPU pytest leaves idle, took the same
    either way (pinned 206 and 200 s, not 197 and 207 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ...
        os.environ[THREADS_VARIABLE] = "1"
    _one_tls_context()


NEEDS_INSTALLS = {"browser", "redis_server", "postgres_server"}
"""Fixtures that need what `make test` installs beside the tests (tests/deps.py)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The test files that need tabby-agent or Debian's packages last, each whole (its
    module fixtures set up once), in their order: under `make test` they would otherwise
    wait for npm and apt at the start. Always, not only while an install runs:
    pytest-xdist's workers must collect the same order."""

    def needs_installs(item: pytest.Item) -> bool:
        fixtures = set(getattr(item, "fixturenames", ()))
        return bool(fixtures & NEEDS_INSTALLS) or item.get_closest_marker("node") is not None

    later = {item.path for item in items if needs_installs(item)}
    items[:] = [item for item in items if item.path not in later] + [
        item for item in items if item.path in later
    ]
