"""The generation hot path under failure: requests cancelled while their hold or settlement is
queued in a coalescer batch or being written, the batch statement failing for one member, the
connection dying under a batch, and settlements racing the hold time-out and each other. Real
requests through the real server (a websocket operation is cancelled when its client closes the
socket), real locks held by a second connection, real pg_terminate_backend; nothing of ours is
mocked. After each: every key answered exactly once, the ledger clean, no stranded hold."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from domain.clock import OffsetClock
from domain.periods import service as periods
from tests.conftest import HeldLock, LiveServer, asyncpg_dsn, http_client, own_database, ws_client
from tests.test_api_ledger import COMPLETE, FAIL, START, assert_ledger_clean, balance, grant, key, make_team
from tests.test_api_governance import SET_LIMIT
from tests.test_api_live import EVENTS


def server_db(live_server):
    """The live server's own `Database` (read here, never driven: it lives on the server's loop)."""
    return live_server.server.config.app.state.db


async def until(condition, seconds: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def queued(live_server, purpose: str, ws: str, n: int) -> None:
    """Until `n` items wait in the server's coalescer queue for `ws` (behind a batch in flight)."""
    async def enough():
        c = server_db(live_server)._coalescers.get(purpose)
        return c is not None and len(c._queues.get(uuid.UUID(ws)) or ()) >= n
    await until(enough, what=f"{n} queued {purpose}")


async def stranded(db, ws: str) -> list:
    """Grants whose held figure is not what the workspace's open (STARTED) generations hold on
    them by their own entries: credits held for nothing, or a generation holding nothing."""
    rows = await db.fetchrow("""
        WITH open_holds AS (
            SELECT e.grant_id, sum(CASE e.kind WHEN 'HOLD' THEN e.amount ELSE -e.amount END) AS held
            FROM ledger_entries e JOIN generations g ON g.id = e.generation_id
            WHERE g.workspace_id = $1 AND g.status = 'STARTED' AND e.kind IN ('HOLD', 'CAPTURE', 'RELEASE')
            GROUP BY e.grant_id)
        SELECT array_agg(gr.id) AS bad FROM grants gr LEFT JOIN open_holds o ON o.grant_id = gr.id
        WHERE gr.workspace_id = $1 AND gr.held <> coalesce(o.held, 0)""", uuid.UUID(ws))
    return rows["bad"] or []


async def assert_money_clean(db, ws: str) -> None:
    await assert_ledger_clean(db, ws)
    assert await stranded(db, ws) == []
    # Every generation that holds or held anything started with exactly one HOLD posting, and
    # every settled one settled once (one capture/release posting: one idempotency key).
    rows = await db.fetchrow("""
        SELECT count(*) FILTER (WHERE n_keys <> 1) AS bad FROM (
            SELECT g.id, count(DISTINCT e.idempotency_key) FILTER (WHERE e.kind IN ('CAPTURE', 'RELEASE')) AS n_keys
            FROM generations g JOIN ledger_entries e ON e.generation_id = g.id
            WHERE g.workspace_id = $1 AND g.status <> 'STARTED' AND g.status <> 'TIMED_OUT'
            GROUP BY g.id) s""", uuid.UUID(ws))
    assert rows["bad"] == 0


async def user_of(db, member_id: str) -> uuid.UUID:
    return (await db.fetchrow("SELECT user_id FROM members WHERE id = $1", uuid.UUID(member_id)))["user_id"]


class UncommittedKey:
    """Another transaction that has inserted (and not committed) an idempotency key row: a
    statement claiming the same key waits on the unique index until this one ends."""

    def __init__(self, database_url: str, ws: str, actor: uuid.UUID, k: str) -> None:
        self.database_url, self.args = database_url, (uuid.UUID(ws), actor, k)

    async def __aenter__(self) -> UncommittedKey:
        self.conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(
            "INSERT INTO idempotency_keys (workspace_id, actor_id, key, operation, request_hash, result_id) "
            "VALUES ($1, $2, $3, 'startGeneration', '\\x00', gen_random_uuid())", *self.args)
        return self

    async def waited_on(self) -> None:
        await until(lambda: self.conn.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            self.conn.get_server_pid()), what="a statement waiting on the uncommitted key")

    async def rollback(self) -> None:
        if self.tx is not None:
            await self.tx.rollback()
            self.tx = None

    async def __aexit__(self, *exc) -> None:
        await self.rollback()
        await self.conn.close()


async def collect(stream, into: list) -> None:
    async for event in stream:
        into.append(event["workspaceEvents"])


async def started_events(events: list, ids: set[str], seconds: float = 5) -> set[str]:
    """The generation ids among `ids` whose GENERATION_STARTED arrived within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = {e["payload"]["generationId"] for e in events if e["kind"] == "GENERATION_STARTED"} & ids
        if seen == ids:
            break
        await asyncio.sleep(0.05)
    return {e["payload"]["generationId"] for e in events if e["kind"] == "GENERATION_STARTED"} & ids


class BatchInFlight:
    """Three starts on one pool: A leads alone, its statement waiting on a grant lock held by
    another connection; B then C queue behind it (each over its own websocket, whose operation
    the server cancels when the socket closes). A commits; B leads the batch [B, C], whose
    statement waits on an uncommitted claim of B's key until `release()`."""

    def __init__(self, db, live_server, client, database_url, team) -> None:
        self.db, self.live_server, self.client, self.url, self.team = db, live_server, client, database_url, team
        self.keys = {"a": key(), "b": key(), "c": key()}
        self.tasks: dict[str, asyncio.Future] = {}
        self.sockets: dict[str, contextlib.AsyncExitStack] = {}

    async def __aenter__(self) -> BatchInFlight:
        team, (creator, member) = self.team, self.team.creators[0]
        self.stack = contextlib.AsyncExitStack()
        await self.stack.__aenter__()
        grant_id = (await self.db.fetchrow("SELECT id FROM grants WHERE workspace_id = $1", uuid.UUID(team.ws)))["id"]
        lock = await self.stack.enter_async_context(HeldLock(self.url, "grants", grant_id))
        self.claim = await self.stack.enter_async_context(
            UncommittedKey(self.url, team.ws, await user_of(self.db, member), self.keys["b"]))
        http = await self.stack.enter_async_context(self.client(creator))
        self.tasks["a"] = asyncio.ensure_future(http(START, ws=team.ws, model="test-six", key=self.keys["a"]))
        await lock.waited_on()
        for n, name in enumerate("bc", start=1):
            self.sockets[name] = contextlib.AsyncExitStack()
            api = await self.sockets[name].enter_async_context(ws_client(self.live_server, creator))
            self.tasks[name] = asyncio.ensure_future(api(START, ws=team.ws, model="test-six", key=self.keys[name]))
            await queued(self.live_server, "holds", team.ws, n)
        await lock.commit()  # A writes; [B, C] is written next and waits on B's key
        self.a = (await self.tasks["a"])["startGeneration"]
        assert self.a["__typename"] == "Generation"
        self.counts = self.coalesced()
        await self.claim.waited_on()
        return self

    def coalesced(self) -> tuple[int, int]:
        c = server_db(self.live_server)._coalescers["holds"]
        return c.batches, c.items

    async def close_socket(self, name: str) -> None:
        """The client of `name` goes away: the server cancels its operation."""
        self.tasks[name].cancel()
        await self.sockets.pop(name).aclose()
        await asyncio.sleep(0.3)

    async def release(self) -> None:
        await self.claim.rollback()

    async def answer(self, name: str) -> dict:
        return (await self.tasks[name])["startGeneration"]

    async def replay(self, name: str) -> dict:
        async with self.client(self.team.creators[0][0]) as api:
            return (await api(START, ws=self.team.ws, model="test-six", key=self.keys[name]))["startGeneration"]

    async def generation_of(self, name: str) -> str | None:
        row = await self.db.fetchrow("SELECT g.id FROM generations g JOIN idempotency_keys k ON k.result_id = g.id "
                                     "WHERE k.key = $1", self.keys[name])
        return str(row["id"]) if row else None

    async def __aexit__(self, *exc) -> None:
        for stack in self.sockets.values():
            await stack.aclose()
        await self.stack.__aexit__(*exc)


async def test_a_start_cancelled_while_its_batch_is_written_is_held_once_replayable_and_announced(
        db, live_server, client, database_url):
    # C is cancelled while the batch [B, C] is being written: the batch commits, C's hold with
    # it. Its key replays that hold (one generation), and its GENERATION_STARTED goes out like
    # everyone's (it used not to: the resolver that sends it was cancelled after the commit).
    team = await make_team(db, client, creators=1)
    await grant(client, team, "60")
    events: list = []
    async with ws_client(live_server, team.owner) as owner_ws:
        listener = asyncio.ensure_future(collect(owner_ws.subscribe(EVENTS, ws=team.ws), events))
        await asyncio.sleep(0.3)  # subscribed before anything happens
        try:
            async with BatchInFlight(db, live_server, client, database_url, team) as run:
                await run.close_socket("c")
                await run.release()
                b = await run.answer("b")
                assert b["__typename"] == "Generation"
                replayed = await run.replay("c")
                assert replayed["__typename"] == "Generation"
                assert replayed["id"] == await run.generation_of("c"), "C's hold was not written with its batch"
                ids = {run.a["id"], b["id"], replayed["id"]}
                assert await started_events(events, ids) == ids, "C's hold committed but was never announced"
        finally:
            listener.cancel()
    assert (await db.fetchrow("SELECT count(*) AS n FROM generations WHERE workspace_id = $1",
                              uuid.UUID(team.ws)))["n"] == 3
    b_ = await balance(client, team.owner, team.ws)
    assert (b_["held"], b_["available"]) == ("18.000", "42.000")
    await assert_money_clean(db, team.ws)


async def test_a_start_leading_a_batch_and_cancelled_does_not_abort_the_batch_for_the_others(
        db, live_server, client, database_url):
    # B leads [B, C] and is cancelled while the statement waits. The statement is not cancelled
    # with it (it used to be: C then had to start over through the transaction path): the batch
    # commits whole, C is answered from it, and B's key replays B's hold.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "60")
    async with BatchInFlight(db, live_server, client, database_url, team) as run:
        await run.close_socket("b")
        await run.release()
        c = await run.answer("c")
        assert c["__typename"] == "Generation"
        batches, items = run.coalesced()
        assert (batches - run.counts[0], items - run.counts[1]) == (1, 2), "the batch [B, C] was not written"
        replayed = await run.replay("b")
        assert replayed["__typename"] == "Generation" and replayed["id"] == await run.generation_of("b")
    assert (await db.fetchrow("SELECT count(*) AS n FROM generations WHERE workspace_id = $1",
                              uuid.UUID(team.ws)))["n"] == 3
    await assert_money_clean(db, team.ws)


async def test_a_batch_whose_connection_dies_mid_statement_answers_every_start_exactly_once(
        db, live_server, client, database_url):
    # The backend writing [B, C] is terminated while the statement waits. Nothing of it was
    # written. C (not leading) starts over through the transaction path; B, whose own
    # connection died, does the same rather than answer INTERNAL: its key decides whether
    # anything was written, so starting over cannot hold twice.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "60")
    async with BatchInFlight(db, live_server, client, database_url, team) as run:
        [pid] = await run.claim.conn.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            run.claim.conn.get_server_pid())
        assert await db.fetchrow("SELECT pg_terminate_backend($1)", pid)
        c = await run.answer("c")
        assert c["__typename"] == "Generation"
        await run.release()
        b = await run.answer("b")
        assert b["__typename"] == "Generation"
        for name, first in (("b", b), ("c", c)):
            replayed = await run.replay(name)
            assert replayed["id"] == first["id"] == await run.generation_of(name)
    assert (await db.fetchrow("SELECT count(*) AS n FROM generations WHERE workspace_id = $1",
                              uuid.UUID(team.ws)))["n"] == 3
    b_ = await balance(client, team.owner, team.ws)
    assert (b_["held"], b_["available"]) == ("18.000", "42.000")
    await assert_money_clean(db, team.ws)


@pytest.fixture
async def own_db(pg_server):
    """A database of the test's own (its URL and a `Database` on it), for a test whose scheduler
    ticks time out every open hold in the database, which must not be other tests' holds, or
    that counts what happened in it."""
    async with own_database(pg_server, "creditpool_hot_failures") as (url, db):
        yield url, db


@pytest.fixture
async def own_server(own_db):
    """A server on a database of the test's own (`own_db`)."""
    url, db = own_db
    server = LiveServer(url, db_pool_size=5)
    server.start()
    try:
        yield db, (lambda token: http_client(server, token))
    finally:
        server.stop()


async def test_completions_failures_and_the_hold_time_out_racing_on_the_same_generations_settle_each_once(
        own_server):
    db, client = own_server
    # 24 generations; at once: the worker completes each and the operator fails each (under
    # their own keys, in alternating order), the worker completes every third one again under
    # another key, and the scheduler times every hold out (a TTL of 0), twice. Each generation settles exactly once
    # (one capture or release entry), every success the API answered is what was recorded, every
    # loser hears GenerationAlreadySettled, and nothing is left held.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "200")
    creator, _ = team.creators[0]
    async with client(creator) as api:
        gens = [(await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]["id"]
                for _ in range(24)]

    async def settle(token, query, g, **kw):
        async with client(token) as api:
            out = await api(query, g=g, key=key(), **kw)
        return g, next(iter(out.values()))

    async def tick(delay):
        # One generation per transaction, oldest first, while the settlements go newest first:
        # they meet somewhere in the middle.
        await asyncio.sleep(delay)
        return await periods.tick(db, OffsetClock(), hold_ttl=timedelta(0), batch=1)

    racing = []
    for i, g in enumerate(gens[::-1]):
        complete, fail = settle(team.worker, COMPLETE, g), settle(team.operator, FAIL, g, kind="TECHNICAL")
        racing += [fail, complete] if i % 2 else [complete, fail]
        if i % 3 == 0:
            racing.append(settle(team.worker, COMPLETE, g))
    *settlements, first_tick, second_tick = await asyncio.gather(*racing, tick(0.05), tick(0.1))
    assert not first_tick.failures and not second_tick.failures
    pool = await db._pool()
    async with pool.acquire() as conn:
        rows = {str(r["id"]): r for r in await conn.fetch(
            "SELECT g.id, g.status, (SELECT array_agg(e.kind ORDER BY e.id) FROM ledger_entries e "
            "WHERE e.generation_id = g.id) AS kinds FROM generations g WHERE g.workspace_id = $1", uuid.UUID(team.ws))}
    won: dict[str, list] = {g: [] for g in gens}
    for g, out in settlements:
        if out["__typename"] == "Generation":
            won[g].append(out["status"])
        else:
            assert out["__typename"] == "GenerationAlreadySettled", out
    timed_out = 0
    for g in gens:
        status, kinds = rows[g]["status"], rows[g]["kinds"]
        assert status in ("COMPLETED", "FAILED", "TIMED_OUT")
        assert kinds == ["HOLD", "CAPTURE" if status == "COMPLETED" else "RELEASE"], (g, status, kinds)
        assert won[g] == ([] if status == "TIMED_OUT" else [status]), (g, status, won[g])
        timed_out += status == "TIMED_OUT"
    assert first_tick.holds_timed_out + second_tick.holds_timed_out == timed_out
    b = await balance(client, team.owner, team.ws)
    assert b["held"] == "0.000"
    await assert_money_clean(db, team.ws)


async def test_a_graceful_shutdown_answers_the_starts_queued_in_a_batch_and_cuts_no_write_short(
        db, client, database_url):
    # A server of its own is told to stop while A's statement waits on a grant lock and B (HTTP)
    # and C (a websocket operation) are queued behind it. The stop waits for the HTTP requests
    # and answers them; C's socket is closed by the shutdown, which cancels its operation, but
    # its start is not cut short: it is written (its key replays it on another server) and the
    # server stops only once nothing is left writing.
    team = await make_team(db, client, creators=1)
    grant_id = (await grant(client, team, "60"))["id"]
    creator, _ = team.creators[0]
    ka, kb, kc = key(), key(), key()
    server = LiveServer(database_url)
    server.start()
    stopping = None
    try:
        async with HeldLock(database_url, "grants", grant_id) as lock, http_client(server, creator) as http:
            a = asyncio.ensure_future(http(START, ws=team.ws, model="test-six", key=ka))
            await lock.waited_on()
            b = asyncio.ensure_future(http(START, ws=team.ws, model="test-six", key=kb))
            await queued(server, "holds", team.ws, 1)
            async with ws_client(server, creator) as ws:
                c = asyncio.ensure_future(ws(START, ws=team.ws, model="test-six", key=kc))
                await queued(server, "holds", team.ws, 2)
                stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
                await asyncio.sleep(0.5)
                assert not stopping.done() and not a.done() and not b.done()
                await lock.commit()
                answers = [(await a)["startGeneration"], (await b)["startGeneration"]]
                assert [x["__typename"] for x in answers] == ["Generation", "Generation"]
                await asyncio.gather(c, return_exceptions=True)  # its socket was closed by the shutdown
        await stopping
        assert not server.thread.is_alive()
        written = await db.fetchrow("SELECT g.id FROM generations g JOIN idempotency_keys k ON k.result_id = g.id "
                                    "WHERE k.key = $1", kc)
        assert written is not None, "C's start was cut short by the shutdown"
    finally:
        if stopping is None:
            server.stop()
    async with client(creator) as api:  # the session's server
        for k, first in ((ka, answers[0]["id"]), (kb, answers[1]["id"]), (kc, str(written["id"]))):
            replayed = (await api(START, ws=team.ws, model="test-six", key=k))["startGeneration"]
            assert replayed["__typename"] == "Generation" and replayed["id"] == first
    rows = await db.fetchrow("SELECT count(*) AS n, count(*) FILTER (WHERE k.key = $2) AS c FROM generations g "
                             "JOIN idempotency_keys k ON k.result_id = g.id WHERE g.workspace_id = $1",
                             uuid.UUID(team.ws), kc)
    assert (rows["n"], rows["c"]) == (3, 1)
    await assert_money_clean(db, team.ws)


async def test_a_settlement_cancelled_while_its_batch_is_written_settles_once_replayably_and_is_announced(
        db, live_server, client, database_url):
    # The settlement side of the same failure: A's completion waits on A's row (locked by
    # another connection), B's and C's queue behind it (websocket operations); A commits, and
    # [B, C] waits on B's row. C's client goes away; then the batch commits. C is settled once
    # (its key replays the settlement), and its GENERATION_SETTLED goes out.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "60")
    creator, _ = team.creators[0]
    async with client(creator) as api:
        ga, gb, gc = [(await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]["id"]
                      for _ in range(3)]
    keys = {g: key() for g in (ga, gb, gc)}
    events: list = []
    async with ws_client(live_server, team.owner) as owner_ws:
        listener = asyncio.ensure_future(collect(owner_ws.subscribe(EVENTS, ws=team.ws), events))
        await asyncio.sleep(0.3)
        try:
            async with HeldLock(database_url, "generations", ga) as lock_a, \
                    HeldLock(database_url, "generations", gb) as lock_b, client(team.worker) as http, \
                    ws_client(live_server, team.worker) as ws_b:
                a = asyncio.ensure_future(http(COMPLETE, g=ga, key=keys[ga]))
                await lock_a.waited_on()
                b = asyncio.ensure_future(ws_b(COMPLETE, g=gb, key=keys[gb]))
                await queued(live_server, "settlements", team.ws, 1)
                async with ws_client(live_server, team.worker) as ws_c:
                    c = asyncio.ensure_future(ws_c(COMPLETE, g=gc, key=keys[gc]))
                    await queued(live_server, "settlements", team.ws, 2)
                    await lock_a.commit()
                    assert (await a)["completeGeneration"]["status"] == "COMPLETED"
                    await lock_b.waited_on()
                    c.cancel()
                await asyncio.sleep(0.3)  # C's socket is closed: the server cancels its operation
                await lock_b.commit()
                assert (await b)["completeGeneration"]["status"] == "COMPLETED"
                replayed = (await http(COMPLETE, g=gc, key=keys[gc]))["completeGeneration"]
            assert (replayed["__typename"], replayed["status"], replayed["captured"]) == ("Generation", "COMPLETED",
                                                                                          "6.000")
            settled = lambda: {e["payload"]["generationId"] for e in events if e["kind"] == "GENERATION_SETTLED"}  # noqa: E731
            await until(lambda: asyncio.sleep(0, settled() >= {ga, gb, gc}), seconds=5, what="three settlements announced")
        finally:
            listener.cancel()
    kinds = await db.fetchrow("SELECT array_agg(kind ORDER BY id) AS k FROM ledger_entries WHERE generation_id = $1",
                              uuid.UUID(gc))
    assert kinds["k"] == ["HOLD", "CAPTURE"]
    b_ = await balance(client, team.owner, team.ws)
    assert (b_["held"], b_["available"]) == ("0.000", "42.000")
    await assert_money_clean(db, team.ws)



async def kill_idle_backends_used_since(db, since: datetime) -> list[int]:
    """Terminate the database's backends that ran a statement since `since` and are idle now
    (neither running a statement nor in a transaction): the hot-path connections of requests
    that have read and wait in a coalescer queue. Returns once the server has seen them go."""
    pids = (await db.fetchrow(
        "SELECT array_agg(pid) AS pids FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state = 'idle' AND query_start >= $1",
        since))["pids"] or []
    for pid in pids:
        assert (await db.fetchrow("SELECT pg_terminate_backend($1) AS done", pid))["done"]

    async def gone():
        row = await db.fetchrow("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
        return row["n"] == 0
    await until(gone, what="the terminated backends gone")
    await asyncio.sleep(0.2)  # the server's loop reads the end of each socket
    return pids


async def test_starts_and_settlements_whose_connections_die_while_queued_answer_each_once(
        db, live_server, client, database_url):
    # A leads alone, its statement waiting on a row lock; B and C have read and wait in the
    # coalescer queue, each keeping its hot-path connection, and those connections are killed
    # (pg_terminate_backend: a server restart, a failover, an idle-connection reaper). B then
    # leads [B, C] on its dead connection: asyncpg refuses with InterfaceError before anything
    # is sent. C (not leading) starts over on the transaction path; so must B, instead of
    # answering INTERNAL: its key decides whether anything was written. First for starts, then
    # for completions.
    team = await make_team(db, client, creators=1)
    grant_id = (await grant(client, team, "60"))["id"]
    creator, _ = team.creators[0]
    keys = {name: key() for name in "abc"}
    async with HeldLock(database_url, "grants", grant_id) as lock, client(creator) as http:
        a = asyncio.ensure_future(http(START, ws=team.ws, model="test-six", key=keys["a"]))
        await lock.waited_on()
        since = (await db.fetchrow("SELECT clock_timestamp() AS t"))["t"]
        queued_ = {}
        for n, name in enumerate("bc", start=1):
            queued_[name] = asyncio.ensure_future(http(START, ws=team.ws, model="test-six", key=keys[name]))
            await queued(live_server, "holds", team.ws, n)
        assert len(await kill_idle_backends_used_since(db, since)) >= 2
        await lock.commit()
        started = {"a": (await a)["startGeneration"]}
        for name in "bc":
            started[name] = (await queued_[name])["startGeneration"]
    assert [s["__typename"] for s in started.values()] == ["Generation"] * 3, started
    async with client(creator) as api:
        for name, first in started.items():
            replayed = (await api(START, ws=team.ws, model="test-six", key=keys[name]))["startGeneration"]
            assert replayed["id"] == first["id"]
    gens = {name: s["id"] for name, s in started.items()}

    keys = {name: key() for name in "abc"}
    async with HeldLock(database_url, "generations", gens["a"]) as lock, client(team.worker) as http:
        a = asyncio.ensure_future(http(COMPLETE, g=gens["a"], key=keys["a"]))
        await lock.waited_on()
        since = (await db.fetchrow("SELECT clock_timestamp() AS t"))["t"]
        queued_ = {}
        for n, name in enumerate("bc", start=1):
            queued_[name] = asyncio.ensure_future(http(COMPLETE, g=gens[name], key=keys[name]))
            await queued(live_server, "settlements", team.ws, n)
        assert len(await kill_idle_backends_used_since(db, since)) >= 2
        await lock.commit()
        settled = {"a": (await a)["completeGeneration"]}
        for name in "bc":
            settled[name] = (await queued_[name])["completeGeneration"]
    assert [(s["__typename"], s["status"]) for s in settled.values()] == [("Generation", "COMPLETED")] * 3, settled
    async with client(team.worker) as api:
        for name in "abc":
            replayed = (await api(COMPLETE, g=gens[name], key=keys[name]))["completeGeneration"]
            assert (replayed["id"], replayed["status"]) == (gens[name], "COMPLETED")

    # The same for a read: a start's and a completion's first statement wait (on a table lock)
    # when their backend is terminated. Nothing was written: each starts over.
    async with client(creator) as api:
        d = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]["id"]
    for token, query, variables in ((creator, START, {"ws": team.ws, "model": "test-six", "key": key()}),
                                    (team.worker, COMPLETE, {"g": d, "key": key()})):
        blocker = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with client(token) as http:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE members IN ACCESS EXCLUSIVE MODE")
                    request = asyncio.ensure_future(http(query, **variables))
                    await until(lambda: blocker.fetchval(
                        "SELECT count(*) = 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                        blocker.get_server_pid()), what="a read waiting on the table lock")
                    assert await blocker.fetchval(
                        "SELECT bool_and(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE $1 = ANY(pg_blocking_pids(pid))", blocker.get_server_pid())
                    await asyncio.sleep(0.3)
                answer = next(iter((await request).values()))  # the lock released
            assert answer["__typename"] == "Generation", answer
            async with client(token) as api:
                assert next(iter((await api(query, **variables)).values()))["id"] == answer["id"]
        finally:
            await blocker.close()

    kinds = await db.fetchrow(
        "SELECT array_agg(e.kind ORDER BY e.id) AS k FROM ledger_entries e "
        "JOIN generations g ON g.id = e.generation_id WHERE g.workspace_id = $1", uuid.UUID(team.ws))
    assert sorted(kinds["k"]) == ["CAPTURE"] * 4 + ["HOLD"] * 5
    b_ = await balance(client, team.owner, team.ws)
    assert (b_["held"], b_["available"]) == ("6.000", "30.000")
    await assert_money_clean(db, team.ws)


async def deadlocks_once_closed(url: str, db) -> int:
    """Deadlocks PostgreSQL has detected in the database of `url` (its statistics), read once
    `db` is closed and no other backend is connected: each flushes its statistics as it exits.
    (The test's server must have stopped.)"""
    await db.dispose()
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await until(lambda: conn.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"),
            what="the database's backends gone")
        return await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    finally:
        await conn.close()


async def test_a_hold_time_out_locks_like_the_hot_path_and_cannot_deadlock_with_a_settlement(own_db):
    # The tick times out OLD (holding only the grant with the higher id) and NEW (holding only
    # the lower one, and counted on a member's spend limit), while the worker fails BOTH, which
    # holds on the two grants (one statement, locking the grants in id order). The limit's usage
    # row is held by another transaction, so the tick stops there. Locking generation by
    # generation, the tick held the higher grant (OLD's) when it stopped on NEW's limit, the
    # failure took the lower and waited for the higher, and then the tick waited for the lower:
    # a deadlock, which PostgreSQL breaks after a second. Taking the limits' rows, then every
    # grant of its batch at once in id order, the tick holds no grant while it waits.
    url, db = own_db
    server = LiveServer(url, db_pool_size=5)
    server.start()
    client = lambda token: http_client(server, token)  # noqa: E731
    try:
        team = await make_team(db, client, creators=2)
        (c1, _), (c2, m2) = team.creators
        first = uuid.UUID((await grant(client, team, "6", priority=1))["id"])
        second = uuid.UUID((await grant(client, team, "30", priority=2))["id"])
        async with client(team.owner) as api:
            limit = (await api(SET_LIMIT, ws=team.ws, scope="MEMBER", period="MONTH", amount="1000", action="BLOCK",
                               member=m2))["setSpendLimit"]["id"]

        async def start(token, model):
            async with client(token) as api:
                return (await api(START, ws=team.ws, model=model, key=key()))["startGeneration"]

        async def fail(g):
            async with client(team.worker) as api:
                return (await api(FAIL, g=g, key=key(), kind="TECHNICAL"))["failGeneration"]

        if first > second:
            old = await start(c1, "test-three")  # 3 on the first (priority 1)
            filler = await start(c1, "test-three")  # the first's other 3
            new = await start(c2, "test-three")  # 3 on the second
            await fail(filler["id"])  # 3 free on the first again
        else:
            filler = await start(c1, "test-six")  # all of the first
            old = await start(c1, "test-three")  # 3 on the second
            await fail(filler["id"])
            new = await start(c2, "test-three")  # 3 on the first
        await asyncio.sleep(0.5)
        both = await start(c1, "test-six")  # the first's last 3 and 3 more on the second
        assert {h["grant"]["id"] for h in old["holds"]} == {str(max(first, second))}
        assert {h["grant"]["id"] for h in new["holds"]} == {str(min(first, second))}
        assert {h["grant"]["id"] for h in both["holds"]} == {str(first), str(second)}
        started = {r["id"]: r["started_at"] for r in await (await db._pool()).fetch(
            "SELECT id, started_at FROM generations WHERE id = ANY($1::uuid[])",
            [uuid.UUID(g["id"]) for g in (new, both)])}
        # The tick's now: after NEW started, before BOTH did (a TTL of 0 times out OLD and NEW).
        clock = OffsetClock()
        midpoint = started[uuid.UUID(new["id"])] + (started[uuid.UUID(both["id"])] - started[uuid.UUID(new["id"])]) / 2
        usage = await asyncpg.connect(asyncpg_dsn(url))
        try:
            async with usage.transaction():
                assert len(await usage.fetch("SELECT 1 FROM limit_usage WHERE limit_id = $1 FOR UPDATE",
                                             uuid.UUID(limit))) == 1
                clock.offset = midpoint - datetime.now(UTC)
                ticking = asyncio.ensure_future(periods.tick(db, clock, hold_ttl=timedelta(0)))
                await until(lambda: usage.fetchval("SELECT count(*) = 1 FROM pg_stat_activity "
                                                   "WHERE $1 = ANY(pg_blocking_pids(pid))", usage.get_server_pid()),
                            what="the tick waiting on the limit's usage row")
                failing = asyncio.ensure_future(fail(both["id"]))
                waiting = lambda: usage.fetchval(  # noqa: E731
                    "SELECT count(*) = 2 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")
                await until(lambda: asyncio.sleep(0, True) if failing.done() else waiting(),
                            what="the failure answered, or waiting on the tick")
        finally:
            await usage.close()
        report = await ticking
        failed = await failing
    finally:
        server.stop()
    assert not report.failures and report.holds_timed_out == 2
    assert (failed["__typename"], failed["status"]) == ("Generation", "FAILED")
    statuses = {str(r["id"]): r["status"] for r in await (await db._pool()).fetch(
        "SELECT id, status FROM generations WHERE workspace_id = $1", uuid.UUID(team.ws))}
    assert statuses == {filler["id"]: "FAILED", old["id"]: "TIMED_OUT", new["id"]: "TIMED_OUT", both["id"]: "FAILED"}
    assert await db.fetchrow("SELECT used_units FROM limit_usage WHERE limit_id = $1", uuid.UUID(limit)) == (0,)
    await assert_money_clean(db, team.ws)
    assert await deadlocks_once_closed(url, db) == 0


async def test_hold_time_outs_racing_starts_and_settlements_on_multi_grant_holds_never_deadlock(own_db):
    # The same under load, with nothing held by hand: ten rounds of starts, completions and
    # failures racing four ticks (a TTL of 0, three generations a batch) on a pool of 2.5-credit
    # grants, so that a 6-credit hold spans three and neighbouring holds share one. Locking
    # generation by generation, ticks deadlocked with each other and with the hot path in about
    # two runs of three; now never. Every settlement answered is the one recorded, nothing is
    # left held, the ledger is clean.
    url, db = own_db
    server = LiveServer(url, db_pool_size=5)
    server.start()
    client = lambda token: http_client(server, token)  # noqa: E731
    try:
        team = await make_team(db, client, creators=2)
        for _ in range(24):  # random ids: a hold's grants are in no particular id order
            await grant(client, team, "2.5")
        creators = [token for token, _ in team.creators]
        gens: list[str] = []
        won: list[tuple[str, str]] = []

        async def start(i):
            async with client(creators[i % 2]) as api:
                out = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
            assert out["__typename"] in ("Generation", "InsufficientCredits"), out
            if out["__typename"] == "Generation":
                gens.append(out["id"])

        async def settle(i, g):
            token, query, kw = ((team.worker, COMPLETE, {}) if i % 3 == 0
                                else (team.operator, FAIL, {"kind": "TECHNICAL"}))
            async with client(token) as api:
                out = next(iter((await api(query, g=g, key=key(), **kw)).values()))
            assert out["__typename"] in ("Generation", "GenerationAlreadySettled"), out
            if out["__typename"] == "Generation":
                won.append((g, out["status"]))

        async def tick(delay, batch):
            await asyncio.sleep(delay)
            report = await periods.tick(db, OffsetClock(), hold_ttl=timedelta(0), batch=batch)
            assert not report.failures, report.failures

        for _ in range(10):
            await asyncio.gather(*(start(i) for i in range(8)))
            await asyncio.gather(*(start(i) for i in range(8)), *(settle(i, g) for i, g in enumerate(gens[-8:])),
                                 *(tick(0.01 * n, 3) for n in range(4)))
        await tick(0, 100)
    finally:
        server.stop()
    statuses = {str(r["id"]): r["status"] for r in await (await db._pool()).fetch(
        "SELECT id, status FROM generations WHERE workspace_id = $1", uuid.UUID(team.ws))}
    assert len(statuses) == len(gens) and "STARTED" not in statuses.values()
    assert len({g for g, _ in won}) == len(won)
    assert all(statuses[g] == status for g, status in won)
    assert await db.fetchrow("SELECT sum(held) FROM grants WHERE workspace_id = $1", uuid.UUID(team.ws)) == (0,)
    await assert_money_clean(db, team.ws)
    assert await deadlocks_once_closed(url, db) == 0


async def test_a_server_stopped_mid_tick_leaves_no_backend_behind_and_its_unit_undone(own_db, caplog):
    # A server whose scheduler is the only thing it has used the database for (no hot-path pool
    # yet, no idle ORM connection) is stopped while its tick times a hold out: the tick has
    # claimed the generation and waits for its grant, locked by another transaction. The unit is
    # rolled back, and nothing of it stays on the database server: the scheduler task used to be
    # cancelled and left to the event loop's teardown, after the pools were disposed, where its
    # connection was dropped without cancelling its statement, and its backend went on waiting
    # for the grant, holding the generation's row lock, until the lock it waited for was freed.
    url, db = own_db
    setup = LiveServer(url, db_pool_size=5)
    setup.start()
    try:
        team = await make_team(db, lambda token: http_client(setup, token), creators=1)
        grant_id = (await grant(lambda token: http_client(setup, token), team, "60"))["id"]
        async with http_client(setup, team.creators[0][0]) as api:
            gen = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]["id"]
    finally:
        setup.stop()
    caplog.set_level(logging.WARNING)
    async with HeldLock(url, "grants", grant_id) as lock:
        server = LiveServer(url, db_pool_size=5, scheduler_interval_seconds=1)
        server.clock.offset = timedelta(hours=2)  # past the hold's time-to-live
        server.start()
        try:
            await lock.waited_on()
        finally:
            await asyncio.to_thread(server.stop)
        assert not server.thread.is_alive()

        async def nothing_waits():
            return await lock.conn.fetchval(
                "SELECT count(*) = 0 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                lock.conn.get_server_pid())
        await until(nothing_waits, seconds=3, what="no backend of the stopped server waiting on the grant")
        # The generation's row is free: another server may settle it at once.
        assert await lock.conn.fetchval("SELECT status FROM generations WHERE id = $1 FOR UPDATE NOWAIT",
                                        uuid.UUID(gen)) == "STARTED"
    row = await db.fetchrow("SELECT held, remaining FROM grants WHERE id = $1", uuid.UUID(grant_id))
    assert (row["held"], row["remaining"]) == (6000, 54000)
    await assert_money_clean(db, team.ws)
    assert not [r for r in caplog.records if "destroyed" in r.getMessage() or r.name == "asyncio"]
