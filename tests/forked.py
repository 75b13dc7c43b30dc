"""``keel serve`` processes for the tests, forked from one that has imported keel already.

A test's keel is a real process: its own pid, sockets, signals, exit status and log
file, with the environment, working directory and arguments the test gives it, and it
runs keel's own ``main`` as ``python -m keel`` does. What it skips is the interpreter's
start and the import of keel's web stack (FastAPI, pydantic's models: ~0.45 s of CPU a
start, measured with ``keel serve`` at /ready), which the ~110 keel servers the tests
start paid each. It also skips reading the embedded model's GGUF header, which the
template reads once (keel keeps a header by the file's size and modification time):
~45 ms of CPU for each keel that serves the embedded model (a forked keel at /ready,
six starts, alternating: 0.105 and 0.113 CPU-s mean, 0.073 and 0.048 with it read; with
the default config, 0.100 and 0.118, then 0.062 and 0.070).
Starting by ``python -m keel`` itself is covered by the tests that run the command line
(tests/ops/, tests/unit/test_config*.py, ...).

The template process (one per pytest worker, started on first use) imports only what
reads no environment variable at import (keel's modules read theirs when they run), has
no thread, and freezes its objects out of the collector's reach before it forks, so a
child copies few of its pages. It reports each child's exit status; :class:`Forked`
gives the test what ``subprocess.Popen`` would (``pid``, ``poll``, ``wait``,
``send_signal``, ``terminate``, ``kill``, ``returncode``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

TEMPLATE = r"""
import gc, json, os, select, signal, sys, traceback
import keel.cli, keel.app  # what every keel serve imports
import keel.providers.http  # aiohttp, imported at start by a keel with HTTP backends
from keel.errors import MissingDependency
from keel.models import gguf, registry
try:  # read again only if the file changes; without it, each keel says what is missing
    gguf.read_header(registry.embedded_model_path())
except MissingDependency:
    pass

def serve():
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    requests = os.fdopen(0, "rb", buffering=0)
    replies = os.fdopen(1, "wb", buffering=0)
    pending = b""
    gc.freeze()
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 512)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                replies.write(json.dumps({"exit": pid, "code": code}).encode() + b"\n")
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                order = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    # as a keel started from a terminal or a service manager has it: the
                    # template kept what its starter ignored (a background job ignores
                    # SIGINT), and a keel stopped by Ctrl-C exited 0, not 130
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    run(order)  # never returns
                replies.write(json.dumps({"pid": pid}).encode() + b"\n")

def run(order):
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, order["out"]), (2, order["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    os.closerange(3, 1 << 16)
    os.environ.clear()
    os.environ.update(order["env"])
    # as Python opens them at its start: stdout to a file is buffered (line by line
    # under PYTHONUNBUFFERED), stderr line by line
    sys.stdin = open(0, "r", closefd=False)
    lines = 1 if os.environ.get("PYTHONUNBUFFERED") else -1
    sys.stdout = open(1, "w", buffering=lines, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(order["cwd"])
    sys.argv = ["keel", *order["args"]]
    try:
        code = keel.cli.main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.exit(code)

serve()
"""


class _Template:
    """One template process and the thread that reads what it reports."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TEMPLATE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.codes: dict[int, int] = {}
        self.started: list[int] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name="keel-template").start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            report = json.loads(line)
            with self.changed:
                if "pid" in report:
                    self.started.append(report["pid"])
                else:
                    self.codes[report["exit"]] = report["code"]
                self.changed.notify_all()
        with self.changed:  # the template is gone: so are the exits it would report
            self.changed.notify_all()

    def fork(self, args: Sequence[str], env: Mapping[str, str], out: Path, err: Path) -> int:
        order = {
            "args": list(args),
            "env": dict(env),
            "out": str(out),
            "err": str(err),
            "cwd": os.getcwd(),
        }
        assert self.process.stdin is not None
        with self.changed:
            self.process.stdin.write(json.dumps(order).encode() + b"\n")
            self.process.stdin.flush()
            if not self.changed.wait_for(lambda: self.started, timeout=30):
                raise RuntimeError("the keel template process did not fork")
            return self.started.pop(0)


_templates: dict[int, _Template] = {}
_lock = threading.Lock()


def _template() -> _Template:
    with _lock:  # one per pytest worker process (a forked test process makes its own)
        template = _templates.get(os.getpid())
        if template is None or template.process.poll() is not None:
            template = _templates[os.getpid()] = _Template()
        return template


class Forked:
    """A forked keel process, as ``subprocess.Popen`` shows one."""

    def __init__(self, template: _Template, pid: int, args: Sequence[str]) -> None:
        self._template = template
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self._template.changed:
            if self.returncode is None:
                self.returncode = self._template.codes.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._template.changed:
            ended = self._template.changed.wait_for(
                lambda: self.poll() is not None or self._template.process.poll() is not None,
                timeout=timeout,
            )
        if not ended:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        if self.returncode is None:
            raise RuntimeError("the keel template process ended before its child")
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_keel(
    args: Sequence[str], env: Mapping[str, str], out: Path, err: Path | None = None
) -> Forked:
    """``python -m keel <args>`` with ``env`` (the whole environment, as ``Popen``'s
    ``env``), forked from the template; its stdout appended to ``out``, its stderr to
    ``err`` (to ``out`` too without one)."""
    template = _template()
    return Forked(template, template.fork(args, env, out, err or out), ["keel", *args])


def run_keel(
    args: Sequence[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``python -m keel <args>`` run to its end (killed after ``timeout`` seconds, as
    ``subprocess.run`` does), its output as text."""
    with tempfile.TemporaryDirectory(prefix="keel-cli-") as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        process = fork_keel(args, env, out, err)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(
            process.args, process.wait(), out.read_text(), err.read_text()
        )
