"""The consumption order: which grants a spend draws from, and how much from each.

A pure rule, no database. The order is deterministic and explainable:

1. scope: seat grants, then billing-group grants, then workspace grants;
2. priority: lower number first;
3. expiry: soonest first, never-expiring last, so credits that would lapse are spent before they
   are lost, and bought credits (which never expire) are kept for last;
4. age: oldest grant first; among grants created together (a period close issues the rollover
   and the next allowance in one transaction, with the same expiry for a one-period rollover),
   rolled-over credits first: they are the older credits, and cannot roll over again;
5. grant id: a final tiebreak, so the order is total and the same for any input order.

Only grants that may pay *now* take part: effective (effective_at <= now), not expired
(now < expires_at; a grant expiring exactly now is expired, money rule 6) and with units available
(a grant's `remaining`, which never includes held credits). Which scopes a spend may draw from (pooled or per-seat allocation mode) is
the caller's decision: it passes only the buckets the spend is allowed to use.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


class Scope(enum.StrEnum):
    SEAT = "SEAT"
    GROUP = "GROUP"
    WORKSPACE = "WORKSPACE"


SCOPE_RANK = {Scope.SEAT: 0, Scope.GROUP: 1, Scope.WORKSPACE: 2}


@dataclass(frozen=True, slots=True)
class Bucket:
    """A grant as the rule sees it. Amounts are integer units (1 credit = 1000 units)."""

    grant_id: uuid.UUID
    scope: Scope
    priority: int  # lower number is drawn first
    effective_at: datetime  # tz-aware
    expires_at: datetime | None  # None: never expires
    created_at: datetime
    available: int  # spendable now: the grant's `remaining` (held credits excluded), >= 0
    rolled_over: bool = False  # a ROLLOVER grant: credits carried from an earlier period


@dataclass(frozen=True, slots=True)
class Draw:
    grant_id: uuid.UUID
    units: int


class NotEnough(Exception):
    """The allowed buckets cannot pay `needed` units; `available` is what they could pay."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"needs {needed} units, {available} available")
        self.needed = needed
        self.available = available


def consumption_key(bucket: Bucket) -> tuple:
    """Sort key for the consumption order; the last item, the grant id, makes it total."""
    # (0, when) sorts before (1,): any expiry comes before never expiring.
    expiry = (1,) if bucket.expires_at is None else (0, bucket.expires_at)
    # `not rolled_over`: False sorts first, so rolled-over credits come before what was created with them.
    return (SCOPE_RANK[bucket.scope], bucket.priority, expiry, bucket.created_at, not bucket.rolled_over,
            bucket.grant_id)


def _can_pay(bucket: Bucket, now: datetime) -> bool:
    return (
        bucket.available > 0
        and bucket.effective_at <= now
        and (bucket.expires_at is None or now < bucket.expires_at)
    )


def spendable(buckets: Iterable[Bucket], now: datetime) -> list[Bucket]:
    """The buckets that may pay at `now`, in consumption order."""
    return sorted((b for b in buckets if _can_pay(b, now)), key=consumption_key)


def available_total(buckets: Iterable[Bucket], now: datetime) -> int:
    return sum(b.available for b in spendable(buckets, now))


def plan_draws(buckets: Iterable[Bucket], units: int, now: datetime) -> list[Draw]:
    """Draw exactly `units` greedily in consumption order, or raise NotEnough (nothing drawn)."""
    if not isinstance(units, int) or isinstance(units, bool) or units <= 0:
        raise ValueError(f"units must be a positive integer, got {units!r}")
    order = spendable(buckets, now)
    total = sum(b.available for b in order)
    if total < units:
        raise NotEnough(needed=units, available=total)
    draws: list[Draw] = []
    needed = units
    for bucket in order:
        if needed == 0:
            break
        take = min(bucket.available, needed)
        draws.append(Draw(bucket.grant_id, take))
        needed -= take
    return draws


def may_draw(
    mode: str, pool_fallback: bool, spender: uuid.UUID, spender_group: uuid.UUID | None, scope: Scope,
    grant_member: uuid.UUID | None, grant_group: uuid.UUID | None,
) -> bool:
    """Which grants a member's spend may draw from, by allocation mode: POOLED draws from the
    workspace pool; PER_SEAT from the spender's own seat, and from the pool only with fallback;
    in both, a member of a billing group also draws that group's grants (before the pool).
    (`domain.ledger.service.spend_scopes` is the same rule as SQL, for the spend itself.)"""
    if scope is Scope.GROUP:
        return spender_group is not None and grant_group == spender_group
    if mode == "POOLED":
        return scope is Scope.WORKSPACE
    if scope is Scope.SEAT:
        return grant_member == spender
    return scope is Scope.WORKSPACE and pool_fallback
