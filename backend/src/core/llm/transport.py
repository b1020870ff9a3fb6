"""The production HTTP transport to the upstream: httpx's transport interface over one aiohttp session.

Why not httpx's own pool: under concurrency httpx 0.28's pool scans every idle connection per request
(encode/httpx#3215), a third of the service's throughput (specs/003-llm-service/plan.md). Behind an egress proxy
the client uses httpx's own transports instead (core/llm/client.py), so proxy handling is exactly httpx's.

Failures are reported as what they are: no response headers in time is `httpx.ReadTimeout` (the request was
sent: never retried), no connection in time `httpx.ConnectTimeout`, everything else before a response (refused,
reset, DNS, TLS) `httpx.ConnectError`, a body cut short `httpx.ReadError`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx

_HTTP_11 = {"http_version": b"HTTP/1.1"}
# One session serves every caller: cookies an upstream sets (load-balancer affinity, bot checks) must never be
# replayed on other callers' calls, so they are dropped here, before httpx would parse them into a jar.
_SET_COOKIE = b"set-cookie"


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
    """httpx transport over one aiohttp session: no cookie jar, no redirects, verified TLS with `tls`."""

    def __init__(self, *, tls: ssl.SSLContext, limits: httpx.Limits | None = None) -> None:
        self._limits = limits or httpx.Limits()
        self._tls = tls
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
            client_timeout = aiohttp.ClientTimeout(
                sock_connect=connect, sock_read=read, connect=(connect or 0) + (pool or 0) or None
            )
            self._timeouts[key] = client_timeout
        return client_timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's transport interface: the response with its body still to read, chunk by chunk."""
        response = await self._open(request)
        return _httpx_response(request, response, stream=_AiohttpBody(response))

    async def fetch(self, request: httpx.Request) -> httpx.Response:
        """The response with its whole body read, in one read: for batch calls, which need all of it anyway and
        would otherwise pay httpx's async iteration per chunk (a few percent of a call)."""
        response = await self._open(request)
        try:
            body = await response.read()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "the upstream stopped sending", request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or "the upstream connection broke", request=request) from exc
        finally:
            response.release()
        read = _httpx_response(request, response, stream=httpx.ByteStream(body))
        read.read()  # in memory already: decodes the body (by `Content-Encoding`) and marks the response read
        return read

    async def _open(self, request: httpx.Request) -> aiohttp.ClientResponse:
        session = self._session or self._open_session()
        try:
            return await session.request(
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

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _httpx_response(
    request: httpx.Request, response: aiohttp.ClientResponse, *, stream: httpx.AsyncByteStream | httpx.ByteStream
) -> httpx.Response:
    """aiohttp's response as httpx's, its headers as sent: the body still to stream, or already in memory (a
    `ByteStream`). Either way httpx decodes it by `Content-Encoding`: aiohttp's own decompression is off."""
    extensions: dict[str, Any] = dict(_HTTP_11)
    if response.reason:
        extensions["reason_phrase"] = response.reason.encode()
    return httpx.Response(
        response.status,
        headers=[(name, value) for name, value in response.raw_headers if name.lower() != _SET_COOKIE],
        stream=stream,
        request=request,
        extensions=extensions,
    )
