"""Spend-limit periods and auto top-up months across a change of the workspace's timezone.

A period keeps its start and what it used; its end moves to the new calendar's boundary
nearest to the end it had (`rules.rebased`), so the periods after it follow the new calendar
with neither an overlap nor a stub. Each API test pins the service's clock to a date, so what
it checks does not depend on the day the suite runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from domain.governance import limits
from domain.governance.models import LimitPeriod
from domain.governance.rules import Period, in_progress, period_of, rebased

from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start, under_auto_top_up
from tests.test_api_ledger import grant, make_team
from tests.test_governance_review import LIMITS_FULL

MONTH, DAY, WEEK = LimitPeriod.MONTH, LimitPeriod.DAY, LimitPeriod.WEEK
NEW_YORK, TOKYO = "America/New_York", "Asia/Tokyo"
TIMEZONE = ('mutation($ws: ID!, $tz: String!) { updateWorkspace(input: {workspaceId: $ws, timezone: $tz}) '
            '{ __typename ... on Workspace { timezone } } }')


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- the rules ----------------------------------------------------------------------------------------

def test_a_period_changing_timezone_ends_at_the_new_calendars_nearest_boundary():
    february = period_of(MONTH, utc(2027, 2, 10, 12), "UTC")
    assert february == Period(utc(2027, 2, 1), utc(2027, 3, 1))
    # Westward: New York's March starts five hours after UTC's, so the month runs five hours longer.
    assert rebased(MONTH, february, NEW_YORK) == Period(utc(2027, 2, 1), utc(2027, 3, 1, 5))
    # Eastward: Tokyo's March started nine hours before UTC's, so the month ends nine hours early.
    assert rebased(MONTH, february, TOKYO) == Period(utc(2027, 2, 1), utc(2027, 2, 28, 15))
    # No change of calendar, no change of end (London is on UTC in winter).
    assert rebased(WEEK, period_of(WEEK, utc(2027, 1, 6), "UTC"), "Europe/London") == period_of(
        WEEK, utc(2027, 1, 6), "UTC")
    # New York moves its clocks on March 14, 2027: its March 15 starts at 04:00 UTC, not 05:00.
    assert rebased(DAY, period_of(DAY, utc(2027, 3, 14, 3), "UTC"), NEW_YORK).end == utc(2027, 3, 15, 4)


def test_after_a_rebased_period_the_next_follows_the_new_calendar_from_its_end():
    february = rebased(MONTH, period_of(MONTH, utc(2027, 2, 10), "UTC"), NEW_YORK)
    assert in_progress(MONTH, utc(2027, 3, 1, 4, 59), NEW_YORK, february) == february
    march = in_progress(MONTH, utc(2027, 3, 1, 5), NEW_YORK, february)
    assert march == Period(february.end, utc(2027, 4, 1, 4))  # daylight saving time from March 14


def test_days_where_the_clocks_jump_at_midnight_follow_one_another_without_gap_or_overlap():
    # Santiago jumps from 00:00 to 01:00 on September 6, 2026: that day starts at the jump and
    # has 23 hours; the next starts at its midnight, not at "01:00 one day later".
    sep6 = period_of(DAY, utc(2026, 9, 6, 12), "America/Santiago")
    assert sep6 == Period(utc(2026, 9, 6, 4), utc(2026, 9, 7, 3))
    assert period_of(DAY, utc(2026, 9, 7, 3, 30), "America/Santiago").start == sep6.end
    # Havana goes back from 01:00 to 00:00 on November 1, 2026: the day starts at the first
    # midnight, also for an instant in the repeated hour.
    nov1 = Period(utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))
    assert period_of(DAY, utc(2026, 11, 1, 4, 30), "America/Havana") == nov1
    assert period_of(DAY, utc(2026, 11, 1, 5, 30), "America/Havana") == nov1
    assert period_of(MONTH, utc(2026, 10, 15), "America/Havana").end == nov1.start


# --- through the API ----------------------------------------------------------------------------------

@contextlib.contextmanager
def service_time(live_server, when: datetime):
    """Run with the service's clock at `when` (it keeps ticking); `.at(t)` moves it to `t`."""
    class Pinned:
        @staticmethod
        def at(moment: datetime) -> None:
            live_server.clock.offset = timedelta(0)
            live_server.clock.offset = moment - live_server.clock.now()

    Pinned.at(when)
    try:
        yield Pinned
    finally:
        live_server.clock.offset = timedelta(0)


async def _limited(db, client, *, action: str = "BLOCK"):
    """A one-creator team with 1,000 credits and a monthly limit of 20 on the creator, who has
    used it up (two dalle-3 starts of 10); the third start is refused."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action=action, member=member)
    assert [(await start(client, token, team.ws))["__typename"] for _ in range(3)] == [
        "Generation", "Generation", "SpendLimitExceeded"]
    return team, token


async def _limit(client, team) -> dict:
    async with client(team.owner) as api:
        [limit] = (await api(LIMITS_FULL, ws=team.ws))["spendLimits"]
    return limit


async def _set_timezone(client, team, tz: str) -> None:
    async with client(team.owner) as api:
        assert (await api(TIMEZONE, ws=team.ws, tz=tz))["updateWorkspace"] == {"__typename": "Workspace", "timezone": tz}


async def test_a_westward_change_runs_the_month_to_the_new_calendars_end_and_no_fresh_allowance_before_it(
        db, live_server, client):
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await _limited(db, client)
        assert (await _limit(client, team))["periodEnd"] == "2027-03-01T00:00:00+00:00"
        # February 1, 00:00 UTC is January 31 in New York: a month computed from it there used to
        # end on "February 31" (every spend and listing under the limit failed) or, in other
        # months, three days early.
        await _set_timezone(client, team, NEW_YORK)
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("20.000", "2027-03-01T05:00:00+00:00")
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 3, 1, 2))  # March in UTC, still February in New York: no fresh allowance
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 3, 1, 5, 1))  # New York's March
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("10.000", "2027-04-01T04:00:00+00:00")


async def test_a_change_just_after_the_month_ended_runs_it_on_to_the_new_calendars_boundary(
        db, live_server, client):
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await _limited(db, client)
        clock.at(utc(2027, 3, 1, 2))  # UTC's February is over; nothing spent since
        await _set_timezone(client, team, NEW_YORK)
        # Still February in New York: the month runs on to its end there, not a fresh allowance.
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("20.000", "2027-03-01T05:00:00+00:00")
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 3, 1, 5, 1))
        assert (await start(client, token, team.ws))["__typename"] == "Generation"


async def test_an_eastward_change_ends_the_month_at_the_new_calendars_boundary(db, live_server, client):
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await _limited(db, client)
        await _set_timezone(client, team, TOKYO)
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("20.000", "2027-02-28T15:00:00+00:00")
        clock.at(utc(2027, 2, 28, 14, 59))
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 2, 28, 15, 1))  # Tokyo's March: one month, not a stub
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("10.000", "2027-03-31T15:00:00+00:00")


async def test_a_start_racing_a_change_of_timezone_counts_in_the_calendar_the_change_committed(
        db, live_server, client):
    """The start reads the workspace (still UTC) before the change commits and counts after it:
    it must count by the new calendar, not by the timezone it read first. Feb 28, 20:00 UTC is
    March in Tokyo, so the change ends UTC's used-up February and the start opens Tokyo's March."""
    with service_time(live_server, utc(2027, 2, 28, 20)):
        team, token = await _limited(db, client)
        ws_id, locked = uuid.UUID(team.ws), asyncio.Event()

        async def change_while_the_start_waits(sql):
            # What updateWorkspace does, held open until the start's read is done and it waits
            # for the workspace row.
            await sql.fetch("SELECT id FROM workspaces WHERE id = $1 FOR UPDATE", ws_id)
            locked.set()
            while not (await db.fetchrow(  # another connection: a transaction sees one stats snapshot
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"))["n"]:
                await asyncio.sleep(0.01)
            await sql.execute("UPDATE workspaces SET timezone = $2 WHERE id = $1", ws_id, TOKYO)
            await limits.follow_timezone(sql, ws_id, TOKYO, live_server.clock.now())

        async def start_when_locked():
            await locked.wait()
            return await start(client, token, team.ws)

        _, started = await asyncio.gather(db.sql_transaction(change_while_the_start_waits), start_when_locked())
        assert started["__typename"] == "Generation"
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("10.000", "2027-03-31T15:00:00+00:00")


async def test_an_approved_overage_lasts_to_the_end_its_period_moved_to(db, live_server, client):
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await _limited(db, client, action="REQUIRE_APPROVAL")
        async with client(token) as api:
            request = (await api(REQUEST, ws=team.ws, amount="10", reason="launch"))["requestOverage"]
        async with client(team.owner) as api:
            decided = (await api(DECIDE, id=request["id"], approve=True))["decideOverage"]
        assert decided["approvalExpiresAt"] == "2027-03-01T00:00:00+00:00"  # with its period
        await _set_timezone(client, team, NEW_YORK)
        clock.at(utc(2027, 3, 1, 2))  # after the approval's old end, inside the period's new one
        assert (await _limit(client, team))["allowance"] == "30.000"
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"


async def test_the_auto_top_up_month_moves_with_the_timezone(db, live_server, client):
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await under_auto_top_up(db, client)
        assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 90 left: one pack bought
        assert await _topup_month(db, team.ws) == (1, Period(utc(2027, 2, 1), utc(2027, 3, 1)))
        await _set_timezone(client, team, NEW_YORK)
        assert await _topup_month(db, team.ws) == (1, Period(utc(2027, 2, 1), utc(2027, 3, 1, 5)))
        clock.at(utc(2027, 3, 1, 2))  # still February in New York: the month's purchase counts
        assert await _purchases_this_month(client, team) == 1
        clock.at(utc(2027, 3, 1, 5, 1))  # a new month, before anything bought in it
        assert await _purchases_this_month(client, team) == 0


async def _purchases_this_month(client, team) -> int:
    async with client(team.owner) as api:
        return (await api("query($ws: ID!) { autoTopUp(workspaceId: $ws) { purchasesThisMonth } }",
                          ws=team.ws))["autoTopUp"]["purchasesThisMonth"]


async def _topup_month(db, ws: str) -> tuple[int, Period]:
    async def work(session):
        row = (await session.execute(text(
            "SELECT purchases_this_month, month_start, month_end FROM auto_topups WHERE workspace_id = CAST(:ws AS uuid)"),
            {"ws": ws})).one()
        return row.purchases_this_month, Period(row.month_start, row.month_end)

    return await db.read(work)
