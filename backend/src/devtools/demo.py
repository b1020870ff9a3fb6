"""`make demo`: the service wired to the bundled OFFLINE upstream, with the commands to try it. Ctrl-C stops both."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from src.core.config import DEFAULT_DATABASE_URL
from src.devtools.servers import start_mock_upstream, start_service

DEFAULT_LEDGER = Path(DEFAULT_DATABASE_URL.removeprefix("sqlite:///"))
BANNER = """
================================================================================
 LLM chat service: OFFLINE DEMO (bundled upstream at {upstream}, not OpenAI)
 Service: {url}    API docs: {url}/docs
 Playground (chat in your browser): {url}/playground
--------------------------------------------------------------------------------
 Batch:
   curl -s {url}/api/v1/llm/chat -H 'Content-Type: application/json' \\
     -d '{{"messages":[{{"role":"user","content":"Hello there"}}]}}'
 Stream (tokens as they arrive):
   curl -N {url}/api/v1/llm/chat -H 'Content-Type: application/json' \\
     -d '{{"messages":[{{"role":"user","content":"Hello there"}}],"stream":true}}'
 Smoke check:
   (cd backend && ../.venv/bin/python -m src.cli.llm_test --check --url {url})
 Usage so far, from the ledger ({ledger}):
   curl -s '{url}/api/v1/llm/usage?group_by=model'
 Metrics:
   curl -s {url}/metrics | grep '^llm_'
 OpenAI's API, for any OpenAI SDK or tool (base URL {url}/v1, any API key):
   curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
     -d '{{"model":"gpt-5-mini","messages":[{{"role":"user","content":"Hello there"}}]}}'
   OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=demo .venv/bin/python -c \\
     "import openai; print(openai.OpenAI().models.list().data[0].id)"
 Tools: offer "tools" and the model calls the first ("mock-tools-parallel": all of them);
   answer with a "tool" message and it answers from the tool's result.
 Faults to try: "model": "mock-429", "mock-500", "mock-hang", "mock-stream-break", ...
 Press Ctrl-C to stop.
================================================================================
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--ledger", type=Path, default=DEFAULT_LEDGER, help="the SQLite usage ledger (default %(default)s)"
    )
    args = parser.parse_args(argv)

    upstream = start_mock_upstream()
    try:
        service = start_service(
            upstream_url=upstream.url,
            host=args.host,
            port=args.port,
            env={
                "LLM_DEMO_UPSTREAM": "true",
                "DATABASE_URL": f"sqlite:///{args.ledger.resolve()}",
                "PLAYGROUND_ENABLED": "true",
            },
        )
    except RuntimeError as error:
        upstream.stop()
        print(f"demo: {error} (is port {args.port} in use? try `make demo PORT=9000`)", file=sys.stderr)
        return 1
    shown_host = "127.0.0.1" if args.host in {"0.0.0.0", "::"} else args.host
    url = f"http://{shown_host}:{args.port}"
    print(BANNER.format(upstream=upstream.url, url=url, ledger=args.ledger), flush=True)
    try:
        # Ctrl-C (or SIGTERM, see below) is how the demo is meant to end: the finally stops both servers.
        with contextlib.suppress(KeyboardInterrupt):
            while service.process.poll() is None and upstream.process.poll() is None:
                time.sleep(0.5)
            print("demo: a server exited on its own; stopping", file=sys.stderr)
    finally:
        print("\ndemo: stopping the service and the bundled upstream", flush=True)
        service.stop()
        upstream.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Explicit, because a shell starting us in the background would have us ignore SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
