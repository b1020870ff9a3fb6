"""Resumable streams and the stop button over real sockets: the real service, the bundled upstream, real Redis.

A client drops its connection mid-answer and resumes with `Last-Event-ID` (on the same instance, and on another
one sharing Redis): it gets exactly the rest, with the same ids. `DELETE` stops the upstream and ends every reader
with `done` / `cancelled`. Streams are per key, expire, and their buffers are bounded.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource, ServerSentEvent

from src.devtools.servers import ServerProcess
from tests.e2e.network import CHAT, WAIT_SECONDS, RunningService, chat, running_service, upstream_stats

pytestmark = pytest.mark.e2e

STREAMS = CHAT + "/streams/"
LONG_ANSWER = "mock-words-400"
SHORT_ANSWER = "mock-words-30"
STREAM_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def service(slow_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(slow_upstream.url, tmp_path_factory.mktemp("service")) as running:
        yield running


def _read(response: httpx.Response, *, count: int | None = None) -> list[ServerSentEvent]:
    """The stream's events (all of them, or the first `count`)."""
    events = []
    for sse in EventSource(response).iter_sse():
        events.append(sse)
        if count is not None and len(events) == count:
            break
    return events


def _text(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(sse.data)["content"] for sse in events if sse.event == "delta")


def _ids(events: list[ServerSentEvent]) -> list[int]:
    return [int(sse.id) for sse in events]


def _full_answer(url: str, model: str) -> str:
    answer = httpx.post(url + CHAT, json=chat("resume me", model=model), timeout=WAIT_SECONDS)
    assert answer.status_code == 200
    content: str = answer.json()["message"]["content"]
    return content


def _start_and_drop(url: str, *, model: str, keep: int, headers: dict[str, str] | None = None) -> tuple[str, list[Any]]:
    """Start a resumable stream, read `keep` events, then drop the connection."""
    with httpx.stream(
        "POST",
        url + CHAT,
        json=chat("resume me", model=model, stream=True, resumable=True),
        headers=headers,
        timeout=WAIT_SECONDS,
    ) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-stream-id"]
        received = _read(response, count=keep)
    return stream_id, received


def _resume(url: str, stream_id: str, last_event_id: int, headers: dict[str, str] | None = None) -> list[Any]:
    with httpx.stream(
        "GET",
        url + STREAMS + stream_id,
        headers={"Last-Event-ID": str(last_event_id), **(headers or {})},
        timeout=WAIT_SECONDS,
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-stream-id"] == stream_id
        return _read(response)


def _wait_for_stats(upstream: ServerProcess, name: str, at_least: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while upstream_stats(upstream)[name] < at_least:
        assert time.monotonic() < deadline, f"{name} stayed below {at_least}: {upstream_stats(upstream)}"
        time.sleep(0.02)


def test_every_event_has_the_next_id_and_every_stream_a_server_made_id(service: RunningService) -> None:
    with httpx.stream(
        "POST",
        service.url + CHAT,
        json=chat("ids", model=SHORT_ANSWER, stream=True),
        headers={"X-Request-ID": "my-own-request-id"},
        timeout=WAIT_SECONDS,
    ) as response:
        events = _read(response)
        stream_id = response.headers["x-stream-id"]
    assert STREAM_ID.fullmatch(stream_id)
    assert stream_id != response.headers["x-request-id"]
    assert _ids(events) == list(range(1, len(events) + 1))
    assert events[-1].event == "done"
    # Not resumable: nothing was kept.
    assert httpx.get(service.url + STREAMS + stream_id, timeout=5).status_code == 404


def test_a_dropped_stream_resumes_with_exactly_the_rest_and_is_logged_once(
    service: RunningService, slow_upstream: ServerProcess
) -> None:
    expected = _full_answer(service.url, SHORT_ANSWER)
    completed_before = upstream_stats(slow_upstream)["streams_completed"]
    stream_id, first_part = _start_and_drop(service.url, model=SHORT_ANSWER, keep=5)
    assert _ids(first_part) == [1, 2, 3, 4, 5]

    rest = _resume(service.url, stream_id, last_event_id=5)

    assert _ids(rest) == list(range(6, 6 + len(rest)))
    assert _text(first_part) + _text(rest) == expected
    done = json.loads(rest[-1].data)
    assert rest[-1].event == "done"
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 30
    # The upstream was read to its end, though the first client left; the call is one log line, with the resume.
    assert upstream_stats(slow_upstream)["streams_completed"] == completed_before + 1
    line = service.wait_for_log(lambda line: line.get("event") == "llm_call" and line.get("resumes") == 1)
    assert line["stream"] is True
    assert "cancelled" not in line
    assert "code" not in line
    calls = [entry for entry in service.log_lines() if entry.get("event") == "llm_call"]
    assert len([entry for entry in calls if entry["request_id"] == line["request_id"]]) == 1


def test_the_query_parameter_resumes_too_and_a_finished_stream_replays_from_any_id(
    service: RunningService,
) -> None:
    stream_id, first_part = _start_and_drop(service.url, model=SHORT_ANSWER, keep=2)
    # Several readers at once: one follows live, one after the end replays from the start.
    with httpx.stream(
        "GET", service.url + STREAMS + stream_id, params={"last_event_id": 2}, timeout=WAIT_SECONDS
    ) as response:
        live = _read(response)
    everything = _resume(service.url, stream_id, last_event_id=0)
    assert _ids(everything) == list(range(1, len(everything) + 1))
    assert _ids(live) == _ids(everything)[2:]
    assert [sse.data for sse in everything[:2]] == [sse.data for sse in first_part]
    assert [sse.data for sse in everything[2:]] == [sse.data for sse in live]
    # After the last event there is nothing more to send: the response simply ends.
    assert _resume(service.url, stream_id, last_event_id=len(everything)) == []


def test_stop_closes_the_upstream_and_every_reader_gets_done_cancelled(
    service: RunningService, slow_upstream: ServerProcess
) -> None:
    closed_before = upstream_stats(slow_upstream)["streams_client_closed"]
    with httpx.stream(
        "POST",
        service.url + CHAT,
        json=chat("stop me", model=LONG_ANSWER, stream=True, resumable=True),
        timeout=WAIT_SECONDS,
    ) as response:
        stream_id = response.headers["x-stream-id"]
        events = EventSource(response).iter_sse()
        first = [next(events), next(events)]
        with httpx.stream(
            "GET", service.url + STREAMS + stream_id, headers={"Last-Event-ID": "1"}, timeout=WAIT_SECONDS
        ) as follower:
            stopped = httpx.delete(service.url + STREAMS + stream_id, timeout=5)
            assert stopped.status_code == 204
            assert stopped.content == b""
            followed = _read(follower)
        rest = list(events)
    _wait_for_stats(slow_upstream, "streams_client_closed", closed_before + 1)
    for reader in (first + rest, followed):
        assert reader[-1].event == "done"
        done = json.loads(reader[-1].data)
        assert done["finish_reason"] == "cancelled"
        assert _ids(reader) == list(range(_ids(reader)[0], _ids(reader)[0] + len(reader)))
    # Far from the 400 words: the upstream was closed at once.
    assert len(_text(first + rest).split()) < 300
    line = service.wait_for_log(
        lambda line: line.get("event") == "llm_call" and line.get("cancelled") is True and "resumes" in line
    )
    assert line["resumes"] == 1
    # Stopping again, or after the end, changes nothing.
    assert httpx.delete(service.url + STREAMS + stream_id, timeout=5).status_code == 204


def test_unknown_and_malformed_stream_ids_are_404_stream_not_found(service: RunningService) -> None:
    for stream_id in (secrets.token_hex(16), "not-a-stream", "A" * 32):
        for method in ("GET", "DELETE"):
            response = httpx.request(method, service.url + STREAMS + stream_id, timeout=5)
            assert response.status_code == 404, (method, stream_id)
            assert response.json()["error"]["code"] == "stream_not_found"


def test_a_bad_last_event_id_is_a_validation_error(service: RunningService) -> None:
    stream_id, _ = _start_and_drop(service.url, model=SHORT_ANSWER, keep=1)
    for headers, params in (({"Last-Event-ID": "abc"}, {}), ({}, {"last_event_id": "-1"})):
        response = httpx.get(service.url + STREAMS + stream_id, headers=headers, params=params, timeout=5)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "validation_error"


def test_resumable_batch_calls_are_refused(service: RunningService) -> None:
    response = httpx.post(service.url + CHAT, json=chat("no", resumable=True), timeout=5)
    assert response.status_code == 422
    assert "resumable" in response.json()["error"]["message"] or response.json()["error"]["details"]


def test_only_the_key_that_started_a_stream_can_resume_or_stop_it(slow_upstream: ServerProcess, tmp_path: Path) -> None:
    owner, other = f"llmsvc-{secrets.token_hex(8)}", f"llmsvc-{secrets.token_hex(8)}"
    with running_service(slow_upstream.url, tmp_path, SERVICE_API_KEYS=f"{owner},{other}") as keyed:
        stream_id, _ = _start_and_drop(
            keyed.url, model=SHORT_ANSWER, keep=1, headers={"Authorization": f"Bearer {owner}"}
        )
        for method in ("GET", "DELETE"):
            foreign = httpx.request(
                method, keyed.url + STREAMS + stream_id, headers={"Authorization": f"Bearer {other}"}, timeout=5
            )
            assert foreign.status_code == 404
            assert foreign.json()["error"]["code"] == "stream_not_found"
            missing_key = httpx.request(method, keyed.url + STREAMS + stream_id, timeout=5)
            assert missing_key.status_code == 401
        rest = _resume(keyed.url, stream_id, 1, headers={"Authorization": f"Bearer {owner}"})
        assert rest[-1].event == "done"


def test_buffers_expire_after_the_ttl(slow_upstream: ServerProcess, tmp_path: Path) -> None:
    with running_service(slow_upstream.url, tmp_path, LLM_RESUME_TTL_SECONDS="0.5") as short_lived:
        stream_id, _ = _start_and_drop(short_lived.url, model=SHORT_ANSWER, keep=1)
        assert _resume(short_lived.url, stream_id, 1)[-1].event == "done"
        deadline = time.monotonic() + WAIT_SECONDS
        while (status := httpx.get(short_lived.url + STREAMS + stream_id, timeout=5).status_code) == 200:
            assert time.monotonic() < deadline, "the buffer outlived its TTL"
            time.sleep(0.1)
        assert status == 404


def test_an_answer_that_outgrows_its_buffer_is_stopped_with_resume_buffer_full(
    slow_upstream: ServerProcess, tmp_path: Path
) -> None:
    closed_before = upstream_stats(slow_upstream)["streams_client_closed"]
    with running_service(slow_upstream.url, tmp_path, LLM_RESUME_MAX_BYTES="1024") as capped:
        with httpx.stream(
            "POST",
            capped.url + CHAT,
            json=chat("too long", model=LONG_ANSWER, stream=True, resumable=True),
            timeout=WAIT_SECONDS,
        ) as response:
            events = _read(response)
        assert events[-1].event == "error"
        assert json.loads(events[-1].data)["code"] == "resume_buffer_full"
        assert sum(len(sse.event) + len(sse.data) for sse in events[:-1]) <= 1024
        _wait_for_stats(slow_upstream, "streams_client_closed", closed_before + 1)
        line = capped.wait_for_log(lambda line: line.get("code") == "resume_buffer_full")
        assert line["event"] == "llm_call"


def test_a_stream_started_on_one_instance_resumes_and_stops_on_another_through_redis(
    slow_upstream: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    with (
        running_service(slow_upstream.url, tmp_path / "a", REDIS_URL=redis_url) as first,
        running_service(slow_upstream.url, tmp_path / "b", REDIS_URL=redis_url) as second,
    ):
        expected = _full_answer(first.url, SHORT_ANSWER)
        stream_id, first_part = _start_and_drop(first.url, model=SHORT_ANSWER, keep=4)
        rest = _resume(second.url, stream_id, last_event_id=4)
        assert _ids(rest) == list(range(5, 5 + len(rest)))
        assert _text(first_part) + _text(rest) == expected
        assert json.loads(rest[-1].data)["finish_reason"] == "stop"
        # The producing instance logged the call once, with the resume made on the other one.
        line = first.wait_for_log(lambda line: line.get("event") == "llm_call" and line.get("resumes") == 1)
        assert "cancelled" not in line

        closed_before = upstream_stats(slow_upstream)["streams_client_closed"]
        long_id, _ = _start_and_drop(first.url, model=LONG_ANSWER, keep=2)
        assert httpx.delete(second.url + STREAMS + long_id, timeout=5).status_code == 204
        _wait_for_stats(slow_upstream, "streams_client_closed", closed_before + 1)
        tail = _resume(second.url, long_id, last_event_id=2)
        assert tail[-1].event == "done"
        assert json.loads(tail[-1].data)["finish_reason"] == "cancelled"
        assert len(_text(tail).split()) < 300
