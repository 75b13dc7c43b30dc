"""Model load / swap / unload through a real keel process, under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from keel.models.registry import embedded_model_path
from tests.conftest import PRECOMPUTE_OFF, KeelProcess, running_keel, sse_events

pytestmark = pytest.mark.integration


def gguf_header(values: dict[str, str | int]) -> bytes:
    """A GGUF v3 header with only metadata: what the memory estimate reads."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(values))
    for key, value in values.items():
        out += struct.pack("<Q", len(key)) + key.encode()
        if isinstance(value, str):
            out += struct.pack("<IQ", 8, len(value)) + value.encode()
        else:
            out += struct.pack("<II", 4, value)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    root = tmp_path_factory.mktemp("models")
    models = root / "models"
    models.mkdir()
    (models / "alt.gguf").symlink_to(embedded_model_path())
    (models / "giant.gguf").write_bytes(
        gguf_header(
            {
                "general.architecture": "llama",
                "llama.block_count": 4096,
                "llama.embedding_length": 65536,
                "llama.attention.head_count": 64,
            }
        )
    )
    # A header the pre-check takes, of an architecture the engine does not know.
    (models / "weird.gguf").write_bytes(
        gguf_header({"general.architecture": "no-such-arch", "no-such-arch.block_count": 1})
    )
    config = (
        '[model.embedding.local]\nfallback_models = ["alt"]\n'
        '[[model.chat.fallback]]\nmodel_id = "alt"\n'
    )
    with running_keel(root, config) as keel:
        yield keel


def events(response: httpx.Response) -> list[dict[str, object]]:
    found = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            found.append(json.loads(line[6:]))
    return found


def test_list_shows_files_with_their_header_facts(server: KeelProcess) -> None:
    listing = httpx.get(f"{server.url}/v1/model/list", timeout=10).json()
    by_id = {card["id"]: card["parameters"] for card in listing["data"]}
    assert by_id["SmolLM2-135M-Instruct"]["embedded"] is True
    assert by_id["alt"]["architecture"] == "llama"
    assert by_id["alt"]["context_length"] == 8192
    assert by_id["giant"]["size_bytes"] < 1000


def test_swap_under_load_loses_no_request(server: KeelProcess) -> None:
    before = httpx.get(f"{server.url}/v1/model", timeout=10).json()
    assert before["id"] == "SmolLM2-135M-Instruct"
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                body = {"prompt": "def add(a, b):\n", "max_tokens": 4}
                statuses.append(client.post("/v1/completions", json=body).status_code)

    clients = [threading.Thread(target=load) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            response = client.post(
                "/v1/model/load", json={"model_name": "alt", "role": "completion"}
            )
            progress = events(response)
            after = client.get("/v1/model").json()
            for _ in range(3):  # served by the new worker
                ok = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2})
                assert ok.status_code == 200
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    steps = [event["step"] for event in progress]
    assert steps[0] == "queued" and steps[-1] == "ready", progress
    # TabbyAPI's events, which its clients (ST-tabbyAPI-loader) wait on for "finished" and
    # parse each of as JSON (a [DONE] threw: "Could not load the model" after a load)
    assert [event["status"] for event in progress] == ["processing"] * (len(steps) - 1) + [
        "finished"
    ]
    assert progress[-1]["model_type"] == "model"
    assert progress[-1]["module"] == progress[-1]["modules"]
    assert "[DONE]" not in response.text
    assert "starting_worker" in steps
    documented = {"queued", "checking_memory", "starting_worker", "loading", "switching", "ready"}
    assert set(steps) <= documented, steps  # a worker's own "starting" leaked in
    assert after["id"] == "alt" and after["parameters"]["path"].endswith("alt.gguf")
    assert statuses and set(statuses) == {200}, statuses
    audit = (server.root / "audit.log").read_text()
    assert '"action":"model_load"' in audit and '"target":"completion:alt"' in audit


def test_a_model_that_cannot_fit_is_refused_with_both_numbers(server: KeelProcess) -> None:
    response = httpx.post(
        f"{server.url}/v1/model/load",
        json={"model_name": "giant", "role": "chat", "stream": False},
        timeout=60,
    )
    assert response.status_code == 507, response.text
    message = response.json()["error"]["message"]
    assert "giant needs" in message and "MiB available" in message
    assert "lower context_size or parallelism" in message
    assert httpx.get(f"{server.url}/v1/model?role=chat", timeout=10).json()["id"] != "giant"
    # a context the load asked for is named as it was asked (it said context_size)
    body = {"model_name": "giant", "role": "chat", "stream": False, "max_seq_len": 4096}
    sized = httpx.post(f"{server.url}/v1/model/load", json=body, timeout=60)
    assert "lower max_seq_len or parallelism" in sized.json()["error"]["message"], sized.text


def test_a_model_that_cannot_fit_falls_back_to_a_smaller_one(server: KeelProcess) -> None:
    response = httpx.post(
        f"{server.url}/v1/model/load",
        json={"model_name": "giant", "role": "embedding"},
        timeout=120,
    )
    progress = events(response)
    notes = " ".join(str(event["message"]) for event in progress)
    assert progress[-1]["step"] == "ready", progress
    assert "giant does not fit" in notes and "loading alt" in notes
    current = httpx.get(f"{server.url}/v1/model?role=embedding", timeout=10).json()
    assert current["id"] == "alt"
    vectors = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}, timeout=60)
    assert vectors.status_code == 200


def test_unknown_model_and_unload_rules(server: KeelProcess) -> None:
    missing = httpx.post(
        f"{server.url}/v1/model/load",
        json={"model_name": "nope", "stream": False},
        timeout=30,
    )
    assert missing.status_code == 404
    lonely = httpx.post(f"{server.url}/v1/model/unload", json={"role": "embedding"}, timeout=30)
    assert lonely.status_code == 409  # embedding has no other provider
    assert "no other provider" in lonely.json()["error"]["message"]
    unloaded = httpx.post(f"{server.url}/v1/model/unload", json={"role": "chat"}, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    # The embedded model left chat; its worker runs on for completion, and says so (it
    # was reported unloaded, with nothing to tell it was still running).
    body = unloaded.json()
    assert body["unloaded"] and body["still_serving"] == {
        name: ["completion"] for name in body["unloaded"]
    }
    # Chat is now served by its configured fallback.
    assert httpx.get(f"{server.url}/v1/model?role=chat", timeout=10).json()["id"] == "alt"
    served = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert served.status_code == 200, served.text


def _chain(client: httpx.Client, role: str) -> list[dict[str, object]]:
    providers: list[dict[str, object]] = client.get("/v1/providers").json()["roles"][role][
        "providers"
    ]
    return providers


def test_a_loaded_model_keeps_the_last_resort_and_shares_a_running_worker(
    tmp_path: Path,
) -> None:
    """A load left completion with no embedded last resort (a crash of the loaded
    model's worker failed the request), started a second worker of a model another
    role ran already, and ignored TabbyAPI's ``max_seq_len``. The worker a load starts
    logged its crashes under the load's request id."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "alt.gguf").symlink_to(embedded_model_path())
    embedded = "local/SmolLM2-135M-Instruct"
    with running_keel(tmp_path, PRECOMPUTE_OFF) as server, server.client() as client:
        body = {"model_name": "alt", "max_seq_len": 1024, "stream": False}
        load = client.post("/v1/model/load", json=body, headers={"X-Request-ID": "the-load"})
        assert load.status_code == 200
        assert [p["name"] for p in _chain(client, "completion")] == ["local/alt", embedded]
        assert client.get("/v1/model").json()["parameters"]["max_seq_len"] == 1024
        answers: list[httpx.Response] = []
        body = {"prompt": "def fibonacci(n):\n", "max_tokens": 64, "temperature": 0}
        request = threading.Thread(
            target=lambda: answers.append(client.post("/v1/completions", json=body))
        )
        request.start()
        deadline = time.monotonic() + 30
        while _chain(client, "completion")[0]["outstanding"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(int(_chain(client, "completion")[0]["worker"]["pid"]), signal.SIGKILL)
        request.join(120)
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].headers["x-keel-provider"] == embedded
        killed = [line for line in server.log.read_text().splitlines() if "was killed" in line]
        assert killed and not any("the-load" in line for line in killed), killed
        # The embedded model, serving chat and last in completion's chain: the same worker.
        body = {"model_name": "SmolLM2-135M-Instruct", "stream": False}
        assert client.post("/v1/model/load", json=body).status_code == 200
        completion, chat = _chain(client, "completion"), _chain(client, "chat")
        assert [p["name"] for p in completion] == [embedded]
        assert completion[0]["worker"]["pid"] == chat[0]["worker"]["pid"]
        refused = client.post("/v1/model/unload")  # no body, as TabbyAPI's clients send it
        assert refused.status_code == 409 and "completion has no other provider" in refused.text
        # The same file by another name: the worker running it serves, under its name,
        # and the answer says so (it named the new name, which /v1/model did not show).
        body = {"model_name": "alt", "role": "chat", "stream": False}
        assert client.post("/v1/model/load", json=body).status_code == 200
        again = client.post("/v1/model/load", json={**body, "model_name": "alt.gguf"})
        assert again.status_code == 200, again.text
        current = client.get("/v1/model", params={"role": "chat"}).json()["id"]
        assert again.json()["message"].startswith(f"chat is served by {current} "), again.text
        # A file replaced in its place (a newer pull) is another model: loaded again, it
        # starts a worker reading it ("runs already": the old worker read the deleted one).
        shutil.copyfile(embedded_model_path(), models / "fresh.gguf")
        body = {"model_name": "fresh", "role": "chat", "stream": False}
        assert client.post("/v1/model/load", json=body).status_code == 200
        first = _chain(client, "chat")[0]["worker"]["pid"]
        os.utime(models / "fresh.gguf")  # touched, the same model: its worker is kept
        touched = client.post("/v1/model/load", json=body)
        assert touched.status_code == 200, touched.text
        assert _chain(client, "chat")[0]["worker"]["pid"] == first
        shutil.copyfile(embedded_model_path(), models / "fresh.part")
        os.replace(models / "fresh.part", models / "fresh.gguf")
        renewed = client.post("/v1/model/load", json=body)
        assert renewed.status_code == 200 and "runs already" not in renewed.text, renewed.text
        assert _chain(client, "chat")[0]["worker"]["pid"] != first


def test_a_load_of_a_shared_worker_given_up_on_serves_every_role_it_served(
    tmp_path: Path,
) -> None:
    """A worker completion and chat shared, given up on (its file went bad: a restart
    reported it once and stopped): a load of the mended file served completion only, and
    chat stayed failed, ``/ready`` 503, until a second load for it."""
    models = tmp_path / "models"
    models.mkdir()
    model = models / "m.gguf"
    model.write_bytes(embedded_model_path().read_bytes())
    config = (
        f"{PRECOMPUTE_OFF}[model.completion]\nembedded_last_resort = false\n"
        '[model.completion.local]\nmodel_id = "m"\n[model.chat.local]\nmodel_id = "m"\n'
    )
    with running_keel(tmp_path, config) as server, server.client() as client:
        pid = _chain(client, "chat")[0]["worker"]["pid"]
        assert _chain(client, "completion")[0]["worker"]["pid"] == pid  # one worker
        kept = model.with_suffix(".kept")
        model.rename(kept)  # the running worker keeps its mapping of the file
        model.write_bytes(b"not a model")
        os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while _chain(client, "chat")[0]["worker"]["state"] != "failed":
            assert time.monotonic() < deadline, _chain(client, "chat")
            time.sleep(0.1)
        assert client.get("/ready").status_code == 503
        kept.replace(model)
        body = {"model_name": "m", "stream": False}
        assert client.post("/v1/model/load", json=body).status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        completion, chat = _chain(client, "completion")[0], _chain(client, "chat")[0]
        assert chat["name"] == completion["name"] and chat["worker"]["state"] == "ready", chat
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text


def test_a_model_swapped_out_finishes_the_answer_it_is_streaming(tmp_path: Path) -> None:
    """A model that served completion alone, swapped out while it streams an answer,
    finishes that answer before its worker stops. keel closed it at once: the swap took
    its endpoint out of the chain, and with it the count of what ran there, so the
    answer broke off with an error event."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "alt.gguf").symlink_to(embedded_model_path())
    with running_keel(tmp_path, PRECOMPUTE_OFF) as server, server.client() as client:
        load = {"model_name": "alt", "stream": False}
        assert client.post("/v1/model/load", json=load).status_code == 200
        pid = _chain(client, "completion")[0]["worker"]["pid"]  # type: ignore[index]
        body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 150, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as answer:
            lines = answer.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            assert answer.headers["x-keel-provider"] == "local/alt"
            back = {"model_name": "SmolLM2-135M-Instruct", "stream": False}
            assert client.post("/v1/model/load", json=back).status_code == 200
            rest = "\n".join(lines)
        events = sse_events(rest)
        assert all("error" not in event for event in events), events[-1]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists(), "the swapped-out worker stops after it"


def test_a_streamed_load_whose_client_left_still_completes(tmp_path: Path) -> None:
    """The client of a streamed load gone after its first event: the load goes on, as
    without streaming. It left the new worker running in no chain, shown nowhere, and
    counted against the next load's memory check, until keel exited."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "alt.gguf").symlink_to(embedded_model_path())
    with running_keel(tmp_path, PRECOMPUTE_OFF) as server, server.client() as client:
        body = {"model_name": "alt", "role": "chat", "stream": True}
        with client.stream("POST", "/v1/model/load", json=body) as progress:
            assert next(progress.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 60
        while (chat := _chain(client, "chat")[0])["name"] != "local/alt" or chat["worker"][
            "state"
        ] != "ready":
            assert time.monotonic() < deadline, chat
            time.sleep(0.1)


def test_a_file_the_engine_refuses_is_the_requests_400(server: KeelProcess) -> None:
    """It was a 500 ``server_error`` with code ``missing_dependency``: the server's
    fault, where the request named a file no engine can load."""
    with server.client() as client:
        body = {"model_name": "weird", "role": "chat", "stream": False}
        refused = client.post("/v1/model/load", json=body, timeout=120)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_model", "model_name"), error
    # the role keeps its model: nothing to reload or restart (it said to)
    assert "reload" not in error["message"] and "restart" not in error["message"], error


def _workers_of(model: Path) -> list[int]:
    """Worker processes running ``model`` (by their command lines)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"keel.workers.worker" in line and str(model).encode() in line:
            found.append(int(proc.name))
    return found


def test_keel_stopping_during_a_load_stops_the_worker_it_started(tmp_path: Path) -> None:
    """SIGTERM while a load's worker was still loading: keel exited and left the worker
    running, orphaned (it wrote a traceback into the log when it woke)."""
    models = tmp_path / "models"
    models.mkdir()
    second = models / "second.gguf"
    second.symlink_to(embedded_model_path())
    config = PRECOMPUTE_OFF + "[server]\nshutdown_grace_seconds = 1\n"
    with running_keel(tmp_path, config) as server:
        load = threading.Thread(
            target=lambda: httpx.post(
                f"{server.url}/v1/model/load", json={"model_name": "second"}, timeout=60
            ),
            daemon=True,
        )
        load.start()
        deadline = time.monotonic() + 30
        while not (workers := _workers_of(second)):
            assert time.monotonic() < deadline, "no worker started for the load"
            time.sleep(0.005)
        os.kill(workers[0], signal.SIGSTOP)  # held in its load, as a slow disk would
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) is not None
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{workers[0]}") and _state(workers[0]) != "Z":
            assert time.monotonic() < deadline, f"worker {workers[0]} outlived keel"
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_tabbys_draft_model_list_is_empty(server: KeelProcess) -> None:
    """ST-tabbyAPI-loader reads it before it lists models, and gave up on the 404."""
    drafts = httpx.get(f"{server.url}/v1/model/draft/list", timeout=10)
    assert drafts.status_code == 200
    assert drafts.json() == {"object": "list", "data": []}
