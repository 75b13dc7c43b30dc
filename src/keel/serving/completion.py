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
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from keel.events import EventStore
from keel.ops.metrics import Metrics
from keel.pipeline.completion import TabbyPrompts, TabbyTask, read_until_stop
from keel.pipeline.prompt import render_template
from keel.providers.base import CompletionCall, CompletionProvider, GenerationParams, Provider
from keel.router.admission import Admission, Superseder
from keel.router.router import RoleRouter
from keel.schemas.openai import CompletionRequest
from keel.schemas.tabby import Choice, TabbyCompletionRequest, TabbyCompletionResponse
from keel.serving.lifecycle import (
    CancelOnDisconnect,
    Envelope,
    Generated,
    OpenStream,
    count_usage,
    finish_reason,
    generate_text,
    note_provider,
    stream_text,
    total_timeout,
)
from keel.serving.streaming import stream_response, with_timeout

ChoiceShape = Callable[[str, str | None], list[dict[str, object]]]


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
    ) -> None:
        self.router = router
        self.admission = admission
        self.superseder = superseder
        self.prompts = prompts
        self.events = events
        self.metrics = metrics
        self.timeout = timeout

    # Tabby -------------------------------------------------------------------

    async def serve_tabby(self, http: Request, body: TabbyCompletionRequest) -> Response:
        async with CancelOnDisconnect(http):
            task = await self.prompts.read(body)
            work = asyncio.create_task(self._complete(task))
            key = editor_key(http, body)
            if key is not None:
                self.superseder.claim(key, work)
            try:
                response, provider = await work
            except asyncio.CancelledError:
                if work.cancelled() and not _cancelling():
                    return _superseded()
                work.cancel()
                raise
            finally:
                if key is not None:
                    self.superseder.release(key, work)
        await self.events.record(
            "completion",
            completion_id=response.id,
            language=body.language,
            data={"provider": provider.name, "chars": len(response.choices[0].text)},
        )
        self.metrics.completion_event("served", body.language)
        note_provider(http, provider)
        return JSONResponse(
            response.model_dump(exclude_none=True), headers={"X-Keel-Provider": provider.name}
        )

    async def _complete(self, task: TabbyTask) -> tuple[TabbyCompletionResponse, Provider]:
        """The editor sees nothing before the end, so a provider failing mid-answer
        can still hand the whole request to the next one."""
        async with self.admission.slot(), total_timeout(self.timeout, "completion"):
            attempts = self.router.attempts(shrinkable=task.raw_prompt is None)
            async for attempt in attempts:
                async with attempt:
                    provider = attempt.provider
                    assert isinstance(provider, CompletionProvider)
                    pressured = self.admission.under_pressure
                    built, call = await attempt.call(
                        self.prompts.call_for(
                            task, provider, shrink=attempt.shrink, pressured=pressured
                        )
                    )
                    stream = attempt.pieces(provider.stream_completion(call))
                    raw = await read_until_stop(stream, call.params.stop)
        return self.prompts.respond(task, raw, built), provider

    # OpenAI ------------------------------------------------------------------

    async def serve_openai(self, http: Request, body: CompletionRequest) -> Response:
        primary = self.router.primary
        assert isinstance(primary, CompletionProvider)
        max_tokens = self.prompts.max_decoding_tokens or primary.default_max_tokens
        params = body.to_params(max_tokens)
        envelope = Envelope(
            f"cmpl-{uuid.uuid4()}",
            "text_completion",
            int(time.time()),
            body.model or primary.info.model,
        )

        def choice(text: str, finish: str | None) -> list[dict[str, object]]:
            return [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]

        async with CancelOnDisconnect(http):
            if body.stream:
                return await self._stream_openai(http, body, params, envelope, choice)
            generated = await generate_text(
                self.router, self.admission, _openai_call(body, params), params.stop, self.timeout
            )
        await count_usage(generated, body.prompt_text())
        note_provider(http, generated.provider)
        finish = finish_reason(generated, params.max_tokens)
        return JSONResponse(envelope(choice(generated.text, finish), usage=generated.usage()))

    async def _stream_openai(
        self,
        http: Request,
        body: CompletionRequest,
        params: GenerationParams,
        envelope: Envelope,
        choice: ChoiceShape,
    ) -> Response:
        generated = Generated()
        pieces = stream_text(
            self.router, self.admission, _openai_call(body, params), params.stop, generated
        )

        async def tail() -> list[dict[str, object]]:
            await count_usage(generated, body.prompt_text())
            last = [envelope(choice("", finish_reason(generated, params.max_tokens)))]
            if body.stream_options is not None and body.stream_options.include_usage:
                last.append(envelope([], usage=generated.usage()))
            return last

        response = await stream_response(
            with_timeout(pieces, self.timeout, "completion"),
            head=[],
            chunk=lambda text: envelope(choice(text, None)),
            tail=tail,
        )
        note_provider(http, generated.provider)
        return response


def _openai_call(body: CompletionRequest, params: GenerationParams) -> OpenStream:
    """The caller's prompt as written; a FIM suffix goes through the provider's own
    suffix field or its template."""

    def open_stream(provider: Provider) -> AsyncIterator[str]:
        assert isinstance(provider, CompletionProvider)
        prompt, suffix = body.prompt_text(), body.suffix
        if suffix and not provider.supports_suffix:
            if provider.prompt_template is not None:
                prompt = render_template(provider.prompt_template, prompt, suffix)
            suffix = None
        return provider.stream_completion(CompletionCall(prompt, params, suffix or None))

    return open_stream


def editor_key(http: Request, body: TabbyCompletionRequest) -> tuple[str, str] | None:
    """Which editor and file a completion is for: a newer one supersedes an older one.

    Without a filepath (tabby-agent 1.5 sends none) the key is the editor alone:
    a person types in one place at a time, so the newer request is the one awaited.
    """
    if body.segments is None:
        return None
    who = http.headers.get("authorization") or (http.client.host if http.client else "")
    editor = f"{who}|{body.user or ''}|{http.headers.get('user-agent', '')}"
    return (editor, body.segments.filepath or "")


def _superseded() -> Response:
    """What a superseded request gets: an empty completion, which editors just don't show."""
    response = TabbyCompletionResponse(
        id=f"cmpl-{uuid.uuid4()}", choices=[Choice(index=0, text="")]
    )
    return JSONResponse(response.model_dump(exclude_none=True), headers={"X-Keel-Superseded": "1"})


def _cancelling() -> bool:
    """Is this handler itself being cancelled (client gone, shutdown)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
