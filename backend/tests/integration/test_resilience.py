"""In-process: retries without holding a slot, the upstream's own words, the drain, keep-alive and stalled readers."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import httpx
import respx
from starlette.types import Message

from src.api.sse import KEEPALIVE_COMMENT, EventStreamResponse, StreamTimings
from src.core.shutdown import Drain
from tests.conftest import chat_body, completion, make_settings, sse_chunks

CHAT = "/api/v1/llm/chat"
Logs = Callable[[], list[dict[str, Any]]]


def _calls(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") == "llm_call"]


async def test_the_callers_error_message_is_openais_own_words(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    said = "Invalid value for 'top_p': must be at most 1, got 2 (see https://platform.openai.com/docs)."
    upstream.post("/chat/completions").respond(
        400, json={"error": {"message": said, "type": "invalid_request_error", "param": "top_p", "code": None}}
    )
    response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == said


async def test_an_auth_failure_tells_the_operator_what_the_upstream_said_but_not_the_caller(
    client: httpx.AsyncClient, upstream: respx.MockRouter, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(
        403,
        json={"error": {"message": "Project proj_x lacks model.request for key sk-proj-abcdef123456", "code": None}},
    )
    response = await client.post(CHAT, json=chat_body())
    assert response.json()["error"]["code"] == "llm_auth_error"
    assert "Project" not in response.text
    call = _calls(read_logs())[-1]
    assert call["upstream_status"] == 403
    assert call["upstream_message"] == "Project proj_x lacks model.request for key [redacted]"


async def test_no_connection_slot_is_held_while_waiting_to_retry(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    first_refused = asyncio.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["messages"][0]["content"] == "retried" and not first_refused.is_set():
            first_refused.set()
            return httpx.Response(503, json={"error": {"message": "busy"}}, headers={"retry-after": "1"})
        return httpx.Response(200, json=completion())

    upstream.post("/chat/completions").mock(side_effect=answer)
    settings = make_settings(llm_max_connections=1, llm_pool_timeout_seconds=0.05, llm_max_retries=1)
    async with app_client(settings) as (client, _, _):
        retried = asyncio.create_task(client.post(CHAT, json=chat_body("retried")))
        await asyncio.wait_for(first_refused.wait(), timeout=5)
        # The only slot is free while the first call waits a second for its retry.
        meanwhile = await client.post(CHAT, json=chat_body("meanwhile"))
        assert meanwhile.status_code == 200
        assert not retried.done()
        assert (await asyncio.wait_for(retried, timeout=5)).status_code == 200


async def test_connection_failures_are_retried_and_counted_in_the_call_line(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    route = upstream.post("/chat/completions")
    route.side_effect = [httpx.ConnectError("refused"), httpx.Response(200, json=completion())]
    async with app_client(make_settings(llm_max_retries=2)) as (client, _, _):
        response = await client.post(CHAT, json=chat_body())
    assert response.status_code == 200
    assert route.call_count == 2
    assert _calls(read_logs())[-1]["attempts"] == 2


# --- the drain -------------------------------------------------------------------------------------------------


async def test_draining_refuses_new_calls_and_readiness_says_so(app_client: Callable[..., Any]) -> None:
    async with app_client(make_settings(llm_shutdown_grace_seconds=5)) as (client, app, _):
        ready = await client.get("/health/ready")
        assert ready.json()["status"] == "ok"
        app.state.drain.begin()
        refused = await client.post(CHAT, json=chat_body())
        not_ready = await client.get("/health/ready")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "draining"


async def test_a_batch_call_still_running_when_the_grace_ends_is_503(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    reached = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        reached.set()
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")

    upstream.post("/chat/completions").mock(side_effect=hang)
    async with app_client(make_settings(llm_shutdown_grace_seconds=0.1)) as (client, app, _):
        call = asyncio.create_task(client.post(CHAT, json=chat_body()))
        await asyncio.wait_for(reached.wait(), timeout=5)
        app.state.drain.begin()
        response = await asyncio.wait_for(call, timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert _calls(read_logs())[-1]["cancelled"] is True


async def test_a_stream_still_running_when_the_grace_ends_gets_the_shutdown_event(
    app_client: Callable[..., Any], upstream: respx.MockRouter, read_logs: Logs
) -> None:
    started = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse_chunks(["first"]).split(b"\n\n")[1] + b"\n\n"
            started.set()
            await asyncio.sleep(60)
            yield b""

    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, stream=Endless(), headers={"content-type": "text/event-stream"})
    )
    async with app_client(make_settings(llm_shutdown_grace_seconds=0.1)) as (client, app, _):
        call = asyncio.create_task(client.post(CHAT, json=chat_body(stream=True)))
        await asyncio.wait_for(started.wait(), timeout=5)
        app.state.drain.begin()
        response = await asyncio.wait_for(call, timeout=5)
    assert response.status_code == 200
    assert response.text.endswith("\n\n")
    last = response.text.strip().split("\n\n")[-1]
    # The shutdown's last event is the stream's next one.
    assert last.startswith("id: 2\nevent: error\n")
    assert json.loads(last.split("data: ", 1)[1])["code"] == "server_shutting_down"
    assert _calls(read_logs())[-1]["code"] == "server_shutting_down"


def test_the_drain_follows_the_servers_own_signal_handler() -> None:
    seen: list[int] = []

    def server_handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    async def scenario() -> Drain:
        drain = Drain(grace_seconds=30)
        drain.chain_server_signals()
        try:
            signal.raise_signal(signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + 5
            while not drain.draining and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
        finally:
            drain.restore_server_signals()
        return drain

    previous = signal.signal(signal.SIGTERM, server_handler)
    try:
        drain = asyncio.run(scenario())
        assert signal.getsignal(signal.SIGTERM) is server_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
    assert drain.draining
    assert not drain.expired


def test_without_a_server_handler_the_drain_installs_nothing() -> None:
    async def scenario() -> None:
        Drain(grace_seconds=1).chain_server_signals()

    # (Under coverage the test process has a SIGTERM handler of coverage's: put the default back meanwhile.)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        asyncio.run(scenario())
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_subscribing_after_the_grace_ended_is_told_at_once() -> None:
    drain = Drain(grace_seconds=0)
    expired = asyncio.Event()
    drain.subscribe(expired.set)
    drain.begin()
    await asyncio.wait_for(expired.wait(), timeout=5)
    assert drain.expired
    told: list[bool] = []
    drain.subscribe(lambda: told.append(True))()
    assert told == [True]


# --- the event-stream response itself --------------------------------------------------------------------------------


class _Events:
    """A stand-in `ChatStream` for the response: events from a queue, closing recorded."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.ends: list[str] = []
        self.request_id = "r1"
        self.resumable = False
        self.first_event_id = 1

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> bytes:
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    async def aclose(self, *, end: Any) -> None:
        self.ends.append(end.value)


async def test_keepalive_comments_fill_silences_and_stop_when_events_flow() -> None:
    events = _Events()
    sent: list[bytes] = []
    two_comments = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))
        if sent.count(KEEPALIVE_COMMENT) == 2:
            two_comments.set()

    async def receive() -> Message:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    response = EventStreamResponse(
        events,  # type: ignore[arg-type]
        timings=StreamTimings(keepalive_seconds=0.05, send_timeout_seconds=5),
        drain=Drain(grace_seconds=5),
        encode=lambda event, event_id: event,
    )
    serving = asyncio.create_task(response({"type": "http"}, receive, send))
    await asyncio.wait_for(two_comments.wait(), timeout=5)
    await events.queue.put(b"event: delta\n\n")
    await events.queue.put(None)
    await asyncio.wait_for(serving, timeout=5)
    assert sent[-2:] == [b"event: delta\n\n", b""]
    assert events.ends == ["delivered"]


async def test_a_reader_that_stops_reading_ends_the_stream_as_cancelled() -> None:
    events = _Events()
    await events.queue.put(b"event: delta\n\n")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(60)  # a full TCP window: the write never completes

    async def receive() -> Message:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    response = EventStreamResponse(
        events,  # type: ignore[arg-type]
        timings=StreamTimings(keepalive_seconds=30, send_timeout_seconds=0.1),
        drain=Drain(grace_seconds=5),
        encode=lambda event, event_id: event,
    )
    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=5)
    assert events.ends == ["client_gone"]
