"""`make soak`: 1,000 concurrent streams held open against a slow upstream (one chunk a second).

Reports how many completed correctly (every word, in order, then `done`), errors, and the service's peak RSS;
then, with every upstream connection taken (LLM_MAX_CONNECTIONS = the number of streams), checks that extra
callers get a quick 503 `upstream_unavailable` instead of hanging. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CHAT_PATH, FILLER_WORDS, RESULTS_DIR, SERVICE_KEY, Stack, rss_mib, service_body

TARGET_PEAK_RSS_MIB = 250
SAMPLE_SECONDS = 0.25


@dataclass
class StreamOutcome:
    deltas: list[str] = field(default_factory=list)
    done: bool = False
    error: str | None = None
    first_delta: asyncio.Event = field(default_factory=asyncio.Event)


def _request(body: bytes, host: str) -> bytes:
    return (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {SERVICE_KEY}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def one_stream(host: str, port: int, body: bytes, outcome: StreamOutcome, give_up_after: float) -> None:
    try:
        async with asyncio.timeout(give_up_after):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_request(body, host))
            await writer.drain()
            buffer = b""
            while chunk := await reader.read(65536):
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if b"event: delta" in event:
                        outcome.deltas.append(json.loads(event.split(b"data: ", 1)[1])["content"])
                        outcome.first_delta.set()
                    elif b"event: done" in event:
                        outcome.done = True
                    elif b"event: error" in event:
                        outcome.error = json.loads(event.split(b"data: ", 1)[1])["code"]
            writer.close()
            if not outcome.done and outcome.error is None:
                outcome.error = "incomplete"
    except (OSError, TimeoutError) as exc:
        outcome.error = type(exc).__name__
    finally:
        outcome.first_delta.set()


async def over_limit_request(host: str, port: int) -> tuple[int, float, str]:
    body = json.dumps(service_body(stream=False, words=1)).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_request(body, host))
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    code = json.loads(payload)["error"]["code"] if status != 200 else "ok"
    return status, round(time.perf_counter() - started, 3), code


async def soak(url: str, pid: int, *, streams: int, words: int, delay_ms: float, extra: int) -> dict[str, Any]:
    host, port_text = url.removeprefix("http://").split(":")
    port = int(port_text)
    body = json.dumps(service_body(stream=True, words=words)).encode()
    outcomes = [StreamOutcome() for _ in range(streams)]
    expected = [
        (word if index == 0 else f" {word}")
        for index, word in ((i, FILLER_WORDS[i % len(FILLER_WORDS)]) for i in range(words))
    ]
    peak = 0.0
    sampling = True

    async def sample_rss() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_mib(pid)[0])
            await asyncio.sleep(SAMPLE_SECONDS)

    idle_rss = rss_mib(pid)[0]
    sampler = asyncio.create_task(sample_rss())
    started = time.perf_counter()
    timeout = words * delay_ms / 1000 + 60
    tasks = [asyncio.create_task(one_stream(host, port, body, outcome, timeout)) for outcome in outcomes]
    await asyncio.gather(*(outcome.first_delta.wait() for outcome in outcomes))
    all_open = round(time.perf_counter() - started, 2)
    over_limit = [await over_limit_request(host, port) for _ in range(extra)]
    await asyncio.gather(*tasks)
    duration = round(time.perf_counter() - started, 2)
    sampling = False
    await sampler
    correct = sum(1 for outcome in outcomes if outcome.done and outcome.deltas == expected)
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.error is not None:
            errors[outcome.error] = errors.get(outcome.error, 0) + 1
    return {
        "streams": streams,
        "words": words,
        "delay_ms": delay_ms,
        "completed_correctly": correct,
        "errors": errors,
        "all_streaming_after_s": all_open,
        "duration_s": duration,
        "rss_idle_mib": idle_rss,
        "rss_peak_mib": round(peak, 1),
        "over_limit": [{"status": s, "seconds": t, "code": c} for s, t, c in over_limit],
    }


def render(report: dict[str, Any]) -> str:
    over = report["over_limit"]
    over_text = ", ".join(sorted({f"{item['status']} {item['code']}" for item in over})) or "-"
    worst = max((item["seconds"] for item in over), default=0.0)
    return "\n".join(
        [
            "| streams | completed correctly | errors | all streaming after | duration | RSS idle | RSS peak "
            "| extra callers at the limit | their slowest answer |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {report['streams']} | {report['completed_correctly']} | {sum(report['errors'].values())} "
            f"| {report['all_streaming_after_s']} s | {report['duration_s']} s | {report['rss_idle_mib']} MiB "
            f"| {report['rss_peak_mib']} MiB | {over_text} | {worst} s |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--words", type=int, default=10, help="chunks per answer")
    parser.add_argument("--delay-ms", type=float, default=1000.0, help="upstream pause before each chunk")
    parser.add_argument("--extra", type=int, default=10, help="callers sent while every connection is taken")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args(argv)
    # Each stream holds a client socket and an upstream socket in the service: raise the descriptor limit that
    # this process and the servers it starts inherit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.streams + 256)), hard))

    with tempfile.TemporaryDirectory() as scratch, Stack(delay_ms=args.delay_ms, log_dir=Path(scratch)) as stack:
        stack.start_upstream()
        service = stack.start_service(
            workers=1, env={"LLM_MAX_CONNECTIONS": str(args.streams), "LLM_POOL_TIMEOUT_SECONDS": "0.5"}
        )
        report = asyncio.run(
            soak(
                service.url,
                service.process.pid,
                streams=args.streams,
                words=args.words,
                delay_ms=args.delay_ms,
                extra=args.extra,
            )
        )
    report["checks"] = {
        "all_completed": report["completed_correctly"] == report["streams"],
        "peak_rss_within_target": report["rss_peak_mib"] <= TARGET_PEAK_RSS_MIB,
        "over_limit_quick_503": all(
            item["status"] == 503 and item["code"] == "upstream_unavailable" and item["seconds"] < 2
            for item in report["over_limit"]
        ),
    }
    print(render(report))
    for name, passed in report["checks"].items():
        print(f"{'PASS' if passed else 'MISS'}  {name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
