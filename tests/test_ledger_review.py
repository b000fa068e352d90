"""Review probes for the credit ledger: concurrency between holds and settlements, idempotency
edges, exact arithmetic of credit strings, and authorization edges. Several of these first
demonstrated real bugs (since fixed) and stay as regression tests."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from gql.transport.exceptions import TransportQueryError

from domain.errors import ValidationFailed
from domain.money import format_credits, parse_credits
from tests.conftest import new_user
from domain.pricing import Modality
from tests.conftest import publish_test_catalog
from tests.test_periods import GROUP
from tests.test_api_ledger import (
    ADD,
    BALANCE,
    COMPLETE,
    FAIL,
    GRANT,
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

TYPED = {"Generation", "InsufficientCredits", "GenerationAlreadySettled"}


# --- concurrency ---------------------------------------------------------------------------------

async def test_concurrent_complete_and_fail_on_one_generation_settle_it_once(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    other_worker = team.operator  # a second settling identity

    async def complete(tok):
        async with client(tok) as api:
            return (await api(COMPLETE, g=gen["id"], key=key(), cost="20"))["completeGeneration"]

    async def fail(tok):
        async with client(tok) as api:
            return (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]

    calls = [complete(team.worker) for _ in range(5)] + [fail(other_worker) for _ in range(5)]
    random.shuffle(calls)
    results = await asyncio.gather(*calls)
    kinds = [r["__typename"] for r in results]
    assert kinds.count("Generation") == 1 and kinds.count("GenerationAlreadySettled") == 9, kinds
    winner = next(r for r in results if r["__typename"] == "Generation")
    b = await balance(client, team.owner, team.ws)
    assert b["held"] == "0.000"
    assert b["available"] == ("80.000" if winner["status"] == "COMPLETED" else "100.000")
    await assert_ledger_clean(db, team.ws)


async def _deadlocks(db) -> int:
    from sqlalchemy import text

    async def work(session):
        return (await session.execute(text(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))).scalar_one()

    return await db.read(work)


async def _created_and_accounted(db, ws: str) -> tuple[int, int, int]:
    """(units created by purchase/grant entries, units still on grants or spent or expired,
    units transferred out minus units granted by transfers): conservation across grants."""
    from sqlalchemy import text

    async def work(session):
        created = (await session.execute(text(
            "SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE workspace_id = CAST(:ws AS uuid) "
            "AND kind = 'GRANT' AND cause <> 'TRANSFER'"), {"ws": ws})).scalar_one()
        on_grants = (await session.execute(text(
            "SELECT coalesce(sum(remaining + held + captured + expired), 0) FROM grants "
            "WHERE workspace_id = CAST(:ws AS uuid)"), {"ws": ws})).scalar_one()
        moved = (await session.execute(text(
            "SELECT coalesce(sum(CASE kind WHEN 'TRANSFER_OUT' THEN amount ELSE -amount END), 0) FROM ledger_entries "
            "WHERE workspace_id = CAST(:ws AS uuid) AND cause = 'TRANSFER'"), {"ws": ws})).scalar_one()
        return created, on_grants, moved

    return await db.read(work)


async def test_many_concurrent_starts_settlements_and_transfers_on_shared_grants_stay_consistent(
    db, live_server, client
):
    """Starts (lock spendable grants), completions above and below the hold (lock the generation,
    then held and spendable grants), failures, and transfers between the pool and seats (lock
    source grants, create new ones) all at once on one PER_SEAT workspace with pool fallback: only
    typed results, nothing created or lost across grants, the invariant checker stays clean."""
    team = await make_team(db, client, mode="PER_SEAT", creators=4)
    async with client(team.owner) as api:
        await api('mutation($ws: ID!) { updateWorkspace(input: {workspaceId: $ws, poolFallback: true}) '
                  '{ __typename } }', ws=team.ws)
    now = live_server.clock.now()
    await grant(client, team, "60", expires=now + timedelta(days=2), priority=10)
    await grant(client, team, "60", expires=now + timedelta(days=5))
    await grant(client, team, "60")
    await grant(client, team, "40", source="ADJUSTMENT", priority=500)
    for _, seat in team.creators:
        await grant(client, team, "9", member=seat, expires=now + timedelta(days=1))
    deadlocks_before = await _deadlocks(db)

    async def start(i: int):
        token, _ = team.creators[i % len(team.creators)]
        async with client(token) as api:
            return (await api(START, ws=team.ws, model="test-three", key=key()))["startGeneration"]

    first = await asyncio.gather(*(start(i) for i in range(30)))
    assert {r["__typename"] for r in first} == {"Generation"}

    async def settle(gen_id: str, i: int):
        async with client(team.worker) as api:
            if i % 3 == 0:
                return (await api(FAIL, g=gen_id, key=key(), kind="TECHNICAL"))["failGeneration"]
            cost = "4.5" if i % 3 == 1 else "1.25"  # above the 3-credit hold, and below it
            return (await api(COMPLETE, g=gen_id, key=key(), cost=cost))["completeGeneration"]

    async def transfer(i: int):
        _, seat = team.creators[i % len(team.creators)]
        direction = {"to": seat} if i % 2 else {"from": seat}
        async with client(team.owner) as api:
            out = (await api(TRANSFER, ws=team.ws, amount="1.5", key=key(), **direction))["transferCredits"]
        return {"__typename": "Generation"} if out["__typename"] == "Transfer" else out

    work = ([settle(g["id"], i) for i, g in enumerate(first)] + [start(i) for i in range(60)]
            + [transfer(i) for i in range(20)])
    random.shuffle(work)
    results = await asyncio.gather(*work)
    assert {r["__typename"] for r in results} <= TYPED, [r for r in results if r["__typename"] not in TYPED]
    await assert_ledger_clean(db, team.ws)
    running = [r["id"] for r in results if r.get("status") == "STARTED"]
    async with client(team.worker) as api:
        for gid in running:
            assert (await api(FAIL, g=gid, key=key(), kind="CANCELLED"))["failGeneration"]["__typename"] == "Generation"
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"
    await assert_ledger_clean(db, team.ws)
    created, on_grants, moved = await _created_and_accounted(db, team.ws)
    assert (created, moved) == (on_grants, 0)
    # The locking order (generation, then grants by id) promises no deadlock, not even a retried one.
    assert await _deadlocks(db) == deadlocks_before


# --- idempotency -------------------------------------------------------------------------------

async def test_a_settlement_key_reused_for_the_other_settlement_is_refused_as_reused(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    k = key()
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=k))["completeGeneration"]
        assert done["__typename"] == "Generation"
        again = (await api(FAIL, g=gen["id"], key=k, kind="TECHNICAL"))["failGeneration"]
        assert again["__typename"] == "IdempotencyKeyReused"
        replay = (await api(COMPLETE, g=gen["id"], key=k))["completeGeneration"]
        assert replay == done
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("95.000", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_start_retried_after_insufficient_credits_runs_afresh_once_funded(db, client):
    team = await make_team(db, client, creators=1)
    token, _ = team.creators[0]
    k = key()
    async with client(token) as api:
        short = (await api(START, ws=team.ws, model="sdxl", key=k))["startGeneration"]
        assert short["__typename"] == "InsufficientCredits"
    await grant(client, team, "10")
    async with client(token) as api:
        ok = (await api(START, ws=team.ws, model="sdxl", key=k))["startGeneration"]
        assert ok["__typename"] == "Generation"
        again = (await api(START, ws=team.ws, model="sdxl", key=k))["startGeneration"]
        assert again["id"] == ok["id"]
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("5.000", "5.000")


async def test_a_purchase_replay_returns_the_first_result_even_if_the_provider_is_down(db, live_server, client):
    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    ref, k = f"pay-{uuid.uuid4()}", key()
    async with client(team.owner) as api:
        first = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
        assert first["__typename"] == "Purchase"
        live_server.payments.failures = 1
        try:
            replay = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
        finally:
            live_server.payments.failures = 0
    assert replay == first


async def test_a_purchase_replay_returns_the_first_result_after_the_pack_is_taken_off_sale(db, client):
    team = await make_team(db, client, creators=0)
    pack = await _a_pack(client, team.operator)
    ref, k = f"pay-{uuid.uuid4()}", key()
    async with client(team.owner) as api:
        first = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
        assert first["__typename"] == "Purchase"
    async with client(team.operator) as api:
        off = await api('mutation($p: ID!) { setCreditPackActive(input: {packId: $p, active: false}) '
                        '{ __typename } }', p=pack)
        assert off["setCreditPackActive"]["__typename"] == "CreditPack"
    async with client(team.owner) as api:
        replay = (await api(PURCHASE, ws=team.ws, pack=pack, ref=ref, key=k))["purchaseCredits"]
    assert replay == first


async def test_one_key_across_operations_is_refused_and_moves_nothing(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "100")
    async with client(team.operator) as api:  # the operator's key space is separate from the owner's
        await api(GRANT, ws=team.ws, amount="1", key="shared-key", source="PROMOTION", priority=100)
    before = await balance(client, team.owner, team.ws)
    async with client(team.owner) as api:
        moved = (await api(TRANSFER, ws=team.ws, amount="10", key="shared-key", to=seat))["transferCredits"]
        assert moved["__typename"] == "Transfer"
        started = (await api(START, ws=team.ws, model="sdxl", key="shared-key"))["startGeneration"]
        assert started["__typename"] == "IdempotencyKeyReused"
        other = (await api(TRANSFER, ws=team.ws, amount="11", key="shared-key", to=seat))["transferCredits"]
        assert other["__typename"] == "IdempotencyKeyReused"
        replay = (await api(TRANSFER, ws=team.ws, amount="10", key=" shared-key ", to=seat))["transferCredits"]
        assert replay == moved
    after = await balance(client, team.owner, team.ws)
    assert (after["available"], after["held"]) == (before["available"], "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_concurrent_settlements_with_one_key_and_different_inputs_settle_once(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    k = key()

    async def complete(cost):
        async with client(team.worker) as api:
            return (await api(COMPLETE, g=gen["id"], key=k, cost=cost))["completeGeneration"]

    results = await asyncio.gather(*(complete(c) for c in ["10", "20", "30", "40"] * 3))
    won = [r for r in results if r["__typename"] == "Generation"]
    assert {r["captured"] for r in won} == {won[0]["captured"]} and len(won) == 3
    assert sum(r["__typename"] == "IdempotencyKeyReused" for r in results) == 9
    b = await balance(client, team.owner, team.ws)
    assert (Decimal(b["available"]), b["held"]) == (100 - Decimal(won[0]["captured"]), "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_settlement_retry_with_the_same_id_in_another_spelling_returns_the_first_result(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    k = key()
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=k))["completeGeneration"]
        again = (await api(COMPLETE, g=gen["id"].upper(), key=k))["completeGeneration"]
    assert again == done


async def test_a_start_replay_returns_the_first_generation_after_its_model_is_retired(db, client):

    model = f"review-retire-{uuid.uuid4().hex[:8]}"
    await publish_test_catalog(db, {model: (Modality.IMAGE, {"base": "4"})})
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    k = key()
    async with client(token) as api:
        first = (await api(START, ws=team.ws, model=model, key=k))["startGeneration"]
    assert first["__typename"] == "Generation"

    await publish_test_catalog(db, {model: (Modality.IMAGE, {"base": "4"})}, retired={model})
    async with client(token) as api:
        replay = (await api(START, ws=team.ws, model=model, key=k))["startGeneration"]
    assert replay == first


async def test_a_generation_whose_actual_cost_is_zero_completes_and_releases_everything(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="0"))["completeGeneration"]
    assert (done["__typename"], done.get("captured"), done.get("released")) == ("Generation", "0.000", "5.000")


async def test_a_technical_failure_after_expiry_releases_onto_the_grant_and_expires_at_once(db, live_server, client):
    team = await make_team(db, client, creators=1)
    promo = await grant(client, team, "30", expires=live_server.clock.now() + timedelta(hours=1))
    keep = await grant(client, team, "30")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    assert {h["grant"]["id"]: h["held"] for h in gen["holds"]} == {promo["id"]: "30.000", keep["id"]: "20.000"}
    try:
        live_server.clock.offset = timedelta(hours=2)
        async with client(team.worker) as api:
            failed = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
        b = await balance(client, team.owner, team.ws)
    finally:
        live_server.clock.offset = timedelta(0)
    assert (failed["captured"], failed["released"]) == ("0.000", "50.000")
    assert (b["available"], b["held"]) == ("30.000", "0.000")
    assert [g["id"] for g in b["grants"]] == [keep["id"]]  # the promotion's credits expired, none vanished
    await assert_ledger_clean(db, team.ws)


# --- exact arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "units"), [
    (" 5 ", 5000), ("+5", 5000), ("5.000000", 5000), ("0.001", 1), ("007.5", 7500),
    ("999999999.999", 999_999_999_999), ("1000000000", 1_000_000_000_000),
])
def test_credit_strings_that_are_exact_parse_to_units(text, units):
    assert parse_credits(text, "amount") == units


@pytest.mark.parametrize("text", ["0.0005", "0.0009", "-0", "0e5", "1000000000.001", "sNaN", "-Infinity", "", "  ",
                                  "1e3", "1E-3", "1_000", "\u0665", "5.", ".5", "1,5", "0x10"])
def test_credit_strings_that_are_not_exact_positive_units_are_refused(text):
    with pytest.raises(ValidationFailed):
        parse_credits(text, "amount")


@given(st.integers(min_value=-10**18, max_value=10**18))  # within Decimal's 28 digits, so the oracle is exact
def test_units_format_as_the_exact_decimal_with_three_places_and_parse_back(units):
    text = format_credits(units)
    assert Decimal(text) * 1000 == units and text.partition(".")[2].isdigit() and len(text.partition(".")[2]) == 3
    assert text == str(Decimal(units).scaleb(-3))  # no exponent, no rounding
    if 0 <= units <= 1_000_000_000_000:
        assert parse_credits(text, "amount", allow_zero=True) == units


@pytest.mark.parametrize(("units", "text"), [(0, "0.000"), (1, "0.001"), (-5, "-0.005"), (1500, "1.500"),
                                             (-1_000_000, "-1000.000")])
def test_units_format_with_their_sign(units, text):
    assert format_credits(units) == text


@pytest.mark.parametrize("text", ["0.99999999999999999999999999999", "1.0000000000000000000000000001"])
def test_credit_strings_with_more_than_28_digits_are_refused_not_rounded(text):
    with pytest.raises(ValidationFailed):
        parse_credits(text, "amount")


async def test_a_grant_of_a_long_fraction_is_refused_through_the_api(db, client):
    team = await make_team(db, client, creators=0)
    async with client(team.operator) as api:
        out = (await api(GRANT, ws=team.ws, amount="0.99999999999999999999999999999", key=key(),
                         source="PROMOTION", priority=100))["grantCredits"]
    assert out["__typename"] == "ValidationError", out


# --- settlement edges --------------------------------------------------------------------------

async def test_capture_above_the_hold_never_takes_another_generations_hold(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "100")
    (a, _), (b, _) = team.creators
    async with client(a) as api:
        first = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    async with client(b) as api:
        second = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    assert second["__typename"] == "Generation"  # the pool is now fully held: 50 + 50
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=first["id"], key=key(), cost="70"))["completeGeneration"]
    assert (done["captured"], done["released"], done["shortfall"]) == ("50.000", "0.000", "20.000")
    bal = await balance(client, team.owner, team.ws)
    assert (bal["available"], bal["held"]) == ("0.000", "50.000")
    async with client(team.worker) as api:
        other = (await api(COMPLETE, g=second["id"], key=key()))["completeGeneration"]
    assert (other["captured"], other["shortfall"]) == ("50.000", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_free_model_holds_nothing_and_settles_any_extra_from_spendable_credits(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    token, seat = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="test-free", key=key()))["startGeneration"]
    assert (gen["__typename"], gen["cost"], gen["holds"]) == ("Generation", "0.000", [])
    await grant(client, team, "2", member=seat)
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="3"))["completeGeneration"]
    assert (done["captured"], done["released"], done["shortfall"]) == ("2.000", "0.000", "1.000")
    async with client(token) as api:
        gen2 = (await api(START, ws=team.ws, model="test-free", key=key()))["startGeneration"]
    async with client(team.worker) as api:
        failed = (await api(FAIL, g=gen2["id"], key=key(), kind="POLICY_VIOLATION"))["failGeneration"]
    assert (failed["status"], failed["captured"], failed["released"]) == ("FAILED", "0.000", "0.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_removed_members_running_generation_still_settles_from_its_own_holds(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    token, seat = team.creators[0]
    await grant(client, team, "20", member=seat)
    await grant(client, team, "100")  # the pool: not the removed member's to spend
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    async with client(team.owner) as api:
        out = await api('mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }', m=seat)
        assert out["removeMember"]["__typename"] == "Member"
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="7"))["completeGeneration"]
    assert (done["status"], done["captured"], done["shortfall"]) == ("COMPLETED", "7.000", "0.000")
    b = await balance(client, team.owner, team.ws)
    pool = [s for s in b["scopes"] if s["scope"] == "WORKSPACE"]
    assert [s["available"] for s in pool] == ["100.000"]  # the extra came from the seat, not the pool
    async with client(token) as api:  # the removed member can no longer start (nor see the workspace)
        out = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        assert out["__typename"] == "NotFoundError"
    await assert_ledger_clean(db, team.ws)


# --- members never settle their own generations ----------------------------------------------------

async def test_an_operator_who_is_a_member_cannot_settle_their_own_generation(db, client):
    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    email, op_token = await new_user(db, operator=True, prefix="op-member")
    async with client(team.owner) as api:
        added = (await api(ADD, ws=team.ws, email=email, role="MEMBER", seat="CREATOR"))["addMember"]
        assert added["id"]
    async with client(op_token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
        assert gen["__typename"] == "Generation"
        try:
            out = (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
        except TransportQueryError as err:
            out = {"__typename": err.errors[0]["extensions"]["code"]}
    assert out["__typename"] in {"FORBIDDEN", "Error"}, out
    b = await balance(client, team.owner, team.ws)
    assert b["held"] == "50.000"


# --- transfers -----------------------------------------------------------------------------------

async def test_a_transfer_from_a_seat_to_the_same_seat_is_refused_however_the_id_is_spelled(db, client):
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "30", member=seat)
    async with client(team.owner) as api:
        out = (await api(TRANSFER, ws=team.ws, amount="10", key=key(), to=seat,
                         **{"from": seat.upper()}))["transferCredits"]
    assert out["__typename"] == "ValidationError", out


async def test_a_transfer_to_or_from_a_member_of_another_workspace_is_not_found(db, client):
    a = await make_team(db, client, mode="PER_SEAT", creators=1)
    b = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, a_seat = a.creators[0]
    _, b_seat = b.creators[0]
    await grant(client, a, "30")
    await grant(client, b, "30", member=b_seat)
    async with client(a.owner) as api:
        to_b = (await api(TRANSFER, ws=a.ws, amount="10", key=key(), to=b_seat))["transferCredits"]
        from_b = (await api(TRANSFER, ws=a.ws, amount="10", key=key(), **{"from": b_seat}))["transferCredits"]
        unknown = (await api(TRANSFER, ws=a.ws, amount="10", key=key(), to=str(uuid.uuid4())))["transferCredits"]
    assert to_b == from_b == unknown == {"__typename": "NotFoundError", "message": "member not found",
                                         "code": "NOT_FOUND"}
    assert (await balance(client, b.owner, b.ws))["available"] == "30.000"
    assert (await balance(client, a.owner, a.ws))["available"] == "30.000"
    await assert_ledger_clean(db, a.ws)
    await assert_ledger_clean(db, b.ws)


# --- authorization and existence ------------------------------------------------------------------

async def test_unauthenticated_callers_learn_nothing_about_ids(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "10")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
    codes = []
    async with client(None) as api:
        for ws in (team.ws, str(uuid.uuid4())):
            for q, v in ((BALANCE, {"ws": ws}), (START, {"ws": ws, "model": "sdxl", "key": key()})):
                with pytest.raises(TransportQueryError) as err:
                    await api(q, **v)
                codes.append((err.value.errors[0]["message"], err.value.errors[0]["extensions"]["code"]))
        for g in (gen["id"], str(uuid.uuid4())):
            with pytest.raises(TransportQueryError) as err:
                await api(COMPLETE, g=g, key=key())
            codes.append((err.value.errors[0]["message"], err.value.errors[0]["extensions"]["code"]))
    assert len(set(codes)) == 1 and codes[0][1] == "UNAUTHENTICATED", codes


async def test_a_member_of_a_gets_identical_answers_for_bs_generation_and_an_unknown_id(db, client):
    a = await make_team(db, client, creators=1)
    b = await make_team(db, client, creators=1)
    await grant(client, b, "100")
    b_token, _ = b.creators[0]
    async with client(b_token) as api:
        b_gen = (await api(START, ws=b.ws, model="sdxl", key=key()))["startGeneration"]
    a_token, _ = a.creators[0]
    answers = []
    async with client(a_token) as api:
        for gid in (b_gen["id"], str(uuid.uuid4()), "not-a-uuid"):
            answers.append((
                (await api(FAIL, g=gid, key=key(), kind="TECHNICAL"))["failGeneration"],
                (await api("query($id: ID!) { generation(id: $id) { id } }", id=gid))["generation"],
            ))
    assert answers[0] == answers[1] == answers[2]
    assert (await balance(client, b.owner, b.ws))["held"] == "5.000"


async def test_an_operator_reading_an_unknown_workspaces_balance_gets_null(db, client):
    team = await make_team(db, client, creators=0)
    async with client(team.operator) as api:
        out = await api(BALANCE, ws=str(uuid.uuid4()))
    assert out["balance"] is None


async def test_an_operator_granting_to_an_unknown_workspace_gets_not_found(db, client):
    team = await make_team(db, client, creators=0)
    async with client(team.operator) as api:
        out = (await api(GRANT, ws=str(uuid.uuid4()), amount="5", key=key(), source="PROMOTION",
                         priority=100))["grantCredits"]
    assert out["__typename"] == "NotFoundError", out


# --- a transfer replay answers with the transfer that happened --------------------------------------

REMOVE = 'mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }'
SEAT = 'mutation($m: ID!, $s: Seat!) { changeMemberSeat(input: {memberId: $m, seat: $s}) { __typename } }'
ARCHIVE = 'mutation($g: ID!) { archiveBillingGroup(input: {groupId: $g}) { __typename } }'
TO_GROUP = """
mutation($ws: ID!, $amount: String!, $key: String!, $g: ID!) {
  transferCredits(input: {workspaceId: $ws, amount: $amount, idempotencyKey: $key, toBillingGroupId: $g}) {
    __typename
    ... on Transfer { id credits toBillingGroupId grants { id scope amount parentGrantId } }
    ... on Error { message code }
  }
}"""


async def _replayed_after(client, team, api, change, **transfer) -> tuple[dict, dict]:
    """The first answer of a transfer and the answer to its replay after `change`."""
    k = key()
    mutation = TO_GROUP if "g" in transfer else TRANSFER
    first = (await api(mutation, ws=team.ws, amount="20", key=k, **transfer))["transferCredits"]
    assert first["__typename"] == "Transfer", first
    await change()
    replay = (await api(mutation, ws=team.ws, amount="20", key=k, **transfer))["transferCredits"]
    return first, replay


async def test_a_transfer_replay_returns_the_first_result_after_the_target_seat_is_removed(db, client):
    """Money rule 3: the same key with the same input returns the first result. A transfer to a
    seat, replayed after that member left, answered NotFound (telling the client the credits
    never moved): the target was checked before the key was looked up."""
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "50")
    async with client(team.owner) as api:
        async def remove():
            assert (await api(REMOVE, m=seat))["removeMember"]["__typename"] == "Member"
        first, replay = await _replayed_after(client, team, api, remove, to=seat)
    assert replay == first, replay
    await assert_ledger_clean(db, team.ws)


async def test_a_transfer_replay_returns_the_first_result_after_the_target_seat_becomes_standard(db, client):
    """The same rule: a replay after the target seat was made STANDARD answered ValidationError."""
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "50")
    async with client(team.owner) as api:
        async def make_standard():
            assert (await api(SEAT, m=seat, s="STANDARD"))["changeMemberSeat"]["__typename"] == "Member"
        first, replay = await _replayed_after(client, team, api, make_standard, to=seat)
    assert replay == first, replay
    await assert_ledger_clean(db, team.ws)


async def test_a_transfer_replay_returns_the_first_result_after_the_target_group_is_archived(db, client):
    """The same rule for a reservation: a replay after the group was archived answered
    ValidationError; a new reservation for the archived group is still refused."""
    team = await make_team(db, client)
    await grant(client, team, "50")
    async with client(team.owner) as api:
        group = (await api(GROUP, ws=team.ws))["createBillingGroup"]["id"]

        async def archive():
            assert (await api(ARCHIVE, g=group))["archiveBillingGroup"]["__typename"] == "BillingGroup"
        first, replay = await _replayed_after(client, team, api, archive, g=group)
        assert replay == first, replay
        fresh = (await api(TO_GROUP, ws=team.ws, amount="20", key=key(), g=group))["transferCredits"]
    assert fresh["__typename"] == "ValidationError", fresh
    assert (await balance(client, team.owner, team.ws))["available"] == "50.000"  # 20 reserved, still ours
    await assert_ledger_clean(db, team.ws)



async def _lock_waits(db) -> int:
    # Its own statement outside any transaction: a transaction sees one stats snapshot.
    return (await db.fetchrow("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                              "AND datname = current_database()"))["n"]


async def _racing_an_archive(db, team, group: str, racer):
    """`racer()`'s answer when it runs while `archiveBillingGroup` on `group` has done its work
    but not committed: the archive's transaction is held open until the racer waits on a lock
    (or is done), then commits."""
    from domain import identity
    from domain.access import Caller
    from domain.governance import groups
    from policies import Authorizer

    archived, release = asyncio.Event(), asyncio.Event()

    class HeldOpen:
        """The archive's transaction, held open after its work until released."""

        async def transaction(self, work):
            async def held(session):
                out = await work(session)
                archived.set()
                await release.wait()
                return out
            return await db.transaction(held)

    caller = Caller(await identity.authenticate_secret(db, team.owner), Authorizer())
    archiving = asyncio.ensure_future(groups.archive_group(HeldOpen(), caller, group_id=group))
    try:
        await asyncio.wait_for(archived.wait(), 10)
        racing = asyncio.ensure_future(racer())
        while not racing.done() and not await _lock_waits(db):
            await asyncio.sleep(0.01)
    finally:
        release.set()
    assert (await archiving).archived_at is not None
    return await racing


ASSIGN = ('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
          '{ __typename ... on Member { billingGroupId } ... on Error { code message } } }')


async def test_a_transfer_racing_the_archiving_of_its_group_reserves_nothing_in_the_archived_group(db, client):
    """The transfer read the target group without a lock: it saw the group not yet archived, the
    archive committed, and the transfer put credits into an archived group (its grant's foreign
    key only made it wait for the archive's commit, not look again). It now reads the group FOR
    SHARE, so it waits for the archive and then sees it."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "50")
    async with client(team.owner) as api:
        group = (await api(GROUP, ws=team.ws))["createBillingGroup"]["id"]

    async def transfer():
        async with client(team.owner) as api:
            return (await api(TO_GROUP, ws=team.ws, amount="20", key=key(), g=group))["transferCredits"]

    out = await _racing_an_archive(db, team, group, transfer)
    assert out == {"__typename": "ValidationError", "code": "VALIDATION",
                   "message": "toBillingGroupId: the group is archived"}
    b = await balance(client, team.owner, team.ws)
    assert [(g["scope"], g["remaining"]) for g in b["grants"]] == [("WORKSPACE", "50.000")]
    await assert_ledger_clean(db, team.ws)


async def test_an_assignment_racing_the_archiving_of_its_group_is_refused(db, client):
    """The same read serves assignBillingGroup: a member assigned while the group was archived
    ended up drawing from an archived group that takes no new members."""
    team = await make_team(db, client, creators=1)
    _, member = team.creators[0]
    async with client(team.owner) as api:
        group = (await api(GROUP, ws=team.ws))["createBillingGroup"]["id"]

    async def assign():
        async with client(team.owner) as api:
            return (await api(ASSIGN, m=member, g=group))["assignBillingGroup"]

    out = await _racing_an_archive(db, team, group, assign)
    assert out == {"__typename": "ValidationError", "code": "VALIDATION", "message": "groupId: the group is archived"}
    row = await db.fetchrow("SELECT billing_group_id FROM members WHERE id = $1", uuid.UUID(member))
    assert row["billing_group_id"] is None


# --- hold timeouts racing settlements ---------------------------------------------------------------

async def test_timeouts_racing_settlements_settle_each_generation_exactly_once(db, live_server, client):
    """Hold timeouts (the scheduler, TTL 0: every running generation is due) racing completions
    within and above the hold and failures: each generation ends in exactly one settlement, its
    holds are captured or released once, and the ledger stays clean."""
    from domain.periods.service import tick

    team = await make_team(db, client, creators=3)
    await grant(client, team, "400")
    starts = []
    for i in range(24):
        token, _ = team.creators[i % 3]
        async with client(token) as api:
            g = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
        assert g["__typename"] == "Generation", g
        starts.append(g)

    async def settle(i, gid):
        async with client(team.worker) as api:
            if i % 3 == 0:
                return (await api(FAIL, g=gid, key=key(), kind="POLICY_VIOLATION"))["failGeneration"]
            return (await api(COMPLETE, g=gid, key=key(), cost="9" if i % 3 == 1 else "2"))["completeGeneration"]

    work = [settle(i, g["id"]) for i, g in enumerate(starts)]
    work += [tick(db, live_server.clock, hold_ttl=timedelta(0)) for _ in range(4)]
    answers = (await asyncio.gather(*work))[:24]
    # The ticks also time out other tests' running generations: count this workspace's by status.
    row = await db.fetchrow("SELECT array_agg(id::text) AS ids, array_agg(status::text) AS statuses "
                            "FROM generations WHERE workspace_id = $1", uuid.UUID(team.ws))
    statuses = dict(zip(row["ids"], row["statuses"]))
    for g, answer in zip(starts, answers):
        if answer["__typename"] == "Generation":  # settled by the worker, so not timed out
            assert statuses[g["id"]] in {"COMPLETED", "FAILED"}, (answer, statuses[g["id"]])
        else:  # the timeout won: the worker is told so, and nothing else moved
            assert (answer["code"], statuses[g["id"]]) == ("GENERATION_ALREADY_SETTLED", "TIMED_OUT"), answer
    await assert_ledger_clean(db, team.ws)
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"
