"""The in-memory buffers of resumable streams: following, the TTL, and the total cap (oldest evicted first)."""

from __future__ import annotations

import asyncio
import json

import pytest

from src.core.stream_buffers import BufferedEvent, MemoryStreamBuffers, StreamGoneError


def _delta(text: str) -> BufferedEvent:
    return BufferedEvent(name="delta", data=json.dumps({"content": text}))


DONE = BufferedEvent(name="done", data="{}")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _collect(buffers: MemoryStreamBuffers, stream_id: str, after: int) -> list[BufferedEvent]:
    return [event async for event in buffers.follow(stream_id, after=after)]


async def test_a_follower_gets_the_events_after_its_id_then_live_ones_until_the_final_one() -> None:
    buffers = MemoryStreamBuffers(ttl_seconds=60, total_bytes=10_000)
    await buffers.create("s", owner="k")
    for index, text in enumerate(["a", "b", "c"], start=1):
        await buffers.append("s", index, _delta(text))
    follower = asyncio.create_task(_collect(buffers, "s", after=1))
    await buffers.append("s", 4, _delta("d"))
    await buffers.append("s", 5, DONE)
    events = await asyncio.wait_for(follower, timeout=5)
    assert [event.data for event in events] == [_delta(text).data for text in "bcd"] + ["{}"]
    # After the end, a follower from the last id gets nothing and ends at once.
    assert await _collect(buffers, "s", after=5) == []


async def test_a_buffer_is_kept_for_the_ttl_after_its_stream_ended() -> None:
    clock = Clock()
    buffers = MemoryStreamBuffers(ttl_seconds=10, total_bytes=10_000, clock=clock)
    await buffers.create("ended", owner="k")
    await buffers.create("live", owner="k")
    await buffers.append("ended", 1, DONE)
    clock.now = 9.9
    assert await buffers.owner("ended") == "k"
    clock.now = 10.0
    assert await buffers.owner("ended") is None
    # A stream still running never expires (its producer is reading the upstream).
    assert await buffers.owner("live") == "k"
    with pytest.raises(StreamGoneError):
        await buffers.append("ended", 2, DONE)


async def test_over_the_total_cap_the_least_recently_used_buffers_are_evicted_and_followers_told() -> None:
    event = _delta("x" * 100)
    buffers = MemoryStreamBuffers(ttl_seconds=60, total_bytes=event.size * 3)
    for stream_id in ("old", "mid", "new"):
        await buffers.create(stream_id, owner="k")
        await buffers.append(stream_id, 1, event)
    follower = asyncio.create_task(_collect(buffers, "old", after=1))
    await buffers.append("new", 2, event)  # one event over the cap: the oldest goes
    with pytest.raises(StreamGoneError):
        await asyncio.wait_for(follower, timeout=5)
    assert await buffers.owner("old") is None
    assert await buffers.owner("mid") == "k"
    assert buffers.total_bytes == event.size * 3
    with pytest.raises(StreamGoneError):
        await buffers.append("old", 2, event)


async def test_resumes_are_counted_per_stream() -> None:
    buffers = MemoryStreamBuffers(ttl_seconds=60, total_bytes=10_000)
    await buffers.create("s", owner="k")
    await buffers.note_resume("s")
    await buffers.note_resume("s")
    assert await buffers.resumes("s") == 2
    assert await buffers.resumes("unknown") == 0


async def test_a_finished_buffer_evicted_mid_replay_ends_its_reader_with_stream_gone_not_silently() -> None:
    event = _delta("y" * 100)
    buffers = MemoryStreamBuffers(ttl_seconds=60, total_bytes=event.size * 2 + DONE.size)
    await buffers.create("finished", owner="k")
    await buffers.append("finished", 1, event)
    await buffers.append("finished", 2, event)
    await buffers.append("finished", 3, DONE)
    replay = buffers.follow("finished", after=0)
    assert await anext(replay) == event
    await buffers.create("new", owner="k")
    await buffers.append("new", 1, event)  # over the cap: the finished buffer is evicted mid-replay
    with pytest.raises(StreamGoneError):
        await anext(replay)


def test_sizes_count_utf8_bytes() -> None:
    assert BufferedEvent(name="delta", data="日本").size == len("delta") + 6
