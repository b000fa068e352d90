"""Governance changes authorize the caller before they take a row lock (`access.authorized_lock`,
`access.authorized_row`), as member and workspace changes do (tests/test_governance_gaps.py).

setSpendLimit, setAlertSettings and setAutoTopUp (the workspace row), removeSpendLimit (the limit), renameBillingGroup and
archiveBillingGroup (the group), assignBillingGroup (the member, which every spend in flight
holds KEY SHARE through its foreign keys), acknowledgeAlert (the alert) and decideOverage (the
request) each lock a row. An outsider holding a foreign id is answered at once, exactly as for an
unknown id, instead of queueing on that lock and holding up the workspace's own work; a caller
allowed to change the row still waits for it, and a role revoked while they waited is seen.
Each test here first failed (the outsider's case) on the code it was written against."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

import asyncpg
import pytest
from gql.transport.exceptions import TransportQueryError

from tests.conftest import HeldLock, asyncpg_dsn, new_user
from tests.test_api_governance import REQUEST, SET_LIMIT
from tests.test_api_ledger import ADD, Team, make_team

PROMPT = 5  # seconds: far more than an answer takes, far less than the lock is held

_ANSWER = "{ __typename ... on Error { code message } }"

# name: (mutation, the locked table, the lock a concurrent transaction holds on the row)
MUTATIONS = {
    # another setSpendLimit in flight
    "setSpendLimit": ('mutation($ws: ID!) { setSpendLimit(input: {workspaceId: $ws, scope: WORKSPACE, period: DAY, '
                      'amount: "50", action: BLOCK}) ' + _ANSWER + ' }', "workspaces", "FOR NO KEY UPDATE"),
    # a member change in flight (the workspace row)
    "setAlertSettings": ('mutation($ws: ID!) { setAlertSettings(input: {workspaceId: $ws, lowBalanceThreshold: "75"}) '
                         + _ANSWER + ' }', "workspaces", "FOR NO KEY UPDATE"),
    # another removal in flight
    "removeSpendLimit": ('mutation($id: ID!) { removeSpendLimit(input: {limitId: $id}) ' + _ANSWER + ' }',
                         "spend_limits", "FOR UPDATE"),
    # a reservation of credits for the group in flight (`groups.group_in`)
    "renameBillingGroup": ('mutation($id: ID!) { renameBillingGroup(input: {groupId: $id, name: "Mine now"}) '
                           + _ANSWER + ' }', "billing_groups", "FOR SHARE"),
    "archiveBillingGroup": ('mutation($id: ID!) { archiveBillingGroup(input: {groupId: $id}) ' + _ANSWER + ' }',
                            "billing_groups", "FOR SHARE"),
    # a generation of that member starting (the foreign keys of its rows to the member)
    "assignBillingGroup": ('mutation($id: ID!, $group: ID) { assignBillingGroup(input: {memberId: $id, '
                           'groupId: $group}) ' + _ANSWER + ' }', "members", "FOR KEY SHARE"),
    # another acknowledgement in flight
    "acknowledgeAlert": ('mutation($id: ID!) { acknowledgeAlert(input: {alertId: $id}) ' + _ANSWER + ' }',
                         "alerts", "FOR UPDATE"),
    # another decision in flight
    "decideOverage": ('mutation($id: ID!) { decideOverage(input: {requestId: $id, approve: true}) '
                      + _ANSWER + ' }', "overage_requests", "FOR UPDATE"),
}


@dataclass
class Scene:
    """A workspace with one of each row the mutations change: a creator's REQUIRE_APPROVAL limit,
    the creator's pending overage request under it, that request's OVERAGE_REQUESTED alert, and a
    billing group."""

    team: Team
    creator: str
    limit: str
    request: str
    alert: str
    group: str

    def target(self, name: str) -> str:
        """The id of the row `name` locks."""
        return {"setSpendLimit": self.team.ws, "setAlertSettings": self.team.ws, "removeSpendLimit": self.limit, "renameBillingGroup": self.group,
                "archiveBillingGroup": self.group, "assignBillingGroup": self.creator,
                "acknowledgeAlert": self.alert, "decideOverage": self.request}[name]

    def args(self, name: str) -> dict:
        if name in ("setSpendLimit", "setAlertSettings"):
            return {"ws": self.team.ws}
        if name == "assignBillingGroup":
            return {"id": self.creator, "group": self.group}
        return {"id": self.target(name)}


def unknown_args(name: str) -> dict:
    """The same mutation with ids that exist nowhere."""
    if name in ("setSpendLimit", "setAlertSettings"):
        return {"ws": str(uuid.uuid4())}
    if name == "assignBillingGroup":
        return {"id": str(uuid.uuid4()), "group": str(uuid.uuid4())}
    return {"id": str(uuid.uuid4())}


async def make_scene(db, client) -> Scene:
    team = await make_team(db, client, creators=1)
    token, creator = team.creators[0]
    async with client(team.owner) as api:
        limit = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20",
                           action="REQUIRE_APPROVAL", member=creator))["setSpendLimit"]
        group = (await api('mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "Client A"}) '
                           '{ ... on BillingGroup { id } } }', ws=team.ws))["createBillingGroup"]
    async with client(token) as api:
        request = (await api(REQUEST, ws=team.ws, amount="10", reason="deadline"))["requestOverage"]
    assert request["__typename"] == "OverageRequest", request
    async with client(team.owner) as api:
        alerts = (await api("query($ws: ID!) { alerts(workspaceId: $ws) { id kind subject } }",
                            ws=team.ws))["alerts"]
    [alert] = [a["id"] for a in alerts if (a["kind"], a["subject"]) == ("OVERAGE_REQUESTED", request["id"])]
    return Scene(team, creator, limit["id"], request["id"], alert, group["id"])


async def answer(client, token: str, name: str, **variables) -> dict:
    """What the caller hears, however it is told (a result union member, or a top-level error),
    within PROMPT seconds."""
    async with client(token) as api:
        try:
            out = await asyncio.wait_for(api(MUTATIONS[name][0], **variables), PROMPT)
        except TransportQueryError as err:
            return {"error": err.errors[0]["extensions"]["code"], "message": err.errors[0]["message"]}
        except TimeoutError:
            pytest.fail(f"{name} waited on another transaction's lock of a row it may not change")
    return out[name]


async def state(database_url: str, scene: Scene, name: str) -> tuple:
    """The locked row as it is, and how many limits and audit entries the workspace has: what
    any of the mutations would change."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        table = MUTATIONS[name][1]
        row = await conn.fetchval(f"SELECT row_to_json(t)::text FROM {table} t WHERE id = $1",
                                  uuid.UUID(scene.target(name)))
        ws = uuid.UUID(scene.team.ws)
        return (json.loads(row), await conn.fetchval("SELECT count(*) FROM spend_limits WHERE workspace_id = $1", ws),
                await conn.fetchval("SELECT count(*) FROM audit_log WHERE workspace_id = $1", ws))
    finally:
        await conn.close()


def row_lock(database_url: str, name: str, row: str) -> HeldLock:
    """The lock the concurrent work named in MUTATIONS holds on the row `name` changes."""
    _, table, mode = MUTATIONS[name]
    return HeldLock(database_url, table, row, mode)


@pytest.mark.parametrize("name", list(MUTATIONS))
async def test_an_outsider_is_refused_at_once_while_the_row_is_locked(db, client, database_url, name):
    scene = await make_scene(db, client)
    outsider = await make_team(db, client, creators=0)  # an owner, of another workspace
    creator_token = scene.team.creators[0][0]
    before = await state(database_url, scene, name)
    async with row_lock(database_url, name, scene.target(name)):
        foreign = await answer(client, outsider.owner, name, **scene.args(name))
        unknown = await answer(client, outsider.owner, name, **unknown_args(name))
        # Exactly as for an id that does not exist: nothing says the row is there.
        assert foreign == unknown
        assert foreign["__typename"] == "NotFoundError", foreign
        # A member without the right is refused at once too.
        denied = await answer(client, creator_token, name, **scene.args(name))
        assert denied.get("error") == "FORBIDDEN", denied
    assert await state(database_url, scene, name) == before  # and nothing changed


@pytest.mark.parametrize(("name", "own"), [(name, False) for name in MUTATIONS] + [("assignBillingGroup", True)],
                         ids=[*MUTATIONS, "assignBillingGroup-own"])
async def test_a_role_revoked_while_an_admin_waited_on_the_row_lock_is_seen(db, client, database_url, name, own):
    """The lock still serializes the callers allowed to change the row, and the check made
    before queueing is made again under the lock, against the membership as it is then (also
    when the row locked is the caller's own membership, which the session then holds from the
    first check: it is read afresh, not taken from the session)."""
    scene = await make_scene(db, client)
    email, admin = await new_user(db, prefix="admin")
    async with client(scene.team.owner) as api:
        admin_member = (await api(ADD, ws=scene.team.ws, email=email, role="ADMIN", seat="STANDARD"))["addMember"]["id"]
    if own:  # the admin puts themselves in the group
        scene.creator = admin_member
    before = await state(database_url, scene, name)
    async with row_lock(database_url, name, scene.target(name)) as lock:
        # What a concurrent demotion of the admin, committed while they wait, has done.
        await lock.conn.execute("UPDATE members SET role = 'member' WHERE id = $1", uuid.UUID(admin_member))
        waiting = asyncio.ensure_future(answer(client, admin, name, **scene.args(name)))
        await lock.waited_on()  # the admin, allowed when they asked, queues on the lock
        assert not waiting.done()
        await lock.commit()
        heard = await waiting
    assert heard.get("error") == "FORBIDDEN", heard
    if own:
        before[0]["role"] = "member"  # the demotion; nothing else
    assert await state(database_url, scene, name) == before  # nothing changed


# name: (what the transaction holding the lock does to the row, what the waiting owner then hears,
#        what the row then says)
CHANGED_MEANWHILE = {
    "removeSpendLimit": ("UPDATE spend_limits SET removed_at = '2001-01-01Z' WHERE id = $1", "NotFoundError",
                         "SELECT removed_at = '2001-01-01Z' FROM spend_limits WHERE id = $1"),
    "archiveBillingGroup": ("UPDATE billing_groups SET archived_at = '2001-01-01Z' WHERE id = $1", "BillingGroup",
                            "SELECT archived_at = '2001-01-01Z' FROM billing_groups WHERE id = $1"),
    "assignBillingGroup": ("UPDATE members SET removed_at = now() WHERE id = $1", "NotFoundError",
                           "SELECT billing_group_id IS NULL FROM members WHERE id = $1"),
    "acknowledgeAlert": ("UPDATE alerts SET acknowledged_at = '2001-01-01Z' WHERE id = $1", "Alert",
                         "SELECT acknowledged_at = '2001-01-01Z' AND acknowledged_by IS NULL FROM alerts WHERE id = $1"),
    "decideOverage": ("UPDATE overage_requests SET status = 'DENIED', decided_at = now(), decision_reason = 'no' "
                      "WHERE id = $1", "OverageNotPending",
                      "SELECT status = 'DENIED' AND approved_units IS NULL FROM overage_requests WHERE id = $1"),
}


@pytest.mark.parametrize("name", list(CHANGED_MEANWHILE))
async def test_the_row_is_read_again_under_the_lock(db, client, database_url, name):
    """Authorizing first reads the row before the lock; what the transaction holding the lock
    changed is still what the change goes by (a removal, an archive, a first acknowledgement, a
    decision), as when the lock came first."""
    scene = await make_scene(db, client)
    change, heard_as, kept = CHANGED_MEANWHILE[name]
    row = uuid.UUID(scene.target(name))
    async with row_lock(database_url, name, scene.target(name)) as lock:
        await lock.conn.execute(change, row)
        waiting = asyncio.ensure_future(answer(client, scene.team.owner, name, **scene.args(name)))
        await lock.waited_on()
        await lock.commit()
        heard = await waiting
        assert heard["__typename"] == heard_as, heard
        assert await lock.conn.fetchval(kept, row)


async def test_a_billing_manager_demoted_while_their_set_auto_top_up_waited_on_the_workspace_lock_is_refused(
        db, client, database_url):
    """setAutoTopUp (owners and billing managers) locks the workspace row and the auto top-up's.
    A billing manager demoted by the transaction their change waited for turned auto top-up on
    all the same, in their own name (`enabledBy`): a standing instruction to charge the
    workspace from someone who no longer had the right to give it."""
    from tests.test_api_governance import AUTO
    from tests.test_api_ledger import _a_pack

    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    email, billing = await new_user(db, prefix="billing")
    async with client(team.owner) as api:
        member = (await api(ADD, ws=team.ws, email=email, role="BILLING_MANAGER", seat="STANDARD"))["addMember"]["id"]
    async with HeldLock(database_url, "workspaces", team.ws, "FOR NO KEY UPDATE") as lock:
        await lock.conn.execute("UPDATE members SET role = 'member' WHERE id = $1", uuid.UUID(member))
        async def set_it():
            async with client(billing) as api:
                try:
                    return (await api(AUTO, ws=team.ws, pack=pack, threshold="50", limit=3))["setAutoTopUp"]
                except TransportQueryError as err:
                    return {"error": err.errors[0]["extensions"]["code"]}
        waiting = asyncio.ensure_future(set_it())
        await lock.waited_on()
        await lock.commit()
        heard = await waiting
        assert heard == {"error": "FORBIDDEN"}, heard
        ws = uuid.UUID(team.ws)
        assert await lock.conn.fetchval("SELECT auto_topup_enabled FROM workspaces WHERE id = $1", ws) is False
        assert await lock.conn.fetchval("SELECT count(*) FROM auto_topups WHERE workspace_id = $1", ws) == 0
        assert await lock.conn.fetchval("SELECT count(*) FROM audit_log WHERE workspace_id = $1 "
                                        "AND action = 'autotopup.updated'", ws) == 0


async def test_an_owner_naming_another_workspaces_billing_group_is_refused_at_once_while_it_is_locked(
        db, client, database_url):
    """assignBillingGroup and transferCredits (toBillingGroupId) read the group they put something
    into FOR SHARE (`groups.group_in`), so that an archive in flight is waited for and seen. The
    lock came before the check that the group is the workspace's own: an owner of workspace A
    naming a billing group of B queued on B's rename or archive in flight (while holding their
    own member row FOR UPDATE, or their workspace row FOR SHARE, so A's spends, member changes
    and period closes waited too), and only then heard NotFound. An unknown id was answered at
    once, so the wait told them the id was a live group of another workspace, busy right now."""
    from tests.test_api_ledger import grant, key, balance, assert_ledger_clean
    from tests.test_periods import GROUP

    team = await make_team(db, client, creators=1)
    other = await make_team(db, client, creators=0)
    await grant(client, team, "50")
    _, member = team.creators[0]
    async with client(other.owner) as api:
        foreign = (await api(GROUP, ws=other.ws))["createBillingGroup"]["id"]
    assign = ('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
              '{ __typename ... on Error { code message } } }')
    reserve = ('mutation($ws: ID!, $g: ID!, $k: String!) { transferCredits(input: {workspaceId: $ws, amount: "5", '
               'idempotencyKey: $k, toBillingGroupId: $g}) { __typename ... on Error { code message } } }')

    async def heard(query: str, **variables) -> dict:
        async with client(team.owner) as api:
            try:
                out = await asyncio.wait_for(api(query, **variables), PROMPT)
            except TimeoutError:
                pytest.fail("waited on another workspace's lock of its billing group")
        return next(iter(out.values()))

    # B renames (or archives) its group: the row is locked FOR UPDATE until that commits.
    async with HeldLock(database_url, "billing_groups", foreign, "FOR UPDATE"):
        for query, args in ((assign, {"m": member}), (reserve, {"ws": team.ws, "k": key()})):
            to_foreign = await heard(query, **args, g=foreign)
            to_unknown = await heard(query, **args, g=str(uuid.uuid4()))
            assert to_foreign == to_unknown == {"__typename": "NotFoundError", "code": "NOT_FOUND",
                                                "message": "billing group not found"}, (to_foreign, to_unknown)
    assert await db.fetchrow("SELECT billing_group_id FROM members WHERE id = $1", uuid.UUID(member)) == (None,)
    assert (await balance(client, team.owner, team.ws))["available"] == "50.000"
    await assert_ledger_clean(db, team.ws)
