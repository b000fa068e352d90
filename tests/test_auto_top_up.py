"""Auto top-up keeps the pool over its threshold, one purchase at a time: what re-arms it, which
balance it watches, what an unanswered payment's retry asks for, and the alerts around it."""

from __future__ import annotations

from tests.test_api_governance import AUTO, purchases_of, start, start_unanswered
from tests.test_api_ledger import TRANSFER, _a_pack, grant, key, make_team

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


async def test_auto_top_up_watches_the_pool_not_credits_on_seats_the_spends_cannot_reach(db, live_server, client):
    team = await make_team(db, client, creators=1)  # POOLED: spends draw from the pool only
    await grant(client, team, "100")
    token, member = team.creators[0]
    pack = await _a_pack(client, team.operator)  # 500 credits
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="90", key=key(), to=member))["transferCredits"]
        assert moved["__typename"] == "Transfer"
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="50", limit=3))["setAutoTopUp"]["enabled"]
    # The workspace holds 100 credits, but only 10 are in the pool: under the threshold.
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert await purchases_of(db, team.ws) == 1
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # paid by the top-up


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
