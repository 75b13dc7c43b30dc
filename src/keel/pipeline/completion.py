"""Code completion: context -> prompt -> generate -> postprocess.

The steps that decide what the model sees (truncation, templating, snippet
formatting) and what the user gets (postprocessing) are pure functions in
:mod:`keel.pipeline.prompt` and :mod:`keel.pipeline.postprocess`; this module
only sequences them around one call to the provider.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from keel.errors import RequestError, UpstreamTimeout
from keel.pipeline.languages import Language, get_language, stop_words
from keel.pipeline.postprocess import postprocess
from keel.pipeline.prompt import (
    Snippet,
    format_snippets,
    keep_head,
    keep_tail,
    normalize_newlines,
    render_template,
    restore_newlines,
    select_snippets,
    split_budget,
    split_lines,
)
from keel.providers.base import (
    CompletionCall,
    CompletionProvider,
    GenerationParams,
    close_stream,
)
from keel.schemas.tabby import (
    Choice,
    DebugData,
    DebugSnippet,
    TabbyCompletionRequest,
    TabbyCompletionResponse,
)

DEFAULT_TEMPERATURE = 0.1


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    prompt: str
    suffix: str | None
    snippets: list[Snippet]


def _client_snippets(request: TabbyCompletionRequest) -> list[Snippet]:
    """Declarations first (they name what the cursor uses), then snippets by score."""
    segments = request.segments
    if segments is None:
        return []
    declarations = [Snippet(d.filepath, d.body) for d in segments.declarations or []]
    scored = [
        Snippet(s.filepath, s.body, s.score)
        for s in [
            *(segments.relevant_snippets_from_changed_files or []),
            *(segments.relevant_snippets_from_recently_opened_files or []),
        ]
    ]
    scored.sort(key=lambda s: -(s.score or 0.0))
    return declarations + scored


async def build_prompt(
    provider: CompletionProvider,
    language: Language,
    prefix: str,
    suffix: str,
    snippets: Sequence[Snippet],
    max_input_length: int,
) -> BuiltPrompt:
    """Truncate prefix and suffix by tokens, separately, then template.

    Truncation happens before templating so FIM tokens are never cut; all
    token counts come from one batched call to the provider's tokenizer.
    """
    uses_suffix = bool(suffix) and (
        provider.prompt_template is not None or provider.supports_suffix
    )
    budget = split_budget(max_input_length, has_suffix=uses_suffix)
    prefix_lines = split_lines(prefix)
    suffix_lines = split_lines(suffix) if uses_suffix else []
    texts = [*prefix_lines, *suffix_lines, *(s.body for s in snippets)]
    counts = await provider.count_tokens(texts)
    prefix_counts = counts[: len(prefix_lines)]
    suffix_counts = counts[len(prefix_lines) : len(prefix_lines) + len(suffix_lines)]
    snippet_counts = counts[len(prefix_lines) + len(suffix_lines) :]

    kept_prefix = keep_tail(prefix_lines, prefix_counts, budget.prefix)
    kept_suffix = keep_head(suffix_lines, suffix_counts, budget.suffix) if uses_suffix else ""
    chosen = select_snippets(snippets, snippet_counts, budget.snippets)
    full_prefix = format_snippets(language, chosen) + kept_prefix if chosen else kept_prefix

    if provider.prompt_template is not None:
        return BuiltPrompt(
            render_template(provider.prompt_template, full_prefix, kept_suffix), None, chosen
        )
    return BuiltPrompt(full_prefix, kept_suffix if uses_suffix else None, chosen)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop word, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


async def generate_text(
    stream: AsyncIterator[str], stops: Sequence[str], timeout: float, provider: str
) -> str:
    """Collect a stream until a stop word, closing it early (which cancels upstream work)."""
    text = ""
    try:
        async with asyncio.timeout(timeout):
            async for piece in stream:
                text, stopped = cut_at_stop(text + piece, stops)
                if stopped:
                    break
    except TimeoutError:
        raise UpstreamTimeout(
            f"completion took longer than {timeout:.0f}s", provider=provider
        ) from None
    finally:
        await close_stream(stream)
    return text


class CompletionService:
    def __init__(
        self,
        provider: CompletionProvider,
        *,
        max_input_length: int,
        max_decoding_tokens: int,
        timeout: float,
    ) -> None:
        self.provider = provider
        self.max_input_length = min(max_input_length, provider.max_input_length or max_input_length)
        self.max_decoding_tokens = max_decoding_tokens
        self.timeout = timeout

    async def complete(self, request: TabbyCompletionRequest) -> TabbyCompletionResponse:
        language = get_language(request.language or "unknown")
        debug = request.debug_options
        segments = request.segments
        crlf = False
        if debug is not None and debug.raw_prompt is not None:
            built = BuiltPrompt(debug.raw_prompt, None, [])
            prefix, suffix = debug.raw_prompt, ""
        elif segments is not None:
            prefix, crlf = normalize_newlines(segments.prefix)
            suffix, _ = normalize_newlines(segments.suffix or "")
            if not prefix.strip() and not suffix.strip():
                raise RequestError(
                    "segments.prefix and segments.suffix are both empty: there is no code "
                    "to complete from; send the text before (and after) the cursor",
                    param="segments.prefix",
                )
            built = await build_prompt(
                self.provider,
                language,
                prefix,
                suffix,
                _client_snippets(request),
                self.max_input_length,
            )
        else:
            raise RequestError(
                "either 'segments' (prefix and suffix around the cursor) or "
                "'debug_options.raw_prompt' is required",
                param="segments",
            )

        stops = stop_words(language, self.provider.stop_words)
        params = GenerationParams(
            max_tokens=self.max_decoding_tokens,
            temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
            stop=tuple(stops),
            seed=request.seed,
        )
        stream = self.provider.stream_completion(CompletionCall(built.prompt, params, built.suffix))
        raw = await generate_text(stream, stops, self.timeout, self.provider.name)
        text = postprocess(raw, prefix=prefix, suffix=suffix, language=language)
        response = TabbyCompletionResponse(
            id=f"cmpl-{uuid.uuid4()}",
            choices=[Choice(index=0, text=restore_newlines(text, crlf))],
        )
        if debug is not None and (debug.return_prompt or debug.return_snippets):
            response.debug_data = DebugData(
                prompt=built.prompt if debug.return_prompt else None,
                snippets=[
                    DebugSnippet(filepath=s.filepath, body=s.body, score=s.score)
                    for s in built.snippets
                ]
                if debug.return_snippets
                else None,
            )
        return response
