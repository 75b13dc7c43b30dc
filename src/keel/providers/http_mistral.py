"""Mistral's fill-in-the-middle API (Codestral).

``api_endpoint`` is the server root without the version (default
``https://api.mistral.ai``); keel appends ``/v1/fim/completions``, as Tabby
does. The request carries ``prompt`` (the prefix) and ``suffix``; the SSE
stream is shaped like chat (``choices[0].delta.content``) and ends in
``[DONE]``. Mistral calls the seed ``random_seed``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from keel.providers.base import CompletionCall, CompletionProvider, ProviderInfo
from keel.providers.http_base import HttpBacked, HttpUpstream, JsonObject
from keel.providers.http_openai import sampling_body, stream_choice_text

DEFAULT_ENDPOINT = "https://api.mistral.ai"
DEFAULT_MODEL = "codestral-latest"


class MistralFimProvider(HttpBacked, CompletionProvider):
    """``mistral/completion``: native FIM, so keel sends no template."""

    supports_suffix = True

    def __init__(
        self,
        upstream: HttpUpstream,
        info: ProviderInfo,
        *,
        model: str,
        stop_words: tuple[str, ...] = (),
        max_input_length: int | None = None,
    ) -> None:
        self.upstream = upstream
        self.info = info
        self.model = model
        self.stop_words = stop_words
        self.max_input_length = max_input_length

    def request_body(self, call: CompletionCall) -> JsonObject:
        body: JsonObject = {"model": self.model, "prompt": call.prompt}
        if call.suffix:
            body["suffix"] = call.suffix
        body.update(sampling_body(call.params, stop_limit=None, seed_field="random_seed"))
        return body

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        return stream_choice_text(
            self.upstream, "/v1/fim/completions", self.request_body(call), "delta"
        )
