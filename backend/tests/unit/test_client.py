"""The production upstream client: the SDK's own request, sent lean; honest transport errors; no cookie jar."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import respx

from src.core.llm.client import (
    UpstreamHttpClient,
    UpstreamOpenAI,
    UpstreamTransport,
    build_openai_client,
    tls_verification,
)
from src.devtools.servers import free_port
from tests.conftest import UPSTREAM, UPSTREAM_KEY, make_settings

BODY = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "héllo"}], "max_completion_tokens": 5}


def _client(http_client: httpx.AsyncClient, *, max_retries: int = 0) -> UpstreamOpenAI:
    client = build_openai_client(make_settings(llm_max_retries=max_retries), http_client=http_client)
    assert isinstance(client, UpstreamOpenAI)
    return client


@pytest.mark.parametrize("http_client", [httpx.AsyncClient, UpstreamHttpClient], ids=["httpx", "production"])
async def test_post_json_sends_what_the_sdk_post_sends(http_client: type[httpx.AsyncClient]) -> None:
    """The lean path is the SDK's request: same URL, headers (auth, X-Stainless-*, timeouts) and body."""
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"ok": True})

    client = _client(http_client(transport=httpx.MockTransport(record)))
    await client.post("/chat/completions", cast_to=httpx.Response, body=BODY)
    await client.post_json("/chat/completions", BODY)
    await client.close()
    sdk, lean = sent
    assert lean.url == sdk.url == httpx.URL(f"{UPSTREAM}/chat/completions")
    assert lean.method == sdk.method == "POST"
    assert lean.content == sdk.content
    assert json.loads(lean.content) == BODY
    assert dict(lean.headers) == dict(sdk.headers)
    assert lean.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert lean.extensions["timeout"] == sdk.extensions["timeout"]


async def test_post_json_retries_like_the_sdk_and_counts_retries() -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions")
        route.side_effect = [
            httpx.Response(503, headers={"retry-after-ms": "1"}),
            httpx.ConnectError("refused"),
            httpx.Response(200, json={"ok": True}),
        ]
        client = _client(httpx.AsyncClient(), max_retries=2)
        response = await client.post_json("/chat/completions", BODY)
        await client.close()
    assert response.json() == {"ok": True}
    assert [call.request.headers["x-stainless-retry-count"] for call in route.calls] == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (307, openai.APIStatusError),  # not followed: never a 2xx "answer"
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
    ],
)
async def test_post_json_raises_the_sdk_error_classes(status: int, error: type[openai.APIStatusError]) -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        upstream.post("/chat/completions").respond(status, json={"error": {"message": "no", "code": "x"}})
        client = _client(httpx.AsyncClient())
        with pytest.raises(error) as raised:
            await client.post_json("/chat/completions", BODY)
        await client.close()
    assert raised.value.status_code == status
    assert raised.value.code == "x"


@pytest.mark.parametrize(
    ("failure", "error"),
    [(httpx.ReadTimeout("slow"), openai.APITimeoutError), (httpx.ConnectError("refused"), openai.APIConnectionError)],
)
async def test_post_json_transport_failures_are_sdk_errors(failure: Exception, error: type[Exception]) -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions").mock(side_effect=failure)
        client = _client(httpx.AsyncClient(), max_retries=1)
        with pytest.raises(error):
            await client.post_json("/chat/completions", BODY)
        await client.close()
    assert route.call_count == 2


async def test_refused_connection_is_connect_error_not_timeout() -> None:
    async with httpx.AsyncClient(transport=UpstreamTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


@contextlib.asynccontextmanager
async def _raw_server(handler: object) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def test_no_headers_in_time_is_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await asyncio.sleep(2)
        writer.close()

    async with _raw_server(silent) as url, UpstreamHttpClient(timeout=httpx.Timeout(5.0, read=0.2)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url, content=b"{}")


async def test_body_cut_short_is_read_error_and_chunks_pass_as_they_arrive() -> None:
    async def breaks_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    async with _raw_server(breaks_mid_body) as url, UpstreamHttpClient() as client:
        request = client.build_request("POST", url, content=b"{}")
        response = await client.send(request, stream=True)
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"first"
        with pytest.raises(httpx.ReadError):
            await anext(chunks)
        await response.aclose()


async def test_redirects_are_not_followed() -> None:
    async def redirects(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.test/\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async with _raw_server(redirects) as url, UpstreamHttpClient() as client:
        response = await client.post(url, content=b"{}")
    assert response.status_code == 307


def test_tls_uses_the_os_trust_store_or_else_certifi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    with_store = ssl.DefaultVerifyPaths(str(bundle), None, "", "", "", "")  # type: ignore[arg-type]
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: with_store)
    assert tls_verification() is True

    without_store = ssl.DefaultVerifyPaths(None, None, "", "", "", "")  # type: ignore[arg-type]
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: without_store)
    context = tls_verification()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] > 0


def test_upstream_client_keeps_no_cookies() -> None:
    client = UpstreamHttpClient()
    response = httpx.Response(
        200, headers={"set-cookie": "a=b; path=/"}, request=httpx.Request("GET", "http://upstream.test/")
    )
    client.cookies.extract_cookies(response)
    assert not client.cookies
    with pytest.raises(ValueError, match="no cookies"):
        client.cookies = {"a": "b"}


async def test_production_client_takes_retries_and_timeouts_from_settings() -> None:
    openai_client = build_openai_client(make_settings(llm_max_retries=4, llm_timeout_seconds=7))
    assert openai_client is not None
    assert openai_client.max_retries == 4
    assert openai_client.timeout == httpx.Timeout(7.0, connect=7.0, pool=7.0)
    await openai_client.close()


def test_no_key_means_no_client() -> None:
    assert build_openai_client(make_settings(openai_api_key=None)) is None
