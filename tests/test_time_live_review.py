"""Review of time and the live layer: the scheduler (`periods.service.tick` and the steps it
runs) beside the live event transport, on a real PostgreSQL with a movable clock."""

from __future__ import annotations

import asyncio

from tests.conftest import ws_client
from tests.test_api_ledger import START, key
from tests.test_periods import balance, clean, closes_of, month, plan, workspace, world  # noqa: F401 - fixture

EVENTS = "subscription($ws: ID!) { workspaceEvents(workspaceId: $ws) { kind payload } }"


async def test_many_holds_timing_out_in_one_workspace_are_released_and_reach_subscribers(world):  # noqa: F811
    """A generation worker that died leaves many holds in one workspace. Their timeouts are one
    batch, one transaction, and its events went out as ONE `pg_notify` per workspace, whose
    payload PostgreSQL caps at 8000 bytes: past ~25 generations the transaction failed, every
    tick retried the same batch and failed again, and since hold timeouts run first, no period
    closed and nothing expired anywhere any more."""
    n = 40
    key_ = await plan(world, includedCredits=str(50 * n))
    owner, ws = await workspace(world, key_)
    async with world.client(owner) as api:
        for _ in range(n):
            gen = (await api(START, ws=ws, model="video-standard", key=key()))["startGeneration"]
            assert gen["__typename"] == "Generation", gen
    async with ws_client(world.server, owner) as live:
        stream = live.subscribe(EVENTS, ws=ws)
        first = asyncio.ensure_future(asyncio.wait_for(stream.__anext__(), 10))
        await asyncio.sleep(0.3)
        report = await world.tick(month(1))
        settled = []
        got = await first
        while True:
            e = got["workspaceEvents"]
            if e["kind"] == "GENERATION_SETTLED":
                settled.append(e["payload"]["generationId"])
            if len(settled) == n:
                break
            got = await asyncio.wait_for(stream.__anext__(), 5)
        await stream.aclose()
    assert report.holds_timed_out >= n and len(closes_of(report, ws)) == 1
    assert len(set(settled)) == n
    b = await balance(world, owner, ws)
    assert b["held"] == "0.000"
    await clean(world, ws)


def test_a_workspaces_events_are_split_into_notifications_postgresql_accepts_in_order():
    import uuid

    from domain import events

    ws = uuid.uuid4()
    batch = [events.Event(ws, events.GENERATION_SETTLED, {"generationId": str(uuid.uuid4()), "note": "é" * i})
             for i in range(300)]
    messages = events.encode_chunks(batch)
    assert len(messages) > 1
    assert all(len(m.encode()) < 8000 for m in messages)
    assert [e for m in messages for e in events.decode(m)] == events.decode(events.encode(batch))
    assert events.encode_chunks(batch[:3]) == [events.encode(batch[:3])]


BALANCES = "subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available } }"
GRANT_PROMO = ('mutation($ws: ID!, $k: String!) { grantCredits(input: {workspaceId: $ws, amount: "7", '
               'source: PROMOTION, reason: "live", idempotencyKey: $k}) { __typename } }')


async def test_dashboards_opening_their_streams_at_once_each_get_their_balance_and_events(world):  # noqa: F811
    """With PostgreSQL LISTEN/NOTIFY, every stream of a process subscribes through one listening
    connection. broadcaster 0.3 subscribes with an await between "is anyone listening to this
    channel?" and recording the new listener, and asyncpg refuses a second LISTEN on a
    connection while one is in progress: dashboards opening their balance and their event
    streams at the same moment failed (an event stream with an internal error) or, worse, left a
    workspace's balance watcher dead before it listened, so its balance streams never sent a
    first value, never re-checked their token, and never ended."""
    key_ = await plan(world, includedCredits="10")
    spaces = [await workspace(world, key_) for _ in range(2)]

    async def dashboard(owner: str, ws: str, before: int) -> tuple[str, str]:
        async with ws_client(world.server, owner) as live:
            balances = live.subscribe(BALANCES, ws=ws)
            events = live.subscribe(EVENTS, ws=ws)
            first_balance = asyncio.ensure_future(asyncio.wait_for(balances.__anext__(), 10))
            first_event = asyncio.ensure_future(asyncio.wait_for(events.__anext__(), 10))
            assert (await first_balance)["balanceChanged"]["available"] == f"{before}.000"
            await asyncio.sleep(0.5)  # the event stream is listening by now
            async with world.client(world.operator) as api:
                assert (await api(GRANT_PROMO, ws=ws, k=key()))["grantCredits"]["__typename"] == "Grant"
            kind = (await first_event)["workspaceEvents"]["kind"]
            b = None
            while b != f"{before + 7}.000":  # coalescing may skip intermediate balances
                b = (await asyncio.wait_for(balances.__anext__(), 10))["balanceChanged"]["available"]
            await balances.aclose()
            await events.aclose()
            return kind, b

    for round_ in range(6):  # each round opens every stream afresh (the last one closed unlistens)
        got = await asyncio.gather(*(dashboard(owner, ws, 10 + 7 * round_) for owner, ws in spaces),
                                   return_exceptions=True)
        assert got == [("CREDITS_ADDED", f"{17 + 7 * round_}.000")] * len(spaces), (round_, got)
