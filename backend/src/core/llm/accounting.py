"""Accounting for calls: a key's limits before the call, and when it ends its log line, ledger row, metrics and
the limits settled to what it really used.

Tokens are reserved before the call (the prompt's estimate plus `max_tokens`, or LLM_DEFAULT_TOKEN_RESERVE) so
concurrent calls cannot overshoot a limit by more than one reservation, then settled to the upstream's usage: the
usage chunk of a stream, the answer's usage, or for a stream the caller abandoned, an estimate of what was
delivered. A call that failed before the upstream produced anything gives its reservation back, except a timeout
after the request was sent (the upstream may have run it: it stays charged).
"""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol

from src.core.errors import ErrorCode, ServiceError
from src.core.ledger import Ledger, LedgerRow
from src.core.limits import Limiter, LimitExceeded, estimate_prompt_tokens
from src.core.llm.call_context import CallContext
from src.core.llm.call_record import CallLog, CallRecord, elapsed_ms

RATE_LIMITED_STATUS = 429
CHARS_PER_TOKEN = 4
# Failures after which the upstream may still have run the call (and billed it): its reservation stays charged.
_MAYBE_RAN = frozenset({ErrorCode.UPSTREAM_TIMEOUT})


class CallMetrics(Protocol):
    """What accounting reports to metrics (core/metrics.py implements it)."""

    def call_finished(
        self,
        *,
        model: str,
        key: str,
        outcome: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        upstream_seconds: float,
        ttft_seconds: float | None,
    ) -> None: ...

    def rate_limited(self, *, key: str, kind: str) -> None: ...

    def stream_started(self) -> None: ...

    def stream_ended(self) -> None: ...


class CallAccounting:
    def __init__(
        self,
        *,
        call_log: CallLog,
        limiter: Limiter,
        ledger: Ledger | None,
        metrics: CallMetrics | None,
        default_token_reserve: int,
    ) -> None:
        self._call_log = call_log
        self._limiter = limiter
        self._ledger = ledger
        self._metrics = metrics
        self._default_reserve = default_token_reserve

    async def admit(
        self,
        context: CallContext,
        record: CallRecord,
        *,
        messages: list[dict[str, Any]],
        max_tokens: int | None,
        choices: int = 1,
    ) -> None:
        """Reserve against the key's limits, or raise 429 `key_rate_limited` / `key_budget_exceeded`.

        The answer's share is `max_tokens` (else LLM_DEFAULT_TOKEN_RESERVE) for each of the `choices` (OpenAI's
        `n`): the upstream bills every choice."""
        limits = context.caller.limits
        if not limits.limited:
            return
        record.prompt_estimate = estimate_prompt_tokens(messages)
        reserve = record.prompt_estimate + (max_tokens or self._default_reserve) * choices
        try:
            admission = await self._limiter.reserve(context.caller.name, limits, reserve)
        except LimitExceeded as exc:
            if self._metrics is not None:
                self._metrics.rate_limited(key=context.caller.name, kind=exc.kind)
            headers = {"Retry-After": str(exc.retry_after_seconds), **exc.state.headers()}
            context.response_headers.update(headers)
            if exc.kind == "budget":
                raise ServiceError(
                    ErrorCode.KEY_BUDGET_EXCEEDED,
                    f"Key {context.caller.name!r} has used its daily token budget; it resets at 00:00 UTC.",
                    status_code=RATE_LIMITED_STATUS,
                    headers=headers,
                ) from exc
            raise ServiceError(
                ErrorCode.KEY_RATE_LIMITED,
                f"Key {context.caller.name!r} is over its per-minute limit; retry after {exc.retry_after_seconds} s.",
                status_code=RATE_LIMITED_STATUS,
                headers=headers,
            ) from exc
        record.admission = admission
        context.response_headers.update(admission.state.headers())

    def stream_started(self) -> None:
        if self._metrics is not None:
            self._metrics.stream_started()

    def stream_ended(self) -> None:
        if self._metrics is not None:
            self._metrics.stream_ended()

    def finish(self, record: CallRecord) -> Coroutine[Any, Any, None] | None:
        """The call ended, whatever way: its line, its row, its metrics now; the settlement of its key's limits is
        returned to await (None for an unlimited key), so most calls need no await, and no task, here."""
        self._call_log.emit(record)
        if self._ledger is not None:
            self._ledger.record(ledger_row(record))
        if self._metrics is not None:
            usage = record.usage
            self._metrics.call_finished(
                model=record.model,
                key=record.key_name,
                outcome=record.code or "ok",
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                upstream_seconds=elapsed_ms(record.started) / 1000,
                ttft_seconds=record.ttft_ms / 1000 if record.ttft_ms is not None else None,
            )
        if record.admission is None:
            return None
        return self._limiter.settle(record.admission, tokens_spent(record))


def tokens_spent(record: CallRecord) -> int:
    """What the call cost the key: the upstream's count when it gave one, else the best estimate."""
    if record.usage is not None:
        return record.usage.total_tokens
    if record.delivered_chars:
        return record.prompt_estimate + record.delivered_chars // CHARS_PER_TOKEN
    if record.admission is not None and (record.code in _MAYBE_RAN or record.cancelled):
        return record.admission.tokens
    return 0


def ledger_row(record: CallRecord) -> LedgerRow:
    usage = record.usage
    return LedgerRow(
        ts=datetime.now(UTC),
        request_id=record.request_id,
        route=record.route,
        key_name=record.key_name,
        user=record.user,
        model=record.model,
        upstream_model=record.upstream_model,
        stream=record.stream,
        status=record.status,
        code=record.code,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        reasoning_tokens=record.reasoning_tokens,
        cached_tokens=record.cached_tokens,
        latency_ms=elapsed_ms(record.started),
        ttft_ms=record.ttft_ms,
        cancelled=record.cancelled,
    )
