"""`LLMService`: chat over the shared upstream client, with the model policy, connection slots, retries and logs.

    get_chat_completion(request)     one batch answer (`LLMResponse`)
    stream_chat_completion(request)  opens the upstream first (failures before the first byte are plain HTTP
                                     errors), then a `ChatStream` of typed events that always closes the upstream,
                                     or for a resumable stream a follower of its buffer (core/llm/resumable.py)
    resume_stream / stop_stream      a resumable stream, by its id, for the key that started it
    relay_chat_completion(request)   the OpenAI-compatible API's batch: the upstream's `chat.completion` as sent
    relay_chat_completion_stream     ... and its stream: a `ChunkStream` of the upstream's own chunks
    list_models / retrieve_model     the models a caller may use (its allowlist, else the upstream's list)

Both APIs share everything here: model policy, limits, slots, retries, the error table, logs, ledger, metrics.

The only module, with core/llm/relay.py, that reads OpenAI's wire format.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import openai

from src.core.config import Settings
from src.core.errors import ErrorCode, LLMServiceError, ServiceError
from src.core.keys import ServiceKey
from src.core.limits import MemoryLimiter
from src.core.llm.accounting import CallAccounting
from src.core.llm.call_context import CallContext
from src.core.llm.call_record import CallLog, CallRecord
from src.core.llm.client import OpenAIClient
from src.core.llm.passthrough import loggable_messages, passthrough_body
from src.core.llm.relay import ChatStream, ChunkStream, StreamEnd, record_usage
from src.core.llm.resumable import ResumableStreams, StreamFollower, build_resumable_streams
from src.core.llm.retry import RetryPolicy
from src.core.llm.slots import UpstreamSlots
from src.core.llm.upstream_check import check_upstream
from src.core.llm.upstream_errors import (
    NOT_CONFIGURED_MESSAGE,
    malformed,
    map_upstream_error,
    rejection_of,
    translate_upstream_errors,
)
from src.core.shutdown import Drain
from src.models.llm import AssistantMessage, ChatMessage, LLMRequest, LLMResponse, UpstreamState
from src.models.openai_compat import ModelList, ModelObject, PassthroughRequest, RelayedCompletion

__all__ = ["LLMService", "LLMServiceError"]

_STREAM_OPTIONS = {"include_usage": True}
SHUTTING_DOWN_MESSAGE = "The service is shutting down; retry on another instance."
# The models list and one model: small answers, but through the same upstream that may be slow.
MODELS_TIMEOUT_SECONDS = 30.0
# An allowlisted model is listed without asking the upstream: the service is who grants it.
ALLOWED_MODEL_OWNER = "llm-service"
T = TypeVar("T")


def shutting_down() -> LLMServiceError:
    return LLMServiceError(
        ErrorCode.SERVER_SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, status_code=503, headers={"Retry-After": "1"}
    )


class LLMService:
    """Chat in batch or stream mode over the shared client."""

    def __init__(
        self,
        *,
        client: OpenAIClient | None,
        settings: Settings,
        drain: Drain | None = None,
        accounting: CallAccounting | None = None,
        resumable: ResumableStreams | None = None,
    ) -> None:
        self._client = client
        self._default_model = settings.llm_default_model
        self._allowed_models = frozenset(settings.llm_allowed_models)
        self._log_prompts = settings.log_prompts
        self._slots = UpstreamSlots(size=settings.llm_max_connections, wait_seconds=settings.llm_pool_timeout_seconds)
        self._retry = RetryPolicy(
            max_retries=settings.llm_max_retries, max_wait_seconds=settings.llm_max_retry_wait_seconds
        )
        self._drain = drain or Drain(grace_seconds=settings.llm_shutdown_grace_seconds)
        self._call_log = CallLog()
        self._accounting = accounting or CallAccounting(
            call_log=self._call_log,
            limiter=MemoryLimiter(),
            ledger=None,
            metrics=None,
            default_token_reserve=settings.llm_default_token_reserve,
        )
        self._resumable = resumable or build_resumable_streams(settings, redis_url=None, drain=self._drain)
        self.upstream_state: UpstreamState = "unchecked" if client is not None else "not_configured"

    @property
    def configured(self) -> bool:
        return self._client is not None

    async def check_upstream(self) -> None:
        """Ask the upstream for its models once and remember the verdict (for `/health/ready`)."""
        if self._client is not None:
            self.upstream_state = await check_upstream(self._client)

    @property
    def drain(self) -> Drain:
        return self._drain

    async def get_chat_completion(self, request: LLMRequest, *, context: CallContext) -> LLMResponse:
        """One batch answer."""
        record = self._record(request, context, stream=False)
        body = upstream_body(request, model=record.model)
        return await self._batch(record, context, body, max_tokens=request.max_tokens, read=self._answer_of)

    async def relay_chat_completion(self, request: PassthroughRequest, *, context: CallContext) -> RelayedCompletion:
        """The OpenAI-compatible batch: the same call, answered with the upstream's `chat.completion` as it sent it."""
        record = self._passthrough_record(request, context)
        body = passthrough_body(request, model=record.model)
        return await self._batch(
            record, context, body, max_tokens=request.max_tokens, choices=request.choices, read=_relayed_answer
        )

    async def relay_chat_completion_stream(self, request: PassthroughRequest, *, context: CallContext) -> ChunkStream:
        """The OpenAI-compatible stream, opened now like `stream_chat_completion` (failures on open are plain HTTP
        errors); the usage chunk is always asked for upstream and passed on only when the caller asked."""
        record = self._passthrough_record(request, context)
        body = passthrough_body(request, model=record.model)
        response = await self._open_stream(
            record, context, body, max_tokens=request.max_tokens, choices=request.choices
        )
        return ChunkStream(
            response=response,
            record=record,
            call_log=self._call_log,
            accounting=self._accounting,
            release_slot=self._slots.release,
            include_usage=request.include_usage,
            keep_answer=self._log_prompts,
        )

    async def list_models(self, *, caller: ServiceKey) -> ModelList:
        """The models `caller` may use: its allowlist, else the service's, else whatever the upstream lists."""
        allowed = self._allowed_for(caller)
        if allowed:
            return ModelList(data=[_allowed_model(model) for model in sorted(allowed)])
        client = self._configured_client()
        with translate_upstream_errors():
            response = await client.list_models(timeout_seconds=MODELS_TIMEOUT_SECONDS)
        try:
            return ModelList.model_validate_json(response.content)
        except ValueError as exc:
            raise malformed("models list") from exc

    async def retrieve_model(self, model: str, *, caller: ServiceKey) -> ModelObject:
        """One model `caller` may use, or 404 `model_not_found` (also for a model it may not use, as OpenAI says)."""
        allowed = self._allowed_for(caller)
        if allowed:
            if model not in allowed:
                raise LLMServiceError(
                    ErrorCode.MODEL_NOT_FOUND,
                    f"The model {model!r} does not exist or you do not have access to it.",
                    status_code=404,
                )
            return _allowed_model(model)
        client = self._configured_client()
        with translate_upstream_errors():
            response = await client.retrieve_model(model, timeout_seconds=MODELS_TIMEOUT_SECONDS)
        try:
            return ModelObject.model_validate_json(response.content)
        except ValueError as exc:
            raise malformed("model") from exc

    def _answer_of(self, content: bytes, record: CallRecord) -> LLMResponse:
        answer = _batch_answer(content, record)
        if self._log_prompts:
            record.answer = answer.message.content
        return answer

    async def _batch(
        self,
        record: CallRecord,
        context: CallContext,
        body: dict[str, Any],
        *,
        max_tokens: int | None,
        choices: int = 1,
        read: Callable[[bytes, CallRecord], T],
    ) -> T:
        """One batch call, whichever API presents it: admitted, sent (with retries), read, accounted once."""
        try:
            client = await self._admit(
                context, record, messages=body["messages"], max_tokens=max_tokens, choices=choices
            )
            response = await self._send(client, body, record=record, stream=False)
            self._slots.release()
            return read(response.content, record)
        except ServiceError as exc:
            record.code, record.status = exc.code, exc.status_code
            _carry_limit_headers(exc, context)
            raise
        except asyncio.CancelledError:
            record.cancelled = True
            raise
        finally:
            await self._finish(record)

    async def stream_chat_completion(self, request: LLMRequest, *, context: CallContext) -> ChatStream | StreamFollower:
        """Open the upstream stream now, so that failures before the first byte are plain HTTP errors."""
        record = self._record(request, context, stream=True)
        record.resumable = request.resumable
        body = upstream_body(request, model=record.model)
        body["stream"] = True
        body["stream_options"] = _STREAM_OPTIONS
        response = await self._open_stream(record, context, body, max_tokens=request.max_tokens)
        stream = ChatStream(
            # 128 random bits, made here: never the caller's request id, which anyone may choose.
            stream_id=secrets.token_hex(16),
            response=response,
            record=record,
            call_log=self._call_log,
            accounting=self._accounting,
            release_slot=self._slots.release,
            keep_answer=self._log_prompts,
        )
        if not request.resumable:
            return stream
        try:
            return await self._resumable.start(stream, owner=context.caller.name)
        except BaseException:
            await stream.aclose(end=StreamEnd.CLIENT_GONE)
            raise

    async def resume_stream(self, stream_id: str, *, context: CallContext, after: int) -> StreamFollower:
        """The events of a resumable stream after event `after`, then live ones; 404 `stream_not_found` for a
        stream that is unknown, expired, or was started with another key."""
        return await self._resumable.resume(
            stream_id, owner=context.caller.name, after=after, request_id=context.request_id
        )

    async def stop_stream(self, stream_id: str, *, context: CallContext) -> None:
        """Stop a resumable stream: its upstream closes, and every reader gets `done` with `cancelled`."""
        await self._resumable.stop(stream_id, owner=context.caller.name)

    async def _open_stream(
        self,
        record: CallRecord,
        context: CallContext,
        body: dict[str, Any],
        *,
        max_tokens: int | None,
        choices: int = 1,
    ) -> httpx.Response:
        """Admit and open an upstream stream, whichever API presents it; a failure is accounted here, once."""
        try:
            client = await self._admit(
                context, record, messages=body["messages"], max_tokens=max_tokens, choices=choices
            )
            return await self._send(client, body, record=record, stream=True)
        except ServiceError as exc:
            record.code, record.status = exc.code, exc.status_code
            _carry_limit_headers(exc, context)
            await self._finish(record)
            raise
        except asyncio.CancelledError:
            record.cancelled = True
            await self._finish(record)
            raise

    async def _finish(self, record: CallRecord) -> None:
        settle = self._accounting.finish(record)
        if settle is not None:
            # Not shielded (a task per call): a second cancellation in here can only leave the reservation charged.
            await settle

    async def _send(
        self, client: OpenAIClient, body: dict[str, Any], *, record: CallRecord, stream: bool
    ) -> httpx.Response:
        """One upstream call, retried by the policy; returns holding a connection slot (the caller releases it).

        No slot is held while waiting to retry, and cancelling the caller cancels the retries still pending.
        """
        while True:
            await self._slots.acquire()
            record.attempts += 1
            try:
                if stream:
                    response = await client.open_chat_completion_stream(body, call_id=record.request_id)
                else:
                    response = await client.create_chat_completion(body, call_id=record.request_id)
            except openai.OpenAIError as exc:
                self._slots.release()
                delay = self._retry.delay_before_retry(exc, retries_done=record.attempts - 1)
                if delay is None:
                    record.rejection = rejection_of(exc)
                    raise map_upstream_error(exc) from exc
                await asyncio.sleep(delay)
                continue
            except BaseException:
                self._slots.release()
                raise
            record.upstream_request_id = response.headers.get("x-request-id")
            return response

    def _record(self, request: LLMRequest, context: CallContext, *, stream: bool) -> CallRecord:
        record = CallRecord(
            request_id=context.request_id,
            model=request.model or self._default_model,
            stream=stream,
            route=context.route,
            key_name=context.caller.name,
            user=request.user,
        )
        if self._log_prompts:
            record.messages = loggable_messages([_wire_message(message) for message in request.messages])
        return record

    def _passthrough_record(self, request: PassthroughRequest, context: CallContext) -> CallRecord:
        record = CallRecord(
            request_id=context.request_id,
            model=request.model or self._default_model,
            stream=request.stream,
            route=context.route,
            key_name=context.caller.name,
            user=request.user,
        )
        if self._log_prompts:
            record.messages = loggable_messages(request.body["messages"])
        return record

    def _allowed_for(self, caller: ServiceKey) -> frozenset[str]:
        return caller.models or self._allowed_models

    def _configured_client(self) -> OpenAIClient:
        if self._client is None:
            raise LLMServiceError(ErrorCode.LLM_NOT_CONFIGURED, NOT_CONFIGURED_MESSAGE, status_code=503)
        return self._client

    async def _admit(
        self,
        context: CallContext,
        record: CallRecord,
        *,
        messages: list[dict[str, Any]],
        max_tokens: int | None,
        choices: int = 1,
    ) -> OpenAIClient:
        """The checks before the upstream, in order: model policy, configured, draining, the key's limits."""
        model = record.model
        allowed = self._allowed_for(context.caller)
        if allowed and model not in allowed:
            raise LLMServiceError(
                ErrorCode.MODEL_NOT_ALLOWED,
                f"Model {model!r} is not allowed here; allowed: {', '.join(sorted(allowed))}.",
                status_code=400,
            )
        client = self._configured_client()
        if self._drain.draining:
            raise shutting_down()
        await self._accounting.admit(context, record, messages=messages, max_tokens=max_tokens, choices=choices)
        return client


def _carry_limit_headers(error: ServiceError, context: CallContext) -> None:
    """Every answer for a limited key carries its rate-limit headers, errors too."""
    for name, value in context.response_headers.items():
        error.headers.setdefault(name, value)


def upstream_body(request: LLMRequest, *, model: str) -> dict[str, Any]:
    """Only the parameters the caller set; `max_tokens` renamed for gpt-5 and o-series models."""
    params = request.model_dump(
        exclude_unset=True, exclude_none=True, by_alias=True, exclude={"messages", "model", "stream", "resumable"}
    )
    if "max_tokens" in params:
        params["max_completion_tokens"] = params.pop("max_tokens")
    params["messages"] = [_wire_message(message) for message in request.messages]
    params["model"] = model
    return params


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content}
    return {"role": message.role, "content": [part.model_dump(exclude_none=True) for part in message.content]}


def _batch_answer(content: bytes, record: CallRecord) -> LLMResponse:
    try:
        payload = json.loads(content)
        choice = payload["choices"][0]
        record_usage(record, payload.get("usage"))
        record.upstream_model = payload["model"]
        record.finish_reason = choice.get("finish_reason")
        return LLMResponse(
            id=payload["id"],
            model=payload["model"],
            request_id=record.request_id,
            message=AssistantMessage(
                content=choice["message"].get("content") or "", refusal=_text_or_none(choice["message"].get("refusal"))
            ),
            finish_reason=record.finish_reason,
            usage=record.usage,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise malformed("answer") from exc


def _relayed_answer(content: bytes, record: CallRecord) -> RelayedCompletion:
    """The upstream's answer untouched; read only for the call's accounting (usage, model, finish reason)."""
    try:
        payload = json.loads(content)
        choices = payload["choices"]
        record_usage(record, payload.get("usage"))
        record.upstream_model = payload["model"]
        record.finish_reason = choices[0].get("finish_reason") if choices else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise malformed("answer") from exc
    return RelayedCompletion(content=content)


def _allowed_model(model: str) -> ModelObject:
    return ModelObject(id=model, created=0, owned_by=ALLOWED_MODEL_OWNER)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
