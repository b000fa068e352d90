"""The consumption order (DESIGN "Words"): property tests on random buckets, plus examples.

Times are a fixed UTC base plus small whole-hour offsets, so expiry and effective times often land
exactly on `now` and many buckets tie on everything but their grant id.
"""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.ledger.consumption import (
    SCOPE_RANK,
    Bucket,
    Draw,
    NotEnough,
    Scope,
    available_total,
    plan_draws,
    spendable,
)

BASE = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
fast = settings(max_examples=200, deadline=None)


def at(hours: int) -> datetime:
    return BASE + timedelta(hours=hours)


offsets = st.integers(min_value=-4, max_value=4)


@st.composite
def buckets(draw) -> list[Bucket]:
    """Up to 8 buckets. About half share the previous one's scope and priority, and of those half
    share its times too, so the later tiebreaks (expiry, age, grant id) are exercised often."""
    pool: list[Bucket] = []
    for grant_id in draw(st.lists(st.uuids(), max_size=8, unique=True)):
        like = pool[-1] if pool and draw(st.booleans()) else None
        same_times = like is not None and draw(st.booleans())
        pool.append(
            Bucket(
                grant_id=grant_id,
                scope=like.scope if like else draw(st.sampled_from(Scope)),
                priority=like.priority if like else draw(st.integers(min_value=0, max_value=2)),
                effective_at=like.effective_at if same_times else at(draw(offsets)),
                expires_at=like.expires_at if same_times else draw(st.none() | offsets.map(at)),
                created_at=at(draw(st.integers(min_value=-6, max_value=-5))),
                available=draw(st.integers(min_value=0, max_value=20)),
            )
        )
    return pool


nows = st.integers(min_value=-3, max_value=3).map(at)
amounts = st.integers(min_value=1, max_value=80)


# Oracles written independently of the module, straight from the design's words.


def live(b: Bucket, now: datetime) -> bool:
    not_expired = b.expires_at is None or b.expires_at > now  # expiring exactly now is expired
    return b.effective_at <= now and not_expired and b.available > 0


def comes_before(a: Bucket, b: Bucket) -> bool:
    """Seat, group, workspace; then priority; soonest expiry (never last); oldest; grant id."""
    if a.scope != b.scope:
        return SCOPE_RANK[a.scope] < SCOPE_RANK[b.scope]
    if a.priority != b.priority:
        return a.priority < b.priority
    if a.expires_at != b.expires_at:
        if a.expires_at is None or b.expires_at is None:
            return b.expires_at is None
        return a.expires_at < b.expires_at
    if a.created_at != b.created_at:
        return a.created_at < b.created_at
    return a.grant_id < b.grant_id


def draws_or_short(pool: list[Bucket], units: int, now: datetime) -> list[Draw] | None:
    try:
        return plan_draws(pool, units, now)
    except NotEnough:
        return None


@fast
@given(buckets(), amounts, nows)
def test_only_effective_unexpired_buckets_pay(pool, units, now):
    by_id = {b.grant_id: b for b in pool}
    assert all(live(b, now) for b in spendable(pool, now))
    assert {b.grant_id for b in spendable(pool, now)} == {b.grant_id for b in pool if live(b, now)}
    for d in draws_or_short(pool, units, now) or []:
        assert live(by_id[d.grant_id], now)


@fast
@given(buckets(), amounts, nows)
def test_draws_are_positive_within_available_and_once_per_grant(pool, units, now):
    by_id = {b.grant_id: b for b in pool}
    draws = draws_or_short(pool, units, now) or []
    assert all(0 < d.units <= by_id[d.grant_id].available for d in draws)
    assert all(isinstance(d.units, int) for d in draws)
    assert len({d.grant_id for d in draws}) == len(draws)


@fast
@given(buckets(), amounts, nows)
def test_draws_exactly_the_amount_or_says_how_much_there_is(pool, units, now):
    there_is = sum(b.available for b in pool if live(b, now))
    assert available_total(pool, now) == there_is
    if there_is >= units:
        assert sum(d.units for d in plan_draws(pool, units, now)) == units
    else:
        with pytest.raises(NotEnough) as short:
            plan_draws(pool, units, now)
        assert (short.value.needed, short.value.available) == (units, there_is)


@fast
@given(st.data(), buckets(), amounts, nows)
def test_the_input_order_does_not_matter(data, pool, units, now):
    shuffled = data.draw(st.permutations(pool))
    assert spendable(shuffled, now) == spendable(pool, now)
    assert draws_or_short(shuffled, units, now) == draws_or_short(pool, units, now)


@fast
@given(buckets(), amounts, nows)
def test_greedy_in_consumption_order(pool, units, now):
    order = spendable(pool, now)
    assert all(comes_before(a, b) for a, b in zip(order, order[1:]))

    drawn = {d.grant_id: d.units for d in draws_or_short(pool, units, now) or []}
    assert list(drawn) == [b.grant_id for b in order if b.grant_id in drawn]
    for b in order:
        if b.grant_id in drawn:
            earlier = [a for a in pool if live(a, now) and comes_before(a, b)]
            assert all(drawn.get(a.grant_id) == a.available for a in earlier)
    # in particular: no group grant while a seat grant has units left, nor workspace before group
    used_ranks = [SCOPE_RANK[b.scope] for b in order if b.grant_id in drawn]
    assert used_ranks == sorted(used_ranks)


def bucket(**fields) -> Bucket:
    defaults = dict(
        grant_id=uuid.uuid4(),
        scope=Scope.WORKSPACE,
        priority=0,
        effective_at=at(-48),
        expires_at=None,
        created_at=at(-48),
        available=1000,
    )
    return Bucket(**(defaults | fields))


@pytest.mark.parametrize("units", [0, -5, True, 1.0, "10"])
def test_units_must_be_a_positive_int(units):
    pool = [bucket(available=100)]
    with pytest.raises(ValueError):
        plan_draws(pool, units, BASE)


# Examples


def test_promotion_expiring_soon_is_spent_before_a_purchase():
    purchase = bucket(created_at=at(-72))  # older, never expires
    promotion = bucket(expires_at=BASE + timedelta(days=3), available=500)
    assert plan_draws([purchase, promotion], 800, BASE) == [
        Draw(promotion.grant_id, 500),
        Draw(purchase.grant_id, 300),
    ]


def test_lower_priority_number_is_drawn_first():
    later = bucket(priority=5, expires_at=at(1))
    first = bucket(priority=1)
    assert plan_draws([later, first], 1000, BASE) == [Draw(first.grant_id, 1000)]


def test_equal_everything_but_age_draws_the_older_first():
    newer = bucket(created_at=at(-1))
    older = bucket(created_at=at(-2))
    assert plan_draws([newer, older], 1500, BASE) == [
        Draw(older.grant_id, 1000),
        Draw(newer.grant_id, 500),
    ]


def test_seat_then_group_then_workspace():
    workspace = bucket(scope=Scope.WORKSPACE, priority=0, expires_at=at(1))
    group = bucket(scope=Scope.GROUP, priority=9)
    seat = bucket(scope=Scope.SEAT, priority=9)
    assert [b.grant_id for b in spendable([workspace, group, seat], BASE)] == [
        seat.grant_id,
        group.grant_id,
        workspace.grant_id,
    ]


def test_expiry_boundaries():
    expiring_now = bucket(expires_at=BASE)
    starting_now = bucket(effective_at=BASE)
    assert spendable([expiring_now, starting_now], BASE) == [starting_now]


def test_short_pool_draws_nothing_and_reports_the_total():
    pool = [bucket(available=300), bucket(available=200), bucket(expires_at=at(-1))]
    with pytest.raises(NotEnough) as short:
        plan_draws(pool, 600, BASE)
    assert (short.value.needed, short.value.available) == (600, 500)
