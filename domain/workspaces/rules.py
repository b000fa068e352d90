"""Pure seat and ownership rules: no database, easy to test."""

from __future__ import annotations

from dataclasses import dataclass

from domain.errors import LastOwner, SeatLimitReached


@dataclass(frozen=True, slots=True)
class SeatUsage:
    members: int
    creators: int
    owners: int


def check_seats(after: SeatUsage, *, seat_cap: int, creator_limit: int, before: SeatUsage | None = None,
                limits_before: tuple[int, int] | None = None) -> None:
    """Refuse a change that would leave more members than the plan's seats, or more creator
    seats than the free plus paid creator seats.

    A workspace can already be over a limit without any change of its own (an operator shrank
    its plan, `plans.update_plan`). Given the usage `before` the change (and the seat cap and
    creator limit before it, when the change is to the plan or the paid seats), a change is
    refused only when it adds to an excess: another member or creator seat, or a smaller limit.
    A rename, a creator seat given up, or a step back towards the limit goes through."""
    seat_cap_before, creator_limit_before = limits_before or (seat_cap, creator_limit)

    def excess(usage: SeatUsage | None, attr: str, limit: int) -> int:
        return max(0, getattr(usage, attr) - limit) if usage is not None else 0

    if after.members > seat_cap and excess(after, "members", seat_cap) > excess(before, "members", seat_cap_before):
        raise SeatLimitReached("any", seat_cap, after.members)
    if after.creators > creator_limit and \
            excess(after, "creators", creator_limit) > excess(before, "creators", creator_limit_before):
        raise SeatLimitReached("creator", creator_limit, after.creators)


def check_owner_kept(after: SeatUsage) -> None:
    if after.owners < 1:
        raise LastOwner()
