"""Workspaces, members and seats through the real gql client over HTTP."""

from __future__ import annotations

import asyncio

from tests.conftest import new_user, unique_email

CREATE = """
mutation($name: String!, $plan: String!) {
  createWorkspace(input: {name: $name, planKey: $plan}) {
    __typename
    ... on Workspace { id name allocationMode plan { key seatCap freeCreatorSeats }
                       seatUsage { seatsUsed creatorSeatsUsed creatorSeatLimit } viewerRole viewerSeat }
    ... on Error { message code }
    ... on ValidationError { field }
  }
}"""

ADD = """
mutation($ws: ID!, $email: String!, $role: Role!, $seat: Seat!) {
  addMember(input: {workspaceId: $ws, email: $email, role: $role, seat: $seat}) {
    __typename
    ... on Member { id role seat user { email } }
    ... on Error { message code }
    ... on SeatLimitReached { seatKind limit requested }
    ... on ValidationError { field }
  }
}"""

WORKSPACE = """
query($id: ID!) {
  workspace(id: $id) { id name members { id role seat user { email } } seatUsage { seatsUsed creatorSeatsUsed } }
}"""


async def create_workspace(api, name="Studio", plan="starter") -> dict:
    out = (await api(CREATE, name=name, plan=plan))["createWorkspace"]
    assert out["__typename"] == "Workspace", out
    return out


async def test_create_workspace_makes_the_caller_its_owner(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        ws = await create_workspace(api, "Acme Films", "team")
        assert ws["name"] == "Acme Films"
        assert ws["allocationMode"] == "POOLED"
        assert ws["plan"] == {"key": "team", "seatCap": 20, "freeCreatorSeats": 3}
        assert ws["viewerRole"] == "OWNER" and ws["viewerSeat"] == "CREATOR"
        assert ws["seatUsage"] == {"seatsUsed": 1, "creatorSeatsUsed": 1, "creatorSeatLimit": 3}
        mine = await api("{ viewer { workspaces { role workspace { id } } } }")
        assert {"role": "OWNER", "workspace": {"id": ws["id"]}} in mine["viewer"]["workspaces"]
