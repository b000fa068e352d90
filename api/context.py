"""Per-request GraphQL context: the process's Database and Authorizer (built once at start-up
and injected), and the caller, authenticated lazily from the request or the websocket's
`connection_init` payload."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from domain import identity
from domain.access import Caller, Credentials, Who
from domain.clock import SYSTEM_CLOCK, Clock
from domain.ledger.payments import PaymentProvider, TrustedReferenceProvider
from domain.ledger.service import LedgerRules
from domain.db import Database
from domain.errors import Unauthenticated
from policies import Authorizer

_UNSET: Any = object()


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, secret = value.partition(" ")
    return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None


@dataclass
class Context:
    db: Database
    authorizer: Authorizer
    request: Request | WebSocket
    clock: Clock = SYSTEM_CLOCK
    payments: PaymentProvider = field(default_factory=TrustedReferenceProvider)
    ledger_rules: LedgerRules = field(default_factory=LedgerRules)
    live: Any = None  # the process's api.live.LiveHub
    overage_ttl: timedelta = timedelta(hours=24)  # pending overage requests lapse after this
    hold_ttl: timedelta = timedelta(hours=1)  # a generation's holds time out after this (the scheduler's)
    response: Any = None
    connection_params: dict[str, Any] | None = None
    loaders: dict[str, Any] = field(default_factory=dict)
    _actor: Any = _UNSET

    def for_operation(self) -> Context:
        """The context of one operation over a websocket. Strawberry shares one context per
        connection; each operation gets its own copy, so the token is checked again (a token revoked
        while the socket is open stops working on it at the next operation, as on HTTP) and nothing
        one operation cached is served to another."""
        return dataclasses.replace(self, loaders={}, _actor=_UNSET)

    def secret(self) -> str | None:
        if self.connection_params is not None:
            params = self.connection_params
            raw = params.get("Authorization") or params.get("authorization")
            return bearer(raw) if isinstance(raw, str) else None
        return bearer(self.request.headers.get("authorization"))

    async def actor(self) -> identity.Actor | None:
        # Sibling fields resolve concurrently: share one lookup, never race to a wrong None.
        if self._actor is _UNSET:
            self._actor = asyncio.ensure_future(self._authenticate())
        return await self._actor

    async def _authenticate(self) -> identity.Actor | None:
        secret = self.secret()
        return await identity.authenticate_secret(self.db, secret) if secret else None

    async def who(self) -> Who:
        """For the hot mutations: the caller when already authenticated, else the request's
        credentials, which the mutation's first read checks (no round trip of their own). No
        secret, or a malformed one: UNAUTHENTICATED at once."""
        if self._actor is not _UNSET:
            return await self.caller()
        secret = self.secret()
        if secret is None:
            raise Unauthenticated()
        return Credentials(secret, self.authorizer, self.clock)

    async def caller(self) -> Caller:
        """The authenticated caller, or a top-level UNAUTHENTICATED error."""
        actor = await self.actor()
        if actor is None:
            raise Unauthenticated()
        return Caller(actor=actor, authorizer=self.authorizer, clock=self.clock)
