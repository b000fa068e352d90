"""Money coming in and exactly-once: purchases, operator grants, transfers and their idempotency,
through the real gql client against the real app. Each test here first failed on the code it
was written against."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

from gql.transport.exceptions import TransportQueryError

from tests.conftest import HeldLock, new_user
from tests.test_api_ledger import GRANT, ADD, TRANSFER, assert_ledger_clean, balance, grant, key, make_team
from tests.test_periods import clean, month, plan, schedule, workspace, world  # noqa: F401 - the periods database
from tests.test_periods import balance as period_balance

PROMPT = 10  # seconds: far more than an answer takes


async def _transfer(client, token: str, **variables) -> dict:
    async with client(token) as api:
        try:
            out = await asyncio.wait_for(api(TRANSFER, **variables), PROMPT)
        except TransportQueryError as err:
            return {"error": err.errors[0]["extensions"]["code"]}
    return out["transferCredits"]


async def test_a_transfer_by_an_admin_demoted_while_it_waited_on_the_workspace_is_forbidden(
        db, client, database_url):
    # A transfer takes the workspace row FOR SHARE (a period close must see all of it or none),
    # so it waits for a member change in flight. The caller was checked before that wait: a
    # demotion committed meanwhile must still be seen, as for every other change that waits on a
    # lock of what it authorizes against.
    team = await make_team(db, client, mode="PER_SEAT", creators=1)
    _, seat = team.creators[0]
    await grant(client, team, "40")
    email, admin = await new_user(db, prefix="admin")
    async with client(team.owner) as api:
        admin_member = (await api(ADD, ws=team.ws, email=email, role="ADMIN", seat="STANDARD"))["addMember"]["id"]
    async with HeldLock(database_url, "workspaces", team.ws) as change:
        await change.conn.execute("UPDATE members SET role = 'member' WHERE id = $1", uuid.UUID(admin_member))
        waiting = asyncio.ensure_future(_transfer(client, admin, ws=team.ws, amount="15", key=key(), to=seat))
        await change.waited_on()
        await change.commit()
        heard = await waiting
    assert heard == {"error": "FORBIDDEN"}, heard
    b = await balance(client, team.owner, team.ws)
    assert [(s["scope"], s["available"]) for s in b["scopes"]] == [("WORKSPACE", "40.000")], b["scopes"]
    await assert_ledger_clean(db, team.ws)


async def test_a_transfer_to_your_own_seat_made_standard_while_it_waited_is_refused(db, client, database_url):
    # Only creator seats hold credits. An owner moving credits to their own seat, while another
    # owner's changeMemberSeat to STANDARD holds the workspace: the seat is the one read when
    # the caller was checked, and must be read again once the transfer holds its lock.
    team = await make_team(db, client, mode="PER_SEAT", creators=0)
    await grant(client, team, "40")
    async with HeldLock(database_url, "workspaces", team.ws) as change:
        await change.conn.execute("UPDATE members SET seat = 'standard' WHERE id = $1", uuid.UUID(team.owner_member))
        waiting = asyncio.ensure_future(
            _transfer(client, team.owner, ws=team.ws, amount="15", key=key(), to=team.owner_member))
        await change.waited_on()
        await change.commit()
        heard = await waiting
    assert heard["__typename"] == "ValidationError", heard
    b = await balance(client, team.owner, team.ws)
    assert [(s["scope"], s["available"]) for s in b["scopes"]] == [("WORKSPACE", "40.000")], b["scopes"]
    await assert_ledger_clean(db, team.ws)


async def test_an_operator_allowance_effective_at_the_period_start_keeps_its_own_later_expiry(world):  # noqa: F811
    # An operator re-issues a period's allowance by hand (source PLAN_ALLOWANCE, effective at the
    # workspace's periodStart) and lets it last two months past the period end. The close treats
    # the period's allowance pieces by their source and start, but may only expire what expires
    # at the close: a credit shown as lasting two more months must not vanish at the boundary.
    try:
        for policy in ("RESET", "ROLLOVER"):
            key_ = await plan(world, includedCredits="100", rolloverPolicy=policy,
                              **({"rolloverCapCredits": "30", "rolloverPeriods": 1} if policy == "ROLLOVER" else {}))
            owner, ws = await workspace(world, key_)
            before = await schedule(world, owner, ws)
            expires = datetime.fromisoformat(before["nextRenewalAt"]) + timedelta(days=60)
            async with world.client(world.operator) as api:
                extra = (await api(GRANT, ws=ws, amount="40", key=key(), source="PLAN_ALLOWANCE", member=None,
                                   expires=expires.isoformat(), effective=before["periodStart"], priority=100))
            extra = extra["grantCredits"]
            assert extra["__typename"] == "Grant", extra
            # creditSchedule promised it stays (expiring only what expires by the boundary)...
            outlook = {o["grant"]["expiresAt"]: (o["rollsOver"], o["expires"])
                       for o in (await schedule(world, owner, ws))["atNextRenewal"]}
            assert outlook.get(extra["expiresAt"], ("0.000", "0.000")) == ("0.000", "0.000"), (policy, outlook)
            await world.tick(month(1))  # ...and the close expired it all the same
            b = await period_balance(world, owner, ws)
            [kept] = [g for g in b["grants"] if g["id"] == extra["id"]]
            assert (kept["remaining"], kept["expired"]) == ("40.000", "0.000"), (policy, kept)
            await clean(world, ws)
            world.clock.offset = timedelta(0)
    finally:
        world.clock.offset = timedelta(0)
