"""Records and schemas of the OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`): OpenAI's wire format.

The chat request is relayed as the caller sent it, so its schema here only documents what the service itself reads;
every other field is OpenAI's and passes through (`additionalProperties`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True, slots=True)
class PassthroughRequest:
    """A `/v1/chat/completions` body as the caller sent it, with what the service reads from it."""

    body: dict[str, Any]
    model: str | None
    stream: bool
    # Whether the caller asked for the usage chunk (the service always asks upstream, for its own accounting).
    include_usage: bool
    # max_completion_tokens, else max_tokens: what the key's limits reserve for the answer (per choice).
    max_tokens: int | None
    choices: int
    user: str | None


@dataclass(frozen=True, slots=True)
class RelayedCompletion:
    """A batch answer: the upstream's `chat.completion` JSON, byte for byte."""

    content: bytes


@dataclass(frozen=True, slots=True)
class RelayedChunk:
    """One `chat.completion.chunk` of a stream: the upstream's JSON text, forwarded untouched."""

    data: str


@dataclass(frozen=True, slots=True)
class RelayedDone:
    """The upstream finished the stream (`data: [DONE]`)."""


class ChatCompletionRequest(BaseModel):
    """What the service reads of a chat completion request; every other field is OpenAI's and is forwarded."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(min_length=1, description="OpenAI's messages, forwarded as sent.")
    model: str | None = Field(default=None, min_length=1, description="Default: LLM_DEFAULT_MODEL.")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(
        default=None, description="`include_usage`: the usage chunk is passed on only when asked for."
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    user: str | None = None


class ChatCompletion(BaseModel):
    """OpenAI's `chat.completion` object, as the upstream sent it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ModelObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorEnvelope(BaseModel):
    """OpenAI's error body, on every `/v1/` error; also the payload of a stream's last `data:` line when it fails."""

    error: OpenAIErrorDetail
