"""The real embedded model, end to end through a real keel process on loopback."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import sqlite3
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from keel.models import gguf
from keel.models.registry import embedded_model_path
from keel.providers import local
from keel.providers.local import LocalProvider
from keel.workers.supervisor import WorkerSpec, WorkerSupervisor
from keel.workers.worker import EMBEDDING_NICE
from tests.conftest import KeelProcess, niceness, running_keel, sse_events

pytestmark = pytest.mark.integration

PYTHON_PREFIX = "import math\n\n\ndef area_of_circle(radius):\n    "


def tabby_body(prefix: str, suffix: str = "\n", language: str = "python") -> dict[str, object]:
    return {
        "language": language,
        "segments": {"prefix": prefix, "suffix": suffix, "filepath": "geometry.py"},
        "temperature": 0,
    }


def test_tabby_completion_returns_code(keel_server: KeelProcess) -> None:
    with keel_server.client() as client:
        response = client.post("/v1/completions", json=tabby_body(PYTHON_PREFIX))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["index"] == 0
    assert body["choices"][0]["text"].strip(), body


def test_tabby_debug_data_shows_prompt_and_snippets(keel_server: KeelProcess) -> None:
    body = tabby_body(PYTHON_PREFIX)
    body["segments"]["declarations"] = [  # type: ignore[index]
        {"filepath": "shapes.py", "body": "PI = 3.14159"}
    ]
    body["debug_options"] = {"return_prompt": True, "return_snippets": True}
    with keel_server.client() as client:
        data = client.post("/v1/completions", json=body).json()
    prompt = data["debug_data"]["prompt"]
    # Prefix-only template (the model has no FIM tokens), up to the code: the cursor's
    # blank, indented line is the model's to write.
    assert prompt.endswith(PYTHON_PREFIX.rstrip())
    assert "# Path: shapes.py" in prompt and "# PI = 3.14159" in prompt
    assert data["debug_data"]["snippets"][0]["filepath"] == "shapes.py"


@pytest.mark.parametrize(
    "prefix",
    [
        PYTHON_PREFIX,
        "def add(a, b):\n    ",
        "def read(path):\n    with open(path) as f:\n        ",
        "function add(a, b) {\n  ",
    ],
)
def test_a_blank_indented_line_is_completed_at_its_indentation(
    keel_server: KeelProcess, prefix: str
) -> None:
    """After Enter and the editor's auto-indent, the completion is the line's code: no
    space too many (five after four was an IndentationError) and no second newline,
    as the embedded model wrote when its prompt ended in the bare indentation."""
    language = "javascript" if prefix.startswith("function") else "python"
    with keel_server.client() as client:
        body = tabby_body(prefix, suffix="\n", language=language)
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text.strip(), text
    assert text == text.lstrip(), text


def test_after_enter_the_answer_is_a_new_line_in_the_files_indentation(
    keel_server: KeelProcess,
) -> None:
    """Ended at ``x = 1``, the prompt was taken by the embedded model as a line to go on
    with (``0``, then ``return x``): the answer is its next line, not ``0``. In a file
    indented with a tab, it wrote four spaces a level: the answer's lines are in tabs."""
    with keel_server.client() as client:
        body = tabby_body("def f():\n    x = 1\n    ", suffix="\n")
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert text.strip() and not text[0].isdigit(), text
        body = tabby_body("def fib(n):\n\t", suffix="\n")
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    later = text.split("\n")[1:]
    assert later and all(line.startswith("\t") for line in later if line.strip()), text


def test_after_a_space_the_model_writes_the_space_itself(keel_server: KeelProcess) -> None:
    """A prompt ending in a space is a split the model never saw (BPE merges a word with
    the space before it): after ``is `` the embedded model wrote a number. The prompt
    ends at the code; the answer goes on after the user's space."""
    body = tabby_body("def check(auth):\n    if auth is ", suffix=":\n        return\n")
    body["debug_options"] = {"return_prompt": True}
    with keel_server.client() as client:
        data = client.post("/v1/completions", json=body).json()
    assert data["debug_data"]["prompt"].endswith("if auth is")
    text = data["choices"][0]["text"]
    assert text.strip() and text == text.lstrip(), text
    assert not text[0].isdigit(), text


def test_any_editor_language_and_an_empty_file_are_completed(keel_server: KeelProcess) -> None:
    """Editors send the language id of every extension they have, and a request from an
    empty file (Tabby answers both): keel completes them, a language without rules
    counted and its id logged once, plain text and an empty file not counted."""
    metric = "keel_completions_unknown_language_total "

    def unknown(client: httpx.Client) -> float:
        rows = client.get("/metrics").text.splitlines()
        (value,) = [float(row.split()[-1]) for row in rows if row.startswith(metric)]
        return value

    with keel_server.client() as client:
        before = unknown(client)
        for language, prefix in [
            ("klingon-script", "qaStaHvIS wa' ram\n"),
            ("klingon-script", "qaStaHvIS cha' ram\n"),
            ("plaintext", "Dear diary,\n"),
            ("bat", "@echo off\n"),
            ("python", ""),
            ("python", "\n\n"),
        ]:
            body = tabby_body(prefix, suffix="", language=language)
            body["segments"]["filepath"] = f"notes.{language}"  # type: ignore[index]
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, (language, prefix, response.text)
            assert isinstance(response.json()["choices"][0]["text"], str)
        assert unknown(client) == before + 2
        infill = client.post("/infill", json={"input_prefix": "", "input_suffix": ""})
        assert infill.status_code == 200, infill.text
    logged = [
        line for line in keel_server.log.read_text().splitlines() if "'klingon-script'" in line
    ]
    assert len(logged) == 1, logged
    assert "no rules" in logged[0]


def test_code_that_spells_a_control_token_is_read_as_text(keel_server: KeelProcess) -> None:
    """A file holding the model's ``<|endoftext|>`` (a tokenizer's source, a training
    script): the engine read it as the control token itself, which ends the model's
    document there. Read as text, it costs the tokens its characters do, as the same
    line spelled one character off does (it was ~4 tokens fewer a line)."""
    assert "<|endoftext|>" in gguf.read_header(embedded_model_path())[0][gguf.CONTROL_TOKENS]

    def read(mark: str) -> int:
        lines = "".join(f'EOS_{i} = "{mark}"\n' for i in range(10))  # 40 fewer as control
        body = {"input_prefix": lines, "input_suffix": "", "n_predict": 1, "temperature": 0}
        answer = client.post("/infill", json=body)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["tokens_evaluated"])

    with keel_server.client() as client:
        control, plain = read("<|endoftext|>"), read("<|endoftext|]")
    assert abs(control - plain) <= 20, (control, plain)


def test_crlf_round_trip(keel_server: KeelProcess) -> None:
    prefix = "def add(a, b):\r\n    total = a + b\r\n"
    body = tabby_body(prefix, suffix="\r\n")
    body["debug_options"] = {"return_prompt": True}
    with keel_server.client() as client:
        data = client.post("/v1/completions", json=body).json()
    text = data["choices"][0]["text"]
    assert "\r" not in data["debug_data"]["prompt"]
    assert text.count("\n") == text.count("\r\n")


def test_openai_sdk_completion_chat_embeddings_models(keel_server: KeelProcess) -> None:
    # Imported here, not at the top: the SDK is ~0.9 s of imports (more on a fresh clone,
    # compiling them), which every pytest worker would pay while collecting.
    import openai

    client = openai.OpenAI(base_url=f"{keel_server.url}/v1", api_key="unused", timeout=120)
    try:
        completion = client.completions.create(
            model="keel", prompt="def fibonacci(n):\n", max_tokens=16, temperature=0
        )
        assert completion.choices[0].text
        assert completion.choices[0].finish_reason in {"stop", "length"}

        chunks = list(
            client.completions.create(
                model="keel", prompt="for i in range(", max_tokens=8, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks)

        chat = client.chat.completions.create(
            model="keel",
            messages=[{"role": "user", "content": "What is Python?"}],
            max_tokens=24,
        )
        assert chat.choices[0].message.content

        stream = client.chat.completions.create(
            model="keel",
            messages=[{"role": "user", "content": "Name a sorting algorithm."}],
            max_tokens=16,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(pieces).strip()

        embedding = client.embeddings.create(model="keel", input=["def f(): pass", "hello"])
        assert len(embedding.data) == 2
        assert len(embedding.data[0].embedding) == 576  # SmolLM2-135M's hidden size
        assert embedding.data[0].embedding != embedding.data[1].embedding

        models = client.models.list()
        assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    finally:
        client.close()


def test_a_local_chat_without_a_limit_runs_until_the_model_stops(
    keel_server: KeelProcess,
) -> None:
    """No ``max_tokens``: the engine's own end (here a stop word, so it is quick), not
    a limit keel chose; the answer did not end for length."""
    body = {
        "messages": [{"role": "user", "content": "Say hello."}],
        "stop": [" ", "\n"],
        "frequency_penalty": 0.5,  # the engine takes the penalties too
        "presence_penalty": 0.5,
    }
    with keel_server.client() as client:
        answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["message"]["content"], choice
    assert choice["finish_reason"] == "stop", choice


def _answer(client: httpx.Client, route: str, body: dict[str, object]) -> tuple[str, str]:
    """The text and finish reason of a completion or chat, streamed or not."""
    if not body.get("stream"):
        choice = client.post(route, json=body).json()["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"], choice[
            "finish_reason"
        ]
    choices = [e["choices"][0] for e in sse_events(client.post(route, json=body).text)]
    parts = [c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices]
    return "".join(parts), choices[-1]["finish_reason"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("route", "ask"),
    [
        ("/v1/completions", {"prompt": "1, 2, 3,"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to 9."}]}),
    ],
)
def test_text_that_begins_a_stop_word_is_kept_when_the_answer_ends_at_max_tokens(
    keel_server: KeelProcess, route: str, ask: dict[str, object], stream: bool
) -> None:
    """The engine held such text back and dropped it at ``max_tokens``: ``" 4,"`` came
    back as ``" "`` with stop ``"4, 5, 6"``. A stop word the answer reaches still ends
    it, also one that spans tokens."""
    body = {**ask, "max_tokens": 6, "temperature": 0, "stream": stream}
    with keel_server.client() as client:
        text, finish = _answer(client, route, body)
        assert (finish, len(text.strip()) > 2) == ("length", True), text
        assert _answer(client, route, {**body, "stop": [text[1:] + "\u2603"]}) == (text, "length")
        assert _answer(client, route, {**body, "stop": [text[1:3]]}) == (text[:1], "stop")


def test_every_64_bit_seed_is_its_own_and_repeatable(keel_server: KeelProcess) -> None:
    """OpenAI's seeds are 64-bit, llama.cpp's 32: the engine gave 0, 2**32 and 2**40
    the same text, and 2**32 - 1 and -1 a random one each time."""
    seeds = [0, 2**32, 2**40, 2**32 - 1, -1, 2**63 - 1, -(2**63)]
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.5}
    with keel_server.client() as client:
        texts = [
            [client.post("/v1/completions", json={**body, "seed": seed}).json() for _ in "ab"]
            for seed in seeds
        ]
    firsts = [first["choices"][0]["text"] for first, _ in texts]
    assert [second["choices"][0]["text"] for _, second in texts] == firsts
    assert len(set(firsts)) == len(seeds), firsts


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["", "def add(a, b):\n    return"])
def test_a_suffix_the_model_cannot_read_is_a_400(
    keel_server: KeelProcess, stream: bool, prompt: str
) -> None:
    """The embedded model has no fill-in-the-middle template: with an empty prompt it was
    given nothing to read and answered nothing, ``finish_reason: length``, usage 0; with
    a prompt, the suffix was dropped and the answer read as one that had used it. A
    suffix of whitespace alone (an editor at a file's end) says nothing, and is served."""
    body = {"prompt": prompt, "suffix": "print(x)\n", "max_tokens": 5, "stream": stream}
    with keel_server.client() as client:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"], error
        blank = client.post("/v1/completions", json={**body, "prompt": "x = ", "suffix": "\n"})
        assert blank.status_code == 200, blank.text
        providers = client.get("/v1/providers").json()["roles"]["completion"]["providers"]
    assert all(p["healthy"] and p["last_error"] is None for p in providers), providers


def test_chat_stream_ends_with_done(keel_server: KeelProcess) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with (
        keel_server.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert '"role":"assistant"' in lines[0]


def test_health_and_tabby_meta_endpoints(keel_server: KeelProcess) -> None:
    with keel_server.client() as client:
        health = client.get("/v1/health").json()
        assert health == client.post("/v1/health").json()
        setting = client.get("/v1beta/server_setting").json()
        models = client.get("/v1beta/models").json()
        live = client.get("/health")
        ready = client.get("/ready")
    assert health["model"] == "SmolLM2-135M-Instruct" and health["device"] == "cpu"
    # No [model] configured: the embedded model in every role, chat offered to editors.
    assert (health["chat_model"], health["chat_device"]) == ("SmolLM2-135M-Instruct", "cpu")
    assert health["version"]["git_describe"].startswith("v0.")
    assert health["cpu_count"] >= 1 and isinstance(health["cuda_devices"], list)
    # Tabby's clients are asked not to send TabbyML their usage data.
    assert setting == {"disable_client_side_telemetry": True}
    assert models == {"completion": ["SmolLM2-135M-Instruct"], "chat": ["SmolLM2-135M-Instruct"]}
    assert live.status_code == 200
    assert ready.status_code == 200 and ready.json()["roles"]["completion"]["state"] == "ready"


def test_events_are_stored_durably(keel_server: KeelProcess) -> None:
    with keel_server.client() as client:
        completion = client.post("/v1/completions", json=tabby_body(PYTHON_PREFIX)).json()
        event = {"type": "select", "completion_id": completion["id"], "choice_index": 0}
        response = client.post("/v1/events", params={"select_kind": "line"}, json=event)
        assert response.status_code == 200
    with sqlite3.connect(keel_server.root / "events.sqlite3") as db:
        rows = db.execute(
            "SELECT kind, select_kind FROM events WHERE completion_id = ?", (completion["id"],)
        ).fetchall()
    assert sorted(rows) == [("completion", None), ("select", "line")]
    stats = httpx.get(f"{keel_server.url}/v1/stats/completions", timeout=10).json()
    python = next(row for row in stats["data"] if row["language"] == "python")
    assert python["served"] >= 1 and python["selected"] >= 1
    assert python["provider"] == "local/SmolLM2-135M-Instruct"


def test_cancelled_stream_frees_the_worker(keel_server: KeelProcess) -> None:
    """A client that goes away mid-stream must not keep the worker generating."""
    body = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "stream": True}
    with keel_server.client() as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break
        # The engine's slots are freed by cancellation (test_engine.py times it); here the
        # server keeps serving after a client walked away mid-stream.
        quick = client.post("/v1/completions", json={"prompt": "x =", "max_tokens": 4}, timeout=10)
    assert quick.status_code == 200, quick.text


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        (b'{"language": "python"}', 400, "segments"),
        (b'{"language": "python", "segments": {"suffix": "x"}}', 400, "segments.prefix"),
        (b'{"language": "python", "segments": {"prefix": 42}}', 400, "segments.prefix"),
        (b'{"language": "py thon", "segments": {"prefix": "x = 1"}}', 400, "language"),
        (
            b'{"language": "python", "temperature": "hot", "segments": {"prefix": "x"}}',
            400,
            "temperature",
        ),
        (b'{"prompt": "x", "max_tokens": 100000000}', 400, "max_tokens"),
        (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"prompt": ["a", "b"]}', 400, "prompt"),
    ],
)
def test_bad_completion_input_is_a_clear_4xx(
    keel_server: KeelProcess, body: bytes, status: int, field: str | None
) -> None:
    response = httpx.post(
        f"{keel_server.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    if field is not None:
        assert field in error["message"], error


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),
        ("/v1/events", {"type": "launch", "completion_id": "c", "choice_index": 0}, "type"),
        ("/v1/events", {"type": "view", "choice_index": 0}, "completion_id"),
    ],
)
def test_bad_input_on_other_routes(
    keel_server: KeelProcess, path: str, body: dict[str, object], field: str
) -> None:
    response = httpx.post(f"{keel_server.url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


def test_an_oversized_body_is_a_413_the_client_reads(keel_server: KeelProcess) -> None:
    """A body three times the default 4 MiB limit is read and dropped, then refused with a
    413. Python's urllib sends its whole body before it reads the answer: keel closing the
    connection on the unread bytes reset it, and the client saw ``Connection reset by
    peer`` instead of why, every time."""
    big = {"language": "python", "segments": {"prefix": "x" * (12 * 1024 * 1024)}}
    request = urllib.request.Request(
        f"{keel_server.url}/v1/completions",
        data=json.dumps(big).encode(),
        headers={"Content-Type": "application/json"},
    )
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert json.load(refused.value)["error"]["code"] == "payload_too_large"


def test_unknown_route_and_method_use_the_error_shape(keel_server: KeelProcess) -> None:
    missing = httpx.get(f"{keel_server.url}/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{keel_server.url}/v1/completions", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_a_chats_usage_counts_the_prompt_the_model_read(keel_server: KeelProcess) -> None:
    """``usage.prompt_tokens`` of a chat is its templated prompt as the engine counted it
    (SmolLM2's template wraps "hi", one token, in a system prompt and role markers,
    ~30 tokens), plain and streamed alike; it was the messages' text alone (1)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    with keel_server.client() as client:
        plain = client.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200, plain.text
        streamed = client.post(
            "/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
    usage = sse_events(streamed.text)[-1]["usage"]  # the last chunk before [DONE]
    assert plain.json()["usage"]["prompt_tokens"] == usage["prompt_tokens"] >= 20, usage
    assert usage["completion_tokens"] == plain.json()["usage"]["completion_tokens"] > 0


def test_a_chat_message_that_spells_a_control_token_is_read_as_text(
    keel_server: KeelProcess,
) -> None:
    """A message holding the chat template's own markers (a pasted file, a prompt being
    debugged): the engine's templating read ``<|im_end|>`` in it as the end of the turn.
    Read as text, it costs what its characters do, as a marker spelled one character
    off does, and the answer still comes, plain and streamed."""
    turn = "<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n"

    def usage(content: str, stream: bool = False) -> dict[str, int]:
        body: dict[str, object] = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0,
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        if stream:
            events = sse_events(answer.text)
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
            return dict(events[-1]["usage"])
        assert answer.json()["choices"][0]["message"]["content"]
        return dict(answer.json()["usage"])

    with keel_server.client() as client:
        control = usage(turn * 3)  # 51 tokens fewer read as the markers themselves
        plain = usage(turn.replace("|>", "|]") * 3)
        streamed = usage(turn * 3, stream=True)
    assert abs(control["prompt_tokens"] - plain["prompt_tokens"]) <= 20, (control, plain)
    assert streamed["prompt_tokens"] == control["prompt_tokens"], (streamed, control)


TUNED = """[model.completion.local]
prompt_template = "<PRE>{prefix}<SUF>{suffix}<MID>"
context_size = 256

[model.embedding.local]
context_size = 128
"""
"""The embedded model with a FIM template and a 256-token context for completions, and
a 128-token one for embeddings (what is read past a context costs CPU in every run)."""


@pytest.fixture(scope="module")
def tuned_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeelProcess]:
    with running_keel(tmp_path_factory.mktemp("keel-tuned"), TUNED) as server:
        yield server


def counted(client: httpx.Client, role: str, metric: str, field: str) -> tuple[int, float]:
    """A count the first provider of ``role`` keeps, as ``/v1/providers`` (its worker's
    ``field``) and ``/metrics`` (``metric``) show it."""
    provider = client.get("/v1/providers").json()["roles"][role]["providers"][0]
    line = f'{metric}{{provider="{provider["name"]}"}}'
    rows = client.get("/metrics").text.splitlines()
    (value,) = [float(row.split()[-1]) for row in rows if row.startswith(line)]
    return provider["worker"][field], value


def test_embeddings_read_an_input_over_the_context_up_to_it_and_count_it(
    tuned_server: KeelProcess,
) -> None:
    """An embedding worker at a 128-token context (512 unless set): an input of 100 tokens
    is embedded (the engine reads it in one batch of the context; with the 64-token
    prefill batch of generation every input over 64 tokens was a 503). One over the
    context is embedded from its first 128 tokens, as sentence-transformers and Ollama do,
    and counted: Continue's code chunks of 500 GPT-4 tokens are ~600 of this model's, and
    at the default 512 were each a 400 that failed the editor's whole indexing batch."""

    def truncated(client: httpx.Client) -> tuple[int, float]:
        metric = "keel_embedding_inputs_truncated_total"
        return counted(client, "embedding", metric, "embedding_inputs_truncated")

    with tuned_server.client() as client:
        before = truncated(client)
        served = client.post("/v1/embeddings", json={"input": ["short", "word " * 100]})
        assert served.status_code == 200, served.text
        vectors = [item["embedding"] for item in served.json()["data"]]
        assert len(vectors) == 2 and vectors[0] != vectors[1]
        assert truncated(client) == before
        long = client.post("/v1/embeddings", json={"input": ["word " * 150, "word " * 200]})
        assert long.status_code == 200, long.text
        first, second = [item["embedding"] for item in long.json()["data"]]
        assert first == second, "both read as their first 128 tokens, the same words"
        assert first != vectors[1]
        # usage counts what was read (it said 150 and 200 tokens were)
        assert long.json()["usage"]["prompt_tokens"] == 2 * 128, long.json()["usage"]
        assert truncated(client) == (before[0] + 2, before[1] + 2)
        providers = client.get("/v1/providers").json()["roles"]["embedding"]["providers"]
    assert (providers[0]["breaker"], providers[0]["healthy"]) == ("closed", True), providers


def test_a_huge_input_costs_what_is_read_of_it_not_a_failure(tuned_server: KeelProcess) -> None:
    """A 3.9 MB input, within the body limit, is read as its first context's worth of
    tokens like any other over the context, and cut before it is tokenized: the whole of
    it was tokenized to find where to cut it, ~10 s of the worker's CPU a request, and
    past the engine call's 30 s limit on a loaded machine (67 s): a failure of the
    provider's and a retry, and five such opened its breaker (every user's embeddings a
    503)."""
    code = "def foo(x): return x + 1\n" * 156_000
    with tuned_server.client() as client:
        huge = client.post("/v1/embeddings", json={"input": [code, code[:5_000]]}, timeout=120)
        assert huge.status_code == 200, huge.text
        first, second = [item["embedding"] for item in huge.json()["data"]]
        providers = client.get("/v1/providers").json()["roles"]["embedding"]["providers"]
    assert first == second, "both read as their first 128 tokens"
    assert huge.json()["usage"]["prompt_tokens"] == 2 * 128, huge.json()["usage"]
    assert (providers[0]["retries"], providers[0]["last_error"]) == (0, None), providers[0]


def test_an_openai_completions_usage_counts_the_templated_prompt(
    tuned_server: KeelProcess,
) -> None:
    """With a FIM template, an OpenAI completion's suffix and the template's markers are
    part of the prompt the engine read, and of ``usage.prompt_tokens`` (it counted the
    prompt field alone)."""
    body = {"prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0}
    with tuned_server.client() as client:
        alone = client.post("/v1/completions", json=body).json()["usage"]
        suffix = "\n\nprint(add(1, 2))\n" * 4
        both = client.post("/v1/completions", json={**body, "suffix": suffix}).json()
        again = client.post("/v1/completions", json={**body, "suffix": suffix}).json()
    assert both["usage"]["prompt_tokens"] >= alone["prompt_tokens"] + 20, (alone, both)
    # the same prompt again: the engine's cache held it (it reads at least its last token)
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert again["usage"]["prompt_tokens"] - 2 <= cached < again["usage"]["prompt_tokens"], again


def test_an_answer_the_full_context_cut_short_ends_for_length(tuned_server: KeelProcess) -> None:
    """A prompt of ~235 tokens, no limit named (the local default of 32 tokens: one an
    OpenAI client names that does not fit is a 400), a 256-token context: the engine stops
    when the context is full, before the limit, and the answer says ``length``, plain and
    streamed (it said ``stop``: keel judged by the limit alone)."""
    body = {"prompt": "Once upon a time, " * 47, "temperature": 0}
    with tuned_server.client() as client:
        plain = client.post("/v1/completions", json=body)
        assert plain.status_code == 200, plain.text
        streamed = client.post("/v1/completions", json={**body, "stream": True})
    usage = plain.json()["usage"]
    assert usage["completion_tokens"] < 32 and usage["total_tokens"] >= 250, usage
    assert plain.json()["choices"][0]["finish_reason"] == "length"
    assert sse_events(streamed.text)[-1]["choices"][0]["finish_reason"] == "length"


def test_llamacpps_n_predict_past_the_context_left_ends_where_the_context_does(
    tuned_server: KeelProcess,
) -> None:
    """llama-server generates until its context is full whatever ``n_predict`` asked for;
    keel's ``/completion`` does the same (an OpenAI ``max_tokens`` that does not fit is a
    400, and ``/completion`` is served as an OpenAI completion: it was a 400 too)."""
    body = {"prompt": "Once upon a time, " * 47, "n_predict": 200, "temperature": 0}
    with tuned_server.client() as client:
        answer = client.post("/completion", json=body)
    assert answer.status_code == 200, answer.text
    assert 0 < answer.json()["tokens_predicted"] < 200, answer.json()


async def test_a_batch_is_embedded_in_parts_in_order() -> None:
    """A local model embeds a batch in parts of at most ``embed_part_tokens`` (counted),
    one engine call each, in order: the router's deadline then covers one part, not the
    batch (a 24-chunk batch took ~44 s on 2 cores, past the role's 30 s), and a client
    that leaves costs the part in flight. The vectors are those of one call."""
    spec = WorkerSpec(str(embedded_model_path()), context_size=512, embedding=True, slots=1)
    provider = LocalProvider(
        WorkerSupervisor(spec, name="embed"),
        name="embed",
        model="m",
        ready_timeout=60,
        embed_part_tokens=40,
    )
    texts = [f"def add_{n}(value):\n    return value + {n}\n" for n in range(5)]  # 13 estimated
    digits = [", ".join(str(n + i) for i in range(12)) for n in range(2)]  # 14 estimated
    await provider.start()
    try:
        parts = [part async for part in provider.embed_parts(texts)]
        whole = await provider.embed(texts)
        sizes = await provider.count_tokens(texts)
        counted = await provider.count_tokens(digits)
        digit_parts = [part async for part in provider.embed_parts(digits)]
    finally:
        await provider.aclose()
    # 17-20 tokens each: 2 a part (3 by the estimate; all 5 in one call)
    assert [len(part) for part in parts] == [2, 2, 1], sizes
    assert all(count > 20 for count in counted), counted  # estimated 14: 2 a part
    assert [len(part) for part in digit_parts] == [1, 1], "the tokenizer's counts"
    vectors = [vector for part in parts for vector in part]
    for got, expected in zip(vectors, whole, strict=True):
        assert got == pytest.approx(expected, abs=1e-4)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-4)


async def test_an_embedding_its_caller_gave_up_on_stops_after_the_input_in_flight() -> None:
    """A caller that gives up on a part (the router's deadline, a client leaving)
    cancels it in the worker, which stops between inputs. It ran on whole: a part
    that missed its deadline was tried again on the same worker beside its first copy,
    and the worker stayed busy minutes after the client left. Here a batch of ~40 s
    is given up after 0.5 s, and the next call is answered at once, not behind it."""
    spec = WorkerSpec(str(embedded_model_path()), context_size=512, embedding=True, slots=1)
    provider = LocalProvider(
        WorkerSupervisor(spec, name="embed"), name="embed", model="m", ready_timeout=60
    )
    texts = [f"def scale_{n}(value):\n    return value * {n}\n" for n in range(640)]
    await provider.start()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(provider.embed(texts), 0.5)
        after = await asyncio.wait_for(provider.embed(texts[:1]), 15)
    finally:
        await provider.aclose()
    assert len(after) == 1 and len(after[0]) > 0


def test_a_chat_asked_for_json_to_a_schema_answers_in_it(keel_server: KeelProcess) -> None:
    """``response_format`` reaches the engine, which samples only JSON the schema allows
    (it was dropped: the model answered in prose); a schema it cannot compile is the
    caller's 400, never a provider failure, however often."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {
        "messages": [{"role": "user", "content": "Is the sky blue?"}],
        "max_tokens": 40,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    with keel_server.client() as client:
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert isinstance(json.loads(answer.json()["choices"][0]["message"]["content"])["ok"], bool)
        broken = {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}
        for _ in range(6):  # more than the breaker's default threshold (5)
            refused = client.post("/v1/chat/completions", json={**body, "response_format": broken})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert "nonsense" in error["message"] and "template" not in error["message"]
            # the schema's fault, named (it was upstream_rejected_request, no param)
            assert (error["param"], error["code"]) == (SCHEMA, "invalid_schema"), error
        provider = client.get("/v1/providers").json()["roles"]["chat"]["providers"][0]
    assert (provider["breaker"], provider["healthy"]) == ("closed", True), provider


SCHEMA = "response_format.json_schema.schema"


def asking_n(node: dict[str, object], *, max_tokens: int) -> dict[str, object]:
    """A chat asking for an object whose ``n`` is ``node``, to a strict schema."""
    schema = {"type": "object", "properties": {"n": node}, "required": ["n"]}
    return {
        "messages": [{"role": "user", "content": "Give n"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": schema, "strict": True},
        },
    }


@pytest.mark.parametrize(
    ("node", "where"),
    [
        ({"type": "integer", "multipleOf": 7}, "multipleOf"),
        ({"type": "string", "pattern": "[0-9]{5}"}, "pattern"),
        ({"type": "string", "pattern": r"^\S+@\S+$"}, "pattern"),  # no rule for \S
        # a backslash matched: the engine wrote it raw, no JSON, a 503 counted against it
        ({"type": "string", "pattern": r"^\\d$"}, "pattern"),
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "number", "exclusiveMinimum": 1000}, "exclusiveMinimum"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ],
)
def test_a_strict_schema_the_engine_cannot_hold_is_refused_naming_the_keyword(
    keel_server: KeelProcess, node: dict[str, object], where: str
) -> None:
    """The engine's grammar drops what it has no rule for, mostly without a word: each of
    these was a 200 breaking the schema (``multipleOf: 7`` answered 1, ``uniqueItems``
    [1, 1, 1], a pattern not anchored any string). Strict, the client asked for an answer
    that follows the schema: a 400 naming the keyword. Not strict: served, as OpenAI does."""
    body = asking_n(node, max_tokens=6)
    with keel_server.client() as client:
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == f"{SCHEMA}.properties.n.{where}", error
        assert error["code"] == "unsupported_for_model" and "strict false" in error["message"]
        body["response_format"]["json_schema"]["strict"] = False  # type: ignore[index]
        served = client.post("/v1/chat/completions", json=body)
    assert served.status_code == 200, served.text


def test_a_patterns_digit_and_word_escapes_are_held(keel_server: KeelProcess) -> None:
    """``\\d`` and ``\\w`` (pydantic users' usual way to write a pattern) are spelled as
    classes for the engine, whose grammar has no rule for them: it accepted any string
    (``",<zx1200>,"`` for a zip code), with a warning only in its log, and a strict
    schema was a 200 breaking it."""
    body = asking_n({"type": "string", "pattern": r"^\d{3}-[\w]{2}$"}, max_tokens=24)
    with keel_server.client() as client:
        answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    content = answer.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r"[0-9]{3}-[0-9A-Za-z_]{2}", json.loads(content)["n"]), content


def test_usage_counts_the_tokens_the_engine_generated(keel_server: KeelProcess) -> None:
    """An answer cut at its limit used all of it: ``usage.completion_tokens`` is what
    the engine generated (JSON sampled to a grammar does not retokenize to the same
    count: keel reported 13 of 16)."""
    body = {
        "messages": [{"role": "user", "content": "Give a JSON object with a name"}],
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    with keel_server.client() as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    finish, used = answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]
    assert (finish, used) == ("length", 16) or (finish == "stop" and used < 16), answer


def test_an_answer_ended_at_a_stop_word_counts_every_token_made(
    keel_server: KeelProcess,
) -> None:
    """An emoji is three of SmolLM2's tokens, and a token holding part of a character
    sends no chunk: an answer keel ended at a stop word (the engine's last chunk, with
    its count, never comes) was counted a token per chunk, 4 for 12, streamed or not."""
    body = {"prompt": "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇🥰😍🤩", "max_tokens": 12, "temperature": 0}
    with keel_server.client() as client:
        whole = client.post("/v1/completions", json=body).json()
        text, made = whole["choices"][0]["text"], whole["usage"]["completion_tokens"]
        assert len(text) >= 2 and made == 12, whole
        stop = text[-1]
        cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
        streamed = client.post(
            "/v1/completions",
            json={
                **body,
                "stop": [stop],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    kept = cut["choices"][0]["text"]
    assert kept == text[: text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    counted = cut["usage"]["completion_tokens"]
    assert len(kept) + 1 < counted <= made, cut
    assert sse_events(streamed.text)[-1]["usage"]["completion_tokens"] == counted


def generated_tokens(client: httpx.Client) -> float:
    rows = client.get("/metrics").text.splitlines()
    prefix = 'keel_generated_tokens_total{provider="local/'
    return sum(float(row.split()[-1]) for row in rows if row.startswith(prefix))


@pytest.mark.parametrize("stream", [False, True])
def test_the_token_metrics_count_every_token_generated(
    keel_server: KeelProcess, stream: bool
) -> None:
    """The worker sends the tokens made within 20 ms of each other as one piece: each
    piece was counted one token (a 30-token answer added 11, streamed 9), and the
    tokens-per-second histogram read a third of the engine's speed. (One more may be a
    background probe's token.)"""
    body = {"prompt": "def fibonacci(n):\n", "max_tokens": 30, "temperature": 0}
    with keel_server.client() as client:
        before = generated_tokens(client)
        usage = {"stream_options": {"include_usage": True}} if stream else {}
        answer = client.post("/v1/completions", json={**body, "stream": stream, **usage})
        after = generated_tokens(client)
    used = (sse_events(answer.text)[-1] if stream else answer.json())["usage"]
    assert used["completion_tokens"] <= after - before <= used["completion_tokens"] + 1, used


def test_a_chat_with_tools_is_answered_in_text_and_counted(keel_server: KeelProcess) -> None:
    """A local model is not asked to call tools: the answer is text, as from a model
    without tools, and the request is counted where an operator looks."""
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {}}}

    def answered_in_text(client: httpx.Client) -> tuple[int, float]:
        metric = "keel_tools_answered_in_text_total"
        return counted(client, "chat", metric, "tools_answered_in_text")

    with keel_server.client() as client:
        before = answered_in_text(client)
        body = {
            "messages": [{"role": "user", "content": "Read main.py"}],
            "max_tokens": 4,
            "tools": [tool],
        }
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["message"]["content"] and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] in ("stop", "length")
        assert answered_in_text(client) == (before[0] + 1, before[1] + 1)
        # A call made compulsory cannot be answered in text (an agent forcing one read
        # prose as if no tool were needed): the caller's 400, no provider's failure.
        named = {"type": "function", "function": {"name": "read_file"}}
        for choice in ("required", named):
            forced = client.post("/v1/chat/completions", json={**body, "tool_choice": choice})
            assert forced.status_code == 400, forced.text
            assert "tool_choice" in forced.json()["error"]["message"]
        assert answered_in_text(client) == (before[0] + 1, before[1] + 1)
        providers = client.get("/v1/providers").json()["roles"]["chat"]["providers"]
    assert all(p["healthy"] and p["breaker"] == "closed" for p in providers), providers


def test_the_embedding_engine_yields_the_cpu_to_generation(keel_server: KeelProcess) -> None:
    """Every thread of the embedding worker, and its session's autogroup where Linux has
    one, runs at a lower priority than the completion worker's (two engines at one
    priority stalled each other: completions took seconds while a batch was embedded)."""

    with keel_server.client() as client:
        providers = client.get("/v1/providers").json()["roles"]
    engines = {role: providers[role]["providers"][0]["worker"]["engine"] for role in providers}
    keel = os.nice(0)  # keel's, the tests' own
    lower = min(19, keel + EMBEDDING_NICE)
    assert (engines["completion"]["nice"], engines["embedding"]["nice"]) == (keel, lower)
    # a part of a batch waits while a generation has the CPU: the embedding deadlines allow it
    waits = providers["embedding"]["providers"][0]["timeouts"]
    assert waits == {"first_token": 60.0, "between_tokens": 60.0}
    embedding = niceness(keel_server.worker_pid("embedding"))
    completion = niceness(keel_server.worker_pid("completion"))
    assert embedding[0] == {lower} and completion[0] == {keel}, (embedding, completion)
    if embedding[1] is not None:
        assert (embedding[1], completion[1]) == (lower, keel)


def test_each_engine_is_given_what_the_models_header_says(keel_server: KeelProcess) -> None:
    """keel reads the model's header once and gives each worker what it needs of it: the
    generating engine the prompt cache keel's memory estimate counts (a worker without
    one grew to ~1 GB), and the model's name and architecture shown beside the engine."""
    with keel_server.client() as client:
        providers = client.get("/v1/providers").json()["roles"]
    engines = {role: providers[role]["providers"][0]["worker"]["engine"] for role in providers}
    header = gguf.read_metadata(embedded_model_path())
    context = engines["completion"]["n_ctx"]
    weights = gguf.weights_bytes(embedded_model_path())
    expected = gguf.prompt_cache_bytes(gguf.context_kv_bytes(header, context, weights)) >> 20
    assert expected > 1 and engines["completion"]["prompt_cache_mib"] == expected, engines
    assert engines["embedding"]["prompt_cache_mib"] == 0, "an embedding reuses no prompt"
    for engine in engines.values():
        assert (engine["name"], engine["architecture"]) == (header["general.name"], "llama")


def test_a_local_model_refuses_an_image_as_the_clients_error(keel_server: KeelProcess) -> None:
    """It reads text only: answering without the image would be answering another
    question. The refusal is the client's 400, never a provider failure."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "What is this?"}, image]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
    with keel_server.client() as client:
        for _ in range(6):  # more than the breaker's default threshold (5)
            refused = client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 400, refused.text
            assert "reads text only" in refused.json()["error"]["message"]
        provider = client.get("/v1/providers").json()["roles"]["chat"]["providers"][0]
    assert (provider["breaker"], provider["healthy"]) == ("closed", True), provider


def test_the_model_list_gives_a_local_models_context(keel_server: KeelProcess) -> None:
    """Under the names clients read (llama.vscode's agent ``context_length``, Continue's
    autodetect vLLM's ``max_model_len``): without them they sized requests for 8,192
    tokens against the embedded model's 2,048, and long conversations were 400s. The
    largest context a role runs the model with: the embedding worker's is 512."""
    with keel_server.client() as client:
        (card,) = client.get("/v1/models").json()["data"]
        one = client.get(f"/v1/models/{card['id']}").json()
    assert card["context_length"] == card["max_model_len"] == 2048, card
    assert one == card


async def test_token_counts_of_many_texts_and_of_requests_trimming_each_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counts taken from each request's own answers: another request trimming the shared
    counts while one awaited the worker evicted texts it had found there (a KeyError, a
    500). 600 new texts go in batches of ``TOKENIZE_BATCH`` (15,000 in one call kept the
    liveness ping waiting, and the worker was killed as frozen). The texts kept are
    bounded by their size too: by count alone, a client's megabytes of snippets were
    kept 20,000 texts deep (here, 1 MB of them at most, of 2.4 MB counted)."""
    monkeypatch.setattr(local, "TOKEN_COUNTS_KEPT", 50)
    monkeypatch.setattr(local, "TOKEN_COUNT_CHARS", 2**20)
    spec = WorkerSpec(str(embedded_model_path()), context_size=512, slots=1)
    provider = LocalProvider(
        WorkerSupervisor(spec, name="count"), name="c", model="m", ready_timeout=60
    )
    await provider.start()
    try:
        first = [f"x{n} = f()\n" for n in range(40)]
        await provider.count_tokens(first)  # cached, then trimmed by the others below
        many = [f"value_{n} = {n}\n" for n in range(600)]
        results = await asyncio.gather(
            *(provider.count_tokens(first + many[i::3]) for i in range(3))
        )
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(8):  # each text made here and dropped: only the counts keep it
                assert (await provider.count_tokens([f"# {n}\n" + "y = 1\n" * 50_000]))[0] > 0
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    finally:
        await provider.aclose()
    assert held < 2 * 2**20, f"{held / 2**20:.1f} MiB held after 2.4 MB of texts"
    for i, counts in enumerate(results):
        assert counts[:40] == results[0][:40] and all(c > 0 for c in counts)
        assert len(counts) == 40 + len(many[i::3])
