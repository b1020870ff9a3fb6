"""Shared pieces of the benchmarks: the stack under test, process memory, request bodies."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from src.devtools.mock_openai import FILLER_WORDS  # noqa: E402
from src.devtools.servers import (  # noqa: E402
    BACKEND_DIR,
    DEMO_API_KEY,
    ServerProcess,
    start_mock_upstream,
    start_service,
)

__all__ = ["DEMO_API_KEY", "FILLER_WORDS"]

RESULTS_DIR = ROOT / "bench" / "results"
CHAT_PATH = "/api/v1/llm/chat"
UPSTREAM_CHAT_PATH = "/v1/chat/completions"
# The service's OpenAI-compatible route: the same path as the upstream's, as OpenAI's SDKs call it.
OPENAI_CHAT_PATH = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Benchmark me"}]
# The service runs like a production deployment, no feature off: a named key from a keys file with limits (high
# enough never to refuse: every call reserves and settles), admin keys, the ledger (SQLite), metrics.
SERVICE_KEY = "bench-service-key"
ADMIN_KEY = "bench-admin-key"
BENCH_LIMIT = 1_000_000_000


def words_model(words: int) -> str:
    return f"mock-words-{words}"


def service_body(*, stream: bool, words: int) -> dict[str, Any]:
    return {"messages": PROMPT, "model": words_model(words), "stream": stream}


def openai_body(*, stream: bool, words: int) -> dict[str, Any]:
    """What an OpenAI SDK sends for the same call (no usage asked: the service asks upstream for it anyway)."""
    return {"messages": PROMPT, "model": words_model(words), "stream": stream}


def upstream_body(*, stream: bool, words: int) -> dict[str, Any]:
    """What the service itself sends upstream for the same call (so "direct" does the same upstream work)."""
    body: dict[str, Any] = {"messages": PROMPT, "model": words_model(words)}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


@dataclass
class Target:
    name: str
    url: str
    path: str
    headers: dict[str, str]
    pid: int | None
    body: Any

    def request_body(self, *, stream: bool, words: int) -> bytes:
        return json.dumps(self.body(stream=stream, words=words)).encode()


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process and its children (uvicorn workers), in MiB."""
    current = peak = 0.0
    for process in [pid, *_children(pid)]:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except FileNotFoundError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        current += int(fields["VmRSS"].split()[0]) / 1024
        peak += int(fields["VmHWM"].split()[0]) / 1024
    return round(current, 1), round(peak, 1)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    if not task_dir.exists():
        return children
    for task in task_dir.iterdir():
        child_file = task / "children"
        if child_file.exists():
            children += [int(child) for child in child_file.read_text().split()]
    return children


class Stack(ExitStack):
    """The bundled upstream plus services; everything is stopped on exit."""

    def __init__(self, *, delay_ms: float, log_dir: Path) -> None:
        super().__init__()
        self.delay_ms = delay_ms
        self.log_dir = log_dir
        self.upstream: ServerProcess | None = None

    def start_upstream(self) -> ServerProcess:
        log = self.enter_context(open(self.log_dir / "upstream.log", "wb"))  # noqa: SIM115
        self.upstream = start_mock_upstream(delay_ms=self.delay_ms, output=log)
        self.callback(self.upstream.stop)
        return self.upstream

    def _keys_file(self) -> Path:
        path = self.log_dir / "keys.toml"
        digest = hashlib.sha256(SERVICE_KEY.encode()).hexdigest()
        path.write_text(
            f'[[keys]]\nname = "bench"\nsha256 = "{digest}"\nrequests_per_minute = {BENCH_LIMIT}\n'
            f"tokens_per_minute = {BENCH_LIMIT}\ntokens_per_day = {BENCH_LIMIT}\n"
        )
        return path

    def start_service(
        self,
        *,
        workers: int,
        env: dict[str, str] | None = None,
        backend_dir: Path | None = None,
        launcher: Sequence[str] = (),
        ready_timeout: float = 30.0,
    ) -> ServerProcess:
        assert self.upstream is not None
        name = f"service-{workers}w" + ("-baseline" if backend_dir else "") + ("-launched" if launcher else "")
        log: IO[bytes] = self.enter_context(open(self.log_dir / f"{name}.log", "wb"))  # noqa: SIM115
        # Everything stays on: JSON logs at INFO (to a file), request ids, a limited key, the ledger, metrics,
        # error mapping, keep-alive, send timeouts, the drain, the startup check.
        service_env = {
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "SERVICE_KEYS_FILE": str(self._keys_file()),
            "ADMIN_API_KEYS": ADMIN_KEY,
            "DATABASE_URL": f"sqlite:///{self.log_dir / f'{name}-ledger.db'}",
            **(env or {}),
        }
        service = start_service(
            upstream_url=self.upstream.url,
            workers=workers,
            env=service_env,
            output=log,
            backend_dir=backend_dir or BACKEND_DIR,
            launcher=launcher,
            ready_timeout=ready_timeout,
        )
        self.callback(service.stop)
        return service


def upstream_target(upstream: ServerProcess) -> Target:
    return Target(
        "direct to upstream",
        upstream.url,
        UPSTREAM_CHAT_PATH,
        {"Authorization": f"Bearer {DEMO_API_KEY}"},
        upstream.process.pid,
        upstream_body,
    )


def service_target(name: str, service: ServerProcess) -> Target:
    return Target(
        name, service.url, CHAT_PATH, {"Authorization": f"Bearer {SERVICE_KEY}"}, service.process.pid, service_body
    )


def openai_target(name: str, service: ServerProcess) -> Target:
    """The same service through its OpenAI-compatible route."""
    return Target(
        name,
        service.url,
        OPENAI_CHAT_PATH,
        {"Authorization": f"Bearer {SERVICE_KEY}"},
        service.process.pid,
        openai_body,
    )


def environment_summary() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}
