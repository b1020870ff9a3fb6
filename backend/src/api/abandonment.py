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


class _Abandoned(Enum):
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"


async def unless_abandoned(call: Awaitable[T], *, receive: Receive, drain: Drain) -> T:
    """Await `call`, cancelling it when the client disconnects or the shutdown grace ends.

    The call runs in this task (no task per request on the hot path); one watcher task waits for the disconnect.
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

    watcher = asyncio.create_task(watch_for_disconnect())
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
        watcher.cancel()
        unsubscribe()
