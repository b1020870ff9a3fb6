"""Graceful shutdown: when the server is told to stop, open calls get `LLM_SHUTDOWN_GRACE_SECONDS` to finish.

uvicorn handles SIGTERM and SIGINT itself: it stops accepting connections, then waits for open responses with no
limit, and only then runs the app's shutdown, so the app would never learn that it is draining. `Drain` chains
onto the server's own handlers (it calls them first, unchanged) to note the moment, and when the grace runs out
it tells every open call, which ends: streams with a final `server_shutting_down` error event, batch calls
with a 503. uvicorn then finishes its own shutdown as usual.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

import structlog

SignalHandler = Callable[[int, FrameType | None], object]
_DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """The process's drain state: `draining` from the stop signal on, `expired` once the grace is over."""

    def __init__(self, *, grace_seconds: float) -> None:
        self._grace_seconds = grace_seconds
        self._expired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, SignalHandler] = {}
        self._on_expiry: set[Callable[[], None]] = set()
        self.draining = False
        self._log = structlog.get_logger("shutdown")

    @property
    def grace_seconds(self) -> float:
        return self._grace_seconds

    @property
    def expired(self) -> bool:
        return self._expired

    def subscribe(self, on_expiry: Callable[[], None]) -> Callable[[], None]:
        """Call `on_expiry` when the grace ends (at once if it has); returns the function that unsubscribes."""
        if self.expired:
            on_expiry()
            return _nothing
        self._on_expiry.add(on_expiry)
        return lambda: self._on_expiry.discard(on_expiry)

    def begin(self) -> None:
        """Start draining (idempotent); the grace's end is scheduled on the running loop."""
        if self.draining:
            return
        self.draining = True
        self._log.info("draining", grace_seconds=self._grace_seconds)
        asyncio.get_running_loop().call_later(self._grace_seconds, self._expire)

    def _expire(self) -> None:
        self._expired = True
        waiting, self._on_expiry = self._on_expiry, set()
        if waiting:
            self._log.warning("grace_expired", interrupted_calls=len(waiting))
        for on_expiry in waiting:
            on_expiry()

    def chain_server_signals(self) -> None:
        """Follow the server's SIGTERM/SIGINT handlers, when a server installed some (uvicorn does)."""
        self._loop = asyncio.get_running_loop()
        for signum in _DRAIN_SIGNALS:
            current = signal.getsignal(signum)
            if not callable(current) or current is signal.default_int_handler:
                continue
            self._previous[signum] = current
            signal.signal(signum, self._on_signal)

    def restore_server_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)
        if previous is not None:
            previous(signum, frame)
        if self._loop is not None:
            # Signal handlers run between bytecodes of the loop's thread: hand the work to the loop itself.
            self._loop.call_soon_threadsafe(self.begin)


def _nothing() -> None:
    """Unsubscribing from a drain that had already expired."""
