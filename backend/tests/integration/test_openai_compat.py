"""The OpenAI-compatible API in-process: passthrough, streams, models, auth, limits, its error envelope, the ledger.

respx stands in for the upstream; the real SDKs over real sockets are in tests/e2e/test_openai_sdks.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from starlette.types import Message, Receive, Scope, Send

from src.api.middleware import RequestContextMiddleware
from src.core.keys import key_digest
from tests.conftest import UPSTREAM_KEY, completion, make_settings, sse_chunks, upstream_json

COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
SERVICE_KEY = "llmsvc-openai-key"
LIMITED_KEY = "llmsvc-openai-limited"
BUDGET_KEY = "llmsvc-openai-budget"
TOKENS_KEY = "llmsvc-openai-tokens"
Logs = Callable[[], list[dict[str, Any]]]
EVENT_STREAM = {"content-type": "text/event-stream"}


def body(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def data_lines(text: str) -> list[str]:
    """The `data:` payloads of an OpenAI stream, in order (comments and blank lines left out)."""
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[[keys]]
name = "openai-sdk"
sha256 = "{key_digest(SERVICE_KEY)}"
models = ["gpt-5-mini", "gpt-4.1-mini"]

[[keys]]
name = "limited"
sha256 = "{key_digest(LIMITED_KEY)}"
requests_per_minute = 1

[[keys]]
name = "budgeted"
sha256 = "{key_digest(BUDGET_KEY)}"
tokens_per_day = 50

[[keys]]
name = "tokens"
sha256 = "{key_digest(TOKENS_KEY)}"
tokens_per_minute = 1000
"""
    )
    return path


@pytest.fixture
def keyed_settings(tmp_path: Path) -> Any:
    return make_settings(
        service_keys_file=str(_keys_file(tmp_path)), database_url=f"sqlite:///{tmp_path / 'ledger.db'}"
    )


# --- batch -------------------------------------------------------------------------------------------------------


async def test_batch_answers_the_upstreams_chat_completion_byte_for_byte(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    answer = json.dumps({**completion(), "system_fingerprint": "fp_1", "service_tier": "default"}).encode()
    upstream.post("/chat/completions").respond(200, content=answer, headers={"content-type": "application/json"})

    response = await client.post(COMPLETIONS, json=body(), headers={"X-Request-ID": "openai-req-1"})

    assert response.status_code == 200
    assert response.content == answer
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "openai-req-1"


async def test_the_body_is_forwarded_as_sent_with_unknown_fields_and_the_default_model(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    sent: dict[str, Any] = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "seed": 7,
        "stop": ["END"],
        "max_tokens": 30,
        "reasoning_effort": "low",
        "a_field_openai_ships_tomorrow": {"nested": [1, 2]},
    }

    response = await client.post(COMPLETIONS, json=sent)

    assert response.status_code == 200
    assert upstream_json(route) == {**sent, "model": "gpt-5-mini"}
    assert route.calls[0].request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


# --- stream ------------------------------------------------------------------------------------------------------


async def test_stream_forwards_each_chunk_untouched_and_ends_with_done_without_the_usage_chunk(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    upstream_stream = sse_chunks(["Hel", "lo"])
    route = upstream.post("/chat/completions").respond(200, content=upstream_stream, headers=EVENT_STREAM)

    response = await client.post(COMPLETIONS, json=body(stream=True, model="gpt-4.1-mini"))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    relayed = data_lines(response.text)
    upstream_lines = data_lines(upstream_stream.decode())
    # Everything but the usage-only chunk, which the caller did not ask for, byte for byte.
    assert relayed == [line for line in upstream_lines if '"choices": []' not in line]
    assert relayed[-1] == "[DONE]"
    assert upstream_json(route)["stream_options"] == {"include_usage": True}
    assert upstream_json(route)["model"] == "gpt-4.1-mini"


async def test_stream_passes_the_usage_chunk_on_when_the_caller_asked_and_keeps_its_other_options(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, content=sse_chunks(["a"]), headers=EVENT_STREAM)

    response = await client.post(
        COMPLETIONS, json=body(stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    )

    chunks = [json.loads(line) for line in data_lines(response.text)[:-1]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 6
    assert upstream_json(route)["stream_options"] == {"include_usage": True, "include_obfuscation": False}


async def test_streamed_tool_call_deltas_are_forwarded_untouched(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    deltas = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
    ]
    lines = [
        json.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        )
        for delta in deltas
    ]
    lines.append(
        json.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            }
        )
    )
    stream = "".join(f"data: {line}\n\n" for line in lines) + "data: [DONE]\n\n"
    upstream.post("/chat/completions").respond(200, content=stream.encode(), headers=EVENT_STREAM)

    response = await client.post(
        COMPLETIONS, json=body(stream=True, tools=[{"type": "function", "function": {"name": "get_weather"}}])
    )

    assert data_lines(response.text) == [*lines, "[DONE]"]


async def test_stream_upstream_drop_after_first_byte_ends_with_an_error_line_and_no_done(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").respond(
        200, content=sse_chunks(["partial"], usage=False, done=False)[:-20], headers=EVENT_STREAM
    )

    response = await client.post(COMPLETIONS, json=body(stream=True))

    relayed = data_lines(response.text)
    assert "[DONE]" not in relayed
    error = json.loads(relayed[-1])["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_an_error_the_upstream_reports_inside_a_stream_is_the_last_line(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    failing = (
        sse_chunks(["a"], usage=False, done=False) + b'data: {"error": {"message": "overloaded, key sk-abcdef123"}}\n\n'
    )
    upstream.post("/chat/completions").respond(200, content=failing, headers=EVENT_STREAM)

    response = await client.post(COMPLETIONS, json=body(stream=True))

    last = json.loads(data_lines(response.text)[-1])
    assert last["error"]["message"] == "overloaded, key [redacted]"
    assert "sk-abcdef123" not in response.text


# --- validation --------------------------------------------------------------------------------------------------

INVALID_BODIES = {
    "not_json": (b"{not json", "body"),
    "not_an_object": (b"[1, 2]", "body"),
    "messages_missing": (b'{"model": "gpt-5-mini"}', "messages"),
    "messages_empty": (b'{"messages": []}', "messages"),
    "message_not_an_object": (b'{"messages": ["hi"]}', "messages"),
    "model_not_a_string": (b'{"messages": [{"role": "user", "content": "hi"}], "model": 5}', "model"),
    "model_empty": (b'{"messages": [{"role": "user", "content": "hi"}], "model": ""}', "model"),
    "stream_not_a_bool": (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    "stream_options_not_an_object": (
        b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": true}',
        "stream_options",
    ),
    "include_usage_not_a_bool": (
        b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": 1}}',
        "stream_options.include_usage",
    ),
    "max_tokens_a_string": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}', "max_tokens"),
    "max_completion_tokens_zero": (
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}',
        "max_completion_tokens",
    ),
    "n_a_bool": (b'{"messages": [{"role": "user", "content": "hi"}], "n": true}', "n"),
    "user_not_a_string": (b'{"messages": [{"role": "user", "content": "hi"}], "user": 1}', "user"),
}


@pytest.mark.parametrize(("raw", "param"), INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_a_body_the_service_cannot_use_is_a_400_naming_the_param(
    client: httpx.AsyncClient, upstream: respx.MockRouter, raw: bytes, param: str
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())

    response = await client.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["code"] is None
    assert not route.called


# --- the error table, in OpenAI's envelope -----------------------------------------------------------------------

UPSTREAM_FAILURES: dict[str, tuple[Any, int, str, str | None]] = {
    "upstream_400_keeps_openais_type_param_code": (
        httpx.Response(
            400,
            json={
                "error": {
                    "message": "Unsupported value: 'temperature'",
                    "type": "invalid_request_error",
                    "param": "temperature",
                    "code": "unsupported_value",
                }
            },
        ),
        400,
        "invalid_request_error",
        "unsupported_value",
    ),
    "upstream_404_model_not_found": (
        httpx.Response(
            404,
            json={
                "error": {
                    "message": "The model 'x' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
        ),
        404,
        "invalid_request_error",
        "model_not_found",
    ),
    "upstream_401_is_our_500_with_a_fixed_message": (
        httpx.Response(
            401,
            json={
                "error": {
                    "message": "Incorrect API key provided: sk-abc***xyz",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            },
        ),
        500,
        "server_error",
        "llm_auth_error",
    ),
    "upstream_429_rate_limit": (
        httpx.Response(
            429,
            json={"error": {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"}},
            headers={"retry-after": "30"},
        ),
        429,
        "requests",
        "rate_limit_exceeded",
    ),
    "upstream_429_quota_is_our_503": (
        httpx.Response(
            429, json={"error": {"message": "Quota", "type": "insufficient_quota", "code": "insufficient_quota"}}
        ),
        503,
        "server_error",
        "quota_exceeded",
    ),
    "upstream_500_is_502": (
        httpx.Response(500, json={"error": {"message": "boom"}}),
        502,
        "server_error",
        "upstream_error",
    ),
    "upstream_timeout_is_504": (httpx.ReadTimeout("slow"), 504, "server_error", "upstream_timeout"),
    "upstream_unreachable_is_503": (httpx.ConnectError("refused"), 503, "server_error", "upstream_unavailable"),
}


@pytest.mark.parametrize(
    ("failure", "status", "kind", "code"), UPSTREAM_FAILURES.values(), ids=UPSTREAM_FAILURES.keys()
)
@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
async def test_upstream_failures_map_to_openais_envelope_and_statuses(
    client: httpx.AsyncClient,
    upstream: respx.MockRouter,
    failure: Any,
    status: int,
    kind: str,
    code: str | None,
    stream: bool,
) -> None:
    upstream.post("/chat/completions").mock(side_effect=[failure])

    response = await client.post(COMPLETIONS, json=body(stream=stream))

    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (kind, code)
    assert "sk-abc" not in response.text
    if status == 429:
        assert response.headers["retry-after"] == "30"


async def test_framework_errors_on_v1_paths_use_openais_envelope(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(max_request_bytes=100)) as (client, _, _):
        too_large = await client.post(COMPLETIONS, json=body("x" * 200))
        unknown = await client.get("/v1/embeddings-not-here")
        wrong_method = await client.get(COMPLETIONS)
        ours = await client.get("/api/v1/nothing-here")
    assert too_large.status_code == 413
    assert too_large.json()["error"]["type"] == "invalid_request_error"
    assert too_large.json()["error"]["code"] == "payload_too_large"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_url"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert ours.json()["error"]["code"] == "not_found"
    assert "request_id" in ours.json()["error"]


async def test_no_upstream_key_is_a_503_server_error(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(openai_api_key=None)) as (client, _, _):
        response = await client.post(COMPLETIONS, json=body())
        models = await client.get(MODELS)
    assert response.status_code == models.status_code == 503
    assert response.json()["error"]["code"] == "llm_not_configured"
    assert response.json()["error"]["type"] == "server_error"


# --- auth, models, limits, ledger --------------------------------------------------------------------------------


async def test_service_keys_guard_every_v1_route_with_openais_invalid_api_key(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(keyed_settings) as (client, _, _):
        missing = await client.post(COMPLETIONS, json=body())
        wrong = await client.get(MODELS, headers=_bearer("llmsvc-wrong"))
        ok = await client.post(COMPLETIONS, json=body(), headers=_bearer(SERVICE_KEY))
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["error"] == {
            "message": refused.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert SERVICE_KEY not in refused.text
    assert ok.status_code == 200


async def test_models_are_the_keys_allowlist_and_a_model_outside_it_is_not_found(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(keyed_settings) as (client, _, _):
        listing = await client.get(MODELS, headers=_bearer(SERVICE_KEY))
        one = await client.get(f"{MODELS}/gpt-4.1-mini", headers=_bearer(SERVICE_KEY))
        other = await client.get(f"{MODELS}/gpt-4o", headers=_bearer(SERVICE_KEY))
        chat = await client.post(COMPLETIONS, json=body(model="gpt-4o"), headers=_bearer(SERVICE_KEY))
    assert listing.status_code == 200
    assert listing.json()["object"] == "list"
    assert [model["id"] for model in listing.json()["data"]] == ["gpt-4.1-mini", "gpt-5-mini"]
    assert one.json() == {"id": "gpt-4.1-mini", "object": "model", "created": 0, "owned_by": "llm-service"}
    for refused in (other, chat):
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"
    assert not route.called


async def test_models_without_an_allowlist_are_the_upstreams(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    listed = {"object": "list", "data": [{"id": "gpt-5", "object": "model", "created": 1, "owned_by": "openai"}]}
    upstream.get("/models").respond(200, json=listed)
    upstream.get("/models/gpt-5").respond(200, json=listed["data"][0])
    upstream.get("/models/nope").respond(
        404,
        json={
            "error": {
                "message": "No such model",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        },
    )

    listing = await client.get(MODELS)
    one = await client.get(f"{MODELS}/gpt-5")
    missing = await client.get(f"{MODELS}/nope")

    assert listing.json() == listed
    assert one.json() == listed["data"][0]
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_the_service_allowlist_applies_when_the_key_has_none(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    async with app_client(make_settings(llm_allowed_models=["gpt-4o-mini"])) as (client, _, _):
        listing = await client.get(MODELS)
    assert [model["id"] for model in listing.json()["data"]] == ["gpt-4o-mini"]


async def test_a_keys_limits_answer_openais_429s_with_retry_after(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    upstream.post("/chat/completions").respond(
        200, json=completion(usage={"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60})
    )
    async with app_client(keyed_settings) as (client, _, _):
        first = await client.post(COMPLETIONS, json=body(), headers=_bearer(LIMITED_KEY))
        limited = await client.post(COMPLETIONS, json=body(stream=True), headers=_bearer(LIMITED_KEY))
        spent = await client.post(COMPLETIONS, json=body(max_tokens=5), headers=_bearer(BUDGET_KEY))
        over_budget = await client.post(COMPLETIONS, json=body(max_tokens=5), headers=_bearer(BUDGET_KEY))
    assert first.status_code == spent.status_code == 200
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.status_code == over_budget.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert over_budget.json()["error"]["code"] == "insufficient_quota"
    assert over_budget.json()["error"]["type"] == "insufficient_quota"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert int(over_budget.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit-requests"] == "1"


async def test_n_choices_reserve_max_tokens_for_each_choice(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(keyed_settings) as (client, _, _):
        one = await client.post(COMPLETIONS, json=body("hi", max_tokens=20), headers=_bearer(TOKENS_KEY))
        three = await client.post(COMPLETIONS, json=body("hi", n=3, max_tokens=20), headers=_bearer(TOKENS_KEY))
    # "hi" is estimated at 8 prompt tokens; the first call settled to its usage (15) before the second reserved.
    assert one.headers["x-ratelimit-remaining-tokens"] == str(1000 - (8 + 20))
    assert three.headers["x-ratelimit-remaining-tokens"] == str(1000 - 15 - (8 + 3 * 20))


async def test_n_choices_without_max_tokens_reserve_the_default_for_each_choice(
    app_client: Callable[..., Any], upstream: respx.MockRouter, tmp_path: Path
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    settings = make_settings(
        service_keys_file=str(_keys_file(tmp_path)),
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        llm_default_token_reserve=100,
    )
    async with app_client(settings) as (client, _, _):
        three = await client.post(COMPLETIONS, json=body("hi", n=3), headers=_bearer(TOKENS_KEY))
    assert three.headers["x-ratelimit-remaining-tokens"] == str(1000 - (8 + 3 * 100))


async def test_ledger_rows_and_log_lines_say_the_openai_route(
    app_client: Callable[..., Any], upstream: respx.MockRouter, tmp_path: Path, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").mock(
        side_effect=[
            httpx.Response(200, json=completion()),
            httpx.Response(200, content=sse_chunks(["a", "b"]), headers=EVENT_STREAM),
        ]
    )
    database = tmp_path / "ledger.db"
    async with app_client(make_settings(database_url=f"sqlite:///{database}")) as (client, _, _):
        await client.post(COMPLETIONS, json=body(user="u-7"))
        await client.post(COMPLETIONS, json=body(stream=True))
        await client.post("/api/v1/llm/chat", json=body())
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            'SELECT route, stream, status, "user", total_tokens FROM llm_calls ORDER BY rowid'
        ).fetchall()
    assert rows[0] == ("openai", 0, 200, "u-7", 15)
    assert rows[1] == ("openai", 1, 200, None, 7)
    assert rows[2][0] == "chat"
    calls = [line for line in read_logs() if line.get("event") == "llm_call"]
    assert [line["route"] for line in calls] == ["openai", "openai", "chat"]
    assert calls[1]["delivered_chunks"] == 2


# --- the drain, and the last-resort 500 --------------------------------------------------------------------------


async def test_draining_refuses_new_v1_calls_in_openais_envelope(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(llm_shutdown_grace_seconds=5)) as (client, app, _):
        app.state.drain.begin()
        refused = await client.post(COMPLETIONS, json=body())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.json()["error"]["type"] == "server_error"


async def test_a_v1_stream_still_running_when_the_grace_ends_gets_the_shutdown_error_line(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    started = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse_chunks(["first"]).split(b"\n\n")[1] + b"\n\n"
            started.set()
            await asyncio.sleep(60)
            yield b""

    upstream.post("/chat/completions").mock(return_value=httpx.Response(200, stream=Endless(), headers=EVENT_STREAM))
    async with app_client(make_settings(llm_shutdown_grace_seconds=0.1)) as (client, app, _):
        call = asyncio.create_task(client.post(COMPLETIONS, json=body(stream=True)))
        await asyncio.wait_for(started.wait(), timeout=5)
        app.state.drain.begin()
        response = await asyncio.wait_for(call, timeout=5)
    relayed = data_lines(response.text)
    assert json.loads(relayed[0])["choices"][0]["delta"]["content"] == "first"
    assert json.loads(relayed[-1])["error"]["code"] == "server_shutting_down"
    assert "[DONE]" not in relayed
    calls = [line for line in read_logs() if line.get("event") == "llm_call"]
    assert calls[-1]["code"] == "server_shutting_down"
    assert calls[-1]["route"] == "openai"


async def test_an_unexpected_failure_on_a_v1_path_is_openais_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = RequestContextMiddleware(broken)
    scope: Scope = {"type": "http", "method": "POST", "path": COMPLETIONS, "headers": []}
    await middleware(scope, receive, send)

    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {
        "error": {
            "message": "The service failed unexpectedly.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


async def test_log_prompts_logs_inline_images_by_size_and_sends_them_whole(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    image = "data:image/png;base64," + "A" * 4000
    message = {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image}}],
    }
    async with app_client(make_settings(log_prompts=True)) as (client, _, _):
        await client.post(COMPLETIONS, json={"messages": [message]})

    assert upstream_json(route)["messages"] == [message]
    logged = next(line for line in read_logs() if line.get("event") == "llm_call")["messages"]
    assert logged[0]["content"][0] == {"type": "text", "text": "What is this?"}
    assert logged[0]["content"][1]["image_url"]["url"] == "data:image/png;base64,<4000 characters>"
