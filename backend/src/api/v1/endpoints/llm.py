"""`POST /api/v1/llm/chat`: parse, call the service, shape the answer as JSON or as an SSE stream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from src.api.abandonment import unless_abandoned
from src.api.deps import LLMServiceDep, request_id_of, service_key_of, stream_timings_of
from src.api.openapi import error_doc
from src.api.sse import EventStreamResponse, encode_event
from src.core.llm.call_context import CallContext
from src.models.llm import LLMRequest, LLMResponse, StreamEvent

_STREAM_DESCRIPTION = (
    'With `stream: true`: `text/event-stream` of `event: delta` (`{"content"}`), then `event: done` '
    '(`{"id", "model", "request_id", "finish_reason", "usage"}`), or `event: error` '
    '(`{"code", "message", "request_id"}`) if the upstream fails after the stream began. '
    "Lines starting with `:` are keep-alive comments, sent while the upstream is silent."
)


CHAT_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_doc("invalid_request, context_length_exceeded, model_not_found or model_not_allowed"),
    401: error_doc("unauthorized: service keys are configured and the bearer is missing or wrong"),
    413: error_doc("payload_too_large: body over MAX_REQUEST_BYTES"),
    422: error_doc("validation_error: `details` names each failing field"),
    429: error_doc(
        "key_rate_limited / key_budget_exceeded (this key's limits, with `Retry-After`), or rate_limited by the "
        "upstream (`Retry-After` when it sent one)"
    ),
    500: error_doc("llm_auth_error (the service's upstream key is rejected) or internal_error"),
    502: error_doc("upstream_error: the upstream failed (5xx), sent something malformed, or has no such endpoint"),
    503: error_doc("llm_not_configured, quota_exceeded, upstream_unavailable or server_shutting_down"),
    504: error_doc("upstream_timeout"),
}

# Service-key auth is added by `create_app` when keys are configured, so the OpenAPI document says exactly
# whether a bearer is required.
router = APIRouter(prefix="/llm", tags=["llm"])


@router.post(
    "/chat",
    response_model=LLMResponse,
    responses={
        200: {
            "description": "The answer",
            "content": {
                # The events' schemas (`itemSchema`) are added by api/openapi.py.
                "text/event-stream": {
                    "example": 'event: delta\ndata: {"content":"Hi"}\n\nevent: done\ndata: {"id":"chatcmpl-1",'
                    '"model":"gpt-5-mini","request_id":"r1","finish_reason":"stop","usage":null}\n\n',
                }
            },
        },
        **CHAT_ERROR_RESPONSES,
    },
    summary="Chat completion, as one JSON answer or as a Server-Sent-Events stream",
    description=_STREAM_DESCRIPTION,
)
async def chat(
    body: LLMRequest, service: LLMServiceDep, request: Request, response: Response
) -> LLMResponse | EventStreamResponse[StreamEvent]:
    context = CallContext(request_id=request_id_of(request), caller=service_key_of(request), route="chat")
    drain = service.drain
    if body.stream:
        # Opening may wait for retries: a client who leaves meanwhile cancels them.
        stream = await unless_abandoned(
            service.stream_chat_completion(body, context=context), receive=request.receive, drain=drain
        )
        return EventStreamResponse(
            stream,
            timings=stream_timings_of(request),
            drain=drain,
            encode=encode_event,
            headers=context.response_headers,
        )
    answer = await unless_abandoned(
        service.get_chat_completion(body, context=context), receive=request.receive, drain=drain
    )
    response.headers.update(context.response_headers)
    return answer
