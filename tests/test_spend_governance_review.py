"""Review probes for spend governance automation: overage requests that no longer concern their
requester's spend, and limit alerts whose condition starts to hold with no spend to evaluate it.
Each test here failed on the code it was written against."""

from __future__ import annotations

import uuid
from datetime import timedelta

from domain.periods.service import tick
from tests.test_api_governance import REQUEST, SET_LIMIT, start
from tests.test_api_ledger import grant, make_team
from tests.test_limit_counts_period import ASSIGN, CREATE_GROUP
from tests.test_limits_review import DECIDE_UNTIL, member_at_an_approval_limit

OVERAGES = "query($ws: ID!) { overageRequests(workspaceId: $ws) { id status } }"
OVERAGES_PENDING = "query($ws: ID!) { overageRequests(workspaceId: $ws, status: PENDING) { id status } }"
ALERTS = "query($ws: ID!) { alerts(workspaceId: $ws) { kind subject status } }"
DECIDE_OVERAGE = """
mutation($id: ID!) {
  decideOverage(input: {requestId: $id, approve: true}) {
    __typename ... on OverageRequest { status approved } ... on Error { code message }
  }
}"""


async def open_limit_alerts(client, team) -> list[str]:
    async with client(team.owner) as api:
        return sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"]
                      if a["status"] == "OPEN" and a["kind"].startswith("LIMIT_"))


async def test_an_approval_that_expires_with_usage_over_the_limit_opens_its_100_percent_alert(db, live_server, client):
    team, token, member = await member_at_an_approval_limit(db, client)
    assert await open_limit_alerts(client, team) == ["LIMIT_100", "LIMIT_80"]  # 20 of 20
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="deadline"))["requestOverage"]
    until = live_server.clock.now() + timedelta(minutes=30)
    async with client(team.owner) as api:
        ok = (await api(DECIDE_UNTIL, id=req["id"], amount="30", until=until.isoformat()))["decideOverage"]
    assert ok["status"] == "APPROVED"
    assert await open_limit_alerts(client, team) == []  # 20 of 50
    assert [(await start(client, token, team.ws))["__typename"] for _ in range(2)] == ["Generation"] * 2
    assert await open_limit_alerts(client, team) == ["LIMIT_80"]  # 40 of 50
    try:
        # The approval ends: 40 of 20. The member's starts are refused from now on, so no spend
        # will ever evaluate the limit's alerts: the scheduler's round must.
        live_server.clock.offset = until - live_server.clock.now() + timedelta(seconds=1)
        refused = await start(client, token, team.ws)
        assert (refused["__typename"], refused["used"], refused["limit"]) == ("SpendLimitExceeded", "40.000", "20.000")
        await tick(db, live_server.clock, hold_ttl=timedelta(days=1))
        assert await open_limit_alerts(client, team) == ["LIMIT_100", "LIMIT_80"]
        await tick(db, live_server.clock, hold_ttl=timedelta(days=1))  # once per crossing: no second alert
        async with client(team.owner) as api:
            kinds = sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["kind"] == "LIMIT_100")
        assert kinds == ["LIMIT_100", "LIMIT_100"]  # the first crossing's, resolved by the approval, and this one
    finally:
        live_server.clock.offset = timedelta(0)


async def test_a_request_on_a_group_limit_lapses_when_its_requester_leaves_the_group(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (asker, asker_member), (other, other_member) = team.creators
    async with client(team.owner) as api:
        group = (await api(CREATE_GROUP, ws=team.ws))["createBillingGroup"]["id"]
        for m in (asker_member, other_member):
            assert (await api(ASSIGN, m=m, g=group))["assignBillingGroup"]["__typename"] == "Member"
        await api(SET_LIMIT, ws=team.ws, scope="GROUP", period="MONTH", amount="20", action="REQUIRE_APPROVAL",
                  group=group)
    assert [(await start(client, t, team.ws))["__typename"] for t in (asker, other)] == ["Generation"] * 2
    async with client(asker) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="one more video"))["requestOverage"]
    assert req["__typename"] == "OverageRequest"
    async with client(team.owner) as api:
        # The requester leaves the group: the group's cap no longer bounds their spend.
        assert (await api(ASSIGN, m=asker_member, g=None))["assignBillingGroup"]["__typename"] == "Member"
        decided = (await api(DECIDE_OVERAGE, id=req["id"]))["decideOverage"]
    # Approved, it would raise the group's cap by 30 for the members left in it, who asked for nothing.
    assert (decided["__typename"], decided.get("code")) == ("OverageNotPending", "OVERAGE_NOT_PENDING"), decided
    refused = await start(client, other, team.ws)
    assert (refused["__typename"], refused["limit"]) == ("SpendLimitExceeded", "20.000")
    assert await open_alerts_of(client, team, "OVERAGE_REQUESTED") == []


async def test_a_request_made_as_its_requester_was_moved_out_of_the_group_is_lapsed_not_decidable(db, live_server, client):
    """The request reads the requester's group without a lock: a move committing meanwhile finds
    no request to lapse, and the request is made on the old group's limit. It reads LAPSED, a
    decision refuses it, and the scheduler records the lapse."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    asker, asker_member = team.creators[0]
    async with client(team.owner) as api:
        group = (await api(CREATE_GROUP, ws=team.ws))["createBillingGroup"]["id"]
        assert (await api(ASSIGN, m=asker_member, g=group))["assignBillingGroup"]["__typename"] == "Member"
        await api(SET_LIMIT, ws=team.ws, scope="GROUP", period="MONTH", amount="10", action="REQUIRE_APPROVAL",
                  group=group)
    async with client(asker) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="one more video"))["requestOverage"]
    # The move as it lands when it commits after the request's read: the member row only.
    await db.fetchrow("UPDATE members SET billing_group_id = NULL WHERE id = $1", uuid.UUID(asker_member))
    async with client(team.owner) as api:
        assert (await api(OVERAGES, ws=team.ws))["overageRequests"] == [{"id": req["id"], "status": "LAPSED"}]
        pending = (await api(OVERAGES_PENDING, ws=team.ws))["overageRequests"]
        assert pending == []
    report = await tick(db, live_server.clock, hold_ttl=timedelta(days=1))
    assert report.overages_lapsed == 1
    async with client(team.owner) as api:
        decided = (await api(DECIDE_OVERAGE, id=req["id"]))["decideOverage"]
    assert (decided["__typename"], decided.get("code")) == ("OverageNotPending", "OVERAGE_NOT_PENDING"), decided
    assert await open_alerts_of(client, team, "OVERAGE_REQUESTED") == []


async def test_a_request_made_as_its_limit_was_switched_to_block_cannot_be_approved(db, live_server, client):
    """The request reads its limit's action without a lock: a switch to BLOCK committing
    meanwhile finds no request to lapse, and the request is made pending on a limit set to
    block. It reads LAPSED, a decision refuses it, and the scheduler records the lapse."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    asker, member = team.creators[0]
    async with client(team.owner) as api:
        limit = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="10",
                           action="REQUIRE_APPROVAL", member=member))["setSpendLimit"]
    assert (await start(client, asker, team.ws))["__typename"] == "Generation"
    async with client(asker) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="one more video"))["requestOverage"]
    # The switch as it lands when it commits after the request's read: the limit row only.
    await db.fetchrow("UPDATE spend_limits SET action = 'BLOCK' WHERE id = $1", uuid.UUID(limit["id"]))
    async with client(team.owner) as api:
        assert (await api(OVERAGES, ws=team.ws))["overageRequests"] == [{"id": req["id"], "status": "LAPSED"}]
    report = await tick(db, live_server.clock, hold_ttl=timedelta(days=1))
    assert report.overages_lapsed == 1
    async with client(team.owner) as api:
        decided = (await api(DECIDE_OVERAGE, id=req["id"]))["decideOverage"]
    assert (decided["__typename"], decided.get("code")) == ("OverageNotPending", "OVERAGE_NOT_PENDING"), decided
    refused = await start(client, asker, team.ws)
    assert (refused["__typename"], refused["limit"], refused["canRequestOverage"]) == (
        "SpendLimitExceeded", "10.000", False)


async def open_alerts_of(client, team, kind: str) -> list[str]:
    async with client(team.owner) as api:
        return [a["subject"] for a in (await api(ALERTS, ws=team.ws))["alerts"]
                if a["status"] == "OPEN" and a["kind"] == kind]
