"""The stream relays: an opened upstream stream of `chat.completion.chunk`s, relayed as our typed stream events
(`ChatStream`, for /api/v1/llm/chat) or chunk by chunk in OpenAI's own format (`ChunkStream`, for the
OpenAI-compatible /v1/chat/completions).

Both are one reader (`_RelayedStream`): upstream bytes decoded by httpx-sse, errors in the stream, the end (exactly
one done event or `StreamError`), closing and accounting; each says only what a chunk becomes. The relay never
raises into its reader: a failure after the stream began is an event, because the HTTP status has already been sent.
`ChatStream.aclose()` always runs (the response guarantees it): it closes the upstream, gives the connection slot
back and writes the call's log line, once.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from enum import Enum
from typing import Any, Generic, TypedDict, TypeVar, Unpack

import httpx
from httpx_sse import EventSource
from pydantic import ValidationError

from src.core.errors import ErrorCode, LLMServiceError, ServiceError
from src.core.llm.accounting import CallAccounting
from src.core.llm.call_record import CallLog, CallRecord
from src.core.llm.upstream_errors import malformed, redact_secrets, translate_upstream_errors
from src.models.llm import MAX_TOKEN_COUNT, StreamDelta, StreamDone, StreamError, StreamRefusal, Usage
from src.models.openai_compat import RelayedChunk, RelayedDone

DONE_SENTINEL = "[DONE]"
SHUTDOWN_MESSAGE = "The service is shutting down; the answer was cut short. Retry on another instance."
INTERNAL_MESSAGE = "The service failed unexpectedly."


class StreamEnd(Enum):
    """How a stream's reading ended, as far as the caller is concerned."""

    DELIVERED = "delivered"
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"
    # Resumable streams: stopped by `DELETE`, or grown past the buffer kept for resuming them.
    STOPPED = "stopped"
    BUFFER_FULL = "buffer_full"
    # Resumable streams: the store of their buffers (Redis) failed, or their producer did.
    BUFFER_LOST = "buffer_lost"


def _detail(details: object, name: str) -> int | None:
    value = details.get(name) if isinstance(details, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def parse_usage(value: object) -> Usage | None:
    """OpenAI's usage object, with its details flattened: reasoning and cached tokens (None when not said)."""
    if not isinstance(value, dict):
        return None
    try:
        return Usage(
            prompt_tokens=value["prompt_tokens"],
            completion_tokens=value["completion_tokens"],
            total_tokens=value["total_tokens"],
            reasoning_tokens=_detail(value.get("completion_tokens_details"), "reasoning_tokens"),
            cached_tokens=_detail(value.get("prompt_tokens_details"), "cached_tokens"),
        )
    except (KeyError, ValidationError):
        return None


def record_usage(record: CallRecord, value: object) -> None:
    """The usage an upstream reported, on the record (its details too, for the log line and the ledger)."""
    usage = record.usage = parse_usage(value)
    if usage is not None:
        record.reasoning_tokens = usage.reasoning_tokens
        record.cached_tokens = usage.cached_tokens


# What a stream yields before its end: `ChatStream`'s typed events, or `ChunkStream`'s untouched chunks.
E = TypeVar("E")


class RelayArgs(TypedDict):
    """What every relayed stream is made of (the service passes them; each kind adds its own)."""

    response: httpx.Response
    record: CallRecord
    call_log: CallLog
    accounting: CallAccounting
    release_slot: Callable[[], None]
    keep_answer: bool


class _RelayedStream(ABC, Generic[E]):
    """An opened upstream stream of `chat.completion.chunk`s, read once: the reading, the errors and the end are
    the same for both presentations; what each chunk becomes is theirs (`_events_of`, `_done`).
    `aclose()` must always be called: it closes the upstream, frees the slot and accounts the call, once."""

    # Read by its own connection: events are numbered from 1, and a shutdown's last event is part of the stream.
    resumable = False
    first_event_id = 1

    def __init__(self, **relay: Unpack[RelayArgs]) -> None:
        self.upstream_id: str | None = None
        self._response = relay["response"]
        self._record = relay["record"]
        self._call_log = relay["call_log"]
        self._accounting = accounting = relay["accounting"]
        self._release_slot = relay["release_slot"]
        self._answer: list[str] | None = [] if relay["keep_answer"] else None
        self._closed = False
        self._events = self._relay()
        accounting.stream_started()

    @property
    def request_id(self) -> str:
        return self._record.request_id

    def __aiter__(self) -> AsyncIterator[E | StreamError]:
        return self._events

    def shutdown_event(self) -> StreamError:
        """The last event of a stream cut short by the server's shutdown."""
        return StreamError(
            code=ErrorCode.SERVER_SHUTTING_DOWN, message=SHUTDOWN_MESSAGE, request_id=self._record.request_id
        )

    @abstractmethod
    def _events_of(self, data: str, chunk: dict[str, Any]) -> Iterator[E]:
        """What one upstream chunk (`data` as sent, `chunk` parsed) becomes for the reader."""

    @abstractmethod
    def _done(self) -> E:
        """The last event of a stream that completed."""

    async def _relay(self) -> AsyncGenerator[E | StreamError, None]:
        record = self._record
        usage: object = None
        completed = False
        try:
            with translate_upstream_errors():
                async for sse in EventSource(self._response).aiter_sse():
                    if sse.data == DONE_SENTINEL:
                        completed = True
                        break
                    chunk = _chunk(sse.data)
                    error = chunk.get("error")
                    if sse.event == "error" or error:
                        raise _error_in_stream(error)
                    self.upstream_id = self.upstream_id or chunk.get("id")
                    record.upstream_model = record.upstream_model or chunk.get("model")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for event in self._events_of(sse.data, chunk):
                        yield event
            if not completed and record.finish_reason is None:
                raise LLMServiceError(
                    ErrorCode.UPSTREAM_ERROR,
                    "The LLM provider ended the stream before the answer was complete.",
                    status_code=502,
                )
            record_usage(record, usage)
            yield self._done()
        except ServiceError as exc:
            record.code = exc.code
            yield StreamError(code=exc.code, message=exc.message, request_id=record.request_id)
        except Exception:
            # The response has started: the middleware can no longer answer 500, so the stream says it.
            self._call_log.unexpected("stream_relay_failed")
            record.code = ErrorCode.INTERNAL_ERROR
            yield StreamError(code=ErrorCode.INTERNAL_ERROR, message=INTERNAL_MESSAGE, request_id=record.request_id)

    def _delivered(self, text: str, *, answer: bool) -> None:
        """Text the reader got: for the time to first token, the estimate of an abandoned stream's cost, and (with
        LOG_PROMPTS) the logged answer."""
        self._record.delivered(text)
        if answer and self._answer is not None:
            self._answer.append(text)

    async def aclose(self, *, end: StreamEnd = StreamEnd.DELIVERED) -> None:
        """Close the upstream (shielded: a disconnect cancels the caller), free the slot, log the call once."""
        if self._closed:
            return
        self._closed = True
        record = self._record
        _mark_end(record, end)
        if self._answer is not None:
            record.answer = "".join(self._answer)
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        try:
            try:
                await self._events.aclose()
            finally:
                await self._response.aclose()
        finally:
            self._release_slot()
            self._accounting.stream_ended()
            settle = self._accounting.finish(self._record)
            if settle is not None:
                await settle


class ChatStream(_RelayedStream[StreamDelta | StreamRefusal | StreamDone]):
    """The chat route's stream: `StreamDelta`s and `StreamRefusal`s, then one `StreamDone` or `StreamError`."""

    def __init__(self, *, stream_id: str, **relay: Unpack[RelayArgs]) -> None:
        self.stream_id = stream_id
        super().__init__(**relay)

    def stopped_event(self) -> StreamDone:
        """The last event of a stream stopped by its caller (`DELETE`): usage only if the upstream had sent it."""
        record = self._record
        return StreamDone(
            id=self.upstream_id,
            model=record.upstream_model,
            request_id=record.request_id,
            finish_reason="cancelled",
            usage=record.usage,
        )

    def note_resumes(self, count: int) -> None:
        self._record.resumes = count

    def _events_of(self, data: str, chunk: dict[str, Any]) -> Iterator[StreamDelta | StreamRefusal | StreamDone]:
        for content, refusal, finish_reason in _choices(chunk):
            if content:
                self._delivered(content, answer=True)
                yield StreamDelta(content=content)
            if refusal:
                self._delivered(refusal, answer=False)
                yield StreamRefusal(content=refusal)
            if finish_reason:
                self._record.finish_reason = finish_reason

    def _done(self) -> StreamDone:
        record = self._record
        return StreamDone(
            id=self.upstream_id,
            model=record.upstream_model,
            request_id=record.request_id,
            finish_reason=record.finish_reason,
            usage=record.usage,
        )


# What a `ChunkStream` yields, in order: the upstream's chunks, then exactly one `RelayedDone` or `StreamError`.
ChunkEvent = RelayedChunk | RelayedDone | StreamError


class ChunkStream(_RelayedStream[RelayedChunk | RelayedDone]):
    """The OpenAI-compatible API's stream: the upstream's chunks untouched (tool-call deltas, logprobs, `n` choices,
    fields OpenAI adds tomorrow). The usage chunk is always asked for (accounting); it is passed on only when the
    caller asked for it. OpenAI's stream has no event ids: its encoder writes none."""

    def __init__(self, *, include_usage: bool, **relay: Unpack[RelayArgs]) -> None:
        self._include_usage = include_usage
        super().__init__(**relay)

    def _events_of(self, data: str, chunk: dict[str, Any]) -> Iterator[RelayedChunk | RelayedDone]:
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise malformed("stream chunk")
        if chunk.get("usage") and not choices and not self._include_usage:
            return
        for choice in choices:
            self._account(choice)
        # One `data:` line per chunk: a chunk the upstream spread over several lines is re-encoded.
        yield RelayedChunk(data if "\n" not in data else json.dumps(chunk, separators=(",", ":")))

    def _done(self) -> RelayedDone:
        return RelayedDone()

    def _account(self, choice: object) -> None:
        """What one choice of a chunk delivered (its text, refusal or tool-call pieces), and how it finished."""
        if not isinstance(choice, dict):
            raise malformed("stream chunk")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._delivered(content, answer=True)
            pieces = _tool_call_text(delta.get("tool_calls"))
            refusal = delta.get("refusal")
            if isinstance(refusal, str):
                pieces += refusal
            if pieces:
                self._delivered(pieces, answer=False)
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            self._record.finish_reason = finish_reason


def _tool_call_text(tool_calls: object) -> str:
    """The names and argument pieces of streamed tool-call deltas."""
    if not isinstance(tool_calls, list):
        return ""
    text = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            text += [value for value in (function.get("name"), function.get("arguments")) if isinstance(value, str)]
    return "".join(text)


def _mark_end(record: CallRecord, end: StreamEnd) -> None:
    if end is StreamEnd.CLIENT_GONE or end is StreamEnd.STOPPED:
        record.cancelled = True
    elif end is StreamEnd.SHUTDOWN:
        record.code = ErrorCode.SERVER_SHUTTING_DOWN
    elif end is StreamEnd.BUFFER_FULL:
        record.code = ErrorCode.RESUME_BUFFER_FULL
    elif end is StreamEnd.BUFFER_LOST:
        record.code = ErrorCode.RESUME_UNAVAILABLE


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise malformed("stream chunk") from exc
    if not isinstance(chunk, dict):
        raise malformed("stream chunk")
    return chunk


def _choices(chunk: dict[str, Any]) -> list[tuple[str | None, str | None, str | None]]:
    """(content, refusal, finish_reason) of each choice in a chunk."""
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise malformed("stream chunk")
    found: list[tuple[str | None, str | None, str | None]] = []
    for choice in choices:
        if not isinstance(choice, dict):
            raise malformed("stream chunk")
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            found.append((None, None, choice.get("finish_reason")))
            continue
        content, refusal = delta.get("content"), delta.get("refusal")
        found.append(
            (
                content if isinstance(content, str) else None,
                refusal if isinstance(refusal, str) else None,
                choice.get("finish_reason"),
            )
        )
    return found


def _error_in_stream(error: object) -> LLMServiceError:
    """An error the provider reported inside a stream that had already started."""
    message = error.get("message") if isinstance(error, dict) else None
    text = redact_secrets(message) if isinstance(message, str) and message.strip() else "The LLM provider failed."
    return LLMServiceError(ErrorCode.UPSTREAM_ERROR, text, status_code=502)
