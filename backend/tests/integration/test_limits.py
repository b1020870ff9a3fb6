"""Per-key limits against a controlled clock, in memory and through a real Redis: admission, settle, headers,
the concurrency guarantee, and what happens when Redis goes away and comes back.

Redis is reached at TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Without it the Redis cases skip on a
developer's laptop, and fail under CI. Every test writes under a random key prefix and deletes its keys after.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import structlog

import src.core.limits as limits_module
from src.core.limits import (
    DAY_KEY_TTL_SECONDS,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    MINUTE_KEY_TTL_SECONDS,
    REPLY_PRIMING_TOKENS,
    Admission,
    ChargedBy,
    KeyLimits,
    Limiter,
    LimitExceeded,
    MemoryLimiter,
    RedisLimiter,
    build_limiter,
    estimate_prompt_tokens,
    format_reset,
)
from tests.support.real_servers import (
    LOOPBACK,
    free_port,
    log_tail,
    require_binary,
    start_on_free_port,
    stop_process,
    wait_for_port,
)

REDIS_URL_VARIABLE = "TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PING_TIMEOUT_S = 1.0
# A call may wait out one Redis timeout (0.5 s), never more; the rest is slack for a busy CI machine.
CALL_DEADLINE_S = 1.0
RECOVERY_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.05

# 2025-03-01 12:00:00 UTC: a minute boundary, far from midnight.
NOON = datetime(2025, 3, 1, 12, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2025, 3, 2, tzinfo=UTC).timestamp()
UNLIMITED = KeyLimits(requests_per_minute=None, tokens_per_minute=None, tokens_per_day=None)

T = TypeVar("T")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """Makes limiters of one kind; Redis ones share this test's key prefix (so two of them share limits)."""

    kind: ChargedBy
    redis_url: str | None = None
    prefix: str = ""
    redis_errors: list[int] = field(default_factory=list)
    made: list[Limiter] = field(default_factory=list)

    def make(self, clock: FakeClock) -> Limiter:
        fallback = MemoryLimiter(clock=clock)
        limiter: Limiter = fallback
        if self.redis_url is not None:
            # A Redis error would hand the call to the fallback and the test would pass on the wrong store:
            # they are recorded and the fixture fails the test if there were any.
            limiter = RedisLimiter(
                self.redis_url,
                fallback=fallback,
                on_redis_error=lambda: self.redis_errors.append(1),
                key_prefix=self.prefix,
            )
        self.made.append(limiter)
        return limiter

    def stored_keys(self) -> list[str]:
        if self.redis_url is None:
            return []
        return _keys_under(self.redis_url, self.prefix)


def _keys_under(url: str, prefix: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return sorted(client.scan_iter(match=f"{prefix}*"))
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get(REDIS_URL_VARIABLE, DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_PING_TIMEOUT_S, socket_timeout=REDIS_PING_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = (
            f"Redis is not reachable at {url} ({exc}): start one (`redis-server`, or "
            f"`docker run --rm -p 6379:6379 redis:7`) or point {REDIS_URL_VARIABLE} at one"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:limits:{secrets.token_hex(8)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def backend_kind(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return Backend("memory")
    return Backend(
        "redis", redis_url=request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix")
    )


async def _close_and_check(backend: Backend) -> None:
    for limiter in backend.made:
        await limiter.aclose()
    assert not backend.redis_errors, "Redis failed during the test: the fallback answered instead"


@pytest.fixture
async def backend(backend_kind: Backend) -> AsyncIterator[Backend]:
    yield backend_kind
    await _close_and_check(backend_kind)


@pytest.fixture
async def redis_backend(redis_url: str, redis_prefix: str) -> AsyncIterator[Backend]:
    made = Backend("redis", redis_url=redis_url, prefix=redis_prefix)
    yield made
    await _close_and_check(made)


async def _outcomes(calls: Sequence[Awaitable[Admission]]) -> tuple[list[Admission], list[LimitExceeded]]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    admitted = [result for result in results if isinstance(result, Admission)]
    refused = [result for result in results if isinstance(result, LimitExceeded)]
    assert len(admitted) + len(refused) == len(results), [r for r in results if isinstance(r, BaseException)]
    return admitted, refused


# --- admission -------------------------------------------------------------------------------------------------


async def test_rpm_admits_exactly_n_then_raises_rate_until_the_minute_ends(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON + 15.25))
    limits = KeyLimits(requests_per_minute=3, tokens_per_minute=None, tokens_per_day=None)
    remaining = [(await limiter.reserve("k", limits, 10)).state.remaining_requests for _ in range(3)]
    assert remaining == [2, 1, 0]

    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("k", limits, 10)
    assert refused.value.kind == "rate"
    assert refused.value.retry_after_seconds == 45  # 44.75 s to the minute's end, rounded up
    assert refused.value.state.remaining_requests == 0
    assert refused.value.state.limit_requests == 3


async def test_admissions_are_charged_to_the_backend_under_test(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    admission = await limiter.reserve("k", KeyLimits(5, None, None), 1)
    assert admission.charged_by == backend.kind


async def test_tpm_admits_while_tokens_used_are_below_the_limit(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=100, tokens_per_day=None)
    assert (await limiter.reserve("k", limits, 60)).state.remaining_tokens == 40
    assert (await limiter.reserve("k", limits, 30)).state.remaining_tokens == 10
    # 90 used < 100: admitted, and it may take the minute past its limit (by this one reservation).
    assert (await limiter.reserve("k", limits, 20)).state.remaining_tokens == 0

    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("k", limits, 1)
    assert refused.value.kind == "rate"
    assert refused.value.retry_after_seconds == 60
    assert refused.value.state.remaining_tokens == 0


async def test_a_reservation_bigger_than_the_limit_is_admitted_when_nothing_is_used_and_blocks_the_next(
    backend: Backend,
) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=100, tokens_per_day=None)
    # Documented: a call bigger than the whole limit could otherwise never run; it runs alone in its minute.
    big = await limiter.reserve("k", limits, 500)
    assert big.tokens == 500
    assert big.state.remaining_tokens == 0
    with pytest.raises(LimitExceeded):
        await limiter.reserve("k", limits, 1)


async def test_keys_have_limits_of_their_own(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(requests_per_minute=1, tokens_per_minute=None, tokens_per_day=None)
    await limiter.reserve("a", limits, 1)
    await limiter.reserve("b", limits, 1)
    with pytest.raises(LimitExceeded):
        await limiter.reserve("a", limits, 1)


async def test_an_unlimited_key_is_admitted_without_counting(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    admission = await limiter.reserve("k", UNLIMITED, 10_000)
    assert admission.charged_by is None
    assert admission.state.headers() == {}
    await limiter.settle(admission, 20_000)
    assert backend.stored_keys() == []


async def test_negative_token_counts_are_refused(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(None, 100, None)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.reserve("k", limits, -1)
    admission = await limiter.reserve("k", limits, 1)
    with pytest.raises(ValueError, match="actual_tokens"):
        await limiter.settle(admission, -1)


# --- settle -----------------------------------------------------------------------------------------------------


async def test_settle_refunds_and_charges_the_windows_and_clamps_at_zero(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=100, tokens_per_day=1000)
    # A probe of 0 tokens shows the counters; with only the budget set, "tokens" reports the day's.
    budget_only = KeyLimits(requests_per_minute=None, tokens_per_minute=None, tokens_per_day=1000)

    async def remaining() -> tuple[int | None, int | None]:
        minute = (await limiter.reserve("k", limits, 0)).state.remaining_tokens
        day = (await limiter.reserve("k", budget_only, 0)).state.remaining_tokens
        return minute, day

    first = await limiter.reserve("k", limits, 80)
    await limiter.settle(first, 20)  # a refund of 60
    assert await remaining() == (80, 980)

    second = await limiter.reserve("k", limits, 10)
    await limiter.settle(second, 50)  # a charge of 40
    assert await remaining() == (30, 930)

    big = await limiter.reserve("k", limits, 500)  # 70 used < 100: admitted
    await limiter.settle(big, 0)
    assert await remaining() == (30, 930)
    await limiter.settle(big, 0)  # settled twice: 70 - 500 would be negative
    assert await remaining() == (100, 1000)


async def test_settle_after_the_window_ended_does_not_touch_the_new_window(backend: Backend) -> None:
    clock = FakeClock(NOON)
    limiter = backend.make(clock)
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=100, tokens_per_day=None)
    old = await limiter.reserve("k", limits, 10)
    clock.now += 60
    await limiter.settle(old, 90)
    assert (await limiter.reserve("k", limits, 0)).state.remaining_tokens == 100


# --- windows and budgets ----------------------------------------------------------------------------------------


async def test_the_day_budget_raises_budget_with_retry_after_until_midnight_utc(backend: Backend) -> None:
    limiter = backend.make(FakeClock(MIDNIGHT - 29.5))
    limits = KeyLimits(requests_per_minute=1, tokens_per_minute=None, tokens_per_day=100)
    admitted = await limiter.reserve("k", limits, 100)
    assert admitted.state.remaining_tokens == 0
    assert admitted.state.reset_tokens_seconds == pytest.approx(29.5)

    # The minute's request limit is spent too: the budget is named, since the next minute would not help.
    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("k", limits, 1)
    assert refused.value.kind == "budget"
    assert refused.value.retry_after_seconds == 30
    assert refused.value.state.limit_tokens == 100
    assert refused.value.state.remaining_tokens == 0


async def test_retry_after_is_at_least_one_second(backend: Backend) -> None:
    limiter = backend.make(FakeClock(MIDNIGHT - 0.25))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=None, tokens_per_day=10)
    await limiter.reserve("k", limits, 10)
    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("k", limits, 1)
    assert refused.value.retry_after_seconds == 1


async def test_windows_reset_in_the_next_minute_and_the_next_day(backend: Backend) -> None:
    clock = FakeClock(NOON + 59.9)
    limiter = backend.make(clock)
    per_minute = KeyLimits(requests_per_minute=1, tokens_per_minute=None, tokens_per_day=None)
    await limiter.reserve("minute", per_minute, 1)
    with pytest.raises(LimitExceeded):
        await limiter.reserve("minute", per_minute, 1)
    clock.now = NOON + 60
    assert (await limiter.reserve("minute", per_minute, 1)).state.remaining_requests == 0

    clock.now = MIDNIGHT - 1
    per_day = KeyLimits(requests_per_minute=None, tokens_per_minute=None, tokens_per_day=10)
    await limiter.reserve("day", per_day, 10)
    with pytest.raises(LimitExceeded) as refused:
        await limiter.reserve("day", per_day, 1)
    assert refused.value.kind == "budget"
    clock.now = MIDNIGHT
    assert (await limiter.reserve("day", per_day, 4)).state.remaining_tokens == 6


# --- headers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.059, "59ms"),
        (1, "1s"),
        (41.724, "41.724s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_reset_durations_are_written_like_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


async def test_headers_use_openais_names_and_formats(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON + 54))
    both = await limiter.reserve("k", KeyLimits(10, 1000, None), 100)
    assert both.state.headers() == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }


async def test_headers_report_the_budget_when_it_is_the_only_token_limit(backend: Backend) -> None:
    limiter = backend.make(FakeClock(MIDNIGHT - 3723))  # 22:57:57 UTC
    admission = await limiter.reserve("k", KeyLimits(None, None, 5000), 200)
    assert admission.state.headers() == {
        "x-ratelimit-limit-tokens": "5000",
        "x-ratelimit-remaining-tokens": "4800",
        "x-ratelimit-reset-tokens": "1h2m3s",
    }


async def test_headers_show_only_the_limits_that_are_set(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON + 59.941))
    admission = await limiter.reserve("k", KeyLimits(2, None, None), 5)
    assert admission.state.headers() == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "59ms",
    }


# --- the concurrency guarantee ----------------------------------------------------------------------------------

CONCURRENT_CALLS = 50
RESERVATION = 30
TPM = 100
# "used < limit" before adding: calls are admitted until the used tokens reach the limit, the last one crossing it.
EXPECTED_ADMITTED = math.ceil(TPM / RESERVATION)


async def test_concurrent_reservations_overshoot_a_limit_by_at_most_one_reservation(backend: Backend) -> None:
    limiter = backend.make(FakeClock(NOON))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=TPM, tokens_per_day=None)
    admitted, refused = await _outcomes([limiter.reserve("k", limits, RESERVATION) for _ in range(CONCURRENT_CALLS)])
    assert sum(admission.tokens for admission in admitted) <= TPM + RESERVATION
    assert len(admitted) == EXPECTED_ADMITTED
    assert {exc.kind for exc in refused} == {"rate"}
    assert {admission.charged_by for admission in admitted} == {backend.kind}


async def test_limits_hold_across_two_redis_limiters_with_their_own_connection_pools(redis_backend: Backend) -> None:
    clock = FakeClock(NOON)
    one, two = redis_backend.make(clock), redis_backend.make(clock)
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=TPM, tokens_per_day=None)
    calls = [limiter.reserve("k", limits, RESERVATION) for _ in range(CONCURRENT_CALLS // 2) for limiter in (one, two)]
    admitted, _ = await _outcomes(calls)
    assert sum(admission.tokens for admission in admitted) <= TPM + RESERVATION
    assert len(admitted) == EXPECTED_ADMITTED

    rpm = 7
    per_request = KeyLimits(requests_per_minute=rpm, tokens_per_minute=None, tokens_per_day=None)
    calls = [limiter.reserve("r", per_request, 1) for _ in range(CONCURRENT_CALLS // 2) for limiter in (one, two)]
    admitted, _ = await _outcomes(calls)
    assert len(admitted) == rpm


# --- Redis: keys, outage, recovery ------------------------------------------------------------------------------


async def test_redis_window_keys_expire_and_an_expired_window_is_not_recreated(redis_backend: Backend) -> None:
    limiter = redis_backend.make(FakeClock(NOON))
    admission = await limiter.reserve("k", KeyLimits(None, 100, 1000), 10)
    assert redis_backend.redis_url is not None
    client = redis.Redis.from_url(redis_backend.redis_url, decode_responses=True)
    try:
        minute_key = f"{redis_backend.prefix}{{k}}:m:{admission.minute_window}"
        day_key = f"{redis_backend.prefix}{{k}}:d:2025-03-01"
        assert redis_backend.stored_keys() == sorted([minute_key, day_key])
        assert 0 < client.ttl(minute_key) <= MINUTE_KEY_TTL_SECONDS
        assert MINUTE_KEY_TTL_SECONDS < client.ttl(day_key) <= DAY_KEY_TTL_SECONDS

        await limiter.settle(admission, 5)
        assert client.hget(minute_key, "tokens") == "5"
        assert 0 < client.ttl(minute_key) <= MINUTE_KEY_TTL_SECONDS

        client.delete(minute_key)  # as if it had expired
        await limiter.settle(admission, 50)  # 40 more than reserved: the day had 5, now 45
        assert not client.exists(minute_key)
        assert client.get(day_key) == "45"
        assert 0 < client.ttl(day_key) <= DAY_KEY_TTL_SECONDS
    finally:
        client.close()


async def _timed(call: Awaitable[T]) -> T:
    """The call's result; it must return (or raise) within CALL_DEADLINE_S."""
    started = time.monotonic()
    try:
        return await call
    finally:
        assert time.monotonic() - started < CALL_DEADLINE_S


async def test_redis_down_falls_back_to_local_limits_without_failing_a_call() -> None:
    errors: list[int] = []
    clock = FakeClock(NOON)
    limiter = RedisLimiter(
        f"redis://{LOOPBACK}:{free_port()}/0",
        fallback=MemoryLimiter(clock=clock),
        on_redis_error=lambda: errors.append(1),
    )
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=None, tokens_per_day=None)
    try:
        with structlog.testing.capture_logs() as logs:
            first = await _timed(limiter.reserve("k", limits, 10))
            second = await _timed(limiter.reserve("k", limits, 10))
            with pytest.raises(LimitExceeded) as refused:
                await _timed(limiter.reserve("k", limits, 10))
            await _timed(limiter.settle(first, 3))
    finally:
        await limiter.aclose()
    assert (first.charged_by, second.charged_by) == ("memory", "memory")
    assert refused.value.kind == "rate"
    assert errors
    warnings = [line for line in logs if line["event"] == "limits_redis_unavailable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["error"] == "ConnectionError"


async def test_a_redis_that_never_answers_costs_a_call_at_most_the_redis_timeout() -> None:
    errors: list[int] = []
    # A listening socket nobody accepts from: the connect succeeds (the kernel's backlog), no answer ever comes.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        limiter = RedisLimiter(
            f"redis://{LOOPBACK}:{port}/0", fallback=MemoryLimiter(), on_redis_error=lambda: errors.append(1)
        )
        try:
            admission = await _timed(limiter.reserve("k", KeyLimits(5, None, None), 1))
        finally:
            await limiter.aclose()
    assert admission.charged_by == "memory"
    assert errors == [1]


async def test_each_redis_failure_is_reported_but_logged_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the pause between attempts, every call tries Redis and fails: each is reported, one line is logged.
    monkeypatch.setattr(limits_module, "REDIS_RETRY_INTERVAL_SECONDS", 0.0)
    errors: list[int] = []
    limiter = RedisLimiter(
        f"redis://{LOOPBACK}:{free_port()}/0", fallback=MemoryLimiter(), on_redis_error=lambda: errors.append(1)
    )
    calls = 5
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(calls):
                await limiter.reserve("k", KeyLimits(100, None, None), 1)
    finally:
        await limiter.aclose()
    assert len(errors) == calls
    assert [line["event"] for line in logs] == ["limits_redis_unavailable"]


@dataclass
class RedisProcess:
    """A private redis-server that the test can stop and start again on the same port."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def launch(self, port: int) -> subprocess.Popen[bytes]:
        self.port = port
        command = [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.log),
            "--dir",
            str(self.log.parent),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def start_again(self) -> None:
        process = self.launch(self.port)
        try:
            wait_for_port(LOOPBACK, self.port, process=process)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise AssertionError(f"redis-server did not start again on {self.port}\n{log_tail(self.log)}") from exc


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    require_binary(REDIS_SERVER, "redis-server")
    server = RedisProcess(port=0, log=tmp_path / "redis.log")
    start_on_free_port("redis-server", server.launch, logs=[server.log])
    yield server
    server.stop()


async def test_redis_is_used_again_when_it_answers_again(private_redis: RedisProcess) -> None:
    errors: list[int] = []
    clock = FakeClock(NOON)
    fallback = MemoryLimiter(clock=clock)
    limiter = RedisLimiter(private_redis.url, fallback=fallback, on_redis_error=lambda: errors.append(1))
    limits = KeyLimits(requests_per_minute=None, tokens_per_minute=100, tokens_per_day=None)
    try:
        assert (await limiter.reserve("k", limits, 10)).charged_by == "redis"
        assert not errors

        private_redis.stop()
        during_outage = await _timed(limiter.reserve("k", limits, 50))
        assert during_outage.charged_by == "memory"
        assert errors

        private_redis.start_again()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        # Polls reserve 0 tokens, so the ones the fallback admits meanwhile leave its token count alone.
        while (admission := await _timed(limiter.reserve("k", limits, 0))).charged_by != "redis":
            assert time.monotonic() < deadline, "Redis answers again, but the limiter still uses its fallback"
            await asyncio.sleep(POLL_INTERVAL_S)  # the pause between polls; the deadline bounds the wait
        assert admission.state.remaining_tokens == 100  # the restarted server is empty (no persistence)
        assert _keys_under(private_redis.url, "llm:limits:")

        # The outage's admission was charged locally: its settle goes to the fallback, not to Redis.
        assert (await fallback.reserve("k", limits, 0)).state.remaining_tokens == 50
        await limiter.settle(during_outage, 0)
        assert (await fallback.reserve("k", limits, 0)).state.remaining_tokens == 100
    finally:
        await limiter.aclose()


# --- memory and construction ------------------------------------------------------------------------------------


async def test_memory_keeps_only_the_current_windows() -> None:
    clock = FakeClock(MIDNIGHT - 120)
    limiter = MemoryLimiter(clock=clock)
    limits = KeyLimits(None, None, 1000)
    keys = 100
    for index in range(keys):
        await limiter.reserve(f"key-{index}", limits, 1)
    assert limiter.tracked_windows == 2 * keys

    clock.now += 60
    await limiter.reserve("key-0", limits, 1)
    assert limiter.tracked_windows == 1 + keys  # this minute's one key, today's hundred

    clock.now = MIDNIGHT
    await limiter.reserve("key-0", limits, 1)
    assert limiter.tracked_windows == 2


async def test_build_limiter_picks_redis_only_with_a_url() -> None:
    memory = build_limiter(None)
    shared = build_limiter(f"redis://{LOOPBACK}:{free_port()}/0", on_redis_error=lambda: None)
    try:
        assert isinstance(memory, MemoryLimiter)
        assert isinstance(shared, RedisLimiter)
    finally:
        await memory.aclose()
        await shared.aclose()


# --- prompt estimate --------------------------------------------------------------------------------------------

BASE = REPLY_PRIMING_TOKENS + MESSAGE_OVERHEAD_TOKENS


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        pytest.param([{"role": "user", "content": "Hello there"}], BASE + 3, id="string-rounded-up"),
        pytest.param([{"role": "user", "content": "abcd" * 25}], BASE + 25, id="string-four-chars-a-token"),
        pytest.param([{"role": "assistant", "content": None}], BASE, id="no-content"),
        pytest.param(
            [{"role": "user", "content": [{"type": "text", "text": "abcd" * 5}, {"type": "text", "text": "ab"}]}],
            BASE + 5 + 1,
            id="text-parts",
        ),
        pytest.param(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
                    ],
                }
            ],
            BASE + 4 + IMAGE_TOKENS,
            id="image-part",
        ),
        pytest.param(
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGR" * 1000}}]}],
            BASE,
            id="other-parts-not-estimated",
        ),
        pytest.param(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            REPLY_PRIMING_TOKENS + 2 * MESSAGE_OVERHEAD_TOKENS + 3 + 1,
            id="several-messages",
        ),
    ],
)
def test_estimate_prompt_tokens(messages: list[dict[str, Any]], expected: int) -> None:
    assert estimate_prompt_tokens(messages) == expected
