"""Review of six suspicions the governance and periods reviews left unconfirmed. The ones that
proved real bugs stay as regression tests; the others pin behaviour the review found right. The fourth
(a change of timezone mid-period) grew into tests/test_timezones.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from tests.conftest import new_user
from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import ADD, COMPLETE, FAIL, START, TRANSFER, assert_ledger_clean, balance, grant, key, make_team
from tests.test_governance_review import ASSIGN, GROUP, TO_GROUP
from tests.test_periods import (  # noqa: F401 - the periods database and its clock reset
    clean,
    closes_of,
    month,
    plan,
    real_time,
    schedule,
    spend,
    workspace,
    world,
)
from tests.test_periods import balance as p_balance


# --- 1. requestOverage without a limit id -----------------------------------------------------------

async def test_an_overage_request_without_a_limit_raises_the_limit_that_blocks_the_spend(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        # The member's own daily limit is the smaller figure but has room; the workspace's monthly
        # limit is full (the owner spent it), and that is the one refusing the member's start.
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="15", action="REQUIRE_APPROVAL",
                  member=member)
        workspace_limit = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="MONTH", amount="20",
                                     action="REQUIRE_APPROVAL"))["setSpendLimit"]["id"]
    assert [(await start(client, team.owner, team.ws))["__typename"] for _ in range(2)] == ["Generation"] * 2
    blocked = await start(client, token, team.ws)
    assert (blocked["__typename"], blocked["used"], blocked["limit"]) == ("SpendLimitExceeded", "20.000", "20.000")
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="10", reason="one more"))["requestOverage"]
    assert req["limitId"] == workspace_limit  # not the member's limit, which has 15 to spare
    async with client(team.owner) as api:
        assert (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]["status"] == "APPROVED"
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    await assert_ledger_clean(db, team.ws)


# --- 2. the extra captured above a hold, after the member changed billing group ---------------------

GRANTS = "query($ws: ID!) { balance(workspaceId: $ws) { grants { scope billingGroupId remaining held } } }"
LIMITS_OF = "query($ws: ID!) { spendLimits(workspaceId: $ws) { id used } }"


async def test_the_extra_above_a_hold_is_paid_by_the_group_the_generation_started_in(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        a, b = [(await api(GROUP, ws=team.ws))["createBillingGroup"]["id"] for _ in range(2)]
        for g, amount in ((a, "30"), (b, "40")):
            assert (await api(TO_GROUP, ws=team.ws, g=g, a=amount, k=key()))["transferCredits"]["__typename"] == "Transfer"
        limit_a = (await api(SET_LIMIT, ws=team.ws, scope="GROUP", period="DAY", amount="100", action="BLOCK",
                             group=a))["setSpendLimit"]["id"]
        limit_b = (await api(SET_LIMIT, ws=team.ws, scope="GROUP", period="DAY", amount="100", action="BLOCK",
                             group=b))["setSpendLimit"]["id"]
        assert (await api(ASSIGN, m=member, g=a))["assignBillingGroup"]["__typename"] == "Member"
    gen = await start(client, token, team.ws)  # 10 held on group A's reservation
    async with client(team.owner) as api:  # the member moves on to campaign B while it runs
        assert (await api(ASSIGN, m=member, g=b))["assignBillingGroup"]["__typename"] == "Member"
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="25"))["completeGeneration"]
    assert (done["captured"], done["shortfall"]) == ("25.000", "0.000")
    async with client(team.owner) as api:
        grants = (await api(GRANTS, ws=team.ws))["balance"]["grants"]
        used = {l["id"]: l["used"] for l in (await api(LIMITS_OF, ws=team.ws))["spendLimits"]}
    left = {g: sum(Decimal(x["remaining"]) for x in grants if x["billingGroupId"] == g) for g in (a, b)}
    # Campaign A's generation is paid by campaign A, all of it, and counted in A's limit; B's
    # reservation and B's limit are untouched.
    assert left == {a: Decimal(5), b: Decimal(40)}
    assert (used[limit_a], used[limit_b]) == ("25.000", "0.000")
    await assert_ledger_clean(db, team.ws)


# --- 5. zero-priced generations and spend limits ------------------------------------------------------

async def test_credits_captured_by_a_zero_priced_generation_count_toward_limits(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="BLOCK", member=member)
    free = await start(client, token, team.ws, model="test-free")
    assert (free["__typename"], free["cost"]) == ("Generation", "0.000")
    async with client(team.worker) as api:  # the worker reports what the job really cost
        done = (await api(COMPLETE, g=free["id"], key=key(), cost="15"))["completeGeneration"]
    assert (done["captured"], done["shortfall"]) == ("15.000", "0.000")
    async with client(team.owner) as api:
        assert (await api(LIMITS_OF, ws=team.ws))["spendLimits"][0]["used"] == "15.000"  # captured credits count
    # 15 of 20 used: one 10-credit generation no longer fits ...
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
    # ... while a free one still starts: limits count credits, not generations.
    assert (await start(client, token, team.ws, model="test-free"))["__typename"] == "Generation"
    await assert_ledger_clean(db, team.ws)


# --- 6. PER_SEAT after a change of allocation mode ----------------------------------------------------

MODE = ('mutation($ws: ID!, $m: AllocationMode!) { updateWorkspace(input: {workspaceId: $ws, allocationMode: $m}) '
        '{ __typename ... on Workspace { allocationMode } } }')


async def test_per_seat_after_pooled_and_back_draws_the_right_buckets_exactly(db, client):
    team = await make_team(db, client, mode="POOLED", creators=2)
    (a, a_member), (b, b_member) = team.creators
    pool = (await grant(client, team, "100"))["id"]
    seat_a = (await grant(client, team, "30", member=a_member))["id"]  # granted while POOLED: kept, not spendable

    async def mode(m: str) -> None:
        async with client(team.owner) as api:
            assert (await api(MODE, ws=team.ws, m=m))["updateWorkspace"] == {"__typename": "Workspace",
                                                                             "allocationMode": m}

    async def spend(token: str, model: str = "sdxl") -> dict:
        return await start(client, token, team.ws, model=model)

    def paid_by(gen: dict) -> list[tuple[str, str]]:
        return [(h["grant"]["id"], h["held"]) for h in gen["holds"]]

    pooled_gen = await spend(a)  # POOLED: the pool pays, the seat grant is left alone
    assert paid_by(pooled_gen) == [(pool, "5.000")]

    await mode("PER_SEAT")
    seat_gen = await spend(a)  # now only A's own seat pays
    assert paid_by(seat_gen) == [(seat_a, "5.000")]
    refused = await spend(b)  # B has no seat credits and there is no fallback to the pool
    assert (refused["__typename"], refused["available"]) == ("InsufficientCredits", "0.000")
    assert (await balance(client, a, team.ws))["viewerSpendable"] == "25.000"
    assert (await balance(client, b, team.ws))["viewerSpendable"] == "0.000"
    async with client(team.worker) as api:  # the POOLED-era hold settles on the grant it came from
        done = (await api(COMPLETE, g=pooled_gen["id"], key=key(), cost="3"))["completeGeneration"]
    assert (done["captured"], done["released"]) == ("3.000", "2.000")
    assert [(h["grant"]["id"], h["captured"], h["released"]) for h in done["holds"]] == [(pool, "3.000", "2.000")]
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="10", key=key(), to=b_member))["transferCredits"]
    seat_b = moved["grants"][0]["id"]
    b_gen = await spend(b)
    assert paid_by(b_gen) == [(seat_b, "5.000")]

    await mode("POOLED")
    back = await spend(a)  # the pool again; A's seat credits stay put
    assert paid_by(back) == [(pool, "5.000")]
    async with client(team.worker) as api:  # a PER_SEAT-era hold is refunded to A's seat
        failed = (await api(FAIL, g=seat_gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    assert [(h["grant"]["id"], h["released"]) for h in failed["holds"]] == [(seat_a, "5.000")]
    assert (await balance(client, a, team.ws))["viewerSpendable"] == "82.000"  # 100 - 3 - 10 - 5

    b_ = await balance(client, team.owner, team.ws)
    figures = {g["id"]: (g["remaining"], g["held"], g["captured"], g["transferredOut"]) for g in b_["grants"]}
    assert figures == {
        pool: ("82.000", "5.000", "3.000", "10.000"),
        seat_a: ("30.000", "0.000", "0.000", "0.000"),
        seat_b: ("5.000", "5.000", "0.000", "0.000"),
    }
    scopes = {(s["scope"], s["memberId"]): (s["available"], s["held"]) for s in b_["scopes"]}
    assert scopes == {("WORKSPACE", None): ("82.000", "5.000"), ("SEAT", a_member): ("30.000", "0.000"),
                      ("SEAT", b_member): ("5.000", "5.000")}
    await assert_ledger_clean(db, team.ws)


async def test_allowances_follow_the_mode_at_each_boundary_after_switching_and_back(world):
    key_ = await plan(world, includedCredits="50", rolloverPolicy="RESET")
    owner, ws = await workspace(world, key_, mode="POOLED")
    async with world.client(owner) as api:
        email, creator = await new_user(world.db, prefix="creator")
        c_member = (await api(ADD, ws=ws, email=email, role="MEMBER", seat="CREATOR"))["addMember"]["id"]
        assert (await api(MODE, ws=ws, m="PER_SEAT"))["updateWorkspace"]["allocationMode"] == "PER_SEAT"

    def allowances(b: dict) -> dict:
        return {(g["scope"], g["memberId"]): g["remaining"] for g in b["grants"] if g["source"] == "PLAN_ALLOWANCE"}

    # Mid-period the pooled allowance stays in the pool (nothing moves with the mode); seats get
    # theirs at the next boundary, like a creator seat added mid-period.
    b = await p_balance(world, owner, ws)
    assert (allowances(b), b["viewerSpendable"]) == ({("WORKSPACE", None): "50.000"}, "0.000")
    [closed] = closes_of(await world.tick(month(1)), ws)
    assert (closed.expired_units, closed.issued_units) == (50_000, 100_000)  # pool reset; 50 a creator seat
    await spend(world, owner, ws, "20")
    b = await p_balance(world, owner, ws)
    [owner_member] = {g["memberId"] for g in b["grants"] if g["memberId"] != c_member and g["memberId"]}
    assert allowances(b) == {("SEAT", owner_member): "30.000", ("SEAT", c_member): "50.000"}
    assert (b["viewerSpendable"], (await p_balance(world, creator, ws))["viewerSpendable"]) == ("30.000", "50.000")

    async with world.client(owner) as api:
        assert (await api(MODE, ws=ws, m="POOLED"))["updateWorkspace"]["allocationMode"] == "POOLED"
    [closed] = closes_of(await world.tick(month(2)), ws)
    assert (closed.expired_units, closed.issued_units) == (80_000, 50_000)  # both seats reset; one pool allowance
    await spend(world, creator, ws, "10")
    b = await p_balance(world, owner, ws)
    assert (allowances(b), b["viewerSpendable"]) == ({("WORKSPACE", None): "40.000"}, "40.000")
    await clean(world, ws)


# --- 3. allowance credits released after their period ended -------------------------------------------

async def _rollover_workspace(world) -> tuple[str, str, datetime]:
    """A workspace on a plan rolling over all of a 100-credit allowance: (owner, id, boundary)."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapPercent=100,
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    return owner, ws, datetime.fromisoformat((await schedule(world, owner, ws))["nextRenewalAt"])


async def _hold_50(world, owner: str, ws: str) -> str:
    async with world.client(owner) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    assert gen["__typename"] == "Generation", gen
    return gen["id"]


async def _expiries(world, owner: str, ws: str) -> list[str]:
    async with world.client(owner) as api:
        edges = (await api('query($ws: ID!) { ledger(workspaceId: $ws, filter: {kinds: [EXPIRE]}) '
                           '{ edges { node { amount } } } }', ws=ws))["ledger"]["edges"]
    return [e["node"]["amount"] for e in edges]


async def test_allowance_released_after_its_period_expires_the_same_whether_the_close_ran_or_not(world):
    """Held at the boundary, released after it: those credits were not there to roll over, and
    they expire on release (issue 6). The outcome must not depend on when the tick runs."""
    late, on_time = await _rollover_workspace(world), await _rollover_workspace(world)
    world.clock.offset = late[2] - world.clock.now() - timedelta(minutes=30)  # within the hold TTL of the end
    gens = [await _hold_50(world, owner, ws) for owner, ws, _ in (late, on_time)]

    async def fail(gen: str) -> None:
        async with world.client(world.operator) as api:
            out = (await api(FAIL, g=gen, key=key(), kind="TECHNICAL"))["failGeneration"]
        assert out.get("released") == "50.000", out

    after = on_time[2] - (world.clock.now() - world.clock.offset) + timedelta(minutes=1)
    world.clock.offset = after
    await fail(gens[0])  # before the close has run
    report = await world.tick(after)
    await fail(gens[1])  # after it ran
    for owner, ws, _ in (late, on_time):
        [closed] = closes_of(report, ws)
        # The 50 free at the boundary rolled over and the new 100 were issued; the 50 released
        # after the boundary expired on release (an expiry entry: nothing lost unrecorded).
        assert (closed.rolled_over_units, closed.expired_units, closed.issued_units) == (50_000, 0, 100_000)
        b = await p_balance(world, owner, ws)
        assert (b["available"], b["held"]) == ("150.000", "0.000")
        assert await _expiries(world, owner, ws) == ["50.000"]
        await clean(world, ws)



async def test_a_hold_that_timed_out_before_the_boundary_rolls_over_even_when_the_tick_runs_late(world):
    """Found next to suspicion 3: a hold whose time-to-live ran out an hour before the boundary
    was back on the allowance at the boundary (a tick on time releases it then), so it rolls
    over. A tick that first runs after the boundary must reach the same result, not expire it."""
    owner, ws, boundary = await _rollover_workspace(world)
    world.clock.offset = boundary - world.clock.now() - timedelta(hours=2)  # its deadline: an hour before the end
    await _hold_50(world, owner, ws)
    report = await world.tick(boundary - (world.clock.now() - world.clock.offset) + timedelta(minutes=1))
    [closed] = closes_of(report, ws)
    assert (closed.rolled_over_units, closed.expired_units) == (100_000, 0)
    b = await p_balance(world, owner, ws)
    assert (b["available"], b["held"]) == ("200.000", "0.000")
    assert await _expiries(world, owner, ws) == []
    await clean(world, ws)
