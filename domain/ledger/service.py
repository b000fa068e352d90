"""Services that move credits. Each public function is one transaction (`Database.transaction`),
authorizes against the workspace read from the row it touches, takes an idempotency key, and
writes one ledger entry per movement.

Locking: a transaction that moves credits locks the generation row first (if any), then the
grant rows it may touch, always `ORDER BY id`. One fixed order means two spenders can never
deadlock each other; the rare deadlock with another order is retried by `Database.transaction`.
The CHECK constraints on `grants` are the last line: a bug here fails a transaction, it never
overdraws a grant (money rule 2).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from sqlalchemy import and_, bindparam, false, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, member_roles, parse_id
from domain.db import Database
from domain.errors import (
    Forbidden,
    GenerationAlreadySettled,
    InsufficientCredits,
    NotFound,
    PaymentFailed,
    PaymentReferenceUsed,
    ValidationFailed,
)
from domain.identity import clean_name
from domain import events
from domain.governance import audit, automation, limits
from domain.governance.groups import group_in
from domain.ledger import idempotency
from domain.ledger.consumption import Bucket, Draw, NotEnough, Scope, consumption_key, plan_draws
from domain.ledger.models import (
    Cause,
    CreditPack,
    EntryKind,
    FailureKind,
    Generation,
    GenerationStatus,
    Grant,
    GrantSource,
    LedgerEntry,
    Purchase,
)
from domain.ledger.payments import PaymentProvider, PaymentRequest
from domain.money import format_credits, parse_credits
from domain.pricing.service import price_request, reprice_usage
from domain.workspaces.models import AllocationMode, Member, Seat, Workspace
from policies import Action

GRANTS = Grant.__table__
ENTRIES = LedgerEntry.__table__

# Sources an operator may grant by hand. Purchases only come from `purchase_credits`; rollovers
# and plan allowances from the period close (time-based rules).
MANUAL_SOURCES = frozenset({
    GrantSource.PROMOTION, GrantSource.ADJUSTMENT, GrantSource.TRIAL, GrantSource.ENTERPRISE_COMMIT,
    GrantSource.ADD_ON, GrantSource.REFUND, GrantSource.PLAN_ALLOWANCE,
})
MAX_PARAMETERS_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class LedgerRules:
    """Deployment choices about money, with their defaults documented in the README.

    policy_violation_fee: the share of a generation's hold kept when it fails for a policy
    violation (the provider ran moderation or part of the job). Technical failures and
    cancellations always cost nothing.
    """

    policy_violation_fee: Decimal = Decimal("0.10")


@dataclass(slots=True)
class Movement:
    """One ledger entry as a service writes it."""

    grant_id: uuid.UUID
    kind: EntryKind
    amount: int


@dataclass(slots=True)
class Posting:
    """The entries one transaction writes, with what they share."""

    workspace_id: uuid.UUID
    cause: Cause
    actor_id: uuid.UUID | None
    idempotency_key: str | None
    generation_id: uuid.UUID | None = None
    purchase_id: uuid.UUID | None = None
    transfer_id: uuid.UUID | None = None
    member_id: uuid.UUID | None = None
    # Business time of the movements (the service clock, or the boundary a period close or an
    # expiry belongs to); None: the database's now().
    occurred_at: datetime | None = None
    movements: list[Movement] = field(default_factory=list)

    def add(self, grant_id: uuid.UUID, kind: EntryKind, amount: int) -> None:
        if amount > 0:
            self.movements.append(Movement(grant_id, kind, amount))


# How each entry kind moves a grant's figures: (remaining, held, captured, expired, transferred_out).
EFFECT = {
    EntryKind.HOLD: (-1, +1, 0, 0, 0),
    EntryKind.RELEASE: (+1, -1, 0, 0, 0),
    EntryKind.CAPTURE: (0, -1, +1, 0, 0),
    EntryKind.EXPIRE: (-1, 0, 0, +1, 0),
    EntryKind.TRANSFER_OUT: (-1, 0, 0, 0, +1),
}


async def post_movements(session: AsyncSession, posting: Posting) -> None:
    """Apply the movements to the (already locked) grants and append their entries: one
    executemany UPDATE and one executemany INSERT, whatever the number of grants. Balance
    subscribers are signalled when the transaction commits."""
    if posting.movements:
        events.emit(session, posting.workspace_id, events.BALANCE_CHANGED)
    moves = [m for m in posting.movements if m.kind is not EntryKind.GRANT]
    if moves:
        deltas: dict[uuid.UUID, list[int]] = {}
        for m in moves:
            d = deltas.setdefault(m.grant_id, [0, 0, 0, 0, 0])
            for i, sign in enumerate(EFFECT[m.kind]):
                d[i] += sign * m.amount
        await session.execute(
            update(GRANTS)
            .where(GRANTS.c.id == bindparam("gid"))
            .values(
                remaining=GRANTS.c.remaining + bindparam("d_remaining"),
                held=GRANTS.c.held + bindparam("d_held"),
                captured=GRANTS.c.captured + bindparam("d_captured"),
                expired=GRANTS.c.expired + bindparam("d_expired"),
                transferred_out=GRANTS.c.transferred_out + bindparam("d_transferred"),
            ),
            [
                {"gid": gid, "d_remaining": d[0], "d_held": d[1], "d_captured": d[2], "d_expired": d[3],
                 "d_transferred": d[4]}
                for gid, d in deltas.items()
            ],
        )
    if posting.movements:
        await session.execute(
            ENTRIES.insert(),
            [
                {
                    "workspace_id": posting.workspace_id, "grant_id": m.grant_id, "kind": m.kind.value,
                    "amount": m.amount, "cause": posting.cause.value, "generation_id": posting.generation_id,
                    "purchase_id": posting.purchase_id, "transfer_id": posting.transfer_id,
                    "member_id": posting.member_id, "actor_id": posting.actor_id,
                    "idempotency_key": posting.idempotency_key,
                    **({"occurred_at": posting.occurred_at} if posting.occurred_at else {}),
                }
                for m in posting.movements
            ],
        )


def _bucket(row: Any) -> Bucket:
    return Bucket(
        grant_id=row.id, scope=Scope(row.scope), priority=row.priority, effective_at=row.effective_at,
        expires_at=row.expires_at, created_at=row.created_at, available=row.remaining,
    )


def spend_scopes(ws: Workspace, member: Member) -> Any:
    """Which grants a member's spend may draw from: the allocation mode (and the member's billing
    group), enforced here. `domain.ledger.consumption.may_draw` is the same rule in Python."""
    seat = and_(GRANTS.c.scope == Scope.SEAT.value, GRANTS.c.member_id == member.id)
    group = and_(GRANTS.c.scope == Scope.GROUP.value, GRANTS.c.billing_group_id == member.billing_group_id)
    pool = GRANTS.c.scope == Scope.WORKSPACE.value
    scopes = [pool] if ws.allocation_mode is AllocationMode.POOLED else [seat] + ([pool] if ws.pool_fallback else [])
    if member.billing_group_id is not None:
        scopes.append(group)
    return or_(*scopes)


async def _lock_spendable(
    session: AsyncSession, ws_id: uuid.UUID, scopes: Any, now: datetime, *, also: list[uuid.UUID] = ()
) -> dict[uuid.UUID, Any]:
    """Lock (by id) the grants a spend may use at `now`, plus any `also` grants; expired and
    not-yet-effective grants are not candidates (money rule 6, enforced at spend time)."""
    spendable = and_(
        scopes,
        GRANTS.c.remaining > 0,
        GRANTS.c.effective_at <= now,
        or_(GRANTS.c.expires_at.is_(None), GRANTS.c.expires_at > now),
    )
    rows = await session.execute(
        select(GRANTS, spendable.label("spendable"))
        .where(GRANTS.c.workspace_id == ws_id, or_(spendable, GRANTS.c.id.in_(list(also)) if also else false()))
        .order_by(GRANTS.c.id)
        .with_for_update(of=GRANTS)
    )
    return {r.id: r for r in rows}


def _spendable_buckets(rows: dict[uuid.UUID, Any]) -> list[Bucket]:
    return [_bucket(r) for r in rows.values() if r.spendable]


# --- getting credits in ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PurchaseResult:
    purchase: Purchase
    grant: Grant


async def purchase_credits(
    db: Database, caller: Caller, provider: PaymentProvider, *, workspace_id: str, pack_id: str,
    payment_reference: str, idempotency_key: str,
) -> PurchaseResult:
    ws_id = parse_id(workspace_id, "workspace")
    key = idempotency.check_key(idempotency_key)
    reference = payment_reference.strip()
    if not reference or len(reference) > 200:
        raise ValidationFailed("paymentReference", "must be 1 to 200 characters")
    request = {"workspace": str(ws_id), "pack": str(parse_id(pack_id, "credit pack")), "reference": reference}

    async def check(session: AsyncSession) -> CreditPack | PurchaseResult:
        await authorize(session, caller, ws_id, Action.PURCHASE_CREDITS, what="workspace")
        # A replay answers with the first result before anything else is asked: the provider may
        # be down or the pack off sale by now, and the purchase still happened.
        first = await idempotency.first_result(
            session, workspace_id=ws_id, actor_id=caller.actor.user_id, key=key, operation="purchaseCredits",
            request=request,
        )
        if first is not None:
            return await _purchase_result(session, first)
        return await _active_pack(session, pack_id)

    pack = await db.read(check)
    if isinstance(pack, PurchaseResult):
        return pack
    # The provider is asked outside any transaction: no lock is held across its round trip.
    outcome = await provider.confirm(
        PaymentRequest(reference=reference, amount_minor=pack.price_minor, currency=pack.currency,
                       description=f"{pack.name} for workspace {ws_id}")
    )
    if not outcome.ok:
        raise PaymentFailed(outcome.reason or "declined")

    async def work(session: AsyncSession) -> PurchaseResult:
        await authorize(session, caller, ws_id, Action.PURCHASE_CREDITS, what="workspace")
        return await record_purchase(session, ws_id=ws_id, pack=pack, reference=reference, provider=provider.name,
                                     actor_id=caller.actor.user_id, key=key, request=request, now=caller.clock.now())

    return await db.transaction(work)


async def record_purchase(
    session: AsyncSession, *, ws_id: uuid.UUID, pack: CreditPack, reference: str, provider: str,
    actor_id: uuid.UUID, key: str, request: dict[str, Any], now: datetime,
) -> PurchaseResult:
    """A confirmed payment becomes a purchase and its grant, exactly once (the idempotency key,
    and the payment reference unique across all workspaces). Shared by purchases and auto top-up."""
    purchase_id = uuid.uuid4()
    first = await idempotency.claim(
        session, workspace_id=ws_id, actor_id=actor_id, key=key, operation="purchaseCredits",
        request=request, result_id=purchase_id,
    )
    if first is not None:
        return await _purchase_result(session, first)
    grant = Grant(
        id=uuid.uuid4(), workspace_id=ws_id, scope=Scope.WORKSPACE, source=GrantSource.PURCHASE,
        effective_at=now,
        expires_at=now + timedelta(days=pack.expires_after_days) if pack.expires_after_days else None,
        amount=pack.units, remaining=pack.units, external_ref=reference, reason=f"purchase of {pack.name}",
        created_by=actor_id,
    )
    session.add(grant)
    await session.flush()
    # ON CONFLICT waits for a concurrent purchase with the same reference, then refuses.
    inserted = await session.execute(
        insert(Purchase)
        .values(id=purchase_id, workspace_id=ws_id, pack_id=pack.id, payment_reference=reference,
                provider=provider, units=pack.units, price_minor=pack.price_minor, currency=pack.currency,
                grant_id=grant.id, purchased_by=actor_id)
        .on_conflict_do_nothing(index_elements=[Purchase.payment_reference])
        .returning(Purchase.id)
    )
    if inserted.first() is None:
        raise PaymentReferenceUsed()
    posting = Posting(ws_id, Cause.PURCHASE, actor_id, key, purchase_id=purchase_id, occurred_at=now)
    posting.add(grant.id, EntryKind.GRANT, pack.units)
    await post_movements(session, posting)
    events.emit(session, ws_id, events.CREDITS_ADDED, source=GrantSource.PURCHASE.value,
                credits=format_credits(pack.units), grantId=str(grant.id))
    return await _purchase_result(session, purchase_id)


async def _active_pack(session: AsyncSession, pack_id: str) -> CreditPack:
    pack = await session.get(CreditPack, parse_id(pack_id, "credit pack"))
    if pack is None or not pack.is_active:
        raise NotFound("credit pack")
    return pack


async def _purchase_result(session: AsyncSession, purchase_id: uuid.UUID) -> PurchaseResult:
    purchase = await session.get_one(Purchase, purchase_id)
    return PurchaseResult(purchase, await session.get_one(Grant, purchase.grant_id))


async def grant_credits(
    db: Database, caller: Caller, *, workspace_id: str, amount: str, source: GrantSource, reason: str,
    idempotency_key: str, member_id: str | None = None, expires_at: datetime | None = None,
    effective_at: datetime | None = None, priority: int = 100, external_ref: str | None = None,
) -> Grant:
    ws_id = parse_id(workspace_id, "workspace")
    key = idempotency.check_key(idempotency_key)
    units = parse_credits(amount, "amount")
    reason = clean_name(reason, "reason", max_len=500)
    if source not in MANUAL_SOURCES:
        raise ValidationFailed("source", f"{source.value} credits cannot be granted by hand")
    if not 0 <= priority <= 1000:
        raise ValidationFailed("priority", "must be between 0 and 1000")
    if external_ref is not None and len(external_ref) > 200:
        raise ValidationFailed("externalReference", "must be at most 200 characters")
    for name, value in (("expiresAt", expires_at), ("effectiveAt", effective_at)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(name, "must include a time zone")
    request = {"workspace": str(ws_id), "amount": units, "source": source.value, "reason": reason,
               "member": str(parse_id(member_id, "member")) if member_id else None, "expires": expires_at, "effective": effective_at, "priority": priority,
               "ref": external_ref}

    async def work(session: AsyncSession) -> Grant:
        await authorize(session, caller, ws_id, Action.GRANT_CREDITS, what="workspace")
        grant_id = uuid.uuid4()
        first = await idempotency.claim(
            session, workspace_id=ws_id, actor_id=caller.actor.user_id, key=key, operation="grantCredits",
            request=request, result_id=grant_id,
        )
        if first is not None:
            return await session.get_one(Grant, first)
        now = caller.clock.now()
        starts = effective_at or now
        if expires_at is not None and expires_at <= max(starts, now):
            raise ValidationFailed("expiresAt", "must be after the grant becomes effective and in the future")
        member = await _seat_member(session, ws_id, member_id, "memberId") if member_id else None
        grant = Grant(
            id=grant_id, workspace_id=ws_id, scope=Scope.SEAT if member else Scope.WORKSPACE,
            member_id=member.id if member else None, source=source, priority=priority, effective_at=starts,
            expires_at=expires_at, amount=units, remaining=units, external_ref=external_ref, reason=reason,
            created_by=caller.actor.user_id,
        )
        session.add(grant)
        await session.flush()
        posting = Posting(ws_id, Cause.GRANT, caller.actor.user_id, key, occurred_at=now)
        posting.add(grant.id, EntryKind.GRANT, units)
        await post_movements(session, posting)
        events.emit(session, ws_id, events.CREDITS_ADDED, source=source.value, credits=format_credits(units),
                    grantId=str(grant.id), memberId=str(member.id) if member else None)
        audit.record(session, ws_id, caller.actor.user_id, "credits.granted", "grant", grant.id,
                     after={"amount": units, "source": source, "member": member.id if member else None,
                            "expiresAt": expires_at, "reason": reason}, at=now)
        await session.refresh(grant)
        return grant

    return await db.transaction(work)


async def _seat_member(session: AsyncSession, ws_id: uuid.UUID, member_id: str, field_name: str) -> Member:
    """An active member of this workspace with a creator seat (only creator seats hold credits)."""
    member = await session.get(Member, parse_id(member_id, "member"))
    if member is None or member.workspace_id != ws_id or member.removed_at is not None:
        raise NotFound("member")
    if member.seat is not Seat.CREATOR:
        raise ValidationFailed(field_name, "only creator seats hold credits")
    return member


# --- transfers between seats and the pool ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: uuid.UUID
    workspace_id: uuid.UUID
    units: int
    from_member_id: uuid.UUID | None
    to_member_id: uuid.UUID | None
    new_grants: list[Grant]
    from_group_id: uuid.UUID | None = None
    to_group_id: uuid.UUID | None = None


async def transfer_credits(
    db: Database, caller: Caller, *, workspace_id: str, amount: str | None, idempotency_key: str,
    from_member_id: str | None = None, to_member_id: str | None = None,
    from_group_id: str | None = None, to_group_id: str | None = None,
) -> TransferResult:
    """Move credits between the pool, seats and billing groups (reserving credits for a group is
    a transfer from the pool to it; releasing one moves them back). Each source grant gets a
    TRANSFER_OUT entry and its credits a new grant on the receiving side that keeps the source
    grant's kind, priority, effective time and expiry: nothing is re-dated. With no amount (only
    when the source is a group) everything spendable there moves."""
    ws_id = parse_id(workspace_id, "workspace")
    key = idempotency.check_key(idempotency_key)
    if from_member_id and from_group_id or to_member_id and to_group_id:
        raise ValidationFailed("toMemberId", "a side is a seat, a group or the pool, not two of them")
    if amount is None and not from_group_id:
        raise ValidationFailed("amount", "required unless releasing a group's reservation")
    units = parse_credits(amount, "amount") if amount is not None else None
    source_side = ("member", str(parse_id(from_member_id, "member"))) if from_member_id else \
        ("group", str(parse_id(from_group_id, "billing group"))) if from_group_id else ("pool", None)
    target_side = ("member", str(parse_id(to_member_id, "member"))) if to_member_id else \
        ("group", str(parse_id(to_group_id, "billing group"))) if to_group_id else ("pool", None)
    if source_side == target_side:
        raise ValidationFailed("toMemberId", "source and destination are the same")
    request = {"workspace": str(ws_id), "amount": units, "from": list(source_side), "to": list(target_side)}

    async def work(session: AsyncSession) -> TransferResult:
        await authorize(session, caller, ws_id, Action.TRANSFER_CREDITS, what="workspace")
        source = await _any_member(session, ws_id, from_member_id) if from_member_id else None
        target = await _seat_member(session, ws_id, to_member_id, "toMemberId") if to_member_id else None
        source_group = await group_in(session, ws_id, from_group_id) if from_group_id else None
        target_group = await group_in(session, ws_id, to_group_id, field="toBillingGroupId", live=True) \
            if to_group_id else None
        transfer_id = uuid.uuid4()
        first = await idempotency.claim(
            session, workspace_id=ws_id, actor_id=caller.actor.user_id, key=key, operation="transferCredits",
            request=request, result_id=transfer_id,
        )
        if first is not None:
            return await _transfer_result(session, ws_id, first)
        if source:
            scope = and_(GRANTS.c.scope == Scope.SEAT.value, GRANTS.c.member_id == source.id)
        elif source_group:
            scope = and_(GRANTS.c.scope == Scope.GROUP.value, GRANTS.c.billing_group_id == source_group)
        else:
            scope = GRANTS.c.scope == Scope.WORKSPACE.value
        now = caller.clock.now()
        rows = await _lock_spendable(session, ws_id, scope, now)
        buckets = _spendable_buckets(rows)
        wanted = units if units is not None else sum(b.available for b in buckets)
        if wanted == 0:
            raise InsufficientCredits(0, 0) if units is None else ValidationFailed("amount", "nothing to move")
        try:
            draws = plan_draws(buckets, wanted, now)
        except NotEnough as short:
            raise InsufficientCredits(short.needed, short.available) from None
        posting = Posting(ws_id, Cause.TRANSFER, caller.actor.user_id, key, transfer_id=transfer_id, occurred_at=now)
        new_scope = Scope.SEAT if target else Scope.GROUP if target_group else Scope.WORKSPACE
        for draw in draws:
            src = rows[draw.grant_id]
            new = Grant(
                id=uuid.uuid4(), workspace_id=ws_id, scope=new_scope, member_id=target.id if target else None,
                billing_group_id=target_group, source=GrantSource(src.source), priority=src.priority,
                effective_at=src.effective_at, expires_at=src.expires_at, amount=draw.units, remaining=draw.units,
                external_ref=src.external_ref, reason="transfer", created_by=caller.actor.user_id,
                parent_grant_id=src.id,
            )
            session.add(new)
            posting.add(src.id, EntryKind.TRANSFER_OUT, draw.units)
            posting.add(new.id, EntryKind.GRANT, draw.units)
        await session.flush()
        await post_movements(session, posting)
        return await _transfer_result(session, ws_id, transfer_id)

    return await db.transaction(work)


async def _any_member(session: AsyncSession, ws_id: uuid.UUID, member_id: str) -> Member:
    member = await session.get(Member, parse_id(member_id, "member"))
    if member is None or member.workspace_id != ws_id:
        raise NotFound("member")
    return member


async def _transfer_result(session: AsyncSession, ws_id: uuid.UUID, transfer_id: uuid.UUID) -> TransferResult:
    entries = (
        await session.execute(
            select(LedgerEntry).where(LedgerEntry.workspace_id == ws_id, LedgerEntry.transfer_id == transfer_id)
        )
    ).scalars().all()
    outs = [e for e in entries if e.kind is EntryKind.TRANSFER_OUT]
    ins = [e for e in entries if e.kind is EntryKind.GRANT]
    new_grants = [await session.get_one(Grant, e.grant_id) for e in ins]
    from_grant = await session.get_one(Grant, outs[0].grant_id)
    return TransferResult(
        transfer_id=transfer_id, workspace_id=ws_id, units=sum(e.amount for e in outs),
        from_member_id=from_grant.member_id, to_member_id=new_grants[0].member_id, new_grants=new_grants,
        from_group_id=from_grant.billing_group_id, to_group_id=new_grants[0].billing_group_id,
    )


# --- generations: hold, capture, release ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GenerationResult:
    generation: Generation
    entries: list[LedgerEntry]
    grants: dict[uuid.UUID, Grant]


async def start_generation(
    db: Database, caller: Caller, *, workspace_id: str, model_key: str, idempotency_key: str,
    parameters: dict[str, Any] | None = None, on_behalf_of_member_id: str | None = None,
    payments: PaymentProvider | None = None,
) -> GenerationResult:
    """Authorize (creator seat), price, and hold the cost across grants in consumption order, in
    one transaction. The hot path: a handful of statements, locks held only inside it."""
    ws_id = parse_id(workspace_id, "workspace")
    key = idempotency.check_key(idempotency_key)
    parameters = parameters or {}
    _check_parameters(parameters)
    request = {"workspace": str(ws_id), "model": model_key, "parameters": parameters,
               "for": str(parse_id(on_behalf_of_member_id, "member")) if on_behalf_of_member_id else None}

    async def work(session: AsyncSession) -> GenerationResult:
        ws, member = await _spender(session, caller, ws_id, on_behalf_of_member_id)
        generation_id = uuid.uuid4()
        # Claimed before pricing: a replay returns the first generation even if the model has
        # been retired since (its hold exists; saying "unknown model" would hide it).
        first = await idempotency.claim(
            session, workspace_id=ws_id, actor_id=caller.actor.user_id, key=key, operation="startGeneration",
            request=request, result_id=generation_id,
        )
        if first is not None:
            return await generation_result(session, first)
        now = caller.clock.now()
        # The same function as `quote`; open-ended usage (output tokens, duration) holds the most
        # the request allows, and completion captures what was actually used.
        priced = await price_request(session, ws, model_key, parameters, now, open_ended_max=True)
        price = priced.quote.units
        # Spend limits first (their usage rows, then the grants: one lock order everywhere).
        charges = await limits.charge(session, ws, member, price, now)
        rows = await _lock_spendable(session, ws_id, spend_scopes(ws, member), now)
        draws: list[Draw] = []
        if price > 0:
            try:
                draws = plan_draws(_spendable_buckets(rows), price, now)
            except NotEnough as short:
                raise InsufficientCredits(short.needed, short.available) from None
        session.add(Generation(
            id=generation_id, workspace_id=ws_id, member_id=member.id, requested_by=caller.actor.user_id,
            model_key=model_key, parameters=parameters, status=GenerationStatus.STARTED, quoted_units=price,
            price_list_id=priced.catalog.price_list.id, quote=priced.as_json(), started_at=now, limit_charges=charges,
        ))
        await session.flush()
        posting = Posting(ws_id, Cause.GENERATION, caller.actor.user_id, key, generation_id=generation_id,
                          member_id=member.id, occurred_at=now)
        for draw in draws:
            posting.add(draw.grant_id, EntryKind.HOLD, draw.units)
        await post_movements(session, posting)
        events.emit(session, ws_id, events.GENERATION_STARTED, generationId=str(generation_id),
                    memberId=str(member.id), modelKey=model_key, cost=format_credits(price))
        result = await generation_result(session, generation_id)
        follow_up[:] = [automation.needs_after_spend(ws, charges), charges]
        return result

    follow_up: list = [False, []]
    result = await db.transaction(work)
    if follow_up[0]:
        # Alerts and auto top-up, after the commit: never holding the spend's locks.
        await automation.after_spend(db, caller.clock, payments, ws_id, follow_up[1])
    return result


def _check_parameters(parameters: dict[str, Any], field: str = "parameters") -> None:
    import json

    if not isinstance(parameters, dict):
        raise ValidationFailed(field, "must be a JSON object")
    if len(json.dumps(parameters, default=str)) > MAX_PARAMETERS_BYTES:
        raise ValidationFailed(field, f"must be at most {MAX_PARAMETERS_BYTES} bytes")


async def _spender(
    session: AsyncSession, caller: Caller, ws_id: uuid.UUID, on_behalf_of: str | None
) -> tuple[Workspace, Member]:
    """The member whose credits pay, authorized to generate (creator seat) in this workspace."""
    if on_behalf_of is None:
        member = await authorize(session, caller, ws_id, Action.GENERATE, what="workspace")
        if member is None:  # a platform identity allowed to generate would need a member to pay
            raise Forbidden(Action.GENERATE.value)
    else:
        await authorize(session, caller, ws_id, Action.START_FOR_MEMBER, what="workspace")
        member = await session.get(Member, parse_id(on_behalf_of, "member"))
        if member is None or member.workspace_id != ws_id or member.removed_at is not None:
            raise NotFound("member")
        if not caller.authorizer.allows(str(member.user_id), member_roles(member), str(ws_id), Action.GENERATE):
            raise Forbidden(Action.GENERATE.value)
    ws = await session.get_one(Workspace, ws_id)
    return ws, member


async def complete_generation(
    db: Database, caller: Caller, *, generation_id: str, idempotency_key: str, actual_cost: str | None = None,
    usage: dict[str, Any] | None = None,
) -> GenerationResult:
    """Capture the actual cost: `usage` (reported metering, priced with the generation's own
    price list version, window and plan multiplier), or an explicit `actual_cost`, or by default
    the held cost. Below the hold: the rest is released. Above it: the extra is drawn from the
    member's spendable credits in consumption order; what they cannot cover is recorded on the
    generation as `shortfall` (never silently dropped, never an overdraft)."""
    key = idempotency.check_key(idempotency_key)
    if actual_cost is not None and usage is not None:
        raise ValidationFailed("usage", "give the reported usage or an actual cost, not both")
    if usage is not None:
        _check_parameters(usage, "usage")
    actual_units = parse_credits(actual_cost, "actualCost", allow_zero=True) if actual_cost is not None else None
    request = {"generation": str(parse_id(generation_id, "generation")), "actual": actual_units, "usage": usage}

    async def work(session: AsyncSession) -> GenerationResult:
        gen, claimed = await _settling(session, caller, generation_id, key, "completeGeneration", request)
        if not claimed:
            return await generation_result(session, gen.id)
        cost = gen.quoted_units if actual_units is None else actual_units
        if usage is not None:
            if gen.price_list_id is None or gen.quote is None:
                raise ValidationFailed("usage", "this generation predates metered prices: give an actual cost")
            cost = (await reprice_usage(session, gen.price_list_id, gen.model_key, gen.quote, usage)).units
        held = await _held_by_grant(session, gen.id)
        total_held = sum(held.values())
        now = caller.clock.now()
        extra = max(0, cost - total_held)
        await limits.adjust(session, gen.limit_charges, -(total_held - min(cost, total_held)))
        also = list(held)
        if extra:
            ws = await session.get_one(Workspace, gen.workspace_id)
            member = await session.get_one(Member, gen.member_id)
            rows = await _lock_spendable(session, gen.workspace_id, spend_scopes(ws, member), now, also=also)
        else:
            rows = await _lock_grants(session, also)
        posting = _settle_posting(gen, caller, key)
        captured = _capture_in_order(posting, rows, held, min(cost, total_held))
        _release_rest(posting, rows, held, now)
        shortfall = 0
        if extra:
            # Every hold was captured in full (nothing released), so the locked rows' remaining
            # figures are still exact for drawing the extra.
            spendable = _spendable_buckets(rows)
            take = min(extra, sum(b.available for b in spendable))
            if take:
                for draw in plan_draws(spendable, take, now):
                    posting.add(draw.grant_id, EntryKind.HOLD, draw.units)
                    posting.add(draw.grant_id, EntryKind.CAPTURE, draw.units)
                await limits.adjust(session, gen.limit_charges, take)  # spent is spent: it counts
            captured += take
            shortfall = extra - take
        await post_movements(session, posting)
        gen.shortfall_units = shortfall
        return await _settled(session, gen, caller, GenerationStatus.COMPLETED, captured,
                              total_held - min(cost, total_held), now)

    return await db.transaction(work)


async def fail_generation(
    db: Database, caller: Caller, rules: LedgerRules, *, generation_id: str, kind: FailureKind,
    idempotency_key: str,
) -> GenerationResult:
    """Technical failures and cancellations release everything back to the grants it came from,
    with their original expiry. A policy violation keeps `rules.policy_violation_fee` of the
    hold (rounded up to the unit) and releases the rest."""
    key = idempotency.check_key(idempotency_key)
    request = {"generation": str(parse_id(generation_id, "generation")), "kind": kind.value}

    async def work(session: AsyncSession) -> GenerationResult:
        gen, claimed = await _settling(session, caller, generation_id, key, "failGeneration", request)
        if not claimed:
            return await generation_result(session, gen.id)
        held = await _held_by_grant(session, gen.id)
        now = caller.clock.now()
        total = sum(held.values())
        fee = 0
        if kind is FailureKind.POLICY_VIOLATION:
            fee = int((Decimal(total) * rules.policy_violation_fee).to_integral_value(rounding=ROUND_CEILING))
        await limits.adjust(session, gen.limit_charges, -(total - fee))
        rows = await _lock_grants(session, list(held))
        posting = _settle_posting(gen, caller, key)
        captured = _capture_in_order(posting, rows, held, fee)
        _release_rest(posting, rows, held, now)
        await post_movements(session, posting)
        gen.failure_kind = kind
        return await _settled(session, gen, caller, GenerationStatus.FAILED, captured, total - captured, now)

    return await db.transaction(work)


async def _settling(
    session: AsyncSession, caller: Caller, generation_id: str, key: str, operation: str, request: dict[str, Any]
) -> tuple[Generation, bool]:
    """Lock the generation, authorize settling it (from its own workspace), and claim the key.
    Returns (generation, True) when this call must settle it, (generation, False) when the same
    request already did. A second, different settlement is refused."""
    gid = parse_id(generation_id, "generation")
    gen = (
        await session.execute(select(Generation).where(Generation.id == gid).with_for_update())
    ).scalar_one_or_none()
    if gen is None:
        raise NotFound("generation")
    await authorize(session, caller, gen.workspace_id, Action.SETTLE_GENERATIONS, what="generation")
    # Money rule 8, beyond the policy: whoever's credits paid never settles it, not even an
    # operator who is also that member (settling decides the refund).
    payer = await session.get_one(Member, gen.member_id)
    if payer.user_id == caller.actor.user_id:
        raise Forbidden("members cannot settle their own generations")
    first = await idempotency.claim(
        session, workspace_id=gen.workspace_id, actor_id=caller.actor.user_id, key=key, operation=operation,
        request=request, result_id=gen.id,
    )
    if first is not None:
        return gen, False
    if gen.status is not GenerationStatus.STARTED:
        raise GenerationAlreadySettled(gen.status.value)
    return gen, True


async def time_out(session: AsyncSession, gen: Generation, now: datetime) -> int:
    """Release every hold of a generation that ran past its time-to-live and mark it TIMED_OUT
    (the caller locked the generation row). Returns the units released."""
    held = await _held_by_grant(session, gen.id)
    total = sum(held.values())
    await limits.adjust(session, gen.limit_charges, -total)
    rows = await _lock_grants(session, list(held))
    posting = Posting(gen.workspace_id, Cause.GENERATION, None, None, generation_id=gen.id, member_id=gen.member_id,
                      occurred_at=now)
    _release_rest(posting, rows, held, now)
    await post_movements(session, posting)
    gen.status = GenerationStatus.TIMED_OUT
    gen.released_units = total
    gen.settled_at = now
    await session.flush()
    events.emit(session, gen.workspace_id, events.GENERATION_SETTLED, generationId=str(gen.id),
                memberId=str(gen.member_id), status=GenerationStatus.TIMED_OUT.value, captured=format_credits(0),
                released=format_credits(total), shortfall=format_credits(0))
    return total


async def _settled(
    session: AsyncSession, gen: Generation, caller: Caller, status: GenerationStatus, captured: int, released: int,
    now: datetime,
) -> GenerationResult:
    gen.status = status
    gen.captured_units = captured
    gen.released_units = released
    gen.settled_at = now
    gen.settled_by = caller.actor.user_id
    await session.flush()
    events.emit(session, gen.workspace_id, events.GENERATION_SETTLED, generationId=str(gen.id),
                memberId=str(gen.member_id), status=status.value, captured=format_credits(captured),
                released=format_credits(released), shortfall=format_credits(gen.shortfall_units))
    return await generation_result(session, gen.id)


def _settle_posting(gen: Generation, caller: Caller, key: str) -> Posting:
    return Posting(gen.workspace_id, Cause.GENERATION, caller.actor.user_id, key, generation_id=gen.id,
                   member_id=gen.member_id, occurred_at=caller.clock.now())


async def _held_by_grant(session: AsyncSession, generation_id: uuid.UUID) -> dict[uuid.UUID, int]:
    """What this generation still holds on each grant, from its own ledger entries."""
    rows = await session.execute(
        select(LedgerEntry.grant_id, LedgerEntry.kind, LedgerEntry.amount).where(
            LedgerEntry.generation_id == generation_id
        )
    )
    held: dict[uuid.UUID, int] = {}
    for grant_id, kind, amount in rows:
        sign = {EntryKind.HOLD: 1, EntryKind.RELEASE: -1, EntryKind.CAPTURE: -1}.get(kind, 0)
        held[grant_id] = held.get(grant_id, 0) + sign * amount
    return {g: u for g, u in held.items() if u > 0}


async def _lock_grants(session: AsyncSession, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    if not ids:
        return {}
    rows = await session.execute(select(GRANTS).where(GRANTS.c.id.in_(ids)).order_by(GRANTS.c.id).with_for_update())
    return {r.id: r for r in rows}


def _capture_in_order(posting: Posting, rows: dict[uuid.UUID, Any], held: dict[uuid.UUID, int], units: int) -> int:
    """Capture `units` from this generation's holds, in consumption order; shrink `held` to
    what is left to release. A hold placed before expiry may still be captured (rule 6)."""
    order = sorted(held, key=lambda gid: consumption_key(_bucket(rows[gid])))
    left = units
    for gid in order:
        take = min(left, held[gid])
        posting.add(gid, EntryKind.CAPTURE, take)
        held[gid] -= take
        left -= take
    return units - left


def _release_rest(posting: Posting, rows: dict[uuid.UUID, Any], held: dict[uuid.UUID, int], now: datetime) -> None:
    """Release what is still held back to its own grant, keeping that grant's expiry. Credits
    released onto a grant that has expired meanwhile expire at once."""
    for gid, units in held.items():
        posting.add(gid, EntryKind.RELEASE, units)
        expires_at = rows[gid].expires_at
        if units and expires_at is not None and expires_at <= now:
            posting.add(gid, EntryKind.EXPIRE, units)
    held.clear()


async def generation_result(session: AsyncSession, generation_id: uuid.UUID) -> GenerationResult:
    gen = (
        await session.execute(
            select(Generation).where(Generation.id == generation_id).execution_options(populate_existing=True)
        )
    ).scalar_one()
    entries = list(
        (
            await session.execute(
                select(LedgerEntry).where(LedgerEntry.generation_id == generation_id).order_by(LedgerEntry.id)
            )
        ).scalars()
    )
    grant_ids = {e.grant_id for e in entries}
    grants = {}
    if grant_ids:
        grants = {g.id: g for g in (await session.execute(select(Grant).where(Grant.id.in_(grant_ids)))).scalars()}
    return GenerationResult(gen, entries, grants)

