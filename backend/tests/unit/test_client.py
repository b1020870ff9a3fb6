"""The upstream client: the SDK's public raw calls, the production transport's honest errors, TLS, no cookies."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import openai
import pytest
import respx

from src.core.llm.client import (
    OpenAIClient,
    build_http_client,
    environment_proxies,
    tls_context,
    upstream_timeout,
)
from src.core.llm.transport import UpstreamTransport
from src.devtools.servers import free_port
from tests.conftest import UPSTREAM, UPSTREAM_KEY, make_settings

BODY = {
    "model": "gpt-5-mini",
    "messages": [{"role": "user", "content": "héllo"}],
    "max_completion_tokens": 5,
    "a_field_openai_added_yesterday": {"kept": True},
}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _client(http_client: httpx.AsyncClient | None = None) -> OpenAIClient:
    client = OpenAIClient.from_settings(make_settings(), http_client=http_client or httpx.AsyncClient())
    assert client is not None
    return client


async def test_chat_completion_is_the_sdks_request_with_the_body_as_given() -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions").respond(200, json={"ok": True})
        client = _client()
        response = await client.create_chat_completion(BODY, call_id="r1")
        await client.aclose()
    assert response.json() == {"ok": True}
    sent = route.calls[0].request
    assert sent.url == httpx.URL(f"{UPSTREAM}/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.headers["x-stainless-lang"] == "python"
    assert json.loads(sent.content) == BODY


async def test_per_call_options_keep_the_clients_own_timeout_and_send_nothing_more() -> None:
    """The options stated per call (for speed) are the client's own: its timeout reaches the transport, and the
    request carries exactly the headers the SDK sends without them."""
    settings = make_settings()
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions").respond(200, json={"ok": True})
        client = _client()
        await client.create_chat_completion(BODY, call_id="r1")
        await client.aclose()
        plain = openai.AsyncOpenAI(
            api_key=UPSTREAM_KEY, base_url=UPSTREAM, max_retries=0, http_client=httpx.AsyncClient()
        )
        await plain.post("/chat/completions", cast_to=httpx.Response, body=BODY)
        await plain.close()
    ours, sdks = (call.request for call in route.calls)
    assert ours.extensions["timeout"] == upstream_timeout(settings).as_dict()
    skipped = {"x-stainless-retry-count", "x-stainless-read-timeout"}  # carry each client's own timeout setting
    assert {k for k in ours.headers if k not in skipped} == {k for k in sdks.headers if k not in skipped}
    assert "idempotency-key" not in ours.headers


async def test_stream_response_is_returned_unread() -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        upstream.post("/chat/completions").respond(
            200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )
        client = _client()
        response = await client.open_chat_completion_stream({**BODY, "stream": True}, call_id="r1")
        assert not response.is_closed
        assert [chunk async for chunk in response.aiter_bytes()] == [b"data: [DONE]\n\n"]
        await response.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (307, openai.APIStatusError),  # not followed: never a 2xx "answer"
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
async def test_non_2xx_answers_raise_the_sdk_error_classes_without_retrying(
    status: int, error: type[openai.APIStatusError]
) -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions").respond(status, json={"error": {"message": "no", "code": "x"}})
        client = _client()
        with pytest.raises(error) as raised:
            await client.create_chat_completion(BODY, call_id="r1")
        await client.aclose()
    assert raised.value.status_code == status
    assert raised.value.code == "x"
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("failure", "error"),
    [(httpx.ReadTimeout("slow"), openai.APITimeoutError), (httpx.ConnectError("refused"), openai.APIConnectionError)],
)
async def test_transport_failures_are_sdk_errors_with_the_cause_kept(
    failure: Exception, error: type[Exception]
) -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.post("/chat/completions").mock(side_effect=failure)
        client = _client()
        with pytest.raises(error) as raised:
            await client.create_chat_completion(BODY, call_id="r1")
        await client.aclose()
    assert isinstance(raised.value.__cause__, type(failure))
    assert route.call_count == 1


async def test_models_list_is_one_quick_get() -> None:
    with respx.mock(base_url=UPSTREAM) as upstream:
        route = upstream.get("/models").respond(200, json={"object": "list", "data": []})
        client = _client()
        response = await client.list_models(timeout_seconds=1.5)
        await client.aclose()
    assert response.json()["object"] == "list"
    assert route.calls[0].request.extensions["timeout"]["read"] == 1.5


async def test_refused_connection_is_connect_error_not_timeout() -> None:
    async with httpx.AsyncClient(transport=UpstreamTransport(tls=tls_context())) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


@contextlib.asynccontextmanager
async def _raw_server(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


def _production_client(**settings: object) -> httpx.AsyncClient:
    return build_http_client(make_settings(**settings))


async def test_no_headers_in_time_is_read_timeout() -> None:
    released = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await released.wait()
        writer.close()

    async with _raw_server(silent) as url, _production_client(llm_timeout_seconds=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url, content=b"{}")
        released.set()


async def test_body_cut_short_is_read_error_and_chunks_pass_as_they_arrive() -> None:
    first_read = asyncio.Event()

    async def breaks_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nSet-Cookie: a=b\r\n\r\nfirst")
        await writer.drain()
        await first_read.wait()
        writer.close()

    async with _raw_server(breaks_mid_body) as url, _production_client() as client:
        request = client.build_request("POST", url, content=b"{}")
        response = await client.send(request, stream=True)
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"first"
        first_read.set()
        with pytest.raises(httpx.ReadError):
            await anext(chunks)
        await response.aclose()
        # The upstream's cookie was dropped by the transport and never reaches the shared jar.
        assert "set-cookie" not in response.headers
        assert not client.cookies


async def test_a_batch_read_whole_keeps_the_honest_errors_and_decodes_like_httpx() -> None:
    """Batch calls read the body in one go (`UpstreamTransport.fetch`): a body cut short is still a ReadError,
    a body that stops arriving a ReadTimeout, and a gzip body is decoded by httpx with the cookie dropped."""
    stalled = asyncio.Event()

    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(1024)
        try:
            if b"/ok" in request:
                body = gzip.compress(b'{"ok":true}')
                head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nSet-Cookie: a=b\r\nContent-Length: {len(body)}"
                writer.write(head.encode() + b"\r\n\r\n" + body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
            await writer.drain()
            if b"/stall" in request:
                await stalled.wait()
        finally:
            writer.close()
            await writer.wait_closed()

    async with _raw_server(answers) as url, _production_client(llm_timeout_seconds=0.3) as client:
        with pytest.raises(httpx.ReadError):
            await client.post(f"{url}/cut", content=b"{}")
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{url}/stall", content=b"{}")
        stalled.set()
        response = await client.post(f"{url}/ok", content=b"{}")
    assert response.json() == {"ok": True}
    assert "set-cookie" not in response.headers
    # The headers as the upstream sent them (the gzip body's length, not the decoded one's).
    assert response.headers["content-length"] == str(len(gzip.compress(b'{"ok":true}')))
    assert not client.cookies


async def test_redirects_are_not_followed() -> None:
    async def redirects(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere.test/\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async with _raw_server(redirects) as url, _production_client() as client:
        response = await client.post(url, content=b"{}")
    assert response.status_code == 307


def test_tls_context_verifies_with_the_os_store() -> None:
    context = tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_shared_cookie_jar_keeps_nothing() -> None:
    client = _production_client()
    response = httpx.Response(
        200, headers={"set-cookie": "a=b; path=/"}, request=httpx.Request("GET", "http://upstream.test/")
    )
    client.cookies.extract_cookies(response)
    assert not client.cookies


def test_environment_proxies_are_read_like_httpx_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert environment_proxies() == {}
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("ALL_PROXY", "http://all.test:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert environment_proxies() == {"https": "http://proxy.test:3128", "all": "http://all.test:3128"}


async def test_with_an_egress_proxy_calls_go_to_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []
    answered = asyncio.Event()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        answered.set()
        writer.close()

    async with _raw_server(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        async with _production_client() as client:
            response = await client.get("http://upstream.test/v1/models")
        await asyncio.wait_for(answered.wait(), timeout=5)
    assert response.text == "ok"
    # A forward proxy is asked for the absolute URL.
    assert seen == [b"GET http://upstream.test/v1/models HTTP/1.1\r\n"]


def test_timeouts_come_from_settings() -> None:
    timeout = upstream_timeout(make_settings(llm_timeout_seconds=7, llm_connect_timeout_seconds=2))
    assert timeout == httpx.Timeout(7.0, connect=2.0, pool=2.0)


def test_no_key_means_no_client() -> None:
    assert OpenAIClient.from_settings(make_settings(openai_api_key=None)) is None
