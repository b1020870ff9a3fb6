"""The stream relays: an opened upstream stream of `chat.completion.chunk`s, relayed as our typed stream events
(`ChatStream`, for /api/v1/llm/chat) or chunk by chunk in OpenAI's own format (`ChunkStream`, for the
OpenAI-compatible /v1/chat/completions).

Upstream bytes are decoded by httpx-sse; each chunk becomes `StreamDelta`s; the end is exactly one `StreamDone` or
`StreamError`. The relay never raises into its reader: a failure after the stream began is an event, because the
HTTP status has already been sent. `ChatStream.aclose()` always runs (the response guarantees it): it closes the
upstream, gives the connection slot back and writes the call's log line, once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from enum import Enum
from typing import Any

import httpx
from httpx_sse import EventSource
from pydantic import ValidationError

from src.core.errors import ErrorCode, LLMServiceError, ServiceError
from src.core.llm.accounting import CallAccounting
from src.core.llm.call_record import CallLog, CallRecord
from src.core.llm.upstream_errors import malformed, redact_secrets, translate_upstream_errors
from src.models.llm import StreamDelta, StreamDone, StreamError, StreamEvent, StreamRefusal, Usage
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
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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


class ChatStream:
    """An opened upstream stream, iterated as `StreamEvent`s; `aclose()` must always be called (it logs the call)."""

    # Read by its own connection: events are numbered from 1, and a shutdown's last event is part of the stream.
    resumable = False
    first_event_id = 1

    def __init__(
        self,
        *,
        stream_id: str,
        response: httpx.Response,
        record: CallRecord,
        call_log: CallLog,
        accounting: CallAccounting,
        release_slot: Callable[[], None],
        keep_answer: bool,
    ) -> None:
        self.stream_id = stream_id
        self.upstream_id: str | None = None
        self._response = response
        self._record = record
        self._call_log = call_log
        self._accounting = accounting
        self._release_slot = release_slot
        self._answer: list[str] | None = [] if keep_answer else None
        self._closed = False
        self._events = self._relay()
        accounting.stream_started()

    @property
    def request_id(self) -> str:
        return self._record.request_id

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events

    def shutdown_event(self) -> StreamError:
        """The last event of a stream cut short by the server's shutdown."""
        return StreamError(
            code=ErrorCode.SERVER_SHUTTING_DOWN, message=SHUTDOWN_MESSAGE, request_id=self._record.request_id
        )

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

    async def _relay(self) -> AsyncGenerator[StreamEvent, None]:
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
                    for content, refusal, finish_reason in _choices(chunk):
                        if content:
                            record.delivered(content)
                            if self._answer is not None:
                                self._answer.append(content)
                            yield StreamDelta(content=content)
                        if refusal:
                            record.delivered(refusal)
                            yield StreamRefusal(content=refusal)
                        if finish_reason:
                            record.finish_reason = finish_reason
            if not completed and record.finish_reason is None:
                raise LLMServiceError(
                    ErrorCode.UPSTREAM_ERROR,
                    "The LLM provider ended the stream before the answer was complete.",
                    status_code=502,
                )
            record_usage(record, usage)
            yield StreamDone(
                id=self.upstream_id,
                model=record.upstream_model,
                request_id=record.request_id,
                finish_reason=record.finish_reason,
                usage=record.usage,
            )
        except ServiceError as exc:
            record.code = exc.code
            yield StreamError(code=exc.code, message=exc.message, request_id=record.request_id)
        except Exception:
            # The response has started: the middleware can no longer answer 500, so the stream says it.
            self._call_log.unexpected("stream_relay_failed")
            record.code = ErrorCode.INTERNAL_ERROR
            yield StreamError(code=ErrorCode.INTERNAL_ERROR, message=INTERNAL_MESSAGE, request_id=record.request_id)

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
        await _close_call(self._events, self._response, self._release_slot, self._accounting, self._record)


# What a `ChunkStream` yields, in order: the upstream's chunks, then exactly one `RelayedDone` or `StreamError`.
ChunkEvent = RelayedChunk | RelayedDone | StreamError


class ChunkStream:
    """An opened upstream stream relayed chunk by chunk, untouched (tool-call deltas, logprobs, `n` choices, fields
    OpenAI adds tomorrow), for the OpenAI-compatible API. The same accounting as `ChatStream`: the upstream's usage
    chunk (always asked for), else what was delivered; that chunk is passed on only when the caller asked for it.
    `aclose()` must always be called (it closes the upstream and logs the call, once)."""

    # Read by its own connection only; OpenAI's stream has no event ids (its encoder writes none).
    resumable = False
    first_event_id = 1

    def __init__(
        self,
        *,
        response: httpx.Response,
        record: CallRecord,
        call_log: CallLog,
        accounting: CallAccounting,
        release_slot: Callable[[], None],
        include_usage: bool,
        keep_answer: bool,
    ) -> None:
        self._response = response
        self._record = record
        self._call_log = call_log
        self._accounting = accounting
        self._release_slot = release_slot
        self._include_usage = include_usage
        self._answer: list[str] | None = [] if keep_answer else None
        self._closed = False
        self._events = self._relay()
        accounting.stream_started()

    @property
    def request_id(self) -> str:
        return self._record.request_id

    def __aiter__(self) -> AsyncIterator[ChunkEvent]:
        return self._events

    def shutdown_event(self) -> StreamError:
        return StreamError(
            code=ErrorCode.SERVER_SHUTTING_DOWN, message=SHUTDOWN_MESSAGE, request_id=self._record.request_id
        )

    async def _relay(self) -> AsyncGenerator[ChunkEvent, None]:
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
                    record.upstream_model = record.upstream_model or chunk.get("model")
                    choices = chunk.get("choices") or []
                    if not isinstance(choices, list):
                        raise malformed("stream chunk")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not choices and not self._include_usage:
                            continue
                    for choice in choices:
                        self._account(choice)
                    # One `data:` line per chunk: a chunk the upstream spread over several lines is re-encoded.
                    data = sse.data if "\n" not in sse.data else json.dumps(chunk, separators=(",", ":"))
                    yield RelayedChunk(data)
            if not completed and record.finish_reason is None:
                raise LLMServiceError(
                    ErrorCode.UPSTREAM_ERROR,
                    "The LLM provider ended the stream before the answer was complete.",
                    status_code=502,
                )
            record_usage(record, usage)
            yield RelayedDone()
        except ServiceError as exc:
            record.code = exc.code
            yield StreamError(code=exc.code, message=exc.message, request_id=record.request_id)
        except Exception:
            self._call_log.unexpected("stream_relay_failed")
            record.code = ErrorCode.INTERNAL_ERROR
            yield StreamError(code=ErrorCode.INTERNAL_ERROR, message=INTERNAL_MESSAGE, request_id=record.request_id)

    def _account(self, choice: object) -> None:
        """What one choice of a chunk delivered (its text, refusal or tool-call pieces), for the time to first token
        and for the estimate of an abandoned stream's cost; and how it finished."""
        if not isinstance(choice, dict):
            raise malformed("stream chunk")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._record.delivered(content)
                if self._answer is not None:
                    self._answer.append(content)
            pieces = _tool_call_text(delta.get("tool_calls"))
            refusal = delta.get("refusal")
            if isinstance(refusal, str):
                pieces += refusal
            if pieces:
                self._record.delivered(pieces)
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            self._record.finish_reason = finish_reason

    async def aclose(self, *, end: StreamEnd = StreamEnd.DELIVERED) -> None:
        """Close the upstream (shielded: a disconnect cancels the caller), free the slot, log the call once."""
        if self._closed:
            return
        self._closed = True
        _mark_end(self._record, end)
        if self._answer is not None:
            self._record.answer = "".join(self._answer)
        await asyncio.shield(
            _close_call(self._events, self._response, self._release_slot, self._accounting, self._record)
        )


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


async def _close_call(
    events: AsyncGenerator[Any, None],
    response: httpx.Response,
    release_slot: Callable[[], None],
    accounting: CallAccounting,
    record: CallRecord,
) -> None:
    """The end of every relayed stream: the relay and the upstream closed, the slot back, the call accounted once."""
    try:
        try:
            await events.aclose()
        finally:
            await response.aclose()
    finally:
        release_slot()
        accounting.stream_ended()
        settle = accounting.finish(record)
        if settle is not None:
            await settle


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
