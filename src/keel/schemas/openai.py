"""Wire models of the OpenAI API subset keel serves.

Request models own their conversion to internal calls (``to_params``), as in
vLLM's serving layer; limits are checked here so that a bad value is a 400
naming the field, before any work starts.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue, WithJsonSchema
from pydantic_core import CoreSchema

from keel.errors import RequestError
from keel.providers.base import PASSED_ON, ChatMessage, GenerationParams
from keel.schemas.tabby import as_int64

MAX_TOKENS_LIMIT = 131_072
"""The longest answer asked of a backend (today's longest contexts); a model stops at
its own context first (``finish_reason: length``). It was 8,192: clients that ask
for a model's whole output budget (16,384 for OpenAI's, more for others) got a 400."""
MAX_EMBEDDING_INPUTS = 2048
"""OpenAI's limit; LangChain's OpenAIEmbeddings sends up to 1,000 inputs a request."""


class _Wire(BaseModel):
    """A request body's model. Strict about JSON types, as OpenAI's API and Tabby's serde
    are: ``"max_tokens": "5"``, ``"stream": "yes"``, ``"temperature": "0.5"`` or
    ``"n": 1.0`` are a 400 naming the field, not served as 5, true, 0.5 and 1 (a client
    with such a bug would never hear of it); an integer is a number (``"temperature": 1``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: object) -> object:
        """A null optional field is as if unset, as OpenAI takes it (clients send
        ``"n": null``, ``"stream": null``; they were 400s)."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        defaulted = _defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler, /
    ) -> JsonSchemaValue:
        """Null allowed in ``/openapi.json`` wherever :meth:`_null_is_unset` takes it (the
        document refused ``"encoding_format": null``, which keel served)."""
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name in _defaulted(cls) & properties.keys():
            properties[name] = _or_null(properties[name])
        return schema


_NOTES = frozenset({"title", "description", "default", "deprecated"})


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or null."""
    null = {"type": "null"}
    if "anyOf" in schema:
        return schema if null in schema["anyOf"] else {**schema, "anyOf": [*schema["anyOf"], null]}
    notes = {key: value for key, value in schema.items() if key in _NOTES}
    rest = {key: value for key, value in schema.items() if key not in _NOTES}
    return {"anyOf": [rest, null], **notes}


@functools.cache
def _defaulted(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` with a default other than None, by their wire names."""
    return frozenset(
        field.alias or name
        for name, field in model.model_fields.items()
        if not field.is_required() and field.default is not None
    )


Seed = Annotated[int, Field(ge=-(2**63), lt=2**64), AfterValidator(as_int64)]
"""A 64-bit integer: signed, as OpenAI documents it, or unsigned, as Tabby's. Its bounds
are ones a float holds exactly: ``/openapi.json`` writes them as floats, where
``le=2**64 - 1`` read 2**64 (allowed there, a 400 here)."""


def _stop_tuple(stop: StopField) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


MAX_MESSAGES = 2048
MAX_PARTS = 1024
"""Messages in a chat, and parts in one message's content. The local engine's tokenizer
takes time growing with the square of the special tokens a template puts in: 40,000
two-letter messages kept it busy for minutes past their client, every completion on the
same worker timed out, and its breaker opened for everyone."""

MAX_STOP_LENGTH = 256
"""Characters in one stop sequence: every token is checked against each one's beginnings,
and 16 of 100,000 characters took the local engine 2.4 s a token, stalling every other
request on it."""
MAX_STOPS = 16

STOP_TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH}
STOP_LIST: dict[str, Any] = {"type": "array", "items": STOP_TEXT, "maxItems": MAX_STOPS}
"""What :func:`_check_stop` takes, as ``/openapi.json`` says it (it said any strings)."""

StopField = Annotated[
    str | list[str] | None,
    WithJsonSchema({"anyOf": [STOP_TEXT, STOP_LIST, {"type": "null"}]}),
]


def only(*values: object) -> WithJsonSchema:
    """The schema of a field that asks for what keel does not do: only the values that
    say "no" (or null). Its type alone allowed ``echo: true``, a 400."""
    return WithJsonSchema({"enum": [*values, None]})


def _check_stop(stop: StopField) -> StopField:
    values = _stop_tuple(stop)
    if len(values) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    if any(not value for value in values):
        raise ValueError(
            "a stop sequence must not be empty (the answer would end before it began): leave"
            " 'stop' out, or give non-empty strings"
        )
    if any(len(value) > MAX_STOP_LENGTH for value in values):
        raise ValueError(f"a stop sequence is at most {MAX_STOP_LENGTH} characters")
    return stop


def _token_id(value: object) -> bool:
    return type(value) is int


def _no_token_ids(value: object, hint: str = "") -> object:
    """OpenAI also takes token IDs in place of text; they belong to one vocabulary
    (LangChain sends tiktoken's) and keel serves models with others. Token IDs are a
    list of integers, or a list of such lists; a list mixing text with numbers (or
    ``true``) is no such thing, and its type check names the item that is not a string
    (``["a", 5]`` was told that LangChain sends IDs)."""
    items = value if isinstance(value, list) else []
    ids = [item for item in items if isinstance(item, list) and all(map(_token_id, item))]
    if items and (all(map(_token_id, items)) or (len(ids) == len(items) and any(ids))):
        raise ValueError(
            "token IDs are not taken (they belong to one tokenizer, keel's models have their"
            f" own): send the text{hint}"
        )
    return value


def _not_asked(value: object, what: str, name: str | None) -> object:
    """A field asking for what keel does not do (``echo``, ``logprobs``): refused when
    asked for; false and 0 are both "no", whichever of them the field's type is (clients
    send chat's ``"logprobs": false`` to completions too), and taken as unset. Any other
    type is left to the field's type check."""
    if value is False or (type(value) is int and value == 0):
        return None
    if isinstance(value, int):
        raise ValueError(f"keel does not {what}: leave '{name}' out")
    return value


def _within_limit(value: object, info: ValidationInfo) -> object:
    """A limit over :data:`MAX_TOKENS_LIMIT` is a 400 saying what the limit is and what to
    send (it said "Input should be less than or equal to 131072")."""
    if type(value) is int and value > MAX_TOKENS_LIMIT:
        raise ValueError(
            f"{value} is over keel's limit of {MAX_TOKENS_LIMIT} tokens for an answer: send"
            f" {MAX_TOKENS_LIMIT} or less, or leave '{info.field_name}' out (a model stops at"
            " the end of its context first)"
        )
    return value


class StreamOptions(_Wire):
    include_usage: bool = False
    """Send a last chunk with empty ``choices`` and the request's ``usage``, as OpenAI does."""


class _Sampled(_Wire):
    """The fields completions and chat completions share: the model, how to sample,
    how to answer."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: Seed | None = None
    user: str | None = None

    _stop = field_validator("stop")(_check_stop)

    @field_validator("n", mode="before")
    @classmethod
    def _one_answer(cls, value: object) -> object:
        """A bound alone said "Input should be less than or equal to 1"."""
        if type(value) is int and value != 1:
            raise ValueError("keel returns one answer (choice) a request: send n 1 or leave it out")
        return value

    _max_tokens = field_validator("max_tokens", mode="before")(_within_limit)

    @model_validator(mode="after")
    def _streamed_options(self) -> _Sampled:
        """``stream_options`` shape a stream: asking a usage chunk without ``stream: true``,
        the client waits for a chunk and gets one JSON body, so, as OpenAI's API and vLLM
        do, it is a 400 (it was accepted and ignored)."""
        if (
            self.stream_options is not None
            and self.stream_options.include_usage
            and not self.stream
        ):
            raise RequestError(
                "stream_options is only for a streamed answer: send 'stream': true, or leave"
                " stream_options out (a whole answer carries its usage anyway)",
                param="stream_options",
            )
        return self

    def _params(
        self,
        max_tokens: int | None,
        name: str = "max_tokens",
        *,
        named: bool = True,
        said: str | None = None,
    ) -> GenerationParams:
        """``named``: the client gave the limit (not a default) under an OpenAI name;
        ``said``: under a name of its own, sent on as ``name``."""
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            stop=_stop_tuple(self.stop),
            seed=self.seed,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            max_tokens_name=name,
            limit_said=said,
            limit_must_fit=named and max_tokens is not None,
        )


def _both_given(first: str, second: str) -> dict[str, Any]:
    """Both limits given (n_predict as one only from 1)."""
    given = {"type": "integer", "minimum": 1}
    return {"required": [first, second], "properties": {first: given, second: given}}


ONE_LIMIT: list[dict[str, Any]] = [
    {"not": _both_given("max_tokens", "max_completion_tokens")},
    {"not": _both_given("max_tokens", "n_predict")},
    {"not": _both_given("max_completion_tokens", "n_predict")},
]
"""One limit on the answer's tokens, under one name (two that differ are a 400)."""

STREAM_OPTIONS_STREAMED: dict[str, Any] = {
    "if": {
        "required": ["stream_options"],
        "properties": {
            "stream_options": {
                "type": "object",
                "required": ["include_usage"],
                "properties": {"include_usage": {"const": True}},
            }
        },
    },
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}
"""A usage chunk asked for only with ``stream: true``, as OpenAI's API and vLLM refuse it
otherwise (``stream_options`` asking nothing is let through, as vLLM lets ``{}``)."""


class _Limited(_Sampled):
    """The limit on the answer's tokens under any of its names: OpenAI's two and
    llama.cpp's ``n_predict``."""

    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    n_predict: int | None = Field(None, ge=-1, le=MAX_TOKENS_LIMIT)

    _limits_said = field_validator("max_completion_tokens", "n_predict", mode="before")(
        _within_limit
    )

    @model_validator(mode="after")
    def _one_limit(self) -> _Limited:
        """Names of one limit: given twice, they must agree (which one meant it?). Chat
        kept ``max_completion_tokens`` and dropped the other: 20 tokens came for
        ``max_tokens`` 3."""
        limits = self._limits()
        if len(set(limits.values())) > 1:
            said = " and ".join(f"{name} {value}" for name, value in limits.items())
            raise RequestError(
                f"{said} are one limit on the answer's tokens, given twice with different"
                " values: send one of them",
                param=list(limits)[1],
            )
        return self

    def _limits(self) -> dict[str, int]:
        """The limits the client gave, by name, OpenAI's first; n_predict -1 (and chat's
        0, no answer) is none."""
        given = {
            "max_tokens": self.max_tokens,
            "max_completion_tokens": self.max_completion_tokens,
            "n_predict": self.n_predict if self.n_predict and self.n_predict > 0 else None,
        }
        return {name: value for name, value in given.items() if value is not None}


class CompletionRequest(_Limited):
    model_config = ConfigDict(
        json_schema_extra={
            "not": {"required": ["segments"]},
            "allOf": [*ONE_LIMIT, STREAM_OPTIONS_STREAMED],
            # something to continue: a prompt, or a suffix to fill in before
            "anyOf": [
                {"properties": {"prompt": {"minLength": 1, "items": {"minLength": 1}}}},
                {
                    "required": ["suffix"],
                    "properties": {"suffix": {"type": "string", "minLength": 1}},
                },
            ],
        }
    )

    prompt: Annotated[
        str | list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            }
        ),
    ]
    suffix: str | None = None
    echo: Annotated[bool | None, only(False)] = Field(
        None, description="Only false: keel does not echo the prompt."
    )
    logprobs: Annotated[int | None, only(0, False)] = Field(
        None, description="Only 0 (or false) or null: keel returns no log probabilities."
    )
    best_of: int | None = Field(
        None,
        le=1,
        description="Only 1 or null: keel returns one sample, not the best of several.",
    )
    """Each refused when asked for, not ignored: the client would read an answer without
    them as if it had them (no prompt echoed, ``logprobs: null``, one sample as the best)."""

    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_LIMIT, description="OpenAI's newer name for max_tokens."
    )
    n_predict: int | None = Field(
        None,
        ge=-1,
        le=MAX_TOKENS_LIMIT,
        description="llama.cpp's name for max_tokens (its server reads it here); -1 (its "
        "default) leaves keel's budget; 0 is refused (a completion is its tokens).",
        json_schema_extra={"not": {"const": 0}},
    )
    """Limits as ``max_tokens`` is one, as on chat (they were ignored: a client asking for
    3 tokens got keel's 32)."""

    @field_validator("n_predict")
    @classmethod
    def _some_tokens(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError(
                "0 asks for no tokens, and a completion is its tokens: send 1 or more, or -1"
                " (or leave it out) for keel's decoding budget"
            )
        return value

    @field_validator("best_of", mode="before")
    @classmethod
    def _one_sample(cls, value: object) -> object:
        if type(value) is int and value > 1:
            raise ValueError(
                "keel does not choose the best of several samples: leave 'best_of' out"
            )
        return value

    @field_validator("echo", "logprobs", mode="before")
    @classmethod
    def _not_served(cls, value: object, info: ValidationInfo) -> object:
        what = "echo the prompt" if info.field_name == "echo" else "return log probabilities"
        return _not_asked(value, what, info.field_name)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: object) -> object:
        return _no_token_ids(value)

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send exactly one prompt (a string, or a list of one string)")
        return value

    @model_validator(mode="after")
    def _something_to_continue(self) -> CompletionRequest:
        if not self.prompt_text() and not self.suffix:
            raise RequestError(
                "the prompt is empty: there is no text to continue; send the text before"
                " the cursor (and the text after it as suffix)",
                param="prompt",
            )
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_params(self, default_max_tokens: int, *, must_fit: bool = True) -> GenerationParams:
        """``must_fit``: an OpenAI limit the client named must fit the context (OpenAI's
        rule); False for llama.cpp's ``n_predict`` served through this request (llama.cpp's
        ``/completion``). Each limit goes on as ``max_tokens`` (a completions backend's
        only name), and a refusal of it names the field the client sent."""
        name, limit = next(iter(self._limits().items()), ("max_tokens", None))
        if not must_fit or name == "n_predict":
            return self._params(limit or default_max_tokens, named=False, said="n_predict")
        said = None if name == "max_tokens" else name
        return self._params(limit or default_max_tokens, named=bool(limit), said=said)


class ContentPart(_Wire):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # passed on whole

    url: str = Field(min_length=1)
    detail: str | None = None


class ImagePart(_Wire):
    """An image, passed on to an OpenAI-compatible backend (a vision model)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class RefusalPart(_Wire):
    """An assistant's refusal, as OpenAI's API and SDK replay it in history: the
    assistant's text (it was a 400, and the conversation could not go on)."""

    type: Literal["refusal"]
    refusal: str


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""What OpenAI takes as a function's name."""


class FunctionCall(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    """A call an assistant made, sent back with the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


_NOT_REFUSED: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {"not": {"required": ["type"], "properties": {"type": {"const": "refusal"}}}},
        },
    ]
}
"""Content of a message other than an assistant's: there, and no refusal part."""


class ChatMessageIn(_Wire):
    # only an assistant's message may leave content out (its tool calls say it)
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"role": {"const": "assistant"}}},
                {"required": ["content"], "properties": {"content": _NOT_REFUSED}},
            ]
        }
    )

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart | ImagePart | RefusalPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = Field(
        default=None, max_length=256, description="Who said it, among several of one role."
    )
    audio: Annotated[dict[str, Any] | None, only()] = None
    """An earlier answer in audio (its ``id``), refused: keel answers in text only, and a
    turn held only in audio was dropped, the model reading an empty assistant turn."""

    @field_validator("audio", mode="before")
    @classmethod
    def _no_audio_turn(cls, value: object) -> object:
        if value is not None:
            raise ValueError(
                "keel passes on no audio: send the turn's transcript as its content and"
                " leave 'audio' out"
            )
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, value: object) -> object:
        if isinstance(value, list):
            if len(value) > MAX_PARTS:
                raise ValueError(f"at most {MAX_PARTS} items (parts) in one message's content")
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind not in ("text", "image_url", "refusal"):
                    raise ValueError(
                        f"a part of type {kind!r}: keel passes on text and images"
                        " ('text', 'image_url' parts, and an assistant's 'refusal')"
                    )
        return value

    @model_validator(mode="after")
    def _says_something(self) -> ChatMessageIn:
        """Only an assistant's message may come without content (its tool calls say it);
        a user's without was answered as if it had said nothing. Only an assistant
        refuses."""
        if self.content is None and self.role != "assistant":
            raise ValueError(
                f"a {self.role} message needs its content (only an assistant's may be null)"
            )
        if self.role != "assistant" and isinstance(self.content, list):
            for index, part in enumerate(self.content):
                if isinstance(part, RefusalPart):
                    raise ValueError(
                        f"content[{index}] is a refusal part, which only an assistant's "
                        f"message holds: send a {self.role} message's text as a 'text' part"
                    )
        return self

    def to_message(self) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        calls = tuple(call.model_dump() for call in self.tool_calls or ())
        parts: tuple[dict[str, Any], ...] = ()
        if isinstance(self.content, list) and any(
            isinstance(part, ImagePart) for part in self.content
        ):
            parts = tuple(part.model_dump(exclude_none=True) for part in self.content)
        return ChatMessage(role, self.text(), calls, self.tool_call_id, parts, self.name)

    def text(self) -> str:
        """The content's text; text parts a line apart, as vLLM joins them (Cline and
        Continue send a task and its context as parts: glued, "Fix this" + "def f()"
        read "Fix thisdef f()")."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(
            part.text if isinstance(part, ContentPart) else part.refusal
            for part in self.content
            if not isinstance(part, ImagePart)
        )


SCHEMA_DEPTH_LIMIT = 64
"""Levels of objects and arrays a response schema may nest: a local engine compiles it
into a grammar recursively, and ~250 levels failed inside it (as a provider failure that
opened the shared worker's breaker); real schemas nest a dozen or so."""

SCHEMA_WIDTH_LIMIT = 1000
"""Entries of one object or list in a response schema (properties, an enum, anyOf): the
local engine's grammar for an object of optional properties grows faster than their
number (600: 0.9 s; 3,000: one to two minutes of both cores, then refused)."""

_BOUNDS = (
    ("minItems", "maxItems"),
    ("minLength", "maxLength"),
    ("minProperties", "maxProperties"),
    ("minimum", "maximum"),
    ("minContains", "maxContains"),
)


_QUANTIFIER = re.compile(r"\*|\+|\?|\{(\d+)(,(\d*))?\}")
"""A regex quantifier: ``*``, ``+``, ``?``, ``{m}``, ``{m,}`` or ``{m,n}``."""

_GROUP_PREFIX = re.compile(r"\?(?:(<?[=!])|P?<[^>]*>|[a-zA-Z-]*:?)")
"""What follows a group's ``(``: a lookaround (group 1), a name, or flags."""

_RANGE = re.compile(r"(\\.|[^\\\]])-(\\.|[^\\\]])")
"""A range ``a-z`` in a character class (either end may be escaped)."""

_ZERO_WIDTH = frozenset("bBAZzG")

_CLASS = re.compile(r"\^?\]?(?:\\.|[^\]])*\]")
"""The rest of a character class after its ``[``."""
"""``\\b`` and the other escapes that match a place, not a character."""


class _PatternProblem(Exception):
    pass


def pattern_problem(pattern: str) -> str | None:
    """What makes a schema's regex ``pattern`` one no engine should be given, or None:
    a quantifier ``{m,n}`` with m over n, or a group that can match nothing repeated
    (``(a*)*``, ``(a{0,9}b?){0,50}``). A local engine's grammar tracks every way to
    split a text among such repeats: ``(a{0,5}b?){0,50}`` took one of its requests 25 s,
    ``((a{0,30}){0,30}){0,30}`` held the shared worker at full CPU for minutes (every
    completion timed out), where ``(a{1,300}){1,300}`` takes 0.1 s."""
    position, depth = 0, 0

    def alternatives() -> bool:  # whether it can match nothing
        nonlocal position
        empty = sequence()
        while position < len(pattern) and pattern[position] == "|":
            position += 1
            empty = sequence() or empty
        return empty

    def sequence() -> bool:
        nonlocal position
        empty = True
        while position < len(pattern) and pattern[position] not in "|)":
            start = position
            matched_empty = atom()
            while found := _QUANTIFIER.match(pattern, position):
                position = found.end()
                if position < len(pattern) and pattern[position] in "?+":  # lazy, possessive
                    position += 1
                least, most = _bounds(found)
                if most is not None and least > most:
                    raise _PatternProblem(
                        f"{found[0]} asks for at least {least} and at most {most} repeats: "
                        "no value can meet both"
                    )
                if matched_empty and (most is None or most > 1):
                    raise _PatternProblem(
                        f"{pattern[start:position]} repeats what can match nothing, which a "
                        "local engine's grammar cannot follow in time; make what is repeated "
                        "match at least one character"
                    )
                matched_empty = matched_empty or least == 0
            empty = empty and matched_empty
        return empty

    def atom() -> bool:
        nonlocal position, depth
        char = pattern[position]
        position += 1
        if char == "(":
            depth += 1
            if depth > SCHEMA_DEPTH_LIMIT:
                raise _PatternProblem(f"groups nested deeper than {SCHEMA_DEPTH_LIMIT} levels")
            prefix = _GROUP_PREFIX.match(pattern, position)
            if prefix:
                position = prefix.end()
            empty = alternatives() or bool(prefix and prefix[1])  # a lookaround: no width
            position += 1  # the closing parenthesis
            depth -= 1
            return empty
        if char == "[":
            end = _CLASS.match(pattern, position)
            position = end.end() if end else len(pattern)
            for low, high in _RANGE.findall(pattern, end.start() if end else 0, position):
                if any(len(end) == 2 and end[1].isalnum() for end in (low, high)):
                    continue  # an escape such as \\d or \\n: not compared here
                if low[-1] > high[-1]:
                    raise _PatternProblem(
                        f"[{low}-{high}] is a range from {low[-1]!r} down to {high[-1]!r}: no "
                        "character is in it; write the lower character first"
                    )
            return False
        if char == "\\":
            position += 1
            return pattern[position - 1 : position] in _ZERO_WIDTH
        return char in "^$"

    try:
        while position < len(pattern):
            alternatives()
            position += 1  # an unopened ")"
    except _PatternProblem as problem:
        return str(problem)
    return None


def _bounds(quantifier: re.Match[str]) -> tuple[int, int | None]:
    if quantifier[1] is None:
        return {"*": (0, None), "+": (1, None), "?": (0, 1)}[quantifier[0]]
    least = int(quantifier[1])
    if quantifier[2] is None:
        return least, least
    return least, int(quantifier[3]) if quantifier[3] else None


def schema_problem(node: object, where: str = "schema", depth: int = 0) -> str | None:
    """What makes a response schema one no engine should be given, or None: deeper than
    :data:`SCHEMA_DEPTH_LIMIT`, or bounds no value can meet (``minItems`` 5 with
    ``maxItems`` 2, or a ``pattern``'s ``{5,2}``: a local engine's grammar for either
    grew its worker past 17 GB, while every editor's completion waited), or a pattern
    :func:`pattern_problem` refuses."""
    if depth > SCHEMA_DEPTH_LIMIT:
        return f"{where}: nested deeper than {SCHEMA_DEPTH_LIMIT} levels"
    if isinstance(node, dict | list) and len(node) > SCHEMA_WIDTH_LIMIT:
        return f"{where}: over {SCHEMA_WIDTH_LIMIT} entries"
    children: list[tuple[str, object]] = []
    if isinstance(node, dict):
        pattern = node.get("pattern")
        problem = pattern_problem(pattern) if isinstance(pattern, str) else None
        if problem is not None:
            return f"{where}.pattern: {problem}"
        for low, high in _BOUNDS:
            least, most = node.get(low), node.get(high)
            numbers = all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in (least, most)
            )
            if numbers and least > most:  # type: ignore[operator]
                return f"{where}: {low} {least} is over {high} {most}: no value can meet both"
        children = [(f"{where}.{key}", value) for key, value in node.items()]
    elif isinstance(node, list):
        children = [(f"{where}[{index}]", value) for index, value in enumerate(node)]
    for path, child in children:
        if isinstance(child, dict | list):
            problem = schema_problem(child, path, depth + 1)
            if problem is not None:
                return problem
    return None


class JsonSchemaFormat(_Wire):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _meetable(cls, schema: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(schema)
        if problem is not None:
            raise ValueError(f"{problem}; send a schema some JSON value can follow")
        return schema


class ResponseFormat(_Wire):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON that follows
    ``json_schema.schema`` (a local engine constrains its sampling to it)."""

    model_config = ConfigDict(
        json_schema_extra={  # type json_schema needs its json_schema
            "anyOf": [
                {"properties": {"type": {"enum": ["text", "json_object"]}}},
                {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
            ]
        }
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema with a schema")
        return self

    def to_wire(self) -> dict[str, Any] | None:
        """The field as sent on; None for plain text (nothing to ask for)."""
        if self.type == "text":
            return None
        if self.json_schema is not None and self.type == "json_schema":
            schema = self.json_schema.model_dump(by_alias=True, exclude_none=True)
            return {"type": "json_schema", "json_schema": schema}
        return {"type": "json_object"}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # passed on whole

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema of the arguments."""
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

METADATA_PAIRS = 16
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
TEXT_ONLY: dict[str, Any] = {
    "anyOf": [{"type": "array", "items": {"const": "text"}}, {"type": "null"}]
}
"""``modalities`` as keel serves it: text alone."""

_DEPRECATED = WithJsonSchema(
    {
        "type": "null",
        "deprecated": True,
        "description": "OpenAI's deprecated function calling: refused, send `tools` and "
        "`tool_choice`.",
    }
)


class ChatCompletionRequest(_Limited):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                ONE_LIMIT[0],  # n_predict gives way to OpenAI's names (_limits)
                STREAM_OPTIONS_STREAMED,
                {  # a tool_choice other than none needs tools
                    "anyOf": [
                        {"not": {"required": ["tool_choice"]}},
                        {"properties": {"tool_choice": {"enum": ["none", None]}}},
                        {"required": ["tools"], "properties": {"tools": {"minItems": 1}}},
                    ]
                },
                {  # n_predict 0 asks for no answer, which is not streamed
                    "not": {
                        "required": ["n_predict", "stream"],
                        "properties": {"n_predict": {"const": 0}, "stream": {"const": True}},
                    }
                },
            ]
        }
    )

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    """Functions the model may call; a backend that calls tools (OpenAI-compatible
    ones) gets them, a local model answers in text."""
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = Field(None, max_length=32)
    """A reasoning model's effort (``minimal``, ``low``, ``medium``, ``high``): sent on to
    an OpenAI-compatible backend as the client gave it (it was dropped, and the backend's
    default effort answered). The embedded model does not reason and reads none."""
    prediction: dict[str, Any] | None = None
    """OpenAI's predicted output, sent on as ``reasoning_effort`` is."""
    verbosity: str | None = Field(None, max_length=32)
    """OpenAI's answer length hint, sent on as ``reasoning_effort`` is."""
    service_tier: str | None = Field(None, max_length=32)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    store: bool | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=METADATA_PAIRS)
    """OpenAI's processing tier, its prompt cache's key, and whether (and under what
    tags, OpenAI's limits) it stores the answer: sent on to an OpenAI-kind backend as
    sent (they were dropped, and a flex-tier client was billed at the default one)."""
    safety_identifier: str | None = Field(None, max_length=64)
    """OpenAI's stable id of the end user (``user``'s successor), sent on as those are."""
    web_search_options: dict[str, Any] | None = None
    """OpenAI's search models' options, sent on as those are (both were dropped); a local
    model, which does not search, refuses them."""

    modalities: Annotated[list[str] | None, WithJsonSchema(TEXT_ONLY)] = None
    audio: Annotated[dict[str, Any] | None, only()] = None
    """An answer in audio, refused when asked for, as ``logprobs`` is: answered in text
    alone, the client read it as if its audio had come."""

    @field_validator("metadata", mode="before")
    @classmethod
    def _few_tags(cls, value: object) -> object:
        if isinstance(value, dict) and len(value) > METADATA_PAIRS:
            raise ValueError(f"at most {METADATA_PAIRS} key-value pairs (OpenAI's limit)")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(kind != "text" for kind in value):
            raise ValueError('keel answers in text only, not audio: send ["text"] or leave it out')
        return value

    @field_validator("audio", mode="before")
    @classmethod
    def _no_audio(cls, value: object) -> object:
        if value is not None:
            raise ValueError("keel answers in text only, with no audio: leave 'audio' out")
        return value

    n_predict: int | None = Field(
        None,
        ge=-1,
        le=MAX_TOKENS_LIMIT,
        description="llama.cpp's name for max_tokens (llama.vim sends it); 0 asks for no "
        "answer (llama.vim's warm-up while an instruction is typed), answered at once, "
        "without the model.",
    )

    logprobs: Annotated[bool | None, only(False)] = Field(
        None, description="Only false: keel returns no log probabilities."
    )
    top_logprobs: Annotated[int | None, only(0)] = Field(
        None, description="Only 0 or null, as ``logprobs``."
    )

    @field_validator("logprobs", "top_logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value: object, info: ValidationInfo) -> object:
        """Refused when asked for, as on ``/v1/completions``: answered with ``logprobs:
        null``, a client would read the answer as if it had them."""
        return _not_asked(value, "return log probabilities", info.field_name)

    functions: Annotated[Any, _DEPRECATED] = None
    function_call: Annotated[Any, _DEPRECATED] = None
    """OpenAI's deprecated function calling, refused by name: ignored as unknown fields
    are, the model answered in text, calling nothing."""

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any, info: ValidationInfo) -> None:
        if value is not None:
            instead = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(
                f"OpenAI's deprecated function-calling field, which keel does not take: "
                f"send '{instead}' instead"
            )

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_keel_takes(cls, value: object) -> object:
        """A choice of another type (OpenAI's ``allowed_tools``, ``custom``) was told only
        "Input should be 'none', 'auto' or 'required'", though a named function is taken."""
        if isinstance(value, dict) and value.get("type") not in ("function", None):
            raise ValueError(
                f"a tool_choice of type {str(value.get('type'))[:40]!r} is not taken: send"
                " 'none', 'auto', 'required' or {'type': 'function', 'function': {'name':"
                " ...}} (for allowed_tools, send only the allowed functions in 'tools')"
            )
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, value: ToolChoice | None, info: ValidationInfo
    ) -> ToolChoice | None:
        tools = info.data.get("tools")
        if value is None or value == "none":
            return value
        if not tools:
            raise ValueError("a tool_choice needs tools: send the functions in 'tools'")
        names = [tool.function.name for tool in tools]
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"{value.function.name!r} is not among the tools ({', '.join(names)})")
        return value

    def to_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(message.to_message() for message in self.messages)

    def tool_fields(self) -> dict[str, Any] | None:
        """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as sent on."""
        if not self.tools:
            return None
        return self.model_dump(
            include={"tools", "tool_choice", "parallel_tool_calls"}, exclude_none=True
        )

    def passed_on(self) -> dict[str, Any] | None:
        """The fields an OpenAI-compatible backend gets as the client sent them."""
        fields = self.model_dump(include=set(PASSED_ON), exclude_none=True)
        return fields or None

    def to_params(self) -> GenerationParams:
        """No limit named: the answer runs to the end of the context, as OpenAI's does.
        A limit goes on under the name the client gave it (llama.cpp's ``n_predict`` as
        ``max_tokens``)."""
        if self.max_completion_tokens:
            return self._params(self.max_completion_tokens, "max_completion_tokens")
        if self.max_tokens is None and self.n_predict is not None and self.n_predict > 0:
            return self._params(self.n_predict, named=False, said="n_predict")
        return self._params(self.max_tokens)

    def _limits(self) -> dict[str, int]:
        """OpenAI's two names, which must agree; llama.cpp's ``n_predict`` (llama.vim's)
        gives way to either."""
        return {name: n for name, n in super()._limits().items() if name != "n_predict"}

    def asks_no_answer(self) -> bool:
        """llama.cpp's ``n_predict: 0``, with no other limit: the prompt alone."""
        return self.n_predict == 0 and not (self.max_tokens or self.max_completion_tokens)


class EmbeddingRequest(_Wire):
    model: str | None = None
    input: Annotated[
        str | list[str],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": MAX_EMBEDDING_INPUTS,
                    },
                ]
            }
        ),
    ]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    """Checked against what the model makes: keel does not shorten vectors."""
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, value: object) -> object:
        hint = "; LangChain's OpenAIEmbeddings sends IDs unless check_embedding_ctx_length=False"
        return _no_token_ids(value, hint)

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("input must hold at least one string")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request (OpenAI's limit)")
        if any(not text for text in texts):
            raise ValueError("inputs must not be empty strings")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses (documented in /openapi.json; the serving objects build them as dicts) ---


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        description="Of the prompt's tokens, those the engine took from its cache."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, description="Where the engine said how much of the prompt its cache held."
    )


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    """The backend's, where it sent one."""
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="Null when the model only called tools.")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | Literal["tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    """The backend's, where it sent one."""
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32s.")


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parameters: dict[str, Any] | None = None
    context_length: int | None = None
    """A local model's context in tokens, under the names clients read: llama.vscode's
    agent looks for ``context_length``, Continue's autodetect for vLLM's ``max_model_len``;
    without them they sized requests for 8,192 tokens."""
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
