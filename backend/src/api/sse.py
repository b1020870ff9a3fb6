"""The SSE response for chat streams: forwards each event as it comes and stops the upstream when the client leaves."""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from src.core.llm.service import ChatStream

SSE_HEADERS = {
    # Without these, proxies (nginx) and some clients buffer the stream and `curl -N` shows nothing until the end.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStreamResponse(Response):
    """`text/event-stream` over an already opened `ChatStream`.

    Starlette's `StreamingResponse` would also work, but on ASGI servers below spec 2.4 it can be cancelled
    before its iterator starts, and then nothing closes the upstream; here `aclose()` runs on every path.

    The disconnect watcher is a plain asyncio task that cancels the relaying task, not an anyio task group: the
    group's cancel scopes cost ~150 µs before the first token (measured; specs/003-llm-service/plan.md). The
    relay swallows only that cancellation, and `ChatStream.aclose()` is shielded.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: ChatStream) -> None:
        super().__init__(content=None, headers=SSE_HEADERS, media_type=self.media_type)
        # Response's __init__ set content-length: 0 for an empty body; a stream has none.
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"content-length"]
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client_gone = False
        finished = False
        relay = asyncio.current_task()

        async def watch_for_disconnect() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                continue
            # Servers also report a disconnect once the response is complete; that is not a client leaving.
            if not finished:
                client_gone = True
                if relay is not None:
                    relay.cancel()

        watcher = asyncio.create_task(watch_for_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self._stream:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # ASGI spec 2.4 servers raise on sending to a closed connection instead of reporting a disconnect.
            client_gone = not finished
        except asyncio.CancelledError:
            if not client_gone or relay is None:
                raise
            # Our own cancellation (the watcher's): handled here, so the task is no longer being cancelled.
            relay.uncancel()
        finally:
            watcher.cancel()
            await self._stream.aclose(client_gone=client_gone)
