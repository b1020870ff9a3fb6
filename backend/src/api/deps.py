"""What endpoints take from the request: the LLM service and per-request values (read directly), and the checks of
the caller's key (chat) and of the operator's key (admin).

Keys are checked by `HTTPBearer` subclasses, which also name the schemes in the OpenAPI document. The admin check is
a FastAPI dependency of the operator routes (`async def`: FastAPI runs a plain `def` one in a thread pool). The chat
check runs from the chat routes' class, `ChatKeyRoute`, before FastAPI reads the request: the chat routes are the
hot path, and FastAPI's solving of one dependency costs about 2% of a chat call. api/openapi.py declares the bearer
on those routes when chat keys are configured, so the document says exactly when one is required.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from src.api.sse import StreamTimings
from src.core.errors import ErrorCode, ServiceError
from src.core.keys import ANONYMOUS, Access, KeyRing, ServiceKey
from src.core.llm.service import LLMService

_BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def llm_service_of(request: Request) -> LLMService:
    """The app's one `LLMService`, from the lifespan state. Read directly, not as a dependency: FastAPI's solving of
    one dependency costs about 2% of a chat call."""
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


def access_of(connection: HTTPConnection) -> Access:
    access: Access = connection.app.state.access
    return access


def service_key_of(request: Request) -> ServiceKey:
    """The caller's key, as `require_chat_key` found it; anonymous when the service has no chat keys."""
    key: ServiceKey = getattr(request.state, "service_key", ANONYMOUS)
    return key


def _unauthorized(message: str) -> ServiceError:
    return ServiceError(ErrorCode.UNAUTHORIZED, message, status_code=401, headers=_BEARER_CHALLENGE)


class _KeyBearer(HTTPBearer):
    async def _key(self, connection: HTTPConnection, ring: KeyRing) -> ServiceKey | None:
        # HTTPBearer's own parse, without building its credentials model for every call.
        scheme, token = get_authorization_scheme_param(connection.headers.get("Authorization"))
        if scheme.lower() != "bearer" or not token:
            return None
        return ring.find(token)


class ChatKeyBearer(_KeyBearer):
    """When chat keys are configured (SERVICE_KEYS_FILE, SERVICE_API_KEYS), one must be sent; the key found is kept
    for the call. Without chat keys every caller is anonymous (`service_key_of`)."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        ring = access_of(request).chat
        if not ring:
            return
        key = await self._key(request, ring)
        if key is None:
            raise _unauthorized("A valid service API key is required: send `Authorization: Bearer <key>`.")
        request.state.service_key = key


class AdminKeyBearer(_KeyBearer):
    """Operator endpoints: an ADMIN_API_KEYS key; open only when the service has no keys at all (`make demo`)."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        access = access_of(request)
        if access.open:
            return
        if not access.admin:
            raise _unauthorized("Operator endpoints need ADMIN_API_KEYS on the service and one of them as bearer.")
        if await self._key(request, access.admin) is None:
            raise _unauthorized("A valid admin key (ADMIN_API_KEYS) is required: send `Authorization: Bearer <key>`.")


require_chat_key = ChatKeyBearer(
    auto_error=False, scheme_name="ServiceKey", description="A service key (SERVICE_KEYS_FILE or SERVICE_API_KEYS)."
)
require_admin_key = AdminKeyBearer(
    auto_error=False, scheme_name="AdminKey", description="An operator key (ADMIN_API_KEYS)."
)


class ChatKeyRoute(APIRoute):
    """The route class of the chat APIs (`/api/v1/llm/...` for callers, and `/v1/...`): when chat keys are configured,
    a request without a valid one is answered 401 before FastAPI reads its body or parameters."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def checked(request: Request) -> Response:
            await require_chat_key(request)
            return await handle(request)

        return checked
