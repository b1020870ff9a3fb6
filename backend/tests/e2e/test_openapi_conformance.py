"""schemathesis, with its default checks, against the running service's own /openapi.json: it finds nothing.

The document must say exactly what the service accepts and answers: auth only when keys are configured, JSON
numbers and integers as JSON Schema means them, every status the route can answer, the stream's events. The
allowlist makes `model` an enum, so generated requests name models the bundled upstream serves with any
parameter (gpt-5 models reject non-default temperatures upstream, a rule no schema of ours can carry).

`POST /v1/chat/completions` is left out: its body is OpenAI's, relayed as sent, and the service checks only what it
reads; a schema-valid request of random messages is the upstream's to reject (a 400 schemathesis would call a
rejected valid request). The route's own checks and mapping are tested in tests/integration/test_openai_compat.py
and, with the official SDKs, in tests/e2e/test_openai_sdks.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from src.devtools.servers import ServerProcess, start_service

pytestmark = pytest.mark.e2e

SERVICE_KEY = "svc-schemathesis-key"
ADMIN_KEY = "svc-schemathesis-admin"
KEYED = {"SERVICE_API_KEYS": SERVICE_KEY, "ADMIN_API_KEYS": ADMIN_KEY}
# (settings, schemathesis arguments): an open service; with keys, the callers' routes with a chat key and the
# operators' routes with an admin key (one bearer per run).
PASSTHROUGH = ["--exclude-path", "/v1/chat/completions"]
CASES = {
    "open": ({}, PASSTHROUGH),
    "chat_key": (
        KEYED,
        ["--header", f"Authorization: Bearer {SERVICE_KEY}", "--exclude-tag", "operators", *PASSTHROUGH],
    ),
    "admin_key": (KEYED, ["--header", f"Authorization: Bearer {ADMIN_KEY}", "--include-tag", "operators"]),
}
# Fixed, so a finding reproduces; enough examples to reach every parameter and both response kinds.
SEED = "20261125"
MAX_EXAMPLES = "150"
RUN_TIMEOUT_SECONDS = 300
BASE_ENV = {
    "LLM_ALLOWED_MODELS": "gpt-4.1-mini,gpt-4o-mini",
    "LLM_DEFAULT_MODEL": "gpt-4.1-mini",
    "LLM_MAX_RETRIES": "0",
    "LLM_TIMEOUT_SECONDS": "5",
}


# Every warning but `missing_test_data`: a stream id is 128 random bits that only a resumable stream's start
# hands out, so a generated id is rightly 404 `stream_not_found` (the resumable-stream tests cover the rest).
WARNINGS = ",".join(
    (
        "missing_auth",
        "base_url_mismatch",
        "validation_mismatch",
        "missing_deserializer",
        "unused_openapi_auth",
        "unsupported_regex",
        "method_not_allowed",
        "unmatched_filter",
        "unresolvable_reference",
        "low_valid_rate",
        "rate_limited",
    )
)


@pytest.mark.parametrize(("settings", "arguments"), CASES.values(), ids=CASES.keys())
def test_schemathesis_default_checks_find_nothing(
    upstream: ServerProcess, tmp_path: Path, settings: dict[str, str], arguments: list[str]
) -> None:
    env = {**BASE_ENV, **settings}
    with (tmp_path / "service.log").open("wb") as log:
        service = start_service(upstream_url=upstream.url, env=env, output=log)
        try:
            command = [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{service.url}/openapi.json",
                "--max-examples",
                MAX_EXAMPLES,
                "--seed",
                SEED,
                "--output-sanitize",
                "false",
                "--warnings",
                WARNINGS,
                *arguments,
            ]
            result = subprocess.run(
                command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
            )
        finally:
            service.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout.strip().splitlines()[-1], result.stdout[-3000:]
