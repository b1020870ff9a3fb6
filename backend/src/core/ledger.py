"""The usage ledger: one `llm_calls` row per LLM call, queued in memory and written in batches off the hot path.

`Ledger.record` only appends to a bounded in-memory queue; a background writer inserts what waits every
`flush_interval_seconds` (sooner when `batch_size` rows wait), in one transaction. A database that is down, at
start or later, costs no request anything: rows wait (the oldest are dropped when the queue is full, counted), and
the writer retries until it is back. The schema is versioned (`llm_schema_version`) and migrated on start.

SQLite (the default, a local file) and PostgreSQL give the same answers: timestamps are stored as UTC (naive UTC
text on SQLite, `TIMESTAMP WITH TIME ZONE` on PostgreSQL) and `Ledger.usage` groups by the UTC date on both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import structlog
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    case,
    cast,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_log = structlog.get_logger("ledger")

SQLITE: Final = "sqlite"
POSTGRESQL: Final = "postgresql"
# The plain schemes operators write, and the async driver each one runs on.
ASYNC_DRIVERS: Final[Mapping[str, str]] = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
URL_EXAMPLES: Final = "sqlite:///path/to/ledger.db or postgresql://user:password@host:5432/database"
SQLITE_IN_MEMORY: Final = ":memory:"

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
# Warnings about dropped rows and failed writes repeat for as long as the cause lasts: one line per interval, with
# the count since the previous line, keeps the log readable during an outage.
WARNING_INTERVAL_SECONDS: Final = 10.0
# Database error messages can be long (statements, parameters); a log line needs their gist.
ERROR_MESSAGE_LIMIT: Final = 300
# Any fixed 64-bit number works, as long as every instance uses the same one: it names the ledger's migration lock.
MIGRATION_LOCK_ID: Final = 0x6C65_6467_6572_0001
# The results of a usage query are ordered by the group value as bytes on both databases; PostgreSQL's default
# collation would otherwise order "B" and "a" differently from SQLite.
POSTGRES_BYTE_ORDER_COLLATION: Final = "C"

GroupBy = Literal["key", "model", "user", "day"]
# `usage(group_by=...)`: the llm_calls column behind each grouping (the day is computed from `ts`).
GROUP_COLUMNS: Final[Mapping[str, str]] = {"key": "key_name", "model": "model", "user": "user", "day": "ts"}
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


class LedgerUnavailableError(RuntimeError):
    """The ledger's database could not answer a query (down, unreachable, or not migrated yet)."""


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and read back timezone-aware, the same way on SQLite and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite has no time zones: it keeps naive UTC text, which compares and sorts the way time does because
        # every value is written in the same fixed-width format.
        return utc.replace(tzinfo=None) if dialect.name == SQLITE else utc

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

llm_calls = Table(
    "llm_calls",
    metadata,
    # SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid); PostgreSQL gets a 64-bit identity.
    Column("id", BigInteger().with_variant(Integer(), SQLITE), primary_key=True, autoincrement=True),
    Column("ts", UtcDateTime(), nullable=False),
    Column("request_id", String(), nullable=False),
    Column("route", String(), nullable=False),
    Column("key_name", String()),
    Column("user", String()),
    Column("model", String(), nullable=False),
    Column("upstream_model", String()),
    Column("stream", Boolean(), nullable=False),
    Column("status", Integer(), nullable=False),
    Column("code", String()),
    # 64-bit: a row the database refuses (an absurd count from an upstream) would stall the writer's retries.
    Column("prompt_tokens", BigInteger()),
    Column("completion_tokens", BigInteger()),
    Column("total_tokens", BigInteger()),
    Column("reasoning_tokens", BigInteger()),
    Column("cached_tokens", BigInteger()),
    Column("latency_ms", Double(), nullable=False),
    Column("ttft_ms", Double()),
    Column("cancelled", Boolean(), nullable=False),
    # Usage reports select a time range, overall or for one key.
    Index("ix_llm_calls_ts", "ts"),
    Index("ix_llm_calls_key_name_ts", "key_name", "ts"),
)

schema_versions = Table(
    "llm_schema_version",
    metadata,
    Column("version", Integer(), primary_key=True, autoincrement=False),
    Column("applied_at", UtcDateTime(), nullable=False),
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema, applied once, in order, inside the migration transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_llm_calls(connection: Connection) -> None:
    # `llm_calls` above is version 1 as it stands. When a later migration changes that table, this step must keep
    # creating version 1 (a copy of the table as it was), or a fresh database would get the change twice.
    # `checkfirst`: SQLite runs DDL outside the transaction, so a start cut short can leave the table without its
    # version row; the next start then finds the table there.
    llm_calls.create(connection, checkfirst=True)


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(version=1, description="create llm_calls and its indexes", apply=_create_llm_calls),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def database_url_for_engine(url: str) -> str:
    """The SQLAlchemy async URL for `url`: `sqlite:///path` runs on aiosqlite (the file's directory is created),
    `postgresql://` and `postgres://` on asyncpg; a URL that already names its driver is kept as it is.

    Raises ValueError for anything else. The message never repeats the URL: it may hold a password.
    """
    scheme, separator, rest = url.strip().partition("://")
    if not separator or not scheme:
        raise ValueError(f"the database URL is not a URL: expected {URL_EXAMPLES}")
    if "+" in scheme:
        engine_url = url.strip()
    elif scheme.lower() in ASYNC_DRIVERS:
        engine_url = f"{ASYNC_DRIVERS[scheme.lower()]}://{rest}"
    else:
        raise ValueError(f"unsupported database URL scheme {scheme!r}: expected {URL_EXAMPLES}")
    try:
        parsed = make_url(engine_url)
    # ValueError: a port that is not a number.
    except (ArgumentError, ValueError):
        # `from None`: SQLAlchemy's message quotes the whole URL, password included, and a chained exception would
        # print it in the traceback.
        raise ValueError(f"malformed {scheme}:// database URL (not shown: it may hold a password)") from None
    database = parsed.database
    if parsed.get_backend_name() == SQLITE and database and database != SQLITE_IN_MEMORY:
        directory = Path(database).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Not fatal here: the ledger reports the database as unavailable and keeps retrying, as for any outage.
            _log.warning("ledger_directory_failed", directory=str(directory), error=str(exc))
    return engine_url


def _error_text(exc: BaseException) -> str:
    """The gist of a database error: the driver's own message, without SQLAlchemy's statement and parameters."""
    cause = getattr(exc, "orig", None) or exc
    return (str(cause) or type(cause).__name__)[:ERROR_MESSAGE_LIMIT]


def _row_values(row: LedgerRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _ROW_FIELDS}


def _utc_day(ts: ColumnElement[datetime], dialect: str) -> ColumnElement[str]:
    """The UTC date of `ts` as "YYYY-MM-DD", computed by the database."""
    if dialect == POSTGRESQL:
        # timezone('UTC', timestamptz) is the UTC wall-clock time, whatever the session's TimeZone setting says.
        return func.to_char(func.timezone("UTC", ts), "YYYY-MM-DD", type_=String())
    # SQLite holds naive UTC text already: its date() is the UTC date.
    return func.date(ts, type_=String())


def _sum_or_zero(column: ColumnElement[Any]) -> ColumnElement[int]:
    # PostgreSQL sums BIGINT as NUMERIC (a Decimal in Python): cast back so both databases answer with ints.
    return cast(func.coalesce(func.sum(column), 0), BigInteger())


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
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`engine_options` go to `create_async_engine` (e.g. `connect_args`, pool sizes); `on_dropped(n)` is told
        of rows dropped from a full queue and `on_write_error()` of each failed attempt to reach or write the
        database, both for metrics."""
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
        # Stale pooled connections after a database restart would fail the first write: check them first.
        self._engine_options: dict[str, Any] = {"pool_pre_ping": True, **(engine_options or {})}
        self._queue: collections.deque[LedgerRow] = collections.deque()
        self._dropped = 0
        self._engine: AsyncEngine | None = None
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
        """Create the engine, migrate the schema, start the writer. Raises ValueError for a URL it cannot use;
        a database it cannot reach is logged (`ledger_unavailable`) and retried in the background."""
        if self._engine is not None or self._closed:
            raise RuntimeError("a Ledger starts once")
        engine_url = database_url_for_engine(self._url)
        try:
            engine = create_async_engine(engine_url, **self._engine_options)
        except (ArgumentError, InvalidRequestError, ImportError) as exc:
            # An unknown or synchronous driver: configuration, not an outage. The URL itself stays out of the
            # message (and of the chain, hence `from None`) because it may hold a password.
            scheme = engine_url.partition("://")[0]
            raise ValueError(f"cannot use a {scheme}:// database URL: {type(exc).__name__}") from None
        self._engine = engine
        self._database = engine.url.render_as_string(hide_password=True)
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT_SECONDS):
                await self._migrate(engine)
        # Whatever stops the first migration (connection refused, a timeout, a driver error SQLAlchemy does not
        # wrap), the service starts anyway: the writer keeps trying, and rows wait in the queue meanwhile.
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
        """Stop the writer after one last flush (within `timeout_seconds`), then close the engine. Idempotent."""
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
        if self._engine is not None:
            await self._engine.dispose()

    async def usage(self, *, start: datetime, end: datetime, group_by: GroupBy) -> list[dict[str, Any]]:
        """Calls, errors, cancellations and token sums for `start <= ts < end`, one dict per group, ordered by the
        group's value (None first). The group's value is under `group_by`'s own name: `key`, `model`, `user`, or
        `day` ("YYYY-MM-DD", the UTC date). Rows still queued are not counted yet.

        Raises ValueError for naive datetimes or an unknown grouping, LedgerUnavailableError when the database
        cannot answer.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("usage() needs timezone-aware start and end")
        if group_by not in GROUP_COLUMNS:
            raise ValueError(f"group_by must be one of {sorted(GROUP_COLUMNS)}, not {group_by!r}")
        engine = self._engine
        if engine is None:
            raise RuntimeError("Ledger.usage() before Ledger.start()")
        dialect = engine.dialect.name
        column = llm_calls.c[GROUP_COLUMNS[group_by]]
        group = _utc_day(llm_calls.c.ts, dialect) if group_by == "day" else column
        # Grouping a subquery's plain column, not an expression: PostgreSQL would not match a GROUP BY expression
        # with bound parameters (the day's format) to the same expression in the select list.
        calls = (
            select(
                group.label("group_value"),
                llm_calls.c.code,
                llm_calls.c.cancelled,
                *(llm_calls.c[name] for name in TOKEN_TOTALS),
            )
            .where(llm_calls.c.ts >= start, llm_calls.c.ts < end)
            .subquery("calls")
        )
        order: ColumnElement[Any] = calls.c.group_value
        if dialect == POSTGRESQL:
            order = order.collate(POSTGRES_BYTE_ORDER_COLLATION)
        query = (
            select(
                calls.c.group_value,
                func.count().label("calls"),
                func.count(calls.c.code).label("errors"),
                func.count(case((calls.c.cancelled, 1))).label("cancelled"),
                *(_sum_or_zero(calls.c[name]).label(name) for name in TOKEN_TOTALS),
            )
            .group_by(calls.c.group_value)
            .order_by(order.asc().nulls_first())
        )
        try:
            async with engine.connect() as connection:
                result = (await connection.execute(query)).mappings().all()
        # OSError: drivers raise connection failures as they are (asyncpg's refused connect), not wrapped.
        except (SQLAlchemyError, OSError) as exc:
            raise LedgerUnavailableError(f"the ledger database cannot answer: {_error_text(exc)}") from exc
        return [
            {
                group_by: row["group_value"],
                "calls": int(row["calls"]),
                "errors": int(row["errors"]),
                "cancelled": int(row["cancelled"]),
                **{name: int(row[name]) for name in TOKEN_TOTALS},
            }
            for row in result
        ]

    async def _migrate(self, engine: AsyncEngine) -> None:
        """Bring the schema to SCHEMA_VERSION, in one transaction; safe to run from several instances at once."""
        async with engine.begin() as connection:
            if connection.dialect.name == POSTGRESQL:
                # Two instances starting together would both see version 0 and both create the tables: the second
                # waits here until the first commits, then finds the work done. The lock ends with the transaction.
                await connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_ID)))
            await connection.run_sync(schema_versions.create, checkfirst=True)
            current = await self._schema_version(connection)
            pending = [migration for migration in MIGRATIONS if migration.version > current]
            for migration in pending:
                await connection.run_sync(migration.apply)
                await connection.execute(
                    insert(schema_versions).values(version=migration.version, applied_at=datetime.now(UTC))
                )
        if pending:
            _log.info("ledger_migrated", database=self._database, from_version=current, to_version=SCHEMA_VERSION)
        elif current > SCHEMA_VERSION:
            # A newer release migrated this database (a rollback?): its additions are unknown here, but writing the
            # columns this version knows still works as long as migrations only ever add.
            _log.warning("ledger_schema_newer", database=self._database, found=current, known=SCHEMA_VERSION)
        self._migrated = True

    @staticmethod
    async def _schema_version(connection: AsyncConnection) -> int:
        version = (await connection.execute(select(func.max(schema_versions.c.version)))).scalar_one()
        return int(version) if version is not None else 0

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
        engine = self._engine
        if engine is None:
            return False
        batch: list[LedgerRow] = []
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT_SECONDS):
                if not self._migrated:
                    await self._migrate(engine)
                if self._queue:
                    batch = list(self._queue)
                    self._queue.clear()
                    async with engine.begin() as connection:
                        await connection.execute(insert(llm_calls), [_row_values(row) for row in batch])
        except asyncio.CancelledError:
            self._requeue(batch)
            raise
        # The writer must outlive any failure: drivers raise their own errors too (OSError on a refused connect,
        # asyncpg's exceptions during connect), and a dead writer would silently stop the ledger.
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
