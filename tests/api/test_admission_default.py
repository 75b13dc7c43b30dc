"""What keel sends a model server at once is not held back by default: a role served
by one (here chat, an ``openai/chat`` backend) takes hundreds of requests at a time
(``max_concurrent`` 1024), as the server queues and batches them itself. The old
default, 8 for every role, queued the rest: a team's completions waited in keel and
were served smaller while vLLM sat idle. A role served by a local model keeps 8."""

from __future__ import annotations

import asyncio

import httpx
from tests.api.conftest import ADMIN, USER, Backends
from tests.api.test_tools import ASK

from keel.config import LOCAL_CONCURRENCY, SERVER_CONCURRENCY, LocalModelConfig, RoleConfig

AT_ONCE = 24


async def test_a_model_server_is_sent_every_request_at_once(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    backend = backends.fallback  # chat's
    before = len(backend.requests)
    backend.hold()
    try:
        asks = [
            asyncio.create_task(
                client.post("/v1/chat/completions", json={"messages": ASK}, headers=USER)
            )
            for _ in range(AT_ONCE)
        ]
        await backend.wait_for(lambda: len(backend.requests) - before >= AT_ONCE, within=10)
    finally:
        backend.release()
    assert [answer.status_code for answer in await asyncio.gather(*asks)] == [200] * AT_ONCE
    providers = (await client.get("/v1/providers", headers=ADMIN)).json()
    admission = providers["roles"]["chat"]["admission"]
    assert admission["max_concurrent"] == SERVER_CONCURRENCY
    assert admission["queued"] == 0


def test_a_local_model_keeps_its_cap_and_a_set_cap_holds() -> None:
    assert RoleConfig().concurrency() == LOCAL_CONCURRENCY  # the embedded model
    assert RoleConfig(local=LocalModelConfig(model_id="x")).concurrency() == LOCAL_CONCURRENCY
    assert RoleConfig(max_concurrent=3).concurrency() == 3
