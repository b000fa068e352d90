"""After the load: the money checks. The invariant checker (every grant equals the sum of its
entries), no overdraft, holds consistent with the generations that hold them, and the database
agreeing with what the clients were told."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import text

from domain.db import Database
from domain.ledger.invariants import check_ledger

_OVERDRAFT = text("SELECT count(*) FROM grants WHERE remaining < 0 OR held < 0")

# What each generation still holds, from its own entries; compared with the grants' `held`
# figures and with each generation's status and recorded figures.
_HOLDS = text("""
WITH per_gen AS (
    SELECT generation_id,
        sum(CASE kind WHEN 'HOLD' THEN amount WHEN 'RELEASE' THEN -amount WHEN 'CAPTURE' THEN -amount ELSE 0 END)
            AS still_held,
        coalesce(sum(amount) FILTER (WHERE kind = 'CAPTURE'), 0) AS captured,
        coalesce(sum(amount) FILTER (WHERE kind = 'RELEASE'), 0) AS released
    FROM ledger_entries WHERE generation_id IS NOT NULL GROUP BY generation_id
)
SELECT
    (SELECT coalesce(sum(held), 0) FROM grants) AS grants_held,
    (SELECT coalesce(sum(still_held), 0) FROM per_gen) AS entries_held,
    (SELECT count(*) FROM per_gen p JOIN generations g ON g.id = p.generation_id
        WHERE g.status <> 'STARTED' AND p.still_held <> 0) AS settled_still_holding,
    (SELECT count(*) FROM generations g LEFT JOIN per_gen p ON p.generation_id = g.id
        WHERE g.status = 'STARTED' AND coalesce(p.still_held, 0) <> g.quoted_units) AS started_not_holding_quote,
    (SELECT count(*) FROM generations g LEFT JOIN per_gen p ON p.generation_id = g.id
        WHERE g.status <> 'STARTED' AND (g.captured_units <> coalesce(p.captured, 0)
                                         OR g.released_units <> coalesce(p.released, 0))) AS figures_not_entries,
    (SELECT count(*) FROM generations g WHERE g.status = 'STARTED') AS open_generations
""")

_BY_STATUS = text("""
SELECT status, count(*) FROM generations WHERE workspace_id = ANY(CAST(:ws AS uuid[])) GROUP BY status
""")


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


async def money_checks(db: Database, expected: dict[str, tuple[list[str], int, int]]) -> CheckResult:
    """`expected`: per scenario, (its workspace ids, successful starts, successful completions)
    as the clients counted them over the whole run."""
    out = CheckResult()
    violations = await check_ledger(db)
    out.facts["invariant_violations"] = len(violations)
    for v in violations[:20]:
        out.problems.append(f"invariant: grant {v.grant_id}: {v.detail}")
    if len(violations) > 20:
        out.problems.append(f"invariant: ... and {len(violations) - 20} more")

    async def read(session):
        overdrawn = (await session.execute(_OVERDRAFT)).scalar_one()
        holds = (await session.execute(_HOLDS)).one()._asdict()
        statuses = {}
        for name, (ws_ids, _, _) in expected.items():
            rows = await session.execute(_BY_STATUS, {"ws": [uuid.UUID(w) for w in ws_ids]})
            statuses[name] = {status: n for status, n in rows}
        return overdrawn, holds, statuses

    overdrawn, holds, statuses = await db.read(read)
    out.facts["overdrawn_grants"] = overdrawn
    out.facts.update(holds)
    if overdrawn:
        out.problems.append(f"overdraft: {overdrawn} grant(s) with remaining < 0 or held < 0")
    if holds["grants_held"] != holds["entries_held"]:
        out.problems.append(f"holds: grants hold {holds['grants_held']} units, generations' entries "
                            f"{holds['entries_held']}")
    for name in ("settled_still_holding", "started_not_holding_quote", "figures_not_entries"):
        if holds[name]:
            out.problems.append(f"holds: {holds[name]} generation(s) {name.replace('_', ' ')}")
    for name, (_, starts, completes) in expected.items():
        s = statuses[name]
        out.facts[f"{name}_generations"] = s
        in_db = sum(s.values())
        if in_db != starts:
            out.problems.append(f"{name}: clients saw {starts} generations start, the database has {in_db}")
        if s.get("COMPLETED", 0) != completes:
            out.problems.append(f"{name}: clients saw {completes} completions, the database has "
                                f"{s.get('COMPLETED', 0)}")
    return out
