"""llama.cpp's own server API (``llama-server``), not its OpenAI routes.

``api_endpoint`` is the server root (``http://127.0.0.1:8888``). Completion is
``POST /completion`` with an already templated prompt; the SSE stream carries
``{"content", "stop"}`` chunks and ends with ``stop: true`` (no ``[DONE]``).
Embedding is ``POST /embeddings`` with ``{"content": [...]}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from keel.errors import KeelError, UpstreamProtocolError
from keel.providers.base import (
    CompletionCall,
    EmbeddingProvider,
    Reported,
    llamacpp_seed,
)
from keel.providers.http_base import (
    HttpBacked,
    HttpCompletion,
    JsonObject,
    generation_fields,
    stream_texts,
    text_field,
    vector_of,
)

log = logging.getLogger("keel.providers")


class LlamaCppCompletionProvider(HttpCompletion):
    """``llama.cpp/completion``: keel applies ``prompt_template``; no native suffix."""

    supports_suffix = False

    def request_body(self, call: CompletionCall) -> JsonObject:
        params = call.params
        body: JsonObject = {"prompt": call.prompt, "n_predict": params.max_tokens or -1}
        body.update(generation_fields(params))
        if params.seed is not None:
            body["seed"] = llamacpp_seed(params.seed)
        if params.max_predict_ms:
            body["t_max_predict_ms"] = params.max_predict_ms
        # Reuse the slot's KV cache for the shared prefix of consecutive prompts.
        body["cache_prompt"] = True
        body["stream"] = True
        body["return_tokens"] = True  # to recover text held back for a stop word
        # The prompt's figures with the first piece: an answer keel ends early (a stop
        # word, llama.vim's n_indent or time limit) never reads the last chunk's.
        body["timings_per_token"] = True
        return body

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        reported = call.reported
        reported.clear()
        provider = self.upstream.provider
        answer = _Answer()

        def text(payload: JsonObject) -> str:
            piece = text_field(payload, "content", provider)
            answer.add(piece, payload.get("tokens"))
            if reported.prompt_tokens is None:
                reported.note_prompt(payload.get("timings"))
            return piece

        def stop(payload: JsonObject) -> bool:
            """The last chunk, which carries the server's ``timings``."""
            if not llamacpp_stop(payload):
                return False
            reported.note_timings(payload.get("timings"))
            answer.at_limit = payload.get("stop_type") == "limit"
            return True

        batches = self.upstream.sse_batches(
            "/completion", self.request_body(call), last=llamacpp_stop
        )
        return self._with_held_text(stream_texts(batches, text, stop, call, provider), answer)

    async def _with_held_text(
        self, pieces: AsyncGenerator[str, None], answer: _Answer
    ) -> AsyncIterator[str]:
        """``pieces``, then the text the server held back and dropped: streaming, it
        keeps text that might begin a stop word until the next token settles it, and an
        answer that ends at ``n_predict`` first never sends it (``"1, 2, 3,"``, stop
        ``"4, 5, 6"``, 3 tokens: ``" "`` where the answer is ``" 4,"``). The tokens are
        in the chunks, so the whole answer is read back from them and its unsent end
        goes out."""
        async with aclosing(pieces):
            async for piece in pieces:
                yield piece
        if answer.at_limit and answer.held:
            try:
                whole = await self.upstream.post_json("/detokenize", {"tokens": answer.tokens})
            except KeelError as exc:  # the answer stands as sent
                log.info("%s: the held-back end of an answer was not read: %s", self.name, exc)
                return
            content = whole.get("content") if isinstance(whole, dict) else None
            sent = "".join(answer.sent)
            if isinstance(content, str) and content.startswith(sent):
                yield content[len(sent) :]


@dataclass(slots=True)
class _Answer:
    """A llama.cpp answer as it streams: its tokens, the text sent, and whether some
    tokens came with no text (held back for a stop word, or a character's first bytes)."""

    tokens: list[int] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    """The pieces sent, joined only when read: ``+=`` on an attribute copies the whole
    text each time (a 16 MB answer in 4,000 pieces took 12 s of CPU)."""
    held: bool = False
    at_limit: bool = False

    def add(self, piece: str, tokens: object) -> None:
        if isinstance(tokens, list):
            self.tokens.extend(t for t in tokens if isinstance(t, int))
        self.sent.append(piece)
        if piece:
            self.held = False
        elif tokens:
            self.held = True


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

    async def embed(
        self, texts: Sequence[str], reported: Reported | None = None
    ) -> list[list[float]]:
        if not texts:
            return []
        payload = await self.upstream.post_json("/embeddings", {"content": list(texts)})
        return llamacpp_embeddings(payload, len(texts), self.upstream.provider)


class LlamaCppLegacyEmbeddingProvider(HttpBacked, EmbeddingProvider):
    """``llama.cpp/before_b4356_embedding``, Tabby's kind for llama.cpp's servers before
    build b4356: their ``/embedding`` route, one text a request, as Tabby sends them."""

    async def embed(
        self, texts: Sequence[str], reported: Reported | None = None
    ) -> list[list[float]]:
        vectors = []
        for text in texts:
            payload = await self.upstream.post_json("/embedding", {"content": text})
            vectors += llamacpp_embeddings(payload, 1, self.upstream.provider)
        return vectors
