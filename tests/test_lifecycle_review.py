"""Review probes for lifecycle edges while money is in flight: a member removed or made a
standard seat, a billing group archived, the allocation mode switched, with generations still
STARTED."""

from __future__ import annotations

import uuid

import asyncpg

from domain.ledger.payments import PaymentOutcome
from tests.conftest import new_user
from tests.test_api_ledger import (
    ADD,
    FAIL,
    PURCHASE,
    START,
    TRANSFER,
    _a_pack,
    assert_ledger_clean,
    balance,
    grant,
    key,
    make_team,
)
from tests.test_ledger_review import ARCHIVE, REMOVE, TO_GROUP
from tests.test_periods import GROUP

ASSIGN = 'mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) { __typename } }'
RELEASE = ('mutation($ws: ID!, $g: ID!, $k: String!) { transferCredits(input: {workspaceId: $ws, idempotencyKey: $k, '
           'fromBillingGroupId: $g}) { __typename ... on Transfer { credits } ... on Error { code message } } }')


def _scope(b: dict, scope: str, member: str | None = None) -> list[str]:
    return [s["available"] for s in b["scopes"] if s["scope"] == scope and (member is None or s["memberId"] == member)]


async def test_a_removed_seats_released_credits_can_be_moved_back_to_the_pool(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    token, seat = team.creators[0]
    await grant(client, team, "60", member=seat)
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
        assert gen["__typename"] == "Generation", gen
    async with client(team.owner) as api:
        assert (await api(REMOVE, m=seat))["removeMember"]["__typename"] == "Member"
    async with client(team.worker) as api:
        failed = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    assert (failed["status"], failed["released"]) == ("FAILED", "50.000")
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="60", key=key(), **{"from": seat}))["transferCredits"]
        assert moved["__typename"] == "Transfer", moved
    b = await balance(client, team.owner, team.ws)
    assert _scope(b, "WORKSPACE") == ["60.000"] and _scope(b, "SEAT", seat) == []
    await assert_ledger_clean(db, team.ws)


async def test_a_hold_released_after_its_group_was_archived_and_emptied_can_still_be_released(db, client):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    await grant(client, team, "200")
    async with client(team.owner) as api:
        group = (await api(GROUP, ws=team.ws))["createBillingGroup"]["id"]
        assert (await api(TO_GROUP, ws=team.ws, amount="80", key=key(), g=group))["transferCredits"]["__typename"] \
            == "Transfer"
        assert (await api(ASSIGN, m=member, g=group))["assignBillingGroup"]["__typename"] == "Member"
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
        assert gen["__typename"] == "Generation", gen
    async with client(team.owner) as api:
        assert (await api(ARCHIVE, g=group))["archiveBillingGroup"]["__typename"] == "BillingGroup"
        out = (await api(RELEASE, ws=team.ws, g=group, k=key()))["transferCredits"]
        assert out == {"__typename": "Transfer", "credits": "30.000"}, out
    async with client(team.worker) as api:
        failed = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
        assert failed["released"] == "50.000"
    async with client(team.owner) as api:
        out = (await api(RELEASE, ws=team.ws, g=group, k=key()))["transferCredits"]
        assert out == {"__typename": "Transfer", "credits": "50.000"}, out
    b = await balance(client, team.owner, team.ws)
    assert b["available"] == "200.000" and _scope(b, "WORKSPACE") == ["200.000"]
    await assert_ledger_clean(db, team.ws)


async def test_a_payment_confirmed_while_its_purchaser_was_removed_still_becomes_credits(
        db, live_server, client, database_url):
    """The purchaser is removed while the provider charges the card: the payment is recorded
    (it was authorized when the card was charged). Failed before: NOT_FOUND, a charge and no credits."""
    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    email, manager = await new_user(db, prefix="billing")
    async with client(team.owner) as api:
        member = (await api(ADD, ws=team.ws, email=email, role="BILLING_MANAGER", seat="STANDARD"))["addMember"]["id"]
    provider = live_server.payments
    charged = []

    async def confirm(request):  # the owner removes the billing manager while the card is charged
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute("UPDATE members SET removed_at = now() WHERE id = $1", uuid.UUID(member))
        finally:
            await conn.close()
        charged.append(request.reference)
        return PaymentOutcome(ok=True)

    provider.confirm = confirm
    try:
        async with client(manager) as api:
            out = (await api(PURCHASE, ws=team.ws, pack=pack, ref=f"pi_{key()}", key=key()))["purchaseCredits"]
    finally:
        del provider.confirm
    assert len(charged) == 1
    b = await balance(client, team.owner, team.ws)
    assert (out["__typename"], b["available"]) == ("Purchase", "500.000"), out
    await assert_ledger_clean(db, team.ws)
