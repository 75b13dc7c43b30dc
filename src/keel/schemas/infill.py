"""Wire models of llama.cpp's ``POST /infill``, as llama.vscode and llama.vim send and
read them (llama.vscode's ``createRequestPayload`` and ``LlamaResponse``).

The editor splits the text at the cursor in three: ``input_prefix`` (whole lines
before the cursor's line), ``prompt`` (the cursor's line up to the cursor) and
``input_suffix`` (the rest of the line, then the lines after). ``input_extra``
holds chunks of other files the editor picked (keel's snippets). Fields that
steer llama.cpp's own slots and samplers (``id_slot``, ``samplers``, ``top_k``,
``cache_prompt``, ``t_max_prompt_ms``) are accepted and left to keel: keel picks
the slot (a fixed ``id_slot`` sent by every user would pin them all to one) and
reuses prompt caches always.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import WithJsonSchema

from keel.schemas.openai import STOP_LIST, _check_stop, only
from keel.schemas.openai import _Wire as _Body
from keel.schemas.tabby import (
    MAX_CLIENT_SNIPPETS,
    ClientSnippet,
    Segments,
    TabbyCompletionRequest,
)


def response_fields(answer: str) -> Any:
    """llama-server's ``response_fields``, on ``/infill`` and ``/completion``: which
    fields of ``answer`` to send (:func:`keel.api.infill.picked`)."""
    return Field(
        default_factory=list,
        max_length=64,
        description=f"Only these fields of {answer}, a nested one by its path "
        "(timings/prompt_n) as its key; none: all.",
    )


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


_NO_SCHEMA = WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]})


class Unconstrained(_Body):
    """llama.cpp's fields that hold an answer to a grammar or schema, or ask for token
    probabilities, which keel does not do: refused when asked for, not ignored (the
    client read an answer the model wrote freely as one its grammar held to, and no
    ``completion_probabilities`` as none; ``/infill`` ignored them all). Their schemas
    say what :meth:`_not_served` takes."""

    grammar: Annotated[Any, only("")] = Field(
        None, description="Only empty: keel does not constrain this answer."
    )
    json_schema: Annotated[Any, _NO_SCHEMA] = Field(None, description="Only empty, as `grammar`.")
    n_probs: Annotated[Any, only(0)] = Field(
        None, description="Only 0: keel returns no token probabilities."
    )

    @field_validator("grammar", "json_schema", "n_probs", mode="before")
    @classmethod
    def _not_served(cls, value: object, info: ValidationInfo) -> object:
        none = value is None or value == "" or value == {}
        if none or (type(value) in (int, float) and value == 0):  # 0.0 too, as llama.cpp
            return None
        name = str(info.field_name)
        if name == "n_probs":
            raise ValueError("keel returns no token probabilities: leave 'n_probs' out")
        raise ValueError(
            f"keel does not hold an answer to a {name.replace('_', ' ')}: leave it out, "
            "or ask /v1/chat/completions with response_format json_schema"
        )


class InfillChunk(_Wire):
    """A chunk of another file (llama.vscode also sends ``time``, ignored)."""

    text: str
    filename: str = ""


class InfillRequest(Unconstrained):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field(
        default_factory=list,
        json_schema_extra={"maxItems": MAX_CLIENT_SNIPPETS},
        description=f"At most {MAX_CLIENT_SNIPPETS} chunks of other files.",
    )
    prompt: str = Field("", description="The cursor's line up to the cursor.")
    n_predict: int | None = Field(
        None,
        ge=-1,
        # llama.cpp's own bound (an int32); a larger one than keel's budget is its budget
        # (one over 131,072 was a 400 in pydantic's words)
        le=2**31 - 1,
        description="New tokens at most, within keel's own decoding budget ([completion] "
        "max_decoding_tokens); 0 warms the cache and generates nothing; -1 or unset: "
        "keel's budget.",
    )
    t_max_predict_ms: int | None = Field(
        None,
        ge=-1,
        description="Once this many ms have passed since the first token, the answer ends at "
        "the next new line (-1, llama.cpp's default, or 0: no limit; keel's timeouts apply).",
    )
    t_max_prompt_ms: int | None = Field(None, ge=-1, description="Accepted; ignored.")
    cache_prompt: bool = Field(True, description="Accepted; keel always reuses prompt caches.")
    n_indent: int | None = Field(
        None, ge=0, le=4096, description="Stop at a new line indented less than this."
    )
    id_slot: int | None = Field(None, description="Ignored: keel chooses the engine slot.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = Field(
        None,
        ge=-1,
        lt=2**64,
        description="Any 64-bit seed gives its own repeatable answer; -1 (llama.cpp's "
        "default): a random one.",
    )
    stream: Annotated[bool, WithJsonSchema({"const": False})] = Field(
        False, description="Only false: the answer comes whole."
    )
    model: str | None = None
    stop: Annotated[list[str], WithJsonSchema(STOP_LIST)] = Field(
        default_factory=list,
        description="The answer ends before the first (up to 16, as on /v1/completions: the "
        "engine checks each as it generates).",
    )
    _stop = field_validator("stop")(_check_stop)
    response_fields: list[str] = response_fields("the answer")

    @field_validator("input_extra")
    @classmethod
    def _few_enough(cls, value: list[InfillChunk]) -> list[InfillChunk]:
        """pydantic said "List should have at most 512 items after validation"."""
        if len(value) > MAX_CLIENT_SNIPPETS:
            raise ValueError(
                f"{len(value)} chunks, over the {MAX_CLIENT_SNIPPETS} keel takes: lower the "
                "editor's ring of chunks (llama.vscode's ring_n_chunks, llama.vim's "
                "g:llama_config.ring_n_chunks)"
            )
        return value

    def cursor_line(self) -> str:
        """The cursor's line up to the cursor. On a blank line llama.vscode sends an
        empty ``prompt`` and the line's indentation as ``n_indent`` (and strips that
        much from the answer's start): the indentation is put back, in the characters
        of the nearest indented line (above, below, in the editor's chunks; with none,
        one character is a tab and more are spaces), so that the model sees
        the cursor where it is, not at column 0 (where the embedded model wrote a
        top-level line, a comment or a Markdown fence)."""
        if self.prompt or not self.n_indent or not self.input_prefix.endswith("\n"):
            return self.prompt
        # n_indent is the whole line's indentation, and llama.vscode sends it for a cursor
        # inside the indentation of a line that is not blank too ("|  }"): the part after
        # the cursor is the suffix's (keel put all n_indent before it, "    }" read with
        # the cursor at column 2 of "  }")
        after = self.input_suffix.partition("\n")[0]
        before = self.n_indent - (len(after) - len(after.lstrip(" \t")))
        if before <= 0:
            return self.prompt
        nearby = [
            *reversed(self.input_prefix.splitlines()),
            *self.input_suffix.splitlines(),
            *(line for chunk in self.input_extra for line in chunk.text.splitlines()),
        ]
        # No indented line anywhere: one character of indentation is a tab, more are spaces.
        fallback = "\t" if self.n_indent == 1 else " "
        indented = next((line for line in nearby if line.strip() and line[0] in " \t"), fallback)
        return indented[0] * before

    def to_tabby(self, language: str) -> TabbyCompletionRequest:
        """The same request in Tabby's shape, which keel's completion serving reads."""
        return TabbyCompletionRequest(
            language=language,
            segments=Segments(
                prefix=self.input_prefix + self.cursor_line(),
                suffix=self.input_suffix,
                relevant_snippets_from_recently_opened_files=[
                    ClientSnippet(filepath=chunk.filename, body=chunk.text)
                    for chunk in self.input_extra
                    if chunk.text.strip()
                ],
            ),
            temperature=self.temperature,
            # Read by Tabby's u64 seed (a seed of 2^63 and above, taken as Tabby's,
            # was a 500); llama.cpp's -1 is no seed
            seed=None if self.seed is None or self.seed == -1 else self.seed,
        )


class InfillTimings(BaseModel):
    cache_n: int
    """The prompt's tokens the engine's cache held (``prompt_n`` it read)."""
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class InfillResponse(BaseModel):
    """What llama.cpp's server answers, in the fields its editor clients read."""

    content: str
    stop: bool = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int = 0
    truncated: bool = False
    generation_settings: dict[str, Any]
    timings: InfillTimings
