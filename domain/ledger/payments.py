"""The payment provider seam. Charging cards is out of scope: the platform takes the payment
and passes its reference; a provider confirms that reference before credits are created.

`TrustedReferenceProvider` (the default) accepts the reference the platform vouches for. A real
provider (Stripe, Paddle, ...) implements `confirm` by looking the payment up; the test provider
succeeds or fails on demand.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

# Auto top-up asks the provider under `auto-topup:{workspace}:{sequence}`, and asks again under
# the same reference until an outcome is recorded. References are unique across workspaces, so a
# manual purchase under one would make that workspace's auto top-up fail on its own reference for
# good (or, in the same workspace, pass a manual payment off as the top-up's): purchases may not
# use the prefix.
AUTO_TOP_UP_PREFIX = "auto-topup:"


def auto_top_up_reference(workspace_id: uuid.UUID, sequence: int) -> str:
    return f"{AUTO_TOP_UP_PREFIX}{workspace_id}:{sequence}"


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    reference: str
    amount_minor: int
    currency: str
    description: str


@dataclass(frozen=True, slots=True)
class PaymentOutcome:
    ok: bool
    reason: str = ""


class PaymentProvider(Protocol):
    name: str

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome: ...


class TrustedReferenceProvider:
    name = "trusted-reference"

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome:
        return PaymentOutcome(ok=True)


class ScriptedProvider:
    """For tests and demos: does not answer (raises) while `unanswered` is positive, then fails
    while `failures` is positive, then succeeds."""

    name = "scripted"

    def __init__(self) -> None:
        self.failures = 0
        self.unanswered = 0
        self.seen: list[PaymentRequest] = []

    async def confirm(self, request: PaymentRequest) -> PaymentOutcome:
        self.seen.append(request)
        if self.unanswered > 0:
            self.unanswered -= 1
            raise ConnectionError("the payment provider did not answer")
        if self.failures > 0:
            self.failures -= 1
            return PaymentOutcome(ok=False, reason="card declined")
        return PaymentOutcome(ok=True)
