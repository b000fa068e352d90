"""Auto top-up keeps the pool over its threshold, one purchase at a time: what re-arms it, which
balance it watches, what an unanswered payment's retry asks for, the alerts around it, and how a
claim whose outcome never came (the process died) is taken over under the same reference."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from domain import identity
from domain.access import Caller
from domain.clock import OffsetClock
from domain.db import Database
from domain.governance.automation import CLAIM_TIMEOUT
from domain.ledger import service
from domain.ledger.payments import PaymentOutcome, PaymentRequest
from domain.periods.service import tick
from policies import Authorizer
from tests.test_api_governance import AUTO, TOPUP_STATE, purchases_of, start, start_unanswered
from tests.conftest import new_user
from tests.test_api_ledger import TRANSFER, _a_pack, assert_ledger_clean, grant, key, make_team

ALERTS_FULL = "query($ws: ID!) { alerts(workspaceId: $ws) { id kind status } }"
ACK = "mutation($id: ID!) { acknowledgeAlert(input: {alertId: $id}) { __typename } }"
STATE = "query($ws: ID!) { autoTopUp(workspaceId: $ws) { enabled purchasesThisMonth creditsThisMonth } }"


async def small_pack(client, operator: str, credits: str = "20", price_minor: int = 500) -> str:
    async with client(operator) as api:
        out = (await api(
            'mutation($c: String!, $p: Int!) { createCreditPack(input: {name: "Small pack", credits: $c, '
            'priceMinor: $p, currency: "usd"}) { __typename ... on CreditPack { id } } }', c=credits, p=price_minor,
        ))["createCreditPack"]
    assert out["__typename"] == "CreditPack", out
    return out["id"]


async def under_auto_top_up(db, client, threshold: str, pack_credits: str = "20", price_minor: int = 500):
    """A one-creator POOLED team with 100 credits and auto top-up of a small pack at `threshold`
    (at most 5 purchases a month; three failures in a row turn it off): (team, creator, pack)."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    pack = await small_pack(client, team.operator, pack_credits, price_minor)
    async with client(team.owner) as api:
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold=threshold, limit=3))["setAutoTopUp"]["enabled"]
    return team, team.creators[0][0], pack


async def pool_credits(db, ws: str) -> list[int]:
    from sqlalchemy import text

    async def work(session):
        return list((await session.execute(text(
            "SELECT amount FROM grants WHERE workspace_id = CAST(:ws AS uuid) AND source = 'PURCHASE' "
            "ORDER BY created_at"), {"ws": ws})).scalars())

    return await db.read(work)


async def test_a_spend_that_takes_the_pool_from_over_to_under_the_threshold_after_a_top_up_buys_again(
        db, live_server, client):
    team, token, _ = await under_auto_top_up(db, client, "95")
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 100 -> 90: under
    assert await purchases_of(db, team.ws) == 1  # 90 + 20 = 110: over again
    # One video (50 credits) takes it from 110 to 60 in one step: no spend ever saw it over the
    # threshold between the two, and it must buy all the same.
    assert (await start(client, token, team.ws, model="video-standard"))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 2


async def test_a_pack_too_small_to_lift_the_pool_buys_again_at_the_next_spend_within_the_monthly_cap(
        db, live_server, client):
    team, token, _ = await under_auto_top_up(db, client, "500", pack_credits="5", price_minor=100)
    for _ in range(7):
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 5
    async with client(team.owner) as api:
        state = (await api(STATE, ws=team.ws))["autoTopUp"]
        kinds = [a["kind"] for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"] if a["status"] == "OPEN"]
    assert state == {"enabled": True, "purchasesThisMonth": 5, "creditsThisMonth": "25.000"}
    assert "TOPUP_CAP_REACHED" in kinds


async def pool_moved_to_a_seat(db, client, moved: str, threshold: str):
    """A one-creator POOLED team (spends draw from the pool only) with 100 credits, `moved` of
    them moved to the creator's seat with no spend to see the pool drop, and auto top-up of a
    500-credit pack at `threshold`: (team, creator, pack)."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    pack = await _a_pack(client, team.operator)  # 500 credits
    async with client(team.owner) as api:
        out = (await api(TRANSFER, ws=team.ws, amount=moved, key=key(), to=member))["transferCredits"]
        assert out["__typename"] == "Transfer"
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold=threshold, limit=3))["setAutoTopUp"]["enabled"]
    return team, token, pack


async def test_auto_top_up_watches_the_pool_not_credits_on_seats_the_spends_cannot_reach(db, live_server, client):
    team, token, _ = await pool_moved_to_a_seat(db, client, "90", "50")
    # The workspace holds 100 credits, but only 10 are in the pool: under the threshold.
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 1
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # paid by the top-up


async def expiring_pool(db, client, provider):
    """A team whose pool holds only 100 credits that expire in an hour, with auto top-up of a
    500-credit pack at 50, and a tick of the server's scheduler paying through `provider` at a
    clock that can be moved: (team, clock, a_tick)."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100", expires=datetime.now(timezone.utc) + timedelta(hours=1))
    pack = await small_pack(client, team.operator, "500", 4500)
    async with client(team.owner) as api:
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="50", limit=3))["setAutoTopUp"]["enabled"]
    clock = OffsetClock()

    async def a_tick():
        return await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)

    return team, clock, a_tick


async def test_a_pool_whose_credits_expire_is_topped_up_by_the_scheduler_with_no_spend(db, live_server, client):
    # Nobody spends: the pool's promotion expires, and only the scheduler sees the pool under its
    # threshold. Without it the team's next generation would be refused, and buy nothing.
    provider = DeduplicatingProvider()
    team, clock, a_tick = await expiring_pool(db, client, provider)
    await a_tick()  # 100 credits in the pool: nothing is due
    assert provider.asked(team.ws) == []
    clock.offset = timedelta(hours=2)
    report = await a_tick()  # the promotion expires, then the empty pool is topped up
    assert report.grants_expired >= 1 and report.top_ups_started >= 1
    assert provider.asked(team.ws) == [(f"auto-topup:{team.ws}:1", 4500)]
    assert await pool_credits(db, team.ws) == [500_000]
    await a_tick()  # over the threshold again: nothing more to buy
    assert len(provider.asked(team.ws)) == 1
    await assert_ledger_clean(db, team.ws)


async def test_after_a_declined_top_up_the_scheduler_leaves_the_retries_to_spends(db, live_server, client):
    # A round every interval would use up the failure limit (3) of a workspace nobody uses during
    # a short provider outage, and turn its auto top-up off.
    provider = DeduplicatingProvider(decline=True)
    team, clock, a_tick = await expiring_pool(db, client, provider)
    clock.offset = timedelta(hours=2)
    await a_tick()  # expired: the scheduler asks once, and the payment is declined
    assert len(provider.asked(team.ws)) == 1
    for _ in range(3):
        await a_tick()
    assert len(provider.asked(team.ws)) == 1
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["enabled"] is True


async def test_a_start_refused_for_want_of_credits_buys_the_due_top_up_so_that_a_retry_succeeds(
        db, live_server, client):
    team, token, pack = await pool_moved_to_a_seat(db, client, "97", "2")  # the pool keeps 3 credits
    # Refused while the pool is over the threshold: no purchase is due, none is made.
    assert (await start(client, token, team.ws))["__typename"] == "InsufficientCredits"
    assert await purchases_of(db, team.ws) == 0
    async with client(team.owner) as api:
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="50", limit=3))["setAutoTopUp"]["enabled"]
    # Under it: the refusal stands, and the top-up is bought before it is answered.
    assert (await start(client, token, team.ws))["__typename"] == "InsufficientCredits"
    assert await purchases_of(db, team.ws) == 1
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    await assert_ledger_clean(db, team.ws)


async def test_an_unanswered_payment_is_retried_for_the_same_pack_after_the_pack_changed(db, live_server, client):
    # The retry goes out under the same payment reference (the first attempt may have been paid),
    # so it must ask for the same amount: a provider that deduplicates by reference would answer
    # "paid" and the workspace would get the new pack's credits for the old pack's price.
    team, token, _ = await under_auto_top_up(db, client, "95")  # a pack of 20 credits for 5.00 USD
    big = await _a_pack(client, team.operator)  # 500 credits, 45.00 USD
    seen = len(live_server.payments.seen)
    await start_unanswered(live_server, client, token, team.ws)
    async with client(team.owner) as api:  # the billing manager switches to the big pack
        assert (await api(AUTO, ws=team.ws, pack=big, threshold="95", limit=3))["setAutoTopUp"]["enabled"]
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # the retry
    first, again = live_server.payments.seen[seen:seen + 2]
    assert again.reference == first.reference
    assert (again.amount_minor, again.currency) == (first.amount_minor, first.currency) == (500, "USD")
    assert await pool_credits(db, team.ws) == [20_000]  # the cheap pack's 20 credits, in units
    # That reference is settled: the next purchase is the big pack, under a new reference.
    assert (await start(client, token, team.ws, model="video-standard"))["__typename"] == "Generation"
    third = live_server.payments.seen[seen + 2]
    assert (third.reference != first.reference, third.amount_minor) == (True, 4500)
    assert await pool_credits(db, team.ws) == [20_000, 500_000]


async def test_turning_auto_top_up_back_on_resolves_its_alerts_so_the_next_disable_alerts_again(
        db, live_server, client):
    team, token, pack = await under_auto_top_up(db, client, "95")

    async def three_declines() -> None:
        live_server.payments.failures = 3
        try:
            for _ in range(3):  # each spend stays under the threshold; the third failure turns it off
                assert (await start(client, token, team.ws))["__typename"] == "Generation"
        finally:
            live_server.payments.failures = 0

    await three_declines()
    async with client(team.owner) as api:
        [disabled] = [a for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"] if a["kind"] == "TOPUP_DISABLED"]
        assert disabled["status"] == "OPEN"
        await api(ACK, id=disabled["id"])
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="95", limit=3))["setAutoTopUp"]["enabled"]
        still_open = [a["kind"] for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"] if a["status"] == "OPEN"]
    assert not {"TOPUP_DISABLED", "TOPUP_FAILED"} & set(still_open)  # on again: neither holds any more
    await three_declines()
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["enabled"] is False
        disables = [a["status"] for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"]
                    if a["kind"] == "TOPUP_DISABLED"]
    assert sorted(disables) == ["OPEN", "RESOLVED"]


# --- a claim whose outcome never comes ------------------------------------------------------------

class Crash(BaseException):
    """The process dying while the provider is asked: not an `Exception`, so nothing on the way
    up (the unanswered-payment handler, `after_spend`) catches it and records an outcome."""


class DeduplicatingProvider:
    """A provider that deduplicates by reference, as real ones do with an idempotency key: a
    reference it has charged is answered "paid" again and never charged twice. `die_before` /
    `die_after`: the next calls kill the process before it charges / after it charged;
    `unanswered`: the next calls charge but never answer (a timeout); `decline`: every payment
    is declined. With `workspace` set, only that workspace's requests follow the script (a tick
    serves every workspace in the database); the others are answered "paid"."""

    name = "deduplicating"

    def __init__(self, *, die_before: int = 0, die_after: int = 0, unanswered: int = 0, decline: bool = False) -> None:
        self.die_before, self.die_after, self.decline = die_before, die_after, decline
        self.unanswered = unanswered
        self.workspace: str | None = None
        self.seen: list[PaymentRequest] = []
        self.charged: list[str] = []

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome:
        self.seen.append(request)
        if self.workspace is not None and not request.reference.startswith(f"auto-topup:{self.workspace}:"):
            return PaymentOutcome(ok=True)
        if self.die_before > 0:
            self.die_before -= 1
            raise Crash()
        if self.decline:
            return PaymentOutcome(ok=False, reason="card declined")
        if request.reference not in self.charged:
            self.charged.append(request.reference)
        if self.die_after > 0:
            self.die_after -= 1
            raise Crash()
        if self.unanswered > 0:
            self.unanswered -= 1
            raise TimeoutError("the payment provider did not answer")
        return PaymentOutcome(ok=True)

    def asked(self, ws: str) -> list[tuple[str, int]]:
        """(reference, amount) of every request for workspace `ws` (a tick may serve others)."""
        return [(r.reference, r.amount_minor) for r in self.seen if r.reference.startswith(f"auto-topup:{ws}:")]

    def charged_for(self, ws: str) -> list[str]:
        return [r for r in self.charged if r.startswith(f"auto-topup:{ws}:")]


def spender(db: Database, token: str, ws: str, clock: OffsetClock, provider):
    """One process's spends: a start through the domain, at `clock`, paying through `provider`."""

    async def spend():
        caller = Caller(await identity.authenticate_secret(db, token), Authorizer(), clock)
        return await service.start_generation(db, caller, workspace_id=ws, model_key="dalle-3",
                                              idempotency_key=key(), payments=provider,
                                              hold_ttl=timedelta(hours=1))

    return spend


async def abandoned_claim(db, client, provider, *, pack_credits: str = "20", price_minor: int = 500):
    """A team whose first auto top-up claim committed and whose process then died asking the
    provider (`provider` decides whether it charged first): (team, spend, clock, first request)."""
    team, token, _ = await under_auto_top_up(db, client, "95", pack_credits, price_minor)
    clock = OffsetClock()
    spend = spender(db, token, team.ws, clock, provider)
    with pytest.raises(Crash):
        await spend()  # 100 -> 90: under the threshold; the claim commits, then the process dies
    [first] = provider.asked(team.ws)
    assert await purchases_of(db, team.ws) == 0
    return team, spend, clock, first


async def test_a_claim_abandoned_before_the_payment_is_taken_over_after_the_timeout_under_the_same_reference(
        db, live_server, client):
    provider = DeduplicatingProvider(die_before=1)
    team, spend, clock, first = await abandoned_claim(db, client, provider)
    clock.offset = CLAIM_TIMEOUT - timedelta(seconds=5)
    await spend()  # still in flight for all anyone knows: nothing is asked again
    assert provider.asked(team.ws) == [first] and await purchases_of(db, team.ws) == 0
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    await spend()  # abandoned: taken over, same reference, same pack (20 credits for 5.00)
    assert provider.asked(team.ws) == [first, first] and first[1] == 500
    assert provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"] == {
            "enabled": True, "purchasesThisMonth": 1, "creditsThisMonth": "20.000"}
    # Settled and re-armed: the next spend under the threshold buys under a new reference.
    await spend()
    third = provider.asked(team.ws)[2]
    assert third[0] != first[0] and await pool_credits(db, team.ws) == [20_000, 20_000]
    await assert_ledger_clean(db, team.ws)


async def test_the_scheduler_takes_over_an_abandoned_claim_in_a_workspace_with_no_spends(db, live_server, client):
    provider = DeduplicatingProvider(die_before=1)
    team, _, clock, first = await abandoned_claim(db, client, provider)

    async def a_tick():
        return await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)

    clock.offset = CLAIM_TIMEOUT - timedelta(seconds=5)
    await a_tick()
    assert provider.asked(team.ws) == [first]
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    assert (await a_tick()).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first, first]
    assert await pool_credits(db, team.ws) == [20_000]
    await a_tick()  # settled: nothing left to take over
    assert provider.asked(team.ws) == [first, first]
    await assert_ledger_clean(db, team.ws)


async def test_a_payment_taken_before_the_process_died_is_granted_once_by_the_take_over(db, live_server, client):
    provider = DeduplicatingProvider(die_after=1)  # charged, then the process died: no credits yet
    team, spend, clock, first = await abandoned_claim(db, client, provider)
    assert provider.charged_for(team.ws) == [first[0]] and await pool_credits(db, team.ws) == []
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    await spend()  # the same reference: the provider answers "paid" without charging again
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    assert await purchases_of(db, team.ws) == 1
    await assert_ledger_clean(db, team.ws)


class TakesTheDatabaseWhenItAnswers(DeduplicatingProvider):
    """Charges and answers "paid", but first takes the only connection of `tiny`'s ORM pool, so
    that the outcome cannot be recorded (`Unavailable`) until `release()`."""

    def __init__(self, tiny: Database) -> None:
        super().__init__()
        self.tiny, self.done, self.keeper = tiny, asyncio.Event(), None

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome:
        outcome = await super().confirm(request)
        if self.keeper is None:
            busy = asyncio.Event()

            async def keep(session):
                await session.execute(text("SELECT 1"))
                busy.set()
                await self.done.wait()

            self.keeper = asyncio.ensure_future(self.tiny.transaction(keep))
            await busy.wait()
        return outcome

    async def release(self) -> None:
        self.done.set()
        await self.keeper


async def test_a_confirmed_payment_whose_recording_failed_is_granted_by_the_take_over(
        db, live_server, client, database_url, caplog):
    team, token, _ = await under_auto_top_up(db, client, "95")
    tiny = Database(database_url, pool_size=1, max_overflow=0, acquire_timeout=0.2)
    provider = TakesTheDatabaseWhenItAnswers(tiny)
    clock = OffsetClock()
    try:
        with caplog.at_level("ERROR", logger="creditpool.automation"):
            await spender(tiny, token, team.ws, clock, provider)()  # its answer is its generation
        await provider.release()
    finally:
        await tiny.dispose()
    assert "the provider confirmed the payment but its credits were not recorded" in caplog.text
    [first] = provider.asked(team.ws)
    assert provider.charged_for(team.ws) == [first[0]] and await pool_credits(db, team.ws) == []
    spend = spender(db, token, team.ws, clock, provider)
    await spend()  # before the timeout: the claim is still in flight
    assert provider.asked(team.ws) == [first]
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    await spend()
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    await assert_ledger_clean(db, team.ws)


class SlowFirstAnswer(DeduplicatingProvider):
    """Charges the first request at once but answers it only at `answer_first()`: an attempt
    alive, not dead, past the timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.first_asked, self.gate = asyncio.Event(), asyncio.Event()

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome:
        if self.first_asked.is_set():
            return await super().confirm(request)
        self.first_asked.set()
        outcome = await super().confirm(request)
        await self.gate.wait()
        return outcome

    def answer_first(self) -> None:
        self.gate.set()


async def test_an_attempt_that_outlives_its_take_over_neither_records_nor_counts_its_purchase_again(
        db, live_server, client):
    team, token, _ = await under_auto_top_up(db, client, "95")
    provider, clock = SlowFirstAnswer(), OffsetClock()
    spend = spender(db, token, team.ws, clock, provider)
    slow = asyncio.ensure_future(spend())
    await provider.first_asked.wait()
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    await spend()  # takes the claim over: "paid" for the same reference, recorded, re-armed
    provider.answer_first()
    await slow  # "paid" too, but recorded already, and the latch is no longer its own
    [first] = provider.charged_for(team.ws)
    assert provider.asked(team.ws) == [(first, 500)] * 2
    assert await pool_credits(db, team.ws) == [20_000]
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"] == {
            "enabled": True, "purchasesThisMonth": 1, "creditsThisMonth": "20.000"}
    await spend()  # armed by the take-over's outcome: the next purchase, under a new reference
    assert len(provider.charged_for(team.ws)) == 2 and await pool_credits(db, team.ws) == [20_000, 20_000]
    await assert_ledger_clean(db, team.ws)


async def test_concurrent_take_overs_of_one_abandoned_claim_buy_once(db, live_server, client):
    # A pack that lifts the pool over the threshold, so no spend after the take-over's outcome
    # has reason to buy again: any second request would be a second take-over.
    provider = DeduplicatingProvider(die_before=1)
    team, spend, clock, first = await abandoned_claim(db, client, provider, pack_credits="500", price_minor=4500)
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    ticks = [tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider) for _ in range(2)]
    await asyncio.gather(*(spend() for _ in range(6)), *ticks)
    assert provider.asked(team.ws) == [first, first]
    assert provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [500_000]
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["purchasesThisMonth"] == 1
    await assert_ledger_clean(db, team.ws)


@pytest.mark.parametrize("turned_off", [False, True], ids=["on", "turned-off"])
async def test_two_take_overs_that_both_saw_the_claim_abandoned_cannot_both_win(db, live_server, client, turned_off):
    # Deterministic: both racers read the abandoned claim, then wait on its row (held here) with
    # their take-over UPDATE; released, they run one after the other and only the first may win.
    # Turned off since the claim was made, it is taken over all the same (by the scheduler).
    from domain.governance.automation import claim_top_up, run_top_up
    from domain.workspaces.models import Workspace

    provider = DeduplicatingProvider(die_before=1)
    team, _, clock, first = await abandoned_claim(db, client, provider)
    if turned_off:
        await configure(client, team, await configured_pack(db, team.ws), enabled=False)
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    now = clock.now()

    async def take_over(session):
        return await claim_top_up(session, await session.get_one(Workspace, team.ws), now)

    # (Waiting on a lock is all these two can do: their reads take none. The query text shown
    # may still be the read before the UPDATE. A transaction sees pg_stat_activity as it was at
    # its first look, so each look is a transaction of its own.)
    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND wait_event_type = 'Lock'")
    async with db.engine.connect() as holder, db.engine.connect() as watcher:
        await holder.execute(text("SELECT 1 FROM auto_topups WHERE workspace_id = CAST(:ws AS uuid) FOR UPDATE"),
                             {"ws": team.ws})
        racers = [asyncio.ensure_future(db.transaction(take_over)) for _ in range(2)]
        for _ in range(500):
            met = (await watcher.execute(waiting)).scalar_one() == 2
            await watcher.rollback()
            if met:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the take-overs never met on the row")
        await holder.rollback()
        claims = [c for c in await asyncio.gather(*racers) if c is not None]
    [claim] = claims
    assert claim.reference == first[0]
    await run_top_up(db, provider, claim, now)
    assert await pool_credits(db, team.ws) == [20_000]


# --- an abandoned claim after auto top-up was turned off ------------------------------------------

SETTINGS = """
mutation($ws: ID!, $pack: ID!, $enabled: Boolean!, $threshold: String!, $purchases: Int!, $credits: String!,
         $failures: Int!) {
  setAutoTopUp(input: {workspaceId: $ws, enabled: $enabled, threshold: $threshold, packId: $pack,
                       monthlyMaxPurchases: $purchases, monthlyMaxCredits: $credits, failureLimit: $failures}) {
    __typename ... on AutoTopUp { enabled } ... on Error { code message }
  }
}"""


async def configured_pack(db, ws: str) -> str:
    async def work(session):
        return str((await session.execute(text(
            "SELECT pack_id FROM auto_topups WHERE workspace_id = CAST(:ws AS uuid)"), {"ws": ws})).scalar_one())

    return await db.read(work)


async def configure(client, team, pack: str, *, enabled: bool = True, threshold: str = "95", purchases: int = 5,
                    credits: str = "5000", failures: int = 3) -> None:
    """Auto top-up settings as the owner sets them (`under_auto_top_up`'s by default)."""
    async with client(team.owner) as api:
        out = (await api(SETTINGS, ws=team.ws, pack=pack, enabled=enabled, threshold=threshold, purchases=purchases,
                         credits=credits, failures=failures))["setAutoTopUp"]
    assert out == {"__typename": "AutoTopUp", "enabled": enabled}, out


async def test_a_payment_taken_before_the_process_died_is_granted_after_auto_top_up_was_turned_off(
        db, live_server, client):
    # Charged, then the process died; the owner turns auto top-up off before anyone took the
    # claim over. Off means no NEW purchase: this one was started, and may have been paid.
    provider = DeduplicatingProvider(die_after=1)
    team, spend, clock, first = await abandoned_claim(db, client, provider)
    provider.workspace = team.ws
    pack = await configured_pack(db, team.ws)
    await configure(client, team, pack, enabled=False)

    async def a_tick():
        return await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)

    clock.offset = CLAIM_TIMEOUT - timedelta(seconds=5)
    await a_tick()  # not abandoned yet
    assert provider.asked(team.ws) == [first]
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    assert (await a_tick()).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"] == {
            "enabled": False, "purchasesThisMonth": 1, "creditsThisMonth": "20.000"}
        alerts = [(a["kind"], a["status"]) for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"]]
    assert alerts == [("TOPUP_DONE", "RESOLVED")]  # the same notification as any recorded top-up
    # Settled, and still off: nothing new is bought, however low the pool and however often asked.
    for _ in range(9):
        await spend()  # 110 -> 20, under the threshold at each spend
    await a_tick()
    assert provider.asked(team.ws) == [first, first] and await purchases_of(db, team.ws) == 1
    await assert_ledger_clean(db, team.ws)


async def latch(db, ws: str) -> tuple:
    """(armed, claimed, sequence, retrying an unanswered payment) of the workspace's auto top-up."""
    async def work(session):
        return tuple((await session.execute(text(
            "SELECT armed, claimed_at IS NOT NULL, sequence, unanswered_pack_id IS NOT NULL FROM auto_topups "
            "WHERE workspace_id = CAST(:ws AS uuid)"), {"ws": ws})).one())

    return await db.read(work)


async def open_alerts(client, team) -> list[str]:
    async with client(team.owner) as api:
        return sorted(a["kind"] for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"] if a["status"] == "OPEN")


async def test_an_abandoned_claim_declined_after_auto_top_up_was_turned_off_is_closed_as_failed(
        db, live_server, client):
    provider = DeduplicatingProvider(die_before=1)
    team, spend, clock, first = await abandoned_claim(db, client, provider)
    provider.workspace = team.ws
    pack = await configured_pack(db, team.ws)
    await configure(client, team, pack, enabled=False)
    provider.decline = True
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    assert (await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first, first] and await purchases_of(db, team.ws) == 0
    # Closed: no claim in flight, and the next purchase (once back on) asks under a new reference.
    assert await latch(db, team.ws) == (True, False, 1, False)
    assert await open_alerts(client, team) == ["TOPUP_FAILED"]  # off by its owner: no "turned off" alert
    await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)
    assert provider.asked(team.ws) == [first, first]
    provider.decline = False
    await configure(client, team, pack)  # on again
    await spend()  # 90 -> 80: under the threshold
    assert provider.asked(team.ws)[2] == (f"auto-topup:{team.ws}:2", 500)
    assert await pool_credits(db, team.ws) == [20_000]
    await assert_ledger_clean(db, team.ws)


async def test_concurrent_schedulers_finish_an_abandoned_claim_once_after_auto_top_up_was_turned_off(
        db, live_server, client):
    provider = DeduplicatingProvider(die_after=1)
    team, spend, clock, first = await abandoned_claim(db, client, provider)
    provider.workspace = team.ws
    await configure(client, team, await configured_pack(db, team.ws), enabled=False)
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    reports = await asyncio.gather(*(tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)
                                     for _ in range(4)), *(spend() for _ in range(4)))
    assert sum(r.top_ups_taken_over for r in reports[:4]) >= 1
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["purchasesThisMonth"] == 1
    await assert_ledger_clean(db, team.ws)


async def test_a_payment_unanswered_when_its_failures_turn_auto_top_up_off_is_asked_again_by_the_scheduler(
        db, live_server, client):
    # The failure limit reached by a payment the provider took but never confirmed: off, so no
    # spend would ever ask again under its reference.
    team, token, pack = await under_auto_top_up(db, client, "95")
    await configure(client, team, pack, failures=1)
    provider, clock = DeduplicatingProvider(unanswered=1), OffsetClock()
    provider.workspace = team.ws
    spend = spender(db, token, team.ws, clock, provider)
    await spend()  # under the threshold: charged, no answer, and auto top-up turns itself off
    [first] = provider.asked(team.ws)
    assert provider.charged_for(team.ws) == [first[0]] and await purchases_of(db, team.ws) == 0
    assert await open_alerts(client, team) == ["TOPUP_DISABLED", "TOPUP_FAILED"]
    assert await latch(db, team.ws) == (False, True, 1, False)  # still in flight

    async def a_tick():
        return await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)

    await a_tick()  # not abandoned yet
    assert provider.asked(team.ws) == [first]
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    assert (await a_tick()).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    assert await open_alerts(client, team) == ["TOPUP_DISABLED"]  # the payment went through; still off
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"] == {
            "enabled": False, "purchasesThisMonth": 1, "creditsThisMonth": "20.000"}
    await spend()
    await a_tick()
    assert len(provider.asked(team.ws)) == 2  # off: nothing new
    await assert_ledger_clean(db, team.ws)


async def test_a_payment_left_unanswered_before_auto_top_up_was_turned_off_is_asked_again_by_the_scheduler(
        db, live_server, client):
    team, token, pack = await under_auto_top_up(db, client, "95")
    provider, clock = DeduplicatingProvider(unanswered=1), OffsetClock()
    provider.workspace = team.ws
    spend = spender(db, token, team.ws, clock, provider)
    await spend()  # charged, no answer: a failed attempt whose retry the next spend would make
    [first] = provider.asked(team.ws)
    assert await latch(db, team.ws) == (True, False, 0, True)
    await configure(client, team, pack, enabled=False)  # ... but no spend looks any more

    async def a_tick():
        return await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)

    provider.unanswered = 1  # the provider is still down at the scheduler's next round
    assert (await a_tick()).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first, first]
    assert await latch(db, team.ws) == (False, True, 1, True)  # in flight: asked again after the timeout
    await a_tick()
    assert provider.asked(team.ws) == [first, first]
    clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    assert (await a_tick()).top_ups_taken_over >= 1
    assert provider.asked(team.ws) == [first] * 3 and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    assert await latch(db, team.ws) == (True, False, 1, False)
    assert await open_alerts(client, team) == []
    await a_tick()
    assert len(provider.asked(team.ws)) == 3
    await assert_ledger_clean(db, team.ws)


@pytest.mark.parametrize("stopped_by", ["threshold", "caps"])
@pytest.mark.parametrize("pending", ["abandoned", "unanswered"])
async def test_lowering_the_threshold_or_the_caps_does_not_strand_a_payment_that_may_have_been_taken(
        db, live_server, client, stopped_by, pending):
    # Auto top-up stays on, but its owner stops it buying another way: a threshold of 0 (the pool
    # is never under it) or caps of 0. The settings stop NEW purchases; this one has started.
    provider = DeduplicatingProvider(die_after=1) if pending == "abandoned" else DeduplicatingProvider(unanswered=1)
    team, token, pack = await under_auto_top_up(db, client, "95")
    clock = OffsetClock()
    provider.workspace = team.ws
    spend = spender(db, token, team.ws, clock, provider)
    if pending == "abandoned":
        with pytest.raises(Crash):
            await spend()
        clock.offset = CLAIM_TIMEOUT + timedelta(seconds=5)
    else:
        await spend()
    [first] = provider.asked(team.ws)
    await configure(client, team, pack, **({"threshold": "0"} if stopped_by == "threshold"
                                            else {"purchases": 0, "credits": "0"}))
    await spend()  # the next spend asks again under the same reference
    assert provider.asked(team.ws) == [first, first] and provider.charged_for(team.ws) == [first[0]]
    assert await pool_credits(db, team.ws) == [20_000]
    await spend()
    await tick(db, clock, hold_ttl=timedelta(hours=1), payments=provider)
    assert len(provider.asked(team.ws)) == 2  # and nothing new is bought
    await assert_ledger_clean(db, team.ws)


async def test_a_top_up_after_its_enabler_left_is_the_systems_purchase_and_the_audit_log_names_who_enabled_it(
        db, live_server, client):
    """An auto top-up is bought by the system under a standing instruction, not by a person: its
    grant entry has no actor (as a period close or an expiry), and its audit entry says whose
    instruction it ran under. It was recorded in the name of the member who turned auto top-up
    on, even after that member had been removed from the workspace."""
    from tests.test_api_governance import AUDIT
    from tests.test_api_ledger import ADD

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    pack = await small_pack(client, team.operator)
    email, billing = await new_user(db, prefix="billing")
    async with client(team.owner) as api:
        member = (await api(ADD, ws=team.ws, email=email, role="BILLING_MANAGER", seat="STANDARD"))["addMember"]["id"]
    async with client(billing) as api:
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="95", limit=3))["setAutoTopUp"]["enabled"]
    async with client(team.owner) as api:
        [enabled] = (await api(AUDIT, ws=team.ws, action="autotopup.updated"))["auditLog"]["edges"]
        enabler = enabled["node"]["actorId"]
        assert (await api('mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }',
                          m=member))["removeMember"]["__typename"] == "Member"
    assert (await start(client, team.creators[0][0], team.ws))["__typename"] == "Generation"  # 100 -> 90: under
    assert await purchases_of(db, team.ws) == 1
    async with client(team.owner) as api:
        entries = (await api('query($ws: ID!) { ledger(workspaceId: $ws, filter: {kinds: [GRANT]}) '
                             '{ edges { node { cause actorId purchaseId } } } }', ws=team.ws))["ledger"]["edges"]
        [bought] = [e["node"] for e in entries if e["node"]["cause"] == "PURCHASE"]
        [audited] = (await api(AUDIT, ws=team.ws, action="autotopup.purchased"))["auditLog"]["edges"]
    assert bought["actorId"] is None
    assert audited["node"]["actorId"] is None
    assert audited["node"]["targetType"] == "purchase"
    assert audited["node"]["after"]["enabledBy"] == enabler
    assert audited["node"]["after"]["credits"] == "20.000"
    await assert_ledger_clean(db, team.ws)


CANCEL = "mutation($ws: ID!) { cancelSubscription(input: {workspaceId: $ws}) { __typename } }"
AUDIT_TOP_UP = """
query($ws: ID!) { auditLog(workspaceId: $ws, action: "autotopup.") { edges { node { action actorId after } } } }"""


async def test_cancelling_the_subscription_turns_auto_top_up_off_so_it_never_charges_again(db, live_server, client):
    # A cancelled customer kept being charged: auto top-up ran on after cancelSubscription, and
    # the next spend under the threshold bought a pack.
    team, token, _ = await under_auto_top_up(db, client, "95")
    async with client(team.owner) as api:
        assert (await api(CANCEL, ws=team.ws))["cancelSubscription"]["__typename"] == "Workspace"
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["enabled"] is False
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 100 -> 90: under 95
    assert await purchases_of(db, team.ws) == 0
    async with client(team.owner) as api:
        entries = [e["node"] for e in (await api(AUDIT_TOP_UP, ws=team.ws))["auditLog"]["edges"]]
    turned_off = [e for e in entries if e["after"].get("reason") == "subscription cancelled"]
    assert len(turned_off) == 1 and turned_off[0]["after"]["enabled"] is False
    await assert_ledger_clean(db, team.ws)


# --- the monthly cap's alert ----------------------------------------------------------------------

async def cap_alerts(client, team) -> list[str]:
    async with client(team.owner) as api:
        return [a["status"] for a in (await api(ALERTS_FULL, ws=team.ws))["alerts"] if a["kind"] == "TOPUP_CAP_REACHED"]


async def test_the_cap_reached_alert_resolves_once_the_cap_is_raised_or_its_month_is_over(db, live_server, client):
    # "Auto top-up has reached its monthly cap" stayed OPEN for good: raised caps bought again
    # under it, and a month long over still showed it open (each month added one more).
    from domain.governance.automation import refresh_alerts
    import uuid as uuid_

    team, token, pack = await under_auto_top_up(db, client, "500", pack_credits="5", price_minor=100)
    for _ in range(6):  # the sixth spend finds the cap (5 purchases) reached
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 5
    assert await cap_alerts(client, team) == ["OPEN"]
    await configure(client, team, pack, threshold="500", purchases=10)  # room for five more
    assert await cap_alerts(client, team) == ["RESOLVED"]
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 6  # bought: the alert was right to go
    for _ in range(5):
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 10
    assert sorted(await cap_alerts(client, team)) == ["OPEN", "RESOLVED"]  # reached again: a fresh alert
    # Nothing more is bought this month; the next month has its own cap, and nothing is reached in it.
    next_month = datetime.now(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0) \
        + timedelta(days=32)
    await db.transaction(lambda s: refresh_alerts(s, next_month, uuid_.UUID(team.ws)))
    assert await cap_alerts(client, team) == ["RESOLVED", "RESOLVED"]


# --- settings changed while a spend decides -------------------------------------------------------

@pytest.mark.parametrize("change", ["caps", "threshold", "pack"])
async def test_a_settings_change_that_commits_while_a_spend_claims_is_what_the_claim_obeys(
        db, live_server, client, database_url, change):
    # The claim read the settings without a lock, decided, then flipped the latch with an UPDATE
    # that checked only `armed` and `enabled`. An owner's change committed in between (caps or
    # the threshold to 0, another pack) was answered "saved", and the spend then bought under the
    # old settings: a purchase the caps no longer allowed, or the pack the owner had just left.
    import asyncpg

    from tests.conftest import asyncpg_dsn

    team, token, _ = await under_auto_top_up(db, client, "95")  # a 20-credit pack for 5.00 USD
    big = await _a_pack(client, team.operator)  # 500 credits, 45.00 USD
    settings = {"caps": "monthly_max_purchases = 0, monthly_max_units = 0", "threshold": "threshold_units = 0",
                "pack": f"pack_id = '{big}'"}[change]
    seen = len(live_server.payments.seen)
    owner = await asyncpg.connect(asyncpg_dsn(database_url))
    watcher = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        change_tx = owner.transaction()
        await change_tx.start()  # the change, written and not yet committed (as setAutoTopUp's)
        await owner.execute(f"UPDATE auto_topups SET {settings} WHERE workspace_id = $1", team.ws)
        spend = asyncio.ensure_future(start(client, token, team.ws))  # 100 -> 90: under the old threshold
        async with asyncio.timeout(10):
            while not await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    owner.get_server_pid()):
                await asyncio.sleep(0.02)  # the claim read the old settings and waits on the row
        await change_tx.commit()
        assert (await spend)["__typename"] == "Generation"
    finally:
        await owner.close()
        await watcher.close()
    asked = [(r.reference.startswith("auto-topup:"), r.amount_minor) for r in live_server.payments.seen[seen:]]
    if change == "pack":  # the pool is still under the threshold: the new pack is bought
        assert asked == [(True, 4500)] and await pool_credits(db, team.ws) == [500_000]
    else:
        assert asked == [] and await purchases_of(db, team.ws) == 0
    await assert_ledger_clean(db, team.ws)


async def test_auto_top_up_can_be_turned_off_after_its_pack_was_taken_off_sale(db, live_server, client):
    # setAutoTopUp refused any pack off sale, even to turn auto top-up off: the owner of a
    # workspace whose pack the operator retired heard NOT_FOUND for "off", and had to pick
    # another pack (a change of the configuration they meant to keep) just to stop it.
    team, token, pack = await under_auto_top_up(db, client, "95")
    async with client(team.operator) as api:
        assert (await api('mutation($p: ID!) { setCreditPackActive(input: {packId: $p, active: false}) '
                          '{ __typename } }', p=pack))["setCreditPackActive"]["__typename"] == "CreditPack"
    await configure(client, team, pack, enabled=False)
    assert await configured_pack(db, team.ws) == pack
    async with client(team.owner) as api:  # turning it on with a pack nobody can buy is still refused
        out = (await api(SETTINGS, ws=team.ws, pack=pack, enabled=True, threshold="95", purchases=5,
                         credits="5000", failures=3))["setAutoTopUp"]
        assert out["__typename"] == "NotFoundError"
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["enabled"] is False
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 0


async def test_auto_top_up_turning_itself_off_after_repeated_failures_is_in_the_audit_log(db, live_server, client):
    # The audit log recorded every change of auto top-up's settings but this one: after its
    # failures it was off, and the log's latest entry still said "enabled" (a cancellation's
    # turning it off is recorded; this is the same change, made by the system).
    team, token, _ = await under_auto_top_up(db, client, "95")
    live_server.payments.failures = 3
    try:
        for _ in range(3):
            assert (await start(client, token, team.ws))["__typename"] == "Generation"
    finally:
        live_server.payments.failures = 0
    async with client(team.owner) as api:
        assert (await api(STATE, ws=team.ws))["autoTopUp"]["enabled"] is False
        latest = (await api(AUDIT_TOP_UP, ws=team.ws))["auditLog"]["edges"][0]["node"]
    assert latest["action"] == "autotopup.updated" and latest["actorId"] is None
    assert latest["after"]["enabled"] is False and latest["after"]["reason"] == "3 payment failures in a row"


# --- the failure alert ----------------------------------------------------------------------------

ALERT_DETAILS = "query($ws: ID!) { alerts(workspaceId: $ws) { kind subject status payload } }"


async def open_failures(client, team) -> list[dict]:
    """The open TOPUP_FAILED alerts' payloads."""
    async with client(team.owner) as api:
        return [a["payload"] for a in (await api(ALERT_DETAILS, ws=team.ws))["alerts"]
                if a["kind"] == "TOPUP_FAILED" and a["status"] == "OPEN"]


async def take_off_sale(client, team, pack: str) -> None:
    async with client(team.operator) as api:
        assert (await api('mutation($p: ID!) { setCreditPackActive(input: {packId: $p, active: false}) '
                          '{ __typename } }', p=pack))["setCreditPackActive"]["__typename"] == "CreditPack"


@pytest.mark.parametrize("change", ["a pack on sale", "off"])
async def test_picking_a_pack_on_sale_or_turning_auto_top_up_off_resolves_the_pack_off_sale_alert(
        db, live_server, client, change):
    # "The pack is off sale" stayed open until a purchase went through: an owner who had picked a
    # pack on sale, or turned auto top-up off, still read that auto top-up could not buy.
    team, token, pack = await under_auto_top_up(db, client, "95")
    await take_off_sale(client, team, pack)
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 100 -> 90: under, nothing to buy
    assert await open_failures(client, team) == [{"reason": "the pack is off sale", "packId": pack}]
    if change == "off":
        await configure(client, team, pack, enabled=False)
    else:
        await configure(client, team, await small_pack(client, team.operator))
    assert await open_failures(client, team) == []
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 90 -> 80
    assert await purchases_of(db, team.ws) == (0 if change == "off" else 1)
    assert await open_failures(client, team) == []


async def test_a_repeated_payment_failure_updates_the_open_alert(db, live_server, client):
    # The alert kept its first details: after the second failure in a row it still said one
    # failure, and the reason of the first.
    team, token, _ = await under_auto_top_up(db, client, "95")
    live_server.payments.unanswered, live_server.payments.failures = 1, 1
    try:
        assert (await start(client, token, team.ws))["__typename"] == "Generation"  # no answer
        assert await open_failures(client, team) == [{"reason": "the payment provider did not answer", "failures": 1}]
        assert (await start(client, token, team.ws))["__typename"] == "Generation"  # asked again: declined
    finally:
        live_server.payments.unanswered, live_server.payments.failures = 0, 0
    assert await open_failures(client, team) == [{"reason": "card declined", "failures": 2}]
    async with client(team.owner) as api:
        assert (await api(TOPUP_STATE, ws=team.ws))["autoTopUp"]["consecutiveFailures"] == 2
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # paid: it clears
    assert await open_failures(client, team) == [] and await purchases_of(db, team.ws) == 1


@pytest.mark.parametrize("outcome", ["declined", "unanswered"])
async def test_a_payment_failure_alert_outlasts_a_change_of_pack_and_turning_off_ends_it_unless_a_payment_is_pending(
        db, live_server, client, outcome):
    # The settings decide whether a NEW purchase starts. Another pack does not make the last
    # payment's failure untrue (the count goes on); turning auto top-up off means nothing new
    # will be bought, so its failure needs no attention any more, unless the payment that failed
    # may still have been taken and is still to be asked again.
    team, token, _ = await under_auto_top_up(db, client, "95")
    if outcome == "declined":
        live_server.payments.failures = 1
    else:
        live_server.payments.unanswered = 1
    try:
        assert (await start(client, token, team.ws))["__typename"] == "Generation"
    finally:
        live_server.payments.unanswered, live_server.payments.failures = 0, 0
    reason = "card declined" if outcome == "declined" else "the payment provider did not answer"
    other = await small_pack(client, team.operator)
    await configure(client, team, other)
    assert await open_failures(client, team) == [{"reason": reason, "failures": 1}]
    await configure(client, team, other, enabled=False)
    assert await open_failures(client, team) == ([] if outcome == "declined" else [{"reason": reason, "failures": 1}])
