"""The benchmark's own code, with tiny durations, so that it cannot rot. Nothing here asserts on speed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from bench import compare, instructions, run, soak

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (`make bench` installs it)")
def test_bench_runs_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latest = tmp_path / "latest.json"
    assert run.main(["--seconds", "1", "--ttft-requests", "3", "--workers", "1", "--output", str(latest)]) == 0
    report = json.loads(latest.read_text())
    assert [row["target"] for row in report["results"]] == [
        "direct to upstream",
        "through the service",
        "through the service, /v1/chat/completions",
    ]
    for row in report["results"]:
        for key in ("batch_c1", "batch_c32", "stream_c1", "stream_c32"):
            assert row[key]["requests"] > 0
            assert row[key]["errors"] == 0
        assert row["ttft_ms"] > 0
    assert {check["check"] for check in report["checks"]} >= {
        "batch rps, c32",
        "idle RSS MiB (1 worker)",
        "/v1/chat/completions: batch rps, c32",
        "/v1/chat/completions: added time to first token ms",
    }
    table = capsys.readouterr().out
    assert "| through the service | stream |" in table
    assert "| through the service, /v1/chat/completions | stream |" in table

    shutil.copy(latest, tmp_path / "previous.json")
    assert compare.main(["--previous", str(tmp_path / "previous.json"), "--latest", str(latest)]) == 0
    assert "| through the service | batch_c32 | rps |" in capsys.readouterr().out


def test_instruction_counts_run_under_callgrind_and_print_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("valgrind") is None:
        message = "valgrind is not installed (`make system-deps` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert instructions.main(["--calls", "2", "--warm-up", "3"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| this checkout |"))
    batch, stream, batch_ratio, stream_ratio = (cell.strip() for cell in row.strip("|").split("|")[1:])
    # A call of the service runs millions of instructions; a stream (30 chunks) more than a batch call.
    assert 0.5 < float(batch) < float(stream) < 100
    assert batch_ratio == stream_ratio == "+0.0%"


def test_parse_wrk_reads_rates_latencies_and_errors() -> None:
    output = """Running 1s test @ http://127.0.0.1:1/x
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.01s
  1000 requests in 1.00s, 1.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:   1000.50
"""
    assert run.parse_wrk(output) == {"rps": 1000.5, "p50_ms": 0.812, "p99_ms": 2010.0, "requests": 1000, "errors": 6}


def test_soak_runs_streams_and_refuses_over_the_limit(tmp_path: Path) -> None:
    output = tmp_path / "soak.json"
    assert (
        soak.main(["--streams", "20", "--words", "3", "--delay-ms", "600", "--extra", "1", "--output", str(output)])
        == 0
    )
    report = json.loads(output.read_text())
    assert report["completed_correctly"] == 20
    assert report["over_limit"][0]["code"] == "upstream_unavailable"
