"""A tiny app for the multi-worker metrics test: one call counted per request, and `/metrics`; nothing else.

Apart from the service on purpose: it shows that `src.core.metrics` adds up over uvicorn's worker processes
whatever the service does around it. Run it with `uvicorn tests.e2e.metrics_app:create_app --factory` from
backend/ (a factory: importing this module builds nothing).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response

from src.core.metrics import OUTCOME_OK, Metrics

MODEL = "test-model"
KEY_NAME = "test-key"
WORKER_PID_HEADER = "X-Worker-Pid"


def create_app() -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        metrics.open()
        try:
            yield
        finally:
            metrics.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/call")
    async def call() -> dict[str, int]:
        metrics.call_finished(
            model=MODEL,
            key=KEY_NAME,
            outcome=OUTCOME_OK,
            prompt_tokens=1,
            completion_tokens=1,
            upstream_seconds=0.01,
            ttft_seconds=None,
        )
        return {"pid": os.getpid()}

    @app.get("/metrics")
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type, headers={WORKER_PID_HEADER: str(os.getpid())})

    return app
