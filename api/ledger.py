"""Credits: packs, purchases, grants, transfers, generations, balances and the ledger.

Amounts are decimal strings of credits ("12.500"); the storage is integer units."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from api.catalog import LineItem
from api.context import Context
from api.errors import (
    GenerationAlreadySettled,
    IdempotencyKeyReused,
    InsufficientCredits,
    NotFoundError,
    PaymentFailed,
    PaymentUnavailable,
    PaymentReferenceUsed,
    SpendLimitExceeded,
    ValidationError,
    optional_id,
    result,
)
from domain.errors import NotFound
from domain.ledger import models as lm
from domain.ledger import packs, queries
from domain.ledger import service as ledger
from domain.ledger.consumption import Scope as ScopeEnum
from domain.money import format_credits

Scope = strawberry.enum(ScopeEnum, name="GrantScope")
GrantSource = strawberry.enum(lm.GrantSource, name="GrantSource")
EntryKind = strawberry.enum(lm.EntryKind, name="EntryKind")
EntryCause = strawberry.enum(lm.Cause, name="EntryCause")
GenerationStatus = strawberry.enum(lm.GenerationStatus, name="GenerationStatus")
FailureKind = strawberry.enum(lm.FailureKind, name="FailureKind")

Credits = Annotated[str, strawberry.argument(description="Decimal string of credits, 3 places.")]


def _id(value: uuid.UUID | None) -> strawberry.ID | None:
    return strawberry.ID(str(value)) if value is not None else None


@strawberry.type
class CreditPack:
    id: strawberry.ID
    name: str
    credits: str
    price_minor: int = strawberry.field(description="Price in the currency's minor units (ISO 4217: cents for USD, yen for JPY).")
    currency: str
    price_per_credit: str = strawberry.field(description="Price of one credit in major units, e.g. \"0.0900\".")
    expires_after_days: int | None = strawberry.field(description="Null: purchased credits never expire.")
    is_active: bool

    @classmethod
    def from_model(cls, p: lm.CreditPack) -> CreditPack:
        return cls(
            id=strawberry.ID(str(p.id)), name=p.name, credits=format_credits(p.units), price_minor=p.price_minor,
            currency=p.currency, price_per_credit=str(packs.price_per_credit(p)),
            expires_after_days=p.expires_after_days, is_active=p.is_active,
        )


@strawberry.type
class Grant:
    id: strawberry.ID
    scope: Scope
    member_id: strawberry.ID | None
    billing_group_id: strawberry.ID | None
    source: GrantSource
    priority: int
    effective_at: datetime
    expires_at: datetime | None = strawberry.field(description="Null: never expires.")
    amount: str
    remaining: str = strawberry.field(description="Not held, not spent, not expired.")
    held: str
    captured: str
    expired: str
    transferred_out: str
    external_reference: str | None
    reason: str | None
    parent_grant_id: strawberry.ID | None
    created_at: datetime

    @classmethod
    def from_model(cls, g: lm.Grant) -> Grant:
        return cls(
            id=strawberry.ID(str(g.id)), scope=g.scope, member_id=_id(g.member_id),
            billing_group_id=_id(g.billing_group_id), source=g.source,
            priority=g.priority, effective_at=g.effective_at, expires_at=g.expires_at,
            amount=format_credits(g.amount), remaining=format_credits(g.remaining), held=format_credits(g.held),
            captured=format_credits(g.captured), expired=format_credits(g.expired),
            transferred_out=format_credits(g.transferred_out), external_reference=g.external_ref, reason=g.reason,
            parent_grant_id=_id(g.parent_grant_id), created_at=g.created_at,
        )


@strawberry.type
class LedgerEntry:
    id: strawberry.ID
    kind: EntryKind
    cause: EntryCause
    amount: str
    grant_id: strawberry.ID
    generation_id: strawberry.ID | None
    purchase_id: strawberry.ID | None
    transfer_id: strawberry.ID | None
    member_id: strawberry.ID | None
    actor_id: strawberry.ID | None
    idempotency_key: str | None
    occurred_at: datetime = strawberry.field(
        description="When the movement happened (an expiry at its expiry time, a period close at its boundary, a hold "
                    "time-out at its deadline), however late it was written; the ledger's since/until filter by it.")
    created_at: datetime = strawberry.field(description="When the entry was written.")

    @classmethod
    def from_model(cls, e: lm.LedgerEntry) -> LedgerEntry:
        return cls(
            id=strawberry.ID(str(e.id)), kind=e.kind, cause=e.cause, amount=format_credits(e.amount),
            grant_id=strawberry.ID(str(e.grant_id)), generation_id=_id(e.generation_id),
            purchase_id=_id(e.purchase_id), transfer_id=_id(e.transfer_id), member_id=_id(e.member_id),
            actor_id=_id(e.actor_id), idempotency_key=e.idempotency_key, occurred_at=e.occurred_at,
            created_at=e.created_at,
        )


@strawberry.type(description="What one grant paid toward a generation.")
class GenerationHold:
    grant: Grant
    held: str = strawberry.field(description="Still held.")
    captured: str
    released: str


@strawberry.type
class Generation:
    id: strawberry.ID
    workspace_id: strawberry.ID
    member_id: strawberry.ID
    requested_by: strawberry.ID
    model_key: str
    parameters: JSON
    status: GenerationStatus
    cost: str = strawberry.field(description="The price held when it started.")
    captured: str
    released: str
    shortfall: str = strawberry.field(description="Actual cost above the hold that no credits were left to cover.")
    failure_kind: FailureKind | None
    created_at: datetime
    settled_at: datetime | None
    holds: list[GenerationHold] = strawberry.field(description="Which grants paid, and how much.")
    entries: list[LedgerEntry]
    price_list_version: int | None = strawberry.field(description="The price list it was priced under.")
    quote: list[LineItem] = strawberry.field(description="The line items of the price held at start.")

    @classmethod
    def from_result(cls, r: ledger.GenerationResult) -> Generation:
        g = r.generation
        per_grant: dict[uuid.UUID, list[int]] = {}
        for e in r.entries:
            f = per_grant.setdefault(e.grant_id, [0, 0, 0])
            if e.kind is lm.EntryKind.HOLD:
                f[0] += e.amount
            elif e.kind is lm.EntryKind.CAPTURE:
                f[0] -= e.amount
                f[1] += e.amount
            elif e.kind is lm.EntryKind.RELEASE:
                f[0] -= e.amount
                f[2] += e.amount
        return cls(
            id=strawberry.ID(str(g.id)), workspace_id=strawberry.ID(str(g.workspace_id)),
            member_id=strawberry.ID(str(g.member_id)), requested_by=strawberry.ID(str(g.requested_by)),
            model_key=g.model_key, parameters=g.parameters, status=g.status, cost=format_credits(g.quoted_units),
            captured=format_credits(g.captured_units), released=format_credits(g.released_units),
            shortfall=format_credits(g.shortfall_units), failure_kind=g.failure_kind, created_at=g.created_at,
            settled_at=g.settled_at,
            holds=[
                GenerationHold(grant=Grant.from_model(r.grants[gid]), held=format_credits(f[0]),
                               captured=format_credits(f[1]), released=format_credits(f[2]))
                for gid, f in per_grant.items()
            ],
            entries=[LedgerEntry.from_model(e) for e in r.entries],
            price_list_version=g.quote["version"] if g.quote else None,
            quote=[LineItem.from_json(i) for i in (g.quote or {}).get("line_items", [])],
        )


@strawberry.type
class Purchase:
    id: strawberry.ID
    workspace_id: strawberry.ID
    pack_id: strawberry.ID
    payment_reference: str
    provider: str
    credits: str
    price_minor: int
    currency: str
    grant: Grant
    created_at: datetime

    @classmethod
    def from_result(cls, r: ledger.PurchaseResult) -> Purchase:
        p = r.purchase
        return cls(
            id=strawberry.ID(str(p.id)), workspace_id=strawberry.ID(str(p.workspace_id)),
            pack_id=strawberry.ID(str(p.pack_id)), payment_reference=p.payment_reference, provider=p.provider,
            credits=format_credits(p.units), price_minor=p.price_minor, currency=p.currency,
            grant=Grant.from_model(r.grant), created_at=p.created_at,
        )


@strawberry.type
class Transfer:
    id: strawberry.ID
    workspace_id: strawberry.ID
    credits: str
    from_member_id: strawberry.ID | None
    to_member_id: strawberry.ID | None
    from_billing_group_id: strawberry.ID | None
    to_billing_group_id: strawberry.ID | None
    grants: list[Grant] = strawberry.field(description="The grants created on the receiving side.")

    @classmethod
    def from_result(cls, r: ledger.TransferResult) -> Transfer:
        return cls(
            id=strawberry.ID(str(r.transfer_id)), workspace_id=strawberry.ID(str(r.workspace_id)),
            credits=format_credits(r.units), from_member_id=_id(r.from_member_id), to_member_id=_id(r.to_member_id),
            from_billing_group_id=_id(r.from_group_id), to_billing_group_id=_id(r.to_group_id),
            grants=[Grant.from_model(g) for g in r.new_grants],
        )


@strawberry.type
class ScopeBalance:
    scope: Scope
    member_id: strawberry.ID | None = strawberry.field(description="A SEAT's member.")
    billing_group_id: strawberry.ID | None = strawberry.field(description="A GROUP's billing group.")
    available: str
    held: str

    @classmethod
    def of(cls, s: queries.ScopeBalance) -> ScopeBalance:
        return cls(scope=s.scope, member_id=_id(s.member_id), billing_group_id=_id(s.billing_group_id),
                   available=format_credits(s.available), held=format_credits(s.held))


@strawberry.type(description="What one grant loses to expiry within the window.")
class ExpiringGrant:
    grant: Grant
    credits: str = strawberry.field(
        description="Its remaining credits, less what a ROLLOVER plan's period close rolls over into a grant that "
                    "outlives the window.")


@strawberry.type
class ExpiringCredits:
    within_days: int
    credits: str = strawberry.field(
        description="Credits lost to expiry within the window if nothing is spent: what a ROLLOVER plan's period "
                    "close rolls over is not lost (the same figures as creditSchedule).")
    grants: list[Grant] = strawberry.field(description="The grants that lose credits within the window.")
    by_grant: list[ExpiringGrant] = strawberry.field(description="What each of those grants loses.")


@strawberry.type
class Balance:
    workspace_id: strawberry.ID
    allocation_mode: str
    pool_fallback: bool
    available: str = strawberry.field(description="Spendable now across all scopes (held excluded).")
    held: str
    scopes: list[ScopeBalance]
    viewer_spendable: str = strawberry.field(description="What the viewer could spend now under the allocation mode.")
    grants: list[Grant]
    expiring_soon: ExpiringCredits
    as_of: datetime


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None

    @classmethod
    def of(cls, page: queries.Page) -> PageInfo:
        return cls(has_next_page=page.has_next_page, end_cursor=page.cursors[-1] if page.cursors else None)


@strawberry.type
class LedgerEntryEdge:
    cursor: str
    node: LedgerEntry


@strawberry.type
class LedgerEntryConnection:
    edges: list[LedgerEntryEdge]
    page_info: PageInfo


@strawberry.type
class GenerationEdge:
    cursor: str
    node: Generation


@strawberry.type
class GenerationConnection:
    edges: list[GenerationEdge]
    page_info: PageInfo


# --- inputs -----------------------------------------------------------------------------------

@strawberry.input
class PurchaseCreditsInput:
    workspace_id: strawberry.ID
    pack_id: strawberry.ID
    payment_reference: str
    idempotency_key: str


@strawberry.input
class GrantCreditsInput:
    workspace_id: strawberry.ID
    amount: str
    source: GrantSource
    reason: str
    idempotency_key: str
    member_id: strawberry.ID | None = strawberry.field(default=None, description="A creator seat; null: the pool.")
    expires_at: datetime | None = None
    effective_at: datetime | None = None
    priority: int = 100
    external_reference: str | None = None


@strawberry.input(description="Move credits between the pool, seats and billing groups. A side with no member "
                              "and no group is the pool.")
class TransferCreditsInput:
    workspace_id: strawberry.ID
    idempotency_key: str
    amount: str | None = strawberry.field(default=None, description="Null only when releasing a group: all of it.")
    from_member_id: strawberry.ID | None = None
    to_member_id: strawberry.ID | None = None
    from_billing_group_id: strawberry.ID | None = None
    to_billing_group_id: strawberry.ID | None = None


@strawberry.input
class StartGenerationInput:
    workspace_id: strawberry.ID
    model_key: str
    idempotency_key: str
    parameters: JSON | None = None
    on_behalf_of_member_id: strawberry.ID | None = strawberry.field(
        default=None, description="Service accounts only: the member whose credits pay."
    )


@strawberry.input
class CompleteGenerationInput:
    generation_id: strawberry.ID
    idempotency_key: str
    usage: JSON | None = strawberry.field(
        default=None, description="Reported usage (e.g. {output_tokens: 812, seconds: 7}), priced with the "
                                  "generation's own price list version.")
    actual_cost: str | None = strawberry.field(
        default=None, description="Credits, instead of usage; null for both: the held cost.")


@strawberry.input
class FailGenerationInput:
    generation_id: strawberry.ID
    kind: FailureKind
    idempotency_key: str


@strawberry.input
class LedgerFilter:
    kinds: list[EntryKind] | None = None
    member_id: strawberry.ID | None = None
    generation_id: strawberry.ID | None = None
    since: datetime | None = strawberry.field(default=None, description="Entries that occurred at or after it.")
    until: datetime | None = strawberry.field(default=None, description="Entries that occurred before it.")


@strawberry.input
class CreateCreditPackInput:
    name: str
    credits: str
    price_minor: int
    currency: str = "USD"
    expires_after_days: int | None = None


@strawberry.input
class SetCreditPackActiveInput:
    pack_id: strawberry.ID
    active: bool


PurchaseCreditsResult = Annotated[
    Purchase | NotFoundError | ValidationError | IdempotencyKeyReused | PaymentReferenceUsed | PaymentFailed
    | PaymentUnavailable,
    strawberry.union("PurchaseCreditsResult"),
]
GrantCreditsResult = Annotated[
    Grant | NotFoundError | ValidationError | IdempotencyKeyReused, strawberry.union("GrantCreditsResult")
]
TransferCreditsResult = Annotated[
    Transfer | NotFoundError | ValidationError | InsufficientCredits | IdempotencyKeyReused,
    strawberry.union("TransferCreditsResult"),
]
StartGenerationResult = Annotated[
    Generation | NotFoundError | ValidationError | InsufficientCredits | SpendLimitExceeded | IdempotencyKeyReused,
    strawberry.union("StartGenerationResult"),
]
SettleGenerationResult = Annotated[
    Generation | NotFoundError | ValidationError | IdempotencyKeyReused | GenerationAlreadySettled,
    strawberry.union("SettleGenerationResult"),
]
CreateCreditPackResult = Annotated[CreditPack | ValidationError, strawberry.union("CreateCreditPackResult")]
SetCreditPackActiveResult = Annotated[CreditPack | NotFoundError, strawberry.union("SetCreditPackActiveResult")]


def _balance(b: queries.Balance, days: int) -> Balance:
    return Balance(
        workspace_id=strawberry.ID(str(b.workspace_id)), allocation_mode=b.allocation_mode.value,
        pool_fallback=b.pool_fallback, available=format_credits(b.available), held=format_credits(b.held),
        scopes=[ScopeBalance.of(s) for s in b.scopes],
        viewer_spendable=format_credits(b.viewer_spendable), grants=[Grant.from_model(g) for g in b.grants],
        expiring_soon=ExpiringCredits(
            within_days=days, credits=format_credits(b.expiring_units),
            grants=[Grant.from_model(e.grant) for e in b.expiring],
            by_grant=[ExpiringGrant(grant=Grant.from_model(e.grant), credits=format_credits(e.expires))
                      for e in b.expiring]),
        as_of=b.as_of,
    )


@strawberry.type
class LedgerQuery:
    @strawberry.field(description="Available and held credits, per scope, with grants and what expires soon.")
    async def balance(
        self, info: Info[Context, None], workspace_id: strawberry.ID, expiring_within_days: int = 7
    ) -> Balance | None:
        caller = await info.context.caller()
        try:
            b = await queries.workspace_balance(
                info.context.db, caller, workspace_id=str(workspace_id), expiring_within_days=expiring_within_days
            )
        except NotFound:
            return None
        return _balance(b, expiring_within_days)

    @strawberry.field(description="Ledger entries, newest first (owners, admins, billing managers).")
    async def ledger(
        self, info: Info[Context, None], workspace_id: strawberry.ID, first: int = 50, after: str | None = None,
        filter: LedgerFilter | None = None,
    ) -> LedgerEntryConnection | None:
        caller = await info.context.caller()
        f = filter or LedgerFilter()
        try:
            page = await queries.ledger_page(
                info.context.db, caller, workspace_id=str(workspace_id), first=first, after=after,
                filter=queries.LedgerFilter(
                    kinds=list(f.kinds) if f.kinds else None,
                    member_id=optional_id(f.member_id),
                    generation_id=optional_id(f.generation_id),
                    since=f.since, until=f.until,
                ),
            )
        except NotFound:
            return None
        return LedgerEntryConnection(
            edges=[LedgerEntryEdge(cursor=c, node=LedgerEntry.from_model(e)) for e, c in zip(page.items, page.cursors)],
            page_info=PageInfo.of(page),
        )

    @strawberry.field(description="Generations, newest first: all of them for ledger viewers, else your own.")
    async def generations(
        self, info: Info[Context, None], workspace_id: strawberry.ID, first: int = 50, after: str | None = None,
        status: GenerationStatus | None = None, member_id: strawberry.ID | None = None,
    ) -> GenerationConnection | None:
        caller = await info.context.caller()
        try:
            page = await queries.generations_page(
                info.context.db, caller, workspace_id=str(workspace_id), first=first, after=after, status=status,
                member_id=optional_id(member_id),
            )
        except NotFound:
            return None
        return GenerationConnection(
            edges=[GenerationEdge(cursor=c, node=Generation.from_result(r)) for r, c in zip(page.items, page.cursors)],
            page_info=PageInfo.of(page),
        )

    @strawberry.field(description="One generation with its holds, captures and releases.")
    async def generation(self, info: Info[Context, None], id: strawberry.ID) -> Generation | None:
        caller = await info.context.caller()
        try:
            return Generation.from_result(await queries.get_generation(info.context.db, caller, generation_id=str(id)))
        except NotFound:
            return None

    @strawberry.field(description="Credit packs on sale.")
    async def credit_packs(self, info: Info[Context, None]) -> list[CreditPack]:
        await info.context.caller()
        return [CreditPack.from_model(p) for p in await queries.credit_packs(info.context.db)]


@strawberry.type
class LedgerMutation:
    @strawberry.mutation(description="Buy a credit pack for the workspace pool. A payment reference works once, ever.")
    async def purchase_credits(self, info: Info[Context, None], input: PurchaseCreditsInput) -> PurchaseCreditsResult:
        ctx = info.context
        caller = await ctx.caller()
        call = ledger.purchase_credits(
            ctx.db, caller, ctx.payments, workspace_id=str(input.workspace_id), pack_id=str(input.pack_id),
            payment_reference=input.payment_reference, idempotency_key=input.idempotency_key,
        )
        return await result(call, Purchase.from_result)

    @strawberry.mutation(description="Operators: a promotional, adjustment or other grant to the pool or a seat.")
    async def grant_credits(self, info: Info[Context, None], input: GrantCreditsInput) -> GrantCreditsResult:
        ctx = info.context
        caller = await ctx.caller()
        call = ledger.grant_credits(
            ctx.db, caller, workspace_id=str(input.workspace_id), amount=input.amount, source=input.source,
            reason=input.reason, idempotency_key=input.idempotency_key,
            member_id=optional_id(input.member_id), expires_at=input.expires_at,
            effective_at=input.effective_at, priority=input.priority, external_ref=input.external_reference,
        )
        return await result(call, Grant.from_model)

    @strawberry.mutation(description="Owners and admins: move credits between the pool and seats.")
    async def transfer_credits(self, info: Info[Context, None], input: TransferCreditsInput) -> TransferCreditsResult:
        ctx = info.context
        caller = await ctx.caller()
        call = ledger.transfer_credits(
            ctx.db, caller, workspace_id=str(input.workspace_id), amount=input.amount,
            idempotency_key=input.idempotency_key,
            from_member_id=optional_id(input.from_member_id),
            to_member_id=optional_id(input.to_member_id),
            from_group_id=optional_id(input.from_billing_group_id),
            to_group_id=optional_id(input.to_billing_group_id), hold_ttl=ctx.hold_ttl,
        )
        return await result(call, Transfer.from_result)

    @strawberry.mutation(description="Price a generation and hold its cost (creator seats).")
    async def start_generation(self, info: Info[Context, None], input: StartGenerationInput) -> StartGenerationResult:
        ctx = info.context
        call = ledger.start_generation(
            ctx.db, await ctx.who(), workspace_id=str(input.workspace_id), model_key=input.model_key,
            idempotency_key=input.idempotency_key, parameters=input.parameters,
            on_behalf_of_member_id=optional_id(input.on_behalf_of_member_id),
            payments=ctx.payments, hold_ttl=ctx.hold_ttl,
        )
        return await result(call, Generation.from_result)

    @strawberry.mutation(description="Generation worker: capture the actual cost, release the rest.")
    async def complete_generation(
        self, info: Info[Context, None], input: CompleteGenerationInput
    ) -> SettleGenerationResult:
        ctx = info.context
        call = ledger.complete_generation(
            ctx.db, await ctx.who(), generation_id=str(input.generation_id), idempotency_key=input.idempotency_key,
            actual_cost=input.actual_cost, usage=input.usage, payments=ctx.payments,
        )
        return await result(call, Generation.from_result)

    @strawberry.mutation(description="Generation worker: fail it; technical failures and cancellations cost nothing.")
    async def fail_generation(self, info: Info[Context, None], input: FailGenerationInput) -> SettleGenerationResult:
        ctx = info.context
        call = ledger.fail_generation(
            ctx.db, await ctx.who(), ctx.ledger_rules, generation_id=str(input.generation_id), kind=input.kind,
            idempotency_key=input.idempotency_key,
        )
        return await result(call, Generation.from_result)

    @strawberry.mutation(description="Operators: put a credit pack on sale.")
    async def create_credit_pack(self, info: Info[Context, None], input: CreateCreditPackInput) -> CreateCreditPackResult:
        caller = await info.context.caller()
        call = packs.create_pack(
            info.context.db, caller, name=input.name, credits=input.credits, price_minor=input.price_minor,
            currency=input.currency, expires_after_days=input.expires_after_days,
        )
        return await result(call, CreditPack.from_model)

    @strawberry.mutation(description="Operators: take a pack off sale or back on.")
    async def set_credit_pack_active(
        self, info: Info[Context, None], input: SetCreditPackActiveInput
    ) -> SetCreditPackActiveResult:
        caller = await info.context.caller()
        call = packs.set_pack_active(info.context.db, caller, pack_id=str(input.pack_id), active=input.active)
        return await result(call, CreditPack.from_model)
