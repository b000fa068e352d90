"""The full authorization matrix, checked through the real database (money rule 7).

`ALLOWED` below is the intended policy, written out by hand. It is deliberately not derived
from policies/policy.csv: this file pins the matrix, so a change to the policy files that is not
also made here fails a test.

Every subject is checked for every action in workspace A (where the workspace members belong)
and in workspace B (where they do not), through `domain.access.authorize`, which reads the
caller's roles from the members table.
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from domain import identity
from domain.access import Caller, authorize
from domain.errors import Forbidden, NotFound
from domain.workspaces.models import AllocationMode, Role, Seat
from domain.workspaces.service import add_member, create_workspace
from policies import MODEL_PATH, POLICY_PATH, Action, Authorizer
from tests.conftest import new_service_token, new_user

# --- the intended matrix -------------------------------------------------------------------
#
# Who may do each action. Tokens:
#   "owner", "admin", "billing_manager", "member"  a workspace role, whatever the seat
#   "creator"                                       any role, but only with a creator seat
#   "operator"                                      a platform operator (not a member)
#   "service"                                       a service account (not a member)
# Anyone not listed is refused. A standard seat is never listed for "generate": it is denied.

ALLOWED: dict[Action, frozenset[str]] = {
    Action.VIEW_WORKSPACE:        frozenset({"owner", "admin", "billing_manager", "member", "operator"}),
    Action.MANAGE_WORKSPACE:      frozenset({"owner", "admin"}),
    Action.VIEW_BALANCE:          frozenset({"owner", "admin", "billing_manager", "member", "operator"}),
    Action.VIEW_LEDGER:           frozenset({"owner", "admin", "billing_manager", "operator"}),
    Action.GENERATE:              frozenset({"creator"}),
    Action.PURCHASE_CREDITS:      frozenset({"owner", "admin", "billing_manager"}),
    Action.GRANT_CREDITS:         frozenset({"operator"}),
    Action.TRANSFER_CREDITS:      frozenset({"owner", "admin"}),
    Action.SET_SPEND_LIMITS:      frozenset({"owner", "admin"}),
    Action.REQUEST_OVERAGE:       frozenset({"owner", "admin", "billing_manager", "member"}),
    Action.APPROVE_OVERAGES:      frozenset({"owner", "admin"}),
    Action.MANAGE_MEMBERS:        frozenset({"owner", "admin"}),
    Action.MANAGE_OWNERS:         frozenset({"owner"}),
    Action.MANAGE_BILLING_GROUPS: frozenset({"owner", "admin"}),
    Action.MANAGE_AUTO_TOPUP:     frozenset({"owner", "billing_manager"}),
    Action.DISABLE_AUTO_TOPUP:    frozenset({"owner", "admin", "billing_manager"}),
    Action.VIEW_AUDIT_LOG:        frozenset({"owner", "admin", "operator"}),
    Action.SETTLE_GENERATIONS:    frozenset({"service", "operator"}),  # never a member (rule 8)
    Action.START_FOR_MEMBER:      frozenset({"service"}),
    Action.MANAGE_CATALOG:        frozenset({"operator"}),
}

MEMBER_SUBJECTS = [(f"{role}-{seat}", role, seat) for role in Role for seat in Seat]
PLATFORM_SUBJECTS = ["operator", "service"]
SUBJECTS = [name for name, _, _ in MEMBER_SUBJECTS] + PLATFORM_SUBJECTS
SEATS_OF = {name: (role, seat) for name, role, seat in MEMBER_SUBJECTS}

ALLOWED_OUTCOME, FORBIDDEN, NOT_FOUND = "allowed", "forbidden", "not found"


def allowed(subject: str, action: Action) -> bool:
    grants = ALLOWED[action]
    if subject in PLATFORM_SUBJECTS:
        return subject in grants
    role, seat = SEATS_OF[subject]
    return role.value in grants or seat.value in grants


def expected_outcome(subject: str, action: Action, where: str) -> str:
    if subject in PLATFORM_SUBJECTS:
        # Platform identities are platform-wide: the same answer in A and in B. One that may
        # not even view a workspace (the service account, for anything but settling) has no
        # relation to it at all, so it is told "not found", exactly like an outsider;
        # domain.access.authorize does this on purpose.
        if allowed(subject, action):
            return ALLOWED_OUTCOME
        return FORBIDDEN if allowed(subject, Action.VIEW_WORKSPACE) else NOT_FOUND
    if where == "other":
        return NOT_FOUND  # a member of A learns nothing about B, whatever the action
    return ALLOWED_OUTCOME if allowed(subject, action) else FORBIDDEN


CASES = [
    pytest.param(subject, action, where, id=f"{subject}-{action.value}-{where}")
    for subject in SUBJECTS
    for action in Action
    for where in ("same", "other")
]


# --- one set of workspaces and identities for the whole module ------------------------------

@dataclass(frozen=True)
class World:
    workspaces: dict[str, uuid.UUID]  # "same" is A (the members' own), "other" is B
    callers: dict[str, Caller]


async def caller_for(db, token: str, authorizer: Authorizer) -> Caller:
    actor = await identity.authenticate_secret(db, token)
    assert actor is not None
    return Caller(actor, authorizer)


async def new_workspace(db, authorizer: Authorizer, name: str) -> tuple[uuid.UUID, Caller]:
    _, token = await new_user(db, prefix="founder")
    founder = await caller_for(db, token, authorizer)
    # Enterprise: 500 seats, 25 free creator seats, so seat limits never interfere.
    made = await create_workspace(
        db, founder, name=name, plan_key="enterprise", allocation_mode=AllocationMode.POOLED
    )
    return made.workspace.id, founder


@pytest.fixture(scope="module")
async def world(db) -> World:
    authorizer = Authorizer()
    a, founder_a = await new_workspace(db, authorizer, "Matrix A")
    b, _ = await new_workspace(db, authorizer, "Matrix B")

    callers: dict[str, Caller] = {}
    for name, role, seat in MEMBER_SUBJECTS:
        email, token = await new_user(db, prefix=name.replace("_", "-"))
        await add_member(db, founder_a, workspace_id=str(a), email=email, role=role, seat=seat,
                         hold_ttl=timedelta(hours=1))
        callers[name] = await caller_for(db, token, authorizer)

    _, operator_token = await new_user(db, operator=True, prefix="operator")
    callers["operator"] = await caller_for(db, operator_token, authorizer)
    callers["service"] = await caller_for(db, await new_service_token(db), authorizer)
    assert callers["operator"].actor.is_operator and callers["service"].actor.is_service

    return World(workspaces={"same": a, "other": b}, callers=callers)


# --- the matrix ----------------------------------------------------------------------------

def test_the_table_covers_every_action():
    assert set(ALLOWED) == set(Action)


@pytest.mark.parametrize(("subject", "action", "where"), CASES)
async def test_matrix(db, world: World, subject: str, action: Action, where: str):
    caller = world.callers[subject]
    workspace_id = world.workspaces[where]

    async def check(session):
        return await authorize(session, caller, workspace_id, action, what="workspace")

    outcome = expected_outcome(subject, action, where)
    if outcome == ALLOWED_OUTCOME:
        member = await db.read(check)
        if subject in PLATFORM_SUBJECTS:
            assert member is None  # allowed by platform role, not by a membership
        else:
            assert member is not None
            assert (member.user_id, member.workspace_id) == (caller.actor.user_id, workspace_id)
            assert (member.role, member.seat) == SEATS_OF[subject]
    elif outcome == FORBIDDEN:
        with pytest.raises(Forbidden) as refused:
            await db.read(check)
        assert refused.value.action == action.value
    else:
        with pytest.raises(NotFound) as hidden:
            await db.read(check)
        # Word for word what an unknown id gets: nothing reveals that the workspace exists.
        assert str(hidden.value) == str(NotFound("workspace"))


# --- the policy files themselves -----------------------------------------------------------

def policy_actions(path: Path) -> set[str]:
    with path.open(newline="") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f)]
    return {row[3] for row in rows if row and row[0] == "p"}


def test_action_enum_and_policy_name_the_same_actions():
    assert policy_actions(POLICY_PATH) == {action.value for action in Action}


def test_explicit_deny_beats_any_allow(tmp_path: Path):
    policy = tmp_path / "policy.csv"
    policy.write_text(POLICY_PATH.read_text() + "\np, role:member, *, generate, allow\n")
    authorizer = Authorizer(MODEL_PATH, policy)
    user, ws = str(uuid.uuid4()), str(uuid.uuid4())

    # The added line is live: the role alone now grants generate...
    assert authorizer.allows(user, {"role:member"}, ws, Action.GENERATE)
    # ...but a standard seat's explicit deny still wins over it.
    assert not authorizer.allows(user, {"role:member", "seat:standard"}, ws, Action.GENERATE)
    # And the shipped policy, unchanged, never let that role generate without a creator seat.
    assert not Authorizer().allows(user, {"role:member"}, ws, Action.GENERATE)


@pytest.mark.parametrize(
    "bad_rule",
    [
        "p, seat:standard, *, generate, dney",  # misspelled effect
        "p, role:admni, *, members.manage, allow",  # misspelled role
        "p, role:admin, *, members.mange, allow",  # misspelled action
    ],
)
def test_a_typo_in_the_policy_stops_the_authorizer(tmp_path: Path, bad_rule: str):
    policy = tmp_path / "policy.csv"
    policy.write_text(POLICY_PATH.read_text() + "\n" + bad_rule + "\n")
    with pytest.raises(ValueError, match="invalid policy rule"):
        Authorizer(MODEL_PATH, policy)
