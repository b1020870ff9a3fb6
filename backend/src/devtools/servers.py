"""Start and stop the bundled upstream and the service as real processes on free ports (demo, e2e tests, bench).

Every process gets its settings from the caller, never from the developer's shell or `.env`: the environment it
inherits is cleaned of the service's settings, egress proxies and the bundled upstream's own variables, and the
service is told to read no settings file (`LLM_ENV_FILE=`).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from src.core.config import ENV_FILE_VARIABLE, Settings

BACKEND_DIR = Path(__file__).resolve().parents[2]
DEMO_API_KEY = "sk-offline-demo-placeholder-0000"
READY_TIMEOUT_SECONDS = 30.0
# Longer than the service's default shutdown grace (LLM_SHUTDOWN_GRACE_SECONDS), so a drain is never cut short.
STOP_TIMEOUT_SECONDS = 30.0
PROXY_VARIABLES = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"})
# A metrics directory inherited from the caller would merge a started server's metrics with the caller's.
INHERITED_ELSEWHERE = frozenset({"PROMETHEUS_MULTIPROC_DIR"})
_MOCK_VARIABLE_PREFIX = "MOCK_"


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would change what a started server does."""
    owned = (
        {name.upper() for name in Settings.model_fields} | PROXY_VARIABLES | INHERITED_ELSEWHERE | {ENV_FILE_VARIABLE}
    )
    return {
        name: value
        for name, value in os.environ.items()
        if name.upper() not in owned and not name.upper().startswith(_MOCK_VARIABLE_PREFIX)
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerTLS:
    """A server certificate and key, and the CA that signed them (to check the server is up)."""

    certfile: Path
    keyfile: Path
    cafile: Path


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def stop(self, *, signum: int = signal.SIGINT, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGINT (uvicorn's graceful shutdown, like Ctrl-C), then SIGKILL if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_ready(
        self, path: str = "/health", timeout: float = READY_TIMEOUT_SECONDS, verify: ssl.SSLContext | bool = True
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it was ready")
            try:
                if httpx.get(self.url + path, timeout=1.0, verify=verify).status_code < 500:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready at {self.url} within {timeout:.0f}s")


def start_mock_upstream(
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    delay_ms: float | None = None,
    api_key: str | None = None,
    tls: ServerTLS | None = None,
    output: IO[bytes] | int | None = None,
) -> ServerProcess:
    """The bundled upstream; `api_key` makes it reject any other key, `tls` serves HTTPS."""
    port = port or free_port(host)
    command = [sys.executable, "-m", "src.devtools.mock_openai", "--host", host, "--port", str(port)]
    if delay_ms is not None:
        command += ["--delay-ms", str(delay_ms)]
    if api_key is not None:
        command += ["--api-key", api_key]
    if tls is not None:
        command += ["--ssl-certfile", str(tls.certfile), "--ssl-keyfile", str(tls.keyfile)]
    process = subprocess.Popen(
        command, cwd=BACKEND_DIR, env=clean_environment(), stdout=output, stderr=output, start_new_session=True
    )
    scheme = "https" if tls is not None else "http"
    server = ServerProcess("bundled upstream", process, f"{scheme}://{host}:{port}")
    server.wait_ready(verify=ssl.create_default_context(cafile=tls.cafile) if tls is not None else True)
    return server


def start_service(
    *,
    upstream_url: str | None,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    output: IO[bytes] | int | None = None,
    backend_dir: Path = BACKEND_DIR,
    launcher: Sequence[str] = (),
    ready_timeout: float = READY_TIMEOUT_SECONDS,
) -> ServerProcess:
    """The real service under uvicorn, configured only by `env`; with `upstream_url` it is wired to that upstream
    with a placeholder key (`env` may still name another key). `backend_dir` runs another checkout's code;
    `launcher` runs the Python process under another program (valgrind, for bench/instructions.py)."""
    port = port or free_port(host)
    service_env = {**clean_environment(), ENV_FILE_VARIABLE: ""}
    if upstream_url is not None:
        service_env["OPENAI_BASE_URL"] = f"{upstream_url}/v1"
        service_env["OPENAI_API_KEY"] = DEMO_API_KEY
    service_env.update(env or {})
    # Each server gets a ledger of its own unless told otherwise: tests and benchmarks never write into the
    # developer's data/ ledger (the demo passes that one explicitly).
    service_env.setdefault("DATABASE_URL", f"sqlite:///{tempfile.mkdtemp(prefix='llm-service-ledger-')}/ledger.db")
    command = [
        *launcher,
        sys.executable,
        "-m",
        "uvicorn",
        "src.main:app",
        "--app-dir",
        str(backend_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        # No websocket routes: don't load a websocket implementation (about 1 MiB per process).
        "--ws",
        "none",
        "--workers",
        str(workers),
        "--backlog",
        "4096",
    ]
    # A session of its own: a Ctrl-C in the terminal reaches only the launcher, which stops each server once
    # (a second SIGINT would make uvicorn skip the app's shutdown).
    process = subprocess.Popen(
        command, cwd=backend_dir, env=service_env, stdout=output, stderr=output, start_new_session=True
    )
    server = ServerProcess("service", process, f"http://{host}:{port}")
    server.wait_ready(timeout=ready_timeout)
    return server
