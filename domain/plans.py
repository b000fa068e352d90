"""Plans: what a workspace subscribes to. Here: seat cap and free creator seats.
(Allowances, periods and rollover rules are the time-based-rules issue's to add.)"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, String, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk
from domain.errors import ValidationFailed


class RolloverPolicy(enum.StrEnum):
    RESET = "RESET"  # unused allowance expires at the period end
    ROLLOVER = "ROLLOVER"  # a capped part is carried into a rollover grant; the rest expires
    NEVER_EXPIRE = "NEVER_EXPIRE"  # allowance grants never expire


@dataclass(frozen=True, slots=True)
class RolloverRule:
    """What a period close does with the unused allowance of the period: the plan's rule when
    the period began (`Workspace.period_rule`), so that a plan changed or edited mid-period
    applies from the next boundary, as the credit schedule showed it."""

    policy: RolloverPolicy
    cap_units: int | None = None
    cap_percent: int | None = None
    periods: int = 1  # rolled-over credits expire this many boundaries later


class BillingInterval(enum.StrEnum):
    MONTHLY = "MONTHLY"
    ANNUAL = "ANNUAL"  # billed yearly; credits are still released monthly


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("seat_cap > 0", name="seat_cap_positive"),
        CheckConstraint("free_creator_seats >= 0 AND free_creator_seats <= seat_cap", name="free_creator_seats_range"),
        CheckConstraint(
            "included_units >= 0 AND trial_units >= 0 AND trial_days >= 0 AND daily_free_units >= 0 "
            "AND rollover_periods >= 1 AND (rollover_cap_units IS NULL OR rollover_cap_units >= 0) "
            "AND (rollover_cap_percent IS NULL OR rollover_cap_percent BETWEEN 0 AND 100)",
            name="allowances_not_negative",
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    seat_cap: Mapped[int]
    free_creator_seats: Mapped[int]
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = created_at()
    # Credits per monthly period: for the pool (POOLED) or for each creator seat (PER_SEAT).
    included_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    billing_interval: Mapped[BillingInterval] = mapped_column(
        str_enum(BillingInterval, "billing_interval"), default=BillingInterval.MONTHLY, server_default="MONTHLY"
    )
    rollover_policy: Mapped[RolloverPolicy] = mapped_column(
        str_enum(RolloverPolicy, "rollover_policy"), default=RolloverPolicy.RESET, server_default="RESET"
    )
    rollover_cap_units: Mapped[int | None] = mapped_column(BigInteger)
    rollover_cap_percent: Mapped[int | None]
    rollover_periods: Mapped[int] = mapped_column(default=1, server_default="1")  # rollover expires after N periods
    trial_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    trial_days: Mapped[int] = mapped_column(default=0, server_default="0")
    daily_free_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    @property
    def rollover_rule(self) -> RolloverRule:
        return RolloverRule(self.rollover_policy, self.rollover_cap_units, self.rollover_cap_percent,
                            self.rollover_periods)


async def plan_by_key(session: AsyncSession, key: str) -> Plan:
    plan = (await session.execute(select(Plan).where(Plan.key == key, Plan.is_active))).scalar_one_or_none()
    if plan is None:
        raise ValidationFailed("planKey", f"unknown plan {key!r}")
    return plan


async def list_plans(session: AsyncSession) -> list[Plan]:
    return list((await session.execute(select(Plan).where(Plan.is_active).order_by(Plan.seat_cap))).scalars())


async def active_plans(db) -> list[Plan]:
    return await db.read(list_plans)


# --- operators manage plans ------------------------------------------------------------------

PLAN_FIELDS = (
    "name", "seat_cap", "free_creator_seats", "included_units", "billing_interval", "rollover_policy",
    "rollover_cap_units", "rollover_cap_percent", "rollover_periods", "trial_units", "trial_days", "daily_free_units",
)


def _check_plan(values: dict) -> None:
    from domain.errors import ValidationFailed

    if not 1 <= values["seat_cap"] <= 100_000:
        raise ValidationFailed("seatCap", "must be between 1 and 100000")
    if not 0 <= values["free_creator_seats"] <= values["seat_cap"]:
        raise ValidationFailed("freeCreatorSeats", "must be between 0 and the seat cap")
    for name in ("trial_days", "rollover_periods"):
        if not 0 <= values[name] <= 3660:
            raise ValidationFailed(name, "must be between 0 and 3660")
    if values["rollover_periods"] < 1:
        raise ValidationFailed("rolloverPeriods", "must be at least 1")
    percent = values.get("rollover_cap_percent")
    if percent is not None and not 0 <= percent <= 100:
        raise ValidationFailed("rolloverCapPercent", "must be between 0 and 100")
    if (values["trial_units"] > 0) != (values["trial_days"] > 0):
        raise ValidationFailed("trialDays", "trial credits and trial length go together")


async def create_plan(db, caller, *, key: str, **values) -> Plan:
    """Operators define plans. Money values arrive as units (the API parses credit strings)."""
    import re

    from domain.errors import ValidationFailed
    from domain.identity import clean_name
    from domain.pricing.service import require_catalog_manager

    require_catalog_manager(caller)
    key = key.strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", key):
        raise ValidationFailed("key", "lowercase letters, digits and dashes, at most 64")
    values["name"] = clean_name(values["name"])
    _check_plan(values)

    async def work(session: AsyncSession) -> Plan:
        if (await session.execute(select(Plan.id).where(Plan.key == key))).first() is not None:
            raise ValidationFailed("key", f"a plan {key!r} exists already")
        plan = Plan(key=key, **values)
        session.add(plan)
        await session.flush()
        await session.refresh(plan)
        return plan

    return await db.transaction(work)


async def update_plan(db, caller, *, key: str, **changes) -> Plan:
    """Changes apply from each workspace's next period boundary (allowances are issued then; the
    current period's rollover rule is the workspace's copy), and daily free credits from the
    next day."""
    from domain.errors import NotFound
    from domain.periods.rules import next_day
    from domain.pricing.service import require_catalog_manager
    from domain.workspaces.models import Workspace

    require_catalog_manager(caller)

    async def work(session: AsyncSession) -> Plan:
        plan = (await session.execute(select(Plan).where(Plan.key == key).with_for_update())).scalar_one_or_none()
        if plan is None:
            raise NotFound("plan")
        values = {f: getattr(plan, f) for f in PLAN_FIELDS} | {k: v for k, v in changes.items() if v is not None}
        _check_plan(values)
        for name, value in changes.items():
            if value is not None:
                setattr(plan, name, value)
        await session.flush()
        if plan.daily_free_units > 0:
            # The daily tick only visits workspaces with a next day set (as a plan change to a
            # plan with daily credits sets it); one without credits clears it at its next visit.
            await session.execute(update(Workspace).where(Workspace.plan_id == plan.id, Workspace.next_daily_at.is_(None))
                                  .values(next_daily_at=next_day(caller.clock.now())))
        return plan

    return await db.transaction(work)
