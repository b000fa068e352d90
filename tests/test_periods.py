"""Time-based rules on their own database and server: periods, allowances, rollover, expiry,
daily credits, hold timeouts, catch-up and concurrent schedulers. Time moves only through the
server's clock; nothing sleeps for a period."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import identity
from domain import pricing as _pricing  # noqa: F401 - models registered
from domain.access import Caller
from domain.db import Database
from domain.events import NotifyOutlet
from domain.ledger.invariants import check_ledger
from domain.periods.rules import add_months
from domain.periods.service import tick
from domain.plans import update_plan
from policies import Authorizer
from tests.conftest import LiveServer, http_client, new_user, own_database
from tests.test_api_ledger import ADD, BALANCE, COMPLETE, PURCHASE, START, _a_pack, key

TTL = timedelta(hours=1)
CREATE_PLAN = """
mutation($input: PlanInput!) { createPlan(input: $input) { __typename ... on Plan { key rolloverPolicy }
                                                         ... on ValidationError { field message } } }"""
SCHEDULE = """
query($ws: ID!) { creditSchedule(workspaceId: $ws) {
  nextRenewalAt periodStart periodRollover { policy capCredits capPercent periods }
  atNextRenewal { rollsOver expires stays grant { source remaining expiresAt } }
  breakage { periodStart periodEnd expired rolledOver issued } } }"""


@dataclass
class World:
    db: Database
    server: LiveServer
    operator: str

    def client(self, token):
        return http_client(self.server, token)

    @property
    def clock(self):
        return self.server.clock

    async def tick(self, at: timedelta):
        self.clock.offset = at
        return await tick(self.db, self.clock, hold_ttl=TTL)


@pytest.fixture(scope="module")
async def world(pg_server):
    async with own_database(pg_server, "creditpool_periods") as (url, db):
        # The scheduler runs in this test process, like `creditpool tick` beside a server: its
        # events reach the server's subscribers through PostgreSQL NOTIFY.
        db.events = NotifyOutlet()
        server = LiveServer(url, broadcast_url="postgres", db_pool_size=5)
        server.start()
        try:
            _, operator = await new_user(db, operator=True)
            yield World(db, server, operator)
        finally:
            server.stop()


@pytest.fixture(autouse=True)
def real_time(world):
    world.clock.offset = timedelta(0)
    yield
    world.clock.offset = timedelta(0)


async def plan(world: World, **fields) -> str:
    key_ = f"p-{uuid.uuid4().hex[:10]}"
    async with world.client(world.operator) as api:
        out = (await api(CREATE_PLAN, input={"key": key_, "name": "Test plan", "seatCap": 10,
                                             "freeCreatorSeats": 5, **fields}))["createPlan"]
    assert out["__typename"] == "Plan", out
    return key_


async def workspace(world: World, plan_key: str, mode: str = "POOLED") -> tuple[str, str]:
    """(owner token, workspace id); the owner holds a creator seat."""
    _, owner = await new_user(world.db)
    async with world.client(owner) as api:
        ws = (await api('mutation($p: String!, $m: AllocationMode!) { createWorkspace(input: {name: "W", '
                        'planKey: $p, allocationMode: $m}) { ... on Workspace { id } } }', p=plan_key, m=mode))
    return owner, ws["createWorkspace"]["id"]


async def balance(world: World, token: str, ws: str) -> dict:
    async with world.client(token) as api:
        return (await api(BALANCE, ws=ws))["balance"]


async def schedule(world: World, token: str, ws: str) -> dict:
    async with world.client(token) as api:
        return (await api(SCHEDULE, ws=ws))["creditSchedule"]


async def spend(world: World, token: str, ws: str, cost: str) -> None:
    _, worker = await new_user(world.db, operator=True)
    async with world.client(token) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    assert gen["__typename"] == "Generation", gen
    async with world.client(worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost=cost))["completeGeneration"]
    assert done["captured"] == f"{float(cost):.3f}"


def month(n: int, extra: timedelta = timedelta(minutes=1)):
    """An offset that lands just after the n-th monthly boundary from now (31-day months cover any)."""
    return timedelta(days=31 * n) + extra


async def clean(world: World, ws: str) -> None:
    assert await check_ledger(world.db, uuid.UUID(ws)) == []


def closes_of(report, ws: str) -> list:
    return [c for c in report.closes if str(c.workspace_id) == ws]


# --- the scenarios the issue names -------------------------------------------------------------

async def test_three_months_of_a_rollover_plan_with_a_cap(world):
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapCredits="30",
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    assert (await balance(world, owner, ws))["available"] == "100.000"
    await spend(world, owner, ws, "40")
    outlook = {b["grant"]["source"]: b for b in (await schedule(world, owner, ws))["atNextRenewal"]}
    assert (outlook["PLAN_ALLOWANCE"]["rollsOver"], outlook["PLAN_ALLOWANCE"]["expires"]) == ("30.000", "30.000")

    r1 = await world.tick(month(1))
    assert [(c.rolled_over_units, c.expired_units, c.issued_units) for c in closes_of(r1, ws)] == [(30000, 30000, 100000)]
    assert (await balance(world, owner, ws))["available"] == "130.000"
    await clean(world, ws)

    r2 = await world.tick(month(2))
    assert [(c.rolled_over_units, c.expired_units) for c in closes_of(r2, ws)] == [(30000, 70000)]
    assert (await balance(world, owner, ws))["available"] == "160.000"  # two rollovers + the allowance

    r3 = await world.tick(month(3))
    assert [(c.rolled_over_units, c.expired_units) for c in closes_of(r3, ws)] == [(30000, 70000)]
    b = await balance(world, owner, ws)
    assert b["available"] == "160.000"  # the first rollover expired after its two periods
    assert sorted(g["source"] for g in b["grants"]) == ["PLAN_ALLOWANCE", "ROLLOVER", "ROLLOVER"]
    breakage = (await schedule(world, owner, ws))["breakage"]
    # Newest first: period 3 lost 70 of its allowance and the first rollover's 30.
    assert [p["expired"] for p in breakage] == ["100.000", "70.000", "30.000"]
    assert [p["rolledOver"] for p in breakage] == ["30.000", "30.000", "30.000"]
    await clean(world, ws)


async def test_a_reset_plan_expires_the_unused_allowance(world):
    key_ = await plan(world, includedCredits="50")
    owner, ws = await workspace(world, key_)
    await spend(world, owner, ws, "10")
    report = await world.tick(month(1))
    assert [(c.rolled_over_units, c.expired_units, c.issued_units) for c in closes_of(report, ws)] == [(0, 40000, 50000)]
    b = await balance(world, owner, ws)
    assert (b["available"], [g["source"] for g in b["grants"]]) == ("50.000", ["PLAN_ALLOWANCE"])
    assert (await schedule(world, owner, ws))["breakage"][0]["expired"] == "40.000"
    await clean(world, ws)


async def test_a_daily_free_allowance_resets_each_day(world):
    key_ = await plan(world, dailyFreeCredits="5")
    owner, ws = await workspace(world, key_)
    assert (await balance(world, owner, ws))["available"] == "5.000"
    await world.tick(timedelta(days=1, hours=1))
    b = await balance(world, owner, ws)
    assert (b["available"], len(b["grants"])) == ("5.000", 1)  # yesterday's expired, today's issued
    report = await world.tick(timedelta(days=4, hours=1))  # three days of downtime: one grant, not three
    assert (await balance(world, owner, ws))["available"] == "5.000"
    assert report.daily_issued >= 1
    await clean(world, ws)


async def test_a_promotion_that_expires_mid_hold_stays_capturable(world):
    key_ = await plan(world)
    owner, ws = await workspace(world, key_)
    from datetime import UTC, datetime
    expires = (datetime.now(UTC) + timedelta(minutes=30)).isoformat()
    async with world.client(world.operator) as api:
        g = (await api('mutation($ws: ID!, $k: String!, $e: DateTime) { grantCredits(input: {workspaceId: $ws, '
                       'amount: "60", source: PROMOTION, reason: "launch", idempotencyKey: $k, expiresAt: $e}) '
                       '{ ... on Grant { id } } }', ws=ws, k=key(), e=expires))["grantCredits"]
    async with world.client(owner) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    await world.tick(timedelta(minutes=45))  # the promotion expired while 50 were held: 10 expire now
    b = await balance(world, owner, ws)
    assert (b["available"], b["held"]) == ("0.000", "50.000")
    async with world.client(world.operator) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="20"))["completeGeneration"]
    assert (done["captured"], done["released"]) == ("20.000", "30.000")
    promo = [x for x in (await balance(world, owner, ws))["grants"] if x["id"] == g["id"]]
    assert promo == []  # the released 30 expired at once: nothing left, nothing lost unrecorded
    await clean(world, ws)


async def test_three_missed_months_are_caught_up_once_each_in_order(world):
    key_ = await plan(world, includedCredits="20")
    owner, ws = await workspace(world, key_)
    report = await world.tick(month(3, timedelta(days=1)))
    closes = closes_of(report, ws)
    assert len(closes) == 3
    assert [c.period_end for c in closes] == sorted(c.period_end for c in closes)
    assert all(a.period_end == b.period_start for a, b in zip(closes, closes[1:]))
    assert [c.expired_units for c in closes] == [20000, 20000, 20000]
    again = await world.tick(month(3, timedelta(days=1)))
    assert closes_of(again, ws) == []
    assert (await balance(world, owner, ws))["available"] == "20.000"
    await clean(world, ws)


async def test_two_schedulers_at_once_process_each_boundary_exactly_once(world, pg_server):
    key_ = await plan(world, includedCredits="10", rolloverPolicy="ROLLOVER", rolloverCapPercent=50)
    spaces = [await workspace(world, key_) for _ in range(6)]
    other = Database(world.db.url.replace("postgresql+asyncpg://", "postgresql://"), pool_size=5)
    try:
        world.clock.offset = month(2)
        reports = await asyncio.gather(tick(world.db, world.clock, hold_ttl=TTL),
                                       tick(other, world.clock, hold_ttl=TTL))
    finally:
        await other.dispose()
    for _, ws in spaces:
        closed = closes_of(reports[0], ws) + closes_of(reports[1], ws)
        assert len(closed) == 2 and len({c.period_start for c in closed}) == 2
        await clean(world, ws)
    owner, ws = spaces[0]
    # The new allowance (10) plus the latest rollover (5); the first rollover lived one period.
    assert (await balance(world, owner, ws))["available"] == "15.000"


async def test_a_top_up_bought_just_before_a_boundary_survives_it(world):
    key_ = await plan(world, includedCredits="30")
    owner, ws = await workspace(world, key_)
    renewal = (await schedule(world, owner, ws))["nextRenewalAt"]
    pack = await _a_pack(http_client_factory(world), world.operator)
    from datetime import datetime
    world.clock.offset = datetime.fromisoformat(renewal) - world.clock.now() + world.clock.offset - timedelta(minutes=1)
    async with world.client(owner) as api:
        bought = (await api(PURCHASE, ws=ws, pack=pack, ref=f"pay-{uuid.uuid4()}", key=key()))["purchaseCredits"]
    assert bought["__typename"] == "Purchase"
    await world.tick(month(1, timedelta(hours=1)))
    b = await balance(world, owner, ws)
    grants = {g["source"]: g for g in b["grants"]}
    assert grants["PURCHASE"]["remaining"] == "500.000" and grants["PURCHASE"]["expired"] == "0.000"
    assert b["available"] == "530.000"
    await clean(world, ws)


def http_client_factory(world: World):
    return lambda token: world.client(token)


# --- hold timeouts, plan changes, seats ---------------------------------------------------------

async def test_a_hold_past_its_time_to_live_is_released_and_timed_out(world):
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    async with world.client(owner) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    early = await world.tick(timedelta(minutes=30))
    assert (await balance(world, owner, ws))["held"] == "50.000" and early.holds_timed_out == 0
    await world.tick(timedelta(minutes=61))
    b = await balance(world, owner, ws)
    assert (b["available"], b["held"]) == ("100.000", "0.000")
    async with world.client(owner) as api:
        g = (await api("query($id: ID!) { generation(id: $id) { status released } }", id=gen["id"]))["generation"]
    assert g == {"status": "TIMED_OUT", "released": "50.000"}
    await clean(world, ws)


async def test_a_downgrade_keeps_banked_rollover_until_its_own_expiry(world):
    """A downgrade applies from the next boundary: the allowance of the period it was made in was
    issued under the rich plan's rule and rolls over as the schedule showed it; the poor plan's
    rule (RESET) governs the allowances issued from then on. Banked rollover keeps its expiry."""
    rich = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapCredits="40",
                      rolloverPeriods=3)
    poor = await plan(world, includedCredits="10")
    owner, ws = await workspace(world, rich)
    await world.tick(month(1))  # 40 banked (expires three periods after the first boundary)
    promised = await schedule(world, owner, ws)
    async with world.client(owner) as api:
        out = await api('mutation($ws: ID!, $p: String!) { updateWorkspace(input: {workspaceId: $ws, planKey: $p}) '
                        '{ __typename } }', ws=ws, p=poor)
    assert out["updateWorkspace"]["__typename"] == "Workspace"
    after = await schedule(world, owner, ws)
    assert after["atNextRenewal"] == promised["atNextRenewal"]
    assert after["periodRollover"] == {"policy": "ROLLOVER", "capCredits": "40.000", "capPercent": None, "periods": 3}
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.rolled_over_units, closed.expired_units, closed.issued_units) == (40_000, 60_000, 10_000)
    assert (await schedule(world, owner, ws))["periodRollover"] == {
        "policy": "RESET", "capCredits": None, "capPercent": None, "periods": 1}
    b = await balance(world, owner, ws)
    assert sorted((g["source"], g["remaining"]) for g in b["grants"]) == [
        ("PLAN_ALLOWANCE", "10.000"), ("ROLLOVER", "40.000"), ("ROLLOVER", "40.000")]
    [closed] = closes_of(await world.tick(month(3)), ws)  # the poor plan's allowance: RESET
    assert (closed.rolled_over_units, closed.expired_units) == (0, 10_000)
    await world.tick(month(4, timedelta(days=3)))  # the first 40 reach their expiry, the second not yet
    assert sorted(g["source"] for g in (await balance(world, owner, ws))["grants"]) == ["PLAN_ALLOWANCE", "ROLLOVER"]
    await clean(world, ws)


async def test_an_upgrade_mid_period_does_not_roll_over_an_allowance_issued_to_expire(world):
    """The other way round: an allowance issued under RESET expires whole at the close after an
    upgrade to a ROLLOVER plan (as its schedule said); the next one, issued under the new plan,
    rolls over."""
    reset = await plan(world, includedCredits="100")
    rolling = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapPercent=25)
    owner, ws = await workspace(world, reset)
    async with world.client(owner) as api:
        out = await api('mutation($ws: ID!, $p: String!) { updateWorkspace(input: {workspaceId: $ws, planKey: $p}) '
                        '{ __typename } }', ws=ws, p=rolling)
    assert out["updateWorkspace"]["__typename"] == "Workspace"
    [allowance] = [b for b in (await schedule(world, owner, ws))["atNextRenewal"]
                   if b["grant"]["source"] == "PLAN_ALLOWANCE"]
    assert (allowance["rollsOver"], allowance["expires"]) == ("0.000", "100.000")
    [closed] = closes_of(await world.tick(month(1)), ws)
    assert (closed.rolled_over_units, closed.expired_units) == (0, 100_000)
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.rolled_over_units, closed.expired_units) == (25_000, 75_000)
    await clean(world, ws)


async def test_an_operator_editing_a_plans_rollover_mid_period_changes_the_next_periods_not_this_one(world):
    """`update_plan` (a domain operation: operators' edits apply from each workspace's next
    boundary) changes neither the current period's close nor what its schedule shows."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapCredits="40")
    owner, ws = await workspace(world, key_)
    before = await schedule(world, owner, ws)
    operator = Caller(await identity.authenticate_secret(world.db, world.operator), Authorizer(), world.clock)
    edited = await update_plan(world.db, operator, key=key_, rollover_cap_units=10_000)
    assert edited.rollover_cap_units == 10_000
    assert (await schedule(world, owner, ws))["atNextRenewal"] == before["atNextRenewal"]
    [closed] = closes_of(await world.tick(month(1)), ws)
    assert (closed.rolled_over_units, closed.expired_units) == (40_000, 60_000)
    [allowance] = [b for b in (await schedule(world, owner, ws))["atNextRenewal"]
                   if b["grant"]["source"] == "PLAN_ALLOWANCE"]
    assert (allowance["rollsOver"], allowance["expires"]) == ("10.000", "90.000")
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.rolled_over_units, closed.expired_units) == (10_000, 90_000)
    await clean(world, ws)


async def test_an_operator_giving_a_plan_daily_credits_starts_them_the_next_day_in_its_workspaces(world):
    key_ = await plan(world, includedCredits="10")
    owner, ws = await workspace(world, key_)
    operator = Caller(await identity.authenticate_secret(world.db, world.operator), Authorizer(), world.clock)
    await update_plan(world.db, operator, key=key_, daily_free_units=3_000)
    assert (await balance(world, owner, ws))["available"] == "10.000"  # not today: from the next day
    await world.tick(timedelta(days=1, hours=1))
    b = await balance(world, owner, ws)
    assert sorted((g["source"], g["remaining"]) for g in b["grants"]) == [
        ("DAILY_FREE", "3.000"), ("PLAN_ALLOWANCE", "10.000")]
    await clean(world, ws)


async def test_cancelling_stops_allowances_and_keeps_every_purchased_credit(world):
    key_ = await plan(world, includedCredits="25")
    owner, ws = await workspace(world, key_)
    pack = await _a_pack(http_client_factory(world), world.operator)
    async with world.client(owner) as api:
        await api(PURCHASE, ws=ws, pack=pack, ref=f"pay-{uuid.uuid4()}", key=key())
        out = await api('mutation($ws: ID!) { cancelSubscription(input: {workspaceId: $ws}) '
                        '{ ... on Workspace { cancelledAt } } }', ws=ws)
    assert out["cancelSubscription"]["cancelledAt"] is not None
    await world.tick(month(2))
    b = await balance(world, owner, ws)
    assert (b["available"], [g["source"] for g in b["grants"]]) == ("500.000", ["PURCHASE"])
    await clean(world, ws)


async def test_per_seat_allowances_go_to_every_creator_seat(world):
    key_ = await plan(world, includedCredits="15")
    owner, ws = await workspace(world, key_, mode="PER_SEAT")
    async with world.client(owner) as api:
        added = (await api(ADD, ws=ws, email=f"c-{key()}@example.test", role="MEMBER", seat="CREATOR"))["addMember"]
    await world.tick(month(1))
    b = await balance(world, owner, ws)
    seats = {s["memberId"]: s["available"] for s in b["scopes"] if s["scope"] == "SEAT"}
    assert seats[added["id"]] == "15.000" and len(seats) == 2
    await clean(world, ws)


async def test_operators_only_define_plans_and_bad_plans_are_refused(world):
    owner, _ = await workspace(world, "starter")
    async with world.client(owner) as api:
        with pytest.raises(Exception) as err:
            await api(CREATE_PLAN, input={"key": "mine", "name": "x", "seatCap": 3})
    assert "FORBIDDEN" in str(err.value)
    async with world.client(world.operator) as api:
        for bad in ({"rolloverCapPercent": 150}, {"includedCredits": "-1"}, {"trialCredits": "5"},
                    {"freeCreatorSeats": 11}):
            out = (await api(CREATE_PLAN, input={"key": f"b-{uuid.uuid4().hex[:6]}", "name": "x", "seatCap": 10, **bad}))
            assert out["createPlan"]["__typename"] == "ValidationError", bad


def test_monthly_boundaries_keep_the_billing_day():
    from datetime import UTC, datetime

    anchor = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    assert [add_months(anchor, k).date().isoformat() for k in range(1, 5)] == [
        "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]


async def test_expiries_and_period_closes_reach_workspace_event_subscribers(world):
    from tests.conftest import ws_client

    key_ = await plan(world, includedCredits="10", dailyFreeCredits="1")
    owner, ws = await workspace(world, key_)
    async with ws_client(world.server, owner) as live:
        stream = live.subscribe("subscription($ws: ID!) { workspaceEvents(workspaceId: $ws) { kind payload } }", ws=ws)
        first = asyncio.ensure_future(asyncio.wait_for(stream.__anext__(), 10))
        await asyncio.sleep(0.3)
        await world.tick(month(1))
        kinds = [(await first)["workspaceEvents"]["kind"]]
        while len(set(kinds)) < 2:
            kinds.append((await asyncio.wait_for(stream.__anext__(), 5))["workspaceEvents"]["kind"])
        await stream.aclose()
    assert {"PERIOD_CLOSED", "CREDITS_EXPIRED"} <= set(kinds)


# --- the scheduler beside work in flight on the same workspace --------------------------------------

GROUP = 'mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "G"}) { ... on BillingGroup { id } } }'
TO_GROUP = ('mutation($ws: ID!, $g: ID!, $a: String!, $k: String!) { transferCredits(input: {workspaceId: $ws, '
            'amount: $a, idempotencyKey: $k, toBillingGroupId: $g}) { __typename ... on Error { code message } } }')


async def reserved_for_a_group(world: World, amount: str, **rollover) -> tuple[str, str, str]:
    """A workspace on a plan of 100 included credits that roll over by `rollover` (for two
    periods), with `amount` of its allowance reserved for a new billing group: (owner, workspace,
    group)."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverPeriods=2, **rollover)
    owner, ws = await workspace(world, key_)
    async with world.client(owner) as api:
        group = (await api(GROUP, ws=ws))["createBillingGroup"]["id"]
        out = (await api(TO_GROUP, ws=ws, g=group, a=amount, k=key()))["transferCredits"]
    assert out["__typename"] == "Transfer", out
    return owner, ws, group


async def _lock_waits(db: Database) -> int:
    # Its own statement outside any transaction: a transaction sees one stats snapshot.
    return (await db.fetchrow("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                              "AND datname = current_database()"))["n"]


async def test_a_due_period_closes_even_while_a_spend_is_in_flight_on_the_workspace(world):
    """Any row a spend writes (a generation, a ledger entry, an idempotency key) takes a KEY SHARE
    lock on the workspace row through its foreign key until its transaction ends. The scheduler
    claimed due workspaces FOR UPDATE SKIP LOCKED, which conflicts with KEY SHARE: a busy
    workspace (a spend always in flight) was skipped by every tick, so its period never closed,
    its new allowance and its daily credits were never issued."""
    key_ = await plan(world, includedCredits="40", dailyFreeCredits="5")
    owner, ws = await workspace(world, key_)
    ws_id = uuid.UUID(ws)
    pool = await world.db._pool()
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            # What a start's idempotency claim does in the transaction path (the generation row and
            # the ledger entries of the one-statement path take the same foreign-key lock).
            user = await conn.fetchval("SELECT user_id FROM members WHERE workspace_id = $1", ws_id)
            await conn.execute(
                "INSERT INTO idempotency_keys (workspace_id, actor_id, key, operation, request_hash, result_id) "
                "VALUES ($1, $2, $3, 'startGeneration', '\\x00'::bytea, $4)", ws_id, user, key(), uuid.uuid4())
            report = await world.tick(month(1))
        finally:
            await tx.rollback()
    assert len(closes_of(report, ws)) == 1, "the due period was skipped: a spend in flight hid the workspace"
    daily = await world.db.fetchrow(
        "SELECT count(*) AS n FROM grants WHERE workspace_id = $1 AND source = 'DAILY_FREE'", ws_id)
    assert daily["n"] == 2, "today's daily credits were skipped: a spend in flight hid the workspace"
    await clean(world, ws)


async def test_a_transfer_splitting_the_allowance_while_the_period_closes_rolls_over_every_piece(world):
    """The close claims the workspace FOR NO KEY UPDATE (spends' key-share locks must not hide
    it), so a transfer's own key-share locks no longer keep it out either. A transfer that split
    the allowance before the boundary (its clock) and commits while the close runs would leave a
    piece the close never read: that piece then expired instead of rolling over. The transfer
    takes FOR SHARE on the workspace row, so the close sees all pieces or none (it skips the
    workspace until the transfer commits)."""
    from domain import identity
    from domain.access import Caller
    from domain.clock import OffsetClock
    from domain.ledger.service import transfer_credits
    from policies import Authorizer

    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapPercent=100,
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    async with world.client(owner) as api:
        group = (await api(GROUP, ws=ws))["createBillingGroup"]["id"]
    posted, release = asyncio.Event(), asyncio.Event()

    class HeldOpen:
        """The transfer's transaction, held open after its work until released."""

        async def transaction(self, work):
            async def held(session):
                out = await work(session)
                posted.set()
                await release.wait()
                return out
            return await world.db.transaction(held)

    before_the_boundary = OffsetClock()  # the transfer's clock; the tick runs after the boundary
    caller = Caller(await identity.authenticate_secret(world.db, owner), Authorizer(), before_the_boundary)
    transfer = asyncio.ensure_future(transfer_credits(HeldOpen(), caller, workspace_id=ws, amount="40",
                                                      idempotency_key=key(), to_group_id=group, hold_ttl=TTL))
    await asyncio.wait_for(posted.wait(), 10)
    ticking = asyncio.ensure_future(world.tick(month(1)))
    # Either the tick skips the workspace (the fix) and finishes, or the close waits for the
    # transfer's grant lock: release the transfer then.
    while not ticking.done() and not await _lock_waits(world.db):
        await asyncio.sleep(0.01)
    release.set()
    moved = await transfer
    assert moved.units == 40_000
    closes = closes_of(await ticking, ws) + closes_of(await world.tick(month(1)), ws)
    await clean(world, ws)
    assert [(c.rolled_over_units, c.expired_units) for c in closes] == [(100_000, 0)]
    b = await balance(world, owner, ws)
    rolled = sorted((g["scope"], g["remaining"]) for g in b["grants"] if g["source"] == "ROLLOVER")
    assert rolled == [("GROUP", "40.000"), ("WORKSPACE", "60.000")]


# --- what the credit schedule promises is what the close applies -------------------------------------

async def test_the_credit_schedule_shows_the_rollover_the_close_will_apply_to_a_split_allowance(world):
    """The promise: each bucket's rollover rule is shown and applied exactly as stated. An
    allowance split by a reservation for a group shares one cap at the close; the schedule
    applied the cap to each piece and promised 30 + 30 where 30 roll over."""
    from decimal import Decimal

    owner, ws, _ = await reserved_for_a_group(world, "50", rolloverCapCredits="30")
    allowance = [b for b in (await schedule(world, owner, ws))["atNextRenewal"]
                 if b["grant"]["source"] == "PLAN_ALLOWANCE"]
    assert len(allowance) == 2  # the pool's piece and the group's
    promised = {k: sum(Decimal(b[k]) for b in allowance) for k in ("rollsOver", "expires")}
    [closed] = closes_of(await world.tick(month(1)), ws)
    await clean(world, ws)
    assert promised == {"rollsOver": Decimal("30"), "expires": Decimal("70")}
    assert (closed.rolled_over_units, closed.expired_units) == (30_000, 70_000)


def _pieces(draw_amounts: list[int], spent: list[int]) -> list:
    """An allowance of sum(draw_amounts) split into pieces (the root keeps the first amount, each
    later piece was split off the previous one), each with `spent` of it used."""
    from domain.periods.rules import AllowancePiece

    ids = sorted(uuid.uuid4() for _ in draw_amounts)
    total = sum(draw_amounts)
    pieces, parent = [], None
    for i, (amount, used) in enumerate(zip(draw_amounts, spent)):
        # A root's amount is what was issued; a piece split off keeps its own amount.
        pieces.append(AllowancePiece(ids[i], parent, total if i == 0 else amount, amount - used, True))
        parent = ids[i]
    return pieces


def test_a_split_allowance_shares_one_cap_in_piece_order():
    from domain.periods.rules import AllowancePiece, allowance_rollover

    pieces = _pieces([50, 50], [0, 0])
    keeps = allowance_rollover(pieces, 30, None)
    assert [keeps[p.id] for p in pieces] == [30, 0]  # the first piece takes the cap, the second expires
    spent_first = _pieces([50, 50], [40, 0])
    keeps = allowance_rollover(spent_first, 30, None)
    assert [keeps[p.id] for p in spent_first] == [10, 20]
    # A percentage cap is of what was issued (the root's amount), not of a piece.
    assert sum(allowance_rollover(_pieces([60, 40], [0, 0]), None, 50).values()) == 50
    # Two allowances (two seats) have a cap each; a never-expiring piece stays as it is.
    a, b = uuid.uuid4(), uuid.uuid4()
    seats = [AllowancePiece(a, None, 100, 100, True), AllowancePiece(b, None, 100, 100, True),
             AllowancePiece(uuid.uuid4(), None, 100, 100, False)]
    assert sorted(allowance_rollover(seats, 30, None).values()) == [0, 30, 30]


@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(0, 10_000)), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(0, 20_000)), st.one_of(st.none(), st.integers(0, 100)))
def test_splitting_an_allowance_never_changes_how_much_rolls_over(split, cap_units, cap_percent):
    from domain.periods.rules import allowance_rollover, rollover_units

    amounts = [a for a, _ in split]
    pieces = _pieces(amounts, [min(used, a) for a, used in split])
    keeps = allowance_rollover(reversed(pieces), cap_units, cap_percent)  # any order in, id order applied
    unused = sum(p.remaining for p in pieces)
    assert sum(keeps.values()) == rollover_units(unused, sum(amounts), cap_units, cap_percent)
    assert all(0 <= keeps[p.id] <= p.remaining for p in pieces)


# --- a PER_SEAT plan's trial and daily credits -------------------------------------------------------

async def test_a_per_seat_creator_can_spend_the_plans_trial_and_daily_free_credits(world):
    """A PER_SEAT workspace on a plan with trial and daily free credits: like the allowance, they
    go to each creator seat, not to the pool, which PER_SEAT (without fallback) never draws from
    (where they would only ever expire)."""
    key_ = await plan(world, trialCredits="20", trialDays=14, dailyFreeCredits="5")
    owner, ws = await workspace(world, key_, mode="PER_SEAT")
    b = await balance(world, owner, ws)
    assert b["available"] == "25.000"
    async with world.client(owner) as api:
        out = (await api(START, ws=ws, model="sdxl", key=key()))["startGeneration"]
    assert out["__typename"] == "Generation", (out, b["viewerSpendable"])
    # The next day's free credits go to every creator seat, one added since included; the pool
    # gets nothing a PER_SEAT creator could never spend.
    async with world.client(owner) as api:
        added = (await api(ADD, ws=ws, email=f"c-{key()}@example.test", role="MEMBER", seat="CREATOR"))["addMember"]
    await world.tick(timedelta(days=1, hours=1))
    daily = await world.db.fetchrow(
        "SELECT count(*) FILTER (WHERE scope = 'SEAT') AS seats, count(*) FILTER (WHERE scope = 'WORKSPACE') AS pool, "
        "count(*) FILTER (WHERE member_id = $2) AS new_seat FROM grants WHERE workspace_id = $1 AND source = 'DAILY_FREE'",
        uuid.UUID(ws), uuid.UUID(added["id"]))
    assert (daily["seats"], daily["pool"], daily["new_seat"]) == (3, 0, 1)  # the owner's two days, the new seat's one
    await clean(world, ws)
