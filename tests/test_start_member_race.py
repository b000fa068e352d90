"""A generation start racing a member change (removeMember, changeMemberSeat to STANDARD) never
creates a generation, or holds credits, for someone who is no longer a creator member.

A start reads its payer (the member, their role and seat) in one statement and writes the hold in
a later one (the one-statement write, or the transaction path under spend limits). A change
committed between the two used to go unseen: the generation's foreign key takes only KEY SHARE on
the member row, which waits for the change's lock but then finds the row (removed or not, it is
still there), so the write went through. Real requests through the real server; the change is
held open mid-transaction (it has written the member row and waits to write its audit entry,
whose foreign key to the acting owner waits on a lock held by a second connection), or the
start's write waits on an uncommitted claim of its own key. Each test here failed on the code it
was written against (a generation and a hold for the removed or standard member)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from gql.transport.exceptions import TransportQueryError

from tests.conftest import HeldLock
from tests.test_api_governance import SET_LIMIT
from tests.test_api_ledger import START, assert_ledger_clean, grant, key, make_team
from tests.test_hot_path_failures import queued, server_db, until, user_of
from tests.test_hot_path_review import REMOVE, SEAT

ROLE = 'mutation($m: ID!, $r: Role!) { changeMemberRole(input: {memberId: $m, role: $r}) { __typename } }'
# change: (mutation, its extra variables)
MUTATIONS = {
    "removed": (REMOVE, {}),
    "made-standard": (SEAT, {"s": "STANDARD"}),
    "made-admin": (ROLE, {"r": "ADMIN"}),
}
# The changes that leave no creator: what a start for that member answers once it committed.
CHANGES = {"removed": "NotFoundError", "made-standard": "FORBIDDEN"}


async def change_member(client, team, member: str, change: str) -> str:
    query, extra = MUTATIONS[change]
    async with client(team.owner) as api:
        out = await api(query, m=member, **extra)
    return next(iter(out.values()))["__typename"]


async def start(client, token: str, ws: str, k: str, on_behalf_of: str | None = None) -> dict:
    """What a start answers: the result union's member, or a top-level error's code."""
    async with client(token) as api:
        try:
            return (await api(START, ws=ws, model="test-six", key=k, **{"for": on_behalf_of}))["startGeneration"]
        except TransportQueryError as err:
            return {"__typename": err.errors[0]["extensions"]["code"]}


async def waiting_on(conn, pid: int) -> list[int]:
    """The backends waiting for a lock that backend `pid` holds."""
    return await conn.fetchval(
        "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid)


class PausedChange:
    """A member change through the API, held open mid-transaction: it has written the member row
    (which it holds FOR UPDATE, after the workspace row) and waits to insert its audit entry,
    whose foreign key to the acting owner's user row waits on the lock held here. `commit()`
    lets it finish and returns its answer."""

    def __init__(self, db, client, database_url: str, team, member: str, change: str) -> None:
        self.db, self.client, self.url, self.team, self.member, self.change = (
            db, client, database_url, team, member, change)

    async def __aenter__(self) -> PausedChange:
        self.lock = HeldLock(self.url, "users", await user_of(self.db, self.team.owner_member))
        await self.lock.__aenter__()
        self.task = asyncio.ensure_future(change_member(self.client, self.team, self.member, self.change))
        await self.lock.waited_on()
        [self.pid] = await waiting_on(self.lock.conn, self.lock.conn.get_server_pid())
        # Paused past its member row's UPDATE, with both locks held.
        assert "INSERT INTO audit_log" in await self.lock.conn.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", self.pid)
        return self

    async def holds_up(self) -> None:
        """Until another backend waits for a lock the change holds."""
        await until(lambda: self._waited_on(), what="a statement waiting on the member change")

    async def _waited_on(self) -> bool:
        return bool(await waiting_on(self.lock.conn, self.pid))

    async def commit(self) -> str:
        await self.lock.commit()
        return await self.task

    async def __aexit__(self, *exc) -> None:
        await self.lock.__aexit__(*exc)
        if not self.task.done():
            self.task.cancel()


async def generations_of(db, member: str) -> int:
    return (await db.fetchrow("SELECT count(*) AS n FROM generations WHERE member_id = $1", uuid.UUID(member)))["n"]


async def held(db, ws: str) -> int:
    return (await db.fetchrow("SELECT coalesce(sum(held), 0) AS n FROM grants WHERE workspace_id = $1",
                              uuid.UUID(ws)))["n"]


async def claimed(db, k: str) -> bool:
    return await db.fetchrow("SELECT 1 FROM idempotency_keys WHERE key = $1", k) is not None


async def limit_used(db, ws: str) -> int:
    return (await db.fetchrow("SELECT coalesce(sum(u.used_units), 0) AS n FROM limit_usage u "
                              "JOIN spend_limits l ON l.id = u.limit_id WHERE l.workspace_id = $1",
                              uuid.UUID(ws)))["n"]


async def scene(db, client, *, mode: str, path: str, creators: int = 1):
    """A team with 50 credits where its creators can spend them (the pool, or each seat), and
    on the transaction path a workspace spend limit far above anything spent here."""
    team = await make_team(db, client, mode=mode, creators=creators)
    if mode == "PER_SEAT":
        for _, member in team.creators:
            await grant(client, team, "50", member=member)
    else:
        await grant(client, team, "50")
    if path == "transaction":
        async with client(team.owner) as api:
            out = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="MONTH", amount="1000",
                             action="BLOCK"))["setSpendLimit"]
        assert out["__typename"] == "SpendLimit", out
    return team


CASES = [(path, mode, change, "self") for path in ("one-statement", "transaction") for mode in ("POOLED", "PER_SEAT")
         for change in CHANGES] + [(path, "POOLED", change, "worker") for path in ("one-statement", "transaction")
                                   for change in CHANGES]


@pytest.mark.parametrize(("path", "mode", "change", "who"), CASES, ids=["-".join(c) for c in CASES])
async def test_a_start_read_before_a_member_change_committed_and_written_after_is_refused(
        db, client, database_url, path, mode, change, who):
    """The change holds the workspace and member rows and has written the member row; the start
    reads the member as a creator (the change has not committed) and its write waits on the
    change. Once the change commits, the write must see it: the start is refused exactly as a
    start by that member is refused afterwards, and leaves nothing (no generation, no hold, no
    spend counted, its key free)."""
    team = await scene(db, client, mode=mode, path=path)
    token, member = team.creators[0]
    caller, on_behalf_of = (team.worker, member) if who == "worker" else (token, None)
    k = key()
    async with PausedChange(db, client, database_url, team, member, change) as paused:
        starting = asyncio.ensure_future(start(client, caller, team.ws, k, on_behalf_of))
        await paused.holds_up()  # the start has read, and its write waits on the change
        assert not starting.done()
        assert await paused.commit() == "Member"
        answer = await starting
    refused = CHANGES[change]
    assert answer["__typename"] == refused, answer
    assert await generations_of(db, member) == 0
    assert await held(db, team.ws) == 0
    assert await limit_used(db, team.ws) == 0
    assert not await claimed(db, k)
    # Its key was not spent on the refusal: the retry is answered afresh, and alike.
    assert (await start(client, caller, team.ws, k, on_behalf_of))["__typename"] == refused
    await assert_ledger_clean(db, team.ws)


@pytest.mark.parametrize("mode", ["POOLED", "PER_SEAT"])
async def test_a_batch_of_starts_refuses_only_the_one_whose_member_was_removed(
        db, live_server, client, database_url, mode):
    """A's write waits on the paused removal of B; B's and C's starts read meanwhile (B still a
    creator) and queue behind A's write in the server's coalescer. Once the removal commits, A
    writes, then [B, C] are written together: B is refused, C's hold is written."""
    team = await scene(db, client, mode=mode, path="one-statement", creators=3)
    (a_token, a), (b_token, b), (c_token, c) = team.creators
    keys = {name: key() for name in "abc"}
    async with PausedChange(db, client, database_url, team, b, "removed") as paused:
        tasks = {"a": asyncio.ensure_future(start(client, a_token, team.ws, keys["a"]))}
        await paused.holds_up()
        for n, (name, token) in enumerate((("b", b_token), ("c", c_token)), start=1):
            tasks[name] = asyncio.ensure_future(start(client, token, team.ws, keys[name]))
            await queued(live_server, "holds", team.ws, n)
        coalescer = server_db(live_server)._coalescers["holds"]
        counts = coalescer.batches, coalescer.items
        assert await paused.commit() == "Member"
        answers = {name: await task for name, task in tasks.items()}
    assert answers["a"]["__typename"] == "Generation", answers
    assert answers["b"]["__typename"] == "NotFoundError", answers
    assert answers["c"]["__typename"] == "Generation", answers
    # A alone, then B and C in one write.
    assert (coalescer.batches - counts[0], coalescer.items - counts[1]) == (2, 3)
    assert await generations_of(db, b) == 0 and not await claimed(db, keys["b"])
    assert [await generations_of(db, m) for m in (a, c)] == [1, 1]
    assert await held(db, team.ws) == 12_000  # two holds of 6 credits
    await assert_ledger_clean(db, team.ws)


@pytest.mark.parametrize("path", ["one-statement", "transaction"])
@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_member_change_waits_for_a_start_whose_write_has_checked_the_member(
        db, client, database_url, path, change):
    """The other order: the start's write has checked and locked the member (still a creator)
    and waits on the grant's row lock (a busy pool) when the change is asked for. The change
    waits for the start, whose generation is then written, and commits after it. The write
    takes the workspace and member locks before the grants' (the lock order of the README), so
    a change never commits under a write that has planned for the member. (The one-statement
    write used to take them only after the grants, through its foreign keys: the change
    committed meanwhile, and the generation was written for the removed or standard member.)"""
    team = await scene(db, client, mode="POOLED", path=path)
    token, member = team.creators[0]
    grant_id = (await db.fetchrow("SELECT id FROM grants WHERE workspace_id = $1", uuid.UUID(team.ws)))["id"]
    async with HeldLock(database_url, "grants", grant_id) as busy:
        starting = asyncio.ensure_future(start(client, token, team.ws, key()))
        await busy.waited_on()
        [start_pid] = await waiting_on(busy.conn, busy.conn.get_server_pid())
        changing = asyncio.ensure_future(change_member(client, team, member, change))
        await until(lambda: _waits_on(busy.conn, start_pid), what="the change waiting on the start")
        assert not changing.done()
        await busy.commit()
        answer = await starting
    assert answer["__typename"] == "Generation", answer
    assert await changing == "Member"
    assert await generations_of(db, member) == 1 and await held(db, team.ws) == 6_000
    await assert_ledger_clean(db, team.ws)


async def _waits_on(conn, pid: int) -> bool:
    return bool(await waiting_on(conn, pid))


@pytest.mark.parametrize("path", ["one-statement", "transaction"])
async def test_a_start_racing_a_change_that_leaves_the_member_a_creator_goes_through(
        db, client, database_url, path):
    """The write compares the role and seat its read authorized, not a rule of its own: a role
    change (to admin, a creator still) racing the start makes the write find another role, and
    the start is decided again on the member as they are now (the transaction path), which the
    policy lets generate. One generation, one hold."""
    team = await scene(db, client, mode="POOLED", path=path)
    token, member = team.creators[0]
    async with PausedChange(db, client, database_url, team, member, "made-admin") as paused:
        starting = asyncio.ensure_future(start(client, token, team.ws, key()))
        await paused.holds_up()
        assert await paused.commit() == "Member"
        answer = await starting
    assert answer["__typename"] == "Generation", answer
    assert await generations_of(db, member) == 1 and await held(db, team.ws) == 6_000
    await assert_ledger_clean(db, team.ws)
