"""The OpenAI-compatible API: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, in OpenAI's
wire format, so any OpenAI SDK or tool works by changing its base URL. A second presentation of the same service:
parse, call it, shape the answer (the upstream's JSON, or its chunks as `data:` lines ending with `data: [DONE]`).
Errors are OpenAI's envelope, written by the app's one set of handlers (core/errors.py, by the `/v1/` prefix).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from src.api.abandonment import unless_abandoned
from src.api.deps import ChatKeyRoute, llm_service_of, request_id_of, service_key_of, stream_timings_of
from src.api.sse import EventStreamResponse
from src.core.errors import openai_error_detail
from src.core.llm.call_context import CallContext
from src.core.llm.passthrough import parse_passthrough
from src.core.llm.relay import ChunkEvent
from src.models.llm import StreamError
from src.models.openai_compat import (
    ChatCompletion,
    ChatCompletionRequest,
    ModelList,
    ModelObject,
    OpenAIErrorEnvelope,
    RelayedChunk,
)

# In the `llm_call` log line and the ledger's `route` column.
OPENAI_ROUTE = "openai"
DONE_LINE = b"data: [DONE]\n\n"
# A stream's failure has no HTTP status of its own any more; every cause that can end a begun stream is a server's.
_STREAM_ERROR_STATUS = 500
_STREAM_DESCRIPTION = (
    "OpenAI's Chat Completions API. The body is forwarded as sent (unknown fields included), except the model policy "
    "(default model, allowlists) and `stream_options.include_usage` (always asked upstream; the usage chunk is passed "
    "on only when asked). With `stream: true`: `text/event-stream` of `data: {chat.completion.chunk}` lines, then "
    '`data: [DONE]`; a stream that fails after it began ends with `data: {"error": {...}}` instead. Lines starting '
    "with `:` are keep-alive comments."
)


def _error_doc(description: str) -> dict[str, Any]:
    return {"model": OpenAIErrorEnvelope, "description": description}


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc("invalid_request_error: the body (`param` names the field), or the upstream's own 400"),
    401: _error_doc("invalid_api_key: service keys are configured and the bearer is missing or wrong"),
    404: _error_doc("model_not_found: a model this key may not use, or the upstream does not have"),
    413: _error_doc("the body is over MAX_REQUEST_BYTES"),
    429: _error_doc(
        "rate_limit_exceeded (this key's per-minute limits, or the upstream's) or insufficient_quota (this key's "
        "daily budget), with `Retry-After`"
    ),
    500: _error_doc("server_error: the service's upstream key is rejected (llm_auth_error), or internal_error"),
    502: _error_doc("server_error: the upstream failed, sent something malformed, or has no such endpoint"),
    503: _error_doc("server_error: llm_not_configured, quota_exceeded, upstream_unavailable or server_shutting_down"),
    504: _error_doc("server_error: upstream_timeout"),
}
_MODELS_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: OPENAI_ERROR_RESPONSES[status] for status in (401, 404, 500, 502, 503, 504)
}

router = APIRouter(prefix="/v1", tags=["openai"], route_class=ChatKeyRoute)


def encode_chunk_event(event: ChunkEvent, event_id: int | None) -> bytes:
    """OpenAI's stream wire format: each chunk as sent, `[DONE]` at the end, or the error the SDKs raise from. No
    `id:` lines: OpenAI's streams have none, and a `ChunkStream` cannot be resumed."""
    if isinstance(event, RelayedChunk):
        return b"data: " + event.data.encode() + b"\n\n"
    if isinstance(event, StreamError):
        detail = openai_error_detail(event.code, event.message, status=_STREAM_ERROR_STATUS)
        return b"data: " + json.dumps({"error": detail}, separators=(",", ":")).encode() + b"\n\n"
    return DONE_LINE


@router.post(
    "/chat/completions",
    responses={
        200: {
            "model": ChatCompletion,
            "description": "A `chat.completion`, or with `stream: true` a stream of `chat.completion.chunk`s",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
                    '"model":"gpt-5-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'
                    "\n\ndata: [DONE]\n\n",
                }
            },
        },
        **OPENAI_ERROR_RESPONSES,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
        }
    },
    summary="Chat completion in OpenAI's format (any OpenAI SDK: set its base URL to this service's /v1)",
    description=_STREAM_DESCRIPTION,
)
async def chat_completions(request: Request) -> Response:
    service = llm_service_of(request)
    payload = parse_passthrough(await request.body())
    context = CallContext(request_id=request_id_of(request), caller=service_key_of(request), route=OPENAI_ROUTE)
    drain = service.drain
    if payload.stream:
        # Opening may wait for retries: a client who leaves meanwhile cancels them.
        stream = await unless_abandoned(
            service.relay_chat_completion_stream(payload, context=context), receive=request.receive, drain=drain
        )
        return EventStreamResponse(
            stream,
            timings=stream_timings_of(request),
            drain=drain,
            encode=encode_chunk_event,
            headers=context.response_headers,
        )
    answer = await unless_abandoned(
        service.relay_chat_completion(payload, context=context), receive=request.receive, drain=drain
    )
    return Response(content=answer.content, media_type="application/json", headers=context.response_headers)


@router.get(
    "/models",
    response_model=ModelList,
    responses=_MODELS_ERROR_RESPONSES,
    summary="The models this key may use: its allowlist, LLM_ALLOWED_MODELS, or else the upstream's list",
)
async def list_models(request: Request) -> ModelList:
    return await llm_service_of(request).list_models(caller=service_key_of(request))


@router.get(
    "/models/{model_id:path}",
    response_model=ModelObject,
    responses=_MODELS_ERROR_RESPONSES,
    summary="One model this key may use (404 model_not_found otherwise)",
)
async def retrieve_model(model_id: str, request: Request) -> ModelObject:
    return await llm_service_of(request).retrieve_model(model_id, caller=service_key_of(request))
