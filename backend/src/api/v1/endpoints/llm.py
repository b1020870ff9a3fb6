"""`POST /api/v1/llm/chat`: parse, call the service, shape the answer as JSON or as an SSE stream; and the
resumable streams' `GET` (resume) and `DELETE` (stop) under `/api/v1/llm/chat/streams/{stream_id}`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import WithJsonSchema

from src.api.abandonment import unless_abandoned
from src.api.deps import ChatKeyRoute, llm_service_of, request_id_of, service_key_of, stream_timings_of
from src.api.openapi import error_doc
from src.api.sse import EventStreamResponse, SourceEvent, encode_event, encode_followed_event
from src.core.llm.call_context import CallContext
from src.models.llm import LLMRequest, LLMResponse

_STREAM_DESCRIPTION = (
    'With `stream: true`: `text/event-stream` of `event: delta` (`{"content"}`) and `event: refusal` '
    '(`{"content"}`), then `event: done` (`{"id", "model", "request_id", "finish_reason", "usage"}`), or '
    '`event: error` (`{"code", "message", "request_id"}`) if the upstream fails after the stream began. Every event '
    "has an `id:` line (1, 2, 3, ...); the response's `X-Stream-ID` header names the stream. With "
    "`resumable: true` the stream outlives its connection: resume it with `GET /api/v1/llm/chat/streams/{id}`, stop "
    "it with `DELETE`. Lines starting with `:` are keep-alive comments, sent while the upstream is silent."
)
STREAM_ID_HEADER = "X-Stream-ID"
_STREAM_HEADERS = {
    STREAM_ID_HEADER: {
        "description": "The stream's id (128 random bits, hex), for resuming and stopping it.",
        "schema": {"type": "string"},
    }
}
_STREAM_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: error_doc("unauthorized: service keys are configured and the bearer is missing or wrong"),
    404: error_doc("stream_not_found: unknown, expired, or started with another key"),
    422: error_doc("validation_error: `Last-Event-ID` or `last_event_id` is not a non-negative integer"),
    503: error_doc("resume_unavailable: the store of resumable streams (Redis) failed"),
}
StreamIdPath = Annotated[str, Path(description="The `X-Stream-ID` of a resumable stream.")]
# Optional, but never null on the wire: absent means "from the start".
_EVENT_ID_SCHEMA = WithJsonSchema({"type": "integer", "minimum": 0})


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

# Chat keys are checked by the route class when keys are configured (api/deps.py), and api/openapi.py then declares
# the bearer, so the OpenAPI document says exactly whether one is required.
router = APIRouter(prefix="/llm", tags=["llm"], route_class=ChatKeyRoute)


@router.post(
    "/chat",
    response_model=LLMResponse,
    responses={
        200: {
            "description": "The answer",
            "headers": _STREAM_HEADERS,
            "content": {
                # The events' schemas (`itemSchema`) are added by api/openapi.py.
                "text/event-stream": {
                    "example": 'id: 1\nevent: delta\ndata: {"content":"Hi"}\n\nid: 2\nevent: done\ndata: '
                    '{"id":"chatcmpl-1","model":"gpt-5-mini","request_id":"r1","finish_reason":"stop","usage":null}\n\n',
                }
            },
        },
        **CHAT_ERROR_RESPONSES,
    },
    summary="Chat completion, as one JSON answer or as a Server-Sent-Events stream",
    description=_STREAM_DESCRIPTION,
)
async def chat(body: LLMRequest, request: Request) -> Response:
    service = llm_service_of(request)
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
            encode=encode_followed_event if stream.resumable else encode_event,
            headers={**context.response_headers, STREAM_ID_HEADER: stream.stream_id},
        )
    answer = await unless_abandoned(
        service.get_chat_completion(body, context=context), receive=request.receive, drain=drain
    )
    # Our own bytes of a model we built: FastAPI would validate it again against `response_model` (which stays
    # for the OpenAPI document), at a few percent of the route's time.
    return Response(answer.model_dump_json(), media_type="application/json", headers=context.response_headers)


@router.get(
    "/chat/streams/{stream_id}",
    responses={
        200: {
            "description": "The stream's events after the last one received, then the live ones, with the same ids",
            "headers": _STREAM_HEADERS,
            "content": {"text/event-stream": {}},
        },
        **_STREAM_ERROR_RESPONSES,
    },
    # Not EventStreamResponse: FastAPI would then document the errors as event streams too.
    response_class=Response,
    # The return annotation is a subscripted generic, which FastAPI would try to read as a response model.
    response_model=None,
    status_code=200,
    summary="Resume a resumable stream after the last event received",
)
async def resume_stream(
    stream_id: StreamIdPath,
    request: Request,
    last_event_id_header: Annotated[
        int | None,
        Header(alias="Last-Event-ID", ge=0, description="The id of the last event received."),
        _EVENT_ID_SCHEMA,
    ] = None,
    last_event_id: Annotated[
        int | None,
        Query(ge=0, description="For clients that cannot set headers; the header wins."),
        _EVENT_ID_SCHEMA,
    ] = None,
) -> EventStreamResponse[SourceEvent]:
    context = CallContext(request_id=request_id_of(request), caller=service_key_of(request), route="chat")
    after = last_event_id_header if last_event_id_header is not None else last_event_id or 0
    service = llm_service_of(request)
    follower = await service.resume_stream(stream_id, context=context, after=after)
    return EventStreamResponse(
        follower,
        timings=stream_timings_of(request),
        drain=service.drain,
        encode=encode_followed_event,
        headers={STREAM_ID_HEADER: follower.stream_id},
    )


@router.delete(
    "/chat/streams/{stream_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Stopped: every reader gets a last `done` with `finish_reason: cancelled`"},
        **_STREAM_ERROR_RESPONSES,
    },
    summary="Stop a resumable stream (the stop button)",
)
async def stop_stream(stream_id: StreamIdPath, request: Request) -> Response:
    service = llm_service_of(request)
    context = CallContext(request_id=request_id_of(request), caller=service_key_of(request), route="chat")
    await service.stop_stream(stream_id, context=context)
    return Response(status_code=204)
