"""Liveness and readiness probes: open even when SERVICE_API_KEYS is set, for load balancers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from src.api.deps import SettingsDep
from src.models.llm import HealthStatus

router = APIRouter(prefix="/health", tags=["health"])


@router.get("")
async def health() -> HealthStatus:
    return HealthStatus(status="ok")


@router.get(
    "/ready",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "No upstream key is configured"}},
)
async def ready(settings: SettingsDep) -> HealthStatus | JSONResponse:
    if settings.llm_configured:
        return HealthStatus(status="ok")
    return JSONResponse(HealthStatus(status="unavailable").model_dump(), status_code=503)
