"""`LLMService`: chat over the shared OpenAI client; the only module that knows OpenAI's types and errors.

Batch calls and streams both go through `UpstreamOpenAI.post_json`: the SDK's own request (auth, base URL,
headers), retry policy and error classes, without the SDK's per-call option models, body transformation against
its TypedDicts, or the pydantic model it would build per answer and per stream chunk. Answers are read as JSON and
stream chunks are parsed by the lean SSE decoder below; see specs/003-llm-service/plan.md for the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import openai
import structlog

from src.core.config import Settings
from src.core.errors import ErrorCode, LLMServiceError, ServiceError
from src.core.llm.client import UpstreamOpenAI
from src.models.llm import AssistantMessage, LLMRequest, LLMResponse, Usage

# Upstream texts can quote the key we sent ("Incorrect API key provided: sk-abc***xyz"); never pass that on.
_SECRET_PATTERN = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{3,}")
AUTH_ERROR_MESSAGE = "The service could not authenticate with the LLM provider; an operator must check its API key."
NOT_CONFIGURED_MESSAGE = "No LLM provider is configured: set OPENAI_API_KEY on the service."
_DONE_SENTINEL = "[DONE]"
_STREAM_OPTIONS = {"include_usage": True}
CHAT_COMPLETIONS_PATH = "/chat/completions"


def redact_secrets(text: str) -> str:
    return _SECRET_PATTERN.sub("[redacted]", text)


def _upstream_message(exc: openai.APIError) -> str:
    return redact_secrets(exc.message) if exc.message else "The LLM provider rejected the request."


def _retry_after(exc: openai.APIStatusError) -> dict[str, str]:
    value = exc.response.headers.get("retry-after")
    if value is not None and value.strip().isdigit():
        return {"Retry-After": value.strip()}
    milliseconds = exc.response.headers.get("retry-after-ms")
    if milliseconds is not None:
        with contextlib.suppress(ValueError):
            return {"Retry-After": str(max(1, round(float(milliseconds) / 1000)))}
    return {}


def map_upstream_error(exc: Exception) -> LLMServiceError:
    """The one table from upstream failures (SDK errors, or transport errors mid-stream) to our codes."""
    # APITimeoutError subclasses APIConnectionError: it must be tested first.
    if isinstance(exc, openai.APITimeoutError):
        if isinstance(exc.__cause__, httpx.PoolTimeout):
            return _pool_exhausted()
        return LLMServiceError(ErrorCode.UPSTREAM_TIMEOUT, "The LLM provider did not answer in time.", status_code=504)
    if isinstance(exc, openai.APIConnectionError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_UNAVAILABLE, "The LLM provider could not be reached.", status_code=503
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMServiceError(ErrorCode.LLM_AUTH_ERROR, AUTH_ERROR_MESSAGE, status_code=500)
    if isinstance(exc, openai.RateLimitError):
        if exc.code == "insufficient_quota":
            return LLMServiceError(
                ErrorCode.QUOTA_EXCEEDED, "The LLM provider's quota for this service is used up.", status_code=503
            )
        return LLMServiceError(
            ErrorCode.RATE_LIMITED,
            "The LLM provider is rate limiting this service; retry later.",
            status_code=429,
            headers=_retry_after(exc),
        )
    if isinstance(exc, openai.NotFoundError):
        return LLMServiceError(ErrorCode.MODEL_NOT_FOUND, _upstream_message(exc), status_code=400)
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED if exc.code == "context_length_exceeded" else ErrorCode.INVALID_REQUEST
        return LLMServiceError(code, _upstream_message(exc), status_code=400)
    if isinstance(exc, openai.APIStatusError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_ERROR,
            f"The LLM provider failed (HTTP {exc.status_code}).",
            status_code=502,
        )
    if isinstance(exc, openai.APIError):
        # An error the provider reported inside a stream that had already started.
        return LLMServiceError(ErrorCode.UPSTREAM_ERROR, _upstream_message(exc), status_code=502)
    if isinstance(exc, httpx.TimeoutException):
        return LLMServiceError(ErrorCode.UPSTREAM_TIMEOUT, "The LLM provider stopped sending in time.", status_code=504)
    if isinstance(exc, httpx.HTTPError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_ERROR, "The connection to the LLM provider broke mid-answer.", status_code=502
        )
    return LLMServiceError(ErrorCode.INTERNAL_ERROR, "Unexpected upstream failure.", status_code=500)


def _pool_exhausted() -> LLMServiceError:
    return LLMServiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE,
        "All upstream connections are busy (LLM_MAX_CONNECTIONS); retry shortly.",
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _malformed(what: str) -> LLMServiceError:
    return LLMServiceError(ErrorCode.UPSTREAM_ERROR, f"The LLM provider sent a malformed {what}.", status_code=502)


@contextlib.contextmanager
def translate_upstream_errors() -> Iterator[None]:
    """The boundary where foreign errors become ours (like httpx's `map_httpcore_exceptions`)."""
    try:
        yield
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        raise map_upstream_error(exc) from exc


def _elapsed_ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


@dataclass(slots=True)
class _CallRecord:
    """Everything the canonical per-call log line says; filled in as the call goes."""

    request_id: str
    model: str
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    fields: dict[str, Any] = field(default_factory=dict)

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.fields[key] = usage.get(key)


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str | None, str]]:
    """Decode a Server-Sent-Events byte stream into `(event, data)` pairs (lines split on LF, CRLF tolerated)."""
    pending = b""
    event: str | None = None
    data: list[str] = []
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for raw_line in lines:
            line = raw_line[:-1] if raw_line.endswith(b"\r") else raw_line
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = None, []
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value.decode())
            elif name == b"event":
                event = value.decode()
    if data:
        yield event, "\n".join(data)


def encode_sse(event: str, payload: dict[str, Any]) -> bytes:
    """The one encoder of our stream: a named event whose single `data:` line is one JSON object."""
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {body}\n\n".encode()


class ChatStream:
    """An opened upstream stream, relayed as our SSE events; `aclose()` must always be called (it logs the call)."""

    def __init__(
        self,
        *,
        response: httpx.Response,
        record: _CallRecord,
        service: LLMService,
    ) -> None:
        self._response = response
        self._record = record
        self._service = service
        self._closed = False
        self._events = self._relay()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        record = self._record
        fields = record.fields
        delivered_chars = 0
        delivered_chunks = 0
        upstream_id: str | None = None
        upstream_model: str | None = None
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        completed = False
        answer: list[str] | None = [] if self._service.log_prompts else None
        try:
            with translate_upstream_errors():
                async for event, data in iter_sse(self._response.aiter_bytes()):
                    if data == _DONE_SENTINEL:
                        completed = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError as exc:
                        raise _malformed("stream chunk") from exc
                    if not isinstance(chunk, dict):
                        raise _malformed("stream chunk")
                    if event == "error" or chunk.get("error"):
                        error = chunk.get("error")
                        message = error.get("message") if isinstance(error, dict) else None
                        raise openai.APIError(str(message or "stream failed"), self._response.request, body=error)
                    upstream_id = upstream_id or chunk.get("id")
                    upstream_model = upstream_model or chunk.get("model")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choices = chunk.get("choices") or []
                    if not isinstance(choices, list):
                        raise _malformed("stream chunk")
                    for choice in choices:
                        if not isinstance(choice, dict):
                            raise _malformed("stream chunk")
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        if content and isinstance(content, str):
                            if delivered_chunks == 0:
                                fields["ttft_ms"] = _elapsed_ms(record.started)
                            delivered_chunks += 1
                            delivered_chars += len(content)
                            if answer is not None:
                                answer.append(content)
                            yield encode_sse("delta", {"content": content})
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
            if not completed and finish_reason is None:
                raise LLMServiceError(
                    ErrorCode.UPSTREAM_ERROR,
                    "The LLM provider ended the stream before the answer was complete.",
                    status_code=502,
                )
            record.usage(usage)
            fields["finish_reason"] = finish_reason
            yield encode_sse(
                "done",
                {
                    "id": upstream_id,
                    "model": upstream_model,
                    "request_id": record.request_id,
                    "finish_reason": finish_reason,
                    "usage": _usage_of(usage),
                },
            )
        except ServiceError as exc:
            fields["code"] = exc.code
            fields["finish_reason"] = finish_reason
            yield encode_sse("error", {"code": exc.code, "message": exc.message, "request_id": record.request_id})
        except Exception:
            # The response has started: the middleware can no longer answer 500, so the stream says it.
            self._service.log_unexpected("stream_relay_failed")
            fields["code"] = ErrorCode.INTERNAL_ERROR
            yield encode_sse(
                "error",
                {
                    "code": ErrorCode.INTERNAL_ERROR,
                    "message": "The service failed unexpectedly.",
                    "request_id": record.request_id,
                },
            )
        finally:
            fields["delivered_chunks"] = delivered_chunks
            fields["delivered_chars"] = delivered_chars
            if answer is not None:
                fields["answer"] = "".join(answer)

    async def aclose(self, *, client_gone: bool = False) -> None:
        """Close the upstream (shielded: a disconnect cancels the caller), free the slot, log the call once."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._events.aclose()
                await self._response.aclose()
            finally:
                self._service.release_slot()
                if client_gone:
                    self._record.fields["cancelled"] = True
                self._service.log_call(self._record)


def _usage_of(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    try:
        return {key: int(usage[key]) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    except (KeyError, TypeError, ValueError):
        return None


class LLMService:
    """Chat in batch or stream mode over the shared client, with the model policy, concurrency cap and call logs."""

    def __init__(self, *, client: UpstreamOpenAI | None, settings: Settings) -> None:
        self._client = client
        if client is not None:
            client.prepare(CHAT_COMPLETIONS_PATH)
        self._default_model = settings.llm_default_model
        self._allowed_models = frozenset(settings.llm_allowed_models)
        self.log_prompts = settings.log_prompts
        # The pool is never the silent limit: at most llm_max_connections calls hold a connection, and a caller
        # who cannot get one within llm_pool_timeout_seconds gets a quick 503 instead of queueing forever.
        self._slots = asyncio.Semaphore(settings.llm_max_connections)
        self._slot_timeout = settings.llm_pool_timeout_seconds
        self._log = structlog.get_logger("llm").bind()

    @property
    def configured(self) -> bool:
        return self._client is not None

    async def chat(self, request: LLMRequest, *, request_id: str) -> LLMResponse:
        """One batch answer."""
        client, record, kwargs = self._begin(request, request_id=request_id, stream=False)
        try:
            await self._acquire_slot()
            try:
                with translate_upstream_errors():
                    http_response = await client.post_json(CHAT_COMPLETIONS_PATH, kwargs)
            finally:
                self.release_slot()
            record.fields["upstream_request_id"] = http_response.headers.get("x-request-id")
            answer = _batch_answer(http_response.content, request_id)
            if answer.usage is not None:
                record.usage(answer.usage.model_dump())
            record.fields["finish_reason"] = answer.finish_reason
            if self.log_prompts:
                record.fields["answer"] = answer.message.content
            return answer
        except ServiceError as exc:
            record.fields["code"] = exc.code
            raise
        finally:
            self.log_call(record)

    async def open_stream(self, request: LLMRequest, *, request_id: str) -> ChatStream:
        """Open the upstream stream now, so that failures before the first byte are plain HTTP errors."""
        client, record, kwargs = self._begin(request, request_id=request_id, stream=True)
        body = {**kwargs, "stream": True, "stream_options": _STREAM_OPTIONS}
        holds_slot = False
        try:
            await self._acquire_slot()
            holds_slot = True
            with translate_upstream_errors():
                response = await client.post_json(CHAT_COMPLETIONS_PATH, body, stream=True)
        except BaseException as exc:
            # Any way out before the stream exists (an error, or cancellation while waiting for the upstream)
            # gives the slot back: only a ChatStream releases it later.
            if holds_slot:
                self.release_slot()
            if isinstance(exc, ServiceError):
                record.fields["code"] = exc.code
                self.log_call(record)
            raise
        record.fields["upstream_request_id"] = response.headers.get("x-request-id")
        return ChatStream(response=response, record=record, service=self)

    def _begin(
        self, request: LLMRequest, *, request_id: str, stream: bool
    ) -> tuple[UpstreamOpenAI, _CallRecord, dict[str, Any]]:
        model = request.model or self._default_model
        if self._allowed_models and model not in self._allowed_models:
            raise LLMServiceError(
                ErrorCode.MODEL_NOT_ALLOWED,
                f"Model {model!r} is not allowed here; allowed: {', '.join(sorted(self._allowed_models))}.",
                status_code=400,
            )
        if self._client is None:
            raise LLMServiceError(ErrorCode.LLM_NOT_CONFIGURED, NOT_CONFIGURED_MESSAGE, status_code=503)
        record = _CallRecord(request_id=request_id, model=model, stream=stream)
        if self.log_prompts:
            record.fields["messages"] = [message.model_dump() for message in request.messages]
        return self._client, record, upstream_kwargs(request, model=model)

    async def _acquire_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._slot_timeout)
        except TimeoutError as exc:
            raise _pool_exhausted() from exc

    def release_slot(self) -> None:
        self._slots.release()

    def log_unexpected(self, event: str) -> None:
        """Log the exception being handled, with its traceback."""
        self._log.exception(event)

    def log_call(self, record: _CallRecord) -> None:
        fields = record.fields
        fields.setdefault("prompt_tokens", None)
        fields.setdefault("completion_tokens", None)
        fields.setdefault("total_tokens", None)
        fields.setdefault("finish_reason", None)
        fields.setdefault("upstream_request_id", None)
        log = self._log.warning if "code" in fields else self._log.info
        log(
            "llm_call",
            request_id=record.request_id,
            model=record.model,
            stream=record.stream,
            latency_ms=_elapsed_ms(record.started),
            **fields,
        )


def upstream_kwargs(request: LLMRequest, *, model: str) -> dict[str, Any]:
    """Only the parameters the caller set; `max_tokens` renamed for gpt-5 and o-series models."""
    params = request.model_dump(exclude_unset=True, exclude_none=True, exclude={"messages", "model", "stream"})
    if "max_tokens" in params:
        params["max_completion_tokens"] = params.pop("max_tokens")
    params["messages"] = [{"role": message.role, "content": message.content} for message in request.messages]
    params["model"] = model
    return params


def _batch_answer(content: bytes, request_id: str) -> LLMResponse:
    try:
        payload = json.loads(content)
        choice = payload["choices"][0]
        usage = _usage_of(payload.get("usage"))
        return LLMResponse(
            id=payload["id"],
            model=payload["model"],
            request_id=request_id,
            message=AssistantMessage(content=choice["message"].get("content") or ""),
            finish_reason=choice.get("finish_reason"),
            usage=Usage(**usage) if usage is not None else None,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _malformed("answer") from exc
