"""Expected failures as GraphQL types sharing the `Error` interface, and the mapping from
domain errors. Each mutation's result union lists exactly the errors it can return."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import strawberry

from domain import errors as de
from domain.money import format_credits

T = TypeVar("T")
R = TypeVar("R")


@strawberry.interface(description="Shared by every expected failure in a mutation result.")
class Error:
    message: str
    code: str


@strawberry.type(description="Unknown id, or one the caller may not see (the answer is the same).")
class NotFoundError(Error):
    what: str


@strawberry.type(description="An input value was refused; nothing was written.")
class ValidationError(Error):
    field: str


@strawberry.type(description="The plan's seats or creator seats are all taken.")
class SeatLimitReached(Error):
    seat_kind: str
    limit: int
    requested: int


@strawberry.type(description="The change would leave the workspace without an owner.")
class LastOwner(Error):
    pass


@strawberry.type(description="The user is already a member of this workspace.")
class AlreadyMember(Error):
    pass


@strawberry.type(description="Not enough spendable credits; nothing was held.")
class InsufficientCredits(Error):
    needed: str
    available: str


@strawberry.type(description="The idempotency key was used before with a different request; nothing moved.")
class IdempotencyKeyReused(Error):
    pass


@strawberry.type(description="The payment reference was already turned into credits; nothing was created.")
class PaymentReferenceUsed(Error):
    pass


@strawberry.type(description="The payment provider refused the payment; nothing was created.")
class PaymentFailed(Error):
    reason: str


@strawberry.type(description="The payment provider did not answer; nothing was created. Ask again with the same "
                               "idempotency key and payment reference.")
class PaymentUnavailable(Error):
    pass


@strawberry.type(description="The generation was already completed, failed or timed out.")
class GenerationAlreadySettled(Error):
    status: str


@strawberry.type(description="The generation would pass a spend limit; nothing was held.")
class SpendLimitExceeded(Error):
    limit_id: strawberry.ID
    scope: str
    period: str
    limit: str = strawberry.field(description="Credits allowed this period, approved overages included.")
    used: str
    requested: str
    can_request_overage: bool


@strawberry.type(description="The overage request was already decided or has lapsed.")
class OverageNotPending(Error):
    status: str


def to_graphql_error(exc: de.DomainError) -> Error:
    match exc:
        case de.NotFound():
            return NotFoundError(message=exc.message, code=exc.code, what=exc.what)
        case de.ValidationFailed():
            return ValidationError(message=exc.message, code=exc.code, field=exc.field)
        case de.SeatLimitReached():
            return SeatLimitReached(
                message=exc.message, code=exc.code, seat_kind=exc.seat, limit=exc.limit, requested=exc.requested
            )
        case de.LastOwner():
            return LastOwner(message=exc.message, code=exc.code)
        case de.AlreadyMember():
            return AlreadyMember(message=exc.message, code=exc.code)
        case de.InsufficientCredits():
            return InsufficientCredits(
                message=exc.message, code=exc.code, needed=format_credits(exc.needed),
                available=format_credits(exc.available),
            )
        case de.IdempotencyKeyReused():
            return IdempotencyKeyReused(message=exc.message, code=exc.code)
        case de.PaymentReferenceUsed():
            return PaymentReferenceUsed(message=exc.message, code=exc.code)
        case de.PaymentFailed():
            return PaymentFailed(message=exc.message, code=exc.code, reason=exc.reason)
        case de.PaymentUnavailable():
            return PaymentUnavailable(message=exc.message, code=exc.code)
        case de.SpendLimitExceeded():
            return SpendLimitExceeded(
                message=exc.message, code=exc.code, limit_id=strawberry.ID(str(exc.limit_id)), scope=exc.scope,
                period=exc.period, limit=format_credits(exc.limit), used=format_credits(exc.used),
                requested=format_credits(exc.requested), can_request_overage=exc.can_request,
            )
        case de.OverageNotPending():
            return OverageNotPending(message=exc.message, code=exc.code, status=exc.status)
        case de.GenerationAlreadySettled():
            return GenerationAlreadySettled(message=exc.message, code=exc.code, status=exc.status)
    raise TypeError(f"no GraphQL type for {type(exc).__name__}")  # a bug: masked as unexpected


def optional_id(value: str | None) -> str | None:
    """An optional id argument as the domain takes it: absent only when it is null. An empty
    string is a (malformed, so unknown) id, never "no id": read as absent, an empty memberId
    granted to the pool instead of a seat and an empty groupId took a member out of its group."""
    return None if value is None else str(value)


async def result(call: Awaitable[T], to_type: Callable[[T], R]) -> R | Any:
    """Run one domain call; map its value to the success type or its expected failure to the
    error type. Anything else propagates (auth errors become top-level, the rest is masked)."""
    try:
        value = await call
    except de.DomainError as exc:
        return to_graphql_error(exc)
    return to_type(value)
