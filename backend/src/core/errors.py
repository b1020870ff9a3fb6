"""The service's one error family, its stable codes, and the handlers that write the error envelope.

    ServiceError                  anything we answer with the error envelope
    └── LLMServiceError           caused by the LLM upstream (or its absence), mapped in core.llm.upstream_errors

Every error response has the body `{"error": {"code", "message", "request_id"[, "details"]}}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = structlog.get_logger("errors")


class ErrorCode(StrEnum):
    VALIDATION_ERROR = "validation_error"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    LLM_NOT_CONFIGURED = "llm_not_configured"
    LLM_AUTH_ERROR = "llm_auth_error"
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    MODEL_NOT_FOUND = "model_not_found"
    RATE_LIMITED = "rate_limited"
    KEY_RATE_LIMITED = "key_rate_limited"
    KEY_BUDGET_EXCEEDED = "key_budget_exceeded"
    QUOTA_EXCEEDED = "quota_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    STREAM_NOT_FOUND = "stream_not_found"
    RESUME_UNAVAILABLE = "resume_unavailable"
    RESUME_BUFFER_FULL = "resume_buffer_full"
    # Only in logs: the client left before its answer (nginx's 499), so nobody reads the response.
    CLIENT_CLOSED_REQUEST = "client_closed_request"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    INTERNAL_ERROR = "internal_error"


class ServiceError(Exception):
    """An error the caller sees as `status_code` with the envelope carrying `code` and `message`."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        status_code: int,
        headers: Mapping[str, str] | None = None,
        details: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.details = details


class LLMServiceError(ServiceError):
    """An error caused by the LLM upstream, or by the upstream not being usable."""


def error_body(
    code: str, message: str, request_id: str | None, details: Sequence[Mapping[str, Any]] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details is not None:
        error["details"] = details
    return json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(error: ServiceError, request_id: str | None) -> Response:
    return Response(
        content=error_body(error.code, error.message, request_id, error.details),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return error_response(exc, request_id_of(request))


async def _validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "field": ".".join(str(part) for part in error.get("loc", ())),
            "message": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in exc.errors()
    ]
    # Only plain fields: pydantic's `ctx` and `input` can hold non-JSON values, and `input` may echo secrets.
    fields = ", ".join(sorted({detail["field"] for detail in details})) or "body"
    error = ServiceError(
        ErrorCode.VALIDATION_ERROR,
        f"Request validation failed: {fields}",
        status_code=422,
        details=details,
    )
    return error_response(error, request_id_of(request))


_HTTP_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})
_HTTP_STATUS_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 401: ErrorCode.UNAUTHORIZED}


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_STATUS_CODES.get(exc.status_code)
    if code is None:
        # Framework errors we do not expect (for example a malformed body FastAPI could not read).
        code = ErrorCode.VALIDATION_ERROR if exc.status_code == 400 else ErrorCode.INTERNAL_ERROR
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    error = ServiceError(code, str(exc.detail), status_code=exc.status_code, headers=headers)
    return error_response(error, request_id_of(request))


def _allowed_methods(request: Request) -> str | None:
    """Every method the path answers, across all its routes (the router's 405 names only the first route's), as the
    app's own OpenAPI document lists them; None for a path it does not describe."""
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "".join(
            "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]+\})", template)
        )
        if re.fullmatch(pattern, request.url.path):
            return ", ".join(sorted(method.upper() for method in operations if method.upper() in _HTTP_METHODS))
    return None


def register_error_handlers(app: FastAPI) -> None:
    """Unexpected exceptions are turned into `internal_error` by the request middleware, which also logs them."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
