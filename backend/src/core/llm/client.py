"""Builds the one `AsyncOpenAI` client of the process: base URL, timeouts, retries and connection pool.

- `UpstreamOpenAI.post_json` is the service's call: the SDK's own request (URL, auth and telemetry headers,
  timeout), built once per path, with the SDK's retry policy and error classes; per call only the body is new.
- `UpstreamHttpClient` + `UpstreamTransport` carry it over aiohttp, not httpx's own pool: under concurrency httpx
  0.28's pool scans every idle connection per request (encode/httpx#3215), a third of the service's throughput.
  No cookie jar, no redirects, honest transport errors.
The measurements are in specs/003-llm-service/plan.md. Tests may inject a plain httpx client, which respx
intercepts, and the service code is the same either way.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

import aiohttp
import anyio
import httpx
from openai import APIConnectionError, APITimeoutError, AsyncOpenAI
from openai._models import FinalRequestOptions

from src.core.config import Settings

# Connecting is quick or not at all; a long connect timeout only delays the 503 a caller gets.
MAX_CONNECT_TIMEOUT_SECONDS = 10.0
_HTTP_11 = {"http_version": b"HTTP/1.1"}


def tls_verification() -> ssl.SSLContext | bool:
    """Verified TLS: the OS trust store when it has one, else certifi's bundle (what httpx and the SDK use).

    `True` is aiohttp's own verified context over the OS store (which honours SSL_CERT_FILE / SSL_CERT_DIR and
    CAs an operator added), created once when aiohttp is imported; a second context with certifi's bundle
    would cost ~0.8 MiB per process for the same verification.
    """
    paths = ssl.get_default_verify_paths()
    has_file = bool(paths.cafile) and os.path.isfile(paths.cafile or "")
    has_dir = bool(paths.capath) and os.path.isdir(paths.capath or "") and any(os.scandir(paths.capath or "."))
    if has_file or has_dir:
        return True
    return httpx.create_ssl_context()


class _AiohttpBody(httpx.AsyncByteStream):
    """An aiohttp response body as httpx's byte stream; each chunk is passed on as soon as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "the upstream stopped sending") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or "the upstream connection broke") from exc

    async def aclose(self) -> None:
        # An unfinished body closes its connection (aiohttp never reuses one mid-body): the upstream sees us leave.
        self._response.release()


class UpstreamTransport(httpx.AsyncBaseTransport):
    """httpx transport over one aiohttp session, with failures reported as what they are.

    Before the response headers: no headers in time is `httpx.ReadTimeout`, no connection in time
    `httpx.ConnectTimeout` (the SDK retries both, then 504), everything else (refused, reset, DNS, TLS)
    `httpx.ConnectError` (503); httpx-aiohttp reported all of these as `ConnectTimeout`. No cookie jar: one
    session serves every caller, so cookies an upstream sets (load-balancer affinity, bot checks) must never be
    replayed on other callers' calls.
    """

    def __init__(self, *, limits: httpx.Limits | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits or httpx.Limits()
        self._tls: ssl.SSLContext | bool = ssl_context or tls_verification()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open_session(self) -> aiohttp.ClientSession:
        # Built on first use, inside the running event loop, like httpx's own pool.
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._tls,
        )
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _client_timeout(self, timeout: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        key = (timeout.get("connect"), timeout.get("read"), timeout.get("pool"))
        client_timeout = self._timeouts.get(key)
        if client_timeout is None:
            # aiohttp's `connect` covers waiting for a pooled connection and connecting; `sock_read` is the
            # longest silence between two reads, which is what httpx calls the read timeout.
            connect, read, pool = key
            client_timeout = aiohttp.ClientTimeout(sock_connect=connect, sock_read=read, connect=pool)
            self._timeouts[key] = client_timeout
        return client_timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open_session()
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw],
                data=request.content or None,
                allow_redirects=False,
                auto_decompress=False,
                timeout=self._client_timeout(request.extensions.get("timeout", {})),
                server_hostname=request.extensions.get("sni_hostname"),
            )
        except aiohttp.SocketTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "no answer in time", request=request) from exc
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "could not connect in time", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        extensions: dict[str, Any] = dict(_HTTP_11)
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_AiohttpBody(response),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class UpstreamHttpClient(httpx.AsyncClient):
    """The httpx client under the SDK: sends straight to the transport, httpx's own code only for auth objects.

    Requests come complete from the SDK, so sending skips httpx's cookie jar, auth flow, redirect loop and event
    hooks. Redirects are not followed (and are answered 502 by the service): a provider's API does not redirect,
    and the API key must not travel to wherever a redirect points.
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout | None = None,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = limits or httpx.Limits()
        super().__init__(
            timeout=timeout or httpx.Timeout(60.0),
            limits=limits,
            transport=transport or UpstreamTransport(limits=limits),
            follow_redirects=False,
        )

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        if cookies:
            raise ValueError("the upstream client keeps no cookies")

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if auth is not httpx.USE_CLIENT_DEFAULT:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=False)
        response = await self._transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response


class _RequestTemplate(NamedTuple):
    options: FinalRequestOptions
    url: httpx.URL
    headers: httpx.Headers
    extensions: dict[str, Any]


class UpstreamOpenAI(AsyncOpenAI):
    """`AsyncOpenAI` with one lean call for the service's hot path: `post_json`.

    The SDK's generic `post()` builds two pydantic option models, re-parses the URL and merges five header dicts
    into a fresh `httpx.Headers` on every call: ~200 µs, a fifth of the service's CPU per call, for values that
    never change between calls. `post_json` sends the same request (the SDK's URL, auth and `X-Stainless-*`
    headers, body encoding and timeouts, prepared once by the SDK itself) and keeps the SDK's retry policy and
    error classes: the same statuses and transport failures are retried, with the same backoff and
    `Retry-After` handling, and failures raise the same `openai.APIStatusError` subclasses.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._templates: dict[str, _RequestTemplate] = {}

    def prepare(self, path: str) -> None:
        """Build the request template for `path` now (at startup) rather than on the first call.

        The SDK's platform headers read OS files the first time; that belongs in startup, not in a caller's request.
        """
        self._template(path)

    def _template(self, path: str) -> _RequestTemplate:
        """The SDK's own request for `path`, built once: URL, headers and timeout (the body is per call)."""
        template = self._templates.get(path)
        if template is None:
            options = FinalRequestOptions.construct(method="post", url=path, json_data={})
            request = self._build_request(options)
            headers = request.headers.copy()
            del headers["content-length"]
            template = self._templates[path] = _RequestTemplate(options, request.url, headers, request.extensions)
        return template

    async def post_json(self, path: str, body: Mapping[str, Any], *, stream: bool = False) -> httpx.Response:
        """POST `body` as JSON to `path`: a 2xx response (unread when `stream`), or the SDK's errors."""
        options, url, headers, extensions = self._template(path)
        request = httpx.Request(
            "POST",
            url,
            headers=headers,
            content=json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(),
            extensions=extensions,
        )
        max_retries = self.max_retries
        for retries_taken in range(max_retries + 1):
            remaining = max_retries - retries_taken
            if retries_taken:
                request.headers["x-stainless-retry-count"] = str(retries_taken)
            try:
                response = await self._client.send(request, stream=stream)
            except Exception as exc:
                if remaining > 0:
                    await anyio.sleep(self._calculate_retry_timeout(remaining, options, None))
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise APITimeoutError(request=request) from exc
                raise APIConnectionError(request=request) from exc
            if response.is_success:
                return response
            # Anything else is the SDK's error: 4xx/5xx as it would raise them, and also what the SDK would let
            # through (a redirect we do not follow, 1xx), so callers only ever get a 2xx answer or an error.
            if remaining > 0 and self._should_retry(response):
                await response.aclose()
                await anyio.sleep(self._calculate_retry_timeout(remaining, options, response.headers))
                continue
            if not response.is_closed:
                await response.aread()
            raise self._make_status_error_from_response(response) from None
        raise AssertionError("unreachable: the last attempt returns or raises")


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


def build_openai_client(settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> UpstreamOpenAI | None:
    """The shared client, or None when no upstream key is configured (chat then answers 503).

    `http_client` lets tests inject a plain httpx client (respx intercepts it); production builds its own.
    """
    if settings.openai_api_key is None:
        return None
    timeout = upstream_timeout(settings)
    if http_client is None:
        http_client = UpstreamHttpClient(timeout=timeout, limits=upstream_limits(settings))
    return UpstreamOpenAI(
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        timeout=timeout,
        max_retries=settings.llm_max_retries,
        http_client=http_client,
    )
