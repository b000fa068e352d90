"""Three governance gaps: who hears about an overage request is whoever the policy lets approve
it; an outsider never waits on (or learns about) a workspace's member lock; creating a workspace
and transferring credits leave audit entries. Each test here first failed on the code it was
written against."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from domain import identity
from domain.access import Caller
from domain.governance import overages
from domain.workspaces.models import Role, Seat
from policies import MEMBER_ROLES, MEMBER_SEATS, MODEL_PATH, POLICY_PATH, Action, Authorizer
from tests.conftest import new_user
from tests.test_api_governance import REQUEST, SET_LIMIT
from tests.test_api_ledger import ADD, grant, make_team

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
