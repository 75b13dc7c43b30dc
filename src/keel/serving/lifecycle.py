"""What every serving object does the same way: cancel work whose client has
gone, bound a request's total time, run a text generation over the router's
attempts, count usage, and shape OpenAI's answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse

from keel import jsoncodec
from keel.errors import ClientDisconnected, CompletionTimeout, KeelError, Overloaded
from keel.pipeline.completion import AnswerEnds, ended, read_until_stop, until_stop
from keel.providers.base import (
    CACHE_FIGURES_SHOWN,
    CompletionProvider,
    GenerationParams,
    Parts,
    Provider,
    Reported,
    estimate_tokens,
)
from keel.router.admission import Admission
from keel.router.attempt import DEADLINE, TRIAL
from keel.router.router import RoleRouter

log = logging.getLogger("keel.serving")

PROVIDER_KEY = "keel_provider"
"""Where a request's ``state`` names the provider that served it (for the metrics)."""

FAILURE_KEY = "keel_failure"
"""Where a request's ``state`` says why keel failed it (a 5xx), for its access-log line."""

SUPERSEDED_KEY = "keel_superseded"
"""Where a request's ``state`` says the same editor's next keystroke superseded it: counted
in ``keel_superseded_total`` as ``/v1/providers`` counts it, answered or not (an editor
closes the older request's connection itself, and those were counted nowhere)."""

KEY_LIMITED = "keel_key_limited"
"""Where a request's ``state`` says its key was over ``[auth] requests_per_minute``: the
client's own limit, no failure of keel's (the status page's errors counted them)."""


def note_provider(http: Request, provider: Provider | None) -> None:
    """Label this request's metrics with the provider that served it (a fallback, maybe)."""
    if provider is not None:
        setattr(http.state, PROVIDER_KEY, provider.name)


OpenStream = Callable[[Provider], AsyncIterator[str]]
"""Begin a generation on the provider an attempt picked."""


class CancelOnDisconnect:
    """Cancel the current task when the HTTP client disconnects, queued or running
    (as vLLM's ``with_cancellation``); the task then raises ClientDisconnected.

    Once the request body is read, the next ASGI message can only be the
    disconnect, so a watcher waits for it. A streamed answer is watched until
    its response starts; after that, writing to a closed connection ends it.
    """

    def __init__(self, http: Request) -> None:
        self._http = http
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._fired = False

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch(), name="disconnect-watcher")

    async def _watch(self) -> None:
        while (await self._http.receive())["type"] != "http.disconnect":
            pass
        self._fired = True
        if self._task is not None:
            self._task.cancel("client disconnected")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._fired and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            assert self._task is not None
            if self._task.uncancel() == 0:
                # Counted as the provider's 499, as a stream is (a plain one had none)
                trial = TRIAL.get()
                trying = trial.trying if trial is not None else None
                if trying and not getattr(self._http.state, PROVIDER_KEY, 0):
                    setattr(self._http.state, PROVIDER_KEY, trying)
                raise ClientDisconnected("the client closed the connection") from None


@contextlib.asynccontextmanager
async def total_timeout(seconds: float, role: str) -> AsyncIterator[None]:
    """A code completion's whole generation, however many attempts it takes
    (``[server] completion_timeout``; keel sets its length); its end is the failure of
    the provider the last attempt was on (it was the role's name, in the error,
    ``X-Keel-Provider`` and the metrics)."""
    limit = asyncio.get_running_loop().time() + seconds
    token = DEADLINE.set(limit)
    try:
        async with asyncio.timeout_at(limit):
            yield
    except TimeoutError:
        trial = TRIAL.get()
        provider = trial.trying if trial is not None else None
        if trial is not None and trial.held_by_load:  # no slot, or one late: engine's load
            busy = Overloaded(
                f"{provider}: every slot of its engine stayed busy for most of the "
                f"completion_timeout ({seconds:g}s), and the request never started or too "
                "late to finish; retry shortly",
                retry_after=1.0,
            )
            busy.provider = provider
            raise busy from None
        # the provider it ran out on may have had only what earlier failures left: said
        earlier = "; ".join(trial.failures if trial is not None else ())
        after = f", after {earlier}" if earlier else ""
        raise CompletionTimeout(
            f"generation took longer than {seconds:g}s{after} ([server] completion_timeout: "
            "raise it, or serve completions from a faster model)",
            provider=provider or role,
        ) from None
    finally:
        DEADLINE.reset(token)


@dataclass(slots=True)
class Generated:
    """A generation's text and who made it. Its pieces are joined when read: ``+=`` on
    an attribute copies the whole text each piece (an answer at its 16 MB limit took
    11 s of the event loop)."""

    pieces: list[str] = field(default_factory=list)
    provider: Provider | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    """Of the prompt's tokens, those the engine took from its cache, where it said."""
    engine_finish: str | None = None
    """Why the engine said it stopped (:attr:`Reported.finish_reason`), if it said."""
    tool_deltas: list[dict[str, Any]] = field(default_factory=list)
    """The parts of the tool calls a chat model made, as its backend sent them."""
    thoughts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def reasoning(self) -> str:
        """What a thinking model streamed as its reasoning before (or beside) its text."""
        return "".join(self.thoughts)

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        if isinstance(piece, Parts):
            self.tool_deltas.extend(piece.deltas)
            self.thoughts.append(piece.reasoning)

    def said(self) -> str:
        """What the model wrote: its reasoning, its text and its tool calls' arguments
        (for the count)."""
        functions = [delta.get("function") or {} for delta in self.tool_deltas]
        arguments = "".join(function.get("arguments") or "" for function in functions)
        return self.reasoning + self.text + arguments

    def usage(self) -> dict[str, Any]:
        """OpenAI's ``usage``, with ``prompt_tokens_details`` where the engine said."""
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens is not None and CACHE_FIGURES_SHOWN.get():
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


async def generate_text(
    router: RoleRouter,
    admission: Admission,
    open_stream: OpenStream,
    params: GenerationParams,
    ends: AnswerEnds | None = None,
) -> Generated:
    """A whole answer (the client waits for it): a provider failing mid-way still
    hands the request to the next one, as the client has seen nothing. ``ends``: the
    client's own ends of the answer (llama.cpp's ``n_indent``, ``t_max_predict_ms``).
    No time limit as a whole: the client asked for the answer's length (a chat's, an
    OpenAI completion's), and the router holds the backend to its first-token and stall
    limits. Cut at ``[server] completion_timeout``, a healthy backend asked for 1,500
    tokens was a 504, and five such requests opened its breaker for everyone."""
    async with admission.slot():
        attempts = router.attempts(limit_name=params.limit_name)
        async for attempt in attempts:
            async with attempt:
                pieces = ended(attempt.pieces(open_stream(attempt.provider)), ends)
                text = await read_until_stop(pieces, params.stop)
    generated = Generated(provider=attempts.provider)
    generated.add(text)
    return generated


async def stream_text(
    router: RoleRouter,
    admission: Admission,
    open_stream: OpenStream,
    params: GenerationParams,
    generated: Generated,
    ends: AnswerEnds | None = None,
) -> AsyncIterator[str]:
    """Pieces as they come; once one is out, the stream is that provider's alone.
    ``generated`` collects the text and the provider, for the usage at the end."""
    async with admission.slot():
        attempts = router.attempts(streaming=True, limit_name=params.limit_name)
        async for attempt in attempts:
            async with attempt:
                generated.provider = attempt.provider
                pieces = ended(attempt.pieces(open_stream(attempt.provider)), ends)
                async for piece in until_stop(pieces, params.stop):
                    generated.add(piece)
                    yield piece


async def count_tokens(provider: Provider | None, texts: list[str]) -> list[int]:
    """Token counts in the serving model's vocabulary: its tokenizer when keel can
    reach it, else an estimate. Counting never fails a request that was served."""
    if isinstance(provider, CompletionProvider):
        try:
            return await provider.count_tokens(texts)
        except KeelError as exc:
            log.info("token counts of %s estimated: %s", provider.name, exc.message)
    return [estimate_tokens(text) for text in texts]


async def count_usage(generated: Generated, prompt: Callable[[], str], reported: Reported) -> None:
    """Fill in ``generated``'s prompt and completion tokens as the engine ``reported``
    them (a chat's templated prompt; the tokens it generated, which a constrained
    answer's text may not retokenize to), else counted from ``prompt()`` and the text
    (the prompt's text is made only then: a chat's, with its tools' JSON, on every
    answer, for a count most backends give); and why the engine said it stopped."""
    prompt_tokens, completion_tokens = reported.prompt_tokens, reported.completion_tokens
    texts = [prompt()] if not prompt_tokens else []
    texts += [generated.said()] if not completion_tokens else []
    counts = iter(await count_tokens(generated.provider, texts) if texts else [])
    generated.prompt_tokens = prompt_tokens or next(counts)
    generated.completion_tokens = completion_tokens or next(counts)
    if prompt_tokens and reported.cached_tokens is not None:  # the engine's own counts
        generated.cached_tokens = min(reported.cached_tokens, prompt_tokens)
    generated.engine_finish = reported.finish_reason


LENGTH_REASONS = frozenset({"length", "model_length"})
"""Finish reasons that mean the answer was cut: OpenAI's, and Mistral's for a full
context."""


def finish_reason(generated: Generated, max_tokens: int | None) -> str:
    """As the engine said where it cut the answer (for length, by a content filter); else
    an answer that called tools ends for them; else, where the engine did not say, cut for
    length when it used the whole budget. A tool call cut for length said "tool_calls",
    and an agent ran the tool with the half of its arguments that came."""
    said = generated.engine_finish
    if said in LENGTH_REASONS:
        return "length"
    if said == "content_filter":
        return said
    if generated.tool_deltas:
        return "tool_calls"
    if said is None and max_tokens is not None and generated.completion_tokens >= max_tokens:
        return "length"
    return "stop"


@dataclass(slots=True)
class Envelope:
    """The fields every OpenAI response and chunk of one request repeats. ``model`` is
    the role's primary model until :meth:`served` names the one that answered."""

    id: str
    kind: str
    created: int
    model: str
    fingerprint: str | None = None
    """The backend's ``system_fingerprint``, passed on where it sent one (it was dropped)."""

    def served(self, provider: Provider | None, reported: Reported) -> None:
        """The model that answered: as its backend named it, else its provider's (it
        echoed what the client asked for, and named the primary after a fallback)."""
        if reported.model:
            self.model = reported.model
        elif provider is not None:
            self.model = provider.info.model
        self.fingerprint = reported.system_fingerprint

    def __call__(self, choices: list[dict[str, object]], **more: object) -> dict[str, object]:
        head = {"id": self.id, "object": self.kind, "created": self.created}
        if self.fingerprint is not None:
            head["system_fingerprint"] = self.fingerprint
        return {**head, "model": self.model, "choices": choices, **more}


_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_text(value: str) -> str:
    """``value`` as a response header may carry it: text outside printable ASCII as
    percent-encoded UTF-8. A provider named in another script (a model file
    ``模型.gguf``) made every Tabby completion and ``/infill`` a 500 once it had
    answered (Latin-1 could not encode the name), and other routes a ``local/??``."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=_HEADER_SAFE)


class JsonResponse(JSONResponse):
    """Starlette's JSON response, encoded by :func:`keel.jsoncodec.dumps` (a 32-input
    batch of 768-dim embeddings: 0.6 ms where Starlette's took 15.7)."""

    def render(self, content: Any) -> bytes:
        return jsoncodec.dumps(content)
