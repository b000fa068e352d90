"""Plans: what a workspace subscribes to. Here: seat cap and free creator seats.
(Allowances, periods and rollover rules are the time-based-rules issue's to add.)"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, uuid_pk
from domain.errors import ValidationFailed


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("seat_cap > 0", name="seat_cap_positive"),
        CheckConstraint("free_creator_seats >= 0 AND free_creator_seats <= seat_cap", name="free_creator_seats_range"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    seat_cap: Mapped[int]
    free_creator_seats: Mapped[int]
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = created_at()


async def plan_by_key(session: AsyncSession, key: str) -> Plan:
    plan = (await session.execute(select(Plan).where(Plan.key == key, Plan.is_active))).scalar_one_or_none()
    if plan is None:
        raise ValidationFailed("planKey", f"unknown plan {key!r}")
    return plan


async def list_plans(session: AsyncSession) -> list[Plan]:
    return list((await session.execute(select(Plan).where(Plan.is_active).order_by(Plan.seat_cap))).scalars())


async def active_plans(db) -> list[Plan]:
    return await db.read(list_plans)
