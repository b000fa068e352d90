"""The schema is built only by migrations; they go up, down and up again, and agree with the models."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

import migrations
from domain.db import Database
from domain.models import Base


async def test_upgrade_downgrade_upgrade_round_trip(pg_server):
    url = await pg_server.create_database("creditpool_migrations")
    await asyncio.to_thread(migrations.upgrade, url)
    await asyncio.to_thread(migrations.downgrade, url, "base")
    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            tables = (await conn.execute(text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name <> 'alembic_version'"
            ))).scalar_one()
            assert tables == 0
        await asyncio.to_thread(migrations.upgrade, url)
        async with db.engine.connect() as conn:
            assert await migrations.current_revision(conn) == migrations.head_revision()
    finally:
        await db.dispose()


async def test_models_and_migrations_agree(database_url):
    db = Database(database_url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata)
            )
    finally:
        await db.dispose()
    assert diff == []
