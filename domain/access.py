"""Authorization follows the data (money rule 7): the workspace of a check is read from the row
being touched, the caller's roles in it from the members table, and the policy decides.

A caller with no relation to the workspace gets `NotFound`, exactly as for an unknown id, so a
member of workspace A learns nothing about workspace B. A caller who can see the workspace but
may not do the action gets `Forbidden`.

A change that locks what it authorizes against checks the caller before taking the lock and
again under it (`authorized_lock`, `authorized_row`), so only callers who may make the change
ever queue on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from domain.clock import SYSTEM_CLOCK, Clock
from domain import identity
from domain.errors import DomainError, Forbidden, NotFound, Unauthenticated
from domain.identity import Actor
from domain.workspaces.models import Member, Workspace
from policies import Action, Authorizer


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (the authenticated actor), the process's policy, and its clock."""

    actor: Actor
    authorizer: Authorizer
    clock: Clock = SYSTEM_CLOCK

    def roles(self, member: Member | None) -> set[str]:
        """Everything the caller holds in a workspace: their membership's role and seat, and
        their platform roles."""
        return member_roles(member) | self.platform_roles()

    def platform_roles(self) -> set[str]:
        roles = set()
        if self.actor.is_operator:
            roles.add("platform:operator")
        if self.actor.is_service:
            roles.add("platform:service")
        return roles


class Credentials:
    """A request's bearer secret, not checked yet. The hot mutations check it inside their first
    read (`CallerRead`) instead of in a round trip of its own; the caller found is kept, so a
    request checks its secret once."""

    __slots__ = ("digest", "authorizer", "clock", "caller")

    def __init__(self, secret: str, authorizer: Authorizer, clock: Clock = SYSTEM_CLOCK) -> None:
        if not identity.well_formed(secret):
            raise Unauthenticated()
        self.digest = identity.hash_token(secret)
        self.authorizer = authorizer
        self.clock = clock
        self.caller: Caller | None = None

    def accept(self, actor: Actor | None) -> Caller:
        """The caller these credentials turned out to be; Unauthenticated for no live token."""
        if actor is None:
            raise Unauthenticated()
        self.caller = Caller(actor=actor, authorizer=self.authorizer, clock=self.clock)
        return self.caller


Who = Caller | Credentials  # an authenticated caller, or credentials the first read will check


def known(who: Who) -> Caller | None:
    """The caller, if already authenticated."""
    return who if isinstance(who, Caller) else who.caller


async def authenticate(db, who: Who) -> Caller:
    """The caller, authenticating on its own (one statement) when no read has checked it yet."""
    return known(who) or who.accept(await identity.authenticate_digest(db, who.digest))


T = TypeVar("T")


async def validated(db, who: Who, parse: Callable[[], T]) -> T:
    """`parse()` the request's input. On bad input an unknown secret still hears UNAUTHENTICATED
    first, as it would had it been checked before the input."""
    try:
        return parse()
    except DomainError:
        await authenticate(db, who)
        raise


class CallerRead:
    """A read that needs the caller's user id, as its last parameter `$n`, in two forms: for a
    known caller, and for credentials, where the same statement authenticates them (the token's
    CTEs in front, the read joined to the actor). `fetchrow` returns the caller and the read's
    row, None when the read found nothing; an unknown or revoked secret raises Unauthenticated."""

    def __init__(self, read: Callable[[str], str], n: int) -> None:
        self.known = read(f"${n}")
        self.authenticating = (
            f"WITH {identity.actor_ctes(f'${n}')}\n"
            f"SELECT {identity.ACTOR_COLUMNS}, r.* FROM actor\n"
            f"LEFT JOIN LATERAL (SELECT true AS read_found, q.* FROM ({read('actor.user_id')}) q) r ON true"
        )

    async def fetchrow(self, sql, who: Who, *args: Any) -> tuple[Caller, Any]:
        caller = known(who)
        if caller is not None:
            return caller, await sql.fetchrow(self.known, *args, caller.actor.user_id)
        row = await sql.fetchrow(self.authenticating, *args, who.digest)
        return who.accept(identity.actor_of(row)), row if row["read_found"] else None


def parse_id(value: str | uuid.UUID, what: str) -> uuid.UUID:
    """An id naming what is fetched or changed: a malformed one is just another unknown id. (An id
    that only filters a list is `pages.parse_filter_id`: malformed, it is bad input.)"""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(what) from None


def member_roles(member: Member | None) -> set[str]:
    if member is None:
        return set()
    return role_set(member.role, member.seat)


def role_set(role: str, seat: str) -> set[str]:
    """A membership's Casbin subjects, from its role and seat (enum members or their values)."""
    return {f"role:{role}", f"seat:{seat}"}


async def active_membership(
    session: AsyncSession, user_id: uuid.UUID, workspace_id: uuid.UUID, *, fresh: bool = False
) -> Member | None:
    """`fresh`: overwrite a membership the session already holds with the row as it is now (the
    identity map would otherwise keep the role and seat it read first)."""
    query = select(Member).where(
        Member.workspace_id == workspace_id, Member.user_id == user_id, Member.removed_at.is_(None)
    )
    if fresh:
        query = query.execution_options(populate_existing=True)
    return (await session.execute(query)).scalar_one_or_none()


async def authorize(
    session: AsyncSession, caller: Caller, workspace_id: uuid.UUID, action: Action, *, what: str,
    fresh: bool = False,
) -> Member | None:
    """Check `action` in `workspace_id` (read from the row) and return the caller's membership.

    `what` names the thing the client asked for, so that an outsider's error reads exactly like
    the one for an id that does not exist. `fresh` checks again a caller this session has already
    checked, against their membership as it is now (after waiting on a lock, say).
    """
    member = await active_membership(session, caller.actor.user_id, workspace_id, fresh=fresh)
    # Only a platform identity (no membership) needs the workspace looked up.
    exists = member is not None or not caller.platform_roles() or await session.get(Workspace, workspace_id) is not None
    decide(caller, workspace_id, action, what, member_roles(member), is_member=member is not None,
           workspace_exists=exists)
    return member


async def authorized_lock(
    session: AsyncSession, caller: Caller, workspace_id: uuid.UUID, action: Action, *, what: str,
    lock: Callable[[], Awaitable[T]],
) -> tuple[T, Member | None]:
    """Authorize, `lock()`, authorize again; returns what `lock` returned and the caller's
    membership as the second check read it.

    Only a caller allowed to do `action` in the workspace ever queues on a lock of it: the first
    check takes no lock, so an outsider holding a foreign id hears the same NotFound as for an
    unknown id (and a member without the right Forbidden) at once, and never makes the
    workspace's own changes, or the spends they conflict with, wait behind theirs. The second
    check, once `lock()` holds the lock, reads the membership afresh: a role revoked or a member
    removed by the transaction we waited for is seen, as when the lock came first. `lock()`
    re-reads under the lock whatever the lock protects (and raises NotFound if it is gone)."""
    await authorize(session, caller, workspace_id, action, what=what)
    locked = await lock()
    member = await authorize(session, caller, workspace_id, action, what=what, fresh=True)
    return locked, member


R = TypeVar("R")


async def authorized_row(
    session: AsyncSession, caller: Caller, model: type[R], row_id: uuid.UUID, action: Action, *, what: str,
    gone: Callable[[R], bool] = lambda row: False,
) -> tuple[R, Member | None]:
    """The row `row_id` of `model` (a table with a `workspace_id`, which a row never changes),
    authorized against its own workspace, then locked FOR UPDATE, then authorized again
    (`authorized_lock`). An unknown id, a row `gone` says reads as unknown (removed, say), and a
    foreign id all get NotFound(`what`), without waiting on any lock. Under the lock the row is
    read afresh (populate_existing): what a transaction we waited for changed is seen, and a row
    that went meanwhile is NotFound too."""
    found = await session.get(model, row_id)
    if found is None or gone(found):
        raise NotFound(what)

    async def lock() -> R:
        row = await session.get(model, row_id, with_for_update=True, populate_existing=True)
        if row is None or gone(row):
            raise NotFound(what)
        return row

    return await authorized_lock(session, caller, found.workspace_id, action, what=what, lock=lock)


def decide(
    caller: Caller, workspace_id: uuid.UUID, action: Action, what: str, roles: set[str], *, is_member: bool,
    workspace_exists: bool,
) -> None:
    """The decision of `authorize`, from what was read: the caller's membership roles in the
    workspace (empty for none) and whether the workspace exists. Raises NotFound or Forbidden."""
    roles = roles | caller.platform_roles()
    if not roles or not workspace_exists:
        raise NotFound(what)  # an outsider, or a platform identity asking about no workspace
    if not caller.authorizer.allows(str(caller.actor.user_id), roles, str(workspace_id), action):
        if not is_member and not caller.authorizer.allows(
            str(caller.actor.user_id), roles, str(workspace_id), Action.VIEW_WORKSPACE
        ):
            raise NotFound(what)  # a platform identity that cannot even see the workspace
        raise Forbidden(action.value)
