"""Review of the money lifecycle around the calendar: what a spend draws from once a boundary
(or midnight UTC) has passed and the scheduler has not reached it yet. Each test here first
demonstrated a real bug (since fixed)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from domain import identity
from domain.access import Caller
from domain.ledger import service
from domain.ledger.models import EntryKind
from domain.periods import service as periods
from domain.periods.rules import next_day
from policies import Authorizer
from tests.test_api_ledger import START, TRANSFER, key
from tests.test_periods import (  # noqa: F401 - the periods database and its clock reset
    balance,
    clean,
    TTL,
    closes_of,
    month,
    plan,
    real_time,
    schedule,
    workspace,
    world,
)

GRANT = """
mutation($ws: ID!, $amount: String!, $key: String!) {
  grantCredits(input: {workspaceId: $ws, amount: $amount, source: PROMOTION, reason: "kept for later",
                       idempotencyKey: $key}) { __typename } }"""


async def _promotion(world, ws: str, amount: str) -> None:  # noqa: F811 - the fixture's value
    async with world.client(world.operator) as api:
        assert (await api(GRANT, ws=ws, amount=amount, key=key()))["grantCredits"]["__typename"] == "Grant"


async def _start(world, token: str, ws: str) -> dict:  # noqa: F811
    async with world.client(token) as api:
        gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
    assert gen["__typename"] == "Generation", gen
    return gen


async def test_a_start_after_a_boundary_the_tick_has_not_reached_draws_that_periods_allowance(world):  # noqa: F811
    """Ten minutes after a boundary, before any tick: the new period's allowance (issued at the
    boundary by a tick on time) pays, not the never-expiring credits kept for later. Before, the
    start found the old allowance expired and the new one not issued yet, so it held 50 of the
    promotion, and the allowance issued later expired at the period's end with those 50 unspent:
    50 credits lost for a scheduler a few minutes late (cron, downtime, a long round). A
    workspace with nothing but its allowance was refused outright (InsufficientCredits)."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    lean_owner, lean = await workspace(world, key_)
    await _promotion(world, ws, "500")
    world.clock.offset = month(1, timedelta(minutes=10))
    [hold] = (await _start(world, owner, ws))["holds"]
    assert (hold["grant"]["source"], hold["held"]) == ("PLAN_ALLOWANCE", "50.000")
    assert datetime.fromisoformat(hold["grant"]["expiresAt"]) > world.clock.now()
    boundary = (await schedule(world, owner, ws))["periodStart"]
    b = await balance(world, owner, ws)
    assert sorted((g["source"], g["effectiveAt"] == boundary, g["remaining"], g["held"]) for g in b["grants"]) == [
        ("PLAN_ALLOWANCE", True, "50.000", "50.000"), ("PROMOTION", False, "500.000", "0.000")]
    [hold] = (await _start(world, lean_owner, lean))["holds"]
    assert (hold["grant"]["source"], hold["held"]) == ("PLAN_ALLOWANCE", "50.000")
    await _closed_once(world, (owner, ws), (lean_owner, lean))


async def test_a_start_after_midnight_the_tick_has_not_reached_draws_that_days_free_credits(world):  # noqa: F811
    """The same for the daily free credits, due at 00:00 UTC for every workspace at once (the
    scheduler's longest round): a start five seconds after midnight is paid by today's free
    credits, not by the promotion kept for later; before, it held 50 of the promotion and
    today's 60 free credits, issued a moment later, expired at the next midnight unspent."""
    key_ = await plan(world, dailyFreeCredits="60")
    owner, ws = await workspace(world, key_)
    await _promotion(world, ws, "500")
    now = world.clock.now()
    world.clock.offset = next_day(now) - now + timedelta(seconds=5)
    [hold] = (await _start(world, owner, ws))["holds"]
    assert (hold["grant"]["source"], hold["held"]) == ("DAILY_FREE", "50.000")
    assert datetime.fromisoformat(hold["grant"]["expiresAt"]) == next_day(world.clock.now())
    await world.tick(world.clock.offset + timedelta(minutes=1))
    b = await balance(world, owner, ws)
    assert sorted((g["source"], g["remaining"], g["held"]) for g in b["grants"]) == [
        ("DAILY_FREE", "10.000", "50.000"), ("PROMOTION", "500.000", "0.000")]
    await clean(world, ws)


async def test_starts_racing_the_tick_after_a_boundary_close_it_once_and_all_draw_the_new_allowance(world):  # noqa: F811
    """Twelve starts on one workspace ten minutes after a boundary, all at once and beside the
    scheduler's tick: the boundary closes once (the tick skips a workspace a start is closing,
    a start waits for the tick's close and then finds nothing due), and every start holds the
    new allowance."""
    key_ = await plan(world, includedCredits="1000")
    owner, ws = await workspace(world, key_)
    await _promotion(world, ws, "500")
    world.clock.offset = month(1, timedelta(minutes=10))
    *gens, report = await asyncio.gather(*(_start(world, owner, ws) for _ in range(12)),
                                         periods.tick(world.db, world.clock, hold_ttl=TTL))
    assert {(h["grant"]["source"], h["held"]) for g in gens for h in g["holds"]} == {("PLAN_ALLOWANCE", "50.000")}
    assert len(closes_of(report, ws)) <= 1
    [breakage] = (await schedule(world, owner, ws))["breakage"]
    assert (breakage["expired"], breakage["issued"]) == ("1000.000", "1000.000")
    b = await balance(world, owner, ws)
    assert sorted((g["source"], g["remaining"], g["held"]) for g in b["grants"]) == [
        ("PLAN_ALLOWANCE", "400.000", "600.000"), ("PROMOTION", "500.000", "0.000")]
    await clean(world, ws)


async def test_a_start_whose_close_fails_spends_what_is_there_and_the_scheduler_closes_later(
        world, monkeypatch, caplog):  # noqa: F811
    """A close broken for the moment (bad data, a bug) is the scheduler's to report and retry:
    a start that tried it is not refused for it, it spends what is there, as before."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    await _promotion(world, ws, "500")
    world.clock.offset = month(1, timedelta(minutes=10))

    async def broken(*args, **kwargs):
        raise RuntimeError("a close that fails")

    monkeypatch.setattr(periods, "close_due_periods", broken)
    caller = Caller(await identity.authenticate_secret(world.db, owner), Authorizer(), world.clock)
    with caplog.at_level("WARNING", logger="creditpool"):
        started = await service.start_generation(world.db, caller, workspace_id=ws, model_key="video-standard",
                                                 idempotency_key=key(), hold_ttl=TTL)
    assert [e.amount for e in started.entries if e.kind is EntryKind.HOLD] == [50_000]
    assert {g.source.value for g in started.grants.values()} == {"PROMOTION"}
    assert "closing the due periods of workspace" in caplog.text
    monkeypatch.undo()
    assert len(closes_of(await world.tick(month(1, timedelta(minutes=30))), ws)) == 1
    await clean(world, ws)


LEDGER = """
query($ws: ID!, $since: DateTime, $until: DateTime) {
  ledger(workspaceId: $ws, filter: {kinds: [EXPIRE], since: $since, until: $until}) {
    edges { node { kind amount occurredAt createdAt } } } }"""


async def _transfer_to_owner(world, owner: str, ws: str, amount: str) -> dict:  # noqa: F811
    async with world.client(owner) as api:
        seat = (await api("query($ws: ID!) { workspace(id: $ws) { members { id } } }", ws=ws))["workspace"]
        return (await api(TRANSFER, ws=ws, amount=amount, key=key(), to=seat["members"][0]["id"]))["transferCredits"]


async def test_a_transfer_after_a_boundary_the_tick_has_not_reached_moves_that_periods_allowance(world):  # noqa: F811
    """The start's case for transferCredits: ten minutes after a boundary, before any tick, 30
    credits moved from the pool to a seat are the new period's allowance (issued at the boundary
    by a tick on time), not the never-expiring credits kept for later. Before, the transfer found
    the old allowance expired and the new one not issued yet, so it moved 30 of the promotion,
    and the allowance issued a moment later stayed in the pool (to expire unspent if the pool
    was not drawn on); a pool with nothing but its allowance was refused (InsufficientCredits)."""
    key_ = await plan(world, includedCredits="100")
    owner, ws = await workspace(world, key_)
    lean_owner, lean = await workspace(world, key_)
    await _promotion(world, ws, "500")
    world.clock.offset = month(1, timedelta(minutes=10))
    for token, space in ((owner, ws), (lean_owner, lean)):
        moved = await _transfer_to_owner(world, token, space, "30")
        assert moved["__typename"] == "Transfer", moved
        [piece] = moved["grants"]
        assert (piece["source"], piece["amount"]) == ("PLAN_ALLOWANCE", "30.000")
        assert datetime.fromisoformat(piece["expiresAt"]) > world.clock.now()
    b = await balance(world, owner, ws)
    assert sorted((g["scope"], g["source"], g["remaining"]) for g in b["grants"] if g["remaining"] != "0.000") == [
        ("SEAT", "PLAN_ALLOWANCE", "30.000"), ("WORKSPACE", "PLAN_ALLOWANCE", "70.000"),
        ("WORKSPACE", "PROMOTION", "500.000")]
    await _closed_once(world, (owner, ws), (lean_owner, lean))


async def test_a_transfer_after_midnight_the_tick_has_not_reached_moves_that_days_free_credits(world):  # noqa: F811
    """The same for the daily free credits: five seconds after midnight UTC, a transfer to a
    seat moves today's free credits; before, it moved the promotion kept for later."""
    key_ = await plan(world, dailyFreeCredits="60")
    owner, ws = await workspace(world, key_)
    await _promotion(world, ws, "500")
    now = world.clock.now()
    world.clock.offset = next_day(now) - now + timedelta(seconds=5)
    moved = await _transfer_to_owner(world, owner, ws, "20")
    assert moved["__typename"] == "Transfer", moved
    [piece] = moved["grants"]
    assert (piece["source"], piece["amount"]) == ("DAILY_FREE", "20.000")
    assert datetime.fromisoformat(piece["expiresAt"]) == next_day(world.clock.now())
    await clean(world, ws)


async def test_the_ledger_dates_and_filters_an_entry_by_when_it_happened_not_when_the_scheduler_wrote_it(
        world):  # noqa: F811
    """A promotion expires on a day the scheduler does not run (downtime): its expiry entry is
    written days later, at the time it belongs to (creditSchedule's breakage counts it in its
    own period). The ledger showed only when the entry was written and filtered since/until by
    that, so the month's ledger left out an expiry the month's breakage counted, and the next
    month's showed it. Now each entry has occurredAt, and since/until filter by it."""
    key_ = await plan(world)
    owner, ws = await workspace(world, key_)
    expires = world.clock.now() + timedelta(days=3)
    async with world.client(world.operator) as api:
        out = await api('mutation($ws: ID!, $k: String!, $at: DateTime) { grantCredits(input: {workspaceId: $ws, '
                        'amount: "20", source: PROMOTION, reason: "r", idempotencyKey: $k, expiresAt: $at}) '
                        '{ __typename } }', ws=ws, k=key(), at=expires.isoformat())
        assert out["grantCredits"]["__typename"] == "Grant"
    await world.tick(timedelta(days=6))  # three days late
    day = timedelta(days=1)

    async def expiries(since, until) -> list[dict]:
        async with world.client(owner) as api:
            page = (await api(LEDGER, ws=ws, since=since.isoformat(), until=until.isoformat()))["ledger"]
        return [e["node"] for e in page["edges"]]

    [entry] = await expiries(expires - day, expires + day)
    assert (entry["amount"], datetime.fromisoformat(entry["occurredAt"])) == ("20.000", expires)
    assert await expiries(expires + day, expires + 4 * day) == []
    await clean(world, ws)


async def test_an_operator_allowance_expiring_before_the_period_end_expires_on_its_date_and_never_rolls_over(
        world):  # noqa: F811
    """An operator grants part of a period's allowance by hand (source PLAN_ALLOWANCE, effective
    at the period start) to last ten days. A tick on time expires it on day ten (it is no piece
    the close is still to decide: the sweep only waits for allowances expiring at the period's
    end). creditSchedule promised it rolls over at the period's end, and a tick that came only
    after the boundary did roll those expired credits over: a promise the scheduler on time
    broke, and credits dead since day ten brought back by a late one."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapPercent=100,
                      rolloverPeriods=2)
    owner, ws = await workspace(world, key_)
    start = (await schedule(world, owner, ws))["periodStart"]
    expires = datetime.fromisoformat(start) + timedelta(days=10)
    async with world.client(world.operator) as api:
        out = await api('mutation($ws: ID!, $k: String!, $at: DateTime, $ef: DateTime) { grantCredits(input: {'
                        'workspaceId: $ws, amount: "30", source: PLAN_ALLOWANCE, reason: "r", idempotencyKey: $k, '
                        'expiresAt: $at, effectiveAt: $ef}) { __typename ... on Grant { id } } }',
                        ws=ws, k=key(), at=expires.isoformat(), ef=start)
    piece = out["grantCredits"]["id"]
    outlook = {datetime.fromisoformat(o["grant"]["expiresAt"]): (o["rollsOver"], o["expires"])
               for o in (await schedule(world, owner, ws))["atNextRenewal"]}
    assert outlook[expires] == ("0.000", "30.000")
    [closed] = closes_of(await world.tick(month(1)), ws)  # nothing ran between day ten and the boundary
    assert (closed.rolled_over_units, closed.expired_units) == (100_000, 0)
    b = await balance(world, owner, ws)
    [early] = [g for g in b["grants"] if g["id"] == piece] or [None]
    assert early is None  # spent out: expired, not rolled over
    assert sorted((g["source"], g["remaining"]) for g in b["grants"]) == [
        ("PLAN_ALLOWANCE", "100.000"), ("ROLLOVER", "100.000")]
    [breakage] = (await schedule(world, owner, ws))["breakage"]
    assert (breakage["expired"], breakage["rolledOver"]) == ("30.000", "100.000")
    await clean(world, ws)


async def _closed_once(world, *spaces: tuple[str, str]) -> None:  # noqa: F811
    """Each workspace's boundary was closed once, by the catch-up: the tick that comes later
    finds nothing left to do, and the period's breakage counts the allowance once."""
    report = await world.tick(month(1, timedelta(minutes=30)))
    assert [closes_of(report, space) for _, space in spaces] == [[] for _ in spaces]
    for token, space in spaces:
        [breakage] = (await schedule(world, token, space))["breakage"]
        assert (breakage["expired"], breakage["issued"]) == ("100.000", "100.000")
        await clean(world, space)
