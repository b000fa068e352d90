"""Governance: billing groups, spend limits, overage requests, notifications, the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from api.context import Context
from api.errors import NotFoundError, OverageNotPending, ValidationError, optional_id, result
from api.ledger import PageInfo
from api.workspaces import Member, Workspace
from domain.errors import NotFound
from domain.governance import alerts as alerts_domain
from domain.governance import audit, automation, groups, limits, notifications, overages
from domain.governance import models as gm
from domain.money import format_credits
from domain.workspaces import models as wm

LimitScope = strawberry.enum(gm.LimitScope, name="LimitScope")
LimitPeriod = strawberry.enum(gm.LimitPeriod, name="LimitPeriod")
LimitAction = strawberry.enum(gm.LimitAction, name="LimitAction")
OverageStatus = strawberry.enum(gm.OverageStatus, name="OverageStatus")


def _id(value) -> strawberry.ID | None:
    return strawberry.ID(str(value)) if value is not None else None


@strawberry.type
class BillingGroup:
    id: strawberry.ID
    workspace_id: strawberry.ID
    name: str
    created_at: datetime
    archived_at: datetime | None

    @classmethod
    def of(cls, g: wm.BillingGroup) -> BillingGroup:
        return cls(id=strawberry.ID(str(g.id)), workspace_id=strawberry.ID(str(g.workspace_id)), name=g.name,
                   created_at=g.created_at, archived_at=g.archived_at)


@strawberry.type
class SpendLimit:
    id: strawberry.ID
    scope: LimitScope
    member_id: strawberry.ID | None
    billing_group_id: strawberry.ID | None
    period: LimitPeriod
    amount: str
    action: LimitAction
    period_start: datetime | None
    period_end: datetime | None
    used: str | None = strawberry.field(description="Held and captured credits this period.")
    allowance: str | None = strawberry.field(description="The amount plus approved overages in force.")

    @classmethod
    def of(cls, limit: gm.SpendLimit, view: limits.LimitView | None = None) -> SpendLimit:
        return cls(
            id=strawberry.ID(str(limit.id)), scope=limit.scope, member_id=_id(limit.member_id),
            billing_group_id=_id(limit.billing_group_id), period=limit.period,
            amount=format_credits(limit.amount_units), action=limit.action,
            period_start=view.period_start if view else None, period_end=view.period_end if view else None,
            used=format_credits(view.used) if view else None,
            allowance=format_credits(view.allowance) if view else None,
        )


@strawberry.type
class OverageRequest:
    id: strawberry.ID
    workspace_id: strawberry.ID
    member_id: strawberry.ID
    limit_id: strawberry.ID
    amount: str
    reason: str
    model_key: str | None
    status: OverageStatus
    requested_at: datetime
    lapses_at: datetime
    approved: str | None
    approval_expires_at: datetime | None
    decided_by: strawberry.ID | None
    decided_at: datetime | None
    decision_reason: str | None

    @classmethod
    def of(cls, r: gm.OverageRequest) -> OverageRequest:
        return cls(
            id=strawberry.ID(str(r.id)), workspace_id=strawberry.ID(str(r.workspace_id)),
            member_id=strawberry.ID(str(r.member_id)), limit_id=strawberry.ID(str(r.limit_id)),
            amount=format_credits(r.amount_units), reason=r.reason, model_key=r.model_key, status=r.status,
            requested_at=r.requested_at, lapses_at=r.lapses_at,
            approved=format_credits(r.approved_units) if r.approved_units else None,
            approval_expires_at=r.approval_expires_at, decided_by=_id(r.decided_by), decided_at=r.decided_at,
            decision_reason=r.decision_reason,
        )


@strawberry.type
class Notification:
    id: strawberry.ID
    workspace_id: strawberry.ID
    kind: str
    payload: JSON
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def of(cls, n: gm.Notification) -> Notification:
        return cls(id=strawberry.ID(str(n.id)), workspace_id=strawberry.ID(str(n.workspace_id)), kind=n.kind,
                   payload=n.payload, created_at=n.created_at, read_at=n.read_at)


@strawberry.type
class AuditEntry:
    id: strawberry.ID
    actor_id: strawberry.ID | None
    action: str
    target_type: str
    target_id: str | None
    before: JSON | None
    after: JSON | None
    occurred_at: datetime

    @classmethod
    def of(cls, e: gm.AuditEntry) -> AuditEntry:
        return cls(id=strawberry.ID(str(e.id)), actor_id=_id(e.actor_id), action=e.action, target_type=e.target_type,
                   target_id=e.target_id, before=e.before, after=e.after, occurred_at=e.occurred_at)


@strawberry.type
class AutoTopUp:
    enabled: bool
    threshold: str
    pack_id: strawberry.ID
    monthly_max_purchases: int
    monthly_max_credits: str
    failure_limit: int
    consecutive_failures: int
    purchases_this_month: int
    credits_this_month: str

    @classmethod
    def of(cls, view: automation.TopUpView) -> AutoTopUp:
        t = view.topup
        return cls(enabled=t.enabled, threshold=format_credits(t.threshold_units), pack_id=strawberry.ID(str(t.pack_id)),
                   monthly_max_purchases=t.monthly_max_purchases, monthly_max_credits=format_credits(t.monthly_max_units),
                   failure_limit=t.failure_limit, consecutive_failures=t.consecutive_failures,
                   purchases_this_month=view.purchases_this_month,
                   credits_this_month=format_credits(view.units_this_month))


AlertStatus = strawberry.enum(gm.AlertStatus, name="AlertStatus")


@strawberry.type
class Alert:
    id: strawberry.ID
    kind: str = strawberry.field(description="LOW_BALANCE, LIMIT_80, LIMIT_100, GRANT_EXPIRING, TOPUP_DONE, "
                                             "TOPUP_FAILED, TOPUP_DISABLED, TOPUP_CAP_REACHED, OVERAGE_REQUESTED, "
                                             "OVERAGE_DECIDED")
    subject: str
    status: AlertStatus
    payload: JSON
    opened_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None

    @classmethod
    def of(cls, a: gm.Alert) -> Alert:
        return cls(id=strawberry.ID(str(a.id)), kind=a.kind, subject=a.subject, status=a.status, payload=a.payload,
                   opened_at=a.opened_at, resolved_at=a.resolved_at, acknowledged_at=a.acknowledged_at)


@strawberry.type
class AuditEntryEdge:
    cursor: str
    node: AuditEntry


@strawberry.type
class AuditLogConnection:
    edges: list[AuditEntryEdge]
    page_info: PageInfo


# --- inputs ------------------------------------------------------------------------------------

@strawberry.input
class CreateBillingGroupInput:
    workspace_id: strawberry.ID
    name: str


@strawberry.input
class RenameBillingGroupInput:
    group_id: strawberry.ID
    name: str


@strawberry.input
class ArchiveBillingGroupInput:
    group_id: strawberry.ID


@strawberry.input
class AssignBillingGroupInput:
    member_id: strawberry.ID
    group_id: strawberry.ID | None = strawberry.field(default=None, description="Null: no group.")


@strawberry.input
class SetSpendLimitInput:
    workspace_id: strawberry.ID
    scope: LimitScope
    period: LimitPeriod
    amount: str
    action: LimitAction = gm.LimitAction.BLOCK
    member_id: strawberry.ID | None = None
    billing_group_id: strawberry.ID | None = None


@strawberry.input
class RemoveSpendLimitInput:
    limit_id: strawberry.ID


@strawberry.input
class RequestOverageInput:
    workspace_id: strawberry.ID
    amount: str
    reason: str
    limit_id: strawberry.ID | None = strawberry.field(default=None, description="Default: the limit that may "
                                                                                "be raised with the least room left "
                                                                                "this period.")
    model_key: str | None = strawberry.field(default=None, description="What you were trying to run.")


@strawberry.input
class DecideOverageInput:
    request_id: strawberry.ID
    approve: bool
    amount: str | None = strawberry.field(default=None, description="Approved credits; default: as requested.")
    expires_at: datetime | None = strawberry.field(default=None, description="Default: the end of the period.")
    reason: str | None = strawberry.field(default=None, description="Required to deny.")


@strawberry.input
class SetAutoTopUpInput:
    workspace_id: strawberry.ID
    enabled: bool
    threshold: str
    pack_id: strawberry.ID
    monthly_max_purchases: int
    monthly_max_credits: str
    failure_limit: int = 3


@strawberry.input
class SetAlertSettingsInput:
    workspace_id: strawberry.ID
    low_balance_threshold: str | None = strawberry.field(default=None, description="Null: no low-balance alert.")
    expiry_alert_days: int = 7


@strawberry.input
class AcknowledgeAlertInput:
    alert_id: strawberry.ID


SetAutoTopUpResult = Annotated[AutoTopUp | NotFoundError | ValidationError, strawberry.union("SetAutoTopUpResult")]
SetAlertSettingsResult = Annotated[Workspace | NotFoundError | ValidationError,
                                   strawberry.union("SetAlertSettingsResult")]
AcknowledgeAlertResult = Annotated[Alert | NotFoundError, strawberry.union("AcknowledgeAlertResult")]
CreateBillingGroupResult = Annotated[BillingGroup | NotFoundError | ValidationError,
                                     strawberry.union("CreateBillingGroupResult")]
BillingGroupResult = Annotated[BillingGroup | NotFoundError | ValidationError, strawberry.union("BillingGroupResult")]
AssignBillingGroupResult = Annotated[Member | NotFoundError | ValidationError,
                                     strawberry.union("AssignBillingGroupResult")]
SetSpendLimitResult = Annotated[SpendLimit | NotFoundError | ValidationError, strawberry.union("SetSpendLimitResult")]
RemoveSpendLimitResult = Annotated[SpendLimit | NotFoundError, strawberry.union("RemoveSpendLimitResult")]
RequestOverageResult = Annotated[OverageRequest | NotFoundError | ValidationError,
                                 strawberry.union("RequestOverageResult")]
DecideOverageResult = Annotated[OverageRequest | NotFoundError | ValidationError | OverageNotPending,
                                strawberry.union("DecideOverageResult")]


@strawberry.type
class GovernanceQuery:
    @strawberry.field
    async def billing_groups(self, info: Info[Context, None], workspace_id: strawberry.ID) -> list[BillingGroup] | None:
        caller = await info.context.caller()
        try:
            return [BillingGroup.of(g) for g in await groups.list_groups(info.context.db, caller,
                                                                          workspace_id=str(workspace_id))]
        except NotFound:
            return None

    @strawberry.field(description="Live spend limits with this period's usage.")
    async def spend_limits(self, info: Info[Context, None], workspace_id: strawberry.ID) -> list[SpendLimit] | None:
        caller = await info.context.caller()
        try:
            views = await limits.list_limits(info.context.db, caller, workspace_id=str(workspace_id))
        except NotFound:
            return None
        return [SpendLimit.of(v.limit, v) for v in views]

    @strawberry.field(description="Approvers see every request; anyone else their own.")
    async def overage_requests(
        self, info: Info[Context, None], workspace_id: strawberry.ID, status: OverageStatus | None = None
    ) -> list[OverageRequest] | None:
        caller = await info.context.caller()
        try:
            rows = await overages.list_overages(info.context.db, caller, workspace_id=str(workspace_id), status=status)
        except NotFound:
            return None
        return [OverageRequest.of(r) for r in rows]

    @strawberry.field(description="Your notifications, newest first.")
    async def notifications(self, info: Info[Context, None], unread_only: bool = False) -> list[Notification]:
        caller = await info.context.caller()
        return [Notification.of(n) for n in await notifications.my_notifications(info.context.db, caller,
                                                                                 unread_only=unread_only)]

    @strawberry.field(description="The workspace's auto top-up, if configured.")
    async def auto_top_up(self, info: Info[Context, None], workspace_id: strawberry.ID) -> AutoTopUp | None:
        caller = await info.context.caller()
        try:
            t = await automation.get_auto_top_up(info.context.db, caller, workspace_id=str(workspace_id))
        except NotFound:
            return None
        return AutoTopUp.of(t) if t else None

    @strawberry.field(description="Alerts, newest first (owners, admins, billing managers).")
    async def alerts(
        self, info: Info[Context, None], workspace_id: strawberry.ID, status: AlertStatus | None = None
    ) -> list[Alert] | None:
        caller = await info.context.caller()
        try:
            rows = await alerts_domain.list_alerts(info.context.db, caller, workspace_id=str(workspace_id),
                                                   status=status)
        except NotFound:
            return None
        return [Alert.of(a) for a in rows]

    @strawberry.field(description="Governance changes, newest first (owners, admins, operators).")
    async def audit_log(
        self, info: Info[Context, None], workspace_id: strawberry.ID, first: int = 50, after: str | None = None,
        action: str | None = None, actor_id: strawberry.ID | None = None, since: datetime | None = None,
        until: datetime | None = None,
    ) -> AuditLogConnection | None:
        caller = await info.context.caller()
        try:
            page = await audit.audit_page(info.context.db, caller, workspace_id=str(workspace_id), first=first,
                                          after=after, action=action, actor_id=optional_id(actor_id),
                                          since=since, until=until)
        except NotFound:
            return None
        return AuditLogConnection(
            edges=[AuditEntryEdge(cursor=c, node=AuditEntry.of(e)) for e, c in zip(page.items, page.cursors)],
            page_info=PageInfo.of(page),
        )


@strawberry.type
class GovernanceMutation:
    @strawberry.mutation
    async def create_billing_group(self, info: Info[Context, None], input: CreateBillingGroupInput) -> CreateBillingGroupResult:
        caller = await info.context.caller()
        return await result(groups.create_group(info.context.db, caller, workspace_id=str(input.workspace_id),
                                                name=input.name), BillingGroup.of)

    @strawberry.mutation
    async def rename_billing_group(self, info: Info[Context, None], input: RenameBillingGroupInput) -> BillingGroupResult:
        caller = await info.context.caller()
        return await result(groups.rename_group(info.context.db, caller, group_id=str(input.group_id),
                                                name=input.name), BillingGroup.of)

    @strawberry.mutation
    async def archive_billing_group(self, info: Info[Context, None], input: ArchiveBillingGroupInput) -> BillingGroupResult:
        caller = await info.context.caller()
        return await result(groups.archive_group(info.context.db, caller, group_id=str(input.group_id)),
                            BillingGroup.of)

    @strawberry.mutation(description="Put a member in a billing group (or none).")
    async def assign_billing_group(self, info: Info[Context, None], input: AssignBillingGroupInput) -> AssignBillingGroupResult:
        caller = await info.context.caller()
        call = groups.assign_member(info.context.db, caller, member_id=str(input.member_id),
                                    group_id=optional_id(input.group_id))
        return await result(call, Member.from_model)

    @strawberry.mutation(description="Owners and admins: set (or replace) a spend limit.")
    async def set_spend_limit(self, info: Info[Context, None], input: SetSpendLimitInput) -> SetSpendLimitResult:
        caller = await info.context.caller()
        call = limits.set_spend_limit(
            info.context.db, caller, workspace_id=str(input.workspace_id), scope=input.scope, period=input.period,
            amount=input.amount, action=input.action, member_id=optional_id(input.member_id),
            billing_group_id=optional_id(input.billing_group_id),
        )
        return await result(call, SpendLimit.of)

    @strawberry.mutation
    async def remove_spend_limit(self, info: Info[Context, None], input: RemoveSpendLimitInput) -> RemoveSpendLimitResult:
        caller = await info.context.caller()
        return await result(limits.remove_spend_limit(info.context.db, caller, limit_id=str(input.limit_id)),
                            SpendLimit.of)

    @strawberry.mutation(description="Ask for more than a REQUIRE_APPROVAL limit allows this period.")
    async def request_overage(self, info: Info[Context, None], input: RequestOverageInput) -> RequestOverageResult:
        ctx = info.context
        caller = await ctx.caller()
        call = overages.request_overage(
            ctx.db, caller, workspace_id=str(input.workspace_id), amount=input.amount, reason=input.reason,
            limit_id=optional_id(input.limit_id), model_key=input.model_key,
            ttl=ctx.overage_ttl,
        )
        return await result(call, OverageRequest.of)

    @strawberry.mutation(description="Approvers: approve (an amount, until an expiry) or deny (with a reason).")
    async def decide_overage(self, info: Info[Context, None], input: DecideOverageInput) -> DecideOverageResult:
        caller = await info.context.caller()
        call = overages.decide_overage(info.context.db, caller, request_id=str(input.request_id),
                                       approve=input.approve, amount=input.amount, expires_at=input.expires_at,
                                       reason=input.reason)
        return await result(call, OverageRequest.of)

    @strawberry.mutation(description="Owners and billing managers: configure auto top-up; admins may also turn it off.")
    async def set_auto_top_up(self, info: Info[Context, None], input: SetAutoTopUpInput) -> SetAutoTopUpResult:
        caller = await info.context.caller()
        call = automation.set_auto_top_up(
            info.context.db, caller, workspace_id=str(input.workspace_id), enabled=input.enabled,
            threshold=input.threshold, pack_id=str(input.pack_id), monthly_max_purchases=input.monthly_max_purchases,
            monthly_max_credits=input.monthly_max_credits, failure_limit=input.failure_limit,
        )
        return await result(call, AutoTopUp.of)

    @strawberry.mutation(description="Low-balance threshold and how early to warn about expiring credits.")
    async def set_alert_settings(self, info: Info[Context, None], input: SetAlertSettingsInput) -> SetAlertSettingsResult:
        caller = await info.context.caller()
        call = automation.set_alert_settings(info.context.db, caller, workspace_id=str(input.workspace_id),
                                             low_balance_threshold=input.low_balance_threshold,
                                             expiry_alert_days=input.expiry_alert_days)
        return await result(call, Workspace.from_model)

    @strawberry.mutation
    async def acknowledge_alert(self, info: Info[Context, None], input: AcknowledgeAlertInput) -> AcknowledgeAlertResult:
        caller = await info.context.caller()
        return await result(alerts_domain.acknowledge(info.context.db, caller, alert_id=str(input.alert_id)), Alert.of)

    @strawberry.mutation(description="Mark all your notifications read; returns how many were unread.")
    async def mark_notifications_read(self, info: Info[Context, None]) -> int:
        caller = await info.context.caller()
        return await notifications.mark_read(info.context.db, caller)
