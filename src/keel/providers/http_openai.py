"""OpenAI-compatible backends: OpenAI, vLLM, Mistral chat, Voyage embeddings.

``api_endpoint`` already ends in the API version (``https://api.openai.com/v1``,
``http://vllm:8000/v1``); keel appends ``/completions``, ``/chat/completions``
or ``/embeddings`` to it, as Tabby does. Streams are SSE ending in
``data: [DONE]``; a chunk whose choice has a ``finish_reason`` ends it too.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Unpack

from keel.errors import UpstreamError, UpstreamProtocolError
from keel.providers.base import (
    OPENAI_ONLY,
    ChatCall,
    ChatProvider,
    CompletionCall,
    EmbeddingProvider,
    GenerationParams,
    ProviderInfo,
    Reported,
    parts,
)
from keel.providers.http_base import (
    CompletionOptions,
    EndMarker,
    HttpBacked,
    HttpCompletion,
    HttpUpstream,
    JsonObject,
    generation_fields,
    stream_texts,
    text_field,
    vector_of,
)

log = logging.getLogger("keel.providers")

OPENAI_STOP_LIMIT = 4
"""OpenAI's API refuses more than four stop sequences; keel stops on the rest itself."""


USAGE_ASKED: JsonObject = {"stream_options": {"include_usage": True}}
"""What asks a backend for its stream's ``usage`` (a last chunk with no choices)."""


class StreamUsage:
    """Whether an endpoint is asked for its stream's ``usage`` (:data:`USAGE_ASKED`).
    Streamed without it, OpenAI's API and vLLM send none, and keel's estimate stood in
    (a chat of 1,500 tokens of tools and tool calls was counted 2).

    Some servers refuse ``stream_options``: a 400 or 422 naming it is answered by the
    same request again at once without it, and the endpoint is not asked again
    (logged once, ``stream_usage`` in ``/v1/providers``). Neither the refusal nor the
    second request is the backend's failure: the router sees one attempt."""

    def __init__(self, provider: str, *, asked: bool) -> None:
        self.provider = provider
        self.asked = asked
        self.refused: str | None = None
        """What the endpoint said when it refused the field."""

    def status(self) -> dict[str, object]:
        """For ``/v1/providers``: ``stream_usage`` where the endpoint is asked."""
        if not self.asked:
            return {}
        said = "asked" if self.refused is None else f"refused, estimated: {self.refused}"
        return {"stream_usage": said}

    def refusal(self, error: UpstreamError) -> bool:
        """Whether ``error`` is the backend refusing ``stream_options``; remembered if so."""
        if error.upstream_status not in (400, 422):
            return False
        if "stream_options" not in error.message and error.details.get("param") != (
            "stream_options"
        ):
            return False
        if self.refused is not None:  # a stream asked before the first refusal came
            return True
        self.refused = error.message.removeprefix(f"{self.provider}: ")
        log.warning(
            "%s refused stream_options (%s): its streams are asked without it from now on, "
            "and their usage is keel's estimate unless the backend sends its own",
            self.provider,
            self.refused,
        )
        return True

    def batches(
        self, upstream: HttpUpstream, path: str, body: JsonObject, last: EndMarker
    ) -> AsyncGenerator[list[JsonObject], None]:
        """``upstream``'s SSE batches for ``body``, asked for usage unless refused (and
        then sent ``body`` as it is, at once, by :meth:`HttpUpstream.sse_batches`)."""
        if not self.asked or self.refused is not None:
            return upstream.sse_batches(path, body, last=last)

        def again(error: UpstreamError) -> JsonObject | None:
            return body if self.refusal(error) else None

        return upstream.sse_batches(path, {**body, **USAGE_ASKED}, last=last, again=again)


def first_choice(payload: JsonObject, provider: str) -> JsonObject | None:
    """The first choice of a chunk; ``None`` for chunks without one (usage-only)."""
    choices = payload.get("choices")
    if choices is None or choices == []:
        return None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UpstreamProtocolError(
            f"unexpected 'choices' in chunk: {choices!r}", provider=provider
        )
    choice: JsonObject = choices[0]
    return choice


def sampling_body(
    params: GenerationParams,
    *,
    stop_limit: int | None,
    seed_field: str = "seed",
    limit_name: str | None = None,
) -> JsonObject:
    """The limit (named ``limit_name``, else as the client named it), the set sampling
    fields and ``stream: true``."""
    stop = params.stop[:stop_limit] if stop_limit is not None else params.stop
    body: JsonObject = {}
    if params.max_tokens is not None:
        body[limit_name or params.max_tokens_name] = params.max_tokens
    body.update(generation_fields(params, stop=stop, seed_field=seed_field))
    body["stream"] = True
    return body


def finished(payload: JsonObject) -> bool:
    """Whether a chunk ends the answer: its choice has a ``finish_reason``."""
    choices = payload.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        return False
    return choices[0].get("finish_reason") is not None


def stream_choice_text(
    upstream: HttpUpstream,
    path: str,
    body: JsonObject,
    read: str,
    call: CompletionCall | ChatCall,
    usage: StreamUsage | None = None,
) -> AsyncGenerator[str, None]:
    """Text pieces of a chunked OpenAI-style stream, one per read (see :func:`joined`).

    ``read`` names where the text is: ``"text"`` (legacy completions) or
    ``"delta"`` (chat and Mistral FIM, ``choices[0].delta.content``). The call's
    ``reported`` gets the backend's ``finish_reason`` and its ``usage`` where a chunk
    carries it, the last one or one after it (asked for where ``usage`` says so; vLLM
    told to, proxies and Mistral send it anyway).
    """
    provider = upstream.provider
    numbering = CallNumbering()
    reported = call.reported
    reported.clear()
    chosen = False

    def text(payload: JsonObject) -> str:
        nonlocal chosen
        reported.note_usage(payload.get("usage"))
        if reported.model is None and isinstance(model := payload.get("model"), str) and model:
            reported.model = model
        if isinstance(fingerprint := payload.get("system_fingerprint"), str) and fingerprint:
            reported.system_fingerprint = fingerprint
        choice = first_choice(payload, provider)
        if choice is None:
            return ""
        chosen = True
        if isinstance(reason := choice.get("finish_reason"), str):
            reported.finish_reason = reason
        return choice_text(choice, read, provider, numbering)

    def unfinished() -> str | None:
        # an answer of chunks none of which had a choice: a 200 with an empty answer,
        # the backend healthy and the fallback idle, for every request
        return None if chosen else "an answer without a choice: no chunk had 'choices'"

    if usage is None:
        batches = upstream.sse_batches(path, body, last=finished)
    else:
        batches = usage.batches(upstream, path, body, finished)
    return stream_texts(batches, text, finished, call, provider, unfinished=unfinished)


def choice_text(
    choice: JsonObject, read: str, provider: str, numbering: CallNumbering | None = None
) -> str:
    if read == "delta":
        if "delta" not in choice and "text" in choice:
            raise _other_shape(provider, "a completion's (choices[].text)", "a chat's")
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise UpstreamProtocolError(f"unexpected delta {delta!r}", provider=provider)
        text = text_field(delta, "content", provider)
        # vLLM's reasoning parsers and llama.cpp's server: reasoning_content; Ollama's
        # and OpenRouter's OpenAI APIs, and newer vLLM: reasoning
        reasoning = text_field(delta, "reasoning_content", provider) or text_field(
            delta, "reasoning", provider
        )
        calls = delta.get("tool_calls")
        if not calls and not reasoning:
            return text
        called = tool_call_parts(calls, provider) if calls else []
        if numbering and called:
            called = numbering.number(called)
        return parts(text, called, reasoning)
    if "text" not in choice and ("delta" in choice or "message" in choice):
        raise _other_shape(provider, "a chat's (choices[].delta)", "a completion's")
    return text_field(choice, "text", provider)


def _other_shape(provider: str, found: str, wanted: str) -> UpstreamProtocolError:
    """A backend answering in the other OpenAI shape: its text was read as none, and a
    client got a 200 with an empty answer (a chat kind at a completions server)."""
    return UpstreamProtocolError(
        f"answered in {found} shape where {wanted} was asked: does this kind match what "
        "api_endpoint serves?",
        provider=provider,
    )


def tool_call_parts(calls: object, provider: str) -> list[JsonObject]:
    """A delta's ``tool_calls``: entries with an ``index`` (or none) and, where
    present, a ``function`` object whose ``name`` and ``arguments`` are text (or null)."""

    def valid(call: object) -> bool:
        if not isinstance(call, dict) or not isinstance(call.get("index"), int | None):
            return False
        function = call.get("function") or {}
        return isinstance(function, dict) and all(
            isinstance(function.get(key), str | None) for key in ("name", "arguments")
        )

    if not isinstance(calls, list) or not all(valid(call) for call in calls):
        raise UpstreamProtocolError(f"unexpected tool_calls {calls!r}", provider=provider)
    return calls


class CallNumbering:
    """Gives each tool-call part of one answer the ``index`` of its call, for backends
    that send parts without one (Ollama's, Gemini's OpenAI APIs), and a call begun with
    no ``id`` one of keel's. Clients number calls
    by ``index`` (the openai SDK's stream helper fails without it), and keel joins parts
    by it: without, two calls became one with both argument texts.

    A part without an index belongs to the call its ``id`` names; a new id begins a
    call, and so does a part with no id (Gemini sends ``""``) that names a function
    when the last call has its name already, or that comes second or later in one
    ``tool_calls`` list (a list holds one part of each call it touches); any other part
    continues the last call."""

    def __init__(self) -> None:
        self.calls = 0
        self.ids: dict[object, int] = {}
        self.named: set[int] = set()
        self.begun: set[int] = set()

    def number(self, parts: list[JsonObject]) -> list[JsonObject]:
        numbered = []
        for position, part in enumerate(parts):
            index, call_id = part.get("index"), part.get("id") or None
            function = part.get("function") or {}
            named = isinstance(function, dict) and bool(function.get("name"))
            if not isinstance(index, int):
                if call_id in self.ids:
                    index = self.ids[call_id]
                else:
                    last = self.calls - 1
                    new = call_id is not None or position > 0 or not self.calls
                    index = self.calls if new or (named and last in self.named) else last
                part = {**part, "index": index}
            self.calls = max(self.calls, index + 1)
            if index not in self.begun:
                self.begun.add(index)
                if call_id is None:
                    # A client sends the call's id back with its result: null was a 400
                    # on the next turn, and the tool loop stopped.
                    part = {**part, "id": f"call_{uuid.uuid4().hex[:24]}"}
            if call_id is not None:
                self.ids.setdefault(call_id, index)
            if named:
                self.named.add(index)
            numbered.append(part)
        return numbered


class OpenAICompletionProvider(HttpCompletion):
    """``POST {endpoint}/completions``: ``openai/completion`` (native FIM through
    ``suffix``), ``openai/legacy_completion_no_fim`` and ``vllm/completion``
    (keel templates the prompt, no suffix is sent)."""

    def __init__(
        self,
        upstream: HttpUpstream,
        info: ProviderInfo,
        *,
        model: str | None,
        native_fim: bool,
        stop_limit: int | None = None,
        **options: Unpack[CompletionOptions],
    ) -> None:
        super().__init__(upstream, info, **options)
        self.model = model
        self.supports_suffix = native_fim
        self.stop_limit = stop_limit
        self.usage = StreamUsage(upstream.provider, asked=True)

    def status(self) -> dict[str, object]:
        return {**super().status(), **self.usage.status()}

    def request_body(self, call: CompletionCall) -> JsonObject:
        body: JsonObject = {} if self.model is None else {"model": self.model}
        body["prompt"] = call.prompt
        if self.supports_suffix and call.suffix:
            body["suffix"] = call.suffix
        body.update(sampling_body(call.params, stop_limit=self.stop_limit))
        return body

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        return stream_choice_text(
            self.upstream, "/completions", self.request_body(call), "text", call, self.usage
        )


class OpenAIChatProvider(HttpBacked, ChatProvider):
    """``POST {endpoint}/chat/completions``: ``openai/chat`` and ``mistral/chat``; the
    request's tools go on, the model's tool calls come back as :class:`Parts`."""

    def __init__(
        self,
        upstream: HttpUpstream,
        info: ProviderInfo,
        *,
        model: str | None,
        seed_field: str = "seed",
        stop_limit: int | None = None,
        limit_name: str | None = None,
        supported_models: tuple[str, ...] = (),
        openai_api: bool = True,
    ) -> None:
        """``limit_name``: what the backend calls ``max_tokens`` whatever the client
        called it (None: the client's name goes on). ``supported_models``: the models
        a client may ask for by name; any other asks for ``model``. ``openai_api``: the
        backend speaks OpenAI's own API (OpenAI's, Azure's, vLLM's), not Mistral's
        likeness of it: it is asked for the stream's usage (:class:`StreamUsage`;
        Mistral's sends it unasked) and sent :data:`OPENAI_ONLY` as the client sent them."""
        super().__init__(upstream, info)
        self.model = model
        self.supported_models = supported_models
        self.seed_field = seed_field
        self.stop_limit = stop_limit
        self.limit_name = limit_name
        self.openai_api = openai_api
        self.usage = StreamUsage(upstream.provider, asked=openai_api)

    def status(self) -> dict[str, object]:
        return {**super().status(), **self.usage.status()}

    def request_body(self, call: ChatCall) -> JsonObject:
        model = call.model if call.model in self.supported_models else self.model
        body: JsonObject = {} if model is None else {"model": model}
        body["messages"] = [message.wire() for message in call.messages]
        if call.response_format is not None:
            body["response_format"] = call.response_format
        body.update(call.tools or {})
        passed_on = call.passed_on or {}
        body.update(
            (name, value)
            for name, value in passed_on.items()
            if self.openai_api or name not in OPENAI_ONLY
        )
        body.update(
            sampling_body(
                call.params,
                stop_limit=self.stop_limit,
                seed_field=self.seed_field,
                limit_name=self.limit_name,
            )
        )
        return body

    def stream_chat(self, call: ChatCall) -> AsyncIterator[str]:
        return stream_choice_text(
            self.upstream, "/chat/completions", self.request_body(call), "delta", call, self.usage
        )


def embeddings_from_data(payload: Any, count: int, provider: str) -> list[list[float]]:
    """``{"data": [{"index", "embedding"}]}`` in input order, checked against ``count``."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise UpstreamProtocolError("embedding response has no 'data' list", provider=provider)
    if len(data) != count:
        raise UpstreamProtocolError(
            f"asked for {count} embeddings, got {len(data)}", provider=provider
        )
    items = [item if isinstance(item, dict) else {} for item in data]
    vectors = [vector_of(item.get("embedding"), provider) for item in items]
    return [vectors[at] for at in _input_order(items, provider)]


def _input_order(items: list[dict[str, Any]], provider: str) -> list[int]:
    """Where each input's vector is in ``items``: by their ``index``, which must be the
    integers 0 to n-1, each once, in any order (OpenAI's, vLLM's, llama.cpp's, Ollama's);
    or in order where no item has one. Sorted unchecked, indices "10" and "2" (strings)
    put vectors out of order lexically, and a repeated one in arrival order, each then
    numbered anew: the client could not tell which vector was whose input."""
    if all("index" not in item for item in items):
        return list(range(len(items)))
    indices = [item.get("index") for item in items]
    if sorted(i for i in indices if type(i) is int) != list(range(len(items))):
        shown = ", ".join(repr(index) for index in indices[:8])
        more = ", ..." if len(indices) > 8 else ""
        raise UpstreamProtocolError(
            f"embedding indices are not the integers 0 to {len(items) - 1}, each once:"
            f" [{shown}{more}]",
            provider=provider,
        )
    where = {index: at for at, index in enumerate(indices)}
    return [where[index] for index in range(len(items))]


class OpenAIEmbeddingProvider(HttpBacked, EmbeddingProvider):
    """``POST {endpoint}/embeddings`` with ``{input, model}``: ``openai/embedding``
    and ``voyage/embedding`` (Voyage answers in OpenAI's shape). A size the client asks
    for goes as ``size_field`` (OpenAI's ``dimensions``, Voyage's ``output_dimension``)."""

    def __init__(
        self, upstream: HttpUpstream, info: ProviderInfo, *, model: str | None, size_field: str
    ) -> None:
        super().__init__(upstream, info)
        self.model = model
        self.size_field = size_field

    async def embed_parts(
        self,
        texts: Sequence[str],
        reported: Reported | None = None,
        dimensions: int | None = None,
    ) -> AsyncIterator[list[list[float]]]:
        yield await self.embed(texts, reported, dimensions=dimensions)

    async def embed(
        self,
        texts: Sequence[str],
        reported: Reported | None = None,
        *,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        if not texts:
            return []
        body: JsonObject = {"input": list(texts)}
        if self.model is not None:
            body["model"] = self.model
        if dimensions is not None:
            body[self.size_field] = dimensions
        payload = await self.upstream.post_json("/embeddings", body)
        if reported is not None and isinstance(payload, dict):
            reported.note_usage(payload.get("usage"))
        return embeddings_from_data(payload, len(texts), self.upstream.provider)
