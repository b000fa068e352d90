"""What the next period close will do to a workspace's allowance (`rules.Renewal`), from the
rollover rule the period began under (`Workspace.period_rule`) and the allowance's pieces: the
one rule the close applies and the credit schedule, the balance's `expiringSoon` and the expiry
alert show. Only `allowance_pieces` reads the database."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.ledger.models import Grant, GrantSource
from domain.periods.rules import (
    AllowancePiece,
    Renewal,
    allowance_rollover,
    rollover_expiry,
)
from domain.plans import RolloverPolicy
from domain.workspaces.models import Workspace


def is_period_allowance(g: Grant, period_start: datetime) -> bool:
    """A piece of the allowance of the period starting at `period_start` (as issued, or split off
    it by a transfer, which keeps its source and start time); `g` a grant row or snapshot."""
    return g.source == GrantSource.PLAN_ALLOWANCE and g.effective_at == period_start


async def allowance_pieces(session: AsyncSession, ws: Workspace, *, lock: bool = False) -> list[Grant]:
    """Every piece of the allowance of the workspace's current period, spent or not: an allowance
    split by transfers (to a seat, a billing group) leaves pieces that keep its source and start
    time and point at their parent, and a spent middle piece still links a piece to its root."""
    query = select(Grant).where(Grant.workspace_id == ws.id, Grant.source == GrantSource.PLAN_ALLOWANCE,
                                Grant.effective_at == ws.period_start).order_by(Grant.id)
    return list((await session.execute(query.with_for_update() if lock else query)).scalars())


def expires_at_close(g: Grant, boundary: datetime) -> bool:
    """Whether the close at `boundary` expires (or rolls over) what is left of the allowance piece
    `g`. An allowance issued by the plan expires exactly then (NEVER_EXPIRE: never); a piece an
    operator granted by hand (source PLAN_ALLOWANCE, effective at the period start) may be given
    another expiry, and keeps it: a later one, so the close never takes a credit before the
    expiry it was shown with; an earlier one, so it expires on its date (the expiry sweep takes
    it then, `periods.service._expire_due_grants`) and a close that comes late never rolls over
    credits dead since that date."""
    return g.expires_at is not None and g.expires_at == boundary


def has_every_piece(pieces: Iterable[Grant]) -> bool:
    """Whether `pieces` (say, the live ones) hold every piece the rollover of those pieces depends
    on: each piece's parent, up to its root, whose amount is what was issued. A spent piece no
    other piece was split from changes nothing."""
    ids = {g.id for g in pieces}
    return all(g.parent_grant_id is None or g.parent_grant_id in ids for g in pieces)


def renewal(ws: Workspace, pieces: Iterable[Grant]) -> Renewal:
    """What the close at `ws.next_renewal_at` does to the period's allowance `pieces` under the
    rule the period began with (`ws.period_rule`; a plan changed or edited since applies from
    the next boundary): ROLLOVER carries the capped part of the unused allowance into rollover
    grants that expire `periods` boundaries later (`allowance_rollover`); RESET and NEVER_EXPIRE
    roll nothing over."""
    pieces = list(pieces)
    rule = ws.period_rule
    if rule.policy is not RolloverPolicy.ROLLOVER:
        return Renewal({g.id: 0 for g in pieces}, None)
    keeps = allowance_rollover(
        [AllowancePiece(g.id, g.parent_grant_id, g.amount, g.remaining, expires_at_close(g, ws.next_renewal_at))
         for g in pieces],
        rule.cap_units, rule.cap_percent)
    until = rollover_expiry(ws.billing_anchor, ws.next_renewal_at, rule.periods) if any(keeps.values()) else None
    return Renewal(keeps, until)


async def renewal_seen_from(session: AsyncSession, ws: Workspace, live: list[Grant], horizon: datetime) -> Renewal:
    """The renewal, as far as it matters by `horizon`, from a workspace's `live` grants already
    read. They hold every piece of the allowance that matters unless a piece was split off one
    since spent out (a transfer to a seat or a group); then, if the allowance expires by the
    horizon, it is read whole: one statement more."""
    pieces = [g for g in live if is_period_allowance(g, ws.period_start)]
    if (ws.period_rollover_policy is RolloverPolicy.ROLLOVER and not has_every_piece(pieces)
            and any(g.expires_at is not None and g.expires_at <= horizon for g in pieces)):
        pieces = await allowance_pieces(session, ws)
    return renewal(ws, pieces)


def lost_by(grants: Iterable[Grant], r: Renewal, horizon: datetime) -> dict[uuid.UUID, int]:
    """What of each grant expiring by `horizon` is really lost then (`Renewal.lost_by`): the
    grants that lose nothing are left out."""
    out = {}
    for g in grants:
        lost = r.lost_by(g.id, g.remaining, g.expires_at, horizon)
        if lost > 0:
            out[g.id] = lost
    return out
