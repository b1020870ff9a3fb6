"""Scale-out: two service processes on one real Redis and one real PostgreSQL; and what happens when either is down.

Limits hold across both instances, the ledger holds rows from both, and each instance's /metrics is right.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from src.core.keys import key_digest
from src.core.ledger import parse_database_url
from src.core.limits import estimate_prompt_tokens
from src.devtools.servers import ServerProcess, free_port
from tests.e2e.conftest import unavailable
from tests.e2e.network import CHAT, RunningService, chat, running_service

pytestmark = pytest.mark.e2e

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_KEY = "llmsvc-scale-admin"
REQUESTS_PER_MINUTE = 6
CALLS = 10
# A window's worth of calls must not straddle two minutes (each would admit its own 6).
SECONDS_NEEDED_IN_THE_MINUTE = 15


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL
    name = f"llm_scale_{secrets.token_hex(4)}"

    async def admin(statement: str) -> None:
        # asyncpg runs a statement outside a transaction, as CREATE/DROP DATABASE need.
        connection = await asyncpg.connect(parse_database_url(url).target, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable("database", url, exc)
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _keys_file(directory: Path, name: str, key: str) -> Path:
    path = directory / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key)}"\nrequests_per_minute = {REQUESTS_PER_MINUTE}\n'
    )
    return path


def _calls_by_outcome(service: RunningService, key: str) -> dict[str, float]:
    scraped = httpx.get(service.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
    assert scraped.status_code == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(scraped.text):
        for sample in family.samples:
            if sample.name == "llm_calls_total" and sample.labels["key"] == key:
                counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + sample.value
    return counts


def _wait_for_a_fresh_minute() -> None:
    """Start the burst early in a minute, so that all of it falls in one limit window."""
    if 60 - time.time() % 60 < SECONDS_NEEDED_IN_THE_MINUTE:
        time.sleep(60 - time.time() % 60 + 0.1)


def test_two_instances_share_limits_ledger_and_report_their_own_metrics(
    upstream: ServerProcess, postgres_database: str, redis_url: str, tmp_path: Path
) -> None:
    name, key = f"scale-{secrets.token_hex(4)}", f"llmsvc-{secrets.token_hex(16)}"
    settings = {
        "SERVICE_KEYS_FILE": str(_keys_file(tmp_path, name, key)),
        "ADMIN_API_KEYS": ADMIN_KEY,
        "DATABASE_URL": postgres_database,
        "REDIS_URL": redis_url,
    }
    with (
        running_service(upstream.url, tmp_path / "a", **settings) as first,
        running_service(upstream.url, tmp_path / "b", **settings) as second,
    ):
        _wait_for_a_fresh_minute()
        answers: dict[str, list[int]] = {first.url: [], second.url: []}
        for index in range(CALLS):
            service = (first, second)[index % 2]
            response = httpx.post(
                service.url + CHAT, json=chat(f"call {index}"), headers={"Authorization": f"Bearer {key}"}, timeout=10
            )
            answers[service.url].append(response.status_code)
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "key_rate_limited"
        statuses = answers[first.url] + answers[second.url]
        assert statuses.count(200) == REQUESTS_PER_MINUTE
        assert statuses.count(429) == CALLS - REQUESTS_PER_MINUTE

        deadline = time.monotonic() + 5
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            usage = httpx.get(
                first.url + "/api/v1/llm/usage",
                params={"group_by": "key"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=5,
            )
            rows = [row for row in usage.json()["rows"] if row["key"] == name]
            if rows and rows[0]["calls"] == CALLS:
                break
            time.sleep(0.05)
        assert rows[0]["calls"] == CALLS
        assert rows[0]["errors"] == CALLS - REQUESTS_PER_MINUTE
        assert rows[0]["total_tokens"] > 0

        for service in (first, second):
            served_ok = answers[service.url].count(200)
            outcomes = _calls_by_outcome(service, name)
            assert outcomes.get("ok", 0) == served_ok
            assert outcomes.get("key_rate_limited", 0) == len(answers[service.url]) - served_ok


def test_fifty_concurrent_calls_on_two_instances_overshoot_a_small_tpm_by_at_most_one_reservation(
    upstream: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    name, key = f"tpm-{secrets.token_hex(4)}", f"llmsvc-{secrets.token_hex(16)}"
    tokens_per_minute, max_tokens, calls = 300, 20, 50
    (tmp_path / "keys.toml").write_text(
        f'[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key)}"\ntokens_per_minute = {tokens_per_minute}\n'
    )
    # Each answer waits a moment upstream, so every call reserves before any settles.
    body = chat("x", model="mock-slow-first-0.5", max_tokens=max_tokens)
    reservation = estimate_prompt_tokens(body["messages"]) + max_tokens
    settings = {"SERVICE_KEYS_FILE": str(tmp_path / "keys.toml"), "REDIS_URL": redis_url}

    async def burst(urls: list[str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=calls)) as client:
            return await asyncio.gather(
                *(
                    client.post(urls[index % 2] + CHAT, json=body, headers={"Authorization": f"Bearer {key}"})
                    for index in range(calls)
                )
            )

    with (
        running_service(upstream.url, tmp_path / "a", **settings) as first,
        running_service(upstream.url, tmp_path / "b", **settings) as second,
    ):
        _wait_for_a_fresh_minute()
        answers = asyncio.run(burst([first.url, second.url]))
    admitted = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert len(admitted) + len(refused) == calls
    # Admitted while less than the limit was reserved, counted in one Redis for both instances.
    assert len(admitted) == math.ceil(tokens_per_minute / reservation)
    assert len(admitted) * reservation < tokens_per_minute + reservation
    assert {answer.json()["error"]["code"] for answer in refused} == {"key_rate_limited"}


def test_with_redis_and_the_database_down_the_service_keeps_serving(upstream: ServerProcess, tmp_path: Path) -> None:
    name, key = "while-down", "llmsvc-while-down"
    with running_service(
        upstream.url,
        tmp_path,
        SERVICE_KEYS_FILE=str(_keys_file(tmp_path, name, key)),
        ADMIN_API_KEYS=ADMIN_KEY,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
    ) as service:
        started = time.monotonic()
        answers = [
            httpx.post(service.url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"}, timeout=10)
            for _ in range(REQUESTS_PER_MINUTE + 1)
        ]
        elapsed = time.monotonic() - started
        usage = httpx.get(
            service.url + "/api/v1/llm/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        )
        scraped = httpx.get(service.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        logged = service.wait_for_log(lambda line: line["event"] == "limits_redis_unavailable")
    # Limits fell back to this process's memory: they still hold here.
    assert [answer.status_code for answer in answers] == [200] * REQUESTS_PER_MINUTE + [429]
    assert elapsed < 10
    assert usage.status_code == 503
    assert usage.json()["error"]["code"] == "ledger_unavailable"
    errors = next(
        sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
        if sample.name == "llm_redis_errors_total"
    )
    assert errors >= 1
    assert "redis" in logged["event"]


def test_metrics_of_a_two_worker_service_add_up_whichever_worker_answers(
    upstream: ServerProcess, tmp_path: Path
) -> None:
    calls = 24
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        from src.devtools.servers import start_service

        service = start_service(upstream_url=upstream.url, workers=2, output=log)
        try:
            for index in range(calls):
                # A new connection each time, so both workers serve some.
                answer = httpx.post(service.url + CHAT, json=chat(f"call {index}"), timeout=10)
                assert answer.status_code == 200
            scrapes = []
            for _ in range(8):
                text = httpx.get(service.url + "/metrics", timeout=5).text
                scrapes.append(
                    sum(
                        sample.value
                        for family in text_string_to_metric_families(text)
                        for sample in family.samples
                        if sample.name == "llm_calls_total" and sample.labels["outcome"] == "ok"
                    )
                )
        finally:
            service.stop()
    assert scrapes == [calls] * len(scrapes)
    workers = {
        line.split("[")[1].split("]")[0]
        for line in log_path.read_text().splitlines()
        if "Started server process" in line
    }
    assert len(workers) >= 2


def test_a_malformed_keys_file_stops_the_start_command_with_line_and_field(tmp_path: Path) -> None:
    import subprocess
    import sys

    from src.core.config import ENV_FILE_VARIABLE
    from src.devtools.servers import BACKEND_DIR, clean_environment

    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "a"\nsha256 = "{key_digest("k")}"\nrequests_per_minute = "ten"\n')
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(free_port())],
        cwd=BACKEND_DIR,
        env={**clean_environment(), ENV_FILE_VARIABLE: "", "SERVICE_KEYS_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert f"{path}:4:" in result.stderr
    assert "'requests_per_minute'" in result.stderr
    assert "Traceback" not in result.stderr
