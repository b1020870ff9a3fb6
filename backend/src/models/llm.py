"""Pydantic models of the chat API: requests, answers, stream events and the error envelope."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

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


class ChatMessage(_Request):
    role: Role
    content: str = Field(min_length=1)


class LLMRequest(_Request):
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

    @field_validator("max_tokens", "seed", mode="before")
    @classmethod
    def _integral_numbers(cls, value: object) -> object:
        return _integral(value)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


# What a chat stream yields, in order: deltas, then exactly one `StreamDone` or `StreamError`.
StreamEvent = StreamDelta | StreamDone | StreamError


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
