"""Billing periods, allowances, expiry and hold timeouts, and the scheduler (`tick`) that runs
them. Every unit of work is claimed with `SELECT ... FOR [NO KEY] UPDATE SKIP LOCKED` and
finished in its own transaction that also moves the claim forward (a workspace's
`next_renewal_at`, a grant's remaining, a generation's status), so any number of processes can
tick at once and no unit runs twice. After downtime the loop catches up one boundary at a time, in order.

Business time: ledger entries written here carry the time they belong to (`occurred_at`): the
boundary for a period close, the expiry time for an expiry, the deadline for a hold timeout, so
breakage per period is exact however late the tick runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, not_, select
from sqlalchemy.ext.asyncio import AsyncSession

from domain import events
from domain.access import Caller, authorize, parse_id
from domain.clock import Clock
from domain.db import Database
from domain.errors import ValidationFailed
from domain.governance.automation import alert_workspaces, buy_due_top_ups, refresh_alerts
from domain.governance.overages import lapse_pending, lapsing_workspaces
from domain.ledger.consumption import Scope
from domain.ledger.models import (
    Cause,
    EntryKind,
    Generation,
    GenerationStatus,
    Grant,
    GrantSource,
    LedgerEntry,
    PeriodClose,
)
from domain.ledger.payments import PaymentProvider
from domain.ledger.service import Posting, post_movements, time_out
from domain.money import format_credits
from domain.periods.renewal import allowance_pieces, expires_at_close, renewal
from domain.periods.rules import add_months, boundary_index, day_start, next_day, subscribed_at
from domain.plans import Plan, RolloverPolicy
from domain.workspaces.models import AllocationMode, Member, Seat, Workspace
from policies import Action

GRANTS = Grant.__table__
log = logging.getLogger("creditpool.scheduler")


# --- issuing -------------------------------------------------------------------------------------

async def _issue(
    session: AsyncSession, ws: Workspace, posting: Posting, *, source: GrantSource, units: int,
    effective_at: datetime, expires_at: datetime | None, reason: str, member: Member | None = None,
    group: uuid.UUID | None = None, parent: uuid.UUID | None = None, priority: int = 100,
) -> Grant:
    scope = Scope.SEAT if member else Scope.GROUP if group else Scope.WORKSPACE
    grant = Grant(
        id=uuid.uuid4(), workspace_id=ws.id, scope=scope, member_id=member.id if member else None,
        billing_group_id=group, source=source, priority=priority, effective_at=effective_at,
        expires_at=expires_at, amount=units, remaining=units, reason=reason, parent_grant_id=parent,
    )
    session.add(grant)
    posting.add(grant.id, EntryKind.GRANT, units)
    return grant


async def _recipients(session: AsyncSession, ws: Workspace) -> list[Member | None]:
    """Who receives the plan's credits (a period's allowance, the trial, a day's free credits):
    the pool (POOLED), or every creator seat (PER_SEAT), whose spends never draw from the pool
    without fallback: credits issued to the pool there would only ever expire."""
    if ws.allocation_mode is AllocationMode.POOLED:
        return [None]
    rows = await session.execute(
        select(Member).where(Member.workspace_id == ws.id, Member.removed_at.is_(None), Member.seat == Seat.CREATOR)
        .order_by(Member.created_at, Member.id)
    )
    return list(rows.scalars())


def _allowance_expiry(plan: Plan, ws: Workspace, period_end: datetime) -> datetime | None:
    return None if plan.rollover_policy is RolloverPolicy.NEVER_EXPIRE else period_end


async def _issue_allowance(
    session: AsyncSession, ws: Workspace, plan: Plan, posting: Posting, start: datetime, end: datetime
) -> int:
    if not subscribed_at(ws.cancelled_at, start) or plan.included_units <= 0:
        return 0
    issued = 0
    for member in await _recipients(session, ws):
        await _issue(session, ws, posting, source=GrantSource.PLAN_ALLOWANCE, units=plan.included_units,
                     effective_at=start, expires_at=_allowance_expiry(plan, ws, end), member=member,
                     reason=f"{plan.name} allowance for the period from {start.date()}")
        issued += plan.included_units
    return issued


async def open_workspace(session: AsyncSession, ws: Workspace, plan: Plan, now: datetime) -> None:
    """A new workspace: its first period starts now (the billing anchor), with its allowance, the
    plan's trial credits and today's free credits, each to the pool or per creator seat."""
    ws.billing_anchor = ws.period_start = now
    ws.next_renewal_at = add_months(now, 1)
    ws.period_rule = plan.rollover_rule
    ws.next_daily_at = next_day(now) if plan.daily_free_units > 0 else None
    await session.flush()
    posting = Posting(ws.id, Cause.GRANT, None, None, occurred_at=now)
    await _issue_allowance(session, ws, plan, posting, now, ws.next_renewal_at)
    for member in await _recipients(session, ws):
        if plan.trial_units > 0 and plan.trial_days > 0:
            await _issue(session, ws, posting, source=GrantSource.TRIAL, units=plan.trial_units, effective_at=now,
                         expires_at=now + timedelta(days=plan.trial_days), member=member, reason=f"{plan.name} trial")
        if plan.daily_free_units > 0:
            await _issue(session, ws, posting, source=GrantSource.DAILY_FREE, units=plan.daily_free_units,
                         effective_at=now, expires_at=ws.next_daily_at, member=member, reason="daily free credits")
    await session.flush()
    await post_movements(session, posting)


async def close_period(session: AsyncSession, ws: Workspace, plan: Plan) -> PeriodClose:
    """Close the period ending at `ws.next_renewal_at` (the workspace row is locked): apply the
    rollover rule the period began under to its allowance (expire it, or roll the capped part
    over and expire the rest; never-expiring allowances stay), then issue the next period's
    allowance under `plan`, whose rule that period's close will apply. Purchased and other
    credits are not touched here; they expire on their own dates."""
    start, boundary = ws.period_start, ws.next_renewal_at
    k = boundary_index(ws.billing_anchor, boundary)
    following = add_months(ws.billing_anchor, k + 1)
    pieces = await allowance_pieces(session, ws, lock=True)
    outlook = renewal(ws, pieces)
    rolls = Posting(ws.id, Cause.TRANSFER, None, None, occurred_at=boundary)
    expiry = Posting(ws.id, Cause.EXPIRY, None, None, occurred_at=boundary)
    rolled = expired = 0
    for g in pieces:
        # NEVER_EXPIRE stays, and so does a piece granted by hand to expire later; spent pieces
        # have nothing.
        if not expires_at_close(g, boundary) or g.remaining == 0:
            continue
        keep = outlook.rolls_over(g.id)
        if keep:
            member = await session.get(Member, g.member_id) if g.member_id else None
            await _issue(session, ws, rolls, source=GrantSource.ROLLOVER, units=keep, effective_at=boundary,
                         expires_at=outlook.rolled_until, member=member,
                         group=g.billing_group_id, parent=g.id,
                         reason=f"rollover from the period from {start.date()}")
            rolls.add(g.id, EntryKind.TRANSFER_OUT, keep)
            rolled += keep
        expiry.add(g.id, EntryKind.EXPIRE, g.remaining - keep)
        expired += g.remaining - keep
    issue = Posting(ws.id, Cause.GRANT, None, None, occurred_at=boundary)
    issued = await _issue_allowance(session, ws, plan, issue, boundary, following)
    await session.flush()
    for posting in (rolls, expiry, issue):
        await post_movements(session, posting)
    closed = PeriodClose(workspace_id=ws.id, period_start=start, period_end=boundary, rolled_over_units=rolled,
                         expired_units=expired, issued_units=issued)
    session.add(closed)
    ws.period_start, ws.next_renewal_at = boundary, following
    ws.period_rule = plan.rollover_rule
    await session.flush()
    return closed


# --- the scheduler -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TickFailure:
    """One unit of a round that failed and was rolled back: the phase, the workspace (None when
    the phase could not run at all, e.g. the database is unreachable), the grant or generation
    of a batch unit, and the exception."""
    phase: str
    workspace_id: uuid.UUID | None
    subject: uuid.UUID | None
    error: str

    def __str__(self) -> str:
        where = f"workspace {self.workspace_id}" if self.workspace_id else "the whole phase"
        of = f" ({self.subject})" if self.subject else ""
        return f"{self.phase} of {where}{of}: {self.error}"


@dataclass
class TickReport:
    periods_closed: int = 0
    daily_issued: int = 0
    grants_expired: int = 0
    holds_timed_out: int = 0
    overages_lapsed: int = 0
    alerts_changed: int = 0
    top_ups_started: int = 0
    top_ups_taken_over: int = 0
    resting: int = 0  # units left out of this round after failing in earlier ones (`Backoff`)
    closes: list[PeriodClose] = field(default_factory=list)
    failures: list[TickFailure] = field(default_factory=list)

    def fail(self, phase: str, workspace_id: uuid.UUID | None, subject: uuid.UUID | None,
             exc: BaseException) -> None:
        failure = TickFailure(phase, workspace_id, subject, f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        log.error("scheduler: %s failed; rolled back, retried next round", failure, exc_info=exc)


# The phases of a round, as named in `TickFailure.phase`.
HOLD_TIMEOUT, PERIOD_CLOSE, DAILY_CREDITS, EXPIRY = "hold timeout", "period close", "daily credits", "expiry"
OVERAGE_LAPSE, ALERTS, AUTO_TOP_UP = "overage lapse", "alerts", "auto top-up"


@dataclass
class Backoff:
    """What the server's scheduler remembers from round to round: a unit (a phase's workspace,
    grant or generation) that failed rests before it is tried again, for `first` after one
    failure and twice as long after each further failure in a row, at most `ceiling`. Without
    it a unit that fails for good (bad data, a bug) is claimed, rolled back and logged with its
    traceback every round, forever. `first` is the scheduler's interval, so a unit that failed
    once (a deadlock, a restart of the database) is tried again by the next round as before;
    one that succeeds, or is no longer due, is forgotten. Auto top-up keeps its own count of
    payment failures and is not rested here."""

    first: timedelta
    ceiling: timedelta = timedelta(hours=1)
    units: dict[tuple[str, uuid.UUID], tuple[int, datetime]] = field(default_factory=dict)

    def _rests(self, until: datetime, now: datetime) -> bool:
        # No rest is longer than `ceiling` from now: a clock set back (a test's, or the system's
        # stepping back) would otherwise leave a unit out until its old reading came round again.
        return now < until <= now + self.ceiling

    def resting(self, phase: str, now: datetime) -> set[uuid.UUID]:
        """The units of `phase` to leave out of the round at `now`."""
        return {unit for (p, unit), (_, until) in self.units.items() if p == phase and self._rests(until, now)}

    def after(self, report: TickReport, now: datetime) -> None:
        """Learn from the round `report` ran at `now`: each unit that failed rests again, longer;
        a unit that was due to be tried and did not fail is forgotten."""
        failed = {(f.phase, f.subject or f.workspace_id) for f in report.failures
                  if f.phase != AUTO_TOP_UP and (f.subject or f.workspace_id)}
        for key, (_, until) in list(self.units.items()):
            if not self._rests(until, now) and key not in failed:
                del self.units[key]
        for key in failed:
            times = self.units.get(key, (0, now))[0] + 1
            self.units[key] = (times, now + min(self.first * 2 ** (times - 1), self.ceiling))


async def tick(db: Database, clock: Clock, *, hold_ttl: timedelta, batch: int = 100,
               payments: PaymentProvider | None = None, backoff: Backoff | None = None) -> TickReport:
    """Run everything that is due at `clock.now()`, once, then return. Safe to run in any number
    of processes at once: each unit is claimed with SKIP LOCKED and moved forward in the same
    transaction, so a unit another process holds is skipped, and a done unit is no longer due.

    A unit that fails (bad data, a bug, a constraint) is rolled back with its transaction,
    logged and listed in `TickReport.failures`, and left out for the rest of the round (the claim
    queries skip it: still due, it would be claimed again at once); the other workspaces and the
    later phases go on, and the next round tries it again (with `backoff`, the scheduler's: once it
    has rested). One broken workspace must not stop period closes and expiries for every other.

    With `payments` (the server's provider), it also buys the auto top-ups that are due with no
    spend to start them: pools under their threshold (after the expiries above, say), and claims
    abandoned with no outcome. They are not claimed with SKIP LOCKED: a spend may claim the same
    purchase at the same moment, so the claim is the conditional UPDATE both go through
    (`automation.claim_top_up`), which one wins. Last: it waits on the payment provider."""
    report = TickReport()
    now = clock.now()

    def resting(phase: str) -> set[uuid.UUID]:
        units = backoff.resting(phase, now) if backoff else set()
        report.resting += len(units)
        return units

    # Hold timeouts first: a hold that timed out before a boundary was back on its grant at that
    # boundary (a tick on time released it then), so a late tick releases it before closing the
    # period, for the close to roll it over. Released after its grant expired, it expires then.
    report.holds_timed_out = await _in_batches(
        db, report, HOLD_TIMEOUT, resting(HOLD_TIMEOUT),
        lambda s, skip, only, claimed: _time_out_holds(s, now, hold_ttl, batch, skip, only, claimed))
    closes = await _each_workspace(
        db, report, PERIOD_CLOSE, resting(PERIOD_CLOSE),
        lambda s, skip, claimed: _close_one_due_period(s, now, skip, claimed))
    report.periods_closed, report.closes = len(closes), closes
    report.daily_issued = len(await _each_workspace(
        db, report, DAILY_CREDITS, resting(DAILY_CREDITS),
        lambda s, skip, claimed: _issue_one_due_day(s, now, skip, claimed)))
    report.grants_expired = await _in_batches(
        db, report, EXPIRY, resting(EXPIRY),
        lambda s, skip, only, claimed: _expire_due_grants(s, now, batch, skip, only, claimed))
    report.overages_lapsed = await _all_or_each(db, report, OVERAGE_LAPSE, resting(OVERAGE_LAPSE),
                                                lambda s, ws: lapse_pending(s, now, ws),
                                                lambda s: lapsing_workspaces(s, now))
    report.alerts_changed = await _all_or_each(db, report, ALERTS, resting(ALERTS),
                                               lambda s, ws: refresh_alerts(s, now, ws),
                                               lambda s: alert_workspaces(s, now))
    if payments is not None:
        try:
            due = await buy_due_top_ups(db, payments, clock, batch=batch)
        except Exception as exc:  # noqa: BLE001 - reading what is due failed: the next round reads again
            report.fail(AUTO_TOP_UP, None, None, exc)
        else:
            report.top_ups_started, report.top_ups_taken_over = due.started, due.taken_over
            for ws_id, exc in due.failed:
                report.fail(AUTO_TOP_UP, ws_id, None, exc)
    if backoff is not None:
        backoff.after(report, now)
    return report


async def _each_workspace(
    db: Database, report: TickReport, phase: str, resting: set[uuid.UUID],
    unit: Callable[[AsyncSession, set[uuid.UUID], list[uuid.UUID]], Awaitable[PeriodClose | bool | None]],
) -> list:
    """Run `unit` (claim one due workspace, not in the skip set, and move it forward) in a
    transaction of its own until nothing is due; what each returned that was not None or False.
    The skip set starts with the `resting` workspaces. The unit names the workspace it claimed
    in `claimed`: if it fails after that, that workspace is left out for the rest of the round.
    A failure before any claim (the claim itself failed) ends the phase: running it again would
    fail alike, in a tight loop."""
    failed = set(resting)
    done = []
    while True:
        claimed: list[uuid.UUID] = []
        try:
            result = await db.transaction(lambda s: unit(s, failed, claimed))
        except Exception as exc:  # noqa: BLE001 - isolated: the others go on, the next round retries it
            if not claimed:
                report.fail(phase, None, None, exc)
                return done
            failed.add(claimed[-1])
            report.fail(phase, claimed[-1], None, exc)
            continue
        if result is None or result is False:
            return done
        done.append(result)


async def _in_batches(
    db: Database, report: TickReport, phase: str, resting: set[uuid.UUID],
    unit: Callable[[AsyncSession, set[uuid.UUID], uuid.UUID | None, list[tuple[uuid.UUID, uuid.UUID]]], Awaitable[int]],
) -> int:
    """Run `unit` (claim a batch of due rows, not in the skip set, or only the one named, and
    move them forward) in a transaction of its own until nothing is due; the rows it moved. The
    skip set starts with the `resting` rows. A batch that fails does not say which row failed:
    each row it claimed (`claimed`: row id, workspace id) is then run on its own, and the ones
    that fail alone are left out for the rest of the round."""
    failed = set(resting)
    total = 0
    while True:
        claimed: list[tuple[uuid.UUID, uuid.UUID]] = []
        try:
            moved = await db.transaction(lambda s: unit(s, failed, None, claimed))
        except Exception as exc:  # noqa: BLE001 - isolated: the others go on, the next round retries it
            if not claimed:
                report.fail(phase, None, None, exc)
                return total
            if len(claimed) == 1:
                failed.add(claimed[0][0])
                report.fail(phase, claimed[0][1], claimed[0][0], exc)
                continue
            log.warning("scheduler: a batch of %d for %s failed; running each on its own", len(claimed), phase,
                        exc_info=exc)
            for row_id, ws_id in claimed:
                try:
                    total += await db.transaction(lambda s, row_id=row_id: unit(s, failed, row_id, []))
                except Exception as exc:  # noqa: BLE001 - as above
                    failed.add(row_id)
                    report.fail(phase, ws_id, row_id, exc)
            continue
        if not moved:
            return total
        total += moved


async def _all_or_each(
    db: Database, report: TickReport, phase: str, resting: set[uuid.UUID],
    unit: Callable[[AsyncSession, uuid.UUID | None], Awaitable[int]],
    candidates: Callable[[AsyncSession], Awaitable[list[uuid.UUID]]],
) -> int:
    """Run `unit` for every workspace in one transaction (the usual case: little to do); if that
    fails, or some workspaces are `resting`, for each other workspace that has something to do
    (`candidates`) in a transaction of its own, so one that fails does not hold up the others."""
    if not resting:
        try:
            return await db.transaction(lambda s: unit(s, None))
        except Exception as exc:  # noqa: BLE001 - isolated below
            log.warning("scheduler: %s failed for all workspaces at once; running each on its own", phase,
                        exc_info=exc)
    try:
        workspaces = await db.read(candidates)
    except Exception as exc:  # noqa: BLE001 - the phase cannot run: the next round tries again
        report.fail(phase, None, None, exc)
        return 0
    total = 0
    for ws_id in workspaces:
        if ws_id in resting:
            continue
        try:
            total += await db.transaction(lambda s, ws_id=ws_id: unit(s, ws_id))
        except Exception as exc:  # noqa: BLE001 - isolated: the others go on, the next round retries it
            report.fail(phase, ws_id, None, exc)
    return total


async def _claim_workspace(session: AsyncSession, due, skip: set[uuid.UUID] = frozenset(),
                           claimed: list[uuid.UUID] | None = None) -> Workspace | None:
    # FOR NO KEY UPDATE, not FOR UPDATE: every spend in flight holds a KEY SHARE lock on its
    # workspace row (the foreign keys of the rows it writes, and the timezone read under limits),
    # which FOR UPDATE conflicts with, so SKIP LOCKED skipped any workspace with a spend in
    # flight and a busy pool's period might never close. NO KEY UPDATE still conflicts with
    # every writer the close must not interleave with: changes to the workspace row (plan,
    # timezone, mode, seats and members take FOR UPDATE) and transfers, which may split the
    # allowance being closed and so take FOR SHARE (`ledger.service.transfer_credits`).
    # Spends only touch grant rows, which the close locks itself.
    # `skip`: the workspaces whose unit failed earlier in this round (`tick`).
    query = select(Workspace).where(due)
    if skip:
        query = query.where(Workspace.id.not_in(skip))
    ws = (await session.execute(
        query.order_by(Workspace.id).limit(1).with_for_update(skip_locked=True, key_share=True)
    )).scalar_one_or_none()
    if ws is not None and claimed is not None:
        claimed.append(ws.id)
    return ws


async def _close_one_due_period(session: AsyncSession, now: datetime, skip: set[uuid.UUID] = frozenset(),
                                claimed: list[uuid.UUID] | None = None) -> PeriodClose | None:
    ws = await _claim_workspace(session, Workspace.next_renewal_at <= now, skip, claimed)
    if ws is None:
        return None
    return await _close_and_announce(session, ws)


async def close_due_periods(session: AsyncSession, workspace_id: uuid.UUID, now: datetime, *,
                            hold_ttl: timedelta) -> list[PeriodClose]:
    """Close every boundary of a workspace due by `now`, in order, and issue the day's free
    credits if they are due, in this transaction. As in `tick`, the workspace's holds timed
    out by `now` (`hold_ttl`: the server's, as the scheduler's) are released first, each at its
    deadline, so that a hold that timed out before a boundary rolls over with its grant as it
    did when the tick came on time. A change to what they read (the plan, the allocation mode)
    runs it first, in a transaction of its own: made after a boundary (or midnight) the
    scheduler has not reached yet, it would otherwise apply to the period (or day) that
    boundary started, and not from the next one as it does when the tick is on time. The row is
    claimed as the tick claims it (FOR NO KEY UPDATE: spends in flight go on), but waiting, not
    skipping: a tick closing it now is waited for, and then nothing is due any more. Nothing due
    (nearly always), it locks nothing."""
    renews, daily = (await session.execute(
        select(Workspace.next_renewal_at, Workspace.next_daily_at).where(Workspace.id == workspace_id))).one()
    if renews > now and (daily is None or daily > now):
        return []
    ws = (await session.execute(
        select(Workspace).where(Workspace.id == workspace_id).with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )).scalar_one()
    # After the workspace's lock, as a spend or a transfer takes it: then limits and grants.
    while await _time_out_holds(session, now, hold_ttl, 100, workspace_id=workspace_id):
        pass
    closes = []
    while ws.next_renewal_at <= now:
        closes.append(await _close_and_announce(session, ws))
    if _day_due(ws, now):  # the day's free credits too: their amount and recipients are the plan's and mode's
        await _issue_day(session, ws, now)
    return closes


async def _close_and_announce(session: AsyncSession, ws: Workspace) -> PeriodClose:
    plan = await session.get_one(Plan, ws.plan_id)
    closed = await close_period(session, ws, plan)
    events.emit(session, ws.id, events.PERIOD_CLOSED, periodStart=closed.period_start.isoformat(),
                periodEnd=closed.period_end.isoformat(), rolledOver=closed.rolled_over_units,
                expired=closed.expired_units, issued=closed.issued_units)
    return closed


async def _issue_one_due_day(session: AsyncSession, now: datetime, skip: set[uuid.UUID] = frozenset(),
                             claimed: list[uuid.UUID] | None = None) -> bool:
    """Daily free credits: today's grant, once. Days missed during downtime are skipped, not
    back-issued: their credits would have expired already."""
    ws = await _claim_workspace(session, and_(Workspace.next_daily_at.is_not(None), Workspace.next_daily_at <= now),
                                skip, claimed)
    if ws is None:
        return False
    await _issue_day(session, ws, now)
    return True


def _day_due(ws: Workspace, now: datetime) -> bool:
    return ws.next_daily_at is not None and ws.next_daily_at <= now


async def _issue_day(session: AsyncSession, ws: Workspace, now: datetime) -> None:
    plan = await session.get_one(Plan, ws.plan_id)
    today = day_start(now)
    if plan.daily_free_units > 0 and subscribed_at(ws.cancelled_at, today):
        posting = Posting(ws.id, Cause.GRANT, None, None, occurred_at=today)
        for member in await _recipients(session, ws):
            await _issue(session, ws, posting, source=GrantSource.DAILY_FREE, units=plan.daily_free_units,
                         effective_at=today, expires_at=next_day(today), member=member, reason="daily free credits")
        await session.flush()
        await post_movements(session, posting)
        ws.next_daily_at = next_day(today)
    else:
        ws.next_daily_at = None


async def _expire_due_grants(session: AsyncSession, now: datetime, batch: int, skip: set[uuid.UUID] = frozenset(),
                             only: uuid.UUID | None = None,
                             claimed: list[tuple[uuid.UUID, uuid.UUID]] | None = None) -> int:
    """An expiry entry for the remaining credits of every grant past its expiry (a batch of
    them, or `only` that one, never one in `skip`). Held credits stay held (a hold placed before
    expiry may be captured; released later, they expire then). Allowances of a period not yet
    closed wait for the close, which may roll part of them over."""
    ws = Workspace.__table__
    unclosed_allowance = and_(GRANTS.c.source == GrantSource.PLAN_ALLOWANCE.value,
                              GRANTS.c.expires_at >= ws.c.next_renewal_at)
    query = (select(GRANTS.c.id, GRANTS.c.workspace_id, GRANTS.c.remaining, GRANTS.c.expires_at)
             .join(ws, ws.c.id == GRANTS.c.workspace_id)
             .where(GRANTS.c.live, GRANTS.c.remaining > 0, GRANTS.c.expires_at <= now, not_(unclosed_allowance)))
    if skip:
        query = query.where(GRANTS.c.id.not_in(skip))
    if only is not None:
        query = query.where(GRANTS.c.id == only)
    rows = (await session.execute(
        query.order_by(GRANTS.c.id).limit(batch).with_for_update(of=GRANTS, skip_locked=True))).all()
    if claimed is not None:
        claimed[:] = [(r.id, r.workspace_id) for r in rows]  # [:]: a retried transaction claims again
    for r in rows:
        posting = Posting(r.workspace_id, Cause.EXPIRY, None, None, occurred_at=r.expires_at)
        posting.add(r.id, EntryKind.EXPIRE, r.remaining)
        await post_movements(session, posting)
        events.emit(session, r.workspace_id, events.CREDITS_EXPIRED, grantId=str(r.id),
                    credits=format_credits(r.remaining), expiredAt=r.expires_at.isoformat())
    return len(rows)


async def _time_out_holds(session: AsyncSession, now: datetime, ttl: timedelta, batch: int,
                          skip: set[uuid.UUID] = frozenset(), only: uuid.UUID | None = None,
                          claimed: list[tuple[uuid.UUID, uuid.UUID]] | None = None, *,
                          workspace_id: uuid.UUID | None = None) -> int:
    """Release the holds of a batch of generations past their deadline (or `only` that one,
    never one in `skip`; only that workspace's with `workspace_id`)."""
    query = select(Generation).where(Generation.status == GenerationStatus.STARTED,
                                     Generation.started_at <= now - ttl)
    if workspace_id is not None:
        query = query.where(Generation.workspace_id == workspace_id)
    if skip:
        query = query.where(Generation.id.not_in(skip))
    if only is not None:
        query = query.where(Generation.id == only)
    gens = list((await session.execute(
        query.order_by(Generation.id).limit(batch).with_for_update(skip_locked=True))).scalars())
    if claimed is not None:
        claimed[:] = [(g.id, g.workspace_id) for g in gens]  # [:]: a retried transaction claims again
    if gens:  # each timed out at its deadline, however late we run
        await time_out(session, [(gen, gen.started_at + ttl) for gen in gens])
    return len(gens)


# --- reading: what happens next ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BucketOutlook:
    grant: Grant
    rolls_over: int
    expires: int
    stays: int


@dataclass(frozen=True, slots=True)
class Breakage:
    period_start: datetime
    period_end: datetime
    expired_units: int
    rolled_over_units: int
    issued_units: int


@dataclass(frozen=True, slots=True)
class Schedule:
    workspace: Workspace
    plan: Plan
    next_renewal_at: datetime
    buckets: list[BucketOutlook]
    breakage: list[Breakage]


MAX_PERIODS_BACK = 120  # ten years of monthly breakage


async def schedule(db: Database, caller: Caller, *, workspace_id: str, periods: int = 12) -> Schedule:
    """The next renewal, what each live bucket will do at it ("120 roll over, 30 expire"), and
    the breakage (credits lost to expiry) of the last closed periods."""
    ws_id = parse_id(workspace_id, "workspace")
    if not 1 <= periods <= MAX_PERIODS_BACK:  # refused like any bad argument, never quietly clamped
        raise ValidationFailed("periodsBack", f"must be between 1 and {MAX_PERIODS_BACK}")

    async def work(session: AsyncSession) -> Schedule:
        await authorize(session, caller, ws_id, Action.VIEW_BALANCE, what="workspace")
        ws = await session.get_one(Workspace, ws_id)
        plan = await session.get_one(Plan, ws.plan_id)
        boundary = ws.next_renewal_at
        grants = list((await session.execute(
            select(Grant).where(Grant.workspace_id == ws_id, Grant.live)
            .order_by(Grant.expires_at.nulls_last(), Grant.created_at)
        )).scalars())
        # The close's own rule over the whole allowance, not a cap per piece: a split allowance
        # shares one cap, and the schedule must not promise more than the close will roll over.
        outlook = renewal(ws, await allowance_pieces(session, ws))
        buckets = []
        for g in grants:
            rolls = expires = 0
            if g.expires_at is not None and g.expires_at <= boundary:
                rolls = outlook.rolls_over(g.id)  # only this period's allowance rolls over
                expires = g.remaining - rolls
            buckets.append(BucketOutlook(g, rolls, expires, g.remaining - rolls - expires))
        closes = list((await session.execute(
            select(PeriodClose).where(PeriodClose.workspace_id == ws_id)
            .order_by(PeriodClose.period_start.desc()).limit(periods)
        )).scalars())
        # Breakage of a period: every expiry entry that belongs to it, from any grant (allowance,
        # promotion, trial, rollover), by business time: after its start, up to its end.
        breakage = []
        for c in closes:
            lost = (await session.execute(
                select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                    LedgerEntry.workspace_id == ws_id, LedgerEntry.kind == EntryKind.EXPIRE,
                    LedgerEntry.occurred_at > c.period_start, LedgerEntry.occurred_at <= c.period_end,
                )
            )).scalar_one()
            breakage.append(Breakage(c.period_start, c.period_end, int(lost), c.rolled_over_units, c.issued_units))
        return Schedule(ws, plan, boundary, buckets, breakage)

    return await db.read(work)
