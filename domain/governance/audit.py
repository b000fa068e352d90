"""The audit log: every governance change, who made it, before and after. Append-only."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, authorize, parse_id
from domain.db import Database
from domain.governance.models import AuditEntry
from domain.pages import Page, decode_id_cursor, encode_cursor, page_size, parse_filter_id
from policies import Action


def record(
    session: AsyncSession, workspace_id: uuid.UUID, actor_id: uuid.UUID | None, action: str, target_type: str,
    target_id: Any, *, before: dict[str, Any] | None = None, after: dict[str, Any] | None = None,
    at: datetime,
) -> None:
    session.add(AuditEntry(
        workspace_id=workspace_id, actor_id=actor_id, action=action, target_type=target_type,
        target_id=str(target_id) if target_id is not None else None, before=_json(before), after=_json(after),
        occurred_at=at,
    ))


def _json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Plain JSON: ids and enums as strings, times as ISO 8601."""
    if value is None:
        return None
    return json.loads(json.dumps(value, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o)))


async def audit_page(
    db: Database, caller: Caller, *, workspace_id: str, first: int = 50, after: str | None = None,
    action: str | None = None, actor_id: str | None = None, since: datetime | None = None,
    until: datetime | None = None,
) -> Page:
    """Newest first; filter by action (prefix match: "member." lists every member change), actor, time."""
    ws_id = parse_id(workspace_id, "workspace")
    size = page_size(first)
    after_id = decode_id_cursor(after, "audit")
    actor = parse_filter_id(actor_id, "actorId")

    async def work(session: AsyncSession) -> Page:
        await authorize(session, caller, ws_id, Action.VIEW_AUDIT_LOG, what="workspace")
        conds = [AuditEntry.workspace_id == ws_id]
        if after_id is not None:
            conds.append(AuditEntry.id < after_id)
        if action:
            conds.append(AuditEntry.action.startswith(action, autoescape=True))
        if actor is not None:
            conds.append(AuditEntry.actor_id == actor)
        if since:
            conds.append(AuditEntry.occurred_at >= since)
        if until:
            conds.append(AuditEntry.occurred_at < until)
        rows = list((await session.execute(
            select(AuditEntry).where(and_(*conds)).order_by(AuditEntry.id.desc()).limit(size + 1)
        )).scalars())
        return Page(rows[:size], [encode_cursor("audit", str(e.id)) for e in rows[:size]], len(rows) > size)

    return await db.read(work)
