"""A local model of more slots than a local role's default 8 runs as many requests as it
has slots: held to 8 at once, an engine of ``parallelism = 12`` (its KV cache reserved
for 12) ran 8 requests and kept 4 waiting, even with ``max_concurrent = 12``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_keel
from tests.ports import free_port

pytestmark = pytest.mark.integration

LOCAL = "local/SmolLM2-135M-Instruct"
SLOTS = 12
BODY = {"prompt": "def add(a, b):", "max_tokens": 2, "temperature": 0}


def admission(url: str) -> dict[str, Any]:
    roles = httpx.get(f"{url}/v1/providers", timeout=10).json()["roles"]
    found: dict[str, Any] = roles["completion"]["admission"]
    return found


def test_a_local_primary_admits_as_many_as_its_slots(tmp_path: Path) -> None:
    config = (
        f"[model.completion]\nmax_concurrent = {SLOTS}\n"
        f"[model.completion.local]\nparallelism = {SLOTS}\ncontext_size = 256\n"
    )
    with running_keel(tmp_path, config) as server:
        served = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60)
        assert served.status_code == 200, served.text
        limits = admission(server.url)
        assert limits["max_concurrent"] == SLOTS
        assert not limits.get("gates"), limits  # no narrower limit at its own engine


def test_a_fallback_to_a_local_model_is_held_to_its_slots(tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the primary fails
    config = (
        f'[model.completion.http]\nkind = "openai/completion"\napi_endpoint = "{refused}"\n'
        "[[model.completion.fallback]]\n"
        f'model_id = "SmolLM2-135M-Instruct"\nparallelism = {SLOTS}\ncontext_size = 256\n'
    )
    with running_keel(tmp_path, config) as server:
        served = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=60)
        assert served.status_code == 200, served.text
        assert served.headers["x-keel-provider"].startswith(LOCAL), served.headers
        gates = admission(server.url)["gates"]
        assert [gate["max_concurrent"] for gate in gates.values()] == [SLOTS], gates
