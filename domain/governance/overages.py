"""Overage requests: a member past a REQUIRE_APPROVAL limit asks for more; an approver (never
the requester) approves an amount with an expiry, or denies with a reason. An approval raises
that limit for the request's period by the approved amount. Pending requests lapse."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from domain import events
from domain.access import Caller, authorize, authorized_row, parse_id
from domain.db import Database
from domain.errors import Forbidden, NotFound, OverageNotPending, ValidationFailed
from domain.governance import alerts, audit
from domain.governance.limits import applicable_limits, headroom, open_period, period_ends
from domain.governance.models import (
    LimitAction,
    LimitScope,
    LimitUsage,
    OverageRequest,
    OverageStatus,
    SpendLimit,
)
from domain.governance.notifications import approvers, notify
from domain.governance.rules import overage_lapsed
from domain.identity import clean_name
from domain.pricing.service import check_known_model, clean_model_key
from domain.money import format_credits, parse_credits
from domain.workspaces.models import Member, Workspace
from policies import Action

DEFAULT_TTL = timedelta(hours=24)


async def request_overage(
    db: Database, caller: Caller, *, workspace_id: str, amount: str, reason: str, limit_id: str | None = None,
    model_key: str | None = None, ttl: timedelta = DEFAULT_TTL,
) -> OverageRequest:
    ws_id = parse_id(workspace_id, "workspace")
    units = parse_credits(amount, "amount")
    reason = clean_name(reason, "reason", max_len=500)
    if model_key is not None:
        model_key = clean_model_key(model_key)

    async def work(session: AsyncSession) -> OverageRequest:
        me = await authorize(session, caller, ws_id, Action.REQUEST_OVERAGE, what="workspace")
        if me is None:
            raise Forbidden(Action.REQUEST_OVERAGE.value)
        if model_key is not None:
            # What the member wants to run, shown to the approver: a model the catalog prices now
            # (after authorizing: an outsider learns nothing, not even which models exist).
            await check_known_model(session, model_key, caller.clock.now())
        ws = await session.get_one(Workspace, ws_id)
        # The limit that applies to the requester and may be raised; by default the one with the
        # least room left this period, the one refusing the member's starts (the smallest amount
        # says nothing: a roomy daily limit of 15 is not what blocks under a full monthly one).
        wanted = parse_id(limit_id, "spend limit") if limit_id is not None else None
        raisable = [l for l in await applicable_limits(session, ws_id, me.id, me.billing_group_id)
                    if l["action"] == LimitAction.REQUIRE_APPROVAL.value and wanted in (None, l["id"])]
        if not raisable:
            raise NotFound("spend limit")
        now = caller.clock.now()
        # The usage row fixes the period's end, which the decision reads (an approval lasts to it).
        starts = {l["id"]: (await open_period(session, l["id"], l["period"], now, ws.timezone)).start
                  for l in raisable}
        room = {l["id"]: await headroom(session, l, starts[l["id"]], now) for l in raisable}
        limit = min(raisable, key=lambda l: (room[l["id"]], l["amount_units"], l["id"]))
        request = OverageRequest(
            workspace_id=ws_id, member_id=me.id, limit_id=limit["id"],
            period_start=starts[limit["id"]], amount_units=units, reason=reason,
            model_key=model_key, status=OverageStatus.PENDING, lapses_at=now + ttl, requested_at=now,
        )
        session.add(request)
        await session.flush()
        others = await approvers(session, ws_id, caller.authorizer) - {caller.actor.user_id}
        notify(session, ws_id, others, "OVERAGE_REQUESTED", requestId=str(request.id), memberId=str(me.id),
               amount=format_credits(units), reason=reason)
        events.emit(session, ws_id, events.OVERAGE_REQUESTED, requestId=str(request.id), memberId=str(me.id),
                    amount=format_credits(units))
        await alerts.fire(session, ws_id, alerts.OVERAGE_REQUESTED, str(request.id), now, memberId=str(me.id),
                          amount=format_credits(units))
        audit.record(session, ws_id, caller.actor.user_id, "overage.requested", "overage_request", request.id,
                     after={"limit": limit["id"], "amount": units, "reason": reason}, at=now)
        return request

    return await db.transaction(work)


async def decide_overage(
    db: Database, caller: Caller, *, request_id: str, approve: bool, amount: str | None = None,
    expires_at: datetime | None = None, reason: str | None = None,
) -> OverageRequest:
    rid = parse_id(request_id, "overage request")
    approved = parse_credits(amount, "amount") if amount is not None else None
    if reason is not None:
        reason = clean_name(reason, "reason", max_len=500)
    if not approve and not reason:
        raise ValidationFailed("reason", "a denial says why")

    async def work(session: AsyncSession) -> OverageRequest | OverageNotPending:
        # Locked once authorized (an outsider never waits on it, nor holds up a decision) and
        # read again under the lock: of two decisions, the second sees the first one's status.
        request, _ = await authorized_row(session, caller, OverageRequest, rid, Action.APPROVE_OVERAGES,
                                          what="overage request")
        requester = await session.get_one(Member, request.member_id)
        if requester.user_id == caller.actor.user_id:
            raise Forbidden("nobody approves their own overage request")
        now = caller.clock.now()
        ws = await session.get_one(Workspace, request.workspace_id)
        limit = await session.get_one(SpendLimit, request.limit_id)
        ends = await period_ends(session, limit.id, limit.period, request.period_start, ws.timezone)
        gone = requester.removed_at is not None
        outside = not _under(limit, requester)
        # A request made while its limit was switched to block (which lapses the pending ones)
        # read the limit before the switch committed, and was left pending on it.
        blocks = limit.action is LimitAction.BLOCK
        dead = overage_lapsed(now, lapses_at=request.lapses_at, period_end=ends, requester_removed=gone,
                              limit_removed=limit.removed_at is not None, limit_blocks=blocks,
                              requester_outside=outside)
        if request.status is OverageStatus.PENDING and dead:
            # Recorded here as the scheduler would (alert resolved), not only reported: the
            # approver is told it lapsed, and every list must say so from now on. (A removal
            # lapses the member's requests itself; this catches one made while it committed.)
            await _lapse(session, now, OverageRequest.id == request.id)
            set_committed_value(request, "status", OverageStatus.LAPSED)
        if request.status is not OverageStatus.PENDING:
            # Returned, not raised: a raise would roll back the lapse just recorded.
            why = None
            if request.status is OverageStatus.LAPSED:
                why = "its requester has left the workspace" if gone else \
                    "its spend limit was removed" if limit.removed_at is not None else \
                    "its spend limit is set to block" if blocks else \
                    "its requester has left the billing group its limit caps" if outside else None
            return OverageNotPending(request.status.value, why)
        before = {"status": request.status}
        if approve:
            if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
                raise ValidationFailed("expiresAt", "must be a future time with a zone")
            request.status = OverageStatus.APPROVED
            request.approved_units = approved or request.amount_units
            request.approval_expires_at = min(expires_at, ends) if expires_at else ends
        else:
            request.status = OverageStatus.DENIED
        request.decided_by, request.decided_at, request.decision_reason = caller.actor.user_id, now, reason
        await session.flush()
        notify(session, request.workspace_id, {requester.user_id}, "OVERAGE_DECIDED", requestId=str(request.id),
               status=request.status.value, approved=format_credits(request.approved_units or 0), reason=reason)
        # memberId: the requester may watch their own decision on `workspaceEvents` (events.AUDIENCE).
        events.emit(session, request.workspace_id, events.OVERAGE_DECIDED, requestId=str(request.id),
                    memberId=str(request.member_id), status=request.status.value)
        await alerts.resolve(session, request.workspace_id, alerts.OVERAGE_REQUESTED, now, str(request.id))
        if approve:  # the limit is raised for its period: its 80 % and 100 % alerts follow
            from domain.governance.automation import limit_changed  # automation imports this module

            await limit_changed(session, limit, now, request.period_start)
        alerts.note(session, request.workspace_id, alerts.OVERAGE_DECIDED, str(request.id), now,
                    status=request.status.value)
        audit.record(session, request.workspace_id, caller.actor.user_id, f"overage.{request.status.value.lower()}",
                     "overage_request", request.id, before=before,
                     after={"status": request.status, "approved": request.approved_units,
                            "expiresAt": request.approval_expires_at, "reason": reason}, at=now)
        return request

    decided = await db.transaction(work)
    if isinstance(decided, OverageNotPending):
        raise decided  # after the commit: the refusal keeps what the transaction recorded
    return decided


async def list_overages(
    db: Database, caller: Caller, *, workspace_id: str, status: OverageStatus | None = None
) -> list[OverageRequest]:
    """Approvers see every request of the workspace; anyone else sees their own."""
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> list[OverageRequest]:
        me = await authorize(session, caller, ws_id, Action.VIEW_WORKSPACE, what="workspace")
        q = select(OverageRequest).where(OverageRequest.workspace_id == ws_id)
        if not caller.authorizer.allows(str(caller.actor.user_id), caller.roles(me), str(ws_id),
                                        Action.APPROVE_OVERAGES):
            q = q.where(OverageRequest.member_id == (me.id if me else None))
        now = caller.clock.now()
        # A request that is dead now reads LAPSED, whether or not the scheduler has marked it
        # yet: the list says what a decision would answer. Computed, not written: a read records
        # nothing (and takes no row locks); the scheduler or a decision records the lapse.
        dead = (OverageRequest.status == OverageStatus.PENDING) & lapsed_by(now)
        if status is OverageStatus.PENDING:
            q = q.where(OverageRequest.status == status, ~dead)
        elif status is OverageStatus.LAPSED:
            q = q.where(or_(OverageRequest.status == status, dead))
        elif status is not None:
            q = q.where(OverageRequest.status == status)
        found = await session.execute(q.add_columns(dead).order_by(OverageRequest.requested_at.desc()))
        rows = []
        for r, is_dead in found:
            if is_dead:  # shown, never flushed: the session is only read
                set_committed_value(r, "status", OverageStatus.LAPSED)
            rows.append(r)
        return rows

    return await db.read(work)


def lapsed_by(now: datetime):
    """`rules.overage_lapsed` in SQL, for a PENDING request: past its deadline, its period over,
    its requester removed or outside its limit's group, or its limit removed or set to block.
    The period's end is the one stored on the request's usage row (opened when the request was
    made, moved with a change of timezone), never recomputed."""
    period_over = select(LimitUsage.limit_id).where(
        LimitUsage.limit_id == OverageRequest.limit_id, LimitUsage.period_start == OverageRequest.period_start,
        LimitUsage.period_end <= now,
    ).exists()
    requester_gone = select(Member.id).where(Member.id == OverageRequest.member_id,
                                             Member.removed_at.is_not(None)).exists()
    limit_gone = select(SpendLimit.id).where(
        SpendLimit.id == OverageRequest.limit_id,
        SpendLimit.removed_at.is_not(None) | (SpendLimit.action == LimitAction.BLOCK)).exists()
    requester_outside = select(SpendLimit.id).join(Member, Member.id == OverageRequest.member_id).where(
        SpendLimit.id == OverageRequest.limit_id, _outside_of(SpendLimit, Member)).exists()
    return or_(OverageRequest.lapses_at <= now, period_over, requester_gone, limit_gone, requester_outside)


def _under(limit: SpendLimit, member: Member) -> bool:
    """Whether `member`'s spend counts against `limit` today (`limits.applicable_limits`): a
    group's limit caps only the group's members. `_outside_of` is the same rule in SQL."""
    return limit.scope is not LimitScope.GROUP or member.billing_group_id == limit.billing_group_id


def _outside_of(limit, member):
    return (limit.scope == LimitScope.GROUP) & limit.billing_group_id.is_distinct_from(member.billing_group_id)


async def lapse_pending(session: AsyncSession, now: datetime, workspace_id: uuid.UUID | None = None) -> int:
    """Scheduler step: pending requests that are dead (`lapsed_by`; `decide_overage` refuses
    them alike) are marked LAPSED, in every workspace or in `workspace_id`'s. Concurrent
    schedulers lapse each request once (the second UPDATE waits on the row and then no longer
    sees it PENDING)."""
    where = [lapsed_by(now)]
    if workspace_id is not None:
        where.append(OverageRequest.workspace_id == workspace_id)
    return await _lapse(session, now, *where)


async def lapsing_workspaces(session: AsyncSession, now: datetime) -> list[uuid.UUID]:
    """The workspaces with a pending request that `lapse_pending` would lapse (the scheduler
    runs them one by one when lapsing all at once failed)."""
    return list((await session.execute(
        select(OverageRequest.workspace_id).where(OverageRequest.status == OverageStatus.PENDING, lapsed_by(now))
        .distinct().order_by(OverageRequest.workspace_id))).scalars())


async def lapse_requests_of(session: AsyncSession, member: Member, now: datetime) -> int:
    """A removed member's pending requests lapse with the removal (in its transaction, under its
    lock on the member row): an approval would raise a limit nobody is left to spend under, and
    the approvers' alerts would call them to decide it."""
    return await _lapse(session, now, OverageRequest.workspace_id == member.workspace_id,
                        OverageRequest.member_id == member.id)


async def lapse_requests_outside(session: AsyncSession, member: Member, now: datetime) -> int:
    """A member moved to another billing group (or none): their pending requests on the old
    group's limit lapse with the move (in its transaction, under its lock on the member row), as
    with a removal: an approval would raise the cap of the members left in the group, not the
    requester's, and the approvers' alerts would call them to decide it."""
    return await _lapse(session, now, OverageRequest.workspace_id == member.workspace_id,
                        OverageRequest.member_id == member.id,
                        select(SpendLimit.id).where(SpendLimit.id == OverageRequest.limit_id,
                                                    _outside_of(SpendLimit, member)).exists())


async def lapse_requests_on(session: AsyncSession, limit: SpendLimit, now: datetime) -> int:
    """A removed limit's pending requests lapse with the removal (in its transaction, under its
    lock on the limit row): an approval would raise a limit that no longer counts, and the
    approvers' alerts would call them to decide it."""
    return await _lapse(session, now, OverageRequest.workspace_id == limit.workspace_id,
                        OverageRequest.limit_id == limit.id)


async def _lapse(session: AsyncSession, now: datetime, *where) -> int:
    """Mark the PENDING requests matching `where` LAPSED, the one way every lapse is recorded
    (the scheduler, a removal, a decision that finds one dead). Their OVERAGE_REQUESTED alerts
    resolve: the approvers have nothing left to decide. Each lapse is told as the decision it is
    (OVERAGE_DECIDED, status LAPSED), so the dashboards drop it as they would a denial: live, to
    the same audience (`events.AUDIENCE`: approvers, and the requester named by memberId), and
    as a notification to a requester still in the workspace. The audit log records it with no
    actor: nobody decided it (a removal's own entry says who removed the requester)."""
    lapsed = (await session.execute(
        update(OverageRequest)
        .where(OverageRequest.status == OverageStatus.PENDING, *where)
        .values(status=OverageStatus.LAPSED)
        .returning(OverageRequest.id, OverageRequest.workspace_id, OverageRequest.member_id)
        .execution_options(synchronize_session=False)
    )).all()
    present = dict((await session.execute(select(Member.id, Member.user_id).where(
        Member.id.in_([member_id for _, _, member_id in lapsed]), Member.removed_at.is_(None)))).all()) if lapsed else {}
    for request_id, ws_id, member_id in sorted(lapsed):
        events.emit(session, ws_id, events.OVERAGE_DECIDED, requestId=str(request_id), memberId=str(member_id),
                    status=OverageStatus.LAPSED.value)
        if member_id in present:
            notify(session, ws_id, {present[member_id]}, "OVERAGE_DECIDED", requestId=str(request_id),
                   status=OverageStatus.LAPSED.value, approved=format_credits(0), reason=None)
        await alerts.resolve(session, ws_id, alerts.OVERAGE_REQUESTED, now, str(request_id))
        audit.record(session, ws_id, None, "overage.lapsed", "overage_request", request_id,
                     before={"status": OverageStatus.PENDING}, after={"status": OverageStatus.LAPSED}, at=now)
    return len(lapsed)
