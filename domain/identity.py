"""Users, service accounts, operators, and API tokens.

Tokens are random secrets shown once. Only their SHA-256 digest is stored: the secret carries
256 bits of entropy, so a slow password hash would add latency to every request and no safety.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import CheckConstraint, ForeignKey, Index, LargeBinary, String, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from domain.base import Base, created_at, str_enum, uuid_pk
from domain.db import SessionSql
from domain.errors import Forbidden, NotFound, Unauthenticated, ValidationFailed

TOKEN_PREFIX = "cp_"
# Refresh `last_used_at` at most this often per token, so authenticating stays a read.
LAST_USED_GRANULARITY = timedelta(seconds=60)
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_EMAIL = 254
MAX_NAME = 100
# The most live (unrevoked) tokens one user may hold through `createApiToken`: enough for every
# device and script a person runs, few enough that a leaked token cannot bury its owner in
# successors. The operator's CLI (`create-user`, `create-service-token`) is not capped: it is the
# way back in for a user at the cap with no working secret.
MAX_ACTIVE_TOKENS = 50


class UserKind(enum.StrEnum):
    HUMAN = "human"
    SERVICE = "service"


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("kind = 'service' OR email IS NOT NULL", name="human_has_email"),
        CheckConstraint("email = lower(email)", name="email_lowercase"),
        # A service account is known by its name (`create-service-token --name`): one per name
        # (migration 0012). People are known by their email; their names may repeat.
        Index("uq_users_service_name", "name", unique=True, postgresql_where=text("kind = 'service'")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    kind: Mapped[UserKind] = mapped_column(str_enum(UserKind, "user_kind"))
    email: Mapped[str | None] = mapped_column(String(MAX_EMAIL), unique=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    is_operator: Mapped[bool] = mapped_column(default=False, server_default="false")
    created_at: Mapped[datetime] = created_at()


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (Index("ix_api_tokens_user_id", "user_id"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = created_at()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


@dataclass(frozen=True, slots=True)
class Actor:
    """The authenticated subject of a request: a human (maybe an operator) or a service account."""

    user_id: uuid.UUID
    kind: UserKind
    is_operator: bool
    token_id: uuid.UUID

    @property
    def is_service(self) -> bool:
        return self.kind is UserKind.SERVICE


def hash_token(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > MAX_EMAIL or not EMAIL_RE.match(email):
        raise ValidationFailed("email", "not a valid email address")
    return email


# Control characters (but tab and line breaks) and the bidirectional overrides and isolates: a
# name or a reason shown in a dashboard or an audit log must read as what it is, never reorder
# what follows it ("Trojan Source") or hide text.
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_name(value: str, field: str = "name", *, max_len: int = MAX_NAME) -> str:
    """A name, reason or note people will read: trimmed, not empty, bounded, and free of
    characters that change how the text around it displays."""
    value = value.strip()
    if not value:
        raise ValidationFailed(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationFailed(field, f"must be at most {max_len} characters")
    if _HIDDEN.search(value):
        raise ValidationFailed(field, "must not contain control characters or bidirectional overrides")
    return value


async def get_or_create_user(session: AsyncSession, email: str, *, name: str | None = None) -> User:
    """Find a human user by email, creating one if needed (race-safe via ON CONFLICT)."""
    from sqlalchemy.dialects.postgresql import insert

    email = normalize_email(email)
    display = clean_name(name, "name") if name else email.split("@")[0][:MAX_NAME]
    await session.execute(
        insert(User)
        .values(id=uuid.uuid4(), kind=UserKind.HUMAN, email=email, name=display)
        .on_conflict_do_nothing(index_elements=[User.email])
    )
    return (await session.execute(select(User).where(User.email == email))).scalar_one()


async def get_or_create_service_account(session: AsyncSession, name: str) -> User:
    """The service account named `name`, created if there is none. Race: two runs for a new name
    would each find none and create one; the insert waits on the unique index for the other's to
    commit and then does nothing, and the read that follows sees the account it committed."""
    from sqlalchemy.dialects.postgresql import insert

    name = clean_name(name)
    await session.execute(
        insert(User)
        .values(id=uuid.uuid4(), kind=UserKind.SERVICE, name=name, email=None)
        .on_conflict_do_nothing(index_elements=[User.name], index_where=text("kind = 'service'"))
    )
    return (await session.execute(select(User).where(User.kind == UserKind.SERVICE, User.name == name))).scalar_one()


async def issue_token(session: AsyncSession, user_id: uuid.UUID, name: str, *,
                      actor_id: uuid.UUID | None = None) -> tuple[ApiToken, str]:
    """Create a token; the secret is returned once and never stored. `actor_id`: who asked (the
    user themself through `createApiToken`; none for the operator's CLI)."""
    secret = new_secret()
    token = ApiToken(user_id=user_id, name=clean_name(name), token_hash=hash_token(secret))
    session.add(token)
    await session.flush()  # its creation time comes back with the insert (RETURNING)
    await _audit(session, [token], actor_id, "apitoken.created")
    return token, secret


async def revoke_token(session: AsyncSession, actor: Actor, token_id: uuid.UUID) -> ApiToken:
    # The user's lock and the asking token re-checked under it, as for revoke-all: a leaked token
    # revoked by its owner's revokeOtherApiTokens while this waited must not then revoke the token
    # that did it, leaving its owner no live token at all.
    await lock_user(session, actor.user_id)
    await still_live(session, actor)
    token = (
        await session.execute(
            select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == actor.user_id).with_for_update()
        )
    ).scalar_one_or_none()
    if token is None:
        raise NotFound("token")
    if token.revoked_at is None:
        token.revoked_at = func.now()
        await session.flush()
        await session.refresh(token)
        # Revoked now: a second revocation records nothing.
        await _audit(session, [token], actor.user_id, "apitoken.revoked")
    return token


async def _audit(session: AsyncSession, tokens: list[ApiToken], actor_id: uuid.UUID | None, action: str) -> None:
    """An `apitoken.created` or `apitoken.revoked` entry per token in the audit log of every
    workspace its user is a member of. A token is a person's, not a workspace's, and acts in each
    of their workspaces: each one's log shows when it started and stopped. Without its name,
    which its owner chose and which may speak of another workspace. A service account is a
    member of none (its role is the platform's), so its tokens (`create-service-token`,
    `revoke-tokens --service`) are in no workspace's log."""
    if not tokens:
        return
    from domain.governance import audit  # the audit log's module depends on this one
    from domain.workspaces.models import Member

    user_id = tokens[0].user_id
    workspaces = (await session.execute(
        select(Member.workspace_id).where(Member.user_id == user_id, Member.removed_at.is_(None))
    )).scalars().all()
    for ws_id in workspaces:
        for t in tokens:
            if action == "apitoken.created":
                before, after, at = None, {"userId": user_id, "createdAt": t.created_at}, t.created_at
            else:
                before, after = {"userId": user_id, "revokedAt": None}, {"userId": user_id, "revokedAt": t.revoked_at}
                at = t.revoked_at
            audit.record(session, ws_id, actor_id, action, "api_token", t.id, before=before, after=after, at=at)


async def lock_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Serialize changes to a user's set of tokens. Race: two creates at the cap would each count
    49 live tokens and both insert. FOR NO KEY UPDATE, not FOR UPDATE: the key-share locks that
    every row referencing the user takes (a token inserted, a generation started) do not wait."""
    await session.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))


async def still_live(session: AsyncSession, actor: Actor) -> None:
    """Under `lock_user`: the token the request authenticated with is still unrevoked. Race: a
    request sent with a leaked token, waiting for the lock while the owner revokes every other
    token, would otherwise mint a successor (or revoke the owner's token) on the strength of an
    authentication that no longer holds. Refused as an unknown token is."""
    live = await session.execute(
        select(ApiToken.id).where(ApiToken.id == actor.token_id, ApiToken.revoked_at.is_(None))
    )
    if live.scalar_one_or_none() is None:
        raise Unauthenticated()


async def revoke_other_tokens(session: AsyncSession, actor: Actor) -> list[ApiToken]:
    """Revoke every live token of the actor's but the one asking; returns those it revoked."""
    await lock_user(session, actor.user_id)
    await still_live(session, actor)
    revoked = await _revoke_live(session, actor.user_id, keep=actor.token_id)
    await _audit(session, revoked, actor.user_id, "apitoken.revoked")
    return revoked


async def _revoke_live(session: AsyncSession, user_id: uuid.UUID, *, keep: uuid.UUID | None = None) -> list[ApiToken]:
    """Under `lock_user`: revoke every live token of the user's but `keep`; returns those revoked."""
    condition = [ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None)]
    if keep is not None:
        condition.append(ApiToken.id != keep)
    rows = await session.execute(
        update(ApiToken)
        .where(*condition)
        .values(revoked_at=func.now())
        .returning(ApiToken)
        .execution_options(synchronize_session=False)
    )
    return sorted(rows.scalars(), key=lambda t: (t.created_at, t.id))


async def list_tokens(session: AsyncSession, user_id: uuid.UUID) -> list[ApiToken]:
    rows = await session.execute(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at))
    return list(rows.scalars())


# A secret's token and user, and `last_used_at` refreshed at most once a minute (a data-modifying
# CTE runs whether or not its rows are read), as CTEs `actor` and `touched`: alone, authenticating
# is one statement outside any transaction (`_AUTHENTICATE`); the hot mutations put the same CTEs
# in front of their first read (`domain.access.CallerRead`), so a request authenticates in no
# round trip of its own.
_GRANULARITY_SECONDS = int(LAST_USED_GRANULARITY.total_seconds())


def actor_ctes(digest: str) -> str:
    """The `actor` CTE for the token whose SHA-256 digest is the parameter `digest`."""
    return f"""actor AS (
    SELECT t.id AS token_id, t.last_used_at, u.id AS user_id, u.kind, u.is_operator, now() AS now
    FROM api_tokens t JOIN users u ON u.id = t.user_id
    WHERE t.token_hash = {digest} AND t.revoked_at IS NULL
), touched AS (
    UPDATE api_tokens SET last_used_at = a.now FROM actor a
    WHERE api_tokens.id = a.token_id
      AND (a.last_used_at IS NULL OR a.now - a.last_used_at > interval '{_GRANULARITY_SECONDS} seconds')
    RETURNING api_tokens.id
)"""


# The actor's columns, named so that they never clash with a read's own.
ACTOR_COLUMNS = ("actor.token_id AS actor_token_id, actor.user_id AS actor_user_id, actor.kind AS actor_kind, "
                 "actor.is_operator AS actor_is_operator")
_AUTHENTICATE = f"WITH {actor_ctes('$1')}\nSELECT {ACTOR_COLUMNS} FROM actor"


def actor_of(row) -> Actor | None:
    """The Actor in a row read with `ACTOR_COLUMNS`; None when the secret matched no live token."""
    if row is None or row["actor_user_id"] is None:
        return None
    return Actor(user_id=row["actor_user_id"], kind=UserKind(row["actor_kind"]), is_operator=row["actor_is_operator"],
                 token_id=row["actor_token_id"])


def well_formed(secret: str) -> bool:
    return secret.startswith(TOKEN_PREFIX) and len(secret) <= 200


async def authenticate(session: AsyncSession, secret: str) -> Actor | None:
    """Resolve a bearer secret to an Actor, or None for unknown or revoked tokens (no detail why),
    inside an open session."""
    if not well_formed(secret):
        return None
    return actor_of(await SessionSql(session).fetchrow(_AUTHENTICATE, hash_token(secret)))


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("user")
    return user


# --- services (one transaction each) -------------------------------------------------------

async def create_own_token(db, actor: Actor, name: str) -> tuple[ApiToken, str]:
    """`createApiToken`: a human's new token. A service account's tokens come only from the
    operator (`creditpool create-service-token`): a leaked worker token must not be able to issue
    itself successors that outlive its revocation."""
    if actor.is_service:
        raise Forbidden("createApiToken: a service account's tokens are issued by an operator "
                        "(creditpool create-service-token)")
    name = clean_name(name)  # refused before anything is locked

    async def work(session: AsyncSession) -> tuple[ApiToken, str]:
        await lock_user(session, actor.user_id)
        await still_live(session, actor)
        live = (await session.execute(
            select(func.count()).select_from(ApiToken)
            .where(ApiToken.user_id == actor.user_id, ApiToken.revoked_at.is_(None))
        )).scalar_one()
        if live >= MAX_ACTIVE_TOKENS:
            raise ValidationFailed("apiTokens", f"at most {MAX_ACTIVE_TOKENS} active tokens per user: "
                                                "revoke one you no longer use first")
        return await issue_token(session, actor.user_id, name, actor_id=actor.user_id)

    return await db.transaction(work)


async def revoke_own_token(db, actor: Actor, token_id: str) -> ApiToken:
    try:
        tid = uuid.UUID(str(token_id))
    except ValueError:
        raise NotFound("token") from None
    return await db.transaction(lambda s: revoke_token(s, actor, tid))


async def revoke_own_other_tokens(db, actor: Actor) -> list[ApiToken]:
    return await db.transaction(lambda s: revoke_other_tokens(s, actor))


async def own_tokens(db, actor: Actor) -> list[ApiToken]:
    return await db.read(lambda s: list_tokens(s, actor.user_id))


async def whoami(db, actor: Actor) -> User:
    return await db.read(lambda s: get_user(s, actor.user_id))


async def authenticate_secret(db, secret: str) -> Actor | None:
    """The same as `authenticate`, as one statement on its own (every request does this)."""
    if not well_formed(secret):
        return None
    return await authenticate_digest(db, hash_token(secret))


async def authenticate_digest(db, digest: bytes) -> Actor | None:
    """`authenticate_secret` for a secret already hashed."""
    return actor_of(await db.fetchrow(_AUTHENTICATE, digest))


async def cli_user_token(db, email: str, *, operator: bool) -> str:
    """`creditpool create-user`: find or create the user, optionally make them an operator,
    and return a new token's secret."""

    async def work(session: AsyncSession) -> str:
        user = await get_or_create_user(session, email)
        if operator:
            user.is_operator = True
        return (await issue_token(session, user.id, "cli"))[1]

    return await db.transaction(work)


async def cli_service_token(db, name: str) -> str:
    """`creditpool create-service-token`: the service account named `name` (created if new)
    gets a new token; its secret is returned."""

    async def work(session: AsyncSession) -> str:
        user = await get_or_create_service_account(session, name)
        return (await issue_token(session, user.id, user.name))[1]

    return await db.transaction(work)


async def cli_revoke_tokens(db, *, service: str | None = None,
                            email: str | None = None) -> tuple[User, list[ApiToken]]:
    """`creditpool revoke-tokens`: revoke every live token of the service account named `service`
    or of the person with `email` (exactly one of them), for incident response: a service
    account cannot revoke its own tokens without a live one, nor be given a token by
    `createApiToken`. Open streams of the revoked tokens end at their next re-check, as after
    any revocation. Returns the user and the tokens revoked (none if all were revoked already);
    NotFound for an unknown name or email."""
    if (service is None) == (email is None):
        raise ValueError("exactly one of service and email")
    if service is not None:
        service = clean_name(service)
        who = User.kind == UserKind.SERVICE, User.name == service
    else:
        email = normalize_email(email)
        who = User.kind == UserKind.HUMAN, User.email == email

    async def work(session: AsyncSession) -> tuple[User, list[ApiToken]]:
        user = (await session.execute(select(User).where(*who))).scalar_one_or_none()
        if user is None:
            raise NotFound("service account" if service is not None else "user")
        # The same lock as createApiToken and revokeOtherApiTokens: a token minted meanwhile
        # is either revoked here or created after this commits.
        await lock_user(session, user.id)
        revoked = await _revoke_live(session, user.id)
        await _audit(session, revoked, None, "apitoken.revoked")  # the operator's CLI: no actor
        return user, revoked

    return await db.transaction(work)
