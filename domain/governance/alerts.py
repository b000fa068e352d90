"""Alerts: a condition fires once per crossing (one open alert per workspace, kind and subject,
enforced by a partial unique index) and resolves when the condition clears. Stored, listable,
acknowledgeable; live through workspace events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from domain import events
from domain.access import Caller, authorize, authorized_row, parse_id
from domain.db import Database
from domain.governance.models import Alert, AlertStatus
from policies import Action

LOW_BALANCE = "LOW_BALANCE"
LIMIT_80 = "LIMIT_80"
LIMIT_100 = "LIMIT_100"
GRANT_EXPIRING = "GRANT_EXPIRING"
TOPUP_DONE = "TOPUP_DONE"
TOPUP_FAILED = "TOPUP_FAILED"
TOPUP_DISABLED = "TOPUP_DISABLED"
TOPUP_CAP_REACHED = "TOPUP_CAP_REACHED"
OVERAGE_REQUESTED = "OVERAGE_REQUESTED"
OVERAGE_DECIDED = "OVERAGE_DECIDED"


async def fire(session: AsyncSession, ws_id: uuid.UUID, kind: str, subject: str, now: datetime, *,
               refresh: bool = False, **payload: Any) -> bool:
    """Open an alert unless the same condition is already open. True when it fired now.

    With `refresh`, an alert already open takes the new payload (sent as an OPEN event again):
    for a condition whose details move while it holds (auto top-up's failures in a row), where
    the first ones would soon be wrong. Others keep what they fired with: a low balance's
    figures at every spend would be noise."""
    done = await session.execute(
        insert(Alert).values(id=uuid.uuid4(), workspace_id=ws_id, kind=kind, subject=subject, status=AlertStatus.OPEN,
                             payload=payload, opened_at=now)
        .on_conflict_do_nothing(index_elements=["workspace_id", "kind", "subject"], index_where=text("status = 'OPEN'"))
        .returning(Alert.id)
    )
    fired = done.first() is not None
    if not fired and refresh:
        refreshed = await session.execute(
            update(Alert).where(Alert.workspace_id == ws_id, Alert.kind == kind, Alert.subject == subject,
                                Alert.status == AlertStatus.OPEN, Alert.payload != payload)
            .values(payload=payload))
        if not refreshed.rowcount:
            return False
    if fired or refresh:
        events.emit(session, ws_id, events.ALERT, alert=kind, subject=subject, state="OPEN", **payload)
    return fired


async def resolve(session: AsyncSession, ws_id: uuid.UUID, kind: str, now: datetime, subject: str | None = None) -> int:
    q = update(Alert).where(Alert.workspace_id == ws_id, Alert.kind == kind, Alert.status == AlertStatus.OPEN)
    if subject is not None:
        q = q.where(Alert.subject == subject)
    done = await session.execute(q.values(status=AlertStatus.RESOLVED, resolved_at=now))
    if done.rowcount:
        events.emit(session, ws_id, events.ALERT, alert=kind, subject=subject, state="RESOLVED")
    return done.rowcount


def note(session: AsyncSession, ws_id: uuid.UUID, kind: str, subject: str, now: datetime, **payload: Any) -> None:
    """A one-off alert (something happened, e.g. a top-up was bought): stored already resolved."""
    session.add(Alert(workspace_id=ws_id, kind=kind, subject=subject, status=AlertStatus.RESOLVED, payload=payload,
                      opened_at=now, resolved_at=now))
    events.emit(session, ws_id, events.ALERT, alert=kind, subject=subject, state="RESOLVED", **payload)


async def list_alerts(db: Database, caller: Caller, *, workspace_id: str, status: AlertStatus | None = None,
                      limit: int = 100) -> list[Alert]:
    ws_id = parse_id(workspace_id, "workspace")

    async def work(session: AsyncSession) -> list[Alert]:
        await authorize(session, caller, ws_id, Action.VIEW_LEDGER, what="workspace")
        q = select(Alert).where(Alert.workspace_id == ws_id)
        if status is not None:
            q = q.where(Alert.status == status)
        return list((await session.execute(q.order_by(Alert.opened_at.desc()).limit(min(limit, 500)))).scalars())

    return await db.read(work)


async def acknowledge(db: Database, caller: Caller, *, alert_id: str) -> Alert:
    aid = parse_id(alert_id, "alert")

    async def work(session: AsyncSession) -> Alert:
        # Locked once authorized (an outsider never waits on it) and read again: of two
        # acknowledgements, the first one's time and person stay.
        alert, _ = await authorized_row(session, caller, Alert, aid, Action.VIEW_LEDGER, what="alert")
        if alert.acknowledged_at is None:
            alert.acknowledged_at, alert.acknowledged_by = caller.clock.now(), caller.actor.user_id
        await session.flush()
        return alert

    return await db.transaction(work)
