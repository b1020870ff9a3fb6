"""Operating the service, in-process: named keys with models and limits, admin keys, the ledger, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from src.core.keys import KeysFileError, key_digest
from src.core.limits import estimate_prompt_tokens
from src.main import create_app
from tests.conftest import chat_body, completion, make_settings, sse_chunks

CHAT = "/api/v1/llm/chat"
USAGE = "/api/v1/llm/usage"
FRONTEND_KEY = "llmsvc-frontend"
LIMITED_KEY = "llmsvc-limited"
BUDGET_KEY = "llmsvc-budget"
ADMIN_KEY = "llmsvc-admin"
Logs = Callable[[], list[dict[str, Any]]]


def _keys_file(tmp_path: Path, *, rpm: int = 2, tpm: int = 100_000, tpd: int = 50) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[[keys]]
name = "web-frontend"
sha256 = "{key_digest(FRONTEND_KEY)}"
models = ["gpt-5-mini", "gpt-4.1-mini"]

[[keys]]
name = "limited"
sha256 = "{key_digest(LIMITED_KEY)}"
requests_per_minute = {rpm}
tokens_per_minute = {tpm}

[[keys]]
name = "budgeted"
sha256 = "{key_digest(BUDGET_KEY)}"
tokens_per_day = {tpd}
"""
    )
    return path


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed_settings(tmp_path: Path) -> Any:
    return make_settings(
        service_keys_file=str(_keys_file(tmp_path)),
        admin_api_keys=ADMIN_KEY,
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
    )


async def test_a_named_key_calls_and_is_named_in_the_log_line(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any, read_logs: Logs
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(keyed_settings) as (client, _, _):
        ok = await client.post(CHAT, json=chat_body(), headers=_bearer(FRONTEND_KEY))
        wrong = await client.post(CHAT, json=chat_body(), headers=_bearer("llmsvc-unknown"))
        admin_for_chat = await client.post(CHAT, json=chat_body(), headers=_bearer(ADMIN_KEY))
        not_allowed = await client.post(CHAT, json=chat_body(model="gpt-4o"), headers=_bearer(FRONTEND_KEY))
    assert ok.status_code == 200
    assert "x-ratelimit-limit-requests" not in ok.headers
    assert wrong.status_code == admin_for_chat.status_code == 401
    assert not_allowed.status_code == 400
    assert not_allowed.json()["error"]["code"] == "model_not_allowed"
    assert "gpt-4.1-mini" in not_allowed.json()["error"]["message"]
    calls = [line for line in read_logs() if line.get("event") == "llm_call"]
    assert calls[0]["key"] == "web-frontend"
    assert FRONTEND_KEY not in json.dumps(calls)


async def test_requests_per_minute_answers_429_with_retry_after_and_openais_headers(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    route = upstream.post("/chat/completions")
    route.side_effect = [
        httpx.Response(200, json=completion()),
        httpx.Response(200, content=sse_chunks(["a"]), headers={"content-type": "text/event-stream"}),
    ]
    async with app_client(keyed_settings) as (client, _, _):
        first = await client.post(CHAT, json=chat_body(), headers=_bearer(LIMITED_KEY))
        second = await client.post(CHAT, json=chat_body(stream=True), headers=_bearer(LIMITED_KEY))
        refused = await client.post(CHAT, json=chat_body(), headers=_bearer(LIMITED_KEY))
    assert first.status_code == second.status_code == 200
    assert second.headers["content-type"].startswith("text/event-stream")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "key_rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_daily_budget_answers_429_until_midnight_utc(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    upstream.post("/chat/completions").respond(
        200, json=completion(usage={"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60})
    )
    async with app_client(keyed_settings) as (client, _, _):
        spent = await client.post(CHAT, json=chat_body(max_tokens=10), headers=_bearer(BUDGET_KEY))
        refused = await client.post(CHAT, json=chat_body(max_tokens=10), headers=_bearer(BUDGET_KEY))
    assert spent.status_code == 200
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "key_budget_exceeded"
    seconds_to_midnight = 86_400 - int(time.time()) % 86_400
    assert abs(int(refused.headers["retry-after"]) - seconds_to_midnight) <= 2


async def test_concurrent_calls_overshoot_a_token_limit_by_at_most_one_reservation(
    app_client: Callable[..., Any], upstream: respx.MockRouter, tmp_path: Path
) -> None:
    answered = 0

    async def slow_answer(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        await asyncio.sleep(0.05)  # the calls overlap: all reserve before any settles
        answered += 1
        usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
        return httpx.Response(200, json=completion(usage=usage))

    upstream.post("/chat/completions").mock(side_effect=slow_answer)
    settings = make_settings(service_keys_file=str(_keys_file(tmp_path, rpm=1000, tpm=300)))
    async with app_client(settings) as (client, _, _):
        answers = await asyncio.gather(
            *(client.post(CHAT, json=chat_body("x", max_tokens=20), headers=_bearer(LIMITED_KEY)) for _ in range(50))
        )
    admitted = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert len(admitted) + len(refused) == 50
    reservation = estimate_prompt_tokens([{"role": "user", "content": "x"}]) + 20
    # Admitted while less than the limit was reserved: the last one admitted overshoots by less than its own.
    assert len(admitted) == math.ceil(300 / reservation)
    assert len(admitted) * reservation < 300 + reservation
    assert answered == len(admitted)
    assert {answer.json()["error"]["code"] for answer in refused} == {"key_rate_limited"}


async def test_operator_endpoints_need_an_admin_key(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    upstream.post("/chat/completions").respond(200, json=completion())
    async with app_client(keyed_settings) as (client, _, _):
        await client.post(CHAT, json=chat_body(), headers=_bearer(FRONTEND_KEY))
        for path in ("/metrics", USAGE):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=_bearer(FRONTEND_KEY))).status_code == 401
        scraped = await client.get("/metrics", headers=_bearer(ADMIN_KEY))
    assert scraped.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    calls = [s for s in families["llm_calls"].samples if s.name == "llm_calls_total"]
    assert any(
        s.labels == {"model": "gpt-5-mini", "key": "web-frontend", "outcome": "ok"} and s.value >= 1 for s in calls
    )


async def test_with_chat_keys_but_no_admin_keys_operator_endpoints_refuse_everyone(
    app_client: Callable[..., Any], tmp_path: Path
) -> None:
    async with app_client(make_settings(service_keys_file=str(_keys_file(tmp_path)))) as (client, _, _):
        response = await client.get("/metrics", headers=_bearer(FRONTEND_KEY))
    assert response.status_code == 401
    assert "ADMIN_API_KEYS" in response.json()["error"]["message"]


async def test_every_call_is_a_ledger_row_and_usage_sums_them_in_the_database(
    app_client: Callable[..., Any], upstream: respx.MockRouter, keyed_settings: Any
) -> None:
    route = upstream.post("/chat/completions")
    route.side_effect = [
        httpx.Response(200, json=completion()),
        httpx.Response(200, content=sse_chunks(["a", "b"]), headers={"content-type": "text/event-stream"}),
        httpx.Response(500, json={"error": {"message": "boom"}}),
    ]
    async with app_client(keyed_settings) as (client, _, _):
        await client.post(CHAT, json=chat_body(user="alice"), headers=_bearer(FRONTEND_KEY))
        await client.post(CHAT, json=chat_body(stream=True, user="bob"), headers=_bearer(FRONTEND_KEY))
        await client.post(CHAT, json=chat_body(user="alice"), headers=_bearer(LIMITED_KEY))
        by = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            by["key"] = (await client.get(USAGE, params={"group_by": "key"}, headers=_bearer(ADMIN_KEY))).json()
            if sum(row["calls"] for row in by["key"]["rows"]) == 3:
                break
            await asyncio.sleep(0.05)
        for group in ("model", "user", "day"):
            by[group] = (await client.get(USAGE, params={"group_by": group}, headers=_bearer(ADMIN_KEY))).json()
        bad = await client.get(USAGE, params={"group_by": "colour"}, headers=_bearer(ADMIN_KEY))
        backwards = await client.get(
            USAGE, params={"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, headers=_bearer(ADMIN_KEY)
        )
        unix_time = await client.get(USAGE, params={"to": "1764000000"}, headers=_bearer(ADMIN_KEY))
    assert by["key"]["rows"] == [
        {
            "key": "limited",
            "calls": 1,
            "errors": 1,
            "cancelled": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        },
        {
            "key": "web-frontend",
            "calls": 2,
            "errors": 0,
            "cancelled": 0,
            "prompt_tokens": 14,
            "completion_tokens": 8,
            "total_tokens": 22,
        },
    ]
    assert [row["user"] for row in by["user"]["rows"]] == ["alice", "bob"]
    assert [row["calls"] for row in by["model"]["rows"]] == [3]
    assert len(by["day"]["rows"]) == 1
    assert bad.status_code == unix_time.status_code == 422
    assert backwards.status_code == 200
    assert backwards.json() == {"rows": []}


def test_a_malformed_keys_file_stops_the_app_naming_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nname = "a"\nsha256 = "{key_digest("k")}"\ntokens_per_minute = -5\n')
    with pytest.raises(KeysFileError, match=r"keys.toml:4: .*'tokens_per_minute'"):
        create_app(make_settings(service_keys_file=str(path)))


async def test_an_absurd_usage_from_the_upstream_is_not_reported_and_never_blocks_the_ledger(
    app_client: Callable[..., Any], upstream: respx.MockRouter
) -> None:
    """A token count past 2^53 (or negative) would not fit the ledger's BIGINT columns: a row that can never be
    written would hold up every row behind it. Such a usage counts as not reported; the calls are recorded."""
    absurd = {"prompt_tokens": 10**30, "completion_tokens": -1, "total_tokens": 10**30}
    upstream.post("/chat/completions").mock(
        side_effect=[httpx.Response(200, json=completion(usage=absurd)), httpx.Response(200, json=completion())]
    )
    async with app_client() as (client, _, _):
        # The test run's ledger is shared: this test's calls are the ones of its own user.
        first = await client.post(CHAT, json=chat_body(user="absurd-usage"))
        second = await client.post(CHAT, json=chat_body(user="absurd-usage"))
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            grouped = (await client.get(USAGE, params={"group_by": "user"})).json()["rows"]
            rows = [row for row in grouped if row["user"] == "absurd-usage"]
            if rows and rows[0]["calls"] == 2:
                break
            await asyncio.sleep(0.05)
    assert first.status_code == second.status_code == 200
    assert first.json()["usage"] is None
    assert second.json()["usage"]["total_tokens"] == 15
    assert [(row["calls"], row["errors"], row["total_tokens"]) for row in rows] == [(2, 0, 15)]
