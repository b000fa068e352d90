"""The schema is built only by migrations; they go up, down and up again, and agree with the models."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

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


async def test_0009_gives_running_periods_the_end_of_the_workspaces_calendar(pg_server):
    """Usage rows and auto top-up months get their end from the workspace's timezone: one period
    after a start on its calendar, and the nearest boundary for a start left by an earlier
    timezone (a UTC month in a workspace now in New York)."""
    url = await pg_server.create_database("creditpool_migration_0009")
    await asyncio.to_thread(migrations.upgrade, url, "0008")
    db = Database(url, pool_size=1)
    ws, user, pack = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    limits = {period: uuid.uuid4() for period in ("DAY", "WEEK", "MONTH")}
    starts = {  # (limit, start) -> the end 0009 must give it
        ("MONTH", "2027-02-01T05:00:00+00:00"): "2027-03-01T05:00:00+00:00",  # New York's February
        ("MONTH", "2027-03-01T00:00:00+00:00"): "2027-04-01T04:00:00+00:00",  # UTC's March: nearest
        ("WEEK", "2027-03-08T05:00:00+00:00"): "2027-03-15T04:00:00+00:00",  # over the clock change
        ("DAY", "2027-03-14T05:00:00+00:00"): "2027-03-15T04:00:00+00:00",  # a 23-hour day
    }
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO workspaces (id, name, plan_id, period_start, billing_anchor, next_renewal_at, timezone) "
                "SELECT :ws, 'NY', id, now(), now(), now() + interval '1 month', 'America/New_York' "
                "FROM plans WHERE key = 'team'"), {"ws": ws})
            for period, limit in limits.items():
                await conn.execute(text(
                    "INSERT INTO spend_limits (id, workspace_id, scope, period, amount_units, action) "
                    "VALUES (:id, :ws, 'WORKSPACE', :period, 1000, 'BLOCK')"), {"id": limit, "ws": ws, "period": period})
            for period, start in starts:
                await conn.execute(text("INSERT INTO limit_usage (limit_id, period_start, used_units) "
                                        "VALUES (:limit, :start, 0)"),
                                   {"limit": limits[period], "start": datetime.fromisoformat(start)})
            await conn.execute(text("INSERT INTO users (id, kind, name) VALUES (:id, 'service', 'worker')"), {"id": user})
            await conn.execute(text("INSERT INTO credit_packs (id, name, units, price_minor, currency) "
                                    "VALUES (:id, 'pack', 500000, 4500, 'USD')"), {"id": pack})
            await conn.execute(text(
                "INSERT INTO auto_topups (workspace_id, enabled, threshold_units, pack_id, monthly_max_purchases, "
                "monthly_max_units, enabled_by, month_start) VALUES (:ws, true, 1000, :pack, 5, 5000000, :user, "
                "'2027-02-01T00:00:00+00:00')"), {"ws": ws, "pack": pack, "user": user})
        await asyncio.to_thread(migrations.upgrade, url)
        async with db.engine.connect() as conn:
            ends = {(period, start.isoformat()): end.isoformat() for period, start, end in (await conn.execute(text(
                "SELECT l.period, u.period_start, u.period_end FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id "
                "ORDER BY 2"))).all()}
            month_end = (await conn.execute(text("SELECT month_end FROM auto_topups"))).scalar_one()
    finally:
        await db.dispose()
    assert ends == starts
    assert month_end.isoformat() == "2027-03-01T05:00:00+00:00"


async def test_0011_turns_latches_left_off_into_claims_in_flight(pg_server):
    """A latch already off when 0011 runs is a claim of unknown age: it counts as made then (so
    it is taken over after the timeout, not at once), for the pack its retry would have asked
    for; a latch on has no claim."""
    url = await pg_server.create_database("creditpool_migration_0011")
    await asyncio.to_thread(migrations.upgrade, url, "0010")
    db = Database(url, pool_size=1)
    user, configured, unanswered = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rows = {uuid.uuid4(): (True, None), uuid.uuid4(): (False, None), uuid.uuid4(): (False, unanswered)}
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("INSERT INTO users (id, kind, name) VALUES (:id, 'service', 'worker')"), {"id": user})
            for pack in (configured, unanswered):
                await conn.execute(text("INSERT INTO credit_packs (id, name, units, price_minor, currency) "
                                        "VALUES (:id, 'pack', 500000, 4500, 'USD')"), {"id": pack})
            for ws, (armed, retry) in rows.items():
                await conn.execute(text(
                    "INSERT INTO workspaces (id, name, plan_id, period_start, billing_anchor, next_renewal_at) "
                    "SELECT :ws, 'ws', id, now(), now(), now() + interval '1 month' FROM plans WHERE key = 'team'"),
                    {"ws": ws})
                await conn.execute(text(
                    "INSERT INTO auto_topups (workspace_id, enabled, threshold_units, pack_id, monthly_max_purchases, "
                    "monthly_max_units, enabled_by, armed, sequence, unanswered_pack_id) VALUES (:ws, true, 1000, :pack, "
                    "5, 5000000, :user, :armed, 1, :retry)"),
                    {"ws": ws, "pack": configured, "user": user, "armed": armed, "retry": retry})
            before = (await conn.execute(text("SELECT now()"))).scalar_one()
        await asyncio.to_thread(migrations.upgrade, url)
        async with db.engine.connect() as conn:
            after = {r.workspace_id: r for r in (await conn.execute(text(
                "SELECT workspace_id, armed, claimed_at, claimed_pack_id FROM auto_topups"))).all()}
    finally:
        await db.dispose()
    on, off, off_retrying = rows
    assert (after[on].claimed_at, after[on].claimed_pack_id) == (None, None)
    assert after[off].claimed_at >= before and after[off].claimed_pack_id == configured
    assert after[off_retrying].claimed_at >= before and after[off_retrying].claimed_pack_id == unanswered


async def test_0012_keeps_the_oldest_of_same_named_service_accounts_and_renames_the_others(pg_server):
    """Service account names become unique. Duplicates made before (two `create-service-token`
    runs racing) keep their ids, tokens and history; the oldest keeps the name (the one the CLI
    picked), each other one gets its id appended, within the 100 characters a name may have."""
    url = await pg_server.create_database("creditpool_migration_0012")
    await asyncio.to_thread(migrations.upgrade, url, "0011")
    db = Database(url, pool_size=1)
    long_name = "w" * 100
    accounts = {  # id -> (name, created_at)
        uuid.uuid4(): ("worker", "2026-01-01T00:00:00+00:00"),
        uuid.uuid4(): ("worker", "2026-01-02T00:00:00+00:00"),
        uuid.uuid4(): ("worker", "2026-01-03T00:00:00+00:00"),
        uuid.uuid4(): (long_name, "2026-01-01T00:00:00+00:00"),
        uuid.uuid4(): (long_name, "2026-01-02T00:00:00+00:00"),
        uuid.uuid4(): ("other", "2026-01-01T00:00:00+00:00"),
    }
    human = uuid.uuid4()
    try:
        async with db.engine.begin() as conn:
            for user, (name, at) in accounts.items():
                await conn.execute(text("INSERT INTO users (id, kind, name, created_at) VALUES (:id, 'service', :n, :at)"),
                                   {"id": user, "n": name, "at": datetime.fromisoformat(at)})
                await conn.execute(text("INSERT INTO api_tokens (id, user_id, name, token_hash) "
                                        "VALUES (gen_random_uuid(), :id, 'cli', :hash)"), {"id": user, "hash": uuid.uuid4().bytes * 2})
            await conn.execute(text("INSERT INTO users (id, kind, name, email) VALUES (:id, 'human', 'worker', "
                                    "'worker@example.test')"), {"id": human})
        await asyncio.to_thread(migrations.upgrade, url)
        async with db.engine.begin() as conn:
            names = dict((await conn.execute(text("SELECT id, name FROM users WHERE kind = 'service'"))).all())
            owners = set((await conn.execute(text("SELECT user_id FROM api_tokens"))).scalars())
            # A human may share a service account's name; two service accounts may not.
            await conn.execute(text("INSERT INTO users (id, kind, name, email) VALUES (gen_random_uuid(), 'human', "
                                    "'other', 'other@example.test')"))
        async with db.engine.begin() as conn:
            duplicate = await conn.execute(text(
                "INSERT INTO users (id, kind, name) VALUES (gen_random_uuid(), 'service', 'other') "
                "ON CONFLICT DO NOTHING RETURNING id"))
            assert duplicate.all() == []
    finally:
        await db.dispose()
    w1, w2, w3, l1, l2, other = accounts
    assert names == {w1: "worker", w2: f"worker ({w2})", w3: f"worker ({w3})",
                     l1: long_name, l2: f"{long_name[:100 - 39]} ({l2})", other: "other"}
    assert all(len(n) <= 100 for n in names.values())
    assert owners == set(accounts)  # every token still belongs to its account


async def test_0014_gives_each_workspace_its_plans_rollover_rule_for_the_current_period(pg_server):
    """Until 0014 the close applied the plan's rule as it was at the close: the current period's
    copy starts as that rule (what the next close would have applied), per workspace and plan."""
    url = await pg_server.create_database("creditpool_migration_0014")
    await asyncio.to_thread(migrations.upgrade, url, "0013")
    db = Database(url, pool_size=1)
    rolling, plain = uuid.uuid4(), uuid.uuid4()
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO plans (id, key, name, seat_cap, free_creator_seats, included_units, rollover_policy, "
                "rollover_cap_units, rollover_cap_percent, rollover_periods) "
                "VALUES (gen_random_uuid(), 'rolling', 'Rolling', 5, 1, 100000, 'ROLLOVER', 40000, 25, 3)"))
            for ws, plan in ((rolling, "rolling"), (plain, "team")):
                await conn.execute(text(
                    "INSERT INTO workspaces (id, name, plan_id, period_start, billing_anchor, next_renewal_at) "
                    "SELECT :ws, 'ws', id, now(), now(), now() + interval '1 month' FROM plans WHERE key = :plan"),
                    {"ws": ws, "plan": plan})
        await asyncio.to_thread(migrations.upgrade, url)
        async with db.engine.begin() as conn:
            rules = {r.id: tuple(r)[1:] for r in (await conn.execute(text(
                "SELECT id, period_rollover_policy, period_rollover_cap_units, period_rollover_cap_percent, "
                "period_rollover_periods FROM workspaces"))).all()}
            team = tuple((await conn.execute(text(
                "SELECT rollover_policy, rollover_cap_units, rollover_cap_percent, rollover_periods FROM plans "
                "WHERE key = 'team'"))).one())
        async with db.engine.begin() as conn:
            with pytest.raises(IntegrityError):  # the plan's own bounds hold for the copy
                await conn.execute(text("UPDATE workspaces SET period_rollover_cap_percent = 101"))
    finally:
        await db.dispose()
    assert rules == {rolling: ("ROLLOVER", 40000, 25, 3), plain: team}


async def test_0015_a_limits_approved_overages_are_summed_through_an_index(database_url):
    """Every start under a spend limit sums its period's approved overages (`limits._approved`,
    in `_CHARGE`); the table holds every request of every workspace ever made, so the sum must
    find the limit's period by an index, not by reading them all."""
    from domain.governance.limits import _approved

    db = Database(database_url, pool_size=1)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(text("SET LOCAL enable_seqscan = off"))  # an empty table would be scanned anyway
            plan = (await conn.execute(
                text("EXPLAIN (FORMAT JSON) SELECT "
                     + _approved("CAST(:l AS uuid)", "CAST(:p AS timestamptz)", "CAST(:n AS timestamptz)")),
                {"l": str(uuid.uuid4()), "p": datetime(2026, 11, 1), "n": datetime(2026, 11, 22)})).scalar_one()
    finally:
        await db.dispose()

    def scans(node):
        yield node
        for child in node.get("Plans", []):
            yield from scans(child)

    found = [n for n in scans(plan[0]["Plan"]) if n.get("Relation Name") == "overage_requests"]
    assert [n.get("Index Name") for n in found] == ["ix_overage_requests_limit_period"]
    assert "limit_id" in found[0]["Index Cond"] and "period_start" in found[0]["Index Cond"]
