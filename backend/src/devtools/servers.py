"""Start and stop the bundled upstream and the service as real processes on free ports (demo, e2e tests, bench)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

BACKEND_DIR = Path(__file__).resolve().parents[2]
DEMO_API_KEY = "sk-offline-demo-placeholder-0000"
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> int:
        """SIGINT (uvicorn's graceful shutdown, like Ctrl-C), then SIGKILL if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_ready(self, path: str = "/health", timeout: float = READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} before it was ready")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code < 500:
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
    output: IO[bytes] | int | None = None,
) -> ServerProcess:
    port = port or free_port(host)
    command = [sys.executable, "-m", "src.devtools.mock_openai", "--host", host, "--port", str(port)]
    if delay_ms is not None:
        command += ["--delay-ms", str(delay_ms)]
    process = subprocess.Popen(command, cwd=BACKEND_DIR, stdout=output, stderr=output)
    server = ServerProcess("bundled upstream", process, f"http://{host}:{port}")
    server.wait_ready()
    return server


def start_service(
    *,
    upstream_url: str | None,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    output: IO[bytes] | int | None = None,
) -> ServerProcess:
    """The real service under uvicorn; with `upstream_url` it is wired to that upstream with a placeholder key."""
    port = port or free_port(host)
    service_env = {**os.environ, **(env or {})}
    if upstream_url is not None:
        service_env.setdefault("OPENAI_BASE_URL", f"{upstream_url}/v1")
        service_env.setdefault("OPENAI_API_KEY", DEMO_API_KEY)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "src.main:app",
        "--app-dir",
        str(BACKEND_DIR),
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
    process = subprocess.Popen(command, cwd=BACKEND_DIR, env=service_env, stdout=output, stderr=output)
    server = ServerProcess("service", process, f"http://{host}:{port}")
    server.wait_ready()
    return server
