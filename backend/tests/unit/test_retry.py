"""The retry policy: what is tried again, after how long, and what never is (it could bill twice)."""

from __future__ import annotations

import httpx
import openai
import pytest

from src.core.llm.retry import RetryPolicy

REQUEST = httpx.Request("POST", "https://upstream.test/v1/chat/completions")
POLICY = RetryPolicy(max_retries=2, max_wait_seconds=5)


def _status(status: int, *, headers: dict[str, str] | None = None, code: str | None = None) -> openai.APIStatusError:
    response = httpx.Response(status, headers=headers, request=REQUEST)
    body = {"message": "m", "type": "t", "code": code}
    return openai.APIStatusError("m", response=response, body=body)


def _transport(cause: Exception) -> openai.APIConnectionError:
    error: openai.APIConnectionError = (
        openai.APITimeoutError(request=REQUEST)
        if isinstance(cause, httpx.TimeoutException)
        else openai.APIConnectionError(request=REQUEST)
    )
    error.__cause__ = cause
    return error


RETRIED = {
    "connection_refused": _transport(httpx.ConnectError("refused")),
    "connect_timeout": _transport(httpx.ConnectTimeout("slow handshake")),
    "500": _status(500),
    "502": _status(502),
    "503": _status(503),
    "504": _status(504),
    "429_without_retry_after": _status(429, code="rate_limit_exceeded"),
}
NOT_RETRIED = {
    "read_timeout_after_sending": _transport(httpx.ReadTimeout("silent")),
    "write_timeout": _transport(httpx.WriteTimeout("stuck")),
    "broken_mid_answer": _transport(httpx.ReadError("reset")),
    "429_insufficient_quota": _status(429, code="insufficient_quota"),
    "429_asking_for_longer_than_the_cap": _status(429, headers={"retry-after": "60"}),
    "400": _status(400),
    "401": _status(401),
    "404": _status(404),
    "409": _status(409),
}


@pytest.mark.parametrize("error", RETRIED.values(), ids=RETRIED.keys())
def test_retried_failures_wait_at_most_the_cap(error: openai.OpenAIError) -> None:
    delay = POLICY.delay_before_retry(error, retries_done=0)
    assert delay is not None
    assert 0 <= delay <= 5


@pytest.mark.parametrize("error", NOT_RETRIED.values(), ids=NOT_RETRIED.keys())
def test_failures_that_could_bill_twice_or_cannot_succeed_are_not_retried(error: openai.OpenAIError) -> None:
    assert POLICY.delay_before_retry(error, retries_done=0) is None


def test_retry_after_within_the_cap_is_honoured() -> None:
    assert POLICY.delay_before_retry(_status(429, headers={"retry-after": "3"}), retries_done=0) == 3
    assert POLICY.delay_before_retry(_status(503, headers={"retry-after-ms": "250"}), retries_done=0) == 0.25


def test_a_5xx_asking_for_a_long_wait_waits_only_the_cap() -> None:
    assert POLICY.delay_before_retry(_status(503, headers={"retry-after": "120"}), retries_done=0) == 5


def test_no_retry_once_the_retries_are_spent() -> None:
    assert POLICY.delay_before_retry(_status(503), retries_done=2) is None
    assert RetryPolicy(max_retries=0, max_wait_seconds=5).delay_before_retry(_status(503), retries_done=0) is None


def test_backoff_grows_and_stays_under_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, max_wait_seconds=3)
    delays = [policy.delay_before_retry(_status(500), retries_done=n) for n in range(6)]
    assert all(delay is not None and delay <= 3 for delay in delays)
    assert (delays[0] or 0) <= 0.5
