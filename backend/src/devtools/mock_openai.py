"""The bundled offline upstream: a small OpenAI-compatible Chat Completions server with fault injection.

Run it with `python -m src.devtools.mock_openai --port 9100` (from `backend/`). It speaks OpenAI's wire format:
`POST /v1/chat/completions` answers a `chat.completion` with `usage`, or streams `chat.completion.chunk`s in OpenAI's
order (role-only first chunk, one chunk per word, a chunk with `finish_reason`, a `choices: []` usage chunk when
`stream_options.include_usage` is set, then `data: [DONE]`). Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.

Answers are deterministic: the model echoes the last user message and counts tokens as whitespace-separated words.
It honours `max_completion_tokens` (finish_reason `length`) and `stop`, rejects `max_tokens` and non-default
`temperature` on gpt-5/o-series models the way OpenAI does, and injects faults chosen by model name (see FAULTS).
`mock-words-N` answers exactly N words (benchmarks use it). It is a raw ASGI app, so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
STATS_PATH = "/_mock/stats"
DEFAULT_STREAM_DELAY_MS = 20.0
HANG_LIMIT_SECONDS = 600.0
BREAK_AFTER_CHUNKS = 3
CONTEXT_WINDOW = 128_000
FILLER_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett")
# OpenAI's edge sets cookies on API responses; a stateless client must never send them back.
_COOKIE_HEADER = [(b"set-cookie", b"__cf_bm=mock-affinity; path=/; HttpOnly")]
_WORDS_MODEL = re.compile(r"mock-words-(\d{1,6})")

# Model name -> injected fault. Anything else answers normally.
FAULTS = {
    "mock-401": "401 invalid key (the message quotes a key fragment, as OpenAI's does)",
    "mock-403": "403 permission denied",
    "mock-404": "404 model not found",
    "mock-400-context": "400 context_length_exceeded",
    "mock-429": "429 rate limit with retry-after: 1",
    "mock-429-quota": "429 insufficient_quota",
    "mock-500": "500 server error",
    "mock-503": "503 overloaded",
    "mock-hang": "no answer until the client gives up (past any timeout)",
    "mock-stream-break": "stream: the connection drops after a few chunks",
    "mock-stream-stall": "stream: stops sending after the first chunk, past any timeout",
}


class SimulatedConnectionDropError(Exception):
    """Raised mid-response so that uvicorn drops the connection, as a crashed upstream would."""


class UpstreamError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}


def _key_fragment(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            key = value.decode(errors="replace").removeprefix("Bearer ").strip()
            return f"{key[:8]}{'*' * 8}{key[-4:]}" if len(key) > 12 else "sk-****"
    return "(none)"


def _fault(model: str, scope: Scope) -> UpstreamError | None:
    if model == "mock-401":
        return UpstreamError(
            401,
            f"Incorrect API key provided: {_key_fragment(scope)}. You can find your API key "
            "at https://platform.openai.com/account/api-keys.",
            type_="invalid_request_error",
            code="invalid_api_key",
        )
    if model == "mock-403":
        return UpstreamError(403, "You are not allowed to sample from this model.", type_="permission_error")
    if model == "mock-404":
        return UpstreamError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            type_="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if model == "mock-400-context":
        return UpstreamError(
            400,
            f"This model's maximum context length is {CONTEXT_WINDOW} tokens. However, your "
            f"messages resulted in {CONTEXT_WINDOW + 1} tokens. Please reduce the length of the "
            "messages.",
            type_="invalid_request_error",
            code="context_length_exceeded",
            param="messages",
        )
    if model == "mock-429":
        return UpstreamError(
            429,
            f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3.",
            type_="requests",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )
    if model == "mock-429-quota":
        return UpstreamError(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            type_="insufficient_quota",
            code="insufficient_quota",
        )
    if model == "mock-500":
        return UpstreamError(
            500, "The server had an error while processing your request. Sorry about that!", type_="server_error"
        )
    if model == "mock-503":
        return UpstreamError(503, "The engine is currently overloaded, please try again later.", type_="server_error")
    return None


def _is_reasoning_model(model: str) -> bool:
    return model.startswith(("gpt-5", "o1", "o3", "o4"))


def _check_parameters(body: dict[str, Any]) -> None:
    model = body["model"]
    if "max_tokens" in body and _is_reasoning_model(model):
        raise UpstreamError(
            400,
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
            "'max_completion_tokens' instead.",
            type_="invalid_request_error",
            code="unsupported_parameter",
            param="max_tokens",
        )
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1 and _is_reasoning_model(model):
        raise UpstreamError(
            400,
            f"Unsupported value: 'temperature' does not support {temperature} with this model. "
            "Only the default (1) value is supported.",
            type_="invalid_request_error",
            code="unsupported_value",
            param="temperature",
        )


def _words(text: str) -> list[str]:
    return text.split()


def _answer_words(body: dict[str, Any]) -> list[str]:
    model = body["model"]
    words_model = _WORDS_MODEL.fullmatch(model)
    if words_model:
        return [FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(int(words_model.group(1)))]
    messages = body["messages"]
    last_user = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
    if not isinstance(last_user, str):
        last_user = ""
    turns = sum(1 for m in messages if m.get("role") == "user")
    quoted = " ".join(_words(last_user)[:40]) or "nothing"
    return _words(
        f"You said: {quoted} (offline demo answer from {model}; user turn {turns}, {len(_words(last_user))} words.)"
    )


def _prompt_tokens(body: dict[str, Any]) -> int:
    return sum(len(_words(m["content"])) for m in body["messages"] if isinstance(m.get("content"), str))


def _plan(body: dict[str, Any]) -> tuple[list[str], str]:
    """The answer's words after `max_completion_tokens` and `stop`, and its finish_reason."""
    words = _answer_words(body)
    finish_reason = "stop"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops:
        text = " ".join(words)
        cut = min((index for index in (text.find(s) for s in stops) if index >= 0), default=-1)
        if cut >= 0:
            words = _words(text[:cut])
    limit = body.get("max_completion_tokens")
    if isinstance(limit, int) and len(words) > limit:
        words, finish_reason = words[:limit], "length"
    return words, finish_reason


def _identity(kind: str, model: str, request_id: str) -> dict[str, Any]:
    """The fields every completion and chunk of one answer share."""
    return {
        "id": f"chatcmpl-mock{request_id[-8:]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_mock",
    }


def _usage(body: dict[str, Any], words: list[str]) -> dict[str, int]:
    prompt_tokens = _prompt_tokens(body)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}


def _pieces(words: list[str]) -> list[str]:
    return [word if index == 0 else f" {word}" for index, word in enumerate(words)]


class MockOpenAI:
    """The ASGI app. `stream_delay_ms` is the pause before each content chunk."""

    def __init__(self, *, stream_delay_ms: float = DEFAULT_STREAM_DELAY_MS) -> None:
        self.stream_delay = stream_delay_ms / 1000
        self._ids = itertools.count(1)
        # Counters for tests and benchmarks (GET /_mock/stats): did the service close streams it abandoned?
        self.stats = {
            "requests": 0,
            "streams_started": 0,
            "streams_completed": 0,
            "streams_client_closed": 0,
            "requests_with_cookies": 0,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        request_id = f"req_mock_{next(self._ids):08d}"
        try:
            if scope["path"] == "/health":
                await self._json(send, 200, {"status": "ok"}, request_id)
                return
            if scope["path"] == STATS_PATH:
                await self._json(send, 200, self.stats, request_id)
                return
            self.stats["requests"] += 1
            if any(name == b"cookie" for name, _ in scope["headers"]):
                self.stats["requests_with_cookies"] += 1
            if scope["path"] != CHAT_PATH:
                raise UpstreamError(
                    404, f"Invalid URL ({scope['method']} {scope['path']})", type_="invalid_request_error"
                )
            if scope["method"] != "POST":
                raise UpstreamError(405, "Method not allowed", type_="invalid_request_error")
            if not any(name == b"authorization" for name, _ in scope["headers"]):
                raise UpstreamError(401, "You didn't provide an API key.", type_="invalid_request_error")
            body = await self._read_json(receive)
            model = body["model"]
            if model == "mock-hang":
                await self._wait_for_disconnect(receive)
                return
            fault = _fault(model, scope)
            if fault is not None:
                raise fault
            _check_parameters(body)
            if body.get("stream"):
                await self._stream(body, receive, send, request_id)
            else:
                await self._complete(body, send, request_id)
        except UpstreamError as error:
            await self._json(send, error.status, error.body, request_id, error.headers)

    async def _read_json(self, receive: Receive) -> dict[str, Any]:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as exc:
            raise UpstreamError(
                400, "We could not parse the JSON body of your request.", type_="invalid_request_error"
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise UpstreamError(400, "you must provide a model parameter", type_="invalid_request_error", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UpstreamError(
                400, "'messages' must be a non-empty array", type_="invalid_request_error", param="messages"
            )
        return body

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        try:
            async with asyncio.timeout(HANG_LIMIT_SECONDS):
                while (await receive())["type"] != "http.disconnect":
                    continue
        except TimeoutError:
            return

    async def _complete(self, body: dict[str, Any], send: Send, request_id: str) -> None:
        words, finish_reason = _plan(body)
        answer = {
            **_identity("chat.completion", body["model"], request_id),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(body, words),
        }
        await self._json(send, 200, answer, request_id)

    async def _stream(self, body: dict[str, Any], receive: Receive, send: Send, request_id: str) -> None:
        model = body["model"]
        words, finish_reason = _plan(body)
        base = _identity("chat.completion.chunk", model, request_id)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        # Content chunks are the hot path of benchmarks: encode the frame once, then only each word.
        content_head, content_tail = chunk({"content": "\x00"}).split(b'"\\u0000"')

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"x-request-id", request_id.encode()),
                    (b"cache-control", b"no-cache"),
                    *_COOKIE_HEADER,
                ],
            }
        )

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        # Servers below ASGI spec 2.4 drop sends to a closed connection silently: watch for the disconnect. An
        # answer sent without pauses is over before a disconnect could matter, so it needs no watcher.
        client_closed = asyncio.Event()

        async def watch_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            client_closed.set()

        self.stats["streams_started"] += 1
        watched = bool(self.stream_delay) or model == "mock-stream-stall"
        watcher = asyncio.create_task(watch_for_disconnect()) if watched else None
        try:
            await emit(chunk({"role": "assistant", "content": "", "refusal": None}))
            for index, piece in enumerate(_pieces(words)):
                if model == "mock-stream-break" and index == BREAK_AFTER_CHUNKS:
                    raise SimulatedConnectionDropError("mock-stream-break: dropping the connection mid-stream")
                if model == "mock-stream-stall" and index == 1:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client_closed.wait(), HANG_LIMIT_SECONDS)
                if self.stream_delay:
                    await asyncio.sleep(self.stream_delay)
                if client_closed.is_set():
                    self.stats["streams_client_closed"] += 1
                    return
                await emit(content_head + json.dumps(piece).encode() + content_tail)
            await emit(chunk({}, finish_reason))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage_chunk = {**base, "choices": [], "usage": _usage(body, words)}
                await emit(b"data: " + json.dumps(usage_chunk, separators=(",", ":")).encode() + b"\n\n")
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            self.stats["streams_completed"] += 1
        finally:
            if watcher is not None:
                watcher.cancel()

    @staticmethod
    async def _json(
        send: Send, status: int, payload: dict[str, Any], request_id: str, headers: dict[str, str] | None = None
    ) -> None:
        content = json.dumps(payload, separators=(",", ":")).encode()
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
        raw_headers += _COOKIE_HEADER
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})


class _HideSimulatedDrops(logging.Filter):
    """uvicorn logs the exception that drops a `mock-stream-break` connection; it is the point, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedConnectionDropError))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Offline OpenAI-compatible upstream for demos and tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOCK_OPENAI_PORT", "9100")))
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=float(os.environ.get("MOCK_STREAM_DELAY_MS", DEFAULT_STREAM_DELAY_MS)),
        help="pause before each streamed word (default %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("uvicorn.error").addFilter(_HideSimulatedDrops())
    uvicorn.run(
        MockOpenAI(stream_delay_ms=args.delay_ms),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
