"""The model price table every signed-in user can read."""

from __future__ import annotations

import strawberry
from strawberry.types import Info

from api.context import Context
from domain import pricing
from domain.money import format_credits

Modality = strawberry.enum(pricing.Modality, name="Modality")


@strawberry.type
class ModelPrice:
    model_key: str
    display_name: str
    vendor: str
    modality: Modality
    credits_per_generation: str = strawberry.field(description="Decimal string, e.g. \"10.000\".")


@strawberry.type
class CatalogQuery:
    @strawberry.field(description="The current price of every active model.")
    async def model_prices(self, info: Info[Context, None]) -> list[ModelPrice]:
        await info.context.caller()
        rows = await pricing.current_prices(info.context.db)
        return [
            ModelPrice(
                model_key=p.model_key, display_name=p.display_name, vendor=p.vendor, modality=p.modality,
                credits_per_generation=format_credits(p.units_per_generation),
            )
            for p in rows
        ]
