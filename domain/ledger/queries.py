"""Reading the ledger: balances (from grant rows, never by summing entries), the entry history
with cursor pagination, generations with their holds, captures and releases, credit packs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, member_roles, parse_id
from domain.db import Database, as_sql
from domain.errors import NotFound, ValidationFailed
from domain.ledger.consumption import Scope, may_draw
from domain.ledger.models import (
    CreditPack,
    EntryKind,
    Generation,
    GenerationStatus,
    Grant,
    LedgerEntry,
)
from domain.ledger.service import SPENDABLE, GenerationResult, generation_result, spend_scope
from domain.pages import Page, decode_id_cursor, decode_time_cursor, encode_cursor, page_size, parse_filter_id
from domain.periods.renewal import lost_by, renewal_seen_from
from domain.workspaces.models import AllocationMode, Member, Workspace
from policies import Action

MAX_EXPIRY_WINDOW_DAYS = 3660


@dataclass(frozen=True, slots=True)
class ScopeBalance:
    scope: Scope
    member_id: uuid.UUID | None  # a SEAT's member
    billing_group_id: uuid.UUID | None  # a GROUP's billing group
    available: int
    held: int


@dataclass(frozen=True, slots=True)
class ExpiringGrant:
    grant: Grant
    expires: int  # what of its remaining credits is lost (the rest rolls over at the period's close)


@dataclass(frozen=True, slots=True)
class Balance:
    workspace_id: uuid.UUID
    allocation_mode: AllocationMode
    pool_fallback: bool
    available: int  # spendable now, all scopes
    held: int
    scopes: list[ScopeBalance]
    viewer_spendable: int  # what the viewer could spend now (0 without a creator seat)
    grants: list[Grant]  # live grants: with credits remaining or held, or not yet effective
    expiring: list[ExpiringGrant]  # grants that lose credits to expiry within the window
    expiring_units: int  # what they lose
    as_of: datetime


def _spendable_now(g, now: datetime) -> bool:
    return g.effective_at <= now and (g.expires_at is None or g.expires_at > now)


def scope_totals(grants, now: datetime) -> list[ScopeBalance]:
    """Available (spendable now) and held credits per scope: the pool, each seat, each billing
    group; from grant rows or snapshots."""
    per_scope: dict[tuple[Scope, uuid.UUID | None, uuid.UUID | None], list[int]] = {}
    for g in grants:
        figures = per_scope.setdefault((g.scope, g.member_id, g.billing_group_id), [0, 0])
        figures[0] += g.remaining if _spendable_now(g, now) else 0
        figures[1] += g.held
    return [ScopeBalance(s, m, b, f[0], f[1]) for (s, m, b), f in per_scope.items()]


async def workspace_balance(db: Database, caller: Caller, *, workspace_id: str, expiring_within_days: int = 7) -> Balance:
    ws_id = parse_id(workspace_id, "workspace")
    if not 0 <= expiring_within_days <= MAX_EXPIRY_WINDOW_DAYS:
        raise ValidationFailed("expiringWithinDays", f"must be between 0 and {MAX_EXPIRY_WINDOW_DAYS}")

    async def work(session: AsyncSession) -> Balance:
        me = await authorize(session, caller, ws_id, Action.VIEW_BALANCE, what="workspace")
        ws = await session.get_one(Workspace, ws_id)
        now = caller.clock.now()
        # The partial index ix_grants_live keeps this proportional to live grants, not history.
        grants = list((await session.execute(
            select(Grant).where(Grant.workspace_id == ws_id, Grant.live)
            .order_by(Grant.scope, Grant.member_id, Grant.priority, Grant.expires_at.nulls_last(), Grant.created_at)
        )).scalars())
        scopes = scope_totals(grants, now)
        horizon = now + timedelta(days=expiring_within_days)
        # What will really be lost by the horizon: under a ROLLOVER rule the close keeps part of
        # the allowance (the close's own rule, from the workspace row: `renewal`), so only the
        # rest of it expires.
        soon = [g for g in grants if g.remaining > 0 and g.expires_at is not None and now < g.expires_at <= horizon]
        lost = lost_by(soon, await renewal_seen_from(session, ws, grants, horizon), horizon)
        # From the grants just read (every grant with credits is live), as a live balance does:
        # no statement of its own.
        viewer = spendable_in(grants, ws.allocation_mode, ws.pool_fallback, spender_of(caller, ws.id, me), now)
        return Balance(
            workspace_id=ws_id, allocation_mode=ws.allocation_mode, pool_fallback=ws.pool_fallback,
            available=sum(s.available for s in scopes), held=sum(s.held for s in scopes), scopes=scopes,
            viewer_spendable=viewer, grants=grants, expiring=[ExpiringGrant(g, lost[g.id]) for g in soon if g.id in lost],
            expiring_units=sum(lost.values()), as_of=now,
        )

    return await db.read(work)


def spender_of(caller: Caller, ws_id: uuid.UUID, me: Member | None) -> Member | None:
    """The viewer's membership when it may generate (what they could spend follows the
    allocation mode), else None (they could spend nothing)."""
    if me is None or not caller.authorizer.allows(str(caller.actor.user_id), member_roles(me), str(ws_id),
                                                  Action.GENERATE):
        return None
    return me


def spendable_in(grants, mode: AllocationMode, pool_fallback: bool, spender: Member | None, now: datetime) -> int:
    """What `spender` could spend now out of a workspace's live `grants` (rows or snapshots):
    the credits of the grants the allocation mode lets their spend draw from (`may_draw`)."""
    if spender is None:
        return 0
    return sum(g.remaining for g in grants if _spendable_now(g, now) and may_draw(
        mode, pool_fallback, spender.id, spender.billing_group_id, g.scope, g.member_id, g.billing_group_id))


async def spendable_units(session: AsyncSession, caller: Caller, ws: Workspace, me: Member | None) -> int:
    """What the viewer could spend right now: 0 without a generate permission, else the sum of
    the grants the allocation mode lets their spend draw from (in SQL: no grant rows read)."""
    if spender_of(caller, ws.id, me) is None:
        return 0
    scope = spend_scope(ws.allocation_mode, ws.pool_fallback, me.id, me.billing_group_id)
    total = await as_sql(session).fetchval(_SPENDABLE_TOTAL, ws.id, *scope.args(), caller.clock.now())
    return int(total)


_SPENDABLE_TOTAL = f"SELECT coalesce(sum(g.remaining), 0) FROM grants g WHERE g.workspace_id = $1 AND {SPENDABLE}"


# --- live balance snapshots (read once per workspace, viewed per subscriber) ----------------------

@dataclass(frozen=True, slots=True)
class LiveGrant:
    scope: Scope
    member_id: uuid.UUID | None
    billing_group_id: uuid.UUID | None
    remaining: int
    held: int
    effective_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A workspace's committed live grants: one read serves every subscriber of a process."""

    workspace_id: uuid.UUID
    allocation_mode: AllocationMode
    pool_fallback: bool
    grants: tuple[LiveGrant, ...]
    as_of: datetime


async def balance_snapshot(db: Database, workspace_id: uuid.UUID, now: datetime) -> Snapshot:
    """Internal: no authorization. Callers authorize the subscriber themselves."""

    async def work(session: AsyncSession) -> Snapshot:
        ws = await session.get_one(Workspace, workspace_id)
        g = Grant.__table__
        rows = await session.execute(
            select(g.c.scope, g.c.member_id, g.c.billing_group_id, g.c.remaining, g.c.held, g.c.effective_at,
                   g.c.expires_at)
            .where(g.c.workspace_id == workspace_id, g.c.live)
        )
        grants = tuple(LiveGrant(Scope(r.scope), r.member_id, r.billing_group_id, r.remaining, r.held, r.effective_at,
                                 r.expires_at) for r in rows)
        return Snapshot(workspace_id, ws.allocation_mode, ws.pool_fallback, grants, now)

    return await db.read(work)


@dataclass(frozen=True, slots=True)
class BalanceView:
    workspace_id: uuid.UUID
    available: int
    held: int
    viewer_spendable: int
    scopes: list[ScopeBalance]
    as_of: datetime


def view_of(snapshot: Snapshot, spender: Member | None) -> BalanceView:
    """The balance as one subscriber sees it. `spender` is their membership when they may
    generate (their spendable amount follows the allocation mode), else None."""
    now = snapshot.as_of
    scopes = scope_totals(snapshot.grants, now)
    spendable = spendable_in(snapshot.grants, snapshot.allocation_mode, snapshot.pool_fallback, spender, now)
    return BalanceView(
        workspace_id=snapshot.workspace_id, available=sum(s.available for s in scopes),
        held=sum(s.held for s in scopes), viewer_spendable=spendable, scopes=scopes, as_of=now,
    )


@dataclass(frozen=True, slots=True)
class LedgerFilter:
    kinds: list[EntryKind] | None = None
    member_id: str | None = None
    generation_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def ledger_page(
    db: Database, caller: Caller, *, workspace_id: str, first: int = 50, after: str | None = None,
    filter: LedgerFilter | None = None,
) -> Page:
    """Newest first. The cursor is the entry id, so pages stay stable while entries are added."""
    ws_id = parse_id(workspace_id, "workspace")
    size = page_size(first)
    after_id = decode_id_cursor(after, "entry")
    f = filter or LedgerFilter()
    member = parse_filter_id(f.member_id, "filter.memberId")
    generation = parse_filter_id(f.generation_id, "filter.generationId")

    async def work(session: AsyncSession) -> Page:
        await authorize(session, caller, ws_id, Action.VIEW_LEDGER, what="workspace")
        conds = [LedgerEntry.workspace_id == ws_id]
        if after_id is not None:
            conds.append(LedgerEntry.id < after_id)
        if f.kinds:
            conds.append(LedgerEntry.kind.in_(f.kinds))
        if member is not None:
            conds.append(LedgerEntry.member_id == member)
        if generation is not None:
            conds.append(LedgerEntry.generation_id == generation)
        # By business time, as creditSchedule's breakage: an expiry or a period close written
        # late (downtime, a cron tick) belongs to when it happened, not to when it was written.
        if f.since:
            conds.append(LedgerEntry.occurred_at >= f.since)
        if f.until:
            conds.append(LedgerEntry.occurred_at < f.until)
        rows = list((await session.execute(
            select(LedgerEntry).where(and_(*conds)).order_by(LedgerEntry.id.desc()).limit(size + 1)
        )).scalars())
        items = rows[:size]
        return Page(items, [encode_cursor("entry", str(e.id)) for e in items], len(rows) > size)

    return await db.read(work)


async def generations_page(
    db: Database, caller: Caller, *, workspace_id: str, first: int = 50, after: str | None = None,
    status: GenerationStatus | None = None, member_id: str | None = None,
) -> Page:
    """Newest first. Holders of `ledger.view` see every generation; anyone else who can see the
    workspace sees their own."""
    ws_id = parse_id(workspace_id, "workspace")
    size = page_size(first)
    after_value = decode_time_cursor(after, "generation")
    member = parse_filter_id(member_id, "memberId")

    async def work(session: AsyncSession) -> Page:
        me = await authorize(session, caller, ws_id, Action.VIEW_WORKSPACE, what="workspace")
        conds = [Generation.workspace_id == ws_id]
        if not _sees_all(caller, me, ws_id):
            conds.append(Generation.member_id == (me.id if me else None))
        if status is not None:
            conds.append(Generation.status == status)
        if member is not None:
            conds.append(Generation.member_id == member)
        if after_value is not None:
            at, gid = after_value
            conds.append(or_(Generation.created_at < at, and_(Generation.created_at == at, Generation.id < gid)))
        rows = list((await session.execute(
            select(Generation.id, Generation.created_at).where(and_(*conds))
            .order_by(Generation.created_at.desc(), Generation.id.desc()).limit(size + 1)
        )).all())
        items = [await generation_result(session, r.id) for r in rows[:size]]
        cursors = [encode_cursor("generation", f"{r.created_at.isoformat()}|{r.id}") for r in rows[:size]]
        return Page(items, cursors, len(rows) > size)

    return await db.read(work)


def _sees_all(caller: Caller, me: Member | None, ws_id: uuid.UUID) -> bool:
    return caller.authorizer.allows(str(caller.actor.user_id), caller.roles(me), str(ws_id), Action.VIEW_LEDGER)


async def get_generation(db: Database, caller: Caller, *, generation_id: str) -> GenerationResult:
    gid = parse_id(generation_id, "generation")

    async def work(session: AsyncSession) -> GenerationResult:
        gen = await session.get(Generation, gid)
        if gen is None:
            raise NotFound("generation")
        roles_ok = caller.platform_roles() & {"platform:service", "platform:operator"}
        if not roles_ok:
            me = await authorize(session, caller, gen.workspace_id, Action.VIEW_WORKSPACE, what="generation")
            if not _sees_all(caller, me, gen.workspace_id) and (me is None or gen.member_id != me.id):
                raise NotFound("generation")
        return await generation_result(session, gid)

    return await db.read(work)


async def credit_packs(db: Database, *, include_inactive: bool = False) -> list[CreditPack]:
    async def work(session: AsyncSession) -> list[CreditPack]:
        q = select(CreditPack).order_by(CreditPack.units)
        if not include_inactive:
            q = q.where(CreditPack.is_active)
        return list((await session.execute(q)).scalars())

    return await db.read(work)
