"""A keel's life through real processes and signals: a reload asked for while it starts,
its data root deleted while it runs, a second signal during the shutdown drain."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import KeelProcess, free_port
from tests.fakes.upstreams import FakeUpstream
from tests.forked import fork_keel

pytestmark = pytest.mark.integration


def http_config(url: str, *extra: str) -> str:
    """Every role on the fake backend at ``url``, no embedded model: keel starts in a
    moment."""
    return "\n".join(
        [
            "[model.completion]\nembedded_last_resort = false\n",
            f'[model.completion.http]\nkind = "openai/completion"\napi_endpoint = "{url}/v1"\n',
            f'[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{url}/v1"\n',
            f'[model.embedding.http]\nkind = "openai/embedding"\napi_endpoint = "{url}/v1"\n',
            *extra,
        ]
    )


def spawn(root: Path, config: str, log: Path, *args: str) -> KeelProcess:
    """`keel serve` with ``root`` as its data root and its log at ``log`` (outside the
    root: a test may delete the root)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(config)
    port = free_port()
    log.write_bytes(b"")
    env = {**os.environ, "KEEL_ROOT": str(root)}
    process = fork_keel(["serve", "--port", str(port), *args], env, log)
    return KeelProcess(process, f"http://127.0.0.1:{port}", root, log)


VIEW = {"type": "view", "completion_id": "cmpl-1", "choice_index": 0}


def dropped_writes(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for line in metrics.splitlines():
        if line.startswith('keel_events_dropped_total{reason="write_failed"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_data_root_deleted_while_keel_runs_is_counted_shown_and_a_503(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """``rm -rf $KEEL_ROOT`` while keel ran: POST /v1/events answered 200 for events
    written to a deleted file, uncounted, the store said up, and the figures were a 500
    with a traceback (``disk I/O error``). As for a full disk: counted, shown, a 503."""
    root = tmp_path / "root"
    keel = spawn(root, http_config(upstream.url), tmp_path / "keel.log")
    try:
        keel.wait_ready()
        with keel.client(timeout=30) as client:
            assert client.get("/v1/stats/completions").status_code == 200
            shutil.rmtree(root)
            sent = client.post("/v1/events", json=VIEW)
            assert sent.status_code == 200  # an editor's event never fails the editor
            assert dropped_writes(keel.url) >= 1
            events = client.get("/v1/providers").json()["shared_state"]["events"]
            assert events["up"] is False, events
            assert str(root) in events["last_error"], events
            figures = client.get("/v1/stats/completions")
            assert figures.status_code == 503, figures.text
            message = figures.json()["error"]["message"]
            assert "events file" in message and str(root) in message, message
    finally:
        keel.stop()
    log = keel.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


FALLBACK = '[[model.chat.fallback]]\nkind = "openai/chat"\napi_endpoint = "http://127.0.0.1:9/v1"\n'


def chat_chain(url: str, key: str) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    roles = httpx.get(f"{url}/v1/providers", headers=headers, timeout=10).json()["roles"]
    return [p["name"] for p in roles["chat"]["providers"]]


def test_a_sighup_while_keel_starts_reloads_the_config_once_it_has(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A SIGHUP before the app's handler was installed was ignored: a file changed after
    keel read it was not served, and nothing said so. It is kept, and the config read
    again once keel has started. The start is held where the window is, by a Redis that
    never answers (keel asks it in its lifespan, before the app's SIGHUP handler)."""
    root = tmp_path / "root"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(60)
        state = (
            f'[state]\nredis_url = "redis://127.0.0.1:{silent.getsockname()[1]}"\n'
            'timeout_seconds = 2\n[auth]\napi_keys = ["key-for-tests-1"]\n'  # with Redis: keys
        )
        keel = spawn(root, http_config(upstream.url, state), tmp_path / "keel.log")
        try:
            held, _ = silent.accept()  # keel is in its lifespan, asking Redis
            with held:
                (root / "config.toml").write_text(http_config(upstream.url, state, FALLBACK))
                keel.process.send_signal(signal.SIGHUP)
                keel.wait_ready()
                deadline = time.monotonic() + 30
                while len(chain := chat_chain(keel.url, "key-for-tests-1")) != 2:
                    assert time.monotonic() < deadline, f"the SIGHUP was lost: {chain}"
                    time.sleep(0.1)
            assert keel.process.poll() is None
        finally:
            keel.stop()
    log = keel.log.read_text()
    assert "SIGHUP came while keel was starting" in log, log[-3000:]


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_ends_the_drain_at_once_and_streams_with_their_end(
    tmp_path: Path, second: signal.Signals
) -> None:
    """A second Ctrl-C (or SIGTERM) during the shutdown drain cut streams with no end
    event and no ``[DONE]``, and logged CancelledError tracebacks ("Exception in ASGI
    application"). It ends the drain at once, and each stream with its error event and
    ``[DONE]``, as the grace's end does; nothing is logged as a crash."""
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with FakeUpstream(tokens=("tok",) * 200, token_delay=0.1) as upstream:
        keel = spawn(tmp_path / "root", http_config(upstream.url), tmp_path / "keel.log")
        lines: list[str] = []
        try:
            keel.wait_ready()
            with (
                keel.client(timeout=60) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as answer,
            ):
                assert answer.status_code == 200
                for line in answer.iter_lines():
                    if line and not lines:
                        keel.process.send_signal(signal.SIGINT)
                        time.sleep(0.5)
                        keel.process.send_signal(second)
                        stopped_at = time.monotonic()
                    if line:
                        lines.append(line)
            code = keel.process.wait(30)
            took = time.monotonic() - stopped_at
        finally:
            keel.stop()
    log = keel.log.read_text()
    assert lines[-1] == "data: [DONE]", (lines[-3:], log[-3000:])
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and "send the request again" in error["message"]
    assert took < 5, took  # at once, not at the grace's end (30 s)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert code == 130, code  # stopped by Ctrl-C, as after one


@pytest.mark.parametrize(
    ("sent", "status"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)]
)
def test_a_clean_stop_ends_as_its_signal_asked(
    tmp_path: Path, upstream: FakeUpstream, sent: signal.Signals, status: int
) -> None:
    """The exit status the README's list gives for a stop: killed by SIGTERM (what
    systemd counts as a clean stop, and Docker shows as 143), 130 for Ctrl-C (a shell's
    128 + SIGINT). `keel serve --supervise` stopped by either exits 0:
    tests/ops/test_supervise.py."""
    keel = spawn(tmp_path / "root", http_config(upstream.url), tmp_path / "keel.log")
    try:
        keel.wait_ready()
        keel.process.send_signal(sent)
        assert keel.process.wait(30) == status
    finally:
        keel.stop()
    log = keel.log.read_text()
    assert "Traceback" not in log, log[-3000:]
