"""Pure seat and ownership rules: no database, easy to test."""

from __future__ import annotations

from dataclasses import dataclass

from domain.errors import LastOwner, SeatLimitReached


@dataclass(frozen=True, slots=True)
class SeatUsage:
    members: int
    creators: int
    owners: int


def check_seats(after: SeatUsage, *, seat_cap: int, creator_limit: int) -> None:
    """Refuse a change that would leave more members than the plan's seats, or more creator
    seats than the free plus paid creator seats."""
    if after.members > seat_cap:
        raise SeatLimitReached("any", seat_cap, after.members)
    if after.creators > creator_limit:
        raise SeatLimitReached("creator", creator_limit, after.creators)


def check_owner_kept(after: SeatUsage) -> None:
    if after.owners < 1:
        raise LastOwner()
