"""Every model, imported in one place so `Base.metadata` is complete (Alembic, tests)."""

from domain.base import Base
from domain.governance.models import (
    Alert,
    AuditEntry,
    AutoTopUp,
    LimitUsage,
    Notification,
    OverageRequest,
    SpendLimit,
)
from domain.identity import ApiToken, User
from domain.ledger.models import CreditPack, Generation, Grant, IdempotencyKey, LedgerEntry, PeriodClose, Purchase
from domain.plans import Plan
from domain.pricing import ModelPrice, PriceList
from domain.workspaces.models import BillingGroup, Member, Workspace

__all__ = [
    "Alert", "AuditEntry", "AutoTopUp", "BillingGroup", "LimitUsage", "Notification", "OverageRequest", "SpendLimit",
    "ApiToken", "Base", "CreditPack", "Generation", "Grant", "IdempotencyKey", "LedgerEntry", "Member", "ModelPrice", "PeriodClose",
    "Plan", "PriceList", "Purchase", "User", "Workspace",
]
