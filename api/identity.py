"""Viewer and API tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from strawberry.types import Info

from api.context import Context
from api.errors import NotFoundError, ValidationError, result
from api.workspaces import WorkspaceMembership
from domain import identity
from domain.workspaces import service as workspaces

UserKind = strawberry.enum(identity.UserKind, name="UserKind")


@strawberry.type(name="ApiToken")
class ApiTokenType:
    id: strawberry.ID
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def from_model(cls, t: identity.ApiToken) -> ApiTokenType:
        return cls(
            id=strawberry.ID(str(t.id)), name=t.name, created_at=t.created_at,
            last_used_at=t.last_used_at, revoked_at=t.revoked_at,
        )


@strawberry.type(description="A new token. The secret is shown this once and never again.")
class CreatedApiToken:
    token: ApiTokenType
    secret: str


@strawberry.type
class Viewer:
    id: strawberry.ID
    kind: UserKind
    email: str | None
    name: str
    is_operator: bool

    @strawberry.field(description="Workspaces the viewer is a member of, with their role and seat.")
    async def workspaces(self, info: Info[Context, None]) -> list[WorkspaceMembership]:
        caller = await info.context.caller()
        rows = await workspaces.viewer_memberships(info.context.db, caller)
        return [WorkspaceMembership.from_domain(m) for m in rows]

    @strawberry.field
    async def api_tokens(self, info: Info[Context, None]) -> list[ApiTokenType]:
        caller = await info.context.caller()
        tokens = await identity.own_tokens(info.context.db, caller.actor)
        return [ApiTokenType.from_model(t) for t in tokens]


@strawberry.input
class CreateApiTokenInput:
    name: str


@strawberry.input
class RevokeApiTokenInput:
    token_id: strawberry.ID


CreateApiTokenResult = Annotated[CreatedApiToken | ValidationError, strawberry.union("CreateApiTokenResult")]
RevokeApiTokenResult = Annotated[ApiTokenType | NotFoundError, strawberry.union("RevokeApiTokenResult")]


@strawberry.type
class IdentityQuery:
    @strawberry.field(description="The signed-in user or service account.")
    async def viewer(self, info: Info[Context, None]) -> Viewer:
        caller = await info.context.caller()
        user = await identity.whoami(info.context.db, caller.actor)
        return Viewer(
            id=strawberry.ID(str(user.id)), kind=user.kind, email=user.email, name=user.name,
            is_operator=user.is_operator,
        )


@strawberry.type
class IdentityMutation:
    @strawberry.mutation(description="Create an API token for yourself; the secret is returned once. At most "
                                     f"{identity.MAX_ACTIVE_TOKENS} of your tokens may be active (unrevoked) at a "
                                     "time (a ValidationError on `apiTokens` past it). Service accounts are "
                                     "refused (FORBIDDEN): their tokens come from the operator's "
                                     "`creditpool create-service-token`.")
    async def create_api_token(self, info: Info[Context, None], input: CreateApiTokenInput) -> CreateApiTokenResult:
        caller = await info.context.caller()
        call = identity.create_own_token(info.context.db, caller.actor, input.name)
        return await result(call, lambda ts: CreatedApiToken(token=ApiTokenType.from_model(ts[0]), secret=ts[1]))

    @strawberry.mutation(description="Revoke one of your own API tokens. Revoking twice is harmless.")
    async def revoke_api_token(self, info: Info[Context, None], input: RevokeApiTokenInput) -> RevokeApiTokenResult:
        caller = await info.context.caller()
        call = identity.revoke_own_token(info.context.db, caller.actor, input.token_id)
        return await result(call, ApiTokenType.from_model)

    # Incident response, as a mutation of its own rather than an `all` flag on revokeApiToken:
    # there the token id would become optional, and one missing argument would sign out every
    # device, which cannot be undone. "Other": the token asking stays live, so whoever is cleaning
    # up stays signed in to finish (and may then revoke it too, with revokeApiToken).
    @strawberry.mutation(description="Revoke every one of your API tokens except the one making this request, "
                                     "at once: open subscriptions of the revoked tokens end within seconds, as "
                                     "for revokeApiToken. Returns the tokens it revoked (none already revoked).")
    async def revoke_other_api_tokens(self, info: Info[Context, None]) -> list[ApiTokenType]:
        caller = await info.context.caller()
        tokens = await identity.revoke_own_other_tokens(info.context.db, caller.actor)
        return [ApiTokenType.from_model(t) for t in tokens]
