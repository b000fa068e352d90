"""Stored notifications for people (overage requested, overage decided, ...). Live delivery
goes through workspace events."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller
from domain.db import Database
from domain.governance.models import Notification
from domain.workspaces.models import Member, Role


def notify(session: AsyncSession, workspace_id: uuid.UUID, user_ids: set[uuid.UUID], kind: str, **payload: Any) -> None:
    for user_id in sorted(user_ids):
        session.add(Notification(workspace_id=workspace_id, user_id=user_id, kind=kind, payload=payload))


async def approvers(session: AsyncSession, workspace_id: uuid.UUID) -> set[uuid.UUID]:
    """Active owners and admins (who may approve overages under the default policy)."""
    rows = await session.execute(
        select(Member.user_id).where(Member.workspace_id == workspace_id, Member.removed_at.is_(None),
                                     Member.role.in_([Role.OWNER, Role.ADMIN]))
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
