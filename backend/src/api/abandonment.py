"""Batch calls the client or the server gave up on: stop them instead of letting retries run on for minutes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from enum import Enum
from typing import TypeVar

from starlette.types import Receive

from src.core.errors import ErrorCode, ServiceError
from src.core.llm.service import shutting_down
from src.core.shutdown import Drain

T = TypeVar("T")
CLIENT_CLOSED_STATUS = 499
# Most calls that end quickly never need a watcher task: it starts only if the call is still running by then.
WATCH_AFTER_SECONDS = 0.05


class _Abandoned(Enum):
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"


async def unless_abandoned(call: Awaitable[T], *, receive: Receive, drain: Drain) -> T:
    """Await `call`, cancelling it when the client disconnects or the shutdown grace ends.

    The call runs in this task; a watcher task waits for the disconnect, started only once the call has run for
    WATCH_AFTER_SECONDS (a disconnect before that is still seen: the message waits in `receive`).
    A shutdown becomes 503 `server_shutting_down`; a client that left gets 499 `client_closed_request`, which
    nobody reads but the request log line shows.
    """
    task = asyncio.current_task()
    assert task is not None
    abandoned: _Abandoned | None = None

    def abandon(why: _Abandoned) -> None:
        nonlocal abandoned
        if abandoned is None:
            abandoned = why
            task.cancel()

    async def watch_for_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        abandon(_Abandoned.CLIENT_GONE)

    watcher: asyncio.Task[None] | None = None

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.create_task(watch_for_disconnect())

    later = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, start_watching)
    unsubscribe = drain.subscribe(lambda: abandon(_Abandoned.SHUTDOWN))
    try:
        return await call
    except asyncio.CancelledError:
        if abandoned is None:
            raise
        task.uncancel()
        if abandoned is _Abandoned.SHUTDOWN:
            raise shutting_down() from None
        raise ServiceError(
            ErrorCode.CLIENT_CLOSED_REQUEST, "The client closed the request.", status_code=CLIENT_CLOSED_STATUS
        ) from None
    finally:
        later.cancel()
        if watcher is not None:
            watcher.cancel()
        unsubscribe()
