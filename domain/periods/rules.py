"""Pure calendar and rollover arithmetic: no database, no clock of its own."""

from __future__ import annotations

import calendar
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


def rollover_units(remaining: int, allowance: int, cap_units: int | None, cap_percent: int | None) -> int:
    """How much of an unused allowance rolls over: all of it, capped by an amount and/or by a
    percentage of the allowance (rounded down to the unit: a cap never rounds up)."""
    out = remaining
    if cap_units is not None:
        out = min(out, cap_units)
    if cap_percent is not None:
        out = min(out, allowance * cap_percent // 100)
    return max(out, 0)


def day_start(at: datetime) -> datetime:
    """Midnight UTC of `at`'s day: daily free credits reset at 00:00 UTC."""
    at = at.astimezone(UTC)
    return at.replace(hour=0, minute=0, second=0, microsecond=0)


def next_day(at: datetime) -> datetime:
    return day_start(at) + timedelta(days=1)
