"""Typed FastAPI dependencies: the LLM service, the request id, and the caller's bearer key.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per request for nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from src.core.config import Settings
from src.core.errors import ErrorCode, ServiceError
from src.core.llm.service import LLMService

_bearer = HTTPBearer(auto_error=False, description="One of SERVICE_API_KEYS, when the service has any.")


async def get_settings_of_app(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_llm_service(request: Request) -> LLMService:
    service: LLMService = request.state.llm_service
    return service


async def get_request_id(request: Request) -> str:
    request_id: str = request.state.request_id
    return request_id


SettingsDep = Annotated[Settings, Depends(get_settings_of_app)]
LLMServiceDep = Annotated[LLMService, Depends(get_llm_service)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Open when SERVICE_API_KEYS is empty; otherwise the bearer must match one key (constant-time compare)."""
    # Called, not declared as a dependency: one dependency solve less on every chat request.
    settings = await get_settings_of_app(request)
    if not settings.service_api_keys:
        return
    given = credentials.credentials.encode() if credentials is not None else b""
    # Compare with every key, without short-circuiting, so timing does not tell which key nearly matched.
    matches = [hmac.compare_digest(given, key.encode()) for key in settings.service_api_keys]
    if not any(matches):
        raise ServiceError(
            ErrorCode.UNAUTHORIZED,
            "A valid service API key is required: send `Authorization: Bearer <key>`.",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
