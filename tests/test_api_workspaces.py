"""Workspaces, members and seats through the real gql client over HTTP."""

from __future__ import annotations

import asyncio

import pytest
from gql.transport.exceptions import TransportQueryError

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


async def test_members_up_to_the_seat_cap_then_refused_and_nothing_written(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        ws = await create_workspace(api, plan="starter")  # 5 seats, 1 free creator seat (the owner's)
        for _ in range(4):
            added = (await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="STANDARD"))["addMember"]
            assert added["__typename"] == "Member", added
        refused_email = unique_email()
        refused = (await api(ADD, ws=ws["id"], email=refused_email, role="MEMBER", seat="STANDARD"))["addMember"]
        assert refused["__typename"] == "SeatLimitReached"
        assert refused["code"] == "SEAT_LIMIT_REACHED"
        assert (refused["seatKind"], refused["limit"], refused["requested"]) == ("any", 5, 6)
        detail = (await api(WORKSPACE, id=ws["id"]))["workspace"]
        assert detail["seatUsage"] == {"seatsUsed": 5, "creatorSeatsUsed": 1}
        assert refused_email not in {m["user"]["email"] for m in detail["members"]}


async def test_creator_seats_are_capped_by_free_plus_paid_seats(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        ws = await create_workspace(api, plan="starter")  # the owner holds the one free creator seat
        refused = (await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="CREATOR"))["addMember"]
        assert refused["__typename"] == "SeatLimitReached" and refused["seatKind"] == "creator"
        paid = await api(
            "mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, paidCreatorSeats: 1}) "
            "{ __typename ... on Workspace { paidCreatorSeats } } }", ws=ws["id"])
        assert paid["updateWorkspace"] == {"__typename": "Workspace", "paidCreatorSeats": 1}
        added = (await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="CREATOR"))["addMember"]
        assert added["__typename"] == "Member" and added["seat"] == "CREATOR"
        # Taking the paid seat away again would strand a creator: refused.
        back = await api(
            "mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, paidCreatorSeats: 0}) "
            "{ __typename ... on SeatLimitReached { seatKind } } }", ws=ws["id"])
        assert back["updateWorkspace"] == {"__typename": "SeatLimitReached", "seatKind": "creator"}


async def test_concurrent_adds_never_exceed_the_seat_cap(db, live_server, client):
    _, token = await new_user(db)
    async with client(token) as api:
        ws = await create_workspace(api, plan="starter")  # 4 seats left
    # Ten clients race for four seats, each on its own HTTP session.
    async def add_one():
        async with client(token) as racer:
            out = await racer(ADD, ws=ws["id"], email=unique_email("racer"), role="MEMBER", seat="STANDARD")
            return out["addMember"]["__typename"]

    results = await asyncio.gather(*(add_one() for _ in range(10)))
    assert results.count("Member") == 4
    assert results.count("SeatLimitReached") == 6
    async with client(token) as api:
        detail = (await api(WORKSPACE, id=ws["id"]))["workspace"]
        assert detail["seatUsage"]["seatsUsed"] == 5 == len(detail["members"])


async def test_the_last_owner_can_be_neither_demoted_nor_removed(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        ws = await create_workspace(api)
        owner_id = (await api(WORKSPACE, id=ws["id"]))["workspace"]["members"][0]["id"]
        demote = await api(
            "mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: ADMIN}) { __typename ... on Error { code } } }",
            m=owner_id)
        assert demote["changeMemberRole"] == {"__typename": "LastOwner", "code": "LAST_OWNER"}
        remove = await api(
            "mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename ... on Error { code } } }", m=owner_id)
        assert remove["removeMember"] == {"__typename": "LastOwner", "code": "LAST_OWNER"}
        # With a second owner, the first may step down.
        second = (await api(ADD, ws=ws["id"], email=unique_email(), role="OWNER", seat="STANDARD"))["addMember"]
        assert second["role"] == "OWNER"
        ok = await api(
            "mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: ADMIN}) { __typename ... on Member { role } } }",
            m=owner_id)
        assert ok["changeMemberRole"] == {"__typename": "Member", "role": "ADMIN"}


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(db, client):
    _, token_a = await new_user(db)
    email_b, token_b = await new_user(db)
    async with client(token_a) as a:
        ws = await create_workspace(a)
        b_member = (await a(ADD, ws=ws["id"], email=email_b, role="OWNER", seat="STANDARD"))["addMember"]
        a_member = [m for m in (await a(WORKSPACE, id=ws["id"]))["workspace"]["members"] if m["id"] != b_member["id"]][0]
    demote = "mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: MEMBER}) { __typename } }"
    async with client(token_a) as a, client(token_b) as b:
        results = await asyncio.gather(
            a(demote, m=b_member["id"]), b(demote, m=a_member["id"]), return_exceptions=True
        )
    # Serialized on the workspace lock, and authorized after taking it: the first demotion wins;
    # the loser is no longer an owner when its turn comes, so it is refused outright.
    wins = [r for r in results if isinstance(r, dict)]
    refusals = [r for r in results if isinstance(r, TransportQueryError)]
    assert [w["changeMemberRole"]["__typename"] for w in wins] == ["Member"]
    assert [r.errors[0]["extensions"]["code"] for r in refusals] == ["FORBIDDEN"]
    owners = [m for m in (await _members_as_operator(db, client, ws["id"])) if m["role"] == "OWNER"]
    assert len(owners) == 1


async def _members_as_operator(db, client, ws_id):
    _, op = await new_user(db, operator=True)
    async with client(op) as api:
        return (await api(WORKSPACE, id=ws_id))["workspace"]["members"]


async def test_admins_manage_members_but_cannot_make_or_unmake_owners(db, client):
    _, owner = await new_user(db)
    admin_email, admin = await new_user(db)
    async with client(owner) as api:
        ws = await create_workspace(api, plan="team")
        await api(ADD, ws=ws["id"], email=admin_email, role="ADMIN", seat="STANDARD")
    async with client(admin) as api:
        member = (await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="STANDARD"))["addMember"]
        assert member["__typename"] == "Member"
        seat = await api(
            "mutation($m: ID!) { changeMemberSeat(input: {memberId: $m, seat: CREATOR}) { __typename ... on Member { seat } } }",
            m=member["id"])
        assert seat["changeMemberSeat"] == {"__typename": "Member", "seat": "CREATOR"}
        with pytest.raises(TransportQueryError) as err:
            await api(
                "mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: OWNER}) { __typename } }",
                m=member["id"])
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
        removed = await api(
            "mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename ... on Member { removedAt } } }",
            m=member["id"])
        assert removed["removeMember"]["removedAt"] is not None
        gone = await api(WORKSPACE, id=ws["id"])
        assert member["id"] not in {m["id"] for m in gone["workspace"]["members"]}


async def test_members_cannot_manage_members(db, client):
    _, owner = await new_user(db)
    member_email, member = await new_user(db)
    async with client(owner) as api:
        ws = await create_workspace(api, plan="team")
        await api(ADD, ws=ws["id"], email=member_email, role="MEMBER", seat="CREATOR")
    async with client(member) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="STANDARD")
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
        assert err.value.errors[0]["message"] == "not allowed: members.manage"


async def test_a_member_of_one_workspace_learns_nothing_about_another(db, client):
    _, owner_a = await new_user(db)
    _, owner_b = await new_user(db)
    async with client(owner_b) as api:
        ws_b = await create_workspace(api, "Secret B")
        b_owner_member = (await api(WORKSPACE, id=ws_b["id"]))["workspace"]["members"][0]["id"]
    unknown_ws = "00000000-0000-4000-8000-000000000000"
    async with client(owner_a) as api:
        await create_workspace(api, "A")
        for ws_id in (ws_b["id"], unknown_ws, "not-a-uuid"):
            assert (await api(WORKSPACE, id=ws_id)) == {"workspace": None}
        answers = []
        for ws_id in (ws_b["id"], unknown_ws):
            out = await api(ADD, ws=ws_id, email=unique_email(), role="MEMBER", seat="STANDARD")
            answers.append(out["addMember"])
            upd = await api(
                "mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, name: \"x\"}) { __typename ... on Error { message code } } }",
                ws=ws_id)
            answers.append(upd["updateWorkspace"])
        for member_id in (b_owner_member, "00000000-0000-4000-8000-000000000001"):
            out = await api(
                "mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename ... on Error { message code } } }",
                m=member_id)
            answers.append(out["removeMember"])
        # Same answer for a real id in B as for an id that does not exist.
        assert answers[0] == answers[2] == {"__typename": "NotFoundError", "message": "workspace not found", "code": "NOT_FOUND"}
        assert answers[1] == answers[3]
        assert answers[4] == answers[5] == {"__typename": "NotFoundError", "message": "member not found", "code": "NOT_FOUND"}
    async with client(owner_b) as api:
        detail = (await api(WORKSPACE, id=ws_b["id"]))["workspace"]
        assert detail["name"] == "Secret B" and len(detail["members"]) == 1


async def test_bad_input_is_a_typed_validation_error_and_writes_nothing(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        before = len((await api("{ viewer { workspaces { role } } }"))["viewer"]["workspaces"])
        for name, plan, field in (("", "starter", "name"), ("x" * 101, "starter", "name"), ("ok", "no-such-plan", "planKey")):
            out = (await api(CREATE, name=name, plan=plan))["createWorkspace"]
            assert out["__typename"] == "ValidationError" and out["field"] == field and out["code"] == "VALIDATION"
        after = len((await api("{ viewer { workspaces { role } } }"))["viewer"]["workspaces"])
        assert after == before
        ws = await create_workspace(api)
        bad = (await api(ADD, ws=ws["id"], email="not-an-email", role="MEMBER", seat="STANDARD"))["addMember"]
        assert bad["__typename"] == "ValidationError" and bad["field"] == "email"
        assert (await api(WORKSPACE, id=ws["id"]))["workspace"]["seatUsage"]["seatsUsed"] == 1
        dup_email = unique_email()
        assert (await api(ADD, ws=ws["id"], email=dup_email, role="MEMBER", seat="STANDARD"))["addMember"]["__typename"] == "Member"
        dup = (await api(ADD, ws=ws["id"], email=dup_email.upper(), role="MEMBER", seat="STANDARD"))["addMember"]
        assert dup["__typename"] == "AlreadyMember"


async def test_plans_and_model_prices_are_listed_for_signed_in_users(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        out = await api("{ plans { key seatCap freeCreatorSeats } }")
        assert {"key": "team", "seatCap": 20, "freeCreatorSeats": 3} in out["plans"]


async def test_a_workspace_over_a_plan_an_operator_shrank_can_still_be_changed_and_come_back_within_it(db, client):
    """An operator's plan edit (`plans.update_plan`) may leave a workspace with more members or
    creator seats than the plan now allows. Every later change was checked as if it asked for
    those seats: renaming, a new timezone or allocation mode, and even giving up a creator seat
    were refused with SeatLimitReached (the owner could only remove people). A change is refused
    when it adds to the excess over a limit (another member, another creator seat, a smaller
    plan or fewer paid seats), not when the workspace was already over by as much."""
    import uuid

    from domain import identity
    from domain.access import Caller
    from domain.plans import update_plan
    from policies import Authorizer

    _, op = await new_user(db, operator=True)
    plan = f"small-{uuid.uuid4().hex[:8]}"
    async with client(op) as api:
        made = await api('mutation($k: String!) { createPlan(input: {key: $k, name: "Small", seatCap: 5, '
                         'freeCreatorSeats: 4}) { __typename } }', k=plan)
        assert made["createPlan"]["__typename"] == "Plan"
    _, token = await new_user(db)
    answer = "{ __typename ... on SeatLimitReached { seatKind limit requested } }"
    async with client(token) as api:
        ws = await create_workspace(api, plan=plan)  # the owner holds a creator seat
        creators = [(await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="CREATOR"))["addMember"]["id"]
                    for _ in range(3)]
        await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="STANDARD")
    operator = Caller(await identity.authenticate_secret(db, op), Authorizer())
    await update_plan(db, operator, key=plan, seat_cap=4, free_creator_seats=2)  # 5 members, 4 creators now

    async with client(token) as api:
        for change in ('name: "Renamed"', 'timezone: "Europe/Paris"', "allocationMode: PER_SEAT"):
            out = await api(f"mutation($ws: ID!) {{ updateWorkspace(input: {{workspaceId: $ws, {change}}}) {answer} }}",
                            ws=ws["id"])
            assert out["updateWorkspace"] == {"__typename": "Workspace"}, (change, out)
        seat = "mutation($m: ID!, $s: Seat!) { changeMemberSeat(input: {memberId: $m, seat: $s}) " + answer + " }"
        # Giving up creator seats, one at a time, back towards the plan's two.
        for member in creators[:2]:
            assert (await api(seat, m=member, s="STANDARD"))["changeMemberSeat"] == {"__typename": "Member"}
        # What adds to an excess is still refused: a sixth member, a creator seat taken back.
        extra = (await api(ADD, ws=ws["id"], email=unique_email(), role="MEMBER", seat="STANDARD"))["addMember"]
        assert (extra["__typename"], extra["seatKind"], extra["limit"], extra["requested"]) == (
            "SeatLimitReached", "any", 4, 6)
        assert (await api(seat, m=creators[0], s="CREATOR"))["changeMemberSeat"] == {
            "__typename": "SeatLimitReached", "seatKind": "creator", "limit": 2, "requested": 3}
        fewer = await api("mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, planKey: \"starter\"}) "
                          + answer + " }", ws=ws["id"])
        assert fewer["updateWorkspace"]["__typename"] == "SeatLimitReached", fewer
        detail = (await api(WORKSPACE, id=ws["id"]))["workspace"]
    assert detail["seatUsage"] == {"seatsUsed": 5, "creatorSeatsUsed": 2}
