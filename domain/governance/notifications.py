"""Stored notifications for people (overage requested, overage decided, ...). Live delivery
goes through workspace events."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import and_, false, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller
from domain.db import Database
from domain.governance.models import Notification
from domain.workspaces.models import Member, Role, Seat
from policies import Action, Authorizer


def notify(session: AsyncSession, workspace_id: uuid.UUID, user_ids: set[uuid.UUID], kind: str, **payload: Any) -> None:
    for user_id in sorted(user_ids):
        session.add(Notification(workspace_id=workspace_id, user_id=user_id, kind=kind, payload=payload))


async def approvers(session: AsyncSession, workspace_id: uuid.UUID, authorizer: Authorizer) -> set[uuid.UUID]:
    """The active members who may approve overages here: those whose role and seat the policy
    lets do what `decideOverage` checks (owners and admins under the default policy). The pairs
    come from the policy once per process (`Authorizer.memberships_allowed`), not per member."""
    allowed = authorizer.memberships_allowed(str(workspace_id), Action.APPROVE_OVERAGES)
    holds = or_(false(), *(and_(Member.role == Role(role), Member.seat == Seat(seat))
                           for role, seat in sorted(allowed)))
    rows = await session.execute(
        select(Member.user_id).where(Member.workspace_id == workspace_id, Member.removed_at.is_(None), holds)
    )
    return set(rows.scalars())


async def my_notifications(db: Database, caller: Caller, *, unread_only: bool = False, limit: int = 100) -> list:
    async def work(session: AsyncSession) -> list[Notification]:
        q = select(Notification).where(Notification.user_id == caller.actor.user_id)
        if unread_only:
            q = q.where(Notification.read_at.is_(None))
        return list((await session.execute(q.order_by(Notification.id.desc()).limit(min(limit, 500)))).scalars())

    return await db.read(work)


async def mark_read(db: Database, caller: Caller) -> int:
    async def work(session: AsyncSession) -> int:
        done = await session.execute(
            update(Notification).where(Notification.user_id == caller.actor.user_id, Notification.read_at.is_(None))
            .values(read_at=caller.clock.now())
        )
        return done.rowcount

    return await db.transaction(work)
