"""Fixtures for the provider tests: the fake upstream and a provider factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from keel.config import KINDS_BY_ROLE, HttpModelConfig, Role
from keel.providers.base import Provider
from keel.providers.http import build_http_provider
from tests.fakes.fixtures import dead_url, upstream  # noqa: F401
from tests.fakes.upstreams import FakeUpstream

VERSIONED = {
    "openai/completion",
    "openai/legacy_completion_no_fim",
    "vllm/completion",
    "openai/chat",
    "mistral/chat",
    "openai/embedding",
    "voyage/embedding",
    "mistral/embedding",
}
"""Kinds whose ``api_endpoint`` includes ``/v1`` (Tabby's convention)."""


def role_of(kind: str) -> Role:
    return next(role for role, kinds in KINDS_BY_ROLE.items() if kind in kinds)


MakeProvider = Callable[..., Any]


@pytest.fixture
async def make_provider(upstream: FakeUpstream) -> AsyncIterator[MakeProvider]:  # noqa: F811
    """Build a provider of ``kind`` pointed at the fake upstream; closed after the test."""
    made: list[Provider] = []

    def make(kind: str, *, endpoint: str | None = None, timeout: float = 2.0, **fields: Any) -> Any:
        if endpoint is None:
            endpoint = upstream.url + ("/v1" if kind in VERSIONED else "")
        fields.setdefault("api_key", "sk-test")
        if kind.startswith("ollama/"):
            fields.setdefault("model_name", "qwen2.5-coder:1.5b")
        elif kind.startswith("azure/"):
            fields.setdefault("model_name", "deployment")  # Azure's is in its URL
        config = HttpModelConfig(kind=kind, api_endpoint=endpoint, **fields)
        provider = build_http_provider(role_of(kind), config, name=f"test-{kind}", timeout=timeout)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()
