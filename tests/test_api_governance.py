"""Governance through gql: spend limits (atomic with the hold), overage requests and approvals,
billing groups, notifications and the audit log."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from gql.transport.exceptions import TransportQueryError

from tests.test_api_ledger import ADD, COMPLETE, START, TRANSFER, assert_ledger_clean, balance, grant, key, make_team

SET_LIMIT = """
mutation($ws: ID!, $scope: LimitScope!, $period: LimitPeriod!, $amount: String!, $action: LimitAction!,
         $member: ID, $group: ID) {
  setSpendLimit(input: {workspaceId: $ws, scope: $scope, period: $period, amount: $amount, action: $action,
                        memberId: $member, billingGroupId: $group}) {
    __typename ... on SpendLimit { id scope amount action } ... on Error { code message }
  }
}"""
LIMITS = "query($ws: ID!) { spendLimits(workspaceId: $ws) { id scope period amount used allowance } }"
REQUEST = """
mutation($ws: ID!, $amount: String!, $reason: String!) {
  requestOverage(input: {workspaceId: $ws, amount: $amount, reason: $reason, modelKey: "video-standard"}) {
    __typename ... on OverageRequest { id status amount limitId } ... on Error { code message }
  }
}"""
DECIDE = """
mutation($id: ID!, $approve: Boolean!, $amount: String, $reason: String) {
  decideOverage(input: {requestId: $id, approve: $approve, amount: $amount, reason: $reason}) {
    __typename ... on OverageRequest { status approved approvalExpiresAt } ... on Error { code message }
  }
}"""
AUDIT = """
query($ws: ID!, $action: String) {
  auditLog(workspaceId: $ws, action: $action) { edges { node { action actorId targetType before after } } }
}"""


async def start(client, token, ws, model="dalle-3"):
    async with client(token) as api:
        return (await api(START, ws=ws, model=model, key=key()))["startGeneration"]


async def test_many_starts_racing_one_member_limit_never_pass_it(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        out = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="45", action="BLOCK",
                         member=member))["setSpendLimit"]
    assert out["__typename"] == "SpendLimit"
    results = await asyncio.gather(*(start(client, token, team.ws) for _ in range(20)))  # 10 credits each
    started = [r for r in results if r["__typename"] == "Generation"]
    refused = [r for r in results if r["__typename"] == "SpendLimitExceeded"]
    assert (len(started), len(refused)) == (4, 16)
    assert {(r["code"], r["__typename"]) for r in refused} == {("SPEND_LIMIT_EXCEEDED", "SpendLimitExceeded")}
    b = await balance(client, team.owner, team.ws)
    assert b["held"] == "40.000"  # the sum of holds never passes the limit
    async with client(team.owner) as api:
        [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
    assert (limit["used"], limit["allowance"]) == ("40.000", "45.000")
    # Released credits stop counting: a completion below the hold frees limit room.
    async with client(team.worker) as api:
        await api(COMPLETE, g=started[0]["id"], key=key(), cost="1")
    async with client(team.owner) as api:
        assert (await api(LIMITS, ws=team.ws))["spendLimits"][0]["used"] == "31.000"
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    await assert_ledger_clean(db, team.ws)


async def test_an_overage_approval_lets_exactly_the_approved_amount_through(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="REQUIRE_APPROVAL",
                  member=member)
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    assert (await start(client, token, team.ws))["__typename"] == "Generation"
    blocked = await start(client, token, team.ws)
    assert blocked["__typename"] == "SpendLimitExceeded"
    assert (blocked["used"], blocked["limit"], blocked["canRequestOverage"]) == ("20.000", "20.000", True)
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="client deadline"))["requestOverage"]
    assert req["__typename"] == "OverageRequest" and req["status"] == "PENDING"
    async with client(token) as api:  # nobody approves their own request (members cannot approve at all)
        with pytest.raises(TransportQueryError):
            await api(DECIDE, id=req["id"], approve=True)
    async with client(team.owner) as api:
        ok = (await api(DECIDE, id=req["id"], approve=True, amount="25"))["decideOverage"]
        assert (ok["status"], ok["approved"]) == ("APPROVED", "25.000")
        again = (await api(DECIDE, id=req["id"], approve=False, reason="changed my mind"))["decideOverage"]
        assert again["__typename"] == "OverageNotPending"
    # 20 + 25 = 45 allowed this month: 20 used, so exactly two more 10-credit generations fit.
    kinds = [(await start(client, token, team.ws))["__typename"] for _ in range(3)]
    assert kinds == ["Generation", "Generation", "SpendLimitExceeded"]
    async with client(token) as api:
        mine = (await api("{ notifications { kind payload } }"))["notifications"]
    assert mine[0]["kind"] == "OVERAGE_DECIDED" and mine[0]["payload"]["status"] == "APPROVED"
    async with client(team.owner) as api:
        theirs = (await api("{ notifications(unreadOnly: true) { kind } }"))["notifications"]
        assert "OVERAGE_REQUESTED" in {n["kind"] for n in theirs}
        assert await api("mutation { markNotificationsRead }") == {"markNotificationsRead": len(theirs)}
        steps = [e["node"]["action"] for e in (await api(AUDIT, ws=team.ws))["auditLog"]["edges"]]
    # Newest first: the whole story is there.
    assert steps[:3] == ["overage.approved", "overage.requested", "limit.set"]
    await assert_ledger_clean(db, team.ws)


async def test_an_owner_who_requests_an_overage_cannot_approve_it(db, client):
    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="DAY", amount="5", action="REQUIRE_APPROVAL")
        req = (await api(REQUEST, ws=team.ws, amount="10", reason="launch day"))["requestOverage"]
        with pytest.raises(TransportQueryError) as err:
            await api(DECIDE, id=req["id"], approve=True)
    assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    async with client(team.owner) as api:
        pending = (await api('query($ws: ID!) { overageRequests(workspaceId: $ws, status: PENDING) { id } }',
                             ws=team.ws))["overageRequests"]
    assert [p["id"] for p in pending] == [req["id"]]


async def test_a_blocking_limit_cannot_be_overridden_by_a_request(db, client):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="5", action="BLOCK", member=member)
    async with client(token) as api:
        out = (await api(REQUEST, ws=team.ws, amount="10", reason="please"))["requestOverage"]
    assert out["__typename"] == "NotFoundError"  # no limit that may be raised applies


async def test_a_group_members_spend_draws_the_groups_grants_first(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "100")
    (in_group, member), (outside, _) = team.creators
    async with client(team.owner) as api:
        group = (await api('mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "Client A"}) '
                           '{ ... on BillingGroup { id } } }', ws=team.ws))["createBillingGroup"]
        assigned = (await api('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
                              '{ ... on Member { billingGroupId } } }', m=member, g=group["id"]))
        assert assigned["assignBillingGroup"]["billingGroupId"] == group["id"]
        reserved = (await api(
            'mutation($ws: ID!, $g: ID!, $k: String!) { transferCredits(input: {workspaceId: $ws, amount: "30", '
            'idempotencyKey: $k, toBillingGroupId: $g}) { __typename ... on Transfer { toBillingGroupId '
            'grants { scope billingGroupId expiresAt } } } }', ws=team.ws, g=group["id"], k=key()))["transferCredits"]
    assert reserved["toBillingGroupId"] == group["id"] and reserved["grants"][0]["scope"] == "GROUP"
    gen = await start(client, in_group, team.ws)
    assert [h["grant"]["source"] for h in gen["holds"]] == ["PROMOTION"]
    async with client(team.owner) as api:
        b = (await api("query($ws: ID!) { balance(workspaceId: $ws) { scopes { scope available held } } }",
                       ws=team.ws))["balance"]
    by_scope = {s["scope"]: s for s in b["scopes"]}
    assert (by_scope["GROUP"]["held"], by_scope["WORKSPACE"]["held"]) == ("10.000", "0.000")
    other = await start(client, outside, team.ws)  # not in the group: the pool pays
    assert other["__typename"] == "Generation"
    async with client(team.owner) as api:
        released = (await api(
            'mutation($ws: ID!, $g: ID!, $k: String!) { transferCredits(input: {workspaceId: $ws, idempotencyKey: $k, '
            'fromBillingGroupId: $g}) { __typename ... on Transfer { credits } } }', ws=team.ws, g=group["id"],
            k=key()))["transferCredits"]
        assert released == {"__typename": "Transfer", "credits": "20.000"}  # the rest moves back to the pool
        steps = {e["node"]["action"] for e in (await api(AUDIT, ws=team.ws, action="group."))["auditLog"]["edges"]}
    assert steps == {"group.created"}
    await assert_ledger_clean(db, team.ws)


async def test_a_group_limit_caps_its_members_together(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "100")
    async with client(team.owner) as api:
        group = (await api('mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "Campaign"}) '
                           '{ ... on BillingGroup { id } } }', ws=team.ws))["createBillingGroup"]
        for _, m in team.creators:
            await api('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
                      '{ __typename } }', m=m, g=group["id"])
        out = (await api(SET_LIMIT, ws=team.ws, scope="GROUP", period="WEEK", amount="25", action="BLOCK",
                         group=group["id"]))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit"
    (a, _), (b, _) = team.creators
    kinds = [(await start(client, t, team.ws))["__typename"] for t in (a, b, a)]
    assert kinds == ["Generation", "Generation", "SpendLimitExceeded"]


async def test_members_cannot_set_limits_and_outsiders_learn_nothing(db, client):
    team = await make_team(db, client, creators=1)
    other = await make_team(db, client, creators=0)
    token, member = team.creators[0]
    async with client(token) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="DAY", amount="1", action="BLOCK")
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
        with pytest.raises(TransportQueryError):
            await api(AUDIT, ws=team.ws)  # members do not read the audit log
    async with client(other.owner) as api:
        out = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="DAY", amount="1", action="BLOCK"))
        assert out["setSpendLimit"]["__typename"] == "NotFoundError"
        assert (await api(AUDIT, ws=team.ws))["auditLog"] is None
        assert (await api(LIMITS, ws=team.ws))["spendLimits"] is None


async def test_the_audit_log_records_member_changes_with_before_and_after(db, client):
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        added = (await api(ADD, ws=team.ws, email=f"a-{key()}@example.test", role="MEMBER", seat="STANDARD"))
        member = added["addMember"]["id"]
        await api('mutation($m: ID!) { changeMemberRole(input: {memberId: $m, role: ADMIN}) { __typename } }', m=member)
        entries = [e["node"] for e in (await api(AUDIT, ws=team.ws, action="member."))["auditLog"]["edges"]]
    role_change = entries[0]
    assert role_change["action"] == "member.role_changed"
    assert (role_change["before"], role_change["after"]["role"]) == ({"role": "member"}, "admin")
    with pytest.raises(Exception, match="append-only"):
        from sqlalchemy import text

        async def rewrite(session):
            await session.execute(text("UPDATE audit_log SET action = 'x'"))

        await db.transaction(rewrite)


async def test_a_malformed_actor_id_is_refused_and_an_unknown_one_narrows_the_audit_log_to_nothing(db, client):
    # A malformed actorId was parsed as "actor not found", which the query answers as null: the
    # client was told it had lost sight of the workspace instead of that its input was bad.
    team, other = await make_team(db, client, creators=0), await make_team(db, client, creators=0)
    by_actor = """
    query($ws: ID!, $actor: ID) { auditLog(workspaceId: $ws, actorId: $actor) { edges { node { action actorId } } } }"""
    async with client(other.owner) as api:
        foreign_actor = (await api(by_actor, ws=other.ws))["auditLog"]["edges"][0]["node"]["actorId"]
    async with client(team.owner) as api:
        actor = (await api(by_actor, ws=team.ws))["auditLog"]["edges"][0]["node"]["actorId"]
        for bad in ("not-an-id", "", "9" * 40):
            with pytest.raises(TransportQueryError) as err:
                await api(by_actor, ws=team.ws, actor=bad)
            [error] = err.value.errors
            assert (error["extensions"]["code"], error["message"]) == ("VALIDATION", "actorId: not a well-formed id")
        mine = (await api(by_actor, ws=team.ws, actor=actor))["auditLog"]["edges"]
        assert mine and {e["node"]["actorId"] for e in mine} == {actor}
        # Well-formed but naming no actor here (another workspace's included): nothing, as before.
        for unknown in ("00000000-0000-0000-0000-000000000000", foreign_actor):
            assert (await api(by_actor, ws=team.ws, actor=unknown))["auditLog"]["edges"] == []


async def test_transfer_between_a_seat_and_a_group_is_refused_when_ambiguous(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    async with client(team.owner) as api:
        out = (await api(TRANSFER, ws=team.ws, amount="1", key=key(), **{"from": seat, "to": seat}))
    assert out["transferCredits"]["__typename"] == "ValidationError"


# --- auto top-up and alerts --------------------------------------------------------------------

AUTO = """
mutation($ws: ID!, $pack: ID!, $threshold: String!, $limit: Int!) {
  setAutoTopUp(input: {workspaceId: $ws, enabled: true, threshold: $threshold, packId: $pack,
                       monthlyMaxPurchases: 5, monthlyMaxCredits: "5000", failureLimit: $limit}) {
    __typename ... on AutoTopUp { enabled threshold } ... on Error { code message }
  }
}"""
ALERTS = "query($ws: ID!) { alerts(workspaceId: $ws) { kind subject status } }"


async def purchases_of(db, ws: str) -> int:
    from sqlalchemy import text

    async def work(session):
        return (await session.execute(text("SELECT count(*) FROM purchases WHERE workspace_id = CAST(:ws AS uuid)"),
                                      {"ws": ws})).scalar_one()

    return await db.read(work)


async def test_one_auto_top_up_per_crossing_under_20_concurrent_spends(db, live_server, client):
    from tests.test_api_ledger import _a_pack

    team = await make_team(db, client, creators=4)
    await grant(client, team, "100")
    pack = await _a_pack(client, team.operator)  # 500 credits
    async with client(team.owner) as api:
        out = (await api(AUTO, ws=team.ws, pack=pack, threshold="50", limit=3))["setAutoTopUp"]
    assert out == {"__typename": "AutoTopUp", "enabled": True, "threshold": "50.000"}
    seen_before = len(live_server.payments.seen)
    results = await asyncio.gather(*(start(client, team.creators[i % 4][0], team.ws) for i in range(20)))
    assert {r["__typename"] for r in results} <= {"Generation", "InsufficientCredits"}
    assert await purchases_of(db, team.ws) == 1
    assert len(live_server.payments.seen) - seen_before == 1
    assert live_server.payments.seen[-1].reference.startswith("auto-topup:")
    async with client(team.owner) as api:
        kinds = [a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"]]
        state = (await api("query($ws: ID!) { autoTopUp(workspaceId: $ws) { purchasesThisMonth creditsThisMonth } }",
                           ws=team.ws))["autoTopUp"]
    assert kinds.count("TOPUP_DONE") == 1
    assert state == {"purchasesThisMonth": 1, "creditsThisMonth": "500.000"}
    await assert_ledger_clean(db, team.ws)


async def under_auto_top_up(db, client):
    """A one-creator team with 100 credits and auto top-up at a threshold of 95 (three failures
    turn it off): every spend leaves it under the threshold. Returns the team and the creator."""
    from tests.test_api_ledger import _a_pack

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    pack = await _a_pack(client, team.operator)
    async with client(team.owner) as api:
        await api(AUTO, ws=team.ws, pack=pack, threshold="95", limit=3)
    token, _ = team.creators[0]
    return team, token


async def test_repeated_payment_failures_turn_auto_top_up_off(db, live_server, client):
    team, token = await under_auto_top_up(db, client)
    live_server.payments.failures = 10
    try:
        seen = len(live_server.payments.seen)
        for _ in range(4):  # every spend stays under the threshold: three tries, then it is off
            assert (await start(client, token, team.ws))["__typename"] == "Generation"
        attempts = len(live_server.payments.seen) - seen
    finally:
        live_server.payments.failures = 0
    assert attempts == 3
    assert await purchases_of(db, team.ws) == 0
    async with client(team.owner) as api:
        state = (await api("query($ws: ID!) { autoTopUp(workspaceId: $ws) { enabled consecutiveFailures } }",
                           ws=team.ws))["autoTopUp"]
        open_kinds = sorted(a["kind"] for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["status"] == "OPEN")
    assert state == {"enabled": False, "consecutiveFailures": 3}
    assert open_kinds == ["TOPUP_DISABLED", "TOPUP_FAILED"]  # each fired once, however many failures


TOPUP_STATE = """query($ws: ID!) {
  autoTopUp(workspaceId: $ws) { enabled consecutiveFailures purchasesThisMonth }
  alerts(workspaceId: $ws) { kind status }
}"""


async def start_unanswered(live_server, client, token: str, ws: str) -> None:
    """A start whose auto top-up payment gets no answer from the provider."""
    live_server.payments.unanswered = 1
    try:
        # The hold committed before the provider was asked: the start's answer is its generation.
        assert (await start(client, token, ws))["__typename"] == "Generation"
    finally:
        live_server.payments.unanswered = 0


async def test_a_payment_provider_that_does_not_answer_is_a_failed_attempt_retried_under_the_same_reference(
        db, live_server, client):
    # The provider may have taken a payment it never confirmed: asking again under a new
    # reference could charge twice, asking under the same one cannot.
    team, token = await under_auto_top_up(db, client)
    seen = len(live_server.payments.seen)
    await start_unanswered(live_server, client, token, team.ws)
    async with client(team.owner) as api:
        out = await api(TOPUP_STATE, ws=team.ws)
    assert out["autoTopUp"] == {"enabled": True, "consecutiveFailures": 1, "purchasesThisMonth": 0}
    assert {"kind": "TOPUP_FAILED", "status": "OPEN"} in out["alerts"]
    assert await purchases_of(db, team.ws) == 0

    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # still under: tries again
    first, again = live_server.payments.seen[seen:]
    assert again.reference == first.reference
    assert await purchases_of(db, team.ws) == 1
    async with client(team.owner) as api:
        out = await api(TOPUP_STATE, ws=team.ws)
    assert out["autoTopUp"] == {"enabled": True, "consecutiveFailures": 0, "purchasesThisMonth": 1}
    assert {"kind": "TOPUP_FAILED", "status": "OPEN"} not in out["alerts"]
    await assert_ledger_clean(db, team.ws)


async def test_a_start_answers_with_its_generation_when_the_alerts_and_top_up_after_it_fail(
        db, client, database_url, caplog):
    # After the hold commits, alerts and auto top-up run on the ORM pool. Here that pool's only
    # connection is taken, so they fail (UNAVAILABLE); the start's answer is still its generation,
    # and the next spend evaluates from the same state and buys the pack.
    from domain import identity
    from domain.access import Caller
    from domain.ledger import service
    from domain.ledger.models import GenerationStatus
    from domain.ledger.payments import ScriptedProvider
    from policies import Authorizer
    from tests.conftest import orm_pool_taken

    team, token = await under_auto_top_up(db, client)
    caller = Caller(await identity.authenticate_secret(db, token), Authorizer())
    provider = ScriptedProvider()
    async with orm_pool_taken(database_url) as (tiny, release):
        def a_start():
            return service.start_generation(tiny, caller, workspace_id=team.ws, model_key="dalle-3",
                                            idempotency_key=key(), payments=provider,
                                            hold_ttl=timedelta(hours=1))

        with caplog.at_level("ERROR", logger="creditpool.automation"):
            started = await a_start()
        assert started.generation.status is GenerationStatus.STARTED
        assert "alerts and auto top-up after a spend" in caplog.text
        assert provider.seen == [] and await purchases_of(db, team.ws) == 0
        await release()
        assert (await a_start()).generation.status is GenerationStatus.STARTED
    assert len(provider.seen) == 1 and await purchases_of(db, team.ws) == 1
    await assert_ledger_clean(db, team.ws)


async def test_only_owners_and_billing_managers_set_auto_top_up(db, client):
    from tests.test_api_ledger import _a_pack

    team = await make_team(db, client, creators=1)
    pack = await _a_pack(client, team.operator)
    token, _ = team.creators[0]
    async with client(token) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(AUTO, ws=team.ws, pack=pack, threshold="1", limit=3)
    assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"


async def test_alerts_fire_once_per_crossing_and_resolve_when_the_condition_clears(db, live_server, client):
    from datetime import timedelta

    from domain.periods.service import tick

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api('mutation($ws: ID!) { setAlertSettings(input: {workspaceId: $ws, lowBalanceThreshold: "75"}) '
                  '{ __typename } }', ws=team.ws)
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="50", action="BLOCK", member=member)
    for _ in range(4):  # 100 -> 60 available: under 75 after the third; 80% of the limit at 40
        await start(client, token, team.ws)
    async with client(team.owner) as api:
        opened = [(a["kind"], a["status"]) for a in (await api(ALERTS, ws=team.ws))["alerts"]]
    assert sorted(opened) == [("LIMIT_80", "OPEN"), ("LOW_BALANCE", "OPEN")]
    await grant(client, team, "100")  # back above the threshold
    await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
    async with client(team.owner) as api:
        alerts = (await api(ALERTS, ws=team.ws))["alerts"]
    low = [a["status"] for a in alerts if a["kind"] == "LOW_BALANCE"]
    assert low == ["RESOLVED"]
    async with client(team.owner) as api:
        await api('mutation($ws: ID!) { setAlertSettings(input: {workspaceId: $ws, lowBalanceThreshold: "500"}) '
                  '{ __typename } }', ws=team.ws)
    await start(client, token, team.ws)  # a second crossing opens a second alert
    async with client(team.owner) as api:
        alerts = (await api("query($ws: ID!) { alerts(workspaceId: $ws) { id kind status acknowledgedAt } }",
                            ws=team.ws))["alerts"]
        low = sorted(a["status"] for a in alerts if a["kind"] == "LOW_BALANCE")
        assert low == ["OPEN", "RESOLVED"]
        newest = [a for a in alerts if a["kind"] == "LOW_BALANCE" and a["status"] == "OPEN"][0]
        acked = (await api("mutation($id: ID!) { acknowledgeAlert(input: {alertId: $id}) "
                           "{ ... on Alert { status acknowledgedAt } } }", id=newest["id"]))["acknowledgeAlert"]
    assert acked["status"] == "OPEN" and acked["acknowledgedAt"] is not None  # seen, not cleared


async def test_credits_expiring_soon_raise_an_alert_until_they_expire(db, live_server, client):
    from datetime import UTC, datetime, timedelta

    from domain.periods.service import tick

    team = await make_team(db, client, creators=0)
    soon = datetime.now(UTC) + timedelta(days=3)
    promo = await grant(client, team, "40", expires=soon)
    await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
    async with client(team.owner) as api:
        alerts = [a for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["kind"] == "GRANT_EXPIRING"]
    assert [(a["subject"], a["status"]) for a in alerts] == [(promo["id"], "OPEN")]
    await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))  # still once
    try:
        live_server.clock.offset = timedelta(days=4)
        await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
    finally:
        live_server.clock.offset = timedelta(0)
    async with client(team.owner) as api:
        alerts = [a for a in (await api(ALERTS, ws=team.ws))["alerts"] if a["kind"] == "GRANT_EXPIRING"]
    assert [a["status"] for a in alerts] == ["RESOLVED"]
