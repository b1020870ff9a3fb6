"""The ASGI application: `create_app()` wires settings, logging, lifespan, middleware, error handlers and routers.

`uvicorn src.main:app` is the start command. `app` is built on first access (module `__getattr__`), not at import,
so importing this module (as the tests do) never reads the environment or `.env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

import httpx
import structlog
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig

from src.api import health, metrics, playground
from src.api.deps import require_admin_key
from src.api.middleware import REQUEST_ID_HEADER, BodyLimitMiddleware, RequestContextMiddleware
from src.api.openapi import install_openapi
from src.api.sse import StreamTimings
from src.api.v1.endpoints.llm import STREAM_ID_HEADER
from src.api.v1.router import chat_router, openai_router, operator_router
from src.core.config import Settings, get_settings
from src.core.errors import register_error_handlers
from src.core.keys import Access, KeysFileError, load_access
from src.core.ledger import Ledger
from src.core.limits import RATE_LIMIT_HEADERS, build_limiter
from src.core.llm.accounting import CallAccounting
from src.core.llm.call_record import CallLog
from src.core.llm.client import OpenAIClient, environment_proxies
from src.core.llm.resumable import build_resumable_streams
from src.core.llm.service import LLMService
from src.core.metrics import Metrics
from src.core.shutdown import Drain
from src.utils.logging import configure_logging

SERVICE_TITLE = "LLM chat service"
SERVICE_VERSION = "1.1.0"


class AppState(TypedDict):
    llm_service: LLMService
    ledger: Ledger


# The service's telemetry is its Prometheus metrics and JSON logs. FastAPI's native OpenTelemetry, on by default, looks
# up the global OpenTelemetry providers on every request (about 1% of a chat call) to find that none is configured.
_NO_NATIVE_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings | None = None, *, http_client: httpx.AsyncClient | None = None) -> FastAPI:
    """Build the app; `http_client` replaces the upstream transport (tests inject a respx-mocked one).

    Raises `KeysFileError` for a malformed SERVICE_KEYS_FILE or a key that is both a chat and an admin key.
    """
    settings = settings or get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    log = structlog.get_logger("startup")
    access = load_access(
        keys_file=settings.service_keys_file,
        service_api_keys=settings.service_api_keys,
        admin_api_keys=settings.admin_api_keys,
    )
    metrics_recorder = Metrics(directory=settings.metrics_dir)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[AppState]:
        # Everything started is stopped in reverse order, however far startup got.
        async with contextlib.AsyncExitStack() as started:
            started.callback(log.info, "service_stopped")
            metrics_recorder.open()
            started.callback(metrics_recorder.close)
            client = OpenAIClient.from_settings(settings, http_client=http_client)
            if client is not None:
                started.push_async_callback(client.aclose)
            _log_upstream(log, settings, client, access)
            limiter = build_limiter(settings.redis_url, on_redis_error=metrics_recorder.redis_error)
            started.push_async_callback(limiter.aclose)
            ledger = Ledger(settings.database_url, on_dropped=metrics_recorder.ledger_rows_dropped)
            # Closed after the drain: every call has ended by then, so its last rows are queued and get written.
            started.push_async_callback(ledger.aclose)
            await ledger.start()
            drain.chain_server_signals()
            started.callback(drain.restore_server_signals)
            accounting = CallAccounting(
                call_log=CallLog(),
                limiter=limiter,
                ledger=ledger,
                metrics=metrics_recorder,
                default_token_reserve=settings.llm_default_token_reserve,
            )
            resumable = build_resumable_streams(
                settings, redis_url=settings.redis_url, drain=drain, on_redis_error=metrics_recorder.redis_error
            )
            # Closed before the ledger and the limits: the streams' producers still log, write rows and settle.
            started.push_async_callback(resumable.aclose)
            resumable.start_listening()
            service = LLMService(
                client=client, settings=settings, drain=drain, accounting=accounting, resumable=resumable
            )
            if settings.llm_startup_check:
                # In the background: startup never waits for (or fails on) the upstream.
                started.callback(asyncio.create_task(service.check_upstream()).cancel)
            # Everything alive now (modules, the SDK's ~1,000 type modules, schemas) lives as long as the process.
            # Freezing it keeps the collector from re-scanning ~130k objects on every full collection: those
            # scans were the latency spikes (p99 20x p50) under load.
            gc.collect()
            gc.freeze()
            yield {"llm_service": service, "ledger": ledger}

    # The process's drain state: begun by the server's stop signal (chained in the lifespan), read by every call.
    drain = Drain(grace_seconds=settings.llm_shutdown_grace_seconds)
    app = FastAPI(title=SERVICE_TITLE, version=SERVICE_VERSION, lifespan=lifespan, telemetry=_NO_NATIVE_TELEMETRY)
    app.state.settings = settings
    app.state.drain = drain
    app.state.access = access
    app.state.metrics = metrics_recorder
    app.state.stream_timings = StreamTimings(
        keepalive_seconds=settings.llm_stream_keepalive_seconds,
        send_timeout_seconds=settings.llm_stream_send_timeout_seconds,
    )
    install_openapi(app, settings, chat_keys=bool(access.chat))
    register_error_handlers(app)
    app.include_router(health.router)
    # The chat routes check chat keys themselves (api/deps.py: ChatKeyRoute); the operator routes get their auth
    # dependency only where keys exist, so the OpenAPI document says exactly when a bearer is needed.
    app.include_router(chat_router)
    app.include_router(openai_router)
    operator_auth = None if access.open else [Depends(require_admin_key)]
    app.include_router(operator_router, dependencies=operator_auth)
    app.include_router(metrics.router, dependencies=operator_auth)
    if settings.playground_enabled:
        # A static page without secrets: open like /health; the calls it makes carry the key typed into it.
        app.include_router(playground.router)
    # add_middleware wraps what is there: the last added is the outermost (see api/middleware.py for the order).
    app.add_middleware(BodyLimitMiddleware, max_request_bytes=settings.max_request_bytes)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            # Any request header: the OpenAI SDKs in a browser send their own (`x-stainless-*`, `openai-*`), and the
            # allowed origins, not a header list, are what keeps other sites out.
            allow_headers=["*"],
            # What a browser's script may read: ids to correlate, resume and stop, and the limits to back off.
            expose_headers=[REQUEST_ID_HEADER.decode(), STREAM_ID_HEADER, "Retry-After", *RATE_LIMIT_HEADERS],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics_recorder)
    return app


def _log_upstream(
    log: structlog.typing.FilteringBoundLogger, settings: Settings, client: OpenAIClient | None, access: Access
) -> None:
    log.info("service_keys", chat_keys=len(access.chat), admin_keys=len(access.admin), open=access.open)
    if client is None:
        log.warning("llm_not_configured", detail="OPENAI_API_KEY is unset: chat answers 503 llm_not_configured")
        return
    # Proxy URLs can carry credentials: say which schemes are proxied, never the URLs.
    proxied = sorted(environment_proxies())
    if settings.llm_demo_upstream:
        log.warning(
            "offline_demo_upstream",
            detail="Talking to the bundled OFFLINE DEMO upstream, not OpenAI: answers are canned.",
            upstream=client.base_url,
        )
        return
    log.info("llm_upstream", upstream=client.base_url, default_model=settings.llm_default_model, proxied=proxied)


def __getattr__(name: str) -> FastAPI:
    """`src.main:app` for uvicorn, built from the environment the first time it is asked for."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        app = create_app()
    except KeysFileError as error:
        # The server's start command: end with the message that names the line and field, not a traceback.
        raise SystemExit(f"llm-service: {error}") from None
    globals()["app"] = app
    return app
