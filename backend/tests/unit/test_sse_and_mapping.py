"""The lean SSE decoder, the SSE encoder, secret redaction and upstream parameter building."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from src.core.llm.service import encode_sse, iter_sse, redact_secrets, upstream_kwargs
from src.models.llm import LLMRequest


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _decode(*parts: bytes) -> list[tuple[str | None, str]]:
    return [event async for event in iter_sse(_chunks(*parts))]


async def test_iter_sse_joins_events_split_across_chunks() -> None:
    assert await _decode(b'data: {"a"', b":1}\n", b"\ndata: [DO", b"NE]\n\n") == [(None, '{"a":1}'), (None, "[DONE]")]


async def test_iter_sse_reads_event_names_multi_line_data_and_ignores_comments() -> None:
    raw = b": keep-alive\n\nevent: error\ndata: line1\ndata: line2\n\ndata:no-space\n\n"
    assert await _decode(raw) == [("error", "line1\nline2"), (None, "no-space")]


async def test_iter_sse_tolerates_crlf_and_flushes_a_final_event_without_blank_line() -> None:
    assert await _decode(b"data: x\r\n\r\ndata: y\r\n") == [(None, "x"), (None, "y")]


def test_encode_sse_is_one_named_event_with_one_json_data_line() -> None:
    encoded = encode_sse("delta", {"content": "line\nbreak ü"})
    event, data, end1, end2 = encoded.decode().split("\n")
    assert (event, end1, end2) == ("event: delta", "", "")
    assert json.loads(data.removeprefix("data: ")) == {"content": "line\nbreak ü"}


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


def test_upstream_kwargs_sends_only_set_parameters() -> None:
    request = LLMRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": None, "stream": True}
    )
    assert upstream_kwargs(request, model="m") == {
        "max_completion_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "model": "m",
    }
