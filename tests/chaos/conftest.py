"""The chaos suite's world: a real keel process routing to fault-injecting fakes.

Every role gets the same chain: a primary fake backend and a fallback fake
backend, each a real HTTP server on 127.0.0.1. They answer differently (their
text and their embedding width), so every response says which one served it.
Requests sent by the tests carry the word ``chaos``; the health prober's do
not, which keeps live traffic and probes apart when counting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KeelProcess, start_keel
from tests.fakes.upstreams import FakeUpstream

PRIMARY_TOKENS = ("primary", "_answer", "_text")
FALLBACK_TOKENS = ("fallback", "_answer", "_text")
PRIMARY_TEXT = "".join(PRIMARY_TOKENS)
FALLBACK_TEXT = "".join(FALLBACK_TOKENS)
PRIMARY_DIM, FALLBACK_DIM = 3, 4

KINDS = {"completion": "openai/completion", "chat": "openai/chat", "embedding": "openai/embedding"}
ROLES = tuple(KINDS)


def primary_name(role: str) -> str:
    return f"{role}/{KINDS[role]}"


def fallback_name(role: str) -> str:
    return f"{role}/{KINDS[role]}#1"


def live(server: FakeUpstream, path_end: str = "") -> int:
    """Requests the tests sent (not the prober's) that reached ``server``."""
    return sum(
        1
        for r in server.requests
        if r.method == "POST" and b"chaos" in r.body and r.path.endswith(path_end)
    )


def posts(server: FakeUpstream, path_end: str = "") -> int:
    """Every POST that reached ``server``, probes included."""
    return sum(1 for r in server.requests if r.method == "POST" and r.path.endswith(path_end))


ROLE_PATHS = {
    "completion": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embedding": "/v1/embeddings",
}


def role_live(server: FakeUpstream, role: str) -> int:
    return live(server, ROLE_PATHS[role])


def routing_table(**routing: object) -> str:
    defaults: dict[str, object] = {
        "breaker_consecutive_failures": 3,
        "breaker_cooldown_seconds": 2.0,
        "retry_attempts_per_provider": 2,
        "probe_interval_seconds": 0.3,
        "probe_timeout_seconds": 0.5,
    }
    defaults.update(routing)
    return "[routing]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in defaults.items())


def provider_table(url: str, role: str, extra: dict[str, object]) -> str:
    lines = [f'kind = "{KINDS[role]}"', f'api_endpoint = "{url}/v1"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def chain_config(
    primary: str,
    fallback: str | None,
    *,
    routing: dict[str, object] | None = None,
    role_settings: dict[str, object] | None = None,
    primary_extra: dict[str, object] | None = None,
) -> str:
    """Every role: ``primary`` then ``fallback`` (both fake backends), no embedded model.

    The primary's first-token limit is 5 s, which an answer of the fakes never misses on
    a loaded machine; a test of a hang or a slow first token sets its own. At 0.5 s, an
    answer late on a loaded machine went to the fallback: a 422 meant for the client came
    back a 200 once in a fresh clone, and tests set 5 s one by one."""
    extra = {"first_token_timeout": 5, **(primary_extra or {})}
    parts = ["[server]\ncompletion_timeout = 10\n", routing_table(**(routing or {}))]
    for role in ROLES:
        settings = {"embedded_last_resort": False, **(role_settings or {})}
        parts.append(
            f"[model.{role}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        )
        parts.append(f"[model.{role}.http]\n" + provider_table(primary, role, extra))
        if fallback is not None:
            parts.append(f"[[model.{role}.fallback]]\n" + provider_table(fallback, role, {}))
    return "\n".join(parts)


@dataclass
class Streamed:
    status: int
    text: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    body: str = ""


class Keel:
    """A running keel and the client calls the chaos tests make."""

    def __init__(self, process: KeelProcess) -> None:
        self.process = process
        self.http = httpx.Client(base_url=process.url, timeout=30)

    @property
    def url(self) -> str:
        return self.process.url

    def log(self) -> str:
        return self.process.log.read_text()[-4000:]

    def tabby(
        self,
        *,
        filepath: str | None = "chaos.py",
        prefix: str = "chaos = ",
        suffix: str = "\n",
        **headers: str,
    ) -> httpx.Response:
        segments = {"prefix": prefix, "suffix": suffix}
        if filepath is not None:  # tabby-agent 1.5 sends none
            segments["filepath"] = filepath
        body = {"language": "python", "segments": segments}
        return self.http.post("/v1/completions", json=body, headers=headers)

    def completion(self, *, max_tokens: int = 16) -> httpx.Response:
        body = {"prompt": "chaos = ", "max_tokens": max_tokens, "temperature": 0}
        return self.http.post("/v1/completions", json=body)

    def chat(self) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": "chaos"}], "max_tokens": 16}
        return self.http.post("/v1/chat/completions", json=body)

    def embed(self) -> httpx.Response:
        return self.http.post("/v1/embeddings", json={"input": ["chaos"]})

    def stream(self, path: str, body: dict[str, Any]) -> Streamed:
        with self.http.stream("POST", path, json={**body, "stream": True}) as response:
            result = Streamed(response.status_code)
            if response.status_code != 200:
                result.body = response.read().decode()
                return result
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    result.done = True
                    continue
                assert not result.done, "nothing may follow [DONE]"
                event = json.loads(data)
                if "error" in event:
                    result.errors.append(event["error"])
                    continue
                assert not result.errors, "no text after an error event"
                choice = event["choices"][0]
                result.text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        return result

    def stream_completion(self) -> Streamed:
        return self.stream("/v1/completions", {"prompt": "chaos = ", "max_tokens": 16})

    def stream_chat(self) -> Streamed:
        messages = [{"role": "user", "content": "chaos"}]
        return self.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 16})

    def providers(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get("/v1/providers").json()
        return data

    def endpoint(self, role: str, name: str) -> dict[str, Any]:
        for entry in self.providers()["roles"][role]["providers"]:
            if entry["name"] == name:
                return dict(entry)
        raise AssertionError(f"no provider {name} in role {role}")

    def wait_for(self, what: str, predicate: Callable[[], bool], within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {within}s\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.http.close()
        self.process.stop()


@pytest.fixture
def backends() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """(primary, fallback), answering distinguishably."""
    primary = FakeUpstream(tokens=PRIMARY_TOKENS, embedding_dim=PRIMARY_DIM).start()
    fallback = FakeUpstream(tokens=FALLBACK_TOKENS, embedding_dim=FALLBACK_DIM).start()
    yield primary, fallback
    primary.stop()
    fallback.stop()
    assert not primary.errors and not fallback.errors


@pytest.fixture
def keel_factory(tmp_path: Path) -> Iterator[Callable[..., Keel]]:
    """Start keel with a config text, ready (or, ``ready=False``, serving: with every
    backend down it is never ready); stopped after the test."""
    started: list[Keel] = []

    def start(config: str, *, ready: bool = True) -> Keel:
        keel = Keel(start_keel(tmp_path / f"root{len(started)}", config))
        started.append(keel)
        keel.process.wait_ready(60, "/ready" if ready else "/health")
        return keel

    yield start
    for keel in started:
        keel.stop()
