"""Shared fixtures: a real PostgreSQL (embedded unless CREDITPOOL_TEST_DATABASE_URL names a
server), a fresh database built by the real Alembic migrations, the real app served by a real
uvicorn on a loopback port, and `gql` clients over HTTP and websockets."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import uvicorn
from sqlalchemy import text
from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.websockets import WebsocketsTransport

import migrations
from api.app import create_app
from api.cli import KEEP_ALIVE_SECONDS
from api.embedded import start_embedded_postgres
from api.settings import Settings
from domain import identity
from domain.pricing import Modality
from domain.pricing import service as pricing
from domain.clock import OffsetClock
from domain.db import Database
from domain.ledger.payments import ScriptedProvider

TEST_DB_ENV = "CREDITPOOL_TEST_DATABASE_URL"
# The embedded test server's connection limit (PostgreSQL's default: 100). The suite's pools
# keep up to about 50 connections open at once (`DB_POOL_SIZE`), so a test that opens many
# more never meets "too many clients". A server named by TEST_DB_ENV keeps its own setting:
# what keeps the suite within the default 100 there is the modest pools.
EMBEDDED_MAX_CONNECTIONS = 300


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class HeldLock:
    """Another transaction, on a connection of its own, holding a row lock (`mode`) as concurrent
    work does (a member change holds its workspace row FOR UPDATE, a spend in flight its member
    row FOR KEY SHARE...): for tests of who must wait on it, who must not, and what is seen once
    it commits. `conn` is that transaction's connection, to change rows under the lock."""

    def __init__(self, database_url: str, table: str, row_id: str | uuid.UUID, mode: str = "FOR UPDATE",
                 *, timeout: float = 10) -> None:
        self.database_url, self.table, self.mode, self.timeout = database_url, table, mode, timeout
        self.row = row_id if isinstance(row_id, uuid.UUID) else uuid.UUID(row_id)

    async def __aenter__(self) -> HeldLock:
        self.conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        self.tx = self.conn.transaction()
        await self.tx.start()
        assert await self.conn.fetchval(f"SELECT 1 FROM {self.table} WHERE id = $1 {self.mode}", self.row)
        return self

    async def waited_on(self) -> None:
        """Until another session waits for a lock this transaction holds."""
        watcher = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            async with asyncio.timeout(self.timeout):
                while not await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    self.conn.get_server_pid(),
                ):
                    await asyncio.sleep(0.02)
        finally:
            await watcher.close()

    async def commit(self) -> None:
        await self.tx.commit()
        self.tx = None

    async def __aexit__(self, *exc) -> None:
        if self.tx is not None:
            await self.tx.rollback()
        await self.conn.close()


class PgServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    async def create_database(self, prefix: str = "creditpool_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(asyncpg_dsn(self.admin_url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(self.admin_url))
        try:
            for name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[PgServer]:
    url = os.environ.get(TEST_DB_ENV)
    tmp = None
    if not url:
        tmp = tempfile.mkdtemp(prefix="creditpool-test-")
        url = start_embedded_postgres(Path(tmp), max_connections=EMBEDDED_MAX_CONNECTIONS)
    server = PgServer(url)
    yield server
    await server.drop_all()


# The price list every test database starts with: flat prices for the ledger tests, metered
# ones for the pricing tests. No time windows, so no test's price depends on the hour it runs.
TEST_MODELS = {
    "sdxl": (Modality.IMAGE, {"base": "5"}),
    "dalle-3": (Modality.IMAGE, {"base": "10"}),
    "video-standard": (Modality.VIDEO, {"base": "50"}),
    "test-six": (Modality.IMAGE, {"base": "6"}),
    "test-three": (Modality.IMAGE, {"base": "3"}),
    "test-free": (Modality.OTHER, {}),
    "test-video": (Modality.VIDEO, {
        "per_second": "10", "resolution_tiers": {"480p": "0.5", "720p": "1", "1080p": "1.5"},
        "input_type_multipliers": {"text-to-video": "1", "image-to-video": "0.8"},
        "defaults": {"seconds": 5, "resolution": "720p", "input_type": "text-to-video"}, "limits": {"seconds": 10}}),
    "test-text": (Modality.TEXT, {
        "per_1k_input_tokens": "1", "per_1k_output_tokens": "4", "minimum": "1",
        "defaults": {"input_tokens": 1000, "output_tokens": 500}, "limits": {"output_tokens": 8000}}),
    "test-files": (Modality.AUDIO, {
        "per_mb": "0.1", "file_tiers": [{"above_mb": "10", "rate_factor": "0.7"}], "limits": {"file_mb": 100}}),
}


def catalog_models(overrides: dict | None = None, retired: frozenset[str] = frozenset()) -> list:
    models = {**TEST_MODELS, **(overrides or {})}
    return [pricing.build_model(key, key, "test", modality, spec, active=key not in retired)
            for key, (modality, spec) in models.items()]


async def publish_test_catalog(db: Database, overrides: dict | None = None, *, retired=frozenset(), windows=()):
    """A new price list version: the test models plus `overrides`, in force from now (a tie on
    the effective time goes to the higher version, so it supersedes anything published before).
    Every version keeps every test model, so tests that run later still find their prices."""
    return await db.transaction(lambda s: pricing.insert_price_list(
        s, models=catalog_models(overrides, frozenset(retired)), windows=windows, plan_multipliers={},
        note="test catalog", published_by=None, effective_at=datetime.now(UTC),
    ))


async def _publish_first_catalog(db: Database) -> None:
    await db.transaction(lambda s: pricing.insert_price_list(
        s, models=catalog_models(), windows=(), plan_multipliers={}, note="test catalog", published_by=None,
        effective_at=datetime.now(UTC) - timedelta(days=1),
    ))


@asynccontextmanager
async def own_database(pg_server: PgServer, prefix: str, *, pool_size: int = 5,
                       catalog: bool = True) -> AsyncIterator[tuple[str, Database]]:
    """A database of a module's or a test's own, migrated (with the test catalog in force since
    yesterday unless `catalog` is False), and a `Database` on it: for tests whose scheduler
    ticks or counts must not meet other tests' rows. Pools small: they come on top of the
    session's (see the pool sizes below)."""
    url = await pg_server.create_database(prefix)
    await asyncio.to_thread(migrations.upgrade, url)
    db = Database(url, pool_size=pool_size)
    try:
        if catalog:
            await _publish_first_catalog(db)
        yield url, db
    finally:
        await db.dispose()


@pytest.fixture(scope="session")
async def database_url(pg_server: PgServer) -> str:
    url = await pg_server.create_database()
    await asyncio.to_thread(migrations.upgrade, url)
    db = Database(url, pool_size=1)
    try:
        await _publish_first_catalog(db)
    finally:
        await db.dispose()
    return url


# Pool sizes. A `Database` keeps two pools of `pool_size` (the ORM's, which may overflow by 20
# for a burst and closes those after it, and the hot path's asyncpg pool), and each keeps what
# it opened: what the suite holds open is about twice the sum of the pool sizes alive at once
# (this one and the live server's for the whole session, a module's own server and database for
# some), not what a test needs. Kept to the service's default (`db_pool_size` 10): a burst of
# concurrent requests waits a moment for a connection, as it would in production.
DB_POOL_SIZE = 10


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=DB_POOL_SIZE)
    yield database
    await database.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The real app on a real uvicorn. Its clock and payment provider are the two seams tests
    steer: `clock.offset` moves time (reset it in a finally), `payments.failures` makes the
    next N payments fail."""

    def __init__(self, url: str, **settings) -> None:
        self.clock = OffsetClock()
        self.payments = ScriptedProvider()
        port = free_port()
        self.http_url = f"http://127.0.0.1:{port}/graphql"
        self.ws_url = f"ws://127.0.0.1:{port}/graphql"
        self.base_url = f"http://127.0.0.1:{port}"
        # Streams re-check access every half second, so revocation tests stay short. The
        # scheduler is off: tests that move time run `tick` themselves, at the time they choose.
        settings = {"db_pool_size": DB_POOL_SIZE, "live_recheck_seconds": 0.5, "balance_debounce_ms": 20,
                    "scheduler_interval_seconds": 0, **settings}
        app = create_app(Settings(database_url=url, **settings), database_url=url, clock=self.clock,
                         payments=self.payments)
        # As `creditpool serve`: with uvicorn's 5 s, a client idle about that long (the edge fuzz
        # test's HTTP sessions while its subscriptions run) could reuse a connection just as the
        # server closed it (a broken pipe).
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio",
                                timeout_keep_alive=KEEP_ALIVE_SECONDS)
        self.server = uvicorn.Server(config)
        # Its own thread and event loop, like a separate process would be: the tests' client
        # traffic and the server's work never share a loop.
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@asynccontextmanager
async def orm_pool_taken(database_url: str) -> AsyncIterator[tuple[Database, Callable[[], Awaitable[None]]]]:
    """A `Database` whose ORM pool has one connection, held by a transaction until `release()`
    (or the block's end); its hot-path pool is free. What runs on the ORM pool meanwhile hears
    `Unavailable`."""
    tiny = Database(database_url, pool_size=1, max_overflow=0, acquire_timeout=0.2)
    busy, done = asyncio.Event(), asyncio.Event()

    async def keep(session):
        await session.execute(text("SELECT 1"))
        busy.set()
        await done.wait()

    keeper = asyncio.ensure_future(tiny.transaction(keep))

    async def release() -> None:
        done.set()
        await keeper

    try:
        await busy.wait()
        yield tiny, release
    finally:
        await release()
        await tiny.dispose()


@pytest.fixture(scope="session")
def live_server(database_url: str):
    server = LiveServer(database_url)
    server.start()
    yield server
    server.stop()


# --- identities --------------------------------------------------------------------------

def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.test"


async def new_user(db: Database, *, operator: bool = False, prefix: str = "user") -> tuple[str, str]:
    """A fresh user; returns (email, token)."""
    email = unique_email(prefix)
    return email, await identity.cli_user_token(db, email, operator=operator)


async def new_service_token(db: Database) -> str:
    return await identity.cli_service_token(db, f"worker-{uuid.uuid4().hex[:8]}")


# --- gql clients ---------------------------------------------------------------------------

class Api:
    """A signed-in gql session over real HTTP."""

    def __init__(self, session) -> None:
        self.session = session

    async def __call__(self, query: str, **variables):
        request = gql(query)
        request.variable_values = variables or None
        return await self.session.execute(request)

    def subscribe(self, query: str, **variables):
        request = gql(query)
        request.variable_values = variables or None
        return self.session.subscribe(request)


@asynccontextmanager
async def http_client(server: LiveServer, token: str | None) -> AsyncIterator[Api]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = AIOHTTPTransport(url=server.http_url, headers=headers, ssl=False)
    async with Client(transport=transport, fetch_schema_from_transport=False, execute_timeout=60) as session:
        yield Api(session)


@asynccontextmanager
async def ws_client(server: LiveServer | str, token: str | None, **kwargs) -> AsyncIterator[Api]:
    payload = {"Authorization": f"Bearer {token}"} if token else {}
    url = server if isinstance(server, str) else server.ws_url
    transport = WebsocketsTransport(url=url, init_payload=payload, **kwargs)
    async with Client(transport=transport, fetch_schema_from_transport=False) as session:
        yield Api(session)


@pytest.fixture
def client(live_server):
    return lambda token: http_client(live_server, token)
