"""Real processes: the bundled upstream and the service under uvicorn on free ports, shared by the module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from src.devtools.servers import ServerProcess, start_mock_upstream, start_service

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"
# Long enough that a healthy call never trips it, short enough that the hang faults finish quickly.
E2E_TIMEOUT_SECONDS = 1.5
E2E_STREAM_DELAY_MS = 30


@dataclass
class Stack:
    upstream: ServerProcess
    service: ServerProcess
    service_log: Path


# Slow enough that a client can leave, resume or stop mid-answer; a long answer takes seconds.
SLOW_WORD_DELAY_MS = 20


def _bundled_upstream(tmp_path_factory: pytest.TempPathFactory, *, delay_ms: float) -> Iterator[ServerProcess]:
    """The bundled upstream for a module's tests, its log kept for failures."""
    log = (tmp_path_factory.mktemp("upstream") / "upstream.log").open("wb")
    server = start_mock_upstream(delay_ms=delay_ms, output=log)
    try:
        yield server
    finally:
        server.stop()
        log.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled upstream without pauses between words."""
    yield from _bundled_upstream(tmp_path_factory, delay_ms=0)


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The bundled upstream with a pause before each word (SLOW_WORD_DELAY_MS), so answers stream for a while."""
    yield from _bundled_upstream(tmp_path_factory, delay_ms=SLOW_WORD_DELAY_MS)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("e2e")
    upstream_log = (logs / "upstream.log").open("wb")
    service_log_path = logs / "service.log"
    service_log = service_log_path.open("wb")
    upstream = start_mock_upstream(delay_ms=E2E_STREAM_DELAY_MS, output=upstream_log)
    try:
        service = start_service(
            upstream_url=upstream.url,
            output=service_log,
            env={
                "LLM_TIMEOUT_SECONDS": str(E2E_TIMEOUT_SECONDS),
                "LLM_MAX_RETRIES": "0",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                "LLM_DEMO_UPSTREAM": "true",
                "OPENAI_API_KEY": "sk-e2e-SECRET-key-0123456789",
            },
        )
    except BaseException:
        upstream.stop()
        raise
    try:
        yield Stack(upstream, service, service_log_path)
    finally:
        service.stop()
        upstream.stop()
        upstream_log.close()
        service_log.close()


def unavailable(what: str, url: str, problem: object) -> None:
    """A real server the test needs is not there: skip on a laptop, fail under CI (where nothing may skip)."""
    message = f"{what} is not reachable at {url} ({problem}): start it, or point TEST_{what.upper()}_URL at one"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The real Redis at TEST_REDIS_URL."""
    url = os.environ.get("TEST_REDIS_URL") or DEFAULT_TEST_REDIS_URL
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable("redis", url, exc)
    yield url
    client.close()
