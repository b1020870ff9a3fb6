"""The service's one error family, its stable codes, and the handlers that write the error envelope.

    ServiceError                  anything we answer with the error envelope
    └── LLMServiceError           caused by the LLM upstream (or its absence), mapped in core.llm.upstream_errors

Every error response has the body `{"error": {"code", "message", "request_id"[, "details"]}}`, except under the
OpenAI-compatible API (`/v1/...`), where the same errors are presented in OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` by one table (`openai_error`), so OpenAI's SDKs raise their own
exception classes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class UpstreamErrorFields:
    """OpenAI's own status, `type`, `param` and `code` of an upstream rejection that is the caller's business (a 400,
    a 404 about a model): the OpenAI-compatible API passes them on. Never its message (that one is redacted)."""

    status: int
    type: str | None
    param: str | None
    code: str | None


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
        upstream: UpstreamErrorFields | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.details = details
        self.upstream = upstream


class LLMServiceError(ServiceError):
    """An error caused by the LLM upstream, or by the upstream not being usable."""


def _utf8_json(value: object) -> bytes:
    """Compact JSON in UTF-8. A lone surrogate (an upstream's message may carry one as a JSON escape) has no UTF-8
    form: it is written back as that escape (`\\ud83d`), still valid JSON, instead of failing the error response."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def error_body(
    code: str, message: str, request_id: str | None, details: Sequence[Mapping[str, Any]] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details is not None:
        error["details"] = details
    return _utf8_json({"error": error})


def error_response(error: ServiceError, request_id: str | None) -> Response:
    return Response(
        content=error_body(error.code, error.message, request_id, error.details),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# --- the OpenAI presentation ---------------------------------------------------------------------------------------

OPENAI_PATH_PREFIX = "/v1/"
INVALID_REQUEST_TYPE = "invalid_request_error"
SERVER_ERROR_TYPE = "server_error"


@dataclass(frozen=True, slots=True)
class _OpenAIForm:
    """How one of our codes looks in OpenAI's envelope: its `type`, its `code`, and its status when OpenAI's SDKs
    need another one than ours to raise the right class (None: our status)."""

    type: str
    code: str | None
    status: int | None = None


# Codes not listed keep their own code, with `server_error` for 5xx and `invalid_request_error` otherwise.
_OPENAI_FORMS: dict[str, _OpenAIForm] = {
    ErrorCode.VALIDATION_ERROR: _OpenAIForm(INVALID_REQUEST_TYPE, None, status=400),
    ErrorCode.UNAUTHORIZED: _OpenAIForm(INVALID_REQUEST_TYPE, "invalid_api_key"),
    ErrorCode.NOT_FOUND: _OpenAIForm(INVALID_REQUEST_TYPE, "unknown_url"),
    # OpenAI answers a model the key may not use like one that does not exist: 404 `model_not_found`.
    ErrorCode.MODEL_NOT_ALLOWED: _OpenAIForm(INVALID_REQUEST_TYPE, "model_not_found", status=404),
    ErrorCode.MODEL_NOT_FOUND: _OpenAIForm(INVALID_REQUEST_TYPE, "model_not_found", status=404),
    ErrorCode.INVALID_REQUEST: _OpenAIForm(INVALID_REQUEST_TYPE, None),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: _OpenAIForm(INVALID_REQUEST_TYPE, "context_length_exceeded"),
    # OpenAI's own 429 bodies: `type` "requests" (or "tokens") with `rate_limit_exceeded`, and `insufficient_quota`.
    ErrorCode.KEY_RATE_LIMITED: _OpenAIForm("requests", "rate_limit_exceeded"),
    ErrorCode.RATE_LIMITED: _OpenAIForm("requests", "rate_limit_exceeded"),
    ErrorCode.KEY_BUDGET_EXCEEDED: _OpenAIForm("insufficient_quota", "insufficient_quota"),
}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATH_PREFIX)


def openai_error_detail(code: str, message: str, *, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's `error` object for one of our codes (also the last line of a stream that failed)."""
    form = _OPENAI_FORMS.get(code)
    if form is None:
        form = _OpenAIForm(SERVER_ERROR_TYPE if status >= 500 else INVALID_REQUEST_TYPE, code)
    return {"message": message, "type": form.type, "param": param, "code": form.code}


def openai_error(error: ServiceError) -> tuple[int, dict[str, Any]]:
    """The status and the `error` object an OpenAI-compatible caller gets for `error`: the one table above, with an
    upstream rejection's own status, type, param and code where it sent them."""
    form = _OPENAI_FORMS.get(error.code)
    status = form.status if form is not None and form.status is not None else error.status_code
    param = str(error.details[0].get("field")) if error.details else None
    detail = openai_error_detail(error.code, error.message, status=status, param=param)
    upstream = error.upstream
    if upstream is not None:
        status = upstream.status
        detail["type"] = upstream.type or detail["type"]
        detail["param"] = upstream.param
        detail["code"] = upstream.code or detail["code"]
    return status, detail


def openai_error_body(error: ServiceError) -> tuple[int, bytes]:
    status, detail = openai_error(error)
    return status, _utf8_json({"error": detail})


def present_error(error: ServiceError, *, path: str, request_id: str | None) -> Response:
    """The error as the route's API presents it: OpenAI's envelope under `/v1/`, ours everywhere else."""
    if not is_openai_path(path):
        return error_response(error, request_id)
    status, body = openai_error_body(error)
    return Response(content=body, status_code=status, headers=error.headers, media_type="application/json")


def _present(request: Request, error: ServiceError) -> Response:
    return present_error(error, path=request.scope["path"], request_id=request_id_of(request))


async def _service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _present(request, exc)


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
    return _present(request, error)


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
    return _present(request, error)


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
