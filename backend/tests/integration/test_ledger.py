"""The usage ledger against real databases: SQLite in a temporary directory, PostgreSQL at TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest
import structlog

from src.core import ledger as ledger_module
from src.core.ledger import (
    SCHEMA_VERSION,
    GroupBy,
    Ledger,
    LedgerRow,
    LedgerUnavailableError,
    parse_database_url,
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
BACKEND = Path(__file__).resolve().parents[2]
# Each costs every worker process memory a SQLite deployment has no use for (see core/ledger.py).
NOT_FOR_SQLITE = ("sqlalchemy", "asyncpg", "aiosqlite")

ROW_FIELDS = tuple(f.name for f in fields(LedgerRow))
ROW_COLUMNS = ", ".join(f'"{name}"' for name in ROW_FIELDS)
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens")
# How to look inside each database: its columns (name, type) and index names of llm_calls.
COLUMNS_SQL = {
    "sqlite": "SELECT name, lower(type) FROM pragma_table_info('llm_calls')",
    "postgresql": (
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'llm_calls'"
    ),
}
INDEXES_SQL = {
    "sqlite": "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'llm_calls'",
    "postgresql": "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'llm_calls'",
}

# What structlog.testing.capture_logs() collects: one mapping per log call.
Logs = list[MutableMapping[str, Any]]
Record = tuple[Any, ...]


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


def require_postgres(url: str, problem: str) -> NoReturn:
    """Skip (fail under CI, where nothing may skip) when PostgreSQL cannot be reached."""
    message = (
        f"PostgreSQL is not reachable at {parse_database_url(url).display} ({problem}): start it (`sudo service "
        "postgresql start`, or `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test "
        "postgres:16`) or point TEST_DATABASE_URL at one"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def sqlite_query(path: Path, sql: str, args: Sequence[Any], *, write: bool) -> list[Record]:
    # Read-only unless asked: a look inside must not create the database the ledger is meant to create.
    uri = path.as_uri() if write else f"{path.as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as connection:
        return [tuple(record) for record in connection.execute(sql, args).fetchall()]


@dataclass
class Database:
    """A database for one test: how a Ledger reaches it, and a separate connection to look inside it."""

    kind: str
    url: str
    connect_options: dict[str, Any] = field(default_factory=dict)
    sqlite_path: Path | None = None
    schema: str | None = None
    # PostgreSQL: a connection to the test database outside the test's schema, and one inside it.
    admin: Any = None
    reader: Any = None

    def ledger(self, **options: Any) -> Ledger:
        return Ledger(self.url, connect_options=self.connect_options, **options)

    async def query(self, sql: str, *args: Any, write: bool = False) -> list[Record]:
        """What the database holds, seen through its driver, not through the ledger."""
        if self.sqlite_path is not None:
            return await asyncio.to_thread(sqlite_query, self.sqlite_path, sql, args, write=write)
        return [tuple(record) for record in await self.reader.fetch(sql, *args)]

    async def rows(self) -> list[LedgerRow]:
        return [self._row(record) for record in await self.query(f"SELECT {ROW_COLUMNS} FROM llm_calls ORDER BY id")]

    def _row(self, record: Record) -> LedgerRow:
        values = dict(zip(ROW_FIELDS, record, strict=True))
        if self.kind == "sqlite":
            # SQLite stores naive UTC text and 0/1 for booleans.
            values.update(
                ts=datetime.fromisoformat(values["ts"]).replace(tzinfo=UTC),
                stream=bool(values["stream"]),
                cancelled=bool(values["cancelled"]),
            )
        return LedgerRow(**values)

    async def wait_for_rows(self, count: int, *, within: float = VISIBLE_WITHIN_S) -> list[LedgerRow]:
        """The stored rows once there are `count`; the table may not exist yet while the database is down."""
        deadline = time.monotonic() + within
        found: list[LedgerRow] | str = "no table yet"
        while True:
            try:
                found = await self.rows()
            except (sqlite3.Error, asyncpg.PostgresError, OSError) as exc:
                found = f"{type(exc).__name__}: {exc}"
            if isinstance(found, list) and len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                seen = len(found) if isinstance(found, list) else found
                raise AssertionError(f"{count} rows not in the {self.kind} ledger within {within:.1f}s: {seen}")
            await asyncio.sleep(POLL_S)

    async def versions(self) -> list[int]:
        return [version for (version,) in await self.query("SELECT version FROM llm_schema_version ORDER BY 1")]

    async def make_unavailable(self) -> None:
        """Break the database so that the ledger can neither migrate nor write, until `make_available`."""
        if self.sqlite_path is not None:
            # A directory where the file should be: SQLite cannot open it (permissions would not stop root).
            self.sqlite_path.mkdir(parents=True)
            return
        # PostgreSQL without the schema the ledger's search_path names: "no schema has been selected to create in".
        await self.admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    async def make_available(self) -> None:
        if self.sqlite_path is not None:
            self.sqlite_path.rmdir()
            return
        await self.admin.execute(f'CREATE SCHEMA "{self.schema}"')


async def sqlite_database(tmp_path: Path) -> Database:
    path = tmp_path / "data" / "ledger.db"
    return Database(kind="sqlite", url=f"sqlite:///{path}", sqlite_path=path)


async def postgres_database() -> AsyncIterator[Database]:
    """A fresh schema in the test database, dropped afterwards; the ledger reaches it through its search_path."""
    url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL
    dsn = parse_database_url(url).target
    schema = f"ledger_test_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(dsn, timeout=POSTGRES_CONNECT_TIMEOUT_S)
    # Whatever the reason (refused, no such database, authentication), the message says what to start.
    except Exception as exc:
        require_postgres(url, f"{type(exc).__name__}: {exc}")
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        server_settings = {"search_path": schema, "TimeZone": FAR_EAST_TIME_ZONE}
        # Named, so that a test can find the ledger's own connections on the server.
        ledger_settings = {**server_settings, "application_name": f"{schema}-ledger"}
        reader = await asyncpg.connect(dsn, server_settings=server_settings, timeout=POSTGRES_CONNECT_TIMEOUT_S)
        try:
            yield Database(
                kind="postgresql",
                url=url,
                connect_options={"server_settings": ledger_settings},
                schema=schema,
                admin=admin,
                reader=reader,
            )
        finally:
            await reader.close()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        yield await sqlite_database(tmp_path)
        return
    async for postgres in postgres_database():
        yield postgres


@pytest.fixture
async def postgres() -> AsyncIterator[Database]:
    async for database in postgres_database():
        yield database


# --- URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dialect", "target", "display"),
    [
        ("postgresql://u:p@db:5432/llm", "postgresql", "postgresql://u:p@db:5432/llm", "postgresql://u:***@db:5432/llm"),
        ("postgres://u@db/llm", "postgresql", "postgresql://u@db/llm", "postgresql://u@db/llm"),
        ("postgresql+asyncpg://u@db/llm", "postgresql", "postgresql://u@db/llm", "postgresql://u@db/llm"),
        (
            "postgresql://u:p@h1:5432,[::1]:5433/llm?sslmode=require&password=p",
            "postgresql",
            "postgresql://u:p@h1:5432,[::1]:5433/llm?sslmode=require&password=p",
            "postgresql://u:***@h1:5432,[::1]:5433/llm",
        ),
        ("sqlite:///data/ledger.db", "sqlite", "data/ledger.db", "sqlite:///data/ledger.db"),
        ("sqlite:////var/lib/ledger.db", "sqlite", "/var/lib/ledger.db", "sqlite:////var/lib/ledger.db"),
        ("sqlite+aiosqlite:///:memory:", "sqlite", ":memory:", "sqlite:///:memory:"),
        ("sqlite://", "sqlite", ":memory:", "sqlite:///:memory:"),
    ],
    ids=[
        "postgresql", "postgres-alias", "asyncpg-suffix", "multi-host-query-not-shown", "sqlite-relative",
        "sqlite-absolute", "aiosqlite-suffix", "sqlite-in-memory",
    ],
)  # fmt: skip
def test_a_database_url_names_the_database_what_to_connect_to_and_how_to_log_it(
    url: str, dialect: str, target: str, display: str
) -> None:
    parsed = parse_database_url(url)
    assert (parsed.dialect, parsed.target, parsed.display) == (dialect, target, display)


def test_a_parsed_url_does_not_show_its_password() -> None:
    assert PASSWORD not in repr(parse_database_url(f"postgresql://u:{PASSWORD}@db/llm"))


async def test_a_sqlite_ledger_creates_its_directory_and_file_on_start(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.db"
    ledger = Ledger(f"sqlite:///{path}")
    assert not path.parent.exists()
    await ledger.start()
    await ledger.aclose()
    assert path.is_file()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:hunter2@db/llm",
        "not a url",
        "://nothing",
        "root:hunter2@db://llm",
        "postgresql://u:hunter2@db:notaport/llm",
        "postgresql://u:hunter2@db:99999/llm",
        "postgresql://u:hunter2@[::1/llm",
        "sqlite://hunter2@db/ledger.db",
        "sqlite:///ledger.db?password=hunter2",
    ],
    ids=[
        "unsupported-scheme", "no-scheme", "empty-scheme", "not-a-scheme", "port-not-a-number", "port-too-large",
        "unbalanced-ipv6", "sqlite-host", "sqlite-query",
    ],
)  # fmt: skip
def test_an_unusable_url_is_a_value_error_that_does_not_repeat_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="database URL") as raised:
        parse_database_url(url)
    assert "hunter2" not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or "hunter2" not in str(raised.value.__context__)


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


async def test_timestamps_are_stored_as_utc(database: Database) -> None:
    """SQLite keeps naive UTC text in one fixed-width format (the one earlier releases wrote); PostgreSQL keeps the
    instant. A naive timestamp is taken as UTC."""
    ledger = database.ledger(**FAST)
    await ledger.start()
    try:
        ledger.record(make_row(1, ts=datetime(2025, 3, 2, 8, 30, 15, 123456, tzinfo=timezone(timedelta(hours=9)))))
        ledger.record(make_row(2, ts=datetime(2025, 3, 2, 0, 0)))
        await database.wait_for_rows(2)
    finally:
        await ledger.aclose()
    stored_as = {
        "sqlite": "SELECT ts FROM llm_calls ORDER BY id",
        "postgresql": "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM llm_calls ORDER BY id",
    }
    assert await database.query(stored_as[database.kind]) == [
        ("2025-03-01 23:30:15.123456",),
        ("2025-03-02 00:00:00.000000",),
    ]


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


async def test_an_in_memory_sqlite_ledger_writes_and_answers() -> None:
    ledger = Ledger("sqlite://", flush_interval_seconds=0.05, retry_seconds=0.05)
    await ledger.start()
    try:
        ledger.record(make_row(1))
        await wait_until(lambda: ledger.queued == 0, within=VISIBLE_WITHIN_S, what="the row was taken")
        # Taken from the queue is not yet committed: ask until the usage shows it.
        deadline = time.monotonic() + VISIBLE_WITHIN_S
        while not (usage := await ledger.usage(start=USAGE_START, end=USAGE_END, group_by="model")):
            assert time.monotonic() < deadline, "the row never showed in usage"
            await asyncio.sleep(POLL_S)
    finally:
        await ledger.aclose()
    assert usage == [{"model": "gpt-5-mini", **totals(1, 0, 0, 10, 5, 15)}]


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

# The SQLite schema the SQLAlchemy releases created (version 1), as SQLAlchemy emitted it.
SQLALCHEMY_RELEASE_SCHEMA = (
    "CREATE TABLE llm_calls (id INTEGER NOT NULL, ts DATETIME NOT NULL, request_id VARCHAR NOT NULL, "
    "route VARCHAR NOT NULL, key_name VARCHAR, user VARCHAR, model VARCHAR NOT NULL, upstream_model VARCHAR, "
    "stream BOOLEAN NOT NULL, status INTEGER NOT NULL, code VARCHAR, prompt_tokens BIGINT, completion_tokens BIGINT, "
    "total_tokens BIGINT, reasoning_tokens BIGINT, cached_tokens BIGINT, latency_ms DOUBLE NOT NULL, ttft_ms DOUBLE, "
    "cancelled BOOLEAN NOT NULL, PRIMARY KEY (id))",
    "CREATE TABLE llm_schema_version (version INTEGER NOT NULL, applied_at DATETIME NOT NULL, PRIMARY KEY (version))",
    "CREATE INDEX ix_llm_calls_ts ON llm_calls (ts)",
    "CREATE INDEX ix_llm_calls_key_name_ts ON llm_calls (key_name, ts)",
)


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
    columns: dict[str, str] = dict(await database.query(COLUMNS_SQL[database.kind]))
    indexes = {name for (name,) in await database.query(INDEXES_SQL[database.kind])}
    assert set(columns) == {"id", *ROW_FIELDS}
    assert {"ix_llm_calls_ts", "ix_llm_calls_key_name_ts"} <= indexes
    # 64-bit: an absurd count from an upstream must not make the database refuse the row.
    assert {columns[name] for name in TOKEN_COLUMNS} == {"bigint"}


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


async def test_a_sqlite_database_from_the_sqlalchemy_releases_is_used_as_it_is(tmp_path: Path) -> None:
    database = await sqlite_database(tmp_path)
    assert database.sqlite_path is not None
    database.sqlite_path.parent.mkdir()
    for statement in SQLALCHEMY_RELEASE_SCHEMA:
        await database.query(statement, write=True)
    await database.query("INSERT INTO llm_schema_version VALUES (1, '2025-01-01 00:00:00.000000')", write=True)
    earlier = make_row(1, ts=datetime(2025, 3, 1, 23, 30, tzinfo=UTC))
    values = [getattr(earlier, name) if name != "ts" else "2025-03-01 23:30:00.000000" for name in ROW_FIELDS]
    placeholders = ", ".join("?" * len(ROW_FIELDS))
    await database.query(f"INSERT INTO llm_calls ({ROW_COLUMNS}) VALUES ({placeholders})", *values, write=True)
    ledger = database.ledger(**FAST)
    with structlog.testing.capture_logs() as logs:
        await ledger.start()
    try:
        ledger.record(make_row(2, ts=datetime(2025, 3, 2, 12, 0, tzinfo=UTC)))
        stored = await database.wait_for_rows(2)
        usage = await ledger.usage(start=USAGE_START, end=USAGE_END, group_by="day")
    finally:
        await ledger.aclose()
    assert events(logs, "ledger_migrated") == []
    assert stored[0] == earlier
    assert usage == [
        {"day": "2025-03-01", **totals(1, 0, 0, 10, 5, 15)},
        {"day": "2025-03-02", **totals(1, 0, 0, 10, 5, 15)},
    ]


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


async def test_usage_raises_ledger_unavailable_when_the_database_cannot_answer(database: Database) -> None:
    await database.make_unavailable()
    ledger = database.ledger(**FAST)
    await ledger.start()
    try:
        with pytest.raises(LedgerUnavailableError, match="cannot answer"):
            await ledger.usage(start=USAGE_START, end=USAGE_END, group_by="key")
    finally:
        await ledger.aclose()


async def test_usage_after_aclose_raises_ledger_unavailable(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.start()
    await ledger.aclose()
    with pytest.raises(LedgerUnavailableError, match="closed"):
        await ledger.usage(start=USAGE_START, end=USAGE_END, group_by="key")


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
    assert unavailable[0]["database"].startswith("postgresql://ledger:***@")
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


async def test_a_batch_that_fails_after_the_migration_is_put_back_and_written_in_order(postgres: Database) -> None:
    """The database is lost under a running ledger (restored from an empty backup): the schema is made again."""
    write_errors: list[None] = []
    ledger = postgres.ledger(**FAST, on_write_error=lambda: write_errors.append(None))
    await ledger.start()
    try:
        await postgres.make_unavailable()
        for n in range(3):
            ledger.record(make_row(n))
        await wait_until(lambda: len(write_errors) >= 2, within=RECOVERY_WITHIN_S, what="the writer retried")
        assert ledger.queued == 3
        await postgres.make_available()
        stored = await postgres.wait_for_rows(3, within=RECOVERY_WITHIN_S)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-0", "req-1", "req-2"]
    assert await postgres.versions() == list(range(1, SCHEMA_VERSION + 1))


async def test_writes_resume_after_the_server_drops_the_ledgers_connection(postgres: Database) -> None:
    """A server restart or an idle timeout closes the ledger's connection: the next write opens another."""
    ledger = postgres.ledger(**FAST)
    await ledger.start()
    try:
        ledger.record(make_row(1))
        await postgres.wait_for_rows(1)
        terminated = await postgres.admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            postgres.connect_options["server_settings"]["application_name"],
        )
        assert [tuple(record) for record in terminated] == [(True,)]
        ledger.record(make_row(2))
        stored = await postgres.wait_for_rows(2, within=RECOVERY_WITHIN_S)
    finally:
        await ledger.aclose()
    assert request_ids(stored) == ["req-1", "req-2"]


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


# --- Footprint ----------------------------------------------------------------------------------------------------

FOOTPRINT_SCRIPT = """
import asyncio, json, sys
from datetime import UTC, datetime

import src.core.ledger as ledger_module

def loaded():
    return sorted(name for name in sys.modules if name.partition(".")[0] in sys.argv[2].split(","))

async def use_sqlite():
    ledger = ledger_module.Ledger(f"sqlite:///{sys.argv[1]}", flush_interval_seconds=0.05)
    await ledger.start()
    await ledger.usage(start=datetime(2025, 1, 1, tzinfo=UTC), end=datetime(2026, 1, 1, tzinfo=UTC), group_by="day")
    await ledger.aclose()

at_import = loaded()
asyncio.run(use_sqlite())
print(json.dumps({"at_import": at_import, "after_sqlite": loaded()}))
"""


def test_a_sqlite_ledger_loads_neither_sqlalchemy_nor_asyncpg(tmp_path: Path) -> None:
    """In a fresh interpreter: the test process has them all loaded already."""
    finished = subprocess.run(
        [sys.executable, "-c", FOOTPRINT_SCRIPT, str(tmp_path / "ledger.db"), ",".join(NOT_FOR_SQLITE)],
        cwd=BACKEND,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout.splitlines()[-1]) == {"at_import": [], "after_sqlite": []}
