"""``POST /v1/embeddings``: admission, cancellation when the client goes away,
one router call (no stream), usage."""

from __future__ import annotations

import base64
import struct

from starlette.requests import Request

from keel.errors import RequestError, UpstreamProtocolError
from keel.providers.base import EmbeddingProvider, Provider, Reported
from keel.providers.http_openai import OpenAIEmbeddingProvider
from keel.router.admission import Admission
from keel.router.router import RoleRouter
from keel.schemas.openai import EmbeddingRequest
from keel.serving.lifecycle import CancelOnDisconnect, JsonResponse, count_tokens, note_provider


def encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def one_size(vectors: list[list[float]], provider: str) -> int:
    """The vectors' one length. Vectors of several lengths in one answer are the
    backend's protocol failure (they went to the client, ``[8, ..., 8, 3]``, checked
    against ``dimensions`` by the first alone)."""
    sizes = sorted({len(vector) for vector in vectors})
    if len(sizes) > 1:
        raise UpstreamProtocolError(
            f"embedding vectors of unequal lengths in one answer: {', '.join(map(str, sizes))}",
            provider=provider,
        )
    return sizes[0] if sizes else 0


def other_size(provider: Provider, made: int, asked: int) -> str:
    """Why vectors of ``made`` dimensions answer a request for ``asked``, and what to do."""
    model = provider.info.model
    instead = f"keel does not shorten vectors; leave dimensions out or send {made}"
    if isinstance(provider, OpenAIEmbeddingProvider):
        return (
            f"{model} was sent the size asked for ({provider.size_field} {asked}) and ignored "
            f"it: it made {made}-dimension vectors; {instead}"
        )
    return (
        f"{model} made {made}-dimension vectors, not {asked}: only an OpenAI-compatible, "
        f"Voyage or Mistral backend is sent the size asked for, and {instead}"
    )


class EmbeddingServing:
    def __init__(self, router: RoleRouter, admission: Admission) -> None:
        self.router = router
        self.admission = admission

    async def serve(self, http: Request, body: EmbeddingRequest) -> JsonResponse:
        texts = body.texts()
        async with CancelOnDisconnect(http), self.admission.slot():
            attempts = self.router.attempts()
            async for attempt in attempts:
                async with attempt:
                    provider, reported = attempt.provider, Reported()
                    assert isinstance(provider, EmbeddingProvider)
                    parts = provider.embed_parts(texts, reported, body.dimensions)
                    parts = attempt.pieces(parts)
                    vectors = [vector async for part in parts for vector in part]
                    made = one_size(vectors, provider.name)
        note_provider(http, provider)
        if body.dimensions is not None and body.dimensions != made:
            raise RequestError(other_size(provider, made, body.dimensions), param="dimensions")
        # The backend's own count where it gave one (it was always keel's estimate)
        tokens = reported.prompt_tokens or sum(await count_tokens(provider, texts))
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return JsonResponse(
            {
                "object": "list",
                "data": data,
                "model": provider.info.model,  # the one that made the vectors
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
