"""The ASGI application: /graphql (GraphiQL on GET, queries and mutations on POST,
subscriptions over graphql-transport-ws only), /healthz and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from datetime import timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

import migrations
from api.context import Context
from api.live import LiveHub, broadcast_url
from api.schema import build_schema
from api.settings import Settings, load_settings
from domain.clock import SYSTEM_CLOCK, Clock
from domain.db import Database
from domain.periods import service as periods
from domain.ledger.payments import PaymentProvider, TrustedReferenceProvider
from domain.ledger.service import LedgerRules
from policies import Authorizer

log = logging.getLogger("creditpool")
# How long a shutdown waits for the scheduler's cancelled round to wind down (its statement
# cancelled on the server, its connection closed).
SCHEDULER_STOP_SECONDS = 5


class CreditpoolGraphQL(GraphQL):
    def __init__(
        self, *, db: Database, authorizer: Authorizer, settings: Settings, clock: Clock, payments: PaymentProvider,
        live: LiveHub,
    ) -> None:
        super().__init__(
            build_schema(
                max_depth=settings.max_query_depth, max_aliases=settings.max_aliases, max_tokens=settings.max_tokens
            ),
            graphql_ide="graphiql" if settings.graphiql else None,
            # The legacy `graphql-ws` protocol is refused: its handshake gets close code 4406.
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        )
        self.db = db
        self.authorizer = authorizer
        self.clock = clock
        self.payments = payments
        self.ledger_rules = LedgerRules(policy_violation_fee=settings.policy_violation_fee_percent / 100)
        self.live = live
        self.overage_ttl = timedelta(hours=settings.overage_request_ttl_hours)
        self.hold_ttl = timedelta(seconds=settings.hold_ttl_seconds)

    async def get_context(self, request: Request | WebSocket, response: Any = None) -> Context:
        return Context(
            db=self.db, authorizer=self.authorizer, request=request, response=response, clock=self.clock,
            payments=self.payments, ledger_rules=self.ledger_rules, live=self.live, overage_ttl=self.overage_ttl,
            hold_ttl=self.hold_ttl,
        )

    async def on_ws_connect(self, context: Context) -> None:
        # A websocket's credentials come in the connection_init payload, checked here; each
        # operation on it checks them again (`RequestRules`), so a revoked token stops working.
        if not isinstance(context.connection_params, dict) or await context.actor() is None:
            raise ConnectionRejectionError({"code": "UNAUTHENTICATED"})

    async def execute_single(self, request, request_adapter, sub_response, context, root_value, request_data):
        result = await super().execute_single(
            request, request_adapter, sub_response, context, root_value, request_data
        )
        # A request that could not run at all (syntax, validation, limits) is a 400, not a 200.
        if result.data is None and result.errors and all(e.path is None for e in result.errors):
            sub_response.status_code = 400
        return result


def create_app(
    settings: Settings, *, database_url: str | None = None, clock: Clock = SYSTEM_CLOCK,
    payments: PaymentProvider | None = None,
) -> Starlette:
    """Build the app. `clock` and `payments` are the seams tests (and a real payment provider)
    plug into; the defaults are the system clock and the trusted-reference provider."""
    url = database_url or settings.database_url
    if not url:
        raise RuntimeError("create_app needs a database URL (the CLI starts the embedded PostgreSQL)")
    db = Database(url, pool_size=settings.db_pool_size, acquire_timeout=settings.db_acquire_timeout_seconds)
    authorizer = Authorizer()
    live = LiveHub(
        db, broadcast_url(settings.broadcast_url, db.url, settings.workers), clock,
        debounce=settings.balance_debounce_ms / 1000, recheck=settings.live_recheck_seconds,
        probe=settings.live_probe_seconds,
    )
    db.events = live.outlet()
    payments = payments or TrustedReferenceProvider()
    graphql = CreditpoolGraphQL(
        db=db, authorizer=authorizer, settings=settings, clock=clock, payments=payments, live=live,
    )
    head = migrations.head_revision()

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        try:
            current = await migrations.database_revision(db.engine)
        except Exception:  # noqa: BLE001 - readiness reports, it does not raise
            log.warning("readiness check: database unreachable", exc_info=True)
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        if current != head:
            return JSONResponse(
                {"status": "unavailable", "database": "ok", "schema": current, "expected": head}, status_code=503
            )
        return JSONResponse({"status": "ok", "database": "ok", "schema": current})

    async def scheduler() -> None:
        # Every process runs it; each unit of work is claimed in the database (SKIP LOCKED), so
        # adding processes never runs a job twice. A unit that keeps failing rests between tries
        # (`periods.Backoff`), each process by its own memory.
        backoff = periods.Backoff(first=timedelta(seconds=settings.scheduler_interval_seconds))
        while True:
            try:
                # With the app's payment provider: auto top-ups that no spend started are bought here.
                report = await periods.tick(db, clock, hold_ttl=timedelta(seconds=settings.hold_ttl_seconds),
                                            payments=payments, backoff=backoff)
                if any((report.periods_closed, report.daily_issued, report.grants_expired, report.holds_timed_out,
                        report.top_ups_started, report.top_ups_taken_over)):
                    log.info("scheduler: %s", report)
                if report.failures:  # each was logged with its exception; the next round retries them
                    log.warning("scheduler: %d unit(s) failed this round: %s", len(report.failures),
                                "; ".join(map(str, report.failures)))
            except Exception:  # noqa: BLE001 - keep the process serving; the next round retries
                log.warning("scheduler round failed", exc_info=True)
            await asyncio.sleep(settings.scheduler_interval_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        # Everything alive at start-up (schema, modules, policy) never becomes garbage: keep it
        # out of the collector's generations, so full collections stay short (measured: ~115 ms
        # pauses became ~10 ms; see BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        await live.start()
        task = asyncio.create_task(scheduler()) if settings.scheduler_interval_seconds else None
        yield
        if task is not None:
            # Cancelled and awaited before the pools close. A tick cut in the middle of a unit is
            # rolled back either way, but only while the loop runs is its statement cancelled on
            # the server too: left to the loop's teardown, after the pools were disposed, its
            # connection was dropped with its backend still waiting (on a lock, say) and holding
            # the rows it had claimed.
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=SCHEDULER_STOP_SECONDS)
            if not done:
                log.warning("the scheduler did not stop within %s s of shutdown", SCHEDULER_STOP_SECONDS)
        await live.stop()
        await db.dispose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
        ],
        lifespan=lifespan,
    )
    app.state.db = db
    return app


def app_from_env() -> Starlette:
    """Factory for uvicorn workers: the parent process put everything in the environment."""
    return create_app(load_settings())


__all__ = ["app_from_env", "create_app"]
