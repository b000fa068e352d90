"""Demo data for `creditpool serve --demo`: loaded once, idempotent on restart."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.db import Database
from domain.identity import Actor, User, UserKind, authenticate, issue_token
from domain.ledger.consumption import Scope
from domain.ledger.models import Cause, CreditPack, EntryKind, Grant, GrantSource, LedgerEntry
from domain.money import UNITS_PER_CREDIT
from domain.plans import plan_by_key
from domain.pricing import Modality, ModelPrice
from domain.workspaces.models import AllocationMode, Member, Role, Seat, Workspace

_NS = uuid.UUID("6f1d2c1e-9a51-4e0c-a3a4-7d3c2b5e9f10")
DEMO_WORKSPACE_ID = uuid.uuid5(_NS, "workspace")
DEMO_DOMAIN = "demo.creditpool.dev"

# (key, email or None for the service account, name, role, seat, operator)
IDENTITIES = [
    ("owner", f"owner@{DEMO_DOMAIN}", "Olivia Owner", Role.OWNER, Seat.CREATOR, False),
    ("admin", f"admin@{DEMO_DOMAIN}", "Adam Admin", Role.ADMIN, Seat.STANDARD, False),
    ("creator1", f"ava@{DEMO_DOMAIN}", "Ava Creator", Role.MEMBER, Seat.CREATOR, False),
    ("creator2", f"ben@{DEMO_DOMAIN}", "Ben Creator", Role.MEMBER, Seat.CREATOR, False),
    ("standard", f"sam@{DEMO_DOMAIN}", "Sam Standard", Role.MEMBER, Seat.STANDARD, False),
    ("operator", f"operator@{DEMO_DOMAIN}", "Petra Operator", None, None, True),
    ("worker", None, "generation-worker", None, None, False),
]

# Credits per generation, from the public figures fair platforms publish (units: 1 credit = 1000).
PRICES = [
    ("text-fast", "Text Fast", "OpenAI-class", Modality.TEXT, 1),
    ("text-pro", "Text Pro", "Anthropic-class", Modality.TEXT, 5),
    ("sdxl", "SDXL", "Stability", Modality.IMAGE, 5),
    ("dalle-3", "DALL-E 3 class", "OpenAI-class", Modality.IMAGE, 10),
    ("image-premium", "Image Premium", "Midjourney-class", Modality.IMAGE, 15),
    ("video-standard", "Video Standard", "Runway-class", Modality.VIDEO, 50),
    ("video-pro", "Video Pro", "Kling-class", Modality.VIDEO, 200),
    ("video-premium", "Video Premium", "Vidzy", Modality.VIDEO, 500),
    ("video-premium-image", "Video Premium companion image", "Vidzy", Modality.IMAGE, 70),
    ("voice", "Voice", "ElevenLabs-class", Modality.AUDIO, 3),
]


# Packs at the public figures: 100 credits for $10, 500 for $45, 1,000 for $80.
PACKS = [("Starter pack", 100, 1000), ("Studio pack", 500, 4500), ("Production pack", 1000, 8000)]


def _id(key: str) -> uuid.UUID:
    return uuid.uuid5(_NS, key)


@dataclass(frozen=True)
class DemoIdentity:
    key: str
    email: str | None
    name: str
    role: str | None
    seat: str | None
    token: str


async def _seed(session: AsyncSession) -> None:
    if await session.get(Workspace, DEMO_WORKSPACE_ID) is not None:
        return
    for key, name, vendor, modality, credits in PRICES:
        exists = await session.execute(select(ModelPrice.id).where(ModelPrice.model_key == key))
        if exists.first() is None:
            session.add(ModelPrice(id=_id(f"price:{key}"), model_key=key, display_name=name, vendor=vendor,
                                   modality=modality, units_per_generation=credits * 1000))
    plan = await plan_by_key(session, "team")
    session.add(Workspace(id=DEMO_WORKSPACE_ID, name="Demo Studio", plan_id=plan.id,
                          allocation_mode=AllocationMode.POOLED))
    for key, email, name, role, seat, operator in IDENTITIES:
        kind = UserKind.SERVICE if email is None else UserKind.HUMAN
        session.add(User(id=_id(f"user:{key}"), kind=kind, email=email, name=name, is_operator=operator))
    await session.flush()
    for key, _email, _name, role, seat, _op in IDENTITIES:
        if role is not None:
            session.add(Member(workspace_id=DEMO_WORKSPACE_ID, user_id=_id(f"user:{key}"), role=role, seat=seat))
    for name, credits, cents in PACKS:
        if await session.get(CreditPack, _id(f"pack:{name}")) is None:
            session.add(CreditPack(id=_id(f"pack:{name}"), name=name, units=credits * UNITS_PER_CREDIT,
                                   price_minor=cents, currency="USD"))
    # A starting balance, through real grant entries so the ledger stays conserved: a team
    # allowance that never expires and a promotion that expires in two weeks.
    now = datetime.now(UTC)
    for key, source, credits, expires in (
        ("grant:allowance", GrantSource.PLAN_ALLOWANCE, 1000, None),
        ("grant:promotion", GrantSource.PROMOTION, 200, now + timedelta(days=14)),
    ):
        units = credits * UNITS_PER_CREDIT
        session.add(Grant(id=_id(key), workspace_id=DEMO_WORKSPACE_ID, scope=Scope.WORKSPACE, source=source,
                          effective_at=now, expires_at=expires, amount=units, remaining=units,
                          reason="demo starting balance", created_by=_id("user:operator")))
        await session.flush()
        session.add(LedgerEntry(workspace_id=DEMO_WORKSPACE_ID, grant_id=_id(key), kind=EntryKind.GRANT,
                                amount=units, cause=Cause.GRANT, actor_id=_id("user:operator")))


async def _tokens(session: AsyncSession, known: dict[str, str]) -> list[DemoIdentity]:
    out = []
    for key, email, name, role, seat, _op in IDENTITIES:
        secret = known.get(key)
        actor: Actor | None = await authenticate(session, secret) if secret else None
        if actor is None or actor.user_id != _id(f"user:{key}"):
            _, secret = await issue_token(session, _id(f"user:{key}"), "demo")
        out.append(DemoIdentity(key, email, name, role.value if role else None, seat.value if seat else None, secret))
    return out


async def load_demo(db: Database, known_tokens: dict[str, str]) -> list[DemoIdentity]:
    """Seed once; return a working token per demo identity, reusing `known_tokens` when still
    valid (so restarts print the same tokens) and issuing new ones otherwise."""

    async def work(session: AsyncSession) -> list[DemoIdentity]:
        await _seed(session)
        return await _tokens(session, known_tokens)

    return await db.transaction(work)
