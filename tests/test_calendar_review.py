"""Review of how credits follow the calendar: period closes, plan changes and cancellation, the
scheduler running late. Each test here first demonstrated a real bug (since fixed)."""

from __future__ import annotations

from datetime import timedelta

from domain.periods.rules import next_day

from tests.test_api_ledger import ADD, START, key
from tests.test_periods import (  # noqa: F401 - the periods database and its clock reset
    balance,
    clean,
    closes_of,
    month,
    plan,
    real_time,
    schedule,
    workspace,
    world,
)

CANCEL = 'mutation($ws: ID!) { cancelSubscription(input: {workspaceId: $ws}) { __typename } }'
MODE = ('mutation($ws: ID!, $m: AllocationMode!) { updateWorkspace(input: {workspaceId: $ws, allocationMode: $m}) '
        '{ __typename } }')
CHANGE_PLAN = ('mutation($ws: ID!, $p: String!) { updateWorkspace(input: {workspaceId: $ws, planKey: $p}) '
               '{ __typename } }')


def allowances(b: dict) -> list[str]:
    return sorted(g["remaining"] for g in b["grants"] if g["source"] == "PLAN_ALLOWANCE")


# --- a change that comes after a boundary the scheduler has not closed yet ------------------------

async def test_a_cancellation_after_a_boundary_the_tick_has_not_reached_keeps_that_periods_allowance(world):  # noqa: F811
    """The period starting at a boundary began before a cancellation made ten minutes after it,
    so it has its allowance however late the tick closes the boundary (a tick on time would
    have issued it); the period after it, wholly after the cancellation, has none."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    world.clock.offset = month(1, timedelta(minutes=10))
    async with world.client(owner) as api:
        assert (await api(CANCEL, ws=ws))["cancelSubscription"]["__typename"] == "Workspace"
    [closed] = closes_of(await world.tick(month(1, timedelta(minutes=30))), ws)
    assert (closed.expired_units, closed.issued_units) == (100_000, 100_000)
    assert allowances(await balance(world, owner, ws)) == ["100.000"]
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.expired_units, closed.issued_units) == (100_000, 0)
    await clean(world, ws)


async def test_a_plan_change_after_a_boundary_the_tick_has_not_reached_applies_from_the_next_one(world):  # noqa: F811
    """A downgrade ten minutes after a boundary comes in the period that boundary started: that
    period keeps the old plan's allowance (a tick on time issued it), the new plan's allowance
    comes at the next boundary, however late the scheduler runs."""
    rich, poor = await plan(world, includedCredits="100"), await plan(world, includedCredits="10")
    owner, ws = await workspace(world, rich)
    world.clock.offset = month(1, timedelta(minutes=10))
    async with world.client(owner) as api:
        assert (await api(CHANGE_PLAN, ws=ws, p=poor))["updateWorkspace"]["__typename"] == "Workspace"
    closes_of(await world.tick(month(1, timedelta(minutes=30))), ws)
    assert allowances(await balance(world, owner, ws)) == ["100.000"]
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.expired_units, closed.issued_units) == (100_000, 10_000)
    await clean(world, ws)


async def test_a_mode_change_after_a_boundary_the_tick_has_not_reached_applies_from_the_next_one(world):  # noqa: F811
    """The same for the allocation mode: the period a boundary started before the switch to
    PER_SEAT has its allowance in the pool, where a tick on time put it."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    world.clock.offset = month(1, timedelta(minutes=10))
    async with world.client(owner) as api:
        assert (await api(MODE, ws=ws, m="PER_SEAT"))["updateWorkspace"]["__typename"] == "Workspace"
    await world.tick(month(1, timedelta(minutes=30)))
    b = await balance(world, owner, ws)
    assert [(g["scope"], g["remaining"]) for g in b["grants"]] == [("WORKSPACE", "100.000")]
    await world.tick(month(2))
    b = await balance(world, owner, ws)
    assert [(g["scope"], g["remaining"]) for g in b["grants"]] == [("SEAT", "100.000")]
    await clean(world, ws)


async def test_a_plan_change_after_midnight_the_tick_has_not_reached_keeps_that_days_free_credits(world):  # noqa: F811
    """Daily free credits follow the same rule: the day began under the old plan."""
    daily, none = await plan(world, dailyFreeCredits="5"), await plan(world)
    owner, ws = await workspace(world, daily)
    now = world.clock.now()
    after_midnight = next_day(now) - now + timedelta(minutes=10)
    world.clock.offset = after_midnight
    async with world.client(owner) as api:
        assert (await api(CHANGE_PLAN, ws=ws, p=none))["updateWorkspace"]["__typename"] == "Workspace"
    await world.tick(after_midnight + timedelta(minutes=20))
    b = await balance(world, owner, ws)
    assert [(g["source"], g["remaining"]) for g in b["grants"]] == [("DAILY_FREE", "5.000")]
    await world.tick(after_midnight + timedelta(days=1))
    assert (await balance(world, owner, ws))["grants"] == []
    await clean(world, ws)


async def test_a_creator_seat_added_after_a_boundary_the_tick_has_not_reached_waits_for_the_next_one(world):  # noqa: F811
    """PER_SEAT: a creator seat added ten minutes after a boundary is added mid-period, so its
    allowance comes at the next boundary (a tick on time had issued this period's before the
    seat existed), and a creator removed then had its allowance for this period issued."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_, mode="PER_SEAT")
    async with world.client(owner) as api:
        leaving = (await api(ADD, ws=ws, email=f"l-{key()}@example.test", role="MEMBER", seat="CREATOR"))["addMember"]
    world.clock.offset = month(1, timedelta(minutes=10))
    async with world.client(owner) as api:
        added = (await api(ADD, ws=ws, email=f"c-{key()}@example.test", role="MEMBER", seat="CREATOR"))["addMember"]
        await api('mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }', m=leaving["id"])
    await world.tick(month(1, timedelta(minutes=30)))
    # The owner's seat and the one removed after the boundary.
    assert (await schedule(world, owner, ws))["breakage"][0]["issued"] == "200.000"
    b = await balance(world, owner, ws)
    assert added["id"] not in {g["memberId"] for g in b["grants"]}
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert closed.issued_units == 200_000  # the owner's seat and the one added
    await clean(world, ws)


async def test_a_hold_timed_out_before_a_boundary_rolls_over_when_a_plan_change_closes_it_late(world):  # noqa: F811
    """A ROLLOVER plan: 50 of the 100 included credits held by a generation started at once,
    which times out an hour later (the server's hold TTL), long before the boundary; a tick on
    time released them then, and the close rolled all 100 over. A plan change ten minutes after
    the boundary, with no tick in between, closes the period itself (catch-up): it releases the
    timed-out hold first, as the tick does, so the same 100 roll over; they did not (50 rolled
    over, the released 50 expired)."""
    rolling = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapPercent=100,
                         rolloverPeriods=2)
    other = await plan(world, includedCredits="10")
    owner, ws = await workspace(world, rolling)
    async with world.client(owner) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    assert gen["__typename"] == "Generation", gen
    assert (await balance(world, owner, ws))["held"] == "50.000"
    world.clock.offset = month(1, timedelta(minutes=10))
    async with world.client(owner) as api:
        assert (await api(CHANGE_PLAN, ws=ws, p=other))["updateWorkspace"]["__typename"] == "Workspace"
    b = await balance(world, owner, ws)
    assert b["held"] == "0.000"
    assert sorted((g["source"], g["remaining"]) for g in b["grants"]) == [
        ("PLAN_ALLOWANCE", "100.000"), ("ROLLOVER", "100.000")]  # this period under the old plan
    [breakage] = (await schedule(world, owner, ws))["breakage"]
    assert (breakage["rolledOver"], breakage["expired"]) == ("100.000", "0.000")
    await world.tick(month(1, timedelta(minutes=30)))  # the scheduler finds nothing left to do there
    assert (await balance(world, owner, ws))["available"] == "200.000"
    await clean(world, ws)
