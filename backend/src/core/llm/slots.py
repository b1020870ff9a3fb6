"""Upstream connection slots: at most LLM_MAX_CONNECTIONS calls hold one, and nobody queues for long."""

from __future__ import annotations

import asyncio

from src.core.llm.upstream_errors import pool_exhausted


class UpstreamSlots:
    """A semaphore sized like the transport's pool, so the pool is never the silent limit.

    A caller who cannot get a slot within `wait_seconds` gets a quick 503 `upstream_unavailable` instead of
    queueing in the transport's pool (where each retry would queue again).
    """

    def __init__(self, *, size: int, wait_seconds: float) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self._wait_seconds = wait_seconds

    async def acquire(self) -> None:
        if not self._semaphore.locked():
            await self._semaphore.acquire()
            return
        try:
            async with asyncio.timeout(self._wait_seconds):
                await self._semaphore.acquire()
        except TimeoutError as exc:
            raise pool_exhausted() from exc

    def release(self) -> None:
        self._semaphore.release()
