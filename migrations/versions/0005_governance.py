"""governance: workspace timezone, billing groups, spend limits with per-period usage and raises, overage
requests, notifications, an append-only audit log

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _enum(name: str, *values: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    op.add_column("workspaces", sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False))
    op.create_table(
        "billing_groups",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_billing_groups_workspace_id_workspaces")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_groups")),
    )
    op.create_index(op.f("ix_billing_groups_workspace_id"), "billing_groups", ["workspace_id"], unique=False)
    op.add_column("members", sa.Column("billing_group_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("fk_members_billing_group_id_billing_groups"), "members", "billing_groups",
                          ["billing_group_id"], ["id"])
    op.add_column("grants", sa.Column("billing_group_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("fk_grants_billing_group_id_billing_groups"), "grants", "billing_groups",
                          ["billing_group_id"], ["id"])
    op.create_check_constraint(op.f("ck_grants_group_has_group"), "grants",
                               "(scope = 'GROUP') = (billing_group_id IS NOT NULL)")
    op.add_column("generations", sa.Column("limit_charges", postgresql.JSONB(astext_type=sa.Text()),
                                           server_default=sa.text("'[]'::jsonb"), nullable=False))

    op.create_table(
        "spend_limits",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("scope", _enum("limit_scope", "MEMBER", "GROUP", "WORKSPACE"), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=True),
        sa.Column("billing_group_id", sa.Uuid(), nullable=True),
        sa.Column("period", _enum("limit_period", "DAY", "WEEK", "MONTH"), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("action", _enum("limit_action", "BLOCK", "REQUIRE_APPROVAL"), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_units >= 0", name=op.f("ck_spend_limits_amount_not_negative")),
        sa.CheckConstraint("(scope = 'MEMBER') = (member_id IS NOT NULL) AND (scope = 'GROUP') = (billing_group_id IS NOT NULL)",
                           name=op.f("ck_spend_limits_scope_target")),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_spend_limits_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"], name=op.f("fk_spend_limits_member_id_members")),
        sa.ForeignKeyConstraint(["billing_group_id"], ["billing_groups.id"],
                                name=op.f("fk_spend_limits_billing_group_id_billing_groups")),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_spend_limits_created_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spend_limits")),
    )
    op.create_index("uq_spend_limits_active_target", "spend_limits",
                    ["workspace_id", "scope", "member_id", "billing_group_id", "period"], unique=True,
                    postgresql_where=sa.text("removed_at IS NULL"), postgresql_nulls_not_distinct=True)
    op.create_table(
        "limit_usage",
        sa.Column("limit_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_units", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("used_units >= 0", name=op.f("ck_limit_usage_used_not_negative")),
        sa.ForeignKeyConstraint(["limit_id"], ["spend_limits.id"], name=op.f("fk_limit_usage_limit_id_spend_limits")),
        sa.PrimaryKeyConstraint("limit_id", "period_start", name=op.f("pk_limit_usage")),
    )
    op.create_table(
        "overage_requests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("limit_id", sa.Uuid(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("model_key", sa.String(length=100), nullable=True),
        sa.Column("status", _enum("overage_status", "PENDING", "APPROVED", "DENIED", "LAPSED"), nullable=False),
        sa.Column("lapses_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("approved_units", sa.BigInteger(), nullable=True),
        sa.Column("approval_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision_reason", sa.String(length=500), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount_units > 0 AND (approved_units IS NULL OR approved_units > 0)",
                           name=op.f("ck_overage_requests_amounts_positive")),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_overage_requests_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["member_id"], ["members.id"], name=op.f("fk_overage_requests_member_id_members")),
        sa.ForeignKeyConstraint(["limit_id"], ["spend_limits.id"], name=op.f("fk_overage_requests_limit_id_spend_limits")),
        sa.ForeignKeyConstraint(["decided_by"], ["users.id"], name=op.f("fk_overage_requests_decided_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_overage_requests")),
    )
    op.create_index("ix_overage_requests_workspace_id", "overage_requests", ["workspace_id", "requested_at"], unique=False)
    op.create_table(
        "notifications",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_notifications_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_notifications_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index("ix_notifications_user_id", "notifications", ["user_id", "id"], unique=False)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("workspace_id", sa.Uuid(), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column("before", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("after", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], name=op.f("fk_audit_log_workspace_id_workspaces")),
        sa.ForeignKeyConstraint(["actor_id"], ["users.id"], name=op.f("fk_audit_log_actor_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_workspace_id_id", "audit_log", ["workspace_id", "id"], unique=False)
    # Money rule 5 applies to the audit log too.
    op.execute("CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
               "FOR EACH ROW EXECUTE FUNCTION creditpool_refuse_change()")
    op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
               "FOR EACH STATEMENT EXECUTE FUNCTION creditpool_refuse_change()")


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
    op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
    op.drop_index("ix_audit_log_workspace_id_id", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_notifications_user_id", table_name="notifications")
    op.drop_table("notifications")
    op.drop_index("ix_overage_requests_workspace_id", table_name="overage_requests")
    op.drop_table("overage_requests")
    op.drop_table("limit_usage")
    op.drop_index("uq_spend_limits_active_target", table_name="spend_limits",
                  postgresql_where=sa.text("removed_at IS NULL"))
    op.drop_table("spend_limits")
    op.drop_column("generations", "limit_charges")
    op.drop_constraint(op.f("ck_grants_group_has_group"), "grants", type_="check")
    op.drop_constraint(op.f("fk_grants_billing_group_id_billing_groups"), "grants", type_="foreignkey")
    op.drop_column("grants", "billing_group_id")
    op.drop_constraint(op.f("fk_members_billing_group_id_billing_groups"), "members", type_="foreignkey")
    op.drop_column("members", "billing_group_id")
    op.drop_index(op.f("ix_billing_groups_workspace_id"), table_name="billing_groups")
    op.drop_table("billing_groups")
    op.drop_column("workspaces", "timezone")
