from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from domain.base import Base, created_at, str_enum, uuid_pk
from domain.identity import User
from domain.plans import Plan, RolloverPolicy, RolloverRule


class AllocationMode(enum.StrEnum):
    POOLED = "POOLED"  # one shared workspace balance
    PER_SEAT = "PER_SEAT"  # each creator seat has its own allowance


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    BILLING_MANAGER = "billing_manager"
    MEMBER = "member"


class Seat(enum.StrEnum):
    CREATOR = "creator"  # may generate
    STANDARD = "standard"  # view, comment, download


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = (
        CheckConstraint("paid_creator_seats >= 0", name="paid_creator_seats_not_negative"),
        CheckConstraint(
            "period_rollover_periods >= 1 AND (period_rollover_cap_units IS NULL OR period_rollover_cap_units >= 0) "
            "AND (period_rollover_cap_percent IS NULL OR period_rollover_cap_percent BETWEEN 0 AND 100)",
            name="period_rollover_rule",
        ),
        Index("ix_workspaces_next_daily_at", "next_daily_at", postgresql_where=text("next_daily_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(100))
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"), index=True)
    allocation_mode: Mapped[AllocationMode] = mapped_column(
        str_enum(AllocationMode, "allocation_mode"), server_default=AllocationMode.POOLED.value
    )
    # PER_SEAT only: when a seat is empty, may its member spend from the workspace pool?
    pool_fallback: Mapped[bool] = mapped_column(default=False, server_default="false")
    # Creator seats bought on top of the plan's free ones (the seat purchase itself is billing's).
    paid_creator_seats: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime] = created_at()
    # Billing periods are monthly, on the anchor's day of the month (clamped to short months).
    billing_anchor: Mapped[datetime]
    period_start: Mapped[datetime]
    next_renewal_at: Mapped[datetime] = mapped_column(index=True)
    next_daily_at: Mapped[datetime | None]  # set while the plan has a daily free allowance
    cancelled_at: Mapped[datetime | None]  # no allowance is issued after this
    # The rollover rule of the plan the current period's allowance was issued under (migration
    # 0014): the close applies it, not the rule of a plan changed or edited since (`period_rule`).
    period_rollover_policy: Mapped[RolloverPolicy] = mapped_column(
        str_enum(RolloverPolicy, "period_rollover_policy"), default=RolloverPolicy.RESET, server_default="RESET"
    )
    period_rollover_cap_units: Mapped[int | None] = mapped_column(BigInteger)
    period_rollover_cap_percent: Mapped[int | None]
    period_rollover_periods: Mapped[int] = mapped_column(default=1, server_default="1")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")  # spend-limit periods
    low_balance_alert_units: Mapped[int | None] = mapped_column(BigInteger)  # alert under this; None: off
    expiry_alert_days: Mapped[int] = mapped_column(default=7, server_default="7")  # alert on grants expiring within
    # Mirrors auto_topups.enabled so the spend path knows, from the row it already read, whether
    # anything must run after a spend.
    auto_topup_enabled: Mapped[bool] = mapped_column(default=False, server_default="false")

    plan: Mapped[Plan] = relationship(lazy="raise")

    @property
    def period_rule(self) -> RolloverRule:
        return RolloverRule(self.period_rollover_policy, self.period_rollover_cap_units,
                            self.period_rollover_cap_percent, self.period_rollover_periods)

    @period_rule.setter
    def period_rule(self, rule: RolloverRule) -> None:
        self.period_rollover_policy, self.period_rollover_cap_units = rule.policy, rule.cap_units
        self.period_rollover_cap_percent, self.period_rollover_periods = rule.cap_percent, rule.periods

    def creator_seat_limit(self, plan: Plan) -> int:
        return min(plan.seat_cap, plan.free_creator_seats + self.paid_creator_seats)


class BillingGroup(Base):
    """A named part of a workspace (a campaign, a client) with its own reserved credits and cap."""

    __tablename__ = "billing_groups"

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = created_at()
    archived_at: Mapped[datetime | None]


class Member(Base):
    """A user's membership. Removal is a soft delete (`removed_at`): ledger and audit rows keep
    pointing at the member who acted, and the same user can be added again as a new member."""

    __tablename__ = "members"
    __table_args__ = (
        Index(
            "uq_members_active_user",
            "workspace_id",
            "user_id",
            unique=True,
            postgresql_where=text("removed_at IS NULL"),
        ),
        Index("ix_members_user_id", "user_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    role: Mapped[Role] = mapped_column(str_enum(Role, "member_role"))
    seat: Mapped[Seat] = mapped_column(str_enum(Seat, "member_seat"))
    created_at: Mapped[datetime] = created_at()
    removed_at: Mapped[datetime | None]

    # A member belongs to at most one billing group; its spend draws that group's grants first.
    billing_group_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("billing_groups.id"))

    user: Mapped[User] = relationship(lazy="raise")
