"""Structured output, refusals, image parts and usage details, in-process against a respx upstream; and a
resumable stream cut short by the shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from src.core.keys import ANONYMOUS
from src.core.llm.call_context import CallContext
from src.core.llm.client import OpenAIClient
from src.core.llm.resumable import ResumableStreams
from src.core.llm.service import LLMService
from src.core.shutdown import Drain
from src.core.stream_buffers import BufferedEvent, BuffersUnavailableError, MemoryStreamBuffers
from src.models.llm import LLMRequest
from src.utils.logging import configure_logging
from tests.conftest import chat_body, completion, make_settings, parse_sse, upstream_json

CHAT = "/api/v1/llm/chat"
Logs = Callable[[], list[dict[str, Any]]]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30).decode()
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "weather",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@pytest.mark.parametrize(
    "response_format", [{"type": "text"}, {"type": "json_object"}, SCHEMA], ids=["text", "json_object", "schema"]
)
async def test_response_format_is_forwarded_as_openai_defines_it(
    client: httpx.AsyncClient, upstream: respx.MockRouter, response_format: dict[str, Any]
) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion('{"city": "Oslo"}'))
    response = await client.post(CHAT, json=chat_body(response_format=response_format))
    assert response.status_code == 200
    assert upstream_json(route)["response_format"] == response_format


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": "not an object"}},
        {"type": "json_schema", "json_schema": {"name": "no_schema"}},
        {"type": "text", "extra": 1},
    ],
)
async def test_malformed_response_formats_are_422(
    client: httpx.AsyncClient, upstream: respx.MockRouter, response_format: dict[str, Any]
) -> None:
    response = await client.post(CHAT, json=chat_body(response_format=response_format))
    assert response.status_code == 422
    assert "response_format" in response.json()["error"]["message"]


async def test_a_refusal_comes_back_as_message_refusal(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    answer = completion()
    answer["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    upstream.post("/chat/completions").respond(200, json=answer)
    response = await client.post(CHAT, json=chat_body(response_format=SCHEMA))
    assert response.json()["message"] == {"role": "assistant", "content": "", "refusal": "I can't help with that."}


async def test_a_streamed_refusal_comes_as_refusal_events(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    body = (
        _chunk({"role": "assistant", "content": None, "refusal": None})
        + _chunk({"refusal": "I can't "})
        + _chunk({"refusal": "help."})
        + _chunk({}, finish="stop")
        + b"data: [DONE]\n\n"
    )
    upstream.post("/chat/completions").respond(200, content=body, headers={"content-type": "text/event-stream"})
    response = await client.post(CHAT, json=chat_body(stream=True, response_format=SCHEMA))
    events = parse_sse(response.text)
    assert events[:2] == [("refusal", {"content": "I can't "}), ("refusal", {"content": "help."})]
    assert events[2][0] == "done"


async def test_image_parts_are_forwarded_in_order(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/chat/completions").respond(200, json=completion())
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
    ]
    response = await client.post(
        CHAT, json={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]}
    )
    assert response.status_code == 200
    assert upstream_json(route)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": content},
    ]


@pytest.mark.parametrize(
    ("part", "field"),
    [
        ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "image_url.url"),
        ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}, "image_url.url"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}, "image_url.url"),
        ({"type": "image_url", "image_url": {"url": PNG, "detail": "max"}}, "image_url.detail"),
        ({"type": "audio", "audio": {}}, "messages.0.content.list"),
        ({"type": "text"}, "text.text"),
    ],
)
async def test_a_malformed_part_is_a_422_naming_the_part(
    client: httpx.AsyncClient, upstream: respx.MockRouter, part: dict[str, Any], field: str
) -> None:
    content = [{"type": "text", "text": "look"}, part]
    response = await client.post(CHAT, json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    fields = [detail["field"] for detail in error["details"]]
    # The failing part is the second one (index 1) of message 0.
    assert any(name.startswith("body.messages.0.content") and ".1" in name and field in name for name in fields), fields


async def test_only_user_messages_may_carry_parts(client: httpx.AsyncClient, upstream: respx.MockRouter) -> None:
    content = [{"type": "text", "text": "hi"}]
    response = await client.post(CHAT, json={"messages": [{"role": "assistant", "content": content}]})
    assert response.status_code == 422
    assert "only user messages" in json.dumps(response.json())


async def test_data_urls_count_against_the_body_cap(app_client: Callable[..., Any], upstream: respx.MockRouter) -> None:
    photo = "data:image/jpeg;base64," + "A" * 2_000
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo}}]}]}
    async with app_client(make_settings(max_request_bytes=1_500)) as (client, _, _):
        response = await client.post(CHAT, json=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_usage_details_reach_the_answer_the_done_event_and_the_log(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs
) -> None:
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": 12,
        "total_tokens": 32,
        "completion_tokens_details": {"reasoning_tokens": 8},
        "prompt_tokens_details": {"cached_tokens": 16},
    }
    upstream.post("/chat/completions").mock(
        side_effect=[
            httpx.Response(200, json=completion(usage=usage)),
            httpx.Response(
                200,
                content=_chunk({"content": "Hi"})
                + _chunk({}, finish="stop")
                + _chunk({}, usage=usage)
                + b"data: [DONE]\n\n",
                headers={"content-type": "text/event-stream"},
            ),
        ]
    )
    batch = await client.post(CHAT, json=chat_body())
    stream = await client.post(CHAT, json=chat_body(stream=True))
    expected = {
        "prompt_tokens": 20,
        "completion_tokens": 12,
        "total_tokens": 32,
        "reasoning_tokens": 8,
        "cached_tokens": 16,
    }
    assert batch.json()["usage"] == expected
    assert parse_sse(stream.text)[-1][1]["usage"] == expected
    calls = [line for line in read_logs() if line.get("event") == "llm_call"]
    assert [(line["reasoning_tokens"], line["cached_tokens"]) for line in calls] == [(8, 16), (8, 16)]


async def test_logged_prompts_show_an_inline_image_by_its_size_not_its_bytes(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    content = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": PNG}}]
    async with app_client(make_settings(log_prompts=True)) as (client, _, _):
        await client.post(CHAT, json={"messages": [{"role": "user", "content": content}]})
    line = next(line for line in read_logs() if line.get("event") == "llm_call")
    url = line["messages"][0]["content"][1]["image_url"]["url"]
    assert url == f"data:image/png;base64,<{len(PNG.split(',', 1)[1])} characters>"


async def test_a_resumable_stream_running_when_the_grace_ends_ends_with_the_shutdown_event(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    started = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield _chunk({"content": "first"})
            started.set()
            await asyncio.sleep(60)
            yield b""

    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, stream=Endless(), headers={"content-type": "text/event-stream"})
    )
    async with app_client(make_settings(llm_shutdown_grace_seconds=0.1)) as (client, app, _):
        call = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True, resumable=True)))
        await asyncio.wait_for(started.wait(), timeout=5)
        app.state.drain.begin()
        response = await asyncio.wait_for(call, timeout=5)
    events = parse_sse(response.text)
    assert events[0] == ("delta", {"content": "first"})
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "server_shutting_down"
    call_line = next(line for line in read_logs() if line.get("event") == "llm_call")
    assert call_line["code"] == "server_shutting_down"
    assert call_line["resumes"] == 0


async def test_a_405_names_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.put(CHAT + "/streams/" + "0" * 32)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "DELETE, GET"


class _FailingOnce(MemoryStreamBuffers):
    """In-memory buffers whose store fails once, at the given event (as Redis may mid-stream)."""

    def __init__(self, *, fail_at: int) -> None:
        super().__init__(ttl_seconds=60, total_bytes=1_000_000)
        self._fail_at = fail_at

    async def append(self, stream_id: str, event_id: int, event: BufferedEvent) -> bool:
        if event_id == self._fail_at:
            self._fail_at = -1
            raise BuffersUnavailableError("connection reset")
        return await super().append(stream_id, event_id, event)


async def test_a_store_failing_mid_stream_ends_the_stream_for_every_reader_and_is_accounted(
    upstream: respx.MockRouter, read_logs: Logs
) -> None:
    body = b"".join(_chunk({"content": word}) for word in ("a", "b", "c", "d")) + _chunk({}, finish="stop")
    upstream.post("/chat/completions").respond(
        200, content=body + b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
    )
    settings = make_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    drain = Drain(grace_seconds=1)
    resumable = ResumableStreams(local=_FailingOnce(fail_at=2), shared=None, drain=drain, max_stream_bytes=1_000_000)
    async with httpx.AsyncClient() as http_client:
        service = LLMService(
            client=OpenAIClient.from_settings(settings, http_client=http_client),
            settings=settings,
            drain=drain,
            resumable=resumable,
        )
        follower = await service.stream_chat_completion(
            LLMRequest.model_validate(chat_body(stream=True, resumable=True)),
            context=CallContext(request_id="r1", caller=ANONYMOUS),
        )
        events = [event async for event in follower]
        await resumable.aclose()
    # The first event was kept; the failed second one ends the stream with an error every reader gets.
    assert [type(event).__name__ for event in events] == ["BufferedEvent", "BufferedEvent"]
    assert isinstance(events[-1], BufferedEvent)
    assert events[-1].name == "error"
    assert json.loads(events[-1].data)["code"] == "resume_unavailable"
    call = next(line for line in read_logs() if line.get("event") == "llm_call")
    assert call["code"] == "resume_unavailable"
