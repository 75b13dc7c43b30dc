"""Local GGUF models, served by a supervised worker process.

One :class:`LocalProvider` per worker; the same provider serves completion and
chat when both roles name the same model. Embeddings need a context loaded
for embeddings, so that role gets a worker of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

from keel.errors import RequestError, UpstreamStatusError
from keel.pipeline.prompt import control_pattern, user_text_pieces
from keel.providers.base import (
    UNSUPPORTED,
    ChatCall,
    ChatMessage,
    ChatProvider,
    CompletionCall,
    CompletionProvider,
    EmbeddingProvider,
    GenerationParams,
    ProviderInfo,
    Reported,
    close_stream,
    llamacpp_seed,
    token_groups,
)
from keel.providers.schema_gap import held_format, unenforced
from keel.workers.supervisor import WorkerSupervisor

EMBED_PART_TOKENS = 1024
"""Estimated tokens of one embedding call: ~4 s on 2 cores, where a whole batch can run
for minutes (8 inputs of ~400 tokens took 12.8 s in one call; 24 ran past the role's
30 s deadline twice, then were a 503, while the worker went on with both)."""
TOKEN_COUNTS_KEPT = 20_000
TOKEN_COUNT_CHARS = 16 * 2**20
"""Characters of the texts whose counts are kept, in all (the longest unused go first):
bounded by count alone, a client's megabytes of snippets were kept 20,000 texts deep."""
TOKENIZE_BATCH = 256
"""Texts per tokenize call: the worker answers the supervisor's liveness ping between
calls. 15,000 snippets in one call kept the ping waiting past its limit, and the worker
was killed as frozen, five times in four minutes."""
"""Texts (mostly source lines) whose token counts a local provider remembers."""


def _sampling(params: GenerationParams) -> dict[str, object]:
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "stop": list(params.stop),
        "seed": llamacpp_seed(params.seed),
        "top_p": params.top_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "limit_must_fit": params.limit_must_fit,
        "t_max_predict_ms": params.max_predict_ms,
    }


class LocalProvider(CompletionProvider, ChatProvider, EmbeddingProvider):
    kind = "local"
    # On a CPU, prefill runs at ~100 tokens/s and decoding at ~70: keep both modest.
    default_input_budget = 1024
    default_max_tokens = 32

    def __init__(
        self,
        supervisor: WorkerSupervisor,
        *,
        name: str,
        model: str,
        ready_timeout: float,
        prompt_template: str | None = None,
        stop_words: tuple[str, ...] = (),
        embed_part_tokens: int = EMBED_PART_TOKENS,
    ) -> None:
        self.supervisor = supervisor
        self.ready_timeout = ready_timeout
        self.embed_part_tokens = embed_part_tokens
        self.info = ProviderInfo(
            name=name, kind="local", model=model, endpoint=None, details=asdict(supervisor.spec)
        )
        self.prompt_template = prompt_template  # chosen by the catalog (name, then vocabulary)
        self.stop_words = stop_words
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._count_chars = 0
        """What the texts in ``_counts`` add up to."""
        self.tools_answered_in_text = 0
        """Chat requests that came with tools: the engine is not asked to call them
        (``keel_tools_answered_in_text``, ``/v1/providers``)."""
        self.embedding_inputs_truncated = 0
        """Inputs over the context, embedded from their first context's worth of tokens
        (``keel_embedding_inputs_truncated``, ``/v1/providers``)."""

    def configure(self, prompt_template: str | None, stop_words: tuple[str, ...]) -> None:
        """Completion's own settings for this worker (a reload's, a load's)."""
        self.prompt_template, self.stop_words = prompt_template, stop_words

    def context_tokens(self) -> int | None:
        return self.supervisor.spec.context_size

    async def start(self) -> None:
        await self.supervisor.start()

    async def aclose(self) -> None:
        await self.supervisor.stop()

    def status(self) -> dict[str, object]:
        return {
            **self.supervisor.status(),
            "tools_answered_in_text": self.tools_answered_in_text,
            "embedding_inputs_truncated": self.embedding_inputs_truncated,
        }

    answers_while_busy = True

    async def ping(self) -> None:
        """A tokenize, which the worker answers at once even while its slots generate: a
        worker that stopped answering (frozen, or starved of CPU) is found while editors
        keep it busy, whose requests would otherwise end in timeouts charged to no one."""
        await self.supervisor.ping(ready_timeout=self.ready_timeout)

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Counts from the model's tokenizer, remembered per text: consecutive
        keystrokes send the same lines again, and asking the worker costs a loopback
        round trip per text (120 lines: ~35 ms), so only new texts go to it."""
        known = {text: self._counts[text] for text in texts if text in self._counts}
        missing = list(dict.fromkeys(text for text in texts if text not in known))
        for start in range(0, len(missing), TOKENIZE_BATCH):
            batch = missing[start : start + TOKENIZE_BATCH]
            reply = await self.supervisor.call(
                {"op": "tokenize", "texts": batch}, ready_timeout=self.ready_timeout
            )
            known.update(zip(batch, map(int, reply["counts"]), strict=True))
        # Taken from this call's own counts: another request trimming the shared map while
        # this one awaited the worker evicted texts it had found there (a KeyError, a 500).
        for text, count in known.items():
            if text not in self._counts:
                self._count_chars += len(text)
            self._counts[text] = count
            self._counts.move_to_end(text)
        while len(self._counts) > TOKEN_COUNTS_KEPT or self._count_chars > TOKEN_COUNT_CHARS:
            self._count_chars -= len(self._counts.popitem(last=False)[0])
        return [known[text] for text in texts]

    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]:
        op: dict[str, Any] = {"op": "complete", "prompt": call.prompt, **_sampling(call.params)}
        # The engine reads a prompt's text with its control tokens: a file holding
        # "<|endoftext|>" ended the model's document there. The user's text in a prompt
        # keel built goes in pieces where it spells one, read as text.
        controls = control_pattern(self.supervisor.control_tokens())
        if (
            call.markup is not None
            and controls is not None
            and (pieces := user_text_pieces(call.prompt, call.markup, controls)) is not None
        ):
            op["pieces"] = pieces
        return self.supervisor.stream(op, ready_timeout=self.ready_timeout, reported=call.reported)

    def stream_chat(self, call: ChatCall) -> AsyncIterator[str]:
        if (refusal := self._refusal(call)) is not None:
            return _refused(refusal)
        template = self.supervisor.spec.header().get("tokenizer.chat_template")
        takes_calls = isinstance(template, str) and "tool_calls" in template
        messages = engine_messages(call.messages, takes_calls=takes_calls)
        op: dict[str, Any] = {"op": "chat", "messages": messages, **_sampling(call.params)}
        if call.response_format is not None:
            op["response_format"] = held_format(call.response_format)
        elif (controls := control_pattern(self.supervisor.control_tokens())) is not None and any(
            controls.search(m["content"]) or controls.search(str(m.get("tool_calls", "")))
            for m in messages
        ):
            # A message spelling a control token ("<|im_end|>" in a pasted file) ended
            # its turn there in the engine's own templating: read as text instead.
            op["as_text"] = True
        if call.tools is not None:
            self.tools_answered_in_text += 1
        stream = self.supervisor.stream(
            op, ready_timeout=self.ready_timeout, reported=call.reported
        )
        return stream if call.response_format is None else _schema_refusals(stream)

    def _refusal(self, call: ChatCall) -> RequestError | None:
        """What in the chat this model cannot serve as asked, as the client's 400."""
        model = self.info.model
        if (image := _image_part(call.messages)) is not None:
            return RequestError(
                f"{model} reads text only: {image} is an image, which it cannot answer; send "
                "text alone, or use a chat backend that reads images (openai/chat)",
                param=image,
                code=UNSUPPORTED,
            )
        if (twice := _assistants_at_end(call.messages)) is not None:
            return RequestError(
                f"{twice} are both assistant messages at the end of the chat: {model} "
                "continues one assistant message at the end (its answer's beginning); join "
                "them into one, or end the chat with a user message",
                param="messages",
                code=UNSUPPORTED,
            )
        choice = None if call.tools is None else call.tools.get("tool_choice")
        if choice == "required" or isinstance(choice, dict):
            # A call the caller made compulsory: answered in text, an agent that forces
            # one read prose as if no tool had been needed.
            return RequestError(
                f"{model} does not call tools, and tool_choice asks for a call: send "
                "tool_choice auto or none (answered in text), or use a chat backend that "
                "calls tools (openai/chat)",
                param="tool_choice",
                code=UNSUPPORTED,
            )
        if "web_search_options" in (call.passed_on or {}):
            return RequestError(
                f"{model} does not search the web, and web_search_options asks it to: leave"
                " it out, or use a chat backend with a search model (openai/chat)",
                param="web_search_options",
                code=UNSUPPORTED,
            )
        schema = (call.response_format or {}).get("json_schema") or {}
        if schema.get("strict") and (gap := unenforced(schema.get("schema"))) is not None:
            where, why = gap
            return RequestError(
                f"{SCHEMA_FIELD}{where}: {why}, which {model}'s grammar cannot hold its "
                "answer to, and the schema is strict; leave it out (with the openai SDK's "
                "parse(), which always sends strict, drop it from the model's fields), or "
                "send strict false (the answer follows the rest of the schema), or use a "
                "chat backend that enforces it (openai/chat)",
                param=f"{SCHEMA_FIELD}{where}",
                code=UNSUPPORTED,
            )
        return None

    async def embed_parts(
        self,
        texts: Sequence[str],
        reported: Reported | None = None,
        dimensions: int | None = None,
    ) -> AsyncIterator[list[list[float]]]:
        """A CPU engine embeds ~250 tokens a second: a batch goes in parts of
        ``embed_part_tokens`` (:data:`EMBED_PART_TOKENS`), each well within the role's
        deadlines, and a client that leaves costs the part in flight, not the batch.
        Counted by the model's tokenizer: estimated (3 bytes a token), a part of digits
        or punctuation held up to three times the tokens, and a cancelled one ran ~12 s."""
        texts = self._read_parts(texts)
        counts = await self.count_tokens(texts)
        if reported is not None:  # the usage: counted once, here, as the engine reads them
            # (an input over the context up to it: usage said 701 of 512 tokens read)
            limit = self.context_tokens() or max(counts, default=0)
            reported.prompt_tokens = sum(min(count, limit) for count in counts)
        for group in token_groups(texts, self.embed_part_tokens, counts):
            yield await self.embed(group)

    def _read_parts(self, texts: Sequence[str]) -> Sequence[str]:
        """Each text cut past what the engine reads of it, its context's worth of tokens:
        their bytes at most (the vocabulary's longest token a token) are within as many
        characters. The whole text was tokenized to find where to cut it: a 3.9 MB input
        took 67 s, past the engine call's limit, a failure of the provider's and a retry;
        five such opened its breaker, every user's embeddings a 503."""
        longest, context = self.supervisor.longest_token(), self.context_tokens()
        if longest is None or not context:
            return texts
        most = longest * context
        return [text[:most] for text in texts]

    async def embed(
        self, texts: Sequence[str], reported: Reported | None = None
    ) -> list[list[float]]:
        reply = await self.supervisor.call(
            {"op": "embed", "texts": list(texts)}, ready_timeout=self.ready_timeout
        )
        self.embedding_inputs_truncated += len(reply.get("truncated", ()))
        return [[float(x) for x in vector] for vector in reply["embeddings"]]


def engine_messages(messages: Sequence[ChatMessage], *, takes_calls: bool) -> list[dict[str, Any]]:
    """The chat as the engine's template takes it. Earlier tool calls and their results
    are kept (they were dropped: the model read an empty assistant turn, then a bare
    result): passed on as OpenAI's fields where the model's template renders them
    (``takes_calls``: it names ``tool_calls``), else written into the turns as text, a
    call as its function's name and arguments, a result under the name of the function
    that gave it, as the model reads any other text (it is never asked to call tools)."""
    names = {
        call.get("id"): call.get("function", {}).get("name")
        for message in messages
        for call in message.tool_calls
    }
    shaped: list[dict[str, Any]] = []
    for message in messages:
        wire: dict[str, Any] = {"role": message.role, "content": message.content}
        name = message.name or names.get(message.tool_call_id)
        if takes_calls:
            if message.tool_calls:
                wire["tool_calls"] = list(message.tool_calls)
            if message.tool_call_id is not None:
                wire["tool_call_id"] = message.tool_call_id
                wire["name"] = name or message.tool_call_id
        elif message.tool_calls:
            calls = [_call_text(call) for call in message.tool_calls]
            wire["content"] = "\n".join(filter(None, [message.content, *calls]))
        elif message.tool_call_id is not None:
            said = f"Result of {name or 'the call'} ({message.tool_call_id}):"
            wire["content"] = f"{said}\n{message.content}"
        shaped.append(wire)
    return shaped


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    return f"Called {function.get('name')} ({call.get('id')}) with {function.get('arguments')}"


def _image_part(messages: Sequence[ChatMessage]) -> str | None:
    """Where the first image is, as the request's field (``messages[1].content[0]``)."""
    for at, message in enumerate(messages):
        for index, part in enumerate(message.parts):
            if part.get("type") == "image_url":
                return f"messages[{at}].content[{index}]"
    return None


def _assistants_at_end(messages: Sequence[ChatMessage]) -> str | None:
    """The last two messages, where both are an assistant's: the engine continues the
    last one, and refuses another before it (llama.cpp's "Cannot have 2 or more assistant
    messages at the end of the list", the client's 400 as the backend's, with no field)."""
    if len(messages) >= 2 and messages[-1].role == messages[-2].role == "assistant":
        return f"messages[{len(messages) - 2}] and messages[{len(messages) - 1}]"
    return None


SCHEMA_FIELD = "response_format.json_schema.schema"


async def _schema_refusals(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """``stream``, with the engine's refusal of a response schema it cannot compile into
    a grammar as the client's 400 naming the schema (it was ``upstream_rejected_request``,
    no ``param``, in the engine's words about a "template", though no upstream was
    called). Closed, it closes ``stream`` at once, which cancels the generation (left to
    the garbage collector, the engine went on a while after its client had gone)."""
    try:
        async for piece in stream:
            yield piece
    except UpstreamStatusError as exc:
        if exc.code != "bad_request" or "schema" not in str(exc).lower():
            raise
        words = str(exc)
        at = words.find("JSON schema error")  # past the engine's words about a "template"
        raise RequestError(
            f"{SCHEMA_FIELD}: the local engine cannot turn it into a grammar "
            f"({words[at:] if at >= 0 else words.split(': ', 1)[-1]}); send a valid JSON "
            "schema (draft 2020-12)",
            param=SCHEMA_FIELD,
            code="invalid_schema",
        ) from None
    finally:
        await close_stream(stream)


async def _refused(error: RequestError) -> AsyncIterator[str]:
    """A stream that fails at once with the client's ``error`` (not the provider's)."""
    raise error
    yield ""  # an async generator: the error comes when the stream is read
