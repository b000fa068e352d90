"""Review of six suspicions the governance and periods reviews left unconfirmed. The ones that
proved real bugs stay as regression tests; the others pin behaviour the review found right."""

from __future__ import annotations

from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import assert_ledger_clean, grant, make_team


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
