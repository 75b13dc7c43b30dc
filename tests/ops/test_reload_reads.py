"""A reload reads the config file again, through a real keel and SIGHUP, from files that
are not regular ones: a pipe (``--config <(cat keys.toml)``), read once already, reads
empty, which a reload applied as all defaults (every key gone, auth off); a FIFO no one
writes (a hung network mount alike) blocks the read, which froze every route while the
reload waited."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import KeelProcess, start_keel, wait_or_kill
from tests.ports import free_port

pytestmark = pytest.mark.integration

DEAD = "http://127.0.0.1:9/v1"
KEY = "reload-reads-user-key-0123456789"
CONFIG = f'[auth]\napi_keys = ["{KEY}"]\n' + "".join(
    f"[model.{role}]\nembedded_last_resort = false\n[model.{role}.http]\n"
    f'kind = "openai/{role}"\napi_endpoint = "{DEAD}"\nmodel_name = "m"\n'
    for role in ("completion", "chat", "embedding")
)


def eventually(what: str, done: Callable[[], bool], seconds: float = 60) -> None:
    """Until ``done()``; a failure naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"not seen in {seconds} s: {what}"
        time.sleep(0.05)


def test_a_sighup_rereading_a_pipe_read_once_keeps_the_keys(tmp_path: Path) -> None:
    """`keel serve --config <(cat keys.toml)`: a SIGHUP read the pipe, exhausted, as an
    empty file and applied it, the log saying only "config reloaded"."""
    log = tmp_path / "keel.log"
    port = free_port()
    command = [sys.executable, "-m", "keel", "serve", "--config", "/dev/stdin"]
    env = {**os.environ, "KEEL_ROOT": str(tmp_path / "root")}
    with log.open("wb") as out:  # exec'd: a forked keel cannot be handed a stdin
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdin=subprocess.PIPE, stdout=out, stderr=out, env=env
        )
    assert process.stdin is not None
    process.stdin.write(CONFIG.encode())
    process.stdin.close()
    server = KeelProcess(process, f"http://127.0.0.1:{port}", tmp_path / "root", log)
    try:
        server.wait_ready(path="/health")
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
        process.send_signal(signal.SIGHUP)
        eventually("the reload's refusal", lambda: "config reload refused" in log.read_text())
        said = log.read_text()
        refusal = said[said.index("config reload refused") :]  # its issues on lines below
        assert "the file is empty" in refusal and "restart keel" in refusal, refusal
        assert "config reloaded" not in log.read_text()
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    finally:
        server.stop()


@contextlib.contextmanager
def writer_of(fifo: Path) -> Iterator[Callable[[], int | None]]:
    """A FIFO's write end, once keel has it open to read (None before), closed on the way
    out: keel, blocked reading it, then reads an end."""
    opened: list[int] = []

    def open_now() -> int | None:
        if not opened:
            try:
                opened.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                return None
        return opened[0]

    try:
        yield open_now
    finally:
        for fd in opened:
            os.close(fd)


def test_a_reload_waiting_on_its_config_read_leaves_keel_serving(tmp_path: Path) -> None:
    """`--config cfg.fifo`: a SIGHUP's read of the FIFO, until something wrote to it,
    held up every route (/health too); and keel stops while such a read waits (the
    read's thread is none keel's exit waits for)."""
    root = tmp_path / "root"
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    first = threading.Thread(target=fifo.write_text, args=(CONFIG,), daemon=True)
    first.start()  # read by keel's start
    server = start_keel(root, None, "--config", str(fifo))
    try:
        server.wait_ready(path="/health")
        server.process.send_signal(signal.SIGHUP)
        with writer_of(fifo) as writer:
            eventually("the reload reading the FIFO", lambda: writer() is not None)
            with server.client(timeout=20) as client:
                assert client.get("/health").status_code == 200
                assert client.get("/v1/models").status_code == 401
            fd = writer()
            assert fd is not None
            os.write(fd, CONFIG.encode())
        eventually("the reload applied", lambda: "config reloaded" in server.log.read_text())

        server.process.send_signal(signal.SIGHUP)
        with writer_of(fifo) as writer:
            eventually("the second reload reading the FIFO", lambda: writer() is not None)
            # Ctrl-C: keel's exit waited for the threads of asyncio's executor
            server.process.send_signal(signal.SIGINT)
            wait_or_kill(server.process, 60)
            assert server.process.returncode == 130, server.log.read_text()[-3000:]
    finally:
        server.stop()
