"""The real-server helpers work: nginx proxies and times out, tinyproxy forwards and logs, the test CA is trusted."""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.forward_proxy import ForwardProxy, run_forward_proxy
from tests.support.nginx import error_log, run_nginx
from tests.support.real_servers import LOOPBACK, require_binary
from tests.support.tls import TestCA, make_test_ca

pytestmark = pytest.mark.e2e

CLIENT_TIMEOUT_S = 10.0
# How long the upstream holds a stream open waiting for the client's go-ahead before it gives up.
STREAM_GO_AHEAD_TIMEOUT_S = 5.0
NGINX_READ_TIMEOUT_S = 1.0
# Longer than NGINX_READ_TIMEOUT_S, so nginx must cut it; and a pause well within it, which must pass.
LONG_PAUSE_S = 2.0
SHORT_PAUSE_S = 0.3
SERVER_STOP_TIMEOUT_S = 5.0
# How often the accept loop checks for shutdown: teardown waits up to this long.
SERVE_POLL_INTERVAL_S = 0.05
PROXY_ENV_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


class TinyServer(ThreadingHTTPServer):
    """The upstream the helpers proxy to, in a thread; with an SSL context it speaks HTTPS."""

    daemon_threads = True

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__((LOOPBACK, 0), TinyHandler)
        self.ssl_context = ssl_context
        if ssl_context is not None:
            # The handshake runs in the request's thread (finish_request), not in the accept loop.
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        # Lets a stream go on once the client has seen its first chunk.
        self.go_ahead = threading.Event()
        # Set at teardown, so a /pause still under way ends at once instead of after its full length.
        self.closing = threading.Event()
        self.handler_errors: list[BaseException] = []

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's FQDN, which can be slow and is not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = LOOPBACK, self.socket.getsockname()[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                # An untrusting client hangs up during the handshake: that is the point of some tests.
                self.handler_errors.append(exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (or nginx) hanging up mid-body is expected here; keep it for debugging, off stderr.
        error = sys.exc_info()[1]
        if error is not None:
            self.handler_errors.append(error)

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{LOOPBACK}:{self.server_port}"


class TinyHandler(BaseHTTPRequestHandler):
    """`/echo` answers JSON about the request; `/stream` and `/pause` answer chunked bodies that stop midway."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests assert on what reached the server, not on its access log."""

    def do_GET(self) -> None:
        server = cast(TinyServer, self.server)
        url = urlsplit(self.path)
        if url.path == "/echo":
            body = json.dumps(
                {
                    "path": self.path,
                    "version": self.request_version,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif url.path == "/stream":
            self._start_chunked()
            self._chunk(b"first\n")
            went_ahead = server.go_ahead.wait(STREAM_GO_AHEAD_TIMEOUT_S)
            self._chunk(f"second went_ahead={went_ahead}\n".encode())
            self._chunk(b"")
        elif url.path == "/pause":
            seconds = float(parse_qs(url.query)["seconds"][0])
            self._start_chunked()
            self._chunk(b"before\n")
            server.closing.wait(seconds)
            self._chunk(b"after\n")
            self._chunk(b"")
        else:
            self.send_error(404)

    def _start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _serve(ssl_context: ssl.SSLContext | None) -> Iterator[TinyServer]:
    server = TinyServer(ssl_context)
    thread = threading.Thread(
        target=server.serve_forever, args=(SERVE_POLL_INTERVAL_S,), name="tiny-upstream", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.go_ahead.set()
        server.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(SERVER_STOP_TIMEOUT_S)


@pytest.fixture
def tiny_upstream() -> Iterator[TinyServer]:
    yield from _serve(None)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tiny_https_upstream(test_ca: TestCA) -> Iterator[TinyServer]:
    yield from _serve(test_ca.server_ssl_context())


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[ForwardProxy]:
    with run_forward_proxy(workdir=tmp_path / "tinyproxy") as proxy:
        yield proxy


@pytest.fixture
def direct() -> Iterator[httpx.Client]:
    # trust_env=False: no proxy or CA bundle from the developer's shell.
    with httpx.Client(timeout=CLIENT_TIMEOUT_S, trust_env=False) as client:
        yield client


def _read_stream_releasing_upstream(client: httpx.Client, url: str, upstream: TinyServer) -> str:
    """Read a `/stream` body, letting the upstream finish only once its first chunk has reached us."""
    received = b""
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        for piece in response.iter_raw():
            received += piece
            if b"first\n" in received:
                upstream.go_ahead.set()
    return received.decode()


def test_nginx_proxies_over_http11_to_the_upstream(
    tmp_path: Path, tiny_upstream: TinyServer, direct: httpx.Client
) -> None:
    with run_nginx(tiny_upstream.url, proxy_read_timeout_s=NGINX_READ_TIMEOUT_S, workdir=tmp_path) as nginx_url:
        response = direct.get(f"{nginx_url}/echo?q=1")
    assert response.status_code == 200
    assert response.headers["server"].startswith("nginx")
    seen = response.json()
    assert seen["path"] == "/echo?q=1"
    assert seen["version"] == "HTTP/1.1"
    assert seen["headers"]["x-forwarded-for"] == LOOPBACK
    assert "connection" not in seen["headers"]


def test_nginx_without_buffering_passes_a_stream_through_as_it_comes(
    tmp_path: Path, tiny_upstream: TinyServer, direct: httpx.Client
) -> None:
    with run_nginx(tiny_upstream.url, proxy_read_timeout_s=NGINX_READ_TIMEOUT_S, workdir=tmp_path) as nginx_url:
        body = _read_stream_releasing_upstream(direct, f"{nginx_url}/stream", tiny_upstream)
    # went_ahead=True: the first chunk crossed nginx while the upstream was still holding the rest back.
    assert body == "first\nsecond went_ahead=True\n"


def test_nginx_read_timeout_cuts_a_body_that_pauses_longer(
    tmp_path: Path, tiny_upstream: TinyServer, direct: httpx.Client
) -> None:
    with run_nginx(tiny_upstream.url, proxy_read_timeout_s=NGINX_READ_TIMEOUT_S, workdir=tmp_path) as nginx_url:
        short = direct.get(f"{nginx_url}/pause?seconds={SHORT_PAUSE_S}")
        received: list[bytes] = []
        with (
            direct.stream("GET", f"{nginx_url}/pause?seconds={LONG_PAUSE_S}") as response,
            pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        ):
            # The pieces read before nginx cuts the body stay in `received`.
            received.extend(response.iter_raw())
    assert short.text == "before\nafter\n"
    assert b"".join(received) == b"before\n"
    assert "upstream timed out" in error_log(tmp_path).read_text()


def test_forward_proxy_forwards_plain_http_and_logs_it(forward_proxy: ForwardProxy, tiny_upstream: TinyServer) -> None:
    with httpx.Client(proxy=forward_proxy.url, timeout=CLIENT_TIMEOUT_S, trust_env=False) as client:
        response = client.get(f"{tiny_upstream.url}/echo")
    assert response.status_code == 200
    assert "tinyproxy" in response.json()["headers"]["via"]
    assert [request.line for request in forward_proxy.requests()] == [f"GET {tiny_upstream.url}/echo"]


def test_no_proxy_host_goes_direct_while_others_use_the_proxy(
    monkeypatch: pytest.MonkeyPatch, forward_proxy: ForwardProxy, tiny_upstream: TinyServer
) -> None:
    for name in PROXY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    port = tiny_upstream.server_port
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        assert client.get(f"http://localhost:{port}/echo").status_code == 200
        assert client.get(f"http://{LOOPBACK}:{port}/echo").status_code == 200
    assert forward_proxy.authorities() == [f"{LOOPBACK}:{port}"]


def test_server_cert_is_trusted_through_the_test_ca_only(test_ca: TestCA, tiny_https_upstream: TinyServer) -> None:
    for host in ("127.0.0.1", "localhost"):
        url = f"https://{host}:{tiny_https_upstream.server_port}/echo"
        with httpx.Client(verify=ssl.create_default_context(cafile=test_ca.ca_cert_pem), trust_env=False) as client:
            assert client.get(url).status_code == 200
        with (
            httpx.Client(verify=test_ca.client_ssl_context(trust_other_ca=True), trust_env=False) as client,
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            client.get(url)


def test_ssl_cert_file_points_a_default_client_at_the_test_ca(
    monkeypatch: pytest.MonkeyPatch, test_ca: TestCA, tiny_https_upstream: TinyServer
) -> None:
    for name in PROXY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.ca_cert_pem))
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        assert client.get(f"{tiny_https_upstream.url}/echo").status_code == 200
    # The standard library's default context reads the same variable (through OpenSSL).
    address = (LOOPBACK, tiny_https_upstream.server_port)
    with (
        socket.create_connection(address, timeout=CLIENT_TIMEOUT_S) as raw,
        ssl.create_default_context().wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        assert tls.version() is not None


def test_https_through_the_forward_proxy_uses_connect_and_is_logged(
    forward_proxy: ForwardProxy, test_ca: TestCA, tiny_https_upstream: TinyServer
) -> None:
    with httpx.Client(
        proxy=forward_proxy.url, verify=test_ca.client_ssl_context(), timeout=CLIENT_TIMEOUT_S, trust_env=False
    ) as client:
        response = client.get(f"{tiny_https_upstream.url}/echo")
        body = _read_stream_releasing_upstream(client, f"{tiny_https_upstream.url}/stream", tiny_https_upstream)
    assert response.status_code == 200
    # Inside the tunnel the proxy sees only ciphertext: no Via header reaches the upstream.
    assert "via" not in response.json()["headers"]
    assert body == "first\nsecond went_ahead=True\n"
    authority = f"{LOOPBACK}:{tiny_https_upstream.server_port}"
    assert [request.line for request in forward_proxy.requests()] == [f"CONNECT {authority}"]


def test_a_missing_binary_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "/nonexistent/sbin/frobnicated"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install Debian package frobnicator"):
        require_binary(missing, "frobnicator")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install Debian package frobnicator"):
        require_binary(missing, "frobnicator")
