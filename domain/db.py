"""Database access: the engine, and the one place that commits.

Every service that writes calls `Database.transaction(work)` (an ORM session) or, on the hot
path, `Database.sql_transaction(work)` (plain SQL on an asyncpg connection). Both run `work`
inside one transaction, commit, and retry the whole unit on a serialization failure or a
deadlock (bounded, with jitter). `Database.autocommit(work)` serves the hot path's one-statement
units (a generation's start or settlement written by a single statement, which commits by
itself). Nothing else in the code base commits.

Why two: a generation's start and settlement are most of the traffic, and through the ORM they
cost ~7 ms of CPU each (issue 8's profile: SQLAlchemy was half the server's time). The money
statements they share with the rest of the ledger (postings, idempotency claims, spend limits,
locks) are written once, as SQL against the `Sql` interface below, which both a plain asyncpg
transaction (`RawSql`) and an ORM session (`SessionSql`) provide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from domain.coalescing import Coalescer
from domain.errors import Unavailable
from domain.events import EventOutlet, NoOutlet

T = TypeVar("T")
log = logging.getLogger("creditpool.db")

# SQLSTATEs worth retrying a whole transaction for: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class Contended(Exception):
    """Run the unit again: an optimistic read it relied on went stale under concurrency."""


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, Contended):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate in RETRYABLE_SQLSTATES
    if not isinstance(exc, DBAPIError):
        return False
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return sqlstate in RETRYABLE_SQLSTATES


class Sql:
    """Plain SQL (`$1` placeholders) inside an open transaction; rows read by column name.
    `info` carries the transaction's events (`domain.events.emit`)."""

    __slots__ = ()
    info: dict[str, Any]

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    async def fetchrow(self, query: str, *args: Any) -> Any | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else next(iter(row.values()))

    async def execute(self, query: str, *args: Any) -> None:
        await self.fetch(query, *args)


class RawSql(Sql):
    """A transaction on a plain asyncpg connection (the hot path)."""

    __slots__ = ("conn", "info")

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.info = {}

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await self.conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any | None:
        return await self.conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> None:
        await self.conn.execute(query, *args)


class SessionSql(Sql):
    """The same statements inside an ORM session's transaction. Pending ORM changes are flushed
    first, as the session's autoflush would (a posting may refer to a grant just added)."""

    __slots__ = ("session", "info")

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.info = session.info

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        await self.session.flush()
        conn = await self.session.connection()
        result = await conn.exec_driver_sql(query, args)
        return [row._mapping for row in result] if result.returns_rows else []


def as_sql(session_or_sql: AsyncSession | Sql) -> Sql:
    return session_or_sql if isinstance(session_or_sql, Sql) else SessionSql(session_or_sql)


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    # asyncpg rolls back a transaction left open either way; its default reset would also send
    # `RESET ALL; UNLISTEN *; ...` on every release, a round trip per request for session state
    # these connections never change (no SET, LISTEN or session-level advisory locks).
    return None


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON in and out exactly as SQLAlchemy's asyncpg dialect sets it up, so one statement reads
    # and writes the same values through `RawSql` and `SessionSql`: text in, Python values out.
    for name, prefix in (("json", b""), ("jsonb", b"\x01")):
        await conn.set_type_codec(
            name, schema="pg_catalog", format="binary",
            encoder=lambda value, prefix=prefix: prefix + value.encode(),
            decoder=lambda data, skip=len(prefix): json.loads(data[skip:].decode()),
        )


_PREFIXES = ("postgresql+asyncpg://", "postgresql://", "postgres://")


def async_url(url: str) -> str:
    """Accept the usual `postgresql://` and `postgres://` spellings; SQLAlchemy needs the driver.
    Its asyncpg dialect passes the URL's options to `asyncpg.connect()` as keyword arguments,
    which takes `ssl` but not libpq's `sslmode` (what managed PostgreSQL hands out): renamed."""
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            return _renamed_option("postgresql+asyncpg://" + url[len(prefix):], "sslmode", "ssl")
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def dsn_url(url: str) -> str:
    """The same database as a DSN for `asyncpg.connect(dsn)` (the LISTEN connection), which reads
    libpq's spelling: `ssl` there would be sent as a server setting, which PostgreSQL refuses."""
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            return _renamed_option("postgresql://" + url[len(prefix):], "ssl", "sslmode")
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def _renamed_option(url: str, old: str, new: str) -> str:
    parts = urlsplit(url)
    options = parse_qsl(parts.query, keep_blank_values=True)
    if old not in (k for k, _ in options):
        return url  # untouched, byte for byte
    has_new = new in (k for k, _ in options)
    options = [(new if k == old else k, v) for k, v in options if not (k == old and has_new)]
    return urlunsplit(parts._replace(query=urlencode(options)))


def _report_orphaned_unit(unit: asyncio.Future) -> None:
    # A unit whose caller was cancelled: nobody awaits it any more, so its failure is logged here.
    if not unit.cancelled() and unit.exception() is not None:
        log.warning("a one-statement unit whose caller was cancelled failed", exc_info=unit.exception())


def _closed(conn: asyncpg.Connection) -> bool:
    """Whether a hot-path connection still in our hands has been closed under us. asyncpg
    detaches a pool connection from its proxy when it closes (every method then raises
    InterfaceError, `is_closed()` included); ours are released only once their unit is done, so
    a detached one was closed."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


@contextlib.contextmanager
def _refused_when_no_connection():
    # The ORM pool's checkout timeout. A session checks out its connection for its first
    # statement, so nothing of the unit has been sent when this is raised.
    try:
        yield
    except PoolTimeout:
        raise Unavailable() from None


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20, attempts: int = 5,
                 acquire_timeout: float = 10.0) -> None:
        self.url = async_url(url)
        self.engine: AsyncEngine = create_async_engine(
            # No pre-ping: it costs a round trip per checkout on the hot path. A dead connection
            # fails its statement, is discarded by the pool, and the request reports an error.
            self.url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=1800, pool_timeout=acquire_timeout
        )
        # How long a unit of work waits for a free connection before it is refused as
        # `Unavailable` (both pools): under overload a request fails fast, having sent nothing,
        # instead of queueing for as long as the client cares to wait.
        self._acquire_timeout = acquire_timeout
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=True)
        self._attempts = attempts
        self._pool_size = pool_size
        self._raw_pool: asyncpg.Pool | None = None
        self._raw_pool_lock: asyncio.Lock | None = None
        self.events: EventOutlet = NoOutlet()  # the app plugs its broadcaster in
        self._coalescers: dict[str, Coalescer] = {}

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=0.005, max=0.2),
            reraise=True,
        )

    async def transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in one ORM transaction and commit it."""
        async for attempt in self._retrying():
            with attempt, _refused_when_no_connection():
                async with self._sessions() as session:
                    async with session.begin():
                        value = await work(session)
                        events = session.info.pop("events", [])
                        if events:
                            await self.events.before_commit(SessionSql(session), events)
                    if events:
                        await self._after_commit(events)
                    return value
        raise AssertionError("unreachable")  # pragma: no cover

    async def sql_transaction(self, work: Callable[[RawSql], Awaitable[T]]) -> T:
        """Run `work` in one plain-SQL transaction and commit it (the hot path: no ORM)."""
        pool = await self._pool()
        async for attempt in self._retrying():
            with attempt:
                async with self._connection(pool) as conn:
                    sql = RawSql(conn)
                    async with conn.transaction():
                        value = await work(sql)
                        events = sql.info.pop("events", [])
                        if events:
                            await self.events.before_commit(sql, events)
                    if events:
                        await self._after_commit(events)
                    return value
        raise AssertionError("unreachable")  # pragma: no cover

    async def autocommit(self, work: Callable[[RawSql], Awaitable[T]], *, lost: T) -> T:
        """Run `work` on a hot-path connection outside any transaction: each statement commits
        by itself. For units whose reads may see different snapshots and whose writes are ONE
        statement (atomic on its own): no BEGIN/COMMIT round trips, and the row locks that
        statement takes are released inside PostgreSQL, never across an event-loop turn. No
        retry here: the caller decides what a failed statement means (the generation hot path
        falls back to `sql_transaction`). Events go out after the statement, as after a commit
        (with LISTEN/NOTIFY, a `pg_notify` of their own).

        A unit whose own connection was closed under it (its backend terminated, the server
        restarted, the socket reset) returns `lost`, whichever statement found it closed: the
        read, or the write of a request that waited in a coalescer queue while its idle
        connection died (asyncpg refuses it with InterfaceError before sending anything). The
        same errors on a connection still open (an InterfaceError is also asyncpg's answer to a
        programming error) are raised.

        Once begun, the unit runs to its end even if its caller is cancelled (a websocket
        client that closes, a server shutting down): its statement may be writing other
        requests' items too (a coalesced batch, which a cancelled leader would abort for all),
        and a write that commits must send its events, which here follow the commit (a caller
        cancelled while its item was written left its hold committed and never announced)."""
        unit = asyncio.ensure_future(self._autocommit(work, lost))
        try:
            return await asyncio.shield(unit)
        except asyncio.CancelledError:
            unit.add_done_callback(_report_orphaned_unit)
            raise

    async def _autocommit(self, work: Callable[[RawSql], Awaitable[T]], lost: T) -> T:
        pool = await self._pool()
        async with self._connection(pool) as conn:
            sql = RawSql(conn)
            try:
                value = await work(sql)
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
                if not _closed(conn):
                    raise
                return lost
            events = sql.info.pop("events", [])
            if events:
                try:
                    await self.events.before_commit(sql, events)
                except Exception:  # noqa: BLE001 - the write has committed: report, don't fail it
                    log.warning("notifying %d events after an autocommit write failed", len(events), exc_info=True)
                await self._after_commit(events)
            return value

    def coalescer(self, purpose: str, write: Callable[[Any, list], Awaitable[list]]) -> Coalescer:
        """The process's batcher of one-statement writes for `purpose` (created on first use)."""
        found = self._coalescers.get(purpose)
        if found is None:
            found = self._coalescers[purpose] = Coalescer(write)
        return found

    async def fetchrow(self, query: str, *args: Any) -> Any | None:
        """One statement on its own (autocommit: one round trip, atomic by itself)."""
        pool = await self._pool()
        async with self._connection(pool) as conn:
            return await conn.fetchrow(query, *args)

    @contextlib.asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A hot-path connection, or `Unavailable` when none comes free in time. Only the wait
        is timed: a statement that runs long is not cut off here."""
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout)
        except asyncio.TimeoutError:
            raise Unavailable() from None
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def _pool(self) -> asyncpg.Pool:
        # Created on first use, in the event loop that uses it (asyncpg connections belong to
        # one). Kept only once created: a failed or cancelled attempt leaves the next caller to
        # try again, so a database that was briefly unreachable does not break the process.
        if self._raw_pool is None:
            if self._raw_pool_lock is None:
                self._raw_pool_lock = asyncio.Lock()
            async with self._raw_pool_lock:
                if self._raw_pool is None:
                    self._raw_pool = await asyncpg.create_pool(
                        min_size=1, max_size=self._pool_size, init=_init_connection, reset=_nothing_to_reset,
                        max_inactive_connection_lifetime=1800, **self._connect_args(),
                    )
        return self._raw_pool

    def _connect_args(self) -> dict[str, Any]:
        """asyncpg's connect arguments read from the URL exactly as the engine reads them (so
        `?ssl=require` and the like mean the same to both pools), minus the dialect's own."""
        _, kwargs = self.engine.dialect.create_connect_args(make_url(self.url))
        for dialect_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"):
            kwargs.pop(dialect_only, None)
        return kwargs

    async def _after_commit(self, events) -> None:
        # The transaction is committed whatever happens here: a failed publish must not turn a
        # success into an error. Balance subscribers re-read on their own schedule as well.
        try:
            await self.events.after_commit(events)
        except Exception:  # noqa: BLE001
            log.warning("publishing %d events after commit failed", len(events), exc_info=True)

    async def read(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` without committing: closing the session rolls the connection back (and,
        unlike `rollback()`, leaves the loaded objects readable)."""
        with _refused_when_no_connection():
            async with self._sessions() as session:
                return await work(session)

    async def dispose(self) -> None:
        if self._raw_pool is not None:
            pool, self._raw_pool = self._raw_pool, None
            await pool.close()
        await self.engine.dispose()
