"""A developer's own `.env` and shell cannot break the test suite (or the demo) of a copy of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from src.core.config import REPO_ROOT

pytestmark = pytest.mark.e2e

# What a developer following the README's production advice, and exporting a real upstream, would have.
DEVELOPER_DOTENV = "SERVICE_API_KEYS=x\nLOG_FORMAT=console\nLLM_ALLOWED_MODELS=y\nLLM_TIMEOUT_SECONDS=0.001\n"
DEVELOPER_SHELL = {
    "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    "OPENAI_API_KEY": "sk-developers-real-key-do-not-send",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "LOG_LEVEL": "LOUD",
}
# A slice of every kind of test: in-process, real processes over sockets, the CLI, the demo launcher.
SUITE_SLICE = [
    "backend/tests/integration/test_llm.py::test_batch_answer_has_contract_shape",
    "backend/tests/integration/test_llm.py::test_stream_sends_delta_events_then_done",
    "backend/tests/unit/test_openapi_contract.py",
    "backend/tests/e2e/test_stack.py::test_batch_answer_over_sockets",
    "backend/tests/e2e/test_stack.py::test_stream_events_arrive_incrementally",
    "backend/tests/e2e/test_stack.py::test_cli_check_battery_passes",
    "backend/tests/e2e/test_demo.py",
]
RUN_TIMEOUT_SECONDS = 300


def _copy_repository(destination: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = REPO_ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def test_dotenv_and_shell_settings_leave_the_suite_green(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    _copy_repository(copy)
    (copy / ".env").write_text(DEVELOPER_DOTENV)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov", *SUITE_SLICE],
        cwd=copy,
        env={**os.environ, **DEVELOPER_SHELL},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    assert DEVELOPER_SHELL["OPENAI_API_KEY"] not in result.stdout
