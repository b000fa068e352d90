"""Review probes for governance (limits, overages, auto top-up, alerts, groups) and the period
close. Six of these first proved real bugs (since fixed) and stay as regression tests; the rest
pin behaviour the review checked and found right."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from domain.periods.service import tick
from tests.test_api_governance import ALERTS, AUDIT, AUTO, DECIDE, LIMITS, REQUEST, SET_LIMIT, purchases_of, start
from tests.test_api_ledger import COMPLETE, FAIL, _a_pack, grant, key, make_team
from tests.test_periods import (  # noqa: F401 - the periods database and its clock reset
    GROUP,
    TO_GROUP,
    reserved_for_a_group,
    plan,
    real_time,
    workspace,
    world,
    month,
    closes_of,
    clean,
)
from tests.test_periods import balance as p_balance

ASSIGN = ('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
          '{ __typename ... on Error { code } } }')
LIMITS_FULL = "query($ws: ID!) { spendLimits(workspaceId: $ws) { id used allowance periodEnd } }"


# --- spend limits ----------------------------------------------------------------------------------

async def test_replacing_a_limit_mid_period_keeps_what_the_period_already_used(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="BLOCK", member=member)
    assert [(await start(client, token, team.ws))["__typename"] for _ in range(3)] == [
        "Generation", "Generation", "SpendLimitExceeded"]
    async with client(team.owner) as api:  # an admin raises the cap a little: 25 this month
        out = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="25", action="BLOCK",
                         member=member))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit"
        [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
    # 20 already held this month: another 10 would make 30 > 25.
    assert limit["used"] == "20.000"
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"


# --- alerts ----------------------------------------------------------------------------------------

async def test_a_limit_alert_resolves_when_released_credits_bring_usage_back_down(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="BLOCK", member=member)
    gens = [await start(client, token, team.ws) for _ in range(2)]
    async with client(team.owner) as api:
        opened = sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["status"] == "OPEN")
    assert opened == ["LIMIT_100", "LIMIT_80"]
    async with client(team.worker) as api:
        for g in gens:
            out = (await api(FAIL, g=g["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
            assert out["status"] == "FAILED"
    async with client(team.owner) as api:
        assert (await api(LIMITS, ws=team.ws))["spendLimits"][0]["used"] == "0.000"
    await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
    async with client(team.owner) as api:
        still = sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["status"] == "OPEN")
    assert still == []  # nothing is used any more: the condition cleared


# --- auto top-up -----------------------------------------------------------------------------------

async def test_auto_top_up_never_buys_a_pack_taken_off_sale(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    pack = await _a_pack(client, team.operator)
    async with client(team.owner) as api:
        assert (await api(AUTO, ws=team.ws, pack=pack, threshold="95", limit=3))["setAutoTopUp"]["enabled"]
    async with client(team.operator) as api:
        off = (await api('mutation($p: ID!) { setCreditPackActive(input: {packId: $p, active: false}) '
                         '{ __typename ... on CreditPack { isActive } } }', p=pack))["setCreditPackActive"]
    assert off == {"__typename": "CreditPack", "isActive": False}
    token, _ = team.creators[0]
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 90 < 95: a crossing
    # A manual purchase of that pack is refused (NOT_FOUND); auto top-up must not charge for it either.
    assert await purchases_of(db, team.ws) == 0


# --- overages --------------------------------------------------------------------------------------

async def test_approving_a_request_after_its_period_ended_is_not_a_silent_no_op(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="10", action="REQUIRE_APPROVAL",
                  member=member)
        period_end = datetime.fromisoformat((await api(LIMITS_FULL, ws=team.ws))["spendLimits"][0]["periodEnd"])
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="20", reason="tonight"))["requestOverage"]
    assert req["status"] == "PENDING"
    try:  # the next day starts before the request lapses (24 h)
        live_server.clock.offset = period_end - live_server.clock.now() + timedelta(minutes=5)
        async with client(team.owner) as api:
            out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
        if out["__typename"] == "OverageRequest" and out["status"] == "APPROVED":
            # If it is approved, the approval must be usable: an expiry in the future ...
            assert datetime.fromisoformat(out["approvalExpiresAt"]) > live_server.clock.now()
    finally:
        live_server.clock.offset = timedelta(0)


# --- authorization (passes: outsiders get NOT_FOUND like unknown ids) ------------------------------

async def test_outsiders_acting_on_another_workspaces_governance_rows_get_not_found(db, client):
    a = await make_team(db, client, creators=1)
    b = await make_team(db, client, creators=1)
    _, b_member = b.creators[0]
    b_token, _ = b.creators[0]
    await grant(client, b, "100")
    async with client(b.owner) as api:
        b_group = (await api(GROUP, ws=b.ws))["createBillingGroup"]["id"]
        b_limit = (await api(SET_LIMIT, ws=b.ws, scope="MEMBER", period="MONTH", amount="5",
                             action="REQUIRE_APPROVAL", member=b_member))["setSpendLimit"]["id"]
    async with client(b_token) as api:
        b_req = (await api(REQUEST, ws=b.ws, amount="5", reason="x"))["requestOverage"]["id"]
    _, a_member = a.creators[0]
    async with client(a.owner) as api:
        for gid in (b_group, str(uuid.uuid4())):
            out = (await api('mutation($g: ID!) { renameBillingGroup(input: {groupId: $g, name: "x"}) '
                             '{ __typename } }', g=gid))["renameBillingGroup"]
            assert out["__typename"] == "NotFoundError"
            out = (await api(ASSIGN, m=a_member, g=gid))["assignBillingGroup"]
            assert out == {"__typename": "NotFoundError", "code": "NOT_FOUND"}
            out = (await api(SET_LIMIT, ws=a.ws, scope="GROUP", period="DAY", amount="1", action="BLOCK",
                             group=gid))["setSpendLimit"]
            assert out["__typename"] == "NotFoundError"
        out = (await api(ASSIGN, m=b_member, g=None))["assignBillingGroup"]
        assert out["__typename"] == "NotFoundError"
        for lid in (b_limit, str(uuid.uuid4())):
            out = (await api('mutation($l: ID!) { removeSpendLimit(input: {limitId: $l}) { __typename } }',
                             l=lid))["removeSpendLimit"]
            assert out["__typename"] == "NotFoundError"
        for rid in (b_req, str(uuid.uuid4())):
            out = (await api(DECIDE, id=rid, approve=False, reason="no"))["decideOverage"]
            assert out["__typename"] == "NotFoundError"


# --- period close ----------------------------------------------------------------------------------

async def test_reserving_part_of_an_allowance_for_a_group_does_not_multiply_the_rollover_cap(world):
    owner, ws, _ = await reserved_for_a_group(world, "50", rolloverCapCredits="30")
    report = await world.tick(month(1))
    [closed] = closes_of(report, ws)
    await clean(world, ws)
    assert closed.rolled_over_units == 30_000  # the plan's cap: at most 30 credits roll over


async def test_a_group_reserved_allowance_rolls_over_inside_the_group(world):
    owner, ws, _ = await reserved_for_a_group(world, "100", rolloverCapPercent=100)
    await world.tick(month(1))
    await clean(world, ws)
    b = await p_balance(world, owner, ws)
    rolled = [g for g in b["grants"] if g["source"] == "ROLLOVER"]
    assert [g["scope"] for g in rolled] == ["GROUP"]  # the reservation is not silently undone


# --- limit usage follows settlement (passes) --------------------------------------------------------

async def test_limit_usage_equals_what_settled_generations_kept(db, client):
    from tests.test_api_ledger import COMPLETE

    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="100", action="BLOCK", member=member)
    above, fee = await start(client, token, team.ws), await start(client, token, team.ws)  # 10 held each
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=above["id"], key=key(), cost="15"))["completeGeneration"]
        assert (done["captured"], done["shortfall"]) == ("15.000", "0.000")
        failed = (await api(FAIL, g=fee["id"], key=key(), kind="POLICY_VIOLATION"))["failGeneration"]
        assert failed["captured"] == "1.000"
    async with client(team.owner) as api:
        assert (await api(LIMITS, ws=team.ws))["spendLimits"][0]["used"] == "16.000"


async def test_many_admins_setting_the_same_new_limit_at_once_all_get_one_limit(db, client):
    # Nothing to lock while the target has no limit yet: without a lock on the workspace, the
    # concurrent setters all insert and all but one fail on the unique index (INTERNAL).
    import asyncio

    from domain import identity
    from domain.access import Caller
    from domain.governance import limits
    from domain.governance.models import LimitAction, LimitPeriod, LimitScope
    from policies import Authorizer

    team = await make_team(db, client, creators=1)
    caller = Caller(await identity.authenticate_secret(db, team.owner), Authorizer())
    for _ in range(5):
        outs = await asyncio.gather(*(limits.set_spend_limit(
            db, caller, workspace_id=team.ws, scope=LimitScope.WORKSPACE, period=LimitPeriod.DAY, amount=str(10 + i),
            action=LimitAction.BLOCK) for i in range(8)), return_exceptions=True)
        assert [type(o).__name__ + ": " + str(o)[:120] for o in outs if isinstance(o, BaseException)] == []
        async with client(team.owner) as api:
            [only] = (await api(LIMITS, ws=team.ws))["spendLimits"]
            # One limit, changed in place by every caller after the first.
            assert {str(o.id) for o in outs} == {only["id"]}
            await api('mutation($l: ID!) { removeSpendLimit(input: {limitId: $l}) { __typename } }', l=only["id"])


# --- overage requests that lapse ---------------------------------------------------------------------

async def _pending_request(db, client, period: str) -> tuple:
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period=period, amount="10", action="REQUIRE_APPROVAL",
                  member=member)
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="20", reason="more"))["requestOverage"]
    assert req["status"] == "PENDING"
    async with client(team.owner) as api:
        period_end = datetime.fromisoformat((await api(LIMITS_FULL, ws=team.ws))["spendLimits"][0]["periodEnd"])
        opened = [a for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["kind"] == "OVERAGE_REQUESTED"]
    assert [(a["subject"], a["status"]) for a in opened] == [(req["id"], "OPEN")]
    return team, req, period_end


async def _after_a_tick_at(db, live_server, client, team, offset: timedelta) -> tuple[list, list]:
    try:
        live_server.clock.offset = offset
        await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
        async with client(team.owner) as api:
            requests = (await api('query($ws: ID!) { overageRequests(workspaceId: $ws) { id status } }',
                                  ws=team.ws))["overageRequests"]
            alerts = [a for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["kind"] == "OVERAGE_REQUESTED"]
    finally:
        live_server.clock.offset = timedelta(0)
    return requests, alerts


async def _lapses_told(client, team, req) -> tuple[list, list]:
    """The audit log's lapse entries, and the requester's notifications of the request."""
    async with client(team.owner) as api:
        entries = [e["node"] for e in (await api(AUDIT, ws=team.ws, action="overage.lapsed"))["auditLog"]["edges"]]
    async with client(team.creators[0][0]) as api:
        told = [n["payload"]["status"] for n in (await api("{ notifications { kind payload } }"))["notifications"]
                if n["kind"] == "OVERAGE_DECIDED" and n["payload"]["requestId"] == req["id"]]
    return entries, told


async def test_the_overage_requested_alert_resolves_when_the_request_lapses(db, live_server, client):
    team, req, _ = await _pending_request(db, client, "MONTH")
    requests, alerts = await _after_a_tick_at(db, live_server, client, team, timedelta(hours=25))  # TTL: 24 h
    assert [(r["id"], r["status"]) for r in requests] == [(req["id"], "LAPSED")]
    # Nothing is left for an approver to decide: an open alert would call them to a dead request.
    assert [(a["subject"], a["status"]) for a in alerts] == [(req["id"], "RESOLVED")]
    # Recorded as the change it is, by nobody, and the requester is told as of a decision.
    entries, told = await _lapses_told(client, team, req)
    assert entries == [{"action": "overage.lapsed", "actorId": None, "targetType": "overage_request",
                        "before": {"status": "PENDING"}, "after": {"status": "LAPSED"}}]
    assert told == ["LAPSED"]


async def test_a_request_lapses_with_its_period_before_its_deadline_and_its_alert_resolves(
        db, live_server, client):
    team, req, period_end = await _pending_request(db, client, "DAY")
    # The next day starts before the 24 h deadline: the request can raise nothing any more.
    requests, alerts = await _after_a_tick_at(db, live_server, client, team,
                                              period_end - live_server.clock.now() + timedelta(minutes=1))
    assert [(r["id"], r["status"]) for r in requests] == [(req["id"], "LAPSED")]
    assert [(a["subject"], a["status"]) for a in alerts] == [(req["id"], "RESOLVED")]


# --- bad input on an overage request ------------------------------------------------------------------

REQUEST_FOR = ('mutation($ws: ID!, $m: String) { requestOverage(input: {workspaceId: $ws, amount: "10", reason: "x", '
               'modelKey: $m}) { __typename ... on ValidationError { code field message } } }')


@pytest.mark.parametrize("model_key, message", [
    ("m" * 101, "modelKey: must be 1 to 100 characters"),  # the column is varchar(100): was INTERNAL
    ("  ", "modelKey: must be 1 to 100 characters"),
    ("no-such-model", "modelKey: unknown or retired model 'no-such-model'"),
])
async def test_a_bad_model_key_on_an_overage_request_is_a_validation_error_and_records_nothing(
        db, client, model_key, message):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="5", action="REQUIRE_APPROVAL",
                  member=member)
    async with client(token) as api:
        out = (await api(REQUEST_FOR, ws=team.ws, m=model_key))["requestOverage"]
        assert out == {"__typename": "ValidationError", "code": "VALIDATION", "field": "modelKey", "message": message}
        assert (await api("query($ws: ID!) { overageRequests(workspaceId: $ws) { id } }",
                          ws=team.ws))["overageRequests"] == []
        # A known model, padded, is fine and stored as the catalog spells it.
        ok = (await api(REQUEST_FOR.replace("field message }", "field message } ... on OverageRequest { modelKey }"),
                        ws=team.ws, m=" video-standard "))["requestOverage"]
    assert ok == {"__typename": "OverageRequest", "modelKey": "video-standard"}


# --- a decision that finds a request lapsed records the lapse ------------------------------------

OVERAGES = "query($ws: ID!, $s: OverageStatus) { overageRequests(workspaceId: $ws, status: $s) { id status } }"


async def _statuses(client, token, ws, status=None) -> list[tuple[str, str]]:
    async with client(token) as api:
        return [(r["id"], r["status"]) for r in (await api(OVERAGES, ws=ws, s=status))["overageRequests"]]


async def _overage_alerts(client, team) -> list[tuple[str, str]]:
    async with client(team.owner) as api:
        return [(a["subject"], a["status"]) for a in (await api(ALERTS, ws=team.ws))["alerts"]
                if a["kind"] == "OVERAGE_REQUESTED"]


async def test_a_decision_that_finds_the_request_lapsed_records_the_lapse(db, live_server, client):
    # The refusal used to be raised inside the transaction that marked the request LAPSED, so the
    # mark rolled back with it: only the scheduler ever recorded a lapse, and until it ran the
    # approvers' alert stayed open on a request nobody could decide.
    team, req, _ = await _pending_request(db, client, "MONTH")
    try:
        live_server.clock.offset = timedelta(hours=25)  # past the 24 h deadline; no tick runs
        async with client(team.owner) as api:
            out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
    finally:
        live_server.clock.offset = timedelta(0)
    assert out == {"__typename": "OverageNotPending", "code": "OVERAGE_NOT_PENDING",
                   "message": "the request is lapsed, no longer pending"}
    # Back at a time before the deadline: only a recorded lapse still reads LAPSED now.
    assert await _statuses(client, team.owner, team.ws) == [(req["id"], "LAPSED")]
    assert await _statuses(client, team.owner, team.ws, "PENDING") == []
    assert await _overage_alerts(client, team) == [(req["id"], "RESOLVED")]
    async with client(team.owner) as api:  # and a second decision hears the same, changing nothing
        again = (await api(DECIDE, id=req["id"], approve=False, reason="late"))["decideOverage"]
    assert again["__typename"] == "OverageNotPending"


# --- a removed member's pending request ----------------------------------------------------------

REMOVE = "mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }"


async def test_removing_a_member_lapses_their_pending_request_and_it_can_no_longer_be_approved(
        db, live_server, client):
    team, req, _ = await _pending_request(db, client, "MONTH")
    _, member = team.creators[0]
    async with client(team.owner) as api:
        assert (await api(REMOVE, m=member))["removeMember"]["__typename"] == "Member"
    # Nothing is left for an approver to decide: the request lapsed with the removal, its alert too.
    assert await _statuses(client, team.owner, team.ws) == [(req["id"], "LAPSED")]
    assert await _overage_alerts(client, team) == [(req["id"], "RESOLVED")]
    async with client(team.owner) as api:
        out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
        assert out == {"__typename": "OverageNotPending", "code": "OVERAGE_NOT_PENDING",
                       "message": "the request is lapsed, no longer pending: its requester has left the workspace"}
        [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
    assert limit["allowance"] == "10.000"  # nothing was approved
    assert await _statuses(client, team.owner, team.ws) == [(req["id"], "LAPSED")]
    # Audited with no actor (the removal's own entry names who removed them); the requester has
    # left, so nothing is stored for them to read.
    entries, told = await _lapses_told(client, team, req)
    assert [(e["actorId"], e["after"]) for e in entries] == [(None, {"status": "LAPSED"})]
    assert told == []


async def test_a_request_still_pending_after_its_requester_left_is_refused_and_lapses(db, live_server, client):
    # A request made while the removal committed (it read the membership before) or left from
    # before removals lapsed requests: still PENDING in the table, its requester gone.
    team, req, _ = await _pending_request(db, client, "MONTH")
    _, member = team.creators[0]
    await db.fetchrow("UPDATE members SET removed_at = now() WHERE id = $1", uuid.UUID(member))
    async with client(team.owner) as api:
        out = (await api(DECIDE, id=req["id"], approve=True))["decideOverage"]
        [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
    assert (out["__typename"], out["message"]) == (
        "OverageNotPending", "the request is lapsed, no longer pending: its requester has left the workspace")
    assert limit["allowance"] == "10.000"
    assert await _statuses(client, team.owner, team.ws) == [(req["id"], "LAPSED")]
    assert await _overage_alerts(client, team) == [(req["id"], "RESOLVED")]


# --- a request whose period has ended is not listed as pending ------------------------------------

async def test_a_request_whose_period_ended_is_listed_as_lapsed_before_any_tick(db, live_server, client):
    # Only the 24 h deadline was read: until the next tick, a request of yesterday's DAY limit
    # (which nothing can approve any more) was still offered to the approvers as PENDING.
    team, req, period_end = await _pending_request(db, client, "DAY")
    token, _ = team.creators[0]
    try:
        live_server.clock.offset = period_end - live_server.clock.now() + timedelta(minutes=1)  # before 24 h
        for who in (team.owner, token):  # the approver's list and the requester's own
            assert await _statuses(client, who, team.ws, "PENDING") == []
            assert await _statuses(client, who, team.ws, "LAPSED") == [(req["id"], "LAPSED")]
            assert await _statuses(client, who, team.ws) == [(req["id"], "LAPSED")]
    finally:
        live_server.clock.offset = timedelta(0)
    # Shown, not written: back inside the period it is pending again (nothing recorded a lapse).
    assert await _statuses(client, team.owner, team.ws, "PENDING") == [(req["id"], "PENDING")]


async def test_a_lapse_by_the_scheduler_reaches_the_requesters_stream(world):
    # The scheduler runs beside the server (`creditpool tick`): its lapses reach the server's
    # subscribers through NOTIFY, as the decision that would have come instead.
    import asyncio

    from tests.conftest import new_user, ws_client
    from tests.test_api_ledger import ADD

    owner, ws = await workspace(world, await plan(world))
    email, token = await new_user(world.db, prefix="creator")
    async with world.client(owner) as api:
        member = (await api(ADD, ws=ws, email=email, role="MEMBER", seat="CREATOR"))["addMember"]["id"]
        await api(SET_LIMIT, ws=ws, scope="MEMBER", period="MONTH", amount="10", action="REQUIRE_APPROVAL",
                  member=member)
    async with world.client(token) as api:
        req = (await api(REQUEST, ws=ws, amount="20", reason="more"))["requestOverage"]
    async with ws_client(world.server, token) as live:
        stream = live.subscribe("subscription($ws: ID!) { workspaceEvents(workspaceId: $ws) { kind payload } }",
                                ws=ws)
        first = asyncio.ensure_future(asyncio.wait_for(stream.__anext__(), 10))
        await asyncio.sleep(0.3)
        assert (await world.tick(timedelta(hours=25))).overages_lapsed >= 1  # the 24 h deadline
        seen = [(await first)["workspaceEvents"]]
        while seen[-1]["kind"] != "OVERAGE_DECIDED":
            seen.append((await asyncio.wait_for(stream.__anext__(), 5))["workspaceEvents"])
        await stream.aclose()
    assert seen[-1]["payload"] == {"requestId": req["id"], "memberId": member, "status": "LAPSED"}


async def test_a_capture_above_the_hold_that_reaches_a_limit_raises_its_alerts(db, live_server, client):
    # A member's only generation holds 10 of a 20 limit (50 %: no alert); the worker reports it cost
    # 20. The period has now used all of the limit, and the member's next start is refused, which
    # evaluates no alert: unless the completion does, the owner never hears of it, not even after
    # the scheduler's refresh (which only resolves limit alerts).
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="BLOCK", member=member)
    gen = await start(client, token, team.ws)
    async with client(team.owner) as api:
        assert [a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["status"] == "OPEN"] == []
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="20"))["completeGeneration"]
    assert (done["captured"], done["shortfall"]) == ("20.000", "0.000")
    assert (await start(client, token, team.ws))["__typename"] == "SpendLimitExceeded"
    await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
    async with client(team.owner) as api:
        assert (await api(LIMITS, ws=team.ws))["spendLimits"][0]["used"] == "20.000"
        opened = sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["status"] == "OPEN")
    assert opened == ["LIMIT_100", "LIMIT_80"]
