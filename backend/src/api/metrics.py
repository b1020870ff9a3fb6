"""`GET /metrics`: Prometheus's text format, summed over every worker process (operators)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from src.api.openapi import error_doc
from src.core.metrics import Metrics

router = APIRouter(tags=["operators"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
        401: error_doc("unauthorized: an ADMIN_API_KEYS key is required (open only when the service has no keys)"),
    },
    summary="Prometheus metrics of all workers",
)
async def metrics(request: Request) -> Response:
    recorder: Metrics = request.app.state.metrics
    body, content_type = recorder.render()
    return Response(content=body, media_type=content_type)
