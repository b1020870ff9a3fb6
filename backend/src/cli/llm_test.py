"""`llm_test`: a smoke checker for a running LLM chat service (batch, live stream, or a fixed `--check` battery).

    cd backend && python -m src.cli.llm_test "Hello" --stream --url http://127.0.0.1:8000

Exit codes: 0 success, 1 the service answered an error (or a check failed), 2 bad arguments, 3 unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from httpx_sse import EventSource

EXIT_OK = 0
EXIT_SERVICE_ERROR = 1
EXIT_UNREACHABLE = 3
DEFAULT_URL = "http://127.0.0.1:8000"
CHAT_PATH = "/api/v1/llm/chat"


class CheckFailedError(Exception):
    """A `--check` expectation that did not hold."""


def _require(condition: bool, failure: str) -> None:
    if not condition:
        raise CheckFailedError(failure)


class ServiceAnsweredError(Exception):
    def __init__(self, status: int, code: str, message: str, request_id: str | None) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass
class ChatResult:
    content: str = ""
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    request_id: str | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    deltas: int = 0
    raw: list[str] = field(default_factory=list)


def _error_from(response: httpx.Response) -> ServiceAnsweredError:
    try:
        error = response.json()["error"]
        return ServiceAnsweredError(response.status_code, error["code"], error["message"], error.get("request_id"))
    except (ValueError, KeyError, TypeError):
        return ServiceAnsweredError(response.status_code, f"http_{response.status_code}", response.text[:200], None)


class ChatClient:
    def __init__(self, url: str, *, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def batch(self, payload: dict[str, Any]) -> ChatResult:
        started = time.perf_counter()
        response = self._http.post(CHAT_PATH, json={**payload, "stream": False})
        if response.status_code != 200:
            raise _error_from(response)
        body = response.json()
        return ChatResult(
            content=body["message"]["content"],
            model=body["model"],
            finish_reason=body["finish_reason"],
            usage=body.get("usage"),
            request_id=body.get("request_id"),
            total_ms=(time.perf_counter() - started) * 1000,
            raw=[response.text],
        )

    def stream(self, payload: dict[str, Any], *, on_delta: Any = None) -> ChatResult:
        started = time.perf_counter()
        result = ChatResult()
        with self._http.stream("POST", CHAT_PATH, json={**payload, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                raise _error_from(response)
            for sse in EventSource(response).iter_sse():
                event = sse.event
                result.raw.append(f"event: {event}\ndata: {sse.data}\n")
                message = json.loads(sse.data)
                if event == "delta":
                    if result.ttft_ms is None:
                        result.ttft_ms = (time.perf_counter() - started) * 1000
                    result.deltas += 1
                    result.content += message["content"]
                    if on_delta is not None:
                        on_delta(message["content"])
                elif event == "done":
                    result.model, result.finish_reason = message["model"], message["finish_reason"]
                    result.usage, result.request_id = message.get("usage"), message.get("request_id")
                elif event == "error":
                    raise ServiceAnsweredError(200, message["code"], message["message"], message.get("request_id"))
        result.total_ms = (time.perf_counter() - started) * 1000
        if result.finish_reason is None and result.model is None:
            raise ServiceAnsweredError(200, "incomplete_stream", "the stream ended without a done event", None)
        return result


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    payload: dict[str, Any] = {"messages": messages}
    if args.model:
        payload["model"] = args.model
    if args.temperature is not None:
        payload["temperature"] = args.temperature
    if args.max_tokens is not None:
        payload["max_tokens"] = args.max_tokens
    return payload


def _print_summary(result: ChatResult, out: TextIO) -> None:
    usage = result.usage or {}
    print(f"model:         {result.model}", file=out)
    print(f"finish_reason: {result.finish_reason}", file=out)
    print(
        f"usage:         prompt={usage.get('prompt_tokens')} completion={usage.get('completion_tokens')} "
        f"total={usage.get('total_tokens')}",
        file=out,
    )
    if result.ttft_ms is not None:
        print(f"first token:   {result.ttft_ms:.1f} ms", file=out)
    print(f"total time:    {result.total_ms:.1f} ms", file=out)
    print(f"request_id:    {result.request_id}", file=out)


def run_chat(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    payload = _payload(args)
    if args.stream:

        def live(text: str) -> None:
            out.write(text)
            out.flush()

        result = client.stream(payload, on_delta=None if args.json else live)
        if args.json:
            out.write("\n".join(result.raw))
            return EXIT_OK
        out.write("\n\n")
    else:
        result = client.batch(payload)
        if args.json:
            print(result.raw[0], file=out)
            return EXIT_OK
        print(result.content, end="\n\n", file=out)
    _print_summary(result, out)
    return EXIT_OK


def run_checks(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    payload = _payload(args)
    failures = 0

    def check(name: str, test: Any) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            detail = test()
            print(f"PASS  {name:<16} {detail} ({(time.perf_counter() - started) * 1000:.0f} ms)", file=out)
        except httpx.TransportError:
            raise
        except (ServiceAnsweredError, CheckFailedError, KeyError, ValueError) as exc:
            failures += 1
            print(f"FAIL  {name:<16} {exc}", file=out)

    def batch() -> str:
        result = client.batch(payload)
        _require(bool(result.content), "empty answer")
        return f"{len(result.content)} chars, finish_reason={result.finish_reason}"

    def stream() -> str:
        result = client.stream(payload)
        _require(result.deltas > 0, "no delta events")
        _require(result.usage is not None, "done event without usage")
        return f"{result.deltas} deltas, first token {result.ttft_ms:.0f} ms"

    def validation() -> str:
        try:
            client.batch({"messages": []})
        except ServiceAnsweredError as error:
            _require(error.status == 422, f"got HTTP {error.status}")
            _require(error.code == "validation_error", f"got code {error.code}")
            return "422 validation_error"
        raise CheckFailedError("an empty message list was accepted")

    check("batch", batch)
    check("stream", stream)
    check("validation_error", validation)
    print(f"{3 - failures} passed, {failures} failed", file=out)
    return EXIT_OK if failures == 0 else EXIT_SERVICE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm_test", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("prompt", nargs="?", default="Say hello in five words.")
    parser.add_argument("--stream", action="store_true", help="stream the answer and print tokens as they arrive")
    parser.add_argument("--model")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--system", help="a system message sent before the prompt")
    parser.add_argument("--url", default=os.environ.get("LLM_TEST_URL", DEFAULT_URL))
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLM_TEST_API_KEY"),
        help="bearer key when the service has SERVICE_API_KEYS (env LLM_TEST_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print the raw response")
    parser.add_argument("--check", action="store_true", help="run the batch/stream/validation battery")
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = build_parser().parse_args(argv)
    client = ChatClient(args.url, api_key=args.api_key, timeout=args.timeout)
    try:
        return run_checks(client, args, out) if args.check else run_chat(client, args, out)
    except ServiceAnsweredError as error:
        status = f"HTTP {error.status}" if error.status != 200 else "in stream"
        print(f"\nerror ({status}): {error.code}: {error.message} [request_id={error.request_id}]", file=err)
        return EXIT_SERVICE_ERROR
    except httpx.TransportError as error:
        print(f"error: cannot reach the service at {args.url}: {error.__class__.__name__}: {error}", file=err)
        return EXIT_UNREACHABLE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
