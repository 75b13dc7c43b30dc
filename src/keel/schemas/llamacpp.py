"""Wire models of llama.cpp server's native ``POST /completion``, as the editors'
"llama.cpp" providers send and read them: Continue's ``llama.cpp`` provider
(``{prompt, stream: true, n_predict, stop, temperature, top_p, top_k, min_p,
mirostat, ...}``, reading ``content`` from each event) and Twinny's
``llamacpp`` provider (``{prompt, stream, temperature, max_tokens}``, reading
``content``).

The request is served as an OpenAI completion (:meth:`LlamaCppCompletionRequest.
to_openai`): the prompt is the caller's own, sent as written. Sampling fields of
llama.cpp's own samplers that OpenAI's completion has no name for (``top_k``,
``min_p``, ``typical_p``, ``repeat_penalty``, ``mirostat``, ...) and the fields
that steer its slots (``id_slot``, ``cache_prompt``, ``n_keep``) are accepted and
ignored, as on ``/infill``; ``n_indent`` and ``t_max_predict_ms`` end the generation
as on ``/infill`` (they were ignored); ``grammar``, ``json_schema`` and ``n_probs``,
which change what the answer means, are refused when set.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic.json_schema import WithJsonSchema

from keel.schemas.infill import Unconstrained, response_fields
from keel.schemas.openai import MAX_TOKENS_LIMIT, STOP_LIST, _check_stop

_STOPS = WithJsonSchema({"anyOf": [STOP_LIST, {"type": "null"}]})


class LlamaCppCompletionRequest(Unconstrained):
    prompt: str = Field(
        description="The text to continue, as one string.", json_schema_extra={"minLength": 1}
    )
    n_predict: int | None = Field(
        None,
        ge=-1,
        le=MAX_TOKENS_LIMIT,
        validation_alias=AliasChoices("n_predict", "max_tokens"),
        description="New tokens at most; -1 or unset: keel's budget ([completion] "
        "max_decoding_tokens, else the model's); 0: no generation, an empty answer at once. "
        "Also taken as `max_tokens` (Twinny's name for it); `n_predict` wins when both are "
        "sent.",
    )
    stop: Annotated[list[str] | None, _STOPS] = Field(
        None,
        description="Stop strings (up to 16, as on /v1/completions): the answer ends before "
        "the first one (not included).",
    )
    n_indent: int | None = Field(
        None, ge=0, le=4096, description="The answer ends before a later line indented less."
    )
    t_max_predict_ms: int | None = Field(
        None,
        ge=-1,
        description="Once this many ms have passed since the first token, the answer ends at "
        "the next new line (-1, llama.cpp's default, or 0: no limit).",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-1, lt=2**63, description="-1: a random seed.")
    stream: bool = Field(
        False,
        description="Server-sent events: `{content, stop: false}` per piece, then the final "
        "object with `stop: true` (no `[DONE]`, as llama.cpp's server).",
    )
    model: str | None = None
    response_fields: list[str] = response_fields("a whole (not streamed) answer")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_string(cls, value: object) -> object:
        if value == "":  # OpenAI's message said to send a suffix, which this route has not
            raise ValueError("the prompt is empty: there is no text to continue; send it")
        if isinstance(value, list):
            raise ValueError(
                "send the prompt as one string: keel takes no token IDs (they belong to one "
                "tokenizer) and no list of prompts"
            )
        return value

    _stop = field_validator("stop")(_check_stop)

    def limit(self) -> int | None:
        """The client's cap on new tokens: None for keel's budget, 0 for none at all."""
        return None if self.n_predict is None or self.n_predict < 0 else self.n_predict

    def to_openai(self) -> dict[str, Any]:
        """The same request as an OpenAI completion body (``limit()`` is not 0), asking for
        the usage the final object reports."""
        body: dict[str, Any] = {
            "prompt": self.prompt,
            "max_tokens": self.limit(),
            "stop": self.stop,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "seed": None if self.seed == -1 else self.seed,
            "model": self.model,
            "stream": self.stream,
        }
        body = {key: value for key, value in body.items() if value is not None}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


StopType = Literal["eos", "limit", "word"]


class LlamaCppTimings(BaseModel):
    """Only what keel knows: it does not see how long the engine took to read the
    prompt or to generate; how much of the prompt it read, where the engine said."""

    predicted_n: int
    prompt_n: int | None = Field(
        None, description="The prompt's tokens the engine read (not from its cache)."
    )
    cache_n: int | None = Field(None, description="The prompt's tokens its cache held.")


class LlamaCppCompletionResponse(BaseModel):
    """llama.cpp's final answer, in the fields keel knows truthfully. ``stop_type`` and
    ``stopping_word`` are left out where keel cannot tell whether the model ended or
    a stop string did (the request had stop strings, the backend said only "stop")."""

    content: str
    stop: Literal[True] = True
    model: str
    tokens_predicted: int = Field(description="The answer's tokens (usage.completion_tokens).")
    tokens_evaluated: int = Field(description="The prompt's tokens (usage.prompt_tokens).")
    tokens_cached: int | None = Field(
        None,
        description="What the slot's cache holds after the answer, as llama-server says it: "
        "the prompt and the tokens made but the last (timings.cache_n is the prompt's "
        "tokens the cache held before).",
    )
    stop_type: StopType | None = None
    stopping_word: str | None = None
    truncated: bool = Field(
        False, description="Always false: a prompt over the model's context is a 400."
    )
    timings: LlamaCppTimings


class LlamaCppChunk(BaseModel):
    """One streamed piece; the stream ends with a :class:`LlamaCppCompletionResponse`
    whose ``content`` is empty, or with ``{"error": {...}}`` if it failed mid-way."""

    content: str
    stop: Literal[False] = False
