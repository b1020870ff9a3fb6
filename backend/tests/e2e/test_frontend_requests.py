"""The frontends issue's richer requests over real sockets: the real service, the bundled upstream.

Structured output (a schema answered with valid JSON), refusals in batch and stream, image parts forwarded and
counted, malformed parts named in a 422, usage details (reasoning and cached tokens), and the in-memory buffers'
total cap evicting the least recently used stream.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import EventSource

from src.devtools.mock_openai import IMAGE_PART_TOKENS, REFUSAL_TEXT
from src.devtools.servers import ServerProcess
from tests.e2e.network import CHAT, WAIT_SECONDS, RunningService, chat, running_service

pytestmark = pytest.mark.e2e

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30).decode()
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "weather",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.fixture(scope="module")
def service(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(upstream.url, tmp_path_factory.mktemp("service")) as running:
        yield running


def _post(service: RunningService, body: dict[str, object]) -> httpx.Response:
    return httpx.post(service.url + CHAT, json=body, timeout=WAIT_SECONDS)


def test_a_json_schema_is_answered_with_json_that_follows_it(service: RunningService) -> None:
    answer = _post(service, chat("weather in Oslo", model="mock-words-5", response_format=SCHEMA))
    assert answer.status_code == 200
    document = json.loads(answer.json()["message"]["content"])
    assert set(document) == {"city", "celsius"}
    assert isinstance(document["city"], str)
    assert isinstance(document["celsius"], int | float)


def test_a_refusal_is_message_refusal_in_batch_and_refusal_events_in_a_stream(service: RunningService) -> None:
    batch = _post(service, chat("do something bad", model="mock-refusal", response_format=SCHEMA))
    assert batch.json()["message"]["refusal"] == REFUSAL_TEXT
    assert batch.json()["message"]["content"] == ""
    with httpx.stream(
        "POST",
        service.url + CHAT,
        json=chat("do something bad", model="mock-refusal", stream=True, response_format=SCHEMA),
        timeout=WAIT_SECONDS,
    ) as response:
        events = list(EventSource(response).iter_sse())
    refusals = [json.loads(sse.data)["content"] for sse in events if sse.event == "refusal"]
    assert "".join(refusals) == REFUSAL_TEXT
    assert not [sse for sse in events if sse.event == "delta"]
    assert events[-1].event == "done"


def test_image_parts_are_forwarded_and_counted_in_usage(service: RunningService) -> None:
    text_only = _post(service, {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it"}]}]})
    with_images = _post(
        service,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is it"},
                        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
                    ],
                }
            ]
        },
    )
    assert with_images.status_code == 200
    added = with_images.json()["usage"]["prompt_tokens"] - text_only.json()["usage"]["prompt_tokens"]
    assert added == 2 * IMAGE_PART_TOKENS


def test_a_malformed_part_is_a_422_naming_it(service: RunningService) -> None:
    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}},
    ]
    answer = _post(service, {"messages": [{"role": "user", "content": content}]})
    assert answer.status_code == 422
    fields = [detail["field"] for detail in answer.json()["error"]["details"]]
    assert any(".1." in name and name.endswith("image_url.url") for name in fields), fields


def test_usage_details_report_reasoning_and_cached_tokens_in_batch_and_stream(service: RunningService) -> None:
    body = chat("think about caching", model="gpt-5-mini")
    first = _post(service, body).json()["usage"]
    assert first["reasoning_tokens"] > 0
    with httpx.stream("POST", service.url + CHAT, json={**body, "stream": True}, timeout=WAIT_SECONDS) as response:
        done = json.loads(list(EventSource(response).iter_sse())[-1].data)
    # The same messages again: the bundled upstream reports them as cached, as OpenAI's prompt cache would.
    assert done["usage"]["cached_tokens"] > 0
    assert done["usage"]["reasoning_tokens"] > 0


def test_over_the_total_cap_the_least_recently_used_buffer_is_evicted_and_logged(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    with running_service(upstream.url, tmp_path, LLM_RESUME_TOTAL_BYTES="2048") as capped:
        # Each 40-word stream's buffer is about 1,300 bytes: the second one pushes the first out.
        ids = []
        for text in ("first", "second"):
            with httpx.stream(
                "POST",
                capped.url + CHAT,
                json=chat(text, model="mock-words-40", stream=True, resumable=True),
                timeout=WAIT_SECONDS,
            ) as response:
                ids.append(response.headers["x-stream-id"])
                assert list(EventSource(response).iter_sse())[-1].event == "done"
        evicted = capped.wait_for_log(lambda line: line.get("event") == "resume_buffer_evicted")
        assert evicted["stream_id"] == ids[0]
        assert httpx.get(capped.url + CHAT + "/streams/" + ids[0], timeout=5).status_code == 404
        assert httpx.get(capped.url + CHAT + "/streams/" + ids[1], timeout=5).status_code == 200
