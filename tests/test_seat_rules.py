"""Pure seat and ownership rules."""

import pytest

from domain.errors import LastOwner, SeatLimitReached
from domain.workspaces.rules import SeatUsage, check_owner_kept, check_seats


def test_within_limits_passes():
    check_seats(SeatUsage(members=5, creators=3, owners=1), seat_cap=5, creator_limit=3)


def test_one_seat_too_many_is_refused_with_the_numbers():
    with pytest.raises(SeatLimitReached) as err:
        check_seats(SeatUsage(members=6, creators=1, owners=1), seat_cap=5, creator_limit=3)
    assert (err.value.seat, err.value.limit, err.value.requested) == ("any", 5, 6)


def test_creator_seats_are_checked_separately():
    with pytest.raises(SeatLimitReached) as err:
        check_seats(SeatUsage(members=4, creators=4, owners=1), seat_cap=20, creator_limit=3)
    assert err.value.seat == "creator"


def test_no_owner_left_is_refused():
    check_owner_kept(SeatUsage(members=1, creators=0, owners=1))
    with pytest.raises(LastOwner):
        check_owner_kept(SeatUsage(members=2, creators=0, owners=0))
