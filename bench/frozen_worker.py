"""A local worker frozen under a running request, with keel's default config.

Starts ``keel serve`` on a free loopback port with an empty ``KEEL_ROOT`` (no config
file), starts a 1,500-token completion, sends SIGSTOP to the completion worker that
``/ready`` names, then polls ``/v1/providers`` every 0.25 s and prints when the worker's
state, process and health change, when the request ended (and how), and how long the
next completion took. What it shows: how long a hung engine goes unnoticed.

Run: ``.venv/bin/python bench/frozen_worker.py``
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.ports import free_port  # noqa: E402


def main() -> None:
    port = free_port()
    keel = Path(sys.executable).with_name("keel")
    env = {**os.environ, "KEEL_ROOT": tempfile.mkdtemp(prefix="keel-frozen-")}
    server = subprocess.Popen(
        [str(keel), "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    pid = None
    try:
        for _ in range(300):
            try:
                if client.get("/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pid = client.get("/ready").json()["roles"]["completion"]["pid"]
        ended: dict[str, object] = {}

        def generate() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 1}
            answer = client.post("/v1/completions", json=body)
            ended.update(status=answer.status_code, error=answer.json().get("error"))

        request = threading.Thread(target=generate)
        request.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        print(f"worker {pid} stopped under a running request")
        seen: set[tuple[object, ...]] = set()
        while time.monotonic() - stopped < 150:
            provider = client.get("/v1/providers").json()["roles"]["completion"]["providers"][0]
            worker = provider["worker"]
            now = f"{time.monotonic() - stopped:5.1f} s"
            key = (worker["state"], worker["pid"], provider["healthy"])
            if key not in seen:
                seen.add(key)
                print(f"{now}: worker {key[0]}, pid {key[1]}, healthy {key[2]}", end="")
                print(f" ({worker['last_error']})" if worker["last_error"] else "")
            if not request.is_alive() and "at" not in ended:
                ended["at"] = now
                print(f"{now}: the request ended, {ended['status']}")
            if "at" in ended and worker["pid"] != pid and worker["state"] == "ready":
                break
            time.sleep(0.25)
        started = time.monotonic()
        answer = client.post("/v1/completions", json={"prompt": "def f():", "max_tokens": 8})
        print(f"next completion: {answer.status_code} in {time.monotonic() - started:.2f} s")
    finally:
        if pid is not None:  # a worker left stopped if this ended early
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
