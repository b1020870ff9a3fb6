"""Clients nobody here wrote: the official `openai` SDKs (Python, and Node's run by the machine's Node.js) pointed at
the running service's `/v1` over real sockets, against the bundled upstream.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel

from src.core.keys import key_digest
from src.devtools.mock_openai import IMAGE_PART_TOKENS
from src.devtools.servers import ServerProcess, start_service
from tests.e2e.network import RunningService, requests_for

pytestmark = pytest.mark.e2e

SDK_KEY = "llmsvc-sdk-key"
LIMITED_KEY = "llmsvc-sdk-limited"
MODEL = "gpt-4.1-mini"
# Long enough for every healthy call on a loaded machine; the timeout test sets its own, much shorter one.
CLIENT_TIMEOUT_SECONDS = 30.0
SLOW_MODEL = "mock-slow-first-5"
SHORT_TIMEOUT_SECONDS = 0.5
STALL_MODEL = "mock-stream-stall"
NODE_SDK_DIR = Path(__file__).resolve().parents[1] / "support" / "node_sdk"
NODE_RUN_TIMEOUT_SECONDS = 60
CITY_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY_PARAMETERS},
}
TIME_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a city", "parameters": CITY_PARAMETERS},
}


@pytest.fixture(scope="module")
def service(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The service with a named key and a key limited to one request a minute, no model allowlist."""
    directory = tmp_path_factory.mktemp("openai-sdks")
    keys = directory / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "sdk"\nsha256 = "{key_digest(SDK_KEY)}"\n\n'
        f'[[keys]]\nname = "limited"\nsha256 = "{key_digest(LIMITED_KEY)}"\nrequests_per_minute = 1\n'
    )
    log_path = directory / "service.log"
    with log_path.open("wb") as log:
        server = start_service(
            upstream_url=upstream.url,
            output=log,
            env={"SERVICE_KEYS_FILE": str(keys), "LLM_MAX_RETRIES": "0", "LOG_FORMAT": "json"},
        )
        try:
            yield RunningService(server, log_path)
        finally:
            server.stop()


SDK = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk(service: RunningService) -> Iterator[SDK]:
    """`sdk(api_key=..., timeout=...)`: the Python SDK pointed at the service; every client closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(*, api_key: str = SDK_KEY, timeout: float = CLIENT_TIMEOUT_SECONDS) -> openai.OpenAI:
        # max_retries=0: an error must reach the test as the service answered it, not after the SDK's retries.
        client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=api_key, timeout=timeout, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# --- the Python SDK ----------------------------------------------------------------------------------------------


def test_python_sdk_batch_create_gets_a_chat_completion_with_usage_and_the_request_id(sdk: SDK) -> None:
    raw = sdk().chat.completions.with_raw_response.create(
        model=MODEL, messages=_user("Hello there"), seed=7, extra_body={"a_field_from_the_future": True}
    )
    completion = raw.parse()

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content is not None
    assert completion.choices[0].message.content.startswith("You said: Hello there")
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert len(raw.headers["x-request-id"]) == 32


def test_python_sdk_parameters_and_image_parts_reach_the_upstream_and_shape_the_answer(sdk: SDK) -> None:
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30).decode()
    with_image: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one two three four five"},
                {"type": "image_url", "image_url": {"url": png, "detail": "low"}},
            ],
        }
    ]
    client = sdk()
    text_only = client.chat.completions.create(model="gpt-5-mini", messages=_user("one two three four five"))
    answer = client.chat.completions.create(
        model="gpt-5-mini",
        messages=with_image,
        reasoning_effort="low",
        seed=3,
        stop=["three"],
        max_completion_tokens=500,
    )
    assert answer.usage is not None
    assert text_only.usage is not None
    # The image part was forwarded (the upstream counts it), and `stop` cut the echo before "three".
    assert answer.usage.prompt_tokens - text_only.usage.prompt_tokens == IMAGE_PART_TOKENS
    assert answer.choices[0].message.content is not None
    assert "three" not in answer.choices[0].message.content
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens


def test_python_sdk_stream_reads_every_chunk_to_the_end_and_the_usage_only_when_asked(sdk: SDK) -> None:
    client = sdk()
    expected = client.chat.completions.create(model=MODEL, messages=_user("Stream this please")).choices[0]

    with client.chat.completions.create(
        model=MODEL, messages=_user("Stream this please"), stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    with client.chat.completions.create(model=MODEL, messages=_user("Stream this please"), stream=True) as plain:
        plain_chunks = list(plain)

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(chunk.usage is None for chunk in plain_chunks)
    assert all(chunk.choices for chunk in plain_chunks)


def test_python_sdk_n_and_logprobs_come_back_for_each_choice(sdk: SDK) -> None:
    completion = sdk().chat.completions.create(
        model=MODEL, messages=_user("Two answers"), n=2, logprobs=True, top_logprobs=2
    )

    assert [choice.index for choice in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.content
        assert len(choice.logprobs.content[0].top_logprobs) == 2


def test_python_sdk_tool_call_round_trip(sdk: SDK) -> None:
    client = sdk()
    messages: list[Any] = _user("Weather in Paris")

    asked = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
    call = (asked.choices[0].message.tool_calls or [])[0]
    assert asked.choices[0].finish_reason == "tool_calls"
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}

    messages += [asked.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answered = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert answered.choices[0].message.content == "The tool said: sunny, 21 C"


def test_python_sdk_streamed_tool_call_deltas_assemble_into_the_call(sdk: SDK) -> None:
    with sdk().chat.completions.stream(
        model="mock-tools-parallel",
        messages=_user("Weather in Paris and Rome"),
        tools=[WEATHER_TOOL, TIME_TOOL],
    ) as stream:
        final = stream.get_final_completion()

    calls = final.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    assert all(set(json.loads(call.function.arguments)) == {"city"} for call in calls)


class Weather(BaseModel):
    city: str
    temperature_c: float
    sunny: bool


def test_python_sdk_parse_with_a_pydantic_response_format(sdk: SDK) -> None:
    completion = sdk().chat.completions.parse(
        model=MODEL, messages=_user("Weather in Paris as JSON"), response_format=Weather
    )

    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    assert parsed.city


def test_python_sdk_lists_and_retrieves_models(sdk: SDK) -> None:
    client = sdk()

    listed = [model.id for model in client.models.list()]
    one = client.models.retrieve("gpt-5")

    assert {"gpt-5-mini", "gpt-5", "gpt-4.1-mini"} <= set(listed)
    assert (one.id, one.object) == ("gpt-5", "model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


def test_python_sdk_raises_authentication_error_for_a_wrong_key(sdk: SDK) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(api_key="llmsvc-wrong").chat.completions.create(model=MODEL, messages=_user("Hi"))

    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert raised.value.type == "invalid_request_error"


def test_python_sdk_raises_rate_limit_error_with_the_services_retry_after(sdk: SDK) -> None:
    client = sdk(api_key=LIMITED_KEY)

    def call_until_refused() -> None:
        # One request a minute: the second is refused, unless the first ended a minute window (then the third is).
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=_user("Hi"))

    with pytest.raises(openai.RateLimitError) as raised:
        call_until_refused()

    assert raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60
    assert raised.value.response.headers["x-ratelimit-limit-requests"] == "1"


def test_python_sdk_raises_bad_request_error_naming_the_param(sdk: SDK) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk().chat.completions.create(model=MODEL, messages=[])

    assert raised.value.param == "messages"
    assert raised.value.type == "invalid_request_error"


def test_python_sdk_raises_internal_server_error_when_the_upstream_rejects_the_services_key(sdk: SDK) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        sdk().chat.completions.create(model="mock-401", messages=_user("Hi"))

    assert raised.value.status_code == 500
    assert raised.value.code == "llm_auth_error"
    assert "sk-" not in raised.value.message


def test_python_sdk_raises_api_error_from_a_stream_that_breaks_after_it_began(sdk: SDK) -> None:
    stream = sdk().chat.completions.create(
        model="mock-stream-break", messages=_user("one two three four five six"), stream=True
    )

    with stream, pytest.raises(openai.APIError) as raised:
        list(stream)

    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "upstream_error"


def test_python_sdk_raises_api_timeout_error_and_the_service_closes_the_upstream_call(
    service: RunningService, upstream: ServerProcess, sdk: SDK
) -> None:
    client = sdk(timeout=SHORT_TIMEOUT_SECONDS)

    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=SLOW_MODEL, messages=_user("Too slow"))

    assert requests_for(upstream, SLOW_MODEL) == 1
    cancelled = service.wait_for_log(lambda line: line.get("event") == "llm_call" and line.get("model") == SLOW_MODEL)
    assert cancelled["cancelled"] is True
    assert cancelled["route"] == "openai"


def test_python_sdk_closing_a_stream_early_closes_the_upstream_call(service: RunningService, sdk: SDK) -> None:
    stream = sdk().chat.completions.create(model=STALL_MODEL, messages=_user("Stall after one word"), stream=True)
    with stream:
        first = next(iter(stream))

    assert first.object == "chat.completion.chunk"
    ended = service.wait_for_log(lambda line: line.get("event") == "llm_call" and line.get("model") == STALL_MODEL)
    assert ended["cancelled"] is True
    assert ended["route"] == "openai"


def test_ledger_route_and_log_lines_say_openai(service: RunningService, sdk: SDK) -> None:
    sdk().chat.completions.create(model=MODEL, messages=_user("Which route?"), user="route-check")

    calls = [line for line in service.log_lines() if line.get("event") == "llm_call" and line.get("route")]
    assert calls
    assert {line["route"] for line in calls} == {"openai"}
    assert {line["key"] for line in calls} >= {"sdk", "limited"}


# --- the Node SDK ------------------------------------------------------------------------------------------------


def _node() -> str:
    """The machine's node with the pinned SDK installed (`make node-deps`); otherwise skip, or fail under CI."""
    node = shutil.which("node")
    if node is None:
        problem = "node is missing: install Node.js 20+ (make system-deps installs Debian's nodejs and npm)"
    elif not (NODE_SDK_DIR / "node_modules" / "openai").is_dir():
        problem = f"the openai Node SDK is not installed in {NODE_SDK_DIR}: run `make node-deps` (make test does)"
    else:
        return node
    if os.environ.get("CI"):
        pytest.fail(problem)
    pytest.skip(problem)


def _run_node(service: RunningService, script: str, *arguments: str) -> dict[str, Any]:
    node = _node()
    env = {**os.environ, "OPENAI_BASE_URL": f"{service.url}/v1", "OPENAI_API_KEY": SDK_KEY}
    result = subprocess.run(
        [node, script, *arguments],
        cwd=NODE_SDK_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return output


def test_node_sdk_streams_a_chat_to_the_end(service: RunningService, sdk: SDK) -> None:
    expected = sdk().chat.completions.create(model=MODEL, messages=_user("Hello from Node"))

    read = _run_node(service, "stream.mjs", MODEL, "Hello from Node")

    assert read["content"] == expected.choices[0].message.content
    assert read["finishReason"] == "stop"
    assert read["usage"]["total_tokens"] > 0
    assert read["chunks"] > 3


def test_node_sdk_tool_call_round_trip(service: RunningService) -> None:
    read = _run_node(service, "tool_call.mjs", MODEL)

    assert read["finishReason"] == "tool_calls"
    assert read["tool"] == "get_weather"
    assert set(read["arguments"]) == {"city"}
    assert read["answer"] == "The tool said: sunny, 21 C"
