"""Ledger tables. Money is integer units (1 credit = 1000 units) everywhere.

A grant carries its running figures (remaining, held, captured, expired, transferred_out) so a
balance read sums a few grant rows, never the ledger; the database keeps them non-negative and
conserved with CHECK constraints, and the invariant checker proves they equal the entries.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, Computed, ForeignKey, Identity, Index, LargeBinary, String, UniqueConstraint, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk
from domain.ledger.consumption import Scope


class GrantSource(enum.StrEnum):
    PLAN_ALLOWANCE = "PLAN_ALLOWANCE"
    TRIAL = "TRIAL"
    PURCHASE = "PURCHASE"
    ADD_ON = "ADD_ON"
    PROMOTION = "PROMOTION"
    ENTERPRISE_COMMIT = "ENTERPRISE_COMMIT"
    ROLLOVER = "ROLLOVER"
    REFUND = "REFUND"
    ADJUSTMENT = "ADJUSTMENT"
    DAILY_FREE = "DAILY_FREE"  # the plan's daily free allowance; expires at the end of its day


class EntryKind(enum.StrEnum):
    """One movement of credits on one grant. The amount is always positive; the kind says which
    of the grant's figures it moves (see `domain.ledger.invariants`)."""

    GRANT = "GRANT"  # credits created: amount += a, remaining += a
    HOLD = "HOLD"  # remaining -> held
    RELEASE = "RELEASE"  # held -> remaining
    CAPTURE = "CAPTURE"  # held -> captured (spent)
    EXPIRE = "EXPIRE"  # remaining -> expired
    TRANSFER_OUT = "TRANSFER_OUT"  # remaining -> transferred_out (a GRANT on the receiving grant)


class Cause(enum.StrEnum):
    PURCHASE = "PURCHASE"
    GRANT = "GRANT"
    GENERATION = "GENERATION"
    EXPIRY = "EXPIRY"
    TRANSFER = "TRANSFER"
    ADJUSTMENT = "ADJUSTMENT"


class GenerationStatus(enum.StrEnum):
    STARTED = "STARTED"  # holds placed
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"


class FailureKind(enum.StrEnum):
    TECHNICAL = "TECHNICAL"
    CANCELLED = "CANCELLED"
    POLICY_VIOLATION = "POLICY_VIOLATION"


class CreditPack(Base):
    __tablename__ = "credit_packs"
    __table_args__ = (
        CheckConstraint("units > 0", name="units_positive"),
        CheckConstraint("price_minor >= 0", name="price_not_negative"),
        CheckConstraint("expires_after_days IS NULL OR expires_after_days > 0", name="expiry_positive"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(100))
    units: Mapped[int] = mapped_column(BigInteger)
    price_minor: Mapped[int] = mapped_column(BigInteger)  # currency minor units (cents)
    currency: Mapped[str] = mapped_column(String(3))
    # None: the purchased credits never expire (the default a fair platform offers).
    expires_after_days: Mapped[int | None]
    is_active: Mapped[bool] = mapped_column(default=True, server_default="true")
    created_at: Mapped[datetime] = created_at()


class Grant(Base):
    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "remaining >= 0 AND held >= 0 AND captured >= 0 AND expired >= 0 AND transferred_out >= 0",
            name="figures_not_negative",
        ),
        CheckConstraint("amount = remaining + held + captured + expired + transferred_out", name="conserved"),
        CheckConstraint("(scope = 'SEAT') = (member_id IS NOT NULL)", name="seat_has_member"),
        CheckConstraint("(scope = 'GROUP') = (billing_group_id IS NOT NULL)", name="group_has_group"),
        CheckConstraint("expires_at IS NULL OR expires_at > effective_at", name="expires_after_effective"),
        # The spend path reads a workspace's live grants; spent-out grants drop out of the index.
        # The predicates read `live`, never `remaining` or `held`: an index that names a column
        # makes every UPDATE of it a non-HOT update (migration 0007 says why that matters).
        Index("ix_grants_live", "workspace_id", "scope", "member_id", postgresql_where=text("live")),
        Index("ix_grants_expiring", "expires_at", postgresql_where=text("live AND expires_at IS NOT NULL")),
    )  # and fillfactor 80 (migration 0007), room on a page for the updated versions

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"), index=True)
    scope: Mapped[Scope] = mapped_column(str_enum(Scope, "grant_scope"))
    member_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("members.id"))
    billing_group_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("billing_groups.id"))
    source: Mapped[GrantSource] = mapped_column(str_enum(GrantSource, "grant_source"))
    priority: Mapped[int] = mapped_column(default=100, server_default="100")
    effective_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    held: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    captured: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    expired: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    transferred_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Credits left or held; computed by PostgreSQL, changes only when a grant runs out or refills.
    live: Mapped[bool] = mapped_column(Computed("remaining > 0 OR held > 0", persisted=True))
    external_ref: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(String(500))
    created_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    # A grant made by a transfer points at the grant its credits came from.
    parent_grant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("grants.id"))
    created_at: Mapped[datetime] = created_at()


class Purchase(Base):
    __tablename__ = "purchases"

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"), index=True)
    pack_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("credit_packs.id"))
    # A payment can be turned into credits once, ever, across all workspaces.
    payment_reference: Mapped[str] = mapped_column(String(200), unique=True)
    provider: Mapped[str] = mapped_column(String(50))
    units: Mapped[int] = mapped_column(BigInteger)
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    grant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("grants.id"))
    # None: the system's purchase (auto top-up; its audit entry names who turned it on).
    purchased_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint(
            "quoted_units >= 0 AND captured_units >= 0 AND released_units >= 0 AND shortfall_units >= 0",
            name="figures_not_negative",
        ),
        Index("ix_generations_workspace_created", "workspace_id", "created_at"),
        Index("ix_generations_member", "member_id"),
        Index("ix_generations_running", "started_at", postgresql_where=text("status = 'STARTED'")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    member_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("members.id"))  # whose credits
    # The member's billing group when it started: the whole generation (its hold and any extra
    # captured above it) draws with this group, whatever group the member is in later.
    billing_group_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("billing_groups.id"))
    requested_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))  # who called (maybe a service)
    model_key: Mapped[str] = mapped_column(String(100))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[GenerationStatus] = mapped_column(str_enum(GenerationStatus, "generation_status"))
    quoted_units: Mapped[int] = mapped_column(BigInteger)
    captured_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    released_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Actual cost above the hold that no credits were left to cover: recorded, never hidden.
    shortfall_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    failure_kind: Mapped[FailureKind | None] = mapped_column(str_enum(FailureKind, "failure_kind"))
    # The price list version it was priced under, and the quote it held (line items, window,
    # plan multiplier): completion prices reported usage with these, never with a newer list.
    price_list_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("price_lists.id"))
    quote: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    started_at: Mapped[datetime]  # service clock: hold timeouts count from it
    # The spend-limit periods this generation's hold counted in: [{"limit": id, "period": iso}].
    limit_charges: Mapped[list[dict[str, str]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = created_at()
    settled_at: Mapped[datetime | None]
    settled_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))


class LedgerEntry(Base):
    """Immutable: a trigger refuses UPDATE, DELETE and TRUNCATE (money rule 5)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        Index("ix_ledger_entries_workspace_id_id", "workspace_id", "id"),
        Index("ix_ledger_entries_grant_id", "grant_id"),
        Index("ix_ledger_entries_generation_id", "generation_id", postgresql_where=text("generation_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    grant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("grants.id"))
    kind: Mapped[EntryKind] = mapped_column(str_enum(EntryKind, "entry_kind"))
    amount: Mapped[int] = mapped_column(BigInteger)
    cause: Mapped[Cause] = mapped_column(str_enum(Cause, "entry_cause"))
    generation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("generations.id"))
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("purchases.id"))
    transfer_id: Mapped[uuid.UUID | None]  # both sides of one transfer share it
    member_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("members.id"))  # whose spend, if any
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The business time of the movement (the service clock); created_at is the database's.
    occurred_at: Mapped[datetime] = mapped_column(server_default=func.now())
    created_at: Mapped[datetime] = created_at()


class PeriodClose(Base):
    """One closed billing period of a workspace: what rolled over, what expired (breakage), and
    what the next period's allowance issued. Unique per period start: closed exactly once."""

    __tablename__ = "period_closes"
    __table_args__ = (UniqueConstraint("workspace_id", "period_start"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"))
    period_start: Mapped[datetime]
    period_end: Mapped[datetime]
    rolled_over_units: Mapped[int] = mapped_column(BigInteger)
    expired_units: Mapped[int] = mapped_column(BigInteger)
    issued_units: Mapped[int] = mapped_column(BigInteger)
    closed_at: Mapped[datetime] = created_at()


class IdempotencyKey(Base):
    """First result of a credit-moving mutation, per (workspace, caller, key) (money rule 3).

    Inserted in the same transaction as the movement: a concurrent duplicate blocks on the unique
    key until the first commits, then reads its result, so it executes once."""

    __tablename__ = "idempotency_keys"

    workspace_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    actor_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    operation: Mapped[str] = mapped_column(String(50))
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    result_id: Mapped[uuid.UUID]
    created_at: Mapped[datetime] = created_at()


__all__ = [
    "Cause", "CreditPack", "EntryKind", "FailureKind", "Generation", "GenerationStatus", "Grant", "GrantSource",
    "IdempotencyKey", "LedgerEntry", "PeriodClose", "Purchase", "Scope",
]
