"""Pure rules for spend limits: which period a moment falls in, in the workspace's timezone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domain.errors import ValidationFailed
from domain.governance.models import LimitPeriod


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationFailed("timezone", f"unknown IANA timezone {name!r}") from None
    return name


def period_start(period: LimitPeriod, at: datetime, timezone: str) -> datetime:
    """The start (UTC) of the day, week (Monday) or month containing `at`, on the workspace's
    local calendar: a Tokyo team's day starts at Tokyo midnight."""
    local = at.astimezone(ZoneInfo(timezone))
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is LimitPeriod.WEEK:
        start -= timedelta(days=start.weekday())
    elif period is LimitPeriod.MONTH:
        start = start.replace(day=1)
    # Re-attach the zone at the local midnight (the offset may differ from `at`'s across DST).
    start = start.replace(tzinfo=None).replace(tzinfo=ZoneInfo(timezone))
    return start.astimezone(UTC)


def period_end(period: LimitPeriod, start: datetime, timezone: str) -> datetime:
    """The end of the period that `start` (a `period_start` in the same `timezone`) begins. Only
    valid in the timezone the start was computed in: in another, a month starting on March 1,
    00:00 UTC reads as February 28 in New York. A period in progress keeps the end it started
    with (`Period`, stored beside its start), whatever the workspace's timezone is now."""
    tz = ZoneInfo(timezone)
    local = start.astimezone(tz).replace(tzinfo=None)
    if period is LimitPeriod.DAY:
        nxt = local + timedelta(days=1)
    elif period is LimitPeriod.WEEK:
        nxt = local + timedelta(days=7)
    else:
        nxt = local.replace(year=local.year + (local.month == 12), month=local.month % 12 + 1)
    return nxt.replace(tzinfo=tz).astimezone(UTC)


class Period(NamedTuple):
    start: datetime
    end: datetime


def period_of(period: LimitPeriod, at: datetime, timezone: str) -> Period:
    """The day, week or month containing `at` on the local calendar of `timezone`."""
    start = period_start(period, at, timezone)
    return Period(start, period_end(period, start, timezone))


def in_progress(period: LimitPeriod, now: datetime, timezone: str, latest: Period | None) -> Period:
    """The period in progress at `now`, given the latest one already started (or None). A period
    keeps the bounds it has (see `rebased` for a change of timezone), so a change of the
    workspace's timezone neither forgets what the period used (a fresh limit mid-period) nor the
    overages approved for it; after it, periods follow the local calendar of `timezone`."""
    if latest is not None and latest.start <= now < latest.end:
        return latest
    return period_of(period, now, timezone)


def rebased(period: LimitPeriod, current: Period, timezone: str) -> Period:
    """The period in progress when the workspace's timezone changes to `timezone`: it keeps its
    start and what it used, and ends at the new calendar's boundary nearest to its planned end
    (up to half a period earlier or later), so the periods after it follow the new calendar with
    neither an overlap nor a stub. Kept to its old end, a UTC month switched to New York would
    end at 00:00 UTC and leave a five-hour "rest of New York's month" with a fresh allowance."""
    around = period_of(period, current.end, timezone)
    end = min((around.start, around.end), key=lambda boundary: abs(boundary - current.end))
    return Period(current.start, end if end > current.start else around.end)
