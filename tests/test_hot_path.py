"""The generation hot path's plain SQL (issue 8): a start and a settlement within the hold are one
read and one writing statement outside a transaction; a write planned from a stale read aborts
whole and the transaction path answers exactly; a hold planned from an unlocked, stale read of
the grants is refused by the database and re-planned under lock; the posting statement returns
exactly what it wrote; authentication is one statement, and on the hot mutations no statement of
its own: the first read checks the credentials."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from gql.transport.exceptions import TransportQueryError
from sqlalchemy import text

from domain import identity
from domain.access import Caller, Credentials
from domain.errors import Unauthenticated, Unavailable
from domain.db import Database, RawSql
from domain.ledger import idempotency, service
from domain.ledger.consumption import NotEnough, plan_draws
from domain.ledger.models import Cause, EntryKind, FailureKind, GenerationStatus
from domain.ledger.service import Optimistic, Posting, SpendScope, _spendable_buckets
from policies import Authorizer
from tests.conftest import LiveServer, http_client, new_user, orm_pool_taken
from tests.test_api_governance import SET_LIMIT
from tests.test_api_ledger import COMPLETE, FAIL, START, assert_ledger_clean, balance, grant, key, make_team


class Counted(RawSql):
    """A real connection that remembers the statements sent through it."""

    __slots__ = ("sent",)

    def __init__(self, conn) -> None:
        super().__init__(conn)
        self.sent: list[str] = []

    async def fetch(self, query, *args):
        self.sent.append(query)
        return await super().fetch(query, *args)

    async def fetchrow(self, query, *args):
        self.sent.append(query)
        return await super().fetchrow(query, *args)


async def caller_for(db, token: str) -> Caller:
    return Caller(await identity.authenticate_secret(db, token), Authorizer())


def start_request(team, model: str) -> service.StartRequest:
    return service.StartRequest(ws_id=uuid.UUID(team.ws), key=key(), model_key=model, parameters={},
                                parameters_json="{}", target_id=None)


async def test_a_start_and_a_settlement_within_the_hold_are_one_read_and_one_write_each(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "20")
    creator, _ = team.creators[0]
    pool = await db._pool()
    async with pool.acquire() as conn:
        # The first start also reads the price list (then parsed once per process): count the second.
        await service.reserve_at_once(Counted(conn), await caller_for(db, creator), start_request(team, "test-six"))
        sql = Counted(conn)
        # As the API calls it: with the request's credentials, which the read itself checks.
        credentials = Credentials(creator, Authorizer())
        started = await service.reserve_at_once(sql, credentials, start_request(team, "test-six"))
        assert sql.sent == [service._SPENDER.authenticating, service._RESERVE]
        assert credentials.caller is not None and credentials.caller.actor.is_service is False
        assert not conn.is_in_transaction()  # autocommit: the write committed by itself
        gen = started.result.generation
        assert (gen.status, gen.quoted_units) == (GenerationStatus.STARTED, 6_000)
        assert [(e.kind, e.amount) for e in started.result.entries] == [(EntryKind.HOLD, 6_000)]
        worker = await caller_for(db, team.worker)

        async def capture_four(sql, g, held):
            return GenerationStatus.COMPLETED, 4_000, None

        sql = Counted(conn)
        credentials = Credentials(team.worker, Authorizer())
        done = await service.settle_at_once(sql, credentials, gen.id, key(), "completeGeneration", {"n": 1},
                                            capture_four)
        assert sql.sent == [service._SETTLING_READ.authenticating, service._SETTLE_AT_ONCE]
        assert credentials.caller.actor == worker.actor
        assert not conn.is_in_transaction()
        assert (done.generation.status, done.generation.captured_units, done.generation.released_units) == (
            GenerationStatus.COMPLETED, 4_000, 2_000)
        assert [(e.kind, e.amount) for e in done.entries] == [
            (EntryKind.HOLD, 6_000), (EntryKind.CAPTURE, 4_000), (EntryKind.RELEASE, 2_000)]
        # Settled: a second settlement in one statement writes nothing and leaves it to the
        # transaction path (which refuses it as already settled).
        assert await service.settle_at_once(sql, worker, gen.id, key(), "failGeneration", {"n": 2}, capture_four) is None
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("6.000", "10.000")  # the warm-up start still holds 6
    await assert_ledger_clean(db, team.ws)


async def test_a_one_statement_start_planned_from_a_stale_read_aborts_whole_and_is_answered_exactly(db, client):
    team = await make_team(db, client, creators=1)
    given = await grant(client, team, "10")
    creator, _ = team.creators[0]
    grant_id = uuid.UUID(given["id"])
    locked = asyncio.Event()

    async def drain_while_holding_the_lock(sql):
        # Holds the grant's row lock while the start reads (unlocked: not blocked) and plans 6
        # of 10 credits; its write then waits for this lock. Meanwhile 6 credits expire.
        await sql.fetch("SELECT id FROM grants WHERE id = $1 FOR UPDATE", grant_id)
        locked.set()
        while not (await db.fetchrow(  # another connection: a transaction sees one stats snapshot
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%claim AS%'"
        ))["n"]:
            await asyncio.sleep(0.01)
        posting = Posting(uuid.UUID(team.ws), Cause.EXPIRY, None, None)
        posting.add(grant_id, EntryKind.EXPIRE, 6_000)
        await service.post_movements(sql, posting)

    async def start(k):
        await locked.wait()
        async with client(creator) as api:
            return (await api(START, ws=team.ws, model="test-six", key=k))["startGeneration"]

    k = key()
    _, refused = await asyncio.gather(db.sql_transaction(drain_while_holding_the_lock), start(k))
    # The write saw 4 credits left under the lock: the CHECK refused it, nothing of it stayed
    # (no generation, no claimed key), and the transaction path answered with the exact figures.
    assert (refused["__typename"], refused["needed"], refused["available"]) == ("InsufficientCredits", "6.000", "4.000")
    assert await db.fetchrow("SELECT 1 FROM generations WHERE workspace_id = $1", uuid.UUID(team.ws)) is None
    assert await db.fetchrow("SELECT 1 FROM idempotency_keys WHERE key = $1", k) is None
    await grant(client, team, "10")
    async with client(creator) as api:  # the same key runs afresh once funded
        assert (await api(START, ws=team.ws, model="test-six", key=k))["startGeneration"]["__typename"] == "Generation"
    await assert_ledger_clean(db, team.ws)


async def test_a_workspace_with_spend_limits_and_a_capture_above_the_hold_take_the_transaction(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "20")
    creator, _ = team.creators[0]
    pool = await db._pool()
    async with pool.acquire() as conn:
        started = await service.reserve_at_once(Counted(conn), await caller_for(db, creator),
                                                start_request(team, "test-six"))
        gen = started.result.generation

        async def capture_seven(sql, g, held):
            return None if 7_000 > held else (GenerationStatus.COMPLETED, 7_000, None)

        sql = Counted(conn)
        worker = await caller_for(db, team.worker)
        assert await service.settle_at_once(sql, worker, gen.id, key(), "completeGeneration", {}, capture_seven) is None
        assert sql.sent == [service._SETTLING_READ.known]  # decided from the read; nothing written
    async with client(team.worker) as api:  # the transaction path draws the extra
        out = (await api(COMPLETE, g=str(gen.id), key=key(), cost="7"))["completeGeneration"]
    assert (out["captured"], out["shortfall"]) == ("7.000", "0.000")
    async with client(team.owner) as api:
        out = (await api(SET_LIMIT, ws=team.ws, scope="WORKSPACE", period="MONTH", amount="100", action="BLOCK",
                         member=None))["setSpendLimit"]
    assert out["__typename"] == "SpendLimit", out
    used = await db.fetchrow("SELECT used_units FROM limit_usage WHERE limit_id = $1", uuid.UUID(out["id"]))
    assert used["used_units"] == 7_000  # the month's spend before the limit was set
    async with pool.acquire() as conn:
        sql = Counted(conn)
        assert await service.reserve_at_once(sql, await caller_for(db, creator), start_request(team, "test-six")) is None
        assert sql.sent == [service._SPENDER.known]
    async with client(creator) as api:
        assert (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]["__typename"] == "Generation"
    used = await db.fetchrow("SELECT used_units FROM limit_usage WHERE limit_id = $1", uuid.UUID(out["id"]))
    assert used["used_units"] == 13_000  # 6 more, charged by the transaction path
    await assert_ledger_clean(db, team.ws)


async def test_a_hold_planned_from_a_stale_read_is_refused_by_the_database_and_retried_under_lock(db, client):
    team = await make_team(db, client, creators=1)
    given = await grant(client, team, "10")
    ws = uuid.UUID(team.ws)
    creator, member = team.creators[0]
    effective = datetime.fromisoformat(given["effectiveAt"])
    optimistic = Optimistic()
    attempts: list[bool] = []
    other: list[dict] = []

    async def work(sql):
        attempts.append(optimistic.lock_first)
        rows = await optimistic.spendable(sql, ws, SpendScope(pool=True), effective)
        if not other:
            # After our unlocked read, another start takes 6 of the 10 credits and commits
            # (it does not wait for us: we hold no lock on the grant).
            async with client(creator) as api:
                other.append((await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"])
        try:
            draws = plan_draws(_spendable_buckets(rows), 6_000, effective)
        except NotEnough as short:
            return ("refused", short.needed, short.available)
        posting = Posting(ws, Cause.ADJUSTMENT, None, None, member_id=uuid.UUID(member), occurred_at=effective)
        for d in draws:
            posting.add(d.grant_id, EntryKind.HOLD, d.units)
        await optimistic.post(sql, posting)  # 10 read, 4 left: the CHECK constraint refuses it
        return ("held",)

    outcome = await db.sql_transaction(work)
    assert other[0]["__typename"] == "Generation"
    # First attempt planned from the stale read; the retry locked first and saw the 4 credits left.
    assert attempts == [False, True]
    assert outcome == ("refused", 6_000, 4_000)
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("6.000", "4.000")
    await assert_ledger_clean(db, team.ws)


async def test_the_posting_statement_returns_the_grants_and_entries_it_wrote(db, client):
    team = await make_team(db, client, creators=1)
    first = await grant(client, team, "3", priority=1)
    second = await grant(client, team, "10", priority=2)
    creator, member = team.creators[0]
    async with client(creator) as api:  # test-six: 6 credits, 3 from the first grant, 3 from the second
        out = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
    assert out["__typename"] == "Generation"
    assert [(h["grant"]["id"], h["held"]) for h in out["holds"]] == [(first["id"], "3.000"), (second["id"], "3.000")]
    # The same figures as a fresh read of the database.
    rows = await db.fetchrow(
        "SELECT array_agg(remaining ORDER BY priority) AS remaining, array_agg(held ORDER BY priority) AS held "
        "FROM grants WHERE workspace_id = $1", uuid.UUID(team.ws))
    assert (rows["remaining"], rows["held"]) == ([0, 7_000], [3_000, 3_000])
    await assert_ledger_clean(db, team.ws)


async def test_authentication_refreshes_last_used_at_most_once_a_minute_in_one_statement(db):
    email, secret = await new_user(db)
    actor = await identity.authenticate_secret(db, secret)
    assert actor is not None
    assert await db.fetchrow("SELECT 1 FROM users WHERE id = $1 AND email = $2", actor.user_id, email) is not None
    touched = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert touched["last_used_at"] is not None
    await identity.authenticate_secret(db, secret)
    again = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert again["last_used_at"] == touched["last_used_at"]  # within the minute: a pure read
    await db.fetchrow("UPDATE api_tokens SET last_used_at = last_used_at - interval '61 seconds' WHERE id = $1",
                      actor.token_id)
    await identity.authenticate_secret(db, secret)  # over a minute old: refreshed to now
    later = await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE id = $1", actor.token_id)
    assert later["last_used_at"] > touched["last_used_at"] - timedelta(seconds=1)
    assert await identity.authenticate_secret(db, secret + "x") is None
    await db.fetchrow("UPDATE api_tokens SET revoked_at = now() WHERE id = $1", actor.token_id)
    assert await identity.authenticate_secret(db, secret) is None


async def test_a_cancelled_first_use_of_the_hot_path_pool_does_not_break_later_requests(database_url):
    fresh = Database(database_url, pool_size=2)
    try:
        first = asyncio.ensure_future(fresh.fetchrow("SELECT 1 AS one"))
        await asyncio.sleep(0)  # the pool is being created
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await fresh.fetchrow("SELECT 1 AS one"))["one"] == 1
    finally:
        await fresh.dispose()


async def test_the_hot_path_pool_reads_url_options_as_the_engine_does(database_url):
    # `ssl` is SQLAlchemy's spelling for asyncpg; passed on raw it would be sent as a server setting.
    url = database_url + ("&" if "?" in database_url else "?") + "ssl=disable"
    both = Database(url, pool_size=1)
    try:
        assert await both.read(lambda s: s.scalar(text("SELECT 1"))) == 1
        assert (await both.fetchrow("SELECT 2 AS two"))["two"] == 2
    finally:
        await both.dispose()


async def test_concurrent_starts_on_one_pool_share_statements_and_every_money_rule_holds(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "330")
    creator, _ = team.creators[0]
    caller = await caller_for(db, creator)
    holds = db.coalescer("holds", service.write_holds)

    async def start(k):
        try:
            return (await service.start_generation(db, caller, workspace_id=team.ws, model_key="test-six",
                                                   idempotency_key=k, hold_ttl=timedelta(hours=1))).generation.id
        except Exception as exc:  # noqa: BLE001 - the refusals are the point
            return type(exc).__name__

    keys = [key() for _ in range(40)]
    first = await asyncio.gather(*(start(k) for k in keys))
    assert len(set(first)) == 40 and all(isinstance(g, uuid.UUID) for g in first)
    assert holds.items >= 40 and holds.batches < holds.items  # some starts shared a statement
    # Replays mixed with new starts: a batch holding a used key aborts whole, and each start is
    # answered on its own (the replay with its first generation).
    again = await asyncio.gather(*(start(k) for k in keys[:10] + [key() for _ in range(10)]))
    assert again[:10] == first[:10] and len(set(again[10:]) - set(first)) == 10
    # 30 credits left, ten concurrent starts of 6: exactly five are held.
    last = await asyncio.gather(*(start(key()) for _ in range(10)))
    assert sorted(map(str, last)).count("InsufficientCredits") == 5
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("330.000", "0.000")
    assert (await db.fetchrow("SELECT count(*) AS n FROM generations WHERE workspace_id = $1",
                              uuid.UUID(team.ws)))["n"] == 55
    await assert_ledger_clean(db, team.ws)


async def test_concurrent_settlements_in_one_workspace_share_statements_and_each_settles_once(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "240")
    creator, _ = team.creators[0]
    spender, worker = await caller_for(db, creator), await caller_for(db, team.worker)
    gens = [str((await service.start_generation(db, spender, workspace_id=team.ws, model_key="test-six",
                                                idempotency_key=key(), hold_ttl=timedelta(hours=1))).generation.id) for _ in range(40)]
    settlements = db.coalescer("settlements", service.write_settlements)
    rules = service.LedgerRules()

    async def complete(g, k):
        try:
            out = await service.complete_generation(db, worker, generation_id=g, idempotency_key=k)
            return out.generation.status.value, out.generation.captured_units
        except Exception as exc:  # noqa: BLE001 - the refusals are the point
            return type(exc).__name__

    async def fail(g, k):
        out = await service.fail_generation(db, worker, rules, generation_id=g, kind=FailureKind.TECHNICAL,
                                            idempotency_key=k)
        return out.generation.status.value, out.generation.released_units

    keys = {g: key() for g in gens}
    # 25 completions, 5 generations completed twice at once under different keys, 10 failures.
    out = await asyncio.gather(*(complete(g, keys[g]) for g in gens[:30]),
                               *(complete(g, key()) for g in gens[25:30]),
                               *(fail(g, keys[g]) for g in gens[30:]))
    assert out[:25] == [("COMPLETED", 6000)] * 25
    pairs = list(zip(out[25:30], out[30:35]))
    assert all(sorted(map(str, p)) == ["('COMPLETED', 6000)", "GenerationAlreadySettled"] for p in pairs), pairs
    assert out[35:] == [("FAILED", 6000)] * 10
    assert settlements.items >= 30 and settlements.batches < settlements.items  # some shared a statement
    # Replays answer with the first result, through whichever path.
    again = await asyncio.gather(*(complete(g, keys[g]) for g in gens[:10]))
    assert again == [("COMPLETED", 6000)] * 10
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("0.000", str(240 - 30 * 6) + ".000")
    rows = await db.fetchrow("SELECT count(*) FILTER (WHERE kind = 'CAPTURE') AS captures, "
                             "count(*) FILTER (WHERE kind = 'RELEASE') AS releases FROM ledger_entries "
                             "WHERE workspace_id = $1", uuid.UUID(team.ws))
    assert (rows["captures"], rows["releases"]) == (30, 10)  # each generation settled exactly once
    await assert_ledger_clean(db, team.ws)


async def test_a_settlement_batch_naming_a_settled_generation_writes_nothing_at_all(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "20")
    creator, member = team.creators[0]
    async with client(creator) as api:
        live, done = [(await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
                      for _ in range(2)]
    async with client(team.operator) as api:
        await api(FAIL, g=done["id"], key=key(), kind="TECHNICAL")
    worker = await caller_for(db, team.worker)
    now = worker.clock.now()

    def settlement(gen) -> service._Settlement:
        gid, k = uuid.UUID(gen["id"]), key()
        posting = Posting(uuid.UUID(team.ws), Cause.GENERATION, worker.actor.user_id, k, generation_id=gid,
                          member_id=uuid.UUID(member), occurred_at=now)
        posting.add(uuid.UUID(gen["holds"][0]["grant"]["id"]), EntryKind.CAPTURE, 6000)
        claim = idempotency.claim_args(workspace_id=uuid.UUID(team.ws), actor_id=worker.actor.user_id, key=k,
                                       operation="completeGeneration", request={}, result_id=gid)
        return service._Settlement((gid, "COMPLETED", 6000, 0, 0, None, now, worker.actor.user_id), claim, posting)

    pool = await db._pool()
    async with pool.acquire() as conn:
        sql = RawSql(conn)
        assert await service.write_settlements(sql, [settlement(live), settlement(done)]) == [None, None]
        b = await balance(client, team.owner, team.ws)
        assert (b["held"], b["available"]) == ("6.000", "14.000")  # the live one still holds; nothing captured
        assert (await db.fetchrow("SELECT status FROM generations WHERE id = $1", uuid.UUID(live["id"])))[0] \
            == "STARTED"
        assert (await db.fetchrow("SELECT count(*) FROM idempotency_keys WHERE operation = 'completeGeneration' "
                                  "AND workspace_id = $1", uuid.UUID(team.ws)))[0] == 0
        [settled] = await service.write_settlements(sql, [settlement(live)])  # alone it settles
    assert (settled.generation.status, settled.generation.captured_units) == (GenerationStatus.COMPLETED, 6000)
    assert [e.kind for e in settled.entries] == [EntryKind.CAPTURE]
    await assert_ledger_clean(db, team.ws)


class Interleaved(Counted):
    """Runs `between` (another request, on its own connection) after the first statement."""

    __slots__ = ("between",)

    def __init__(self, conn, between) -> None:
        super().__init__(conn)
        self.between = between

    async def fetchrow(self, query, *args):
        if self.sent:
            await self.between()
        return await super().fetchrow(query, *args)


async def test_a_one_statement_settlement_of_a_generation_settled_since_its_read_writes_nothing(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "10")
    creator, _ = team.creators[0]
    async with client(creator) as api:
        gen = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
    failed = []

    async def fail_it():  # the operator fails it through the API between our read and our write
        async with client(team.operator) as api:
            failed.append((await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"])

    async def capture_all(sql, g, held):
        return GenerationStatus.COMPLETED, held, None

    k = key()
    pool = await db._pool()
    async with pool.acquire() as conn:
        sql = Interleaved(conn, fail_it)
        worker = await caller_for(db, team.worker)
        assert await service.settle_at_once(sql, worker, uuid.UUID(gen["id"]), k, "completeGeneration", {},
                                            capture_all) is None
        assert sql.sent == [service._SETTLING_READ.known, service._SETTLE_AT_ONCE]  # it did try to write
    assert failed[0]["status"] == "FAILED"
    assert await db.fetchrow("SELECT 1 FROM idempotency_keys WHERE key = $1", k) is None  # not claimed
    kinds = await db.fetchrow("SELECT array_agg(kind ORDER BY id) AS k FROM ledger_entries WHERE generation_id = $1",
                              uuid.UUID(gen["id"]))
    assert kinds["k"] == ["HOLD", "RELEASE"]  # nothing captured by the late settlement
    async with client(team.worker) as api:  # through the API the late one is refused as settled
        late = (await api(COMPLETE, g=gen["id"], key=k))["completeGeneration"]
    assert late["__typename"] == "GenerationAlreadySettled"
    await assert_ledger_clean(db, team.ws)


async def test_the_hot_mutations_refuse_unknown_malformed_and_revoked_secrets_whatever_the_input(db, client):
    # The hot mutations check the secret inside their first read: an unknown, malformed or
    # revoked one hears UNAUTHENTICATED exactly as before, even with bad input or an unknown id,
    # and nothing is written.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "20")
    creator, _ = team.creators[0]
    async with client(creator) as api:
        gen = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
    user_id = (await identity.authenticate_secret(db, creator)).user_id
    _, revoked = await db.transaction(lambda s: identity.issue_token(s, user_id, "to revoke"))
    await db.fetchrow("UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1", identity.hash_token(revoked))
    before = await db.fetchrow(
        "SELECT (SELECT count(*) FROM generations) AS generations, (SELECT count(*) FROM idempotency_keys) AS keys, "
        "(SELECT count(*) FROM ledger_entries) AS entries")
    calls = [
        (START, {"ws": team.ws, "model": "test-six", "key": key()}),
        (START, {"ws": team.ws, "model": "test-six", "key": ""}),  # bad input
        (START, {"ws": str(uuid.uuid4()), "model": "test-six", "key": key()}),  # unknown workspace
        (COMPLETE, {"g": gen["id"], "key": key()}),
        (COMPLETE, {"g": "not-an-id", "key": key()}),
        (FAIL, {"g": gen["id"], "key": key(), "kind": "TECHNICAL"}),
    ]
    answers = set()
    for secret in (identity.new_secret(), "cp_" + "x" * 300, "not-a-token", revoked):
        async with client(secret) as api:
            for query, variables in calls:
                with pytest.raises(TransportQueryError) as err:
                    await api(query, **variables)
                [error] = err.value.errors
                answers.add((error["message"], error["extensions"]["code"]))
    assert answers == {("authentication required", "UNAUTHENTICATED")}
    pool = await db._pool()
    async with pool.acquire() as conn:  # the same refusal from the domain layer, by the read itself
        credentials = Credentials(identity.new_secret(), Authorizer())
        sql = Counted(conn)
        with pytest.raises(Unauthenticated):
            await service.reserve_at_once(sql, credentials, start_request(team, "test-six"))
        assert sql.sent == [service._SPENDER.authenticating] and credentials.caller is None
    after = await db.fetchrow(
        "SELECT (SELECT count(*) FROM generations) AS generations, (SELECT count(*) FROM idempotency_keys) AS keys, "
        "(SELECT count(*) FROM ledger_entries) AS entries")
    assert after == before
    status = await db.fetchrow("SELECT status FROM generations WHERE id = $1", uuid.UUID(gen["id"]))
    assert status["status"] == "STARTED"


async def test_a_hot_mutation_with_a_fresh_token_authenticates_in_its_read_and_marks_the_token_used(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "20")
    creator, member = team.creators[0]
    user_id = (await identity.authenticate_secret(db, creator)).user_id
    _, fresh = await db.transaction(lambda s: identity.issue_token(s, user_id, "fresh"))
    digest = identity.hash_token(fresh)
    assert (await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE token_hash = $1", digest))[0] is None
    async with client(fresh) as api:
        out = (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]
        assert (out["__typename"], out["memberId"]) == ("Generation", member)
        # A known secret with an unknown workspace: the read found no workspace, not no actor.
        unknown = (await api(START, ws=str(uuid.uuid4()), model="test-six", key=key()))["startGeneration"]
        assert unknown == {"__typename": "NotFoundError", "code": "NOT_FOUND", "message": "workspace not found"}
    assert (await db.fetchrow("SELECT last_used_at FROM api_tokens WHERE token_hash = $1", digest))[0] is not None
    async with client(team.worker) as api:
        done = (await api(COMPLETE, g=out["id"], key=key()))["completeGeneration"]
    assert (done["status"], done["captured"]) == ("COMPLETED", "6.000")
    await assert_ledger_clean(db, team.ws)


async def test_a_grants_balance_updates_are_heap_only_until_it_runs_out(db, client):
    # No index names `remaining` or `held` (the partial indexes read the generated `live`), so a
    # posting that leaves a grant live is a HOT update: no index entry, no bloat on a hot pool
    # grant. Only running out (or refilling) changes an indexed value.
    team = await make_team(db, client, creators=1)
    grant_id = uuid.UUID((await grant(client, team, "10"))["id"])

    counters = ("SELECT pg_stat_get_xact_tuples_updated('grants'::regclass) AS updated, "
                "pg_stat_get_xact_tuples_hot_updated('grants'::regclass) AS hot, "
                "(SELECT live FROM grants WHERE id = $1) AS live")

    def expire(units):
        async def work(sql):
            # The backend's counters may still include earlier, unflushed transactions: compare.
            before = await sql.fetchrow(counters, grant_id)
            posting = Posting(uuid.UUID(team.ws), Cause.EXPIRY, None, None)
            posting.add(grant_id, EntryKind.EXPIRE, units)
            await service.post_movements(sql, posting)
            after = await sql.fetchrow(counters, grant_id)
            return {"updated": after["updated"] - before["updated"], "hot": after["hot"] - before["hot"],
                    "live": after["live"]}
        return db.sql_transaction(work)

    assert await expire(4_000) == {"updated": 1, "hot": 1, "live": True}
    assert await expire(6_000) == {"updated": 1, "hot": 0, "live": False}
    await assert_ledger_clean(db, team.ws)


async def test_a_request_that_finds_no_free_connection_in_time_is_refused_as_unavailable(db, client, database_url):
    # One hot-path connection: a start stuck behind a row lock keeps it; the next request waits
    # `db_acquire_timeout_seconds`, then hears UNAVAILABLE, having written nothing, and its retry
    # with the same key succeeds once connections are free.
    team = await make_team(db, client, creators=1)
    grant_id = uuid.UUID((await grant(client, team, "20"))["id"])
    creator, _ = team.creators[0]
    small = LiveServer(database_url, db_pool_size=1, db_acquire_timeout_seconds=0.3)
    small.start()
    locked, release = asyncio.Event(), asyncio.Event()

    async def hold_the_grant(sql):
        await sql.fetch("SELECT id FROM grants WHERE id = $1 FOR UPDATE", grant_id)
        locked.set()
        await release.wait()

    async def first_start():
        await locked.wait()
        async with http_client(small, creator) as api:
            return (await api(START, ws=team.ws, model="test-six", key=key()))["startGeneration"]

    try:
        holder = asyncio.ensure_future(db.sql_transaction(hold_the_grant))
        first = asyncio.ensure_future(first_start())
        while not (await db.fetchrow(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%claim AS%'"
        ))["n"]:
            await asyncio.sleep(0.01)
        k = key()
        async with http_client(small, creator) as api:
            with pytest.raises(TransportQueryError) as err:
                await api(START, ws=team.ws, model="test-six", key=k)
        [error] = err.value.errors
        assert (error["message"], error["extensions"]) == ("the service is busy: try again", {"code": "UNAVAILABLE"})
        assert await db.fetchrow("SELECT 1 FROM idempotency_keys WHERE key = $1", k) is None
        release.set()
        await holder
        assert (await first)["__typename"] == "Generation"
        async with http_client(small, creator) as api:
            retried = (await api(START, ws=team.ws, model="test-six", key=k))["startGeneration"]
        assert retried["__typename"] == "Generation"
    finally:
        release.set()
        small.stop()
    b = await balance(client, team.owner, team.ws)
    assert (b["held"], b["available"]) == ("12.000", "8.000")
    await assert_ledger_clean(db, team.ws)


async def test_the_orm_pool_refuses_as_unavailable_too(database_url):
    async with orm_pool_taken(database_url) as (tiny, release):
        with pytest.raises(Unavailable):
            await tiny.read(lambda s: s.execute(text("SELECT 1")))
        with pytest.raises(Unavailable):
            await tiny.transaction(lambda s: s.execute(text("SELECT 1")))
        await release()
        assert await tiny.read(lambda s: s.scalar(text("SELECT 2"))) == 2
