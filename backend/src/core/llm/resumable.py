"""Resumable streams: a chat stream that outlives its connection, resumed by id and `Last-Event-ID`, or stopped.

A resumable stream is read to its end by a producer task of this process, not by the response that asked for it:
each event goes into the stream's buffer (core/stream_buffers.py) under its id, and every reader (the first
connection and any resume, here or on another instance when the buffers are in Redis) follows the buffer. So a
client that leaves costs nothing but its connection: the answer keeps coming, and the call is logged and accounted
once, by the producer, with the number of resumes.

Stopping a stream cancels its producer, which closes the upstream and ends the buffer with `done`
(`finish_reason: "cancelled"`); a stop asked on another instance reaches the producer through Redis pub/sub. At the
end of the shutdown grace, producers end their streams with `server_shutting_down`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from src.core.config import Settings
from src.core.errors import ErrorCode, ServiceError
from src.core.llm.relay import ChatStream, StreamEnd
from src.core.shutdown import Drain
from src.core.stream_buffers import (
    HEARTBEAT_SECONDS,
    BufferedEvent,
    BuffersUnavailableError,
    MemoryStreamBuffers,
    RedisStreamBuffers,
    StreamBuffers,
    StreamGoneError,
)
from src.models.llm import EVENT_NAMES, StreamError, StreamEvent

log = structlog.get_logger("resume")

_STREAM_ID = re.compile(r"[0-9a-f]{32}")
# Stop requests reach a producer through Redis; when Redis fails, listening starts again after this.
STOP_LISTEN_RETRY_SECONDS = 1.0
GONE_MESSAGE = "The stream is no longer kept (LLM_RESUME_TTL_SECONDS, or evicted to stay under its memory cap)."
UNAVAILABLE_MESSAGE = "The store of resumable streams (Redis) failed; start the request again."
FOLLOWER_SHUTDOWN_MESSAGE = (
    "The service is shutting down; resume the stream on another instance with the last event id you received."
)
BUFFER_FULL_MESSAGE = "The answer outgrew LLM_RESUME_MAX_BYTES, the buffer kept for resuming it; it was stopped."


def stream_not_found() -> ServiceError:
    return ServiceError(
        ErrorCode.STREAM_NOT_FOUND,
        "No such stream: unknown, expired, or started with another key.",
        status_code=404,
    )


def buffered(event: StreamEvent) -> BufferedEvent:
    return BufferedEvent(name=EVENT_NAMES[type(event)], data=event.model_dump_json())


@dataclass(slots=True)
class _Producer:
    stream: ChatStream
    buffers: StreamBuffers
    stop_reason: StreamEnd | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def stop(self, reason: StreamEnd) -> None:
        """Cancel the producer once; the first reason given is the one it ends with."""
        if self.stop_reason is None and self.task is not None and not self.task.done():
            self.stop_reason = reason
            self.task.cancel()


class StreamFollower:
    """One reader of a resumable stream: the events after `after`, in order, until the stream's final one."""

    resumable = True

    def __init__(self, buffers: StreamBuffers, stream_id: str, *, request_id: str, after: int) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self.first_event_id = after + 1
        self._buffers = buffers
        self._after = after
        self._events = self._follow()

    def __aiter__(self) -> AsyncIterator[BufferedEvent | StreamEvent]:
        return self._events

    def shutdown_event(self) -> StreamError:
        """This connection's last event when this instance shuts down: the stream itself may go on elsewhere."""
        return StreamError(
            code=ErrorCode.SERVER_SHUTTING_DOWN, message=FOLLOWER_SHUTDOWN_MESSAGE, request_id=self.request_id
        )

    async def aclose(self, *, end: StreamEnd = StreamEnd.DELIVERED) -> None:
        """Only this reader ends: the stream goes on for its producer and other readers."""
        await self._events.aclose()

    async def _follow(self) -> AsyncGenerator[BufferedEvent | StreamEvent, None]:
        try:
            async for event in self._buffers.follow(self.stream_id, after=self._after):
                yield event
        except StreamGoneError:
            yield StreamError(code=ErrorCode.STREAM_NOT_FOUND, message=GONE_MESSAGE, request_id=self.request_id)
        except BuffersUnavailableError as exc:
            log.warning("resume_follow_failed", stream_id=self.stream_id, error=str(exc))
            yield StreamError(
                code=ErrorCode.RESUME_UNAVAILABLE, message=UNAVAILABLE_MESSAGE, request_id=self.request_id
            )


class ResumableStreams:
    """The resumable streams this process produces, and the way to every stream's buffer (here or in Redis)."""

    def __init__(
        self,
        *,
        local: MemoryStreamBuffers,
        shared: RedisStreamBuffers | None,
        drain: Drain,
        max_stream_bytes: int,
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self._local = local
        self._shared = shared
        self._drain = drain
        self._max_stream_bytes = max_stream_bytes
        self._on_redis_error = on_redis_error
        self._producers: dict[str, _Producer] = {}
        self._listener: asyncio.Task[None] | None = None

    def start_listening(self) -> None:
        """Follow stop requests made on other instances (only with Redis)."""
        if self._shared is not None and self._listener is None:
            self._listener = asyncio.create_task(self._listen_for_stops(self._shared))

    async def start(self, stream: ChatStream, *, owner: str) -> StreamFollower:
        """Hand `stream` to a producer task; the caller reads it, like anyone resuming it, through a follower."""
        buffers = await self._create(stream.stream_id, owner)
        producer = _Producer(stream=stream, buffers=buffers)
        self._producers[stream.stream_id] = producer
        producer.task = asyncio.create_task(self._produce(producer))
        return StreamFollower(buffers, stream.stream_id, request_id=stream.request_id, after=0)

    async def resume(self, stream_id: str, *, owner: str, after: int, request_id: str) -> StreamFollower:
        buffers = await self._locate(stream_id, owner)
        try:
            await buffers.note_resume(stream_id)
        except BuffersUnavailableError as exc:
            self._redis_failed("resume_count_failed", exc)
        return StreamFollower(buffers, stream_id, request_id=request_id, after=after)

    async def stop(self, stream_id: str, *, owner: str) -> None:
        """Stop a stream wherever it is produced; a stream that already ended stays as it is."""
        await self._locate(stream_id, owner)
        producer = self._producers.get(stream_id)
        if producer is not None:
            producer.stop(StreamEnd.STOPPED)
            return
        if self._shared is not None:
            try:
                await self._shared.request_stop(stream_id)
            except BuffersUnavailableError as exc:
                self._redis_failed("resume_stop_failed", exc)
                raise ServiceError(ErrorCode.RESUME_UNAVAILABLE, UNAVAILABLE_MESSAGE, status_code=503) from exc

    async def aclose(self) -> None:
        """At shutdown: producers finish within what is left of the grace, then end with `server_shutting_down`."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        tasks = [producer.task for producer in self._producers.values() if producer.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self._drain.grace_seconds)
            for producer in list(self._producers.values()):
                producer.stop(StreamEnd.SHUTDOWN)
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._local.aclose()
        if self._shared is not None:
            await self._shared.aclose()

    async def _create(self, stream_id: str, owner: str) -> StreamBuffers:
        """The stream's buffer: in Redis when configured (this process's memory when Redis fails), else here."""
        if self._shared is not None:
            try:
                await self._shared.create(stream_id, owner=owner)
            except BuffersUnavailableError as exc:
                self._redis_failed("resume_redis_unavailable", exc, fallback="this process's memory")
            else:
                return self._shared
        await self._local.create(stream_id, owner=owner)
        return self._local

    async def _locate(self, stream_id: str, owner: str) -> StreamBuffers:
        """The buffers holding `stream_id` for `owner`; 404 for any other key, as for a stream that never was."""
        if not _STREAM_ID.fullmatch(stream_id):
            raise stream_not_found()
        stores: list[StreamBuffers] = [self._local] if self._shared is None else [self._local, self._shared]
        for buffers in stores:
            try:
                found = await buffers.owner(stream_id)
            except BuffersUnavailableError as exc:
                self._redis_failed("resume_lookup_failed", exc)
                raise ServiceError(ErrorCode.RESUME_UNAVAILABLE, UNAVAILABLE_MESSAGE, status_code=503) from exc
            if found is not None:
                if found != owner:
                    break
                return buffers
        raise stream_not_found()

    async def _produce(self, producer: _Producer) -> None:
        stream, buffers = producer.stream, producer.buffers
        stream_id = stream.stream_id
        last_id = 0
        size = 0
        # Until the stream ends a known way: an end nobody reads (the loop itself cancelled).
        end = StreamEnd.CLIENT_GONE
        unsubscribe = self._drain.subscribe(lambda: producer.stop(StreamEnd.SHUTDOWN))
        beating = (
            asyncio.create_task(self._beat(buffers, stream_id)) if isinstance(buffers, RedisStreamBuffers) else None
        )
        try:
            async for event in stream:
                entry = buffered(event)
                size += entry.size
                if size > self._max_stream_bytes and not entry.final:
                    end = StreamEnd.BUFFER_FULL
                    break
                last_id += 1
                stop_asked = await buffers.append(stream_id, last_id, entry)
                if stop_asked and not entry.final:
                    # A stop asked on another instance whose pub/sub message did not reach us.
                    end = StreamEnd.STOPPED
                    break
            else:
                end = StreamEnd.DELIVERED
        except asyncio.CancelledError:
            if producer.stop_reason is None:
                raise
            # Our own stop: handled here, so the task is no longer being cancelled.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            end = producer.stop_reason
        except StreamGoneError:
            # Evicted or expired: nobody can read the stream any more, so stop paying for it.
            log.warning("resume_buffer_lost", stream_id=stream_id)
            end = StreamEnd.CLIENT_GONE
        except BuffersUnavailableError as exc:
            self._redis_failed("resume_append_failed", exc, stream_id=stream_id)
            end = StreamEnd.BUFFER_LOST
        except Exception:
            log.exception("resume_producer_failed", stream_id=stream_id)
            end = StreamEnd.BUFFER_LOST
        finally:
            unsubscribe()
            if beating is not None:
                beating.cancel()
            del self._producers[stream_id]
            await self._close(stream, buffers, end=end, last_id=last_id)

    async def _close(self, stream: ChatStream, buffers: StreamBuffers, *, end: StreamEnd, last_id: int) -> None:
        """Close the upstream and account the call (once, with its resumes), then end the buffer if the stream did
        not end it itself, so that no reader waits for an event that will never come."""
        try:
            stream.note_resumes(await buffers.resumes(stream.stream_id))
        except BuffersUnavailableError as exc:
            self._redis_failed("resume_count_failed", exc)
        await stream.aclose(end=end)
        last_event = self._last_event(stream, end)
        if last_event is None:
            return
        try:
            await buffers.append(stream.stream_id, last_id + 1, buffered(last_event))
        except (StreamGoneError, BuffersUnavailableError) as exc:
            log.warning("resume_last_event_lost", stream_id=stream.stream_id, error=type(exc).__name__)

    async def _beat(self, buffers: RedisStreamBuffers, stream_id: str) -> None:
        """Tell readers on other instances that this producer is alive while the upstream is silent."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await buffers.heartbeat(stream_id)
            except BuffersUnavailableError as exc:
                self._redis_failed("resume_heartbeat_failed", exc, stream_id=stream_id)

    @staticmethod
    def _last_event(stream: ChatStream, end: StreamEnd) -> StreamEvent | None:
        """The final event of a stream that did not end by itself (it ended with its own otherwise)."""
        if end is StreamEnd.STOPPED:
            return stream.stopped_event()
        if end is StreamEnd.SHUTDOWN:
            return stream.shutdown_event()
        if end is StreamEnd.BUFFER_FULL:
            return StreamError(
                code=ErrorCode.RESUME_BUFFER_FULL, message=BUFFER_FULL_MESSAGE, request_id=stream.request_id
            )
        if end is StreamEnd.BUFFER_LOST:
            return StreamError(
                code=ErrorCode.RESUME_UNAVAILABLE, message=UNAVAILABLE_MESSAGE, request_id=stream.request_id
            )
        return None

    async def _listen_for_stops(self, shared: RedisStreamBuffers) -> None:
        while True:
            try:
                async for stream_id in shared.stop_requests():
                    producer = self._producers.get(stream_id)
                    if producer is not None:
                        producer.stop(StreamEnd.STOPPED)
            except BuffersUnavailableError as exc:
                self._redis_failed("resume_stop_listener_failed", exc)
            # Redis failed or closed the subscription: listen again once it may be back.
            await asyncio.sleep(STOP_LISTEN_RETRY_SECONDS)

    def _redis_failed(self, event: str, exc: Exception, **fields: str) -> None:
        log.warning(event, error=str(exc), **fields)
        if self._on_redis_error is not None:
            self._on_redis_error()


def build_resumable_streams(
    settings: Settings,
    *,
    redis_url: str | None,
    drain: Drain,
    on_redis_error: Callable[[], None] | None = None,
) -> ResumableStreams:
    """Buffers in Redis when `redis_url` is set (resumes land on any instance), else in this process's memory."""
    shared = (
        RedisStreamBuffers(redis_url, ttl_seconds=settings.llm_resume_ttl_seconds) if redis_url is not None else None
    )
    return ResumableStreams(
        local=MemoryStreamBuffers(
            ttl_seconds=settings.llm_resume_ttl_seconds, total_bytes=settings.llm_resume_total_bytes
        ),
        shared=shared,
        drain=drain,
        max_stream_bytes=settings.llm_resume_max_bytes,
        on_redis_error=on_redis_error,
    )
