"""SIGTERM while a model load runs: keel stops at once, the load ends saying why.

A streamed load held keel's stop for its whole shutdown grace (29 s of the default 30,
then 10 s more for the background work), and its stream ended with the generic "the
answer is cut short; send the request again"."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from keel.models.registry import embedded_model_path
from keel.serving.streaming import STOPPING
from tests.conftest import PRECOMPUTE_OFF, running_keel
from tests.integration.test_model_management import _workers_of

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stream", [True, False])
def test_sigterm_during_a_load_stops_keel_at_once_and_ends_the_load_saying_so(
    tmp_path: Path, stream: bool
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    second = models / "second.gguf"
    second.symlink_to(embedded_model_path())
    # The default shutdown grace (30 s): the load must not wait for it.
    with running_keel(tmp_path, PRECOMPUTE_OFF) as server:
        answer: list[httpx.Response] = []
        lines: list[str] = []

        def load() -> None:
            body = {"model_name": "second", "stream": stream}
            with httpx.stream(
                "POST", f"{server.url}/v1/model/load", json=body, timeout=120
            ) as response:
                answer.append(response)
                lines.extend(response.iter_lines())

        client = threading.Thread(target=load, daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while not (workers := _workers_of(second)):
            assert time.monotonic() < deadline, "no worker started for the load"
            time.sleep(0.005)
        os.kill(workers[0], signal.SIGSTOP)  # held in its load, as a big model on a slow disk
        time.sleep(0.3)
        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
        took = time.monotonic() - stopping
        client.join(10)
        assert took < 10, f"keel took {took:.1f}s to stop, the load held it"
        assert code in (0, -signal.SIGTERM), code
        deadline = time.monotonic() + 10
        while _alive(workers[0]):
            assert time.monotonic() < deadline, f"worker {workers[0]} outlived keel"
            time.sleep(0.05)
    assert answer, "the load got no answer"
    if stream:
        assert answer[0].status_code == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert events[0]["step"] == "queued", events
        last = events[-1]
        assert last["status"] == "error" and last["role"] == "completion", last
    else:
        assert answer[0].status_code == 503, lines
        last = json.loads("".join(lines))
    message = last["error"]["message"]
    assert message.startswith(STOPPING) and "the load of second" in message, message
    assert "shut down" in message and "load the model again" in message, message
    audit = (tmp_path / "audit.log").read_text()
    assert '"result":"stopped"' in audit and '"target":"completion:second"' in audit, audit
