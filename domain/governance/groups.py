"""Billing groups: named parts of a workspace (a campaign, a client). Reserving credits for a
group and releasing them is `domain.ledger.service.transfer_credits` (pool <-> group)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain import events
from domain.access import Caller, authorize, authorized_row, parse_id
from domain.db import Database
from domain.errors import NotFound, ValidationFailed
from domain.governance import audit
from domain.identity import clean_name
from domain.workspaces.models import BillingGroup, Member
from policies import Action


async def group_in(session: AsyncSession, ws_id, group_id: str, *, field: str = "billingGroupId",
                   live: bool = False):
    """The id of a billing group of this workspace (NotFound otherwise, like any unknown id);
    with `live`, an archived group is refused.

    `live` is asked by what puts something into the group (a reservation, a member), and an
    unlocked read would let it race `archive_group`: read "not archived", the archive commits,
    and credits land in an archived group. So the group row is read FOR SHARE, kept to the end
    of the transaction: an archive in flight (FOR UPDATE) is waited for and then seen, and an
    archive that comes later waits for what is being put in (archived groups keep what they
    hold). FOR SHARE, not KEY SHARE: it conflicts with any UPDATE of the row, whatever lock the
    archive takes. Callers take it after the workspace row and before any grant row.

    The group is first read without a lock and checked to be this workspace's: a group of
    another workspace (an id the caller has no business with) is NotFound at once, exactly like
    an unknown id, and never queued on while that workspace renames or archives it."""
    gid = parse_id(group_id, "billing group")
    group = await session.get(BillingGroup, gid)
    if group is None or group.workspace_id != ws_id:
        raise NotFound("billing group")
    if live:
        # A row's workspace never changes: what is read again under the lock is its archive.
        group = await session.get(BillingGroup, gid, with_for_update={"read": True}, populate_existing=True)
        if group.archived_at is not None:
            raise ValidationFailed(field, "the group is archived")
    return group.id


async def create_group(db: Database, caller: Caller, *, workspace_id: str, name: str) -> BillingGroup:
    ws_id = parse_id(workspace_id, "workspace")
    name = clean_name(name)

    async def work(session: AsyncSession) -> BillingGroup:
        await authorize(session, caller, ws_id, Action.MANAGE_BILLING_GROUPS, what="workspace")
        group = BillingGroup(workspace_id=ws_id, name=name)
        session.add(group)
        await session.flush()
        await session.refresh(group)
        audit.record(session, ws_id, caller.actor.user_id, "group.created", "billing_group", group.id,
                     after={"name": name}, at=caller.clock.now())
        return group

    return await db.transaction(work)


async def _locked(session: AsyncSession, caller: Caller, group_id: str) -> BillingGroup:
    """The group, authorized against its own workspace, then locked FOR UPDATE and read again
    (`authorized_row`): an outsider with a foreign id hears NotFound at once and never queues
    behind (or holds up) the reservations and assignments in flight on it."""
    group, _ = await authorized_row(session, caller, BillingGroup, parse_id(group_id, "billing group"),
                                    Action.MANAGE_BILLING_GROUPS, what="billing group")
    return group


async def rename_group(db: Database, caller: Caller, *, group_id: str, name: str) -> BillingGroup:
    name = clean_name(name)

    async def work(session: AsyncSession) -> BillingGroup:
        group = await _locked(session, caller, group_id)
        before = {"name": group.name}
        group.name = name
        audit.record(session, group.workspace_id, caller.actor.user_id, "group.renamed", "billing_group", group.id,
                     before=before, after={"name": name}, at=caller.clock.now())
        await session.flush()
        return group

    return await db.transaction(work)


async def archive_group(db: Database, caller: Caller, *, group_id: str) -> BillingGroup:
    """Archived groups take no new reservations or members; what is reserved stays spendable by
    its members until an admin releases it back to the pool. The group row is taken FOR UPDATE
    (`_locked`), which waits for reservations and assignments in flight (they hold it FOR SHARE,
    `group_in`) and makes those that come later wait and see it archived."""

    async def work(session: AsyncSession) -> BillingGroup:
        group = await _locked(session, caller, group_id)
        if group.archived_at is None:
            group.archived_at = caller.clock.now()
            audit.record(session, group.workspace_id, caller.actor.user_id, "group.archived", "billing_group",
                         group.id, at=group.archived_at)
        await session.flush()
        return group

    return await db.transaction(work)


async def assign_member(db: Database, caller: Caller, *, member_id: str, group_id: str | None) -> Member:
    """Put a member in a group (or none): their spend then draws that group's grants first."""

    async def work(session: AsyncSession) -> Member:
        # The member row FOR UPDATE, which waits for the spends in flight (their KEY SHARE lock,
        # from the foreign keys to the member): taken only once the caller is authorized
        # (`authorized_row`), so an outsider with a foreign id hears NotFound at once and never
        # queues there, where the member's next starts would queue behind them.
        member, _ = await authorized_row(session, caller, Member, parse_id(member_id, "member"),
                                         Action.MANAGE_BILLING_GROUPS, what="member",
                                         gone=lambda member: member.removed_at is not None)
        group = await group_in(session, member.workspace_id, group_id, field="groupId", live=True) \
            if group_id is not None else None
        before = {"group": member.billing_group_id}
        member.billing_group_id = group
        audit.record(session, member.workspace_id, caller.actor.user_id, "member.group_changed", "member", member.id,
                     before=before, after={"group": member.billing_group_id}, at=caller.clock.now())
        if before["group"] != group:
            # The member now draws the group's grants first: what they may spend changed, so
            # balance subscribers re-read (and re-read their membership, told by MEMBER_CHANGED).
            events.emit(session, member.workspace_id, events.MEMBER_CHANGED, memberId=str(member.id),
                        change="GROUP_CHANGED", role=member.role.value, seat=member.seat.value,
                        billingGroupId=str(group) if group else None)
            events.emit(session, member.workspace_id, events.BALANCE_CHANGED)
            # Their requests on the old group's limit no longer concern their spend.
            from domain.governance.overages import lapse_requests_outside  # limits, which overages imports, imports this module

            await lapse_requests_outside(session, member, caller.clock.now())
        await session.flush()
        from domain.workspaces.service import _with_user

        return await _with_user(session, member)

    return await db.transaction(work)


async def list_groups(db: Database, caller: Caller, *, workspace_id: str) -> list[BillingGroup]:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> list[BillingGroup]:
        await authorize(session, caller, ws_id, Action.VIEW_WORKSPACE, what="workspace")
        return list((await session.execute(
            select(BillingGroup).where(BillingGroup.workspace_id == ws_id).order_by(BillingGroup.created_at)
        )).scalars())

    return await db.read(work)
