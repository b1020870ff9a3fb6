"""The per-call record and its canonical `llm_call` log line: one line per upstream call, whatever its outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from src.core.limits import Admission
from src.core.llm.upstream_errors import UpstreamRejection
from src.models.llm import Usage

OK_STATUS = 200


def elapsed_ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


@dataclass(slots=True)
class CallRecord:
    """What one upstream call did, filled in as it goes; `CallLog.emit` writes it once at the end."""

    request_id: str
    model: str
    stream: bool
    route: str = "chat"
    key_name: str = "anonymous"
    user: str | None = None
    started: float = field(default_factory=time.perf_counter)
    upstream_request_id: str | None = None
    upstream_model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: float | None = None
    # The HTTP status the caller got (200 for a stream that began, whatever happened later).
    status: int = OK_STATUS
    # What the key's limits reserved for this call, settled to the real usage when it ends.
    admission: Admission | None = None
    prompt_estimate: int = 0
    # Set when the call failed: our error code, and what the upstream itself answered (status, redacted message).
    code: str | None = None
    rejection: UpstreamRejection | None = None
    attempts: int = 0
    cancelled: bool = False
    delivered_chunks: int = 0
    delivered_chars: int = 0
    # A resumable stream, and how many times it was resumed while it ran.
    resumable: bool = False
    resumes: int = 0
    # Only with LOG_PROMPTS=true.
    messages: list[dict[str, Any]] | None = None
    answer: str | None = None

    def first_token(self) -> None:
        self.ttft_ms = elapsed_ms(self.started)

    def delivered(self, content: str) -> None:
        if self.delivered_chunks == 0:
            self.first_token()
        self.delivered_chunks += 1
        self.delivered_chars += len(content)


class CallLog:
    """Writes the `llm_call` line: info when the call succeeded, warning when it failed."""

    def __init__(self) -> None:
        self._log = structlog.get_logger("llm").bind()

    def emit(self, record: CallRecord) -> None:
        usage = record.usage
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "route": record.route,
            "key": record.key_name,
            "model": record.model,
            "stream": record.stream,
            "latency_ms": elapsed_ms(record.started),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
            "finish_reason": record.finish_reason,
            "upstream_request_id": record.upstream_request_id,
        }
        if record.reasoning_tokens is not None:
            fields["reasoning_tokens"] = record.reasoning_tokens
        if record.cached_tokens is not None:
            fields["cached_tokens"] = record.cached_tokens
        if record.attempts > 1:
            fields["attempts"] = record.attempts
        if record.stream:
            fields["ttft_ms"] = record.ttft_ms
            fields["delivered_chunks"] = record.delivered_chunks
            fields["delivered_chars"] = record.delivered_chars
        if record.resumable:
            fields["resumes"] = record.resumes
        if record.cancelled:
            fields["cancelled"] = True
        if record.messages is not None:
            fields["messages"] = record.messages
        if record.answer is not None:
            fields["answer"] = record.answer
        if record.code is None:
            self._log.info("llm_call", **fields)
            return
        fields["code"] = record.code
        if record.rejection is not None:
            if record.rejection.status is not None:
                fields["upstream_status"] = record.rejection.status
            fields["upstream_message"] = record.rejection.message
        self._log.warning("llm_call", **fields)

    def unexpected(self, event: str) -> None:
        """Log the exception being handled, with its traceback."""
        self._log.exception(event)
