"""limit_usage.period_end, auto_topups.month_end: a period keeps the end it started with

A spend-limit period (and an auto top-up month) runs from a local midnight to the next one in
the workspace's timezone as it was when the period started. After a change of timezone the
period in progress runs to that end, but the end was recomputed from its start in the new
timezone: a UTC month that started on March 1 read as February 28, 19:00 in New York, so it
"ended" on March 28 (a fresh allowance three days early), and one that started on February 1
read as January 31 and raised ValueError (February 31) on every spend under a monthly limit. A
period's end is now stored with its start, and a change of timezone moves the end of the period
in progress to the new calendar's nearest boundary (`domain.governance.rules.rebased`).

Existing rows get the same: the boundary of the workspace's calendar (its timezone now) nearest
to one period after their start. For a start on that calendar it is exactly one period later;
for a start left from an earlier timezone it is what `rebased` would have made of it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The local midnight (a Monday's for weeks, a 1st's for months) in `tz` nearest to one period
# after `start`: add the period and half of one on the local wall clock, then truncate to the
# unit. PostgreSQL adds days and months to a timestamp without time zone by the calendar, as
# zoneinfo does in `rules.period_end`.
_END = "date_trunc({unit}, ({start} AT TIME ZONE {tz}) + {step}) AT TIME ZONE {tz}"
_UNIT = "lower({kind}::text)"
_STEP = ("CASE {kind} WHEN 'DAY' THEN interval '1 day 12 hours' WHEN 'WEEK' THEN interval '10 days 12 hours' "
         "ELSE interval '1 month 15 days' END")


def upgrade() -> None:
    op.add_column("limit_usage", sa.Column("period_end", sa.DateTime(timezone=True), nullable=True))
    usage_end = _END.format(start="u.period_start", tz="w.timezone", unit=_UNIT.format(kind="l.period"),
                            step=_STEP.format(kind="l.period"))
    op.execute(f"""
        UPDATE limit_usage u SET period_end = {usage_end}
        FROM spend_limits l JOIN workspaces w ON w.id = l.workspace_id WHERE l.id = u.limit_id
    """)
    op.alter_column("limit_usage", "period_end", nullable=False)
    op.create_check_constraint(op.f("ck_limit_usage_period_ends_after_start"), "limit_usage",
                               "period_end > period_start")

    op.add_column("auto_topups", sa.Column("month_end", sa.DateTime(timezone=True), nullable=True))
    month_end = _END.format(start="t.month_start", tz="w.timezone", unit="'month'", step="interval '1 month 15 days'")
    op.execute(f"""
        UPDATE auto_topups t SET month_end = {month_end}
        FROM workspaces w WHERE w.id = t.workspace_id AND t.month_start IS NOT NULL
    """)
    op.create_check_constraint(
        op.f("ck_auto_topups_month_bounds"), "auto_topups",
        "(month_start IS NULL) = (month_end IS NULL) AND (month_end IS NULL OR month_end > month_start)")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_auto_topups_month_bounds"), "auto_topups", type_="check")
    op.drop_column("auto_topups", "month_end")
    op.drop_constraint(op.f("ck_limit_usage_period_ends_after_start"), "limit_usage", type_="check")
    op.drop_column("limit_usage", "period_end")
