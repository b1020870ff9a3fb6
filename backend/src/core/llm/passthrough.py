"""The OpenAI-compatible request: a caller's `/v1/chat/completions` body, checked for what the service reads from it.

The body is forwarded as sent (unknown fields included: OpenAI's new features work the day they ship). The service
checks only the fields it reads itself (the model policy, streaming, the limits' reservation, the ledger's user);
everything else is the upstream's to judge, and its 400 comes back in OpenAI's envelope.
"""

from __future__ import annotations

import json
from typing import Any

from src.core.errors import ErrorCode, ServiceError
from src.models.openai_compat import PassthroughRequest

VALIDATION_STATUS = 422
_INLINE_DATA = "data:"
_POSITIVE_INTEGERS = ("max_completion_tokens", "max_tokens", "n")


def _invalid(field: str, message: str) -> ServiceError:
    return ServiceError(
        ErrorCode.VALIDATION_ERROR,
        message,
        status_code=VALIDATION_STATUS,
        details=[{"field": field, "message": message, "type": "invalid"}],
    )


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_passthrough(raw: bytes) -> PassthroughRequest:
    """The body, or a `validation_error` naming the first field the service cannot use."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _invalid("body", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _invalid("body", "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty array of message objects.")
    if not all(isinstance(message, dict) for message in messages):
        raise _invalid("messages", "Each item of 'messages' must be a message object.")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _invalid("model", "'model' must be a non-empty string.")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", "'stream' must be a boolean.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "'stream_options' must be an object.")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _invalid("stream_options.include_usage", "'stream_options.include_usage' must be a boolean.")
    for name in _POSITIVE_INTEGERS:
        value = body.get(name)
        if value is not None and (not _is_integer(value) or value < 1):
            raise _invalid(name, f"'{name}' must be an integer >= 1.")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", "'user' must be a string.")
    max_tokens = body.get("max_completion_tokens")
    return PassthroughRequest(
        body=body,
        model=model,
        stream=bool(stream),
        include_usage=bool(include_usage),
        max_tokens=max_tokens if max_tokens is not None else body.get("max_tokens"),
        choices=body.get("n") or 1,
        user=user,
    )


def passthrough_body(request: PassthroughRequest, *, model: str) -> dict[str, Any]:
    """What goes upstream: the caller's body with the model the policy chose, and, for a stream, the usage chunk
    always asked for (the service's accounting needs it; the relay drops it when the caller did not ask)."""
    body = {**request.body, "model": model}
    if request.stream:
        body["stream_options"] = {**(request.body.get("stream_options") or {}), "include_usage": True}
    return body


def loggable_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages for LOG_PROMPTS' log line, without touching what goes upstream: an inline image's base64 is
    replaced by its size (megabytes of it would drown the log and tell a reader nothing)."""
    return [_loggable(message) for message in messages]


def _loggable(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        image = part.get("image_url") if isinstance(part, dict) else None
        url = image.get("url") if isinstance(image, dict) else None
        if isinstance(image, dict) and isinstance(url, str) and url.startswith(_INLINE_DATA) and "," in url:
            header, data = url.split(",", 1)
            part = {**part, "image_url": {**image, "url": f"{header},<{len(data)} characters>"}}
        parts.append(part)
    return {**message, "content": parts}
