"""workspaces: the rollover rule the current period began under (period_rollover_*)

A period close applied the rollover rule of the workspace's plan as it was at the close: a plan
changed mid-period (ROLLOVER to RESET, say), or a plan an operator edited mid-period, decided what
happened to an allowance issued under the old rule, though a plan change "applies from the next
boundary" and the credit schedule had shown the old rule's outcome. The rule is now copied onto
the workspace row whenever a period's allowance is issued, and the close applies that copy.

Kept on the workspace, not on each allowance grant: every piece of one period's allowance (the
issued grant, pieces split off it by transfers, a piece an operator granted by hand) shares one
rule and one cap, so one copy per period is the whole truth and the hot path's grant rows stay
as narrow as they were. Existing workspaces get their current plan's rule, which is what their
next close would have applied before this revision.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workspaces", sa.Column(
        "period_rollover_policy",
        sa.Enum("RESET", "ROLLOVER", "NEVER_EXPIRE", name="period_rollover_policy", native_enum=False,
                create_constraint=True, length=32),
        server_default="RESET", nullable=False))
    op.add_column("workspaces", sa.Column("period_rollover_cap_units", sa.BigInteger(), nullable=True))
    op.add_column("workspaces", sa.Column("period_rollover_cap_percent", sa.Integer(), nullable=True))
    op.add_column("workspaces", sa.Column("period_rollover_periods", sa.Integer(), server_default="1", nullable=False))
    op.execute(
        "UPDATE workspaces w SET period_rollover_policy = p.rollover_policy, "
        "period_rollover_cap_units = p.rollover_cap_units, period_rollover_cap_percent = p.rollover_cap_percent, "
        "period_rollover_periods = p.rollover_periods FROM plans p WHERE p.id = w.plan_id"
    )
    op.create_check_constraint(
        op.f("ck_workspaces_period_rollover_rule"), "workspaces",
        "period_rollover_periods >= 1 AND (period_rollover_cap_units IS NULL OR period_rollover_cap_units >= 0) "
        "AND (period_rollover_cap_percent IS NULL OR period_rollover_cap_percent BETWEEN 0 AND 100)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_workspaces_period_rollover_rule"), "workspaces", type_="check")
    for column in ("period_rollover_periods", "period_rollover_cap_percent", "period_rollover_cap_units",
                   "period_rollover_policy"):
        op.drop_column("workspaces", column)
