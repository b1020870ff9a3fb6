"""`make bench-compare`: the latest `make bench` run next to the previous one, metric by metric."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

METRICS = (("rps", "higher"), ("p50_ms", "lower"), ("p99_ms", "lower"))


def _percent(new: float, old: float) -> str:
    return "n/a" if old == 0 else f"{(new - old) / old * 100:+.1f}%"


def compare(previous: dict[str, Any], latest: dict[str, Any]) -> str:
    lines = ["| target | run | metric | previous | latest | change | better is |", "|---|---|---|---|---|---|---|"]
    before = {row["target"]: row for row in previous["results"]}
    for row in latest["results"]:
        old = before.get(row["target"])
        if old is None:
            continue
        for run in ("batch_c1", "batch_c32", "stream_c1", "stream_c32"):
            for metric, better in METRICS:
                new_value, old_value = row[run][metric], old[run][metric]
                lines.append(
                    f"| {row['target']} | {run} | {metric} | {old_value} | {new_value} "
                    f"| {_percent(new_value, old_value)} | {better} |"
                )
        lines.append(
            f"| {row['target']} | stream | ttft_ms | {old['ttft_ms']} | {row['ttft_ms']} "
            f"| {_percent(row['ttft_ms'], old['ttft_ms'])} | lower |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--previous", type=Path, default=RESULTS_DIR / "previous.json")
    parser.add_argument("--latest", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    missing = [path for path in (args.previous, args.latest) if not path.exists()]
    if missing:
        print(f"bench-compare: missing {', '.join(map(str, missing))}: run `make bench` twice", file=sys.stderr)
        return 2
    previous, latest = json.loads(args.previous.read_text()), json.loads(args.latest.read_text())
    print(f"previous: {previous['when']}   latest: {latest['when']}")
    print(compare(previous, latest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
