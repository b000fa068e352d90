"""The price catalog: versioned price lists, each a complete, immutable set of model prices with
its time-of-day windows and per-plan multipliers. A generation keeps the version it started
under, so publishing a new version never changes a running generation's cost.

Rates are exact decimals (a text rate per 1,000 tokens can be below one unit), stored as decimal
strings in JSONB and read into `Decimal`; every amount that moves credits is integer units.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk


class Modality(enum.StrEnum):
    TEXT = "TEXT"
    IMAGE = "IMAGE"
    VIDEO = "VIDEO"
    AUDIO = "AUDIO"
    EMBEDDING = "EMBEDDING"
    OTHER = "OTHER"


class PriceList(Base):
    __tablename__ = "price_lists"

    id: Mapped[uuid.UUID] = uuid_pk()
    version: Mapped[int] = mapped_column(Integer, unique=True)
    effective_at: Mapped[datetime] = mapped_column(index=True)
    note: Mapped[str | None] = mapped_column(String(500))
    # [{"name", "start": "18:00", "end": "22:00", "multiplier": "1.5", "timezone", "weekdays": [0..6] | null}]
    time_windows: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    # {"<plan key>": {"*": "0.8", "<model key>": "0.7"}}: the model's entry wins over "*".
    plan_multipliers: Mapped[dict[str, dict[str, str]]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    published_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()


class ModelPrice(Base):
    __tablename__ = "model_prices"
    __table_args__ = (UniqueConstraint("price_list_id", "model_key"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    price_list_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("price_lists.id"))
    model_key: Mapped[str] = mapped_column(String(100))
    display_name: Mapped[str] = mapped_column(String(100))
    vendor: Mapped[str] = mapped_column(String(100))
    modality: Mapped[Modality] = mapped_column(str_enum(Modality, "modality"))
    # The PriceSpec of domain.pricing.rules, as JSON with decimal strings.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # False: retired in this version (listed, but no new generation may use it).
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = created_at()


def price_list_in_force(at: str) -> str:
    """SQL for the id of the version in force at the timestamp parameter `at` (e.g. "$1"): the
    latest effective one, the highest version on a tie. One rule for every reader."""
    return (f"(SELECT l.id FROM price_lists l WHERE l.effective_at <= {at}::timestamptz "
            "ORDER BY l.effective_at DESC, l.version DESC LIMIT 1)")
