"""The v1 chat contract, in-process: batch, stream, parameters, every error row in both modes, ids, logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx
from fastapi.routing import iter_route_contexts

from src.api.deps import ChatKeyRoute
from src.core.keys import ANONYMOUS
from src.core.llm.call_context import CallContext
from src.core.llm.client import OpenAIClient
from src.core.llm.service import LLMService
from src.main import create_app
from src.models.llm import LLMRequest
from tests.conftest import (
    SERVICE_KEY,
    UPSTREAM_KEY,
    chat_body,
    completion,
    make_settings,
    parse_sse,
    sse_chunks,
    upstream_json,
)

CHAT = "/api/v1/llm/chat"
Logs = Callable[[], list[dict[str, Any]]]


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") == event]


# --- batch -------------------------------------------------------------------------------------------------------


async def test_batch_answer_has_contract_shape(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=completion(), headers={"x-request-id": "req_up_1"})

    response = await client.post(CHAT, json=chat_body())

    assert response.status_code == 200
    body = response.json()
    assert body == {
        "id": "chatcmpl-123",
        "model": "gpt-5-mini-2025",
        "request_id": response.headers["x-request-id"],
        "message": {"role": "assistant", "content": "Hi! How can I help?", "refusal": None},
        "finish_reason": "stop",
        # The upstream gave no details: null, not 0.
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 6,
            "total_tokens": 15,
            "reasoning_tokens": None,
            "cached_tokens": None,
        },
    }


async def test_batch_forwards_history_in_order_with_default_model_and_no_unset_params(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]

    response = await client.post(CHAT, json={"messages": history})

    assert response.status_code == 200
    sent = upstream_json(route)
    assert sent == {"messages": history, "model": "gpt-5-mini"}
    assert route.calls[0].request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_all_parameters_are_forwarded_and_max_tokens_is_renamed(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    params: dict[str, Any] = {
        "model": "gpt-4.1-mini",
        "temperature": 0.2,
        "max_tokens": 50,
        "top_p": 0.9,
        "stop": ["END", "STOP"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 7,
        "reasoning_effort": "low",
        "user": "u-1",
    }

    response = await client.post(CHAT, json=chat_body(**params))

    assert response.status_code == 200
    sent = upstream_json(route)
    assert "max_tokens" not in sent
    assert sent["max_completion_tokens"] == 50
    for name in (
        "model",
        "temperature",
        "top_p",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "reasoning_effort",
        "user",
    ):
        assert sent[name] == params[name], name


async def test_integral_numbers_are_integers_as_json_schema_says(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    response = await client.post(CHAT, json=chat_body(max_tokens=5.0, seed=3.0, temperature=1))
    assert response.status_code == 200
    sent = upstream_json(route)
    assert (sent["max_completion_tokens"], sent["seed"], sent["temperature"]) == (5, 3, 1.0)


async def test_stop_may_be_a_single_string(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion(finish_reason="stop"))
    response = await client.post(CHAT, json=chat_body(stop="\n"))
    assert response.status_code == 200
    assert upstream_json(route)["stop"] == "\n"


async def test_finish_reason_length_is_passed_through(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=completion("Hi", finish_reason="length"))
    response = await client.post(CHAT, json=chat_body(max_tokens=1))
    assert response.json()["finish_reason"] == "length"


async def test_malformed_upstream_answer_is_upstream_error(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").respond(200, json={"unexpected": True})
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
async def test_upstream_redirect_is_not_followed_but_upstream_error(
    client: httpx.AsyncClient, upstream: respx.MockRouter, stream: bool
) -> None:
    upstream.post("/chat/completions").respond(307, headers={"location": "https://elsewhere.test/steal"})
    response = await client.post(CHAT, json=chat_body(stream=stream))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert "HTTP 307" in response.json()["error"]["message"]


# --- validation ----------------------------------------------------------------------------------------------------

INVALID_BODIES = {
    "no_messages": ({"model": "x"}, "messages"),
    "empty_messages": ({"messages": []}, "messages"),
    "bad_role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    "empty_content": ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
    "content_not_string": ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "unknown_field": (chat_body(temprature=1), "temprature"),
    "unknown_message_field": ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages.0.name"),
    "temperature_too_high": (chat_body(temperature=2.5), "temperature"),
    "max_tokens_zero": (chat_body(max_tokens=0), "max_tokens"),
    "top_p_above_one": (chat_body(top_p=1.5), "top_p"),
    "too_many_stops": (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    "penalty_out_of_range": (chat_body(presence_penalty=3), "presence_penalty"),
    "seed_not_int": (chat_body(seed="7"), "seed"),
    "seed_fraction": (chat_body(seed=7.5), "seed"),
    "max_tokens_bool": (chat_body(max_tokens=True), "max_tokens"),
    "temperature_as_string": (chat_body(temperature="1"), "temperature"),
    "bad_reasoning_effort": (chat_body(reasoning_effort="extreme"), "reasoning_effort"),
    "stream_not_bool": (chat_body(stream="yes"), "stream"),
}


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_invalid_body_is_422_validation_error_naming_the_field(
    client: httpx.AsyncClient, upstream: respx.MockRouter, body: dict[str, Any], field: str
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())

    response = await client.post(CHAT, json=body)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert any(detail["field"].endswith(field) or field in detail["field"] for detail in error["details"]), error
    assert not route.called


async def test_invalid_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


async def test_service_keeps_serving_after_bad_input(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    for _ in range(3):
        assert (await client.post(CHAT, content=b"not json")).status_code == 422
    assert (await client.post(CHAT, json=chat_body())).status_code == 200


async def test_unknown_route_uses_the_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_wrong_method_is_405_in_the_envelope_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.get(CHAT)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert error["request_id"] == response.headers["x-request-id"]


async def test_openapi_declares_the_bearer_only_when_keys_are_configured(app_client: Callable[..., Any]) -> None:
    async with app_client() as (open_client, _, _):
        open_spec = (await open_client.get("/openapi.json")).json()
    async with app_client(make_settings(service_api_keys=SERVICE_KEY)) as (keyed_client, _, _):
        keyed_spec = (await keyed_client.get("/openapi.json")).json()
    assert "security" not in open_spec["paths"][CHAT]["post"]
    assert keyed_spec["paths"][CHAT]["post"]["security"] == [{"ServiceKey": []}]


# --- body size -----------------------------------------------------------------------------------------------------


async def test_body_over_cap_by_content_length_is_413(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(max_request_bytes=200)) as (client, _, _):
        response = await client.post(CHAT, json=chat_body("x" * 500))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


async def test_chunked_body_over_cap_without_content_length_is_413(app_client: Callable[..., Any]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 100

    async with app_client(make_settings(max_request_bytes=500)) as (client, _, _):
        response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_chunked_body_under_cap_is_served(app_client: Callable[..., Any], upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    payload = json.dumps(chat_body()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 10):
            yield payload[start : start + 10]

    async with app_client(make_settings(max_request_bytes=500)) as (client, _, _):
        response = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 200


# --- request ids ---------------------------------------------------------------------------------------------------


async def test_sane_caller_request_id_is_kept(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    response = await client.post(CHAT, json=chat_body(), headers={"X-Request-ID": "abc.DEF_123-x"})
    assert response.headers["x-request-id"] == "abc.DEF_123-x"
    assert response.json()["request_id"] == "abc.DEF_123-x"


@pytest.mark.parametrize(
    "bad_id", ["has space", "x" * 129, "semi;colon", "<script>"], ids=["space", "too_long", "semicolon", "markup"]
)
async def test_insane_caller_request_id_is_replaced(client: httpx.AsyncClient, bad_id: str) -> None:
    response = await client.get("/health", headers={"X-Request-ID": bad_id})
    generated = response.headers["x-request-id"]
    assert generated != bad_id
    assert len(generated) == 32


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    for response in (await client.get("/health"), await client.post(CHAT, json={}), await client.get("/nope")):
        assert response.headers["x-request-id"]


# --- auth, configuration, model policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVICE_KEY}, {"Authorization": f"Basic {SERVICE_KEY}"}],
    ids=["missing", "wrong", "no_scheme", "basic_scheme"],
)
async def test_service_keys_reject_missing_or_wrong_bearer(
    app_client: Callable[..., Any], upstream: respx.MockRouter, headers: dict[str, str]
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(make_settings(service_api_keys=f"other,{SERVICE_KEY}")) as (client, _, _):
        response = await client.post(CHAT, json=chat_body(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert not route.called


@pytest.mark.parametrize(
    ("method", "path", "documented_path"),
    [
        ("POST", CHAT, CHAT),
        ("GET", f"{CHAT}/streams/0123456789abcdef0123456789abcdef", f"{CHAT}/streams/{{stream_id}}"),
        ("DELETE", f"{CHAT}/streams/0123456789abcdef0123456789abcdef", f"{CHAT}/streams/{{stream_id}}"),
        ("POST", "/v1/chat/completions", "/v1/chat/completions"),
        ("GET", "/v1/models", "/v1/models"),
        ("GET", "/v1/models/gpt-5-mini", "/v1/models/{model_id}"),
    ],
)
async def test_every_chat_route_checks_the_key_before_reading_the_request(
    app_client: Callable[..., Any], method: str, path: str, documented_path: str
) -> None:
    """The chat routes check keys through their route class, not a dependency: every one of them, and before its
    body or parameters are validated (a malformed body without a key is a 401, not a 422); the document says so."""
    async with app_client(make_settings(service_api_keys=SERVICE_KEY)) as (client, _, _):
        response = await client.request(
            method, path, content=b"{not json", headers={"content-type": "application/json", "Last-Event-ID": "x"}
        )
        spec = (await client.get("/openapi.json")).json()
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert spec["paths"][documented_path][method.lower()]["security"] == [{"ServiceKey": []}]


def test_every_chat_route_has_the_key_checking_route_class() -> None:
    """Chat keys are checked by the route class, not a router dependency: a chat route without it would be open."""
    app = create_app(make_settings(service_api_keys=SERVICE_KEY), http_client=httpx.AsyncClient())
    chat_routes = [
        route
        for route in iter_route_contexts(app.routes)
        if (route.path or "").startswith(("/api/v1/llm/", "/v1/")) and route.path != "/api/v1/llm/usage"
    ]
    assert len(chat_routes) >= 5
    assert all(isinstance(route.original_route, ChatKeyRoute) for route in chat_routes), chat_routes


async def test_service_keys_accept_any_configured_bearer(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(make_settings(service_api_keys=f"other, {SERVICE_KEY}")) as (client, _, _):
        for key in ("other", SERVICE_KEY):
            response = await client.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        # Probes stay open for load balancers.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200


async def test_no_upstream_key_answers_503_llm_not_configured(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(openai_api_key=None)) as (client, _, _):
        for body in (chat_body(), chat_body(stream=True)):
            response = await client.post(CHAT, json=body)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "llm_not_configured"
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.get("/health/ready")
        assert ready.status_code == 503


async def test_ready_is_200_when_configured(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "upstream": "unchecked"}


async def test_model_outside_allow_list_is_400(app_client: Callable[..., Any], upstream: respx.MockRouter) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(make_settings(llm_allowed_models="gpt-5-mini,gpt-4.1")) as (client, _, _):
        refused = await client.post(CHAT, json=chat_body(model="gpt-4o"))
        allowed = await client.post(CHAT, json=chat_body(model="gpt-4.1"))
        default = await client.post(CHAT, json=chat_body())
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert allowed.status_code == 200
    assert default.status_code == 200
    assert route.call_count == 2


async def test_llm_default_model_is_used_when_request_names_none(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(make_settings(llm_default_model="gpt-4.1-nano")) as (client, _, _):
        await client.post(CHAT, json=chat_body())
    assert upstream_json(route)["model"] == "gpt-4.1-nano"


# --- error mapping, both modes -----------------------------------------------------------------------------------


def _openai_error(message: str, *, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


LEAKY_401 = _openai_error(
    "Incorrect API key provided: sk-test-S********6789. Find yours at platform", code="invalid_api_key"
)
UPSTREAM_ERRORS: dict[str, tuple[int, dict[str, Any], dict[str, str], int, str]] = {
    "401_auth": (401, LEAKY_401, {}, 500, "llm_auth_error"),
    "403_forbidden": (403, _openai_error("Project sk-proj-abc123 may not use this model"), {}, 500, "llm_auth_error"),
    "400_invalid": (
        400,
        _openai_error(
            "Unsupported value: 'temperature' does not support 0.2 with this model.", code="unsupported_value"
        ),
        {},
        400,
        "invalid_request",
    ),
    "400_context_length": (
        400,
        _openai_error("maximum context length is 128000 tokens", code="context_length_exceeded"),
        {},
        400,
        "context_length_exceeded",
    ),
    "404_model": (
        404,
        _openai_error("The model `nope` does not exist", code="model_not_found"),
        {},
        400,
        "model_not_found",
    ),
    "429_rate_limited": (
        429,
        _openai_error("Rate limit reached", type_="requests", code="rate_limit_exceeded"),
        {"retry-after": "7"},
        429,
        "rate_limited",
    ),
    "429_insufficient_quota": (
        429,
        _openai_error("You exceeded your current quota", type_="insufficient_quota", code="insufficient_quota"),
        {},
        503,
        "quota_exceeded",
    ),
    "500_server": (500, _openai_error("The server had an error", type_="server_error"), {}, 502, "upstream_error"),
    "502_gateway": (502, {"error": "bad gateway"}, {}, 502, "upstream_error"),
    "503_overloaded": (503, _openai_error("overloaded", type_="server_error"), {}, 502, "upstream_error"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
@pytest.mark.parametrize(
    ("upstream_status", "upstream_body", "upstream_headers", "status", "code"),
    UPSTREAM_ERRORS.values(),
    ids=UPSTREAM_ERRORS.keys(),
)
async def test_upstream_error_maps_to_contract_code(
    client: httpx.AsyncClient,
    upstream: respx.MockRouter,
    stream: bool,
    upstream_status: int,
    upstream_body: dict[str, Any],
    upstream_headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    upstream.post("/chat/completions").respond(upstream_status, json=upstream_body, headers=upstream_headers)

    response = await client.post(CHAT, json=chat_body(stream=stream))

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert "sk-" not in response.text
    assert UPSTREAM_KEY not in response.text
    if code == "rate_limited":
        assert response.headers["retry-after"] == "7"
    if code in {"invalid_request", "context_length_exceeded"}:
        assert upstream_body["error"]["message"] in error["message"]


TRANSPORT_ERRORS = {
    "timeout": (httpx.ReadTimeout("timed out"), 504, "upstream_timeout"),
    "connect_timeout": (httpx.ConnectTimeout("timed out"), 504, "upstream_timeout"),
    "unreachable": (httpx.ConnectError("connection refused"), 503, "upstream_unavailable"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
@pytest.mark.parametrize(("exception", "status", "code"), TRANSPORT_ERRORS.values(), ids=TRANSPORT_ERRORS.keys())
async def test_upstream_transport_failure_maps_to_contract_code(
    client: httpx.AsyncClient, upstream: respx.MockRouter, stream: bool, exception: Exception, status: int, code: str
) -> None:
    upstream.post("/chat/completions").mock(side_effect=exception)
    response = await client.post(CHAT, json=chat_body(stream=stream))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


async def test_retry_after_ms_is_converted_to_seconds(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    upstream.post("/chat/completions").respond(
        429, json=_openai_error("slow down", code="rate_limit_exceeded"), headers={"retry-after-ms": "2500"}
    )
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream_before_first_byte"])
async def test_sdk_retries_transient_upstream_failures(
    app_client: Callable[..., Any], upstream: respx.MockRouter, stream: bool
) -> None:
    answer = (
        httpx.Response(200, content=sse_chunks(["ok"]), headers={"content-type": "text/event-stream"})
        if stream
        else httpx.Response(200, json=completion())
    )
    route = upstream.post("/chat/completions")
    route.side_effect = [
        httpx.Response(503, json=_openai_error("busy", type_="server_error"), headers={"retry-after-ms": "10"}),
        answer,
    ]
    async with app_client(make_settings(llm_max_retries=1)) as (client, _, _):
        response = await client.post(CHAT, json=chat_body(stream=stream))
    assert response.status_code == 200
    if stream:
        assert parse_sse(response.text)[0] == ("delta", {"content": "ok"})
    assert route.call_count == 2


async def test_an_upstream_message_that_json_cannot_encode_as_utf8_is_still_logged_and_answered(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs
) -> None:
    """A lone surrogate (valid JSON, invalid UTF-8) in the upstream's error: the caller gets the envelope, the log
    line is written ASCII-escaped."""
    escaped = json.dumps(_openai_error("bad \ud83d input")).encode()  # ASCII: the surrogate as `\ud83d`
    upstream.post("/chat/completions").respond(400, content=escaped, headers={"content-type": "application/json"})
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.headers["x-request-id"]
    (call,) = _events(read_logs(), "llm_call")
    assert call["code"] == "invalid_request"


@pytest.mark.parametrize("where", ["key_check", "service"])
async def test_unexpected_exception_is_500_internal_error_without_internals(
    app_client: Callable[..., Any], read_logs: Logs, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    class BrokenAccess:
        """The chat routes' key check asks the app's access for its chat keys first: make that fail."""

        @property
        def chat(self) -> None:
            raise RuntimeError("secret internal detail")

    async def broken_call(*_: Any, **__: Any) -> None:
        raise RuntimeError("secret internal detail")

    async with app_client() as (client, app, _):
        access = app.state.access
        if where == "key_check":
            app.state.access = BrokenAccess()
        else:
            monkeypatch.setattr(LLMService, "get_chat_completion", broken_call)
        response = await client.post(CHAT, json=chat_body())
        app.state.access = access
        monkeypatch.undo()
        # ...and the service keeps serving.
        assert (await client.get("/health")).status_code == 200

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "secret internal detail" not in response.text
    assert response.headers["x-request-id"]
    unhandled = _events(read_logs(), "unhandled_error")
    assert len(unhandled) == 1
    assert "RuntimeError: secret internal detail" in unhandled[0]["exception"]


# --- streaming -------------------------------------------------------------------------------------------------------


async def test_stream_sends_delta_events_then_done(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/chat/completions").respond(
        200, content=sse_chunks(["Hel", "lo", " world"]), headers={"content-type": "text/event-stream"}
    )

    response = await client.post(CHAT, json=chat_body(stream=True, max_tokens=20))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    events = parse_sse(response.text)
    assert events == [
        ("delta", {"content": "Hel"}),
        ("delta", {"content": "lo"}),
        ("delta", {"content": " world"}),
        (
            "done",
            {
                "id": "chatcmpl-s1",
                "model": "gpt-5-mini-2025",
                "request_id": response.headers["x-request-id"],
                "finish_reason": "stop",
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": 3,
                    "total_tokens": 8,
                    "reasoning_tokens": None,
                    "cached_tokens": None,
                },
            },
        ),
    ]
    sent = upstream_json(route)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_completion_tokens"] == 20


async def test_stream_skips_empty_deltas_and_tolerates_crlf(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    raw = sse_chunks(["a", "", "b"]).replace(b"\n", b"\r\n")
    upstream.post("/chat/completions").respond(200, content=raw, headers={"content-type": "text/event-stream"})
    response = await client.post(CHAT, json=chat_body(stream=True))
    assert [event for event, _ in parse_sse(response.text)] == ["delta", "delta", "done"]


async def test_stream_error_event_when_upstream_reports_error_mid_stream(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    raw = sse_chunks(["one"], done=False, usage=False).rsplit(b"data:", 1)[0]
    raw += b'data: {"error": {"message": "overloaded, key sk-live-abcdef1234", "type": "server_error"}}\n\n'
    upstream.post("/chat/completions").respond(200, content=raw, headers={"content-type": "text/event-stream"})

    response = await client.post(CHAT, json=chat_body(stream=True))

    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[0] == ("delta", {"content": "one"})
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "upstream_error"
    assert events[-1][1]["request_id"] == response.headers["x-request-id"]
    assert "sk-live" not in response.text


class _BreakingStream(httpx.AsyncByteStream):
    """Sends `chunks`, then fails like a dropped connection (or ends early when `error` is None)."""

    def __init__(self, chunks: list[bytes], error: Exception | None) -> None:
        self.chunks, self.error, self.closed = chunks, error, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


MID_STREAM_FAILURES = {
    "connection_dropped": (httpx.RemoteProtocolError("peer closed connection"), "upstream_error"),
    "read_timeout": (httpx.ReadTimeout("no data"), "upstream_timeout"),
    "ended_without_finish": (None, "upstream_error"),
}


@pytest.mark.parametrize(("error", "code"), MID_STREAM_FAILURES.values(), ids=MID_STREAM_FAILURES.keys())
async def test_stream_upstream_failure_after_first_byte_emits_error_event(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs, error: Exception | None, code: str
) -> None:
    partial = sse_chunks(["one", " two"], usage=False, done=False).split(b"\n\n")[:3]
    stream = _BreakingStream([part + b"\n\n" for part in partial], error)
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})
    )

    response = await client.post(CHAT, json=chat_body(stream=True))

    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[:2] == [("delta", {"content": "one"}), ("delta", {"content": " two"})]
    assert events[2][0] == "error"
    assert events[2][1]["code"] == code
    assert len(events) == 3
    assert stream.closed
    call = _events(read_logs(), "llm_call")[-1]
    assert call["code"] == code
    assert call["delivered_chunks"] == 2


async def test_stream_client_disconnect_closes_upstream_and_logs_cancelled(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    """Drive the ASGI app directly: httpx's ASGITransport cannot disconnect mid-body."""
    upstream_closed = asyncio.Event()

    class SlowStream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for part in sse_chunks(["first"] + ["more"] * 50).split(b"\n\n"):
                yield part + b"\n\n"
                await asyncio.sleep(0.05)

        async def aclose(self) -> None:
            upstream_closed.set()

    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, stream=SlowStream(), headers={"content-type": "text/event-stream"})
    )
    body = json.dumps(chat_body(stream=True)).encode()
    sent: list[dict[str, Any]] = []
    first_delta = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_delta.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and b"event: delta" in message.get("body", b""):
            first_delta.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    async with app_client() as (_, _, asgi):
        async with asyncio.timeout(5):
            await asgi(scope, receive, send)
        await asyncio.wait_for(upstream_closed.wait(), timeout=1)

    bodies = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    assert b"event: done" not in bodies
    call = _events(read_logs(), "llm_call")[-1]
    assert call["cancelled"] is True
    assert call["stream"] is True
    assert 1 <= call["delivered_chunks"] < 51


async def test_stream_pool_exhausted_answers_503_quickly(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    holding = asyncio.Event()
    release = asyncio.Event()

    class Held(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse_chunks(["x"]).split(b"\n\n")[0] + b"\n\n"
            holding.set()
            await release.wait()
            yield sse_chunks(["x"]).split(b"\n\n", 1)[1]

    upstream.post("/chat/completions").mock(
        side_effect=lambda request: httpx.Response(200, stream=Held(), headers={"content-type": "text/event-stream"})
    )
    settings = make_settings(llm_max_connections=1, llm_pool_timeout_seconds=0.05)
    async with app_client(settings) as (client, _, _):
        holder = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
        await asyncio.wait_for(holding.wait(), timeout=5)
        started = asyncio.get_running_loop().time()
        refused = await client.post(CHAT, json=chat_body())
        waited = asyncio.get_running_loop().time() - started
        release.set()
        held = await asyncio.wait_for(holder, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "upstream_unavailable"
    assert refused.headers["retry-after"] == "1"
    assert waited < 0.4
    assert held.status_code == 200
    assert parse_sse(held.text)[-1][0] == "done"


# --- logs ----------------------------------------------------------------------------------------------------------


async def test_logs_one_request_line_and_one_call_line_without_secrets_or_text(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(
        200, json=completion("The secret answer"), headers={"x-request-id": "req_up_9"}
    )
    async with app_client(make_settings(service_api_keys=SERVICE_KEY)) as (client, _, _):
        response = await client.post(
            CHAT,
            json=chat_body("my private prompt"),
            headers={"Authorization": f"Bearer {SERVICE_KEY}", "X-Request-ID": "rid-1"},
        )
    assert response.status_code == 200

    logs = read_logs()
    raw = read_logs.raw  # type: ignore[attr-defined]
    requests, calls = _events(logs, "request"), _events(logs, "llm_call")
    assert len(requests) == 1
    assert len(calls) == 1
    assert requests[0] | {"duration_ms": 0} == requests[0] | {
        "request_id": "rid-1",
        "method": "POST",
        "path": CHAT,
        "status": 200,
        "duration_ms": 0,
    }
    assert requests[0]["duration_ms"] > 0
    call = calls[0]
    assert call["request_id"] == "rid-1"
    assert call["model"] == "gpt-5-mini"
    assert call["stream"] is False
    assert (call["prompt_tokens"], call["completion_tokens"], call["total_tokens"]) == (9, 6, 15)
    assert call["latency_ms"] > 0
    assert call["finish_reason"] == "stop"
    assert call["upstream_request_id"] == "req_up_9"
    assert "code" not in call
    for line in logs:
        assert {"timestamp", "level", "event"} <= line.keys()
    for secret in (UPSTREAM_KEY, SERVICE_KEY, "my private prompt", "The secret answer", "Bearer"):
        assert secret not in raw


async def test_stream_call_log_has_ttft_and_usage(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(
        200, content=sse_chunks(["a", "b"]), headers={"content-type": "text/event-stream"}
    )
    await client.post(CHAT, json=chat_body(stream=True))
    call = _events(read_logs(), "llm_call")[-1]
    assert call["stream"] is True
    assert call["ttft_ms"] >= 0
    assert call["total_tokens"] == 7
    assert call["finish_reason"] == "stop"
    assert "cancelled" not in call


async def test_failed_call_log_has_error_code(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(401, json=LEAKY_401)
    await client.post(CHAT, json=chat_body())
    logs = read_logs()
    call = _events(logs, "llm_call")[-1]
    assert call["code"] == "llm_auth_error"
    assert call["level"] == "warning"
    assert "sk-test" not in read_logs.raw  # type: ignore[attr-defined]


async def test_log_prompts_logs_message_text(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion("visible answer"))
    async with app_client(make_settings(log_prompts=True)) as (client, _, _):
        await client.post(CHAT, json=chat_body("visible prompt"))
    call = _events(read_logs(), "llm_call")[-1]
    assert call["messages"] == [{"role": "user", "content": "visible prompt"}]
    assert call["answer"] == "visible answer"


async def test_log_level_filters_info_lines(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(make_settings(log_level="WARNING")) as (client, _, _):
        await client.post(CHAT, json=chat_body())
    assert _events(read_logs(), "request") == []


# --- CORS and OpenAPI ----------------------------------------------------------------------------------------------


async def test_cors_preflight_and_exposed_request_id(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    upstream.post("/chat/completions").respond(
        200, content=sse_chunks(["a"]), headers={"content-type": "text/event-stream"}
    )
    origin = "https://app.example"
    async with app_client(make_settings(cors_allow_origins=f"{origin},https://other.example")) as (client, _, _):
        preflight = await client.options(
            CHAT,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        sdk_preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-retry-count",
            },
        )
        stop_preflight = await client.options(
            CHAT + "/streams/" + "0" * 32,
            headers={"Origin": origin, "Access-Control-Request-Method": "DELETE"},
        )
        streamed = await client.post(CHAT, json=chat_body(stream=True), headers={"Origin": origin})
        foreign = await client.options(
            CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == origin
    assert preflight.headers["x-request-id"]
    assert sdk_preflight.status_code == 200
    assert "x-stainless-retry-count" in sdk_preflight.headers["access-control-allow-headers"].lower()
    assert stop_preflight.status_code == 200
    assert "DELETE" in stop_preflight.headers["access-control-allow-methods"]
    assert streamed.headers["access-control-allow-origin"] == origin
    exposed = streamed.headers["access-control-expose-headers"].lower()
    for header in ("x-request-id", "x-stream-id", "retry-after", "x-ratelimit-remaining-tokens"):
        assert header in exposed
    assert "access-control-allow-origin" not in foreign.headers


async def test_openapi_declares_every_error_response(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/api/v1/llm/chat"]["post"]["responses"]
    assert {"200", "400", "401", "413", "422", "429", "500", "502", "503", "504"} <= responses.keys()
    assert "text/event-stream" in responses["200"]["content"]
    assert (await client.get("/docs")).status_code == 200


async def test_auth_is_checked_before_validation(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(service_api_keys=SERVICE_KEY)) as (client, _, _):
        anonymous = await client.post(CHAT, json={})
        authorised = await client.post(CHAT, json={}, headers={"Authorization": f"Bearer {SERVICE_KEY}"})
    assert anonymous.status_code == 401
    assert authorised.status_code == 422


async def test_stream_is_never_retried_once_it_has_started(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    partial = sse_chunks(["one"], usage=False, done=False).split(b"\n\n")[:2]
    route = upstream.post("/chat/completions").mock(
        side_effect=lambda request: httpx.Response(
            200,
            stream=_BreakingStream([part + b"\n\n" for part in partial], httpx.ReadError("reset")),
            headers={"content-type": "text/event-stream"},
        )
    )
    async with app_client(make_settings(llm_max_retries=2)) as (client, _, _):
        response = await client.post(CHAT, json=chat_body(stream=True))
    assert [event for event, _ in parse_sse(response.text)] == ["delta", "error"]
    assert route.call_count == 1


@pytest.mark.parametrize(
    "bad_chunk",
    [b"data: [1, 2]\n\n", b'data: {"choices": ["x"]}\n\n', b"data: {oops\n\n"],
    ids=["not_an_object", "choice_not_an_object", "not_json"],
)
async def test_stream_malformed_chunk_ends_with_upstream_error_event(
    client: httpx.AsyncClient, upstream: respx.MockRouter, bad_chunk: bytes
) -> None:
    raw = sse_chunks(["one"], usage=False, done=False).rsplit(b"data:", 1)[0] + bad_chunk
    upstream.post("/chat/completions").respond(200, content=raw, headers={"content-type": "text/event-stream"})
    response = await client.post(CHAT, json=chat_body(stream=True))
    events = parse_sse(response.text)
    assert events[0] == ("delta", {"content": "one"})
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "upstream_error"


async def test_stream_unexpected_failure_mid_stream_is_internal_error_event(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from src.core.llm import relay

    def broken_done(**_: Any) -> None:
        raise RuntimeError("relay bug")

    monkeypatch.setattr(relay, "StreamDone", broken_done)
    upstream.post("/chat/completions").respond(
        200, content=sse_chunks(["a"]), headers={"content-type": "text/event-stream"}
    )
    response = await client.post(CHAT, json=chat_body(stream=True))
    events = parse_sse(response.text)
    assert [event for event, _ in events] == ["delta", "error"]
    assert events[-1][1]["code"] == "internal_error"
    assert "relay bug" not in response.text
    logs = read_logs()
    assert "RuntimeError: relay bug" in _events(logs, "stream_relay_failed")[0]["exception"]


async def test_cors_lets_browsers_read_the_413(app_client: Callable[..., Any]) -> None:
    origin = "https://app.example"
    async with app_client(make_settings(cors_allow_origins=origin, max_request_bytes=100)) as (client, _, _):
        response = await client.post(CHAT, json=chat_body("x" * 200), headers={"Origin": origin})
    assert response.status_code == 413
    assert response.headers["access-control-allow-origin"] == origin
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
async def test_a_call_cancelled_while_waiting_for_the_upstream_gives_its_slot_back(
    upstream: respx.MockRouter, stream: bool
) -> None:
    # Cancelled before the upstream answered (a server shutting down, a caller's task cancelled): the one slot
    # must come back, or every later call would wait for it and answer 503.
    upstream_reached = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        upstream_reached.set()
        await asyncio.sleep(60)
        raise AssertionError("the call was not cancelled")

    upstream.post("/chat/completions").mock(side_effect=hang)
    settings = make_settings(llm_max_connections=1, llm_pool_timeout_seconds=0.05)
    async with httpx.AsyncClient() as http_client:
        service = LLMService(client=OpenAIClient.from_settings(settings, http_client=http_client), settings=settings)
        request = LLMRequest.model_validate(chat_body(stream=stream))
        call = (
            service.stream_chat_completion(request, context=CallContext(request_id="r1", caller=ANONYMOUS))
            if stream
            else service.get_chat_completion(request, context=CallContext(request_id="r1", caller=ANONYMOUS))
        )
        task = asyncio.ensure_future(call)
        await asyncio.wait_for(upstream_reached.wait(), timeout=2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        upstream.post("/chat/completions").respond(200, json=completion())
        answer = await service.get_chat_completion(
            LLMRequest.model_validate(chat_body()), context=CallContext(request_id="r2", caller=ANONYMOUS)
        )
    assert answer.message.content == "Hi! How can I help?"
