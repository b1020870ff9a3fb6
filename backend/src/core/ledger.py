"""The usage ledger: one `llm_calls` row per LLM call, queued in memory and written in batches off the hot path.

`Ledger.record` only appends to a bounded in-memory queue; a background writer inserts what waits every
`flush_interval_seconds` (sooner when `batch_size` rows wait), in one transaction. A database that is down, at
start or later, costs no request anything: rows wait (the oldest are dropped when the queue is full, counted), and
the writer retries until it is back. The schema is versioned (`llm_schema_version`) and migrated on start.

SQLite (the default, a local file) and PostgreSQL give the same answers: timestamps are stored as UTC (naive UTC
text on SQLite, `TIMESTAMP WITH TIME ZONE` on PostgreSQL) and `Ledger.usage` groups by the UTC date on both.

The ledger speaks plain parameterised SQL to the drivers themselves, one table of statements per database
(`_SQLITE`, `_POSTGRESQL`), because an ORM's async layer costs every worker process ~18 MiB of resident memory for
four kinds of statement. SQLite runs on the standard library's `sqlite3`, on one dedicated thread per ledger;
PostgreSQL on asyncpg, imported only when the URL names PostgreSQL, so a SQLite deployment never loads it.

Errors: a URL the ledger cannot use is a `ValueError` (from `start`); a database that cannot answer a usage query
is a `LedgerUnavailableError`; the writer itself never raises, it logs and retries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import operator
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar, get_args
from urllib.parse import urlsplit

import structlog

_log = structlog.get_logger("ledger")

_T = TypeVar("_T")

DialectName = Literal["sqlite", "postgresql"]
SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
# The schemes operators write. The `+driver` forms are what earlier releases (SQLAlchemy) accepted: a configuration
# that worked before keeps working.
SCHEMES: Final[Mapping[str, DialectName]] = {
    "sqlite": SQLITE,
    "sqlite+aiosqlite": SQLITE,
    "postgresql": POSTGRESQL,
    "postgres": POSTGRESQL,
    "postgresql+asyncpg": POSTGRESQL,
    "postgres+asyncpg": POSTGRESQL,
}
# What RFC 3986 allows in a scheme: anything else before "://" is no scheme, and may be a password (never echoed).
_SCHEME_SYNTAX: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
URL_EXAMPLES: Final = "sqlite:///path/to/ledger.db or postgresql://user:password@host:5432/database"
SQLITE_IN_MEMORY: Final = ":memory:"
MAX_PORT: Final = 65_535

DEFAULT_FLUSH_INTERVAL_SECONDS: Final = 0.5
DEFAULT_BATCH_SIZE: Final = 500
DEFAULT_QUEUE_LIMIT: Final = 10_000
DEFAULT_RETRY_SECONDS: Final = 1.0
DEFAULT_CLOSE_TIMEOUT_SECONDS: Final = 5.0
# The first migration runs inside the app's startup: an unreachable host (a dropped SYN waits for the driver's own
# connect timeout, a minute for asyncpg) must not hold the service's start for longer than this.
STARTUP_TIMEOUT_SECONDS: Final = 5.0
# A connection that hangs (no RST, no keepalive) would stall the writer forever. Cutting an attempt off may, at
# worst, cut a commit that did land, and its rows are written again: a rare duplicate beats a ledger that stops.
ATTEMPT_TIMEOUT_SECONDS: Final = 30.0
# Closing a PostgreSQL connection politely waits for the server; a server that does not answer is cut off instead.
CONNECTION_CLOSE_TIMEOUT_SECONDS: Final = 2.0
# Warnings about dropped rows and failed writes repeat for as long as the cause lasts: one line per interval, with
# the count since the previous line, keeps the log readable during an outage.
WARNING_INTERVAL_SECONDS: Final = 10.0
# Database error messages can be long (statements, parameters); a log line needs their gist.
ERROR_MESSAGE_LIMIT: Final = 300
# Any fixed 64-bit number works, as long as every instance uses the same one: it names the ledger's migration lock.
MIGRATION_LOCK_ID: Final = 0x6C65_6467_6572_0001

GroupBy = Literal["key", "model", "user", "day"]
GROUPINGS: Final[tuple[GroupBy, ...]] = get_args(GroupBy)
TOKEN_TOTALS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One LLM call, as the ledger stores it."""

    # The call's end, timezone-aware UTC (a naive value is taken as UTC).
    ts: datetime
    request_id: str
    # Which API served it: "chat" (/api/v1/llm/chat) or "openai" (/v1/chat/completions).
    route: str
    key_name: str | None
    user: str | None
    model: str
    upstream_model: str | None
    stream: bool
    # The HTTP status the caller got: 200 for a stream that began, whatever happened later.
    status: int
    # Our error code; None when the call succeeded.
    code: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None
    cached_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    cancelled: bool


_ROW_FIELDS: Final = tuple(field.name for field in fields(LedgerRow))
# A row's values in column order, read in one C call (rows are written by the hundred); `ts` is LedgerRow's first
# field, so the first value.
_ROW_VALUES: Final = operator.attrgetter(*_ROW_FIELDS)


class LedgerUnavailableError(RuntimeError):
    """The ledger's database could not answer a query (down, unreachable, not migrated yet, or the ledger closed)."""


# --- URLs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A ledger database URL, taken apart: which database, what its driver connects to, and a name safe to log."""

    dialect: DialectName
    # The SQLite file (":memory:" for a database that lives as long as its connection), or the DSN for asyncpg.
    # Kept out of repr: a DSN may hold a password.
    target: str = field(repr=False)
    # The URL without its password, and without its query (asyncpg reads a `password=` option there too).
    display: str


def parse_database_url(url: str) -> DatabaseUrl:
    """Take `url` apart: `sqlite:///relative/path`, `sqlite:////absolute/path`, `sqlite://` (in memory),
    `postgresql://` or `postgres://` (a `+asyncpg` or `+aiosqlite` driver suffix is accepted and ignored).

    Raises ValueError for anything else. The message never repeats the URL: it may hold a password.
    """
    scheme, separator, rest = url.strip().partition("://")
    if not separator or not _SCHEME_SYNTAX.fullmatch(scheme):
        raise ValueError(f"the database URL is not a URL: expected {URL_EXAMPLES}")
    dialect = SCHEMES.get(scheme.lower())
    if dialect is None:
        raise ValueError(f"unsupported database URL scheme {scheme!r}: expected {URL_EXAMPLES}")
    if dialect == SQLITE:
        return _parse_sqlite(rest)
    return _parse_postgresql(scheme, rest)


def _parse_sqlite(rest: str) -> DatabaseUrl:
    if rest and not rest.startswith("/"):
        raise ValueError("malformed sqlite:// database URL: a file is sqlite:///relative or sqlite:////absolute")
    if "?" in rest:
        # Earlier releases passed query options on to the driver; taking them as part of the file name instead
        # would quietly open another file.
        raise ValueError("sqlite:// database URLs take no query options")
    path = rest[1:] or SQLITE_IN_MEMORY
    return DatabaseUrl(dialect=SQLITE, target=path, display=f"sqlite:///{path}")


def _parse_postgresql(scheme: str, rest: str) -> DatabaseUrl:
    # asyncpg parses the DSN itself, but only when it connects, and its errors may quote it: what would make it
    # fail is refused here, at start, where a bad URL is a configuration error and not an outage.
    malformed = f"malformed {scheme}:// database URL (not shown: it may hold a password)"
    try:
        parts = urlsplit(f"{POSTGRESQL}://{rest}")
    # ValueError: unbalanced IPv6 brackets. `from None`: a chained message could quote the URL.
    except ValueError:
        raise ValueError(malformed) from None
    userinfo, at, hosts = parts.netloc.rpartition("@")
    # libpq's multi-host form, "host1:5432,host2:5433", is valid: check each host's port.
    for host in hosts.split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host.partition(":")[2]
        if port.startswith(":"):
            port = port[1:]
        if port and not (port.isascii() and port.isdigit() and int(port) <= MAX_PORT):
            raise ValueError(malformed)
    user, colon, _ = userinfo.partition(":")
    credentials = f"{user}{':***' if colon else ''}{at}"
    return DatabaseUrl(
        dialect=POSTGRESQL,
        target=f"{POSTGRESQL}://{rest}",
        display=f"{POSTGRESQL}://{credentials}{hosts}{parts.path}",
    )


# --- Statements ---------------------------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sqlite_timestamp(value: datetime) -> str:
    # SQLite has no timestamp type. Naive UTC text in one fixed-width format compares and sorts the way time does;
    # it is also the format SQLAlchemy wrote, so databases from earlier releases read the same.
    return _utc(value).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _insert_call(placeholders: Sequence[str]) -> str:
    columns = ", ".join(f'"{name}"' for name in _ROW_FIELDS)
    # Only the column names and the placeholders are formatted in, both constants; the values are parameters.
    return f"INSERT INTO llm_calls ({columns}) VALUES ({', '.join(placeholders)})"  # noqa: S608


def _usage_statements(*, day: str, start: str, end: str, order_collation: str) -> Mapping[GroupBy, str]:
    """The usage query for each grouping: the group's value, then calls, errors, cancelled and TOKEN_TOTALS."""
    groups: Mapping[GroupBy, str] = {"key": "key_name", "model": "model", "user": '"user"', "day": day}
    # The sums are cast back to BIGINT: PostgreSQL sums a BIGINT as NUMERIC (a Decimal in Python).
    sums = ", ".join(f"CAST(coalesce(sum({name}), 0) AS BIGINT)" for name in TOKEN_TOTALS)
    # Only the expressions above are formatted in, all constants; the bounds are parameters. Grouping a subquery's
    # column keeps the day's expression out of GROUP BY and ORDER BY, where it would have to be repeated exactly.
    return {
        group_by: (
            f"SELECT group_value, count(*), count(code), count(CASE WHEN cancelled THEN 1 END), {sums} "  # noqa: S608
            f"FROM (SELECT {expression} AS group_value, code, cancelled, {', '.join(TOKEN_TOTALS)} FROM llm_calls "
            f"WHERE ts >= {start} AND ts < {end}) AS calls "
            f"GROUP BY group_value ORDER BY group_value{order_collation} ASC NULLS FIRST"
        )
        for group_by, expression in groups.items()
    }


@dataclass(frozen=True, slots=True)
class _Dialect:
    """Every statement the ledger runs on one kind of database, and how that database takes a timestamp."""

    name: DialectName
    # Taken at the start of the migration's transaction and held to its end, so that instances starting together
    # migrate one after the other; None where the database lets only one writer in at a time anyway.
    lock_migrations: str | None
    create_schema_versions: str
    schema_version: str
    insert_schema_version: str
    insert_call: str
    usage: Mapping[GroupBy, str]
    timestamp: Callable[[datetime], Any]


_SQLITE: Final = _Dialect(
    name=SQLITE,
    lock_migrations=None,
    create_schema_versions=(
        "CREATE TABLE IF NOT EXISTS llm_schema_version (version INTEGER NOT NULL PRIMARY KEY, "
        "applied_at DATETIME NOT NULL)"
    ),
    schema_version="SELECT max(version) FROM llm_schema_version",
    insert_schema_version="INSERT INTO llm_schema_version (version, applied_at) VALUES (?, ?)",
    insert_call=_insert_call(["?"] * len(_ROW_FIELDS)),
    # The naive UTC text starts with the UTC date.
    usage=_usage_statements(day="substr(ts, 1, 10)", start="?", end="?", order_collation=""),
    timestamp=_sqlite_timestamp,
)

_POSTGRESQL: Final = _Dialect(
    name=POSTGRESQL,
    lock_migrations="SELECT pg_advisory_xact_lock($1)",
    create_schema_versions=(
        "CREATE TABLE IF NOT EXISTS llm_schema_version (version INTEGER NOT NULL PRIMARY KEY, "
        "applied_at TIMESTAMP WITH TIME ZONE NOT NULL)"
    ),
    schema_version="SELECT max(version) FROM llm_schema_version",
    insert_schema_version="INSERT INTO llm_schema_version (version, applied_at) VALUES ($1, $2)",
    insert_call=_insert_call([f"${n}" for n in range(1, len(_ROW_FIELDS) + 1)]),
    # The UTC wall-clock date whatever the session's TimeZone says; to_char, because date-to-text follows DateStyle.
    usage=_usage_statements(
        day="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        start="$1",
        end="$2",
        # Ordered by the group's value as bytes, as SQLite does: PostgreSQL's default collation would order "B"
        # and "a" the other way round.
        order_collation=' COLLATE "C"',
    ),
    timestamp=_utc,
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema, applied once, in order, inside the migration transaction."""

    version: int
    description: str
    statements: Mapping[DialectName, tuple[str, ...]]


# Version 1 as it stands. When a later migration changes a table, this step must keep creating version 1, or a
# fresh database would get the change twice. `IF NOT EXISTS`: a database that earlier releases created without their
# version row (SQLite ran their DDL outside the transaction) finds its tables there.
_CREATE_LLM_CALLS: Final = Migration(
    version=1,
    description="create llm_calls and its indexes",
    statements={
        SQLITE: (
            # INTEGER PRIMARY KEY: SQLite's rowid, the only column it autoincrements.
            "CREATE TABLE IF NOT EXISTS llm_calls ("
            "id INTEGER NOT NULL PRIMARY KEY, ts DATETIME NOT NULL, request_id VARCHAR NOT NULL, "
            "route VARCHAR NOT NULL, key_name VARCHAR, user VARCHAR, model VARCHAR NOT NULL, upstream_model VARCHAR, "
            "stream BOOLEAN NOT NULL, status INTEGER NOT NULL, code VARCHAR, prompt_tokens BIGINT, "
            "completion_tokens BIGINT, total_tokens BIGINT, reasoning_tokens BIGINT, cached_tokens BIGINT, "
            "latency_ms DOUBLE NOT NULL, ttft_ms DOUBLE, cancelled BOOLEAN NOT NULL)",
            "CREATE INDEX IF NOT EXISTS ix_llm_calls_ts ON llm_calls (ts)",
            "CREATE INDEX IF NOT EXISTS ix_llm_calls_key_name_ts ON llm_calls (key_name, ts)",
        ),
        POSTGRESQL: (
            # Token counts are 64-bit: a row the database refuses (an absurd count from an upstream) would stall
            # the writer's retries.
            "CREATE TABLE IF NOT EXISTS llm_calls ("
            "id BIGSERIAL NOT NULL PRIMARY KEY, ts TIMESTAMP WITH TIME ZONE NOT NULL, request_id VARCHAR NOT NULL, "
            'route VARCHAR NOT NULL, key_name VARCHAR, "user" VARCHAR, model VARCHAR NOT NULL, '
            "upstream_model VARCHAR, stream BOOLEAN NOT NULL, status INTEGER NOT NULL, code VARCHAR, "
            "prompt_tokens BIGINT, completion_tokens BIGINT, total_tokens BIGINT, reasoning_tokens BIGINT, "
            "cached_tokens BIGINT, latency_ms DOUBLE PRECISION NOT NULL, ttft_ms DOUBLE PRECISION, "
            "cancelled BOOLEAN NOT NULL)",
            # Usage reports select a time range, overall or for one key.
            "CREATE INDEX IF NOT EXISTS ix_llm_calls_ts ON llm_calls (ts)",
            "CREATE INDEX IF NOT EXISTS ix_llm_calls_key_name_ts ON llm_calls (key_name, ts)",
        ),
    },
)

MIGRATIONS: Final[tuple[Migration, ...]] = (_CREATE_LLM_CALLS,)
SCHEMA_VERSION: Final = MIGRATIONS[-1].version


# --- Databases ----------------------------------------------------------------------------------------------------


class _Session(Protocol):
    """Statements on one connection, inside `_Database.transaction()` or `_Database.connection()`."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]: ...


class _Database(Protocol):
    """One database's connection, used by one caller at a time, and reopened after any failure."""

    @property
    def dialect(self) -> _Dialect: ...

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What the driver raises when the database cannot answer."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[_Session]:
        """A write transaction: committed when the block ends, rolled back when it raises."""
        ...

    def connection(self) -> AbstractAsyncContextManager[_Session]:
        """Statements outside a transaction: reads."""
        ...

    async def aclose(self) -> None: ...


class _SqliteDatabase:
    """SQLite through the standard library. A sqlite3 connection belongs to the thread that opened it, and its calls
    block: every call runs on this ledger's own thread, in the order it was asked for."""

    dialect: Final = _SQLITE
    errors: Final[tuple[type[Exception], ...]] = (sqlite3.Error, OSError)

    def __init__(self, path: str, connect_options: Mapping[str, Any]) -> None:
        self._path = path
        # isolation_level=None: sqlite3 leaves transactions to `transaction()`, so DDL is inside them too.
        self._connect_options = {**connect_options, "isolation_level": None}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        # Only ever touched on `_thread`.
        self._connection: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    def transaction(self) -> AbstractAsyncContextManager[_Session]:
        return self._use(transaction=True)

    def connection(self) -> AbstractAsyncContextManager[_Session]:
        return self._use(transaction=False)

    @contextlib.asynccontextmanager
    async def _use(self, *, transaction: bool) -> AsyncIterator[_Session]:
        async with self._lock:
            try:
                await self._run(self._open, transaction)
                yield self
                if transaction:
                    await self._run(self._commit)
            except BaseException:
                # Whatever failed (a statement, the commit, a timeout), the next use starts on a fresh connection.
                # Queued behind what still runs on the thread, and not awaited, so that a cancellation cannot skip it.
                self._thread.submit(self._discard)
                raise

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._run(self._execute, sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._run(self._executemany, sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return await self._run(self._fetch, sql, args)

    async def aclose(self) -> None:
        async with self._lock:
            await self._run(self._discard)
        self._thread.shutdown(wait=False)

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # What follows runs on `_thread`.

    def _open(self, transaction: bool) -> None:
        if self._connection is None:
            if self._path != SQLITE_IN_MEMORY:
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(self._path, **self._connect_options)
        if transaction:
            # IMMEDIATE: take the write lock now. A deferred transaction that reads first and writes later can find
            # another process's write in its way, and then fails at once instead of waiting its busy timeout.
            self._connection.execute("BEGIN IMMEDIATE")

    def _opened(self) -> sqlite3.Connection:
        if self._connection is None:
            raise sqlite3.InterfaceError("the ledger's SQLite connection is not open")
        return self._connection

    def _commit(self) -> None:
        self._opened().execute("COMMIT")

    def _execute(self, sql: str, args: Sequence[Any]) -> None:
        self._opened().execute(sql, args)

    def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._opened().executemany(sql, rows)

    def _fetch(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        return list(self._opened().execute(sql, args).fetchall())

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            # Rolls back a transaction left open.
            connection.close()
        # The connection is dropped either way, and the next use opens a new one: nothing else to do.
        except sqlite3.Error as exc:
            _log.info("ledger_connection_close_failed", error_type=type(exc).__name__, error=_error_text(exc))


class _AsyncpgConnection(Protocol):
    """The part of `asyncpg.Connection` the ledger uses (asyncpg ships no type information)."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def executemany(self, command: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    def is_closed(self) -> bool: ...

    async def close(self) -> None: ...

    def terminate(self) -> None: ...


class _PostgresSession:
    def __init__(self, connection: _AsyncpgConnection) -> None:
        self._connection = connection

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._connection.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._connection.executemany(sql, rows)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        return list(await self._connection.fetch(sql, *args))


class _PostgresDatabase:
    """PostgreSQL through asyncpg: one connection, opened on first use and again after any failure."""

    dialect: Final = _POSTGRESQL

    def __init__(self, dsn: str, connect_options: Mapping[str, Any]) -> None:
        # Here, not at the top: a SQLite deployment never loads asyncpg (~3 MiB per process).
        import asyncpg

        self._connect: Callable[..., Awaitable[Any]] = asyncpg.connect
        self.errors: tuple[type[Exception], ...] = (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            # Refused connections, and asyncpg's own connect timeout.
            OSError,
        )
        self._dsn = dsn
        self._connect_options = dict(connect_options)
        self._connection: _AsyncpgConnection | None = None
        self._lock = asyncio.Lock()

    def transaction(self) -> AbstractAsyncContextManager[_Session]:
        return self._use(transaction=True)

    def connection(self) -> AbstractAsyncContextManager[_Session]:
        return self._use(transaction=False)

    @contextlib.asynccontextmanager
    async def _use(self, *, transaction: bool) -> AsyncIterator[_Session]:
        async with self._lock:
            connection = self._connection
            # A connection the server closed (a restart, an idle timeout) is noticed here, before a write fails on it.
            if connection is None or connection.is_closed():
                connection = self._connection = await self._open()
            try:
                if transaction:
                    await connection.execute("BEGIN")
                yield _PostgresSession(connection)
                if transaction:
                    await connection.execute("COMMIT")
            except BaseException:
                # After a failure the connection's state is unknown (a statement cut off by a timeout may still run
                # on the server): drop it, which also rolls back its transaction, rather than wait on a ROLLBACK.
                self._discard(connection)
                raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._lock.locked():
            # A usage query still runs on it: shutdown does not wait for it.
            connection.terminate()
            return
        try:
            async with asyncio.timeout(CONNECTION_CLOSE_TIMEOUT_SECONDS):
                await connection.close()
        # asyncpg has cut the connection off itself by then (TimeoutError is an OSError); shutdown goes on.
        except self.errors as exc:
            _log.info("ledger_connection_close_failed", error_type=type(exc).__name__, error=_error_text(exc))

    async def _open(self) -> _AsyncpgConnection:
        connection: _AsyncpgConnection = await self._connect(self._dsn, **self._connect_options)
        return connection

    def _discard(self, connection: _AsyncpgConnection) -> None:
        connection.terminate()
        if self._connection is connection:
            self._connection = None


def _open_database(url: DatabaseUrl, connect_options: Mapping[str, Any]) -> _Database:
    if url.dialect == SQLITE:
        return _SqliteDatabase(url.target, connect_options)
    return _PostgresDatabase(url.target, connect_options)


def _error_text(exc: BaseException) -> str:
    """The gist of a database error, short enough for a log line."""
    return (str(exc) or type(exc).__name__)[:ERROR_MESSAGE_LIMIT]


def _row_values(row: LedgerRow, timestamp: Callable[[datetime], Any]) -> tuple[Any, ...]:
    ts, *rest = _ROW_VALUES(row)
    return (timestamp(ts), *rest)


class _ThrottledWarning:
    """One recurring warning, logged at most once per interval with how many times it happened since the last line."""

    def __init__(self, event: str, *, count_field: str, interval_seconds: float = WARNING_INTERVAL_SECONDS) -> None:
        self._event = event
        self._count_field = count_field
        self._interval = interval_seconds
        self._pending = 0
        self._fields: dict[str, Any] = {}
        self._last_logged = -math.inf

    def note(self, count: int = 1, **context: Any) -> None:
        self._pending += count
        self._fields = context
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if self._pending and time.monotonic() - self._last_logged >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Log what is pending now, due or not (at shutdown, so no count goes unreported)."""
        if not self._pending:
            return
        _log.warning(self._event, **{self._count_field: self._pending}, **self._fields)
        self._pending = 0
        self._last_logged = time.monotonic()


class Ledger:
    """Writes `LedgerRow`s to the `llm_calls` table in the background, and answers usage queries.

    `record` must be called from the event loop's thread (it is not thread-safe), and never blocks or raises.
    """

    def __init__(
        self,
        url: str,
        *,
        flush_interval_seconds: float = DEFAULT_FLUSH_INTERVAL_SECONDS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        on_dropped: Callable[[int], None] | None = None,
        on_write_error: Callable[[], None] | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`connect_options` go to the driver's connect: `sqlite3.connect` (e.g. `timeout`) or `asyncpg.connect`
        (e.g. `server_settings`, `ssl`); `on_dropped(n)` is told of rows dropped from a full queue and
        `on_write_error()` of each failed attempt to reach or write the database, both for metrics."""
        if flush_interval_seconds <= 0 or retry_seconds <= 0:
            raise ValueError("flush_interval_seconds and retry_seconds must be positive")
        if batch_size < 1 or queue_limit < 1:
            raise ValueError("batch_size and queue_limit must be at least 1")
        self._url = url
        self._flush_interval = flush_interval_seconds
        self._batch_size = batch_size
        self._queue_limit = queue_limit
        self._retry_seconds = retry_seconds
        self._on_dropped = on_dropped
        self._on_write_error = on_write_error
        self._connect_options: Mapping[str, Any] = dict(connect_options or {})
        self._queue: collections.deque[LedgerRow] = collections.deque()
        self._dropped = 0
        self._db: _Database | None = None
        self._database = "(not started)"
        self._migrated = False
        self._failing = False
        self._stopping = False
        self._closed = False
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._drop_warning = _ThrottledWarning("ledger_rows_dropped", count_field="dropped")
        self._failure_warning = _ThrottledWarning("ledger_write_failed", count_field="failures")

    @property
    def queued(self) -> int:
        """Rows waiting to be written (not counting a batch being written right now)."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Rows dropped so far because the queue was full."""
        return self._dropped

    async def start(self) -> None:
        """Migrate the schema and start the writer. Raises ValueError for a URL it cannot use; a database it cannot
        reach is logged (`ledger_unavailable`) and retried in the background."""
        if self._db is not None or self._closed:
            raise RuntimeError("a Ledger starts once")
        url = parse_database_url(self._url)
        try:
            db = _open_database(url, self._connect_options)
        except ImportError as exc:
            # A driver missing from the install: configuration, not an outage.
            raise ValueError(f"cannot use a {url.dialect}:// database URL: {type(exc).__name__}: {exc}") from None
        self._db = db
        self._database = url.display
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
                await self._migrate(db)
        # Whatever stops the first migration (connection refused, a timeout, a driver error), the service starts
        # anyway: the writer keeps trying, and rows wait in the queue meanwhile.
        except Exception as exc:
            self._failing = True
            _log.warning(
                "ledger_unavailable",
                database=self._database,
                error_type=type(exc).__name__,
                error=_error_text(exc),
                retry_seconds=self._retry_seconds,
            )
            self._notify_write_error()
        else:
            _log.info("ledger_started", database=self._database, schema_version=SCHEMA_VERSION)
        self._writer = asyncio.create_task(self._run(), name="ledger-writer")
        self._writer.add_done_callback(self._writer_done)

    def record(self, row: LedgerRow) -> None:
        """Queue `row` for the writer; when the queue is full, the oldest row waiting is dropped to make room.
        After `aclose` no writer is left to write it: the row is dropped, and counted as such."""
        if self._closed:
            self._note_dropped(1)
            return
        if len(self._queue) >= self._queue_limit:
            self._queue.popleft()
            self._note_dropped(1)
        self._queue.append(row)
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    async def aclose(self, timeout_seconds: float = DEFAULT_CLOSE_TIMEOUT_SECONDS) -> None:
        """Stop the writer after one last flush (within `timeout_seconds`), then close the database connection.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wakeup.set()
        writer, self._writer = self._writer, None
        if writer is not None:
            done, _ = await asyncio.wait({writer}, timeout=timeout_seconds)
            if not done:
                writer.cancel()
                # The cancelled attempt puts its batch back in the queue, so what follows counts it as unwritten.
                await asyncio.wait({writer})
        self._drop_warning.flush()
        self._failure_warning.flush()
        if self._queue:
            _log.warning("ledger_rows_unwritten", rows=len(self._queue), database=self._database)
        if self._db is not None:
            await self._db.aclose()

    async def usage(self, *, start: datetime, end: datetime, group_by: GroupBy) -> list[dict[str, Any]]:
        """Calls, errors, cancellations and token sums for `start <= ts < end`, one dict per group, ordered by the
        group's value (None first). The group's value is under `group_by`'s own name: `key`, `model`, `user`, or
        `day` ("YYYY-MM-DD", the UTC date). Rows still queued are not counted yet.

        Raises ValueError for naive datetimes or an unknown grouping, LedgerUnavailableError when the database
        cannot answer or the ledger is closed.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("usage() needs timezone-aware start and end")
        if group_by not in GROUPINGS:
            raise ValueError(f"group_by must be one of {sorted(GROUPINGS)}, not {group_by!r}")
        db = self._db
        if db is None:
            raise RuntimeError("Ledger.usage() before Ledger.start()")
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed")
        dialect = db.dialect
        try:
            async with db.connection() as session:
                rows = await session.fetch(dialect.usage[group_by], (dialect.timestamp(start), dialect.timestamp(end)))
        except db.errors as exc:
            raise LedgerUnavailableError(f"the ledger database cannot answer: {_error_text(exc)}") from exc
        return [
            {
                group_by: group,
                "calls": int(calls),
                "errors": int(errors),
                "cancelled": int(cancelled),
                **{name: int(total) for name, total in zip(TOKEN_TOTALS, totals, strict=True)},
            }
            for group, calls, errors, cancelled, *totals in rows
        ]

    async def _migrate(self, db: _Database) -> None:
        """Bring the schema to SCHEMA_VERSION, in one transaction; safe to run from several instances at once."""
        dialect = db.dialect
        async with db.transaction() as session:
            if dialect.lock_migrations is not None:
                # Two instances starting together would both see version 0 and both create the tables: the second
                # waits here until the first commits, then finds the work done. The lock ends with the transaction.
                await session.execute(dialect.lock_migrations, (MIGRATION_LOCK_ID,))
            await session.execute(dialect.create_schema_versions)
            (found,), *_ = await session.fetch(dialect.schema_version)
            current = int(found) if found is not None else 0
            pending = [migration for migration in MIGRATIONS if migration.version > current]
            for migration in pending:
                for statement in migration.statements[dialect.name]:
                    await session.execute(statement)
                applied_at = dialect.timestamp(datetime.now(UTC))
                await session.execute(dialect.insert_schema_version, (migration.version, applied_at))
        if pending:
            _log.info("ledger_migrated", database=self._database, from_version=current, to_version=SCHEMA_VERSION)
        elif current > SCHEMA_VERSION:
            # A newer release migrated this database (a rollback?): its additions are unknown here, but writing the
            # columns this version knows still works as long as migrations only ever add.
            _log.warning("ledger_schema_newer", database=self._database, found=current, known=SCHEMA_VERSION)
        self._migrated = True

    async def _run(self) -> None:
        """The writer: wait for the interval (or a full batch), write, and on failure wait `retry_seconds`."""
        healthy = self._migrated
        while True:
            await self._pause(self._flush_interval if healthy else self._retry_seconds, until_batch=healthy)
            # Read before the attempt: a stop asked for during it still gets this attempt as its last flush.
            stopping = self._stopping
            healthy = await self._attempt()
            if stopping:
                return
            self._drop_warning.flush_if_due()
            self._failure_warning.flush_if_due()

    async def _pause(self, seconds: float, *, until_batch: bool) -> None:
        """Wait `seconds`, cut short by a stop, and with `until_batch` by a full batch waiting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._stopping and not (until_batch and len(self._queue) >= self._batch_size):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            # Reaching the deadline is the normal way out of the wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    async def _attempt(self) -> bool:
        """Migrate if that is still to do, then write every queued row in one transaction. False when it failed."""
        db = self._db
        if db is None:
            return False
        batch: list[LedgerRow] = []
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT_SECONDS):
                if not self._migrated:
                    await self._migrate(db)
                if self._queue:
                    batch = list(self._queue)
                    self._queue.clear()
                    timestamp = db.dialect.timestamp
                    async with db.transaction() as session:
                        await session.executemany(
                            db.dialect.insert_call, [_row_values(row, timestamp) for row in batch]
                        )
        except asyncio.CancelledError:
            self._requeue(batch)
            raise
        # The writer must outlive any failure: a dead writer would silently stop the ledger.
        except Exception as exc:
            self._requeue(batch)
            # The database may have been replaced or restored from a backup: check the schema again next time.
            self._migrated = False
            self._failing = True
            self._failure_warning.note(
                error_type=type(exc).__name__,
                error=_error_text(exc),
                queued=len(self._queue),
                retry_seconds=self._retry_seconds,
                database=self._database,
            )
            self._notify_write_error()
            return False
        if self._failing:
            self._failing = False
            self._failure_warning.flush()
            _log.info("ledger_available", database=self._database, written=len(batch), queued=len(self._queue))
        return True

    def _requeue(self, batch: list[LedgerRow]) -> None:
        """Put a batch that was not written back in front of the queue, in order, dropping the oldest over the
        limit (rows recorded while it was being written are newer: they stay)."""
        if not batch:
            return
        self._queue.extendleft(reversed(batch))
        excess = len(self._queue) - self._queue_limit
        if excess > 0:
            for _ in range(excess):
                self._queue.popleft()
            self._note_dropped(excess)

    def _note_dropped(self, count: int) -> None:
        self._dropped += count
        self._drop_warning.note(
            count, total_dropped=self._dropped, queue_limit=self._queue_limit, database=self._database
        )
        if self._on_dropped is not None:
            try:
                self._on_dropped(count)
            # A metrics callback must not break `record`, which promises never to raise.
            except Exception:
                _log.exception("ledger_callback_failed", callback="on_dropped")

    def _notify_write_error(self) -> None:
        if self._on_write_error is not None:
            try:
                self._on_write_error()
            # A metrics callback must not stop the writer.
            except Exception:
                _log.exception("ledger_callback_failed", callback="on_write_error")

    @staticmethod
    def _writer_done(task: asyncio.Task[None]) -> None:
        # `_run` handles every database failure itself; reaching here with an exception is a bug, and the ledger
        # has stopped writing: say so loudly instead of waiting for shutdown to notice.
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("ledger_writer_crashed", error_type=type(exc).__name__, exc_info=exc)
