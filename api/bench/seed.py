"""Benchmark data, made through the domain layer (the same services the API calls), except the
bulk ledger history for the balance-read check, which is inserted with SQL in a way that keeps
every grant equal to the sum of its entries."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from api.settings import Settings
from domain import identity
from domain.access import Caller
from domain.db import Database
from domain.ledger import service as ledger
from domain.ledger.models import GrantSource
from domain.pricing import Modality
from domain.pricing import service as pricing
from domain.workspaces import service as workspaces
from domain.workspaces.models import AllocationMode, Role, Seat
from policies import Authorizer

MODEL_KEY = "bench-image"
# The server's default: a fresh workspace has no close due, so no hold is ever timed out here.
HOLD_TTL = timedelta(seconds=Settings.model_fields["hold_ttl_seconds"].default)
MODEL_PRICE = "5"  # credits, flat: one reservation holds 5 credits, completion captures them
MODEL_UNITS = 5000
PLAN = "enterprise"  # seat cap 500, 25 free creator seats (more are bought via paidCreatorSeats)
DOMAIN = "bench.creditpool.test"
FUNDS = "10000000"  # credits per pool grant: nothing a run can spend (failures must mean bugs)
SEAT_FUNDS = "1000000"


@dataclass
class Team:
    """A workspace and the creators who spend from it: (token, member id)."""

    workspace_id: str
    owner_token: str
    owner_member_id: str
    creators: list[tuple[str, str]] = field(default_factory=list)


class Seeder:
    def __init__(self, db: Database, tag: str) -> None:
        self.db = db
        self.tag = tag  # keeps emails unique when a database is reused (--keep)
        self.authorizer = Authorizer()
        self.operator: Caller | None = None
        self.worker_token = ""
        self.price_list_id: uuid.UUID | None = None
        self._n = 0

    def _email(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self.tag}-{self._n}@{DOMAIN}"

    async def caller(self, token: str) -> Caller:
        actor = await identity.authenticate_secret(self.db, token)
        assert actor is not None
        return Caller(actor=actor, authorizer=self.authorizer)

    async def setup(self) -> None:
        """The price list (one flat model), a platform operator who grants credits, and the
        generation worker's service account that settles generations."""
        catalog = await self.db.transaction(lambda s: pricing.insert_price_list(
            s, models=[pricing.build_model(MODEL_KEY, "Bench image", "bench", Modality.IMAGE, {"base": MODEL_PRICE})],
            windows=(), plan_multipliers={}, note="benchmark catalog", published_by=None,
            effective_at=datetime.now(UTC) - timedelta(days=1),
        ))
        self.price_list_id = catalog.price_list.id
        self.operator = await self.caller(
            await identity.cli_user_token(self.db, self._email("operator"), operator=True))
        self.worker_token = await identity.cli_service_token(self.db, f"bench-worker-{self.tag}")

    async def team(self, *, mode: AllocationMode, creators: int, name: str) -> Team:
        """A workspace on the enterprise plan; the owner has a creator seat, plus `creators`
        creator members (0: the owner is the only spender)."""
        owner_token = await identity.cli_user_token(self.db, self._email("owner"), operator=False)
        owner = await self.caller(owner_token)
        made = await workspaces.create_workspace(self.db, owner, name=name, plan_key=PLAN, allocation_mode=mode)
        ws_id = str(made.workspace.id)
        team = Team(ws_id, owner_token, str(made.member.id))
        if creators + 1 > made.workspace.creator_seat_limit(made.plan):
            await workspaces.update_workspace(self.db, owner, workspace_id=ws_id, hold_ttl=HOLD_TTL,
                                              paid_creator_seats=creators + 1)
        for _ in range(creators):
            email = self._email("creator")
            member = await workspaces.add_member(self.db, owner, workspace_id=ws_id, email=email, role=Role.MEMBER,
                                                 seat=Seat.CREATOR, hold_ttl=HOLD_TTL)
            token = await identity.cli_user_token(self.db, email, operator=False)
            team.creators.append((token, str(member.id)))
        if not creators:
            team.creators.append((owner_token, team.owner_member_id))
        return team

    async def grant(self, team: Team, credits: str, source: GrantSource, *, member_id: str | None = None,
                    expires_in_days: int | None = None) -> str:
        assert self.operator is not None
        expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        grant = await ledger.grant_credits(
            self.db, self.operator, workspace_id=team.workspace_id, amount=credits, source=source,
            reason="benchmark funding", idempotency_key=f"bench-{uuid.uuid4().hex}", member_id=member_id,
            expires_at=expires,
        )
        return str(grant.id)

    # --- scenarios -------------------------------------------------------------------------------

    async def hot(self, creators: int) -> Team:
        """One pooled workspace, two pool grants (a promotion that expires, so it pays first and
        is the hot row, and a never-expiring allowance: the spend path locks both)."""
        team = await self.team(mode=AllocationMode.POOLED, creators=creators, name="bench hot pool")
        await self.grant(team, FUNDS, GrantSource.PROMOTION, expires_in_days=30)
        await self.grant(team, FUNDS, GrantSource.PLAN_ALLOWANCE)
        return team

    async def per_seat(self, creators: int) -> Team:
        """One PER_SEAT workspace (no pool fallback): every creator has its own seat grant; the
        pool has credits too, which a seat spend must not touch."""
        team = await self.team(mode=AllocationMode.PER_SEAT, creators=creators, name="bench per seat")
        await self.grant(team, FUNDS, GrantSource.PLAN_ALLOWANCE)
        sem = asyncio.Semaphore(8)

        async def seat(member_id: str) -> None:
            async with sem:
                await self.grant(team, SEAT_FUNDS, GrantSource.PLAN_ALLOWANCE, member_id=member_id)

        await asyncio.gather(*(seat(m) for _, m in team.creators))
        return team

    async def spread(self, count: int, progress=None) -> list[Team]:
        """`count` pooled workspaces, each with its owner as the one creator and one grant."""
        sem = asyncio.Semaphore(8)
        done = 0

        async def one(i: int) -> Team:
            nonlocal done
            async with sem:
                team = await self.team(mode=AllocationMode.POOLED, creators=0, name=f"bench spread {i}")
                await self.grant(team, SEAT_FUNDS, GrantSource.ENTERPRISE_COMMIT)
                done += 1
                if progress and done % 250 == 0:
                    progress(done)
                return team

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def balance_team(self, name: str) -> tuple[Team, str]:
        """A pooled workspace with three grants of different kinds (one expiring soon, so the
        balance has something in `expiringSoon`); returns it and the grant that gets history."""
        team = await self.team(mode=AllocationMode.POOLED, creators=0, name=name)
        history = await self.grant(team, FUNDS, GrantSource.PLAN_ALLOWANCE)
        await self.grant(team, "1000", GrantSource.PROMOTION, expires_in_days=5)
        await self.grant(team, "500", GrantSource.ADD_ON, expires_in_days=365)
        return team, history

    async def history(self, team: Team, grant_id: str, generations: int, chunk: int = 100_000) -> None:
        """`generations` completed generations, each a HOLD and a CAPTURE entry of MODEL_UNITS on
        `grant_id`, inserted in bulk (INSERT ... SELECT generate_series); the grant's figures move
        by the same amounts in the same transaction, so the invariant checker stays clean.
        Entries are append-only: nothing here updates or deletes one."""
        owner = (await self.caller(team.owner_token)).actor.user_id
        worker = (await self.caller(self.worker_token)).actor.user_id
        history = await self._history_sql()
        left = generations
        while left > 0:
            n = min(chunk, left)
            left -= n
            params = {"ws": uuid.UUID(team.workspace_id), "member": uuid.UUID(team.owner_member_id),
                      "owner": owner, "worker": worker, "grant": uuid.UUID(grant_id), "amt": MODEL_UNITS,
                      "n": n, "pl": self.price_list_id, "model": MODEL_KEY}

            async def work(session, params=params) -> None:
                await session.execute(history, params)
                await session.execute(_HISTORY_GRANT, params)

            await self.db.transaction(work)

    async def _history_sql(self):
        """The bulk insert, with the business-time columns newer schemas have (generations'
        `started_at`, entries' `occurred_at`) set like the service sets them."""
        cols = await self.db.read(lambda s: s.execute(text(
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name IN ('generations', 'ledger_entries')")))
        have = set(cols.scalars())
        gen_extra = ", started_at" if "generations.started_at" in have else ""
        gen_value = ", now() - make_interval(secs => :n - s)" if gen_extra else ""
        entry_extra = ", occurred_at" if "ledger_entries.occurred_at" in have else ""
        entry_value = ", g.created_at" if entry_extra else ""
        return text(_HISTORY.format(gen_extra=gen_extra, gen_value=gen_value, entry_extra=entry_extra,
                                    entry_value=entry_value))


_HISTORY = """
WITH g AS (
    INSERT INTO generations (id, workspace_id, member_id, requested_by, model_key, parameters, status,
                             quoted_units, captured_units, released_units, shortfall_units, price_list_id,
                             created_at, settled_at, settled_by{gen_extra})
    SELECT gen_random_uuid(), :ws, :member, :owner, :model, '{{}}'::jsonb, 'COMPLETED',
           :amt, :amt, 0, 0, :pl, now() - make_interval(secs => :n - s), now() - make_interval(secs => :n - s),
           :worker{gen_value}
    FROM generate_series(1, :n) AS s
    RETURNING id, created_at
)
INSERT INTO ledger_entries (workspace_id, grant_id, kind, amount, cause, generation_id, member_id, actor_id,
                            idempotency_key, created_at{entry_extra})
SELECT :ws, :grant, k.kind, :amt, 'GENERATION', g.id, :member, k.actor, 'bench-history', g.created_at{entry_value}
FROM g CROSS JOIN (VALUES (1, 'HOLD', CAST(:owner AS uuid)), (2, 'CAPTURE', CAST(:worker AS uuid))) AS k(ord, kind, actor)
ORDER BY g.created_at, g.id, k.ord
"""

_HISTORY_GRANT = text("""
UPDATE grants SET remaining = remaining - CAST(:n AS bigint) * :amt, captured = captured + CAST(:n AS bigint) * :amt
WHERE id = :grant
""")
