"""time-based rules: plan allowances and rollover, billing periods, daily free credits, hold
start times, business time on ledger entries, period closes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_SOURCES = "'PLAN_ALLOWANCE', 'TRIAL', 'PURCHASE', 'ADD_ON', 'PROMOTION', 'ENTERPRISE_COMMIT', 'ROLLOVER', 'REFUND', 'ADJUSTMENT'"
NEW_SOURCES = OLD_SOURCES + ", 'DAILY_FREE'"


def upgrade() -> None:
    op.add_column("plans", sa.Column("included_units", sa.BigInteger(), server_default="0", nullable=False))
    op.add_column("plans", sa.Column("billing_interval", sa.Enum("MONTHLY", "ANNUAL", name="billing_interval",
              native_enum=False, create_constraint=True, length=32), server_default="MONTHLY", nullable=False))
    op.add_column("plans", sa.Column("rollover_policy", sa.Enum("RESET", "ROLLOVER", "NEVER_EXPIRE",
              name="rollover_policy", native_enum=False, create_constraint=True, length=32), server_default="RESET",
              nullable=False))
    op.add_column("plans", sa.Column("rollover_cap_units", sa.BigInteger(), nullable=True))
    op.add_column("plans", sa.Column("rollover_cap_percent", sa.Integer(), nullable=True))
    op.add_column("plans", sa.Column("rollover_periods", sa.Integer(), server_default="1", nullable=False))
    op.add_column("plans", sa.Column("trial_units", sa.BigInteger(), server_default="0", nullable=False))
    op.add_column("plans", sa.Column("trial_days", sa.Integer(), server_default="0", nullable=False))
    op.add_column("plans", sa.Column("daily_free_units", sa.BigInteger(), server_default="0", nullable=False))
    op.create_check_constraint(op.f("ck_plans_allowances_not_negative"), "plans",
                               "included_units >= 0 AND trial_units >= 0 AND trial_days >= 0 AND daily_free_units >= 0 "
                               "AND rollover_periods >= 1 AND (rollover_cap_units IS NULL OR rollover_cap_units >= 0) "
                               "AND (rollover_cap_percent IS NULL OR rollover_cap_percent BETWEEN 0 AND 100)")

    op.add_column("workspaces", sa.Column("billing_anchor", sa.DateTime(timezone=True), nullable=True))
    op.add_column("workspaces", sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
    op.add_column("workspaces", sa.Column("next_renewal_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("workspaces", sa.Column("next_daily_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("workspaces", sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE workspaces SET billing_anchor = created_at, period_start = created_at, "
               "next_renewal_at = created_at + interval '1 month'")
    for column in ("billing_anchor", "period_start", "next_renewal_at"):
        op.alter_column("workspaces", column, nullable=False)
    op.create_index("ix_workspaces_next_renewal_at", "workspaces", ["next_renewal_at"], unique=False)
    op.create_index("ix_workspaces_next_daily_at", "workspaces", ["next_daily_at"], unique=False,
                    postgresql_where=sa.text("next_daily_at IS NOT NULL"))

    op.add_column("generations", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE generations SET started_at = created_at")
    op.alter_column("generations", "started_at", nullable=False)
    op.create_index("ix_generations_running", "generations", ["started_at"], unique=False,
                    postgresql_where=sa.text("status = 'STARTED'"))

    # Business time of a movement (the service clock); created_at stays the database's time.
    op.add_column("ledger_entries", sa.Column("occurred_at", sa.DateTime(timezone=True),
                                              server_default=sa.text("now()"), nullable=False))
    op.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only")
    op.execute("UPDATE ledger_entries SET occurred_at = created_at")
    op.execute("ALTER TABLE ledger_entries ENABLE TRIGGER ledger_entries_append_only")

    op.drop_constraint(op.f("ck_grants_grant_source"), "grants", type_="check")
    op.create_check_constraint(op.f("ck_grants_grant_source"), "grants", f"source IN ({NEW_SOURCES})")
    op.create_index("ix_grants_expiring", "grants", ["expires_at"], unique=False,
                    postgresql_where=sa.text("remaining > 0 AND expires_at IS NOT NULL"))

    op.create_table(
        "period_closes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rolled_over_units", sa.BigInteger(), nullable=False),
        sa.Column("expired_units", sa.BigInteger(), nullable=False),
        sa.Column("issued_units", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_period_closes_workspace_id_workspaces")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_period_closes")),
        sa.UniqueConstraint("workspace_id", "period_start", name=op.f("uq_period_closes_workspace_id_period_start")),
    )


def downgrade() -> None:
    op.drop_table("period_closes")
    op.drop_index("ix_grants_expiring", table_name="grants", postgresql_where=sa.text("remaining > 0 AND expires_at IS NOT NULL"))
    op.execute("UPDATE grants SET source = 'PLAN_ALLOWANCE' WHERE source = 'DAILY_FREE'")
    op.drop_constraint(op.f("ck_grants_grant_source"), "grants", type_="check")
    op.create_check_constraint(op.f("ck_grants_grant_source"), "grants", f"source IN ({OLD_SOURCES})")
    op.drop_column("ledger_entries", "occurred_at")
    op.drop_index("ix_generations_running", table_name="generations", postgresql_where=sa.text("status = 'STARTED'"))
    op.drop_column("generations", "started_at")
    op.drop_index("ix_workspaces_next_daily_at", table_name="workspaces", postgresql_where=sa.text("next_daily_at IS NOT NULL"))
    op.drop_index("ix_workspaces_next_renewal_at", table_name="workspaces")
    for column in ("cancelled_at", "next_daily_at", "next_renewal_at", "period_start", "billing_anchor"):
        op.drop_column("workspaces", column)
    op.drop_constraint(op.f("ck_plans_allowances_not_negative"), "plans", type_="check")
    for column in ("daily_free_units", "trial_days", "trial_units", "rollover_periods", "rollover_cap_percent",
                   "rollover_cap_units", "rollover_policy", "billing_interval", "included_units"):
        op.drop_column("plans", column)
