"""Pure rules for spend limits: which period a moment falls in, in the workspace's timezone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
    tz = ZoneInfo(timezone)
    local = start.astimezone(tz).replace(tzinfo=None)
    if period is LimitPeriod.DAY:
        nxt = local + timedelta(days=1)
    elif period is LimitPeriod.WEEK:
        nxt = local + timedelta(days=7)
    else:
        nxt = local.replace(year=local.year + (local.month == 12), month=local.month % 12 + 1)
    return nxt.replace(tzinfo=tz).astimezone(UTC)
