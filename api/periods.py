"""Plans, billing periods, what the next renewal will do, and breakage."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from api.context import Context
from api.errors import NotFoundError, ValidationError, result
from api.ledger import Grant
from api.workspaces import BillingInterval, Plan, RolloverPolicy, Workspace
from domain import plans as plans_domain
from domain.errors import NotFound
from domain.money import format_credits, parse_credits
from domain.periods import service as periods
from domain.workspaces import service as workspaces


@strawberry.type(description="What one bucket does at the next renewal.")
class BucketOutlook:
    grant: Grant
    rolls_over: str
    expires: str
    stays: str


@strawberry.type(description="A closed period: credits lost to expiry (breakage), rolled over, issued.")
class PeriodBreakage:
    period_start: datetime
    period_end: datetime
    expired: str
    rolled_over: str
    issued: str


@strawberry.type(description="What a period close does with the unused allowance of its period.")
class RolloverRule:
    policy: RolloverPolicy
    cap_credits: str | None
    cap_percent: int | None
    periods: int = strawberry.field(description="Rolled-over credits expire after this many periods.")

    @classmethod
    def of(cls, r: plans_domain.RolloverRule) -> RolloverRule:
        return cls(policy=r.policy, cap_credits=format_credits(r.cap_units) if r.cap_units is not None else None,
                   cap_percent=r.cap_percent, periods=r.periods)


@strawberry.type
class CreditSchedule:
    plan: Plan
    period_rollover: RolloverRule = strawberry.field(description=(
        "The rule the current period began under, which its close (`atNextRenewal`) applies: a plan changed or "
        "edited since governs the allowances issued from the next renewal on."))
    period_start: datetime
    next_renewal_at: datetime
    cancelled_at: datetime | None
    at_next_renewal: list[BucketOutlook]
    breakage: list[PeriodBreakage] = strawberry.field(description="Newest period first.")

    @classmethod
    def of(cls, s: periods.Schedule) -> CreditSchedule:
        return cls(
            plan=Plan.from_model(s.plan), period_rollover=RolloverRule.of(s.workspace.period_rule),
            period_start=s.workspace.period_start, next_renewal_at=s.next_renewal_at,
            cancelled_at=s.workspace.cancelled_at,
            at_next_renewal=[BucketOutlook(grant=Grant.from_model(b.grant), rolls_over=format_credits(b.rolls_over),
                                           expires=format_credits(b.expires), stays=format_credits(b.stays))
                             for b in s.buckets],
            breakage=[PeriodBreakage(period_start=b.period_start, period_end=b.period_end,
                                     expired=format_credits(b.expired_units),
                                     rolled_over=format_credits(b.rolled_over_units),
                                     issued=format_credits(b.issued_units)) for b in s.breakage],
        )


@strawberry.input
class PlanInput:
    key: str
    name: str
    seat_cap: int
    free_creator_seats: int = 0
    included_credits: str = "0"
    billing_interval: BillingInterval = plans_domain.BillingInterval.MONTHLY
    rollover_policy: RolloverPolicy = plans_domain.RolloverPolicy.RESET
    rollover_cap_credits: str | None = None
    rollover_cap_percent: int | None = None
    rollover_periods: int = 1
    trial_credits: str = "0"
    trial_days: int = 0
    daily_free_credits: str = "0"


@strawberry.input
class CancelSubscriptionInput:
    workspace_id: strawberry.ID


CreatePlanResult = Annotated[Plan | ValidationError, strawberry.union("CreatePlanResult")]
CancelSubscriptionResult = Annotated[Workspace | NotFoundError, strawberry.union("CancelSubscriptionResult")]


def _units(value: str | None, field: str) -> int | None:
    return None if value is None else parse_credits(value, field, allow_zero=True)


@strawberry.type
class PeriodsQuery:
    @strawberry.field(description="The next renewal, what each bucket will do at it, and breakage per period.")
    async def credit_schedule(
        self, info: Info[Context, None], workspace_id: strawberry.ID, periods_back: int = 12
    ) -> CreditSchedule | None:
        caller = await info.context.caller()
        try:
            s = await periods.schedule(info.context.db, caller, workspace_id=str(workspace_id),
                                       periods=periods_back)
        except NotFound:
            return None
        return CreditSchedule.of(s)


@strawberry.type
class PeriodsMutation:
    @strawberry.mutation(description="Operators: define a plan (allowance, rollover, trial, daily credits, seats).")
    async def create_plan(self, info: Info[Context, None], input: PlanInput) -> CreatePlanResult:
        caller = await info.context.caller()

        async def call():
            return await plans_domain.create_plan(
                info.context.db, caller, key=input.key, name=input.name, seat_cap=input.seat_cap,
                free_creator_seats=input.free_creator_seats,
                included_units=_units(input.included_credits, "includedCredits"),
                billing_interval=input.billing_interval, rollover_policy=input.rollover_policy,
                rollover_cap_units=_units(input.rollover_cap_credits, "rolloverCapCredits"),
                rollover_cap_percent=input.rollover_cap_percent, rollover_periods=input.rollover_periods,
                trial_units=_units(input.trial_credits, "trialCredits"), trial_days=input.trial_days,
                daily_free_units=_units(input.daily_free_credits, "dailyFreeCredits"),
            )

        return await result(call(), Plan.from_model)

    @strawberry.mutation(description="Stop issuing allowances after this period; every granted credit stays.")
    async def cancel_subscription(
        self, info: Info[Context, None], input: CancelSubscriptionInput
    ) -> CancelSubscriptionResult:
        caller = await info.context.caller()
        call = workspaces.cancel_subscription(info.context.db, caller, workspace_id=str(input.workspace_id))
        return await result(call, Workspace.from_model)
