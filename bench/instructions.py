"""`make bench-instructions`: CPU instructions per call of the one-worker service, counted by valgrind's callgrind.

wrk's requests per second follow the machine: on a shared 2-core machine the same build measures twice as fast
one hour as the next. Instructions per call do not: callgrind counts them, not seconds, so the count repeats
whatever else the machine is doing (to within about 0.5%). This is the measure for comparing builds, and for what
a feature costs; `make bench` stays the measure of speed on the machine at hand.

Each service starts under callgrind with instrumentation off (so start-up and warm-up run at near-native speed),
takes warm-up calls, then counts `--calls` sequential calls of each kind (batch, and a 30-chunk stream) through one
keep-alive connection, with everything on as in `make bench` (a named limited key, the SQLite ledger, metrics,
JSON logs). What the count covers: every thread of the service process (the event loop, the ledger's thread,
SQLite), not the kernel.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Stack, Target, service_target

WARM_UP_CALLS = 100
SETTLE_CALLS = 20
KINDS = {"batch": False, "stream": True}
STREAM_WORDS = 30
BATCH_WORDS = 20
# Python under callgrind starts 20-50x slower than natively.
READY_TIMEOUT_SECONDS = 300.0


def _calls(target: Target, count: int, *, stream: bool) -> None:
    """`count` calls one after another on one keep-alive connection; every answer must be a 200."""
    host, port = target.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = target.request_body(stream=stream, words=STREAM_WORDS if stream else BATCH_WORDS)
    headers = {"Content-Type": "application/json", **target.headers}
    try:
        for _ in range(count):
            connection.request("POST", target.path, body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{target.url}{target.path} answered {response.status}")
    finally:
        connection.close()


def _callgrind(pid: int, *options: str) -> None:
    subprocess.run(["callgrind_control", *options, str(pid)], check=True, capture_output=True)


def _total_instructions(out_prefix: Path) -> int:
    """The instruction count of the latest dump (callgrind writes `summary:` or `totals:` in each)."""
    dumps = sorted(out_prefix.parent.glob(f"{out_prefix.name}*"), key=lambda path: path.stat().st_mtime)
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {dumps[-1]}")


def measure(
    stack: Stack, backend_dir: Path | None, *, calls: int, warm_up: int, out_prefix: Path, label: str
) -> dict[str, Any]:
    """Start the service of `backend_dir` (this checkout's when None) under callgrind and count its calls; the
    counts are written to files named `out_prefix`.<pid>[.<dump>]."""
    launcher = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_prefix}.%p",
        "-q",
    ]
    service = stack.start_service(
        workers=1, backend_dir=backend_dir, launcher=launcher, ready_timeout=READY_TIMEOUT_SECONDS
    )
    pid = service.process.pid
    target = service_target(label, service)
    row: dict[str, Any] = {"target": label}
    for kind, stream in KINDS.items():
        _calls(target, warm_up, stream=stream)
        _callgrind(pid, "--instr=on")
        _calls(target, SETTLE_CALLS, stream=stream)
        _callgrind(pid, "--zero")
        _calls(target, calls, stream=stream)
        _callgrind(pid, "--dump")
        _callgrind(pid, "--instr=off")
        row[f"{kind}_minstr"] = round(_total_instructions(out_prefix) / calls / 1e6, 3)
    service.stop()
    return row


def render(rows: list[dict[str, Any]]) -> str:
    """One row per target; the ratios compare each with this checkout (the first row)."""
    this = rows[0]
    lines = [
        "| target | batch, M instructions / call | stream (30 chunks), M instructions / call | batch vs this | "
        "stream vs this |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        counts = [f"{row[f'{kind}_minstr']:.3f}" for kind in KINDS]
        ratios = [f"{row[f'{kind}_minstr'] / this[f'{kind}_minstr'] - 1:+.1%}" for kind in KINDS]
        lines.append(f"| {row['target']} | {' | '.join(counts)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="calls counted per kind")
    parser.add_argument("--warm-up", type=int, default=WARM_UP_CALLS, help="calls before counting, per kind")
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="the backend/ directory of another checkout, counted in the same run (may be given more than once)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("bench-instructions: valgrind is not installed (`make system-deps` installs it)", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch, Stack(delay_ms=0, log_dir=Path(scratch)) as stack:
        stack.start_upstream()
        targets: list[tuple[str, Path | None]] = [("this checkout", None)]
        targets += [(f"baseline ({baseline})", baseline.resolve()) for baseline in args.baseline]
        rows = [
            measure(
                stack,
                backend_dir,
                calls=args.calls,
                warm_up=args.warm_up,
                out_prefix=Path(scratch) / f"callgrind-{index}.out",
                label=label,
            )
            for index, (label, backend_dir) in enumerate(targets)
        ]
    print(render(rows))
    print(f"\n{args.calls} calls of each kind per target, in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
