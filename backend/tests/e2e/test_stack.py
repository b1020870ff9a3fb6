"""End to end: the real service under uvicorn, the bundled upstream, the real openai SDK, sockets and SSE."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from src.devtools.servers import BACKEND_DIR
from tests.conftest import chat_body, parse_sse
from tests.e2e.conftest import E2E_STREAM_DELAY_MS, Stack

pytestmark = pytest.mark.e2e
CHAT = "/api/v1/llm/chat"


def _post(stack: Stack, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(stack.service.url + CHAT, json=body, timeout=10, **kwargs)


def test_batch_answer_over_sockets(stack: Stack) -> None:
    response = _post(stack, chat_body("Tell me about sockets"))
    assert response.status_code == 200
    body = response.json()
    assert "Tell me about sockets" in body["message"]["content"]
    assert body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 4
    assert body["id"].startswith("chatcmpl-")
    assert body["request_id"] == response.headers["x-request-id"]


def test_parameters_reach_the_upstream(stack: Stack) -> None:
    limited = _post(stack, chat_body("one two three four five", max_tokens=3))
    assert limited.json()["finish_reason"] == "length"
    assert limited.json()["usage"]["completion_tokens"] == 3
    stopped = _post(stack, chat_body("alpha beta gamma", stop=["beta"]))
    assert stopped.json()["message"]["content"] == "You said: alpha"


def test_model_rejecting_a_parameter_is_400_with_openais_explanation(stack: Stack) -> None:
    response = _post(stack, chat_body(temperature=0.2))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "temperature" in error["message"]
    assert "Only the default (1) value is supported" in error["message"]


def test_stream_events_arrive_incrementally(stack: Stack) -> None:
    arrivals: list[float] = []
    text = ""
    started = time.perf_counter()
    with httpx.stream(
        "POST", stack.service.url + CHAT, json=chat_body(stream=True, model="mock-words-20"), timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_text():
            arrivals.append(time.perf_counter() - started)
            text += chunk
    events = parse_sse(text)
    deltas = [payload["content"] for event, payload in events if event == "delta"]
    assert len(deltas) == 20
    assert events[-1][0] == "done"
    assert events[-1][1]["usage"]["completion_tokens"] == 20
    # The upstream sends a word every E2E_STREAM_DELAY_MS: a buffering relay would deliver in one burst.
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] >= 0.5 * 19 * E2E_STREAM_DELAY_MS / 1000


def test_curl_style_stream_shows_first_token_before_the_end(stack: Stack) -> None:
    with httpx.stream(
        "POST", stack.service.url + CHAT, json=chat_body(stream=True, model="mock-words-30"), timeout=10
    ) as response:
        chunks = response.iter_text()
        first = next(chunks)
        assert first.startswith("id: 1\nevent: delta")
        rest = "".join(chunks)
    assert "event: done" not in first
    assert "event: done" in rest


FAULTS = {
    "mock-401": (500, "llm_auth_error"),
    "mock-403": (500, "llm_auth_error"),
    "mock-404": (400, "model_not_found"),
    "mock-400-context": (400, "context_length_exceeded"),
    "mock-429": (429, "rate_limited"),
    "mock-429-quota": (503, "quota_exceeded"),
    "mock-500": (502, "upstream_error"),
    "mock-503": (502, "upstream_error"),
    "mock-hang": (504, "upstream_timeout"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
@pytest.mark.parametrize(("model", "status", "code"), [(m, *v) for m, v in FAULTS.items()], ids=FAULTS.keys())
def test_bundled_upstream_faults_map_to_contract_codes(
    stack: Stack, stream: bool, model: str, status: int, code: str
) -> None:
    response = _post(stack, chat_body(model=model, stream=stream))
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert "sk-" not in response.text
    if model == "mock-429":
        assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("model", "code", "deltas"),
    [("mock-stream-break", "upstream_error", 3), ("mock-stream-stall", "upstream_timeout", 1)],
    ids=["connection_drop", "stall_past_timeout"],
)
def test_stream_failing_after_first_byte_ends_with_error_event(
    stack: Stack, model: str, code: str, deltas: int
) -> None:
    response = _post(stack, chat_body("one two three four five six", model=model, stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert [event for event, _ in events] == ["delta"] * deltas + ["error"]
    assert events[-1][1]["code"] == code
    assert events[-1][1]["request_id"] == response.headers["x-request-id"]


def test_upstream_unreachable_is_503(tmp_path: Any) -> None:
    from src.devtools.servers import free_port, start_service

    with (tmp_path / "svc.log").open("wb") as log:
        service = start_service(
            upstream_url=f"http://127.0.0.1:{free_port()}", output=log, env={"LLM_MAX_RETRIES": "0"}
        )
        try:
            response = httpx.post(service.url + CHAT, json=chat_body(), timeout=10)
        finally:
            service.stop()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"


def _mock_stats(stack: Stack) -> dict[str, int]:
    stats: dict[str, int] = httpx.get(stack.upstream.url + "/_mock/stats", timeout=5).json()
    return stats


def test_client_disconnect_mid_stream_closes_the_upstream(stack: Stack) -> None:
    before = _mock_stats(stack)
    request = json.dumps(chat_body(stream=True, model="mock-words-300")).encode()
    host, port = stack.service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(
            b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(request)).encode() + b"\r\n\r\n" + request
        )
        received = b""
        deadline = time.monotonic() + 5
        while b"event: delta" not in received and time.monotonic() < deadline:
            chunk = raw.recv(65536)
            if not chunk:
                break
            received += chunk
        assert b"event: delta" in received
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        after = _mock_stats(stack)
        if after["streams_client_closed"] > before["streams_client_closed"]:
            break
        time.sleep(0.05)
    assert after["streams_client_closed"] == before["streams_client_closed"] + 1
    # 300 words at one per E2E_STREAM_DELAY_MS would take 9 s; the upstream stopped long before.
    assert after["streams_completed"] == before["streams_completed"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "src.cli.llm_test", *args],
        cwd=BACKEND_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_streams_and_prints_summary(stack: Stack) -> None:
    result = _cli("Hello CLI", "--stream", "--url", stack.service.url, "--system", "be brief", "--max-tokens", "50")
    assert result.returncode == 0, result.stderr
    assert "You said: Hello CLI" in result.stdout
    for label in ("model:", "finish_reason: stop", "usage:", "first token:", "total time:"):
        assert label in result.stdout


def test_cli_batch_json_prints_raw_response(stack: Stack) -> None:
    result = _cli("Hi", "--json", "--url", stack.service.url)
    assert result.returncode == 0
    assert json.loads(result.stdout)["message"]["role"] == "assistant"


def test_cli_check_battery_passes(stack: Stack) -> None:
    result = _cli("--check", "--url", stack.service.url)
    assert result.returncode == 0, result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines()[:3]] == ["PASS", "PASS", "PASS"]


def test_cli_service_error_exits_1_with_code(stack: Stack) -> None:
    result = _cli("Hi", "--model", "mock-404", "--url", stack.service.url)
    assert result.returncode == 1
    assert "model_not_found" in result.stderr


def test_cli_unreachable_exits_3() -> None:
    from src.devtools.servers import free_port

    result = _cli("Hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "cannot reach" in result.stderr


def _log_lines_until(stack: Stack, request_id: str) -> list[str]:
    """The service's log lines, once its `llm_call` line for `request_id` is written (with a deadline)."""
    deadline = time.monotonic() + 5
    while True:
        lines = stack.service_log.read_text().splitlines()
        if any(request_id in line and '"llm_call"' in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_service_log_is_json_lines_without_secrets(stack: Stack) -> None:
    response = _post(stack, chat_body("private words here"))
    lines = _log_lines_until(stack, response.headers["x-request-id"])
    parsed = [json.loads(line) for line in lines]
    events = {line["event"] for line in parsed}
    assert {"request", "llm_call", "offline_demo_upstream"} <= events
    text = "\n".join(lines)
    assert "sk-e2e-SECRET" not in text
    assert "private words here" not in text


def test_upstream_cookies_are_never_replayed(stack: Stack) -> None:
    """The bundled upstream sets a cookie on every answer, as OpenAI's edge does; one client serves all callers."""
    for _ in range(3):
        assert _post(stack, chat_body()).status_code == 200
    assert _mock_stats(stack)["requests_with_cookies"] == 0
