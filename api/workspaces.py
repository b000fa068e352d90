"""Workspaces, members, seats, plans."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from api.context import Context
from api.errors import AlreadyMember, LastOwner, NotFoundError, SeatLimitReached, ValidationError, result
from domain import plans as plans_domain
from domain.errors import NotFound
from domain.money import format_credits
from domain.plans import Plan as PlanModel
from domain.workspaces import models as m
from domain.workspaces import service as workspaces

AllocationMode = strawberry.enum(m.AllocationMode, name="AllocationMode")
Role = strawberry.enum(m.Role, name="Role")
Seat = strawberry.enum(m.Seat, name="Seat")


RolloverPolicy = strawberry.enum(plans_domain.RolloverPolicy, name="RolloverPolicy")
BillingInterval = strawberry.enum(plans_domain.BillingInterval, name="BillingInterval")


@strawberry.type
class Plan:
    key: str
    name: str
    seat_cap: int
    free_creator_seats: int
    included_credits: str = strawberry.field(description="Per monthly period: for the pool, or per creator seat.")
    billing_interval: BillingInterval
    rollover_policy: RolloverPolicy
    rollover_cap_credits: str | None
    rollover_cap_percent: int | None
    rollover_periods: int = strawberry.field(description="Rolled-over credits expire after this many periods.")
    trial_credits: str = strawberry.field(description="Once, when a workspace opens: for the pool, or per creator seat.")
    trial_days: int
    daily_free_credits: str = strawberry.field(description="Each day (UTC): for the pool, or per creator seat.")

    @classmethod
    def from_model(cls, p: PlanModel) -> Plan:
        return cls(
            key=p.key, name=p.name, seat_cap=p.seat_cap, free_creator_seats=p.free_creator_seats,
            included_credits=format_credits(p.included_units), billing_interval=p.billing_interval,
            rollover_policy=p.rollover_policy,
            rollover_cap_credits=format_credits(p.rollover_cap_units) if p.rollover_cap_units is not None else None,
            rollover_cap_percent=p.rollover_cap_percent, rollover_periods=p.rollover_periods,
            trial_credits=format_credits(p.trial_units), trial_days=p.trial_days,
            daily_free_credits=format_credits(p.daily_free_units),
        )


@strawberry.type
class UserRef:
    id: strawberry.ID
    email: str | None
    name: str


@strawberry.type
class Member:
    id: strawberry.ID
    workspace_id: strawberry.ID
    user: UserRef
    role: Role
    seat: Seat
    billing_group_id: strawberry.ID | None
    joined_at: datetime
    removed_at: datetime | None

    @classmethod
    def from_model(cls, x: m.Member) -> Member:
        return cls(
            id=strawberry.ID(str(x.id)), workspace_id=strawberry.ID(str(x.workspace_id)),
            user=UserRef(id=strawberry.ID(str(x.user.id)), email=x.user.email, name=x.user.name),
            role=x.role, seat=x.seat, joined_at=x.created_at, removed_at=x.removed_at,
            billing_group_id=strawberry.ID(str(x.billing_group_id)) if x.billing_group_id else None,
        )


@strawberry.type
class SeatUsage:
    seats_used: int
    seat_cap: int
    creator_seats_used: int
    creator_seat_limit: int = strawberry.field(description="Free creator seats of the plan plus paid ones.")
    free_creator_seats: int
    paid_creator_seats: int


@strawberry.type
class Workspace:
    id: strawberry.ID
    name: str
    allocation_mode: AllocationMode
    pool_fallback: bool
    paid_creator_seats: int
    created_at: datetime
    period_start: datetime
    next_renewal_at: datetime
    cancelled_at: datetime | None
    timezone: str

    async def _detail(self, info: Info[Context, None]) -> workspaces.WorkspaceDetail:
        # Cached per request: members, seat usage and viewer fields share one load.
        key = f"workspace:{self.id}"
        if key not in info.context.loaders:
            caller = await info.context.caller()
            info.context.loaders[key] = await workspaces.get_workspace(
                info.context.db, caller, workspace_id=str(self.id)
            )
        return info.context.loaders[key]

    @strawberry.field
    async def plan(self, info: Info[Context, None]) -> Plan:
        return Plan.from_model((await self._detail(info)).plan)

    @strawberry.field(description="Active members with their roles and seats.")
    async def members(self, info: Info[Context, None]) -> list[Member]:
        return [Member.from_model(x) for x in (await self._detail(info)).members]

    @strawberry.field
    async def seat_usage(self, info: Info[Context, None]) -> SeatUsage:
        d = await self._detail(info)
        u = d.usage
        return SeatUsage(
            seats_used=u.members, seat_cap=d.plan.seat_cap, creator_seats_used=u.creators,
            creator_seat_limit=d.workspace.creator_seat_limit(d.plan), free_creator_seats=d.plan.free_creator_seats,
            paid_creator_seats=d.workspace.paid_creator_seats,
        )

    @strawberry.field(description="The viewer's own role here (null for platform identities).")
    async def viewer_role(self, info: Info[Context, None]) -> Role | None:
        me = (await self._detail(info)).viewer
        return me.role if me else None

    @strawberry.field(description="The viewer's own seat here (null for platform identities).")
    async def viewer_seat(self, info: Info[Context, None]) -> Seat | None:
        me = (await self._detail(info)).viewer
        return me.seat if me else None

    @classmethod
    def from_model(cls, w: m.Workspace) -> Workspace:
        return cls(
            id=strawberry.ID(str(w.id)), name=w.name, allocation_mode=w.allocation_mode,
            pool_fallback=w.pool_fallback, paid_creator_seats=w.paid_creator_seats, created_at=w.created_at,
            period_start=w.period_start, next_renewal_at=w.next_renewal_at, cancelled_at=w.cancelled_at,
            timezone=w.timezone,
        )


@strawberry.type
class WorkspaceMembership:
    workspace: Workspace
    role: Role
    seat: Seat
    member_id: strawberry.ID

    @classmethod
    def from_domain(cls, x: workspaces.Membership) -> WorkspaceMembership:
        return cls(
            workspace=Workspace.from_model(x.workspace), role=x.member.role, seat=x.member.seat,
            member_id=strawberry.ID(str(x.member.id)),
        )


@strawberry.input
class CreateWorkspaceInput:
    name: str
    plan_key: str = "starter"
    allocation_mode: AllocationMode = m.AllocationMode.POOLED


@strawberry.input
class UpdateWorkspaceInput:
    workspace_id: strawberry.ID
    name: str | None = None
    plan_key: str | None = None
    allocation_mode: AllocationMode | None = None
    paid_creator_seats: int | None = None
    pool_fallback: bool | None = strawberry.field(
        default=None, description="PER_SEAT only: may a member spend from the pool when their seat is empty?"
    )
    timezone: str | None = strawberry.field(default=None, description="IANA name: spend-limit days and months.")


@strawberry.input
class AddMemberInput:
    workspace_id: strawberry.ID
    email: str
    role: Role = m.Role.MEMBER
    seat: Seat = m.Seat.STANDARD


@strawberry.input
class ChangeMemberRoleInput:
    member_id: strawberry.ID
    role: Role


@strawberry.input
class ChangeMemberSeatInput:
    member_id: strawberry.ID
    seat: Seat


@strawberry.input
class RemoveMemberInput:
    member_id: strawberry.ID


CreateWorkspaceResult = Annotated[Workspace | ValidationError, strawberry.union("CreateWorkspaceResult")]
UpdateWorkspaceResult = Annotated[
    Workspace | NotFoundError | ValidationError | SeatLimitReached, strawberry.union("UpdateWorkspaceResult")
]
AddMemberResult = Annotated[
    Member | NotFoundError | ValidationError | SeatLimitReached | AlreadyMember, strawberry.union("AddMemberResult")
]
ChangeMemberRoleResult = Annotated[Member | NotFoundError | LastOwner, strawberry.union("ChangeMemberRoleResult")]
ChangeMemberSeatResult = Annotated[Member | NotFoundError | SeatLimitReached, strawberry.union("ChangeMemberSeatResult")]
RemoveMemberResult = Annotated[Member | NotFoundError | LastOwner, strawberry.union("RemoveMemberResult")]


@strawberry.type
class WorkspaceQuery:
    @strawberry.field(description="A workspace by id; null when unknown or not visible to the viewer.")
    async def workspace(self, info: Info[Context, None], id: strawberry.ID) -> Workspace | None:
        caller = await info.context.caller()
        try:
            detail = await workspaces.get_workspace(info.context.db, caller, workspace_id=str(id))
        except NotFound:
            return None
        info.context.loaders[f"workspace:{detail.workspace.id}"] = detail
        return Workspace.from_model(detail.workspace)

    @strawberry.field(description="Plans a workspace can choose.")
    async def plans(self, info: Info[Context, None]) -> list[Plan]:
        await info.context.caller()
        rows = await plans_domain.active_plans(info.context.db)
        return [Plan.from_model(p) for p in rows]


@strawberry.type
class WorkspaceMutation:
    @strawberry.mutation(description="Create a workspace; the caller becomes its owner.")
    async def create_workspace(self, info: Info[Context, None], input: CreateWorkspaceInput) -> CreateWorkspaceResult:
        caller = await info.context.caller()
        call = workspaces.create_workspace(
            info.context.db, caller, name=input.name, plan_key=input.plan_key, allocation_mode=input.allocation_mode
        )
        return await result(call, lambda x: Workspace.from_model(x.workspace))

    @strawberry.mutation(description="Rename, change plan, allocation mode or paid creator seats.")
    async def update_workspace(self, info: Info[Context, None], input: UpdateWorkspaceInput) -> UpdateWorkspaceResult:
        caller = await info.context.caller()
        call = workspaces.update_workspace(
            info.context.db, caller, workspace_id=str(input.workspace_id), hold_ttl=info.context.hold_ttl, name=input.name,
            plan_key=input.plan_key, allocation_mode=input.allocation_mode,
            paid_creator_seats=input.paid_creator_seats, pool_fallback=input.pool_fallback, timezone=input.timezone,
        )
        return await result(call, Workspace.from_model)

    @strawberry.mutation(description="Add a member by email, creating the user if needed.")
    async def add_member(self, info: Info[Context, None], input: AddMemberInput) -> AddMemberResult:
        caller = await info.context.caller()
        call = workspaces.add_member(
            info.context.db, caller, workspace_id=str(input.workspace_id), email=input.email,
            role=input.role, seat=input.seat, hold_ttl=info.context.hold_ttl,
        )
        return await result(call, Member.from_model)

    @strawberry.mutation
    async def change_member_role(self, info: Info[Context, None], input: ChangeMemberRoleInput) -> ChangeMemberRoleResult:
        caller = await info.context.caller()
        call = workspaces.change_member_role(info.context.db, caller, member_id=str(input.member_id), role=input.role)
        return await result(call, Member.from_model)

    @strawberry.mutation
    async def change_member_seat(self, info: Info[Context, None], input: ChangeMemberSeatInput) -> ChangeMemberSeatResult:
        caller = await info.context.caller()
        call = workspaces.change_member_seat(info.context.db, caller, member_id=str(input.member_id), seat=input.seat,
                                             hold_ttl=info.context.hold_ttl)
        return await result(call, Member.from_model)

    @strawberry.mutation
    async def remove_member(self, info: Info[Context, None], input: RemoveMemberInput) -> RemoveMemberResult:
        caller = await info.context.caller()
        call = workspaces.remove_member(info.context.db, caller, member_id=str(input.member_id),
                                        hold_ttl=info.context.hold_ttl)
        return await result(call, Member.from_model)
