"""The pricing engine (domain.pricing.rules): property tests on random price specs, parameters,
time-of-day windows and plan multipliers, then readable examples with the issue's figures.

Figures in the examples follow the demo catalog: a standard video model at 5 credits a second
(10 s at 720p = 50), a premium video model at 500 with a companion image model at 70, an
SDXL-class image model at 5, a chat model at 1-5 credits.
"""

import contextlib
import copy
import functools
from datetime import UTC, datetime, time
from decimal import Decimal, localcontext
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from domain.pricing.rules import (
    MAX_QUANTITY,
    MULTIPLIER_KINDS,
    NUMERIC_PARAMETERS,
    WHOLE_PARAMETERS,
    FileTier,
    LineKind,
    PriceSpec,
    TimeWindow,
    generations_covered,
    metered_parameters,
    normalize,
    quote,
    window_in_force,
)

D = Decimal
NY = ZoneInfo("America/New_York")
fast = settings(max_examples=200, deadline=None)


def exact_sum(values) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 400  # line items are exact and may carry more digits than the default 28
        return sum(values, D(0))


def before_minimum(q) -> Decimal:
    """The exact cost before the minimum charge and the rounding."""
    return exact_sum(item.amount for item in q.line_items if item.kind not in (LineKind.MINIMUM, LineKind.ROUNDING))


# --- strategies -------------------------------------------------------------------------------

def _scaled(low: int, high: int, places: int):
    """Decimals with `places` places in [low, high]: integers scaled, cheaper than st.decimals."""
    return st.integers(min_value=low * 10**places, max_value=high * 10**places).map(lambda n: D(n).scaleb(-places))


money = _scaled(0, 50, 3)
rates = st.none() | money
# Multipliers 0 .. 4. Zero (a free tier) stays possible but rare: hypothesis favours boundary
# values, and a zero anywhere in the chain would flatten most examples into "0 >= 0".
multipliers = st.one_of(*[st.integers(min_value=1, max_value=400).map(lambda n: D(n).scaleb(-2))] * 4, _scaled(0, 4, 2))
RESOLUTIONS = ["480p", "720p", "1080p", "4K"]
INPUT_TYPES = ["text-to-video", "image-to-video"]
ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]  # Lord Howe: 30-minute DST
resolution_maps = st.none() | st.dictionaries(st.sampled_from(RESOLUTIONS), multipliers, min_size=1)
input_type_maps = st.none() | st.dictionaries(st.sampled_from(INPUT_TYPES), multipliers, min_size=1)
file_bands = st.lists(st.tuples(_scaled(0, 60, 1), _scaled(0, 1, 2) | multipliers),  # mostly discounts
                        max_size=3, unique_by=lambda band: band[0])
limit_values = st.integers(min_value=0, max_value=5000)


@functools.cache
def quantities(key: str, limit: Decimal | None = None):
    """Up to the limit (or 5000), half the time below 100, where the step and file-size tiers are."""
    top = 5000 if limit is None else int(limit)
    if key in WHOLE_PARAMETERS:
        return st.integers(min_value=0, max_value=min(top, 100)).map(D) | st.integers(min_value=0, max_value=top).map(D)
    return _scaled(0, min(top, 100), 2) | _scaled(0, top, 3)


nudges = {key: st.integers(min_value=0, max_value=3).map(D) if key in WHOLE_PARAMETERS else _scaled(0, 3, 2)
          for key in NUMERIC_PARAMETERS}
steps = {key: D(1) if key in WHOLE_PARAMETERS else D("0.01") for key in NUMERIC_PARAMETERS}  # the smallest raise
raises = {key: nudges[key] | quantities(key) for key in NUMERIC_PARAMETERS}


@functools.cache
def one_of(names: tuple[str, ...]):
    return st.sampled_from(names)


@st.composite
def specs(draw) -> PriceSpec:
    kwargs = {
        "base": draw(money),
        "minimum": draw(money),
        "per_1k_input_tokens": draw(rates),
        "per_1k_output_tokens": draw(rates),
        "per_megapixel": draw(rates),
        "per_second": draw(rates),
        "per_extra_step": draw(rates),
        "included_steps": draw(st.integers(min_value=0, max_value=50)),
        "per_mb": draw(rates),
        "resolution_tiers": draw(resolution_maps),
        "input_type_multipliers": draw(input_type_maps),
    }
    if kwargs["per_mb"] is not None:
        kwargs["file_tiers"] = tuple(FileTier(above, factor) for above, factor in draw(file_bands))
    metered = [key for key, rate in zip(NUMERIC_PARAMETERS, ("per_1k_input_tokens", "per_1k_output_tokens",
               "per_megapixel", "per_second", "per_extra_step", "per_mb")) if kwargs[rate] is not None]
    limits = {key: draw(limit_values) for key in metered if draw(st.booleans())}
    defaults = {key: draw(quantities(key, limits.get(key))) for key in metered if draw(st.booleans())}
    for key, choices in (("resolution", kwargs["resolution_tiers"]), ("input_type", kwargs["input_type_multipliers"])):
        if choices is not None:
            defaults[key] = draw(one_of(tuple(sorted(choices))))
    return PriceSpec("m", limits=limits, defaults=defaults, **kwargs)


@st.composite
def parameters(draw, spec: PriceSpec) -> dict:
    params = {}
    for key in metered_parameters(spec):
        if not draw(st.booleans()):
            continue  # left to the default
        if key == "resolution":
            params[key] = draw(one_of(tuple(sorted(spec.resolution_tiers))))
        elif key == "input_type":
            params[key] = draw(one_of(tuple(sorted(spec.input_type_multipliers))))
        else:
            value = draw(quantities(key, spec.limits.get(key)))
            params[key] = str(value) if draw(st.booleans()) else value  # JSON clients send either
    return params


hours = st.integers(0, 23)
minutes = st.sampled_from([0, 30])
window_names = st.sampled_from(["surge", "off-peak"])
zones = st.sampled_from(ZONES)
weekday_sets = st.none() | st.frozensets(st.integers(0, 6), min_size=1)


@st.composite
def windows(draw) -> TimeWindow:
    return TimeWindow(
        name=draw(window_names),
        start=time(draw(hours), draw(minutes)),
        end=time(draw(hours), draw(minutes)),
        multiplier=draw(multipliers),
        timezone=draw(zones),
        weekdays=draw(weekday_sets),
    )


moments = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC))
window_lists = st.lists(windows(), max_size=3)
plan_multipliers = st.just(D(1)) | multipliers


@st.composite
def cases(draw):
    spec = draw(specs())
    return spec, draw(parameters(spec)), {
        "at": draw(moments), "windows": draw(window_lists), "plan_multiplier": draw(plan_multipliers)
    }


# --- properties -------------------------------------------------------------------------------


@fast
@given(cases())
def test_cost_is_never_negative(case):
    spec, params, context = case
    q = quote(spec, params, **context)
    assert q.total >= 0 and q.units >= 0
    for item in q.line_items:
        if item.amount < 0:  # only a discount multiplier may take something off
            assert item.kind in MULTIPLIER_KINDS and item.rate < 1, item


def boundaries(spec: PriceSpec, key: str) -> list[Decimal]:
    """Where the price of `key` changes slope: tier edges are where pricing bugs live."""
    if key == "file_mb":
        return [tier.above_mb for tier in spec.file_tiers]
    if key == "steps":
        return [D(spec.included_steps)]
    return []


@fast
@given(cases(), st.data())
def test_raising_any_numeric_parameter_never_lowers_the_total(case, data):
    spec, params, context = case
    normalized = normalize(spec, params)
    for key in metered_parameters(spec):
        if key not in NUMERIC_PARAMETERS:
            continue
        limit = spec.limits.get(key, MAX_QUANTITY)
        low, high = dict(normalized), dict(normalized)
        edges = boundaries(spec, key)
        if edges and data.draw(st.sampled_from([True, True, False]), label=f"{key} across a tier edge"):
            edge = data.draw(st.sampled_from(edges), label="edge")
            low[key] = min(limit, max(D(0), edge - data.draw(nudges[key], label="from below it by")))
            high[key] = min(limit, edge + data.draw(nudges[key], label="to above it by") + steps[key])
        else:
            high[key] = min(limit, low[key] + data.draw(raises[key], label=f"raise {key} by"))
        cheaper, dearer = quote(spec, low, **context), quote(spec, high, **context)
        assert dearer.total >= cheaper.total, key
        assert before_minimum(dearer) >= before_minimum(cheaper), key  # also where the minimum hides it


@fast
@given(cases())
def test_line_items_sum_exactly_to_the_total(case):
    spec, params, context = case
    q = quote(spec, params, **context)
    assert exact_sum(item.amount for item in q.line_items) == q.total
    assert q.units == q.total * 1000 and isinstance(q.units, int)
    assert q.line_items[0].kind == LineKind.BASE
    assert [item.kind for item in q.line_items].count(LineKind.ROUNDING) <= 1


@fast
@given(cases(), st.data())
def test_same_inputs_always_give_the_same_quote(case, data):
    spec, params, context = case
    first = quote(spec, params, **context)
    other = data.draw(parameters(spec), label="another request in between")
    quote(spec, other, **context)
    with contextlib.suppress(ValidationFailed):  # a model without limits refuses an open-ended hold
        quote(spec, other, **dict(context, open_ended_max=True))
    again = quote(copy.deepcopy(spec), dict(reversed(list(params.items()))), **copy.deepcopy(context))
    assert again == first


@fast
@given(cases())
def test_total_is_rounded_once_up_to_a_unit_and_respects_the_minimum(case):
    spec, params, context = case
    q = quote(spec, params, **context)
    exact = exact_sum(item.amount for item in q.line_items if item.kind != LineKind.ROUNDING)
    assert q.total == q.total.quantize(D("0.001"))
    assert exact <= q.total < exact + D("0.001")
    assert q.total >= spec.minimum


# --- examples: the demo catalog ---------------------------------------------------------------

TIERS = {"480p": D("0.5"), "720p": D(1), "1080p": D("1.5"), "4K": D(3)}
VIDEO = PriceSpec(
    "video-standard",
    per_second=D(5),
    resolution_tiers=TIERS,
    input_type_multipliers={"text-to-video": D(1), "image-to-video": D("0.8")},
    limits={"seconds": 10},
    defaults={"seconds": 10, "resolution": "720p", "input_type": "text-to-video"},
)
PREMIUM_VIDEO = PriceSpec(
    "video-premium", per_second=D(50), resolution_tiers=TIERS, limits={"seconds": 10},
    defaults={"seconds": 10, "resolution": "720p"},
)
PREMIUM_IMAGE = PriceSpec("image-premium", base=D(70))
SDXL = PriceSpec("sdxl", base=D(5), per_megapixel=D(1), included_steps=30, per_extra_step=D("0.1"),
                 limits={"megapixels": 4, "steps": 150})
CHAT = PriceSpec(
    "chat", per_1k_input_tokens=D("0.5"), per_1k_output_tokens=D("1.5"), minimum=D(1),
    limits={"input_tokens": 128_000, "output_tokens": 4000}, defaults={"input_tokens": 1000, "output_tokens": 1000},
)
UPSCALER = PriceSpec("upscaler", per_mb=D("0.1"), file_tiers=(FileTier(D(10), D("0.7")),))

WINTER_DAY = datetime(2025, 1, 15, tzinfo=NY)  # a Wednesday, EST (UTC-5)
SURGE = TimeWindow("surge", time(18), time(22), D("1.5"), "America/New_York")
OFF_PEAK = TimeWindow("off-peak", time(22), time(6), D("0.8"), "America/New_York")


def ny(day: datetime, hour: int, minute: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute)


def kinds(q):
    return [item.kind for item in q.line_items]


def item(q, kind):
    (found,) = [i for i in q.line_items if i.kind == kind]
    return found


def test_a_1080p_ten_second_video():
    q = quote(VIDEO, {"seconds": 10, "resolution": "1080p"}, at=ny(WINTER_DAY, 12))
    assert (q.total, q.units) == (D("75.000"), 75_000)
    assert str(q.total) == "75.000"
    assert kinds(q) == ["BASE", "SECONDS", "RESOLUTION"]
    assert item(q, "SECONDS").label == "10 s x 5.000 credits" and item(q, "SECONDS").amount == 50
    assert item(q, "RESOLUTION").label == "1080p x1.5" and item(q, "RESOLUTION").amount == 25
    assert q.window is None and q.window_ends_at is None
    assert q.parameters == {"resolution": "1080p", "seconds": D(10), "input_type": "text-to-video"}


def test_surge_applies_from_18_00_to_22_00_new_york_time():
    at_seven = quote(VIDEO, {"resolution": "1080p"}, at=ny(WINTER_DAY, 19), windows=[SURGE])
    assert at_seven.window == SURGE and at_seven.total == D("112.5")
    surge = item(at_seven, "TIME_OF_DAY")
    assert surge.label == "surge 18:00-22:00 America/New_York x1.5"
    assert (surge.quantity, surge.rate, surge.amount) == (D(75), D("1.5"), D("37.5"))
    assert at_seven.window_ends_at == datetime(2025, 1, 16, 3, 0, tzinfo=UTC)  # 22:00 EST
    assert at_seven.window_ends_at.tzinfo is UTC

    assert quote(VIDEO, {"resolution": "1080p"}, at=ny(WINTER_DAY, 17, 59), windows=[SURGE]).total == 75
    assert window_in_force([SURGE], ny(WINTER_DAY, 18))[0] == SURGE  # the start is inside
    assert window_in_force([SURGE], ny(WINTER_DAY, 22)) == (None, None)  # the end is not
    # in summer the same local hours are one hour earlier in UTC
    assert window_in_force([SURGE], datetime(2025, 7, 1, 19, tzinfo=NY))[1] == datetime(2025, 7, 2, 2, tzinfo=UTC)
    # the same moment seen from UTC gives the same answer
    assert window_in_force([SURGE], datetime(2025, 1, 16, 0, 0, tzinfo=UTC))[0] == SURGE


def test_off_peak_discount_wraps_past_midnight():
    late = quote(VIDEO, {}, at=ny(WINTER_DAY, 23, 30), windows=[SURGE, OFF_PEAK])
    assert late.window == OFF_PEAK and late.total == 40
    discount = item(late, "TIME_OF_DAY")
    assert discount.amount == -10 and discount.label == "off-peak 22:00-06:00 America/New_York x0.8"
    assert late.window_ends_at == datetime(2025, 1, 16, 11, tzinfo=UTC)  # 06:00 EST the next morning
    early = window_in_force([OFF_PEAK], ny(WINTER_DAY, 3))
    assert early == (OFF_PEAK, datetime(2025, 1, 15, 11, tzinfo=UTC))
    assert window_in_force([OFF_PEAK], ny(WINTER_DAY, 6)) == (None, None)
    assert window_in_force([OFF_PEAK], ny(WINTER_DAY, 21, 59)) == (None, None)


def test_weekdays_name_the_day_a_window_starts():
    friday_night = TimeWindow("friday late", time(22), time(2), D("1.2"), "America/New_York", frozenset({4}))
    saturday = datetime(2025, 1, 18, tzinfo=NY)
    assert window_in_force([friday_night], ny(saturday, 1))[0] == friday_night
    assert window_in_force([friday_night], ny(saturday, 23)) == (None, None)
    weekend = TimeWindow("weekend", time(0), time(0), D("0.9"), "UTC", frozenset({5, 6}))
    assert window_in_force([weekend], datetime(2025, 1, 18, 9, tzinfo=UTC)) == (weekend, datetime(2025, 1, 20, tzinfo=UTC))
    always = TimeWindow("always", time(0), time(0), D("0.9"), "UTC")
    assert window_in_force([always], datetime(2025, 1, 18, 9, tzinfo=UTC)) == (always, None)


def test_a_window_ending_inside_the_skipped_dst_hour_ends_at_the_jump():
    night = TimeWindow("night", time(0), time(2, 30), D("0.5"), "America/New_York")
    spring_forward = datetime(2025, 3, 9, 1, 59, tzinfo=NY)  # at 02:00 EST the clocks jump to 03:00 EDT
    assert window_in_force([night], spring_forward) == (night, datetime(2025, 3, 9, 7, 0, tzinfo=UTC))


def test_overlapping_windows_never_stack_the_first_listed_wins():
    evening = TimeWindow("evening", time(17), time(23), D("1.2"), "America/New_York")
    q = quote(VIDEO, {}, at=ny(WINTER_DAY, 19), windows=[SURGE, evening])
    assert kinds(q).count("TIME_OF_DAY") == 1 and q.window == SURGE and q.total == 75
    # before the surge the evening rate applies, and stops applying when the surge takes over
    assert window_in_force([SURGE, evening], ny(WINTER_DAY, 17, 30)) == (evening, datetime(2025, 1, 15, 23, tzinfo=UTC))
    assert window_in_force([evening, SURGE], ny(WINTER_DAY, 19))[0] == evening


def test_file_size_tiers_first_10_mb_standard_then_30_percent_cheaper():
    q = quote(UPSCALER, {"file_mb": 25}, at=ny(WINTER_DAY, 12))
    assert q.total == D("2.05")
    bands = [i for i in q.line_items if i.kind == "FILE_SIZE"]
    assert [(b.quantity, b.rate, b.amount) for b in bands] == [(10, D("0.1"), D("1.0")), (15, D("0.07"), D("1.05"))]
    assert bands[1].label == "files above 10 MB 30% cheaper: 15 MB x 0.070 credits"
    assert quote(UPSCALER, {"file_mb": 8}, at=ny(WINTER_DAY, 12)).total == D("0.8")
    assert kinds(quote(UPSCALER, {"file_mb": 10}, at=ny(WINTER_DAY, 12))) == ["BASE", "FILE_SIZE"]


def test_image_to_video_is_cheaper_than_text_to_video():
    text = quote(VIDEO, {"input_type": "text-to-video"}, at=ny(WINTER_DAY, 12))
    image = quote(VIDEO, {"input_type": "image-to-video"}, at=ny(WINTER_DAY, 12))
    assert (text.total, image.total) == (50, 40)
    assert item(image, "INPUT_TYPE").label == "image-to-video x0.8"
    assert "INPUT_TYPE" not in kinds(text)  # x1 changes nothing, so it is not a line


def test_minimum_charge_tops_up_a_tiny_request():
    q = quote(CHAT, {"input_tokens": 120, "output_tokens": 40}, at=ny(WINTER_DAY, 12))
    assert q.total == 1
    assert kinds(q) == ["BASE", "INPUT_TOKENS", "OUTPUT_TOKENS", "MINIMUM"]
    assert item(q, "MINIMUM").amount == D("0.88")  # 1 - (0.06 + 0.06)
    assert item(q, "INPUT_TOKENS").label == "120 input tokens x 0.500 credits per 1k"


def test_minimum_applies_after_an_off_peak_discount():
    q = quote(CHAT, {"input_tokens": 1000, "output_tokens": 300}, at=ny(WINTER_DAY, 23), windows=[OFF_PEAK])
    assert kinds(q) == ["BASE", "INPUT_TOKENS", "OUTPUT_TOKENS", "TIME_OF_DAY", "MINIMUM"]
    assert item(q, "TIME_OF_DAY").amount == D("-0.19")  # 0.95 x (0.8 - 1)
    assert item(q, "MINIMUM").amount == D("0.24") and q.total == 1


def test_rounding_is_one_line_up_to_a_thousandth():
    q = quote(PriceSpec("embed", per_1k_input_tokens=D("0.001")), {"input_tokens": 1234}, at=ny(WINTER_DAY, 12))
    assert q.total == D("0.002") and q.units == 2
    assert item(q, "ROUNDING").amount == D("0.000766") and kinds(q)[-1] == "ROUNDING"


def test_enterprise_plan_multiplier_is_a_line_item():
    q = quote(VIDEO, {}, at=ny(WINTER_DAY, 12), plan_multiplier=D("0.8"))
    assert q.total == 40 and item(q, "PLAN").label == "plan price x0.8"


def test_a_parameter_the_model_does_not_meter_lists_the_accepted_ones():
    with pytest.raises(ValidationFailed) as caught:
        quote(SDXL, {"seconds": 10}, at=ny(WINTER_DAY, 12))
    assert caught.value.field == "seconds"
    assert caught.value.message == "seconds: not metered by sdxl; accepted: megapixels, steps"
    with pytest.raises(ValidationFailed, match="accepted: none"):
        quote(PREMIUM_IMAGE, {"steps": 40}, at=ny(WINTER_DAY, 12))


def test_an_unknown_resolution_tier_lists_the_accepted_ones():
    with pytest.raises(ValidationFailed) as caught:
        quote(VIDEO, {"resolution": "8K"}, at=ny(WINTER_DAY, 12))
    assert caught.value.field == "resolution"
    assert caught.value.message.endswith("accepted: 480p, 720p, 1080p, 4K")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("seconds", -1, "negative"),
        ("seconds", "-0.5", "negative"),
        ("seconds", float("nan"), "finite"),
        ("seconds", "NaN", "finite"),
        ("seconds", "Infinity", "finite"),
        ("seconds", float("inf"), "finite"),
        ("seconds", "ten", "number"),
        ("seconds", True, "number"),
        ("seconds", [10], "number"),
        ("seconds", 36_000, "at most 10 for video-standard"),  # a 10-hour video on a 10-second model
        ("seconds", "10.001", "at most 10"),
        ("seconds", "1e400", "at most 1000000000"),
        ("seconds", "0.0000000001", "decimal places"),
        # Decimal("١٢") is 12 and Decimal("1_0") is 10: text a person wrote as something else.
        ("seconds", "\u0661\u0662", "number"),
        ("seconds", "1_0", "number"),
    ],
)
def test_bad_values_are_refused(field, value, says):
    with pytest.raises(ValidationFailed, match=says) as caught:
        quote(VIDEO, {field: value}, at=ny(WINTER_DAY, 12))
    assert caught.value.field == field


@pytest.mark.parametrize(("field", "value"), [("steps", "40.5"), ("input_tokens", 1.5)])
def test_tokens_and_steps_are_whole_numbers(field, value):
    spec = SDXL if field == "steps" else CHAT
    with pytest.raises(ValidationFailed, match="whole number"):
        normalize(spec, {field: value})


def test_json_numbers_strings_and_floats_price_the_same():
    at = ny(WINTER_DAY, 12)
    quotes = [quote(VIDEO, {"seconds": v}, at=at) for v in (2.5, "2.5", " 2.50 ", D("2.5"))]
    assert all(q == quotes[0] for q in quotes) and quotes[0].total == D("12.5")
    assert quotes[0].parameters["seconds"] == D("2.5")


def test_open_ended_usage_holds_the_most_the_request_allows():
    at = ny(WINTER_DAY, 12)
    hold = quote(CHAT, {"input_tokens": 2000}, at=at, open_ended_max=True)
    assert hold.parameters["output_tokens"] == 4000 and hold.total == 7  # 1 + 4 x 1.5
    asked = quote(CHAT, {"input_tokens": 2000, "output_tokens": 1000}, at=at, open_ended_max=True)
    assert asked.total == D("2.5")
    actual = quote(CHAT, {"input_tokens": 2000, "output_tokens": 350}, at=at)  # what completeGeneration captures
    assert actual.total == D("1.525") <= hold.total
    video_hold = quote(VIDEO, {}, at=at, open_ended_max=True)
    assert video_hold.parameters["seconds"] == 10
    unbounded = PriceSpec("chat-unbounded", per_1k_output_tokens=D(1))
    with pytest.raises(ValidationFailed, match="sets no maximum") as caught:
        quote(unbounded, {}, at=at, open_ended_max=True)
    assert caught.value.field == "output_tokens"
    assert quote(unbounded, {}, at=at).total == 0  # a plain quote at default usage


def test_generations_covered_by_a_balance():
    at = ny(WINTER_DAY, 12)
    assert quote(PREMIUM_VIDEO, {}, at=at).total == 500
    assert generations_covered(PREMIUM_VIDEO, D(5000), at=at) == 10  # 5,000 credits = 10 videos at 500
    assert generations_covered(PREMIUM_IMAGE, D(5000), at=at) == 71  # ... or 71 images at 70
    assert generations_covered(PREMIUM_VIDEO, D("499.999"), at=at) == 0
    assert generations_covered(PREMIUM_VIDEO, D(0), at=at) == 0
    assert generations_covered(PREMIUM_VIDEO, D(5000), at=ny(WINTER_DAY, 19), windows=[SURGE]) == 6  # 750 each
    assert generations_covered(PriceSpec("free"), D(5000), at=at) == -1  # free: "unlimited", not a count


def test_float_prices_are_refused():
    with pytest.raises(TypeError, match="never float"):
        PriceSpec("bad", per_second=0.1)
    with pytest.raises(TypeError):
        quote(VIDEO, {}, at=ny(WINTER_DAY, 12), plan_multiplier=0.8)
    with pytest.raises(TypeError):
        generations_covered(VIDEO, 5000.0, at=ny(WINTER_DAY, 12))


def test_a_naive_moment_is_refused():
    with pytest.raises(TypeError, match="timezone-aware"):
        quote(VIDEO, {}, at=datetime(2025, 1, 15, 12))


def test_a_price_figure_in_other_digits_or_with_underscores_is_refused_not_read_as_a_number():
    for text in ("\u0661\u0662", "1_0", "\uff11"):  # Arabic-Indic 12, 1_0, a fullwidth 1
        with pytest.raises(ValidationFailed, match="decimal number") as caught:
            PriceSpec("v", per_second=text)
        assert caught.value.field == "per_second"
    # An exponent still reads: documents stored before money.decimal_text hold str(Decimal)'s.
    assert PriceSpec("v", per_second="5E-9").per_second == D("0.000000005")


def test_price_specs_that_cannot_be_priced_are_refused():
    with pytest.raises(ValidationFailed) as caught:
        PriceSpec("v", per_second=D(1), limits={"steps": 10})
    assert caught.value.field == "limits.steps"
    with pytest.raises(ValidationFailed) as caught:
        PriceSpec("v", per_second=D(1), limits={"seconds": 10}, defaults={"seconds": 20})
    assert caught.value.field == "defaults.seconds"
    with pytest.raises(ValidationFailed) as caught:
        PriceSpec("v", resolution_tiers={"720p": D(1)})
    assert caught.value.field == "defaults.resolution"
    with pytest.raises(ValidationFailed) as caught:
        PriceSpec("v", base=D(-1))
    assert caught.value.field == "base"
    with pytest.raises(ValidationFailed):
        PriceSpec("v", file_tiers=(FileTier(D(10), D("0.7")),))
    with pytest.raises(ValidationFailed) as caught:
        TimeWindow("surge", time(18), time(22), D("1.5"), "America/Gotham")
    assert caught.value.field == "timezone"


def test_a_spec_keeps_its_own_copy_of_the_figures():
    tiers = dict(TIERS)
    spec = PriceSpec("v", per_second=D(5), resolution_tiers=tiers, defaults={"resolution": "720p"})
    tiers["720p"] = D(100)
    assert quote(spec, {"seconds": 1}, at=ny(WINTER_DAY, 12)).total == 5
