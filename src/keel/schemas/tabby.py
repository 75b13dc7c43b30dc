"""Wire models of Tabby's server API, as Tabby's IDE clients send and read them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from keel.pipeline.languages import LANGUAGE_ID_PATTERN

U32_MAX = 2**32 - 1
"""Tabby's integers are unsigned Rust integers (u32; ``seed`` is u64)."""


def as_int64(seed: int) -> int:
    """A seed of 2**63 and above as the signed 64-bit integer with the same bits, which
    OpenAI-style backends take (Tabby's seed is a u64, OpenAI's an i64)."""
    return seed - 2**64 if seed >= 2**63 else seed


U64Seed = Annotated[int, Field(ge=0, lt=2**64), AfterValidator(as_int64)]
"""Tabby's seed: any u64 (2**63 and above were a 400). ``lt=2**64``, not ``le=2**64 - 1``,
which ``/openapi.json`` writes as the float 2**64."""


class _Wire(BaseModel):
    """A request body's model, strict about JSON types as Tabby's serde is (a string
    where a number belongs is a 400 naming the field, not converted)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class Declaration(_Wire):
    filepath: str
    body: str


class ClientSnippet(_Wire):
    filepath: str
    body: str
    score: float | None = None


MAX_CLIENT_SNIPPETS = 512
"""Declarations or snippets a Tabby request may carry in each list (tabby-agent sends a
few dozen at most): 15,000 were each counted by the local model's tokenizer, and the
worker, busy past its liveness limit, was killed as frozen again and again."""


class Segments(_Wire):
    prefix: str
    suffix: str | None = None
    filepath: str | None = None
    git_url: str | None = None
    declarations: list[Declaration] | None = Field(None, max_length=MAX_CLIENT_SNIPPETS)
    relevant_snippets_from_changed_files: list[ClientSnippet] | None = Field(
        None, max_length=MAX_CLIENT_SNIPPETS
    )
    relevant_snippets_from_recently_opened_files: list[ClientSnippet] | None = Field(
        None, max_length=MAX_CLIENT_SNIPPETS
    )
    clipboard: str | None = None


class DebugOptions(_Wire):
    raw_prompt: str | None = None
    return_snippets: bool = False
    return_prompt: bool = False
    disable_retrieval_augmented_code_completion: bool = False


TABBY_SHAPE: dict[str, Any] = {
    "allOf": [
        {"anyOf": [{"not": {"required": ["prompt"]}}, {"required": ["segments"]}]},
        {
            "anyOf": [
                {"required": ["segments"], "properties": {"segments": {"type": "object"}}},
                {
                    "required": ["debug_options"],
                    "properties": {
                        "debug_options": {
                            "type": "object",
                            "required": ["raw_prompt"],
                            "properties": {"raw_prompt": {"type": "string"}},
                        }
                    },
                },
            ]
        },
    ]
}
"""What tells a Tabby body from OpenAI's: no ``prompt``, or ``segments`` (then Tabby
ignores ``prompt``); and what it completes: ``segments``, or a debug ``raw_prompt``
(a body with neither, ``{}`` or a language alone, was allowed here and is a 400)."""


class TabbyCompletionRequest(_Wire):
    """Tabby's completion request; a body with ``prompt`` is OpenAI's instead."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=TABBY_SHAPE)

    language: str | None = Field(
        None, max_length=64, json_schema_extra={"pattern": LANGUAGE_ID_PATTERN}
    )
    segments: Segments | None = None
    user: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: U64Seed | None = None
    mode: Literal["standard"] | None = Field(
        None,
        description="'standard' (code completion), the only mode keel serves: Tabby's "
        "'next_edit_suggestion' is refused rather than answered as a completion.",
    )
    debug_options: DebugOptions | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _standard_only(cls, value: object) -> object:
        """pydantic's "Input should be 'standard'" said neither why nor what to send."""
        if value is None or value == "standard":
            return value
        raise ValueError(
            f"keel serves code completions only (mode 'standard'), not {value!r}: it "
            "makes no next-edit suggestions; leave mode out, or send 'standard'"
        )


class Choice(BaseModel):
    index: int
    text: str


class DebugSnippet(BaseModel):
    filepath: str
    body: str
    score: float
    """As Tabby: required, 1.0 for a declaration."""


class DebugData(BaseModel):
    snippets: list[DebugSnippet] | None = None
    prompt: str | None = None


class TabbyCompletionResponse(BaseModel):
    id: str
    choices: list[Choice]
    debug_data: DebugData | None = None
    mode: Literal["standard"] = "standard"


class LogEventRequest(_Wire):
    type: Literal["view", "select", "dismiss"]
    completion_id: str = Field(max_length=256)
    choice_index: int = Field(ge=0, le=U32_MAX)
    view_id: str | None = Field(None, max_length=256)
    elapsed: int | None = Field(None, ge=0, le=U32_MAX)


class Version(BaseModel):
    build_date: str
    build_timestamp: str
    git_sha: str
    git_describe: str


class LocalModelHealth(BaseModel):
    model_id: str
    device: str


class RemoteModelHealth(BaseModel):
    kind: str
    model_name: str | None = None
    api_endpoint: str


class ModelHealth(BaseModel):
    """Tabby's: ``{"local": {...}}`` or ``{"remote": {...}}``."""

    local: LocalModelHealth | None = None
    remote: RemoteModelHealth | None = None


class HealthModels(BaseModel):
    completion: ModelHealth | None = None
    chat: ModelHealth | None = None
    embedding: ModelHealth | None = None


class HealthState(BaseModel):
    model: str | None
    chat_model: str | None = None
    chat_device: str | None = None
    device: str
    arch: str
    cpu_info: str
    cpu_count: int
    cuda_devices: list[str]
    version: Version
    models: HealthModels
    webserver: bool | None = None


class ServerSetting(BaseModel):
    disable_client_side_telemetry: bool = True
    """Tabby's clients then send TabbyML no usage data (tabby-agent's anonymous usage
    tracking); Tabby's own default is false. keel sends none either."""


class BetaModels(BaseModel):
    completion: list[str]
    chat: list[str]


class CompletionStats(BaseModel):
    since: float
    until: float
    data: list[dict[str, Any]]
