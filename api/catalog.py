"""The price catalog: model prices, quotes with line items, versioned price lists."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from api.context import Context
from api.errors import NotFoundError, ValidationError, optional_id, result
from domain import pricing
from domain.errors import ValidationFailed
from domain.money import decimal_text
from domain.pricing import rules
from domain.pricing import service as prices

Modality = strawberry.enum(pricing.Modality, name="Modality")


def _dec(value: Decimal | str | None) -> str | None:
    """Plain decimal text; a stored string goes through Decimal too, so a document written before
    `decimal_text` (with str()'s "5E-12") reads out plain as well."""
    return None if value is None else decimal_text(Decimal(value))


@strawberry.type(description="One step of a price: a metered dimension, a multiplier, the minimum or the rounding.")
class LineItem:
    kind: str
    label: str
    quantity: str | None
    rate: str | None
    amount: str = strawberry.field(description="Credits, exact (may carry more than 3 decimals; the total is rounded).")

    @classmethod
    def of(cls, item: rules.LineItem) -> LineItem:
        return cls(kind=str(item.kind), label=item.label, quantity=_dec(item.quantity), rate=_dec(item.rate),
                   amount=_dec(item.amount))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LineItem:
        return cls(kind=d["kind"], label=d["label"], quantity=_dec(d["quantity"]), rate=_dec(d["rate"]),
                   amount=_dec(d["amount"]))


@strawberry.type
class TimeWindow:
    name: str
    start: str
    end: str
    multiplier: str
    timezone: str
    weekdays: list[int] | None = strawberry.field(description="0 = Monday; null: every day.")

    @classmethod
    def of(cls, w: rules.TimeWindow) -> TimeWindow:
        d = prices.window_to_json(w)
        return cls(name=d["name"], start=d["start"], end=d["end"], multiplier=d["multiplier"],
                   timezone=d["timezone"], weekdays=d["weekdays"])


@strawberry.type(description="A time-of-day multiplier in force now, and when it stops.")
class MultiplierInForce:
    window: TimeWindow
    ends_at: datetime | None


@strawberry.type
class ModelPrice:
    model_key: str
    display_name: str
    vendor: str
    modality: Modality
    active: bool
    price: JSON = strawberry.field(description="The full price: base, minimum, rates per dimension, tiers, "
                                               "multipliers, defaults and limits, as decimal strings.")
    metered_parameters: list[str]
    default_cost: str = strawberry.field(
        description="Credits for one generation at default parameters: now, under the viewer's plan, for the "
                    "current catalog; the list price (no time-of-day or plan multiplier) for other versions.")
    generations_covered: int | None = strawberry.field(
        description="How many generations started with no parameters the viewer's spendable balance pays for "
                    "(-1: free): each holds what such a start holds, open-ended usage (output tokens, seconds) at "
                    "the model's limit, which can be more than defaultCost. Only when the catalog is read for a "
                    "workspace."
    )

    @classmethod
    def of(cls, m: prices.PricedModel, default: rules.Quote | None, covered: int | None, at: datetime) -> ModelPrice:
        default = default or rules.quote(m.spec, {}, at=at)
        return cls(
            model_key=m.row.model_key, display_name=m.row.display_name, vendor=m.row.vendor, modality=m.row.modality,
            active=m.row.is_active, price=prices.spec_to_json(m.spec), metered_parameters=list(rules.metered_parameters(m.spec)),
            default_cost=str(default.total.quantize(Decimal("0.001"))), generations_covered=covered,
        )


@strawberry.type
class PriceList:
    version: int
    effective_at: datetime
    note: str | None
    time_windows: list[TimeWindow]
    plan_multipliers: JSON
    models: list[ModelPrice]

    @classmethod
    def of(cls, c: prices.Catalog, view: prices.CatalogView | None = None) -> PriceList:
        pl = c.price_list
        return cls(
            version=pl.version, effective_at=pl.effective_at, note=pl.note,
            time_windows=[TimeWindow.of(w) for w in c.windows], plan_multipliers=pl.plan_multipliers,
            models=[
                ModelPrice.of(m, view.default_quotes.get(m.row.model_key) if view else None,
                              view.covered.get(m.row.model_key) if view and view.covered is not None else None,
                              pl.effective_at)
                for m in c.models
            ],
        )


@strawberry.type
class Quote:
    model_key: str
    price_list_version: int
    total: str = strawberry.field(description="Credits, rounded once, up, to 0.001.")
    line_items: list[LineItem]
    parameters: JSON = strawberry.field(description="The parameters priced, after defaults and limits.")
    multiplier: MultiplierInForce | None
    spendable: str = strawberry.field(description="What the viewer can spend now.")
    can_afford: bool = strawberry.field(description=(
        "Whether the viewer could start it now: their credits cover the total and no spend limit on them, "
        "their billing group or the workspace (approved overages included) would refuse it."))
    refusing_limit_id: strawberry.ID | None = strawberry.field(default=None, description=(
        "The spend limit that would refuse the start (as SpendLimitExceeded would name it), if one would."))

    @classmethod
    def of(cls, v: prices.QuoteView) -> Quote:
        from domain.money import format_credits

        q = v.priced.quote
        return cls(
            model_key=v.priced.model.row.model_key, price_list_version=v.priced.catalog.price_list.version,
            total=str(q.total.quantize(Decimal("0.001"))), line_items=[LineItem.of(i) for i in q.line_items],
            parameters={k: _dec(x) if isinstance(x, Decimal) else x for k, x in q.parameters.items()},
            multiplier=MultiplierInForce(window=TimeWindow.of(q.window), ends_at=q.window_ends_at) if q.window else None,
            spendable=format_credits(v.spendable), can_afford=v.can_afford,
            refusing_limit_id=strawberry.ID(str(v.refusing_limit_id)) if v.refusing_limit_id else None,
        )


@strawberry.input
class NamedMultiplierInput:
    name: str
    multiplier: str


@strawberry.input
class FileTierInput:
    above_mb: str
    rate_factor: str


def _named(items: list[NamedMultiplierInput], field: str) -> dict[str, str]:
    """Name -> multiplier. A name given twice is refused: kept as a mapping, one of its two
    prices would be dropped without a word."""
    out: dict[str, str] = {}
    for item in items:
        if item.name in out:
            raise ValidationFailed(field, f"{item.name!r} is given twice")
        out[item.name] = item.multiplier
    return out


@strawberry.input(description="A model's price; money as decimal strings of credits.")
class ModelPriceInput:
    model_key: str
    display_name: str
    vendor: str
    modality: Modality
    active: bool = True
    base: str | None = None
    minimum: str | None = None
    per_1k_input_tokens: str | None = None
    per_1k_output_tokens: str | None = None
    per_megapixel: str | None = None
    resolution_tiers: list[NamedMultiplierInput] | None = None
    per_second: str | None = None
    included_steps: int = 0
    per_extra_step: str | None = None
    per_mb: str | None = None
    file_tiers: list[FileTierInput] | None = None
    input_type_multipliers: list[NamedMultiplierInput] | None = None
    defaults: JSON | None = None
    limits: JSON | None = None

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("base", "minimum", "per_1k_input_tokens", "per_1k_output_tokens", "per_megapixel",
                         "per_second", "per_extra_step", "per_mb")
            if getattr(self, name) is not None
        }
        if self.included_steps:
            spec["included_steps"] = self.included_steps
        if self.resolution_tiers is not None:
            spec["resolution_tiers"] = _named(self.resolution_tiers, f"models.{self.model_key.strip()}.resolution_tiers")
        if self.input_type_multipliers is not None:
            spec["input_type_multipliers"] = _named(self.input_type_multipliers,
                                                    f"models.{self.model_key.strip()}.input_type_multipliers")
        if self.file_tiers:
            spec["file_tiers"] = [{"above_mb": t.above_mb, "rate_factor": t.rate_factor} for t in self.file_tiers]
        if self.defaults is not None:
            spec["defaults"] = self.defaults
        if self.limits is not None:
            spec["limits"] = self.limits
        return spec


@strawberry.input
class TimeWindowInput:
    name: str
    start: str = strawberry.field(description="Local wall-clock time, e.g. \"18:00\".")
    end: str
    multiplier: str
    timezone: str = strawberry.field(description="IANA name, e.g. \"America/New_York\".")
    weekdays: list[int] | None = None


@strawberry.input
class PlanMultiplierInput:
    plan_key: str
    multiplier: str
    model_key: str | None = strawberry.field(default=None, description="Null: every model of the list.")


@strawberry.input
class PublishPriceListInput:
    models: list[ModelPriceInput]
    time_windows: list[TimeWindowInput] | None = None
    plan_multipliers: list[PlanMultiplierInput] | None = None
    effective_at: datetime | None = strawberry.field(default=None, description="Default: now. Never in the past.")
    note: str | None = None


QuoteResult = Annotated[Quote | NotFoundError | ValidationError, strawberry.union("QuoteResult")]
PublishPriceListResult = Annotated[PriceList | ValidationError, strawberry.union("PublishPriceListResult")]


def _publish_args(input: PublishPriceListInput) -> dict[str, Any]:
    """Input to domain values; a malformed price is a ValidationFailed raised inside `result`."""
    models = [prices.build_model(m.model_key, m.display_name, m.vendor, m.modality, m.spec(), m.active)
              for m in input.models]
    windows = [prices.window_from_json({"name": w.name, "start": w.start, "end": w.end, "multiplier": w.multiplier,
                                        "timezone": w.timezone, "weekdays": w.weekdays})
               for w in input.time_windows or []]
    plans: dict[str, dict[str, str]] = {}
    for p in input.plan_multipliers or []:
        by_model = plans.setdefault(p.plan_key, {})
        if (p.model_key or "*") in by_model:  # one would be dropped without a word
            raise ValidationFailed("planMultipliers", f"plan {p.plan_key!r} has two multipliers for "
                                                      f"{p.model_key or 'every model'}")
        by_model[p.model_key or "*"] = p.multiplier
    return {"models": models, "windows": windows, "plan_multipliers": plans, "effective_at": input.effective_at,
            "note": input.note}


@strawberry.type
class CatalogQuery:
    @strawberry.field(description="The current price of every model, for every signed-in user. With a "
                                  "workspace: prices under its plan and how many generations the viewer's "
                                  "balance covers.")
    async def model_prices(self, info: Info[Context, None], workspace_id: strawberry.ID | None = None) -> PriceList:
        caller = await info.context.caller()
        view = await prices.current_catalog(info.context.db, caller,
                                            workspace_id=optional_id(workspace_id))
        return PriceList.of(view.catalog, view)

    @strawberry.field(description="Every price list version, newest first (old versions stay readable).")
    async def price_lists(self, info: Info[Context, None]) -> list[PriceList]:
        caller = await info.context.caller()
        return [PriceList.of(c) for c in await prices.price_list_versions(info.context.db, caller)]

    @strawberry.field(description="What a generation would cost now, with line items. Nothing is held.")
    async def quote(
        self, info: Info[Context, None], workspace_id: strawberry.ID, model_key: str, parameters: JSON | None = None
    ) -> QuoteResult:
        caller = await info.context.caller()
        call = prices.quote_generation(info.context.db, caller, workspace_id=str(workspace_id), model_key=model_key,
                                       parameters=parameters)
        return await result(call, Quote.of)


@strawberry.type
class CatalogMutation:
    @strawberry.mutation(description="Operators: publish a complete new price list version.")
    async def publish_price_list(self, info: Info[Context, None], input: PublishPriceListInput) -> PublishPriceListResult:
        caller = await info.context.caller()

        async def call():
            prices.require_catalog_manager(caller)  # before reading the input: outsiders learn nothing
            return await prices.publish_price_list(info.context.db, caller, **_publish_args(input))

        return await result(call(), PriceList.of)
