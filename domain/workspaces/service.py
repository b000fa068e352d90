"""Workspace and membership services. Each public function is one transaction.

Seat caps and the last-owner rule are checked while holding the workspace row lock
(`SELECT ... FOR UPDATE`), so two concurrent adds can never both take the last seat and two
owners demoting each other can never leave the workspace ownerless. Lock order everywhere:
workspace row first, then member rows.

Only a caller allowed to change the workspace ever queues on that lock (`_authorized_lock`): the
caller is authorized first, without a lock, so an outsider holding a foreign id hears the same
NotFound as for an unknown id at once, and cannot make the workspace's own changes wait behind
theirs. Once the lock is held, the caller's membership is read again, and everything the lock
protects (seats, owners, the target member) is read under it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from dataclasses import dataclass, replace

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from domain import events
from domain.governance import audit, automation, overages
from domain.governance.rules import check_timezone
from domain.access import Caller, authorize, authorized_lock, member_roles, parse_id
from domain.db import Database
from domain.errors import AlreadyMember, Forbidden, NotFound, ValidationFailed
from domain.identity import clean_name, get_or_create_user
from domain.periods.rules import next_day
from domain.periods.service import close_due_periods, open_workspace
from domain.plans import Plan, plan_by_key
from domain.workspaces.models import AllocationMode, Member, Role, Seat, Workspace
from domain.workspaces.rules import SeatUsage, check_owner_kept, check_seats
from policies import Action


@dataclass(frozen=True, slots=True)
class WorkspaceDetail:
    workspace: Workspace
    plan: Plan
    members: list[Member]
    viewer: Member | None

    @property
    def usage(self) -> SeatUsage:
        return SeatUsage(
            members=len(self.members),
            creators=sum(m.seat is Seat.CREATOR for m in self.members),
            owners=sum(m.role is Role.OWNER for m in self.members),
        )


@dataclass(frozen=True, slots=True)
class Membership:
    workspace: Workspace
    plan: Plan
    member: Member


async def _lock_workspace(session: AsyncSession, workspace_id: uuid.UUID) -> tuple[Workspace, Plan]:
    # Serializes every seat- and owner-changing transaction of one workspace (see module doc).
    # populate_existing: the row as the lock found it, not as an earlier read of this session did.
    ws = (
        await session.execute(
            select(Workspace).where(Workspace.id == workspace_id).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if ws is None:
        raise NotFound("workspace")
    return ws, await session.get_one(Plan, ws.plan_id)


async def _authorized_lock(
    session: AsyncSession, caller: Caller, workspace_id: uuid.UUID, action: Action, *, what: str
) -> tuple[Workspace, Plan, Member | None]:
    """`access.authorized_lock` on the workspace row (`_lock_workspace`): the row, its plan, and
    the caller's membership as the check under the lock read it."""
    (ws, plan), me = await authorized_lock(session, caller, workspace_id, action, what=what,
                                           lock=lambda: _lock_workspace(session, workspace_id))
    return ws, plan, me


async def _close_due_periods(db: Database, caller: Caller, workspace_id: uuid.UUID, action: Action, *,
                             what: str, hold_ttl: timedelta) -> None:
    """Before a change to what a period close (or the day's free credits) reads: the plan, the
    allocation mode, who holds a creator seat. The boundaries already due close first, under
    what held when they came, in a transaction of their own (`periods.close_due_periods`), so
    the change applies from the next boundary however late the scheduler runs. Authorized
    first: an outsider triggers nothing and waits on nothing. `hold_ttl`: the server's hold
    time-to-live (the scheduler's), for the holds the close releases first."""
    async def work(session: AsyncSession) -> None:
        await authorize(session, caller, workspace_id, action, what=what)
        await close_due_periods(session, workspace_id, caller.clock.now(), hold_ttl=hold_ttl)

    await db.transaction(work)


async def _close_due_periods_of_member(db: Database, caller: Caller, member_id: str, *, hold_ttl: timedelta) -> None:
    """`_close_due_periods` before a change to a member's seat or their removal."""
    mid = parse_id(member_id, "member")
    found = await db.read(lambda session: session.get(Member, mid))
    if found is not None and found.removed_at is None:
        await _close_due_periods(db, caller, found.workspace_id, Action.MANAGE_MEMBERS, what="member",
                                 hold_ttl=hold_ttl)


async def _usage(session: AsyncSession, workspace_id: uuid.UUID) -> SeatUsage:
    row = (
        await session.execute(
            select(
                func.count(),
                func.count(case((Member.seat == Seat.CREATOR, 1))),
                func.count(case((Member.role == Role.OWNER, 1))),
            ).where(Member.workspace_id == workspace_id, Member.removed_at.is_(None))
        )
    ).one()
    return SeatUsage(members=row[0], creators=row[1], owners=row[2])


def _apply(usage: SeatUsage, *, remove: Member | None = None, add: tuple[Role, Seat] | None = None) -> SeatUsage:
    members, creators, owners = usage.members, usage.creators, usage.owners
    if remove is not None:
        members -= 1
        creators -= remove.seat is Seat.CREATOR
        owners -= remove.role is Role.OWNER
    if add is not None:
        members += 1
        creators += add[1] is Seat.CREATOR
        owners += add[0] is Role.OWNER
    return replace(usage, members=members, creators=creators, owners=owners)


def _require_owner_powers(caller: Caller, workspace_id: uuid.UUID, member: Member | None) -> None:
    """Only an owner can make or unmake an owner (no privilege escalation by admins)."""
    roles = member_roles(member)
    if not caller.authorizer.allows(str(caller.actor.user_id), roles, str(workspace_id), Action.MANAGE_OWNERS):
        raise Forbidden(Action.MANAGE_OWNERS.value)


def _settings(ws: Workspace) -> dict:
    """A workspace's settings as its audit entries show them (created, and before/after updates)."""
    return {"name": ws.name, "plan": ws.plan_id, "allocationMode": ws.allocation_mode,
            "poolFallback": ws.pool_fallback, "paidCreatorSeats": ws.paid_creator_seats, "timezone": ws.timezone}


async def create_workspace(
    db: Database, caller: Caller, *, name: str, plan_key: str, allocation_mode: AllocationMode
) -> Membership:
    if caller.actor.is_service:
        raise Forbidden("service accounts cannot own workspaces")
    name = clean_name(name)

    async def work(session: AsyncSession) -> Membership:
        plan = await plan_by_key(session, plan_key)
        now = caller.clock.now()
        ws = Workspace(name=name, plan_id=plan.id, allocation_mode=allocation_mode, billing_anchor=now,
                       period_start=now, next_renewal_at=now)
        session.add(ws)
        await session.flush()
        seat = Seat.CREATOR if ws.creator_seat_limit(plan) > 0 else Seat.STANDARD
        owner = Member(workspace_id=ws.id, user_id=caller.actor.user_id, role=Role.OWNER, seat=seat)
        session.add(owner)
        await session.flush()
        await open_workspace(session, ws, plan, now)  # first period, allowance, trial, daily credits
        await session.refresh(ws)
        await session.refresh(owner)
        audit.record(session, ws.id, caller.actor.user_id, "workspace.created", "workspace", ws.id,
                     after={**_settings(ws), "owner": owner.id, "ownerSeat": owner.seat}, at=now)
        return Membership(ws, plan, owner)

    return await db.transaction(work)


async def update_workspace(
    db: Database,
    caller: Caller,
    *,
    workspace_id: str,
    hold_ttl: timedelta,
    name: str | None = None,
    plan_key: str | None = None,
    allocation_mode: AllocationMode | None = None,
    paid_creator_seats: int | None = None,
    pool_fallback: bool | None = None,
    timezone: str | None = None,
) -> Workspace:
    """Switching the allocation mode moves no credit: every grant keeps its scope, amounts and
    dates; the mode only decides which grants a spend may draw from (domain.ledger.service).
    `hold_ttl` (here and for the member changes below): the server's hold time-to-live, for the
    catch-up close (`_close_due_periods`)."""
    ws_id = parse_id(workspace_id, "workspace")
    if name is not None:
        name = clean_name(name)
    if paid_creator_seats is not None and not 0 <= paid_creator_seats <= 100_000:
        raise ValidationFailed("paidCreatorSeats", "must be between 0 and 100000")

    async def work(session: AsyncSession) -> Workspace:
        ws, plan, _ = await _authorized_lock(session, caller, ws_id, Action.MANAGE_WORKSPACE, what="workspace")
        before = _settings(ws)  # read before anything below changes the row
        limits_before = (plan.seat_cap, ws.creator_seat_limit(plan))
        if plan_key is not None:
            # A plan change applies from the next boundary: this period's allowance, banked
            # rollover credits and purchased credits all stay as they are (see README).
            plan = await plan_by_key(session, plan_key)
            ws.plan_id = plan.id
            if plan.daily_free_units > 0 and ws.next_daily_at is None:
                ws.next_daily_at = next_day(caller.clock.now())
        if paid_creator_seats is not None:
            # Seats paid for above the plan's seat cap could never be filled (`creator_seat_limit`):
            # refused, not recorded for someone to be charged. A later plan with a lower cap keeps
            # what was paid (the seats already filled are checked below).
            most = plan.seat_cap - plan.free_creator_seats
            if paid_creator_seats > most:
                raise ValidationFailed("paidCreatorSeats", f"at most {most} on plan {plan.key}: its seat cap is "
                                                           f"{plan.seat_cap}, {plan.free_creator_seats} creator seats free")
            ws.paid_creator_seats = paid_creator_seats
        if timezone is not None and check_timezone(timezone) != ws.timezone:
            ws.timezone = timezone
            await automation.follow_timezone(session, ws_id, timezone, caller.clock.now())
        if name is not None:
            ws.name = name
        if allocation_mode is not None or pool_fallback is not None:
            # What each member may spend changes with the mode: balance subscribers re-read.
            events.emit(session, ws_id, events.BALANCE_CHANGED)
        if allocation_mode is not None:
            ws.allocation_mode = allocation_mode
        if pool_fallback is not None:
            ws.pool_fallback = pool_fallback
        # A smaller plan (or fewer paid seats) must still hold everyone already seated; a change
        # that lowers no limit goes through even where an operator's plan edit left the workspace
        # over one.
        usage = await _usage(session, ws_id)
        check_seats(usage, seat_cap=plan.seat_cap, creator_limit=ws.creator_seat_limit(plan),
                    before=usage, limits_before=limits_before)
        audit.record(session, ws_id, caller.actor.user_id, "workspace.updated", "workspace", ws_id,
                     before=before, after=_settings(ws), at=caller.clock.now())
        await session.flush()
        return ws

    if plan_key is not None or allocation_mode is not None:  # what a close issues, and to whom
        await _close_due_periods(db, caller, ws_id, Action.MANAGE_WORKSPACE, what="workspace", hold_ttl=hold_ttl)
    return await db.transaction(work)


async def cancel_subscription(db: Database, caller: Caller, *, workspace_id: str) -> Workspace:
    """No allowance is issued after the current period; everything already granted (purchased
    packs, banked rollover, this period's allowance) stays until its own expiry. Auto top-up is
    turned off with it: a cancelled subscription is never charged again on its own."""
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> Workspace:
        ws, _, _ = await _authorized_lock(session, caller, ws_id, Action.MANAGE_WORKSPACE, what="workspace")
        if ws.cancelled_at is None:
            ws.cancelled_at = caller.clock.now()
            audit.record(session, ws_id, caller.actor.user_id, "workspace.cancelled", "workspace", ws_id,
                         at=ws.cancelled_at)
            await automation.stop_for_cancellation(session, ws, caller.actor.user_id, ws.cancelled_at)
        await session.flush()
        return ws

    return await db.transaction(work)


async def add_member(
    db: Database, caller: Caller, *, workspace_id: str, email: str, role: Role, seat: Seat, hold_ttl: timedelta
) -> Member:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> Member:
        ws, plan, me = await _authorized_lock(session, caller, ws_id, Action.MANAGE_MEMBERS, what="workspace")
        if role is Role.OWNER:
            _require_owner_powers(caller, ws_id, me)
        user = await get_or_create_user(session, email)
        already = await session.execute(
            select(Member.id).where(
                Member.workspace_id == ws_id, Member.user_id == user.id, Member.removed_at.is_(None)
            )
        )
        if already.first() is not None:
            raise AlreadyMember()
        usage = await _usage(session, ws_id)
        check_seats(_apply(usage, add=(role, seat)), seat_cap=plan.seat_cap,
                    creator_limit=ws.creator_seat_limit(plan), before=usage)
        member = Member(workspace_id=ws_id, user_id=user.id, role=role, seat=seat)
        session.add(member)
        await session.flush()
        _member_event(session, member, "ADDED", caller)
        await session.refresh(member)
        member.user = user
        return member

    if seat is Seat.CREATOR:  # a creator seat receives allowances (PER_SEAT) from the next boundary
        await _close_due_periods(db, caller, ws_id, Action.MANAGE_MEMBERS, what="workspace", hold_ttl=hold_ttl)
    return await db.transaction(work)


def _member_event(session: AsyncSession, member: Member, change: str, caller: Caller | None = None,
                  before: dict | None = None) -> None:
    # A seat change alters who may spend: balance subscribers re-read too.
    if caller is not None:
        audit.record(session, member.workspace_id, caller.actor.user_id, f"member.{change.lower()}", "member",
                     member.id, before=before, after={"role": member.role, "seat": member.seat,
                                                      "removed": change == "REMOVED"},
                     at=caller.clock.now())
    events.emit(session, member.workspace_id, events.MEMBER_CHANGED, memberId=str(member.id), change=change,
                role=member.role.value, seat=member.seat.value)
    events.emit(session, member.workspace_id, events.BALANCE_CHANGED)


async def _locked_target(
    session: AsyncSession, caller: Caller, member_id: str
) -> tuple[Workspace, Plan, Member, Member | None]:
    """The member to change, authorized against the member row's own workspace, then locked.
    A foreign member id reads like an unknown one ("member not found"), and is answered without
    waiting on that workspace's lock."""
    mid = parse_id(member_id, "member")
    found = await session.get(Member, mid)
    if found is None or found.removed_at is not None:
        raise NotFound("member")
    ws, plan, me = await _authorized_lock(session, caller, found.workspace_id, Action.MANAGE_MEMBERS, what="member")
    # Read again under the lock: a removal or change committed while we waited is seen. FOR
    # UPDATE, not the NO KEY UPDATE of the UPDATE that follows: a start's write takes KEY SHARE on
    # its payer's row to check the member again (`ledger.service._payers_locked`), which must wait
    # for this change and then see it, and make the change wait when it came first.
    target = (
        await session.execute(
            select(Member).where(Member.id == mid).with_for_update().execution_options(populate_existing=True)
        )
    ).scalar_one()
    if target.removed_at is not None:
        raise NotFound("member")
    return ws, plan, target, me


async def change_member_role(db: Database, caller: Caller, *, member_id: str, role: Role) -> Member:
    async def work(session: AsyncSession) -> Member:
        ws, plan, target, me = await _locked_target(session, caller, member_id)
        if role is Role.OWNER or target.role is Role.OWNER:
            _require_owner_powers(caller, ws.id, me)
        usage = await _usage(session, ws.id)
        check_owner_kept(_apply(usage, remove=target, add=(role, target.seat)))
        before = {"role": target.role}
        target.role = role
        await session.flush()
        _member_event(session, target, "ROLE_CHANGED", caller, before)
        return await _with_user(session, target)

    return await db.transaction(work)


async def change_member_seat(db: Database, caller: Caller, *, member_id: str, seat: Seat,
                             hold_ttl: timedelta) -> Member:
    async def work(session: AsyncSession) -> Member:
        ws, plan, target, _ = await _locked_target(session, caller, member_id)
        usage = await _usage(session, ws.id)
        check_seats(_apply(usage, remove=target, add=(target.role, seat)), seat_cap=plan.seat_cap,
                    creator_limit=ws.creator_seat_limit(plan), before=usage)
        before = {"seat": target.seat}
        target.seat = seat
        await session.flush()
        _member_event(session, target, "SEAT_CHANGED", caller, before)
        return await _with_user(session, target)

    await _close_due_periods_of_member(db, caller, member_id, hold_ttl=hold_ttl)
    return await db.transaction(work)


async def remove_member(db: Database, caller: Caller, *, member_id: str, hold_ttl: timedelta) -> Member:
    async def work(session: AsyncSession) -> Member:
        ws, plan, target, me = await _locked_target(session, caller, member_id)
        if target.role is Role.OWNER:
            _require_owner_powers(caller, ws.id, me)
        check_owner_kept(_apply(await _usage(session, ws.id), remove=target))
        target.removed_at = func.now()
        await session.flush()
        _member_event(session, target, "REMOVED", caller, {"role": target.role, "seat": target.seat})
        # After the member's event: their own streams re-read the membership on it and end,
        # so what follows about them goes only to those who may still see it.
        await overages.lapse_requests_of(session, target, caller.clock.now())
        await session.refresh(target)
        return await _with_user(session, target)

    await _close_due_periods_of_member(db, caller, member_id, hold_ttl=hold_ttl)
    return await db.transaction(work)


async def _with_user(session: AsyncSession, member: Member) -> Member:
    return (
        await session.execute(
            select(Member).where(Member.id == member.id).options(selectinload(Member.user))
            .execution_options(populate_existing=True)
        )
    ).scalar_one()


async def viewer_memberships(db: Database, caller: Caller) -> list[Membership]:
    async def work(session: AsyncSession) -> list[Membership]:
        rows = await session.execute(
            select(Member, Workspace, Plan)
            .join(Workspace, Workspace.id == Member.workspace_id)
            .join(Plan, Plan.id == Workspace.plan_id)
            .where(Member.user_id == caller.actor.user_id, Member.removed_at.is_(None))
            .order_by(Workspace.created_at, Workspace.id)
        )
        return [Membership(ws, plan, m) for m, ws, plan in rows]

    return await db.read(work)


async def get_workspace(db: Database, caller: Caller, *, workspace_id: str) -> WorkspaceDetail:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> WorkspaceDetail:
        me = await authorize(session, caller, ws_id, Action.VIEW_WORKSPACE, what="workspace")
        ws = await session.get(Workspace, ws_id)
        if ws is None:
            raise NotFound("workspace")
        plan = await session.get_one(Plan, ws.plan_id)
        members = list(
            (
                await session.execute(
                    select(Member)
                    .where(Member.workspace_id == ws_id, Member.removed_at.is_(None))
                    .options(selectinload(Member.user))
                    .order_by(Member.created_at, Member.id)
                )
            ).scalars()
        )
        return WorkspaceDetail(ws, plan, members, me)

    return await db.read(work)
