"""Review of workspace administration and governance: the audit trail of workspace settings,
overage requests against limits that change under them, and the owner rules. Each test here
first failed on the code it was written against."""

from __future__ import annotations

from tests.test_api_governance import AUDIT
from tests.test_api_ledger import make_team

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
