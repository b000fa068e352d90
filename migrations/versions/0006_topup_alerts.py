"""auto top-up settings and alerts

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("workspaces", sa.Column("low_balance_alert_units", sa.BigInteger(), nullable=True))
    op.add_column("workspaces", sa.Column("expiry_alert_days", sa.Integer(), server_default="7", nullable=False))
    op.add_column("workspaces", sa.Column("auto_topup_enabled", sa.Boolean(), server_default="false", nullable=False))
    op.create_table(
        "auto_topups",
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold_units", sa.BigInteger(), nullable=False),
        sa.Column("pack_id", sa.Uuid(), nullable=False),
        sa.Column("monthly_max_purchases", sa.Integer(), nullable=False),
        sa.Column("monthly_max_units", sa.BigInteger(), nullable=False),
        sa.Column("failure_limit", sa.Integer(), server_default="3", nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("armed", sa.Boolean(), server_default="true", nullable=False),
        sa.Column("sequence", sa.Integer(), server_default="0", nullable=False),
        sa.Column("month_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purchases_this_month", sa.Integer(), server_default="0", nullable=False),
        sa.Column("units_this_month", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("enabled_by", sa.Uuid(), nullable=False),
        sa.CheckConstraint("threshold_units >= 0 AND monthly_max_purchases >= 0 AND monthly_max_units >= 0 "
                           "AND failure_limit >= 1", name=op.f("ck_auto_topups_figures_not_negative")),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_auto_topups_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["pack_id"], ["credit_packs.id"], name=op.f("fk_auto_topups_pack_id_credit_packs")),
        sa.ForeignKeyConstraint(["enabled_by"], ["users.id"], name=op.f("fk_auto_topups_enabled_by_users")),
        sa.PrimaryKeyConstraint("workspace_id", name=op.f("pk_auto_topups")),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("status", sa.Enum("OPEN", "RESOLVED", name="alert_status", native_enum=False, create_constraint=True,
                                    length=32), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_alerts_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["acknowledged_by"], ["users.id"], name=op.f("fk_alerts_acknowledged_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    op.create_index("ix_alerts_workspace_id", "alerts", ["workspace_id", "opened_at"], unique=False)
    # Fires once per crossing: at most one open alert per condition.
    op.create_index("uq_alerts_open_condition", "alerts", ["workspace_id", "kind", "subject"], unique=True,
                    postgresql_where=sa.text("status = 'OPEN'"))


def downgrade() -> None:
    op.drop_index("uq_alerts_open_condition", table_name="alerts", postgresql_where=sa.text("status = 'OPEN'"))
    op.drop_index("ix_alerts_workspace_id", table_name="alerts")
    op.drop_table("alerts")
    op.drop_table("auto_topups")
    op.drop_column("workspaces", "auto_topup_enabled")
    op.drop_column("workspaces", "expiry_alert_days")
    op.drop_column("workspaces", "low_balance_alert_units")
