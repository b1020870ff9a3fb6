"""When a failed upstream call is tried again, and after how long: never in a way that could bill twice.

    retried                          not retried
    connection never made            a request the upstream received and then went silent on (504)
    (refused, reset, DNS, TLS...)    429 `insufficient_quota`, 429 asking to wait over the cap (answered at once)
    HTTP 500, 502, 503, 504          every other status
    429 with Retry-After <= the cap

The SDK's own retry loop retries read timeouts (a 60 s reasoning call could run and be billed three times) and
sleeps up to a minute on a 429 while the caller's connection slot is held; so the SDK is built with
`max_retries=0` and the service retries by this policy, without holding a slot while it waits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx
import openai

from src.core.llm.upstream_errors import retry_after_seconds

RETRIED_STATUSES = frozenset({500, 502, 503, 504})
RATE_LIMITED_STATUS = 429
INSUFFICIENT_QUOTA = "insufficient_quota"
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
# Transport failures that prove the request never reached the upstream.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    max_wait_seconds: float

    def delay_before_retry(self, exc: BaseException, *, retries_done: int) -> float | None:
        """Seconds to wait before trying again, or None when `exc` must be answered now."""
        if retries_done >= self.max_retries:
            return None
        if isinstance(exc, openai.APIConnectionError):
            return self._backoff(retries_done) if isinstance(exc.__cause__, _NOT_SENT) else None
        if not isinstance(exc, openai.APIStatusError):
            return None
        if exc.status_code in RETRIED_STATUSES:
            asked = retry_after_seconds(exc.response)
            return self._backoff(retries_done) if asked is None else min(asked, self.max_wait_seconds)
        if exc.status_code == RATE_LIMITED_STATUS and exc.code != INSUFFICIENT_QUOTA:
            asked = retry_after_seconds(exc.response)
            if asked is None:
                return self._backoff(retries_done)
            return asked if asked <= self.max_wait_seconds else None
        return None

    def _backoff(self, retries_done: int) -> float:
        """Exponential with full jitter, capped by the policy's longest wait."""
        ceiling = min(FIRST_BACKOFF_SECONDS * 2**retries_done, MAX_BACKOFF_SECONDS, self.max_wait_seconds)
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not cryptography)
