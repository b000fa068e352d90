"""Three governance gaps: who hears about an overage request is whoever the policy lets approve
it; an outsider never waits on (or learns about) a workspace's member lock; creating a workspace
and transferring credits leave audit entries. Each test here first failed on the code it was
written against."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from gql.transport.exceptions import TransportQueryError

from domain import identity
from domain.access import Caller
from domain.governance import overages
from domain.workspaces.models import Role, Seat
from policies import MEMBER_ROLES, MEMBER_SEATS, MODEL_PATH, POLICY_PATH, Action, Authorizer
from tests.conftest import HeldLock, new_user
from tests.test_api_ledger import ADD, TRANSFER, grant, key, make_team
from tests.test_api_governance import REQUEST, SET_LIMIT

# --- 1. overage approvers come from the policy --------------------------------------------------

NOTIFICATIONS = "{ notifications { kind payload } }"
SHIPPED_APPROVERS = {(role, seat) for role in ("owner", "admin") for seat in ("creator", "standard")}


def policy_file(tmp_path: Path, *, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> Path:
    """The shipped policy with some lines taken out and some added: a real policy for a real
    Casbin enforcer."""
    lines = POLICY_PATH.read_text().splitlines()
    for line in drop:
        assert line in lines, line
    path = tmp_path / "policy.csv"
    path.write_text("\n".join([x for x in lines if x not in drop] + list(add)) + "\n")
    return path


def test_the_roles_a_membership_can_hold_are_the_members_table_s():
    assert set(MEMBER_ROLES) == {r.value for r in Role}
    assert set(MEMBER_SEATS) == {s.value for s in Seat}


def test_who_may_approve_overages_is_read_from_the_policy(tmp_path: Path):
    ws, named = str(uuid.uuid4()), str(uuid.uuid4())
    assert Authorizer().memberships_allowed(ws, Action.APPROVE_OVERAGES) == SHIPPED_APPROVERS

    changed = Authorizer(MODEL_PATH, policy_file(
        tmp_path,
        drop=("p, role:admin, *, overages.approve, allow",),
        add=("p, role:billing_manager, *, overages.approve, allow",
             "p, seat:standard, *, overages.approve, deny",  # an explicit deny on a seat counts
             f"p, role:member, {named}, overages.approve, allow"),  # so does a workspace's own rule
    ))
    assert changed.memberships_allowed(ws, Action.APPROVE_OVERAGES) == {
        ("owner", "creator"), ("billing_manager", "creator")}
    assert changed.memberships_allowed(named, Action.APPROVE_OVERAGES) == {
        ("owner", "creator"), ("billing_manager", "creator"), ("member", "creator")}
    # Exactly the memberships `allows` lets decide, for every role and seat.
    for role in MEMBER_ROLES:
        for seat in MEMBER_SEATS:
            may = changed.allows("someone", {f"role:{role}", f"seat:{seat}"}, ws, Action.APPROVE_OVERAGES)
            assert may == ((role, seat) in changed.memberships_allowed(ws, Action.APPROVE_OVERAGES))


async def _overage_team(db, client):
    """A team with a workspace-wide REQUIRE_APPROVAL limit, plus an admin (standard seat, as in
    the demo) and two billing managers (one creator seat, one standard)."""
    team = await make_team(db, client, creators=2)
    await grant(client, team, "100")
    people = {}
    async with client(team.owner) as api:
        out = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="DAY", amount="5",
                         action="REQUIRE_APPROVAL"))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit", out
        for name, role, seat in (("admin", "ADMIN", "STANDARD"), ("bm_creator", "BILLING_MANAGER", "CREATOR"),
                                 ("bm_standard", "BILLING_MANAGER", "STANDARD")):
            email, token = await new_user(db, prefix=name)
            assert (await api(ADD, ws=team.ws, email=email, role=role, seat=seat))["addMember"]["id"]
            people[name] = token
    people.update(owner=team.owner, requester=team.creators[0][0], other_creator=team.creators[1][0],
                  standard=team.standard[0])
    return team, people


async def _told_of_requests(client, people: dict[str, str]) -> set[str]:
    told = set()
    for name, token in people.items():
        async with client(token) as api:
            if "OVERAGE_REQUESTED" in {n["kind"] for n in (await api(NOTIFICATIONS))["notifications"]}:
                told.add(name)
    return told


async def test_with_the_shipped_policy_owners_and_admins_hear_of_an_overage_request(db, client):
    team, people = await _overage_team(db, client)
    async with client(people["requester"]) as api:
        req = (await api(REQUEST, ws=team.ws, amount="10", reason="launch"))["requestOverage"]
    assert req["__typename"] == "OverageRequest", req
    assert await _told_of_requests(client, people) == {"owner", "admin"}


async def test_a_changed_policy_changes_who_hears_of_an_overage_request(db, client, tmp_path: Path):
    """Billing managers with a creator seat approve instead of admins: they are the ones told,
    and the ones `decideOverage` lets decide (the same policy, asked the same way)."""
    team, people = await _overage_team(db, client)
    authorizer = Authorizer(MODEL_PATH, policy_file(
        tmp_path,
        drop=("p, role:admin, *, overages.approve, allow",),
        add=("p, role:billing_manager, *, overages.approve, allow", "p, seat:standard, *, overages.approve, deny"),
    ))

    async def caller(token: str) -> Caller:
        return Caller(await identity.authenticate_secret(db, token), authorizer)

    request = await overages.request_overage(db, await caller(people["requester"]), workspace_id=team.ws,
                                             amount="10", reason="launch")
    assert await _told_of_requests(client, people) == {"owner", "bm_creator"}

    for name in ("admin", "bm_standard"):  # not told, and indeed not allowed to decide
        with pytest.raises(Exception, match="not allowed: overages.approve"):
            await overages.decide_overage(db, await caller(people[name]), request_id=str(request.id), approve=True)
    decided = await overages.decide_overage(db, await caller(people["bm_creator"]), request_id=str(request.id),
                                            approve=True)
    assert decided.status.value == "APPROVED"


# --- 2. an outsider never waits on a workspace's member lock ----------------------------------

PROMPT = 5  # seconds: far more than an answer takes, far less than the lock is held

MEMBER_CHANGES = {
    "addMember": ('mutation($ws: ID!, $id: String!) { addMember(input: {workspaceId: $ws, email: $id, role: MEMBER, '
                  'seat: STANDARD}) { __typename ... on Error { code message } } }', "ws"),
    "changeMemberRole": ('mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: ADMIN}) '
                         '{ __typename ... on Error { code message } } }', "member"),
    "changeMemberSeat": ('mutation($m: ID!, $seat: Seat!) { changeMemberSeat(input: {memberId: $m, seat: $seat}) '
                         '{ __typename ... on Error { code message } } }', "member"),
    "removeMember": ('mutation($m: ID!) { removeMember(input: {memberId: $m}) '
                     '{ __typename ... on Error { code message } } }', "member"),
    "updateWorkspace": ('mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, name: "Mine now"}) '
                        '{ __typename ... on Error { code message } } }', "ws"),
    "cancelSubscription": ('mutation($ws: ID!) { cancelSubscription(input: {workspaceId: $ws}) '
                           '{ __typename ... on Error { code message } } }', "ws"),
}


def change_args(name: str, ws: str, member: str) -> dict:
    _, target = MEMBER_CHANGES[name]
    if target == "member":
        return {"m": member, "seat": "STANDARD"} if name == "changeMemberSeat" else {"m": member}
    return {"ws": ws, "id": f"new-{uuid.uuid4().hex[:8]}@example.test"} if name == "addMember" else {"ws": ws}


async def answer(client, token: str, name: str, **variables) -> dict:
    """What the caller hears, however it is told (a result union member, or a top-level error),
    within PROMPT seconds."""
    async with client(token) as api:
        try:
            out = await asyncio.wait_for(api(MEMBER_CHANGES[name][0], **variables), PROMPT)
        except TransportQueryError as err:
            return {"error": err.errors[0]["extensions"]["code"], "message": err.errors[0]["message"]}
        except TimeoutError:
            pytest.fail(f"{name} waited on another transaction's lock of a workspace it may not change")
    return out[name]


async def test_an_outsider_is_refused_at_once_while_the_workspace_is_locked(db, client, database_url):
    team = await make_team(db, client, creators=1)
    outsider = await make_team(db, client, creators=0)  # an owner, of another workspace
    member = team.creators[0][1]
    unknown_ws, unknown_member = str(uuid.uuid4()), str(uuid.uuid4())
    async with HeldLock(database_url, "workspaces", team.ws):
        for name in MEMBER_CHANGES:
            foreign = await answer(client, outsider.owner, name, **change_args(name, team.ws, member))
            random = await answer(client, outsider.owner, name, **change_args(name, unknown_ws, unknown_member))
            # Exactly as for an id that does not exist: nothing says the workspace or member is there.
            assert foreign == random, name
            assert foreign["__typename"] == "NotFoundError", (name, foreign)
            # A member without the right is refused at once too.
            denied = await answer(client, team.creators[0][0], name, **change_args(name, team.ws, member))
            assert denied["error"] == "FORBIDDEN", (name, denied)
    async with client(team.owner) as api:  # and nothing changed
        ws = (await api("query($ws: ID!) { workspace(id: $ws) { name cancelledAt members { id role seat } } }",
                        ws=team.ws))["workspace"]
    assert ws["name"] == "Team" and ws["cancelledAt"] is None
    assert {(m["id"], m["role"], m["seat"]) for m in ws["members"]} >= {(member, "MEMBER", "CREATOR")}
    assert len(ws["members"]) == 3


@pytest.mark.parametrize("change", ["addMember", "changeMemberSeat"])
async def test_a_role_revoked_while_an_admin_waited_on_the_lock_is_seen(db, client, database_url, change):
    """The lock still serializes the people allowed to change the workspace, and the check made
    before queueing is made again under the lock, against the membership as it is then (also
    when the member being changed is the caller's own membership, which the session already
    holds: it is read afresh, not taken from the session)."""
    team = await make_team(db, client, creators=0)
    email, admin = await new_user(db, prefix="admin")
    async with client(team.owner) as api:
        admin_member = (await api(ADD, ws=team.ws, email=email, role="ADMIN", seat="STANDARD"))["addMember"]["id"]
    async with HeldLock(database_url, "workspaces", team.ws) as lock:
        # What a concurrent removal of the admin's rights, holding the lock, has done.
        await lock.conn.execute("UPDATE members SET role = 'member' WHERE id = $1", uuid.UUID(admin_member))
        args = change_args(change, team.ws, admin_member)
        if change == "changeMemberSeat":
            args["seat"] = "CREATOR"  # their own membership's seat
        waiting = asyncio.ensure_future(answer(client, admin, change, **args))
        await lock.waited_on()  # the admin, allowed when they asked, queues on the lock
        assert not waiting.done()
        await lock.commit()
        heard = await waiting
        assert heard.get("error") == "FORBIDDEN", heard
    async with client(team.owner) as api:
        ws = (await api("query($ws: ID!) { workspace(id: $ws) { members { id role seat } } }",
                        ws=team.ws))["workspace"]
    # The owner, the standard seat, the former admin: nobody added, nothing else changed.
    assert len(ws["members"]) == 3
    assert {(m["role"], m["seat"]) for m in ws["members"] if m["id"] == admin_member} == {("MEMBER", "STANDARD")}


# --- 3. creating a workspace and transferring credits are audited -----------------------------

AUDIT_LOG = """
query($ws: ID!, $action: String) {
  auditLog(workspaceId: $ws, action: $action) {
    edges { node { action actorId targetType targetId before after occurredAt } }
  }
}"""
CREATE = """
mutation($name: String!) {
  createWorkspace(input: {name: $name, planKey: "team", allocationMode: PER_SEAT}) {
    __typename ... on Workspace { id members { id } } ... on Error { code message }
  }
}"""


async def audit_entries(api, ws: str, action: str) -> list[dict]:
    return [e["node"] for e in (await api(AUDIT_LOG, ws=ws, action=action))["auditLog"]["edges"]]


async def test_creating_a_workspace_is_audited(db, client):
    _, owner = await new_user(db)
    async with client(owner) as api:
        me = (await api("{ viewer { id } }"))["viewer"]["id"]
        ws = (await api(CREATE, name="Studio North"))["createWorkspace"]
        assert ws["__typename"] == "Workspace", ws
        [entry] = await audit_entries(api, ws["id"], "workspace.created")
    assert (entry["action"], entry["actorId"], entry["targetType"], entry["targetId"]) == (
        "workspace.created", me, "workspace", ws["id"])
    assert entry["before"] is None
    after = entry["after"]  # the settings an update's entry shows, and who became the owner
    assert (after["name"], after["allocationMode"], after["owner"], after["ownerSeat"]) == (
        "Studio North", "PER_SEAT", ws["members"][0]["id"], "creator")
    assert uuid.UUID(after["plan"])  # the plan's id, as in workspace.updated
    assert {"poolFallback", "paidCreatorSeats", "timezone"} <= after.keys()


async def test_a_transfer_is_audited_once_with_who_moved_what_where(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    await grant(client, team, "100")
    _, seat = team.creators[0]
    async with client(team.owner) as api:
        me = (await api("{ viewer { id } }"))["viewer"]["id"]
        k = key()
        to_seat = (await api(TRANSFER, ws=team.ws, amount="30", key=k, to=seat))["transferCredits"]
        assert to_seat["__typename"] == "Transfer", to_seat
        assert (await api(TRANSFER, ws=team.ws, amount="30", key=k, to=seat))["transferCredits"] == to_seat  # replay
        back = (await api(TRANSFER, ws=team.ws, amount="12.5", key=key(), **{"from": seat}))["transferCredits"]
        assert back["__typename"] == "Transfer", back
        refused = (await api(TRANSFER, ws=team.ws, amount="1000", key=key(), to=seat))["transferCredits"]
        assert refused["__typename"] == "InsufficientCredits"  # moved nothing, so recorded nothing
        entries = await audit_entries(api, team.ws, "credits.")
    transfers = [e for e in entries if e["action"] == "credits.transferred"]
    assert [(e["targetType"], e["targetId"], e["actorId"]) for e in transfers] == [
        ("transfer", back["id"], me), ("transfer", to_seat["id"], me)]  # newest first, the replay not again
    assert [e["after"] for e in transfers] == [
        {"amount": 12500, "fromMember": seat, "fromGroup": None, "toMember": None, "toGroup": None},
        {"amount": 30000, "fromMember": None, "fromGroup": None, "toMember": seat, "toGroup": None},
    ]
