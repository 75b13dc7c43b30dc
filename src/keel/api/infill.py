"""``POST /infill`` in llama.cpp's server shape, so llama.vscode and llama.vim work
against keel unchanged.

The body is read as a Tabby completion request (:meth:`InfillRequest.to_tabby`)
and served by the same completion serving: routing with fallbacks and
breakers, superseding, the typed-through cache, snippets (the editor's
``input_extra`` chunks), postprocessing. ``stop``, ``n_indent`` and
``t_max_predict_ms`` end the generation as in llama.cpp's server
(:class:`~keel.pipeline.completion.AnswerEnds`), and ``stop`` and ``n_indent`` are
applied again to an answer from keel's cache (generated for another request); a
mid-line answer is cut where it closes what the line already closes, and the answer
is shaped as llama.cpp's.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from keel.api.access import USER, GuardedRoute
from keel.api.errors import read_model
from keel.api.state import app_state
from keel.errors import RequestError
from keel.pipeline.completion import AnswerEnds, cut_at_indent, cut_at_stop
from keel.pipeline.languages import find_language
from keel.pipeline.postprocess import QUOTES, first_unpaired_closer
from keel.pipeline.prompt import normalize_newlines, restore_newlines
from keel.providers.base import CACHE_FIGURES_SHOWN, Provider, Reported, estimate_tokens
from keel.schemas.infill import InfillRequest, InfillResponse, InfillTimings
from keel.schemas.openapi import ERRORS, json_body
from keel.serving.lifecycle import JsonResponse

router = APIRouter(responses=ERRORS, route_class=GuardedRoute)


def language_of(body: InfillRequest) -> str:
    """The request names no language, nor the file being edited: the language most of
    the editor's chunks are in (llama.vscode's come from the files last opened or
    edited; a tie goes to the later chunk), else plain text. It took the last chunk's,
    and a Python file was completed as Markdown after a look at the README."""
    votes: dict[str, tuple[int, int]] = {}  # a language's chunks, and its last one's place
    for place, chunk in enumerate(body.input_extra):
        extension = chunk.filename.rpartition(".")[2]
        if extension and extension != chunk.filename and extension.isalnum():
            language = find_language(extension)
            if language is not None:
                votes[language.name] = (votes.get(language.name, (0, 0))[0] + 1, place)
    return max(votes, key=votes.__getitem__) if votes else "unknown"


def picked(payload: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: only those fields, a nested one by its path
    (``timings/prompt_n``) as its key, as llama.vim reads them; none asked: all."""
    if not fields:
        return payload
    found = {}
    for path in fields:
        value: Any = payload
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            found[path] = value
    return found


def in_cache(prompt: int, predicted: int) -> int:
    """llama-server's ``tokens_cached``: what the slot's cache holds after the answer, the
    prompt and every token made but the last (which was never read back). keel gave the
    prompt's tokens the cache held before, llama-server's ``timings.cache_n``; llama.vim
    shows this figure (and warns by it when the context is full)."""
    return max(0, prompt + predicted - 1)


def cut_at_ends(text: str, body: InfillRequest) -> str:
    """``text`` up to the request's ``stop`` and ``n_indent``, which an answer from keel's
    cache (generated for another request) has not met yet. Cut in the model's new lines,
    then given the file's back: a cut in a CRLF file left a stray CR."""
    lines, crlf = normalize_newlines(text)
    stops = [stop.replace("\r\n", "\n") for stop in body.stop]
    return restore_newlines(cut_at_indent(cut_at_stop(lines, stops)[0], body.n_indent), crlf)


def cut_at_suffix_closer(text: str, line_prefix: str, line_suffix: str) -> str:
    """A one-line answer in mid-line up to where it closes what the text after the
    cursor closes already (an editor's auto-closed bracket or quote): ``x = {}", x);``
    before ``");`` is ``x = {}``. llama.vscode drops only an exact overlap at the
    answer's end (tabby-agent finds the range to replace itself; Tabby's route keeps
    the whole answer for it). A quote closes when the cursor's line left it open."""
    ahead = line_suffix.lstrip()[:1]
    if "\n" in text or not ahead:
        return text
    open_quotes = "".join(quote for quote in QUOTES if line_prefix.count(quote) % 2)
    found = first_unpaired_closer(text, open_quotes=open_quotes)
    return text[: found[0]] if found is not None and found[1] == ahead else text


@router.post(
    "/infill",
    dependencies=[USER],
    response_model=None,
    openapi_extra=json_body(InfillRequest),
    # With response_fields, only those (a nested one by its path): an object of them.
    responses={200: {"model": InfillResponse | dict[str, Any]}},
)
async def infill(request: Request) -> JsonResponse:
    body = await read_model(request, InfillRequest)
    if body.stream:
        raise RequestError("keel's /infill answers whole: send 'stream': false", param="stream")
    state = app_state(request)
    started = time.perf_counter()
    primary = state.providers.for_role("completion")
    model = primary.info.model
    content, headers, answer, superseded = "", {}, None, Reported()
    if body.n_predict != 0:  # 0: llama.vscode warming the cache; keel's stays warm itself
        limit = body.n_predict if body.n_predict and body.n_predict > 0 else None
        ends = AnswerEnds.of(body.stop, body.n_indent, body.t_max_predict_ms)
        answer = await state.completion.complete(
            request, body.to_tabby(language_of(body)), limit, ends
        )
        if answer is None:  # a newer keystroke's request superseded it, as on Tabby's route
            headers = {"X-Keel-Superseded": "1"}
            # nothing read, nothing made: its figures were the whole input's estimate,
            # past n_ctx (4,334 tokens "evaluated" and "cached" of a 2,048 context)
            superseded = Reported(prompt_tokens=0, completion_tokens=0)
        else:
            content = cut_at_ends(answer.response.choices[0].text, body)
            line_suffix = body.input_suffix.partition("\n")[0]
            content = cut_at_suffix_closer(content, body.cursor_line(), line_suffix)
            headers = answer.headers
    elapsed_ms = (time.perf_counter() - started) * 1000
    reported = answer.reported if answer is not None and answer.reported else superseded
    figures = _figures(content, body, reported, elapsed_ms)
    served = answer.served_by if answer is not None and answer.served_by else primary
    # as sent: 0 (the editors' warm-up) was said as -1
    n_predict = -1 if body.n_predict is None else body.n_predict
    settings = {"model": model, "n_ctx": context_of(served), "n_predict": n_predict}
    response = InfillResponse(content=content, model=model, generation_settings=settings, **figures)
    return JsonResponse(picked(response.model_dump(), body.response_fields), headers=headers)


def _figures(
    content: str, body: InfillRequest, reported: Reported, elapsed_ms: float
) -> dict[str, Any]:
    """llama.cpp's counts and timings of an answer: the engine's where it reported them
    (the local engine, a llama.cpp server: the prompt's tokens, those it took from its
    cache, the time it read the rest), else the text's estimate and no prompt read
    (an answer typed through, a backend that does not say)."""
    predicted = reported.completion_tokens
    if predicted is None:
        predicted = estimate_tokens(content) if content else 0
    shown = CACHE_FIGURES_SHOWN.get()  # not on a shared keel: the whole prompt, as read
    prompt, cached = reported.prompt_tokens, (reported.cached_tokens if shown else None) or 0
    read = 0 if prompt is None else max(0, prompt - cached)
    if prompt is None:
        prompt = estimate_tokens(body.input_prefix + body.prompt + body.input_suffix)
    prompt_ms = reported.prompt_ms or 0.0
    predicted_ms = max(0.0, elapsed_ms - prompt_ms)
    return {
        "truncated": reported.trimmed,  # some of the input left out, for the budget
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt,
        "tokens_cached": in_cache(prompt, predicted),
        "timings": InfillTimings(
            cache_n=cached,
            prompt_n=read,
            prompt_ms=prompt_ms,
            prompt_per_token_ms=prompt_ms / read if read else 0.0,
            prompt_per_second=_rate(read, prompt_ms),
            predicted_n=predicted,
            predicted_ms=predicted_ms,
            predicted_per_token_ms=predicted_ms / predicted if predicted else 0.0,
            predicted_per_second=_rate(predicted, predicted_ms),
        ),
    }


def context_of(provider: Provider) -> int:
    """A local model's context per slot, llama.cpp's ``n_ctx``, which llama.vim shows
    beside the cached tokens; 0 where keel does not know it (a remote server's)."""
    size = provider.info.details.get("context_size")
    return size if isinstance(size, int) else 0


def _rate(tokens: int, ms: float) -> float:
    return tokens / ms * 1000 if ms > 0 else 0.0
