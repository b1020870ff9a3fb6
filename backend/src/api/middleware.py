"""Pure ASGI middleware: request ids, the canonical request log line, last-resort errors; the body-size cap.

Pure ASGI rather than `BaseHTTPMiddleware`, which breaks contextvars and buffers streams. Order, outermost first:
`RequestContextMiddleware` (so every response, CORS preflights included, has an id and a log line), then CORS
(when configured), then `BodyLimitMiddleware` (so browsers can read its 413).
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Protocol

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.core.errors import ErrorCode, ServiceError, error_body, is_openai_path, openai_error_body

REQUEST_ID_HEADER = b"x-request-id"
UNMATCHED_ROUTE = "unmatched"


class RequestMetrics(Protocol):
    def request_finished(self, *, route: str, seconds: float) -> None: ...


_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class RequestContextMiddleware:
    """Wraps every HTTP request.

    - Picks the request id (the caller's `X-Request-ID` when sane, else a new one), binds it to the log context,
      stores it in `request.state.request_id` and echoes it on the response.
    - Logs one line per request: method, path, status, duration.
    - Turns an exception nobody handled into a 500 `internal_error` envelope (logged with its traceback).
    """

    def __init__(self, app: ASGIApp, *, metrics: RequestMetrics | None = None) -> None:
        self.app = app
        self._metrics = metrics
        self._log = structlog.get_logger("http").bind()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        response_started = False
        request_id_header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            self._log.exception("unhandled_error", method=scope["method"], path=scope["path"])
            if not response_started:
                internal = ServiceError(ErrorCode.INTERNAL_ERROR, "The service failed unexpectedly.", status_code=500)
                await send_error(send_with_request_id, internal, request_id, path=scope["path"])
        finally:
            seconds = time.perf_counter() - started
            self._log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(seconds * 1000, 2),
            )
            if self._metrics is not None:
                # The route's template, not the raw path, so the metric's labels stay bounded.
                route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
                self._metrics.request_finished(route=route, seconds=seconds)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                if _SANE_REQUEST_ID.fullmatch(value):
                    return str(value.decode())
                break
        # 128 random bits as 32 hex characters, like uuid4().hex without building a UUID object per request.
        return secrets.token_hex(16)


class BodyLimitMiddleware:
    """Caps request bodies at `max_request_bytes`, by `Content-Length` and by counting chunked uploads (413)."""

    def __init__(self, app: ASGIApp, *, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_receive = await self._bounded_body(scope, receive)
        if body_receive is None:
            too_large = ServiceError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"The request body exceeds {self.max_request_bytes} bytes.",
                status_code=413,
            )
            await send_error(send, too_large, scope.get("state", {}).get("request_id"), path=scope["path"])
            return
        await self.app(scope, body_receive, send)

    async def _bounded_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the body up to the cap and replay it; None when it is too large.

        Reading here (bodies are small JSON that the endpoint reads whole anyway) is what makes the cap hold for
        chunked uploads without `Content-Length`: the framework would turn an error raised mid-read into a 400.
        """
        declared_length: int | None = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                has_body = True
                try:
                    declared_length = int(value)
                except ValueError:
                    declared_length = None
            elif name == b"transfer-encoding":
                has_body = True
        if not has_body:
            return receive
        if declared_length is not None and declared_length > self.max_request_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left mid-upload: hand the app the disconnect.
                pending: Message | None = message

                async def replay_disconnect() -> Message:
                    nonlocal pending
                    if pending is not None:
                        replayed, pending = pending, None
                        return replayed
                    return await receive()

                return replay_disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = chunks[0] if len(chunks) == 1 else b"".join(chunks)

        async def replay_body() -> Message:
            nonlocal body
            if body is not None:
                replayed, body = body, None
                return {"type": "http.request", "body": replayed, "more_body": False}
            # After the body, the app only waits for the disconnect (streams watch it to stop the upstream).
            return await receive()

        return replay_body


async def send_error(send: Send, error: ServiceError, request_id: str | None, *, path: str) -> None:
    """Write the error envelope as a complete response (for errors raised outside the framework's handlers), in the
    route's presentation (OpenAI's under `/v1/`, see core/errors.py)."""
    if is_openai_path(path):
        status, body = openai_error_body(error)
    else:
        status, body = error.status_code, error_body(error.code, error.message, request_id)
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if status == 413:
        # The rest of an oversized upload is not read: the connection cannot be reused.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
