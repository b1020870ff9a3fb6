"""Server-Sent Events on the wire: our stream events as bytes, and the response that streams them.

`EventStreamResponse` is a small `Response` of our own rather than `StreamingResponse`, FastAPI's `fastapi.sse` or
sse-starlette, because a chat stream needs all of this and none of them does all of it (plan.md "SSE response"):
- the upstream is opened before the response exists, so failures on open are plain HTTP errors;
- a client that leaves is noticed at once (a watcher on `receive`), not at the next write, and the upstream is
  closed within milliseconds;
- `: keep-alive` comments every LLM_STREAM_KEEPALIVE_SECONDS of silence, so proxies with a read timeout (nginx,
  load balancers) keep the connection while a reasoning model thinks;
- a reader that stops reading cannot hold the stream: a write that makes no progress for
  LLM_STREAM_SEND_TIMEOUT_SECONDS ends it;
- at the end of the shutdown grace, a final `server_shutting_down` error event;
- and `ChatStream.aclose()` on every path, which closes the upstream and logs the call once.

It streams any source of the core (`ChatStream`'s named events, a resumable stream's follower, `ChunkStream`'s
OpenAI chunks), each with its encoder.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import structlog
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from src.core.llm.relay import StreamEnd
from src.core.shutdown import Drain
from src.core.stream_buffers import BufferedEvent
from src.models.llm import EVENT_NAMES, StreamEvent

SSE_HEADERS = {
    # Without these, proxies (nginx) and some clients buffer the stream and `curl -N` shows nothing until the end.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
KEEPALIVE_COMMENT = b": keep-alive\n\n"
# The watcher and ticker tasks start only once a stream has run this long: most short streams never need them
# (a disconnect before that still waits in `receive`; keep-alives and stalls are seconds apart).
WATCH_AFTER_SECONDS = 0.05
_EVENT_NAMES = {kind: name.encode() for kind, name in EVENT_NAMES.items()}
_END_OF_BODY: Message = {"type": "http.response.body", "body": b"", "more_body": False}

log = structlog.get_logger("sse")

# What a stream's source yields: typed events, or events replayed from a resumable stream's buffer.
SourceEvent = StreamEvent | BufferedEvent
E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


def encode_event(event: SourceEvent, event_id: int | None) -> bytes:
    """The one encoder of our stream: an event with its id (when it is one of the stream's), its name, and a single
    `data:` line holding one JSON object."""
    if isinstance(event, BufferedEvent):
        name, data = event.name.encode(), event.data.encode()
    else:
        name, data = _EVENT_NAMES[type(event)], event.model_dump_json().encode()
    head = b"" if event_id is None else b"id: " + str(event_id).encode() + b"\n"
    return head + b"event: " + name + b"\ndata: " + data + b"\n\n"


def encode_followed_event(event: SourceEvent, event_id: int | None) -> bytes:
    """A resumable stream's reader: the stream's own events keep their ids; a notice made for this reader alone (its
    stream gone, its store failed) has none, so a client that resumes after it skips none of the stream's events."""
    return encode_event(event, event_id if isinstance(event, BufferedEvent) else None)


class EventSource(Protocol[E_co]):
    """What the response streams: a `ChatStream` (numbered from 1), a follower of a resumable stream (numbered
    from the event after the one it resumes from), or a `ChunkStream` (OpenAI's format, whose encoder uses no ids)."""

    @property
    def request_id(self) -> str: ...

    @property
    def resumable(self) -> bool: ...

    @property
    def first_event_id(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[E_co]: ...

    def shutdown_event(self) -> E_co: ...

    async def aclose(self, *, end: StreamEnd = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class StreamTimings:
    keepalive_seconds: float
    send_timeout_seconds: float


class _Writer:
    """Body writes from the relay and the keep-alive ticker, one at a time.

    A write blocks while the client's TCP window is full; the ticker (not a timer per write, which would cost
    on every event) ends the stream when one has made no progress for the send timeout.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.last_write = self._loop.time()
        self.writing_since: float | None = None

    async def write(self, message: Message) -> None:
        async with self._lock:
            self.writing_since = self._loop.time()
            await self._send(message)
            self.writing_since = None
            self.last_write = self._loop.time()

    async def body(self, data: bytes) -> None:
        await self.write({"type": "http.response.body", "body": data, "more_body": True})


class EventStreamResponse(Response, Generic[E]):
    """`text/event-stream` over an already opened stream (see the module docstring for what it guarantees)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        stream: EventSource[E],
        *,
        timings: StreamTimings,
        drain: Drain,
        encode: Callable[[E, int | None], bytes],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(content=None, headers={**SSE_HEADERS, **(headers or {})}, media_type=self.media_type)
        # Response's __init__ set content-length: 0 for an empty body; a stream has none.
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"content-length"]
        self._stream = stream
        self._timings = timings
        self._drain = drain
        self._encode = encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        writer = _Writer(send)
        keepalive, send_timeout = self._timings.keepalive_seconds, self._timings.send_timeout_seconds
        # The ticker wakes at least this often, so a stalled write is noticed within a quarter of the timeout.
        stall_check = send_timeout / 4
        interrupted: StreamEnd | None = None
        finished = False
        stalled = False

        def interrupt(end: StreamEnd) -> None:
            nonlocal interrupted
            if interrupted is None and not finished:
                interrupted = end
                relay.cancel()

        async def watch_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            # Servers also report a disconnect once the response is complete; that is not a client leaving.
            interrupt(StreamEnd.CLIENT_GONE)

        async def tick() -> None:
            """Keep-alive comments while the stream is silent; the end of a stream whose reader stopped reading."""
            nonlocal stalled
            while True:
                now = self._loop_time()
                if writer.writing_since is not None and now - writer.writing_since >= send_timeout:
                    stalled = True
                    interrupt(StreamEnd.CLIENT_GONE)
                    return
                silent_for = now - writer.last_write
                if writer.writing_since is None and silent_for >= keepalive:
                    try:
                        async with asyncio.timeout(send_timeout):
                            await writer.body(KEEPALIVE_COMMENT)
                    except TimeoutError:
                        stalled = True
                        interrupt(StreamEnd.CLIENT_GONE)
                        return
                    except OSError:
                        interrupt(StreamEnd.CLIENT_GONE)
                        return
                    continue
                idle_wait = keepalive - silent_for if writer.writing_since is None else stall_check
                await asyncio.sleep(min(idle_wait, stall_check))

        watchers: list[asyncio.Task[None]] = []

        def start_watching() -> None:
            watchers.append(asyncio.create_task(watch_for_disconnect()))
            watchers.append(asyncio.create_task(tick()))

        later = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, start_watching)
        unsubscribe = self._drain.subscribe(lambda: interrupt(StreamEnd.SHUTDOWN))
        end = StreamEnd.DELIVERED
        event_id = self._stream.first_event_id
        try:
            await writer.write({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self._stream:
                await writer.body(self._encode(event, event_id))
                event_id += 1
            finished = True
            await writer.write(_END_OF_BODY)
        except asyncio.CancelledError:
            if interrupted is None:
                raise
            # Our own cancellation (a watcher's): handled here, so the task is no longer being cancelled.
            relay.uncancel()
            end = interrupted
        except OSError:
            # ASGI spec 2.4 servers raise on a write to a closed connection instead of reporting a disconnect.
            end = StreamEnd.CLIENT_GONE
        finally:
            later.cancel()
            for task in watchers:
                task.cancel()
            unsubscribe()
            if stalled:
                log.warning(
                    "stream_client_stalled", request_id=self._stream.request_id, send_timeout_seconds=send_timeout
                )
            if end is StreamEnd.SHUTDOWN:
                # A resumable stream may go on elsewhere: its reader's last event here is not one of its events.
                await self._say_shutting_down(writer, None if self._stream.resumable else event_id)
            await self._stream.aclose(end=end)

    async def _say_shutting_down(self, writer: _Writer, event_id: int | None) -> None:
        try:
            async with asyncio.timeout(self._timings.send_timeout_seconds):
                await writer.body(self._encode(self._stream.shutdown_event(), event_id))
                await writer.write(_END_OF_BODY)
        except (TimeoutError, OSError):
            log.warning("stream_shutdown_event_not_delivered", request_id=self._stream.request_id)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()
