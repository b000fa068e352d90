"""A spend limit set mid-period counts the spend its period has already seen: what it would have
counted had it existed since the period began (settled generations at what they captured,
running ones at their hold, which it then follows to their settlement). Before, a new limit's
usage started at 0: a member who had spent 90 this month and was then given a monthly limit of
100 could spend 100 more. Each test here failed on the code it was written against."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from tests.conftest import HeldLock
from tests.test_api_governance import DECIDE, REQUEST, SET_LIMIT, start
from tests.test_api_ledger import COMPLETE, FAIL, assert_ledger_clean, grant, key, make_team
from tests.test_hot_path_failures import queued, server_db, until
from domain.db import as_sql

LIMITS = "query($ws: ID!) { spendLimits(workspaceId: $ws) { id scope period used allowance } }"
REMOVE_LIMIT = ('mutation($l: ID!) { removeSpendLimit(input: {limitId: $l}) '
                '{ __typename ... on Error { code message } } }')
CREATE_GROUP = ('mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "Campaign"}) '
                '{ ... on BillingGroup { id } } }')
ASSIGN = ('mutation($m: ID!, $g: ID) { assignBillingGroup(input: {memberId: $m, groupId: $g}) '
          '{ __typename ... on Error { code } } }')


# For every usage row of the workspace's limits: what it says, and what the limit counts by its
# definition: the generations in its scope that started in that period, running ones at their
# hold, settled ones at what they kept. (`test_limits_review.usage_drift` sums the generations
# charged to a limit instead: a new limit also counts the period's settled spend, uncharged.)
_DRIFT = """
SELECT u.limit_id, u.period_start, u.used_units, coalesce((
    SELECT sum(CASE WHEN g.status = 'STARTED' THEN g.quoted_units ELSE g.captured_units END) FROM generations g
    WHERE g.workspace_id = l.workspace_id AND g.started_at >= u.period_start AND g.started_at < u.period_end
      AND (l.scope = 'WORKSPACE' OR (l.scope = 'MEMBER' AND g.member_id = l.member_id)
           OR (l.scope = 'GROUP' AND g.billing_group_id = l.billing_group_id))), 0) AS counts
FROM limit_usage u JOIN spend_limits l ON l.id = u.limit_id
WHERE l.workspace_id = $1 AND l.removed_at IS NULL
"""


async def usage_drift(db, ws: str) -> list:
    rows = await db.read(lambda s: as_sql(s).fetch(_DRIFT, uuid.UUID(ws)))
    return [dict(r) for r in rows if r["used_units"] != r["counts"]]


async def set_limit(client, team, scope: str, period: str, amount: str, **target) -> dict:
    async with client(team.owner) as api:
        out = (await api(SET_LIMIT, ws=team.ws, scope=scope, period=period, amount=amount, action="BLOCK",
                         **target))["setSpendLimit"]
    assert out["__typename"] == "SpendLimit", out
    return out


async def used(client, team) -> dict[str, str]:
    """Each live limit's `used` this period, by limit id."""
    async with client(team.owner) as api:
        return {l["id"]: l["used"] for l in (await api(LIMITS, ws=team.ws))["spendLimits"]}


async def spent(client, team, token: str, cost: str | None = None) -> dict:
    """A generation started (10 credits held) and completed at `cost` (default: the hold)."""
    gen = await start(client, token, team.ws)
    assert gen["__typename"] == "Generation", gen
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost=cost))["completeGeneration"]
    assert done["status"] == "COMPLETED", done
    return done


async def complete(client, team, gen: dict, cost: str) -> dict:
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=gen["id"], key=key(), cost=cost))["completeGeneration"]
    assert (done["status"], done["captured"]) == ("COMPLETED", f"{cost}.000"), done
    return done


async def charges_of(db, gen_id: str) -> list[str]:
    row = await db.fetchrow("SELECT limit_charges FROM generations WHERE id = $1", uuid.UUID(gen_id))
    return [c["limit"] for c in row["limit_charges"]]


async def lock_waiters(db) -> int:
    """Backends of this database waiting on a lock (row locks: a tuple or a transaction)."""
    row = await db.fetchrow("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'")
    return row["n"]


async def until_waiting(db, n: int) -> None:
    async def enough():
        return await lock_waiters(db) >= n
    await until(enough, what=f"{n} statements waiting on row locks")


# --- what a new limit counts -----------------------------------------------------------------

async def test_a_member_limit_set_after_spend_this_period_counts_it(db, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (token, member), (other, _) = team.creators
    for _ in range(9):
        await spent(client, team, token)  # 90 captured
    await spent(client, team, token, "5")  # 95
    await spent(client, team, other)  # another member's spend: not this limit's
    limit = await set_limit(client, team, "MEMBER", "MONTH", "100", member=member)
    assert await used(client, team) == {limit["id"]: "95.000"}
    refused = await start(client, token, team.ws)  # 95 + 10 > 100
    assert (refused["__typename"], refused["used"], refused["limit"]) == ("SpendLimitExceeded", "95.000", "100.000")
    assert (await start(client, other, team.ws))["__typename"] == "Generation"
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_spend_before_the_period_began_does_not_count(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    for _ in range(3):
        await spent(client, team, token)  # 30, today
    yesterday = await start(client, token, team.ws)  # still running tomorrow
    try:
        live_server.clock.offset = timedelta(days=1)  # a later day: today's spend is before its start
        await spent(client, team, token, "7")  # 7, in the new day
        limit = await set_limit(client, team, "MEMBER", "DAY", "25", member=member)
        assert await used(client, team) == {limit["id"]: "7.000"}
        assert await charges_of(db, yesterday["id"]) == []  # its hold counted in another day
        assert (await start(client, token, team.ws))["__typename"] == "Generation"  # 17
        refused = await start(client, token, team.ws)
        assert (refused["__typename"], refused["used"]) == ("SpendLimitExceeded", "17.000")
        await complete(client, team, yesterday, "2")  # moves nothing in this day's usage
        assert await used(client, team) == {limit["id"]: "17.000"}
    finally:
        live_server.clock.offset = timedelta(0)
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_group_and_workspace_limits_count_the_period_spend_in_their_scope(db, client):
    team = await make_team(db, client, creators=3)
    await grant(client, team, "1000")
    (a, a_member), (b, _), (moved, moved_member) = team.creators
    async with client(team.owner) as api:
        group = (await api(CREATE_GROUP, ws=team.ws))["createBillingGroup"]["id"]
        for m in (a_member, moved_member):
            assert (await api(ASSIGN, m=m, g=group))["assignBillingGroup"]["__typename"] == "Member"
    await spent(client, team, a, "8")
    await spent(client, team, moved, "6")  # spent in the group, then moved out: still the group's
    async with client(team.owner) as api:
        assert (await api(ASSIGN, m=moved_member, g=None))["assignBillingGroup"]["__typename"] == "Member"
    await spent(client, team, moved, "3")  # outside the group
    await spent(client, team, b, "9")
    running = await start(client, a, team.ws)  # 10 held, in the group
    group_limit = await set_limit(client, team, "GROUP", "WEEK", "30", group=group)
    ws_limit = await set_limit(client, team, "WORKSPACE", "MONTH", "40")
    assert await used(client, team) == {group_limit["id"]: "24.000", ws_limit["id"]: "36.000"}
    assert await charges_of(db, running["id"]) == [group_limit["id"], ws_limit["id"]]
    refused = await start(client, b, team.ws)  # the workspace: 36 + 10 > 40
    assert (refused["__typename"], refused["used"], refused["limit"]) == ("SpendLimitExceeded", "36.000", "40.000")
    await complete(client, team, running, "1")
    assert await used(client, team) == {group_limit["id"]: "15.000", ws_limit["id"]: "27.000"}
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_a_limit_removed_and_set_again_counts_the_period_spend(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    old = await set_limit(client, team, "MEMBER", "MONTH", "100", member=member)
    await spent(client, team, token)
    await spent(client, team, token, "4")
    async with client(team.owner) as api:
        assert (await api(REMOVE_LIMIT, l=old["id"]))["removeSpendLimit"]["__typename"] == "SpendLimit"
    await spent(client, team, token, "6")  # under no limit
    new = await set_limit(client, team, "MEMBER", "MONTH", "25", member=member)
    assert new["id"] != old["id"]
    assert await used(client, team) == {new["id"]: "20.000"}
    refused = await start(client, token, team.ws)
    assert (refused["__typename"], refused["used"]) == ("SpendLimitExceeded", "20.000")
    assert await usage_drift(db, team.ws) == []


# --- generations running when the limit is set -------------------------------------------------

async def test_a_running_generation_counts_at_its_hold_and_its_settlement_moves_the_new_limit(db, client):
    # No limit when they started: they took the one-statement path and charged nothing. The new
    # limit counts their holds and is charged on them, so that each settlement (now on the
    # transaction path: the one-statement one never adjusts a limit) moves it as it moves any.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    below, failed, above, left = [await start(client, token, team.ws) for _ in range(4)]
    limit = await set_limit(client, team, "MEMBER", "MONTH", "50", member=member)
    assert await used(client, team) == {limit["id"]: "40.000"}
    for gen in (below, failed, above, left):
        assert await charges_of(db, gen["id"]) == [limit["id"]]
    await complete(client, team, below, "4")
    assert await used(client, team) == {limit["id"]: "34.000"}
    async with client(team.worker) as api:
        out = (await api(FAIL, g=failed["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    assert (out["status"], out["captured"]) == ("FAILED", "0.000")
    assert await used(client, team) == {limit["id"]: "24.000"}
    await complete(client, team, above, "15")  # 5 above the hold: counts too
    assert await used(client, team) == {limit["id"]: "29.000"}
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_a_settlement_that_read_before_the_limit_charged_its_generation_falls_back_to_adjust_it(
        db, database_url, client):
    # The one-statement completion read the generation with no charges; the new limit then
    # charged it and committed; the completion's write, queued on the row lock behind the
    # limit's, must not settle it at once (that path never adjusts a limit): it goes to the
    # transaction path, which releases 6 of the limit's 10.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    gen = await start(client, token, team.ws)
    async with HeldLock(database_url, "generations", gen["id"]) as lock:
        setting = asyncio.ensure_future(set_limit(client, team, "MEMBER", "MONTH", "50", member=member))
        await lock.waited_on()  # the limit waits on the generation row first
        completing = asyncio.ensure_future(complete(client, team, gen, "4"))
        await until_waiting(db, 2)  # then the completion's write, behind it
        await lock.commit()
        limit = await setting
        await completing
    assert await charges_of(db, gen["id"]) == [limit["id"]]
    assert await used(client, team) == {limit["id"]: "4.000"}
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_a_batch_of_settlements_that_read_before_the_limit_charged_them_falls_back(
        db, database_url, live_server, client):
    # The same for coalesced settlements: A and B read with no charges and queue behind X's
    # write (another member's, held on a row lock); the limit charges A and B and waits on A
    # (held too); the batch [A, B] then waits on A behind the limit. Once the limit commits the
    # batch finds them charged and writes nothing; each settles on the transaction path.
    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (token, member), (other, _) = team.creators
    x = await start(client, other, team.ws)
    a, b = [await start(client, token, team.ws) for _ in range(2)]
    async with HeldLock(database_url, "generations", x["id"]) as x_lock:
        x_done = asyncio.ensure_future(complete(client, team, x, "2"))
        await x_lock.waited_on()  # X's write leads; it is counted once written
        settlements = server_db(live_server)._coalescers["settlements"]
        before = (settlements.batches, settlements.items)
        a_done = asyncio.ensure_future(complete(client, team, a, "4"))
        await queued(live_server, "settlements", team.ws, 1)
        b_done = asyncio.ensure_future(complete(client, team, b, "3"))
        await queued(live_server, "settlements", team.ws, 2)
        async with HeldLock(database_url, "generations", a["id"]) as a_lock:
            setting = asyncio.ensure_future(set_limit(client, team, "MEMBER", "MONTH", "50", member=member))
            await a_lock.waited_on()
            await x_lock.commit()
            await x_done
            await until_waiting(db, 2)  # the batch [A, B] waits on A, behind the limit
            await a_lock.commit()
            limit = await setting
            await asyncio.gather(a_done, b_done)
    assert (settlements.batches - before[0], settlements.items - before[1]) == (2, 3)  # [X], then [A, B]
    assert await used(client, team) == {limit["id"]: "7.000"}
    assert await usage_drift(db, team.ws) == []
    await assert_ledger_clean(db, team.ws)


async def test_a_settlement_in_flight_when_the_limit_is_set_counts_at_what_it_captured(
        db, database_url, client):
    # A completion holding the generation's row lock (its write waits on a grant) when the limit
    # comes: the limit waits for it, then counts what it captured, not the hold it read before.
    # Once with the generation under another limit already (the transaction path), once without
    # (the one-statement write).
    for existing in (True, False):
        team = await make_team(db, client, creators=1)
        grant_id = (await grant(client, team, "1000"))["id"]
        token, member = team.creators[0]
        if existing:
            await set_limit(client, team, "WORKSPACE", "MONTH", "500")
        gen = await start(client, token, team.ws)
        async with HeldLock(database_url, "grants", grant_id) as lock:
            completing = asyncio.ensure_future(complete(client, team, gen, "4"))
            await lock.waited_on()
            setting = asyncio.ensure_future(set_limit(client, team, "MEMBER", "MONTH", "50", member=member))
            await until_waiting(db, 2)
            await lock.commit()
            await completing
            limit = await setting
        assert (await used(client, team))[limit["id"]] == "4.000"
        assert limit["id"] not in await charges_of(db, gen["id"])
        assert await usage_drift(db, team.ws) == []
        await assert_ledger_clean(db, team.ws)


# --- a limit's alerts follow its changes ---------------------------------------------------------

OPEN_LIMIT_ALERTS = "query($ws: ID!) { alerts(workspaceId: $ws, status: OPEN) { kind subject } }"


async def open_limit_alerts(client, team) -> list[str]:
    async with client(team.owner) as api:
        return sorted(a["kind"] for a in (await api(OPEN_LIMIT_ALERTS, ws=team.ws))["alerts"]
                      if a["kind"].startswith("LIMIT_"))


async def test_a_limits_alerts_follow_its_setting_raising_approvals_and_removal(db, client):
    """Before, a limit's 80 % and 100 % alerts were evaluated by spends only (and resolved by
    the scheduler's round): a limit set where the period had already spent 90 % raised nothing
    until the next spend, and one raised or removed, or an approved overage, left them open."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]
    for _ in range(9):
        await spent(client, team, token)  # 90 this month

    async def set_to(amount: str) -> dict:
        async with client(team.owner) as api:
            out = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount=amount,
                             action="REQUIRE_APPROVAL", member=member))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit", out
        return out

    limit = await set_to("100")
    assert await open_limit_alerts(client, team) == ["LIMIT_80"]  # 90 of 100, at once
    await set_to("200")
    assert await open_limit_alerts(client, team) == []  # 90 of 200
    await set_to("90")
    assert await open_limit_alerts(client, team) == ["LIMIT_100", "LIMIT_80"]
    async with client(token) as api:
        req = (await api(REQUEST, ws=team.ws, amount="30", reason="client deadline"))["requestOverage"]
    assert req["__typename"] == "OverageRequest", req
    async with client(team.owner) as api:
        ok = (await api(DECIDE, id=req["id"], approve=True, amount="20"))["decideOverage"]
    assert ok["status"] == "APPROVED"
    assert await open_limit_alerts(client, team) == ["LIMIT_80"]  # 90 of 110
    async with client(team.owner) as api:
        assert (await api(REMOVE_LIMIT, l=limit["id"]))["removeSpendLimit"]["__typename"] == "SpendLimit"
    assert await open_limit_alerts(client, team) == []


async def test_a_limit_switched_to_block_lapses_its_pending_requests_and_keeps_approved_overages(db, client):
    """REQUIRE_APPROVAL → BLOCK: nobody may ask to pass the limit any more, so the requests
    waiting lapse (as when it is removed) instead of letting an approver raise a limit set to
    block; an overage approved before stays, to its own end: that was a decision."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, member = team.creators[0]

    async def set_action(action: str) -> None:
        async with client(team.owner) as api:
            out = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="20", action=action,
                             member=member))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit", out

    await set_action("REQUIRE_APPROVAL")
    await spent(client, team, token)
    await spent(client, team, token)  # 20 of 20
    async with client(token) as api:
        granted = (await api(REQUEST, ws=team.ws, amount="10", reason="first"))["requestOverage"]
        waiting = (await api(REQUEST, ws=team.ws, amount="10", reason="second"))["requestOverage"]
    async with client(team.owner) as api:
        assert (await api(DECIDE, id=granted["id"], approve=True, amount="10"))["decideOverage"]["status"] == "APPROVED"
    await set_action("BLOCK")
    async with client(team.owner) as api:
        statuses = {r["id"]: r["status"] for r in (await api(
            "query($ws: ID!) { overageRequests(workspaceId: $ws) { id status } }", ws=team.ws))["overageRequests"]}
        late = (await api(DECIDE, id=waiting["id"], approve=True, amount="10"))["decideOverage"]
        open_requests = [a for a in (await api(OPEN_LIMIT_ALERTS, ws=team.ws))["alerts"]
                         if a["kind"] == "OVERAGE_REQUESTED"]
    assert statuses == {granted["id"]: "APPROVED", waiting["id"]: "LAPSED"}
    assert late["__typename"] == "OverageNotPending", late
    assert open_requests == []
    assert (await start(client, token, team.ws))["__typename"] == "Generation"  # the approved 10: 30 of 30
    refused = await start(client, token, team.ws)
    assert (refused["__typename"], refused["limit"], refused["canRequestOverage"]) == ("SpendLimitExceeded", "30.000", False)
