"""`OpenAIClient`: the one upstream client of the process, the SDK's `AsyncOpenAI` used through its public API.

Calls go through `AsyncOpenAI.post(path, cast_to=httpx.Response, ...)`, the SDK's documented way to reach an
endpoint raw (README "Undocumented endpoints"): the SDK's URL, auth and headers, timeouts and error classes,
without building a pydantic model per answer or per stream chunk, and with the caller's body sent as it is. The
SDK's retries are off (`max_retries=0`): the service retries by its own policy (core/llm/retry.py).

The HTTP client under it: without an egress proxy, `UpstreamTransport` (aiohttp; core/llm/transport.py); when
HTTP_PROXY, HTTPS_PROXY or ALL_PROXY is set, httpx's own transports, so that proxies and NO_PROXY are honoured
exactly as httpx and the SDK honour them. Either way: verified TLS from one context, no cookies, no redirects.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.request import getproxies

import httpx
from openai import AsyncOpenAI, RequestOptions

from src.core.config import Settings
from src.core.llm.transport import UpstreamTransport

CHAT_COMPLETIONS_PATH = "/chat/completions"
MODELS_PATH = "/models"
_PROXY_SCHEMES = ("http", "https", "all")


def tls_context() -> ssl.SSLContext:
    """Verified TLS: the OS trust store (which honours SSL_CERT_FILE / SSL_CERT_DIR and CAs an operator added),
    or certifi's bundle (httpx's default) when the OS has none, as in a container without CA certificates."""
    context = ssl.create_default_context()
    if context.cert_store_stats()["x509_ca"] or _has_default_ca_directory():
        return context
    return httpx.create_ssl_context()


def _has_default_ca_directory() -> bool:
    # CAs in a hashed directory are loaded lazily, so the store's count says nothing about them.
    capath = ssl.get_default_verify_paths().capath
    return bool(capath) and os.path.isdir(capath or "") and any(os.scandir(capath or "."))


def environment_proxies() -> dict[str, str]:
    """The egress proxies set in the environment, by scheme (what httpx reads: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY)."""
    found = getproxies()
    return {scheme: found[scheme] for scheme in _PROXY_SCHEMES if found.get(scheme)}


def _no_cookies() -> CookieJar:
    # One client serves every caller: a cookie one upstream answer set must never ride along on another call.
    # (A bare CookieJar: httpx keeps its policy, where wrapping it in httpx.Cookies would copy it into a new jar.)
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def upstream_timeout(settings: Settings) -> httpx.Timeout:
    connect = settings.llm_connect_timeout_seconds
    # `read` is the longest silence once the request is sent; waiting for a free connection is bounded by the
    # service's own slots (LLM_POOL_TIMEOUT_SECONDS), so the pool timeout only needs to cover connecting.
    return httpx.Timeout(settings.llm_timeout_seconds, connect=connect, pool=connect)


def upstream_limits(settings: Settings) -> httpx.Limits:
    # Keep-alive for every allowed connection: under steady load a closed idle socket is a new handshake.
    return httpx.Limits(
        max_connections=settings.llm_max_connections, max_keepalive_connections=settings.llm_max_connections
    )


class DirectUpstreamClient(httpx.AsyncClient):
    """The client when no egress proxy is set: `send` hands the SDK's finished request straight to the transport.

    The SDK builds every request complete (URL, auth header, body) and sends it with `send`; what httpx's `send`
    adds on top is for other clients: an auth flow, redirects (never followed here), event hooks (none) and the
    cookie jar (never used: one client serves every caller), and it cost ~8% of the service's CPU per call. A
    call that does ask for an auth flow or redirects gets httpx's own `send`. With a proxy configured this class
    is not used, so proxies and NO_PROXY stay httpx's.
    """

    def __init__(self, *, transport: UpstreamTransport, **options: Any) -> None:
        super().__init__(transport=transport, **options)
        self._upstream = transport

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if auth is not httpx.USE_CLIENT_DEFAULT or follow_redirects is not httpx.USE_CLIENT_DEFAULT:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if stream:
            return await self._upstream.handle_async_request(request)
        return await self._upstream.fetch(request)


def build_http_client(settings: Settings) -> httpx.AsyncClient:
    """The production HTTP client under the SDK (see the module docstring for the two transports)."""
    tls = tls_context()
    limits = upstream_limits(settings)
    common: dict[str, Any] = {
        "timeout": upstream_timeout(settings),
        "limits": limits,
        "cookies": _no_cookies(),
        "follow_redirects": False,
    }
    if environment_proxies():
        return httpx.AsyncClient(verify=tls, trust_env=True, **common)
    return DirectUpstreamClient(transport=UpstreamTransport(tls=tls, limits=limits), **common)


class OpenAIClient:
    """The client wrapper the service holds: the SDK's `AsyncOpenAI`, reached only through its public API."""

    def __init__(self, sdk: AsyncOpenAI) -> None:
        self._sdk = sdk
        # Absolute, made once: the SDK then parses it as is, instead of merging a path into its base URL on every
        # call (a tenth of a chat call's own time in the SDK).
        self._chat_completions_url = str(sdk.base_url).rstrip("/") + CHAT_COMPLETIONS_PATH

    @classmethod
    def from_settings(cls, settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> OpenAIClient | None:
        """The shared client, or None when no upstream key is configured (chat then answers 503).

        `http_client` lets tests inject a plain httpx client (respx intercepts it); production builds its own.
        """
        if settings.openai_api_key is None:
            return None
        return cls(
            AsyncOpenAI(
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                timeout=upstream_timeout(settings),
                max_retries=0,
                http_client=http_client or build_http_client(settings),
            )
        )

    def _call_options(self, call_id: str) -> RequestOptions:
        """The client's own settings, stated per call. Options left out are filled by the SDK with a deep copy of a
        default per field, and a POST without an idempotency key gets a fresh uuid4: together about a tenth of the
        SDK's time per call, for the same request on the wire."""
        return {
            "headers": {},
            "timeout": self._sdk.timeout,
            "max_retries": self._sdk.max_retries,
            # OpenAI's client never sends it (no idempotency header); were one set, retries of a call would share it.
            "idempotency_key": call_id,
        }

    @property
    def base_url(self) -> str:
        return str(self._sdk.base_url)

    async def create_chat_completion(self, body: Mapping[str, Any], *, call_id: str) -> httpx.Response:
        """POST the body to chat completions: the whole 2xx answer, or the SDK's error classes.

        `call_id` identifies the call (the request id): the SDK's idempotency key, kept for the call's retries.
        """
        return await self._sdk.post(
            self._chat_completions_url, cast_to=httpx.Response, body=body, options=self._call_options(call_id)
        )

    async def open_chat_completion_stream(self, body: Mapping[str, Any], *, call_id: str) -> httpx.Response:
        """POST a streaming request: a 2xx response whose body is not read yet (the caller must close it)."""
        streaming = True
        response = await self._sdk.post(
            self._chat_completions_url,
            cast_to=httpx.Response,
            body=body,
            options=self._call_options(call_id),
            stream=streaming,
        )
        assert isinstance(response, httpx.Response)
        return response

    async def list_models(self, *, timeout_seconds: float) -> httpx.Response:
        """GET the models list once, without retries (the startup check, the OpenAI-compatible `/v1/models`)."""
        return await self._sdk.get(
            MODELS_PATH, cast_to=httpx.Response, options={"timeout": timeout_seconds, "max_retries": 0}
        )

    async def retrieve_model(self, model: str, *, timeout_seconds: float) -> httpx.Response:
        """GET one model, without retries (as `list_models`)."""
        return await self._sdk.get(
            f"{MODELS_PATH}/{model}", cast_to=httpx.Response, options={"timeout": timeout_seconds, "max_retries": 0}
        )

    async def aclose(self) -> None:
        await self._sdk.close()
