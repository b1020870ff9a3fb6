"""`make bench`: the bundled upstream direct vs through the service (1 and 2 workers, and the 1-worker service's
OpenAI-compatible route), side by side in one run.

Load comes from wrk (installed by `make bench` when missing). For every target, batch and stream (a 30-chunk
answer), at concurrency 1 and 32: rps, p50 and p99 latency (to the last byte), errors; plus time to first token
measured by a Python client at concurrency 1, and memory. Prints one table and writes bench/results/latest.json
(the previous run moves to previous.json, for `make bench-compare`).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    Stack,
    Target,
    environment_summary,
    openai_target,
    rss_mib,
    service_target,
    upstream_target,
)

CONCURRENCIES = (1, 32)
WRK_THREADS = {1: 1, 32: 2}
_LATENCY_LINE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}

# The maintainability issue's targets (public APIs only cost a little), checked against the numbers of this run.
TARGET_ADDED_BATCH_MS = 1.5
TARGET_ADDED_STREAM_MS = 3.0
TARGET_ADDED_TTFT_MS = 1.5
TARGET_BATCH_RPS = 1000
TARGET_STREAM_RPS = 400
TARGET_P99_OVER_P50 = 3.0
TARGET_IDLE_RSS_MIB = 100
DIRECT_HEADROOM = 5.0
SERVICE_ROW = "through the service"
OPENAI_ROW = "through the service, /v1/chat/completions"


def wrk_script(target: Target, *, stream: bool, words: int, directory: Path) -> Path:
    headers = {"Content-Type": "application/json", **target.headers}
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(target.request_body(stream=stream, words=words).decode())}",
    ]
    lines += [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items()]
    path = directory / f"{abs(hash((target.name, stream)))}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_wrk(output: str) -> dict[str, float]:
    latencies = {f"p{pct}": float(value) * _UNIT_MS[unit] for pct, value, unit in _LATENCY_LINE.findall(output)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if rps is None or total is None or "p50" not in latencies:
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(count) for count in socket_errors.groups())
    return {
        "rps": float(rps.group(1)),
        "p50_ms": round(latencies["p50"], 3),
        "p99_ms": round(latencies["p99"], 3),
        "requests": int(total.group(1)),
        "errors": errors,
    }


def run_wrk(target: Target, script: Path, *, connections: int, seconds: float) -> dict[str, float]:
    command = [
        "wrk",
        f"-t{WRK_THREADS[connections]}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        target.url + target.path,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(output)


def _http_request(target: Target, body: bytes) -> bytes:
    host = target.url.removeprefix("http://").split(":")[0]
    headers = "".join(f"{name}: {value}\r\n" for name, value in target.headers.items())
    return (
        f"POST {target.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def first_token_ms(target: Target, *, words: int, requests: int) -> float:
    """Median time from sending a stream request to the first content byte, one request at a time."""
    marker = b'"delta":{"content":"' if target.path.startswith("/v1/") else b"event: delta"
    host, port = target.url.removeprefix("http://").split(":")
    payload = _http_request(target, target.request_body(stream=True, words=words))
    samples = []
    for _ in range(requests):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            connection.sendall(payload)
            received = b""
            while marker not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{target.name}: stream ended before the first token")
                received += chunk
            samples.append((time.perf_counter() - started) * 1000)
            # Read the rest of the answer, so the next request starts on a quiet service.
            while connection.recv(65536):
                continue
    return round(statistics.median(samples), 3)


def measure(target: Target, *, seconds: float, words: int, ttft_requests: int, directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"target": target.name}
    if target.pid is not None:
        result["rss_idle_mib"] = rss_mib(target.pid)[0]
    for mode, stream in (("batch", False), ("stream", True)):
        script = wrk_script(target, stream=stream, words=words, directory=directory)
        run_wrk(target, script, connections=32, seconds=1)  # warm-up: connections, pools, caches
        for connections in CONCURRENCIES:
            result[f"{mode}_c{connections}"] = run_wrk(target, script, connections=connections, seconds=seconds)
            print(
                f"  {target.name:<32} {mode:<6} c{connections:<3} {result[f'{mode}_c{connections}']}",
                file=sys.stderr,
                flush=True,
            )
    result["ttft_ms"] = first_token_ms(target, words=words, requests=ttft_requests)
    if target.pid is not None:
        result["rss_mib"], result["rss_peak_mib"] = rss_mib(target.pid)
    return result


def added(row: dict[str, Any], direct: dict[str, Any], key: str) -> float:
    return round(float(row[key]["p50_ms"]) - float(direct[key]["p50_ms"]), 3)


def render_table(results: list[dict[str, Any]]) -> str:
    direct = results[0]
    header = (
        "| target | mode | c1 rps | c1 p50 ms | c1 p99 ms | +ms over direct (c1 p50) | c32 rps | c32 p50 ms "
        "| c32 p99 ms | errors | TTFT ms | +TTFT ms | RSS idle / peak MiB |"
    )
    lines = [header, "|" + "---|" * 13]
    for row in results:
        for mode in ("batch", "stream"):
            c1, c32 = row[f"{mode}_c1"], row[f"{mode}_c32"]
            is_direct = row is direct
            ttft = row["ttft_ms"] if mode == "stream" else None
            memory = f"{row['rss_idle_mib']} / {row['rss_peak_mib']}" if "rss_idle_mib" in row else ""
            added_ms = "" if is_direct else f"{added(row, direct, mode + '_c1'):+.2f}"
            ttft_text = "" if ttft is None else f"{ttft:.2f}"
            added_ttft = "" if ttft is None or is_direct else f"{ttft - direct['ttft_ms']:+.2f}"
            errors = c1["errors"] + c32["errors"]
            lines.append(
                f"| {row['target']} | {mode} | {c1['rps']:.0f} | {c1['p50_ms']:.2f} | {c1['p99_ms']:.2f} | "
                f"{added_ms} | {c32['rps']:.0f} | {c32['p50_ms']:.2f} | {c32['p99_ms']:.2f} | {errors} | "
                f"{ttft_text} | {added_ttft} | {memory} |"
            )
    return "\n".join(lines)


def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets for the service (1 worker), and the same targets for its OpenAI-compatible route."""
    direct = results[0]
    rows = {row["target"]: row for row in results}
    checks: list[dict[str, Any]] = []

    def check(name: str, measured: float, limit: float, *, at_most: bool) -> None:
        passed = measured <= limit if at_most else measured >= limit
        checks.append(
            {
                "check": name,
                "measured": round(measured, 3),
                "limit": limit,
                "rule": "<=" if at_most else ">=",
                "pass": passed,
            }
        )

    def route_checks(service: dict[str, Any], label: str) -> None:
        check(f"{label}batch added ms, c1 p50", added(service, direct, "batch_c1"), TARGET_ADDED_BATCH_MS, at_most=True)
        check(
            f"{label}stream (30 chunks) added ms, c1 p50",
            added(service, direct, "stream_c1"),
            TARGET_ADDED_STREAM_MS,
            at_most=True,
        )
        check(f"{label}batch rps, c32", service["batch_c32"]["rps"], TARGET_BATCH_RPS, at_most=False)
        check(f"{label}stream rps, c32", service["stream_c32"]["rps"], TARGET_STREAM_RPS, at_most=False)
        for mode in ("batch", "stream"):
            c32 = service[f"{mode}_c32"]
            check(f"{label}{mode} c32 p99 / p50", c32["p99_ms"] / c32["p50_ms"], TARGET_P99_OVER_P50, at_most=True)
        check(
            f"{label}added time to first token ms",
            service["ttft_ms"] - direct["ttft_ms"],
            TARGET_ADDED_TTFT_MS,
            at_most=True,
        )

    service = rows[SERVICE_ROW]
    route_checks(service, "")
    check("idle RSS MiB (1 worker)", service["rss_idle_mib"], TARGET_IDLE_RSS_MIB, at_most=True)
    measured_routes = [service, *([rows[OPENAI_ROW]] if OPENAI_ROW in rows else [])]
    check(
        "errors (all service runs)",
        sum(row[f"{m}_c{c}"]["errors"] for row in measured_routes for m in ("batch", "stream") for c in CONCURRENCIES),
        0,
        at_most=True,
    )
    for mode in ("batch", "stream"):
        check(
            f"direct/service rps, {mode} c32 (load generator headroom)",
            direct[f"{mode}_c32"]["rps"] / service[f"{mode}_c32"]["rps"],
            DIRECT_HEADROOM,
            at_most=False,
        )
    if OPENAI_ROW in rows:
        route_checks(rows[OPENAI_ROW], "/v1/chat/completions: ")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each wrk run")
    parser.add_argument("--words", type=int, default=30, help="answer length in chunks/words")
    parser.add_argument("--ttft-requests", type=int, default=200)
    parser.add_argument("--workers", default="1,2", help="service worker counts to measure")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="the backend/ directory of another checkout (e.g. a `git worktree` of an older commit): its service "
        "is measured in the same run, as a before/after row",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (`make bench` installs it: apt-get install wrk)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as scratch, Stack(delay_ms=0, log_dir=Path(scratch)) as stack:
        directory = Path(scratch)
        targets = [upstream_target(stack.start_upstream())]
        for workers in (int(count) for count in args.workers.split(",")):
            service = stack.start_service(workers=workers)
            name = SERVICE_ROW + ("" if workers == 1 else f", {workers} workers")
            targets.append(service_target(name, service))
            if workers == 1:
                targets.append(openai_target(OPENAI_ROW, service))
        if args.baseline is not None:
            baseline = stack.start_service(workers=1, backend_dir=args.baseline.resolve())
            targets.append(service_target(f"baseline ({args.baseline})", baseline))
        results = [
            measure(
                target, seconds=args.seconds, words=args.words, ttft_requests=args.ttft_requests, directory=directory
            )
            for target in targets
        ]

    checks = check_targets(results)
    print(render_table(results))
    print()
    for item in checks:
        print(
            f"{'PASS' if item['pass'] else 'MISS'}  {item['check']}: {item['measured']} "
            f"(target {item['rule']} {item['limit']})"
        )
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "words": args.words,
        "environment": environment_summary(),
        "results": results,
        "checks": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.exists():
        args.output.replace(args.output.with_name("previous.json"))
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
