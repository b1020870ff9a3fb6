"""The production upstream transport: honest connection errors, no cookie jar."""

from __future__ import annotations

import httpx
import pytest

from src.core.llm.client import UpstreamHttpClient, UpstreamTransport, build_openai_client
from src.devtools.servers import free_port
from tests.conftest import make_settings


async def test_refused_connection_is_connect_error_not_timeout() -> None:
    async with httpx.AsyncClient(transport=UpstreamTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")


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
