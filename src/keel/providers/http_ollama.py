"""Ollama's native API.

``api_endpoint`` is the server root (``http://127.0.0.1:11434``). Completion is
``POST /api/generate`` with ``raw: true`` (keel has templated the prompt, Ollama
must not wrap it again); the answer is NDJSON, ``{"response", "done"}`` per
line, the last with ``done: true``. Embedding is ``POST /api/embed`` with
``{"model", "input": [...]}`` answering ``{"embeddings": [[...]]}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Unpack

from keel.errors import UpstreamProtocolError
from keel.providers.base import (
    CompletionCall,
    EmbeddingProvider,
    ProviderInfo,
    Reported,
    llamacpp_seed,
)
from keel.providers.http_base import (
    CompletionOptions,
    HttpBacked,
    HttpCompletion,
    HttpUpstream,
    JsonObject,
    field_text,
    generation_fields,
    stream_texts,
    vector_of,
)


class OllamaCompletionProvider(HttpCompletion):
    """``ollama/completion``: keel applies ``prompt_template``; no native suffix."""

    supports_suffix = False

    def __init__(
        self,
        upstream: HttpUpstream,
        info: ProviderInfo,
        *,
        model: str,
        **options: Unpack[CompletionOptions],
    ) -> None:
        super().__init__(upstream, info, **options)
        self.model = model

    def request_body(self, call: CompletionCall) -> JsonObject:
        params = call.params
        options: JsonObject = {"num_predict": params.max_tokens or -1}
        options.update(generation_fields(params))
        if params.seed is not None:  # llama.cpp's 32 bits: 2**64 - 1 went as -1, random
            options["seed"] = llamacpp_seed(params.seed)
        if self.max_input_length is not None:
            # Ollama silently cuts prompts longer than its context (2048 by
            # default), which would drop a FIM template's head. A constant
            # value, so Ollama does not reload the model between requests.
            options["num_ctx"] = self.max_input_length
        return {
            "model": self.model,
            "prompt": call.prompt,
            "raw": True,
            "stream": True,
            "options": options,
        }

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        batches = self.upstream.ndjson_batches(
            "/api/generate", self.request_body(call), last=ollama_done
        )
        provider = self.upstream.provider
        return stream_texts(
            batches,
            field_text("response", provider),
            ollama_done,
            call,
            provider,
            unfinished=lambda: "stream ended before 'done: true'",
        )


def ollama_done(payload: JsonObject) -> bool:
    return payload.get("done") is True


class OllamaEmbeddingProvider(HttpBacked, EmbeddingProvider):
    """``ollama/embedding``: one ``/api/embed`` request for the whole batch."""

    def __init__(self, upstream: HttpUpstream, info: ProviderInfo, *, model: str) -> None:
        super().__init__(upstream, info)
        self.model = model

    async def embed(
        self, texts: Sequence[str], reported: Reported | None = None
    ) -> list[list[float]]:
        if not texts:
            return []
        provider = self.upstream.provider
        payload = await self.upstream.post_json(
            "/api/embed", {"model": self.model, "input": list(texts)}
        )
        if reported is not None and isinstance(payload, dict):
            reported.note_usage({"prompt_tokens": payload.get("prompt_eval_count")})
        embeddings = payload.get("embeddings") if isinstance(payload, dict) else None
        if not isinstance(embeddings, list):
            raise UpstreamProtocolError(
                "embedding response has no 'embeddings' list", provider=provider
            )
        if len(embeddings) != len(texts):
            raise UpstreamProtocolError(
                f"asked for {len(texts)} embeddings, got {len(embeddings)}", provider=provider
            )
        return [vector_of(vector, provider) for vector in embeddings]
