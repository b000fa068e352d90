"""Demo data for `creditpool serve --demo`: loaded once, idempotent on restart."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from domain.db import Database
from domain.identity import (Actor, authenticate, get_or_create_service_account, get_or_create_user,
                             issue_token)
from domain.ledger.consumption import Scope
from domain.ledger.models import Cause, CreditPack, EntryKind, Grant, GrantSource, LedgerEntry
from domain.money import UNITS_PER_CREDIT
from domain.periods.service import open_workspace
from domain.plans import plan_by_key
from domain.pricing import Modality
from domain.pricing.service import build_model, insert_price_list, window_from_json
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

# The demo catalog, at the public figures fair platforms publish: text 1-5 credits, images 5-25,
# video 50-200, a premium video model at 500 with a companion image model at 70. Specs are the
# JSON form of domain.pricing.rules.PriceSpec (decimal strings).
VIDEO_RES = {"480p": "0.5", "720p": "1", "1080p": "1.5", "4K": "3"}
PRICES = [
    ("text-fast", "Text Fast", "OpenAI-class", Modality.TEXT, {
        "per_1k_input_tokens": "0.5", "per_1k_output_tokens": "1.5", "minimum": "1",
        "defaults": {"input_tokens": 500, "output_tokens": 500}, "limits": {"output_tokens": 4000}}),
    ("text-pro", "Text Pro", "Anthropic-class", Modality.TEXT, {
        "per_1k_input_tokens": "1", "per_1k_output_tokens": "4", "minimum": "1",
        "defaults": {"input_tokens": 1000, "output_tokens": 1000}, "limits": {"output_tokens": 8000}}),
    ("sdxl", "SDXL", "Stability", Modality.IMAGE, {
        "base": "5", "included_steps": 30, "per_extra_step": "0.1", "resolution_tiers": {"512": "0.6", "1024": "1"},
        "defaults": {"resolution": "1024", "steps": 30}, "limits": {"steps": 150}}),
    ("dalle-3", "DALL-E 3 class", "OpenAI-class", Modality.IMAGE, {
        "base": "10", "resolution_tiers": {"1024": "1", "1792": "1.5"}, "defaults": {"resolution": "1024"}}),
    ("image-premium", "Image Premium", "Midjourney-class", Modality.IMAGE, {
        "base": "15", "per_megapixel": "2.5", "defaults": {"megapixels": 2}, "limits": {"megapixels": 16}}),
    ("video-standard", "Video Standard", "Runway-class", Modality.VIDEO, {
        "per_second": "10", "resolution_tiers": VIDEO_RES,
        "input_type_multipliers": {"text-to-video": "1", "image-to-video": "0.8"},
        "defaults": {"seconds": 5, "resolution": "720p", "input_type": "text-to-video"}, "limits": {"seconds": 10}}),
    ("video-pro", "Video Pro", "Kling-class", Modality.VIDEO, {
        "per_second": "20", "resolution_tiers": VIDEO_RES,
        "input_type_multipliers": {"text-to-video": "1", "image-to-video": "0.8"},
        "defaults": {"seconds": 10, "resolution": "720p", "input_type": "text-to-video"}, "limits": {"seconds": 10}}),
    ("video-premium", "Video Premium", "Vidzy", Modality.VIDEO, {"base": "500"}),
    ("video-premium-image", "Video Premium companion image", "Vidzy", Modality.IMAGE, {"base": "70"}),
    ("voice", "Voice", "ElevenLabs-class", Modality.AUDIO, {
        "base": "1", "per_second": "0.1", "defaults": {"seconds": 20}, "limits": {"seconds": 600}}),
    ("transcribe", "Transcribe", "Whisper-class", Modality.AUDIO, {
        "per_mb": "0.2", "file_tiers": [{"above_mb": "10", "rate_factor": "0.7"}], "minimum": "1",
        "defaults": {"file_mb": 5}, "limits": {"file_mb": 500}}),
]
# Evening surge and night off-peak in New York; enterprise workspaces pay 20% less.
WINDOWS = [
    {"name": "evening surge", "start": "18:00", "end": "22:00", "multiplier": "1.5", "timezone": "America/New_York"},
    {"name": "night off-peak", "start": "02:00", "end": "06:00", "multiplier": "0.8", "timezone": "America/New_York"},
]
PLAN_MULTIPLIERS = {"enterprise": {"*": "0.8"}}

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


async def _users(session: AsyncSession) -> dict[str, uuid.UUID]:
    """Each demo identity's user: a person by email, the service account by name (both unique),
    created when there is none (the same lookups as `create-user` and `create-service-token`).
    One an operator made first (e.g. `create-service-token --name generation-worker` before
    `serve --demo`) is taken over instead of failing on the unique index; the operator identity
    is made an operator."""
    ids = {}
    for key, email, name, _role, _seat, operator in IDENTITIES:
        user = await (get_or_create_service_account(session, name) if email is None
                      else get_or_create_user(session, email, name=name))
        if operator:
            user.is_operator = True
        ids[key] = user.id
    await session.flush()
    return ids


async def _seed(session: AsyncSession, users: dict[str, uuid.UUID]) -> None:
    if await session.get(Workspace, DEMO_WORKSPACE_ID) is not None:
        return
    await insert_price_list(
        session, models=[build_model(key, name, vendor, modality, spec) for key, name, vendor, modality, spec in PRICES],
        windows=[window_from_json(w) for w in WINDOWS], plan_multipliers=PLAN_MULTIPLIERS,
        effective_at=datetime.now(UTC), note="demo catalog", published_by=None,
    )
    plan = await plan_by_key(session, "team")
    now = datetime.now(UTC)
    ws = Workspace(id=DEMO_WORKSPACE_ID, name="Demo Studio", plan_id=plan.id, allocation_mode=AllocationMode.POOLED,
                   billing_anchor=now, period_start=now, next_renewal_at=now)
    session.add(ws)
    await session.flush()
    for key, _email, _name, role, seat, _op in IDENTITIES:
        if role is not None:
            session.add(Member(workspace_id=DEMO_WORKSPACE_ID, user_id=users[key], role=role, seat=seat))
    for name, credits, cents in PACKS:
        if await session.get(CreditPack, _id(f"pack:{name}")) is None:
            session.add(CreditPack(id=_id(f"pack:{name}"), name=name, units=credits * UNITS_PER_CREDIT,
                                   price_minor=cents, currency="USD"))
    await open_workspace(session, ws, plan, now)
    # A starting balance, through real grant entries so the ledger stays conserved: a team
    # allowance that never expires and a promotion that expires in two weeks.
    for key, source, credits, expires in (
        ("grant:allowance", GrantSource.PLAN_ALLOWANCE, 1000, None),
        ("grant:promotion", GrantSource.PROMOTION, 200, now + timedelta(days=14)),
    ):
        units = credits * UNITS_PER_CREDIT
        session.add(Grant(id=_id(key), workspace_id=DEMO_WORKSPACE_ID, scope=Scope.WORKSPACE, source=source,
                          effective_at=now, expires_at=expires, amount=units, remaining=units,
                          reason="demo starting balance", created_by=users["operator"]))
        await session.flush()
        session.add(LedgerEntry(workspace_id=DEMO_WORKSPACE_ID, grant_id=_id(key), kind=EntryKind.GRANT,
                                amount=units, cause=Cause.GRANT, actor_id=users["operator"]))


async def _tokens(session: AsyncSession, users: dict[str, uuid.UUID], known: dict[str, str]) -> list[DemoIdentity]:
    out = []
    for key, email, name, role, seat, _op in IDENTITIES:
        secret = known.get(key)
        actor: Actor | None = await authenticate(session, secret) if secret else None
        if actor is None or actor.user_id != users[key]:
            _, secret = await issue_token(session, users[key], "demo")
        out.append(DemoIdentity(key, email, name, role.value if role else None, seat.value if seat else None, secret))
    return out


async def load_demo(db: Database, known_tokens: dict[str, str]) -> list[DemoIdentity]:
    """Seed once; return a working token per demo identity, reusing `known_tokens` when still
    valid (so restarts print the same tokens) and issuing new ones otherwise."""

    async def work(session: AsyncSession) -> list[DemoIdentity]:
        users = await _users(session)
        await _seed(session, users)
        return await _tokens(session, users, known_tokens)

    return await db.transaction(work)
