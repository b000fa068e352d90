"""One failing unit must not stop the scheduler: a workspace whose period close (or a grant whose
expiry, or a workspace's alerts) fails is rolled back, reported in `TickReport.failures`, left out
for the rest of the round, and retried by the next; every other workspace and every later phase
goes on.

The failures are real: a PostgreSQL trigger, created by the test on one workspace's or grant's
rows and dropped afterwards, raises inside the unit's transaction. Each test has a database of
its own, since a tick works on every workspace there is."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import text

from domain.access import Caller
from domain.clock import OffsetClock
from domain.db import Database
from domain.identity import authenticate_secret
from domain.ledger.invariants import check_ledger
from domain.periods.service import ALERTS, EXPIRY, PERIOD_CLOSE, Backoff, tick
from domain.plans import Plan
from domain.workspaces.models import AllocationMode
from domain.workspaces.service import create_workspace
from policies import Authorizer
from tests.conftest import new_user, own_database
from tests.test_cli import cli

TTL = timedelta(hours=1)
PLAN = "isolation"


@pytest.fixture
async def fresh(pg_server) -> AsyncIterator[tuple[str, Database]]:
    async with own_database(pg_server, "creditpool_isolation", pool_size=2, catalog=False) as (url, db):

        async def add_plan(session):
            # 10 credits a month, 5 trial credits for a day, 1 free credit a day.
            session.add(Plan(key=PLAN, name="Isolation", seat_cap=5, free_creator_seats=1, included_units=10_000,
                             trial_units=5_000, trial_days=1, daily_free_units=1_000))

        await db.transaction(add_plan)
        yield url, db


async def opened(db: Database, days_ago: int, count: int) -> list[uuid.UUID]:
    """`count` workspaces opened `days_ago` days ago, in id order (the order ticks claim them)."""
    past = OffsetClock()
    past.offset = -timedelta(days=days_ago)
    ids = []
    for _ in range(count):
        _, token = await new_user(db)
        actor = await authenticate_secret(db, token)
        made = await create_workspace(db, Caller(actor, Authorizer(), past), name="W", plan_key=PLAN,
                                      allocation_mode=AllocationMode.POOLED)
        ids.append(made.workspace.id)
    return sorted(ids)


async def sql(db: Database, statement: str, **params):
    async def work(session):
        result = await session.execute(text(statement), params)
        return result.all() if result.returns_rows else None

    return await db.transaction(work)


async def poison(db: Database, table: str, when: str) -> None:
    """A trigger that refuses an INSERT into `table` matching `when` (a condition on NEW), and
    counts its attempts in a sequence (nextval survives the rollback of the failed unit)."""
    await sql(db, f"CREATE SEQUENCE IF NOT EXISTS poison_{table}")
    await sql(db, f"""CREATE FUNCTION poison_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN PERFORM nextval('poison_{table}'); RAISE EXCEPTION 'poisoned {table} row'; END $$""")
    await sql(db, f"CREATE TRIGGER poison_{table} BEFORE INSERT ON {table} FOR EACH ROW WHEN ({when}) "
                  f"EXECUTE FUNCTION poison_{table}()")


async def cure(db: Database, table: str) -> None:
    await sql(db, f"DROP TRIGGER poison_{table} ON {table}")
    await sql(db, f"DROP FUNCTION poison_{table}()")


async def attempts(db: Database, table: str) -> int:
    [(value, called)] = await sql(db, f"SELECT last_value, is_called FROM poison_{table}")
    return value if called else 0


async def workspace_row(db: Database, ws: uuid.UUID):
    [row] = await sql(db, "SELECT period_start, next_renewal_at, next_daily_at FROM workspaces WHERE id = :ws", ws=ws)
    return row


async def remaining(db: Database, ws: uuid.UUID, source: str) -> list[int]:
    return [r for (r,) in await sql(db, "SELECT remaining FROM grants WHERE workspace_id = :ws AND source = :source "
                                        "ORDER BY effective_at", ws=ws, source=source)]


async def test_a_workspace_whose_close_fails_is_skipped_and_the_others_and_later_phases_go_on(fresh, caplog):
    _, db = fresh
    # Opened 40 days ago: each has a boundary due (about ten days ago), a day of free credits
    # due, and a trial grant (and the first day's free credits) expired long since.
    poisoned, *others = await opened(db, 40, 3)  # the first the tick claims: the old code stopped at it
    before = await workspace_row(db, poisoned)
    await poison(db, "period_closes", f"NEW.workspace_id = '{poisoned}'")

    with caplog.at_level(logging.ERROR, logger="creditpool.scheduler"):
        report = await tick(db, OffsetClock(), hold_ttl=TTL)

    # The others closed, and the later phases ran for all three.
    assert sorted(c.workspace_id for c in report.closes) == others and report.periods_closed == 2
    assert report.daily_issued == 3
    assert report.grants_expired == 6  # each workspace's trial and first day's free credits
    for ws in (poisoned, *others):
        assert await remaining(db, ws, "TRIAL") == [0]
    # The failure is named, logged with the workspace and the exception, and tried once this
    # round (the claim skips it afterwards; before, it would be claimed again at once).
    [failure] = report.failures
    assert (failure.phase, failure.workspace_id, failure.subject) == (PERIOD_CLOSE, poisoned, None)
    assert "poisoned period_closes row" in failure.error
    assert await attempts(db, "period_closes") == 1
    [record] = [r for r in caplog.records if str(poisoned) in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info and "poisoned" in str(record.exc_info[1])
    # Nothing of the failed close was written: the period, the allowance and the history are as
    # they were (no rollover, expiry or new allowance at its boundary, no close).
    after = await workspace_row(db, poisoned)
    assert (after.period_start, after.next_renewal_at) == (before.period_start, before.next_renewal_at)
    assert await remaining(db, poisoned, "PLAN_ALLOWANCE") == [10_000]
    assert await sql(db, "SELECT count(*) FROM ledger_entries WHERE workspace_id = :ws AND occurred_at = :at",
                     ws=poisoned, at=before.next_renewal_at) == [(0,)]
    assert await sql(db, "SELECT count(*) FROM period_closes WHERE workspace_id = :ws", ws=poisoned) == [(0,)]
    assert await check_ledger(db) == []

    # The next round retries it; cured, it closes (and nothing else was left due).
    await cure(db, "period_closes")
    again = await tick(db, OffsetClock(), hold_ttl=TTL)
    assert [c.workspace_id for c in again.closes] == [poisoned] and again.failures == []
    assert (await workspace_row(db, poisoned)).period_start == before.next_renewal_at
    assert await remaining(db, poisoned, "PLAN_ALLOWANCE") == [0, 10_000]  # expired at the close; the new one
    assert await check_ledger(db) == []


async def test_a_grant_whose_expiry_fails_is_skipped_in_its_batch_and_alerts_go_on_for_the_others(fresh):
    _, db = fresh
    # Opened two days ago: trial grants and the first day's free credits have expired; today's
    # free credits expire tomorrow, within the 7 days that fire an "expiring soon" alert.
    a, b, c = await opened(db, 2, 3)
    [(trial_b,)] = await sql(db, "SELECT id FROM grants WHERE workspace_id = :ws AND source = 'TRIAL'", ws=b)
    await poison(db, "ledger_entries", f"NEW.grant_id = '{trial_b}' AND NEW.kind = 'EXPIRE'")
    await poison(db, "alerts", f"NEW.workspace_id = '{c}'")

    report = await tick(db, OffsetClock(), hold_ttl=TTL, batch=10)  # one batch holds all six expired grants

    assert report.daily_issued == 3
    assert report.grants_expired == 5  # all but the poisoned one, though they shared its batch
    assert await remaining(db, a, "TRIAL") == [0] and await remaining(db, c, "TRIAL") == [0]
    assert await remaining(db, b, "TRIAL") == [5_000]
    by_phase = {f.phase: f for f in report.failures}
    assert sorted(by_phase) == [ALERTS, EXPIRY] and len(report.failures) == 2
    assert (by_phase[EXPIRY].workspace_id, by_phase[EXPIRY].subject) == (b, trial_b)
    assert (by_phase[ALERTS].workspace_id, by_phase[ALERTS].subject) == (c, None)
    assert await attempts(db, "ledger_entries") == 2  # in its batch, then alone; not again this round
    # The alerts of the workspaces that did not fail were raised (today's free credits expire
    # tomorrow), the failed one's not.
    fired = dict(await sql(db, "SELECT workspace_id, count(*) FROM alerts WHERE kind = 'GRANT_EXPIRING' "
                               "GROUP BY workspace_id"))
    assert fired.get(a) and fired.get(b) and c not in fired
    assert await check_ledger(db) == []

    await cure(db, "ledger_entries")
    await cure(db, "alerts")
    again = await tick(db, OffsetClock(), hold_ttl=TTL)
    assert (again.grants_expired, again.failures) == (1, [])
    assert await remaining(db, b, "TRIAL") == [0]
    assert dict(await sql(db, "SELECT workspace_id, count(*) FROM alerts WHERE kind = 'GRANT_EXPIRING' "
                              "GROUP BY workspace_id")).get(c)
    assert await check_ledger(db) == []


async def test_creditpool_tick_exits_non_zero_when_a_unit_failed(fresh):
    url, db = fresh
    poisoned, other = await opened(db, 40, 2)
    await poison(db, "period_closes", f"NEW.workspace_id = '{poisoned}'")
    failed = await cli("tick", "--database-url", url)
    assert failed.returncode != 0
    assert "periods closed: 1," in failed.stdout  # the other one
    assert f"period close of workspace {poisoned}" in failed.stderr and "poisoned period_closes row" in failed.stderr
    assert "1 unit(s) failed" in failed.stderr
    await cure(db, "period_closes")
    fine = await cli("tick", "--database-url", url)
    assert fine.returncode == 0, fine.stderr
    assert "periods closed: 1," in fine.stdout


async def test_a_unit_that_keeps_failing_rests_longer_between_tries_and_is_forgotten_once_it_succeeds(fresh):
    """The server's scheduler keeps a `Backoff` across rounds: a unit that failed once is tried by
    the next round (a passing fault costs nothing), and each further failure in a row doubles its
    rest, so a unit broken for good is not rolled back and logged every round."""
    _, db = fresh
    poisoned, other = await opened(db, 40, 2)
    await poison(db, "period_closes", f"NEW.workspace_id = '{poisoned}'")
    clock = OffsetClock()
    backoff = Backoff(first=timedelta(seconds=30), ceiling=timedelta(minutes=2))

    async def round_at(seconds: int):
        clock.offset = timedelta(seconds=seconds)
        return await tick(db, clock, hold_ttl=TTL, backoff=backoff)

    first = await round_at(0)
    assert [c.workspace_id for c in first.closes] == [other] and len(first.failures) == 1
    assert (first.resting, await attempts(db, "period_closes")) == (0, 1)
    # Failed once: the next round (one interval on) tries it again.
    second = await round_at(31)
    assert [f.workspace_id for f in second.failures] == [poisoned] and second.resting == 0
    assert await attempts(db, "period_closes") == 2
    # Failed twice in a row: it rests 60 s from 31, so the rounds at 62 and 90 leave it out.
    for at in (62, 90):
        resting = await round_at(at)
        assert (resting.failures, resting.resting, resting.periods_closed) == ([], 1, 0)
    assert await attempts(db, "period_closes") == 2
    third = await round_at(92)
    assert len(third.failures) == 1 and await attempts(db, "period_closes") == 3
    # The rest doubles up to the ceiling: 2 minutes, not 4.
    assert (await round_at(92 + 119)).resting == 1
    fourth = await round_at(92 + 121)
    assert len(fourth.failures) == 1 and await attempts(db, "period_closes") == 4
    # Cured, it closes once its rest is over, and is forgotten: a later failure starts afresh.
    await cure(db, "period_closes")
    assert (await round_at(92 + 121 + 119)).periods_closed == 0
    done = await round_at(92 + 121 + 121)
    assert [c.workspace_id for c in done.closes] == [poisoned] and done.failures == []
    assert backoff.units == {}
    assert await check_ledger(db) == []


async def test_resting_workspaces_are_left_out_of_the_alert_phase_not_the_others_alerts(fresh):
    """The phases done for every workspace at once (overage lapses, alerts) go workspace by
    workspace while one rests, and leave only that one out."""
    _, db = fresh
    a, b = await opened(db, 2, 2)  # today's free credits expire tomorrow: an "expiring soon" alert each
    await poison(db, "alerts", f"NEW.workspace_id = '{a}'")
    clock = OffsetClock()
    backoff = Backoff(first=timedelta(seconds=30))
    failed = await tick(db, clock, hold_ttl=TTL, backoff=backoff)
    assert [(f.phase, f.workspace_id) for f in failed.failures] == [(ALERTS, a)]
    tried = await attempts(db, "alerts")  # all at once, then on its own
    await sql(db, "DELETE FROM alerts WHERE workspace_id = :ws", ws=b)  # to see it raised again
    clock.offset = timedelta(seconds=10)
    rested = await tick(db, clock, hold_ttl=TTL, backoff=backoff)
    assert rested.failures == [] and rested.resting == 1
    assert await attempts(db, "alerts") == tried  # not tried while it rests, not even all at once
    fired = dict(await sql(db, "SELECT workspace_id, count(*) FROM alerts WHERE kind = 'GRANT_EXPIRING' "
                               "GROUP BY workspace_id"))
    assert fired.get(b) and a not in fired


def test_a_clock_set_back_does_not_rest_a_unit_longer_than_the_ceiling():
    """Rests are kept by the clock's reading: a unit that failed at a reading later than the
    clock now shows (a test's clock moved back, the system clock stepped back) must not rest
    until that later reading comes round again, which could be days, far past the ceiling the
    scheduler promises."""
    from datetime import UTC, datetime

    from domain.periods.service import TickFailure, TickReport

    backoff = Backoff(first=timedelta(seconds=30), ceiling=timedelta(minutes=2))
    ws = uuid.uuid4()
    later = datetime(2030, 1, 31, tzinfo=UTC)
    backoff.after(TickReport(failures=[TickFailure(PERIOD_CLOSE, ws, None, "boom")]), later)
    assert backoff.resting(PERIOD_CLOSE, later + timedelta(seconds=10)) == {ws}
    earlier = later - timedelta(days=30)
    # Set back a month: at most the ceiling from now, not a month and 30 s.
    assert backoff.resting(PERIOD_CLOSE, earlier + timedelta(minutes=3)) == set()
    backoff.after(TickReport(), earlier + timedelta(minutes=3))
    assert backoff.units == {}
