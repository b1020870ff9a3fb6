"""The SSE response for chat streams: forwards each event as it comes and stops the upstream when the client leaves."""

from __future__ import annotations

import anyio
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
        try:
            async with anyio.create_task_group() as task_group:

                async def watch_for_disconnect() -> None:
                    nonlocal client_gone
                    while (await receive())["type"] != "http.disconnect":
                        continue
                    # Servers also report a disconnect once the response is complete; that is not a client leaving.
                    client_gone = not finished
                    task_group.cancel_scope.cancel()

                task_group.start_soon(watch_for_disconnect)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in self._stream:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                task_group.cancel_scope.cancel()
        except OSError:
            # ASGI spec 2.4 servers raise on sending to a closed connection instead of reporting a disconnect.
            client_gone = not finished
        finally:
            await self._stream.aclose(client_gone=client_gone)
