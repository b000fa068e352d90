"""Review probes for the arithmetic of spend limits: a limit's usage in a period equals what the
generations charged to it hold or captured, after every kind of settlement, and approvals
raise a limit only while they last."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import asyncpg

from domain.db import as_sql
from domain.periods.service import tick
from tests.conftest import asyncpg_dsn
from tests.test_api_governance import LIMITS, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import COMPLETE, FAIL, assert_ledger_clean, grant, key, make_team

LIMITS_FULL = "query($ws: ID!) { spendLimits(workspaceId: $ws) { id scope period used allowance periodEnd } }"
DECIDE_UNTIL = """
mutation($id: ID!, $amount: String, $until: DateTime) {
  decideOverage(input: {requestId: $id, approve: true, amount: $amount, expiresAt: $until}) {
    __typename ... on OverageRequest { status approved approvalExpiresAt } ... on Error { code message }
  }
}"""

# For every (limit, period) usage row of the workspace: what it says, and what the generations
# charged to it hold (still STARTED) or kept (captured, the extra above a hold included).
_DRIFT = """
WITH owed AS (
    SELECT (c->>'limit')::uuid AS limit_id, (c->>'period')::timestamptz AS period_start,
           sum(CASE WHEN g.status = 'STARTED' THEN g.quoted_units ELSE g.captured_units END) AS units
    FROM generations g CROSS JOIN LATERAL jsonb_array_elements(g.limit_charges) c
    WHERE g.workspace_id = $1 GROUP BY 1, 2)
SELECT u.limit_id, u.period_start, u.used_units, coalesce(o.units, 0) AS owed
FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id
LEFT JOIN owed o ON o.limit_id = u.limit_id AND o.period_start = u.period_start
WHERE l.workspace_id = $1 AND u.used_units <> coalesce(o.units, 0)
"""


async def usage_drift(db, ws: str) -> list:
    return [dict(r) for r in await db.read(lambda s: as_sql(s).fetch(_DRIFT, uuid.UUID(ws)))]


async def test_usage_follows_every_kind_of_settlement_made_in_a_later_period(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="100", action="BLOCK", member=member)
        await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="MONTH", amount="500", action="BLOCK")
        ends = {l["period"]: datetime.fromisoformat(l["periodEnd"])
                for l in (await api(LIMITS_FULL, ws=team.ws))["spendLimits"]}
        day_end = ends["DAY"]
    gens = [await start(client, token, team.ws) for _ in range(6)]  # 10 held each
    assert {g["__typename"] for g in gens} == {"Generation"}
    below, above, technical, policy, replayed, left = gens
    started_at = live_server.clock.now()
    try:
        live_server.clock.offset = day_end - started_at + timedelta(minutes=5)  # the next day
        async with client(team.worker) as api:
            assert (await api(COMPLETE, g=below["id"], key=key(), cost="4"))["completeGeneration"]["captured"] == "4.000"
            assert (await api(COMPLETE, g=above["id"], key=key(), cost="15"))["completeGeneration"]["captured"] == "15.000"
            assert (await api(FAIL, g=technical["id"], key=key(), kind="TECHNICAL"))["failGeneration"]["captured"] == "0.000"
            assert (await api(FAIL, g=policy["id"], key=key(), kind="POLICY_VIOLATION"))["failGeneration"]["captured"] == "1.000"
            k = key()
            for _ in range(3):  # a replay moves nothing, counts nothing
                assert (await api(COMPLETE, g=replayed["id"], key=k, cost="7"))["completeGeneration"]["captured"] == "7.000"
        # `left` times out: an hour after its start, which is later than the settlements above
        # when the test runs in the last hour of a day.
        live_server.clock.offset = max(live_server.clock.offset, timedelta(hours=1, minutes=5))
        await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
        status = await db.read(lambda s: as_sql(s).fetchval("SELECT status FROM generations WHERE id = $1",
                                                            uuid.UUID(left["id"])))
        assert status == "TIMED_OUT"
        assert await usage_drift(db, team.ws) == []
        async with client(team.owner) as api:
            used = {l["period"]: l["used"] for l in (await api(LIMITS_FULL, ws=team.ws))["spendLimits"]}
        # The day that started them counted 4 + 15 + 0 + 1 + 7 + 0; the new day nothing yet. The
        # month counted the same, unless that day was its last (a new month has nothing yet).
        assert used["DAY"] == "0.000"
        assert used["MONTH"] == ("0.000" if ends["MONTH"] <= day_end else "27.000")
    finally:
        live_server.clock.offset = timedelta(0)
    await assert_ledger_clean(db, team.ws)


async def test_a_shortfall_above_the_hold_counts_only_what_was_drawn(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "25")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="100", action="BLOCK", member=member)
    gen = await start(client, token, team.ws)
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost="60"))["completeGeneration"]
    assert (done["captured"], done["shortfall"]) == ("25.000", "35.000")
    async with client(team.owner) as api:
        assert (await api(LIMITS, ws=team.ws))["spendLimits"][0]["used"] == "25.000"
    assert await usage_drift(db, team.ws) == []


async def test_an_approval_that_expires_mid_period_stops_raising_the_limit_then(db, live_server, client):
    team, token, member = await member_at_an_approval_limit(db, client)
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="deadline"))["requestOverage"]
    until = live_server.clock.now() + timedelta(minutes=30)
    async with client(team.owner) as api:
        ok = (await api(DECIDE_UNTIL, id=req["id"], amount="20", until=until.isoformat()))["decideOverage"]
    assert (ok["status"], datetime.fromisoformat(ok["approvalExpiresAt"])) == ("APPROVED", until)
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 30 of 40
    try:
        live_server.clock.offset = until - live_server.clock.now() + timedelta(seconds=1)
        async with client(team.owner) as api:
            [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
        assert (limit["used"], limit["allowance"]) == ("30.000", "20.000")
        refused = await start(client, token, team.ws)
        assert (refused["__typename"], refused["limit"], refused["used"]) == ("SpendLimitExceeded", "20.000", "30.000")
    finally:
        live_server.clock.offset = timedelta(0)


async def test_concurrent_starts_and_settlements_under_member_and_workspace_limits(db, client):
    team = await make_team(db, client, creators=3)
    await grant(client, team, "10000")
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="DAY", amount="95", action="BLOCK")
        for _, member in team.creators[:2]:
            await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="DAY", amount="40", action="BLOCK", member=member)
    first = [await start(client, token, team.ws) for token, _ in team.creators]  # 30 used
    assert {g["__typename"] for g in first} == {"Generation"}

    async def settle(gen, i):
        async with client(team.worker) as api:
            if i % 2:
                return (await api(COMPLETE, g=gen["id"], key=key(), cost="1"))["completeGeneration"]
            return (await api(FAIL, g=gen["id"], key=key(), kind="POLICY_VIOLATION"))["failGeneration"]

    results = await asyncio.gather(
        *(start(client, team.creators[i % 3][0], team.ws) for i in range(24)),
        *(settle(g, i) for i, g in enumerate(first)))
    kinds = {r["__typename"] for r in results}
    assert kinds <= {"Generation", "SpendLimitExceeded"}, results
    assert await usage_drift(db, team.ws) == []
    async with client(team.owner) as api:
        used = {l["scope"]: l["used"] for l in (await api(LIMITS_FULL, ws=team.ws))["spendLimits"]
                if l["scope"] == "WORKSPACE"}
    assert float(used["WORKSPACE"]) <= 95
    await assert_ledger_clean(db, team.ws)


async def test_a_limit_lowered_while_a_start_waits_for_the_usage_row_binds_that_start(db, database_url, client):
    # A start under a member's limit of 100 waits for the period's usage row, held by another
    # charge in flight; meanwhile an admin lowers the limit to 15 and is told it is saved. The
    # start, admitted only after that, must be checked against 15 (10 used + 10 would pass it),
    # not against the 100 it read before it queued. (Whichever way the two are ordered, a change
    # answered before the start was admitted binds it.)
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        set_ = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="100", action="BLOCK",
                          member=member))["setSpendLimit"]
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 10 used; the usage row exists
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    watcher = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tx = conn.transaction()
        await tx.start()
        assert await conn.fetchval("SELECT count(*) FROM (SELECT 1 FROM limit_usage WHERE limit_id = $1 FOR UPDATE) l",
                                   uuid.UUID(set_["id"])) == 1
        waiting = asyncio.ensure_future(start(client, token, team.ws))
        async with asyncio.timeout(10):
            while not await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                                             conn.get_server_pid()):
                await asyncio.sleep(0.02)

        async def lower():
            async with client(team.owner) as api:
                return (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="15", action="BLOCK",
                                  member=member))["setSpendLimit"]

        lowering = asyncio.ensure_future(lower())
        answered_first = (await asyncio.wait({lowering}, timeout=2))[0] == {lowering}
        await tx.rollback()
        started, lowered = await asyncio.gather(waiting, lowering)
    finally:
        await conn.close()
        await watcher.close()
    assert (lowered["__typename"], lowered["amount"]) == ("SpendLimit", "15.000")
    if answered_first:
        assert started["__typename"] == "SpendLimitExceeded", started
        assert (started["limit"], started["used"]) == ("15.000", "10.000")
    async with client(team.owner) as api:
        [limit] = (await api(LIMITS, ws=team.ws))["spendLimits"]
    assert limit["used"] == ("10.000" if answered_first else "20.000")
    assert await usage_drift(db, team.ws) == []


async def member_at_an_approval_limit(db, client):
    """A new team (1,000 credits) whose creator has a monthly REQUIRE_APPROVAL limit of 20, used up
    by two 10-credit starts: (team, the creator's token, their member id)."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action="REQUIRE_APPROVAL",
                  member=member)
    assert [(await start(client, token, team.ws))["__typename"] for _ in range(2)] == ["Generation"] * 2
    return team, token, member
