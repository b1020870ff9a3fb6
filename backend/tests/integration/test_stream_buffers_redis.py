"""The Redis buffers of resumable streams against the real Redis at TEST_REDIS_URL (skipped on a laptop without
one, never under CI): silences longer than a blocking read, many readers at once, a dead producer, the stop flag,
resumes after the end, and TTLs that stay set."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from src.core.stream_buffers import (
    SILENT_READS_BEFORE_GIVING_UP,
    BufferedEvent,
    BuffersUnavailableError,
    RedisStreamBuffers,
)

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"
TTL_SECONDS = 60
FAST_BLOCK_MS = 100
DELTA = BufferedEvent(name="delta", data='{"content":"x"}')
DONE = BufferedEvent(name="done", data="{}")


@pytest.fixture
async def redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL
    client = redis_asyncio.Redis.from_url(url, socket_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        message = f"redis is not reachable at {url} ({exc}): start it, or point TEST_REDIS_URL at one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        await client.aclose()
    return url


def _stream_id() -> str:
    return secrets.token_hex(16)


async def _next(events: AsyncIterator[BufferedEvent], timeout: float) -> BufferedEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def test_a_reader_outlasts_a_silence_longer_than_redis_pys_socket_timeout(redis_url: str) -> None:
    # The real blocking time (5 s, as long as redis-py's default socket timeout): a silent upstream must not end
    # the readers with `resume_unavailable`.
    buffers = RedisStreamBuffers(redis_url, ttl_seconds=TTL_SECONDS)
    stream_id = _stream_id()
    try:
        await buffers.create(stream_id, owner="k")
        events = buffers.follow(stream_id, after=0)
        waiting = asyncio.ensure_future(_next(events, timeout=20))
        await asyncio.sleep(6.5)  # the silence under test, not a synchronisation
        assert not waiting.done()
        await buffers.append(stream_id, 1, DELTA)
        assert await waiting == DELTA
        await events.aclose()
    finally:
        await buffers.aclose()


async def test_many_readers_never_starve_the_producers_writes(redis_url: str) -> None:
    buffers = RedisStreamBuffers(redis_url, ttl_seconds=TTL_SECONDS, block_ms=FAST_BLOCK_MS)
    stream_id = _stream_id()
    readers = 150  # more than redis-py's default pool of 100 connections
    try:
        await buffers.create(stream_id, owner="k")

        async def read_all() -> list[BufferedEvent]:
            return [event async for event in buffers.follow(stream_id, after=0)]

        tasks = [asyncio.ensure_future(read_all()) for _ in range(readers)]
        await buffers.append(stream_id, 1, DELTA)
        await buffers.append(stream_id, 2, DONE)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        assert all(result == [DELTA, DONE] for result in results)
    finally:
        await buffers.aclose()


async def test_a_reader_gives_up_when_the_producer_stops_beating_and_waits_while_it_beats(redis_url: str) -> None:
    buffers = RedisStreamBuffers(redis_url, ttl_seconds=TTL_SECONDS, block_ms=FAST_BLOCK_MS)
    stream_id = _stream_id()
    try:
        await buffers.create(stream_id, owner="k")
        events = buffers.follow(stream_id, after=0)
        waiting = asyncio.ensure_future(_next(events, timeout=20))
        # A live producer: heartbeats through a silence many reads long, then an event.
        for _ in range(SILENT_READS_BEFORE_GIVING_UP * 3):
            await buffers.heartbeat(stream_id)
            await asyncio.sleep(FAST_BLOCK_MS / 1000)
        assert not waiting.done()
        await buffers.append(stream_id, 1, DELTA)
        assert await waiting == DELTA
        # A dead one: no heartbeat, no event.
        with pytest.raises(BuffersUnavailableError, match="no heartbeat"):
            await _next(events, timeout=20)
    finally:
        await buffers.aclose()


async def test_a_stop_asked_elsewhere_reaches_the_producer_at_its_next_event(redis_url: str) -> None:
    buffers = RedisStreamBuffers(redis_url, ttl_seconds=TTL_SECONDS, block_ms=FAST_BLOCK_MS)
    stream_id = _stream_id()
    try:
        await buffers.create(stream_id, owner="k")
        assert await buffers.append(stream_id, 1, DELTA) is False
        await buffers.request_stop(stream_id)
        assert await buffers.append(stream_id, 2, DELTA) is True
    finally:
        await buffers.aclose()


async def test_resuming_after_the_end_ends_at_once_and_ttls_stay_set(redis_url: str) -> None:
    buffers = RedisStreamBuffers(redis_url, ttl_seconds=TTL_SECONDS, block_ms=5_000)
    stream_id = _stream_id()
    client = redis_asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await buffers.create(stream_id, owner="k")
        await buffers.append(stream_id, 1, DELTA)
        await buffers.append(stream_id, 2, DONE)
        await buffers.note_resume(stream_id)
        # Nothing after the final event: the reader ends without waiting out a blocking read.
        assert await asyncio.wait_for(_collect(buffers, stream_id, after=2), timeout=1) == []
        assert await _collect(buffers, stream_id, after=1) == [DONE]
        for key in (f"llm:stream:{stream_id}", f"llm:stream:{stream_id}:meta"):
            assert 0 < await client.pttl(key) <= TTL_SECONDS * 1000
    finally:
        await client.aclose()
        await buffers.aclose()


async def _collect(buffers: RedisStreamBuffers, stream_id: str, *, after: int) -> list[BufferedEvent]:
    return [event async for event in buffers.follow(stream_id, after=after)]
