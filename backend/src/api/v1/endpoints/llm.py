"""`POST /api/v1/llm/chat`: parse, call the service, shape the answer as JSON or as an SSE stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from src.api.deps import LLMServiceDep, request_id_of, require_api_key
from src.api.sse import EventStreamResponse
from src.models.llm import ErrorEnvelope, LLMRequest, LLMResponse

_STREAM_DESCRIPTION = (
    'With `stream: true`: `text/event-stream` of `event: delta` (`{"content"}`), then `event: done` '
    '(`{"id", "model", "request_id", "finish_reason", "usage"}`), or `event: error` '
    '(`{"code", "message", "request_id"}`) if the upstream fails after the stream began.'
)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorEnvelope, "description": description}


CHAT_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("invalid_request, context_length_exceeded, model_not_found or model_not_allowed"),
    401: _error("unauthorized: SERVICE_API_KEYS is set and the bearer is missing or wrong"),
    413: _error("payload_too_large: body over MAX_REQUEST_BYTES"),
    422: _error("validation_error: `details` names each failing field"),
    429: _error("rate_limited by the upstream (`Retry-After` when it sent one)"),
    500: _error("llm_auth_error (the service's upstream key is rejected) or internal_error"),
    502: _error("upstream_error: the upstream failed (5xx) or sent something malformed"),
    503: _error("llm_not_configured, quota_exceeded or upstream_unavailable"),
    504: _error("upstream_timeout"),
}

router = APIRouter(prefix="/llm", tags=["llm"], dependencies=[Depends(require_api_key)])


@router.post(
    "/chat",
    response_model=LLMResponse,
    responses={
        200: {
            "description": "The answer",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'event: delta\ndata: {"content":"Hi"}\n\n',
                }
            },
        },
        **CHAT_ERROR_RESPONSES,
    },
    summary="Chat completion, as one JSON answer or as a Server-Sent-Events stream",
    description=_STREAM_DESCRIPTION,
)
async def chat(body: LLMRequest, service: LLMServiceDep, request: Request) -> LLMResponse | EventStreamResponse:
    request_id = request_id_of(request)
    if body.stream:
        return EventStreamResponse(await service.open_stream(body, request_id=request_id))
    return await service.chat(body, request_id=request_id)
