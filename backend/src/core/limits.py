"""Per-key request and token limits, reserved before a call and settled after it, in memory or shared via Redis.

A call reserves its expected tokens *before* it goes upstream (LiteLLM's proxy counts only after the answer, and
so let 663 tokens through a 100 TPM limit). Admission checks "used < limit" and then adds, in one atomic step, so
concurrent calls can overshoot a limit by at most one call's reservation, never more. When the call ends, `settle`
moves the charge to what it really cost.

Windows are fixed, not sliding: a minute is `floor(unix_time / 60)`, a day is the UTC date (reset at 00:00 UTC).

    Limiter (Protocol)     reserve / settle / aclose
    ├── MemoryLimiter      one process: dicts of window counters
    └── RedisLimiter       every worker and instance: one Lua script per reservation; when Redis fails, its
                           MemoryLimiter fallback (limits then hold per process: open to local limits, never to none)

    LimitExceeded          raised by `reserve`: kind "rate" (per minute) or "budget" (per day), Retry-After, state
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog

log = structlog.get_logger("limits")

Clock = Callable[[], float]
LimitKind = Literal["rate", "budget"]
ChargedBy = Literal["memory", "redis"]

SECONDS_PER_MINUTE = 60
SECONDS_PER_DAY = 86_400
MIN_RETRY_AFTER_SECONDS = 1
MILLIS_PER_SECOND = 1000
MILLIS_PER_MINUTE = 60_000
MILLIS_PER_HOUR = 3_600_000

DEFAULT_KEY_PREFIX = "llm:limits:"
# Window keys outlive their window a little (a settle may arrive after the window ended), then Redis drops them.
MINUTE_KEY_TTL_SECONDS = 2 * SECONDS_PER_MINUTE
DAY_KEY_TTL_SECONDS = 2 * SECONDS_PER_DAY
# A limits check must never hold a call up for long: past this, Redis counts as down for this call.
REDIS_TIMEOUT_SECONDS = 0.5
# After a Redis failure, calls go straight to the fallback for this long instead of each waiting out a timeout
# against a server that does not answer; then Redis is tried again.
REDIS_RETRY_INTERVAL_SECONDS = 1.0
# One warning line per interval at most: a Redis outage under load would otherwise log a line per call.
WARNING_INTERVAL_SECONDS = 10.0
# The reservation script's reply codes for a refusal (0: admitted).
_REFUSAL_CODES: dict[int, LimitKind] = {1: "rate", 2: "budget"}

# Prompt estimate (estimate_prompt_tokens): OpenAI's rule of thumb of about 4 characters per token of English text;
# per message about 4 tokens of framing (3 per OpenAI's cookbook, plus the role), and 3 that prime the reply.
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
# What OpenAI charges for an image at low detail; high detail costs more, and the settle charges the real count.
IMAGE_TOKENS = 85


# Every header a limited key's answers may carry (OpenAI's names).
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{kind}-{name}" for name in ("requests", "tokens") for kind in ("limit", "remaining", "reset")
)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None means unlimited."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    tokens_per_day: int | None

    @property
    def limited(self) -> bool:
        # Asked twice per call: a plain expression, no generator.
        return not (self.requests_per_minute is None and self.tokens_per_minute is None and self.tokens_per_day is None)


@dataclass(frozen=True, slots=True)
class LimitState:
    """Where a key stands against its limits, as OpenAI reports it: "tokens" is the per-minute token limit, or the
    daily budget when that is the only token limit. Fields of a limit that is not set are None."""

    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_seconds: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_seconds: float | None

    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers (RATE_LIMIT_HEADERS), in its formats, for the limits that are set."""
        headers: dict[str, str] = {}
        for name, limit, remaining, reset in (
            ("requests", self.limit_requests, self.remaining_requests, self.reset_requests_seconds),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens_seconds),
        ):
            if limit is None or remaining is None or reset is None:
                continue
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
            headers[f"x-ratelimit-reset-{name}"] = format_reset(reset)
        return headers


UNLIMITED_STATE = LimitState(None, None, None, None, None, None)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted call's reservation: what `settle` needs to correct the windows it was charged to.

    `day_window` is the UTC date as days since 1970-01-01. `charged_by` says which store holds the charge; None
    means nothing was charged (the key is unlimited) and settling it does nothing.
    """

    key_name: str
    minute_window: int
    day_window: int
    tokens: int
    state: LimitState
    charged_by: ChargedBy | None


# The name is the contract callers catch (core/llm/accounting.py); "Error" would add nothing to it.
class LimitExceeded(Exception):  # noqa: N818
    """A key is over a limit: "rate" (per minute, retry when the minute ends) or "budget" (per day, at 00:00 UTC)."""

    def __init__(self, kind: LimitKind, retry_after_seconds: int, state: LimitState) -> None:
        super().__init__(f"{kind} limit exceeded; retry after {retry_after_seconds} s")
        self.kind: LimitKind = kind
        self.retry_after_seconds = retry_after_seconds
        self.state = state


class Limiter(Protocol):
    async def reserve(self, key_name: str, limits: KeyLimits, tokens: int) -> Admission:
        """Admit and charge a call, or raise `LimitExceeded`."""
        ...

    async def settle(self, admission: Admission, actual_tokens: int) -> None:
        """Correct an admission's charge to what the call really used (never below 0)."""
        ...

    async def aclose(self) -> None: ...


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's `x-ratelimit-reset-*` headers write it (Go's): "59ms", "1s", "6m0s", "1h2m3s",
    "41.724s"; millisecond precision."""
    millis = max(0, round(seconds * MILLIS_PER_SECOND))
    if millis == 0:
        return "0s"
    if millis < MILLIS_PER_SECOND:
        return f"{millis}ms"
    hours, rest = divmod(millis, MILLIS_PER_HOUR)
    minutes, rest = divmod(rest, MILLIS_PER_MINUTE)
    whole, fraction = divmod(rest, MILLIS_PER_SECOND)
    text = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """A cheap upper-ish estimate of a prompt's tokens, to reserve before the call (the settle corrects it).

    Text counts one token per 4 characters (rounded up), each message 4 tokens of framing, the reply's priming 3.
    `content` may be a string or a list of parts: a `text` part counts its text, an `image_url` part a fixed 85
    (OpenAI's low-detail cost). Other parts (audio, files) and tool calls are not estimated: their real cost
    arrives with the answer's usage.
    """
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += _text_tokens(content)
        elif isinstance(content, Sequence):
            for part in content:
                total += _part_tokens(part)
    return total


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _part_tokens(part: object) -> int:
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return _text_tokens(part["text"])
    if kind == "image_url":
        return IMAGE_TOKENS
    return 0


class _Windows:
    """The windows that contain the instant `now` (computed once: every call asks for them several times)."""

    __slots__ = ("day", "minute", "now")

    def __init__(self, now: float) -> None:
        self.now = now
        self.minute = math.floor(now / SECONDS_PER_MINUTE)
        # Unix time has no leap seconds, so whole days since the epoch are exactly the UTC dates.
        self.day = math.floor(now / SECONDS_PER_DAY)

    @property
    def minute_reset(self) -> float:
        return (self.minute + 1) * SECONDS_PER_MINUTE - self.now

    @property
    def day_reset(self) -> float:
        return (self.day + 1) * SECONDS_PER_DAY - self.now


@dataclass(frozen=True, slots=True)
class _Usage:
    """A key's counters in the current windows."""

    requests: int
    minute_tokens: int
    day_tokens: int


def _check_tokens(tokens: int, what: str) -> None:
    if tokens < 0:
        raise ValueError(f"{what} must be >= 0, got {tokens}")


def _refusal(limits: KeyLimits, used: _Usage) -> LimitKind | None:
    """Why a call is refused, or None to admit it. The budget comes first: waiting for the next minute won't help.

    Mirrored by RESERVE_SCRIPT, which must decide the same.
    """
    if limits.tokens_per_day is not None and used.day_tokens >= limits.tokens_per_day:
        return "budget"
    if limits.requests_per_minute is not None and used.requests >= limits.requests_per_minute:
        return "rate"
    if limits.tokens_per_minute is not None and used.minute_tokens >= limits.tokens_per_minute:
        return "rate"
    return None


def _remaining(limit: int, used: int) -> int:
    return max(0, limit - used)


def _state(limits: KeyLimits, used: _Usage, windows: _Windows) -> LimitState:
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    if limits.tokens_per_minute is not None:
        limit_tokens = limits.tokens_per_minute
        remaining_tokens = _remaining(limit_tokens, used.minute_tokens)
        reset_tokens = windows.minute_reset
    elif limits.tokens_per_day is not None:
        limit_tokens = limits.tokens_per_day
        remaining_tokens = _remaining(limit_tokens, used.day_tokens)
        reset_tokens = windows.day_reset
    rpm = limits.requests_per_minute
    return LimitState(
        limit_requests=rpm,
        remaining_requests=_remaining(rpm, used.requests) if rpm is not None else None,
        reset_requests_seconds=windows.minute_reset if rpm is not None else None,
        limit_tokens=limit_tokens,
        remaining_tokens=remaining_tokens,
        reset_tokens_seconds=reset_tokens,
    )


def _exceeded(kind: LimitKind, limits: KeyLimits, used: _Usage, windows: _Windows) -> LimitExceeded:
    reset = windows.day_reset if kind == "budget" else windows.minute_reset
    retry_after = max(MIN_RETRY_AFTER_SECONDS, math.ceil(reset))
    return LimitExceeded(kind, retry_after, _state(limits, used, windows))


def _unlimited(key_name: str, tokens: int, windows: _Windows) -> Admission:
    # Nothing to enforce: no counters to keep (the ledger and metrics count usage), no store to ask.
    return Admission(key_name, windows.minute, windows.day, tokens, UNLIMITED_STATE, charged_by=None)


@dataclass(slots=True)
class _MinuteCounter:
    requests: int = 0
    tokens: int = 0


class MemoryLimiter:
    """Limits for one process. No awaits inside `reserve`, so on one event loop it is atomic by construction.

    Only the current windows are kept: older ones are dropped when the clock enters a new window (a settle for a
    window that ended has nothing left to correct), so memory grows with the number of keys, not with time.
    """

    def __init__(self, *, clock: Clock = time.time) -> None:
        self._clock = clock
        self._minutes: dict[tuple[str, int], _MinuteCounter] = {}
        self._days: dict[tuple[str, int], int] = {}
        self._current_minute: int | None = None
        self._current_day: int | None = None

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def tracked_windows(self) -> int:
        """How many window counters are held (bounded: the current windows of the keys seen in them)."""
        return len(self._minutes) + len(self._days)

    async def reserve(self, key_name: str, limits: KeyLimits, tokens: int) -> Admission:
        _check_tokens(tokens, "tokens")
        windows = _Windows(self._clock())
        if not limits.limited:
            return _unlimited(key_name, tokens, windows)
        self._prune(windows)
        minute = self._minutes.setdefault((key_name, windows.minute), _MinuteCounter())
        day_key = (key_name, windows.day)
        used = _Usage(minute.requests, minute.tokens, self._days.get(day_key, 0))
        refusal = _refusal(limits, used)
        if refusal is not None:
            raise _exceeded(refusal, limits, used, windows)
        minute.requests += 1
        minute.tokens += tokens
        self._days[day_key] = used.day_tokens + tokens
        charged = _Usage(minute.requests, minute.tokens, self._days[day_key])
        return Admission(
            key_name, windows.minute, windows.day, tokens, _state(limits, charged, windows), charged_by="memory"
        )

    async def settle(self, admission: Admission, actual_tokens: int) -> None:
        _check_tokens(actual_tokens, "actual_tokens")
        delta = actual_tokens - admission.tokens
        if admission.charged_by is None or delta == 0:
            return
        minute = self._minutes.get((admission.key_name, admission.minute_window))
        if minute is not None:
            minute.tokens = max(0, minute.tokens + delta)
        day_key = (admission.key_name, admission.day_window)
        if day_key in self._days:
            self._days[day_key] = max(0, self._days[day_key] + delta)

    async def aclose(self) -> None:
        self._minutes.clear()
        self._days.clear()

    def _prune(self, windows: _Windows) -> None:
        if windows.minute != self._current_minute:
            self._minutes = {key: counter for key, counter in self._minutes.items() if key[1] >= windows.minute}
            self._current_minute = windows.minute
        if windows.day != self._current_day:
            self._days = {key: tokens for key, tokens in self._days.items() if key[1] >= windows.day}
            self._current_day = windows.day


# Check and charge in one step, so no other call can slip in between (Redis runs a script atomically).
# KEYS[1]: the minute window, a hash {requests, tokens}; KEYS[2]: the day window, a counter of tokens.
# ARGV: requests_per_minute, tokens_per_minute, tokens_per_day (-1: unlimited), tokens, minute TTL, day TTL.
# Reply: {code (0 admitted, 1 rate, 2 budget), requests, minute tokens, day tokens}, after charging if admitted.
# Decides like `_refusal`: the budget first.
RESERVE_SCRIPT = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tpd = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local requests = tonumber(redis.call('HGET', KEYS[1], 'requests') or 0)
local minute_tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or 0)
local day_tokens = tonumber(redis.call('GET', KEYS[2]) or 0)
if tpd >= 0 and day_tokens >= tpd then
  return {2, requests, minute_tokens, day_tokens}
end
if (rpm >= 0 and requests >= rpm) or (tpm >= 0 and minute_tokens >= tpm) then
  return {1, requests, minute_tokens, day_tokens}
end
requests = redis.call('HINCRBY', KEYS[1], 'requests', 1)
minute_tokens = redis.call('HINCRBY', KEYS[1], 'tokens', tokens)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
day_tokens = redis.call('INCRBY', KEYS[2], tokens)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
return {0, requests, minute_tokens, day_tokens}
"""

# Move a charge by ARGV[1] tokens (negative: a refund), never below 0. A window key that has expired is left
# alone: recreating it would leave a key without an expiry, for a window nobody checks any more.
SETTLE_SCRIPT = """
local delta = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[1], 'tokens', delta) < 0 then
    redis.call('HSET', KEYS[1], 'tokens', 0)
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('INCRBY', KEYS[2], delta) < 0 then
    redis.call('SET', KEYS[2], 0, 'KEEPTTL')
  end
end
return 1
"""

_UNLIMITED_ARG = -1


class RedisLimiter:
    """Limits shared by every worker and instance through Redis; when Redis fails, the `fallback`'s.

    A failed or slow Redis never refuses a call and never holds one up longer than REDIS_TIMEOUT_SECONDS: the call
    is reserved with the fallback (limits then hold per process), `on_redis_error` is called for the failed attempt
    and a warning logged (at most one line per WARNING_INTERVAL_SECONDS). Calls in the next
    REDIS_RETRY_INTERVAL_SECONDS go straight to the fallback; then Redis is tried again, and used again as soon as
    it answers. A settle goes wherever its admission was charged. Windows come from the fallback's clock, so both
    always agree; across instances they agree as far as the hosts' clocks do (NTP).
    """

    def __init__(
        self,
        url: str,
        *,
        fallback: MemoryLimiter,
        on_redis_error: Callable[[], None] | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        # Imported here, not with the module: a service without REDIS_URL never loads redis-py (~6 MiB per process).
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        # OSError covers asyncio's TimeoutError and socket errors.
        self._redis_errors: tuple[type[Exception], ...] = (RedisError, OSError)
        # No retries inside redis-py: a retry is another timeout to wait out, and the fallback is right here.
        self._redis = Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self._reserve_script = self._redis.register_script(RESERVE_SCRIPT)
        self._settle_script = self._redis.register_script(SETTLE_SCRIPT)
        self._fallback = fallback
        self._clock = fallback.clock
        self._on_redis_error = on_redis_error
        self._key_prefix = key_prefix
        self._skip_redis_until = 0.0
        self._degraded = False
        self._warned_at: float | None = None
        self._suppressed_warnings = 0

    async def reserve(self, key_name: str, limits: KeyLimits, tokens: int) -> Admission:
        _check_tokens(tokens, "tokens")
        windows = _Windows(self._clock())
        if not limits.limited:
            return _unlimited(key_name, tokens, windows)
        if time.monotonic() >= self._skip_redis_until:
            args = [
                _arg(limits.requests_per_minute),
                _arg(limits.tokens_per_minute),
                _arg(limits.tokens_per_day),
                tokens,
                MINUTE_KEY_TTL_SECONDS,
                DAY_KEY_TTL_SECONDS,
            ]
            keys = self._keys(key_name, windows.minute, windows.day)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                    reply = await self._reserve_script(keys=keys, args=args)
            except self._redis_errors as exc:
                self._redis_failed(exc)
            else:
                self._redis_answered()
                code, requests, minute_tokens, day_tokens = (int(value) for value in reply)
                used = _Usage(requests, minute_tokens, day_tokens)
                refusal = _REFUSAL_CODES.get(code)
                if refusal is not None:
                    raise _exceeded(refusal, limits, used, windows)
                return Admission(
                    key_name, windows.minute, windows.day, tokens, _state(limits, used, windows), charged_by="redis"
                )
        return await self._fallback.reserve(key_name, limits, tokens)

    async def settle(self, admission: Admission, actual_tokens: int) -> None:
        _check_tokens(actual_tokens, "actual_tokens")
        if admission.charged_by == "memory":
            await self._fallback.settle(admission, actual_tokens)
            return
        delta = actual_tokens - admission.tokens
        # While Redis is known to be down, the correction is dropped rather than waited for: the reservation
        # stays charged until its window ends, which errs on the safe side for the key's limits.
        if admission.charged_by is None or delta == 0 or time.monotonic() < self._skip_redis_until:
            return
        keys = self._keys(admission.key_name, admission.minute_window, admission.day_window)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._settle_script(keys=keys, args=[delta])
        except self._redis_errors as exc:
            self._redis_failed(exc)
        else:
            self._redis_answered()

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._fallback.aclose()

    def _keys(self, key_name: str, minute: int, day: int) -> list[str]:
        # The key name in braces is a Redis Cluster hash tag: both keys of one script live in the same slot.
        date = datetime.fromtimestamp(day * SECONDS_PER_DAY, UTC).date().isoformat()
        base = f"{self._key_prefix}{{{key_name}}}"
        return [f"{base}:m:{minute}", f"{base}:d:{date}"]

    def _redis_failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._skip_redis_until = now + REDIS_RETRY_INTERVAL_SECONDS
        self._degraded = True
        if self._on_redis_error is not None:
            self._on_redis_error()
        if self._warned_at is not None and now - self._warned_at < WARNING_INTERVAL_SECONDS:
            self._suppressed_warnings += 1
            return
        log.warning(
            "limits_redis_unavailable",
            error=type(exc).__name__,
            detail=str(exc) or repr(exc),
            fallback="per-process limits until Redis answers",
            suppressed=self._suppressed_warnings,
        )
        self._warned_at = now
        self._suppressed_warnings = 0

    def _redis_answered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("limits_redis_recovered")


def _arg(limit: int | None) -> int:
    return _UNLIMITED_ARG if limit is None else limit


def build_limiter(redis_url: str | None, *, on_redis_error: Callable[[], None] | None = None) -> Limiter:
    """Redis-backed limits when a URL is configured (shared by workers and instances), else per-process ones."""
    if redis_url is None:
        return MemoryLimiter()
    return RedisLimiter(redis_url, fallback=MemoryLimiter(), on_redis_error=on_redis_error)
