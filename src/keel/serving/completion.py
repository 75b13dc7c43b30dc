"""``POST /v1/completions``, both shapes: Tabby's (an editor at the cursor) and
OpenAI's (a raw prompt), from admission to the recorded event.

A Tabby request reads top to bottom in :meth:`CompletionServing.serve_tabby`
and :meth:`CompletionServing._complete`: read the request, supersede the
editor's older request for the same file, wait for a slot, then per router
attempt build the prompt for that provider (a shorter one if the last was too
long), generate up to the first stop word, postprocess, record. The client
going away cancels all of it, queued or running. An OpenAI prompt is the
caller's own: it is sent as written, and one over the model's context is the
caller's 400, never a provider failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from fastapi.responses import Response
from starlette.requests import Request

from keel.errors import RequestError
from keel.events import EventStore
from keel.ops.metrics import Metrics
from keel.pipeline.completion import (
    AnswerEnds,
    TabbyPrompts,
    TabbyTask,
    ended,
    read_until_stop,
)
from keel.pipeline.cut import after_cut, whitespace_cut
from keel.pipeline.languages import UNKNOWN, find_language
from keel.pipeline.postprocess import is_mid_line
from keel.pipeline.prompt import normalize_newlines, render_template, restore_newlines
from keel.providers.base import (
    CompletionCall,
    CompletionProvider,
    GenerationParams,
    Provider,
    Reported,
)
from keel.router.admission import Admission, Superseder
from keel.router.router import RoleRouter
from keel.schemas.openai import CompletionRequest
from keel.schemas.tabby import Choice, TabbyCompletionRequest, TabbyCompletionResponse
from keel.serving.lifecycle import (
    SUPERSEDED_KEY,
    CancelOnDisconnect,
    Envelope,
    Generated,
    JsonResponse,
    OpenStream,
    count_usage,
    finish_reason,
    generate_text,
    header_text,
    note_provider,
    stream_text,
    total_timeout,
)
from keel.serving.streaming import stream_response
from keel.serving.typed_cache import Flight, Flights, Place, Suggestion, TypedCache

ChoiceShape = Callable[[str, str | None], list[dict[str, object]]]
T = TypeVar("T")

log = logging.getLogger("keel.completion")


@dataclass(frozen=True, slots=True)
class Answer:
    """A Tabby completion and where it came from: ``source`` is "model", "cache"
    (typed through an earlier suggestion) or "inflight" (a generation it joined)."""

    response: TabbyCompletionResponse
    provider: str
    """The provider whose model made the text (earlier, for the cache)."""
    source: str
    served_by: Provider | None = None
    """The provider that worked for this request, if one did."""
    reported: Reported | None = None
    """What the engine said of the model work this answer took (none for a typed-through
    answer)."""

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Keel-Provider": header_text(self.provider), "X-Keel-Source": self.source}


class CompletionServing:
    def __init__(
        self,
        router: RoleRouter,
        admission: Admission,
        superseder: Superseder,
        prompts: TabbyPrompts,
        *,
        events: EventStore,
        metrics: Metrics,
        timeout: float,
        precompute: bool = True,
    ) -> None:
        """``precompute``: compute the next suggestion ahead while the local engine idles."""
        self.router = router
        self.admission = admission
        self.superseder = superseder
        self.prompts = prompts
        self.events = events
        self.metrics = metrics
        self.timeout = timeout
        self.precompute = precompute
        self.cache = TypedCache()
        self.flights = Flights()
        self.unknown_languages: set[str] = set()

    # Tabby -------------------------------------------------------------------

    async def serve_tabby(self, http: Request, body: TabbyCompletionRequest) -> Response:
        answer = await self.complete(http, body)
        if answer is None:
            return _superseded()
        return JsonResponse(answer.response.model_dump(exclude_none=True), headers=answer.headers)

    async def complete(
        self,
        http: Request,
        body: TabbyCompletionRequest,
        max_tokens: int | None = None,
        ends: AnswerEnds | None = None,
    ) -> Answer | None:
        """A Tabby completion, served and recorded; None when a newer request from the
        same editor superseded it. Also serves llama.cpp's ``/infill`` (its body read
        as a Tabby request, its ``n_predict`` as ``max_tokens``, its ``stop``,
        ``n_indent`` and ``t_max_predict_ms`` as ``ends``)."""
        async with CancelOnDisconnect(http):
            with self.admission.arrival():
                editor = editor_of(http, body)
                task = await self.prompts.read(body, max_tokens, editor=editor, ends=ends)
                if task.language is UNKNOWN and body.language:
                    self._note_language(body.language)
                key = None if body.segments is None else (editor, body.segments.filepath or "")
                # A capped answer is generated for this request: a cached or running one
                # is as long as keel's budget made it.
                place = None if self._caps(max_tokens) else _place(key, task)
                answer = await self._supersede(key, body, self.answer(task, place))
            if answer is None:
                setattr(http.state, SUPERSEDED_KEY, True)
                return None
        response = answer.response
        await self.events.record(
            "completion",
            completion_id=response.id,
            # its canonical name, as the metrics fold it: the raw id made a row of the
            # acceptance figures for each of a client's made-up languages
            language=task.language.name,
            data={
                "provider": answer.provider,
                "source": answer.source,
                "chars": len(response.choices[0].text),
            },
        )
        self.metrics.completion_event("served", body.language)
        note_provider(http, answer.served_by)
        return answer

    def _caps(self, max_tokens: int | None) -> bool:
        """Whether a client's cap on new tokens is below keel's own budget (that of the
        role's primary)."""
        primary = self.router.primary
        budget = self.prompts.max_decoding_tokens
        if budget is None and isinstance(primary, CompletionProvider):
            budget = primary.default_max_tokens
        return max_tokens is not None and max_tokens < (budget or 0)

    def _note_language(self, language_id: str) -> None:
        """A request completed without language rules: counted when keel has none for
        its id (not for plain text), each id logged the first time (up to 256)."""
        if find_language(language_id) is not None:
            return
        self.metrics.unknown_languages.inc()
        if language_id not in self.unknown_languages and len(self.unknown_languages) < 256:
            self.unknown_languages.add(language_id)
            log.warning(
                "language id %r: keel has no rules for it, completing without them (a "
                "generic prompt and stop words); counted in "
                "keel_completions_unknown_language_total",
                language_id,
            )

    async def _supersede(
        self, key: Hashable | None, body: TabbyCompletionRequest, work: Awaitable[T]
    ) -> T | None:
        """Run ``work`` as the editor's current request (``key``): a newer one typed on
        from it cancels it, and then this returns None."""
        running = asyncio.ensure_future(work)
        if key is not None and body.segments is not None:
            where = (body.segments.prefix, body.segments.suffix or "")
            self.superseder.claim(key, running, where, lambda there: types_on(there, where))
        try:
            return await running
        except asyncio.CancelledError:
            if running.cancelled() and not _cancelling():
                self.superseder.superseded += 1
                return None
            running.cancel()
            raise
        finally:
            if key is not None:
                self.superseder.release(key, running)

    def answer(self, task: TabbyTask, place: Place | None) -> Awaitable[Answer]:
        """The answer to ``task``: typed through a suggestion, from a generation in
        flight, or from the model, in that order. The cache and the flight are
        looked up now, before this request supersedes the editor's older one, so
        the flight it joins is not cancelled under it."""
        if place is None:
            return self._generate(task, None)
        hit = self.cache.rest(place, task.prefix, task.suffix)
        if hit is not None:
            return self._settled(self._from_cache(task, place, hit, "cache"))
        flight = self.flights.join(place, task.prefix, task.suffix)
        if flight is not None and flight.precompute and task.ends is not None:
            # Idle-time work runs to keel's budget: a client with its own ends (llama.vim's
            # time limit, its line's indentation) waited for all of it.
            flight.leave()
            flight = None
        if flight is None:
            return self._generate(task, place)
        joined = asyncio.ensure_future(self._after_flight(task, place, flight))
        joined.add_done_callback(lambda _: flight.leave())
        return joined

    async def _settled(self, answer: Answer) -> Answer:
        return answer

    async def _after_flight(self, task: TabbyTask, place: Place, flight: Flight) -> Answer:
        await flight.wait()
        hit = self.cache.rest(place, task.prefix, task.suffix)
        if hit is not None:
            return self._from_cache(task, place, hit, "inflight")
        return await self._generate(task, place)

    def _from_cache(
        self, task: TabbyTask, place: Place, hit: tuple[str, Suggestion], source: str
    ) -> Answer:
        rest, suggestion = hit
        if suggestion.ahead and task.prefix == suggestion.prefix:  # shown now, as any other
            self.cache.put(place, dataclasses.replace(suggestion, ahead=False))
        else:  # shown here: the same request again goes to the model
            shown = Suggestion(task.prefix, task.suffix, rest, suggestion.provider)
            self.cache.put(place, shown)
        response = TabbyCompletionResponse(
            id=f"cmpl-{uuid.uuid4()}",
            choices=[Choice(index=0, text=restore_newlines(rest, task.crlf))],
        )
        self.metrics.completion_served(source)
        self._precompute(task, place, rest)
        return Answer(response, suggestion.provider, source)

    async def _generate(self, task: TabbyTask, place: Place | None) -> Answer:
        """Model work, as a flight others may join; a precompute gives way at once."""
        self.flights.cancel_precomputes()
        if place is None:
            response, provider, reported = await self._complete(task)
            self.metrics.completion_served("model")
            return Answer(response, provider.name, "model", provider, reported)
        flight = Flight(place, task.prefix, task.suffix, precompute=False, waiters=1)
        try:
            answer: Answer = await asyncio.shield(
                self.flights.start(flight, self._fly(task, flight))
            )
        finally:
            flight.leave()
        self.metrics.completion_served("model")
        self._precompute(task, place, normalize_newlines(answer.response.choices[0].text)[0])
        return answer

    async def _fly(self, task: TabbyTask, flight: Flight, *, admitted: bool = True) -> Answer:
        """Generate for ``task`` as ``flight`` and keep the suggestion for typing through."""
        response, provider, reported = await self._complete(task, flight, admitted=admitted)
        text = normalize_newlines(response.choices[0].text)[0]
        suggestion = Suggestion(task.prefix, task.suffix, text, provider.name, flight.precompute)
        self.cache.put(flight.place, suggestion)
        return Answer(response, provider.name, "model", provider, reported)

    def _precompute(self, task: TabbyTask, place: Place, shown: str) -> None:
        """While the local engine is idle, compute the completion the user gets after
        accepting ``shown``; the next real request that cannot use it cancels it."""
        if not self.precompute or not shown or self.router.primary.info.kind != "local":
            return
        if self.admission.active or self.admission.waiting or self.flights.busy:
            return
        if any(endpoint.outstanding for endpoint in self.router.groups[0]):
            return  # its engine answers others (an OpenAI completion, a chat it serves too)
        accepted = task.prefix + shown
        if self.cache.holds(place, accepted, task.suffix) or self.flights.running_at(
            place, accepted, task.suffix
        ):
            return
        # Generated whole at idle time: a request with its own ends does not wait for it
        # (:meth:`answer`), and they are applied to what it is served from the cache.
        ahead = dataclasses.replace(
            task, prefix=accepted, mid_line=is_mid_line(accepted, task.suffix), ends=None
        )
        flight = Flight(place, accepted, task.suffix, precompute=True)
        self.flights.start(flight, self._fly(ahead, flight, admitted=False))

    async def _complete(
        self, task: TabbyTask, flight: Flight | None = None, *, admitted: bool = True
    ) -> tuple[TabbyCompletionResponse, Provider, Reported]:
        """The editor sees nothing before the end, so a provider failing mid-answer
        can still hand the whole request to the next one. A precompute takes no
        admission slot: it runs only when none is taken, and gives way at once."""
        slot = self.admission.slot() if admitted else contextlib.nullcontext()
        async with slot, total_timeout(self.timeout, "completion"):
            attempts = self.router.attempts(shrinkable=task.raw_prompt is None)
            degraded = False
            async for attempt in attempts:
                async with attempt:
                    provider = attempt.provider
                    assert isinstance(provider, CompletionProvider)
                    pressured = self.admission.under_pressure
                    if pressured and not degraded:
                        degraded = True
                        self.admission.note_degraded()
                    built, call = await attempt.call(
                        self.prompts.call_for(
                            task, provider, shrink=attempt.shrink, pressured=pressured
                        )
                    )
                    pieces = attempt.pieces(provider.stream_completion(call))
                    stream = ended(built.generated(pieces), task.ends)
                    if flight is not None:
                        stream = flight.recording(stream)
                    raw = await read_until_stop(stream, call.params.stop)
        call.reported.trimmed = built.trimmed
        return self.prompts.respond(task, raw, built), provider, call.reported

    async def aclose(self) -> None:
        """Stop the generations still running (precomputes, abandoned flights)."""
        await self.flights.aclose()

    # OpenAI ------------------------------------------------------------------

    async def serve_openai(
        self,
        http: Request,
        body: CompletionRequest,
        *,
        must_fit: bool = True,
        ends: AnswerEnds | None = None,
    ) -> Response:
        """``must_fit``: as :meth:`CompletionRequest.to_params`; ``ends``: the client's
        own ends of the answer (llama.cpp's ``/completion``)."""
        primary = self.router.primary
        assert isinstance(primary, CompletionProvider)
        self.flights.cancel_precomputes()  # a real request: idle-time work gives way
        max_tokens = self.prompts.max_decoding_tokens or primary.default_max_tokens
        params = body.to_params(max_tokens, must_fit=must_fit)
        if ends is not None:
            params = ends.engine_params(params)
        envelope = Envelope(
            f"cmpl-{uuid.uuid4()}",
            "text_completion",
            int(time.time()),
            primary.info.model,
        )

        def choice(text: str, finish: str | None) -> list[dict[str, object]]:
            return [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]

        async with CancelOnDisconnect(http):
            if body.stream:
                return await self._stream_openai(http, body, params, envelope, choice, ends)
            reported = Reported()
            open_stream = _openai_call(body, params, reported)
            generated = await generate_text(self.router, self.admission, open_stream, params, ends)
        await count_usage(generated, body.prompt_text, reported)
        note_provider(http, generated.provider)
        envelope.served(generated.provider, reported)
        finish = finish_reason(generated, params.max_tokens)
        return JsonResponse(envelope(choice(generated.text, finish), usage=generated.usage()))

    async def _stream_openai(
        self,
        http: Request,
        body: CompletionRequest,
        params: GenerationParams,
        envelope: Envelope,
        choice: ChoiceShape,
        ends: AnswerEnds | None,
    ) -> Response:
        generated = Generated()
        reported = Reported()
        pieces = stream_text(
            self.router,
            self.admission,
            _openai_call(body, params, reported),
            params,
            generated,
            ends,
        )

        async def tail() -> list[dict[str, object]]:
            await count_usage(generated, body.prompt_text, reported)
            last = [envelope(choice("", finish_reason(generated, params.max_tokens)))]
            if body.stream_options is not None and body.stream_options.include_usage:
                last.append(envelope([], usage=generated.usage()))
            return last

        def head() -> list[dict[str, object]]:  # the first piece is in: its provider known
            note_provider(http, generated.provider)
            envelope.served(generated.provider, reported)
            return []

        return await stream_response(
            pieces,
            head=head,
            chunk=lambda text: envelope(choice(text, None)),
            tail=tail,
        )


def _openai_call(
    body: CompletionRequest, params: GenerationParams, reported: Reported
) -> OpenStream:
    """The caller's prompt as written, but for whitespace at its end, which the model
    writes itself (:func:`~keel.pipeline.cut.whitespace_cut`); a FIM suffix goes
    through the provider's own suffix field or its template.
    ``reported``: what the serving engine counted."""
    prompt, suffix = body.prompt_text(), body.suffix
    cut = whitespace_cut(prompt, suffix or "", params.stop)
    prompt = prompt[: len(prompt) - len(cut.text)]

    def open_stream(provider: Provider) -> AsyncIterator[str]:
        assert isinstance(provider, CompletionProvider)
        text, fim = prompt, suffix
        if fim and not provider.supports_suffix:
            if provider.prompt_template is not None:
                text = render_template(provider.prompt_template, text, fim)
            elif fim.strip() or not text:
                # Answered without it, the client read the answer as one that had read it
                # (as it would echo or logprobs); a suffix of whitespace alone says nothing.
                raise RequestError(
                    f"{provider.info.model} cannot read the suffix (it has no fill-in-the-"
                    "middle template): send the text before the cursor alone, or serve a "
                    "model with a prompt_template",
                    param="suffix",
                )
            fim = None
        call = CompletionCall(text, params, fim or None, reported=reported)
        return after_cut(provider.stream_completion(call), cut)

    return open_stream


def editor_of(http: Request, body: TabbyCompletionRequest) -> str:
    """The client a request comes from: its key (an x-api-key client's too, which fell
    back to its address: one proxy's), else its address; its user and user agent.

    With the request's filepath it is the key of superseding: a newer completion for
    the same editor and file supersedes an older one. Without a filepath (tabby-agent
    1.5 sends none) the key is the editor alone: a person types in one place at a time,
    so the newer request is the one awaited, when it types on from the older one
    (:func:`types_on`)."""
    who = getattr(http.state, "key_id", None) or http.headers.get("authorization")
    who = who or (http.client.host if http.client else "")
    return f"{who}|{body.user or ''}|{http.headers.get('user-agent', '')}"


EDIT_REACH = 64
"""Characters at the end of an earlier prefix that later keystrokes may have changed."""
SUFFIX_TELLS = 24
"""Characters (not blank) an unchanged suffix needs to tell the same person typing: the
end of a Go or JavaScript file, ``"\n}\n"``, is everyone's."""


def types_on(old: tuple[str, str], new: tuple[str, str]) -> bool:
    """Whether the request at ``new`` (its prefix and suffix) is the same person typing
    on from ``old``: the text after the cursor unchanged, or the earlier text before it
    still there. An editor's key is shared (a team's one key, or none behind a proxy):
    a colleague's request elsewhere superseded this one, and they lost completions in
    proportion to how busy the team was."""
    (old_prefix, old_suffix), (new_prefix, new_suffix) = old, new
    # not a file's end: "\n" for all, "\n}\n" for every Go file (a colleague's keystroke
    # in another file cancelled this one)
    if len("".join(old_suffix.split())) >= SUFFIX_TELLS and old_suffix == new_suffix:
        return True
    # (below the reach, no text is kept: [:-30] kept a 34-character prefix's first 4, and
    # any file holding those went on from it)
    kept = old_prefix[: max(0, len(old_prefix) - EDIT_REACH)]
    if len(kept) < EDIT_REACH:
        # a file's first lines: their start unchanged, at the start (a kept "im" of a
        # 66-character prefix was found in any file holding it, anywhere: a colleague's
        # JavaScript cancelled this Python)
        head = max(kept, old_prefix[: len(old_prefix) // 2], key=len)
        return bool(head.strip()) and new_prefix.startswith(head)
    return kept[-EDIT_REACH:] in new_prefix  # the window's start moves as lines are added


def _place(key: tuple[str, str] | None, task: TabbyTask) -> Place | None:
    """Where ``task``'s suggestions may be typed through (None: never cached, as a raw
    prompt, or a request asking for its prompt or snippets back)."""
    debug = task.request.debug_options
    if key is None or task.raw_prompt is not None:
        return None
    if debug is not None and (
        debug.return_prompt
        or debug.return_snippets
        # the model alone: a suggestion made with snippets was served from the cache
        or debug.disable_retrieval_augmented_code_completion
    ):
        return None
    return (*key, task.language.name)


def _superseded() -> Response:
    """What a superseded request gets: an empty completion, which editors just don't show."""
    response = TabbyCompletionResponse(
        id=f"cmpl-{uuid.uuid4()}", choices=[Choice(index=0, text="")]
    )
    return JsonResponse(response.model_dump(exclude_none=True), headers={"X-Keel-Superseded": "1"})


def _cancelling() -> bool:
    """Is this handler itself being cancelled (client gone, shutdown)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
