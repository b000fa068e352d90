"""Quoting and publishing prices. Every price a user sees, holds or pays comes from
`domain.pricing.rules.quote` applied to a model of one price-list version."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, parse_id
from domain.db import Database, Sql, as_sql
from domain.errors import Forbidden, NotFound, ValidationFailed
from domain.identity import clean_name
from domain.money import MAX_CREDITS, decimal_text
from domain.plans import Plan
from domain.pricing import rules
from domain.pricing.catalog import Modality, ModelPrice, PriceList, price_list_in_force
from domain.workspaces.models import Workspace
from policies import Action

MAX_MODELS = 500
MAX_WINDOWS = 20


# --- JSON <-> rules --------------------------------------------------------------------------

_RATES = ("base", "minimum", "per_1k_input_tokens", "per_1k_output_tokens", "per_megapixel", "per_second",
          "per_extra_step", "per_mb")


def spec_to_json(spec: rules.PriceSpec) -> dict[str, Any]:
    """Decimal strings only, so the stored document reads back exactly."""
    out: dict[str, Any] = {name: decimal_text(getattr(spec, name)) for name in _RATES if getattr(spec, name) is not None}
    if spec.included_steps:
        out["included_steps"] = spec.included_steps
    if spec.resolution_tiers is not None:
        out["resolution_tiers"] = {k: decimal_text(v) for k, v in spec.resolution_tiers.items()}
    if spec.input_type_multipliers is not None:
        out["input_type_multipliers"] = {k: decimal_text(v) for k, v in spec.input_type_multipliers.items()}
    if spec.file_tiers:
        out["file_tiers"] = [{"above_mb": decimal_text(t.above_mb), "rate_factor": decimal_text(t.rate_factor)} for t in spec.file_tiers]
    if spec.defaults:
        out["defaults"] = {k: decimal_text(v) if isinstance(v, Decimal) else v for k, v in spec.defaults.items()}
    if spec.limits:
        out["limits"] = {k: decimal_text(v) for k, v in spec.limits.items()}
    return out


def spec_from_json(model_key: str, data: Mapping[str, Any]) -> rules.PriceSpec:
    return rules.PriceSpec(
        model_key=model_key,
        **{name: data[name] for name in _RATES if data.get(name) is not None},
        included_steps=int(data.get("included_steps", 0)),
        resolution_tiers=data.get("resolution_tiers"),
        input_type_multipliers=data.get("input_type_multipliers"),
        file_tiers=tuple(rules.FileTier(t["above_mb"], t["rate_factor"]) for t in data.get("file_tiers", ())),
        defaults=data.get("defaults", {}),
        limits=data.get("limits", {}),
    )


def window_to_json(w: rules.TimeWindow) -> dict[str, Any]:
    return {"name": w.name, "start": rules.clock_text(w.start), "end": rules.clock_text(w.end),
            "multiplier": decimal_text(w.multiplier), "timezone": w.timezone,
            "weekdays": sorted(w.weekdays) if w.weekdays is not None else None}


def window_from_json(d: Mapping[str, Any]) -> rules.TimeWindow:
    return rules.TimeWindow(
        name=d["name"], start=_clock_time(d["start"], "start"), end=_clock_time(d["end"], "end"),
        multiplier=d["multiplier"], timezone=d["timezone"],
        weekdays=frozenset(d["weekdays"]) if d.get("weekdays") is not None else None,
    )


def _clock_time(value: str, field: str) -> time:
    try:
        return time.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValidationFailed(field, "must be a time of day like \"18:00\"") from None


def plan_multiplier(price_list: PriceListRow, plan_key: str, model_key: str) -> Decimal:
    by_plan = (price_list.plan_multipliers or {}).get(plan_key, {})
    value = by_plan.get(model_key, by_plan.get("*"))
    return Decimal(value) if value is not None else Decimal(1)


# --- reading ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PriceListRow:
    """A price list as plain data: catalogs are cached across sessions, and ORM instances would
    be expired (and then unusable) by the rollback of whichever session loaded them."""

    id: uuid.UUID
    version: int
    effective_at: datetime
    note: str | None
    time_windows: list[dict[str, Any]]
    plan_multipliers: dict[str, dict[str, str]]

    @classmethod
    def of(cls, p: PriceList) -> PriceListRow:
        return cls(p.id, p.version, p.effective_at, p.note, p.time_windows, p.plan_multipliers)


@dataclass(frozen=True, slots=True)
class ModelRow:
    model_key: str
    display_name: str
    vendor: str
    modality: Modality
    spec: dict[str, Any]
    is_active: bool

    @classmethod
    def of(cls, m: ModelPrice) -> ModelRow:
        return cls(m.model_key, m.display_name, m.vendor, m.modality, m.spec, m.is_active)


@dataclass(frozen=True, slots=True)
class PricedModel:
    row: ModelRow
    spec: rules.PriceSpec


@dataclass(frozen=True, slots=True)
class Catalog:
    price_list: PriceListRow
    windows: tuple[rules.TimeWindow, ...]
    models: list[PricedModel]


# Published price lists never change, so a process keeps each version it has parsed (a few KB
# each; bounded). Only the "which version is in force" look-up remains per request.
_CATALOGS: dict[tuple[uuid.UUID, bool], Catalog] = {}
_CATALOG_CACHE_SIZE = 64


_PRICE_LIST = "SELECT id, version, effective_at, note, time_windows, plan_multipliers FROM price_lists WHERE id = $1"
_MODELS = """
SELECT model_key, display_name, vendor, modality, spec, is_active FROM model_prices
WHERE price_list_id = $1 AND (is_active OR NOT $2) ORDER BY modality, model_key
"""


async def catalog_by_id(tx: AsyncSession | Sql, price_list_id: uuid.UUID, *, active_only: bool = True) -> Catalog:
    """A published price list, parsed once per process (from a session or the hot path's SQL)."""
    cached = _CATALOGS.get((price_list_id, active_only))
    if cached is not None:
        return cached
    sql = as_sql(tx)
    p = await sql.fetchrow(_PRICE_LIST, price_list_id)
    if p is None:
        raise NotFound("price list")
    rows = await sql.fetch(_MODELS, price_list_id, active_only)
    catalog = Catalog(
        PriceListRow(p["id"], p["version"], p["effective_at"], p["note"], p["time_windows"], p["plan_multipliers"]),
        tuple(window_from_json(w) for w in p["time_windows"]),
        [PricedModel(ModelRow(r["model_key"], r["display_name"], r["vendor"], Modality(r["modality"]), r["spec"],
                              r["is_active"]),
                     spec_from_json(r["model_key"], r["spec"])) for r in rows],
    )
    if len(_CATALOGS) >= _CATALOG_CACHE_SIZE:
        _CATALOGS.pop(next(iter(_CATALOGS)))
    _CATALOGS[(price_list_id, active_only)] = catalog
    return catalog


async def load_catalog(session: AsyncSession, price_list: PriceList, *, active_only: bool = True) -> Catalog:
    return await catalog_by_id(session, price_list.id, active_only=active_only)


async def catalog_at(session: AsyncSession, at: datetime) -> Catalog:
    price_list_id = await as_sql(session).fetchval(f"SELECT {price_list_in_force('$1')}", at)
    if price_list_id is None:
        raise ValidationFailed("modelKey", "no price list is in force yet")
    return await catalog_by_id(session, price_list_id)


@dataclass(frozen=True, slots=True)
class PricedRequest:
    """A quote for one model under one price list, with what it needs to be re-priced later."""

    catalog: Catalog
    model: PricedModel
    quote: rules.Quote
    plan_multiplier: Decimal
    at: datetime

    def as_json(self) -> dict[str, Any]:
        """Stored on the generation: completion re-prices reported usage with exactly this."""
        q = self.quote
        return {
            "version": self.catalog.price_list.version, "at": self.at.isoformat(),
            "plan_multiplier": decimal_text(self.plan_multiplier), "total": decimal_text(q.total), "units": q.units,
            "parameters": {k: decimal_text(v) if isinstance(v, Decimal) else v for k, v in q.parameters.items()},
            "window": window_to_json(q.window) if q.window else None,
            "line_items": [
                {"kind": str(i.kind), "label": i.label, "amount": decimal_text(i.amount),
                 "quantity": None if i.quantity is None else decimal_text(i.quantity),
                 "rate": None if i.rate is None else decimal_text(i.rate)}
                for i in q.line_items
            ],
        }


# model_prices.model_key and overage_requests.model_key are varchar(100).
MAX_MODEL_KEY = 100


def clean_model_key(value: str, field: str = "modelKey") -> str:
    """A model key as stored: stripped, 1 to 100 characters (checked before any transaction, so
    an overlong one is a ValidationError, not a database error)."""
    key = value.strip()
    if not key or len(key) > MAX_MODEL_KEY:
        raise ValidationFailed(field, f"must be 1 to {MAX_MODEL_KEY} characters")
    return key


async def check_known_model(session: AsyncSession, model_key: str, at: datetime) -> None:
    """Refuse a key the price list in force at `at` does not price, as a quote would."""
    _find(await catalog_at(session, at), model_key)


def _find(catalog: Catalog, model_key: str) -> PricedModel:
    for m in catalog.models:
        if m.row.model_key == model_key:
            return m
    raise ValidationFailed("modelKey", f"unknown or retired model {model_key!r}")


def quote_with(
    catalog: Catalog, plan_key: str, model_key: str, parameters: Mapping[str, Any], at: datetime,
    *, open_ended_max: bool,
) -> PricedRequest:
    """Price a request under `catalog` for a workspace on `plan_key` (pure)."""
    model = _find(catalog, model_key)
    multiplier = plan_multiplier(catalog.price_list, plan_key, model_key)
    q = rules.quote(model.spec, parameters, at=at, windows=catalog.windows, plan_multiplier=multiplier,
                    open_ended_max=open_ended_max)
    return PricedRequest(catalog, model, q, multiplier, at)


async def price_request(
    session: AsyncSession, ws: Workspace, model_key: str, parameters: Mapping[str, Any], at: datetime,
    *, open_ended_max: bool,
) -> PricedRequest:
    """Price a request for a workspace at `at` under the price list in force then."""
    catalog = await catalog_at(session, at)
    plan = await session.get_one(Plan, ws.plan_id)
    return quote_with(catalog, plan.key, model_key, parameters, at, open_ended_max=open_ended_max)


async def reprice_usage(
    tx: AsyncSession | Sql, price_list_id: uuid.UUID, model_key: str, stored: Mapping[str, Any],
    usage: Mapping[str, Any],
) -> rules.Quote:
    """The actual cost of a finished generation: its start parameters overlaid with the reported
    usage, under its own price list version, time window and plan multiplier. A usage figure
    given as null is absent (as in every request), so the started value stands: overlaid, it
    would erase that value and price the model's default (or nothing) instead."""
    catalog = await catalog_by_id(tx, price_list_id, active_only=False)
    model = _find(catalog, model_key)
    started = stored.get("parameters", {})  # every parameter the model meters
    # (A null for a key the model does not meter is still refused, as in a quote.)
    reported = {k: v for k, v in usage.items() if v is not None or k not in started}
    parameters = {**started, **reported}
    return rules.quote(model.spec, parameters, at=datetime.fromisoformat(stored["at"]), windows=catalog.windows,
                       plan_multiplier=Decimal(stored["plan_multiplier"]))


# --- services ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class QuoteView:
    priced: PricedRequest
    spendable: int
    can_afford: bool  # the start would be refused neither for credits nor by a spend limit
    refusing_limit_id: uuid.UUID | None = None  # the spend limit that would refuse it


async def quote_generation(
    db: Database, caller: Caller, *, workspace_id: str, model_key: str, parameters: Mapping[str, Any] | None,
) -> QuoteView:
    """What a generation would cost the viewer now, with line items; nothing moves."""
    from domain.governance.limits import refusing_limit
    from domain.ledger.queries import spendable_units, spender_of
    from domain.ledger.service import check_parameters

    ws_id = parse_id(workspace_id, "workspace")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise ValidationFailed("parameters", "must be a JSON object")
        check_parameters(dict(parameters))

    async def work(session: AsyncSession) -> QuoteView:
        me = await authorize(session, caller, ws_id, Action.VIEW_BALANCE, what="workspace")
        ws = await session.get_one(Workspace, ws_id)
        priced = await price_request(session, ws, model_key, parameters or {}, caller.clock.now(), open_ended_max=True)
        spendable = await spendable_units(session, caller, ws, me)
        units = priced.quote.units
        # A start the viewer's credits cover may still be refused by a limit on them, their
        # group or the workspace: "can afford" promises neither refusal. (Only a viewer who may
        # generate has limits to meet; the others keep the answer by credits alone.)
        limit = None
        if spender_of(caller, ws_id, me) is not None:
            limit = await refusing_limit(session, workspace_id=ws_id, member_id=me.id,
                                         billing_group_id=me.billing_group_id, units=units,
                                         now=priced.at, timezone=ws.timezone)
        return QuoteView(priced, spendable, spendable >= units and limit is None,
                         limit["id"] if limit is not None else None)

    return await db.read(work)


@dataclass(frozen=True, slots=True)
class CatalogView:
    catalog: Catalog
    default_quotes: dict[str, rules.Quote]
    covered: dict[str, int] | None  # generations the viewer's balance covers, when a workspace is named


async def current_catalog(db: Database, caller: Caller, *, workspace_id: str | None = None) -> CatalogView:
    from domain.ledger.queries import spendable_units

    async def work(session: AsyncSession) -> CatalogView:
        now = caller.clock.now()
        catalog = await catalog_at(session, now)
        ws, me, plan_key = None, None, None
        if workspace_id is not None:
            ws_id = parse_id(workspace_id, "workspace")
            me = await authorize(session, caller, ws_id, Action.VIEW_BALANCE, what="workspace")
            ws = await session.get_one(Workspace, ws_id)
            plan_key = (await session.get_one(Plan, ws.plan_id)).key
        quotes = {}
        for m in catalog.models:
            multiplier = plan_multiplier(catalog.price_list, plan_key, m.row.model_key) if plan_key else Decimal(1)
            quotes[m.row.model_key] = rules.quote(m.spec, {}, at=now, windows=catalog.windows,
                                                  plan_multiplier=multiplier)
        covered = None
        if ws is not None:
            # Counted by what a start with no parameters holds (open-ended usage at the model's
            # limit), not by the list price at the defaults: that count promised starts the
            # balance then refused.
            spendable = await spendable_units(session, caller, ws, me)
            covered = {}
            for m in catalog.models:
                multiplier = plan_multiplier(catalog.price_list, plan_key, m.row.model_key)
                hold = rules.default_hold(m.spec, at=now, windows=catalog.windows, plan_multiplier=multiplier)
                covered[m.row.model_key] = rules.covered_by(hold.units, spendable)
        return CatalogView(catalog, quotes, covered)

    return await db.read(work)


async def price_list_versions(db: Database, caller: Caller) -> list[Catalog]:
    """Every version, newest first: old versions stay readable."""

    async def work(session: AsyncSession) -> list[Catalog]:
        lists = (await session.execute(select(PriceList).order_by(PriceList.version.desc()))).scalars().all()
        return [await load_catalog(session, pl, active_only=False) for pl in lists]

    return await db.read(work)


def require_catalog_manager(caller: Caller) -> None:
    # The catalog is platform-wide: checked in the platform domain, not in a workspace.
    if not caller.authorizer.allows(str(caller.actor.user_id), caller.platform_roles(), "*", Action.MANAGE_CATALOG):
        raise Forbidden(Action.MANAGE_CATALOG.value)


@dataclass(frozen=True, slots=True)
class ModelInput:
    model_key: str
    display_name: str
    vendor: str
    modality: Modality
    spec: rules.PriceSpec
    active: bool = True


def build_model(model_key: str, display_name: str, vendor: str, modality: Modality, spec: Mapping[str, Any],
                active: bool = True) -> ModelInput:
    key = clean_model_key(model_key)
    try:
        parsed = spec_from_json(key, spec)
    except ValidationFailed as exc:
        raise ValidationFailed(f"models.{key}.{exc.field}", exc.message.split(": ", 1)[-1]) from None
    return ModelInput(key, clean_name(display_name, "displayName"), clean_name(vendor, "vendor"), modality, parsed, active)


async def publish_price_list(
    db: Database, caller: Caller, *, models: Sequence[ModelInput], windows: Sequence[rules.TimeWindow] = (),
    plan_multipliers: Mapping[str, Mapping[str, str]] | None = None, effective_at: datetime | None = None,
    note: str | None = None,
) -> Catalog:
    """Operators publish a complete new version. It applies from `effective_at` (default now,
    never in the past: a published price never changes what was already quoted)."""
    require_catalog_manager(caller)
    now = caller.clock.now()
    if effective_at is not None and (effective_at.tzinfo is None or effective_at < now):
        raise ValidationFailed("effectiveAt", "must be a time with a zone, now or later")
    return await db.transaction(lambda s: insert_price_list(
        s, models=models, windows=windows, plan_multipliers=plan_multipliers or {},
        effective_at=effective_at or now, note=note, published_by=caller.actor.user_id,
    ))


def _check_default_price(m: ModelInput, windows: Sequence[rules.TimeWindow],
                         plan_multipliers: Mapping[str, Mapping[str, str]], at: datetime) -> None:
    """Refuse a model whose price with no parameters can exceed what one generation may cost
    (`rules.quote` refuses such a price): every reader of the catalog prices each model so
    (`modelPrices`' defaultCost and generationsCovered), and would fail for every user. The
    dearest case: the hold at the defaults times the largest window and plan multipliers."""
    surge = max([w.multiplier for w in windows] + [Decimal(1)])
    plan = max([Decimal(by[m.model_key] if m.model_key in by else by["*"])
                for by in plan_multipliers.values() if m.model_key in by or "*" in by] + [Decimal(1)])
    try:
        dearest = rules.default_hold(m.spec, at=at).total * surge * plan
    except ValidationFailed:  # the hold itself is above the most (`rules.quote`)
        dearest = None
    if dearest is None or dearest > MAX_CREDITS:
        raise ValidationFailed(f"models.{m.model_key}", "its price with no parameters (with the largest time-of-day "
                                                        f"and plan multipliers) is above {MAX_CREDITS} credits, the "
                                                        "most one generation may cost")


async def insert_price_list(
    session: AsyncSession, *, models: Sequence[ModelInput], windows: Sequence[rules.TimeWindow],
    plan_multipliers: Mapping[str, Mapping[str, str]], effective_at: datetime, note: str | None,
    published_by: uuid.UUID | None,
) -> Catalog:
    if not 1 <= len(models) <= MAX_MODELS:
        raise ValidationFailed("models", f"a price list has 1 to {MAX_MODELS} models")
    keys = [m.model_key for m in models]
    if len(set(keys)) != len(keys):
        raise ValidationFailed("models", "a model key appears twice")
    if len(windows) > MAX_WINDOWS:
        raise ValidationFailed("timeWindows", f"at most {MAX_WINDOWS} windows")
    if note is not None and len(note) > 500:
        raise ValidationFailed("note", "must be at most 500 characters")
    plans = set((await session.execute(select(Plan.key))).scalars())
    clean_multipliers: dict[str, dict[str, str]] = {}
    for plan_key, by_model in plan_multipliers.items():
        if plan_key not in plans:
            raise ValidationFailed("planMultipliers", f"unknown plan {plan_key!r}")
        for model_key, value in by_model.items():
            if model_key != "*" and model_key not in keys:
                raise ValidationFailed("planMultipliers", f"unknown model {model_key!r} for plan {plan_key!r}")
            multiplier = rules.spec_figure(value, "planMultipliers.multiplier")
            clean_multipliers.setdefault(plan_key, {})[model_key] = decimal_text(multiplier)
    for m in models:
        _check_default_price(m, windows, clean_multipliers, effective_at)
    # Versions are numbered in publication order; the lock makes concurrent publishes queue.
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('creditpool.price_lists'))"))
    version = ((await session.execute(select(func.max(PriceList.version)))).scalar_one() or 0) + 1
    price_list = PriceList(
        version=version, effective_at=effective_at, note=note, time_windows=[window_to_json(w) for w in windows],
        plan_multipliers=clean_multipliers, published_by=published_by,
    )
    session.add(price_list)
    await session.flush()
    for m in models:
        session.add(ModelPrice(price_list_id=price_list.id, model_key=m.model_key, display_name=m.display_name,
                               vendor=m.vendor, modality=m.modality, spec=spec_to_json(m.spec), is_active=m.active))
    await session.flush()
    await session.refresh(price_list)
    return await load_catalog(session, price_list, active_only=False)

