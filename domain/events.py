"""Workspace events: what changed, raised inside the transaction that changed it and delivered
only if that transaction commits.

Services call `emit(session, ...)`. `Database.transaction` hands the events of a committed
transaction to its `EventOutlet`: with PostgreSQL LISTEN/NOTIFY they are sent by `pg_notify`
inside the transaction itself (PostgreSQL delivers a notification only on commit, and in commit
order), otherwise they are published right after the commit (in-process or Redis).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from policies import Action


# Kinds. BALANCE_CHANGED is a signal for balance subscribers (they re-read the committed balance);
# the others are the workspace events dashboards show.
BALANCE_CHANGED = "BALANCE_CHANGED"
GENERATION_STARTED = "GENERATION_STARTED"
GENERATION_SETTLED = "GENERATION_SETTLED"
CREDITS_ADDED = "CREDITS_ADDED"
MEMBER_CHANGED = "MEMBER_CHANGED"
PERIOD_CLOSED = "PERIOD_CLOSED"
CREDITS_EXPIRED = "CREDITS_EXPIRED"
OVERAGE_REQUESTED = "OVERAGE_REQUESTED"
OVERAGE_DECIDED = "OVERAGE_DECIDED"
ALERT = "ALERT"

# Who sees each kind on `workspaceEvents`. A stream must never show what the queries refuse, so
# each kind names the permission under which the query showing the same facts shows all of them,
# and the payload field naming the member who may see their own without it:
# - generations: `generation`/`generations` show everything with ledger.view, else your own;
# - overage requests and decisions (approved, denied or LAPSED, `payload.status`): `overageRequests`
#   shows everything to approvers, else your own;
# - alerts: `alerts` needs ledger.view, and there is no "own" alert;
# - credits added or expired, period closes: `balance` and `creditSchedule` show every live grant
#   and the breakage to anyone with balance.view (the stream's own permission);
# - member changes: `workspace` lists every member with role, seat and group (workspace.view).
# A kind missing here is shown to nobody: a new kind stays private until someone decides.
AUDIENCE: dict[str, tuple[Action, str | None]] = {
    GENERATION_STARTED: (Action.VIEW_LEDGER, "memberId"),
    GENERATION_SETTLED: (Action.VIEW_LEDGER, "memberId"),
    OVERAGE_REQUESTED: (Action.APPROVE_OVERAGES, "memberId"),
    OVERAGE_DECIDED: (Action.APPROVE_OVERAGES, "memberId"),
    ALERT: (Action.VIEW_LEDGER, None),
    CREDITS_ADDED: (Action.VIEW_BALANCE, None),
    CREDITS_EXPIRED: (Action.VIEW_BALANCE, None),
    PERIOD_CLOSED: (Action.VIEW_BALANCE, None),
    MEMBER_CHANGED: (Action.VIEW_WORKSPACE, None),
}


@dataclass(frozen=True, slots=True)
class Event:
    workspace_id: uuid.UUID
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "payload": self.payload, "at": self.at.isoformat()}


def channel(workspace_id: uuid.UUID) -> str:
    """One channel per workspace (a PostgreSQL identifier: at most 63 characters)."""
    return f"cpws_{workspace_id.hex}"


def emit(tx: Any, workspace_id: uuid.UUID, kind: str, **payload: Any) -> None:
    """Raise an event in `tx` (an ORM session or a `domain.db.Sql`: anything with `info`)."""
    tx.info.setdefault("events", []).append(Event(workspace_id, kind, payload))


def visible(event: dict[str, Any], member_id: uuid.UUID | None, allows: Callable[[Action], bool]) -> bool:
    """May a subscriber see `event` (decoded)? `member_id` is their membership in the event's
    workspace (None for none), `allows` answers for their current roles there."""
    audience = AUDIENCE.get(event["kind"])
    if audience is None:
        return False
    action, own = audience
    if allows(action):
        return True
    return own is not None and member_id is not None and event["payload"].get(own) == str(member_id)


def encode(events: list[Event]) -> str:
    return json.dumps([e.as_json() for e in events], default=str, separators=(",", ":"))


# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more ("payload string too long"), and the
# refusal fails the transaction raising the events: a batch of 100 hold timeouts or expiries in
# one workspace would never commit.
NOTIFY_PAYLOAD_BYTES = 7999


def encode_chunks(events: list[Event], limit: int = NOTIFY_PAYLOAD_BYTES) -> list[str]:
    """`events` as few messages as fit `limit` bytes each, in order (each decodes like `encode`'s).
    An event too large on its own still gets a message of its own."""
    out: list[str] = []
    chunk: list[str] = []
    size = 2  # the brackets
    for e in events:
        item = json.dumps(e.as_json(), default=str, separators=(",", ":"))
        grow = len(item.encode()) + (1 if chunk else 0)
        if chunk and size + grow > limit:
            out.append("[" + ",".join(chunk) + "]")
            chunk, size, grow = [], 2, len(item.encode())
        chunk.append(item)
        size += grow
    if chunk:
        out.append("[" + ",".join(chunk) + "]")
    return out


def decode(message: str) -> list[dict[str, Any]]:
    return json.loads(message)


def by_workspace(events: list[Event]) -> dict[uuid.UUID, list[Event]]:
    out: dict[uuid.UUID, list[Event]] = {}
    for e in events:
        out.setdefault(e.workspace_id, []).append(e)
    return out


class EventOutlet(Protocol):
    async def before_commit(self, sql: Any, events: list[Event]) -> None: ...
    async def after_commit(self, events: list[Event]) -> None: ...


class NotifyOutlet:
    """PostgreSQL NOTIFY inside the transaction: delivered on commit, never for a rollback, in the
    order sent (a workspace's events split into as many notifications as its payload limit asks)."""

    async def before_commit(self, sql: Any, events: list[Event]) -> None:
        for ws, batch in by_workspace(events).items():
            for message in encode_chunks(batch):
                await sql.execute("SELECT pg_notify($1, $2)", channel(ws), message)

    async def after_commit(self, events: list[Event]) -> None:
        return None


class PublishOutlet:
    """Publish after the commit through a broadcaster (in-process or Redis)."""

    def __init__(self, publish) -> None:
        self._publish = publish

    async def before_commit(self, sql: Any, events: list[Event]) -> None:
        return None

    async def after_commit(self, events: list[Event]) -> None:
        for ws, batch in by_workspace(events).items():
            await self._publish(channel(ws), encode(batch))


class NoOutlet:
    """For processes without subscribers (the CLI): events are dropped."""

    async def before_commit(self, sql: Any, events: list[Event]) -> None:
        return None

    async def after_commit(self, events: list[Event]) -> None:
        return None
