"""Our SSE encoder, secret redaction and upstream body building."""

from __future__ import annotations

import json

import pytest

from src.api.sse import encode_event
from src.core.llm.service import upstream_body
from src.core.llm.upstream_errors import redact_secrets
from src.models.llm import LLMRequest, StreamDelta, StreamDone, StreamError, Usage


def test_encode_event_is_one_numbered_named_event_with_one_json_data_line() -> None:
    encoded = encode_event(StreamDelta(content="line\nbreak ü"), 7)
    event_id, event, data, end1, end2 = encoded.decode().split("\n")
    assert (event_id, event, end1, end2) == ("id: 7", "event: delta", "", "")
    assert json.loads(data.removeprefix("data: ")) == {"content": "line\nbreak ü"}


def test_encode_event_names_done_and_error_events_and_keeps_field_order() -> None:
    done = StreamDone(
        id="c1",
        model="m",
        request_id="r",
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    )
    error = StreamError(code="upstream_error", message="broke", request_id="r")
    assert encode_event(done, None) == (
        b'event: done\ndata: {"id":"c1","model":"m","request_id":"r","finish_reason":"stop",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"reasoning_tokens":null,'
        b'"cached_tokens":null}}\n\n'
    )
    assert (
        encode_event(error, 2)
        == b'id: 2\nevent: error\ndata: {"code":"upstream_error","message":"broke","request_id":"r"}\n\n'
    )


@pytest.mark.parametrize(
    "text",
    [
        "Incorrect API key provided: sk-abc123****wxyz.",
        "key sk-proj-AbC_d-E.f was revoked",
        "restricted key rk-live-1234 used",
    ],
)
def test_redact_secrets_removes_key_fragments(text: str) -> None:
    redacted = redact_secrets(text)
    assert "[redacted]" in redacted
    assert "sk-" not in redacted
    assert "rk-" not in redacted


def test_redact_secrets_keeps_ordinary_text() -> None:
    assert redact_secrets("temperature must be 1 for task-specific models") == (
        "temperature must be 1 for task-specific models"
    )


def test_upstream_body_sends_only_set_parameters() -> None:
    request = LLMRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": None, "stream": True}
    )
    assert upstream_body(request, model="m") == {
        "max_completion_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "model": "m",
    }


def test_a_readers_own_notice_has_no_id_so_a_resume_skips_none_of_the_streams_events() -> None:
    from src.api.sse import encode_followed_event
    from src.core.stream_buffers import BufferedEvent

    replayed = BufferedEvent(name="delta", data='{"content":"a"}')
    assert encode_followed_event(replayed, 4) == b'id: 4\nevent: delta\ndata: {"content":"a"}\n\n'
    notice = StreamError(code="stream_not_found", message="gone", request_id="r")
    assert encode_followed_event(notice, 5).startswith(b"event: error\n")
