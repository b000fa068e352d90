"""Per-model prices: the simple cost table (one price per generation). The price-catalog issue
replaces it with versioned price lists and metered dimensions."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk


class Modality(enum.StrEnum):
    TEXT = "TEXT"
    IMAGE = "IMAGE"
    VIDEO = "VIDEO"
    AUDIO = "AUDIO"
    EMBEDDING = "EMBEDDING"
    OTHER = "OTHER"


class ModelPrice(Base):
    __tablename__ = "model_prices"
    __table_args__ = (CheckConstraint("units_per_generation >= 0", name="price_not_negative"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    model_key: Mapped[str] = mapped_column(String(100), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    vendor: Mapped[str] = mapped_column(String(100))
    modality: Mapped[Modality] = mapped_column(str_enum(Modality, "modality"))
    # Money is stored in units: 1 credit = 1000 units (DESIGN money rule 4).
    units_per_generation: Mapped[int] = mapped_column(BigInteger)
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = created_at()


async def list_model_prices(session: AsyncSession) -> list[ModelPrice]:
    rows = await session.execute(
        select(ModelPrice).where(ModelPrice.is_active).order_by(ModelPrice.modality, ModelPrice.model_key)
    )
    return list(rows.scalars())


async def current_prices(db) -> list[ModelPrice]:
    return await db.read(list_model_prices)
