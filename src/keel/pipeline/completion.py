"""Code completion: context -> prompt -> generate -> postprocess.

The steps that decide what the model sees (truncation, templating, snippet
formatting) and what the user gets (postprocessing) are pure functions in
:mod:`keel.pipeline.prompt` and :mod:`keel.pipeline.postprocess`; this module
only sequences them around one call to the provider.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from keel.errors import RequestError
from keel.pipeline.cut import NO_CUT, Cut, after_cut, whitespace_cut
from keel.pipeline.languages import Language, get_language, stop_words
from keel.pipeline.postprocess import is_mid_line, postprocess
from keel.pipeline.prompt import (
    Markup,
    Snippet,
    format_snippets,
    keep_head,
    keep_tail,
    normalize_newlines,
    render_marked,
    restore_newlines,
    select_snippets,
    split_budget,
    split_lines,
)
from keel.providers.base import (
    CompletionCall,
    CompletionProvider,
    GenerationParams,
    Parts,
    close_stream,
    joined,
    parts,
)
from keel.schemas.tabby import (
    Choice,
    DebugData,
    DebugSnippet,
    TabbyCompletionRequest,
    TabbyCompletionResponse,
)

DEFAULT_TEMPERATURE = 0.1
TEMPLATE_TOKENS = 16
"""Room kept in a known context for what the FIM template and the engine add to a prompt."""
CONTEXT_FLOOR = 64
"""The least prompt budget a small context leaves (the engine then refuses, as before)."""


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    prompt: str
    suffix: str | None
    snippets: list[Snippet]
    cut: Cut = NO_CUT
    """Whitespace at the end of the prefix the prompt leaves out (:func:`whitespace_cut`)."""
    markup: Markup | None = None
    """Where the prompt holds keel's own text (:data:`~keel.pipeline.prompt.Markup`);
    None: a client's prompt, as written."""
    trimmed: bool = False
    """Some of the prefix or suffix was left out, for the prompt's budget (llama.cpp's
    ``truncated``)."""

    def call(self, params: GenerationParams) -> CompletionCall:
        """The provider's call for this prompt."""
        return CompletionCall(self.prompt, params, self.suffix, markup=self.markup)

    def generated(self, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
        """The model's text as the editor continues it (:func:`after_cut`)."""
        return after_cut(pieces, self.cut)


class SnippetRetriever(Protocol):
    """Finds code related to the cursor elsewhere in the request's repository (keel.index)."""

    def status(self) -> dict[str, dict[str, object]]:
        """Each repository's index: its state and last refresh (for ``/v1/providers``)."""
        ...

    async def retrieve(
        self, *, prefix: str, filepath: str | None, git_url: str | None, language: str | None
    ) -> list[Snippet]: ...

    def state(self) -> tuple[object, ...]:
        """Changes when what :meth:`retrieve` finds may have."""
        ...


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
    stops: Sequence[str] = (),
) -> BuiltPrompt:
    """Truncate prefix and suffix by tokens, separately, then template.

    Truncation happens before templating so FIM tokens are never cut; all
    token counts come from one batched call to the provider's tokenizer. Whitespace at
    the cursor is left out (:func:`whitespace_cut`).
    """
    cut = whitespace_cut(prefix, suffix, stops)
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
    if prefix_lines and len(kept_prefix) < len(prefix_lines[-1]):
        kept_prefix = await fitted(provider, kept_prefix, budget.prefix, keep_end=True)
    trimmed = len(kept_prefix) < len(prefix)
    dropped = prefix[: len(prefix) - len(kept_prefix)]
    if kept_prefix and dropped.endswith("\n"):
        # Keep the whitespace run (newlines, blank lines) before the first kept line:
        # BPE vocabularies merge it with that line's indentation, so with it the window
        # tokenizes as it did inside the longer prompt, and a local model can shift its
        # KV cache when the window start moves instead of reading everything again.
        # (Not before a line cut within, and no more of it than a few lines' worth:
        # 49,000 spaces, or 20,000 blank lines, came back before the window.)
        kept_prefix = dropped[len(dropped.rstrip()) :][-WHITESPACE_KEPT:] + kept_prefix
    # The cut comes after the window is chosen, which it must not move: pressing Enter
    # and typing the line's first word would read the whole window again.
    kept_prefix = kept_prefix[: max(0, len(kept_prefix) - len(cut.text))]
    kept_suffix = keep_head(suffix_lines, suffix_counts, budget.suffix) if uses_suffix else ""
    if suffix_lines and len(kept_suffix) < len(suffix_lines[0]):
        kept_suffix = await fitted(provider, kept_suffix, budget.suffix, keep_end=False)
    trimmed = trimmed or (uses_suffix and len(kept_suffix) < len(suffix))
    chosen = select_snippets(snippets, snippet_counts, budget.snippets)
    shown = format_snippets(language, chosen) if chosen else ""
    if not shown:  # a language with no line comment shows none: debug_data says so too
        chosen = []
    full_prefix = shown + kept_prefix

    if provider.prompt_template is not None:
        prompt, markup = render_marked(provider.prompt_template, full_prefix, kept_suffix)
        return BuiltPrompt(prompt, None, chosen, cut, markup, trimmed)
    suffix_sent = kept_suffix if uses_suffix else None
    return BuiltPrompt(full_prefix, suffix_sent, chosen, cut, (), trimmed)


WHITESPACE_KEPT = 64
"""The most of the whitespace before a window's first line its prompt keeps."""

FIT_TRIES = 4
"""Counts a line cut to its budget may take: each cut keeps a share of a more even text."""


async def fitted(provider: CompletionProvider, text: str, budget: int, *, keep_end: bool) -> str:
    """``text``, one line cut to ``budget`` tokens (:func:`keep_tail` keeps its end,
    :func:`keep_head` its start), counted again and cut again until it fits. Those cuts
    keep characters in proportion to the whole line's count, which overshoots where the
    part kept is denser than the rest: 49,000 ASCII letters ending in 1,000 CJK
    characters kept 4,268 tokens for a budget of 672, which the engine refused; at half
    the budget still 4,005, a failure of the provider's, and five such keystrokes
    opened the local breaker for everyone."""
    for _ in range(FIT_TRIES):
        (count,) = await provider.count_tokens([text]) if text else (0,)
        if count <= budget:
            break
        keep = len(text) * budget // count
        text = text[len(text) - keep :] if keep_end else text[:keep]
    return text


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop word, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


async def until_stop(pieces: AsyncIterator[str], stops: Sequence[str]) -> AsyncIterator[str]:
    """The text of ``pieces`` before the first stop word, as it comes.

    The one place keel applies stop words (the backend is asked to stop on
    them too, but not every backend takes them all). Text that might begin a
    stop word is held back until the next piece settles it; at a stop word
    ``pieces`` is closed, which cancels the upstream work.
    """
    hold = max((len(stop) for stop in stops), default=1) - 1
    pending = ""
    try:
        async for piece in pieces:
            if isinstance(piece, Parts):
                if piece.deltas:  # the text is over: what was held goes with it
                    yield parts(pending + piece, piece.deltas, piece.reasoning, piece.pieces)
                    pending = ""
                    continue
                if piece.reasoning:  # thought, not text: no stop word applies to it
                    yield parts("", (), piece.reasoning, piece.pieces)
            pending, stopped = cut_at_stop(pending + piece, stops)
            if stopped:
                break
            safe = len(pending) - hold
            if safe > 0:
                yield pending[:safe]
                pending = pending[safe:]
    finally:
        await close_stream(pieces)
    if pending:
        yield pending


async def read_until_stop(pieces: AsyncIterator[str], stops: Sequence[str]) -> str:
    """The whole text of ``pieces`` before the first stop word (:class:`Parts`
    with all the tool-call parts and reasoning, if the model called tools or thought)."""
    if stops:
        return joined([part async for part in until_stop(pieces, stops)])
    try:
        return joined([piece async for piece in pieces])
    finally:
        await close_stream(pieces)


def cut_at_indent(text: str, n_indent: int | None) -> str:
    """``text`` up to the new line before the first later line indented less than
    ``n_indent``, where llama.cpp's server stops: a line is judged once something follows
    its indentation, a new line too (an empty line is indented 0: keel went on past one).
    The new line and the short indentation are left out (llama.cpp's server keeps them:
    whitespace the editor would insert after the answer); a CRLF's CR with its LF."""
    if not n_indent:
        return text
    lines = text.split("\n")
    last = len(lines) - 1
    for index, line in enumerate(lines[1:], start=1):
        body = line.lstrip(" \t")
        if (body.rstrip("\r") or index < last) and len(line) - len(body) < n_indent:
            return "\n".join(lines[:index]).removesuffix("\r")
    return text


@dataclass(frozen=True, slots=True)
class AnswerEnds:
    """Where a client has its answer end, beside keel's stop words: llama.cpp's
    ``/infill`` fields, which its server applies while it generates (keel applied them
    to the whole answer, after the decoding budget was spent)."""

    stop: tuple[str, ...] = ()
    """More stop words."""
    n_indent: int | None = None
    """At a later line indented less than this."""
    max_predict_ms: int | None = None
    """At a new line once this long has passed since the first token."""

    @classmethod
    def of(
        cls, stop: Sequence[str], n_indent: int | None, max_predict_ms: int | None
    ) -> AnswerEnds | None:
        """The ends a request sets (llama.cpp's fields); None where it sets none (0 and
        -1 are llama.cpp's "no limit")."""
        limited = max_predict_ms if max_predict_ms and max_predict_ms > 0 else None
        if not stop and not n_indent and limited is None:
            return None
        return cls(tuple(stop), n_indent, limited)

    async def applied(self, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
        """The text of ``pieces`` until a line indented less than :attr:`n_indent` or
        a new line past :attr:`max_predict_ms`; then ``pieces`` is closed, which stops
        the work upstream. (The stop words go with keel's: :meth:`TabbyPrompts.call_for`.)"""
        # Only the text from its last new line on is kept and checked: the whole answer,
        # joined and split at every piece, made the work grow with its square.
        tail, started = "", time.monotonic()
        try:
            async for piece in pieces:
                if not tail:
                    started = time.monotonic()  # generation begins: the prompt is read
                seen = tail + piece  # its first line is the answer's (exempt) or empty
                kept = cut_at_indent(seen, self.n_indent)
                late = "\n" in piece and self._late(started)
                if late:  # the answer ends at this new line (a piece may hold more)
                    kept = kept[: len(tail) + piece.index("\n") + 1]
                if len(kept) > len(tail):
                    yield kept[len(tail) :]
                if late or len(kept) < len(seen):
                    return
                at = seen.rfind("\n")
                tail = seen if at < 0 else seen[at:]
        finally:
            await close_stream(pieces)

    def _late(self, started: float) -> bool:
        limit = self.max_predict_ms  # above 0 where set (:meth:`of`)
        return limit is not None and time.monotonic() - started > limit / 1000

    def engine_params(self, params: GenerationParams) -> GenerationParams:
        """``params`` with the time limit, for the engines that check it token by token
        (this check is per piece, and a loaded keel reads their tokens joined)."""
        return dataclasses.replace(params, max_predict_ms=self.max_predict_ms)


def ended(pieces: AsyncIterator[str], ends: AnswerEnds | None) -> AsyncIterator[str]:
    """``pieces`` up to the client's own ends, where it set any."""
    return pieces if ends is None else ends.applied(pieces)


@dataclass(frozen=True, slots=True)
class TabbyTask:
    """A Tabby completion request, read: what to complete and how to answer."""

    request: TabbyCompletionRequest
    language: Language
    prefix: str
    suffix: str
    crlf: bool
    raw_prompt: str | None
    snippets: list[Snippet]
    mid_line: bool
    max_tokens: int | None = None
    """The client's own cap on new tokens (llama.cpp's ``n_predict``), within keel's."""
    ends: AnswerEnds | None = None
    """The client's own ends of the answer (llama.cpp's ``/infill``)."""


LINE_SNIPPET_CHARS = 16 * 2**20
"""Characters of snippet bodies the per-line choices hold in all (the lines longest unused
go first): bounded by count alone, 256 requests of 3.9 MB of declarations each held
keel at 1.1 GB."""


def _chars(snippets: Sequence[Snippet]) -> int:
    return sum(len(s.body) for s in snippets)


class TabbyPrompts:
    """Everything between a Tabby request and a provider call, and back.

    The prompt is built per attempt, because templates, tokenizers and budgets
    belong to the provider the router picks; under load (requests queueing)
    the budget and decoding limit shrink before anything is refused.
    """

    def __init__(
        self,
        *,
        max_input_length: int | None,
        max_decoding_tokens: int | None,
        retriever: SnippetRetriever | None = None,
    ) -> None:
        """``None`` limits mean each provider's own defaults (small for CPU models)."""
        self.max_input_length = max_input_length
        self.max_decoding_tokens = max_decoding_tokens
        self.retriever = retriever
        self._line_snippets: OrderedDict[tuple[str, int], list[Snippet]] = OrderedDict()
        self._line_chars = 0
        """What the kept snippets' bodies add up to."""

    async def read(
        self,
        request: TabbyCompletionRequest,
        max_tokens: int | None,
        *,
        editor: str,
        ends: AnswerEnds | None = None,
    ) -> TabbyTask:
        """Check the request and gather its context (snippets); raises RequestError.
        ``max_tokens``: the client's cap on new tokens, if it sets one; ``editor``: the
        client it comes from (snippets chosen for one are never another's); ``ends``: the
        client's own ends of the answer."""
        debug, segments = request.debug_options, request.segments
        raw_prompt = debug.raw_prompt if debug is not None else None
        crlf = False
        if raw_prompt is not None:
            prefix, suffix = raw_prompt, ""
        elif segments is not None:
            prefix, crlf = normalize_newlines(segments.prefix)
            suffix, crlf_after = normalize_newlines(segments.suffix or "")
            crlf = crlf or crlf_after  # the cursor on a CRLF file's first line
        else:
            raise RequestError(
                "either 'prompt' (an OpenAI completion) or 'segments' (a Tabby completion: "
                "prefix and suffix around the cursor) is required",
                param="segments",
            )
        snippets = (
            await self._snippets_for_line(request, prefix, editor) if raw_prompt is None else []
        )
        return TabbyTask(
            request=request,
            language=get_language(request.language or "unknown"),
            prefix=prefix,
            suffix=suffix,
            crlf=crlf,
            raw_prompt=raw_prompt,
            snippets=snippets,
            mid_line=raw_prompt is None and is_mid_line(prefix, suffix),
            max_tokens=max_tokens,
            ends=ends,
        )

    async def call_for(
        self, task: TabbyTask, provider: CompletionProvider, *, shrink: bool, pressured: bool
    ) -> tuple[BuiltPrompt, CompletionCall]:
        """The prompt and call for ``provider``; ``shrink``: the last one was too long."""
        max_tokens = self.max_decoding_tokens or provider.default_max_tokens
        if pressured:
            max_tokens = max(8, max_tokens // 2)
        if task.max_tokens is not None:  # the client's cap holds under pressure too
            max_tokens = min(max_tokens, task.max_tokens)
        budget = provider.max_input_length or self.max_input_length or provider.default_input_budget
        if (context := provider.context_tokens()) is not None:
            # a context under the budget: every long file's prompt was refused, then halved
            budget = min(budget, max(CONTEXT_FLOOR, context - max_tokens - TEMPLATE_TOKENS))
        if shrink or pressured:
            budget //= 2
        stops = stop_words(task.language, provider.stop_words)
        if task.ends is not None:  # in the model's new lines, as the prompt's (a CRLF file's)
            own = (stop.replace("\r\n", "\n") if task.crlf else stop for stop in task.ends.stop)
            stops = [*stops, *(stop for stop in own if stop not in stops)]
        if task.mid_line:
            stops = [*stops, "\n"]  # only the rest of this line fits
        if task.raw_prompt is not None:
            built = BuiltPrompt(task.raw_prompt, None, [])
        else:
            chosen = [] if pressured else task.snippets
            built = await build_prompt(
                provider, task.language, task.prefix, task.suffix, chosen, budget, stops
            )
        temperature = task.request.temperature
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
            stop=tuple(stops),
            seed=task.request.seed,
        )
        if task.ends is not None:
            params = task.ends.engine_params(params)
        return built, built.call(params)

    def respond(self, task: TabbyTask, raw: str, built: BuiltPrompt) -> TabbyCompletionResponse:
        """Postprocess the generated text into Tabby's answer (with debug data if asked)."""
        text = postprocess(raw, prefix=task.prefix, suffix=task.suffix, language=task.language)
        response = TabbyCompletionResponse(
            id=f"cmpl-{uuid.uuid4()}",
            choices=[Choice(index=0, text=restore_newlines(text, task.crlf))],
        )
        debug = task.request.debug_options
        if debug is not None and (debug.return_prompt or debug.return_snippets):
            response.debug_data = DebugData(
                prompt=built.prompt if debug.return_prompt else None,
                snippets=[
                    # a declaration is 1.0, as Tabby reports it (its Snippet's score is
                    # required)
                    DebugSnippet(
                        filepath=s.filepath, body=s.body, score=1.0 if s.score is None else s.score
                    )
                    for s in built.snippets
                ]
                if debug.return_snippets
                else None,
            )
        return response

    async def _snippets_for_line(
        self, request: TabbyCompletionRequest, prefix: str, editor: str
    ) -> list[Snippet]:
        """Client and repository snippets, chosen once per edited line and editor.

        While the user types on one line, every request reuses the first
        request's choice, so the head of the prompt stays byte-identical and a
        local model reuses its KV cache; a new line, client snippets from other
        files, or a change to the repository's index (a file edited or deleted)
        choose afresh. Another editor's choice is never used: it holds the text of
        that client's snippets (another user's files, by key, address or agent).
        """
        debug = request.debug_options
        if debug is not None and debug.disable_retrieval_augmented_code_completion:
            # as in Tabby: the model alone, without the client's snippets either (its
            # evaluation's switch; the client's declarations still came in)
            return []
        segments = request.segments
        line_start = prefix.rfind("\n") + 1
        client = _client_snippets(request)
        sources = "|".join(sorted({s.filepath for s in client}))
        where = (
            f"{editor}|{segments.git_url if segments else ''}|"
            f"{segments.filepath if segments else ''}"
        )

        def key() -> tuple[str, int]:
            indexes = self.retriever.state() if self.retriever is not None else ()
            return where, hash((prefix[:line_start], sources, indexes))

        cached = self._line_snippets.get(asked := key())
        if cached is not None:
            self._line_snippets.move_to_end(asked)
            return cached
        chosen = client + await self._repository_snippets(request, prefix)
        # Kept under the state the search left: one that found a checkout gone chose
        # nothing, and kept under the state seen before it (there), the line got nothing
        # once the checkout was back.
        self._line_snippets[key()] = chosen
        self._line_chars += _chars(chosen)
        while len(self._line_snippets) > 256 or self._line_chars > LINE_SNIPPET_CHARS:
            self._line_chars -= _chars(self._line_snippets.popitem(last=False)[1])
        return chosen

    async def _repository_snippets(
        self, request: TabbyCompletionRequest, prefix: str
    ) -> list[Snippet]:
        """Retrieved snippets go after the client's (declarations, then client scores)."""
        segments = request.segments
        if self.retriever is None or segments is None:
            return []
        return await self.retriever.retrieve(
            prefix=prefix,
            filepath=segments.filepath,
            git_url=segments.git_url,
            language=request.language or "unknown",
        )
