"""Debian's tinyproxy as a real forward proxy (plain HTTP and CONNECT) on a free loopback port, with its log parsed."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.real_servers import LOOPBACK, require_binary, start_on_free_port, stop_process

TINYPROXY_BINARY = "/usr/bin/tinyproxy"
TINYPROXY_PACKAGE = "tinyproxy"
CONFIG_NAME = "tinyproxy.conf"
LOG_NAME = "tinyproxy.log"
OUTPUT_NAME = "tinyproxy.out"
# Idle seconds before tinyproxy drops a connection: longer than any test's pause inside a stream.
IDLE_TIMEOUT_S = 120
MAX_CLIENTS = 100
# tinyproxy logs each request line at LogLevel Connect, e.g.
#   CONNECT   Nov 25 16:41:12.050 [7660]: Request (file descriptor 5): GET http://127.0.0.1:18999/foo HTTP/1.1
#   CONNECT   Nov 25 16:41:12.065 [7660]: Request (file descriptor 5): CONNECT 127.0.0.1:18999 HTTP/1.1
REQUEST_LINE = re.compile(
    r"\]: Request \(file descriptor \d+\): (?P<method>\S+) (?P<target>\S+) (?P<version>HTTP/\S+)$"
)


@dataclass(frozen=True)
class ProxiedRequest:
    """One request line the proxy received: `GET http://host:port/path HTTP/1.1` or `CONNECT host:port HTTP/1.1`."""

    method: str
    target: str
    host: str
    port: int | None

    @property
    def line(self) -> str:
        return f"{self.method} {self.target}"

    @property
    def authority(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


def _parse_target(method: str, target: str) -> ProxiedRequest:
    # CONNECT carries host:port; every other method an absolute URL.
    parts = urlsplit(target if method != "CONNECT" else f"//{target}")
    return ProxiedRequest(method=method, target=target, host=parts.hostname or "", port=parts.port)


@dataclass(frozen=True)
class ForwardProxy:
    """A running tinyproxy: point a client at `url`; `requests()` says what went through it."""

    url: str
    port: int
    log_path: Path

    def requests(self) -> list[ProxiedRequest]:
        """Every request line logged so far, oldest first (tinyproxy logs it before it contacts the target)."""
        if not self.log_path.exists():
            return []
        seen = []
        # Only whole lines: the last one may still be being written.
        for line in self.log_path.read_text(errors="replace").splitlines(keepends=True):
            match = REQUEST_LINE.search(line.rstrip("\n")) if line.endswith("\n") else None
            if match:
                seen.append(_parse_target(match["method"], match["target"]))
        return seen

    def authorities(self) -> list[str]:
        """`host:port` of every request so far, e.g. to assert a NO_PROXY host never went through the proxy."""
        return [request.authority for request in self.requests()]


def render_config(*, port: int, log_path: Path) -> str:
    # No ConnectPort line: tinyproxy then allows CONNECT to any port (listing one would restrict it to the list).
    # No Upstream line: it connects to targets itself, loopback included (it has no private-address filter).
    # No User/Group: it stays whoever started it, so it can write its log in a private workdir.
    return f"""\
Port {port}
Listen {LOOPBACK}
Allow {LOOPBACK}
Timeout {IDLE_TIMEOUT_S}
MaxClients {MAX_CLIENTS}
LogFile "{log_path}"
LogLevel Connect
"""


@contextlib.contextmanager
def run_forward_proxy(*, workdir: Path) -> Iterator[ForwardProxy]:
    """Run tinyproxy in the foreground with its config and log in `workdir`; stop it (SIGTERM, then SIGKILL) on exit."""
    binary = require_binary(TINYPROXY_BINARY, TINYPROXY_PACKAGE)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / CONFIG_NAME
    log_path = workdir / LOG_NAME
    output_path = workdir / OUTPUT_NAME

    with output_path.open("ab") as output:

        def launch(port: int) -> subprocess.Popen[bytes]:
            config.write_text(render_config(port=port, log_path=log_path))
            return subprocess.Popen(
                [binary, "-d", "-c", str(config)], cwd=workdir, stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )

        process, port = start_on_free_port("tinyproxy", launch, logs=[output_path, log_path])
        try:
            yield ForwardProxy(url=f"http://{LOOPBACK}:{port}", port=port, log_path=log_path)
        finally:
            stop_process(process)
