"""Review of workspace administration and governance: the audit trail of workspace settings,
overage requests against limits that change under them, and the owner rules. Each test here
first failed on the code it was written against."""

from __future__ import annotations

import uuid

from tests.test_api_governance import ALERTS, AUDIT, DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import grant, make_team

UPDATE = """
mutation($ws: ID!, $plan: String, $paid: Int, $mode: AllocationMode) {
  updateWorkspace(input: {workspaceId: $ws, planKey: $plan, paidCreatorSeats: $paid, allocationMode: $mode}) {
    __typename ... on Workspace { paidCreatorSeats allocationMode } ... on Error { code message }
  }
}"""
PLAN = "query($ws: ID!) { workspace(id: $ws) { plan { key } } }"


async def test_the_audit_entry_of_a_plan_or_paid_seat_change_shows_the_values_before_it(db, client):
    team = await make_team(db, client, creators=0, plan="enterprise")
    async with client(team.owner) as api:
        assert (await api(PLAN, ws=team.ws))["workspace"]["plan"]["key"] == "enterprise"
        out = (await api(UPDATE, ws=team.ws, plan="team", paid=2))["updateWorkspace"]
        assert out["__typename"] == "Workspace", out
        entry = (await api(AUDIT, ws=team.ws, action="workspace.updated"))["auditLog"]["edges"][0]["node"]
    before, after = entry["before"], entry["after"]
    assert (before["paidCreatorSeats"], after["paidCreatorSeats"]) == (0, 2)
    assert before["plan"] != after["plan"]


async def test_paid_creator_seats_beyond_the_plans_seat_cap_are_refused_not_recorded_unusable(db, client):
    # The creator seats a workspace may fill are min(seat cap, free + paid): seats paid for above
    # the cap were recorded (a platform could charge for them) and could never be filled.
    team = await make_team(db, client, creators=0, plan="team")  # a seat cap of 20, 3 creator seats free
    async with client(team.owner) as api:
        refused = (await api(UPDATE, ws=team.ws, paid=18))["updateWorkspace"]
        assert (refused["__typename"], refused["code"]) == ("ValidationError", "VALIDATION")
        assert "17" in refused["message"]
        assert (await api(UPDATE, ws=team.ws, paid=17))["updateWorkspace"]["paidCreatorSeats"] == 17
        # Checked against the plan the same change moves to: starter caps at 5 with 1 free.
        moved = (await api(UPDATE, ws=team.ws, plan="starter", paid=5))["updateWorkspace"]
        assert moved["__typename"] == "ValidationError" and "4" in moved["message"]
        assert (await api(PLAN, ws=team.ws))["workspace"]["plan"]["key"] == "team"  # nothing changed
        assert (await api(UPDATE, ws=team.ws, plan="starter", paid=4))["updateWorkspace"]["paidCreatorSeats"] == 4


# --- an overage request whose limit is removed --------------------------------------------------

REMOVE_LIMIT = ('mutation($l: ID!) { removeSpendLimit(input: {limitId: $l}) '
                '{ __typename ... on Error { code message } } }')
OVERAGES = "query($ws: ID!) { overageRequests(workspaceId: $ws) { id status } }"


async def _overage_alerts(client, team) -> list[tuple[str, str]]:
    async with client(team.owner) as api:
        return [(a["subject"], a["status"]) for a in (await api(ALERTS, ws=team.ws))["alerts"]
                if a["kind"] == "OVERAGE_REQUESTED"]


async def test_removing_a_limit_lapses_its_pending_requests_and_none_can_be_approved_into_nothing(db, client):
    # "Removing a limit and adding a new one starts afresh": a request against the removed limit
    # could raise nothing any more. It stayed PENDING, its alert kept calling the approvers, and
    # an approval was answered APPROVED (the requester notified so) while the member's new limit
    # still refused every start.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        old = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="10",
                         action="REQUIRE_APPROVAL", member=member))["setSpendLimit"]
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 10 of 10
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="20", reason="more"))["requestOverage"]
    assert (req["status"], req["limitId"]) == ("PENDING", old["id"])
    async with client(team.owner) as api:
        assert (await api(REMOVE_LIMIT, l=old["id"]))["removeSpendLimit"]["__typename"] == "SpendLimit"
        new = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="0",
                         action="REQUIRE_APPROVAL", member=member))["setSpendLimit"]
        assert new["id"] != old["id"]
        assert (await api(OVERAGES, ws=team.ws))["overageRequests"] == [{"id": req["id"], "status": "LAPSED"}]
    assert await _overage_alerts(client, team) == [(req["id"], "RESOLVED")]
    async with client(team.owner) as api:
        out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
    assert (out["__typename"], out["message"]) == (
        "OverageNotPending", "the request is lapsed, no longer pending: its spend limit was removed")
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
    async with client(team.owner) as api:
        lapsed = [e["node"] for e in (await api(AUDIT, ws=team.ws, action="overage.lapsed"))["auditLog"]["edges"]]
    assert [(e["actorId"], e["after"]) for e in lapsed] == [(None, {"status": "LAPSED"})]


async def test_a_request_left_pending_on_a_removed_limit_is_listed_lapsed_and_refused(db, client):
    # A request made while the removal committed (it read the limit live before): still PENDING
    # in the table. Every read and a decision judge it dead, as for a requester who left.
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with client(team.owner) as api:
        limit = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="10",
                           action="REQUIRE_APPROVAL", member=member))["setSpendLimit"]
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="20", reason="more"))["requestOverage"]
    await db.fetchrow("UPDATE spend_limits SET removed_at = now() WHERE id = $1", uuid.UUID(limit["id"]))
    async with client(token) as api:
        assert (await api(OVERAGES, ws=team.ws))["overageRequests"] == [{"id": req["id"], "status": "LAPSED"}]
    async with client(team.owner) as api:
        out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
    assert out["__typename"] == "OverageNotPending", out
    assert await _overage_alerts(client, team) == [(req["id"], "RESOLVED")]
