"""The one table from upstream failures (SDK errors, transport errors) to the service's stable error codes.

Foreign errors become ours at one boundary, `translate_upstream_errors` (like httpx's `map_httpcore_exceptions`).
Upstream texts can quote the key we sent ("Incorrect API key provided: sk-abc***xyz"): every text that reaches a
caller or a log line goes through `redact_secrets`, and authentication failures get a fixed message.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai

from src.core.errors import ErrorCode, LLMServiceError, UpstreamErrorFields

_SECRET_PATTERN = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{3,}")
AUTH_ERROR_MESSAGE = "The service could not authenticate with the LLM provider; an operator must check its API key."
NOT_CONFIGURED_MESSAGE = "No LLM provider is configured: set OPENAI_API_KEY on the service."
NO_ENDPOINT_MESSAGE = (
    "The LLM provider has no chat completions endpoint at the configured URL (check OPENAI_BASE_URL, e.g. its /v1)."
)
_GENERIC_REJECTION = "The LLM provider rejected the request."
_MODEL_NOT_FOUND = "model_not_found"
_INSUFFICIENT_QUOTA = "insufficient_quota"


def redact_secrets(text: str) -> str:
    return _SECRET_PATTERN.sub("[redacted]", text)


@dataclass(frozen=True, slots=True)
class UpstreamRejection:
    """Why the upstream failed a call, for the operator's log line: its status and its own (redacted) message, or
    (no status) what went wrong with the connection when that tells the operator what to fix."""

    status: int | None
    message: str | None


UNTRUSTED_CERTIFICATE_MESSAGE = (
    "The upstream's TLS certificate was not trusted (add its CA to the OS trust store or SSL_CERT_FILE)."
)


def upstream_message(exc: openai.APIError) -> str | None:
    """OpenAI's own `error.message` (redacted), not the SDK's rendering ("Error code: 400 - {...}")."""
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message.strip():
            return redact_secrets(message)
    return None


def _text_field(body: dict[str, object], name: str) -> str | None:
    value = body.get(name)
    return value if isinstance(value, str) else None


def upstream_fields(exc: openai.APIStatusError) -> UpstreamErrorFields:
    """OpenAI's status, type, param and code of a rejection, for the OpenAI-compatible API (they hold no secret)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return UpstreamErrorFields(
        status=exc.status_code,
        type=_text_field(body, "type"),
        param=_text_field(body, "param"),
        code=_text_field(body, "code"),
    )


def rejection_of(exc: BaseException) -> UpstreamRejection | None:
    if isinstance(exc, openai.APIStatusError):
        return UpstreamRejection(exc.status_code, upstream_message(exc))
    if is_untrusted_certificate(exc):
        return UpstreamRejection(None, UNTRUSTED_CERTIFICATE_MESSAGE)
    return None


def retry_after_header(response: httpx.Response) -> dict[str, str]:
    """`Retry-After` in whole seconds from the upstream's `retry-after` or `retry-after-ms`, when it sent one."""
    seconds = retry_after_seconds(response)
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, round(seconds)))}


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is not None and value.strip().isdigit():
        return float(value.strip())
    milliseconds = response.headers.get("retry-after-ms")
    if milliseconds is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(milliseconds) / 1000)
    return None


def is_untrusted_certificate(exc: BaseException) -> bool:
    """Whether a connection failure was the upstream's TLS certificate not being trusted."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def pool_exhausted() -> LLMServiceError:
    return LLMServiceError(
        ErrorCode.UPSTREAM_UNAVAILABLE,
        "All upstream connections are busy (LLM_MAX_CONNECTIONS); retry shortly.",
        status_code=503,
        headers={"Retry-After": "1"},
    )


def malformed(what: str) -> LLMServiceError:
    return LLMServiceError(ErrorCode.UPSTREAM_ERROR, f"The LLM provider sent a malformed {what}.", status_code=502)


def map_upstream_error(exc: Exception) -> LLMServiceError:
    """The one table from upstream failures to our codes (README "Errors")."""
    # APITimeoutError subclasses APIConnectionError: it must be tested first.
    if isinstance(exc, openai.APITimeoutError):
        return LLMServiceError(ErrorCode.UPSTREAM_TIMEOUT, "The LLM provider did not answer in time.", status_code=504)
    if isinstance(exc, openai.APIConnectionError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_UNAVAILABLE, "The LLM provider could not be reached.", status_code=503
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMServiceError(ErrorCode.LLM_AUTH_ERROR, AUTH_ERROR_MESSAGE, status_code=500)
    if isinstance(exc, openai.RateLimitError):
        if exc.code == _INSUFFICIENT_QUOTA:
            return LLMServiceError(
                ErrorCode.QUOTA_EXCEEDED, "The LLM provider's quota for this service is used up.", status_code=503
            )
        return LLMServiceError(
            ErrorCode.RATE_LIMITED,
            "The LLM provider is rate limiting this service; retry later.",
            status_code=429,
            headers=retry_after_header(exc.response),
        )
    if isinstance(exc, openai.NotFoundError):
        # Only an OpenAI error about a model is the caller's business; any other 404 means the URL is wrong.
        if exc.code == _MODEL_NOT_FOUND:
            return LLMServiceError(
                ErrorCode.MODEL_NOT_FOUND,
                upstream_message(exc) or _GENERIC_REJECTION,
                status_code=400,
                upstream=upstream_fields(exc),
            )
        return LLMServiceError(ErrorCode.UPSTREAM_ERROR, NO_ENDPOINT_MESSAGE, status_code=502)
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED if exc.code == "context_length_exceeded" else ErrorCode.INVALID_REQUEST
        return LLMServiceError(
            code, upstream_message(exc) or _GENERIC_REJECTION, status_code=400, upstream=upstream_fields(exc)
        )
    if isinstance(exc, openai.APIStatusError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_ERROR, f"The LLM provider failed (HTTP {exc.status_code}).", status_code=502
        )
    if isinstance(exc, httpx.TimeoutException):
        return LLMServiceError(ErrorCode.UPSTREAM_TIMEOUT, "The LLM provider stopped sending in time.", status_code=504)
    if isinstance(exc, httpx.HTTPError):
        return LLMServiceError(
            ErrorCode.UPSTREAM_ERROR, "The connection to the LLM provider broke mid-answer.", status_code=502
        )
    return LLMServiceError(ErrorCode.INTERNAL_ERROR, "Unexpected upstream failure.", status_code=500)


@contextlib.contextmanager
def translate_upstream_errors() -> Iterator[None]:
    """The boundary where foreign errors become ours."""
    try:
        yield
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        raise map_upstream_error(exc) from exc
