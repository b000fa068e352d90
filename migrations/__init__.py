"""Alembic migrations (async template). Run them with `creditpool migrate`; tests build their
schema the same way, never with `create_all`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

HERE = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["database_url"] = database_url
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    assert len(heads) == 1, f"migrations must have one head, found {heads}"
    return heads[0]


def upgrade(database_url: str, revision: str = "head") -> None:
    """Synchronous (Alembic runs its own event loop): call from a thread inside async code."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


async def database_revision(engine) -> str | None:
    """Readiness: the database answers, and at which migration its schema is."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        return await current_revision(conn)


async def current_revision(conn: AsyncConnection) -> str | None:
    return await conn.run_sync(lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision())
