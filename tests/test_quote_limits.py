"""A quote's canAfford answers for spend limits as well as credits: a member told they can afford
a generation is not then refused by a limit when they start it."""

from __future__ import annotations

import uuid
from datetime import timedelta

from domain.db import as_sql
from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import grant, make_team
from tests.test_api_pricing import QUOTE
from tests.test_limits_review import member_at_an_approval_limit

QUOTE_LIMIT = QUOTE.replace("canAfford", "canAfford refusingLimitId")
_USAGE_ROWS = """
SELECT count(*) FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id WHERE l.workspace_id = $1"""


async def quote(client, token, ws, model="dalle-3"):
    async with client(token) as api:
        return (await api(QUOTE_LIMIT, ws=ws, model=model, params=None))["quote"]


async def usage_rows(db, ws: str) -> int:
    return await db.read(lambda s: as_sql(s).fetchval(_USAGE_ROWS, uuid.UUID(ws)))


async def test_a_quote_says_a_start_its_spend_limit_would_refuse_is_not_affordable(db, live_server, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (token, member), (free, _) = team.creators
    async with client(team.owner) as api:
        limit = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="BLOCK",
                           member=member))["setSpendLimit"]
    assert (await quote(client, token, team.ws))["canAfford"] is True
    assert [(await start(client, token, team.ws))["__typename"] for _ in range(2)] == ["Generation"] * 2  # 10 each
    q = await quote(client, token, team.ws)
    # Plenty of credits, but the limit is used up: the start would be refused.
    assert (q["total"], q["spendable"], q["canAfford"], q["refusingLimitId"]) == ("10.000", "980.000", False,
                                                                                  limit["id"])
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
    other = await quote(client, free, team.ws)  # a member under no limit
    assert (other["canAfford"], other["refusingLimitId"]) == (True, None)
    # Next month the period has used nothing, though no usage row exists for it yet; the quote
    # creates none (it is read-only).
    rows = await usage_rows(db, team.ws)
    live_server.clock.offset = timedelta(days=32)
    try:
        q = await quote(client, token, team.ws)
        assert (q["canAfford"], q["refusingLimitId"]) == (True, None)
        assert await usage_rows(db, team.ws) == rows
    finally:
        live_server.clock.offset = timedelta(0)


async def test_a_quote_counts_approved_overages_and_the_workspaces_limit(db, client):
    team, token, member = await member_at_an_approval_limit(db, client)
    assert (await quote(client, token, team.ws))["canAfford"] is False
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="10", reason="one more"))["requestOverage"]
    async with client(team.owner) as api:
        assert (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]["status"] == "APPROVED"
    # The approved 10 lets exactly one more 10-credit generation through.
    assert (await quote(client, token, team.ws))["canAfford"] is True
    async with client(team.owner) as api:
        ws_limit = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="MONTH", amount="25",
                              action="BLOCK"))["setSpendLimit"]
    q = await quote(client, token, team.ws)  # the month's 20 already spent leave 5 under the workspace's 25
    assert (q["canAfford"], q["refusingLimitId"]) == (False, ws_limit["id"])
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
