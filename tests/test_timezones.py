"""Spend-limit periods and auto top-up months across a change of the workspace's timezone.

A period keeps its start and what it used; its end moves to the new calendar's boundary
nearest to the end it had (`rules.rebased`) unless that boundary is already behind the change
(then it keeps its end, and the next period runs from there to the new calendar's next
boundary), so the periods after it follow the new calendar with neither an overlap nor a gap.
Each API test pins the service's clock to a date, so what
it checks does not depend on the day the suite runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from domain.governance import limits
from domain.governance.models import LimitPeriod
from domain.governance.rules import Period, in_progress, moved_by_change, period_end, period_of, rebased

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


def test_a_change_after_the_new_calendars_boundary_keeps_the_periods_end_and_the_next_starts_there():
    february = period_of(MONTH, utc(2027, 2, 10), "UTC")
    # Before Tokyo's March begins (15:00 UTC), February ends there: the boundary is still ahead.
    assert moved_by_change(MONTH, february, TOKYO, utc(2027, 2, 28, 14)) == Period(february.start,
                                                                                  utc(2027, 2, 28, 15))
    # After it, ending there would end February an hour before the change, after its spend: it
    # keeps its end (also exactly at the boundary: a period never ends at the change either).
    assert moved_by_change(MONTH, february, TOKYO, utc(2027, 2, 28, 16)) is None
    assert moved_by_change(MONTH, february, TOKYO, utc(2027, 2, 28, 15)) is None
    # The next runs from its end to Tokyo's next boundary: not from 15:00, over time it counted.
    assert in_progress(MONTH, utc(2027, 2, 28, 23, 59), TOKYO, february) == february
    assert in_progress(MONTH, utc(2027, 3, 1), TOKYO, february) == Period(utc(2027, 3, 1), utc(2027, 3, 31, 15))
    assert in_progress(MONTH, utc(2027, 3, 20), TOKYO, february) == Period(utc(2027, 3, 1), utc(2027, 3, 31, 15))
    # A day: UTC's Tuesday keeps its end at Wednesday 00:00; the next day ends at Tokyo's 15:00.
    tuesday = period_of(DAY, utc(2027, 3, 2, 12), "UTC")
    assert moved_by_change(DAY, tuesday, TOKYO, utc(2027, 3, 2, 16)) is None
    assert in_progress(DAY, utc(2027, 3, 3, 1), TOKYO, tuesday) == Period(utc(2027, 3, 3), utc(2027, 3, 3, 15))
    # A week whose next starts mid-Monday in Tokyo still ends at Tokyo's next Monday.
    week = period_of(WEEK, utc(2027, 3, 3), "UTC")  # Monday March 1 to Monday March 8, 00:00 UTC
    assert in_progress(WEEK, utc(2027, 3, 8, 1), TOKYO, week) == Period(utc(2027, 3, 8), utc(2027, 3, 14, 15))
    assert period_end(WEEK, utc(2027, 3, 8), TOKYO) == utc(2027, 3, 14, 15)


def test_the_period_after_an_ended_one_starts_at_the_later_of_its_end_and_the_calendars_start():
    february = period_of(MONTH, utc(2027, 2, 10), "UTC")
    # Ended, and the new boundary already behind when the change comes (March 1, 02:00 UTC is
    # March in Tokyo since 15:00 the day before): the change leaves it, the next starts at its end.
    assert moved_by_change(MONTH, february, TOKYO, utc(2027, 3, 1, 2)) is None
    assert in_progress(MONTH, utc(2027, 3, 1, 2), TOKYO, february) == Period(utc(2027, 3, 1), utc(2027, 3, 31, 15))
    # Ended, and the new boundary still ahead: it runs on to it (westward).
    assert moved_by_change(MONTH, february, NEW_YORK, utc(2027, 3, 1, 2)) == Period(february.start,
                                                                                    utc(2027, 3, 1, 5))
    # On one calendar the next starts at the calendar's boundary, which is the end: no change.
    assert in_progress(MONTH, utc(2027, 3, 1), "UTC", february) == period_of(MONTH, utc(2027, 3, 1), "UTC")
    # Long over (months without a spend): the calendar's period, whatever the calendar was.
    assert in_progress(MONTH, utc(2027, 6, 10), TOKYO, february) == period_of(MONTH, utc(2027, 6, 10), TOKYO)
    assert in_progress(MONTH, utc(2027, 6, 10), TOKYO, None) == period_of(MONTH, utc(2027, 6, 10), TOKYO)


ZONES = ["UTC", NEW_YORK, TOKYO, "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata", "America/Santiago",
         "Australia/Lord_Howe"]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([DAY, WEEK, MONTH]), old=st.sampled_from(ZONES), new=st.sampled_from(ZONES),
       at=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)),
       change_after=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=40)),
       later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=70)))
def test_a_change_of_timezone_at_any_moment_leaves_no_overlap_and_no_gap(kind, old, new, at, change_after, later):
    latest = period_of(kind, at, old)  # the latest period a limit counted in
    now = latest.start + change_after  # the change: during it, or after it ended
    moved = moved_by_change(kind, latest, new, now) or latest
    assert moved.start == latest.start
    if latest.end > now:
        assert moved.end > now  # what it counted until the change stays inside its bounds
    # Every later moment is in exactly one period: the moved one, or one starting at or after
    # its end; the first after it starts at its end (at the change, if it had ended before);
    # each ends at a boundary of the new calendar, and the next starts there.
    t = now + later
    current = in_progress(kind, t, new, moved)
    assert current.start <= t < current.end
    assert current == moved or current.start >= moved.end
    first = in_progress(kind, max(moved.end, now), new, moved)
    assert first.start == moved.end or (moved.end <= now and first == period_of(kind, now, new))
    assert period_of(kind, first.end, new).start == first.end
    assert in_progress(kind, first.end, new, first) == period_of(kind, first.end, new)


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
    it must count by the new calendar, not by the timezone it read first. March 1, 02:00 UTC is
    still February in New York, so the change runs UTC's used-up February on to New York's
    boundary and the start is refused; counted by UTC, it would open a fresh March."""
    with service_time(live_server, utc(2027, 2, 10, 12)) as clock:
        team, token = await _limited(db, client)
        clock.at(utc(2027, 3, 1, 2))
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
            await sql.execute("UPDATE workspaces SET timezone = $2 WHERE id = $1", ws_id, NEW_YORK)
            await limits.follow_timezone(sql, ws_id, NEW_YORK, live_server.clock.now())

        async def start_when_locked():
            await locked.wait()
            return await start(client, token, team.ws)

        _, started = await asyncio.gather(db.sql_transaction(change_while_the_start_waits), start_when_locked())
        assert started["__typename"] == "SpendLimitExceeded"
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("20.000", "2027-03-01T05:00:00+00:00")


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


async def test_an_eastward_change_after_the_new_calendars_boundary_keeps_the_month_to_its_end(
        db, live_server, client):
    """Feb 28, 16:00 UTC is already March 1 in Tokyo. The limit was used up at that time, counted in
    UTC's February. Ending February at Tokyo's boundary (15:00, an hour before the change) put its
    end in the past, and Tokyo's March then started at 15:00 with a fresh allowance: it overlapped
    the spend already counted, which no period counted in its own bounds. The month keeps its
    end; the next runs from it to Tokyo's next boundary."""
    with service_time(live_server, utc(2027, 2, 28, 16)) as clock:
        team, token = await _limited(db, client)
        await _set_timezone(client, team, TOKYO)
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("20.000", "2027-03-01T00:00:00+00:00")
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 2, 28, 23, 59))
        assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
        clock.at(utc(2027, 3, 1, 0, 1))  # February is over: the next period, to Tokyo's boundary
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
        limit = await _limit(client, team)
        assert (limit["used"], limit["periodEnd"]) == ("10.000", "2027-03-31T15:00:00+00:00")
