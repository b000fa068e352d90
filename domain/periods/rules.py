"""Pure calendar and rollover arithmetic: no database, no clock of its own."""

from __future__ import annotations

import calendar
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


def add_months(anchor: datetime, months: int) -> datetime:
    """The anchor moved by whole months, keeping its day of month (clamped to a short month's
    last day) and its time. Always computed from the anchor, never chained from the previous
    boundary, so a Jan 31 anchor renews Feb 28, Mar 31, Apr 30: no drift to the 28th."""
    month_index = anchor.month - 1 + months
    year, month = anchor.year + month_index // 12, month_index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def boundary_index(anchor: datetime, boundary: datetime) -> int:
    """Which boundary after the anchor `boundary` is (1 for the first renewal)."""
    k = (boundary.year - anchor.year) * 12 + boundary.month - anchor.month
    for candidate in (k - 1, k, k + 1):
        if add_months(anchor, candidate) == boundary:
            return candidate
    raise ValueError(f"{boundary} is not a boundary of {anchor}")


def rollover_expiry(anchor: datetime, boundary: datetime, periods: int) -> datetime:
    """When credits rolled over at `boundary` expire: `periods` boundaries later."""
    return add_months(anchor, boundary_index(anchor, boundary) + periods)


def rollover_units(remaining: int, allowance: int, cap_units: int | None, cap_percent: int | None) -> int:
    """How much of an unused allowance rolls over: all of it, capped by an amount and/or by a
    percentage of the allowance (rounded down to the unit: a cap never rounds up)."""
    out = remaining
    if cap_units is not None:
        out = min(out, cap_units)
    if cap_percent is not None:
        out = min(out, allowance * cap_percent // 100)
    return max(out, 0)


@dataclass(frozen=True, slots=True)
class AllowancePiece:
    """One piece of a period's allowance: the allowance as issued, or a part a transfer split off
    it (to a seat, a billing group, the pool), which points at the grant it came from."""

    id: uuid.UUID
    parent_id: uuid.UUID | None
    amount: int
    remaining: int
    expires: bool  # False: a never-expiring allowance, which stays as it is


def allowance_rollover(
    pieces: Iterable[AllowancePiece], cap_units: int | None, cap_percent: int | None
) -> dict[uuid.UUID, int]:
    """How much of each piece of one period's allowance rolls over at the period's close (the
    rest of an expiring piece expires). Splitting an allowance must not multiply its cap, so the
    cap applies once per original allowance (the root a piece's parents lead to, whose amount is
    what was issued) to the unused credits of all its pieces together; that rollover is then
    shared by the pieces in id order, each rolling over where it now is. The period close applies
    it and the credit schedule shows it: one rule, so the promise is what happens."""
    by_id = {p.id: p for p in pieces}

    def root(p: AllowancePiece) -> AllowancePiece:
        while p.parent_id in by_id:
            p = by_id[p.parent_id]
        return p

    unused: dict[uuid.UUID, int] = {}
    for p in by_id.values():
        if p.expires:
            r = root(p).id
            unused[r] = unused.get(r, 0) + p.remaining
    left = {r: rollover_units(u, by_id[r].amount, cap_units, cap_percent) for r, u in unused.items()}
    out = {}
    for p in sorted(by_id.values(), key=lambda p: p.id):  # uuid order, as PostgreSQL orders them
        keep = min(p.remaining, left[root(p).id]) if p.expires else 0
        if keep:
            left[root(p).id] -= keep
        out[p.id] = keep
    return out


@dataclass(frozen=True, slots=True)
class Renewal:
    """What the next period close does to the period's allowance, as the close computes it:
    how much of each piece rolls over (`keeps`, from `allowance_rollover`; the rest of an
    expiring piece expires) and when the rollover grants it issues expire (`rolled_until`; None
    when nothing rolls over). The close applies it; the credit schedule, the balance's
    `expiringSoon` and the expiry alert read it, so what they show is what happens."""

    keeps: Mapping[uuid.UUID, int]
    rolled_until: datetime | None

    def rolls_over(self, grant_id: uuid.UUID) -> int:
        """What of a bucket rolls over at the boundary: only pieces of this period's allowance do."""
        return self.keeps.get(grant_id, 0)

    def lost_by(self, grant_id: uuid.UUID, remaining: int, expires_at: datetime | None, horizon: datetime) -> int:
        """What of a bucket's `remaining` credits is lost to expiry by `horizon` if nothing is
        spent: all of them when it expires by then, except what the close rolls over into a grant
        that outlives the horizon."""
        if expires_at is None or expires_at > horizon:
            return 0
        keep = min(self.rolls_over(grant_id), remaining)
        if keep and self.rolled_until is not None and self.rolled_until <= horizon:
            keep = 0  # rolled over, then lost within the horizon as well
        return remaining - keep


NOTHING_ROLLS_OVER = Renewal({}, None)  # for buckets that are no period's allowance


def subscribed_at(cancelled_at: datetime | None, at: datetime) -> bool:
    """Whether a subscription cancelled at `cancelled_at` (None: not cancelled) still runs at
    `at`, the time a period or a day of free credits starts: a period that began before the
    cancellation is one the workspace had, however late the scheduler issues its credits."""
    return cancelled_at is None or at < cancelled_at


def day_start(at: datetime) -> datetime:
    """Midnight UTC of `at`'s day: daily free credits reset at 00:00 UTC."""
    at = at.astimezone(UTC)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def next_day(at: datetime) -> datetime:
    return day_start(at) + timedelta(days=1)
