"""Review of the ledger's money paths outside the generation hot path: purchases, operator
grants, transfers, the period close and rollover, expiry sweeps, hold timeouts, idempotency and
the invariant checker. Each test here first demonstrated a real bug (since fixed)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from domain.ledger.consumption import Draw, plan_draws
from domain.ledger.service import _bucket
from tests.test_periods import (  # noqa: F401 - the periods database and its clock reset
    balance,
    clean,
    month,
    plan,
    real_time,
    schedule,
    spend,
    workspace,
    world,
)


# --- rollover credits and the allowance they roll into ------------------------------------------

def _grant_row(source: str, grant_id: uuid.UUID, boundary: datetime, expires: datetime) -> dict:
    """A grants row as the spend paths read it (only the columns the consumption order reads)."""
    return {"id": grant_id, "scope": "WORKSPACE", "priority": 100, "effective_at": boundary, "expires_at": expires,
            "created_at": boundary, "remaining": 100_000, "source": source}


def test_rolled_over_credits_are_spent_before_the_allowance_issued_with_them_whatever_their_ids():
    """A period close issues the rollover and the next allowance in one transaction: same scope,
    priority and creation time, and with a one-period rollover the same expiry. The grant id
    decided which paid first, a coin flip per workspace; the rolled-over credits are the older
    ones and cannot roll over again, so they pay first."""
    boundary = datetime(2026, 3, 1, tzinfo=UTC)
    expires = datetime(2026, 4, 1, tzinfo=UTC)
    low, high = sorted((uuid.uuid4(), uuid.uuid4()))
    for allowance_id, rollover_id in ((low, high), (high, low)):
        allowance = _bucket(_grant_row("PLAN_ALLOWANCE", allowance_id, boundary, expires))
        rollover = _bucket(_grant_row("ROLLOVER", rollover_id, boundary, expires))
        assert plan_draws([allowance, rollover], 150_000, boundary + timedelta(days=1)) == [
            Draw(rollover_id, 100_000), Draw(allowance_id, 50_000)]


async def test_two_identical_workspaces_lose_the_same_credits_at_the_close_after_a_rollover(world):
    """End to end: cap 50, one-period rollover. After the first close each workspace holds a
    rollover of 50 and a new allowance of 100, both expiring at the next boundary; spending 100
    must use the 50 rolled over first, so 50 of the allowance roll over again and nothing is
    lost. Before, about half the workspaces spent the allowance first and lost the 50 rolled
    over (the schedule showed it: 50 expire, nothing rolls over)."""
    key_ = await plan(world, includedCredits="100", rolloverPolicy="ROLLOVER", rolloverCapCredits="50",
                      rolloverPeriods=1)
    spaces = [await workspace(world, key_) for _ in range(6)]
    await world.tick(month(1))
    for owner, ws in spaces:
        await spend(world, owner, ws, "100")
        b = await balance(world, owner, ws)
        assert sorted((g["source"], g["remaining"]) for g in b["grants"]) == [("PLAN_ALLOWANCE", "50.000")]
        outlook = (await schedule(world, owner, ws))["atNextRenewal"]
        assert [(o["grant"]["source"], o["rollsOver"], o["expires"]) for o in outlook] == [
            ("PLAN_ALLOWANCE", "50.000", "0.000")]
        await clean(world, ws)
