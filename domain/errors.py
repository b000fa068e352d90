"""Typed domain errors. The API maps each to a member of a mutation's result union
(expected failures) or to a top-level error (authentication and authorization)."""

from __future__ import annotations


class DomainError(Exception):
    """An expected failure a client can act on. `code` is stable and machine-readable."""

    code = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """Unknown id, or an id the caller may not see: both answer the same (money rule 7)."""

    code = "NOT_FOUND"

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what


class ValidationFailed(DomainError):
    code = "VALIDATION"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SeatLimitReached(DomainError):
    code = "SEAT_LIMIT_REACHED"

    def __init__(self, seat: str, limit: int, requested: int) -> None:
        kind = "creator seats" if seat == "creator" else "seats"
        super().__init__(f"the plan allows {limit} {kind}; this change needs {requested}")
        self.seat = seat
        self.limit = limit
        self.requested = requested


class LastOwner(DomainError):
    code = "LAST_OWNER"

    def __init__(self) -> None:
        super().__init__("a workspace must keep at least one owner")


class AlreadyMember(DomainError):
    code = "ALREADY_MEMBER"

    def __init__(self) -> None:
        super().__init__("that user is already a member of this workspace")


class TopLevelError(Exception):
    """Not an expected result of the operation: surfaces as a top-level GraphQL error with this
    `code`, never in a union."""

    code = "ERROR"


class AuthError(TopLevelError):
    code = "AUTH"


class Unavailable(TopLevelError):
    """No database connection came free in time (the service is overloaded). Raised only while
    waiting for one, before the unit of work sent anything, so a retry with the same idempotency
    key is safe."""

    code = "UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the service is busy: try again")


class LiveInterrupted(TopLevelError):
    """A live stream can no longer be trusted to be complete: the process lost its listening
    connection (what was committed until it was back was never delivered, and nothing replays
    it: `workspaceEvents` ends), a message on the channel could not be read, or a workspace's
    balance watcher stopped (its `balanceChanged` streams would hear nothing more)."""

    code = "LIVE_INTERRUPTED"

    def __init__(self) -> None:
        super().__init__("the live connection was interrupted and events may have been missed: "
                         "re-read what you show and subscribe again")


class Unauthenticated(AuthError):
    code = "UNAUTHENTICATED"

    def __init__(self) -> None:
        super().__init__("authentication required")


class Forbidden(AuthError):
    code = "FORBIDDEN"

    def __init__(self, action: str) -> None:
        super().__init__(f"not allowed: {action}")
        self.action = action


class InsufficientCredits(DomainError):
    code = "INSUFFICIENT_CREDITS"

    def __init__(self, needed: int, available: int, *, what: str = "this generation") -> None:
        super().__init__(f"not enough credits for {what}")
        self.needed = needed  # units
        self.available = available  # units


class IdempotencyKeyReused(DomainError):
    code = "IDEMPOTENCY_KEY_REUSED"

    def __init__(self) -> None:
        super().__init__("this idempotency key was already used with a different request")


class PaymentReferenceUsed(DomainError):
    code = "PAYMENT_REFERENCE_USED"

    def __init__(self) -> None:
        super().__init__("this payment reference was already turned into credits")


class PaymentFailed(DomainError):
    code = "PAYMENT_FAILED"

    def __init__(self, reason: str) -> None:
        super().__init__(f"payment failed: {reason}")
        self.reason = reason


class PaymentUnavailable(DomainError):
    """The payment provider did not answer (an error, a time-out): nothing was recorded. The
    payment may or may not have gone through, so the client asks again with the same key and the
    same payment reference, never a new one (the reference makes it one payment)."""

    code = "PAYMENT_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the payment provider did not answer; nothing was recorded: "
                         "ask again with the same idempotency key and payment reference")


class GenerationAlreadySettled(DomainError):
    code = "GENERATION_ALREADY_SETTLED"

    def __init__(self, status: str) -> None:
        super().__init__(f"the generation is already {status.lower()}")
        self.status = status


class SpendLimitExceeded(DomainError):
    code = "SPEND_LIMIT_EXCEEDED"

    def __init__(self, *, limit_id, scope: str, period: str, limit: int, used: int, requested: int,
                 can_request: bool) -> None:
        super().__init__(f"this would pass the {period.lower()} spend limit on the {scope.lower()}")
        self.limit_id = limit_id
        self.scope = scope
        self.period = period
        self.limit = limit  # units, including approved overages in force
        self.used = used
        self.requested = requested
        self.can_request = can_request


class OverageNotPending(DomainError):
    code = "OVERAGE_NOT_PENDING"

    def __init__(self, status: str, why: str | None = None) -> None:
        super().__init__(f"the request is {status.lower()}, no longer pending" + (f": {why}" if why else ""))
        self.status = status
