"""The one table from our error codes to OpenAI's envelope: every code, with the status OpenAI's SDKs need."""

from __future__ import annotations

import pytest

from src.core.errors import ErrorCode, ServiceError, UpstreamErrorFields, openai_error

# code: (our status, the status an OpenAI-compatible caller gets, type, code)
TABLE: dict[ErrorCode, tuple[int, int, str, str | None]] = {
    ErrorCode.VALIDATION_ERROR: (422, 400, "invalid_request_error", None),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, 413, "invalid_request_error", "payload_too_large"),
    ErrorCode.UNAUTHORIZED: (401, 401, "invalid_request_error", "invalid_api_key"),
    ErrorCode.NOT_FOUND: (404, 404, "invalid_request_error", "unknown_url"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, 405, "invalid_request_error", "method_not_allowed"),
    ErrorCode.MODEL_NOT_ALLOWED: (400, 404, "invalid_request_error", "model_not_found"),
    ErrorCode.MODEL_NOT_FOUND: (400, 404, "invalid_request_error", "model_not_found"),
    ErrorCode.LLM_NOT_CONFIGURED: (503, 503, "server_error", "llm_not_configured"),
    ErrorCode.LLM_AUTH_ERROR: (500, 500, "server_error", "llm_auth_error"),
    ErrorCode.INVALID_REQUEST: (400, 400, "invalid_request_error", None),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, 400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.RATE_LIMITED: (429, 429, "requests", "rate_limit_exceeded"),
    ErrorCode.KEY_RATE_LIMITED: (429, 429, "requests", "rate_limit_exceeded"),
    ErrorCode.KEY_BUDGET_EXCEEDED: (429, 429, "insufficient_quota", "insufficient_quota"),
    ErrorCode.QUOTA_EXCEEDED: (503, 503, "server_error", "quota_exceeded"),
    ErrorCode.UPSTREAM_ERROR: (502, 502, "server_error", "upstream_error"),
    ErrorCode.UPSTREAM_TIMEOUT: (504, 504, "server_error", "upstream_timeout"),
    ErrorCode.UPSTREAM_UNAVAILABLE: (503, 503, "server_error", "upstream_unavailable"),
    ErrorCode.SERVER_SHUTTING_DOWN: (503, 503, "server_error", "server_shutting_down"),
    ErrorCode.STREAM_NOT_FOUND: (404, 404, "invalid_request_error", "stream_not_found"),
    ErrorCode.RESUME_UNAVAILABLE: (503, 503, "server_error", "resume_unavailable"),
    ErrorCode.RESUME_BUFFER_FULL: (502, 502, "server_error", "resume_buffer_full"),
    ErrorCode.CLIENT_CLOSED_REQUEST: (499, 499, "invalid_request_error", "client_closed_request"),
    ErrorCode.LEDGER_UNAVAILABLE: (503, 503, "server_error", "ledger_unavailable"),
    ErrorCode.INTERNAL_ERROR: (500, 500, "server_error", "internal_error"),
}


def test_the_table_covers_every_code() -> None:
    assert set(TABLE) == set(ErrorCode)


@pytest.mark.parametrize(("code", "row"), TABLE.items(), ids=[code.value for code in TABLE])
def test_each_code_in_openais_envelope(code: ErrorCode, row: tuple[int, int, str, str | None]) -> None:
    ours, status, kind, openai_code = row

    answered, detail = openai_error(ServiceError(code, "What went wrong.", status_code=ours))

    assert answered == status
    assert detail == {"message": "What went wrong.", "type": kind, "param": None, "code": openai_code}


def test_an_upstream_rejection_keeps_openais_own_status_type_param_and_code() -> None:
    error = ServiceError(
        ErrorCode.INVALID_REQUEST,
        "Unsupported value",
        status_code=400,
        upstream=UpstreamErrorFields(status=422, type="invalid_request_error", param="temperature", code="bad_value"),
    )

    assert openai_error(error) == (
        422,
        {"message": "Unsupported value", "type": "invalid_request_error", "param": "temperature", "code": "bad_value"},
    )


def test_a_validation_error_names_its_first_field_as_param() -> None:
    error = ServiceError(
        ErrorCode.VALIDATION_ERROR, "Bad", status_code=422, details=[{"field": "messages"}, {"field": "model"}]
    )

    assert openai_error(error)[1]["param"] == "messages"
