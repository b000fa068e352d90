from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    String,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk


class LimitScope(enum.StrEnum):
    MEMBER = "MEMBER"
    GROUP = "GROUP"
    WORKSPACE = "WORKSPACE"


class LimitPeriod(enum.StrEnum):
    DAY = "DAY"
    WEEK = "WEEK"
    MONTH = "MONTH"


class LimitAction(enum.StrEnum):
    BLOCK = "BLOCK"
    REQUIRE_APPROVAL = "REQUIRE_APPROVAL"  # refused, but the member may ask for an overage


class OverageStatus(enum.StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    DENIED = "DENIED"
    LAPSED = "LAPSED"


class SpendLimit(Base):
    __tablename__ = "spend_limits"
    __table_args__ = (
        CheckConstraint("amount_units >= 0", name="amount_not_negative"),
        CheckConstraint(
            "(scope = 'MEMBER') = (member_id IS NOT NULL) AND (scope = 'GROUP') = (billing_group_id IS NOT NULL)",
            name="scope_target",
        ),
        # One live limit per target and period; a new one replaces it (the old row stays, removed).
        Index("uq_spend_limits_active_target", "workspace_id", "scope", "member_id", "billing_group_id", "period",
              unique=True, postgresql_where=text("removed_at IS NULL"), postgresql_nulls_not_distinct=True),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    scope: Mapped[LimitScope] = mapped_column(str_enum(LimitScope, "limit_scope"))
    member_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("members.id"))
    billing_group_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("billing_groups.id"))
    period: Mapped[LimitPeriod] = mapped_column(str_enum(LimitPeriod, "limit_period"))
    amount_units: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[LimitAction] = mapped_column(str_enum(LimitAction, "limit_action"))
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()
    removed_at: Mapped[datetime | None]


class LimitUsage(Base):
    """Held plus captured credits counted against a limit in one period. Updated with a
    conditional UPDATE in the transaction that places the hold: the row lock makes the check
    and the count one atomic step."""

    __tablename__ = "limit_usage"
    __table_args__ = (
        CheckConstraint("used_units >= 0", name="used_not_negative"),
        CheckConstraint("period_end > period_start", name="period_ends_after_start"),
    )

    limit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("spend_limits.id"), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    # Fixed when the period starts, in the timezone of that moment: a later change of the
    # workspace's timezone must not move the end of the period in progress (migration 0009).
    period_end: Mapped[datetime]
    used_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class OverageRequest(Base):
    __tablename__ = "overage_requests"
    __table_args__ = (
        CheckConstraint("amount_units > 0 AND (approved_units IS NULL OR approved_units > 0)", name="amounts_positive"),
        Index("ix_overage_requests_workspace_id", "workspace_id", "requested_at"),
        # Each limited start sums its limit's period's approvals (migration 0015).
        Index("ix_overage_requests_limit_period", "limit_id", "period_start"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    member_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("members.id"))
    limit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("spend_limits.id"))
    period_start: Mapped[datetime]
    amount_units: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    model_key: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[OverageStatus] = mapped_column(str_enum(OverageStatus, "overage_status"))
    lapses_at: Mapped[datetime]
    # An approval raises the limit for the request's period by approved_units, until it expires.
    approved_units: Mapped[int | None] = mapped_column(BigInteger)
    approval_expires_at: Mapped[datetime | None]
    decided_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[datetime | None]
    decision_reason: Mapped[str | None] = mapped_column(String(500))
    requested_at: Mapped[datetime]


class Notification(Base):
    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_user_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = created_at()
    read_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Who changed what, before and after. Append-only: a trigger refuses UPDATE and DELETE."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_workspace_id_id", "workspace_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    occurred_at: Mapped[datetime]
    created_at: Mapped[datetime] = created_at()


class AutoTopUp(Base):
    """Per workspace: buy `pack_id` when the pool's available credits fall below the threshold.
    `armed` is the in-flight latch: a spend that sees the pool under the threshold claims the
    purchase by flipping it off (only one concurrent spend can) and records the claim
    (`claimed_at`, `claimed_pack_id`); the purchase's outcome clears the claim and re-arms it. A
    claim with no outcome after `automation.CLAIM_TIMEOUT` is taken over under the same
    reference (`automation.claim_top_up`)."""

    __tablename__ = "auto_topups"
    __table_args__ = (
        CheckConstraint("threshold_units >= 0 AND monthly_max_purchases >= 0 AND monthly_max_units >= 0 "
                        "AND failure_limit >= 1", name="figures_not_negative"),
        CheckConstraint(
            "(month_start IS NULL) = (month_end IS NULL) AND (month_end IS NULL OR month_end > month_start)",
            name="month_bounds"),
        # Disarmed exactly while a claim is in flight, and a claim always knows its pack.
        CheckConstraint("armed = (claimed_at IS NULL) AND (claimed_at IS NULL) = (claimed_pack_id IS NULL)",
                        name="claim_in_flight"),
        # The scheduler looks for abandoned claims: only the few in flight are indexed.
        Index("ix_auto_topups_claimed_at", "claimed_at", postgresql_where=text("claimed_at IS NOT NULL")),
    )

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    enabled: Mapped[bool]
    threshold_units: Mapped[int] = mapped_column(BigInteger)
    pack_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("credit_packs.id"))
    monthly_max_purchases: Mapped[int]
    monthly_max_units: Mapped[int] = mapped_column(BigInteger)
    failure_limit: Mapped[int] = mapped_column(default=3, server_default="3")
    consecutive_failures: Mapped[int] = mapped_column(default=0, server_default="0")
    armed: Mapped[bool] = mapped_column(default=True, server_default="true")
    sequence: Mapped[int] = mapped_column(default=0, server_default="0")  # makes payment references unique
    month_start: Mapped[datetime | None]
    month_end: Mapped[datetime | None]  # fixed with month_start, like a limit period's end
    purchases_this_month: Mapped[int] = mapped_column(default=0, server_default="0")
    units_this_month: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    enabled_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    # The pack of a payment the provider did not answer: its retry goes out under the same
    # reference, so it must ask for the same amount, whatever pack is configured by then.
    unanswered_pack_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("credit_packs.id"))
    # The claim in flight: when it was made (or last taken over) and the pack it buys under
    # reference `sequence`. Its outcome clears both; if none comes (the process died while the
    # provider was asked, or recording the outcome failed), the claim is taken over after a
    # timeout for this same pack and reference, since the first attempt may have been paid.
    claimed_at: Mapped[datetime | None]
    claimed_pack_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("credit_packs.id"))


class AlertStatus(enum.StrEnum):
    OPEN = "OPEN"
    RESOLVED = "RESOLVED"


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_workspace_id", "workspace_id", "opened_at"),
        Index("uq_alerts_open_condition", "workspace_id", "kind", "subject", unique=True,
              postgresql_where=text("status = 'OPEN'")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))  # what the condition is about (a limit and period, a grant)
    status: Mapped[AlertStatus] = mapped_column(str_enum(AlertStatus, "alert_status"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    opened_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
