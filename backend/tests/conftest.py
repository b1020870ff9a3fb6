"""Shared fixtures: clean environment, settings, the app in-process, respx on the upstream, captured logs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from starlette.types import ASGIApp

from src.core.config import Settings
from src.core.metrics import prepare_metrics_directory
from src.devtools.servers import clean_environment
from src.main import create_app

UPSTREAM = "https://upstream.test/v1"
UPSTREAM_KEY = "sk-test-SECRET-upstream-key-0123456789"
SERVICE_KEY = "svc-key-secret-42"


_scratch: tempfile.TemporaryDirectory[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    """A developer's shell must not change what the tests see: drop the service's settings, egress proxies and the
    bundled upstream's variables from this process (servers started by the tests inherit the same clean
    environment, and read no `.env`: see src/devtools/servers.py)."""
    global _scratch
    clean = clean_environment()
    os.environ.clear()
    os.environ.update(clean)
    _scratch = tempfile.TemporaryDirectory(prefix="llm-service-tests-")
    # Before any test module imports prometheus_client: it picks multiprocess mode when first imported.
    prepare_metrics_directory()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _scratch is not None:
        _scratch.cleanup()


def scratch_directory() -> Path:
    """A directory for this test session's files (the in-process apps' ledger), removed at its end."""
    assert _scratch is not None, "pytest_configure has not run"
    return Path(_scratch.name)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": UPSTREAM_KEY,
        "openai_base_url": UPSTREAM,
        "llm_max_retries": 0,
        "llm_timeout_seconds": 5.0,
        "llm_startup_check": False,
        "database_url": f"sqlite:///{scratch_directory() / 'ledger.db'}",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=UPSTREAM, assert_all_called=False) as router:
        yield router


OpenClient = Callable[..., contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, FastAPI, ASGIApp]]]


@pytest.fixture
def app_client() -> OpenClient:
    """`async with app_client(settings) as (client, app, asgi)`: the app with its lifespan, over ASGITransport.

    `asgi` is the app as a server runs it (lifespan state in every scope), for tests that drive ASGI directly.
    """

    @contextlib.asynccontextmanager
    async def open_client(
        settings: Settings | None = None,
    ) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, ASGIApp]]:
        app = create_app(settings or make_settings(), http_client=httpx.AsyncClient())
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service.test") as client:
                yield client, app, manager.app

    return open_client


@pytest.fixture
async def client(app_client: Callable[..., Any], settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as (http_client, _, _):
        yield http_client


@pytest.fixture
def read_logs(capsys: pytest.CaptureFixture[str]) -> Callable[[], list[dict[str, Any]]]:
    """Every stdout line so far, each parsed as JSON (a non-JSON line fails the test)."""

    def read() -> list[dict[str, Any]]:
        out = capsys.readouterr().out
        read.raw += out  # type: ignore[attr-defined]
        return [json.loads(line) for line in read.raw.splitlines() if line.strip()]  # type: ignore[attr-defined]

    read.raw = ""  # type: ignore[attr-defined]
    return read


def chat_body(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def completion(
    content: str = "Hi! How can I help?",
    *,
    finish_reason: str = "stop",
    model: str = "gpt-5-mini-2025",
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": usage or {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
    }


def sse_chunks(pieces: list[str], *, finish_reason: str = "stop", usage: bool = True, done: bool = True) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        payload = {
            "id": "chatcmpl-s1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-5-mini-2025",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload)}\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": piece}) for piece in pieces]
    parts.append(chunk({}, finish_reason))
    if usage:
        parts.append(
            "data: "
            + json.dumps(
                {
                    "id": "chatcmpl-s1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-5-mini-2025",
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)},
                }
            )
            + "\n\n"
        )
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def parse_sse(text: str, *, first_id: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """Our events, in order; each must carry the next id (from `first_id`) except a last event outside the stream's
    sequence (a resumed stream's reader told of a shutdown)."""
    events = []
    expected_id = first_id
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        if lines[0].startswith("id: "):
            assert lines[0] == f"id: {expected_id}", block
            expected_id += 1
            lines = lines[1:]
        assert lines[0].startswith("event: "), block
        assert len(lines) == 2, block
        assert lines[1].startswith("data: "), block
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


def upstream_json(route: respx.Route, index: int = -1) -> dict[str, Any]:
    request = route.calls[index].request
    body: dict[str, Any] = json.loads(request.content)
    return body
