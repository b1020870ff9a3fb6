"""The bundled offline upstream: a small OpenAI-compatible Chat Completions server with fault injection.

Run it with `python -m src.devtools.mock_openai --port 9100` (from `backend/`). `--api-key KEY` (or the environment
variable `MOCK_OPENAI_API_KEY`) makes it answer OpenAI's 401 `invalid_api_key` to any other bearer;
`--ssl-certfile`/`--ssl-keyfile` serve HTTPS. It speaks OpenAI's wire format:

- `POST /v1/chat/completions` answers a `chat.completion` with `usage`, or streams `chat.completion.chunk`s in
  OpenAI's order (a role-only first chunk per choice, one chunk per token, a chunk with `finish_reason` per choice, a
  `choices: []` usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`).
- `GET /v1/models` lists LISTED_MODELS; `GET /v1/models/{id}` answers one of them or a 404 `model_not_found`.
- `GET /_mock/stats` answers counters for tests and benchmarks; `GET /health` answers `{"status": "ok"}`.

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`; every endpoint but the last two needs an
`Authorization` header.

Answers are deterministic: the model echoes the last user message (the text parts of a content-part list), or
answers `The tool said: ...` after a `tool` message, and counts tokens as whitespace-separated words (an image part
costs IMAGE_PART_TOKENS prompt tokens). Reasoning models (gpt-5*, o1*, o3*, o4*) spend as many reasoning tokens as
they answer, counted in `completion_tokens` and within `max_completion_tokens` as OpenAI counts them; a message list
seen before is reported as cached. It honours `n`, `stop`, `max_completion_tokens` (finish_reason `length`),
`logprobs`/`top_logprobs`, `response_format` (`json_object`, or `json_schema`: a document generated from the schema)
and `tools` (it calls the tool named by `tool_choice`, else the first; PARALLEL_TOOLS_MODEL calls them all). It
rejects `max_tokens` and non-default `temperature` on reasoning models the way OpenAI does. REFUSAL_MODEL refuses,
`mock-words-N` answers exactly N words (benchmarks use it), and other model names inject faults (see FAULTS). It is a
raw ASGI app, so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, TypeVar

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
STATS_PATH = "/_mock/stats"
DEFAULT_STREAM_DELAY_MS = 20.0
HANG_LIMIT_SECONDS = 600.0
BREAK_AFTER_CHUNKS = 3
CONTEXT_WINDOW = 128_000
FILLER_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett")
# What OpenAI bills for a low-detail image; one flat price keeps usage deterministic whatever the image is.
IMAGE_PART_TOKENS = 85
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20
# Token i of a choice gets log-probability -LOGPROB_STEP * (i + 1): deterministic, and each value distinct.
LOGPROB_STEP = 0.01
# Bounded like a real prompt cache, so a long benchmark cannot grow the mock without limit.
PROMPT_CACHE_ENTRIES = 4096
FLAKY_PROMPTS_LIMIT = 4096
# Deeper than any schema OpenAI accepts; a recursive schema would otherwise never end.
SCHEMA_MAX_DEPTH = 32
SCHEMA_STRING_WORDS = 3
DEFAULT_STRING = "mock"
REFUSAL_MODEL = "mock-refusal"
PARALLEL_TOOLS_MODEL = "mock-tools-parallel"
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICE_MODES = ("none", "auto", "required")
# A function without `parameters` takes none: its arguments are `{}`, as on OpenAI.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# The string formats OpenAI's structured outputs support, each with a value valid for it.
STRING_FORMAT_EXAMPLES = {
    "date-time": "2025-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "date": "2025-01-01",
    "duration": "P1D",
    "email": "mock@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
# GET /v1/models: id -> (created, owned_by). Fixed values, so that listings are deterministic.
LISTED_MODELS = {
    "gpt-5-mini": (1754425928, "system"),
    "gpt-5": (1754425777, "system"),
    "gpt-4.1-mini": (1744318173, "system"),
    "gpt-4o-mini": (1721172741, "system"),
    "mock-tools": (1735689600, "mock"),
    REFUSAL_MODEL: (1735689600, "mock"),
}
# OpenAI's edge sets cookies on API responses; a stateless client must never send them back.
_COOKIE_HEADER = [(b"set-cookie", b"__cf_bm=mock-affinity; path=/; HttpOnly")]
_WORDS_MODEL = re.compile(r"mock-words-(\d{1,6})")
_RATE_LIMIT_WAIT_MODEL = re.compile(r"mock-429-wait-(\d{1,6})")
_FLAKY_MODEL = re.compile(r"mock-flaky-(\d{1,6})")
_SLOW_FIRST_MODEL = re.compile(r"mock-slow-first-(\d{1,6}(?:\.\d{1,6})?)")
# OpenAI's rule for function and schema names.
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# A token is a word with the whitespace before it, so that the tokens of a text concatenate back to it.
_TOKEN = re.compile(r"\s*\S+")

# Model name -> injected fault. Anything else answers normally.
FAULTS = {
    "mock-401": "401 invalid key (the message quotes a key fragment, as OpenAI's does)",
    "mock-403": "403 permission denied",
    "mock-404": "404 model not found",
    "mock-400-context": "400 context_length_exceeded",
    "mock-429": "429 rate limit with retry-after: 1",
    "mock-429-wait-N": "429 rate limit with retry-after: N (N an integer)",
    "mock-429-quota": "429 insufficient_quota",
    "mock-500": "500 server error",
    "mock-503": "503 overloaded",
    "mock-flaky-K": "503 overloaded for the first K requests with the same last user message, then normal answers",
    "mock-slow-first-S": "answers after S seconds (integer or decimal); a stream sends its role chunk, then waits",
    "mock-hang": "no answer until the client gives up (past any timeout)",
    "mock-stream-break": "stream: the connection drops after a few chunks",
    "mock-stream-stall": "stream: stops sending after the first chunk, past any timeout",
}

_Key = TypeVar("_Key", bound=Hashable)
_Kind = Literal["content", "refusal", "tool_calls"]


class SimulatedConnectionDropError(Exception):
    """Raised mid-response so that uvicorn drops the connection, as a crashed upstream would."""


class UpstreamError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}


class SchemaError(ValueError):
    """A JSON Schema that the mock cannot generate a document for."""


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    return next((value.decode(errors="replace") for key, value in headers if key == name), None)


def _key_fragment(scope: Scope) -> str:
    header = _header(scope, b"authorization")
    if header is None:
        return "(none)"
    key = header.removeprefix("Bearer ").strip()
    return f"{key[:8]}{'*' * 8}{key[-4:]}" if len(key) > 12 else "sk-****"


def _bearer(header: str) -> str:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _invalid_api_key(scope: Scope) -> UpstreamError:
    return UpstreamError(
        401,
        f"Incorrect API key provided: {_key_fragment(scope)}. You can find your API key "
        "at https://platform.openai.com/account/api-keys.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


def _model_not_found(model: str) -> UpstreamError:
    return UpstreamError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        type_="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def _rate_limited(model: str, *, retry_after: int) -> UpstreamError:
    return UpstreamError(
        429,
        f"Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3.",
        type_="requests",
        code="rate_limit_exceeded",
        headers={"retry-after": str(retry_after)},
    )


def _overloaded() -> UpstreamError:
    return UpstreamError(503, "The engine is currently overloaded, please try again later.", type_="server_error")


def _invalid(param: str, message: str) -> UpstreamError:
    return UpstreamError(400, message, type_="invalid_request_error", code="invalid_value", param=param)


def _fault(model: str, scope: Scope) -> UpstreamError | None:
    if model == "mock-401":
        return _invalid_api_key(scope)
    if model == "mock-403":
        return UpstreamError(403, "You are not allowed to sample from this model.", type_="permission_error")
    if model == "mock-404":
        return _model_not_found(model)
    if model == "mock-400-context":
        return UpstreamError(
            400,
            f"This model's maximum context length is {CONTEXT_WINDOW} tokens. However, your "
            f"messages resulted in {CONTEXT_WINDOW + 1} tokens. Please reduce the length of the "
            "messages.",
            type_="invalid_request_error",
            code="context_length_exceeded",
            param="messages",
        )
    if model == "mock-429":
        return _rate_limited(model, retry_after=1)
    rate_limit_wait = _RATE_LIMIT_WAIT_MODEL.fullmatch(model)
    if rate_limit_wait is not None:
        return _rate_limited(model, retry_after=int(rate_limit_wait.group(1)))
    if model == "mock-429-quota":
        return UpstreamError(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            type_="insufficient_quota",
            code="insufficient_quota",
        )
    if model == "mock-500":
        return UpstreamError(
            500, "The server had an error while processing your request. Sorry about that!", type_="server_error"
        )
    if model == "mock-503":
        return _overloaded()
    return None


def _slow_first_seconds(model: str) -> float:
    slow_first = _SLOW_FIRST_MODEL.fullmatch(model)
    return min(float(slow_first.group(1)), HANG_LIMIT_SECONDS) if slow_first else 0.0


def _remember(seen: OrderedDict[_Key, int], key: _Key, limit: int) -> int:
    """Count one more sighting of `key` and return how many came before; the least recently seen go first."""
    count = seen.pop(key, 0)
    seen[key] = count + 1
    if len(seen) > limit:
        seen.popitem(last=False)
    return count


def _is_reasoning_model(model: str) -> bool:
    return model.startswith(("gpt-5", "o1", "o3", "o4"))


def _check_parameters(body: dict[str, Any]) -> None:
    model = body["model"]
    if "max_tokens" in body and _is_reasoning_model(model):
        raise UpstreamError(
            400,
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
            "'max_completion_tokens' instead.",
            type_="invalid_request_error",
            code="unsupported_parameter",
            param="max_tokens",
        )
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1 and _is_reasoning_model(model):
        raise UpstreamError(
            400,
            f"Unsupported value: 'temperature' does not support {temperature} with this model. "
            "Only the default (1) value is supported.",
            type_="invalid_request_error",
            code="unsupported_value",
            param="temperature",
        )


def _words(text: str) -> list[str]:
    return text.split()


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def _image_parts(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(
        len(_words(_text(m.get("content")))) + IMAGE_PART_TOKENS * _image_parts(m.get("content")) for m in messages
    )


def _echo(model: str, messages: list[dict[str, Any]]) -> str:
    words_model = _WORDS_MODEL.fullmatch(model)
    if words_model:
        return " ".join(itertools.islice(itertools.cycle(FILLER_WORDS), int(words_model.group(1))))
    last_user = _last_user_text(messages)
    turns = sum(1 for m in messages if m.get("role") == "user")
    quoted = " ".join(_words(last_user)[:40]) or "nothing"
    return f"You said: {quoted} (offline demo answer from {model}; user turn {turns}, {len(_words(last_user))} words.)"


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((index for index in (text.find(s) for s in stops) if index >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _is_null_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _resolve(root: dict[str, Any], ref: Any) -> Any:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise SchemaError(f"only local references ('#/...') are supported, got {ref!r}")
    node: Any = root
    for part in ref.split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            raise SchemaError(f"the reference {ref!r} points nowhere")
        node = node[key]
    return node


def _bounded(value: float, schema: dict[str, Any]) -> float:
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    if isinstance(minimum, int | float) and value < minimum:
        value = minimum
    if isinstance(maximum, int | float) and value > maximum:
        value = maximum
    return value


def _example_string(schema: dict[str, Any], text: str) -> str:
    string_format = schema.get("format")
    value = STRING_FORMAT_EXAMPLES.get(string_format, text) if isinstance(string_format, str) else text
    min_length, max_length = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_length, int) and len(value) < min_length:
        value = value.ljust(min_length, "x")
    if isinstance(max_length, int):
        value = value[:max_length]
    return value


def _example(schema: Any, *, root: dict[str, Any], text: str, depth: int = 0) -> Any:
    """A deterministic document valid against `schema` (string values are `text`); `pattern` is not honoured."""
    if depth > SCHEMA_MAX_DEPTH:
        raise SchemaError(f"it nests deeper than {SCHEMA_MAX_DEPTH} levels (is it recursive?)")
    if not isinstance(schema, dict):
        raise SchemaError(f"every schema must be an object, got {schema!r}")

    def nested(inner: Any) -> Any:
        return _example(inner, root=root, text=text, depth=depth + 1)

    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise SchemaError("'enum' must be a non-empty array")
        return schema["enum"][0]
    if "$ref" in schema:
        return nested(_resolve(root, schema["$ref"]))
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            branches = schema[keyword]
            if not isinstance(branches, list) or not branches:
                raise SchemaError(f"'{keyword}' must be a non-empty array")
            return nested(next((branch for branch in branches if not _is_null_schema(branch)), branches[0]))
    if "allOf" in schema:
        if not isinstance(schema["allOf"], list) or not schema["allOf"]:
            raise SchemaError("'allOf' must be a non-empty array")
        parts = [nested(part) for part in schema["allOf"]]
        if all(isinstance(part, dict) for part in parts):
            return {key: value for part in parts for key, value in part.items()}
        return parts[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((name for name in kind if name != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError("'properties' must be an object")
        return {name: nested(inner) for name, inner in properties.items()}
    if kind == "array":
        min_items, max_items = schema.get("minItems"), schema.get("maxItems")
        count = max(1, min_items) if isinstance(min_items, int) else 1
        if isinstance(max_items, int):
            count = min(count, max_items)
        return [nested(schema.get("items", {})) for _ in range(count)]
    if kind == "string":
        return _example_string(schema, text)
    if kind == "integer":
        return int(_bounded(1, schema))
    if kind == "number":
        return _bounded(1.5, schema)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    raise SchemaError(f"unknown type {kind!r}")


def _render_example(schema: dict[str, Any], *, text: str, param: str, subject: str) -> str:
    try:
        return json.dumps(_example(schema, root=schema, text=text))
    except SchemaError as exc:
        raise _invalid(param, f"Invalid schema for {subject}: {exc}.") from exc


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_n(value: Any) -> int:
    if value is None:
        return 1
    if not _is_int(value) or not 1 <= value <= MAX_CHOICES:
        raise _invalid("n", f"Invalid 'n': expected an integer from 1 to {MAX_CHOICES}, got {value!r}.")
    return value


def _parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(stop, str) for stop in value):
        return [str(stop) for stop in value]
    raise _invalid("stop", "Invalid 'stop': expected a string or an array of strings.")


def _parse_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _invalid("logprobs", f"Invalid type for 'logprobs': expected a boolean, got {logprobs!r}.")
    top = body.get("top_logprobs")
    if top is None:
        return bool(logprobs), 0
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _invalid(
            "top_logprobs", f"Invalid 'top_logprobs': expected an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}."
        )
    if not logprobs:
        raise _invalid("top_logprobs", "Invalid value for 'top_logprobs': 'logprobs' must be true to use it.")
    return True, top


def _parse_response_format(value: Any, user_words: list[str]) -> tuple[str, str | None]:
    """The response format's type, and for `json_schema` the document every answer carries."""
    if value is None:
        return "text", None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise _invalid(
            "response_format",
            f"Invalid 'response_format': expected an object whose 'type' is one of {', '.join(RESPONSE_FORMATS)}.",
        )
    if value["type"] != "json_schema":
        return str(value["type"]), None
    spec = value.get("json_schema")
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not _NAME.fullmatch(spec["name"])
        or not isinstance(spec.get("schema"), dict)
        or not isinstance(spec.get("strict", False), bool | None)
        or not isinstance(spec.get("description", ""), str)
    ):
        raise _invalid(
            "response_format",
            "Invalid 'response_format.json_schema': expected an object with a 'name' (1 to 64 letters, digits, '_' "
            "or '-'), a 'schema' object and an optional boolean 'strict'.",
        )
    text = " ".join(user_words[:SCHEMA_STRING_WORDS]) or DEFAULT_STRING
    subject = f"response_format '{spec['name']}'"
    return "json_schema", _render_example(spec["schema"], text=text, param="response_format", subject=subject)


def _is_function_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        return False
    function = tool["function"]
    return (
        isinstance(function.get("name"), str)
        and _NAME.fullmatch(function["name"]) is not None
        and isinstance(function.get("description", ""), str | None)
        and isinstance(function.get("parameters", {}), dict | None)
    )


def _parse_tool_calls(body: dict[str, Any], user_text: str) -> list[tuple[str, str]]:
    """The (name, arguments) of the calls this turn makes: none unless tools are offered after a user message."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("parallel_tool_calls", "Invalid type for 'parallel_tool_calls': expected a boolean.")
    if tools is None:
        if choice is not None:
            raise _invalid("tool_choice", "Invalid value for 'tool_choice': it is only allowed when 'tools' are given.")
        return []
    if not isinstance(tools, list) or not tools or not all(_is_function_tool(tool) for tool in tools):
        raise _invalid(
            "tools",
            "Invalid 'tools': expected a non-empty array of {'type': 'function', 'function': {'name', "
            "'description'?, 'parameters'?}} objects.",
        )
    functions: list[dict[str, Any]] = [tool["function"] for tool in tools]
    if choice is None or choice in TOOL_CHOICE_MODES:
        if choice == "none":
            return []
        every_tool = body["model"] == PARALLEL_TOOLS_MODEL and parallel is not False
        called = functions if every_tool else functions[:1]
    else:
        named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = named.get("name") if isinstance(named, dict) else None
        called = [function for function in functions if function["name"] == name][:1]
        if not called:
            raise _invalid(
                "tool_choice",
                "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or {'type': 'function', "
                "'function': {'name': ...}} naming one of the 'tools'.",
            )
    if body["messages"][-1].get("role") != "user":
        return []
    return [
        (
            function["name"],
            _render_example(
                function.get("parameters") or NO_PARAMETERS,
                text=user_text,
                param="tools",
                subject=f"function '{function['name']}'",
            ),
        )
        for function in called
    ]


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    """The validated fields of a chat request that shape its answer."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    n: int
    stops: list[str]
    max_completion_tokens: int | None
    logprobs: bool
    top_logprobs: int
    response_format: str
    schema_document: str | None
    tool_calls: list[tuple[str, str]]


def _parse_request(body: dict[str, Any]) -> _ChatRequest:
    messages: list[dict[str, Any]] = body["messages"]
    user_words = _words(_last_user_text(messages))
    logprobs, top_logprobs = _parse_logprobs(body)
    response_format, schema_document = _parse_response_format(body.get("response_format"), user_words)
    stream_options = body.get("stream_options")
    limit = body.get("max_completion_tokens")
    return _ChatRequest(
        model=body["model"],
        messages=messages,
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        n=_parse_n(body.get("n")),
        stops=_parse_stop(body.get("stop")),
        max_completion_tokens=max(limit, 0) if _is_int(limit) else None,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        response_format=response_format,
        schema_document=schema_document,
        tool_calls=_parse_tool_calls(body, " ".join(user_words) or DEFAULT_STRING),
    )


def _logprob(token: str, position: int, top: int) -> dict[str, Any]:
    logprob = -round(LOGPROB_STEP * (position + 1), 6)
    # The sampled token leads its own top list, as on OpenAI; the alternatives are ever less likely.
    alternatives = [(token, logprob)] + [(f"{token}{rank}", round(logprob - rank, 6)) for rank in range(1, top)]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": text, "logprob": value, "bytes": list(text.encode())} for text, value in alternatives[:top]
        ],
    }


def _choice_logprobs(kind: _Kind, tokens: list[str], top: int, *, start: int = 0) -> dict[str, Any]:
    entries = [_logprob(token, start + offset, top) for offset, token in enumerate(tokens)]
    return {"content": entries if kind == "content" else None, "refusal": entries if kind == "refusal" else None}


@dataclass(frozen=True, slots=True)
class _Output:
    """One choice: the deltas a stream sends (one per completion token) and how the choice ends.

    The batch message is what a client accumulates from the stream, so both modes always agree.
    """

    kind: _Kind
    deltas: list[dict[str, Any]]
    finish_reason: str
    reasoning_tokens: int

    @property
    def role_delta(self) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": "" if self.kind == "content" else None,
            "refusal": "" if self.kind == "refusal" else None,
        }

    @property
    def completion_tokens(self) -> int:
        return len(self.deltas) + self.reasoning_tokens

    def text_tokens(self) -> list[str]:
        return [] if self.kind == "tool_calls" else [delta[self.kind] for delta in self.deltas]

    def message(self) -> dict[str, Any]:
        message = self.role_delta
        calls: list[dict[str, Any]] = []
        for delta in self.deltas:
            for key in ("content", "refusal"):
                if key in delta:
                    message[key] += delta[key]
            for call in delta.get("tool_calls", ()):
                if "id" in call:
                    calls.append({"id": call["id"], "type": call["type"], "function": dict(call["function"])})
                else:
                    calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if calls:
            message["tool_calls"] = calls
        return message


def _tool_call_deltas(calls: list[tuple[str, str]], id_prefix: str) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = []
    for index, (name, arguments) in enumerate(calls):
        opening = {"index": index, "id": f"{id_prefix}_{index}", "type": "function"}
        deltas.append({"tool_calls": [{**opening, "function": {"name": name, "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in _tokens(arguments)]
    return deltas


def _content(request: _ChatRequest, index: int) -> str:
    if request.schema_document is not None:
        return request.schema_document
    last = request.messages[-1]
    if last.get("role") == "tool":
        text = f"The tool said: {_text(last.get('content'))}"
    else:
        text = _echo(request.model, request.messages)
    if index:
        text += f" (choice {index})"
    return json.dumps({"answer": text}) if request.response_format == "json_object" else text


def _text_deltas(kind: _Kind, text: str, stops: list[str]) -> list[dict[str, Any]]:
    return [{kind: token} for token in _tokens(_cut_at_stop(text, stops))]


def _plan_choice(request: _ChatRequest, index: int, call_id_prefix: str) -> _Output:
    kind: _Kind
    if request.model == REFUSAL_MODEL:
        kind, deltas = "refusal", _text_deltas("refusal", REFUSAL_TEXT, request.stops)
    elif request.tool_calls:
        kind, deltas = "tool_calls", _tool_call_deltas(request.tool_calls, call_id_prefix)
    else:
        kind, deltas = "content", _text_deltas("content", _content(request, index), request.stops)
    planned_reasoning = len(deltas) if _is_reasoning_model(request.model) else 0
    limit = request.max_completion_tokens
    if limit is None or planned_reasoning + len(deltas) <= limit:
        return _Output(kind, deltas, "tool_calls" if kind == "tool_calls" else "stop", planned_reasoning)
    # Reasoning comes first and shares the budget, as on OpenAI: a tight limit can leave no visible answer.
    reasoning = min(planned_reasoning, limit)
    return _Output(kind, deltas[: limit - reasoning], "length", reasoning)


@dataclass(frozen=True, slots=True)
class _Answer:
    outputs: list[_Output]
    prompt_tokens: int
    cached_tokens: int

    def usage(self) -> dict[str, Any]:
        completion_tokens = sum(output.completion_tokens for output in self.outputs)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": sum(output.reasoning_tokens for output in self.outputs),
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


def _identity(kind: str, model: str, request_id: str) -> dict[str, Any]:
    """The fields every completion and chunk of one answer share."""
    return {
        "id": f"chatcmpl-mock{request_id[-8:]}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_mock",
    }


def _model_object(model: str) -> dict[str, Any]:
    created, owned_by = LISTED_MODELS[model]
    return {"id": model, "object": "model", "created": created, "owned_by": owned_by}


class MockOpenAI:
    """The ASGI app.

    `stream_delay_ms` is the pause before each step of content chunks (one chunk per choice); `api_key`, when set, is
    the only bearer it accepts.
    """

    def __init__(self, *, stream_delay_ms: float = DEFAULT_STREAM_DELAY_MS, api_key: str | None = None) -> None:
        self.stream_delay = stream_delay_ms / 1000
        # An empty key could never be presented as a bearer: it means no key check.
        self.api_key = api_key or None
        self._ids = itertools.count(1)
        # Counters for tests and benchmarks (GET /_mock/stats): did the service close streams it abandoned?
        self.stats = {
            "requests": 0,
            "streams_started": 0,
            "streams_completed": 0,
            "streams_client_closed": 0,
            "requests_with_cookies": 0,
            "models_requests": 0,
        }
        self.requests_by_model: dict[str, int] = {}
        self._prompt_cache: OrderedDict[bytes, int] = OrderedDict()
        self._flaky_attempts: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        request_id = f"req_mock_{next(self._ids):08d}"
        path = scope["path"]
        try:
            if path == "/health":
                await self._json(send, 200, {"status": "ok"}, request_id)
                return
            if path == STATS_PATH:
                await self._json(send, 200, {**self.stats, "requests_by_model": self.requests_by_model}, request_id)
                return
            self.stats["requests"] += 1
            if _header(scope, b"cookie") is not None:
                self.stats["requests_with_cookies"] += 1
            if path == CHAT_PATH:
                await self._chat(scope, receive, send, request_id)
            elif path == MODELS_PATH or path.startswith(f"{MODELS_PATH}/"):
                await self._models(scope, send, request_id)
            else:
                raise UpstreamError(404, f"Invalid URL ({scope['method']} {path})", type_="invalid_request_error")
        except UpstreamError as error:
            await self._json(send, error.status, error.body, request_id, error.headers)

    def _authenticate(self, scope: Scope) -> None:
        header = _header(scope, b"authorization")
        if header is None:
            raise UpstreamError(401, "You didn't provide an API key.", type_="invalid_request_error")
        if self.api_key is not None and not secrets.compare_digest(_bearer(header).encode(), self.api_key.encode()):
            raise _invalid_api_key(scope)

    async def _models(self, scope: Scope, send: Send, request_id: str) -> None:
        self.stats["models_requests"] += 1
        if scope["method"] != "GET":
            raise UpstreamError(405, "Method not allowed", type_="invalid_request_error")
        self._authenticate(scope)
        if scope["path"] == MODELS_PATH:
            listing = {"object": "list", "data": [_model_object(model) for model in LISTED_MODELS]}
            await self._json(send, 200, listing, request_id)
            return
        model = scope["path"].removeprefix(f"{MODELS_PATH}/")
        if model not in LISTED_MODELS:
            raise _model_not_found(model)
        await self._json(send, 200, _model_object(model), request_id)

    async def _chat(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        if scope["method"] != "POST":
            raise UpstreamError(405, "Method not allowed", type_="invalid_request_error")
        self._authenticate(scope)
        body = await self._read_json(receive)
        model = body["model"]
        self.requests_by_model[model] = self.requests_by_model.get(model, 0) + 1
        if model == "mock-hang":
            await self._client_left_within(receive, HANG_LIMIT_SECONDS)
            return
        fault = _fault(model, scope) or self._flaky_fault(model, body["messages"])
        if fault is not None:
            raise fault
        _check_parameters(body)
        request = _parse_request(body)
        answer = self._answer(request, request_id)
        if request.stream:
            await self._stream(request, answer, receive, send, request_id)
            return
        first_delay = _slow_first_seconds(model)
        if first_delay and await self._client_left_within(receive, first_delay):
            return
        await self._complete(request, answer, send, request_id)

    def _flaky_fault(self, model: str, messages: list[dict[str, Any]]) -> UpstreamError | None:
        flaky = _FLAKY_MODEL.fullmatch(model)
        if flaky is None:
            return None
        earlier = _remember(self._flaky_attempts, (model, _last_user_text(messages)), FLAKY_PROMPTS_LIMIT)
        return _overloaded() if earlier < int(flaky.group(1)) else None

    def _answer(self, request: _ChatRequest, request_id: str) -> _Answer:
        prompt_tokens = _prompt_tokens(request.messages)
        digest = hashlib.sha256(json.dumps(request.messages, sort_keys=True).encode()).digest()
        cached = _remember(self._prompt_cache, digest, PROMPT_CACHE_ENTRIES) > 0
        call_ids = f"call_mock{request_id[-8:]}"
        outputs = [_plan_choice(request, index, f"{call_ids}_{index}") for index in range(request.n)]
        return _Answer(outputs, prompt_tokens, prompt_tokens if cached else 0)

    async def _read_json(self, receive: Receive) -> dict[str, Any]:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as exc:
            raise UpstreamError(
                400, "We could not parse the JSON body of your request.", type_="invalid_request_error"
            ) from exc
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise UpstreamError(400, "you must provide a model parameter", type_="invalid_request_error", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UpstreamError(
                400, "'messages' must be a non-empty array", type_="invalid_request_error", param="messages"
            )
        return body

    @staticmethod
    async def _client_left_within(receive: Receive, seconds: float) -> bool:
        """Whether the client disconnected within `seconds` (once its body is read, it sends nothing else)."""
        try:
            async with asyncio.timeout(seconds):
                while (await receive())["type"] != "http.disconnect":
                    continue
        except TimeoutError:
            return False
        return True

    async def _complete(self, request: _ChatRequest, answer: _Answer, send: Send, request_id: str) -> None:
        choices = [
            {
                "index": index,
                "message": output.message(),
                "logprobs": (
                    _choice_logprobs(output.kind, output.text_tokens(), request.top_logprobs)
                    if request.logprobs
                    else None
                ),
                "finish_reason": output.finish_reason,
            }
            for index, output in enumerate(answer.outputs)
        ]
        completion = {
            **_identity("chat.completion", request.model, request_id),
            "choices": choices,
            "usage": answer.usage(),
        }
        await self._json(send, 200, completion, request_id)

    async def _stream(
        self, request: _ChatRequest, answer: _Answer, receive: Receive, send: Send, request_id: str
    ) -> None:
        model = request.model
        base = _identity("chat.completion.chunk", model, request_id)

        def chunk(index: int, delta: dict[str, Any], *, logprobs: Any = None, finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return b"data: " + json.dumps({**base, "choices": [choice]}, separators=(",", ":")).encode() + b"\n\n"

        def delta_chunks(index: int, output: _Output) -> Iterator[bytes]:
            if output.kind == "content" and not request.logprobs:
                # Content chunks are the hot path of benchmarks: encode the frame once, then only each token.
                head, tail = chunk(index, {"content": "\x00"}).split(b'"\\u0000"')
                for delta in output.deltas:
                    yield head + json.dumps(delta["content"]).encode() + tail
                return
            for position, delta in enumerate(output.deltas):
                logprobs = None
                if request.logprobs and output.kind != "tool_calls":
                    token = [delta[output.kind]]
                    logprobs = _choice_logprobs(output.kind, token, request.top_logprobs, start=position)
                yield chunk(index, delta, logprobs=logprobs)

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"x-request-id", request_id.encode()),
                    (b"cache-control", b"no-cache"),
                    *_COOKIE_HEADER,
                ],
            }
        )

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        # Servers below ASGI spec 2.4 drop sends to a closed connection silently: watch for the disconnect. An
        # answer sent without pauses is over before a disconnect could matter, so it needs no watcher.
        client_closed = asyncio.Event()

        async def watch_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            client_closed.set()

        self.stats["streams_started"] += 1
        first_delay = _slow_first_seconds(model)
        watched = bool(self.stream_delay) or model == "mock-stream-stall" or bool(first_delay)
        watcher = asyncio.create_task(watch_for_disconnect()) if watched else None
        try:
            for index, output in enumerate(answer.outputs):
                await emit(chunk(index, output.role_delta))
            if first_delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client_closed.wait(), first_delay)
                if client_closed.is_set():
                    self.stats["streams_client_closed"] += 1
                    return
            # Choices advance together, one token each per step, as OpenAI interleaves them.
            steps = itertools.zip_longest(*(delta_chunks(index, output) for index, output in enumerate(answer.outputs)))
            for step, step_chunks in enumerate(steps):
                if model == "mock-stream-break" and step == BREAK_AFTER_CHUNKS:
                    raise SimulatedConnectionDropError("mock-stream-break: dropping the connection mid-stream")
                if model == "mock-stream-stall" and step == 1:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(client_closed.wait(), HANG_LIMIT_SECONDS)
                if self.stream_delay:
                    await asyncio.sleep(self.stream_delay)
                if client_closed.is_set():
                    self.stats["streams_client_closed"] += 1
                    return
                for step_chunk in step_chunks:
                    if step_chunk is not None:
                        await emit(step_chunk)
            for index, output in enumerate(answer.outputs):
                await emit(chunk(index, {}, finish=output.finish_reason))
            if request.include_usage:
                usage_chunk = {**base, "choices": [], "usage": answer.usage()}
                await emit(b"data: " + json.dumps(usage_chunk, separators=(",", ":")).encode() + b"\n\n")
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            self.stats["streams_completed"] += 1
        finally:
            if watcher is not None:
                watcher.cancel()

    @staticmethod
    async def _json(
        send: Send, status: int, payload: dict[str, Any], request_id: str, headers: dict[str, str] | None = None
    ) -> None:
        content = json.dumps(payload, separators=(",", ":")).encode()
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
        raw_headers += _COOKIE_HEADER
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content, "more_body": False})


class _HideSimulatedDrops(logging.Filter):
    """uvicorn logs the exception that drops a `mock-stream-break` connection; it is the point, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedConnectionDropError))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Offline OpenAI-compatible upstream for demos and tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOCK_OPENAI_PORT", "9100")))
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=float(os.environ.get("MOCK_STREAM_DELAY_MS", DEFAULT_STREAM_DELAY_MS)),
        help="pause before each streamed word (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("MOCK_OPENAI_API_KEY") or None,
        help="answer 401 invalid_api_key to any other bearer (default: $MOCK_OPENAI_API_KEY, else any key)",
    )
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--ssl-keyfile", help="the certificate's PEM private key, if not in --ssl-certfile")
    args = parser.parse_args(argv)
    if args.ssl_keyfile and not args.ssl_certfile:
        parser.error("--ssl-keyfile needs --ssl-certfile")
    logging.getLogger("uvicorn.error").addFilter(_HideSimulatedDrops())
    uvicorn.run(
        MockOpenAI(stream_delay_ms=args.delay_ms, api_key=args.api_key),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


if __name__ == "__main__":
    main()
