"""The bundled upstream speaks OpenAI's Chat Completions wire format: driven in-process over ASGI, no sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from src.devtools import mock_openai
from src.devtools.mock_openai import FILLER_WORDS, Message, MockOpenAI, main

KEY = "sk-test-mock-key-0123456789"
CHAT = "/v1/chat/completions"
STATS = "/_mock/stats"
SLOW_FIRST_SECONDS = 0.2
# asyncio may fire a timer up to its clock resolution early; this covers that and float rounding.
TIMER_SLACK_SECONDS = 0.01
# Bounds every in-process ASGI run, so a mock that forgot to stop fails the test instead of hanging it.
DRIVE_TIMEOUT_SECONDS = 5.0
CALL_ID = re.compile(r"call_mock\d{8}_(\d+)_(\d+)")


@contextlib.asynccontextmanager
async def open_client(app: MockOpenAI, headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock.test", headers=headers) as client:
        yield client


@pytest.fixture
def mock() -> MockOpenAI:
    return MockOpenAI(stream_delay_ms=0)


@pytest.fixture
async def client(mock: MockOpenAI) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(mock, {"Authorization": f"Bearer {KEY}"}) as http_client:
        yield http_client


def chat_request(content: Any = "Hello there", *, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def echo(text: str, *, model: str = "gpt-4o-mini", turn: int = 1) -> str:
    """The answer the mock gives to `text`, the last user message."""
    return f"You said: {text} (offline demo answer from {model}; user turn {turn}, {len(text.split())} words.)"


def tokens(text: str) -> list[str]:
    """How the mock streams `text`: one piece per word, each after the first keeping its leading space."""
    return [word if index == 0 else f" {word}" for index, word in enumerate(text.split(" "))]


def usage(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def error(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> Any:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_payloads(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON payload of every `data:` line of a stream, which must end with `data: [DONE]`."""
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.text.endswith("\n\ndata: [DONE]\n\n")
    events = response.text.split("\n\n")[:-2]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [json.loads(event.removeprefix("data: ")) for event in events]


def deltas(payloads: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    """Choice `index`'s deltas, role chunk first, finish chunk's `{}` last."""
    return [choice["delta"] for payload in payloads for choice in payload["choices"] if choice["index"] == index]


def streamed(payloads: list[dict[str, Any]], key: str = "content", index: int = 0) -> str:
    return "".join(delta.get(key) or "" for delta in deltas(payloads, index))


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


Sent = list[tuple[float, Message]]


async def drive(app: MockOpenAI, body: dict[str, Any], sent: Sent, *, leave_after_first_chunk: bool = False) -> None:
    """One request straight through the ASGI app; `sent` gets every message it sends, with when it sent it.

    The client either stays until the end or leaves once the first body chunk arrives.
    """
    first_chunk = asyncio.Event()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if leave_after_first_chunk:
            await first_chunk.wait()
            return {"type": "http.disconnect"}
        staying: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        return await staying

    async def send(message: Message) -> None:
        sent.append((time.monotonic(), message))
        if message["type"] == "http.response.body":
            first_chunk.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")],
    }
    async with asyncio.timeout(DRIVE_TIMEOUT_SECONDS):
        await app(scope, receive, send)


def body_deltas(sent: Sent) -> list[dict[str, Any]]:
    chunks = [message["body"] for _, message in sent if message["type"] == "http.response.body"]
    return [json.loads(chunk.removeprefix(b"data: "))["choices"][0]["delta"] for chunk in chunks]


# What existed before: echo, stream order, usage, stop, limits, parameter checks, faults, cookies, request ids.


async def test_batch_answer_echoes_the_last_user_message_in_openais_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json=chat_request("Tell me about sockets"))
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req_mock_00000001"
    assert response.headers["set-cookie"].startswith("__cf_bm=")
    body = response.json()
    assert body["id"] == "chatcmpl-mock00000001"
    assert (body["object"], body["model"], body["system_fingerprint"]) == ("chat.completion", "gpt-4o-mini", "fp_mock")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": echo("Tell me about sockets"), "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == usage(4, 16)


async def test_stream_sends_role_chunk_one_chunk_per_word_finish_usage_then_done(client: httpx.AsyncClient) -> None:
    body = chat_request("alpha beta", stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(await client.post(CHAT, json=body))
    assert all(payload["object"] == "chat.completion.chunk" for payload in payloads)
    assert deltas(payloads) == [
        {"role": "assistant", "content": "", "refusal": None},
        *({"content": token} for token in tokens(echo("alpha beta"))),
        {},
    ]
    assert payloads[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"] == usage(2, 14)


async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    payloads = sse_payloads(await client.post(CHAT, json=chat_request(stream=True)))
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in payload for payload in payloads)


async def test_mock_words_n_answers_exactly_n_completion_tokens_without_reasoning(client: httpx.AsyncClient) -> None:
    words = " ".join((FILLER_WORDS * 2)[:12])
    batch = await post(client, chat_request(model="mock-words-12"))
    assert batch["choices"][0]["message"]["content"] == words
    assert batch["usage"] == usage(2, 12)
    body = chat_request(model="mock-words-12", stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(await client.post(CHAT, json=body))
    assert deltas(payloads)[1:-1] == [{"content": token} for token in tokens(words)]
    assert payloads[-1]["usage"] == usage(2, 12, cached=2)


async def test_stop_cuts_the_answer_before_the_stop_sequence(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request("alpha beta gamma", stop=["beta"]))
    assert answer["choices"][0]["message"]["content"] == "You said: alpha"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 3


async def test_max_completion_tokens_limits_every_choice(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request("one two three four five", max_completion_tokens=3, n=2))
    assert [choice["message"]["content"] for choice in answer["choices"]] == ["You said: one"] * 2
    assert [choice["finish_reason"] for choice in answer["choices"]] == ["length"] * 2
    assert answer["usage"] == usage(5, 6)


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"max_tokens": 5}, "max_tokens", "unsupported_parameter"),
        ({"temperature": 0.2}, "temperature", "unsupported_value"),
    ],
    ids=["max_tokens", "temperature"],
)
async def test_reasoning_models_reject_max_tokens_and_non_default_temperature(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, code: str
) -> None:
    response = await client.post(CHAT, json=chat_request(model="gpt-5-mini", **extra))
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


@pytest.mark.parametrize(
    ("model", "status", "type_", "code"),
    [
        ("mock-401", 401, "invalid_request_error", "invalid_api_key"),
        ("mock-403", 403, "permission_error", None),
        ("mock-404", 404, "invalid_request_error", "model_not_found"),
        ("mock-400-context", 400, "invalid_request_error", "context_length_exceeded"),
        ("mock-429", 429, "requests", "rate_limit_exceeded"),
        ("mock-429-quota", 429, "insufficient_quota", "insufficient_quota"),
        ("mock-500", 500, "server_error", None),
        ("mock-503", 503, "server_error", None),
    ],
)
async def test_fault_models_answer_openais_errors(
    client: httpx.AsyncClient, model: str, status: int, type_: str, code: str | None
) -> None:
    response = await client.post(CHAT, json=chat_request(model=model, stream=True))
    assert response.status_code == status
    assert (response.json()["error"]["type"], response.json()["error"]["code"]) == (type_, code)
    assert response.headers.get("retry-after") == ("1" if model == "mock-429" else None)


async def test_routes_answer_health_404_for_unknown_paths_and_405_for_wrong_methods(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    unknown = await client.get("/v1/embeddings")
    assert unknown.status_code == 404
    assert unknown.json() == error("Invalid URL (GET /v1/embeddings)")
    assert (await client.get(CHAT)).status_code == 405
    assert (await client.post("/v1/models")).status_code == 405


async def test_chat_needs_an_authorization_header(mock: MockOpenAI) -> None:
    async with open_client(mock) as anonymous:
        response = await anonymous.post(CHAT, json=chat_request())
    assert response.status_code == 401
    assert response.json() == error("You didn't provide an API key.")


async def test_stop_may_be_a_single_string_and_anything_else_is_400_on_param_stop(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request("alpha beta gamma", stop="gamma"))
    assert answer["choices"][0]["message"]["content"] == "You said: alpha beta"
    response = await client.post(CHAT, json=chat_request(stop=[1]))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stop"


async def test_stream_break_drops_the_connection_after_three_content_chunks(mock: MockOpenAI) -> None:
    sent: Sent = []
    with pytest.raises(mock_openai.SimulatedConnectionDropError):
        await drive(mock, chat_request(model="mock-stream-break", stream=True), sent)
    assert body_deltas(sent) == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "You"},
        {"content": " said:"},
        {"content": " Hello"},
    ]
    assert (mock.stats["streams_started"], mock.stats["streams_completed"]) == (1, 0)


async def test_stream_with_a_delay_stops_and_counts_a_client_that_leaves() -> None:
    app = MockOpenAI(stream_delay_ms=1)
    sent: Sent = []
    await drive(app, chat_request(model="mock-words-300", stream=True), sent, leave_after_first_chunk=True)
    assert body_deltas(sent) == [{"role": "assistant", "content": "", "refusal": None}]
    assert (app.stats["streams_client_closed"], app.stats["streams_completed"]) == (1, 0)


# 1. mock-slow-first-S


async def test_slow_first_batch_answers_normally_after_s_seconds(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    answer = await post(client, chat_request(model=f"mock-slow-first-{SLOW_FIRST_SECONDS}"))
    assert time.monotonic() - started >= SLOW_FIRST_SECONDS - TIMER_SLACK_SECONDS
    assert answer["choices"][0]["message"]["content"] == echo("Hello there", model="mock-slow-first-0.2")


async def test_slow_first_stream_sends_headers_and_role_chunk_at_once_then_waits_s_seconds(mock: MockOpenAI) -> None:
    sent: Sent = []
    await drive(mock, chat_request(model=f"mock-slow-first-{SLOW_FIRST_SECONDS}", stream=True), sent)
    (started_at, start), (role_at, role), (answer_at, answer) = sent[:3]
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    assert json.loads(role["body"].removeprefix(b"data: "))["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
    }
    assert json.loads(answer["body"].removeprefix(b"data: "))["choices"][0]["delta"] == {"content": "You"}
    assert role_at - started_at < SLOW_FIRST_SECONDS / 2
    assert answer_at - role_at >= SLOW_FIRST_SECONDS - TIMER_SLACK_SECONDS
    assert sent[-1][1]["body"] == b"data: [DONE]\n\n"
    assert mock.stats["streams_completed"] == 1


async def test_slow_first_stream_stops_and_counts_a_client_that_leaves_during_the_wait(mock: MockOpenAI) -> None:
    # 600 s would outlast DRIVE_TIMEOUT_SECONDS: the stream must notice the client left, not sit out the wait.
    sent: Sent = []
    await drive(mock, chat_request(model="mock-slow-first-600", stream=True), sent, leave_after_first_chunk=True)
    assert body_deltas(sent) == [{"role": "assistant", "content": "", "refusal": None}]
    assert (mock.stats["streams_client_closed"], mock.stats["streams_completed"]) == (1, 0)


# 2. mock-429-wait-N


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
async def test_429_wait_n_is_a_rate_limit_with_retry_after_n(client: httpx.AsyncClient, stream: bool) -> None:
    response = await client.post(CHAT, json=chat_request(model="mock-429-wait-7", stream=stream))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json() == error(
        "Rate limit reached for mock-429-wait-7 on requests per min (RPM): Limit 3, Used 3.",
        type_="requests",
        code="rate_limit_exceeded",
    )


# 3. mock-flaky-K


async def test_flaky_k_fails_the_first_k_requests_per_prompt_with_503_then_answers(client: httpx.AsyncClient) -> None:
    responses = [await client.post(CHAT, json=chat_request("retry me", model="mock-flaky-2")) for _ in range(4)]
    assert [response.status_code for response in responses] == [503, 503, 200, 200]
    assert responses[0].json() == error(
        "The engine is currently overloaded, please try again later.", type_="server_error"
    )
    assert responses[2].json()["choices"][0]["message"]["content"] == echo("retry me", model="mock-flaky-2")
    other_prompt = await client.post(CHAT, json=chat_request("another prompt", model="mock-flaky-2"))
    assert other_prompt.status_code == 503


async def test_flaky_memory_is_bounded_and_forgets_the_least_recent_prompt(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_openai, "FLAKY_PROMPTS_LIMIT", 2)
    statuses = [
        (await client.post(CHAT, json=chat_request(prompt, model="mock-flaky-1"))).status_code
        for prompt in ("a", "b", "c", "a", "c")
    ]
    # "a" was forgotten when "c" came, so it fails again; "c" is still remembered.
    assert statuses == [503, 503, 503, 503, 200]


# 4. Stats


async def test_stats_count_chat_requests_by_model_and_models_calls(client: httpx.AsyncClient) -> None:
    for model in ("gpt-4o-mini", "gpt-4o-mini", "mock-words-3", "mock-500"):
        await client.post(CHAT, json=chat_request(model=model))
    await client.get("/v1/models")
    await client.get("/v1/models/gpt-5")
    stats = (await client.get(STATS)).json()
    assert stats == {
        "requests": 6,
        "streams_started": 0,
        "streams_completed": 0,
        "streams_client_closed": 0,
        "requests_with_cookies": 5,
        "models_requests": 2,
        "requests_by_model": {"gpt-4o-mini": 2, "mock-words-3": 1, "mock-500": 1},
    }


# 5. Models


async def test_models_list_shows_the_fixed_set_in_openais_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == [
        "gpt-5-mini",
        "gpt-5",
        "gpt-4.1-mini",
        "gpt-4o-mini",
        "mock-tools",
        "mock-refusal",
    ]
    for model in listing["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == ("mock" if model["id"].startswith("mock-") else "system")


async def test_models_retrieve_answers_the_model_object(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/gpt-4.1-mini")
    assert response.status_code == 200
    assert response.json() == {"id": "gpt-4.1-mini", "object": "model", "created": 1744318173, "owned_by": "system"}


async def test_models_retrieve_of_an_unknown_model_is_404_model_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/gpt-unknown")
    assert response.status_code == 404
    assert response.json() == error(
        "The model `gpt-unknown` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/gpt-5"])
async def test_models_need_an_authorization_header(mock: MockOpenAI, path: str) -> None:
    async with open_client(mock) as anonymous:
        response = await anonymous.get(path)
    assert response.status_code == 401
    assert response.json() == error("You didn't provide an API key.")


# 6. Upstream key check


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", CHAT, chat_request()), ("GET", "/v1/models", None), ("GET", "/v1/models/gpt-5", None)],
    ids=["chat", "models", "model"],
)
async def test_api_key_answers_any_other_bearer_401_invalid_api_key(
    method: str, path: str, body: dict[str, Any] | None
) -> None:
    app = MockOpenAI(stream_delay_ms=0, api_key=KEY)
    async with open_client(app, {"Authorization": "Bearer sk-wrong-key-abcdefghijkl"}) as client:
        response = await client.request(method, path, json=body)
    assert response.status_code == 401
    assert response.json() == error(
        "Incorrect API key provided: sk-wrong********ijkl. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )
    assert KEY not in response.text


async def test_api_key_accepts_exactly_that_bearer() -> None:
    app = MockOpenAI(stream_delay_ms=0, api_key=KEY)
    async with open_client(app, {"Authorization": f"Bearer {KEY}"}) as client:
        assert (await client.post(CHAT, json=chat_request())).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.get("/v1/models/gpt-5")).status_code == 200


# 7. Command line: TLS and the key reach uvicorn


def _captured_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    runs: list[tuple[Any, dict[str, Any]]] = []

    def run(app: Any, **options: Any) -> None:
        runs.append((app, options))

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.delenv("MOCK_OPENAI_API_KEY", raising=False)
    return runs


def test_cli_passes_tls_files_and_the_api_key_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _captured_run(monkeypatch)
    main(["--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem", "--api-key", KEY])
    [(app, options)] = runs
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == ("cert.pem", "key.pem")
    assert isinstance(app, MockOpenAI)
    assert app.api_key == KEY


def test_cli_refuses_a_key_file_without_a_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _captured_run(monkeypatch)
    with pytest.raises(SystemExit):
        main(["--ssl-keyfile", "key.pem"])
    assert runs == []


def test_cli_reads_the_api_key_from_the_environment_and_serves_plain_http_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _captured_run(monkeypatch)
    monkeypatch.setenv("MOCK_OPENAI_API_KEY", KEY)
    main([])
    [(app, options)] = runs
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (None, None)
    assert app.api_key == KEY


# 8. Content parts, tool messages, assistant tool calls


async def test_content_parts_echo_their_text_and_each_image_costs_85_prompt_tokens(client: httpx.AsyncClient) -> None:
    content = [
        {"type": "text", "text": "What is"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "text", "text": "in this picture"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}},
    ]
    answer = await post(client, chat_request(content))
    assert answer["choices"][0]["message"]["content"] == echo("What is in this picture")
    assert answer["usage"]["prompt_tokens"] == 5 + 2 * 85


async def test_history_with_assistant_tool_calls_null_content_and_tool_messages_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    answer = await post(client, {"model": "gpt-4o-mini", "messages": messages})
    assert answer["choices"][0]["message"]["content"] == echo("And tomorrow?", turn=2)
    assert answer["usage"]["prompt_tokens"] == 3 + 2 + 2


# 9. Usage details: reasoning and cached tokens


async def test_reasoning_model_counts_reasoning_tokens_inside_completion_tokens(client: httpx.AsyncClient) -> None:
    batch = await post(client, chat_request(model="gpt-5-mini"))
    assert batch["choices"][0]["message"]["content"] == echo("Hello there", model="gpt-5-mini")
    assert batch["usage"] == usage(2, 14 + 14, reasoning=14)
    body = chat_request("Hi", model="o4-mini", stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(await client.post(CHAT, json=body))
    assert payloads[-1]["usage"] == usage(1, 13 + 13, reasoning=13)


async def test_reasoning_tokens_come_first_within_max_completion_tokens(client: httpx.AsyncClient) -> None:
    starved = await post(client, chat_request(model="gpt-5-mini", max_completion_tokens=3))
    assert starved["choices"][0]["message"]["content"] == ""
    assert starved["choices"][0]["finish_reason"] == "length"
    assert starved["usage"] == usage(2, 3, cached=0, reasoning=3)
    partial = await post(client, chat_request("Hi", model="gpt-5", max_completion_tokens=16))
    assert partial["choices"][0]["message"]["content"] == "You said: Hi"
    assert partial["choices"][0]["finish_reason"] == "length"
    assert partial["usage"] == usage(1, 16, reasoning=13)


async def test_a_message_list_seen_before_is_reported_as_cached(client: httpx.AsyncClient) -> None:
    first = await post(client, chat_request("same prompt"))
    again = await post(client, chat_request("same prompt", model="gpt-4.1-mini"))
    other = await post(client, chat_request("other prompt"))
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 2, "audio_tokens": 0}
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_prompt_cache_is_bounded_and_forgets_the_least_recent_message_list(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_openai, "PROMPT_CACHE_ENTRIES", 1)
    cached = [
        (await post(client, chat_request(prompt)))["usage"]["prompt_tokens_details"]["cached_tokens"]
        for prompt in ("first", "first", "second", "first")
    ]
    assert cached == [0, 1, 0, 0]


# 10. Structured output

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "code": {"type": "string", "maxLength": 4},
        "when": {"type": "string", "format": "date"},
        "count": {"type": "integer", "minimum": 3},
        "score": {"type": "number"},
        "done": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "color": {"type": "string", "enum": ["red", "green"]},
        "kind": {"const": "report"},
        "note": {"type": ["null", "string"]},
        "owner": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]},
    },
    "required": ["title", "code", "when", "count", "score", "done", "tags", "color", "kind", "note", "owner"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "admin": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
        }
    },
}
SCHEMA_PROMPT = "Plan the quarterly review meeting"
SCHEMA_DOCUMENT = {
    "title": "Plan the quarterly",
    "code": "Plan",
    "when": "2025-01-01",
    "count": 3,
    "score": 1.5,
    "done": True,
    "tags": ["Plan the quarterly", "Plan the quarterly"],
    "color": "red",
    "kind": "report",
    "note": "Plan the quarterly",
    "owner": {"name": "Plan the quarterly", "admin": True},
}


def json_schema_format(schema: Any = SCHEMA, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "report", "schema": schema, "strict": True, **extra}}


async def test_json_object_batch_answer_is_the_echo_in_an_answer_field(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(response_format={"type": "json_object"}))
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"answer": echo("Hello there")}


async def test_json_object_stream_sends_the_document_in_several_pieces(client: httpx.AsyncClient) -> None:
    payloads = sse_payloads(
        await client.post(CHAT, json=chat_request(response_format={"type": "json_object"}, stream=True))
    )
    assert len(deltas(payloads)) > 3
    assert json.loads(streamed(payloads)) == {"answer": echo("Hello there")}


async def test_json_schema_batch_answer_is_a_document_generated_from_the_schema(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(SCHEMA_PROMPT, response_format=json_schema_format()))
    assert json.loads(answer["choices"][0]["message"]["content"]) == SCHEMA_DOCUMENT
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_json_schema_stream_sends_the_same_document_in_several_pieces(client: httpx.AsyncClient) -> None:
    body = chat_request(SCHEMA_PROMPT, response_format=json_schema_format(), stream=True)
    payloads = sse_payloads(await client.post(CHAT, json=body))
    pieces = deltas(payloads)[1:-1]
    assert len(pieces) > 3
    assert all(set(piece) == {"content"} for piece in pieces)
    assert json.loads(streamed(payloads)) == SCHEMA_DOCUMENT


async def test_json_schema_generation_honours_allof_bounds_lengths_and_untyped_schemas(
    client: httpx.AsyncClient,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "merged": {
                "allOf": [
                    {"properties": {"low": {"type": "integer", "maximum": 0}}},
                    {"properties": {"padded": {"type": "string", "minLength": 6}}},
                ]
            },
            "numbers": {"items": {"type": "number", "maximum": 1}},
            "none_allowed": {"type": "array", "items": {}, "maxItems": 0},
            "nothing": {"type": "null"},
            "free": {},
        },
    }
    answer = await post(client, chat_request("Hi", response_format=json_schema_format(schema)))
    assert json.loads(answer["choices"][0]["message"]["content"]) == {
        "merged": {"low": 0, "padded": "Hixxxx"},
        "numbers": [1],
        "none_allowed": [],
        "nothing": None,
        "free": "Hi",
    }


@pytest.mark.parametrize(
    "response_format",
    [
        "json_object",
        {"type": "xml"},
        {"type": "json_schema"},
        json_schema_format() | {"json_schema": {"schema": SCHEMA}},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": SCHEMA}},
        json_schema_format("object"),
        json_schema_format(strict="yes"),
        json_schema_format({"type": "decimal"}),
        json_schema_format({"$ref": "#/$defs/missing"}),
        json_schema_format({"$ref": "#"}),
        json_schema_format({"$ref": "https://example.com/schema.json"}),
        json_schema_format({"enum": []}),
        json_schema_format({"type": "object", "properties": {"a": "string"}}),
    ],
    ids=[
        "not_an_object",
        "unknown_type",
        "json_schema_missing",
        "name_missing",
        "bad_name",
        "schema_not_an_object",
        "strict_not_a_boolean",
        "unknown_schema_type",
        "dangling_ref",
        "recursive_schema",
        "remote_ref",
        "empty_enum",
        "property_schema_not_an_object",
    ],
)
async def test_malformed_response_format_is_400_on_param_response_format(
    client: httpx.AsyncClient, response_format: Any
) -> None:
    response = await client.post(CHAT, json=chat_request(response_format=response_format))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "response_format"


# 11. Refusals

REFUSAL = "I'm sorry, but I can't help with that request."


async def test_refusal_batch_has_null_content_and_the_refusal(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(model="mock-refusal"))
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": None, "refusal": REFUSAL}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == len(REFUSAL.split())


async def test_refusal_stream_sends_refusal_pieces_without_content(client: httpx.AsyncClient) -> None:
    payloads = sse_payloads(await client.post(CHAT, json=chat_request(model="mock-refusal", stream=True)))
    assert deltas(payloads) == [
        {"role": "assistant", "content": None, "refusal": ""},
        *({"refusal": token} for token in tokens(REFUSAL)),
        {},
    ]
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


# 12. Tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
WEATHER_ARGUMENTS = '{"city": "Weather in Paris", "unit": "celsius", "days": 1}'


def tool_request(*, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return chat_request("Weather in Paris", model=model, tools=[WEATHER, CLOCK], **extra)


def called(answer: dict[str, Any]) -> list[tuple[str, str]]:
    calls = answer["choices"][0]["message"]["tool_calls"]
    return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]


async def test_tools_make_the_model_call_the_first_tool_with_arguments_from_its_schema(
    client: httpx.AsyncClient,
) -> None:
    answer = await post(client, tool_request())
    [choice] = answer["choices"]
    [call] = choice["message"]["tool_calls"]
    assert CALL_ID.fullmatch(call["id"])
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGUMENTS}}
        ],
    }
    assert choice["finish_reason"] == "tool_calls"
    assert answer["usage"]["completion_tokens"] == 1 + len(WEATHER_ARGUMENTS.split())


async def test_tool_choice_naming_a_function_calls_that_function(client: httpx.AsyncClient) -> None:
    answer = await post(client, tool_request(tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert called(answer) == [("get_time", "{}")]


async def test_tool_choice_none_answers_in_text(client: httpx.AsyncClient) -> None:
    answer = await post(client, tool_request(tool_choice="none"))
    assert answer["choices"][0]["message"]["content"] == echo("Weather in Paris")
    assert "tool_calls" not in answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_mock_tools_parallel_calls_every_tool(client: httpx.AsyncClient) -> None:
    answer = await post(client, tool_request(model="mock-tools-parallel"))
    assert called(answer) == [("get_weather", WEATHER_ARGUMENTS), ("get_time", "{}")]
    ids = [call["id"] for call in answer["choices"][0]["message"]["tool_calls"]]
    assert len(set(ids)) == 2


async def test_parallel_tool_calls_false_makes_mock_tools_parallel_call_one_tool(client: httpx.AsyncClient) -> None:
    answer = await post(client, tool_request(model="mock-tools-parallel", parallel_tool_calls=False))
    assert called(answer) == [("get_weather", WEATHER_ARGUMENTS)]


async def test_streamed_tool_calls_follow_openais_delta_format(client: httpx.AsyncClient) -> None:
    body = tool_request(model="mock-tools-parallel", stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(await client.post(CHAT, json=body))
    streamed_deltas = deltas(payloads)
    first_id = streamed_deltas[1]["tool_calls"][0]["id"]
    second_id = streamed_deltas[10]["tool_calls"][0]["id"]
    assert streamed_deltas == [
        {"role": "assistant", "content": None, "refusal": None},
        {
            "tool_calls": [
                {"index": 0, "id": first_id, "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        },
        *(
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in ['{"city":', ' "Weather', " in", ' Paris",', ' "unit":', ' "celsius",', ' "days":', " 1}"]
        ),
        {
            "tool_calls": [
                {"index": 1, "id": second_id, "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
    ]
    assert CALL_ID.fullmatch(first_id)
    assert CALL_ID.fullmatch(second_id)
    assert first_id != second_id
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"] == usage(3, 1 + 8 + 1 + 1)


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
async def test_after_a_tool_message_the_answer_quotes_the_tool_result(client: httpx.AsyncClient, stream: bool) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22 C and sunny"}]},
    ]
    body = {"model": "gpt-4o-mini", "messages": messages, "tools": [WEATHER], "stream": stream}
    response = await client.post(CHAT, json=body)
    if stream:
        payloads = sse_payloads(response)
        assert streamed(payloads) == "The tool said: 22 C and sunny"
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        assert response.json()["choices"][0]["message"]["content"] == "The tool said: 22 C and sunny"
        assert response.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "decimal"}}}]},
            "tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
    ids=[
        "empty_tools",
        "function_missing",
        "not_a_function_tool",
        "bad_function_name",
        "unusable_parameters_schema",
        "unknown_tool_choice",
        "tool_choice_names_no_tool",
        "tool_choice_without_tools",
        "parallel_tool_calls_not_boolean",
    ],
)
async def test_malformed_tool_parameters_are_400_on_their_param(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    response = await client.post(CHAT, json=chat_request(**extra))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param


# 13. n


async def test_n_batch_answers_n_choices_with_the_choice_number_appended(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(n=3))
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
    assert [choice["message"]["content"] for choice in answer["choices"]] == [
        echo("Hello there"),
        f"{echo('Hello there')} (choice 1)",
        f"{echo('Hello there')} (choice 2)",
    ]
    assert answer["usage"] == usage(2, 14 + 16 + 16)


async def test_n_stream_interleaves_the_choices_by_index(client: httpx.AsyncClient) -> None:
    body = chat_request(n=2, stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(await client.post(CHAT, json=body))
    indexes = [payload["choices"][0]["index"] for payload in payloads[:-1]]
    # Role chunks, then one token of each choice per step (choice 1 is two tokens longer), then finish chunks.
    assert indexes == [0, 1] + [0, 1] * 14 + [1, 1] + [0, 1]
    assert streamed(payloads, index=0) == echo("Hello there")
    assert streamed(payloads, index=1) == f"{echo('Hello there')} (choice 1)"
    assert [payload["choices"][0]["finish_reason"] for payload in payloads[-3:-1]] == ["stop", "stop"]
    assert payloads[-1]["usage"] == usage(2, 14 + 16)


@pytest.mark.parametrize("n", [0, 9, "2", True, 1.5])
async def test_n_outside_1_to_8_is_400_on_param_n(client: httpx.AsyncClient, n: Any) -> None:
    response = await client.post(CHAT, json=chat_request(n=n))
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "n"


# 14. logprobs


def logprob_entry(token: str, position: int, top: int) -> dict[str, Any]:
    logprob = -round(0.01 * (position + 1), 6)
    alternatives = [(token, logprob)] + [(f"{token}{rank}", round(logprob - rank, 6)) for rank in range(1, top)]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": text, "logprob": value, "bytes": list(text.encode())} for text, value in alternatives
        ],
    }


async def test_logprobs_batch_has_one_entry_per_answer_token(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(logprobs=True, top_logprobs=2))
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    assert logprobs["content"][:2] == [
        {
            "token": "You",
            "logprob": -0.01,
            "bytes": [89, 111, 117],
            "top_logprobs": [
                {"token": "You", "logprob": -0.01, "bytes": [89, 111, 117]},
                {"token": "You1", "logprob": -1.01, "bytes": [89, 111, 117, 49]},
            ],
        },
        {
            "token": " said:",
            "logprob": -0.02,
            "bytes": [32, 115, 97, 105, 100, 58],
            "top_logprobs": [
                {"token": " said:", "logprob": -0.02, "bytes": [32, 115, 97, 105, 100, 58]},
                {"token": " said:1", "logprob": -1.02, "bytes": [32, 115, 97, 105, 100, 58, 49]},
            ],
        },
    ]
    assert logprobs["content"] == [logprob_entry(token, i, 2) for i, token in enumerate(tokens(echo("Hello there")))]


async def test_logprobs_without_top_logprobs_have_empty_top_lists(client: httpx.AsyncClient) -> None:
    answer = await post(client, chat_request(logprobs=True))
    assert all(entry["top_logprobs"] == [] for entry in answer["choices"][0]["logprobs"]["content"])


async def test_logprobs_stream_puts_each_tokens_entry_in_its_chunk(client: httpx.AsyncClient) -> None:
    payloads = sse_payloads(await client.post(CHAT, json=chat_request(logprobs=True, top_logprobs=1, stream=True)))
    content_choices = [payload["choices"][0] for payload in payloads[1:-1]]
    assert [choice["logprobs"] for choice in content_choices] == [
        {"content": [logprob_entry(token, i, 1)], "refusal": None}
        for i, token in enumerate(tokens(echo("Hello there")))
    ]
    assert payloads[0]["choices"][0]["logprobs"] is None
    assert payloads[-1]["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
    ids=["without_logprobs", "logprobs_false", "above_20", "negative", "logprobs_not_boolean"],
)
async def test_top_logprobs_needs_logprobs_true_and_a_value_from_0_to_20(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str
) -> None:
    response = await client.post(CHAT, json=chat_request(**extra))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
