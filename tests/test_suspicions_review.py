"""Review of six suspicions the governance and periods reviews left unconfirmed. The ones that
proved real bugs stay as regression tests; the others pin behaviour the review found right."""

from __future__ import annotations

from decimal import Decimal

from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import COMPLETE, assert_ledger_clean, grant, key, make_team
from tests.test_governance_review import ASSIGN, GROUP, TO_GROUP


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
