"""Helpers for the network tests: a service process per test with its own settings, its log, SSE parsing."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

from src.devtools.servers import ServerProcess, start_service

CHAT = "/api/v1/llm/chat"
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.02


@dataclass
class RunningService:
    server: ServerProcess
    log_path: Path

    @property
    def url(self) -> str:
        return self.server.url

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def wait_for_log(self, matches: Callable[[dict[str, Any]], bool], timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """The first log line that `matches`, waiting for it with a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.log_lines() if matches(line)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no such log line within {timeout}s:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(POLL_SECONDS)


@contextlib.contextmanager
def running_service(upstream_url: str, directory: Path, **settings: str) -> Iterator[RunningService]:
    """The real service under uvicorn, wired to `upstream_url`, with `settings` as its environment."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"service-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        server = start_service(upstream_url=upstream_url, env=settings, output=log)
        try:
            yield RunningService(server, log_path)
        finally:
            server.stop()


def upstream_stats(upstream: ServerProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(upstream.url + "/_mock/stats", timeout=5).json()
    return stats


def requests_for(upstream: ServerProcess, model: str) -> int:
    count: int = upstream_stats(upstream)["requests_by_model"].get(model, 0)
    return count


def stream_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    return [(sse.event, json.loads(sse.data)) for sse in EventSource(response).iter_sse()]


def chat(text: str = "Hello there", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **fields}
