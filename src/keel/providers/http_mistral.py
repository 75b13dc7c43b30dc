"""Mistral's fill-in-the-middle API (Codestral).

``api_endpoint`` is the server root without the version (default
``https://api.mistral.ai``); keel appends ``/v1/fim/completions``, as Tabby
does. The request carries ``prompt`` (the prefix) and ``suffix``; the SSE
stream is shaped like chat (``choices[0].delta.content``) and ends in
``[DONE]``. Mistral calls the seed ``random_seed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Unpack

from keel.providers.base import CompletionCall, ProviderInfo, llamacpp_seed
from keel.providers.http_base import (
    CompletionOptions,
    HttpCompletion,
    HttpUpstream,
    JsonObject,
)
from keel.providers.http_openai import sampling_body, stream_choice_text


class MistralFimProvider(HttpCompletion):
    """``mistral/completion``: native FIM, so keel sends no template."""

    supports_suffix = True

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
        body: JsonObject = {"model": self.model, "prompt": call.prompt}
        if call.suffix:
            body["suffix"] = call.suffix
        body.update(sampling_body(call.params, stop_limit=None, seed_field="random_seed"))
        if call.params.seed is not None:  # Mistral's is non-negative: Tabby's u64 went raw
            body["random_seed"] = llamacpp_seed(call.params.seed)
        return body

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        return stream_choice_text(
            self.upstream, "/v1/fim/completions", self.request_body(call), "delta", call
        )
