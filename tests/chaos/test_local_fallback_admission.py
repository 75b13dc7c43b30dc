"""A role served by a model server admits 1,024 requests at once (the server queues and
batches them itself); when it falls back to the local engine, the requests that go there
are held to a local role's limit (8 at once, the role's queue, then a 429), not sent to a
two-slot CPU engine all at once (250 of them ran there together: p50 25 s, 99 answered
504 after 30 s, and no queue metric moved)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from keel.config import LOCAL_CONCURRENCY
from tests.chaos.conftest import Keel, routing_table
from tests.ports import free_port

LOCAL = "local/SmolLM2-135M-Instruct"
BURST = 30
QUEUE = 4


async def burst(url: str, n: int) -> list[httpx.Response]:
    body = {"prompt": "chaos def add(a, b):", "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(n)))


def test_a_burst_falling_back_to_the_local_engine_is_admitted_as_a_local_role_would(
    keel_factory: Callable[..., Keel],
) -> None:
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: every try fails at once
    keel = keel_factory(
        routing_table(probe_interval_seconds=600)
        + f"[model.completion]\nqueue_size = {QUEUE}\nqueue_timeout = 60\n"
        + f'[model.completion.http]\nkind = "openai/completion"\napi_endpoint = "{refused}"\n'
    )
    keel.wait_for("the engine loaded", lambda: keel.endpoint("completion", LOCAL)["usable"], 60)
    assert keel.providers()["roles"]["completion"]["admission"]["max_concurrent"] == 1024

    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=keel.url, timeout=10) as client:
            while not done.is_set():
                admission = client.get("/v1/providers").json()["roles"]["completion"]["admission"]
                seen.append(admission)
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        responses = asyncio.run(burst(keel.url, BURST))
    finally:
        done.set()
        watcher.join(10)

    statuses = sorted(r.status_code for r in responses)
    served = [r for r in responses if r.status_code == 200]
    refusals = [r for r in responses if r.status_code == 429]
    assert len(served) + len(refusals) == BURST, statuses
    assert all(r.headers["x-keel-provider"] == LOCAL for r in served), statuses
    # LOCAL_CONCURRENCY at the engine, QUEUE waiting: the rest refused at once
    assert len(served) >= LOCAL_CONCURRENCY + QUEUE and refusals, statuses
    error = refusals[0].json()["error"]
    assert f"completion on {LOCAL}: queue full" in error["message"], error
    assert float(refusals[0].headers["retry-after"]) >= 1

    gates = [a["gates"][LOCAL] for a in seen if "gates" in a]
    assert gates and max(g["active"] for g in gates) <= LOCAL_CONCURRENCY, gates
    assert max(g["waiting"] for g in gates) <= QUEUE
    final = keel.providers()["roles"]["completion"]["admission"]
    assert final["gates"][LOCAL]["rejected"] == len(refusals), final
    assert final["gates"][LOCAL]["queued"] >= QUEUE, final
    metrics = keel.http.get("/metrics").text
    assert f'keel_rejections_total{{reason="queue_full",role="completion"}} {len(refusals)}.0' in (
        metrics
    ), [line for line in metrics.splitlines() if "rejections" in line]
    # keel's refusal is no failure of the engine's
    local = keel.endpoint("completion", LOCAL)
    assert local["breaker"] == "closed" and local["healthy"], local


def test_a_fallback_that_cannot_serve_the_request_leaves_the_primarys_failure_said(
    keel_factory: Callable[..., Keel],
) -> None:
    """A chat asking for web search, its openai/chat backend down: the local model it fell
    back to cannot search, and its 400 (leave web_search_options out) was the answer,
    which an SDK does not retry and which hid the backend's failure."""
    refused = f"http://127.0.0.1:{free_port()}/v1"
    keel = keel_factory(
        routing_table(probe_interval_seconds=600)
        + "[model.chat]\nembedded_last_resort = true\n"
        + f'[model.chat.http]\nkind = "openai/chat"\napi_endpoint = "{refused}"\n'
        + 'model_name = "m"\n',
    )
    keel.wait_for("the engine loaded", lambda: keel.endpoint("chat", LOCAL)["usable"], 60)
    body = {"messages": [{"role": "user", "content": "hi"}], "web_search_options": {}}
    with httpx.Client(base_url=keel.url, timeout=60) as client:
        answer = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
    assert answer.status_code >= 500, answer.text
    said = answer.json()["error"]["message"]
    assert "chat/openai/chat" in said and "does not search the web" in said, said
