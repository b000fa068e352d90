"""The generation hot path's plain-SQL transactions (issue 8): a hold planned from an unlocked,
stale read of the grants is refused by the database and re-planned under lock; the posting
statement returns exactly what it wrote; authentication is one statement."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from domain import identity
from domain.db import Database
from domain.ledger.consumption import NotEnough, plan_draws
from domain.ledger.models import Cause, EntryKind
from domain.ledger.service import Optimistic, Posting, SpendScope, _spendable_buckets
from tests.conftest import new_user
from tests.test_api_ledger import START, assert_ledger_clean, balance, grant, key, make_team


async def test_a_hold_planned_from_a_stale_read_is_refused_by_the_database_and_retried_under_lock(db, client):
    team = await make_team(db, client, creators=1)
    given = await grant(client, team, "10")
    ws = uuid.UUID(team.ws)
    creator, member = team.creators[0]
    effective = datetime.fromisoformat(given["effectiveAt"])
    optimistic = Optimistic()
    attempts: list[bool] = []
    other: list[dict] = []

    async def work(sql):
        attempts.append(optimistic.lock_first)
        rows = await optimistic.spendable(sql, ws, SpendScope(pool=True), effective)
        if not other:
            # After our unlocked read, another start takes 6 of the 10 credits and commits
            # (it does not wait for us: we hold no lock on the grant).
            async with client(creator) as api:
                other.append((await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"])
        try:
            draws = plan_draws(_spendable_buckets(rows), 6_000, effective)
        except NotEnough as short:
            return ("refused", short.needed, short.available)
        posting = Posting(ws, Cause.ADJUSTMENT, None, None, member_id=uuid.UUID(member), occurred_at=effective)
        for d in draws:
            posting.add(d.grant_id, EntryKind.HOLD, d.units)
        await optimistic.post(sql, posting)  # 10 read, 4 left: the CHECK constraint refuses it
        return ("held",)

    outcome = await db.sql_transaction(work)
    assert other[0]["__typename"] == "Generation"
    # First attempt planned from the stale read; the retry locked first and saw the 4 credits left.
    assert attempts == [False, True]
    assert outcome == ("refused", 6_000, 4_000)
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("6.000", "4.000")
    await assert_ledger_clean(db, team.ws)


async def test_the_posting_statement_returns_the_grants_and_entries_it_wrote(db, client):
    team = await make_team(db, client, creators=1)
    first = await grant(client, team, "3", priority=1)
    second = await grant(client, team, "10", priority=2)
    creator, member = team.creators[0]
    async with client(creator) as api:  # test-six: 6 credits, 3 from the first grant, 3 from the second
        out = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
    assert out["__typename"] == "Generation"
    assert [(h["grant"]["id"], h["held"]) for h in out["holds"]] == [(first["id"], "3.000"), (second["id"], "3.000")]
    # The same figures as a fresh read of the database.
    rows = await db.fetchrow(
        "SELECT array_agg(remaining ORDER BY priority) AS remaining, array_agg(held ORDER BY priority) AS held "
        "FROM grants WHERE workspace_id = $1", uuid.UUID(team.ws))
    assert (rows["remaining"], rows["held"]) == ([0, 7_000], [3_000, 3_000])
    await assert_ledger_clean(db, team.ws)


async def test_authentication_refreshes_last_used_at_most_once_a_minute_in_one_statement(db):
    email, secret = await new_user(db)
    actor = await identity.authenticate_secret(db, secret)
    assert actor is not None
    assert await db.fetchrow("SELECT 1 FROM users WHERE id = $1 AND email = $2", actor.user_id, email) is not None
    touched = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert touched["last_used_at"] is not None
    await identity.authenticate_secret(db, secret)
    again = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert again["last_used_at"] == touched["last_used_at"]  # within the minute: a pure read
    await db.fetchrow("UPDATE api_tokens SET last_used_at = last_used_at - interval '61 seconds' WHERE id = $1",
                      actor.token_id)
    await identity.authenticate_secret(db, secret)  # over a minute old: refreshed to now
    later = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert later["last_used_at"] > touched["last_used_at"] - timedelta(seconds=1)
    assert await identity.authenticate_secret(db, secret + "x") is None
    await db.fetchrow("UPDATE api_tokens SET revoked_at = now() WHERE id = $1", actor.token_id)
    assert await identity.authenticate_secret(db, secret) is None


async def test_a_cancelled_first_use_of_the_hot_path_pool_does_not_break_later_requests(database_url):
    fresh = Database(database_url, pool_size=2)
    try:
        first = asyncio.ensure_future(fresh.fetchrow("SELECT 1 AS one"))
        await asyncio.sleep(0)  # the pool is being created
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await fresh.fetchrow("SELECT 1 AS one"))["one"] == 1
    finally:
        await fresh.dispose()


async def test_the_hot_path_pool_reads_url_options_as_the_engine_does(database_url):
    # `ssl` is SQLAlchemy's spelling for asyncpg; passed on raw it would be sent as a server setting.
    url = database_url + ("&" if "?" in database_url else "?") + "ssl=disable"
    both = Database(url, pool_size=1)
    try:
        assert await both.read(lambda s: s.scalar(text("SELECT 1"))) == 1
        assert (await both.fetchrow("SELECT 2 AS two"))["two"] == 2
    finally:
        await both.dispose()
