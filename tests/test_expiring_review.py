"""Review: `balance.expiringSoon` and the expiring-soon alert counted a ROLLOVER plan's whole
remaining allowance as expiring at the period's end, though the close rolls the capped part of
it over into a rollover grant: a dashboard and the alert overstated what would be lost, and
disagreed with `creditSchedule`. Both now show what the close's own rule (`periods.renewal`)
leaves to expire."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from sqlalchemy import event

from domain import identity
from domain.access import Caller
from domain.ledger import queries
from policies import Authorizer
from tests.test_api_ledger import key
from tests.test_periods import (
    GROUP,
    TO_GROUP,
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

FIXTURES = (world, real_time)  # the periods database and server on their own, and their clock reset

NEAR_THE_END = timedelta(days=26)  # a period is 28 to 31 days: its end is 2 to 5 days away
SOON = """
query($ws: ID!, $days: Int!) { balance(workspaceId: $ws, expiringWithinDays: $days) {
  expiringSoon { withinDays credits grants { id source remaining } byGrant { credits grant { id source } } } } }"""
ALERTS = "query($ws: ID!) { alerts(workspaceId: $ws) { kind subject status payload } }"


async def expiring_soon(world, token: str, ws: str, days: int = 7) -> dict:
    async with world.client(token) as api:
        return (await api(SOON, ws=ws, days=days))["balance"]["expiringSoon"]


async def allowance_outlook(world, token: str, ws: str) -> dict:
    """What creditSchedule says the next close does to the allowance (all its pieces together)."""
    pieces = [b for b in (await schedule(world, token, ws))["atNextRenewal"]
              if b["grant"]["source"] == "PLAN_ALLOWANCE"]
    return {k: f"{sum(Decimal(b[k]) for b in pieces):.3f}" for k in ("rollsOver", "expires")}


async def expiry_alerts(world, token: str, ws: str) -> list[tuple[str, str]]:
    """(status, credits) of the workspace's expiring-soon alerts."""
    async with world.client(token) as api:
        return [(a["status"], a["payload"]["credits"]) for a in (await api(ALERTS, ws=ws))["alerts"]
                if a["kind"] == "GRANT_EXPIRING"]


# --- balance.expiringSoon ------------------------------------------------------------------------

async def test_a_rollover_plans_expiring_soon_is_what_the_close_does_not_roll_over(world):
    key_ = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapCredits="300",
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    world.clock.offset = NEAR_THE_END
    soon = await expiring_soon(world, owner, ws)
    assert await allowance_outlook(world, owner, ws) == {"rollsOver": "300.000", "expires": "700.000"}
    # Was 1000: the whole remaining allowance, though 300 of it roll over at the close.
    assert soon["credits"] == "700.000"
    assert [(g["source"], g["remaining"]) for g in soon["grants"]] == [("PLAN_ALLOWANCE", "1000.000")]
    assert [(b["grant"]["source"], b["credits"]) for b in soon["byGrant"]] == [("PLAN_ALLOWANCE", "700.000")]

    await spend(world, owner, ws, "800")  # 200 left, under the cap: all of it rolls over, none is lost
    soon = await expiring_soon(world, owner, ws)
    assert await allowance_outlook(world, owner, ws) == {"rollsOver": "200.000", "expires": "0.000"}
    assert (soon["credits"], soon["grants"], soon["byGrant"]) == ("0.000", [], [])

    [closed] = closes_of(await world.tick(month(1)), ws)  # and the close does what was shown
    assert (closed.rolled_over_units, closed.expired_units) == (200_000, 0)
    await clean(world, ws)


async def test_a_percentage_cap_and_a_promotion_expiring_beside_the_allowance(world):
    key_ = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapPercent=25,
                      rolloverPeriods=3)
    owner, ws = await workspace(world, key_)
    async with world.client(world.operator) as api:
        promo = (await api('mutation($ws: ID!, $k: String!, $e: DateTime) { grantCredits(input: {workspaceId: $ws, '
                           'amount: "40", source: PROMOTION, reason: "launch", idempotencyKey: $k, expiresAt: $e}) '
                           '{ ... on Grant { id } } }', ws=ws, k=key(),
                           e=(world.clock.now() + NEAR_THE_END + timedelta(days=1)).isoformat()))["grantCredits"]
    world.clock.offset = NEAR_THE_END
    soon = await expiring_soon(world, owner, ws)
    assert await allowance_outlook(world, owner, ws) == {"rollsOver": "250.000", "expires": "750.000"}
    assert soon["credits"] == "790.000"  # the allowance's 750 and the whole promotion: nothing rolls it over
    assert {b["grant"]["source"]: b["credits"] for b in soon["byGrant"]} == {"PLAN_ALLOWANCE": "750.000",
                                                                           "PROMOTION": "40.000"}
    assert promo["id"] in {g["id"] for g in soon["grants"]}


async def test_a_reset_plans_expiring_soon_is_still_the_whole_allowance(world):
    key_ = await plan(world, includedCredits="1000")
    owner, ws = await workspace(world, key_)
    world.clock.offset = NEAR_THE_END
    soon = await expiring_soon(world, owner, ws)
    assert await allowance_outlook(world, owner, ws) == {"rollsOver": "0.000", "expires": "1000.000"}
    assert soon["credits"] == "1000.000"
    assert [b["credits"] for b in soon["byGrant"]] == ["1000.000"]


async def test_rolled_over_credits_that_expire_inside_the_window_count_as_lost(world):
    """A rollover that lasts one period expires about a month after the close: asked about the
    next 45 days, the allowance's credits are all lost within them, rolled over or not."""
    key_ = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapCredits="300",
                      rolloverPeriods=1)
    owner, ws = await workspace(world, key_)
    world.clock.offset = NEAR_THE_END
    assert (await expiring_soon(world, owner, ws, days=7))["credits"] == "700.000"
    assert (await expiring_soon(world, owner, ws, days=45))["credits"] == "1000.000"


async def test_an_allowance_split_off_a_spent_piece_shares_one_cap_in_expiring_soon(world):
    """All of the pool's allowance reserved for two groups: the pool's piece is spent out (no
    longer live), and the two live pieces share the one cap of 30 the close applies. Read alone,
    they looked like two allowances with 30 each (40 lost, not 70)."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapCredits="30",
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    async with world.client(owner) as api:
        for _ in range(2):
            group = (await api(GROUP, ws=ws))["createBillingGroup"]["id"]
            out = (await api(TO_GROUP, ws=ws, g=group, a="50", k=key()))["transferCredits"]
            assert out["__typename"] == "Transfer", out
    world.clock.offset = NEAR_THE_END
    soon = await expiring_soon(world, owner, ws)
    assert await allowance_outlook(world, owner, ws) == {"rollsOver": "30.000", "expires": "70.000"}
    assert soon["credits"] == "70.000"
    assert sorted(b["credits"] for b in soon["byGrant"]) == ["20.000", "50.000"]
    [closed] = closes_of(await world.tick(month(1)), ws)
    assert (closed.rolled_over_units, closed.expired_units) == (30_000, 70_000)
    await clean(world, ws)


async def test_the_balance_reads_the_rollover_rule_without_a_statement_of_its_own(world):
    """The rule comes with the workspace row (the period's copy, 0014): a balance is as many
    statements as before the fix (membership, workspace, grants), rollover plan or not; only an
    allowance split off a piece since spent out is read whole, one statement more."""
    rollover = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapCredits="300")
    reset = await plan(world, includedCredits="1000")
    (owner, ws), (owner2, ws2) = await workspace(world, rollover), await workspace(world, reset)
    world.clock.offset = NEAR_THE_END
    sent: list[str] = []

    def count(conn, cursor, statement, *args):
        sent.append(statement)

    async def statements(token: str, ws_id: str) -> tuple[int, int]:
        caller = Caller(await identity.authenticate_secret(world.db, token), Authorizer(), world.clock)
        sent.clear()
        b = await queries.workspace_balance(world.db, caller, workspace_id=ws_id)
        return len(sent), b.expiring_units

    engine = world.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert await statements(owner, ws) == (3, 700_000)
        assert await statements(owner2, ws2) == (3, 1_000_000)
    finally:
        event.remove(engine, "before_cursor_execute", count)


# --- the expiring-soon alert ---------------------------------------------------------------------

async def test_the_expiring_soon_alert_names_only_what_will_be_lost(world):
    capped = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapCredits="300",
                        rolloverPeriods=2)
    whole = await plan(world, includedCredits="1000", rolloverPolicy="ROLLOVER", rolloverCapPercent=100,
                       rolloverPeriods=2)
    reset = await plan(world, includedCredits="1000")
    (owner, ws), (owner2, ws2), (owner3, ws3) = [await workspace(world, p) for p in (capped, whole, reset)]
    await world.tick(NEAR_THE_END)
    assert await expiry_alerts(world, owner, ws) == [("OPEN", "700.000")]  # was 1000
    assert await expiry_alerts(world, owner2, ws2) == []  # all of it rolls over: nothing to warn about
    assert await expiry_alerts(world, owner3, ws3) == [("OPEN", "1000.000")]

    # Spent down under the cap, the allowance loses nothing any more: the alert resolves (and is
    # not fired again at the next tick).
    await spend(world, owner, ws, "800")
    await world.tick(NEAR_THE_END + timedelta(minutes=1))
    await world.tick(NEAR_THE_END + timedelta(minutes=2))
    assert await expiry_alerts(world, owner, ws) == [("RESOLVED", "700.000")]
