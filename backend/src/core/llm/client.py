"""Builds the one `AsyncOpenAI` client of the process: base URL, timeouts, retries and connection pool.

Production talks HTTP through the SDK's aiohttp transport (`DefaultAioHttpClient`): under concurrency httpx's own
connection pool scans every idle connection per request (encode/httpx#3215), which cost a third of the service's
throughput; the measurements are in specs/003-llm-service/plan.md. Tests may inject a plain httpx client, which
respx intercepts, and the service code is the same either way.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from openai import AsyncOpenAI, DefaultAioHttpClient

from src.core.config import Settings

# Connecting is quick or not at all; a long connect timeout only delays the 503 a caller gets.
MAX_CONNECT_TIMEOUT_SECONDS = 10.0


class UpstreamTransport(AiohttpTransport):
    """aiohttp under httpx, with connection failures reported as what they are.

    httpx-aiohttp maps every `aiohttp.ClientConnectionError` (refused, reset, server gone) to `httpx.ConnectTimeout`,
    which would turn "upstream unreachable" (503) into "upstream timeout" (504). Real timeouts from aiohttp are
    `TimeoutError`s; everything else becomes `httpx.ConnectError`.
    """

    def get_client(self) -> aiohttp.ClientSession:
        """The aiohttp session, like httpx-aiohttp's own (its TLS context and pool size) but with no cookie jar."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise
            raise httpx.ConnectError(str(exc), request=request) from exc.__cause__


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class UpstreamHttpClient(DefaultAioHttpClient):
    """The SDK's aiohttp-backed client, without a cookie jar (nor has its transport's aiohttp session one).

    One client serves every caller of the service, so cookies an upstream sets (load-balancer affinity, bot
    checks) must not be replayed on other callers' requests; and httpx parses each response into its jar through
    urllib's cookie machinery, which cost ~8% of the service's CPU per call.
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        if cookies:
            raise ValueError("the upstream client keeps no cookies")


_NO_COOKIES = _NoCookies()


def upstream_timeout(settings: Settings) -> httpx.Timeout:
    connect = min(settings.llm_timeout_seconds, MAX_CONNECT_TIMEOUT_SECONDS)
    # The wait for a free connection is bounded by the service's own slots (LLM_POOL_TIMEOUT_SECONDS), so the
    # transport's pool timeout only needs to cover connecting (aiohttp counts both in one `connect` timeout).
    return httpx.Timeout(settings.llm_timeout_seconds, connect=connect, pool=connect)


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
        limits = upstream_limits(settings)
        transport = UpstreamTransport(limits=limits)
        http_client = UpstreamHttpClient(timeout=timeout, limits=limits, transport=transport)
    return AsyncOpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        timeout=timeout,
        max_retries=settings.llm_max_retries,
        http_client=http_client,
    )
