"""Live streams survive the loss of the process's listening connection.

A process hears every workspace's changes through ONE connection (PostgreSQL LISTEN, or a Redis
pub/sub connection). It used to be that once it was lost (PostgreSQL restarted, the backend
terminated, the peer gone), every open stream silently heard nothing more and new ones never
started, until the process restarted: a dashboard showed a stale balance as if it were live.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid

import asyncpg
import pytest
from gql.transport.exceptions import TransportQueryError

from api.live import LiveHub, listener_name
from domain import events, identity
from domain.access import Caller
from domain.clock import SystemClock
from domain.errors import LiveInterrupted
from policies import Authorizer
from tests.conftest import LiveServer, asyncpg_dsn, http_client, ws_client
from tests.test_api_ledger import START, grant, key, make_team
from tests.test_api_live import BALANCES, EVENTS, REDIS_ENV, last_balance, next_within

# This process's listening connection: by the name it gives itself, or (as before it had one)
# by what it last ran.
LISTENERS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND (application_name = $1 OR query ILIKE 'LISTEN%')"""


@contextlib.contextmanager
def serving(database_url: str, **settings):
    """A server whose live updates go through PostgreSQL LISTEN/NOTIFY (or `broadcast_url`)."""
    server = LiveServer(database_url, **{"broadcast_url": "postgres", **settings})
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def listening_pids(database_url: str) -> list[int]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return [r["pid"] for r in await conn.fetch(LISTENERS, listener_name())]
    finally:
        await conn.close()


async def kill_listener(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        killed = await conn.fetch(f"SELECT pg_terminate_backend(pid) FROM ({LISTENERS}) l", listener_name())
    finally:
        await conn.close()
    assert killed, "no listening connection to kill"


async def test_a_balance_stream_goes_on_after_its_listening_connection_is_killed(db, database_url, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["available"] == "100.000"
            await kill_listener(database_url)
            async with http_client(server, token) as api:
                await api(START, ws=team.ws, model="dalle-3", key=key())
            await last_balance(stream, {"available": "90.000", "held": "10.000"})
            async with http_client(server, token) as api:
                await api(START, ws=team.ws, model="sdxl", key=key())
            await last_balance(stream, {"available": "85.000", "held": "15.000"})
            await stream.aclose()


async def test_a_change_whose_notification_was_lost_reaches_the_balance_stream_after_reconnecting(
        db, database_url, client):
    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["available"] == "100.000"
            # Granted through `client`'s server, whose broadcast is in-process: no NOTIFY reaches
            # ours, exactly like a notification sent while its listening connection was down.
            await grant(client, team, "50")
            pending = asyncio.ensure_future(next_within(stream, 15))
            await asyncio.sleep(1)
            assert not pending.done(), "the grant reached this server after all"
            await kill_listener(database_url)
            update = (await pending)["balanceChanged"]
            assert (update["available"], update["held"]) == ("150.000", "0.000")
            await stream.aclose()


async def test_streams_opened_after_the_listening_connection_was_killed_work(db, database_url, client):
    team = await make_team(db, client, creators=1)
    other = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws, ws_client(server, other.owner) as elsewhere:
            # The process is listening (on another workspace) when its connection is killed.
            warm = elsewhere.subscribe(BALANCES, ws=other.ws)
            await next_within(warm, 5)
            await kill_listener(database_url)
            balances, events_ = ws.subscribe(BALANCES, ws=team.ws), ws.subscribe(EVENTS, ws=team.ws)
            assert (await next_within(balances, 10))["balanceChanged"]["available"] == "100.000"
            pending = asyncio.ensure_future(next_within(events_, 10))
            await asyncio.sleep(0.3)  # the event stream is listening before anything happens
            async with http_client(server, token) as api:
                gen = (await api(START, ws=team.ws, model="dalle-3", key=key()))["startGeneration"]
            await last_balance(balances, {"available": "90.000", "held": "10.000"})
            event = (await pending)["workspaceEvents"]
            assert (event["kind"], event["payload"]["generationId"]) == ("GENERATION_STARTED", gen["id"])
            for s in (balances, events_, warm):
                await s.aclose()


async def test_an_event_stream_ends_with_live_interrupted_when_events_may_have_been_missed(
        db, database_url, client):
    team = await make_team(db, client, creators=0)
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(EVENTS, ws=team.ws)
            pending = asyncio.ensure_future(next_within(stream, 10))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await kill_listener(database_url)
            with pytest.raises(TransportQueryError) as err:
                await pending
    assert time.monotonic() - started < 5
    assert err.value.errors[0]["extensions"]["code"] == "LIVE_INTERRUPTED"
    assert "subscribe again" in err.value.errors[0]["message"]


async def test_a_listening_connection_that_stops_answering_is_replaced(db, database_url, client):
    # The peer vanished without closing the connection (a frozen host, a dropped route): nothing
    # reports the loss, so a probe that goes unanswered must. A stopped backend process is such
    # a peer; only possible where this process may signal the server's processes.
    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    with serving(database_url, live_probe_seconds=1) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["available"] == "100.000"
            await asyncio.sleep(0.3)  # the listener is idle, holding nothing, when it stops
            [pid] = await listening_pids(database_url)
            try:
                os.kill(pid, signal.SIGSTOP)
            except (PermissionError, ProcessLookupError):
                pytest.skip("the PostgreSQL server's processes are out of this process's reach")
            try:
                await grant(client, team, "50")  # no NOTIFY reaches this server (see above)
                await last_balance(stream, {"available": "150.000", "held": "0.000"}, seconds=15)
            finally:
                os.kill(pid, signal.SIGCONT)
            await stream.aclose()


async def test_reconnecting_waits_and_retries_until_the_backend_answers_then_listens_again():
    # No database: a backend whose listening connection cannot be replaced twice (the server
    # still restarting), then can.
    from broadcaster._backends.memory import MemoryBackend

    from api.live import _Broadcast, _Reconnecting

    class Restarting(MemoryBackend, _Reconnecting):
        def __init__(self) -> None:
            super().__init__("memory://")
            self.lost, self.refusals, self.listens = asyncio.Event(), 2, []

        async def reconnect(self) -> None:
            self.lost.clear()
            if self.refusals:
                self.refusals -= 1
                raise ConnectionRefusedError("the database system is starting up")
            self._subscribed.clear()  # a new connection listens to nothing

        async def subscribe(self, channel: str) -> None:
            self.listens.append(channel)
            await super().subscribe(channel)

    backend = Restarting()
    broadcast = _Broadcast(backend=backend, probe_every=60)
    reconnected = asyncio.Event()
    broadcast.on_reconnect = reconnected.set
    await broadcast.connect()
    try:
        async with broadcast.subscribe("ch") as subscriber:
            backend.lost.set()
            await asyncio.wait_for(reconnected.wait(), 15)
            assert (backend.refusals, backend.listens, broadcast.losses) == (0, ["ch", "ch"], 1)
            await broadcast.publish("ch", "after")
            assert (await asyncio.wait_for(subscriber.get(), 5)).message == "after"
    finally:
        await broadcast.disconnect()


@pytest.mark.skipif(not os.environ.get(REDIS_ENV), reason=f"{REDIS_ENV} names no Redis (.ci/run sets it when one answers)")
async def test_a_balance_stream_goes_on_after_its_redis_connection_is_killed(db, database_url, client):
    from redis import asyncio as redis

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    with serving(database_url, broadcast_url=os.environ[REDIS_ENV]) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["available"] == "100.000"
            await grant(client, team, "50")  # published in `client`'s process only: never reaches ours
            admin = redis.Redis.from_url(os.environ[REDIS_ENV])
            try:  # only this process's pub/sub connection: the Redis may be shared
                ours = [c["id"] for c in await admin.client_list(_type="pubsub") if c["name"] == listener_name()]
                assert ours, "no pub/sub connection to kill"
                for client_id in ours:
                    await admin.client_kill_filter(_id=client_id)
            finally:
                await admin.aclose()
            await last_balance(stream, {"available": "150.000", "held": "0.000"})
            async with http_client(server, token) as api:
                await api(START, ws=team.ws, model="dalle-3", key=key())
            await last_balance(stream, {"available": "140.000", "held": "10.000"})
            await stream.aclose()


# --- a message nobody can read, a watcher that stops ---------------------------------------------

async def notify(database_url: str, ws: str, payload: str) -> None:
    """What anyone who may connect to the database can do (or a process of another version)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("SELECT pg_notify($1, $2)", events.channel(uuid.UUID(ws)), payload)
    finally:
        await conn.close()


async def test_a_message_that_is_no_list_of_events_does_not_stop_the_balance_stream(db, database_url, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["available"] == "100.000"
            for payload in ("not json", '{"kind": "BALANCE_CHANGED"}', "[1]"):
                await notify(database_url, team.ws, payload)
            # It used to kill the workspace's watcher (a JSON error in its reading task): the
            # stream then heard nothing more, and a new one never got its first value.
            async with http_client(server, token) as api:
                await api(START, ws=team.ws, model="dalle-3", key=key())
            await last_balance(stream, {"available": "90.000", "held": "10.000"})
            another = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(another, 5))["balanceChanged"]["available"] == "90.000"
            for s in (stream, another):
                await s.aclose()


async def test_an_event_stream_ends_with_live_interrupted_on_a_message_it_cannot_read(db, database_url, client):
    team = await make_team(db, client, creators=0)
    with serving(database_url) as server:
        async with ws_client(server, team.owner) as ws:
            stream = ws.subscribe(EVENTS, ws=team.ws)
            pending = asyncio.ensure_future(next_within(stream, 10))
            await asyncio.sleep(0.3)  # listening
            await notify(database_url, team.ws, "not json")
            with pytest.raises(TransportQueryError) as err:
                await pending  # was INTERNAL: what the message said is lost, as after a lost connection
    assert err.value.errors[0]["extensions"]["code"] == "LIVE_INTERRUPTED"


async def test_balance_streams_of_a_watcher_that_stopped_end_instead_of_waiting_forever(db, client):
    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    caller = Caller(await identity.authenticate_secret(db, team.owner), Authorizer())
    hub = LiveHub(db, "memory://", SystemClock(), recheck=60)
    await hub.start()
    try:
        # A fault in the broadcast (here: listening refused for any reason but a lost connection)
        # kills the workspace's watcher before it listens.
        backend = hub.broadcast._backend

        async def refused(channel: str) -> None:
            raise RuntimeError("refused")

        backend.subscribe = refused
        stream = hub.balances(caller, team.ws, team.owner)
        with pytest.raises(LiveInterrupted):
            await asyncio.wait_for(stream.__anext__(), 5)  # used to wait for its first value forever
        assert uuid.UUID(team.ws) not in hub._watchers
        del backend.subscribe  # the fault is gone: a new stream gets a new watcher
        again = hub.balances(caller, team.ws, team.owner)
        assert (await asyncio.wait_for(again.__anext__(), 5)).available == 100_000
        await again.aclose()
    finally:
        await hub.stop()
