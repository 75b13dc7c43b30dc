"""llama.cpp's own server API (``llama-server``), not its OpenAI routes.

``api_endpoint`` is the server root (``http://127.0.0.1:8888``). Completion is
``POST /completion`` with an already templated prompt; the SSE stream carries
``{"content", "stop"}`` chunks and ends with ``stop: true`` (no ``[DONE]``).
Embedding is ``POST /embeddings`` with ``{"content": [...]}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from keel.errors import UpstreamProtocolError
from keel.providers.base import (
    CompletionCall,
    EmbeddingProvider,
    llamacpp_seed,
)
from keel.providers.http_base import (
    HttpBacked,
    HttpCompletion,
    JsonObject,
    field_text,
    generation_fields,
    stream_texts,
    vector_of,
)


class LlamaCppCompletionProvider(HttpCompletion):
    """``llama.cpp/completion``: keel applies ``prompt_template``; no native suffix."""

    supports_suffix = False

    def request_body(self, call: CompletionCall) -> JsonObject:
        params = call.params
        body: JsonObject = {"prompt": call.prompt, "n_predict": params.max_tokens or -1}
        body.update(generation_fields(params))
        if params.seed is not None:
            body["seed"] = llamacpp_seed(params.seed)
        # Reuse the slot's KV cache for the shared prefix of consecutive prompts.
        body["cache_prompt"] = True
        body["stream"] = True
        return body

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        reported = call.reported
        reported.clear()

        def stop(payload: JsonObject) -> bool:
            """The last chunk, which carries the server's ``timings``."""
            if not llamacpp_stop(payload):
                return False
            reported.note_timings(payload.get("timings"))
            return True

        batches = self.upstream.sse_batches(
            "/completion", self.request_body(call), last=llamacpp_stop
        )
        provider = self.upstream.provider
        return stream_texts(batches, field_text("content", provider), stop, provider)


def llamacpp_stop(payload: JsonObject) -> bool:
    return payload.get("stop") is True


def llamacpp_embeddings(payload: Any, count: int, provider: str) -> list[list[float]]:
    """Vectors from any of llama.cpp's response shapes.

    Since b4357: ``[{"index", "embedding": [[...]]}]`` (one pooled vector
    wrapped in a list); before: ``[{"embedding": [...]}]``, or for a single
    input ``{"embedding": [...]}``.
    """
    items = [payload] if isinstance(payload, dict) else payload
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise UpstreamProtocolError(
            f"unexpected embedding response: {str(payload)[:100]}", provider=provider
        )
    ordered = sorted(items, key=lambda item: int(item.get("index", 0)))
    vectors = []
    for item in ordered:
        embedding = item.get("embedding")
        if isinstance(embedding, list) and embedding and isinstance(embedding[0], list):
            if len(embedding) != 1:
                raise UpstreamProtocolError(
                    "got one vector per token; start llama-server with --pooling mean "
                    "(or any pooling but 'none')",
                    provider=provider,
                )
            embedding = embedding[0]
        vectors.append(vector_of(embedding, provider))
    if len(vectors) != count:
        raise UpstreamProtocolError(
            f"asked for {count} embeddings, got {len(vectors)}", provider=provider
        )
    return vectors


class LlamaCppEmbeddingProvider(HttpBacked, EmbeddingProvider):
    """``llama.cpp/embedding``: one request for the whole batch."""

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        payload = await self.upstream.post_json("/embeddings", {"content": list(texts)})
        return llamacpp_embeddings(payload, len(texts), self.upstream.provider)
