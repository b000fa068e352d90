"""The invariant checker (money rule 1), for tests and operators.

For every grant: amount = remaining + held + captured + expired + transferred_out, and each
figure equals what that grant's own ledger entries add up to. And what a grant passed on (a
transfer to a seat, a group or the pool, a period close's rollover) is exactly what the grants it
passed to were created with, in its own workspace: a transfer moves credits, it never makes or
loses any. Plain SQL statements, so they can run against a live database; the violations are
returned instead of raised, so a caller can report them all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from domain.db import Database
from domain.errors import NotFound
from domain.workspaces.models import Workspace

_CHECK = text("""
WITH sums AS (
    SELECT grant_id,
        coalesce(sum(amount) FILTER (WHERE kind = 'GRANT'), 0) AS granted,
        coalesce(sum(CASE kind WHEN 'GRANT' THEN amount WHEN 'HOLD' THEN -amount WHEN 'RELEASE' THEN amount
                               WHEN 'EXPIRE' THEN -amount WHEN 'TRANSFER_OUT' THEN -amount ELSE 0 END), 0) AS remaining,
        coalesce(sum(CASE kind WHEN 'HOLD' THEN amount WHEN 'RELEASE' THEN -amount
                               WHEN 'CAPTURE' THEN -amount ELSE 0 END), 0) AS held,
        coalesce(sum(amount) FILTER (WHERE kind = 'CAPTURE'), 0) AS captured,
        coalesce(sum(amount) FILTER (WHERE kind = 'EXPIRE'), 0) AS expired,
        coalesce(sum(amount) FILTER (WHERE kind = 'TRANSFER_OUT'), 0) AS transferred_out
    FROM ledger_entries
    WHERE (CAST(:ws AS uuid) IS NULL OR workspace_id = CAST(:ws AS uuid))
    GROUP BY grant_id
)
SELECT g.id, g.amount, g.remaining, g.held, g.captured, g.expired, g.transferred_out,
       s.granted, s.remaining AS e_remaining, s.held AS e_held, s.captured AS e_captured,
       s.expired AS e_expired, s.transferred_out AS e_transferred_out
FROM grants g LEFT JOIN sums s ON s.grant_id = g.id
WHERE (CAST(:ws AS uuid) IS NULL OR g.workspace_id = CAST(:ws AS uuid))
  AND (g.amount <> g.remaining + g.held + g.captured + g.expired + g.transferred_out
       OR s.grant_id IS NULL
       OR g.amount <> s.granted OR g.remaining <> s.remaining OR g.held <> s.held
       OR g.captured <> s.captured OR g.expired <> s.expired OR g.transferred_out <> s.transferred_out
       OR g.remaining < 0 OR g.held < 0)
""")

_ORPHANS = text("""
SELECT count(*) FROM ledger_entries e LEFT JOIN grants g ON g.id = e.grant_id
WHERE (CAST(:ws AS uuid) IS NULL OR e.workspace_id = CAST(:ws AS uuid))
  AND (g.id IS NULL OR g.workspace_id <> e.workspace_id)
""")


# Every grant with a parent was created by a TRANSFER_OUT of that parent, of its whole amount
# (`ledger.service.transfer_credits`, `periods.service.close_period`).
_PASSED_ON = text("""
SELECT p.id, p.transferred_out, coalesce(sum(c.amount), 0)::bigint AS passed_on,
       count(*) FILTER (WHERE c.workspace_id <> p.workspace_id) AS elsewhere
FROM grants p LEFT JOIN grants c ON c.parent_grant_id = p.id
WHERE (CAST(:ws AS uuid) IS NULL OR p.workspace_id = CAST(:ws AS uuid))
GROUP BY p.id, p.transferred_out
HAVING p.transferred_out <> coalesce(sum(c.amount), 0) OR count(*) FILTER (WHERE c.workspace_id <> p.workspace_id) > 0
""")


@dataclass(frozen=True, slots=True)
class Violation:
    grant_id: uuid.UUID | None
    detail: str


async def find_violations(session: AsyncSession, workspace_id: uuid.UUID | None = None) -> list[Violation]:
    out = []
    for r in await session.execute(_CHECK, {"ws": workspace_id}):
        out.append(Violation(r.id, (
            f"grant figures amount={r.amount} remaining={r.remaining} held={r.held} captured={r.captured} "
            f"expired={r.expired} transferred_out={r.transferred_out}; from entries granted={r.granted} "
            f"remaining={r.e_remaining} held={r.e_held} captured={r.e_captured} expired={r.e_expired} "
            f"transferred_out={r.e_transferred_out}"
        )))
    for r in await session.execute(_PASSED_ON, {"ws": workspace_id}):
        out.append(Violation(r.id, (
            f"transferred out {r.transferred_out}, but the grants created from it hold {r.passed_on}"
            + (f"; {r.elsewhere} of them in another workspace" if r.elsewhere else ""))))
    orphans = (await session.execute(_ORPHANS, {"ws": workspace_id})).scalar_one()
    if orphans:
        out.append(Violation(None, f"{orphans} ledger entries point at a missing grant or another workspace"))
    return out


async def check_ledger(db: Database, workspace_id: uuid.UUID | None = None) -> list[Violation]:
    """Every violation, in `workspace_id` alone when given; NotFound when it names no workspace
    (nothing checked must never read as a consistent ledger)."""

    async def work(session: AsyncSession) -> list[Violation]:
        if workspace_id is not None and await session.get(Workspace, workspace_id) is None:
            raise NotFound("workspace")
        return await find_violations(session, workspace_id)

    return await db.read(work)
