"""Services that move credits. Each public function is one transaction (`Database.transaction`;
the generation hot path: one writing statement, see below), authorizes against the workspace
read from the row it touches, takes an idempotency key, and writes one ledger entry per movement.

Locking: a transaction that moves credits locks the generation row first (if any), then the
grant rows it may touch in id order. A start's write takes KEY SHARE on the workspace row, then
on its payer's member row, before the grants, and checks the member again there
(`_payers_locked`): the order of the member changes, which hold both FOR UPDATE. Admin paths lock
the grants with `SELECT ... ORDER BY id FOR UPDATE` before planning; the generation hot path reads
them unlocked and lets its one posting statement take the locks (see `Optimistic`), so a busy
pool's grant is locked for the end of one statement and its commit. Postings update grants in id
order; a rare deadlock is retried by `Database`.
The CHECK constraints on `grants` are the last line: a stale plan or a bug fails a transaction,
it never overdraws a grant (money rule 2).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple, TypeVar

import asyncpg
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import (Caller, CallerRead, Who, authenticate, authorize, authorized_lock, decide, parse_id, role_set,
                           validated)
from domain.coalescing import BatchFailed, Coalescer
from domain.db import Contended, Database, RawSql, Sql, as_sql
from domain.errors import (
    DomainError,
    Forbidden,
    GenerationAlreadySettled,
    InsufficientCredits,
    NotFound,
    PaymentFailed,
    PaymentReferenceUsed,
    PaymentUnavailable,
    ValidationFailed,
)
from domain.identity import clean_name
from domain.ids import time_ordered_id
from domain import events
from domain.governance import audit, automation, limits
from domain.governance.groups import group_in
from domain.ledger import idempotency
from domain.ledger.consumption import Bucket, NotEnough, Scope, consumption_key, may_draw, plan_draws
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
from domain.ledger.payments import AUTO_TOP_UP_PREFIX, PaymentProvider, PaymentRequest
from domain.money import format_credits, parse_credits
from domain.pricing.catalog import price_list_in_force
from domain.pricing.service import catalog_by_id, quote_with, reprice_usage
from domain.workspaces.models import AllocationMode, Member, Seat
from policies import Action

log = logging.getLogger("creditpool")

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


def _posting_ctes(first: int, guard: str = "true") -> str:
    """Postings as two CTEs, `moved` and `appended`, with their 18 parameters numbered from
    `$first` (`_posting_args`); they write nothing unless `guard` holds. One round trip, whatever
    the number of grants and postings: the grants are locked in id order, their figures move by
    the summed deltas, and the entries are appended in the postings' order. The moved grants and
    the new entries come back as rows of their own tables' types (asyncpg decodes them by column
    name)."""
    n = [f"${first + i}" for i in range(18)]
    return f"""moved AS (
    UPDATE grants AS g SET remaining = g.remaining + d.remaining, held = g.held + d.held,
        captured = g.captured + d.captured, expired = g.expired + d.expired,
        transferred_out = g.transferred_out + d.transferred_out
    FROM unnest({n[0]}::uuid[], {n[1]}::bigint[], {n[2]}::bigint[], {n[3]}::bigint[], {n[4]}::bigint[],
                {n[5]}::bigint[]) AS d(id, remaining, held, captured, expired, transferred_out),
        -- the row locks in id order (a locking subquery is never flattened: sort, then lock)
        (SELECT id FROM grants WHERE id = ANY({n[0]}::uuid[]) AND {guard} ORDER BY id FOR UPDATE) AS locked
    WHERE g.id = d.id AND locked.id = d.id
    RETURNING g AS row
), appended AS (
    INSERT INTO ledger_entries AS le (workspace_id, grant_id, kind, amount, cause, generation_id, purchase_id,
        transfer_id, member_id, actor_id, idempotency_key, occurred_at)
    SELECT e.workspace_id, e.grant_id, e.kind, e.amount, e.cause, e.generation_id, e.purchase_id, e.transfer_id,
        e.member_id, e.actor_id, e.idempotency_key, coalesce(e.occurred_at, now())
    FROM unnest({n[6]}::uuid[], {n[7]}::uuid[], {n[8]}::text[], {n[9]}::bigint[], {n[10]}::text[], {n[11]}::uuid[],
                {n[12]}::uuid[], {n[13]}::uuid[], {n[14]}::uuid[], {n[15]}::uuid[], {n[16]}::text[],
                {n[17]}::timestamptz[]) WITH ORDINALITY
        AS e(workspace_id, grant_id, kind, amount, cause, generation_id, purchase_id, transfer_id, member_id,
             actor_id, idempotency_key, occurred_at, n)
    WHERE {guard}
    ORDER BY e.n
    RETURNING le AS row
)"""


# Entries first, grants last: PostgreSQL evaluates these in order, so the grants' row locks are
# taken after every other write of the statement and held only for their UPDATE and the commit.
_POSTED = """(SELECT array_agg(row ORDER BY (row).id) FROM appended) AS entries,
       (SELECT array_agg(row) FROM moved) AS grants"""
_POST = f"WITH {_posting_ctes(1)}\nSELECT {_POSTED}"


def columns(rows: list[tuple], width: int) -> list[list]:
    """Rows of values as one list per column (the arrays an `unnest(...)` takes)."""
    return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(width)]


def _posting_args(*postings: Posting) -> list:
    deltas: dict[uuid.UUID, list[int]] = {}
    entries = []
    for p in postings:
        for m in p.movements:
            if m.kind is not EntryKind.GRANT:
                d = deltas.setdefault(m.grant_id, [0, 0, 0, 0, 0])
                for i, sign in enumerate(EFFECT[m.kind]):
                    d[i] += sign * m.amount
            entries.append((p.workspace_id, m.grant_id, m.kind.value, m.amount, p.cause.value, p.generation_id,
                            p.purchase_id, p.transfer_id, p.member_id, p.actor_id, p.idempotency_key, p.occurred_at))
    # Grants in id order, the lock order of every other path.
    return columns([(gid, *d) for gid, d in sorted(deltas.items())], 6) + columns(entries, 12)


def _posted(row: Any) -> Posted:
    return Posted({g["id"]: GrantRecord.of(g) for g in row["grants"] or ()},
                  [EntryRecord.of(e) for e in row["entries"] or ()])


async def post_movements(tx: AsyncSession | Sql, posting: Posting) -> Posted:
    """Apply the movements to the grants (locking them in id order) and append their entries, in
    one statement. Balance subscribers are signalled when the transaction commits."""
    if not posting.movements:
        return Posted({}, [])
    sql = as_sql(tx)
    events.emit(sql, posting.workspace_id, events.BALANCE_CHANGED)
    return _posted(await sql.fetchrow(_POST, *_posting_args(posting)))


@dataclass(frozen=True, slots=True)
class SpendScope:
    """Which grants a spend (or a transfer's source) may draw from: the pool, one seat, one
    billing group. `spend_scope` derives it from the allocation mode: the domain's enforcement
    of POOLED vs PER_SEAT. `domain.ledger.consumption.may_draw` is the same rule in Python."""

    pool: bool = False
    seat_member_id: uuid.UUID | None = None
    billing_group_id: uuid.UUID | None = None

    def args(self) -> tuple:
        return self.pool, self.seat_member_id, self.billing_group_id


def spend_scope(mode: AllocationMode | str, pool_fallback: bool, member_id: uuid.UUID,
                billing_group_id: uuid.UUID | None) -> SpendScope:
    pooled = AllocationMode(mode) is AllocationMode.POOLED
    return SpendScope(pool=pooled or pool_fallback, seat_member_id=None if pooled else member_id,
                      billing_group_id=billing_group_id)


def live_at(at: str) -> str:
    """SQL: grant `g` can pay at the timestamp parameter `at`: credits left, effective, not
    expired (money rule 6, enforced at spend time)."""
    return f"""g.live AND g.remaining > 0 AND g.effective_at <= {at}::timestamptz
    AND (g.expires_at IS NULL OR g.expires_at > {at}::timestamptz)"""


# `$2..$4` are a SpendScope's args, `$5` the spend's time.
SPENDABLE = f"""(
    ((g.scope = 'WORKSPACE' AND $2::bool) OR (g.scope = 'SEAT' AND g.member_id = $3::uuid)
     OR (g.scope = 'GROUP' AND g.billing_group_id = $4::uuid))
    AND {live_at("$5")})"""
_LOCK_SPENDABLE = f"""
SELECT g.*, {SPENDABLE} AS spendable FROM grants g
WHERE g.workspace_id = $1 AND ({SPENDABLE} OR g.id = ANY($6::uuid[]))
ORDER BY g.id FOR UPDATE
"""
_LOCK_GRANTS = "SELECT g.*, false AS spendable FROM grants g WHERE g.id = ANY($1::uuid[]) ORDER BY g.id FOR UPDATE"


def _bucket(row: Any) -> Bucket:
    return Bucket(
        grant_id=row["id"], scope=Scope(row["scope"]), priority=row["priority"], effective_at=row["effective_at"],
        expires_at=row["expires_at"], created_at=row["created_at"], available=row["remaining"],
        rolled_over=row["source"] == GrantSource.ROLLOVER.value,
    )


async def _lock_spendable(
    tx: AsyncSession | Sql, ws_id: uuid.UUID, scope: SpendScope, now: datetime, *, also: list[uuid.UUID] = ()
) -> dict[uuid.UUID, Any]:
    """Lock (by id) the grants a spend may use at `now`, plus any `also` grants."""
    rows = await as_sql(tx).fetch(_LOCK_SPENDABLE, ws_id, *scope.args(), now, list(also))
    return {r["id"]: r for r in rows}


def _spendable_buckets(rows: dict[uuid.UUID, Any]) -> list[Bucket]:
    return [_bucket(r) for r in rows.values() if r["spendable"]]


_READ_SPENDABLE = _LOCK_SPENDABLE.replace("FOR UPDATE", "")
_READ_GRANTS = _LOCK_GRANTS.replace("FOR UPDATE", "")


class Optimistic:
    """How the hot path keeps a busy pool's grant locked for one statement, not a transaction.

    The first attempt reads the grants without locking them and plans the draws from that read;
    the posting's UPDATE then takes the row locks, applying the deltas to the newest row versions.
    If a concurrent spend has meanwhile left a grant short, the CHECK constraints (no figure below
    zero) refuse the UPDATE, the transaction rolls back, and the retry locks the grants first
    (`SELECT ... ORDER BY id FOR UPDATE`) and plans from exact figures. Captures and releases
    only move what the generation itself holds, so they never fail that way."""

    __slots__ = ("lock_first",)

    def __init__(self) -> None:
        self.lock_first = False

    async def spendable(self, sql: Sql, ws_id: uuid.UUID, scope: SpendScope, now: datetime,
                        also: list[uuid.UUID] = ()) -> dict[uuid.UUID, Any]:
        if self.lock_first:
            return await _lock_spendable(sql, ws_id, scope, now, also=also)
        rows = await sql.fetch(_READ_SPENDABLE, ws_id, *scope.args(), now, list(also))
        return {r["id"]: r for r in rows}

    async def grants(self, sql: Sql, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
        if not ids:
            return {}
        return {r["id"]: r for r in await sql.fetch(_LOCK_GRANTS if self.lock_first else _READ_GRANTS, ids)}

    async def post(self, sql: Sql, posting: Posting) -> Posted:
        try:
            return await post_movements(sql, posting)
        except asyncpg.CheckViolationError:
            if self.lock_first:
                raise  # planned from locked rows: a refused posting is a bug, never hidden
            self.lock_first = True
            raise Contended() from None


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
    if reference.casefold().startswith(AUTO_TOP_UP_PREFIX):
        raise ValidationFailed("paymentReference", f"references starting with {AUTO_TOP_UP_PREFIX} are auto top-up's")
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
    try:
        outcome = await provider.confirm(
            PaymentRequest(reference=reference, amount_minor=pack.price_minor, currency=pack.currency,
                           description=f"{pack.name} for workspace {ws_id}")
        )
    except Exception as exc:  # noqa: BLE001 - no answer is an expected failure of a remote service
        # Logged whole (a bug in a provider shows here); the client hears a typed, retryable
        # answer instead of INTERNAL, as auto top-up treats a payment nobody answered.
        log.warning("payment provider %s did not answer for %s", provider.name, reference, exc_info=exc)
        raise PaymentUnavailable() from None
    if not outcome.ok:
        raise PaymentFailed(outcome.reason or "declined")

    # Not authorized again: the caller was allowed to buy when the card was charged, and a
    # confirmed payment becomes credits in the workspace whatever happened since (the purchaser
    # removed or demoted during the provider's round trip must not leave a charge with nothing).
    async def work(session: AsyncSession) -> PurchaseResult:
        return await record_purchase(session, ws_id=ws_id, pack=pack, reference=reference, provider=provider.name,
                                     actor_id=caller.actor.user_id, key=key, request=request, now=caller.clock.now())

    return await db.transaction(work)


async def record_purchase(
    session: AsyncSession, *, ws_id: uuid.UUID, pack: CreditPack, reference: str, provider: str,
    actor_id: uuid.UUID | None, key: str, request: dict[str, Any], now: datetime,
) -> PurchaseResult:
    """A confirmed payment becomes a purchase and its grant, exactly once (the idempotency key,
    and the payment reference unique across all workspaces). Shared by purchases and auto top-up.
    No `actor_id`: the system's purchase (auto top-up), with no actor on its purchase, grant and
    entry; no idempotency key is claimed for it (keys are a caller's), the caller looks for the
    reference's purchase first, under a lock (`automation.run_top_up`)."""
    purchase_id = uuid.uuid4()
    if actor_id is not None:
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
               "member": str(parse_id(member_id, "member")) if member_id is not None else None, "expires": expires_at, "effective": effective_at, "priority": priority,
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
        member = await _seat_member(session, ws_id, member_id, "memberId") if member_id is not None else None
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
    from_group_id: str | None = None, to_group_id: str | None = None, hold_ttl: timedelta,
) -> TransferResult:
    """Move credits between the pool, seats and billing groups (reserving credits for a group is
    a transfer from the pool to it; releasing one moves them back). Each source grant gets a
    TRANSFER_OUT entry and its credits a new grant on the receiving side that keeps the source
    grant's kind, priority, effective time and expiry: nothing is re-dated. With no amount (only
    when the source is a group) everything spendable there moves.
    `hold_ttl`: the server's hold time-to-live (the scheduler's). A transfer that finds a boundary
    or a midnight due that the scheduler has not reached closes it first, as a start does
    (`CalendarDue`): it moves the allowance (or the day's free credits) a tick on time would
    have issued, not purchased credits kept for later."""
    ws_id = parse_id(workspace_id, "workspace")
    key = idempotency.check_key(idempotency_key)
    # An empty id is an unknown id, not an absent one (parse_id refuses it below).
    if from_member_id is not None and from_group_id is not None or to_member_id is not None and to_group_id is not None:
        raise ValidationFailed("toMemberId", "a side is a seat, a group or the pool, not two of them")
    if amount is None and from_group_id is None:
        raise ValidationFailed("amount", "required unless releasing a group's reservation")
    units = parse_credits(amount, "amount") if amount is not None else None
    source_side = ("member", str(parse_id(from_member_id, "member"))) if from_member_id is not None else \
        ("group", str(parse_id(from_group_id, "billing group"))) if from_group_id is not None else ("pool", None)
    target_side = ("member", str(parse_id(to_member_id, "member"))) if to_member_id is not None else \
        ("group", str(parse_id(to_group_id, "billing group"))) if to_group_id is not None else ("pool", None)
    if source_side == target_side:
        raise ValidationFailed("toMemberId", "source and destination are the same")
    request = {"workspace": str(ws_id), "amount": units, "from": list(source_side), "to": list(target_side)}

    async def work(session: AsyncSession, catch_up: bool) -> TransferResult:
        # A transfer may split the allowance a period close is reading (a piece for a seat or a
        # group): the close must see every piece or none, or a piece it missed expires instead of
        # rolling over under the shared cap. The close claims the workspace row FOR NO KEY UPDATE
        # (not FOR UPDATE, so spends' key-share locks do not hide it), which FOR SHARE conflicts
        # with while transfers still run side by side. Taken first: the workspace row, then
        # grants, the close's lock order. Member changes hold that row FOR UPDATE, so the caller
        # is checked again once the lock is held: a demotion (or a removal) committed while the
        # transfer waited is seen (`authorized_lock`).
        due, _ = await authorized_lock(
            session, caller, ws_id, Action.TRANSFER_CREDITS, what="workspace",
            lock=lambda: as_sql(session).fetchval(_SHARE_WORKSPACE, ws_id, caller.clock.now()))
        if catch_up and due:
            raise CalendarDue()  # after authorizing the caller: an outsider closes nothing
        # The key first (money rule 3): a replay answers with the transfer that happened, even
        # after its seat was removed or made STANDARD or its group archived. Only a new transfer
        # is checked against the seats and groups as they are now; a refusal rolls the claim back.
        transfer_id = uuid.uuid4()
        first = await idempotency.claim(
            session, workspace_id=ws_id, actor_id=caller.actor.user_id, key=key, operation="transferCredits",
            request=request, result_id=transfer_id,
        )
        if first is not None:
            return await _transfer_result(session, ws_id, first)
        source = await _any_member(session, ws_id, from_member_id) if from_member_id else None
        target = await _seat_member(session, ws_id, to_member_id, "toMemberId") if to_member_id else None
        source_group = await group_in(session, ws_id, from_group_id) if from_group_id else None
        # Locks the target group FOR SHARE (after the workspace row, before the grants): an
        # archive racing this transfer either commits first and is seen, or waits for it.
        target_group = await group_in(session, ws_id, to_group_id, field="toBillingGroupId", live=True) \
            if to_group_id else None
        scope = SpendScope(seat_member_id=source.id) if source else \
            SpendScope(billing_group_id=source_group) if source_group else SpendScope(pool=True)
        now = caller.clock.now()
        rows = await _lock_spendable(session, ws_id, scope, now)
        buckets = _spendable_buckets(rows)
        wanted = units if units is not None else sum(b.available for b in buckets)
        if wanted == 0:
            raise InsufficientCredits(0, 0, what="this transfer") if units is None else \
                ValidationFailed("amount", "nothing to move")
        try:
            draws = plan_draws(buckets, wanted, now)
        except NotEnough as short:
            raise InsufficientCredits(short.needed, short.available, what="this transfer") from None
        posting = Posting(ws_id, Cause.TRANSFER, caller.actor.user_id, key, transfer_id=transfer_id, occurred_at=now)
        new_scope = Scope.SEAT if target else Scope.GROUP if target_group else Scope.WORKSPACE
        for draw in draws:
            src = rows[draw.grant_id]
            new = Grant(
                id=uuid.uuid4(), workspace_id=ws_id, scope=new_scope, member_id=target.id if target else None,
                billing_group_id=target_group, source=GrantSource(src["source"]), priority=src["priority"],
                effective_at=src["effective_at"], expires_at=src["expires_at"], amount=draw.units,
                remaining=draw.units, external_ref=src["external_ref"], reason="transfer",
                created_by=caller.actor.user_id, parent_grant_id=src["id"],
            )
            session.add(new)
            posting.add(src["id"], EntryKind.TRANSFER_OUT, draw.units)
            posting.add(new.id, EntryKind.GRANT, draw.units)
        await session.flush()
        await post_movements(session, posting)
        # Not written for a replay (answered above): one transfer, one entry.
        audit.record(session, ws_id, caller.actor.user_id, "credits.transferred", "transfer", transfer_id,
                     after={"amount": wanted, "fromMember": source.id if source else None, "fromGroup": source_group,
                            "toMember": target.id if target else None, "toGroup": target_group}, at=now)
        return await _transfer_result(session, ws_id, transfer_id)

    return await caught_up(db, ws_id, caller, hold_ttl,
                           lambda catch_up: db.transaction(lambda session: work(session, catch_up)))


def _calendar_due(workspace: str, now: str) -> str:
    """SQL: whether the workspace row `workspace` is past a boundary or a midnight (daily free
    credits) at `now` that the scheduler has not closed yet (`CalendarDue`); read with the row a
    start or a transfer reads anyway, so the question costs no statement."""
    return f"({workspace}.next_renewal_at <= {now} OR {workspace}.next_daily_at <= {now}) IS TRUE"


_SHARE_WORKSPACE = f"SELECT {_calendar_due('workspaces', '$2::timestamptz')} FROM workspaces WHERE id = $1 FOR SHARE"


async def _any_member(session: AsyncSession, ws_id: uuid.UUID, member_id: str) -> Member:
    member = await session.get(Member, parse_id(member_id, "member"))
    if member is None or member.workspace_id != ws_id:
        raise NotFound("member")
    return member


async def _transfer_result(session: AsyncSession, ws_id: uuid.UUID, transfer_id: uuid.UUID) -> TransferResult:
    entries = (
        await session.execute(
            select(LedgerEntry).where(LedgerEntry.workspace_id == ws_id, LedgerEntry.transfer_id == transfer_id)
            .order_by(LedgerEntry.id)  # the order they were written: a replay lists the grants alike
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
#
# The hot path: plain SQL, no ORM. Most starts and settlements are one read and one writing
# statement in autocommit (`reserve_at_once`, `settle_at_once` on `Database.autocommit`), the
# grants' row locks taken last inside that statement and released by its own commit; concurrent
# starts on one workspace share that statement (`Coalescer`), and so do concurrent settlements.
# Whatever those cannot do, or refuse, runs in a transaction (`Database.sql_transaction`): BEGIN,
# the same read, the idempotency claim, spend limits, the generation row, the grants, one posting
# statement, COMMIT.

@dataclass(slots=True)
class GenerationRecord:
    """A `generations` row as plain data (the hot path builds no ORM objects)."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    member_id: uuid.UUID
    requested_by: uuid.UUID
    model_key: str
    parameters: dict[str, Any]
    status: GenerationStatus
    quoted_units: int
    captured_units: int
    released_units: int
    shortfall_units: int
    failure_kind: FailureKind | None
    price_list_id: uuid.UUID | None
    quote: dict[str, Any] | None
    started_at: datetime
    limit_charges: list[dict[str, str]]
    billing_group_id: uuid.UUID | None  # the payer's group when it started
    created_at: datetime
    settled_at: datetime | None
    settled_by: uuid.UUID | None

    @classmethod
    def of(cls, row: Any) -> GenerationRecord:
        values = {name: row[name] for name in cls.__slots__}
        values["status"] = GenerationStatus(values["status"])
        values["failure_kind"] = FailureKind(values["failure_kind"]) if values["failure_kind"] else None
        return cls(**values)


@dataclass(slots=True)
class EntryRecord:
    """A `ledger_entries` row as plain data."""

    id: int
    workspace_id: uuid.UUID
    grant_id: uuid.UUID
    kind: EntryKind
    amount: int
    cause: Cause
    generation_id: uuid.UUID | None
    purchase_id: uuid.UUID | None
    transfer_id: uuid.UUID | None
    member_id: uuid.UUID | None
    actor_id: uuid.UUID | None
    idempotency_key: str | None
    occurred_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: Any) -> EntryRecord:
        values = {name: row[name] for name in cls.__slots__}
        values["kind"] = EntryKind(values["kind"])
        values["cause"] = Cause(values["cause"])
        return cls(**values)


@dataclass(slots=True)
class GrantRecord:
    """A `grants` row as plain data."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    scope: Scope
    member_id: uuid.UUID | None
    billing_group_id: uuid.UUID | None
    source: GrantSource
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    amount: int
    remaining: int
    held: int
    captured: int
    expired: int
    transferred_out: int
    external_ref: str | None
    reason: str | None
    created_by: uuid.UUID | None
    parent_grant_id: uuid.UUID | None
    created_at: datetime

    @classmethod
    def of(cls, row: Any) -> GrantRecord:
        values = {name: row[name] for name in cls.__slots__}
        values["scope"] = Scope(values["scope"])
        values["source"] = GrantSource(values["source"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Posted:
    """What `post_movements` wrote: the moved grants' new figures and the appended entries."""

    grants: dict[uuid.UUID, GrantRecord]
    entries: list[EntryRecord]


@dataclass(frozen=True, slots=True)
class GenerationResult:
    generation: GenerationRecord
    entries: list[EntryRecord]
    grants: dict[uuid.UUID, GrantRecord]


# The workspace, the caller's membership, the member paid for (when starting for someone), the
# plan, the price list in force at the start, and the live grants the payer's spend may touch (a
# superset: `may_draw` picks by allocation mode), in one read. No row is missing when the
# workspace exists: the joins to members are LEFT. Parameters: workspace, member paid for, time,
# and the caller's user id last (`CallerRead`).
def _spender_read(user: str) -> str:
    return f"""
SELECT w.allocation_mode, w.pool_fallback, w.auto_topup_enabled, w.low_balance_alert_units,
       p.key AS plan_key,
       c.id AS caller_member_id, c.role AS caller_role, c.seat AS caller_seat,
       c.billing_group_id AS caller_group_id,
       t.id AS target_id, t.user_id AS target_user_id, t.role AS target_role, t.seat AS target_seat,
       t.billing_group_id AS target_group_id,
       {price_list_in_force("$3")} AS price_list_id,
       EXISTS (SELECT 1 FROM spend_limits s WHERE s.workspace_id = w.id AND s.removed_at IS NULL) AS has_limits,
       {_calendar_due("w", "$3::timestamptz")} AS calendar_due,
       (SELECT array_agg(g) FROM grants g
        WHERE g.workspace_id = w.id AND {live_at("$3")}
          AND (g.scope = 'WORKSPACE' OR (g.scope = 'SEAT' AND g.member_id = coalesce(t.id, c.id))
               OR (g.scope = 'GROUP' AND g.billing_group_id = CASE WHEN $2::uuid IS NULL
                   THEN c.billing_group_id ELSE t.billing_group_id END))) AS grants
FROM workspaces w JOIN plans p ON p.id = w.plan_id
LEFT JOIN members c ON c.workspace_id = w.id AND c.user_id = {user} AND c.removed_at IS NULL
LEFT JOIN members t ON t.id = $2 AND t.workspace_id = w.id AND t.removed_at IS NULL
WHERE w.id = $1
"""


_SPENDER = CallerRead(_spender_read, 4)


# A start's payers as its write finds them, on their member rows' newest versions: not removed,
# with the role and seat that each item then compares with what its spender read authorized (the
# policy decided on those). The read takes no lock, so a removal or a move to a STANDARD seat
# could commit between it and the write, and the write's foreign keys would not notice: their
# KEY SHARE on the member row waits for the change, then finds the row (removed or not, it is
# there). Here the write takes those locks itself, the workspace row first, then the member rows
# in id order: a member change (`workspaces.service._locked_target`) holds both FOR UPDATE, in
# that order. A change in flight is waited for, and READ COMMITTED then re-checks the WHERE on the
# row as it committed (a removed member is gone, a new seat shows); a change asked for once the
# write holds them waits for the write. No cycle: the write takes them before any grant's lock,
# and a change takes the workspace row first, so it never holds the member row while the write
# holds the workspace row (`assignBillingGroup` takes the member row alone, then waits on nothing
# the write holds). (KEY SHARE is what the foreign keys take anyway; it is only taken
# earlier, and held while the write waits on a busy grant.) `workspace` and `members` are SQL:
# the workspace id, and an array of member ids.
def _payers_locked(workspace: str, members: str) -> str:
    return f"""(SELECT id FROM workspaces WHERE id = {workspace} FOR KEY SHARE) AS w
    CROSS JOIN LATERAL (SELECT id, role, seat FROM members
                        WHERE workspace_id = w.id AND id = ANY({members}) AND removed_at IS NULL
                        ORDER BY id FOR KEY SHARE) AS m"""


_GENERATION_COLUMNS = """id, workspace_id, member_id, requested_by, model_key, parameters, status, quoted_units,
    price_list_id, quote, started_at, limit_charges, billing_group_id"""
# The transaction path's generation row: only while its payer ($3) still is the member, role ($13)
# and seat ($14) that the spender read authorized (`_payers_locked`); no row otherwise.
_INSERT_GENERATION = f"""
INSERT INTO generations ({_GENERATION_COLUMNS})
SELECT $1::uuid, $2::uuid, $3::uuid, $4::uuid, $5::text, $6::jsonb, 'STARTED', $7::bigint, $8::uuid, $9::jsonb,
    $10::timestamptz, $11::jsonb, $12::uuid
FROM {_payers_locked("$2::uuid", "ARRAY[$3::uuid]")}
WHERE m.role = $13::text AND m.seat = $14::text
RETURNING *
"""
# Reservations as one statement (`Database.autocommit`), one or a coalesced batch of them: the
# idempotency claims, the generation rows and the hold postings commit together or not at all. A
# used key (unique violation) or a hold planned from a stale read (a grant's CHECK) aborts all of
# it. First the payers are checked (`_payers_locked`; each item's role in $19, seat in $20): an
# item whose payer changed since its read is `refused`, and then nothing is written (`write_holds`
# writes the others again without it).
_NONE_REFUSED = "NOT EXISTS (SELECT FROM refused)"
_RESERVE = f"""
WITH payers AS (
    SELECT m.id, m.role, m.seat FROM {_payers_locked("($8::uuid[])[1]", "$9::uuid[]")}
), refused AS (
    SELECT p.id FROM unnest($7::uuid[], $9::uuid[], $19::text[], $20::text[]) AS p(id, member_id, role, seat)
    WHERE NOT EXISTS (SELECT FROM payers m WHERE m.id = p.member_id AND m.role = p.role AND m.seat = p.seat)
), claim AS ({idempotency.claim_sql(1, _NONE_REFUSED)}),
started AS (
    INSERT INTO generations AS ng ({_GENERATION_COLUMNS})
    SELECT n.id, n.workspace_id, n.member_id, n.requested_by, n.model_key, n.parameters::jsonb, 'STARTED',
        n.quoted_units, n.price_list_id, n.quote::jsonb, n.started_at, n.limit_charges::jsonb, n.billing_group_id
    FROM unnest($7::uuid[], $8::uuid[], $9::uuid[], $10::uuid[], $11::text[], $12::text[], $13::bigint[],
                $14::uuid[], $15::text[], $16::timestamptz[], $17::text[], $18::uuid[])
        AS n(id, workspace_id, member_id, requested_by, model_key, parameters, quoted_units, price_list_id, quote,
             started_at, limit_charges, billing_group_id)
    WHERE {_NONE_REFUSED}
    RETURNING ng AS row
), {_posting_ctes(21, _NONE_REFUSED)}
SELECT (SELECT count(*) FROM claim) AS claimed, (SELECT array_agg(id) FROM refused) AS refused,
       (SELECT array_agg(row) FROM started) AS generations, {_POSTED}
"""  # `claimed` is read first: the payers' locks, then the claims, all before the grants' (see `_POSTED`)
# What makes a one-statement write fall back to the transaction path (which reproduces the refusal
# with its canonical answer, or succeeds under locks): a payer changed since the read (no
# exception: `write_holds` answers None), a used idempotency key, a CHECK refusing a stale plan, any other constraint, a deadlock, a statement cancelled or its backend shut down
# (57xxx); and, for an item that did not lead its batch, any failure of the batch. A connection
# lost under the statement or before it (whether it committed is unknown) is the one place that
# knows the connection, `Database.autocommit`, whose `lost` is None here too: the transaction
# path, on another connection, finds out by claiming the same key.
_REFUSED_AT_ONCE = (asyncpg.IntegrityConstraintViolationError, asyncpg.TransactionRollbackError,
                    asyncpg.exceptions.OperatorInterventionError, BatchFailed)


@dataclass(frozen=True, slots=True)
class _Hold:
    """One reservation ready to write: its claim and generation rows, its payer's role and seat as
    its read authorized them, and its posting."""

    claim: tuple
    generation: tuple
    payer: tuple  # role, seat
    posting: Posting

    @property
    def generation_id(self) -> uuid.UUID:
        return self.generation[0]


async def write_holds(sql: Sql, holds: list[_Hold]) -> list[GenerationResult | None]:
    """Write reservations as one statement; each one's result, in order. None for a reservation
    whose payer changed since its read (removed, or with another seat or role): the statement
    then wrote nothing, and the others are written again without it, so a member change racing
    a batch costs the rest one more statement, not the transaction path. (Each round drops at
    least one item.)"""
    results: dict[uuid.UUID, GenerationResult | None] = {}
    todo = holds
    while todo:
        row = await sql.fetchrow(_RESERVE, *columns([h.claim for h in todo], 6),
                                 *columns([h.generation for h in todo], 12), *columns([h.payer for h in todo], 2),
                                 *_posting_args(*(h.posting for h in todo)))
        refused = set(row["refused"] or ())
        if not refused:
            results.update(zip((h.generation_id for h in todo), _per_generation(row, [h.posting for h in todo])))
            break
        results.update(dict.fromkeys(refused))
        todo = [h for h in todo if h.generation_id not in refused]
    return [results[h.generation_id] for h in holds]


def _per_generation(row: Any, postings: list[Posting]) -> list[GenerationResult]:
    """A batch statement's rows split by posting: each generation, the entries it appended, and
    the figures of the grants it moved (after the whole batch)."""
    posted = _posted(row)
    generations = {g["id"]: GenerationRecord.of(g) for g in row["generations"]}
    entries: dict[uuid.UUID, list[EntryRecord]] = {}
    for e in posted.entries:
        entries.setdefault(e.generation_id, []).append(e)
    return [
        GenerationResult(generations[p.generation_id], entries.get(p.generation_id, []),
                         {m.grant_id: posted.grants[m.grant_id] for m in p.movements})
        for p in postings
    ]


@dataclass(slots=True)
class _Reservation:
    """A start decided and priced from the spender read: who pays, what, and the generation row."""

    generation_id: uuid.UUID
    member_id: uuid.UUID
    group_id: uuid.UUID | None
    price: int
    price_list_id: uuid.UUID
    quote_json: str
    now: datetime

    def generation_args(self, req: StartRequest, caller: Caller, charges: list[dict]) -> tuple:
        return (self.generation_id, req.ws_id, self.member_id, caller.actor.user_id, req.model_key,
                req.parameters_json, self.price, self.price_list_id, self.quote_json, self.now, json.dumps(charges),
                self.group_id)


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A `startGeneration` request, validated."""

    ws_id: uuid.UUID
    key: str
    model_key: str
    parameters: dict[str, Any]
    parameters_json: str
    target_id: uuid.UUID | None

    def idempotent_request(self) -> dict[str, Any]:
        return {"workspace": str(self.ws_id), "model": self.model_key, "parameters": self.parameters,
                "for": str(self.target_id) if self.target_id else None}


@dataclass(frozen=True, slots=True)
class Started:
    result: GenerationResult
    follow_up: bool  # alerts or auto top-up to evaluate after the commit
    charges: list[dict]


async def start_generation(
    db: Database, who: Who, *, workspace_id: str, model_key: str, idempotency_key: str,
    parameters: dict[str, Any] | None = None, on_behalf_of_member_id: str | None = None,
    payments: PaymentProvider | None = None, hold_ttl: timedelta,
) -> GenerationResult:
    """Authorize (creator seat), price, and hold the cost across grants in consumption order.
    `hold_ttl`: the server's hold time-to-live (the scheduler's), for a start that finds a
    boundary or a midnight due that the scheduler has not reached: it closes it first, as the
    tick would (`CalendarDue`), releasing the workspace's timed-out holds before.

    Two ways, one outcome. Most starts are one read (which also authenticates `who` when it is
    credentials) and one writing statement in autocommit (`reserve_at_once`). A start that needs
    more (a workspace with spend limits, whose usage rows are conditional updates of their own; a
    replayed key; a hold planned from a read that went stale; any refusal, so that its answer is
    the canonical one) runs as one transaction."""
    parameters = parameters or {}
    req = await validated(db, who, lambda: StartRequest(
        ws_id=parse_id(workspace_id, "workspace"), key=idempotency.check_key(idempotency_key), model_key=model_key,
        parameters=parameters, parameters_json=check_parameters(parameters),
        target_id=parse_id(on_behalf_of_member_id, "member") if on_behalf_of_member_id is not None else None,
    ))
    holds = db.coalescer("holds", write_holds)
    started = await db.autocommit(lambda sql: reserve_at_once(sql, who, req, holds), lost=None)
    if started is None:
        caller = await authenticate(db, who)  # checked by the read (unless its connection was lost): no statement
        optimistic = Optimistic()
        try:
            started = await caught_up(db, req.ws_id, caller, hold_ttl, lambda catch_up: db.sql_transaction(
                lambda sql: _reserve_in_transaction(sql, caller, req, optimistic, catch_up=catch_up)))
        except InsufficientCredits:
            # A pool too low for this generation may have got there with no spend to start its
            # auto top-up (credits expired, or moved to a seat). The refusal stands; the top-up,
            # if one is due, is bought before it is answered, so that a retry can succeed.
            await automation.after_spend(db, who.clock, payments, req.ws_id, [])
            raise
    if started.follow_up:
        # Alerts and auto top-up, after the commit: never holding the spend's locks.
        await automation.after_spend(db, who.clock, payments, req.ws_id, started.charges)
    return started.result


async def reserve_at_once(sql: Sql, who: Who, req: StartRequest,
                          holds: Coalescer[_Hold, GenerationResult] | None = None) -> Started | None:
    """A start as two statements outside a transaction: the spender read (authenticating `who`
    when it is credentials), then `_RESERVE` (alone, or in a batch with the concurrent starts on
    the same workspace when `holds` is given). None when the start needs the transaction path
    (nothing was written)."""
    now = who.clock.now()
    caller, ws = await _SPENDER.fetchrow(sql, who, req.ws_id, req.target_id, now)
    payer = _spender(caller, req.ws_id, ws, req.target_id, refuse=False)
    if payer is None or ws["has_limits"] or ws["calendar_due"]:
        # A member paid for who may not generate: a replay, or refused after the claim. Spend
        # limits: their usage rows. A boundary or a midnight the scheduler has not reached yet:
        # the credits it issues are not there (`CalendarDue`).
        return None
    member_id, group_id = payer.member_id, payer.group_id
    r = await _reservation(sql, ws, member_id, group_id, req.model_key, req.parameters, now, refuse=False)
    if r is None:
        return None
    posting = _hold_posting(req, caller, r)
    if r.price > 0:
        grants = [g for g in ws["grants"] or () if may_draw(
            ws["allocation_mode"], ws["pool_fallback"], member_id, group_id, Scope(g["scope"]), g["member_id"],
            g["billing_group_id"])]
        try:
            draws = plan_draws([_bucket(g) for g in grants], r.price, now)
        except NotEnough:
            return None
        for draw in draws:
            posting.add(draw.grant_id, EntryKind.HOLD, draw.units)
    hold = _Hold(
        idempotency.claim_args(workspace_id=req.ws_id, actor_id=caller.actor.user_id, key=req.key,
                               operation="startGeneration", request=req.idempotent_request(),
                               result_id=r.generation_id),
        r.generation_args(req, caller, []), (payer.role, payer.seat), posting)
    try:
        # Concurrent reservations on one workspace share a statement and a commit (`Coalescer`).
        result = await holds.submit(req.ws_id, sql, hold) if holds else (await write_holds(sql, [hold]))[0]
    except _REFUSED_AT_ONCE:
        return None
    if result is None:
        return None  # the payer changed since the read (nothing written): answered as any start by them now
    if posting.movements:
        events.emit(sql, req.ws_id, events.BALANCE_CHANGED)
    _started(sql, req, r)
    return Started(result, automation.needs_after_spend(ws["auto_topup_enabled"], ws["low_balance_alert_units"], []),
                   [])


class CalendarDue(Exception):
    """A spend found its workspace past a boundary (or midnight UTC) that the scheduler has not
    closed yet: the old allowance (or the day's free credits) has expired at spend time, and the
    new one, which a tick on time issued at that instant, is not there. Planned now, the spend
    would be paid by credits kept for later (purchased ones, which never expire) or refused, and
    the allowance issued a moment later would expire with that much unspent. A transfer meets it
    too: it would move those credits instead of the allowance. The caller closes
    what is due (`close_due_periods`, in a transaction of its own) and plans again."""


async def close_due_periods(db: Database, ws_id: uuid.UUID, now: datetime, hold_ttl: timedelta) -> None:
    """`periods.close_due_periods` for a spend (or a transfer) that met `CalendarDue`: as the scheduler's tick
    would have, at the time it would have (the workspace's timed-out holds released first).
    A close that fails is the scheduler's to report and retry (`periods.tick`); the spend goes
    on with what is there, as it did before it looked: a workspace whose close is broken must
    not be unable to spend at all."""
    from domain.periods import service as periods  # periods build on this module

    try:
        await db.transaction(lambda session: periods.close_due_periods(session, ws_id, now, hold_ttl=hold_ttl))
    except Exception as exc:  # noqa: BLE001 - isolated: the spend goes on, the scheduler retries the close
        log.warning("closing the due periods of workspace %s before a spend failed", ws_id, exc_info=exc)


_T = TypeVar("_T")


async def caught_up(db: Database, ws_id: uuid.UUID, caller: Caller, hold_ttl: timedelta,
                    attempt: Callable[[bool], Awaitable[_T]]) -> _T:
    """Run `attempt(True)`, which raises `CalendarDue` (once its caller is authorized) where a
    boundary is due; then close what is due (`close_due_periods`) and run `attempt(False)`, once:
    a boundary passed meanwhile (a clock moved by a test) is spent or moved as it is."""
    try:
        return await attempt(True)
    except CalendarDue:
        await close_due_periods(db, ws_id, caller.clock.now(), hold_ttl)
        return await attempt(False)


async def _reserve_in_transaction(sql: Sql, caller: Caller, req: StartRequest, optimistic: Optimistic, *,
                                  catch_up: bool) -> Started:
    now = caller.clock.now()
    ws = await sql.fetchrow(_SPENDER.known, req.ws_id, req.target_id, now, caller.actor.user_id)
    payer = _spender(caller, req.ws_id, ws, req.target_id, refuse=False)
    if catch_up and ws["calendar_due"]:
        raise CalendarDue()  # after authorizing the caller: an outsider closes nothing
    # Claimed before pricing: a replay returns the first generation even if the model has been
    # retired since (its hold exists; saying "unknown model" would hide it), or the member it
    # paid for has left or lost the creator seat since.
    generation_id = time_ordered_id()
    first = await idempotency.claim(
        sql, workspace_id=req.ws_id, actor_id=caller.actor.user_id, key=req.key, operation="startGeneration",
        request=req.idempotent_request(), result_id=generation_id,
    )
    if first is not None:
        return Started(await generation_result(sql, first), False, [])
    payer = payer or _spender(caller, req.ws_id, ws, req.target_id)  # a new start: refused
    member_id, group_id = payer.member_id, payer.group_id
    r = await _reservation(sql, ws, member_id, group_id, req.model_key, req.parameters, now, refuse=True,
                           generation_id=generation_id)
    # Spend limits first (their usage rows, then the grants: one lock order everywhere).
    charges = await limits.charge(
        sql, workspace_id=req.ws_id, member_id=member_id, billing_group_id=group_id,
        units=r.price, now=now,
    ) if ws["has_limits"] else []
    gen = await sql.fetchrow(_INSERT_GENERATION, *r.generation_args(req, caller, charges), payer.role, payer.seat)
    if gen is None:
        # The payer was removed, or changed seat or role, since the read (committed meanwhile, or
        # while this insert waited for the change: `_payers_locked`). Run again from the read,
        # which answers as for any start by them now; nothing of this attempt stays.
        raise Contended()
    posting = _hold_posting(req, caller, r)
    if r.price > 0:
        scope = spend_scope(ws["allocation_mode"], ws["pool_fallback"], member_id, group_id)
        rows = await optimistic.spendable(sql, req.ws_id, scope, now)
        try:
            draws = plan_draws(_spendable_buckets(rows), r.price, now)
        except NotEnough as short:
            raise InsufficientCredits(short.needed, short.available) from None
        for draw in draws:
            posting.add(draw.grant_id, EntryKind.HOLD, draw.units)
    posted = await optimistic.post(sql, posting)
    _started(sql, req, r)
    return Started(GenerationResult(GenerationRecord.of(gen), posted.entries, posted.grants),
                   automation.needs_after_spend(ws["auto_topup_enabled"], ws["low_balance_alert_units"], charges),
                   charges)


async def _reservation(
    sql: Sql, ws: Any, member_id: uuid.UUID, group_id: uuid.UUID | None, model_key: str,
    parameters: dict[str, Any], now: datetime, *, refuse: bool, generation_id: uuid.UUID | None = None,
) -> _Reservation | None:
    """The priced hold for the spender read `ws`. A refusal to price is raised when `refuse`,
    else None: the one-statement path leaves every refusal to the transaction path, which claims
    the key first (a replay must not be answered with today's catalog)."""
    if ws["price_list_id"] is None:
        if not refuse:
            return None
        raise ValidationFailed("modelKey", "no price list is in force yet")
    catalog = await catalog_by_id(sql, ws["price_list_id"])
    # The same function as `quote`; open-ended usage (output tokens, duration) holds the most
    # the request allows, and completion captures what was actually used.
    try:
        priced = quote_with(catalog, ws["plan_key"], model_key, parameters, now, open_ended_max=True)
    except DomainError:
        if refuse:
            raise
        return None
    return _Reservation(generation_id or time_ordered_id(), member_id, group_id, priced.quote.units,
                        priced.catalog.price_list.id, json.dumps(priced.as_json()), now)


def _hold_posting(req: StartRequest, caller: Caller, r: _Reservation) -> Posting:
    return Posting(req.ws_id, Cause.GENERATION, caller.actor.user_id, req.key, generation_id=r.generation_id,
                   member_id=r.member_id, occurred_at=r.now)


def _started(sql: Sql, req: StartRequest, r: _Reservation) -> None:
    events.emit(sql, req.ws_id, events.GENERATION_STARTED, generationId=str(r.generation_id),
                memberId=str(r.member_id), modelKey=req.model_key, cost=format_credits(r.price))


def check_parameters(parameters: dict[str, Any], field: str = "parameters") -> str:
    """Validate a JSON object from the client (a start's, a completion's usage, a quote's: the
    same bounds, so a quote never prices what a start would refuse); returns it as JSON text."""
    if not isinstance(parameters, dict):
        raise ValidationFailed(field, "must be a JSON object")
    try:
        text = json.dumps(parameters, separators=(",", ":"))
    except (TypeError, ValueError):
        raise ValidationFailed(field, "must be a JSON object") from None
    if len(text) > MAX_PARAMETERS_BYTES:
        raise ValidationFailed(field, f"must be at most {MAX_PARAMETERS_BYTES} bytes")
    return text


class Payer(NamedTuple):
    """The member whose credits pay a start, as the spender read found them: their billing group,
    and the role and seat the policy authorized (the write checks them again, `_payers_locked`)."""

    member_id: uuid.UUID
    group_id: uuid.UUID | None
    role: str
    seat: str


def _spender(caller: Caller, ws_id: uuid.UUID, ws: Any, target_id: uuid.UUID | None, *,
             refuse: bool = True) -> Payer | None:
    """The member whose credits pay, authorized to generate (creator seat).
    The caller's own right is always checked here. A member paid for who is gone or may not
    generate any more is refused when `refuse`, else None: a start names its key before that
    check (money rule 3: a replay answers with the first generation even after the member left
    or lost the creator seat; only a new start is refused)."""
    caller_roles = role_set(ws["caller_role"], ws["caller_seat"]) if ws and ws["caller_member_id"] else set()
    is_member = bool(caller_roles)
    if target_id is None:
        decide(caller, ws_id, Action.GENERATE, "workspace", caller_roles, is_member=is_member,
               workspace_exists=ws is not None)
        if not is_member:  # a platform identity allowed to generate would need a member to pay
            raise Forbidden(Action.GENERATE.value)
        return Payer(ws["caller_member_id"], ws["caller_group_id"], ws["caller_role"], ws["caller_seat"])
    decide(caller, ws_id, Action.START_FOR_MEMBER, "workspace", caller_roles, is_member=is_member,
           workspace_exists=ws is not None)
    if ws["target_id"] is None:
        if not refuse:
            return None
        raise NotFound("member")
    if not caller.authorizer.allows(str(ws["target_user_id"]), role_set(ws["target_role"], ws["target_seat"]),
                                    str(ws_id), Action.GENERATE):
        if not refuse:
            return None
        raise Forbidden(Action.GENERATE.value)
    return Payer(ws["target_id"], ws["target_group_id"], ws["target_role"], ws["target_seat"])


_SETTLING_COLUMNS = """g.*, p.user_id AS payer_user_id,
       c.id AS caller_member_id, c.role AS caller_role, c.seat AS caller_seat,
       w.allocation_mode, w.pool_fallback"""


def _settling_from(user: str) -> str:
    return f"""FROM generations g JOIN members p ON p.id = g.member_id JOIN workspaces w ON w.id = g.workspace_id
LEFT JOIN members c ON c.workspace_id = g.workspace_id AND c.user_id = {user} AND c.removed_at IS NULL
WHERE g.id = $1"""


# The generation (locked: it settles once), who paid, the caller's membership in its workspace,
# and the workspace's allocation mode, in one read.
_SETTLING = f"SELECT {_SETTLING_COLUMNS}\n{_settling_from('$2')}\nFOR UPDATE OF g"
# The same, unlocked, with the generation's entries and the grants they touched: everything a
# one-statement settlement plans from. (A generation's holds are written once, by its start, and
# a grant's kind and dates never change, so only the generation's status can go stale, and its
# limit charges: a limit set since may have charged it, `limits.count_period_so_far`; the
# writing statement checks both.)
# Parameters: the generation, and the caller's user id last (`CallerRead`).
def _settling_read(user: str) -> str:
    return f"""SELECT {_SETTLING_COLUMNS},
       (SELECT array_agg(e ORDER BY e.id) FROM ledger_entries e WHERE e.generation_id = g.id) AS entries,
       (SELECT array_agg(h) FROM grants h
        WHERE h.id IN (SELECT e.grant_id FROM ledger_entries e WHERE e.generation_id = g.id)) AS held_grants
{_settling_from(user)}"""


_SETTLING_READ = CallerRead(_settling_read, 2)
_ENTRIES_OF = "SELECT * FROM ledger_entries WHERE generation_id = $1 ORDER BY id"
_SETTLE_COLUMNS = """status = $2, captured_units = $3, released_units = $4, shortfall_units = $5,
    failure_kind = $6, settled_at = $7, settled_by = $8"""
_SETTLE = f"UPDATE generations SET {_SETTLE_COLUMNS}\nWHERE id = $1\nRETURNING *"
# A settlement as one statement (`Database.autocommit`): the generation moves out of STARTED (its
# row lock first, as everywhere), then the key is claimed and the posting written only if it did.
# Settled meanwhile, or charged to a limit since the read (this path adjusts no limit): nothing
# is written and no row comes back. A limit charging it concurrently holds its row lock: the
# UPDATE waits, and READ COMMITTED checks the row as that commit left it.
_UNCHARGED = "limit_charges = '[]'::jsonb"
_SETTLE_AT_ONCE = f"""
WITH settled AS (
    UPDATE generations AS sg SET {_SETTLE_COLUMNS}
    WHERE id = $1 AND status = 'STARTED' AND {_UNCHARGED}
    RETURNING sg AS row
), claim AS ({idempotency.claim_sql(9, "EXISTS (SELECT FROM settled)")}),
{_posting_ctes(15, "EXISTS (SELECT FROM claim)")}
SELECT (SELECT array_agg(row) FROM settled) AS generations, (SELECT count(*) FROM claim) AS claimed, {_POSTED}
"""
# Concurrent settlements in one workspace, coalesced: every generation of the batch is locked
# first (in id order) and must still be STARTED and charged to no limit (the locking subquery
# checks a row it waited for again, as it is once unlocked); then each moves out of STARTED, its
# key is claimed and its posting written, all or nothing. A generation settled or charged
# meanwhile (or named twice) writes nothing for the whole batch and no row comes back; each item
# then goes to the transaction path, which answers it canonically. (Not used for a lone
# settlement: the lock step costs PostgreSQL a tuple lock and a WAL record of its own, for
# nothing when the batch is one.)
_SETTLE_WHOLE = "(SELECT whole FROM locked)"
_SETTLE_BATCH = f"""
WITH locked AS (
    SELECT count(*) = cardinality($1::uuid[]) AS whole
    FROM (SELECT id FROM generations WHERE id = ANY($1::uuid[]) AND status = 'STARTED' AND {_UNCHARGED}
          ORDER BY id FOR UPDATE) AS l
), settled AS (
    UPDATE generations AS sg SET status = s.status, captured_units = s.captured, released_units = s.released,
        shortfall_units = s.shortfall, failure_kind = s.failure_kind, settled_at = s.settled_at,
        settled_by = s.settled_by
    FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::timestamptz[],
                $8::uuid[]) AS s(id, status, captured, released, shortfall, failure_kind, settled_at, settled_by)
    WHERE sg.id = s.id AND {_SETTLE_WHOLE}
    RETURNING sg AS row
), claim AS ({idempotency.claim_sql(9, _SETTLE_WHOLE)}),
{_posting_ctes(15, _SETTLE_WHOLE)}
SELECT (SELECT array_agg(row) FROM settled) AS generations, (SELECT count(*) FROM claim) AS claimed, {_POSTED}
"""  # `claimed` is read only to write the claims before the grants are locked (see `_POSTED`)


@dataclass(frozen=True, slots=True)
class _Settlement:
    """One settlement ready to write: the generation's new figures, its claim, its posting."""

    generation: tuple  # id, status, captured, released, shortfall, failure kind, settled at, settled by
    claim: tuple
    posting: Posting


async def write_settlements(sql: Sql, items: list[_Settlement]) -> list[GenerationResult | None]:
    """Write settlements as one statement; each one's settled generation and what its posting
    wrote (its new entries only), in order. All None when a generation was no longer STARTED
    (nothing was written)."""
    if len(items) == 1:
        [item] = items
        row = await sql.fetchrow(_SETTLE_AT_ONCE, *item.generation, *columns([item.claim], 6),
                                 *_posting_args(item.posting))
    else:
        row = await sql.fetchrow(_SETTLE_BATCH, *columns([i.generation for i in items], 8),
                                 *columns([i.claim for i in items], 6), *_posting_args(*(i.posting for i in items)))
    if row["generations"] is None:
        return [None] * len(items)
    return _per_generation(row, [i.posting for i in items])


@dataclass(slots=True)
class _Settling:
    """A generation being settled: its row (locked), its entries so far, what each grant still
    holds for it, and the posting that will settle it."""

    row: Any
    gen: GenerationRecord
    entries: list[EntryRecord]
    held: dict[uuid.UUID, int]
    posting: Posting


# How a settlement ends, decided from the generation and what it holds in all: its status, the
# units captured from the holds (the rest is released) and a failure kind; or None when only the
# transaction path can settle it.
Outcome = Callable[[Sql, GenerationRecord, int], Awaitable["tuple[GenerationStatus, int, FailureKind | None] | None"]]


async def complete_generation(
    db: Database, who: Who, *, generation_id: str, idempotency_key: str, actual_cost: str | None = None,
    usage: dict[str, Any] | None = None, payments: PaymentProvider | None = None,
) -> GenerationResult:
    """Capture the actual cost: `usage` (reported metering, priced with the generation's own
    price list version, window and plan multiplier), or an explicit `actual_cost`, or by default
    the held cost. Below the hold: the rest is released. Above it: the extra is drawn from the
    member's spendable credits in consumption order; what they cannot cover is recorded on the
    generation as `shortfall` (never silently dropped, never an overdraft). An extra drawn is a
    spend like a start's hold: the alerts and auto top-up after it run once it has committed."""

    def parse() -> tuple[str, int | None, uuid.UUID]:
        key = idempotency.check_key(idempotency_key)
        if actual_cost is not None and usage is not None:
            raise ValidationFailed("usage", "give the reported usage or an actual cost, not both")
        if usage is not None:
            check_parameters(usage, "usage")
        actual = parse_credits(actual_cost, "actualCost", allow_zero=True) if actual_cost is not None else None
        return key, actual, parse_id(generation_id, "generation")

    key, actual_units, gid = await validated(db, who, parse)
    request = {"generation": str(gid), "actual": actual_units, "usage": usage}
    optimistic = Optimistic()
    drew: list[GenerationRecord] = []  # the generation, when this settlement drew an extra above its hold

    async def within_the_hold(sql: Sql, gen: GenerationRecord, total_held: int):
        cost = await _actual_cost(sql, gen, actual_units, usage)
        return None if cost > total_held else (GenerationStatus.COMPLETED, cost, None)

    async def work(sql: RawSql) -> GenerationResult:
        drew.clear()  # a retried transaction decides again
        s = await _settling(sql, caller, gid, key, "completeGeneration", request)
        if isinstance(s, GenerationResult):
            return s
        gen = s.gen
        cost = await _actual_cost(sql, gen, actual_units, usage)
        total_held = sum(s.held.values())
        now = caller.clock.now()
        extra = max(0, cost - total_held)
        await limits.adjust(sql, gen.limit_charges, -(total_held - min(cost, total_held)))
        also = list(s.held)
        if extra:
            # The extra belongs to this generation: it draws with the group it started in (and
            # counts in the limits its hold counted in), not the member's group of today.
            scope = spend_scope(s.row["allocation_mode"], s.row["pool_fallback"], gen.member_id,
                                gen.billing_group_id)
            rows = await optimistic.spendable(sql, gen.workspace_id, scope, now, also=also)
        else:
            rows = await optimistic.grants(sql, also)
        captured = _capture_in_order(s.posting, rows, s.held, min(cost, total_held))
        _release_rest(s.posting, rows, s.held, now)
        shortfall = 0
        if extra:
            # Every hold was captured in full (nothing released), so the locked rows' remaining
            # figures are still exact for drawing the extra.
            spendable = _spendable_buckets(rows)
            take = min(extra, sum(b.available for b in spendable))
            if take:
                for draw in plan_draws(spendable, take, now):
                    s.posting.add(draw.grant_id, EntryKind.HOLD, draw.units)
                    s.posting.add(draw.grant_id, EntryKind.CAPTURE, draw.units)
                await limits.adjust(sql, gen.limit_charges, take)  # spent is spent: it counts
                drew[:] = [gen]
            captured += take
            shortfall = extra - take
        return await _settled(sql, optimistic, s, caller, GenerationStatus.COMPLETED, captured,
                              total_held - min(cost, total_held), shortfall, None, now)

    settlements = db.coalescer("settlements", write_settlements)
    done = await db.autocommit(lambda sql: settle_at_once(sql, who, gid, key, "completeGeneration", request,
                                                          within_the_hold, settlements), lost=None)
    if done is not None:
        return done
    caller = await authenticate(db, who)  # `work`'s caller; the read checked it (unless its connection was lost)
    done = await db.sql_transaction(work)
    if drew:
        # The extra counted in the limits and left the pool: a limit's 80 % or 100 %, a low
        # balance or a due top-up may have been reached here and by no start (the member's
        # next start may well be refused by that limit, which evaluates nothing).
        await automation.after_spend(db, who.clock, payments, drew[0].workspace_id, drew[0].limit_charges)
    return done


async def _actual_cost(sql: Sql, gen: GenerationRecord, actual_units: int | None, usage: dict[str, Any] | None) -> int:
    if usage is None:
        return gen.quoted_units if actual_units is None else actual_units
    if gen.price_list_id is None or gen.quote is None:
        raise ValidationFailed("usage", "this generation predates metered prices: give an actual cost")
    return (await reprice_usage(sql, gen.price_list_id, gen.model_key, gen.quote, usage)).units


async def fail_generation(
    db: Database, who: Who, rules: LedgerRules, *, generation_id: str, kind: FailureKind,
    idempotency_key: str,
) -> GenerationResult:
    """Technical failures and cancellations release everything back to the grants it came from,
    with their original expiry. A policy violation keeps `rules.policy_violation_fee` of the
    hold (rounded up to the unit) and releases the rest."""
    key, gid = await validated(db, who, lambda: (idempotency.check_key(idempotency_key),
                                                 parse_id(generation_id, "generation")))
    request = {"generation": str(gid), "kind": kind.value}
    optimistic = Optimistic()

    def fee(total: int) -> int:
        if kind is not FailureKind.POLICY_VIOLATION:
            return 0
        return int((Decimal(total) * rules.policy_violation_fee).to_integral_value(rounding=ROUND_CEILING))

    async def failed(sql: Sql, gen: GenerationRecord, total_held: int):
        return GenerationStatus.FAILED, fee(total_held), kind

    async def work(sql: RawSql) -> GenerationResult:
        s = await _settling(sql, caller, gid, key, "failGeneration", request)
        if isinstance(s, GenerationResult):
            return s
        now = caller.clock.now()
        total = sum(s.held.values())
        kept = fee(total)
        await limits.adjust(sql, s.gen.limit_charges, -(total - kept))
        rows = await optimistic.grants(sql, list(s.held))
        captured = _capture_in_order(s.posting, rows, s.held, kept)
        _release_rest(s.posting, rows, s.held, now)
        return await _settled(sql, optimistic, s, caller, GenerationStatus.FAILED, captured, total - captured, 0, kind, now)

    settlements = db.coalescer("settlements", write_settlements)
    done = await db.autocommit(
        lambda sql: settle_at_once(sql, who, gid, key, "failGeneration", request, failed, settlements), lost=None)
    if done is not None:
        return done
    caller = await authenticate(db, who)  # `work`'s caller; the read checked it (unless its connection was lost)
    return await db.sql_transaction(work)


async def settle_at_once(
    sql: Sql, who: Who, gid: uuid.UUID, key: str, operation: str, request: dict[str, Any], outcome: Outcome,
    settlements: Coalescer[_Settlement, GenerationResult | None] | None = None,
) -> GenerationResult | None:
    """A settlement within the hold as two statements outside a transaction: `_SETTLING_READ`
    (authenticating `who` when it is credentials), then `_SETTLE_AT_ONCE` (alone, or in a batch
    with the concurrent settlements in the same workspace when `settlements` is given). None when
    it needs the transaction path (nothing was written): a replay or an already settled
    generation, spend-limit usage to adjust (charged at its start, or by a limit set since, even
    after this read), a capture above the hold, or any refusal (answered there, after the key is
    claimed)."""
    caller, row = await _SETTLING_READ.fetchrow(sql, who, gid)
    gen = _may_settle(caller, row)
    if gen.status is not GenerationStatus.STARTED or gen.limit_charges:
        return None
    entries = [EntryRecord.of(e) for e in row["entries"] or ()]
    held = held_by_grant(entries)
    total = sum(held.values())
    try:
        decided = await outcome(sql, gen, total)
    except DomainError:
        return None
    if decided is None:
        return None
    status, capture, failure = decided
    now = caller.clock.now()
    grants = {g["id"]: g for g in row["held_grants"] or ()}
    posting = _settle_posting(gen, caller, key, now)
    captured = _capture_in_order(posting, grants, held, capture)
    _release_rest(posting, grants, held, now)
    item = _Settlement(
        (gen.id, status.value, captured, total - captured, 0, failure.value if failure else None, now,
         caller.actor.user_id),
        idempotency.claim_args(workspace_id=gen.workspace_id, actor_id=caller.actor.user_id, key=key,
                               operation=operation, request=request, result_id=gen.id),
        posting)
    try:
        # Concurrent settlements in one workspace share a statement and a commit (`Coalescer`).
        out = (await settlements.submit(gen.workspace_id, sql, item) if settlements
               else (await write_settlements(sql, [item]))[0])
    except _REFUSED_AT_ONCE:
        return None
    if out is None:
        return None  # settled by someone else since the read
    if posting.movements:
        events.emit(sql, gen.workspace_id, events.BALANCE_CHANGED)
    _emit_settled(sql, out.generation)
    return GenerationResult(out.generation, entries + out.entries, out.grants)


def _may_settle(caller: Caller, row: Any) -> GenerationRecord:
    """Authorize settling the generation in `row` (a `_SETTLING` read), from its own workspace."""
    if row is None:
        raise NotFound("generation")
    gen = GenerationRecord.of(row)
    roles = role_set(row["caller_role"], row["caller_seat"]) if row["caller_member_id"] else set()
    decide(caller, gen.workspace_id, Action.SETTLE_GENERATIONS, "generation", roles, is_member=bool(roles),
           workspace_exists=True)
    # Money rule 8, beyond the policy: whoever's credits paid never settles it, not even an
    # operator who is also that member (settling decides the refund).
    if row["payer_user_id"] == caller.actor.user_id:
        raise Forbidden("members cannot settle their own generations")
    return gen


def _settle_posting(gen: GenerationRecord, caller: Caller, key: str, now: datetime) -> Posting:
    return Posting(gen.workspace_id, Cause.GENERATION, caller.actor.user_id, key, generation_id=gen.id,
                   member_id=gen.member_id, occurred_at=now)


def _emit_settled(sql: Sql, gen: GenerationRecord) -> None:
    events.emit(sql, gen.workspace_id, events.GENERATION_SETTLED, generationId=str(gen.id),
                memberId=str(gen.member_id), status=gen.status.value, captured=format_credits(gen.captured_units),
                released=format_credits(gen.released_units), shortfall=format_credits(gen.shortfall_units))


async def _settling(
    sql: Sql, caller: Caller, gid: uuid.UUID, key: str, operation: str, request: dict[str, Any]
) -> _Settling | GenerationResult:
    """Lock the generation, authorize settling it (from its own workspace), and claim the key.
    Returns what to settle, or the first result when the same request already settled it. A
    second, different settlement is refused."""
    row = await sql.fetchrow(_SETTLING, gid, caller.actor.user_id)
    gen = _may_settle(caller, row)
    first = await idempotency.claim(
        sql, workspace_id=gen.workspace_id, actor_id=caller.actor.user_id, key=key, operation=operation,
        request=request, result_id=gen.id,
    )
    if first is not None:
        return await generation_result(sql, gen.id)
    if gen.status is not GenerationStatus.STARTED:
        raise GenerationAlreadySettled(gen.status.value)
    entries = [EntryRecord.of(e) for e in await sql.fetch(_ENTRIES_OF, gen.id)]
    return _Settling(row, gen, entries, held_by_grant(entries), _settle_posting(gen, caller, key, caller.clock.now()))


async def _settled(
    sql: Sql, optimistic: Optimistic, s: _Settling, caller: Caller, status: GenerationStatus, captured: int,
    released: int, shortfall: int, failure: FailureKind | None, now: datetime,
) -> GenerationResult:
    # The generation row first: the grants' row locks are taken by the posting, the last
    # statement before COMMIT.
    gen = GenerationRecord.of(await sql.fetchrow(
        _SETTLE, s.gen.id, status.value, captured, released, shortfall, failure.value if failure else None, now,
        caller.actor.user_id,
    ))
    posted = await optimistic.post(sql, s.posting)
    _emit_settled(sql, gen)
    return GenerationResult(gen, s.entries + posted.entries, posted.grants)


async def time_out(session: AsyncSession, due: list[tuple[Generation, datetime]]) -> None:
    """Release every hold of generations that ran past their time-to-live, each at its own
    deadline, and mark them TIMED_OUT (the caller locked the generation rows).

    The locks in the order every other path takes them: the spend limits' usage rows (by limit),
    then all the grants at once, by id. Taken generation by generation, the batch held one
    generation's grants while it waited for the next one's limit or grants, which a start or a
    settlement (or another tick) holding those and waiting for the first ones turned into a
    deadlock."""
    sql = as_sql(session)
    entries: dict[uuid.UUID, list[EntryRecord]] = {}
    for row in await sql.fetch("SELECT * FROM ledger_entries WHERE generation_id = ANY($1::uuid[]) ORDER BY id",
                               [gen.id for gen, _ in due]):
        entries.setdefault(row["generation_id"], []).append(EntryRecord.of(row))
    held = {gen.id: held_by_grant(entries.get(gen.id, [])) for gen, _ in due}
    released = {gen.id: sum(held[gen.id].values()) for gen, _ in due}
    charges = sorted(((c, released[gen.id]) for gen, _ in due for c in gen.limit_charges),
                     key=lambda charge: (charge[0]["limit"], charge[0]["period"]))
    for charge, units in charges:
        await limits.adjust(sql, [charge], -units)
    rows = await _lock_grants(sql, sorted({grant_id for h in held.values() for grant_id in h}))
    for gen, deadline in due:
        posting = Posting(gen.workspace_id, Cause.GENERATION, None, None, generation_id=gen.id,
                          member_id=gen.member_id, occurred_at=deadline)
        _release_rest(posting, rows, held[gen.id], deadline)
        await post_movements(sql, posting)
        gen.status = GenerationStatus.TIMED_OUT
        gen.released_units = released[gen.id]
        gen.settled_at = deadline
        events.emit(session, gen.workspace_id, events.GENERATION_SETTLED, generationId=str(gen.id),
                    memberId=str(gen.member_id), status=GenerationStatus.TIMED_OUT.value, captured=format_credits(0),
                    released=format_credits(released[gen.id]), shortfall=format_credits(0))
    await session.flush()


def held_by_grant(entries: list[EntryRecord]) -> dict[uuid.UUID, int]:
    """What a generation still holds on each grant, from its own ledger entries."""
    held: dict[uuid.UUID, int] = {}
    for e in entries:
        sign = {EntryKind.HOLD: 1, EntryKind.RELEASE: -1, EntryKind.CAPTURE: -1}.get(e.kind, 0)
        held[e.grant_id] = held.get(e.grant_id, 0) + sign * e.amount
    return {g: u for g, u in held.items() if u > 0}


async def _lock_grants(sql: Sql, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    if not ids:
        return {}
    return {r["id"]: r for r in await sql.fetch(_LOCK_GRANTS, ids)}


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
        expires_at = rows[gid]["expires_at"]
        if units and expires_at is not None and expires_at <= now:
            posting.add(gid, EntryKind.EXPIRE, units)
    held.clear()


async def generation_result(tx: AsyncSession | Sql, generation_id: uuid.UUID) -> GenerationResult:
    """A generation as it stands: its row, its entries, and the grants they touched."""
    sql = as_sql(tx)
    gen = GenerationRecord.of(await sql.fetchrow("SELECT * FROM generations WHERE id = $1", generation_id))
    entries = [EntryRecord.of(e) for e in await sql.fetch(_ENTRIES_OF, generation_id)]
    grants = {}
    if entries:
        rows = await sql.fetch("SELECT * FROM grants WHERE id = ANY($1::uuid[])", list({e.grant_id for e in entries}))
        grants = {r["id"]: GrantRecord.of(r) for r in rows}
    return GenerationResult(gen, entries, grants)
