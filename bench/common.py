"""What every benchmark shares: the machine's description, processes on loopback,
keel's config for a fake upstream, and running the load generator.

Every process a benchmark starts is started here, in its own session, and is
stopped by :class:`Processes` when the benchmark leaves its ``with`` block,
whatever happened.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PEERS_VENV = BENCH / ".venv-peers"
PYTHON = sys.executable

CHAT_BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Write a function that adds two numbers."}],
    "max_tokens": 16,
}
COMPLETION_BODY = {
    "model": "fake-model",
    "prompt": "def add(a, b):\n    ",
    "max_tokens": 16,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def machine() -> dict[str, Any]:
    """Where the figures were taken; a ratio is only meaningful within one run."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for name in ("fastapi", "starlette", "uvicorn", "aiohttp", "uvloop", "xllamacpp"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "loadavg_at_start": [round(x, 2) for x in load],
        "keel_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process, KiB (Linux ``/proc``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Processes:
    """Processes started for one benchmark; all stopped on exit, by their own pid."""

    workdir: Path
    started: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as output:
            popen = subprocess.Popen(
                list(argv),
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=ROOT,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self.started.append(process)
        return process

    def stop(self, process: Process, timeout: float = 15.0) -> None:
        if process.popen.poll() is None:
            # The process group holds its children too (keel's workers, LiteLLM's).
            with suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
        if process in self.started:
            self.started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.started)):
            self.stop(process)


@contextmanager
def processes(prefix: str) -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix=f"keel-bench-{prefix}-") as tmp:
        group = Processes(Path(tmp))
        try:
            yield group
        finally:
            group.stop_all()


def wait_http(url: str, process: Process, timeout: float, ok: Sequence[int] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(
                f"{process.name} exited {process.popen.returncode}: {process.tail()}"
            )
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code in ok:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} not ready after {timeout:.0f}s ({last}): {process.tail()}")


def start_upstream(
    group: Processes, *, name: str = "upstream", tokens: int = 8, starlette: bool = False
) -> Process:
    port = free_port()
    argv = [PYTHON, str(BENCH / "upstream.py"), "--port", str(port), "--tokens", str(tokens)]
    process = group.start(name, [*argv, "--starlette"] if starlette else argv)
    process.url = f"http://127.0.0.1:{port}"
    wait_http(f"{process.url}/_bench/stats", process, 15)
    return process


def http_provider(kind: str, url: str, extra: str = "") -> str:
    """A ``[model.<role>.http]`` table's body for the fake upstream, keel's defaults otherwise."""
    return f'kind = "{kind}"\napi_endpoint = "{url}/v1"\nmodel_name = "fake-model"\n{extra}'


def start_keel(
    group: Processes,
    config: str,
    *,
    name: str = "keel",
    timeout: float = 120.0,
    launcher: Sequence[str] = ("-m", "keel"),
) -> Process:
    """``python <launcher> serve`` on a free port (``-m keel`` unless a launcher is given)."""
    root = group.workdir / f"{name}-root"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(config)
    port = free_port()
    argv = [PYTHON, *launcher, "serve", "--port", str(port)]
    process = group.start(name, argv, env={"KEEL_ROOT": str(root), "PYTHONUNBUFFERED": "1"})
    process.url = f"http://127.0.0.1:{port}"
    wait_http(f"{process.url}/ready", process, timeout)
    return process


def loadgen(
    url: str,
    *,
    path: str,
    body: dict[str, Any] | None,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    method: str = "POST",
    timeout: float = 30.0,
    max_requests: int = 200_000,
    retry_after_cap: float = 1.0,
) -> dict[str, Any]:
    """Run ``loadgen.py`` in a process of its own and return its figures."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        target = Path(out.name)
    argv = [
        PYTHON,
        str(BENCH / "loadgen.py"),
        "--url",
        url,
        "--path",
        path,
        "--method",
        method,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--timeout",
        str(timeout),
        "--max-requests",
        str(max_requests),
        "--retry-after-cap",
        str(retry_after_cap),
        "--out",
        str(target),
    ]
    if body is not None:
        argv += ["--body", json.dumps(body)]
    try:
        subprocess.run(argv, check=True, timeout=warmup + duration + timeout + 60)
        result: dict[str, Any] = json.loads(target.read_text())
    finally:
        target.unlink(missing_ok=True)
    return result


def upstream_counts(upstream: Process) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(f"{upstream.url}/_bench/stats", timeout=5).json()["counts"]
    return counts


def set_upstream_mode(upstream: Process, mode: str) -> None:
    httpx.post(f"{upstream.url}/_bench/mode", json={"mode": mode}, timeout=5).raise_for_status()


def write_json(name: str, data: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
