"""The credit ledger through the real gql client: purchases, grants, holds, settlement,
allocation modes, idempotency, expiry at spend time, isolation between workspaces."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from gql.transport.exceptions import TransportQueryError
from sqlalchemy import text

from domain.ledger.invariants import check_ledger
from tests.conftest import new_service_token, new_user

START = """
mutation($ws: ID!, $model: String!, $key: String!, $params: JSON, $for: ID) {
  startGeneration(input: {workspaceId: $ws, modelKey: $model, idempotencyKey: $key, parameters: $params,
                          onBehalfOfMemberId: $for}) {
    __typename
    ... on Generation { id status cost memberId holds { held grant { id source expiresAt } } }
    ... on InsufficientCredits { needed available code }
    ... on SpendLimitExceeded { used limit canRequestOverage }
    ... on Error { message code }
  }
}"""
COMPLETE = """
mutation($g: ID!, $key: String!, $cost: String) {
  completeGeneration(input: {generationId: $g, idempotencyKey: $key, actualCost: $cost}) {
    __typename
    ... on Generation { id status cost captured released shortfall
                        holds { held captured released grant { id remaining expiresAt } } }
    ... on Error { message code }
  }
}"""
FAIL = """
mutation($g: ID!, $key: String!, $kind: FailureKind!) {
  failGeneration(input: {generationId: $g, idempotencyKey: $key, kind: $kind}) {
    __typename
    ... on Generation { id status failureKind captured released
                        holds { held captured released grant { id remaining expiresAt } } }
    ... on Error { message code }
  }
}"""
GRANT = """
mutation($ws: ID!, $amount: String!, $key: String!, $source: GrantSource!, $member: ID, $expires: DateTime,
         $effective: DateTime, $priority: Int!) {
  grantCredits(input: {workspaceId: $ws, amount: $amount, source: $source, reason: "test", idempotencyKey: $key,
                       memberId: $member, expiresAt: $expires, effectiveAt: $effective, priority: $priority}) {
    __typename
    ... on Grant { id amount remaining scope source expiresAt effectiveAt }
    ... on Error { message code }
  }
}"""
BALANCE = """
query($ws: ID!) {
  balance(workspaceId: $ws) {
    available held viewerSpendable
    scopes { scope memberId available held }
    grants { id scope memberId source amount remaining held captured expired transferredOut expiresAt effectiveAt priority }
  }
}"""
PURCHASE = """
mutation($ws: ID!, $pack: ID!, $ref: String!, $key: String!) {
  purchaseCredits(input: {workspaceId: $ws, packId: $pack, paymentReference: $ref, idempotencyKey: $key}) {
    __typename
    ... on Purchase { id credits paymentReference grant { id amount expiresAt source } }
    ... on Error { message code }
  }
}"""
TRANSFER = """
mutation($ws: ID!, $amount: String!, $key: String!, $from: ID, $to: ID) {
  transferCredits(input: {workspaceId: $ws, amount: $amount, idempotencyKey: $key, fromMemberId: $from, toMemberId: $to}) {
    __typename
    ... on Transfer { id credits fromMemberId toMemberId grants { id scope memberId amount expiresAt source parentGrantId } }
    ... on InsufficientCredits { needed available }
    ... on Error { message code }
  }
}"""
ADD = """
mutation($ws: ID!, $email: String!, $role: Role!, $seat: Seat!) {
  addMember(input: {workspaceId: $ws, email: $email, role: $role, seat: $seat}) { ... on Member { id } }
}"""


def key() -> str:
    return f"k-{uuid.uuid4().hex}"


@dataclass
class Team:
    ws: str
    owner: str
    owner_member: str
    operator: str
    worker: str
    creators: list[tuple[str, str]]  # (token, member id)
    standard: tuple[str, str]


async def make_team(db, client, *, mode: str = "POOLED", creators: int = 2, plan: str = "enterprise") -> Team:
    """A workspace with an owner (creator seat), `creators` creator members and a standard seat."""
    _, owner = await new_user(db)
    _, operator = await new_user(db, operator=True)
    worker = await new_service_token(db)
    async with client(owner) as api:
        ws = (await api(
            'mutation($plan: String!, $mode: AllocationMode!) { createWorkspace(input: {name: "Team", planKey: $plan, '
            'allocationMode: $mode}) { ... on Workspace { id members { id } } } }', plan=plan, mode=mode,
        ))["createWorkspace"]
        members = []
        for _ in range(creators):
            email, token = await new_user(db, prefix="creator")
            m = (await api(ADD, ws=ws["id"], email=email, role="MEMBER", seat="CREATOR"))["addMember"]
            members.append((token, m["id"]))
        email, token = await new_user(db, prefix="standard")
        standard = (token, (await api(ADD, ws=ws["id"], email=email, role="MEMBER", seat="STANDARD"))["addMember"]["id"])
    return Team(ws["id"], owner, ws["members"][0]["id"], operator, worker, members, standard)


async def grant(client, team: Team, amount: str, *, member: str | None = None, source: str = "PROMOTION",
                expires: datetime | None = None, effective: datetime | None = None, priority: int = 100) -> dict:
    async with client(team.operator) as api:
        out = (await api(GRANT, ws=team.ws, amount=amount, key=key(), source=source, member=member,
                         expires=expires.isoformat() if expires else None,
                         effective=effective.isoformat() if effective else None, priority=priority))["grantCredits"]
    assert out["__typename"] == "Grant", out
    return out


async def balance(client, token: str, ws: str) -> dict:
    async with client(token) as api:
        return (await api(BALANCE, ws=ws))["balance"]


async def assert_ledger_clean(db, ws: str) -> None:
    assert await check_ledger(db, uuid.UUID(ws)) == []


# --- the tests the issue names ------------------------------------------------------------------

async def test_fifty_concurrent_starts_on_a_pool_three_times_oversubscribed(db, client):
    team = await make_team(db, client, creators=5)
    await grant(client, team, "100")
    # test-six costs 6 credits (tests/conftest.py): 50 x 6 = 300 = 3x the pool.

    async def one(i: int):
        token, _ = team.creators[i % len(team.creators)]
        async with client(token) as api:
            return (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]

    results = await asyncio.gather(*(one(i) for i in range(50)))
    started = [r for r in results if r["__typename"] == "Generation"]
    assert not [r for r in results if r["__typename"] not in ("Generation", "InsufficientCredits")], results[:2]
    refused = [r for r in results if r["__typename"] == "InsufficientCredits"]
    assert len(started) + len(refused) == 50
    assert len(started) == 16  # floor(100 / 6): every credit that fits is used, never one more
    assert all(r["needed"] == "6.000" and Decimal(r["available"]) < 6 for r in refused)
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("96.000", "4.000")
    await assert_ledger_clean(db, team.ws)


async def test_per_seat_isolation_and_pool_fallback(db, client):
    team = await make_team(db, client, mode="PER_SEAT")
    (rich, rich_member), (empty, _) = team.creators
    await grant(client, team, "50", member=rich_member)
    await grant(client, team, "30")  # the pool
    async with client(empty) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "InsufficientCredits" and out["available"] == "0.000"
    async with client(rich) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "Generation"
        assert [h["held"] for h in out["holds"]] == ["5.000"]
    b = await balance(client, team.owner, team.ws)
    seat = [s for s in b["scopes"] if s["memberId"] == rich_member][0]
    assert (seat["available"], seat["held"]) == ("45.000", "5.000")
    assert [s["available"] for s in b["scopes"] if s["scope"] == "WORKSPACE"] == ["30.000"]
    async with client(team.owner) as api:
        on = await api('mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, poolFallback: true}) '
                       '{ ... on Workspace { id } } }', ws=team.ws)
        assert on["updateWorkspace"]["id"] == team.ws
    async with client(empty) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "Generation"
        assert {h["grant"]["source"] for h in out["holds"]} == {"PROMOTION"}
        assert (await api(BALANCE, ws=team.ws))["balance"]["viewerSpendable"] == "25.000"
    b = await balance(client, team.owner, team.ws)
    assert [s["available"] for s in b["scopes"] if s["memberId"] == rich_member] == ["45.000"]
    await assert_ledger_clean(db, team.ws)


async def test_twenty_parallel_calls_with_one_key_hold_once(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    shared = key()

    async def one():
        async with client(token) as api:
            return (await api(START, ws=team.ws, model="dalle-3", key=shared))["startGeneration"]

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert {r["__typename"] for r in results} == {"Generation"}
    assert len({r["id"] for r in results}) == 1
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("10.000", "90.000")
    async with client(token) as api:
        other = (await api(START, ws=team.ws, model="sdxl", key=shared))["startGeneration"]
    assert other["__typename"] == "IdempotencyKeyReused" and other["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await balance(client, team.owner, team.ws) == b  # nothing moved
    await assert_ledger_clean(db, team.ws)


async def test_expired_and_not_yet_effective_grants_are_never_spent(db, live_server, client):
    team = await make_team(db, client, creators=1)
    token, _ = team.creators[0]
    now = live_server.clock.now()
    await grant(client, team, "100", expires=now + timedelta(hours=1))
    await grant(client, team, "100", effective=now + timedelta(days=1))
    try:
        live_server.clock.offset = timedelta(hours=2)  # no sweeper runs: expiry is enforced at spend time
        async with client(token) as api:
            out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "InsufficientCredits" and out["available"] == "0.000"
        live_server.clock.offset = timedelta(days=1, hours=1)
        async with client(token) as api:
            out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "Generation"
        assert [h["grant"]["expiresAt"] for h in out["holds"]] == [None]  # the effective one, not the expired one
    finally:
        live_server.clock.offset = timedelta(0)
    await assert_ledger_clean(db, team.ws)


async def test_capture_below_the_hold_releases_the_rest(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    assert gen["cost"] == "50.000"
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="42.5"))["completeGeneration"]
    assert (done["status"], done["captured"], done["released"], done["shortfall"]) == (
        "COMPLETED", "42.500", "7.500", "0.000")
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("57.500", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_technical_failure_refunds_the_original_buckets_with_their_expiry(db, live_server, client):
    team = await make_team(db, client, creators=1)
    soon = live_server.clock.now() + timedelta(days=3)
    promo = await grant(client, team, "20", expires=soon)
    bought = await grant(client, team, "100", source="ADJUSTMENT")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    # Consumption order: the promotion expiring in 3 days pays first, then the never-expiring grant.
    assert {h["grant"]["id"]: h["held"] for h in gen["holds"]} == {promo["id"]: "20.000", bought["id"]: "30.000"}
    async with client(team.worker) as api:
        failed = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    assert (failed["status"], failed["failureKind"], failed["captured"], failed["released"]) == (
        "FAILED", "TECHNICAL", "0.000", "50.000")
    back = {h["grant"]["id"]: h["grant"] for h in failed["holds"]}
    assert back[promo["id"]]["remaining"] == "20.000" and back[promo["id"]]["expiresAt"] == promo["expiresAt"]
    assert back[bought["id"]]["remaining"] == "100.000" and back[bought["id"]]["expiresAt"] is None
    await assert_ledger_clean(db, team.ws)


async def test_members_cannot_settle_generations_even_their_own(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        for query, extra in ((COMPLETE, {}), (FAIL, {"kind": "TECHNICAL"})):
            with pytest.raises(TransportQueryError) as err:
                await api(query, g=gen["id"], key=key(), **extra)
            assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    async with client(team.owner) as api:  # not even the owner
        with pytest.raises(TransportQueryError):
            await api(COMPLETE, g=gen["id"], key=key())
    b = await balance(client, team.owner, team.ws)
    assert b["held"] == "5.000"


async def test_a_member_of_a_cannot_read_or_move_anything_in_b(db, client):
    a = await make_team(db, client, creators=1)
    b = await make_team(db, client, creators=1)
    await grant(client, b, "100")
    b_token, b_member = b.creators[0]
    async with client(b_token) as api:
        b_gen = (await api(START, ws=b.ws, model="sdxl", key=key()))["startGeneration"]
    pack = await _a_pack(client, a.operator)
    unknown = str(uuid.uuid4())
    async with client(a.owner) as api:
        for ws in (b.ws, unknown):
            assert (await api(BALANCE, ws=ws))["balance"] is None
            assert (await api("query($ws: ID!) { ledger(workspaceId: $ws) { edges { cursor } } }", ws=ws))["ledger"] is None
            assert (await api("query($ws: ID!) { generations(workspaceId: $ws) { edges { cursor } } }", ws=ws))["generations"] is None
            start = (await api(START, ws=ws, model="sdxl", key=key()))["startGeneration"]
            assert start == {"__typename": "NotFoundError", "message": "workspace not found", "code": "NOT_FOUND"}
            buy = (await api(PURCHASE, ws=ws, pack=pack, ref=f"pay-{uuid.uuid4()}", key=key()))["purchaseCredits"]
            assert buy["__typename"] == "NotFoundError"
            move = (await api(TRANSFER, ws=ws, amount="1", key=key(), to=b_member))["transferCredits"]
            assert move["__typename"] == "NotFoundError"
        for gen_id in (b_gen["id"], unknown):
            assert (await api("query($id: ID!) { generation(id: $id) { id } }", id=gen_id))["generation"] is None
            settle = (await api(COMPLETE, g=gen_id, key=key()))["completeGeneration"]
            assert settle == {"__typename": "NotFoundError", "message": "generation not found", "code": "NOT_FOUND"}
    after = await balance(client, b.owner, b.ws)
    assert (after["available"], after["held"]) == ("95.000", "5.000")


# --- purchases, grants, transfers ---------------------------------------------------------------

@pytest.mark.parametrize(("currency", "price_minor", "per_credit"), [
    ("USD", 4500, "0.0900"), ("jpy", 1000, "2.0000"), ("KWD", 5000, "0.0100"), ("EUR", 1, "0.0000")])
async def test_a_packs_price_per_credit_follows_its_currencys_minor_units(db, client, currency, price_minor, per_credit):
    # 500 credits: 45.00 USD, 1000 JPY (no minor unit), 5.000 KWD (three decimal places).
    team = await make_team(db, client, creators=0)
    async with client(team.operator) as api:
        out = (await api('mutation($c: String!, $p: Int!) { createCreditPack(input: {name: "P", credits: "500", '
                         'priceMinor: $p, currency: $c}) { __typename ... on CreditPack { pricePerCredit priceMinor } } }',
                         c=currency, p=price_minor))["createCreditPack"]
    assert out == {"__typename": "CreditPack", "pricePerCredit": per_credit, "priceMinor": price_minor}


async def test_a_packs_price_is_bounded_by_what_a_graphql_int_carries(db, client):
    """priceMinor is a GraphQL Int (32 bits): the largest it carries is accepted, one more never
    reaches the domain, and the domain's bound and message say the same (they said 10^12, a
    price the API could never take)."""
    team = await make_team(db, client, creators=0)
    create = ('mutation($p: Int!) { createCreditPack(input: {name: "P", credits: "500", priceMinor: $p, '
              'currency: "USD"}) { __typename ... on CreditPack { priceMinor } ... on ValidationError { field message } } }')
    async with client(team.operator) as api:
        assert (await api(create, p=2**31 - 1))["createCreditPack"] == {"__typename": "CreditPack",
                                                                          "priceMinor": 2**31 - 1}
        assert (await api(create, p=-1))["createCreditPack"] == {
            "__typename": "ValidationError", "field": "priceMinor",
            "message": "priceMinor: must be between 0 and 2147483647 minor units"}
        with pytest.raises(TransportQueryError):
            await api(create, p=2**31)
    from domain import identity
    from domain.access import Caller
    from domain.errors import ValidationFailed
    from domain.ledger.packs import create_pack
    from policies import Authorizer
    operator = Caller(await identity.authenticate_secret(db, team.operator), Authorizer())
    with pytest.raises(ValidationFailed, match="between 0 and 2147483647"):
        await create_pack(db, operator, name="P", credits="500", price_minor=2**31, currency="USD")


async def _a_pack(client, operator: str, *, expires_after_days: int | None = None) -> str:
    async with client(operator) as api:
        out = (await api(
            'mutation($d: Int) { createCreditPack(input: {name: "Test pack", credits: "500", priceMinor: 4500, '
            'currency: "usd", expiresAfterDays: $d}) { __typename ... on CreditPack { id credits pricePerCredit currency } } }',
            d=expires_after_days))["createCreditPack"]
    assert out["__typename"] == "CreditPack" and out["pricePerCredit"] == "0.0900" and out["currency"] == "USD"
    return out["id"]


async def test_purchases_are_idempotent_and_a_payment_reference_works_once_ever(db, live_server, client):
    team = await make_team(db, client, creators=0)
    other = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    ref, k = f"pay-{uuid.uuid4()}", key()
    async with client(team.owner) as api:
        first = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
        assert first["__typename"] == "Purchase" and first["credits"] == "500.000"
        assert first["grant"]["expiresAt"] is None and first["grant"]["source"] == "PURCHASE"
        again = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
        assert again == first
        replay = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=key()))["purchaseCredits"]
        assert replay["__typename"] == "PaymentReferenceUsed"
    async with client(other.owner) as api:
        elsewhere = (await api(PURCHASE, ws=other.ws, pack=pack, ref=ref, key=key()))["purchaseCredits"]
        assert elsewhere["__typename"] == "PaymentReferenceUsed"
    live_server.payments.failures = 1
    try:
        async with client(team.owner) as api:
            declined = (await api(PURCHASE, ws=team.ws, pack=pack, ref=f"pay-{uuid.uuid4()}", key=key()))["purchaseCredits"]
    finally:
        live_server.payments.failures = 0
    assert declined["__typename"] == "PaymentFailed"
    assert (await balance(client, team.owner, team.ws))["available"] == "500.000"
    assert (await balance(client, other.owner, other.ws))["available"] == "0.000"
    # A provider that does not answer (an error, a time-out) is a typed, retryable answer, not
    # INTERNAL: nothing is recorded, and the same key and reference then buy once.
    unanswered_ref, unanswered_key = f"pay-{uuid.uuid4()}", key()
    live_server.payments.unanswered = 1
    try:
        async with client(team.owner) as api:
            silent = (await api(PURCHASE, ws=team.ws, pack=pack, ref=unanswered_ref, key=unanswered_key))
    finally:
        live_server.payments.unanswered = 0
    assert (silent["purchaseCredits"]["__typename"], silent["purchaseCredits"]["code"]) == (
        "PaymentUnavailable", "PAYMENT_UNAVAILABLE")
    assert (await balance(client, team.owner, team.ws))["available"] == "500.000"
    async with client(team.owner) as api:
        retried = (await api(PURCHASE, ws=team.ws, pack=pack, ref=unanswered_ref, key=unanswered_key))
    assert retried["purchaseCredits"]["__typename"] == "Purchase"
    assert (await balance(client, team.owner, team.ws))["available"] == "1000.000"
    await assert_ledger_clean(db, team.ws)


async def test_a_grant_replayed_with_the_same_moment_in_another_offset_is_the_same_request(db, client):
    team = await make_team(db, client, creators=0)
    k = key()

    async def grant_expiring(expires: str) -> dict:
        async with client(team.operator) as api:
            return (await api(GRANT, ws=team.ws, amount="10", key=k, source="PROMOTION", member=None,
                              expires=expires, effective=None, priority=100))["grantCredits"]

    first = await grant_expiring("2031-01-01T00:00:00+00:00")
    assert first["__typename"] == "Grant"
    assert await grant_expiring("2031-01-01T01:00:00+01:00") == first  # the same moment: a replay
    assert await grant_expiring("2030-12-31T19:00:00-05:00") == first
    other = await grant_expiring("2031-01-01T01:00:00+00:00")  # another moment under the same key
    assert other["__typename"] == "IdempotencyKeyReused"
    assert (await balance(client, team.owner, team.ws))["available"] == "10.000"
    await assert_ledger_clean(db, team.ws)


async def test_a_purchase_may_not_use_an_auto_top_up_reference(db, live_server, client):
    # Auto top-up asks under `auto-topup:{workspace}:{n}` until its outcome is recorded, and a
    # reference works once across workspaces: taken by a purchase, that workspace's top-up
    # would fail on its own reference for good.
    team = await make_team(db, client, creators=0)
    other = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    asked = len(live_server.payments.seen)
    async with client(other.owner) as api:
        for ref in (f"auto-topup:{team.ws}:1", f"  Auto-TopUp:{other.ws}:7"):
            out = (await api(PURCHASE, ws=other.ws, pack=pack, ref=ref, key=key()))["purchaseCredits"]
            assert (out["__typename"], out["code"]) == ("ValidationError", "VALIDATION"), out
            assert "auto top-up" in out["message"]
        ok = (await api(PURCHASE, ws=other.ws, pack=pack, ref=f"pay-auto-topup:{team.ws}:1", key=key()))
    assert ok["purchaseCredits"]["__typename"] == "Purchase"  # only the prefix is reserved
    assert len(live_server.payments.seen) == asked + 1  # the provider was never asked for the refused ones
    assert (await db.fetchrow("SELECT count(*) FROM purchases WHERE workspace_id = $1 AND payment_reference "
                              "ILIKE '%auto-topup:%'", uuid.UUID(other.ws)))[0] == 1  # the allowed one
    assert (await balance(client, other.owner, other.ws))["available"] == "500.000"


async def test_concurrent_purchases_with_one_payment_reference_create_credits_once(db, client):
    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    ref = f"pay-{uuid.uuid4()}"

    async def one():
        async with client(team.owner) as api:
            return (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=key()))["purchaseCredits"]["__typename"]

    kinds = await asyncio.gather(*(one() for _ in range(10)))
    assert (kinds.count("Purchase"), kinds.count("PaymentReferenceUsed")) == (1, 9)
    assert (await balance(client, team.owner, team.ws))["available"] == "500.000"


async def test_a_pack_that_expires_dates_its_purchase_grant(db, live_server, client):
    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator, expires_after_days=30)
    async with client(team.owner) as api:
        out = (await api(PURCHASE, ws=team.ws, pack=pack, ref=f"pay-{uuid.uuid4()}", key=key()))["purchaseCredits"]
    expires = datetime.fromisoformat(out["grant"]["expiresAt"])
    assert abs(expires - (live_server.clock.now() + timedelta(days=30))) < timedelta(minutes=1)


async def test_only_operators_grant_and_bad_amounts_are_refused(db, client):
    team = await make_team(db, client, creators=1)
    async with client(team.owner) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(GRANT, ws=team.ws, amount="10", key=key(), source="PROMOTION", priority=100)
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    async with client(team.operator) as api:
        for amount in ("0", "-5", "1.0001", "abc", "NaN", "Infinity", "1e12"):
            out = (await api(GRANT, ws=team.ws, amount=amount, key=key(), source="PROMOTION", priority=100))["grantCredits"]
            assert out["__typename"] == "ValidationError", (amount, out)
        standard = (await api(GRANT, ws=team.ws, amount="5", key=key(), source="PROMOTION",
                              member=team.standard[1], priority=100))["grantCredits"]
        assert standard["__typename"] == "ValidationError"  # only creator seats hold credits
        past = (await api(GRANT, ws=team.ws, amount="5", key=key(), source="PROMOTION", priority=100,
                          expires=(datetime.now(UTC) - timedelta(days=1)).isoformat()))["grantCredits"]
        assert past["__typename"] == "ValidationError"
    assert (await balance(client, team.owner, team.ws))["grants"] == []


async def test_transfers_move_credits_with_entries_on_both_sides_and_keep_expiry(db, live_server, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    expires = live_server.clock.now() + timedelta(days=10)
    src = await grant(client, team, "40", expires=expires)
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="15", key=key(), to=seat))["transferCredits"]
        assert moved["__typename"] == "Transfer" and moved["fromMemberId"] is None and moved["toMemberId"] == seat
        [new] = moved["grants"]
        assert (new["scope"], new["memberId"], new["amount"], new["source"], new["parentGrantId"]) == (
            "SEAT", seat, "15.000", "PROMOTION", src["id"])
        assert new["expiresAt"] == src["expiresAt"]
        back = (await api(TRANSFER, ws=team.ws, amount="100", key=key(), **{"from": seat}))["transferCredits"]
        assert back["__typename"] == "InsufficientCredits" and back["available"] == "15.000"
        assert back["message"] == "not enough credits for this transfer"  # not "for this generation"
        entries = (await api(
            'query($ws: ID!) { ledger(workspaceId: $ws, filter: {kinds: [TRANSFER_OUT, GRANT]}) '
            '{ edges { node { kind amount grantId transferId cause } } } }', ws=team.ws))["ledger"]["edges"]
    both = [e["node"] for e in entries if e["node"]["transferId"] == moved["id"]]
    assert sorted((e["kind"], e["amount"]) for e in both) == [("GRANT", "15.000"), ("TRANSFER_OUT", "15.000")]
    b = await balance(client, team.owner, team.ws)
    assert b["available"] == "40.000"
    await assert_ledger_clean(db, team.ws)


async def test_the_ledger_check_finds_credits_a_transfer_made_out_of_nothing(db, client):
    """Each grant can agree with its own entries while a transfer still made credits: the
    receiving grant created with more than its parent passed on. `check_ledger` compares the two
    sides (what it says is checked: tests elsewhere rely on it)."""
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    src = await grant(client, team, "40")
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="15", key=key(), to=seat))["transferCredits"]
    [new] = moved["grants"]
    await assert_ledger_clean(db, team.ws)

    async def forge(session):  # 5 credits more on the receiving side, entries and figures alike
        await session.execute(text(
            "INSERT INTO ledger_entries (workspace_id, grant_id, kind, amount, cause, transfer_id) "
            "SELECT workspace_id, id, 'GRANT', 5000, 'TRANSFER', CAST(:t AS uuid) FROM grants WHERE id = CAST(:g AS uuid)"),
            {"g": new["id"], "t": moved["id"]})
        await session.execute(text("UPDATE grants SET amount = amount + 5000, remaining = remaining + 5000 "
                                   "WHERE id = CAST(:g AS uuid)"), {"g": new["id"]})

    await db.transaction(forge)
    [violation] = await check_ledger(db, uuid.UUID(team.ws))
    assert violation.grant_id == uuid.UUID(src["id"])
    assert violation.detail == "transferred out 15000, but the grants created from it hold 20000"


async def test_switching_modes_never_loses_duplicates_or_redates_a_credit(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "25", member=seat, expires=datetime.now(UTC) + timedelta(days=5))
    await grant(client, team, "75")
    before = (await balance(client, team.owner, team.ws))["grants"]
    for mode in ("POOLED", "PER_SEAT", "POOLED"):
        async with client(team.owner) as api:
            await api('mutation($ws: ID!, $m: AllocationMode!) { updateWorkspace(input: {workspaceId: $ws, '
                      'allocationMode: $m}) { __typename } }', ws=team.ws, m=mode)
        assert sorted((await balance(client, team.owner, team.ws))["grants"], key=str) == sorted(before, key=str)
    # In POOLED mode the seat's credits stay put (not lost): a spend draws from the pool only.
    token, _ = team.creators[0]
    async with client(token) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    assert {h["grant"]["source"] for h in out["holds"]} == {"PROMOTION"} and out["holds"][0]["grant"]["expiresAt"] is None
    await assert_ledger_clean(db, team.ws)


# --- settlement details ---------------------------------------------------------------------------

async def test_capture_above_the_hold_draws_the_extra_and_records_any_shortfall(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "60")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="65"))["completeGeneration"]
    assert (done["captured"], done["shortfall"]) == ("60.000", "5.000")  # only 10 more were left
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("0.000", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_policy_violation_keeps_the_documented_fee(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    async with client(team.worker) as api:
        failed = (await api(FAIL, g=gen["id"], key=key(), kind="POLICY_VIOLATION"))["failGeneration"]
    assert (failed["captured"], failed["released"]) == ("5.000", "45.000")  # 10% of 50
    await assert_ledger_clean(db, team.ws)


async def test_a_generation_settles_exactly_once(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    k = key()

    async def settle():
        async with client(team.worker) as api:
            return (await api(COMPLETE, g=gen["id"], key=k))["completeGeneration"]

    results = await asyncio.gather(*(settle() for _ in range(10)))
    assert all(r == results[0] for r in results) and results[0]["status"] == "COMPLETED"
    async with client(team.worker) as api:
        second = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    assert second["__typename"] == "GenerationAlreadySettled"
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("95.000", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_promotion_that_expires_mid_hold_is_still_captured_and_released_credits_expire(db, live_server, client):
    team = await make_team(db, client, creators=1)
    promo = await grant(client, team, "50", expires=live_server.clock.now() + timedelta(hours=1))
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    try:
        live_server.clock.offset = timedelta(hours=2)
        async with client(team.worker) as api:
            done = (await api(COMPLETE, g=gen["id"], key=key(), cost="30"))["completeGeneration"]
    finally:
        live_server.clock.offset = timedelta(0)
    assert (done["captured"], done["released"]) == ("30.000", "20.000")
    [g] = [x for x in (await balance(client, team.owner, team.ws))["grants"] if x["id"] == promo["id"]] or [None]
    assert g is None  # nothing remains on it: the released 20 expired at once
    await assert_ledger_clean(db, team.ws)


async def test_a_service_account_starts_for_a_creator_but_not_for_a_standard_seat(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    _, creator = team.creators[0]
    async with client(team.worker) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key(), **{"for": creator}))["startGeneration"]
        assert out["__typename"] == "Generation" and out["memberId"] == creator
        with pytest.raises(TransportQueryError) as err:
            await api(START, ws=team.ws, model="sdxl", key=key(), **{"for": team.standard[1]})
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    standard_token, _ = team.standard
    async with client(standard_token) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(START, ws=team.ws, model="sdxl", key=key())
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"


async def test_unknown_models_and_oversized_parameters_are_refused(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        out = (await api(START, ws=team.ws, model="no-such-model", key=key()))["startGeneration"]
        assert out["__typename"] == "ValidationError"
        big = {"prompt": "x" * 20000}
        out = (await api(START, ws=team.ws, model="sdxl", key=key(), params=big))["startGeneration"]
        assert out["__typename"] == "ValidationError"
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"


# --- reading -------------------------------------------------------------------------------------

async def test_the_ledger_pages_with_stable_cursors_and_filters(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with client(token) as api:
        gens = [(await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"] for _ in range(5)]
    query = ('query($ws: ID!, $after: String, $f: LedgerFilter) { ledger(workspaceId: $ws, first: 2, after: $after, '
             'filter: $f) { edges { cursor node { id kind generationId memberId } } pageInfo { hasNextPage endCursor } } }')
    seen, after = [], None
    async with client(team.owner) as api:
        while True:
            page = (await api(query, ws=team.ws, after=after, f={"kinds": ["HOLD"]}))["ledger"]
            seen += [e["node"] for e in page["edges"]]
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        assert [n["generationId"] for n in seen] == [g["id"] for g in reversed(gens)]
        assert {n["memberId"] for n in seen} == {member}
        one = (await api(query, ws=team.ws, after=None, f={"generationId": gens[0]["id"]}))["ledger"]["edges"]
        assert [e["node"]["generationId"] for e in one] == [gens[0]["id"]]
        with pytest.raises(TransportQueryError) as err:
            await api(query, ws=team.ws, after="bm90LWEtY3Vyc29y", f=None)
        assert err.value.errors[0]["extensions"]["code"] == "VALIDATION"
    async with client(token) as api:  # a plain member may not read the workspace ledger
        with pytest.raises(TransportQueryError) as err:
            await api(query, ws=team.ws, after=None, f=None)
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"


async def test_members_see_their_own_generations_admins_see_all(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "100")
    (a, a_member), (b, _) = team.creators
    async with client(a) as api:
        mine = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    async with client(b) as api:
        theirs = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    q = 'query($ws: ID!) { generations(workspaceId: $ws) { edges { node { id memberId } } } }'
    async with client(a) as api:
        assert [e["node"]["id"] for e in (await api(q, ws=team.ws))["generations"]["edges"]] == [mine["id"]]
        assert (await api("query($id: ID!) { generation(id: $id) { id } }", id=theirs["id"]))["generation"] is None
    async with client(team.owner) as api:
        assert {e["node"]["id"] for e in (await api(q, ws=team.ws))["generations"]["edges"]} == {mine["id"], theirs["id"]}


async def test_a_malformed_filter_id_is_refused_and_an_unknown_one_narrows_the_list_to_nothing(db, client):
    # A malformed memberId or generationId filter was parsed as "member/generation not found",
    # which the query answers as null: the client was told it had lost sight of the workspace
    # instead of that its input was bad.
    team, other = await make_team(db, client, creators=1), await make_team(db, client, creators=1)
    for t in (team, other):
        await grant(client, t, "100")
    (token, member), (foreign_token, foreign_member) = team.creators[0], other.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]["id"]
    async with client(foreign_token) as api:
        foreign_gen = (await api(START, ws=other.ws, model="sdxl", key=key()))["startGeneration"]["id"]
    ledger = ('query($ws: ID!, $f: LedgerFilter) { ledger(workspaceId: $ws, filter: $f) '
              '{ edges { node { generationId memberId } } } }')
    generations = 'query($ws: ID!, $m: ID) { generations(workspaceId: $ws, memberId: $m) { edges { node { id } } } }'
    async with client(team.owner) as api:
        for name, bad in [("memberId", "not-an-id"), ("memberId", ""), ("generationId", "not-an-id"),
                          ("generationId", "9" * 40)]:
            with pytest.raises(TransportQueryError) as err:
                await api(ledger, ws=team.ws, f={name: bad})
            [error] = err.value.errors
            assert (error["extensions"], error["message"]) == (
                {"code": "VALIDATION", "field": f"filter.{name}"}, f"filter.{name}: not a well-formed id"), (name, bad, error)
        for bad in ("not-an-id", ""):
            with pytest.raises(TransportQueryError) as err:
                await api(generations, ws=team.ws, m=bad)
            [error] = err.value.errors
            assert (error["extensions"], error["message"]) == (
                {"code": "VALIDATION", "field": "memberId"}, "memberId: not a well-formed id")
        # Well-formed: the filter narrows, to nothing for an id that names nothing here (another
        # workspace's included: the answer says nothing about it).
        nil = str(uuid.UUID(int=0))
        by_member = (await api(ledger, ws=team.ws, f={"memberId": member}))["ledger"]["edges"]
        assert by_member and {e["node"]["memberId"] for e in by_member} == {member}
        by_generation = (await api(ledger, ws=team.ws, f={"generationId": gen}))["ledger"]["edges"]
        assert [e["node"]["generationId"] for e in by_generation] == [gen]
        for f in ({"memberId": nil}, {"memberId": foreign_member}, {"generationId": nil}, {"generationId": foreign_gen}):
            assert (await api(ledger, ws=team.ws, f=f))["ledger"]["edges"] == [], f
        assert [e["node"]["id"] for e in (await api(generations, ws=team.ws, m=member))["generations"]["edges"]] == [gen]
        for m in (nil, foreign_member):
            assert (await api(generations, ws=team.ws, m=m))["generations"]["edges"] == []


async def test_the_database_refuses_to_rewrite_history_or_overdraw(db, client):
    team = await make_team(db, client, creators=1)
    g = await grant(client, team, "10")

    async def attempt(sql: str):
        async def work(session):
            await session.execute(text(sql), {"ws": team.ws, "g": g["id"]})
        return await db.transaction(work)

    for sql in (
        "UPDATE ledger_entries SET amount = amount + 1 WHERE workspace_id = CAST(:ws AS uuid)",
        "DELETE FROM ledger_entries WHERE workspace_id = CAST(:ws AS uuid)",
    ):
        with pytest.raises(Exception, match="append-only"):
            await attempt(sql)
    with pytest.raises(Exception, match="figures_not_negative|conserved"):
        await attempt("UPDATE grants SET remaining = remaining - 20000, held = held + 20000 - 20000 - 0 "
                      "WHERE id = CAST(:g AS uuid)")
    with pytest.raises(Exception, match="conserved"):
        await attempt("UPDATE grants SET remaining = remaining + 1 WHERE id = CAST(:g AS uuid)")
    await assert_ledger_clean(db, team.ws)
