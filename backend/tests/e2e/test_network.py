"""The service against real network parts: nginx in front, a forward proxy and TLS behind, real timeouts, and
every retry counted by the upstream itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from src.devtools.servers import ServerProcess, ServerTLS, start_mock_upstream
from tests.e2e.network import (
    CHAT,
    RunningService,
    chat,
    requests_for,
    running_service,
    stream_events,
)
from tests.support.forward_proxy import run_forward_proxy
from tests.support.nginx import run_nginx
from tests.support.real_servers import require_binary
from tests.support.tls import make_test_ca

pytestmark = pytest.mark.e2e

TIMEOUT_SECONDS = 1.5
NGINX_READ_TIMEOUT_SECONDS = 3
SILENT_UPSTREAM_SECONDS = 6


@pytest.fixture(scope="module")
def retrying(upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A service with short timeouts and the default retries (2), for counting upstream requests."""
    with running_service(
        upstream.url,
        tmp_path_factory.mktemp("retrying"),
        LLM_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
        LLM_MAX_RETRIES="2",
        LLM_MAX_RETRY_WAIT_SECONDS="5",
    ) as service:
        yield service


# --- keep-alive through a reverse proxy --------------------------------------------------------------------------


@pytest.mark.parametrize(("keepalive", "arrives_whole"), [("1", True), ("30", False)], ids=["keepalive", "control"])
def test_a_silent_upstream_stream_survives_nginx_read_timeout_thanks_to_keepalive(
    upstream: ServerProcess, tmp_path: Path, keepalive: str, arrives_whole: bool
) -> None:
    """nginx cuts a response silent for `proxy_read_timeout`; the upstream thinks for 6 s before its first word."""
    require_binary("/usr/sbin/nginx", "nginx")
    model = f"mock-slow-first-{SILENT_UPSTREAM_SECONDS}"
    with (
        running_service(upstream.url, tmp_path, LLM_STREAM_KEEPALIVE_SECONDS=keepalive) as service,
        run_nginx(service.url, proxy_read_timeout_s=NGINX_READ_TIMEOUT_SECONDS, workdir=tmp_path / "nginx") as front,
    ):
        received = ""
        try:
            with httpx.stream("POST", front + CHAT, json=chat(stream=True, model=model), timeout=30) as response:
                assert response.status_code == 200
                for text in response.iter_text():
                    received += text
        except httpx.RemoteProtocolError:
            assert not arrives_whole, received
    if arrives_whole:
        assert received.count(": keep-alive\n\n") >= SILENT_UPSTREAM_SECONDS - 2
        assert "event: done" in received
        assert "You said: Hello there" in "".join(
            line for line in received.splitlines() if line.startswith("data:")
        ).replace('data: {"content":"', "").replace('"}', "")
    else:
        assert "event: done" not in received


# --- egress proxy ---------------------------------------------------------------------------------------------------


def test_upstream_calls_go_through_the_egress_proxy_and_no_proxy_hosts_go_direct(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    require_binary("/usr/bin/tinyproxy", "tinyproxy")
    port = upstream.url.rsplit(":", 1)[1]
    with run_forward_proxy(workdir=tmp_path / "proxy") as proxy:
        proxies = {"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost"}
        with running_service(f"http://127.0.0.1:{port}", tmp_path, **proxies) as proxied:
            answer = httpx.post(proxied.url + CHAT, json=chat("through the proxy"), timeout=10)
        assert answer.status_code == 200, answer.text
        assert "through the proxy" in answer.json()["message"]["content"]
        via_proxy = [request.line for request in proxy.requests()]
        assert f"POST http://127.0.0.1:{port}/v1/chat/completions" in via_proxy

        with running_service(f"http://localhost:{port}", tmp_path, **proxies) as direct:
            answer = httpx.post(direct.url + CHAT, json=chat("straight there"), timeout=10)
        assert answer.status_code == 200, answer.text
        assert not [line for line in (r.line for r in proxy.requests()) if "localhost" in line]
        assert [request.line for request in proxy.requests()] == via_proxy


# --- TLS ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """The bundled upstream over HTTPS with a test CA's certificate; yields it, its CA and an unrelated CA."""
    directory = tmp_path_factory.mktemp("tls")
    ca = make_test_ca(directory / "ca")
    log = (directory / "upstream.log").open("wb")
    tls = ServerTLS(certfile=ca.server_cert_pem, keyfile=ca.server_key_pem, cafile=ca.ca_cert_pem)
    server = start_mock_upstream(delay_ms=0, tls=tls, output=log)
    try:
        yield server, ca.ca_cert_pem, ca.other_ca_cert_pem
    finally:
        server.stop()
        log.close()


def test_https_upstream_is_trusted_through_ssl_cert_file(
    tls_upstream: tuple[ServerProcess, Path, Path], tmp_path: Path
) -> None:
    server, ca, _ = tls_upstream
    with running_service(server.url, tmp_path, SSL_CERT_FILE=str(ca), SSL_CERT_DIR="") as service:
        batch = httpx.post(service.url + CHAT, json=chat("over tls"), timeout=10)
        with httpx.stream("POST", service.url + CHAT, json=chat(stream=True), timeout=10) as streamed:
            events = stream_events(streamed)
        check = service.wait_for_log(lambda line: line["event"] == "upstream_check")
    assert batch.status_code == 200, batch.text
    assert events[-1][0] == "done"
    assert check["state"] == "ok"


def test_untrusted_upstream_certificate_fails_closed_and_says_why(
    tls_upstream: tuple[ServerProcess, Path, Path], tmp_path: Path
) -> None:
    server, _, other_ca = tls_upstream
    with running_service(server.url, tmp_path, SSL_CERT_FILE=str(other_ca), SSL_CERT_DIR="") as service:
        for body in (chat(), chat(stream=True)):
            response = httpx.post(service.url + CHAT, json=body, timeout=10)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "upstream_unavailable"
        call = service.wait_for_log(lambda line: line["event"] == "llm_call")
        check = service.wait_for_log(lambda line: line["event"] == "upstream_check")
        ready = httpx.get(service.url + "/health/ready", timeout=5).json()
    assert "TLS certificate was not trusted" in call["upstream_message"]
    assert check["state"] == "tls_untrusted"
    assert ready == {"status": "ok", "upstream": "tls_untrusted"}


def test_https_upstream_through_the_proxy_is_tunnelled(
    tls_upstream: tuple[ServerProcess, Path, Path], tmp_path: Path
) -> None:
    require_binary("/usr/bin/tinyproxy", "tinyproxy")
    server, ca, _ = tls_upstream
    authority = server.url.removeprefix("https://")
    with (
        run_forward_proxy(workdir=tmp_path / "proxy") as proxy,
        running_service(server.url, tmp_path, SSL_CERT_FILE=str(ca), SSL_CERT_DIR="", HTTPS_PROXY=proxy.url) as service,
    ):
        response = httpx.post(service.url + CHAT, json=chat("tunnelled"), timeout=10)
        assert response.status_code == 200, response.text
        assert f"CONNECT {authority}" in [request.line for request in proxy.requests()]


# --- timeouts and retries, counted by the upstream -------------------------------------------------------------------


def _wait_for_requests(upstream: ServerProcess, model: str, count: int) -> int:
    """The upstream's request count for `model` once it reaches `count` (or what it is at the deadline)."""
    deadline = time.monotonic() + 5
    while (seen := requests_for(upstream, model)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return seen


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
def test_an_upstream_that_goes_silent_is_asked_once_then_504(
    upstream: ServerProcess, retrying: RunningService, stream: bool
) -> None:
    model = "mock-hang"
    before = requests_for(upstream, model)
    started = time.monotonic()
    response = httpx.post(retrying.url + CHAT, json=chat(model=model, stream=stream), timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert TIMEOUT_SECONDS * 0.9 <= elapsed < TIMEOUT_SECONDS * 2
    assert _wait_for_requests(upstream, model, before + 1) == before + 1


def test_a_rate_limit_asking_for_a_long_wait_is_answered_at_once(
    upstream: ServerProcess, retrying: RunningService
) -> None:
    model = "mock-429-wait-60"
    before = requests_for(upstream, model)
    started = time.monotonic()
    response = httpx.post(retrying.url + CHAT, json=chat(model=model), timeout=30)
    assert time.monotonic() - started < 1
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.headers["retry-after"] == "60"
    assert requests_for(upstream, model) == before + 1


def test_insufficient_quota_is_never_retried(upstream: ServerProcess, retrying: RunningService) -> None:
    model = "mock-429-quota"
    before = requests_for(upstream, model)
    response = httpx.post(retrying.url + CHAT, json=chat(model=model), timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert requests_for(upstream, model) == before + 1


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
def test_transient_server_errors_are_retried_until_the_answer(
    upstream: ServerProcess, retrying: RunningService, stream: bool
) -> None:
    model = "mock-flaky-2"
    before = requests_for(upstream, model)
    body = chat(f"flaky {stream}", model=model, stream=stream)
    response = httpx.post(retrying.url + CHAT, json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert requests_for(upstream, model) == before + 3
    call = retrying.wait_for_log(
        lambda line: (
            line["event"] == "llm_call"
            and line["request_id"] == response.headers["x-request-id"]
            and line.get("finish_reason") is not None
        )
    )
    assert call["attempts"] == 3


def test_a_caller_who_leaves_cancels_the_retries_still_pending(
    upstream: ServerProcess, retrying: RunningService
) -> None:
    model = "mock-429-wait-2"
    before = requests_for(upstream, model)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(retrying.url + CHAT, json=chat(model=model), timeout=0.5, headers={"x-request-id": "leaves-1"})
    call = retrying.wait_for_log(lambda line: line["event"] == "llm_call" and line["request_id"] == "leaves-1")
    assert call["cancelled"] is True
    # ...and the ledger has its row, counted as cancelled.
    deadline = time.monotonic() + 5
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        usage = httpx.get(retrying.url + "/api/v1/llm/usage", params={"group_by": "model"}, timeout=5).json()
        rows = [row for row in usage["rows"] if row["model"] == model]
        if rows:
            break
        time.sleep(0.05)
    assert rows[0]["cancelled"] == 1
    # The retry was due 2 s after the first request: it never comes.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert requests_for(upstream, model) == before + 1
        time.sleep(0.1)


# --- a reader that stops reading ----------------------------------------------------------------------------------


def test_a_stalled_reader_cannot_hold_a_stream(upstream: ServerProcess, tmp_path: Path) -> None:
    with running_service(upstream.url, tmp_path, LLM_STREAM_SEND_TIMEOUT_SECONDS="1") as service:
        host, port = service.url.removeprefix("http://").split(":")
        body = b'{"messages":[{"role":"user","content":"x"}],"stream":true,"model":"mock-words-400000"}'
        with socket.socket() as reader:
            # A tiny receive window, never read: the service's writes stop making progress.
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect((host, int(port)))
            reader.sendall(
                b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            # The call's line is written once the stream and its upstream response are closed.
            call = service.wait_for_log(lambda line: line["event"] == "llm_call", timeout=20)
            stalled = service.wait_for_log(lambda line: line["event"] == "stream_client_stalled")
            # ...while the stalled connection is still open: the service did not wait for the reader.
            still_serving = httpx.post(service.url + CHAT, json=chat("next caller"), timeout=10)
    assert call["cancelled"] is True
    assert call["delivered_chunks"] < 400_000
    assert stalled["send_timeout_seconds"] == 1
    assert still_serving.status_code == 200


# --- what operators and callers are told ---------------------------------------------------------------------------


def test_a_base_url_without_v1_is_not_model_not_found(upstream: ServerProcess, tmp_path: Path) -> None:
    with running_service(upstream.url, tmp_path, OPENAI_BASE_URL=upstream.url) as service:
        response = httpx.post(service.url + CHAT, json=chat(), timeout=10)
        check = service.wait_for_log(lambda line: line["event"] == "upstream_check")
        ready = httpx.get(service.url + "/health/ready", timeout=5).json()
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert "no chat completions endpoint" in error["message"]
    assert check["state"] == "not_openai_compatible"
    assert ready["upstream"] == "not_openai_compatible"


def test_a_rejected_key_is_reported_at_startup_and_on_each_call(tmp_path: Path) -> None:
    with (tmp_path / "upstream.log").open("wb") as log:
        strict = start_mock_upstream(delay_ms=0, api_key="sk-the-right-key", output=log)
        try:
            with running_service(strict.url, tmp_path, OPENAI_API_KEY="sk-a-revoked-key-0000") as service:
                check = service.wait_for_log(lambda line: line["event"] == "upstream_check")
                response = httpx.post(service.url + CHAT, json=chat(), timeout=10)
                call = service.wait_for_log(lambda line: line["event"] == "llm_call")
                raw_log = service.log_path.read_text()
        finally:
            strict.stop()
    assert check["state"] == "key_rejected"
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "llm_auth_error"
    assert call["upstream_status"] == 401
    assert "Incorrect API key provided" in call["upstream_message"]
    assert "sk-a-revoked-key-0000" not in raw_log


def test_an_unreachable_upstream_is_reported_at_startup(tmp_path: Path) -> None:
    from src.devtools.servers import free_port

    with running_service(f"http://127.0.0.1:{free_port()}", tmp_path) as service:
        check = service.wait_for_log(lambda line: line["event"] == "upstream_check")
        ready = httpx.get(service.url + "/health/ready", timeout=5)
    assert check["state"] == "unreachable"
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "upstream": "unreachable"}
