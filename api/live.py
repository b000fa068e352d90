"""Live balances and workspace events over GraphQL subscriptions, across processes.

Transport between processes is the `broadcaster` library: one channel per workspace, on
PostgreSQL LISTEN/NOTIFY (several workers, no extra service), in-process memory (one worker), or
Redis. Inside a process, `LiveHub` keeps one watcher per watched workspace:

- a balance signal marks the workspace dirty; after a short debounce the watcher reads the
  committed balance once and hands it to every local subscriber, who keeps only the newest
  (coalescing). The read always happens after the last signal, so the last balance a subscriber
  receives equals the committed one;
- workspace events are passed through in the order the channel delivers them (commit order with
  NOTIFY, which is sent inside the committing transaction).

Every stream re-checks its token and membership every `recheck` seconds and ends when either
is gone, so a removed member's or a revoked token's streams stop within seconds.

A process listens through ONE connection (PostgreSQL's LISTEN, or Redis's SUBSCRIBE). When it is
lost (the server restarted, the backend was terminated, a network failure), `_Broadcast` notices
(PostgreSQL: the connection's termination callback, a LISTEN that fails, or a probe that goes
unanswered; Redis: its reader task ending), reconnects with backoff, listens again on every
channel that still has subscribers, and calls `LiveHub._resync`. What was committed meanwhile
was never delivered and is not replayed, so balance streams re-read the committed balance and
event streams end with `LIVE_INTERRUPTED` (see `LiveHub.workspace_events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import strawberry
from broadcaster import Broadcast
from broadcaster._backends.postgres import PostgresBackend
from broadcaster._base import Subscriber
from strawberry.scalars import JSON
from strawberry.types import Info
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from api.context import Context
from api.ledger import ScopeBalance
from domain import events, identity
from domain.access import Caller, authorize, parse_id
from domain.clock import Clock
from domain.db import Database, dsn_url
from domain.errors import LiveInterrupted, Unauthenticated
from domain.events import EventOutlet, NotifyOutlet, PublishOutlet
from domain.ledger import queries
from domain.money import format_credits
from domain.workspaces.models import Member
from policies import Action

log = logging.getLogger("creditpool.live")


def broadcast_url(setting: str, database_url: str, workers: int) -> str:
    """`auto`: in-process for one worker, PostgreSQL LISTEN/NOTIFY for several."""
    if setting == "auto":
        setting = "memory://" if workers == 1 else "postgres"
    if setting == "postgres":
        return dsn_url(database_url)  # asyncpg's own DSN: libpq's `sslmode`, not SQLAlchemy's `ssl`
    return setting


def listener_name() -> str:
    """How this process's listening connection names itself (PostgreSQL's `application_name`,
    Redis's client name), so operators and tests can tell it from the pool's connections."""
    return f"creditpool-live-{os.getpid()}"


class _Reconnecting:
    """What `_Broadcast` needs of a backend to survive the loss of its listening connection."""

    lost: asyncio.Event  # set when the listening connection is gone

    def alive(self) -> bool:
        return True

    async def probe(self) -> None:
        """Returns if the listening connection answers (the caller bounds how long it may take)."""

    def abort(self) -> None:
        """Drop a listening connection that no longer answers; its loss is reported as any other."""

    async def reconnect(self) -> None:
        """Replace the listening connection with a new one, subscribed to nothing yet."""
        raise NotImplementedError


class _Postgres(PostgresBackend, _Reconnecting):
    """broadcaster 0.3's LISTEN/NOTIFY backend, whose one connection reports its own loss (asyncpg
    calls termination listeners when the server closes it) and can be replaced. The queue the
    broadcast's reader waits on stays the same across connections."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.lost = asyncio.Event()

    async def connect(self) -> None:
        self._listen_queue = asyncio.Queue()
        self._conn = await self._open()

    async def _open(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._url, server_settings={"application_name": listener_name()})
        conn.add_termination_listener(self._terminated)
        return conn

    def _terminated(self, _conn: asyncpg.Connection) -> None:
        self.lost.set()

    async def disconnect(self) -> None:
        self._conn.remove_termination_listener(self._terminated)  # a close we asked for is no loss
        await self._conn.close()

    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def probe(self) -> None:
        await self._conn.fetchval("SELECT 1")

    def abort(self) -> None:
        self._conn.terminate()

    async def reconnect(self) -> None:
        self.lost.clear()
        old, self._conn = self._conn, await self._open()
        old.remove_termination_listener(self._terminated)
        old.terminate()


class _Broadcast(Broadcast):
    """broadcaster 0.3's `subscribe` asks "is anyone here listening to this channel?", awaits the
    backend's subscribe, and only then records its listener. Two streams opening at once (a
    dashboard's balance and events, or two workspaces' streams) both subscribed the backend:
    PostgreSQL's one listening connection refuses a second LISTEN while one is in progress
    (asyncpg: "another operation is in progress"), and for one channel the second listener
    replaced the first, which then heard nothing. Here the backend's (un)subscribing is
    serialized, and a channel is unsubscribed only if nobody subscribed to it again meanwhile.

    broadcaster 0.3 also never reconnects: once its listening connection was lost, every stream
    heard nothing more, silently, until the process restarted. With a `_Reconnecting` backend a
    supervisor task waits for the loss (and probes the connection every `probe_every` seconds, for
    a peer that vanished without closing it), then, holding the same lock, reconnects with
    backoff, listens again on every channel that has subscribers, counts the loss in `losses` and
    calls `on_reconnect`. Subscribing meanwhile waits for the new connection."""

    def __init__(self, url: str | None = None, *, backend=None, probe_every: float = 15.0) -> None:
        super().__init__(url, backend=backend)
        self._changing = asyncio.Lock()
        self.probe_every = probe_every
        self.losses = 0  # listening connections lost so far
        self.on_reconnect: Callable[[], None] = lambda: None
        self._supervisor: asyncio.Task | None = None

    async def connect(self) -> None:
        await super().connect()
        if isinstance(self._backend, _Reconnecting):
            self._supervisor = asyncio.create_task(self._supervise())

    async def disconnect(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await super().disconnect()

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscriber]:
        queue: asyncio.Queue = asyncio.Queue()
        async with self._changing:
            if not self._subscribers.get(channel):
                try:
                    await self._backend.subscribe(channel)
                except Exception:
                    if not isinstance(self._backend, _Reconnecting) or self._backend.alive():
                        raise
                    # The connection died before anyone noticed: the reconnect listens on this
                    # channel with the others.
                    log.warning("live: could not listen on %s, the listening connection is gone", channel)
                    self._backend.lost.set()
            self._subscribers.setdefault(channel, set()).add(queue)
        try:
            yield Subscriber(queue)
        finally:
            # Off the table at once (no await: a second cancellation cannot leave it there).
            listeners = self._subscribers.get(channel, set())
            listeners.discard(queue)
            if not listeners:
                self._subscribers.pop(channel, None)
                async with self._changing:
                    if not self._subscribers.get(channel):  # nobody came back while we waited
                        await self._unsubscribe(channel)
            queue.put_nowait(None)

    async def _unsubscribe(self, channel: str) -> None:
        try:
            await self._backend.unsubscribe(channel)
        except Exception:
            # A dead connection listens to nothing, and the reconnect skips channels nobody wants.
            if not isinstance(self._backend, _Reconnecting) or self._backend.alive():
                raise

    async def _supervise(self) -> None:
        backend = self._backend
        while True:
            try:
                await asyncio.wait_for(backend.lost.wait(), timeout=self.probe_every)
            except TimeoutError:
                if not await self._answers():
                    backend.abort()  # its termination reports the loss
                continue
            self.losses += 1
            lost_at = time.monotonic()
            log.warning("live: lost the listening connection; no changes reach this process's %d channel(s) "
                        "until it is back", len(self._subscribers))
            async with self._changing:
                async for attempt in AsyncRetrying(wait=wait_random_exponential(multiplier=0.2, max=10),
                                                   before_sleep=self._retrying):
                    with attempt:
                        await backend.reconnect()
                        for channel in list(self._subscribers):
                            await backend.subscribe(channel)
            log.warning("live: listening again on %d channel(s) after %.1f s; balances are re-read, event "
                        "streams end with LIVE_INTERRUPTED", len(self._subscribers), time.monotonic() - lost_at)
            self.on_reconnect()

    async def _answers(self) -> bool:
        try:
            async with asyncio.timeout(self.probe_every):
                async with self._changing:  # one operation at a time on the connection
                    await self._backend.probe()
            return True
        except Exception as exc:  # noqa: BLE001 - any failure means: replace it
            log.warning("live: the listening connection did not answer a probe (%r)", exc)
            return False

    @staticmethod
    def _retrying(state: RetryCallState) -> None:
        log.warning("live: reconnecting failed (%r); next attempt in %.1f s",
                    state.outcome.exception() if state.outcome else None,
                    state.next_action.sleep if state.next_action else 0)


def _broadcast(url: str, probe_every: float) -> _Broadcast:
    if url.startswith(("postgres://", "postgresql://")):
        return _Broadcast(backend=_Postgres(url), probe_every=probe_every)
    if not url.startswith(("redis://", "rediss://")):
        return _Broadcast(url)
    from broadcaster._backends.redis import RedisBackend  # redis is an optional dependency
    from redis import asyncio as redis

    class SubscribedFirst(RedisBackend, _Reconnecting):
        """broadcaster 0.3's Redis backend wakes its listener before SUBSCRIBE completes; redis-py
        then sees no subscription and stops listening, so no message ever arrives. Subscribing
        first, then waking the listener, closes that race.

        The pub/sub connection is lost when its reader task ends (redis-py raises once its own
        retries are spent) or when redis-py reconnects it inside (it subscribes again, but what
        was published in between is gone all the same): either way `reconnect` starts a fresh
        pub/sub connection and reader. No probe: the reply to a PING would reach the reader."""

        def __init__(self, url: str) -> None:
            super().__init__(url)
            self._conn = redis.Redis.from_url(url, client_name=listener_name())
            self._pubsub = self._conn.pubsub()
            self.lost = asyncio.Event()

        async def connect(self) -> None:
            await super().connect()
            self._listener.add_done_callback(self._ended)
            self._pubsub.connection.register_connect_callback(self._reconnected)

        def _ended(self, task: asyncio.Task) -> None:
            if not task.cancelled():
                self.lost.set()

        def _reconnected(self, _conn) -> None:
            self.lost.set()

        async def subscribe(self, channel: str) -> None:
            await self._pubsub.subscribe(channel)
            self._ready.set()

        def alive(self) -> bool:
            conn = self._pubsub.connection
            return conn is not None and conn.is_connected and not self._listener.done()

        async def reconnect(self) -> None:
            self._listener.remove_done_callback(self._ended)
            self._listener.cancel()
            if self._pubsub.connection is not None:  # it goes back to the pool, for publishing
                self._pubsub.connection.deregister_connect_callback(self._reconnected)
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self.lost.clear()  # after the old connection's last word
            self._pubsub = self._conn.pubsub()
            self._ready.clear()
            await self.connect()

    return _Broadcast(backend=SubscribedFirst(url), probe_every=probe_every)


def _decoded(message: str) -> list[dict[str, Any]] | None:
    """A channel's message as events, or None when it is not ours to read: anyone who may connect
    to the database can NOTIFY a channel, and a process of another version may write another
    format. Logged, so that it is seen; never a reason for a watcher or a stream to die."""
    try:
        decoded = events.decode(message)
        if isinstance(decoded, list) and all(isinstance(e, dict) and isinstance(e.get("kind"), str)
                                             for e in decoded):
            return decoded
    except (TypeError, ValueError):
        pass
    log.warning("live: a message that is no list of events was ignored: %.200r", message)
    return None


@dataclass(eq=False)
class _Subscriber:
    latest: queries.Snapshot | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set with `latest` when a membership changed since the previous read: the subscriber's own
    # role, seat or group may be what changed, so it re-reads its membership before the view.
    members_changed: bool = False


@dataclass(eq=False)
class _Watcher:
    subscribers: set[_Subscriber] = field(default_factory=set)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    members_changed: bool = False  # a MEMBER_CHANGED came with the signals of the next read
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)
    failed: bool = False  # its listening or reading stopped: its streams end (`_watcher_stopped`)


class LiveHub:
    STOP_SECONDS = 5  # how long `stop` waits for its cancelled watchers

    def __init__(self, db: Database, url: str, clock: Clock, *, debounce: float = 0.05, recheck: float = 2.0,
                 probe: float = 15.0):
        self.db = db
        self.url = url
        self.clock = clock
        self.debounce = debounce
        self.recheck = recheck
        self.broadcast = _broadcast(url, probe)
        self.broadcast.on_reconnect = self._resync
        self._watchers: dict[uuid.UUID, _Watcher] = {}

    def outlet(self) -> EventOutlet:
        # NOTIFY goes out inside the committing transaction; other backends publish after it.
        if self.url.startswith(("postgres://", "postgresql://")):
            return NotifyOutlet()
        return PublishOutlet(self.broadcast.publish)

    async def start(self) -> None:
        await self.broadcast.connect()

    async def stop(self) -> None:
        """Cancel the watchers and wait for them (bounded, `STOP_SECONDS`), so none still uses
        the database or the listening connection once the app disposes of them. (Under uvicorn,
        streams usually end, and their watchers with them, before the app's shutdown runs.)"""
        tasks = [t for w in self._watchers.values() for t in w.tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.STOP_SECONDS)
            if pending:
                log.warning("live: %d watcher task(s) did not stop within %s s of shutdown", len(pending),
                            self.STOP_SECONDS)
        await self.broadcast.disconnect()

    # --- access ---------------------------------------------------------------------------

    async def _member(self, caller: Caller, ws_id: uuid.UUID) -> Member | None:
        return await self.db.read(lambda s: authorize(s, caller, ws_id, Action.VIEW_BALANCE, what="workspace"))

    async def _still_allowed(self, caller: Caller, ws_id: uuid.UUID, secret: str | None) -> Member | None:
        actor = await identity.authenticate_secret(self.db, secret) if secret else None
        if actor is None or actor.user_id != caller.actor.user_id:
            raise Unauthenticated()
        return await self._member(caller, ws_id)  # NotFound once the membership is gone

    @staticmethod
    def _spends_as(member: Member | None) -> tuple | None:
        """What of a membership decides its spendable amount."""
        return None if member is None else (member.id, member.role, member.seat, member.billing_group_id)

    # --- balances -------------------------------------------------------------------------

    async def balances(self, caller: Caller, workspace_id: str, secret: str | None) -> AsyncIterator[queries.BalanceView]:
        ws_id = parse_id(workspace_id, "workspace")
        member = await self._member(caller, ws_id)
        sub = _Subscriber()
        watcher = self._join(ws_id, sub)
        try:
            await watcher.listening.wait()  # listening first, then read: no commit falls between
            if watcher.failed:
                raise LiveInterrupted()
            snapshot = await queries.balance_snapshot(self.db, ws_id, self.clock.now())
            yield queries.view_of(snapshot, queries.spender_of(caller, ws_id, member))
            checked = time.monotonic()
            while True:
                try:
                    await asyncio.wait_for(sub.wake.wait(), timeout=self.recheck)
                except TimeoutError:
                    pass
                if watcher.failed:
                    raise LiveInterrupted()  # no later change would reach this stream
                if sub.wake.is_set():
                    sub.wake.clear()
                    snapshot = sub.latest
                    if sub.members_changed:
                        # A seat, role or group change signals the balance too: the view must
                        # use the membership it committed, not the one of the last re-check.
                        sub.members_changed = False
                        member = await self._member(caller, ws_id)  # NotFound once removed
                    yield queries.view_of(snapshot, queries.spender_of(caller, ws_id, member))
                if time.monotonic() - checked >= self.recheck:
                    was = self._spends_as(member)
                    member = await self._still_allowed(caller, ws_id, secret)
                    checked = time.monotonic()
                    if self._spends_as(member) != was:
                        # A membership change that reached us without an event (none should):
                        # the stream's last word must still be what the `balance` query says.
                        yield queries.view_of(snapshot, queries.spender_of(caller, ws_id, member))
        finally:
            self._leave(ws_id, watcher, sub)

    def _join(self, ws_id: uuid.UUID, sub: _Subscriber) -> _Watcher:
        watcher = self._watchers.get(ws_id)
        if watcher is None:
            watcher = self._watchers[ws_id] = _Watcher()
            watcher.tasks = [asyncio.create_task(self._listen(ws_id, watcher)),
                             asyncio.create_task(self._refresh(ws_id, watcher))]
            for task in watcher.tasks:
                task.add_done_callback(lambda t, w=watcher: self._watcher_stopped(ws_id, w, t))
        watcher.subscribers.add(sub)
        return watcher

    def _leave(self, ws_id: uuid.UUID, watcher: _Watcher, sub: _Subscriber) -> None:
        watcher.subscribers.discard(sub)
        if not watcher.subscribers and self._watchers.get(ws_id) is watcher:
            del self._watchers[ws_id]
            for t in watcher.tasks:
                t.cancel()

    def _watcher_stopped(self, ws_id: uuid.UUID, watcher: _Watcher, task: asyncio.Task) -> None:
        """A watcher's task ended on its own (cancelling is how watchers are meant to end): no
        change would reach its streams any more, and a stream that waits for its first value
        would wait forever. They end with LIVE_INTERRUPTED instead (the client subscribes again,
        and gets a new watcher), rather than show a stale balance as live."""
        if task.cancelled() or watcher.failed:
            return
        log.error("live: watching workspace %s stopped; its balance streams end with LIVE_INTERRUPTED", ws_id,
                  exc_info=task.exception())
        watcher.failed = True
        if self._watchers.get(ws_id) is watcher:
            del self._watchers[ws_id]
        for t in watcher.tasks:
            t.cancel()
        watcher.listening.set()
        for sub in watcher.subscribers:
            sub.wake.set()

    async def _listen(self, ws_id: uuid.UUID, watcher: _Watcher) -> None:
        async with self.broadcast.subscribe(events.channel(ws_id)) as subscriber:
            watcher.listening.set()
            async for message in subscriber:
                if message is None:
                    return
                decoded = _decoded(message.message)
                # A message we cannot read may have said anything: re-read all of it.
                kinds = {events.MEMBER_CHANGED, events.BALANCE_CHANGED} if decoded is None else {
                    e["kind"] for e in decoded}
                if events.MEMBER_CHANGED in kinds:
                    watcher.members_changed = True  # before `dirty`: the read it triggers hands it on
                if events.BALANCE_CHANGED in kinds:
                    watcher.dirty.set()

    async def _refresh(self, ws_id: uuid.UUID, watcher: _Watcher) -> None:
        while True:
            await watcher.dirty.wait()
            await asyncio.sleep(self.debounce)  # coalesce a burst of commits into one read
            watcher.dirty.clear()  # before reading: a commit during the read triggers another
            members_changed, watcher.members_changed = watcher.members_changed, False
            try:
                snapshot = await queries.balance_snapshot(self.db, ws_id, self.clock.now())
            except Exception:  # noqa: BLE001 - keep watching; the next signal retries
                log.warning("balance read for %s failed", ws_id, exc_info=True)
                watcher.members_changed |= members_changed
                watcher.dirty.set()
                await asyncio.sleep(1)
                continue
            for sub in list(watcher.subscribers):
                sub.latest = snapshot
                sub.members_changed |= members_changed
                sub.wake.set()

    def _resync(self) -> None:
        """Listening again after a lost connection: the signals committed meanwhile never came, so
        every watcher re-reads the balance (and its subscribers their membership) as after one."""
        for watcher in self._watchers.values():
            watcher.members_changed = True
            watcher.dirty.set()

    # --- workspace events -------------------------------------------------------------------

    async def workspace_events(self, caller: Caller, workspace_id: str, secret: str | None) -> AsyncIterator[dict]:
        """Each event is shown only if the query showing the same facts would show it to this
        subscriber now (`events.visible`): a plain member sees their own generations and overage
        requests, not another member's, and no alerts. Their rights are re-read when an event
        says their membership changed (so a demotion applies from the next event, not from the
        next re-check) and at every re-check.

        If the process loses its listening connection, the events committed until it is back are
        never delivered, and nothing can replay them (NOTIFY and Redis pub/sub keep no history).
        Rather than go on with a silent gap, the stream ends with `LIVE_INTERRUPTED` (within
        `recheck` seconds of the loss): the client re-reads what it shows through the queries and
        subscribes again, and the new stream starts once this process listens again."""
        ws_id = parse_id(workspace_id, "workspace")
        member = await self._member(caller, ws_id)
        losses = self.broadcast.losses
        async with self.broadcast.subscribe(events.channel(ws_id)) as subscriber:
            checked = time.monotonic()
            while True:
                try:
                    message = await asyncio.wait_for(subscriber.get(), timeout=self.recheck)
                except TimeoutError:
                    message = None
                if self.broadcast.losses != losses:
                    raise LiveInterrupted()
                if time.monotonic() - checked >= self.recheck:
                    member = await self._still_allowed(caller, ws_id, secret)
                    checked = time.monotonic()
                if message is None:
                    continue
                decoded = _decoded(message.message)
                if decoded is None:
                    raise LiveInterrupted()  # what it said is lost: as after a lost connection
                for e in decoded:
                    if e["kind"] == events.BALANCE_CHANGED:
                        continue
                    if events.visible(e, member.id if member else None, self._allows(caller, ws_id, member)):
                        yield e
                    if self._about(e, member):  # committed before it was delivered: the read sees it
                        member = await self._member(caller, ws_id)  # NotFound once removed

    @staticmethod
    def _allows(caller: Caller, ws_id: uuid.UUID, member: Member | None):
        roles = caller.roles(member)
        return lambda action: caller.authorizer.allows(str(caller.actor.user_id), roles, str(ws_id), action)

    @staticmethod
    def _about(event: dict, member: Member | None) -> bool:
        """Does `event` change `member` (their role, seat or billing group)?"""
        return (event["kind"] == events.MEMBER_CHANGED and member is not None
                and event["payload"].get("memberId") == str(member.id))


# --- GraphQL -----------------------------------------------------------------------------------

@strawberry.type
class LiveScopeBalance(ScopeBalance):
    """The same figures as the `balance` query's `ScopeBalance`, under the name subscriptions
    have always used."""


@strawberry.type
class BalanceUpdate:
    workspace_id: strawberry.ID
    available: str
    held: str
    viewer_spendable: str = strawberry.field(description="What the subscriber could spend now.")
    scopes: list[LiveScopeBalance]
    as_of: datetime

    @classmethod
    def of(cls, v: queries.BalanceView) -> BalanceUpdate:
        return cls(
            workspace_id=strawberry.ID(str(v.workspace_id)), available=format_credits(v.available),
            held=format_credits(v.held), viewer_spendable=format_credits(v.viewer_spendable),
            scopes=[LiveScopeBalance.of(s) for s in v.scopes],
            as_of=v.as_of,
        )


@strawberry.type
class WorkspaceEvent:
    workspace_id: strawberry.ID
    kind: str = strawberry.field(description="GENERATION_STARTED, GENERATION_SETTLED, CREDITS_ADDED, CREDITS_EXPIRED, "
                                             "PERIOD_CLOSED, MEMBER_CHANGED, OVERAGE_REQUESTED, OVERAGE_DECIDED, "
                                             "ALERT")
    at: datetime
    payload: JSON

    @classmethod
    def of(cls, workspace_id: str, e: dict[str, Any]) -> WorkspaceEvent:
        return cls(workspace_id=strawberry.ID(workspace_id), kind=e["kind"], at=datetime.fromisoformat(e["at"]),
                   payload=e["payload"])


@strawberry.type
class Subscription:
    @strawberry.subscription(description="The workspace's available and held credits and your spendable amount: "
                                         "now, then after every committed change (coalesced).")
    async def balance_changed(self, info: Info[Context, None], workspace_id: strawberry.ID) -> AsyncIterator[BalanceUpdate]:
        ctx = info.context
        caller = await ctx.caller()
        async for view in ctx.live.balances(caller, str(workspace_id), ctx.secret()):
            yield BalanceUpdate.of(view)

    @strawberry.subscription(description="Generations started and settled, credits added and expired, period "
                                         "closes, member and seat changes, overage requests and decisions, alerts: "
                                         "each only if your queries would show it to you (without ledger.view, your "
                                         "own generations; without overages.approve, your own requests; alerts "
                                         "need ledger.view). Ends with the error LIVE_INTERRUPTED when events "
                                         "may have been missed (the server lost its listening connection): "
                                         "re-read what you show and subscribe again.")
    async def workspace_events(self, info: Info[Context, None], workspace_id: strawberry.ID) -> AsyncIterator[WorkspaceEvent]:
        ctx = info.context
        caller = await ctx.caller()
        async for e in ctx.live.workspace_events(caller, str(workspace_id), ctx.secret()):
            yield WorkspaceEvent.of(str(workspace_id), e)
