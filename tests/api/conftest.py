"""An in-process keel with keys, served by fake model backends on loopback.

No local model runs here: completion, chat and embedding all go to
:class:`FakeUpstream` servers, so a request costs milliseconds and the
fuzzers can send hundreds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from tests.fakes.upstreams import FakeUpstream
from tests.models.fake_hub import FakeHub

from keel.app import create_app
from keel.config import Paths, parse_settings
from keel.models.registry import embedded_model_path
from keel.ops.server import Server

USER_KEY = "api-test-user-key-0123456789"
ADMIN_KEY = "api-test-admin-key-0123456789"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"x-admin-key": ADMIN_KEY}


@pytest.fixture(autouse=True, scope="session")
def loopback_hub() -> Iterator[None]:
    """Model pulls go to an empty hub on loopback (every repo a 404), never to
    huggingface.co: the fuzzers send POST /v1/model/download bodies too."""
    with FakeHub({}) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        yield


def keel_config(
    primary: str, fallback: str, *, local_embedding: str | None = None, keys: bool = True
) -> str:
    """Completion from two replicas (``primary``, ``fallback``) and a fallback; chat and
    embedding from ``fallback`` (embedding from the local model file ``local_embedding``
    if given); keys configured (none with ``keys=False``)."""
    embedding = (
        f'[model.embedding.local]\nmodel_id = "{local_embedding}"\n'
        if local_embedding
        else f"""[model.embedding.http]
kind = "openai/embedding"
api_endpoint = "{fallback}/v1"
model_name = "fallback-embed"
"""
    )
    auth = f'[auth]\napi_keys = ["{USER_KEY}"]\nadmin_key = "{ADMIN_KEY}"\n'
    return f"""
[server]
completion_timeout = 10

[routing]
probe_interval_seconds = 60

{auth if keys else ""}
[model.completion]
embedded_last_resort = false

[model.completion.http]
kind = "openai/completion"
api_endpoints = ["{primary}/v1", "{fallback}/v1"]
model_name = "primary-coder"

[[model.completion.fallback]]
kind = "openai/completion"
api_endpoint = "{fallback}/v1"
model_name = "fallback-coder"

[model.chat.http]
kind = "openai/chat"
api_endpoint = "{fallback}/v1"
model_name = "fallback-chat"

{embedding}"""


def model_file(root: Path, name: str) -> None:
    """The embedded model's file as ``<name>.gguf`` in ``root``'s model directory (a link)."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{name}.gguf").symlink_to(embedded_model_path())


def build_app(root: Path, config: str, host: str | None = None) -> FastAPI:
    """The app for ``config``, written to ``root``/config.toml so a reload reads it again;
    ``host``: the address it says it listens on."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.toml"
    path.write_text(config)
    settings = parse_settings(tomllib.loads(config), str(path))
    return create_app(settings, Paths(root), config_path=path, host=host)


@dataclass
class Backends:
    primary: FakeUpstream
    fallback: FakeUpstream

    def config(self, *, local_embedding: str | None = None, keys: bool = True) -> str:
        return keel_config(
            self.primary.url, self.fallback.url, local_embedding=local_embedding, keys=keys
        )


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    with FakeUpstream() as primary, FakeUpstream(embedding_dim=4) as fallback:
        yield Backends(primary, fallback)
    assert not primary.errors and not fallback.errors, (primary.errors, fallback.errors)


@pytest.fixture
def app(backends: Backends, tmp_path: Path) -> FastAPI:
    return build_app(tmp_path / "keel", backends.config())


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` running (its lifespan started), sending no key by default."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield http


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the running app (its lifespan started), sending no key by default."""
    async with serving(app) as http:
        yield http


@contextlib.asynccontextmanager
async def listening(app: FastAPI) -> AsyncIterator[str]:
    """``app`` served by keel's server on a loopback port: its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = Server(config)
    running = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn's flag; it offers no event
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await running
