"""The usage ledger against real databases: SQLite in a temporary directory, PostgreSQL at TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateSchema, DropSchema

from src.core import ledger as ledger_module
from src.core.ledger import (
    SCHEMA_VERSION,
    GroupBy,
    Ledger,
    LedgerRow,
    database_url_for_engine,
    llm_calls,
    schema_versions,
)
from tests.support.real_servers import LOOPBACK, free_port

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_CONNECT_TIMEOUT_S = 2.0
# What the ledger promises: a recorded row is in the database this soon when the database is up.
VISIBLE_WITHIN_S = 2.0
# Outages and recoveries in these tests are driven with short intervals; this bounds how long one may take.
RECOVERY_WITHIN_S = 10.0
POLL_S = 0.02
FAST = {"flush_interval_seconds": 0.05, "retry_seconds": 0.05}
# Far longer than any test: the writer does not flush on its own while the test looks.
NEVER_S = 3600.0
# A session time zone 14 hours ahead of UTC: a `day` computed in the session's zone instead of UTC shows at once.
FAR_EAST_TIME_ZONE = "Pacific/Kiritimati"
PASSWORD = "pw-s3cret-never-logged"

# What structlog.testing.capture_logs() collects: one mapping per log call.
Logs = list[MutableMapping[str, Any]]


def make_row(n: int = 0, **changes: Any) -> LedgerRow:
    row = LedgerRow(
        ts=datetime(2025, 3, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=n),
        request_id=f"req-{n}",
        route="chat",
        key_name="web",
        user="alice",
        model="gpt-5-mini",
        upstream_model="gpt-5-mini-2025-08-07",
        stream=False,
        status=200,
        code=None,
        prompt_tokens=10,
        completion_tokens=5,
        total_tokens=15,
        reasoning_tokens=2,
        cached_tokens=3,
        latency_ms=123.45,
        ttft_ms=None,
        cancelled=False,
    )
    return replace(row, **changes)


def request_ids(rows: list[LedgerRow]) -> list[str]:
    return [row.request_id for row in rows]


def events(logs: Logs, name: str) -> Logs:
    return [entry for entry in logs if entry["event"] == name]


async def wait_until(condition: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {within:.1f}s: {what}")
        await asyncio.sleep(POLL_S)


def safe_url(url: str) -> str:
    return make_url(database_url_for_engine(url)).render_as_string(hide_password=True)


def require_postgres(url: str, problem: str) -> None:
    """Skip (fail under CI, where nothing may skip) when PostgreSQL cannot be reached."""
    message = (
        f"PostgreSQL is not reachable at {safe_url(url)} ({problem}): start it (`sudo service postgresql start`, or "
        "`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test postgres:16`) or point "
        "TEST_DATABASE_URL at one"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Database:
    """A database for one test: how a Ledger reaches it, and a separate engine to look inside it."""

    kind: str
    url: str
    engine_options: dict[str, Any] = field(default_factory=dict)
    sqlite_path: Path | None = None
    schema: str | None = None
    admin: AsyncEngine | None = None
    _reader: AsyncEngine | None = None

    def ledger(self, **options: Any) -> Ledger:
        return Ledger(self.url, engine_options=self.engine_options, **options)

    @property
    def reader(self) -> AsyncEngine:
        if self._reader is None:
            self._reader = create_async_engine(database_url_for_engine(self.url), **self.engine_options)
        return self._reader

    async def rows(self) -> list[LedgerRow]:
        async with self.reader.connect() as connection:
            result = await connection.execute(select(llm_calls).order_by(llm_calls.c.id))
            return [LedgerRow(**{k: v for k, v in row.items() if k != "id"}) for row in result.mappings()]

    async def wait_for_rows(self, count: int, *, within: float = VISIBLE_WITHIN_S) -> list[LedgerRow]:
        """The stored rows once there are `count`; the table may not exist yet while the database is down."""
        deadline = time.monotonic() + within
        found: list[LedgerRow] | str = "no table yet"
        while True:
            try:
                found = await self.rows()
            except (SQLAlchemyError, OSError) as exc:
                found = f"{type(exc).__name__}: {exc}"
            if isinstance(found, list) and len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                seen = len(found) if isinstance(found, list) else found
                raise AssertionError(f"{count} rows not in the {self.kind} ledger within {within:.1f}s: {seen}")
            await asyncio.sleep(POLL_S)

    async def versions(self) -> list[int]:
        async with self.reader.connect() as connection:
            result = await connection.execute(select(schema_versions.c.version).order_by(schema_versions.c.version))
            return list(result.scalars())

    async def make_unavailable(self) -> None:
        """Break the database so that the ledger can neither migrate nor write, until `make_available`."""
        if self.sqlite_path is not None:
            # A directory where the file should be: SQLite cannot open it (permissions would not stop root).
            self.sqlite_path.mkdir(parents=True)
            return
        # PostgreSQL without the schema the ledger's search_path names: "no schema has been selected to create in".
        assert self.admin is not None
        assert self.schema is not None
        async with self.admin.begin() as connection:
            await connection.execute(DropSchema(self.schema, cascade=True, if_exists=True))

    async def make_available(self) -> None:
        if self.sqlite_path is not None:
            self.sqlite_path.rmdir()
            return
        assert self.admin is not None
        assert self.schema is not None
        async with self.admin.begin() as connection:
            await connection.execute(CreateSchema(self.schema))

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.dispose()


async def sqlite_database(tmp_path: Path) -> Database:
    path = tmp_path / "data" / "ledger.db"
    return Database(kind="sqlite", url=f"sqlite:///{path}", sqlite_path=path)


async def postgres_database() -> AsyncIterator[Database]:
    """A fresh schema in the test database, dropped afterwards; the ledger reaches it through its search_path."""
    url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL
    admin = create_async_engine(
        database_url_for_engine(url), connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S}, pool_pre_ping=True
    )
    schema = f"ledger_test_{secrets.token_hex(6)}"
    try:
        async with admin.begin() as connection:
            await connection.execute(CreateSchema(schema))
    # Whatever the reason (refused, no such database, authentication), the message says what to start.
    except Exception as exc:
        await admin.dispose()
        require_postgres(url, f"{type(exc).__name__}: {exc}")
    server_settings = {"search_path": schema, "TimeZone": FAR_EAST_TIME_ZONE}
    database = Database(
        kind="postgresql",
        url=url,
        engine_options={"connect_args": {"server_settings": server_settings}},
        schema=schema,
        admin=admin,
    )
    try:
        yield database
    finally:
        await database.close()
        async with admin.begin() as connection:
            await connection.execute(DropSchema(schema, cascade=True, if_exists=True))
        await admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        sqlite = await sqlite_database(tmp_path)
        try:
            yield sqlite
        finally:
            await sqlite.close()
        return
    async for postgres in postgres_database():
        yield postgres


@pytest.fixture
async def postgres() -> AsyncIterator[Database]:
    async for database in postgres_database():
        yield database


# --- URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/llm", "postgresql+asyncpg://u:p@db:5432/llm"),
        ("postgres://u@db/llm", "postgresql+asyncpg://u@db/llm"),
        ("postgresql+asyncpg://u@db/llm", "postgresql+asyncpg://u@db/llm"),
        ("sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
    ],
    ids=["postgresql", "postgres-alias", "driver-kept", "sqlite-driver-kept"],
)
def test_database_url_names_the_async_driver(url: str, expected: str) -> None:
    assert database_url_for_engine(url) == expected


def test_a_sqlite_url_runs_on_aiosqlite_and_gets_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.db"
    assert database_url_for_engine(f"sqlite:///{path}") == f"sqlite+aiosqlite:///{path}"
    assert path.parent.is_dir()
    assert not path.exists()


@pytest.mark.parametrize(
    "url",
    ["mysql://root:hunter2@db/llm", "not a url", "://nothing", "postgresql://u:hunter2@db:notaport/llm"],
    ids=["unsupported-scheme", "no-scheme", "empty-scheme", "malformed"],
)
def test_an_unusable_url_is_a_value_error_that_does_not_repeat_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="database URL") as raised:
        database_url_for_engine(url)
    assert "hunter2" not in str(raised.value)
    assert raised.value.__cause__ is None


@pytest.mark.parametrize(
    "url",
    ["mysql://root:hunter2@db/llm", "postgresql+nosuchdriver://u:hunter2@db/llm", "sqlite+pysqlite:///x.db"],
    ids=["unsupported-scheme", "unknown-driver", "sync-driver"],
)
async def test_start_raises_value_error_for_a_url_it_cannot_use(url: str) -> None:
    ledger = Ledger(url)
    with pytest.raises(ValueError, match="database URL") as raised:
        await ledger.start()
    assert "hunter2" not in str(raised.value)
    await ledger.aclose()


# --- Writing ------------------------------------------------------------------------------------------------------


async def test_rows_round_trip_with_every_field(database: Database) -> None:
    full = make_row(
        1,
        # Given in another zone: stored and read back as the same instant, in UTC.
        ts=datetime(2025, 3, 2, 8, 30, 15, 123456, tzinfo=timezone(timedelta(hours=9))),
        route="openai",
        stream=True,
        code="upstream_timeout",
        status=200,
        ttft_ms=87.5,
        cancelled=True,
        prompt_tokens=3_000_000_000,
    )
    sparse = make_row(
        2,
        key_name=None,
        user=None,
        upstream_model=None,
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=None,
        reasoning_tokens=None,
        cached_tokens=None,
        ttft_ms=None,
        status=502,
        code="upstream_error",
    )
    ledger = database.ledger(**FAST)
    await ledger.start()
    try:
        ledger.record(full)
        ledger.record(sparse)
        stored = await database.wait_for_rows(2)
    finally:
        await ledger.aclose()
    assert stored == [replace(full, ts=full.ts.astimezone(UTC)), sparse]
    assert all(row.ts.tzinfo is UTC for row in stored)


async def test_a_recorded_row_is_in_the_database_within_two_seconds_with_default_settings(database: Database) -> None:
    ledger = database.ledger()
    await ledger.start()
    try:
        ledger.record(make_row())
        stored = await database.wait_for_rows(1, within=VISIBLE_WITHIN_S)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-0"]


async def test_a_full_batch_is_written_without_waiting_for_the_interval(database: Database) -> None:
    ledger = database.ledger(flush_interval_seconds=NEVER_S, batch_size=3)
    await ledger.start()
    try:
        for n in range(3):
            ledger.record(make_row(n))
        stored = await database.wait_for_rows(3)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-0", "req-1", "req-2"]


async def test_aclose_flushes_what_is_queued_and_is_idempotent(database: Database) -> None:
    ledger = database.ledger(flush_interval_seconds=NEVER_S)
    await ledger.start()
    for n in range(5):
        ledger.record(make_row(n))
    assert ledger.queued == 5
    with structlog.testing.capture_logs() as logs:
        await ledger.aclose()
        await ledger.aclose()
    assert ledger.queued == 0
    assert request_ids(await database.rows()) == [f"req-{n}" for n in range(5)]
    assert events(logs, "ledger_rows_unwritten") == []


async def test_a_row_recorded_after_aclose_is_counted_as_dropped(tmp_path: Path) -> None:
    dropped: list[int] = []
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", on_dropped=dropped.append)
    await ledger.start()
    await ledger.aclose()
    with structlog.testing.capture_logs() as logs:
        ledger.record(make_row())
    assert (ledger.queued, ledger.dropped, dropped) == (0, 1, [1])
    assert [line["dropped"] for line in events(logs, "ledger_rows_dropped")] == [1]


async def test_rows_recorded_before_start_are_written_once_started(database: Database) -> None:
    ledger = database.ledger(**FAST)
    ledger.record(make_row(7))
    await ledger.start()
    try:
        stored = await database.wait_for_rows(1)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-7"]


# --- Schema -------------------------------------------------------------------------------------------------------


async def test_migrations_are_idempotent_across_restarts(database: Database) -> None:
    for restart in range(2):
        ledger = database.ledger(**FAST)
        with structlog.testing.capture_logs() as logs:
            await ledger.start()
        ledger.record(make_row(restart))
        await ledger.aclose()
        assert events(logs, "ledger_unavailable") == []
        assert len(events(logs, "ledger_migrated")) == (1 if restart == 0 else 0)
    assert await database.versions() == list(range(1, SCHEMA_VERSION + 1))
    assert request_ids(await database.rows()) == ["req-0", "req-1"]

    def schema(connection: Any) -> tuple[set[str], set[str]]:
        inspector = inspect(connection)
        columns = {column["name"] for column in inspector.get_columns("llm_calls")}
        indexes = {str(index["name"]) for index in inspector.get_indexes("llm_calls")}
        return columns, indexes

    async with database.reader.connect() as connection:
        columns, indexes = await connection.run_sync(schema)
    assert columns == set(llm_calls.c.keys())
    assert {"ix_llm_calls_ts", "ix_llm_calls_key_name_ts"} <= indexes


async def test_two_instances_starting_at_once_migrate_once(postgres: Database) -> None:
    first, second = postgres.ledger(**FAST), postgres.ledger(**FAST)
    with structlog.testing.capture_logs() as logs:
        await asyncio.gather(first.start(), second.start())
    try:
        first.record(make_row(1))
        second.record(make_row(2))
        stored = await postgres.wait_for_rows(2)
    finally:
        await asyncio.gather(first.aclose(), second.aclose())
    assert events(logs, "ledger_unavailable") == []
    assert len(events(logs, "ledger_migrated")) == 1
    assert await postgres.versions() == list(range(1, SCHEMA_VERSION + 1))
    assert sorted(request_ids(stored)) == ["req-1", "req-2"]


# --- Usage --------------------------------------------------------------------------------------------------------

USAGE_START = datetime(2025, 3, 1, tzinfo=UTC)
USAGE_END = datetime(2025, 3, 3, tzinfo=UTC)
TOKYO = timezone(timedelta(hours=9))
USAGE_ROWS = [
    # Exactly at `start`: counted.
    make_row(
        1, ts=USAGE_START, key_name="web", user="alice", model="gpt-5-mini", prompt_tokens=10, completion_tokens=5,
        total_tokens=15,
    ),
    # 23:30 UTC: still March 1st in UTC, March 2nd in the PostgreSQL session's time zone.
    make_row(
        2, ts=datetime(2025, 3, 1, 23, 30, tzinfo=UTC), key_name="web", user=None, model="gpt-5",
        code="upstream_timeout", prompt_tokens=None, completion_tokens=None, total_tokens=None,
    ),
    # 08:00 in Tokyo on March 2nd is 23:00 UTC on March 1st.
    make_row(
        3, ts=datetime(2025, 3, 2, 8, 0, tzinfo=TOKYO), key_name="batch", user="bob", model="gpt-5-mini",
        cancelled=True, prompt_tokens=3, completion_tokens=None, total_tokens=None,
    ),
    make_row(
        4, ts=datetime(2025, 3, 2, 12, 0, tzinfo=UTC), key_name=None, user="alice", model="gpt-5",
        prompt_tokens=7, completion_tokens=8, total_tokens=15,
    ),
    # The last microsecond before `end`; and an upper-case key, which sorts before lower case on both databases.
    make_row(
        5, ts=USAGE_END - timedelta(microseconds=1), key_name="Zeta", user="alice", model="gpt-5-mini",
        code="upstream_error", prompt_tokens=1, completion_tokens=1, total_tokens=2,
    ),
    # Outside [start, end): exactly at `end`, and just before `start`.
    make_row(6, ts=USAGE_END, key_name="web", user="alice", model="gpt-5", total_tokens=1000),
    make_row(7, ts=USAGE_START - timedelta(microseconds=1), key_name="web", model="gpt-5", total_tokens=1000),
]  # fmt: skip


def totals(calls: int, errors: int, cancelled: int, prompt: int, completion: int, total: int) -> dict[str, int]:
    return {
        "calls": calls,
        "errors": errors,
        "cancelled": cancelled,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
    }


USAGE_EXPECTED: dict[str, list[dict[str, Any]]] = {
    "key": [
        {"key": None, **totals(1, 0, 0, 7, 8, 15)},
        {"key": "Zeta", **totals(1, 1, 0, 1, 1, 2)},
        {"key": "batch", **totals(1, 0, 1, 3, 0, 0)},
        {"key": "web", **totals(2, 1, 0, 10, 5, 15)},
    ],
    "model": [
        {"model": "gpt-5", **totals(2, 1, 0, 7, 8, 15)},
        {"model": "gpt-5-mini", **totals(3, 1, 1, 14, 6, 17)},
    ],
    "user": [
        {"user": None, **totals(1, 1, 0, 0, 0, 0)},
        {"user": "alice", **totals(3, 1, 0, 18, 14, 32)},
        {"user": "bob", **totals(1, 0, 1, 3, 0, 0)},
    ],
    "day": [
        {"day": "2025-03-01", **totals(3, 1, 1, 13, 5, 15)},
        {"day": "2025-03-02", **totals(2, 1, 0, 8, 9, 17)},
    ],
}


@pytest.fixture
async def filled(database: Database) -> AsyncIterator[tuple[Database, Ledger]]:
    ledger = database.ledger(**FAST)
    await ledger.start()
    try:
        for row in USAGE_ROWS:
            ledger.record(row)
        await database.wait_for_rows(len(USAGE_ROWS))
        yield database, ledger
    finally:
        await ledger.aclose()


@pytest.mark.parametrize("group_by", ["key", "model", "user", "day"])
async def test_usage_groups_in_the_database_within_start_and_end(
    filled: tuple[Database, Ledger], group_by: GroupBy
) -> None:
    _, ledger = filled
    assert await ledger.usage(start=USAGE_START, end=USAGE_END, group_by=group_by) == USAGE_EXPECTED[group_by]


async def test_usage_of_an_empty_range_is_empty(filled: tuple[Database, Ledger]) -> None:
    _, ledger = filled
    later = USAGE_END + timedelta(days=30)
    assert await ledger.usage(start=later, end=later + timedelta(days=1), group_by="key") == []


async def test_usage_bounds_given_in_another_zone_mean_the_same_instants(filled: tuple[Database, Ledger]) -> None:
    _, ledger = filled
    usage = await ledger.usage(start=USAGE_START.astimezone(TOKYO), end=USAGE_END.astimezone(TOKYO), group_by="day")
    assert usage == USAGE_EXPECTED["day"]


async def test_usage_refuses_naive_bounds(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.start()
    try:
        with pytest.raises(ValueError, match="timezone-aware"):
            await ledger.usage(start=datetime(2025, 3, 1), end=USAGE_END, group_by="day")
    finally:
        await ledger.aclose()


# --- Outages ------------------------------------------------------------------------------------------------------


async def test_a_database_down_at_start_queues_rows_and_never_blocks_or_raises() -> None:
    # Nothing listens on this port: every connection is refused, at once.
    url = f"postgresql://ledger:{PASSWORD}@{LOOPBACK}:{free_port()}/ledger"
    write_errors: list[None] = []
    ledger = Ledger(url, retry_seconds=0.05, on_write_error=lambda: write_errors.append(None))
    with structlog.testing.capture_logs() as logs:
        await ledger.start()
        began = time.perf_counter()
        for n in range(1000):
            ledger.record(make_row(n))
        recording_s = time.perf_counter() - began
        await wait_until(lambda: len(write_errors) >= 3, within=RECOVERY_WITHIN_S, what="the writer retried")
        assert ledger.queued == 1000
        await ledger.aclose(timeout_seconds=1.0)
    # A thousand appends to a queue: nothing waits on the network.
    assert recording_s < 0.5
    unavailable = events(logs, "ledger_unavailable")
    assert len(unavailable) == 1
    assert unavailable[0]["log_level"] == "warning"
    assert unavailable[0]["database"].startswith("postgresql+asyncpg://ledger:***@")
    assert events(logs, "ledger_rows_unwritten")[0]["rows"] == 1000
    # Retried several times, reported by one throttled line per interval (and one at shutdown).
    assert 1 <= len(events(logs, "ledger_write_failed")) <= 2
    assert PASSWORD not in repr(logs)


async def test_writes_resume_in_order_when_the_database_comes_back(database: Database) -> None:
    await database.make_unavailable()
    write_errors: list[None] = []
    ledger = database.ledger(**FAST, on_write_error=lambda: write_errors.append(None))
    with structlog.testing.capture_logs() as logs:
        await ledger.start()
        try:
            for n in range(5):
                ledger.record(make_row(n))
            await wait_until(lambda: len(write_errors) >= 2, within=RECOVERY_WITHIN_S, what="the writer retried")
            assert ledger.queued == 5
            await database.make_available()
            stored = await database.wait_for_rows(5, within=RECOVERY_WITHIN_S)
        finally:
            await ledger.aclose()
    assert request_ids(stored) == [f"req-{n}" for n in range(5)]
    assert len(events(logs, "ledger_unavailable")) == 1
    assert len(events(logs, "ledger_available")) == 1


async def test_rows_waiting_through_an_outage_stay_bounded_and_the_newest_are_kept(database: Database) -> None:
    await database.make_unavailable()
    dropped: list[int] = []
    ledger = database.ledger(**FAST, queue_limit=4, on_dropped=dropped.append)
    await ledger.start()
    try:
        for n in range(10):
            ledger.record(make_row(n))
        assert (ledger.queued, ledger.dropped, sum(dropped)) == (4, 6, 6)
        await database.make_available()
        stored = await database.wait_for_rows(4, within=RECOVERY_WITHIN_S)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-6", "req-7", "req-8", "req-9"]


async def test_a_full_queue_drops_the_oldest_counts_it_and_logs_at_most_once_per_interval(tmp_path: Path) -> None:
    dropped: list[int] = []
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", queue_limit=3, on_dropped=dropped.append)
    with structlog.testing.capture_logs() as logs:
        for n in range(6):
            ledger.record(make_row(n))
        during = events(logs, "ledger_rows_dropped")
        await ledger.aclose()
    assert (ledger.queued, ledger.dropped, dropped) == (3, 3, [1, 1, 1])
    # The first drop is told at once; the next two within the interval wait, and are told (counted) at shutdown.
    assert [line["dropped"] for line in during] == [1]
    assert [line["dropped"] for line in events(logs, "ledger_rows_dropped")] == [1, 2]
    assert events(logs, "ledger_rows_unwritten")[0]["rows"] == 3


async def test_a_failing_metrics_callback_does_not_break_record(tmp_path: Path) -> None:
    def broken(count: int) -> None:
        raise RuntimeError("metrics are down")

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", queue_limit=1, on_dropped=broken)
    with structlog.testing.capture_logs() as logs:
        ledger.record(make_row(1))
        ledger.record(make_row(2))
        await ledger.aclose()
    assert ledger.dropped == 1
    assert events(logs, "ledger_callback_failed")[0]["callback"] == "on_dropped"


async def test_a_database_that_hangs_holds_neither_start_nor_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers: start and aclose still return on time."""
    hung: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(accept_and_say_nothing, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(ledger_module, "STARTUP_TIMEOUT_SECONDS", 0.2)
    ledger = Ledger(f"postgresql://ledger@{LOOPBACK}:{port}/ledger", flush_interval_seconds=0.05, retry_seconds=0.05)
    try:
        with structlog.testing.capture_logs() as logs:
            began = time.perf_counter()
            await ledger.start()
            started_s = time.perf_counter() - began
            ledger.record(make_row())
            # The writer's own attempt is stuck in the connect now, like the first one was.
            await wait_until(lambda: len(hung) >= 2, within=RECOVERY_WITHIN_S, what="the writer tried again")
            began = time.perf_counter()
            await ledger.aclose(timeout_seconds=0.3)
            closed_s = time.perf_counter() - began
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()
    assert started_s < 2.0
    assert closed_s < 2.0
    assert events(logs, "ledger_unavailable")[0]["error_type"] == "TimeoutError"
    assert events(logs, "ledger_rows_unwritten")[0]["rows"] == 1
