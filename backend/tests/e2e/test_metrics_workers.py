"""Metrics over real uvicorn processes: every scrape, whichever worker answers it, reports the sum over workers.

Runs `tests/e2e/metrics_app.py` (not the service) so that it checks `src.core.metrics` alone. Each server gets
its own TMPDIR, so the default metrics directory (`<tmp>/llm-service-metrics/<pid>`) is a path the test can see.
The scrapes are parsed with a regular expression, not prometheus_client: importing that library in this process
before the first `Metrics.open()` would fix it in single-process mode (see src/core/metrics.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from src.core.metrics import DIRECTORY_ROOT_NAME, MULTIPROC_DIR_VARIABLE
from src.devtools.servers import BACKEND_DIR, ServerProcess, clean_environment, free_port
from tests.e2e.metrics_app import KEY_NAME, MODEL, WORKER_PID_HEADER

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
CALLS = 40
SCRAPES = 12
WORKERS = 2
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05
# Larger than any pid Linux can hand out (PID_MAX_LIMIT is 2**22): a process that certainly does not exist.
NEVER_A_PID = 2**22 + 1
CALLS_SAMPLE = re.compile(
    rf'^llm_calls_total\{{key="{re.escape(KEY_NAME)}",model="{re.escape(MODEL)}",outcome="ok"\}} (\S+)$', re.MULTILINE
)
WORKER_STARTED = re.compile(r"Started server process \[(\d+)\]")
STARTUP_COMPLETE = "Application startup complete."


@contextmanager
def metrics_app(tmp_path: Path, *, workers: int) -> Iterator[tuple[ServerProcess, Path]]:
    """The test app under `uvicorn --workers N` (a supervisor and N workers; 1: a single process), and its log."""
    port = free_port(HOST)
    env = clean_environment()
    # Only the rule under test picks the directory: nothing inherited from this process or the developer's shell.
    env.pop(MULTIPROC_DIR_VARIABLE, None)
    env["TMPDIR"] = str(temp_dir(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BACKEND_DIR), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.e2e.metrics_app:create_app",
        "--factory",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--ws",
        "none",
    ]
    log_path = tmp_path / f"metrics-app-{workers}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=BACKEND_DIR, env=env, stdout=log, stderr=log, start_new_session=True)
        server = ServerProcess("metrics app", process, f"http://{HOST}:{port}")
        try:
            server.wait_ready(path="/metrics")
            yield server, log_path
        finally:
            server.stop(signum=signal.SIGTERM)


def temp_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir(exist_ok=True)
    return directory


def metrics_root(tmp_path: Path) -> Path:
    return temp_dir(tmp_path) / DIRECTORY_ROOT_NAME


def wait_for_workers(log_path: Path, count: int) -> set[int]:
    """The workers' pids, once each has finished its startup (a worker that is still starting takes no calls)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        text = log_path.read_text()
        pids = {int(pid) for pid in WORKER_STARTED.findall(text)}
        if len(pids) == count and text.count(STARTUP_COMPLETE) == count:
            return pids
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} workers did not start within {WAIT_SECONDS}s:\n{text[-3000:]}")
        time.sleep(POLL_SECONDS)


def fresh_connection() -> httpx.Client:
    # No keep-alive: each request opens a new connection, which any worker may accept.
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=10.0)


def scraped_calls(body: str) -> float:
    found = CALLS_SAMPLE.findall(body)
    assert len(found) == 1, body
    return float(found[0])


def process_files(directory: Path) -> dict[str, set[int]]:
    """The directory's metric files, as {kind: pids}: `counter_123.db` is kind "counter" of pid 123."""
    files: dict[str, set[int]] = {}
    for path in directory.glob("*.db"):
        kind, _, pid = path.stem.rpartition("_")
        files.setdefault(kind, set()).add(int(pid))
    return files


def test_every_scrape_reports_the_sum_over_two_workers(tmp_path: Path) -> None:
    with metrics_app(tmp_path, workers=WORKERS) as (server, log_path):
        workers = wait_for_workers(log_path, WORKERS)
        served: dict[int, int] = {}
        with fresh_connection() as client:
            for _ in range(CALLS):
                pid = client.post(server.url + "/call").raise_for_status().json()["pid"]
                served[pid] = served.get(pid, 0) + 1
            assert set(served) == workers, f"each worker must take some calls for the sum to mean anything: {served}"
            scrapes = [client.get(server.url + "/metrics").raise_for_status() for _ in range(SCRAPES)]

        # Each worker holds only its share, yet every scrape, whichever worker answered it, reports all of them.
        assert {int(scrape.headers[WORKER_PID_HEADER]) for scrape in scrapes} <= workers
        assert [scraped_calls(scrape.text) for scrape in scrapes] == [float(CALLS)] * SCRAPES
        shared = metrics_root(tmp_path) / str(server.process.pid)
        assert process_files(shared)["counter"] == workers
        assert process_files(shared)["gauge_livesum"] == workers

    # Each worker, at its shutdown, took its live gauge with it; counters stay until a later start sweeps them.
    assert "gauge_livesum" not in process_files(shared)
    assert process_files(shared)["counter"] == workers


def test_single_process_sweeps_dead_directories_and_removes_its_own_at_shutdown(tmp_path: Path) -> None:
    leftover = metrics_root(tmp_path) / str(NEVER_A_PID)
    leftover.mkdir(parents=True)
    (leftover / f"counter_{NEVER_A_PID}.db").write_bytes(b"")

    with metrics_app(tmp_path, workers=1) as (server, _):
        with fresh_connection() as client:
            for _ in range(3):
                assert client.post(server.url + "/call").raise_for_status().json()["pid"] == server.process.pid
            assert scraped_calls(client.get(server.url + "/metrics").raise_for_status().text) == 3
        own = metrics_root(tmp_path) / str(server.process.pid)
        assert process_files(own)["counter"] == {server.process.pid}
        assert not leftover.exists(), "the directory of a process that no longer exists is swept at startup"

    assert not own.exists()
    assert list(metrics_root(tmp_path).iterdir()) == []
