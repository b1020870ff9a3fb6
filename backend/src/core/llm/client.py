"""Builds the one `AsyncOpenAI` client of the process: base URL, timeouts, retries and connection pool."""

from __future__ import annotations

import httpx
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from src.core.config import Settings

# Connecting is quick or not at all; a long connect timeout only delays the 503 a caller gets.
MAX_CONNECT_TIMEOUT_SECONDS = 10.0


def upstream_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(
        settings.llm_timeout_seconds,
        connect=min(settings.llm_timeout_seconds, MAX_CONNECT_TIMEOUT_SECONDS),
        pool=settings.llm_pool_timeout_seconds,
    )


def upstream_limits(settings: Settings) -> httpx.Limits:
    # Keep-alive for every allowed connection: under steady load a closed idle socket is a new handshake.
    return httpx.Limits(
        max_connections=settings.llm_max_connections,
        max_keepalive_connections=settings.llm_max_connections,
    )


def build_openai_client(settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> AsyncOpenAI | None:
    """The shared client, or None when no upstream key is configured (chat then answers 503).

    `http_client` lets tests inject a plain httpx client (respx intercepts it); production builds its own.
    """
    if settings.openai_api_key is None:
        return None
    timeout = upstream_timeout(settings)
    if http_client is None:
        http_client = DefaultAsyncHttpxClient(timeout=timeout, limits=upstream_limits(settings))
    return AsyncOpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        timeout=timeout,
        max_retries=settings.llm_max_retries,
        http_client=http_client,
    )
