"""Spend limits: a cap per day, week or month (in the workspace's timezone) on a member, a
billing group or the whole workspace. Held and captured credits count; released ones do not.

The check is one conditional UPDATE on the (limit, period) usage row inside the transaction
that places the hold, so two concurrent starts can never both pass a limit only one fits: the
second waits on the row lock and then sees the first one's usage.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, authorized_lock, authorized_row, parse_id
from domain.db import Database, Sql, as_sql
from domain.errors import NotFound, SpendLimitExceeded, ValidationFailed
from domain.governance import audit
from domain.governance.groups import group_in
from domain.governance.models import (
    LimitAction,
    LimitPeriod,
    LimitScope,
    LimitUsage,
    SpendLimit,
)
from domain.governance.rules import Period, in_progress, moved_by_change, period_end
from domain.money import parse_credits
from domain.workspaces.models import Member, Workspace
from policies import Action

# The usage row locked before the limit is read for the check: a start may have queued on it
# behind other charges, and a change of the limit (or an approval) committed meanwhile must be
# what it is checked against. `_CHARGE` runs after this, in a statement (and so a snapshot) of
# its own; had it waited for the lock itself, it would read the limit as it was when it queued.
_LOCK_USAGE = "SELECT 1 FROM limit_usage WHERE limit_id = $1 AND period_start = $2 FOR UPDATE"


# The approved overages of a limit's period still in force. Parameters: the limit, the period's
# start, now.
def _approved(limit: str, period: str, now: str) -> str:
    return f"""(SELECT coalesce(sum(approved_units), 0) FROM overage_requests
      WHERE limit_id = {limit} AND period_start = {period} AND status = 'APPROVED'
        AND (approval_expires_at IS NULL OR approval_expires_at > {now}))"""


# Usage may grow up to the limit (as it is now) plus the approved overages of that period still
# in force.
def _allowance(limit: str, period: str, now: str) -> str:
    return f"(SELECT amount_units FROM spend_limits WHERE id = {limit}) + {_approved(limit, period, now)}"


_CHARGE = f"""
UPDATE limit_usage SET used_units = used_units + $1
WHERE limit_id = $2 AND period_start = $3 AND used_units + $1 <= {_allowance("$2", "$3", "$4")}
RETURNING used_units
"""
# What a refusal reports: the same figures, and whether the limit may be raised by a request.
_REFUSED = f"""
SELECT u.used_units, {_allowance("$1", "$2", "$3")} AS allowance, l.action
FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id WHERE u.limit_id = $1 AND u.period_start = $2
"""
_APPLICABLE = """
SELECT id, scope, period, amount_units, action FROM spend_limits
WHERE workspace_id = $1 AND removed_at IS NULL
  AND (scope = 'WORKSPACE' OR (scope = 'MEMBER' AND member_id = $2) OR (scope = 'GROUP' AND billing_group_id = $3))
ORDER BY id
"""
_APPROVED = f"SELECT {_approved('$1', '$2', '$3')}"
# A period's usage row, starting at $4 (0, or what a new limit counts of its period so far).
_USAGE_ROW = """
INSERT INTO limit_usage (limit_id, period_start, period_end, used_units) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING
"""
_TIMEZONE = "SELECT timezone FROM workspaces WHERE id = $1 FOR KEY SHARE"
_USED = "SELECT used_units FROM limit_usage WHERE limit_id = $1 AND period_start = $2"
_PERIOD_END = "SELECT period_end FROM limit_usage WHERE limit_id = $1 AND period_start = $2"
_LATEST_PERIODS = """
SELECT DISTINCT ON (u.limit_id) u.limit_id, l.period, u.period_start, u.period_end
FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id
WHERE l.workspace_id = $1 AND u.period_start <= $2
ORDER BY u.limit_id, u.period_start DESC
"""
_REBASE = "UPDATE limit_usage SET period_end = $3 WHERE limit_id = $1 AND period_start = $2"
# An approval lasts to the end of its period unless it was given a shorter life.
_REBASE_APPROVALS = """
UPDATE overage_requests SET approval_expires_at = $4
WHERE limit_id = $1 AND period_start = $2 AND status = 'APPROVED' AND approval_expires_at = $3
"""
_LATEST = """
SELECT period_start, period_end FROM limit_usage WHERE limit_id = $1 AND period_start <= $2
ORDER BY period_start DESC LIMIT 1
"""
_ADJUST = """
UPDATE limit_usage SET used_units = greatest(used_units + $3, 0) WHERE limit_id = $1 AND period_start = $2
"""
# A new limit's scope among the workspace's generations, and its period: $1 the workspace, $2
# the member (a MEMBER limit) or NULL, $3 the billing group (a GROUP limit) or NULL, $4 and $5
# the period's bounds. A generation counts in the period of its start, with the group it started
# in, as `charge` counts it.
_IN_SCOPE = """workspace_id = $1 AND ($2::uuid IS NULL OR member_id = $2) AND ($3::uuid IS NULL OR billing_group_id = $3)
  AND started_at >= $4 AND started_at < $5"""
# The running generations in scope, locked in id order (the order coalesced settlements lock
# them) and charged to the new limit's period ($6: the charge, as a one-element JSON array);
# their holds, which `charge` would have counted. A generation settled while this waited for its
# lock no longer matches (READ COMMITTED checks the locked row again) and is not charged.
_CHARGE_RUNNING = f"""
UPDATE generations AS g SET limit_charges = g.limit_charges || $6::jsonb
FROM (SELECT id FROM generations WHERE status = 'STARTED' AND {_IN_SCOPE} ORDER BY id FOR UPDATE) AS l
WHERE g.id = l.id
RETURNING g.quoted_units
"""
# What the settled generations in scope kept. A statement of its own, after the locks above:
# its snapshot sees the settlements those locks waited for.
_SETTLED_SPEND = f"SELECT coalesce(sum(captured_units), 0) FROM generations WHERE status <> 'STARTED' AND {_IN_SCOPE}"


# Each live limit's period in progress (its latest usage row, if it has not ended: one probe of
# the primary key per limit) that has used 80 % or more of its amount, then its allowance (the
# amount plus the approved overages in force; approvals only raise it, so a period under 80 % of
# the amount is under 80 % of the allowance, and its approvals are never summed). $1: now; $2:
# one workspace, or NULL for all.
_NEAR_FULL = f"""
WITH near AS MATERIALIZED (
    SELECT l.workspace_id, l.id, l.amount_units, u.period_start, u.used_units
    FROM spend_limits l
    CROSS JOIN LATERAL (SELECT period_start, period_end, used_units FROM limit_usage
                        WHERE limit_id = l.id AND period_start <= $1 ORDER BY period_start DESC LIMIT 1) AS u
    WHERE l.removed_at IS NULL AND ($2::uuid IS NULL OR l.workspace_id = $2) AND u.period_end > $1
      AND u.used_units * 100 >= l.amount_units * 80
)
SELECT n.workspace_id, n.id, n.period_start, n.used_units,
       n.amount_units + {_approved("n.id", "n.period_start", "$1")} AS allowance
FROM near n ORDER BY n.workspace_id, n.id
"""


async def applicable_limits(
    tx: AsyncSession | Sql, workspace_id: uuid.UUID, member_id: uuid.UUID, billing_group_id: uuid.UUID | None,
) -> list:
    """The live limits a member's spend counts against (theirs, their group's, the workspace's),
    in id order: rows of id, scope, period, amount_units, action."""
    return await as_sql(tx).fetch(_APPLICABLE, workspace_id, member_id, billing_group_id)


async def current_period(tx: AsyncSession | Sql, limit_id: uuid.UUID, period: LimitPeriod | str, now: datetime,
                         timezone: str) -> Period:
    """`in_progress` for a limit, from its usage rows."""
    latest = await as_sql(tx).fetchrow(_LATEST, limit_id, now)
    return in_progress(LimitPeriod(period), now, timezone,
                       latest and Period(latest["period_start"], latest["period_end"]))


async def open_period(tx: AsyncSession | Sql, limit_id: uuid.UUID, period: LimitPeriod | str, now: datetime,
                      timezone: str) -> Period:
    """The period in progress, with its usage row in place: the row fixes the period's end."""
    sql = as_sql(tx)
    current = await current_period(sql, limit_id, period, now, timezone)
    await sql.execute(_USAGE_ROW, limit_id, current.start, current.end, 0)
    return current


async def follow_timezone(tx: AsyncSession | Sql, workspace_id: uuid.UUID, timezone: str, now: datetime) -> None:
    """The workspace's timezone changes to `timezone`: each limit's latest period moves its end
    to the new calendar (`rules.moved_by_change`), and the approvals lasting to that end move
    with it."""
    sql = as_sql(tx)
    for row in await sql.fetch(_LATEST_PERIODS, workspace_id, now):
        old = Period(row["period_start"], row["period_end"])
        new = moved_by_change(LimitPeriod(row["period"]), old, timezone, now)
        if new is not None:
            await sql.execute(_REBASE, row["limit_id"], old.start, new.end)
            await sql.execute(_REBASE_APPROVALS, row["limit_id"], old.start, old.end, new.end)


async def period_ends(tx: AsyncSession | Sql, limit_id: uuid.UUID, period: LimitPeriod | str, start: datetime,
                      timezone: str) -> datetime:
    """When the limit's period that began at `start` ends, as fixed when it began. A period
    with no usage row yet has not been fixed: it ends by the workspace's calendar now."""
    ends = await as_sql(tx).fetchval(_PERIOD_END, limit_id, start)
    return ends if ends is not None else period_end(LimitPeriod(period), start, timezone)


async def approved_extra(tx: AsyncSession | Sql, limit_id: uuid.UUID, period: datetime, now: datetime) -> int:
    return int(await as_sql(tx).fetchval(_APPROVED, limit_id, period, now))


async def headroom(tx: AsyncSession | Sql, limit, period: datetime, now: datetime) -> int:
    """What a limit (an `applicable_limits` row) still lets through in `period`: its amount plus
    the approved overages in force, less what the period has used (negative when over)."""
    sql = as_sql(tx)
    used = await sql.fetchval(_USED, limit["id"], period) or 0
    return limit["amount_units"] + await approved_extra(sql, limit["id"], period, now) - used


async def refusing_limit(
    tx: AsyncSession | Sql, *, workspace_id: uuid.UUID, member_id: uuid.UUID,
    billing_group_id: uuid.UUID | None, units: int, now: datetime, timezone: str,
):
    """The limit that would refuse `member_id` a start holding `units` now, as `charge` would
    (the first in id order without room for them; a zero-priced start is refused by none), or
    None. Read-only, for a quote: no lock, no usage row (a period without one has used 0), so
    a concurrent start may still take the room first."""
    if units <= 0:
        return None
    sql = as_sql(tx)
    for limit in await applicable_limits(sql, workspace_id, member_id, billing_group_id):
        start = (await current_period(sql, limit["id"], limit["period"], now, timezone)).start
        if await headroom(sql, limit, start, now) < units:
            return limit
    return None


async def charge(
    tx: AsyncSession | Sql, *, workspace_id: uuid.UUID, member_id: uuid.UUID,
    billing_group_id: uuid.UUID | None, units: int, now: datetime,
) -> list[dict]:
    """Count `units` against every applicable limit, or raise SpendLimitExceeded (the whole
    transaction then rolls back, so nothing was counted). Returns what was charged, to be
    uncharged by what the generation later releases, or added to by an extra captured above the
    hold: a zero-priced start is charged nothing and refused by no limit (limits count credits,
    not generations), but its charges are recorded all the same, so that what it captures
    counts."""
    if units < 0:
        raise ValueError(f"units must not be negative, got {units!r}")
    sql = as_sql(tx)
    charges = []
    applicable = await applicable_limits(sql, workspace_id, member_id, billing_group_id)
    if applicable:
        # The timezone under a key-share lock, before any usage row: a change of timezone locks
        # the workspace FOR UPDATE and then moves the periods in progress, so it has either
        # committed (and this reads its timezone and its moved periods) or waits for this spend
        # (and moves the period it opens). An earlier, unlocked read could be stale.
        timezone = await sql.fetchval(_TIMEZONE, workspace_id)
    for limit in applicable:
        # id order: a fixed lock order across concurrent starts
        start = (await open_period(sql, limit["id"], limit["period"], now, timezone)).start
        if units:
            await sql.execute(_LOCK_USAGE, limit["id"], start)
            if await sql.fetchrow(_CHARGE, units, limit["id"], start, now) is None:
                refused = await sql.fetchrow(_REFUSED, limit["id"], start, now)
                raise SpendLimitExceeded(limit_id=limit["id"], scope=limit["scope"], period=limit["period"],
                                         limit=int(refused["allowance"]), used=refused["used_units"], requested=units,
                                         can_request=refused["action"] == LimitAction.REQUIRE_APPROVAL.value)
        charges.append({"limit": str(limit["id"]), "period": start.isoformat()})
    return charges


async def at_alert_level(tx: AsyncSession | Sql, now: datetime, workspace_id: uuid.UUID | None = None) -> list:
    """The live limits whose period in progress has used 80 % or more of its allowance now (in
    every workspace, or in `workspace_id`'s): rows of workspace_id, id, period_start, used_units
    and allowance, the figures their 80 % and 100 % alerts compare."""
    rows = await as_sql(tx).fetch(_NEAR_FULL, now, workspace_id)
    return [r for r in rows if r["allowance"] > 0 and r["used_units"] * 100 >= r["allowance"] * 80]


async def count_period_so_far(tx: AsyncSession | Sql, limit: SpendLimit, now: datetime) -> Period:
    """Open a new limit's period in progress with what it would have counted had it existed
    since the period began: the captured credits of the generations in its scope that started
    in the period and have settled, plus the holds of those still running, each of which is
    charged to this limit as its start would have been (so its settlement releases from the
    limit, or adds an extra above its hold, exactly as for the limits it started under). A
    one-statement settlement that read such a generation before this charge finds it charged
    and leaves it to the transaction path (`ledger.service._SETTLE_AT_ONCE`).

    The caller holds the workspace row (FOR NO KEY UPDATE): the timezone and so the period
    cannot move meanwhile. Not covered: a start committing concurrently with this transaction
    escapes the new limit (it read the limits before this one committed, and a start under no
    limit takes no lock this could wait on; the one-statement start decides from a read made
    before its write). Only starts in flight during these few statements can; closing that
    would cost every start a lock or a statement."""
    sql = as_sql(tx)
    timezone = await sql.fetchval(_TIMEZONE, limit.workspace_id)
    current = await current_period(sql, limit.id, limit.period, now, timezone)
    # The whole period, not up to `now`: a generation counts in the period its start's clock
    # put it in, and another server's clock may run a little ahead of ours.
    scope = (limit.workspace_id, limit.member_id, limit.billing_group_id, current.start, current.end)
    charge_json = json.dumps([{"limit": str(limit.id), "period": current.start.isoformat()}])
    held = sum(r["quoted_units"] for r in await sql.fetch(_CHARGE_RUNNING, *scope, charge_json))
    captured = int(await sql.fetchval(_SETTLED_SPEND, *scope))
    await sql.execute(_USAGE_ROW, limit.id, current.start, current.end, held + captured)
    return current


async def adjust(tx: AsyncSession | Sql, charges: list[dict], delta: int) -> None:
    """Move what a generation counts against its limits: negative for released credits,
    positive for extra credits captured above the hold (those are never refused: the work ran)."""
    if not charges or delta == 0:
        return
    sql = as_sql(tx)
    for c in sorted(charges, key=lambda c: c["limit"]):
        await sql.execute(_ADJUST, uuid.UUID(c["limit"]), datetime.fromisoformat(c["period"]), delta)


# --- managing limits ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LimitView:
    limit: SpendLimit
    period_start: datetime
    period_end: datetime
    used: int
    allowance: int  # the limit plus approved overages in force


async def set_spend_limit(
    db: Database, caller: Caller, *, workspace_id: str, scope: LimitScope, period: LimitPeriod, amount: str,
    action: LimitAction, member_id: str | None = None, billing_group_id: str | None = None,
) -> SpendLimit:
    """Set the limit on a target for a period, or change the one there (same limit, same usage)."""
    ws_id = parse_id(workspace_id, "workspace")
    units = parse_credits(amount, "amount", allow_zero=True)
    if (scope is LimitScope.MEMBER) != (member_id is not None):
        raise ValidationFailed("memberId", "a member limit names the member, and only it")
    if (scope is LimitScope.GROUP) != (billing_group_id is not None):
        raise ValidationFailed("billingGroupId", "a group limit names the group, and only it")

    async def work(session: AsyncSession) -> SpendLimit:
        # The workspace row first: the SELECT ... FOR UPDATE below locks nothing while the target
        # has no limit yet, so two admins setting its first limit at once would both insert and
        # the loser would hit uq_spend_limits_active_target. Under this lock the second one waits,
        # then finds the first one's limit and changes it in place. NO KEY UPDATE: it does not
        # conflict with the KEY SHARE lock every spend under limits takes, so starts never wait
        # for it. Only a caller allowed to set limits there queues on it (`authorized_lock`): an
        # outsider with a foreign id hears NotFound at once, as for an unknown one, and never
        # holds up the workspace's own limit changes; the check made again under the lock sees
        # a revoke committed while we waited.
        async def lock() -> None:
            await session.execute(select(Workspace.id).where(Workspace.id == ws_id).with_for_update(key_share=True))

        await authorized_lock(session, caller, ws_id, Action.SET_SPEND_LIMITS, what="workspace", lock=lock)
        member = group = None
        if member_id is not None:
            member = await session.get(Member, parse_id(member_id, "member"))
            if member is None or member.workspace_id != ws_id or member.removed_at is not None:
                raise NotFound("member")
        if billing_group_id is not None:
            group = await group_in(session, ws_id, billing_group_id)
        old = (await session.execute(select(SpendLimit).where(
            SpendLimit.workspace_id == ws_id, SpendLimit.scope == scope, SpendLimit.period == period,
            SpendLimit.removed_at.is_(None),
            SpendLimit.member_id == (member.id if member else None) if member else SpendLimit.member_id.is_(None),
            SpendLimit.billing_group_id == group if group else SpendLimit.billing_group_id.is_(None),
        ).with_for_update())).scalar_one_or_none()
        now = caller.clock.now()
        if old is not None:
            # Changed in place: the same limit keeps counting this period's usage and approved
            # overages (a new row would start the period again from zero).
            before = _limit_json(old)
            blocked = old.action is LimitAction.REQUIRE_APPROVAL and action is LimitAction.BLOCK
            old.amount_units, old.action = units, action
            await session.flush()
            if blocked:
                # No longer a limit one may ask to pass: its pending requests lapse, as when it is
                # removed, rather than wait for an approver to raise a limit set to block. The
                # overages already approved stay: each was a decision, with its own end.
                from domain.governance.overages import lapse_requests_on  # overages imports this module

                await lapse_requests_on(session, old, now)
            await _alerts_follow(session, old, now)
            audit.record(session, ws_id, caller.actor.user_id, "limit.set", "spend_limit", old.id,
                         before=before, after=_limit_json(old), at=now)
            return old
        limit = SpendLimit(workspace_id=ws_id, scope=scope, member_id=member.id if member else None,
                           billing_group_id=group, period=period, amount_units=units, action=action,
                           created_by=caller.actor.user_id)
        session.add(limit)
        await session.flush()
        # A new limit (a first one, or one set again after a removal) counts the period's spend
        # so far: given mid-month, a monthly limit caps the month, not what is left of it.
        counted = await count_period_so_far(session, limit, now)
        await _alerts_follow(session, limit, now, counted.start)
        audit.record(session, ws_id, caller.actor.user_id, "limit.set", "spend_limit", limit.id,
                     after=_limit_json(limit), at=now)
        return limit

    return await db.transaction(work)


async def _alerts_follow(session: AsyncSession, limit: SpendLimit, now: datetime,
                         period: datetime | None = None) -> None:
    from domain.governance.automation import limit_changed  # automation imports this module

    await limit_changed(session, limit, now, period)


def _limit_json(limit: SpendLimit) -> dict:
    return {"scope": limit.scope, "memberId": limit.member_id, "billingGroupId": limit.billing_group_id,
            "period": limit.period, "amount": limit.amount_units, "action": limit.action}


async def remove_spend_limit(db: Database, caller: Caller, *, limit_id: str) -> SpendLimit:
    lid = parse_id(limit_id, "spend limit")

    async def work(session: AsyncSession) -> SpendLimit:
        # Locked (after authorizing: an outsider never waits on it) and read again under the
        # lock: of two removals, the second waits for the first and then finds it removed.
        limit, _ = await authorized_row(session, caller, SpendLimit, lid, Action.SET_SPEND_LIMITS,
                                        what="spend limit", gone=lambda limit: limit.removed_at is not None)
        limit.removed_at = caller.clock.now()
        audit.record(session, limit.workspace_id, caller.actor.user_id, "limit.removed", "spend_limit", limit.id,
                     before=_limit_json(limit), at=limit.removed_at)
        await session.flush()
        from domain.governance.overages import lapse_requests_on  # overages imports this module

        await lapse_requests_on(session, limit, limit.removed_at)
        await _alerts_follow(session, limit, limit.removed_at)
        return limit

    return await db.transaction(work)


async def list_limits(db: Database, caller: Caller, *, workspace_id: str) -> list[LimitView]:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> list[LimitView]:
        await authorize(session, caller, ws_id, Action.VIEW_BALANCE, what="workspace")
        ws = await session.get_one(Workspace, ws_id)
        now = caller.clock.now()
        limits = (await session.execute(select(SpendLimit).where(
            SpendLimit.workspace_id == ws_id, SpendLimit.removed_at.is_(None)).order_by(SpendLimit.created_at))).scalars()
        out = []
        for limit in limits:
            start, end = await current_period(session, limit.id, limit.period, now, ws.timezone)
            used = (await session.execute(select(LimitUsage.used_units).where(
                LimitUsage.limit_id == limit.id, LimitUsage.period_start == start))).scalar_one_or_none() or 0
            out.append(LimitView(limit, start, end, used,
                                 limit.amount_units + await approved_extra(session, limit.id, start, now)))
        return out

    return await db.read(work)
