"""llama.cpp's ``n_predict`` on OpenAI's chat route, as llama.vim sends it."""

from __future__ import annotations

import httpx
from tests.api.conftest import USER, Backends

# llama.vim's warm-up while an instruction is typed (llama#inst_send's first request): it
# drops the answer. keel ignored n_predict and generated a whole answer for nothing.
WARM_UP = {
    "id_slot": 0,
    "messages": [
        {"role": "system", "content": "You are a code-editing assistant."},
        {"role": "user", "content": "def add(a, b):\n    return a + b"},
    ],
    "samplers": [],
    "n_predict": 0,
    "stream": False,
    "cache_prompt": True,
    "response_fields": [""],
}


def chat_requests(backends: Backends) -> list[dict[str, object]]:
    return [r.json for r in backends.fallback.requests if r.path == "/v1/chat/completions"]


async def test_n_predict_0_is_answered_at_once_without_the_model(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    before = len(chat_requests(backends))
    answer = await client.post("/v1/chat/completions", json=WARM_UP, headers=USER)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "length")
    # OpenAI's required usage (the fuzzer found it missing): nothing read, nothing made
    assert answer.json()["usage"]["total_tokens"] == 0, answer.json()
    assert len(chat_requests(backends)) == before, "the backend was asked"
    streamed = await client.post(
        "/v1/chat/completions", json={**WARM_UP, "stream": True}, headers=USER
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


async def test_n_predict_limits_the_answer_as_max_tokens_does(
    client: httpx.AsyncClient, backends: Backends
) -> None:
    body = {**WARM_UP, "n_predict": 5}
    answer = await client.post("/v1/chat/completions", json=body, headers=USER)
    assert answer.status_code == 200, answer.text
    assert chat_requests(backends)[-1]["max_tokens"] == 5
    both = {**body, "max_tokens": 7}  # OpenAI's own field first
    assert (await client.post("/v1/chat/completions", json=both, headers=USER)).status_code == 200
    assert chat_requests(backends)[-1]["max_tokens"] == 7
