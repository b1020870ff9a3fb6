"""`make demo`'s launcher: both servers start, the printed curl commands work, Ctrl-C stops both."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from src.devtools.servers import BACKEND_DIR, free_port

pytestmark = pytest.mark.e2e


def test_demo_serves_batch_and_stream_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "src.devtools.demo", "--port", str(port), "--ledger", str(tmp_path / "ledger.db")],
        cwd=BACKEND_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = ""
        deadline = time.monotonic() + 30
        assert demo.stdout is not None
        while "Press Ctrl-C" not in output and time.monotonic() < deadline:
            output += demo.stdout.readline()
        assert "OFFLINE DEMO" in output
        url = f"http://127.0.0.1:{port}"
        assert f"curl -N {url}/api/v1/llm/chat" in output
        # The demo turns the playground on, and its banner says where it is.
        assert f"Playground (chat in your browser): {url}/playground" in output
        playground = httpx.get(f"{url}/playground", timeout=10)
        assert playground.status_code == 200
        assert "<title>LLM chat service: playground</title>" in playground.text

        curl_body = {"messages": [{"role": "user", "content": "Hello there"}]}
        batch = httpx.post(f"{url}/api/v1/llm/chat", json=curl_body, timeout=10)
        stream = httpx.post(f"{url}/api/v1/llm/chat", json={**curl_body, "stream": True}, timeout=10)
        assert batch.status_code == 200
        assert "Hello there" in batch.json()["message"]["content"]
        assert "event: done" in stream.text
        # The banner's OpenAI-compatible curl line works too.
        assert f"curl -s {url}/v1/chat/completions" in output
        openai_style = httpx.post(f"{url}/v1/chat/completions", json={**curl_body, "model": "gpt-5-mini"}, timeout=10)
        assert openai_style.json()["object"] == "chat.completion"
        # The banner's usage line: the three calls are in the ledger (written within 2 s of their end).
        assert f"curl -s '{url}/api/v1/llm/usage?group_by=model'" in output
        deadline = time.monotonic() + 5
        while True:
            rows = httpx.get(f"{url}/api/v1/llm/usage", params={"group_by": "model"}, timeout=5).json()["rows"]
            if sum(row["calls"] for row in rows) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert rows == [
            {"model": "gpt-5-mini", "calls": 3, "errors": 0, "cancelled": 0, **_tokens(rows[0])},
        ]
        assert rows[0]["total_tokens"] > 0
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0
    assert "stopping" in rest
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    lines = [json.loads(line) for line in (output + rest).splitlines() if line.startswith("{")]
    demo_line = next(line for line in lines if line["event"] == "offline_demo_upstream")
    assert demo_line["upstream"].startswith("http://127.0.0.1:")
    # Ctrl-C ran the app's own shutdown, and nothing crashed on the way out.
    assert any(line["event"] == "service_stopped" for line in lines)
    assert "Traceback" not in output + rest


def _tokens(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
