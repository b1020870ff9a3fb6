"""Shared plumbing for real server processes: free ports, readiness with a deadline, clean stops, missing binaries."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
# How long one readiness probe waits for a connect, and between probes: short, so readiness is seen promptly.
PROBE_TIMEOUT_S = 0.2
POLL_INTERVAL_S = 0.02
# A port picked free can be taken by someone else before the server binds it: try a few, not forever.
START_ATTEMPTS = 3
PROC_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
PROC_TCP_LOCAL, PROC_TCP_STATE, PROC_TCP_INODE = 1, 3, 9
TCP_LISTEN = "0A"
LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """A real server did not start; the message carries the tail of its logs."""


class ServerExitedError(ServerStartError):
    """The server's process exited before it listened."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def require_binary(path: str, package: str) -> str:
    """`path` if it is an executable; otherwise skip the test, or fail it under CI (where nothing may skip)."""
    if os.access(path, os.X_OK):
        return path
    message = f"{path} is missing: install Debian package {package} (make system-deps)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def listening_ports(pid: int) -> set[int] | None:
    """TCP ports process `pid` itself listens on (Linux /proc), or None where that cannot be read."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
        tables = [Path(name).read_text() for name in PROC_TCP_TABLES]
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # an fd closed while we look
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in tables:
        for row in table.splitlines()[1:]:
            # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
            fields = row.split()
            if (
                len(fields) > PROC_TCP_INODE
                and fields[PROC_TCP_STATE] == TCP_LISTEN
                and fields[PROC_TCP_INODE] in inodes
            ):
                ports.add(int(fields[PROC_TCP_LOCAL].rsplit(":", 1)[1], 16))
    return ports


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout_s: float = READY_TIMEOUT_S,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Return once `host:port` accepts a TCP connection; raise `TimeoutError` after `timeout_s`.

    With `process`, the listener must be that process's own (on Linux), so a stranger that took the port does not
    pass for it; and `ServerExitedError` is raised as soon as the process exits: it will never become ready.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ServerExitedError(f"{process.args!r} exited with {process.returncode} before {port} opened")
        owned = True
        if process is not None:
            ports = listening_ports(process.pid)
            owned = ports is None or port in ports
        if owned and port_accepts(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout_s:.1f}s")
        if process is not None:
            # Doubles as the pause between probes, and notices an exit at once.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=POLL_INTERVAL_S)
        else:
            time.sleep(POLL_INTERVAL_S)


def stop_process(
    process: subprocess.Popen[bytes],
    *,
    graceful: signal.Signals = signal.SIGTERM,
    timeout_s: float = STOP_TIMEOUT_S,
) -> int:
    """Send `graceful`, then SIGKILL if the process has not exited within `timeout_s`; return its exit code."""
    if process.poll() is None:
        process.send_signal(graceful)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)
    return process.returncode


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)


def start_on_free_port(
    name: str,
    launch: Callable[[int], subprocess.Popen[bytes]],
    *,
    logs: Sequence[Path],
    host: str = LOOPBACK,
    graceful: signal.Signals = signal.SIGTERM,
    timeout_s: float = READY_TIMEOUT_S,
) -> tuple[subprocess.Popen[bytes], int]:
    """Pick a free port, `launch(port)`, wait until the process listens there; return the process and the port.

    A server that exits before it listens most likely lost its port to someone else in between: it is tried again
    on another port, a few times. Raises `ServerStartError` carrying the tails of `logs`.
    """
    failure = ""
    for _ in range(START_ATTEMPTS):
        port = free_port(host)
        process = launch(port)
        try:
            wait_for_port(host, port, timeout_s=timeout_s, process=process)
        except ServerExitedError as exc:
            failure = f"{name} did not start: {exc}\n" + "\n".join(log_tail(path) for path in logs)
            continue
        except TimeoutError as exc:
            stop_process(process, graceful=graceful)
            failure = f"{name} did not start: {exc}\n" + "\n".join(log_tail(path) for path in logs)
            raise ServerStartError(failure) from exc
        return process, port
    raise ServerStartError(failure)
