"""Typed FastAPI dependencies: the settings, the LLM service, and the caller's bearer key.

All are `async def`: FastAPI runs plain `def` dependencies in a thread pool, a thread hop per request for nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from src.api.sse import StreamTimings
from src.core.config import Settings
from src.core.errors import ErrorCode, ServiceError
from src.core.llm.service import LLMService


async def get_settings_of_app(request: HTTPConnection) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_llm_service(request: Request) -> LLMService:
    service: LLMService = request.state.llm_service
    return service


def request_id_of(request: Request) -> str:
    """The id `RequestContextMiddleware` gave this request (read directly: a dependency would cost a solve)."""
    request_id: str = request.state.request_id
    return request_id


def stream_timings_of(request: Request) -> StreamTimings:
    """The stream timings the app was built with (read directly, like `request_id_of`)."""
    timings: StreamTimings = request.app.state.stream_timings
    return timings


LLMServiceDep = Annotated[LLMService, Depends(get_llm_service)]


class ServiceKeyBearer(HTTPBearer):
    """Bearer auth against SERVICE_API_KEYS: one must match (constant-time). Only installed when keys are set.

    A subclass rather than a dependency on `HTTPBearer`: the same OpenAPI security scheme, one dependency less
    to solve on every chat request.
    """

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        settings = await get_settings_of_app(request)
        credentials = await super().__call__(request)
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
        return credentials


require_api_key = ServiceKeyBearer(auto_error=False, scheme_name="HTTPBearer", description="One of SERVICE_API_KEYS.")
