"""Buffers of resumable streams: the events of a stream by their ids (1, 2, 3, ...), kept after it ends for a TTL.

    MemoryStreamBuffers   one process: bounded per stream (by the producer) and in total (oldest evicted first)
    RedisStreamBuffers    every instance: one Redis Stream per stream (`XADD` with entry id `0-N` for event N, a TTL
                          refreshed on each event, blocking `XREAD` to follow), plus a hash with the owner and the
                          number of resumes, and a pub/sub channel that carries stop requests to the producing
                          instance

A reader follows a buffer from an event id: it gets every event after it, then waits for new ones, and ends after
the stream's final event (`done` or `error`). Events are stored as their name and JSON (`BufferedEvent`), so
replaying them needs no model: api/sse.py frames them as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("resume")

FINAL_EVENT_NAMES = frozenset({"done", "error"})
KEY_PREFIX = "llm:stream:"
STOP_CHANNEL = "llm:stream-stop"
# A blocking read waits this long before checking that its stream still exists (it may have expired) and that its
# producer is alive (it beats every HEARTBEAT_SECONDS while the upstream is silent).
FOLLOW_BLOCK_MS = 5_000
HEARTBEAT_SECONDS = FOLLOW_BLOCK_MS / 1000
# A reader gives up (`resume_unavailable`) when the producer's heartbeat has not moved for this many blocking reads:
# the instance producing the stream died.
SILENT_READS_BEFORE_GIVING_UP = 4
READ_BATCH = 256
# Readers hold a connection for each blocking read: their own pool, so that they can never starve the producers'
# writes, bounded so that a flood of readers gets `resume_unavailable` instead of exhausting Redis's clients.
READER_CONNECTIONS = 2_000
# Non-blocking Redis commands must answer within this; past it Redis counts as down for that command.
REDIS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class BufferedEvent:
    """One event of a stream as it goes on the wire: its name (`delta`, `refusal`, `done`, `error`) and JSON."""

    name: str
    data: str

    @property
    def final(self) -> bool:
        return self.name in FINAL_EVENT_NAMES

    @property
    def size(self) -> int:
        """Bytes, as stored (UTF-8): what the caps count."""
        return len(self.name) + len(self.data.encode())


class StreamGoneError(Exception):
    """The stream's buffer is no longer kept: it expired, or was evicted to stay under the total cap."""


class BuffersUnavailableError(Exception):
    """The buffers' store (Redis) failed."""


class StreamBuffers(Protocol):
    async def create(self, stream_id: str, *, owner: str) -> None: ...

    async def append(self, stream_id: str, event_id: int, event: BufferedEvent) -> bool:
        """Add event `event_id` (one more than the last); True when a stop was asked through the store (on another
        instance). Raises `StreamGoneError` when the buffer is no longer kept."""

    def follow(self, stream_id: str, *, after: int) -> AsyncIterator[BufferedEvent]:
        """Every event after `after`, then new ones as they come, until the final one; `StreamGoneError` if it goes."""

    async def owner(self, stream_id: str) -> str | None:
        """Who started the stream (a key's name), or None when no such stream is kept."""

    async def note_resume(self, stream_id: str) -> None: ...

    async def resumes(self, stream_id: str) -> int: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Buffer:
    owner: str
    events: list[BufferedEvent] = field(default_factory=list)
    size: int = 0
    ended_at: float | None = None
    resumes: int = 0
    gone: bool = False
    # Set (and replaced) whenever the buffer changes, to wake its followers.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class MemoryStreamBuffers:
    """Buffers in this process's memory, at most `total_bytes` of events in all; a buffer is kept `ttl_seconds`
    after its stream ended. Over the cap, the buffers touched longest ago are evicted first (and logged)."""

    def __init__(self, *, ttl_seconds: float, total_bytes: int, clock: Callable[[], float] | None = None) -> None:
        self._ttl = ttl_seconds
        self._total_cap = total_bytes
        self._clock = clock or _loop_time
        self._total = 0
        # Least recently touched first: expiry and eviction both start from the front.
        self._buffers: OrderedDict[str, _Buffer] = OrderedDict()

    @property
    def total_bytes(self) -> int:
        return self._total

    async def create(self, stream_id: str, *, owner: str) -> None:
        self._expire()
        self._buffers[stream_id] = _Buffer(owner=owner)

    async def append(self, stream_id: str, event_id: int, event: BufferedEvent) -> bool:
        buffer = self._buffers.get(stream_id)
        if buffer is None or buffer.gone:
            raise StreamGoneError(stream_id)
        buffer.events.append(event)
        buffer.size += event.size
        self._total += event.size
        if event.final:
            buffer.ended_at = self._clock()
        self._buffers.move_to_end(stream_id)
        buffer.wake()
        if self._total > self._total_cap:
            self._evict(keep=stream_id)
        # A stop asked in this process reaches its producer directly, never through the buffer.
        return False

    async def follow(self, stream_id: str, *, after: int) -> AsyncGenerator[BufferedEvent, None]:
        buffer = self._buffers.get(stream_id)
        position = after
        while True:
            if buffer is None or buffer.gone:
                raise StreamGoneError(stream_id)
            changed = buffer.changed
            while position < len(buffer.events):
                event = buffer.events[position]
                position += 1
                yield event
                if event.final:
                    return
            if buffer.gone:
                raise StreamGoneError(stream_id)
            if buffer.ended_at is not None:
                # Resumed after the final event: nothing more will come.
                return
            await changed.wait()

    async def owner(self, stream_id: str) -> str | None:
        self._expire()
        buffer = self._buffers.get(stream_id)
        return None if buffer is None else buffer.owner

    async def note_resume(self, stream_id: str) -> None:
        buffer = self._buffers.get(stream_id)
        if buffer is not None:
            buffer.resumes += 1

    async def resumes(self, stream_id: str) -> int:
        buffer = self._buffers.get(stream_id)
        return 0 if buffer is None else buffer.resumes

    async def aclose(self) -> None:
        self._buffers.clear()
        self._total = 0

    def _expire(self) -> None:
        """Drop the buffers of streams that ended more than the TTL ago."""
        deadline = self._clock() - self._ttl
        expired = [
            stream_id
            for stream_id, buffer in self._buffers.items()
            if buffer.ended_at is not None and buffer.ended_at <= deadline
        ]
        for stream_id in expired:
            self._drop(stream_id)

    def _evict(self, *, keep: str) -> None:
        for stream_id in list(self._buffers):
            if self._total <= self._total_cap:
                return
            if stream_id == keep:
                continue
            buffer = self._buffers[stream_id]
            log.warning(
                "resume_buffer_evicted",
                stream_id=stream_id,
                bytes=buffer.size,
                live=buffer.ended_at is None,
                total_cap_bytes=self._total_cap,
            )
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        buffer = self._buffers.pop(stream_id)
        self._total -= buffer.size
        buffer.gone = True
        buffer.events.clear()
        buffer.wake()


class RedisStreamBuffers:
    """Buffers in Redis, shared by every worker and instance; the TTL is refreshed by each event and heartbeat."""

    def __init__(self, url: str, *, ttl_seconds: float, block_ms: int = FOLLOW_BLOCK_MS) -> None:
        # Imported here, not with the module: a service without REDIS_URL never loads redis-py.
        from redis.asyncio import ConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._errors: tuple[type[Exception], ...] = (RedisError, OSError)
        # No socket timeout (redis-py's default is 5 s, as long as a blocking read): every command is bounded by
        # asyncio.timeout instead, the blocking reads a little longer than they block.
        options: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
        }
        self._redis: Redis = Redis.from_url(url, **options)
        self._reads: Redis = Redis.from_pool(
            ConnectionPool.from_url(url, max_connections=READER_CONNECTIONS, **options)
        )
        self._ttl_ms = int(ttl_seconds * 1000)
        self._block_ms = block_ms

    async def create(self, stream_id: str, *, owner: str) -> None:
        meta = _meta_key(stream_id)
        async with self._command():
            pipeline = self._redis.pipeline(transaction=False)
            pipeline.hset(meta, mapping={"owner": owner, "resumes": 0, "beat": 0})
            pipeline.pexpire(meta, self._ttl_ms)
            await pipeline.execute()

    async def append(self, stream_id: str, event_id: int, event: BufferedEvent) -> bool:
        key, meta = _events_key(stream_id), _meta_key(stream_id)
        async with self._command():
            pipeline = self._redis.pipeline(transaction=False)
            pipeline.xadd(key, {"n": event.name, "d": event.data}, id=f"0-{event_id}")
            pipeline.pexpire(key, self._ttl_ms)
            pipeline.pexpire(meta, self._ttl_ms)
            pipeline.hget(meta, "stop")
            _, _, meta_kept, stop = await pipeline.execute()
        if not meta_kept:
            raise StreamGoneError(stream_id)
        if event.final:
            # Only once the hash is known to exist, so that this write cannot recreate it without a TTL.
            async with self._command():
                pipeline = self._redis.pipeline(transaction=False)
                pipeline.hset(meta, "final", event_id)
                pipeline.pexpire(meta, self._ttl_ms)
                await pipeline.execute()
        return stop is not None

    async def heartbeat(self, stream_id: str) -> None:
        """The producer is alive (and the stream kept), however long the upstream stays silent."""
        key, meta = _events_key(stream_id), _meta_key(stream_id)
        async with self._command():
            pipeline = self._redis.pipeline(transaction=False)
            pipeline.hincrby(meta, "beat", 1)
            pipeline.pexpire(meta, self._ttl_ms)
            pipeline.pexpire(key, self._ttl_ms)
            await pipeline.execute()

    async def follow(self, stream_id: str, *, after: int) -> AsyncGenerator[BufferedEvent, None]:
        key = _events_key(stream_id)
        last = f"0-{after}"
        last_beat: object = None
        silent_reads = 0
        # Readers use their own pool throughout (see READER_CONNECTIONS).
        async with self._command():
            final = await self._reads.hget(_meta_key(stream_id), "final")
        if final is not None and after >= int(final):
            # Resumed at or after the final event: nothing more will come.
            return
        while True:
            try:
                async with asyncio.timeout(self._block_ms / 1000 + REDIS_TIMEOUT_SECONDS):
                    reply = await self._reads.xread({key: last}, count=READ_BATCH, block=self._block_ms)
            except self._errors as exc:
                raise BuffersUnavailableError(str(exc) or type(exc).__name__) from exc
            if reply:
                silent_reads = 0
                # RESP2 (the client's protocol): [[key, [(entry id, fields), ...]]] for the one key read.
                entries = cast(list[tuple[str, dict[str, str]]], cast(list[Any], reply)[0][1])
                for entry_id, fields in entries:
                    last = entry_id
                    event = BufferedEvent(name=fields["n"], data=fields["d"])
                    yield event
                    if event.final:
                        return
                continue
            async with self._command():
                owner, final, beat = await self._reads.hmget(_meta_key(stream_id), ["owner", "final", "beat"])
            if owner is None:
                raise StreamGoneError(stream_id)
            if final is not None and int(last.split("-")[1]) >= int(final):
                # Resumed at or after the final event: nothing more will come.
                return
            silent_reads = silent_reads + 1 if beat == last_beat else 0
            last_beat = beat
            if silent_reads >= SILENT_READS_BEFORE_GIVING_UP:
                raise BuffersUnavailableError("the instance producing the stream stopped (no heartbeat)")

    async def owner(self, stream_id: str) -> str | None:
        async with self._command():
            owner = await self._redis.hget(_meta_key(stream_id), "owner")
        return None if owner is None else str(owner)

    async def note_resume(self, stream_id: str) -> None:
        async with self._command():
            pipeline = self._redis.pipeline(transaction=False)
            pipeline.hincrby(_meta_key(stream_id), "resumes", 1)
            pipeline.pexpire(_meta_key(stream_id), self._ttl_ms)
            await pipeline.execute()

    async def resumes(self, stream_id: str) -> int:
        async with self._command():
            count = await self._redis.hget(_meta_key(stream_id), "resumes")
        return int(count or 0)

    async def request_stop(self, stream_id: str) -> None:
        """Ask the instance producing `stream_id` to stop it: at once by pub/sub, and, should that message be lost
        (its listener reconnecting), at its next event by the flag in the stream's hash."""
        meta = _meta_key(stream_id)
        async with self._command():
            pipeline = self._redis.pipeline(transaction=False)
            pipeline.hset(meta, "stop", 1)
            pipeline.pexpire(meta, self._ttl_ms)
            pipeline.publish(STOP_CHANNEL, stream_id)
            await pipeline.execute()

    async def stop_requests(self) -> AsyncIterator[str]:
        """Stream ids whose stop was requested on any instance, until Redis fails (`BuffersUnavailableError`)."""
        try:
            async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(STOP_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield str(message["data"])
        except self._errors as exc:
            raise BuffersUnavailableError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self._reads.aclose()
        await self._redis.aclose()

    @contextlib.asynccontextmanager
    async def _command(self) -> AsyncIterator[None]:
        """One Redis command, bounded in time; its failures become `BuffersUnavailableError`."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                yield
        except self._errors as exc:  # asyncio's TimeoutError is an OSError
            raise BuffersUnavailableError(str(exc) or type(exc).__name__) from exc


def _events_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}{stream_id}"


def _meta_key(stream_id: str) -> str:
    return f"{KEY_PREFIX}{stream_id}:meta"


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
