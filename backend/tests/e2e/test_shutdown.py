"""Graceful shutdown with real processes and real signals, for each documented way to start the service.

On SIGTERM (or Ctrl-C's SIGINT) the process stops taking connections; a stream that ends inside the grace ends
whole; one still running when the grace is over gets a final `server_shutting_down` error event in time; every
call has its `llm_call` line, the app's own shutdown runs, and the process exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import EventSource

from src.core.config import ENV_FILE_VARIABLE, REPO_ROOT
from src.devtools.servers import (
    BACKEND_DIR,
    DEMO_API_KEY,
    ServerProcess,
    clean_environment,
    free_port,
)
from tests.e2e.network import CHAT, chat

pytestmark = pytest.mark.e2e

GRACE_SECONDS = 2.0
# `make demo` takes no settings from the shell, so its grace is the default.
DEMO_GRACE_SECONDS = 20.0
SHORT_MODEL = "mock-slow-first-1"
LONG_MODEL = "mock-slow-first-120"
START_TIMEOUT_SECONDS = 60


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    grace: float
    stop_signal: signal.Signals

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


def _service_env(upstream: ServerProcess, port: int, directory: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{directory / 'ledger.db'}",
        **clean_environment(),
        ENV_FILE_VARIABLE: "",
        "OPENAI_BASE_URL": f"{upstream.url}/v1",
        "OPENAI_API_KEY": DEMO_API_KEY,
        "LLM_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
        # The documented start command has no flags: uvicorn reads its options from UVICORN_* variables too.
        "UVICORN_PORT": str(port),
    }


def _launch(launcher: str, upstream: ServerProcess, log_path: Path) -> Launched:
    port = free_port()
    env = _service_env(upstream, port, log_path.parent)
    if launcher == "uvicorn":
        command, cwd, grace, stop = (
            [sys.executable, "-m", "uvicorn", "src.main:app"],
            BACKEND_DIR,
            GRACE_SECONDS,
            signal.SIGTERM,
        )
    elif launcher == "make run":
        command, cwd, grace, stop = ["make", "-s", "run", f"PORT={port}"], REPO_ROOT, GRACE_SECONDS, signal.SIGTERM
    else:
        demo = ["make", "-s", "demo", f"PORT={port}", f"DEMO_LEDGER={log_path.parent / 'demo-ledger.db'}"]
        command, cwd, grace, stop = demo, REPO_ROOT, DEMO_GRACE_SECONDS, signal.SIGINT
    # Python's own path first, so that `make` finds the same interpreter's virtualenv tools it would in the repo.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    launched = Launched(process, f"http://127.0.0.1:{port}", log_path, grace, stop)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if httpx.get(launched.url + "/health", timeout=1).status_code == 200:
                return launched
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{launcher} did not start:\n{log_path.read_text()[-3000:]}")


async def _read_stream(
    client: httpx.AsyncClient, url: str, model: str, opened: asyncio.Event
) -> tuple[list[tuple[str, dict[str, Any]]], float]:
    """Every event of one stream, and when (monotonic) the last one arrived."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("POST", url + CHAT, json=chat(stream=True, model=model)) as response:
        assert response.status_code == 200
        opened.set()
        async for sse in EventSource(response).aiter_sse():
            events.append((sse.event, json.loads(sse.data)))
    return events, time.monotonic()


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("launcher", ["uvicorn", "make run", "make demo"])
async def test_stop_signal_drains_streams_within_the_grace(
    upstream: ServerProcess, tmp_path: Path, launcher: str
) -> None:
    service = _launch(launcher, upstream, tmp_path / "service.log")
    try:
        async with httpx.AsyncClient(timeout=service.grace + 30) as client:
            short_open, long_open = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(_read_stream(client, service.url, SHORT_MODEL, short_open))
            long = asyncio.create_task(_read_stream(client, service.url, LONG_MODEL, long_open))
            await asyncio.wait_for(asyncio.gather(short_open.wait(), long_open.wait()), timeout=10)
            os.killpg(service.process.pid, service.stop_signal)
            signalled = time.monotonic()
            refused = False
            while not refused and time.monotonic() < signalled + 1:
                refused = _refuses_connections(service.url)
                await asyncio.sleep(0.02)
            (short_events, _), (long_events, long_ended) = await asyncio.wait_for(
                asyncio.gather(short, long), timeout=service.grace + 10
            )
        assert refused, "the service still accepted connections after the stop signal"
        assert short_events[-1][0] == "done"
        assert "Hello there" in "".join(data["content"] for event, data in short_events if event == "delta")
        assert long_events[-1][0] == "error"
        assert long_events[-1][1]["code"] == "server_shutting_down"
        assert service.grace - 0.5 <= long_ended - signalled <= service.grace + 3
        returncode = service.process.wait(timeout=30)
        if launcher == "uvicorn":
            # uvicorn re-raises the SIGTERM it drained on, so the process ends by it (143 in a shell), or exits 0.
            assert returncode in (0, -signal.SIGTERM)
    finally:
        if service.process.poll() is None:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
    logs = service.log_lines()
    calls = {line["model"]: line for line in logs if line["event"] == "llm_call"}
    assert "code" not in calls[SHORT_MODEL]
    assert calls[LONG_MODEL]["code"] == "server_shutting_down"
    assert any(line["event"] == "service_stopped" for line in logs)
    assert "Traceback" not in service.log_path.read_text()
