"""Pure rules for spend limits: which period a moment falls in, in the workspace's timezone, and
when an overage request against a limit stops being decidable."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domain.errors import ValidationFailed
from domain.governance.models import LimitPeriod


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: a name too long for a file name
        raise ValidationFailed("timezone", f"unknown IANA timezone {name!r}") from None
    return name


def period_start(period: LimitPeriod, at: datetime, timezone: str) -> datetime:
    """The start (UTC) of the day, week (Monday) or month containing `at`, on the workspace's
    local calendar: a Tokyo team's day starts at Tokyo midnight."""
    tz = ZoneInfo(timezone)
    day = at.astimezone(tz).date()
    if period is LimitPeriod.WEEK:
        day -= timedelta(days=day.weekday())
    elif period is LimitPeriod.MONTH:
        day = day.replace(day=1)
    return _first_instant(day, tz)


def period_end(period: LimitPeriod, start: datetime, timezone: str) -> datetime:
    """The end of the period that `start` (a `period_start` in the same `timezone`) begins. Only
    valid in the timezone the start was computed in: in another, a month starting on March 1,
    00:00 UTC reads as February 28 in New York. A period in progress keeps the end it started
    with (`Period`, stored beside its start), whatever the workspace's timezone is now."""
    tz = ZoneInfo(timezone)
    day = start.astimezone(tz).date()
    if period is LimitPeriod.DAY:
        day += timedelta(days=1)
    elif period is LimitPeriod.WEEK:
        day += timedelta(days=7 - day.weekday())  # the next Monday, also from a start after a change (`in_progress`)
    else:
        day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
    return _first_instant(day, tz)


def _first_instant(day: date, tz: ZoneInfo) -> datetime:
    """The first instant (UTC) of a local date. The arithmetic is on dates, not wall-clock times:
    where the clocks jump forward at midnight (Santiago, Beirut, Havana), that day starts at 01:00
    and a day added to it would end at 01:00 too. Local midnight with fold=0 is the first instant
    of the date: where midnight repeats, the first one; where it does not exist, zoneinfo reads it
    with the offset before the jump, which is the jump itself."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


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
    overages approved for it; after it, periods follow the local calendar of `timezone`.

    The one after `latest` starts at the later of its end and the calendar's start: after a
    change of timezone the calendar's period containing `now` may have started before `latest`
    ended (an eastward change made after the new calendar's boundary, see `moved_by_change`), and
    starting it there would overlap time whose spend `latest` already counted, so that spend would
    count against neither bound. No overlap and no gap: it runs from `latest`'s end to the
    calendar's next boundary."""
    if latest is not None and latest.start <= now < latest.end:
        return latest
    calendar = period_of(period, now, timezone)
    if latest is not None and calendar.start < latest.end <= now:
        return Period(latest.end, calendar.end)
    return calendar


def rebased(period: LimitPeriod, current: Period, timezone: str) -> Period:
    """The period in progress when the workspace's timezone changes to `timezone`: it keeps its
    start and what it used, and ends at the new calendar's boundary nearest to its planned end
    (up to half a period earlier or later), so the periods after it follow the new calendar with
    neither an overlap nor a stub. Kept to its old end, a UTC month switched to New York would
    end at 00:00 UTC and leave a five-hour "rest of New York's month" with a fresh allowance."""
    around = period_of(period, current.end, timezone)
    end = min((around.start, around.end), key=lambda boundary: abs(boundary - current.end))
    return Period(current.start, end if end > current.start else around.end)


def moved_by_change(period: LimitPeriod, latest: Period, timezone: str, now: datetime) -> Period | None:
    """What a change of timezone to `timezone` at `now` makes of a limit's (or the top-up's)
    latest period: `rebased` when the new calendar's boundary is still ahead, whether the period
    is in progress or has ended (a UTC month that ended at 00:00 runs on to New York's 05:00 when
    the change comes at 02:00, rather than leave three hours of New York's old month with a fresh
    allowance); None when the change leaves it as it is.

    A period never ends before the change that moves it: what it counted up to `now` belongs to
    it. When the new boundary is already behind (Tokyo's March began at 15:00 UTC, the change comes
    at 16:00), the period keeps its end, and the next one runs from there to the new calendar's
    next boundary (`in_progress`): shorter than a full period, never overlapping this one."""
    new = rebased(period, latest, timezone)
    return new if new != latest and new.end > now else None


def overage_lapsed(now: datetime, *, lapses_at: datetime, period_end: datetime, requester_removed: bool,
                   limit_removed: bool = False, limit_blocks: bool = False, requester_outside: bool = False) -> bool:
    """Is a PENDING overage request dead at `now`? At its own deadline; with the period it was
    made in (`period_end` as stored with the period): an approval could raise nothing once that
    period is over; when its requester has left the workspace: nobody is left to spend it,
    and a member added back is a new member, whose limits it never was about; when its limit
    was removed: an approval would raise a limit that no longer counts (a limit set again on the
    same target is a new one, which starts afresh); when its limit is set to block
    (`limit_blocks`): no longer a limit one may ask to pass (approvals made before the switch
    stay, each was a decision); and when its requester is no longer under
    its limit (`requester_outside`: a group's limit, and the requester has left that group): an
    approval would raise the cap of the members left in the group, who asked for nothing, and
    not the requester's (a member moved back is under it again, but asks again).
    `overages.lapsed_by` is the same rule in SQL."""
    return (lapses_at <= now or period_end <= now or requester_removed or limit_removed or limit_blocks
            or requester_outside)
