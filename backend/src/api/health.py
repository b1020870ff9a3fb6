"""Liveness and readiness probes: open even when service keys are set, for load balancers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from src.api.deps import llm_service_of
from src.models.llm import HealthStatus, ReadinessStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get("")
async def health() -> HealthStatus:
    return HealthStatus(status="ok")


@router.get(
    "/ready",
    response_model=ReadinessStatus,
    responses={503: {"model": ReadinessStatus, "description": "No upstream key is configured, or shutting down"}},
)
async def ready(request: Request) -> ReadinessStatus | JSONResponse:
    """Ready while an upstream key is configured and the process is not draining; `upstream` is the last check."""
    service = llm_service_of(request)
    if service.drain.draining:
        readiness = ReadinessStatus(status="draining", upstream=service.upstream_state)
    elif not service.configured:
        readiness = ReadinessStatus(status="unavailable", upstream=service.upstream_state)
    else:
        return ReadinessStatus(status="ok", upstream=service.upstream_state)
    return JSONResponse(readiness.model_dump(), status_code=503)
