"""Pydantic models of the chat API: requests, answers, stream events and the error envelope."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

Role = Literal["system", "developer", "user", "assistant"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
StopSequence = Annotated[str, Field(min_length=1)]
MAX_STOP_SEQUENCES = 4


def _integral(value: object) -> object:
    """JSON Schema's `integer` includes 1.0; strings, booleans and fractions stay rejected (strict ints)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# What the OpenAPI document promises: numbers are JSON numbers (never "1"); integers are integral numbers
# (StrictInt fields of requests also take 1.0, by the `_integral` validator on the model).
JsonNumber = StrictFloat


class _Request(BaseModel):
    # Unknown fields are a 422: a typo such as `temprature` must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


# An image is a public https URL or inline base64 data in one of the formats OpenAI's vision models read. A pattern
# (not a validator) so that the OpenAPI document states the rule too; ASCII whitespace only, as `\s` differs between
# Python's regular expressions and JSON Schema's.
IMAGE_URL_PATTERN = (
    r"^(?:https://[^ \t\n\r\f\v]+|data:image/(?:png|jpeg|webp|gif);base64,"
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4}))$"
)


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr = Field(min_length=1)


class ImageURL(_Request):
    url: StrictStr = Field(
        pattern=IMAGE_URL_PATTERN,
        description="An https:// URL, or a data:image/png|jpeg|webp|gif;base64,... URL (it counts against "
        "MAX_REQUEST_BYTES).",
    )
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    # Content parts only in user messages (the validator below), said in the schema too.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"role": {"not": {"const": "user"}}}},
            "then": {"properties": {"content": {"type": "string"}}},
        },
    )

    role: Role
    content: Annotated[str, Field(min_length=1)] | Annotated[list[ContentPart], Field(min_length=1)] = Field(
        description="Text, or for a `user` message a list of text and image parts, forwarded in order."
    )

    @model_validator(mode="after")
    def _parts_only_from_users(self) -> ChatMessage:
        if not isinstance(self.content, str) and self.role != "user":
            raise ValueError(f"only user messages may carry content parts (this one is {self.role!r})")
        return self


class TextFormat(_Request):
    type: Literal["text"]


class JsonObjectFormat(_Request):
    type: Literal["json_object"]


class JsonSchemaSpec(_Request):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    # Named `schema` on the wire; the attribute is renamed so it does not shadow BaseModel's.
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON Schema the answer must follow.")
    strict: StrictBool | None = None


class JsonSchemaFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class LLMRequest(_Request):
    # `resumable` needs `stream` (the validator below), said in the schema too so that clients can know it.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"resumable": {"const": True}}, "required": ["resumable"]},
            "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
        },
    )

    messages: list[ChatMessage] = Field(min_length=1, description="Conversation history, forwarded in order.")
    model: str | None = Field(default=None, min_length=1, max_length=256, description="Default: LLM_DEFAULT_MODEL.")
    stream: StrictBool = False
    temperature: JsonNumber | None = Field(default=None, ge=0, le=2)
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="Sent upstream as `max_completion_tokens`.")
    top_p: JsonNumber | None = Field(default=None, ge=0, le=1)
    stop: StopSequence | Annotated[list[StopSequence], Field(min_length=1, max_length=MAX_STOP_SEQUENCES)] | None = None
    presence_penalty: JsonNumber | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: JsonNumber | None = Field(default=None, ge=-2, le=2)
    seed: StrictInt | None = None
    reasoning_effort: ReasoningEffort | None = None
    user: str | None = Field(default=None, max_length=256)
    response_format: ResponseFormat | None = Field(default=None, description="Forwarded as OpenAI defines it.")
    resumable: StrictBool = Field(
        default=False,
        description="Streams only: the stream outlives its connection and can be resumed by its `X-Stream-ID`.",
    )

    @field_validator("max_tokens", "seed", mode="before")
    @classmethod
    def _integral_numbers(cls, value: object) -> object:
        return _integral(value)

    @model_validator(mode="after")
    def _resumable_streams_only(self) -> LLMRequest:
        if self.resumable and not self.stream:
            raise ValueError("resumable applies to streams only: set stream to true")
        return self


# Token counts an upstream reports are kept only in this range: every JSON parser reads them exactly, and the ledger's
# BIGINT columns hold them. An upstream's usage outside it counts as not reported (core/llm/relay.py: parse_usage).
MAX_TOKEN_COUNT = 2**53 - 1
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKEN_COUNT)]


class Usage(BaseModel):
    prompt_tokens: TokenCount
    completion_tokens: TokenCount
    total_tokens: TokenCount
    # From `completion_tokens_details` and `prompt_tokens_details`; null when the upstream did not say.
    reasoning_tokens: TokenCount | None = None
    cached_tokens: TokenCount | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    # The model's refusal (structured output), instead of content.
    refusal: str | None = None


class LLMResponse(BaseModel):
    id: str
    model: str
    request_id: str
    message: AssistantMessage
    finish_reason: str | None
    usage: Usage | None


class StreamDelta(BaseModel):
    """`event: delta`: one non-empty piece of the answer, in order."""

    content: str


class StreamRefusal(BaseModel):
    """`event: refusal`: a piece of the model's refusal, in order (structured output)."""

    content: str


class StreamDone(BaseModel):
    """`event: done`: the last event of a successful stream."""

    id: str | None
    model: str | None
    request_id: str
    finish_reason: str | None
    usage: Usage | None


class StreamError(BaseModel):
    """`event: error`: the last event of a stream that failed after it began."""

    code: str
    message: str
    request_id: str


# What a chat stream yields, in order: deltas (and refusals), then exactly one `StreamDone` or `StreamError`.
StreamEvent = StreamDelta | StreamRefusal | StreamDone | StreamError
# Each event's name on the wire (`event: delta`).
EVENT_NAMES: dict[type[StreamEvent], str] = {
    StreamDelta: "delta",
    StreamRefusal: "refusal",
    StreamDone: "done",
    StreamError: "error",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(BaseModel):
    """Body of every error response; also the payload of `event: error` (without the wrapper)."""

    error: ErrorDetail


UpstreamState = Literal[
    "unchecked", "ok", "key_rejected", "unreachable", "tls_untrusted", "not_openai_compatible", "not_configured"
]


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]


class ReadinessStatus(BaseModel):
    """`/health/ready`: whether to send traffic here, and the last known state of the upstream."""

    status: Literal["ok", "unavailable", "draining"]
    upstream: UpstreamState


class UsageRow(BaseModel):
    """One group of `GET /api/v1/llm/usage`: the group's value under its name (only that one), then the sums."""

    key: str | None = None
    model: str | None = None
    user: str | None = None
    day: str | None = None
    calls: int
    errors: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    rows: list[UsageRow]
