"""The one interface every model backend implements.

A provider serves one or more roles. Completion and chat stream text pieces
(``AsyncIterator[str]``), one piece per token or, when several tokens arrived
together, their text joined (:func:`joined`); a chat model's tool calls come as
:class:`Parts` pieces, as does a thinking model's reasoning. Closing the iterator
early (the client went away) must cancel the work upstream. Failures are raised as the ``Upstream*``
classes of :mod:`keel.errors`, never as the transport's own exceptions, so
the router can classify them without knowing the backend.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.pipeline.prompt import Markup
    from keel.rate_limit import RateLimiter


class Joined(str):
    """Pieces that arrived together, joined; ``pieces`` of them (the token metrics
    count tokens, not pieces)."""

    pieces: int


class Parts(Joined):
    """A piece that carries more than answer text: parts of the tool calls a chat model
    is making (OpenAI's ``delta.tool_calls`` entries, as the backend sent them) after its
    text, if any, and the reasoning a thinking model streams before it answers
    (``delta.reasoning_content``, as vLLM's reasoning parsers and llama.cpp's server send
    it).

    It is a ``str`` (its text) so that every layer that passes pieces on passes it on;
    the layers that join pieces keep the parts (:func:`joined`)."""

    deltas: tuple[dict[str, Any], ...]
    reasoning: str


def parts(
    text: str, deltas: Sequence[dict[str, Any]] = (), reasoning: str = "", pieces: int = 1
) -> Parts:
    piece = Parts(text)
    piece.deltas = tuple(deltas)
    piece.reasoning = reasoning
    piece.pieces = pieces
    return piece


def joined(texts: list[str]) -> str:
    """One piece for the texts one read brought: it goes up the layers above once.
    Tool-call parts and reasoning among them stay, in order. No texts: no text."""
    if len(texts) == 1:
        return texts[0]
    pieces = sum(piece_count(text) for text in texts)
    extras = [text for text in texts if isinstance(text, Parts)]
    if extras:
        calls = by_call([delta for text in extras for delta in text.deltas])
        return parts("".join(texts), calls, "".join(text.reasoning for text in extras), pieces)
    piece = Joined("".join(texts))
    piece.pieces = pieces
    return piece


def by_call(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call parts, one entry per call ``index``: the parts of a call that came in
    one read are joined (its ``arguments`` in order), as OpenAI streams them. Two entries
    with one index in a delta lost a client that reads one entry per call its name and
    pieces of its arguments."""
    merged: dict[object, dict[str, Any]] = {}
    for delta in deltas:
        index = delta.get("index")
        into = merged.get(index) if index is not None else None
        if into is None:
            merged[index if index is not None else object()] = {
                **delta,
                **({"function": dict(delta["function"])} if delta.get("function") else {}),
            }
            continue
        for key in ("id", "type"):
            if delta.get(key) and not into.get(key):
                into[key] = delta[key]
        function, part = into.setdefault("function", {}), delta.get("function") or {}
        if part.get("name") and not function.get("name"):
            function["name"] = part["name"]
        if part.get("arguments"):
            function["arguments"] = (function.get("arguments") or "") + part["arguments"]
    return list(merged.values())


def piece_count(piece: object) -> int:
    """How many of a backend's pieces (tokens, for most) ``piece`` holds; none in a part
    of an embedding batch (:meth:`EmbeddingProvider.embed_parts`)."""
    if isinstance(piece, Joined):
        return piece.pieces
    return 1 if isinstance(piece, str) else 0


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int | None
    """None: as many as the backend gives (to the end of the context), as OpenAI does
    when a chat names no limit."""
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_tokens_name: str = "max_tokens"
    """The name the client gave the limit, sent on to OpenAI-style chat backends
    (OpenAI's reasoning models take only ``max_completion_tokens``)."""
    limit_said: str | None = None
    """The client's own name for the limit where keel sends it on under another
    (llama.cpp's ``n_predict``, sent as ``max_tokens``): a backend's refusal of the
    limit names it (it named ``max_tokens``, which the client had not sent)."""
    limit_must_fit: bool = False
    """The client named an OpenAI limit: with the prompt it must fit the context, else
    a 400 (OpenAI's and vLLM's rule), where an answer cut short at the context's end
    read as one that had used its limit. False (Tabby's, llama.cpp's ``n_predict``): the
    answer ends where the context does."""
    max_predict_ms: int | None = None
    """llama.cpp's ``t_max_predict_ms``, for the engines that apply it token by token
    (keel's local engine, a llama.cpp server): the answer ends at the first new line
    once this long has passed since its first token. keel applies it too, piece by piece
    (:class:`keel.pipeline.completion.AnswerEnds`), where tokens may come joined."""

    @property
    def limit_name(self) -> str:
        """The client's name for the limit."""
        return self.limit_said or self.max_tokens_name


LLAMACPP_RANDOM_SEED = 2**32 - 1
"""llama.cpp's seeds are 32-bit, and this one asks it for a random seed."""


def llamacpp_seed(seed: int | None) -> int | None:
    """A client's seed (OpenAI's are 64-bit) as llama.cpp takes it. One that fits
    stays itself; any other is hashed to one that fits, never the random one. The
    engine cut seeds to 32 bits: 0, 2**32 and 2**40 gave the same text, and 2**32 - 1
    (and -1) a random one."""
    if seed is None or 0 <= seed < LLAMACPP_RANDOM_SEED:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(8, "little", signed=True), digest_size=8).digest()
    return int.from_bytes(digest, "little") % LLAMACPP_RANDOM_SEED


SLOT_WAIT: ContextVar[Callable[[bool], None] | None] = ContextVar("keel_slot_wait", default=None)
"""Told, by a provider whose engine queues requests for its slots (a local worker), True
when the request being read begins to wait for one and False when it has one: the
router's attempt starts the first token's time limit then, and a limit passed while
waiting is the engine's load, not its failure."""


CACHE_FIGURES_SHOWN: ContextVar[bool] = ContextVar("keel_cache_figures_shown", default=True)
"""Whether the answer may say how much of its prompt an engine's cache held
(``cached_tokens``, llama.cpp's ``cache_n``): not on a keel several people share, whose
prompts share the engines' caches. The figure told one person, token by token, how much
of a colleague's recent prompt theirs matched: a key's 6 digits in 60 requests. (How
fast the prompt was read still tells some of it.)"""


UNSUPPORTED = "unsupported_for_model"
"""The code of a request a model (a local one) cannot serve as asked: the client's error, no
upstream's (no backend was called) and no failure of the provider's."""

OPENAI_ONLY = frozenset(
    {
        "service_tier",
        "prompt_cache_key",
        "store",
        "metadata",
        "safety_identifier",
        "web_search_options",
    }
)
"""Fields of a chat that OpenAI's own API defines, passed on to it alone (Mistral's API
has none of them)."""
PASSED_ON = frozenset({"reasoning_effort", "prediction", "verbosity", *OPENAI_ONLY})
"""Fields of a chat an OpenAI-compatible backend gets as the client sent them."""


@dataclass(slots=True)
class Reported:
    """What the engine that served a call said of it, where its provider can tell:
    the tokens it counted (a local model's templated prompt; a backend's ``usage``) and
    why it stopped (OpenAI's ``finish_reason``: ``stop``, ``length``,
    ``content_filter``, ...). None where it did not say: keel counts or infers it."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    model: str | None = None
    """The model the backend named in its answer (OpenAI's ``model``)."""
    system_fingerprint: str | None = None
    """The backend configuration it named (OpenAI's ``system_fingerprint``, which a
    client holding ``seed`` compares to know whether answers can repeat)."""
    cached_tokens: int | None = None
    """Of ``prompt_tokens``, those the engine took from its cache instead of reading."""
    prompt_ms: float | None = None
    """The engine's time reading the prompt (llama.cpp's ``timings.prompt_ms``)."""
    trimmed: bool = False
    """keel left some of the client's text out of the prompt it built, for its budget
    (set by keel, not the engine: no attempt clears it)."""

    def clear(self) -> None:
        """Forget what an earlier attempt's engine said (a fallback starts afresh)."""
        self.prompt_tokens = self.completion_tokens = self.finish_reason = self.model = None
        self.system_fingerprint = None
        self.cached_tokens = self.prompt_ms = None

    def note_timings(self, timings: object) -> None:
        """Take the figures of llama.cpp's ``timings`` (its server's last chunk): the
        prompt's (:meth:`note_prompt`) and the tokens generated."""
        if isinstance(timings, dict):
            self.note_prompt(timings)
            predicted = _count(timings.get("predicted_n"))
            self.completion_tokens = predicted or self.completion_tokens

    def note_prompt(self, timings: object) -> None:
        """Take the prompt's figures of llama.cpp's ``timings``, which its server also
        sends with each piece when asked (``timings_per_token``): the tokens read
        (``prompt_n``) and taken from the cache (``cache_n``), the time reading took."""
        if not isinstance(timings, dict):
            return
        read, cached = _count(timings.get("prompt_n")), _count(timings.get("cache_n"))
        if read is not None:
            self.cached_tokens = cached or 0
            self.prompt_tokens = read + self.cached_tokens
        took = timings.get("prompt_ms")
        if isinstance(took, int | float) and not isinstance(took, bool):
            self.prompt_ms = float(took) if math.isfinite(took) and took >= 0 else None

    def note_usage(self, usage: object) -> None:
        """Take the counts of an OpenAI ``usage`` object (positive integers only; the
        cached tokens of its ``prompt_tokens_details``, as OpenAI and vLLM send them)."""
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens"):
            if value := _count(usage.get(name)):
                setattr(self, name, value)
        details = usage.get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is not None:
            self.cached_tokens = cached


def _count(value: object) -> int | None:
    """``value`` if it is a count of tokens (an integer, not negative)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass(frozen=True, slots=True)
class CompletionCall:
    """A raw completion: ``prompt`` is final, already templated and truncated.

    ``suffix`` is set only for providers with native fill-in-the-middle
    (``supports_suffix``); they receive the prefix as ``prompt``.
    """

    prompt: str
    params: GenerationParams
    suffix: str | None = None
    reported: Reported = field(default_factory=Reported, compare=False)
    markup: Markup | None = None
    """Where a prompt keel built holds its own text (:data:`~keel.pipeline.prompt.Markup`):
    the rest is the user's, which a provider that can reads as text even where it spells a
    control token. None: a client's prompt, read as it wrote it (markers and all)."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    """An assistant's calls of the request's tools, in OpenAI's form."""
    tool_call_id: str | None = None
    """A tool message: the call whose result it holds."""
    parts: tuple[dict[str, Any], ...] = ()
    """The content as OpenAI's parts, when it holds images (``content`` is its text)."""
    name: str | None = None
    """Who said it, among several of one role (OpenAI's ``name``)."""

    def wire(self) -> dict[str, Any]:
        """The message in OpenAI's form."""
        content = list(self.parts) if self.parts else self.content
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


@dataclass(frozen=True, slots=True)
class ChatCall:
    messages: tuple[ChatMessage, ...]
    params: GenerationParams
    response_format: dict[str, Any] | None = field(default=None, compare=False)
    """OpenAI's ``response_format`` (JSON, or JSON to a schema) as the backend takes it."""
    tools: dict[str, Any] | None = field(default=None, compare=False)
    """OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, as sent on to a
    backend that calls tools (OpenAI-compatible ones); a local model answers in text."""
    passed_on: dict[str, Any] | None = field(default=None, compare=False)
    """Fields an OpenAI-compatible backend gets as sent (``reasoning_effort``, ...)."""
    reported: Reported = field(default_factory=Reported, compare=False)
    model: str | None = field(default=None, compare=False)
    """The model the client asked for: sent on by a backend that lists it among its
    ``supported_models`` (Tabby's rule), else the backend's configured model serves."""


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """What a provider is, for /v1/health, /v1/models and `keel models`."""

    name: str
    kind: str
    model: str
    endpoint: str | None = None
    details: dict[str, object] = field(default_factory=dict)


def estimate_tokens(text: str) -> int:
    """Token count estimate for backends whose tokenizer keel cannot see.

    Code averages a little over three bytes per token in BPE vocabularies;
    erring high keeps prompts inside the backend's window. Half a surrogate pair (in a
    backend's tool-call arguments) counts as the three bytes it would take.
    """
    return (len(text.encode("utf-8", "surrogatepass")) + 2) // 3


async def close_stream(stream: AsyncIterator[str]) -> None:
    """Close a provider's stream early; for generators this runs their cleanup,
    which is how keel cancels the work upstream."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class Provider(ABC):
    info: ProviderInfo
    rate_limiter: RateLimiter | None = None
    """The configured ``rate_limit`` keel keeps for this provider (HTTP ones only)."""

    @property
    def name(self) -> str:
        return self.info.name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (a worker process); called once in the app's lifespan."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and processes."""

    def status(self) -> dict[str, object]:
        """A JSON-able snapshot of this provider's state."""
        return {"state": "ok"}

    answers_while_busy = False
    """Whether :meth:`ping` is answered at once even while generations run, so the
    health check can ask it while requests are in flight."""

    async def ping(self) -> None:
        """A check that the backend answers at all, cheaper than a token (optional)."""
        raise NotImplementedError


class CompletionProvider(Provider):
    supports_suffix: bool = False
    """True when the backend does fill-in-the-middle itself from ``prompt`` + ``suffix``."""

    prompt_template: str | None = None
    """FIM template (``{prefix}``/``{suffix}``) keel applies before sending, if any."""

    stop_words: tuple[str, ...] = ()
    """Provider-specific stop words (``additional_stop_words``)."""

    max_input_length: int | None = None
    """This provider's own prompt budget (its config), overriding everything else."""

    default_input_budget: int = 2048
    """Prompt budget when nothing is configured: model servers read prompts fast."""

    default_max_tokens: int = 64

    def context_tokens(self) -> int | None:
        """The model's context in tokens where keel knows it (a local worker's): a prompt
        is built to fit it with the answer, not refused by the engine and built again."""
        return None

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts`` in this model's vocabulary (estimated by default)."""
        return [estimate_tokens(text) for text in texts]

    @abstractmethod
    def stream_completion(self, call: CompletionCall) -> AsyncIterator[str]: ...


class ChatProvider(Provider):
    @abstractmethod
    def stream_chat(self, call: ChatCall) -> AsyncIterator[str]: ...


class EmbeddingProvider(Provider):
    @abstractmethod
    async def embed(
        self, texts: Sequence[str], reported: Reported | None = None
    ) -> list[list[float]]:
        """``texts``' vectors; ``reported`` gets the tokens the backend said it read,
        where it says (OpenAI's ``usage``)."""

    async def embed_parts(
        self,
        texts: Sequence[str],
        reported: Reported | None = None,
        dimensions: int | None = None,
    ) -> AsyncIterator[list[list[float]]]:
        """``texts``' vectors in order, in parts as they are made: each part is progress
        for the router's between-token deadline, and closing the iterator sends no more
        work. One part unless the provider splits the work. ``dimensions``: the size the
        client asked for, which a backend that makes vectors of a chosen size is sent
        (OpenAI's, Voyage's); any other makes its model's own size."""
        yield await self.embed(texts, reported)


def token_groups(
    texts: Sequence[str], budget: int, counts: Sequence[int] | None = None
) -> list[Sequence[str]]:
    """``texts`` in consecutive groups of at most ``budget`` tokens (an input over it
    alone in its group): ``counts`` where the model's tokenizer gave them, else
    estimated."""
    groups: list[Sequence[str]] = []
    start, size = 0, 0
    for index, text in enumerate(texts):
        tokens = estimate_tokens(text) if counts is None else counts[index]
        if index > start and size + tokens > budget:
            groups.append(texts[start:index])
            start, size = index, 0
        size += tokens
    if start < len(texts):
        groups.append(texts[start:])
    return groups
