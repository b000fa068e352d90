"""The pricing engine: what one generation costs under one model price, as a quote with line items.

A pure rule, no database: the catalog loads a `PriceSpec` (one model's price in one price-list
version) and the price list's `TimeWindow`s, and `quote` does the arithmetic. The GraphQL
`quote`, `startGeneration` (the hold) and `completeGeneration` (the capture, from reported usage
under the generation's own price version) all call this one function, so a generation costs
exactly what it was quoted.

THE ROUNDING RULE (money rule 4)
--------------------------------
Everything is `Decimal`; no float ever touches a price. Every step below is computed exactly (in
a 200-digit context that *traps* any inexact result, so an unrounded figure can never slip
through), and the total is rounded once, at the end, UP to 0.001 credit (one storage unit):

1. Additive charges, each `quantity x rate`, summed to the subtotal:
   BASE (1 x base), INPUT_TOKENS (input_tokens / 1000 x per_1k_input_tokens), OUTPUT_TOKENS
   (likewise), MEGAPIXELS (megapixels x per_megapixel), SECONDS (seconds x per_second), STEPS
   (max(0, steps - included_steps) x per_extra_step), FILE_SIZE (progressive: the bands are
   [0, t1), [t1, t2), ... [tn, infinity) from the tiers sorted by `above_mb`; the first band costs
   per_mb, the band above t_i costs per_mb x t_i.rate_factor; one line item per non-empty band).
2. Multipliers, in this fixed order, each applied to the running total and shown as a line item
   whose amount is `running_total x (m - 1)` (negative for a discount, m < 1):
   RESOLUTION, INPUT_TYPE, TIME_OF_DAY, PLAN. Since every factor is >= 0 the order does not
   change the exact result, only how the line items split it.
3. MINIMUM: if the running total is below `spec.minimum`, one item adds the difference.
4. ROUNDING: one item, `ceil_0.001(exact) - exact`, in [0, 0.001); omitted when zero.

So `total == sum(item.amount for item in quote.line_items)` exactly, `total` is a multiple of
0.001, `total >= minimum`, `total - exact < 0.001`, and `units == total x 1000` (an int).
Line-item amounts are exact and may carry more decimals than 0.001; they are explanations, only
`units` is money to move. (Summing them yourself: they can exceed the default 28-digit Decimal
context only for extreme inputs; use `decimal.localcontext()` with a larger `prec` to be safe.)

Zero-amount items are omitted, except BASE, which is always first (it says "this is the price").

Line items: `quantity x rate == amount` for additive items (tokens are counted in thousands).
For multiplier items, `quantity` is the running total the multiplier applied to and `rate` is the
multiplier (amount = quantity x (rate - 1)). MINIMUM: quantity = running total, rate = minimum.
ROUNDING: quantity and rate are None.

TIME-OF-DAY WINDOWS
-------------------
A window is in force from the first instant the local wall clock of its timezone reads `start`
until the first instant it reads `end` (end <= start: the end is on the next day; start == end:
a full day). `weekdays` names the day a window *starts* on (0 = Monday), so a Friday 22:00-02:00
window still applies at 01:00 on Saturday. Around DST changes: a start or end in the skipped hour
happens at the jump; in the repeated hour, at its first occurrence.

Overlaps never stack: at most one time-of-day multiplier applies, the FIRST window in the given
sequence that is in force. The sequence order is the price list's priority, so callers must pass
windows in a stable stored order (e.g. a position column), never in set or hash order.
`window_ends_at` is the next moment the chosen window stops applying: the end of its occurrence
(joined with back-to-back occurrences, e.g. a 00:00-00:00 weekend window ends Monday 00:00), or
earlier if a window listed before it starts first. None when it never stops (every day, all day).

PARAMETERS
----------
Numeric: input_tokens, output_tokens, megapixels, seconds, steps, file_mb (tokens and steps are
whole numbers; at most 9 decimal places; 0 <= value <= 10^9 and <= the model's limit).
Enum: resolution, input_type. A model meters a parameter when it has a rate (or tier map) for it;
any other key is refused, listing the accepted ones. See `normalize`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import (
    ROUND_CEILING,
    ROUND_DOWN,
    ROUND_FLOOR,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from domain.errors import ValidationFailed
from domain.money import MAX_CREDITS, UNITS_PER_CREDIT

__all__ = [
    "CREDIT_QUANTUM",
    "ENUM_PARAMETERS",
    "MAX_QUANTITY",
    "NUMERIC_PARAMETERS",
    "OPEN_ENDED_PARAMETERS",
    "FileTier",
    "LineItem",
    "LineKind",
    "PriceSpec",
    "Quote",
    "TimeWindow",
    "clock_text",
    "covered_by",
    "default_hold",
    "generations_covered",
    "metered_parameters",
    "normalize",
    "quote",
    "window_in_force",
]

NUMERIC_PARAMETERS = ("input_tokens", "output_tokens", "megapixels", "seconds", "steps", "file_mb")
ENUM_PARAMETERS = ("resolution", "input_type")
# The order parameters are listed in (error messages, normalized output).
PARAMETER_ORDER = (
    "input_tokens",
    "output_tokens",
    "megapixels",
    "resolution",
    "seconds",
    "steps",
    "file_mb",
    "input_type",
)
WHOLE_PARAMETERS = frozenset({"input_tokens", "output_tokens", "steps"})
# Usage only known afterwards: with open_ended_max a missing value holds the model's limit.
OPEN_ENDED_PARAMETERS = ("output_tokens", "seconds")

MAX_QUANTITY = Decimal(10**9)  # no parameter, rate or multiplier is ever larger: anything above is absurd
MAX_PLACES = 9  # decimal places a quantity or spec figure may carry (never rounded: refused)
CREDIT_QUANTUM = Decimal(1) / UNITS_PER_CREDIT  # 0.001 credit = 1 storage unit

_PLACES_QUANTUM = Decimal(1).scaleb(-MAX_PLACES)
# Exact arithmetic: with every input <= 10^9 and <= 9 places, no result needs more than ~140
# digits; any rounding at all raises (Inexact is trapped), so exactness is checked, not assumed.
_EXACT = Context(prec=200, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])
_CEILING = Context(prec=200, rounding=ROUND_CEILING, traps=[InvalidOperation, DivisionByZero, Overflow])
_WIDE = Context(prec=200, traps=[InvalidOperation, DivisionByZero, Overflow])


class LineKind(enum.StrEnum):
    BASE = "BASE"
    INPUT_TOKENS = "INPUT_TOKENS"
    OUTPUT_TOKENS = "OUTPUT_TOKENS"
    MEGAPIXELS = "MEGAPIXELS"
    SECONDS = "SECONDS"
    STEPS = "STEPS"
    FILE_SIZE = "FILE_SIZE"
    RESOLUTION = "RESOLUTION"
    INPUT_TYPE = "INPUT_TYPE"
    TIME_OF_DAY = "TIME_OF_DAY"
    PLAN = "PLAN"
    MINIMUM = "MINIMUM"
    ROUNDING = "ROUNDING"


MULTIPLIER_KINDS = frozenset({LineKind.RESOLUTION, LineKind.INPUT_TYPE, LineKind.TIME_OF_DAY, LineKind.PLAN})


# --- figures in a price spec ------------------------------------------------------------------


def _canon(d: Decimal) -> Decimal:
    """One representation per number (12.50 -> 12.5, 1E+3 -> 1000, -0 -> 0); exact for any
    figure that passed the bounds (<= 10^9, <= 9 places)."""
    if d == 0:
        return Decimal(0)
    if d == d.to_integral_value():
        return d.quantize(Decimal(1), context=_EXACT)
    return d.normalize(_EXACT)


def _too_precise(d: Decimal) -> bool:
    return d.quantize(_PLACES_QUANTUM, rounding=ROUND_DOWN, context=_WIDE) != d


def _check_range(d: Decimal, field_name: str) -> None:
    """What every figure and quantity must be: finite, non-negative, bounded, at most
    `MAX_PLACES` decimal places."""
    if not d.is_finite():
        raise ValidationFailed(field_name, "must be a finite number")
    if d < 0:
        raise ValidationFailed(field_name, "must not be negative")
    if d > MAX_QUANTITY:
        raise ValidationFailed(field_name, f"must be at most {MAX_QUANTITY}")
    if _too_precise(d):
        raise ValidationFailed(field_name, f"has more than {MAX_PLACES} decimal places")


def _read_decimal(value: str, field_name: str, message: str) -> Decimal:
    """A number written as text. Python's Decimal also reads digits of other scripts ("١٢" is 12)
    and underscores ("1_0" is 10): a figure a person wrote as something else, read quietly as a
    number. Only ASCII is accepted, without underscores; an exponent ("5E-9") still is, as
    `str(Decimal)` wrote figures in documents stored before `money.decimal_text`."""
    text = value.strip()
    if not text.isascii() or "_" in text:
        raise ValidationFailed(field_name, message)
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValidationFailed(field_name, message) from None


def _spec_figure(value: Any, field_name: str) -> Decimal:
    """A figure of a price spec (money, multiplier, limit): Decimal, int or decimal string; never
    float (TypeError: a programming error on the money path). Non-negative, finite, bounded."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"{field_name}: use Decimal (or int, or a decimal string), never {type(value).__name__}")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        d = _read_decimal(value, field_name, "must be a decimal number")
    else:
        raise TypeError(f"{field_name}: use Decimal, not {type(value).__name__}")
    _check_range(d, field_name)
    return Decimal(0) if d == 0 else d


def spec_figure(value: Any, field_name: str) -> Decimal:
    """Public form of the figure check, for other price-list values (plan multipliers)."""
    return _spec_figure(value, field_name)


def _spec_choices(value: Mapping[str, Any] | None, field_name: str) -> dict[str, Decimal] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ValidationFailed(field_name, "must map at least one name to a multiplier")
    out: dict[str, Decimal] = {}
    for name, multiplier in value.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValidationFailed(field_name, f"{name!r} is not a usable name")
        out[name] = _spec_figure(multiplier, f"{field_name}.{name}")
    return out


@dataclass(frozen=True, slots=True)
class FileTier:
    """Progressive file-size pricing: the MBs above `above_mb` cost per_mb x rate_factor."""

    above_mb: Decimal
    rate_factor: Decimal  # e.g. Decimal("0.7") = 30% cheaper

    def __post_init__(self) -> None:
        object.__setattr__(self, "above_mb", _spec_figure(self.above_mb, "file_tiers.above_mb"))
        object.__setattr__(self, "rate_factor", _spec_figure(self.rate_factor, "file_tiers.rate_factor"))


@dataclass(frozen=True, slots=True)
class PriceSpec:
    """One model's price in one price-list version; all money in credits (Decimal).

    Validated on construction (a price list that cannot be priced is refused when published, not
    when a creator quotes): every figure a non-negative finite Decimal (int and decimal strings are
    accepted, float is a TypeError; `limits` are quantities, so a float there is read as typed), at
    most 10^9 and 9 decimal places; `limits` and `defaults`
    only name parameters the model meters, and defaults respect the limits; a model with
    resolution tiers or input types must name a default for them (so the "generations covered"
    answer is always defined); file tiers need per_mb. Mappings are copied, and `file_tiers`
    stored sorted by `above_mb`. Errors are `ValidationFailed` naming the spec field.
    """

    model_key: str
    base: Decimal = Decimal(0)  # per generation
    minimum: Decimal = Decimal(0)  # minimum charge
    per_1k_input_tokens: Decimal | None = None
    per_1k_output_tokens: Decimal | None = None
    per_megapixel: Decimal | None = None  # parameter "megapixels"
    resolution_tiers: Mapping[str, Decimal] | None = None  # parameter "resolution": tier -> multiplier
    per_second: Decimal | None = None  # parameter "seconds"
    included_steps: int = 0
    per_extra_step: Decimal | None = None  # parameter "steps"
    per_mb: Decimal | None = None  # parameter "file_mb"
    file_tiers: tuple[FileTier, ...] = ()
    input_type_multipliers: Mapping[str, Decimal] | None = None  # parameter "input_type"
    defaults: Mapping[str, Any] = field(default_factory=dict)  # default parameters
    limits: Mapping[str, Decimal] = field(default_factory=dict)  # maximum per numeric parameter

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.model_key, str) or not self.model_key.strip():
            raise ValidationFailed("model_key", "must be a non-empty string")
        put(self, "base", _spec_figure(self.base, "base"))
        put(self, "minimum", _spec_figure(self.minimum, "minimum"))
        for name in ("per_1k_input_tokens", "per_1k_output_tokens", "per_megapixel", "per_second",
                     "per_extra_step", "per_mb"):
            value = getattr(self, name)
            if value is not None:
                put(self, name, _spec_figure(value, name))
        put(self, "resolution_tiers", _spec_choices(self.resolution_tiers, "resolution_tiers"))
        put(self, "input_type_multipliers", _spec_choices(self.input_type_multipliers, "input_type_multipliers"))
        if isinstance(self.included_steps, bool) or not isinstance(self.included_steps, int) or self.included_steps < 0:
            raise ValidationFailed("included_steps", "must be a whole number >= 0")
        tiers = tuple(self.file_tiers)
        if any(not isinstance(t, FileTier) for t in tiers):
            raise TypeError("file_tiers: expected FileTier items")
        if tiers and self.per_mb is None:
            raise ValidationFailed("file_tiers", "file-size tiers need per_mb")
        tiers = tuple(sorted(tiers, key=lambda t: t.above_mb))
        if len({t.above_mb for t in tiers}) != len(tiers):
            raise ValidationFailed("file_tiers", "two tiers start at the same size")
        put(self, "file_tiers", tiers)

        for name in ("limits", "defaults"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValidationFailed(name, "must be an object of parameter names")
        metered = metered_parameters(self)
        limits: dict[str, Decimal] = {}
        for key, value in dict(self.limits).items():
            if key not in NUMERIC_PARAMETERS or key not in metered:
                raise ValidationFailed(f"limits.{key}", f"not a numeric parameter {self.model_key} meters; "
                                       f"metered: {_listing(p for p in metered if p in NUMERIC_PARAMETERS)}")
            # A limit is a quantity (a parameter's maximum), read like one: a JSON number is the
            # number as typed, true/false is refused (ValidationFailed, not a TypeError).
            if isinstance(value, bool):
                raise ValidationFailed(f"limits.{key}", "must be a number, not true/false")
            if not isinstance(value, (int, float, str, Decimal)):  # JSON null, a list, an object
                raise ValidationFailed(f"limits.{key}", "must be a number")
            limit = _spec_figure(Decimal(str(value)) if isinstance(value, float) else value, f"limits.{key}")
            if key in WHOLE_PARAMETERS and limit != limit.to_integral_value():
                raise ValidationFailed(f"limits.{key}", "must be a whole number")
            limits[key] = _canon(limit)
        put(self, "limits", limits)
        put(self, "defaults", _check_given(self, dict(self.defaults), prefix="defaults."))
        for key in ENUM_PARAMETERS:
            if key in metered and key not in self.defaults:
                choices = self.resolution_tiers if key == "resolution" else self.input_type_multipliers
                raise ValidationFailed(f"defaults.{key}", f"must name the default; one of: {_listing(choices)}")


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A time-of-day multiplier of a price list: surge (> 1) or off-peak (< 1)."""

    name: str
    start: time
    end: time  # local wall-clock; end <= start means it wraps past midnight (start == end: all day)
    multiplier: Decimal
    timezone: str  # IANA name, via zoneinfo
    weekdays: frozenset[int] | None = None  # 0 = Monday, the day the window starts on; None = every day

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValidationFailed("name", "must be a non-empty string")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, time) or value.tzinfo is not None:
                raise ValidationFailed(name, "must be a local wall-clock time without a timezone")
        object.__setattr__(self, "multiplier", _spec_figure(self.multiplier, "multiplier"))
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: a name too long for a file name
            raise ValidationFailed("timezone", f"unknown IANA timezone {self.timezone!r}") from None
        if self.weekdays is not None:
            days = frozenset(self.weekdays)
            if not days or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 6 for d in days):
                raise ValidationFailed("weekdays", "must be a non-empty set of 0 (Monday) .. 6 (Sunday)")
            object.__setattr__(self, "weekdays", days)


@dataclass(frozen=True, slots=True)
class LineItem:
    kind: str  # a LineKind
    label: str  # human readable: "12 s x 4.000 credits", "1080p x1.5", ...
    quantity: Decimal | None
    rate: Decimal | None
    amount: Decimal  # credits, exact; negative only for a multiplier below 1


@dataclass(frozen=True, slots=True)
class Quote:
    total: Decimal  # credits, rounded: sum(item.amount for item in line_items) == total exactly
    units: int  # total x 1000
    line_items: tuple[LineItem, ...]
    window: TimeWindow | None  # the time-of-day multiplier in force, if any
    window_ends_at: datetime | None  # when it stops applying (tz-aware UTC)
    parameters: Mapping[str, Any]  # the normalized parameters that were priced


# --- parameters -------------------------------------------------------------------------------


def metered_parameters(spec: PriceSpec) -> tuple[str, ...]:
    """The parameter keys this model accepts, in the canonical order."""
    rate_of = {
        "input_tokens": spec.per_1k_input_tokens,
        "output_tokens": spec.per_1k_output_tokens,
        "megapixels": spec.per_megapixel,
        "resolution": spec.resolution_tiers,
        "seconds": spec.per_second,
        "steps": spec.per_extra_step,
        "file_mb": spec.per_mb,
        "input_type": spec.input_type_multipliers,
    }
    return tuple(key for key in PARAMETER_ORDER if rate_of[key] is not None)


def _listing(names: Any) -> str:
    names = list(names)
    return ", ".join(names) if names else "none"


def _quantity(key: str, value: Any, spec: PriceSpec, field_name: str) -> Decimal:
    if isinstance(value, bool):
        raise ValidationFailed(field_name, "must be a number, not true/false")
    try:
        if isinstance(value, Decimal):
            d = value
        elif isinstance(value, int):
            d = Decimal(value)
        elif isinstance(value, float):
            d = Decimal(str(value))  # the shortest decimal that reads back as this float: what was typed
        elif isinstance(value, str):
            d = _read_decimal(value, field_name, "must be a number")
        else:
            raise ValidationFailed(field_name, "must be a number")
    except InvalidOperation:
        raise ValidationFailed(field_name, "must be a number") from None
    _check_range(d, field_name)
    if key in WHOLE_PARAMETERS and d != d.to_integral_value():
        raise ValidationFailed(field_name, "must be a whole number")
    limit = spec.limits.get(key)
    if limit is not None and d > limit:
        raise ValidationFailed(field_name, f"must be at most {limit} for {spec.model_key}")
    return _canon(d)


def _choice(key: str, value: Any, spec: PriceSpec, field_name: str) -> str:
    choices = spec.resolution_tiers if key == "resolution" else spec.input_type_multipliers
    assert choices is not None
    name = value.strip() if isinstance(value, str) else None
    if name not in choices:
        what = "resolution tier" if key == "resolution" else "input type"
        raise ValidationFailed(field_name, f"unknown {what} {value!r} for {spec.model_key}; accepted: {_listing(choices)}")
    return name


def _check_given(spec: PriceSpec, parameters: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """The given parameters, validated and normalized; None values count as absent."""
    if not isinstance(parameters, Mapping):
        raise ValidationFailed(prefix.rstrip(".") or "parameters", "must be an object of parameter names to values")
    accepted = metered_parameters(spec)
    for key in parameters:
        if not isinstance(key, str):
            raise ValidationFailed(prefix + str(key), "parameter names must be strings")
    out: dict[str, Any] = {}
    for key in sorted(parameters):
        value = parameters[key]
        if key not in accepted:
            raise ValidationFailed(prefix + key, f"not metered by {spec.model_key}; accepted: {_listing(accepted)}")
        if value is None:
            continue
        if key in ENUM_PARAMETERS:
            out[key] = _choice(key, value, spec, prefix + key)
        else:
            out[key] = _quantity(key, value, spec, prefix + key)
    return out


def normalize(spec: PriceSpec, parameters: Mapping[str, Any], *, open_ended_max: bool = False) -> dict[str, Any]:
    """Validate and normalize client parameters; return every metered parameter, in canonical order.

    Values: int, Decimal, a decimal string, or a float (read as `Decimal(str(x))`, the number as
    typed; quantities only, a price is never a float). A None value counts as absent. Refused with
    `ValidationFailed(key, ...)`: a key the model does not meter ("not metered by <model>; accepted:
    a, b"), a non-number, NaN or Infinity, a negative, more than 9 decimal places, above 10^9, above
    `spec.limits[key]`, fractional tokens or steps, an unknown resolution tier or input type (the
    message lists the accepted ones). Numbers come back canonical (`Decimal("12.50")` -> 12.5).

    A missing parameter takes `spec.defaults`, else 0 (numeric). With `open_ended_max=True` (the
    hold for a generation whose usage is only known afterwards) a missing output_tokens or seconds
    takes the model's limit instead, the most the request allows; if the model sets no limit for
    it, the request must state its own maximum, or it is refused (nothing unbounded is held).
    """
    given = _check_given(spec, parameters)
    out: dict[str, Any] = {}
    for key in metered_parameters(spec):
        if key in given:
            out[key] = given[key]
        elif open_ended_max and key in OPEN_ENDED_PARAMETERS:
            if key not in spec.limits:
                raise ValidationFailed(key, f"required: {spec.model_key} sets no maximum {key}, so the request must "
                                            "state the most it may use")
            out[key] = spec.limits[key]
        elif key in spec.defaults:
            out[key] = spec.defaults[key]
        else:
            out[key] = Decimal(0)  # enum parameters always have a default (PriceSpec checks)
    return out


# --- time-of-day windows ----------------------------------------------------------------------


def _instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The first instant (UTC) at which the local wall clock reads `day at`: for a repeated time
    its first occurrence, for a skipped one the moment the clock jumps past it."""
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first
    other = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    lo = math.floor(min(first, other).timestamp())  # reads before `naive`
    hi = math.ceil(max(first, other).timestamp())  # reads after it; transitions fall on whole seconds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _runs_on(window: TimeWindow, day: date) -> bool:
    return window.weekdays is None or day.weekday() in window.weekdays


def _occurrence(window: TimeWindow, day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the window's occurrence starting on local `day`."""
    end_day = day + timedelta(days=1) if window.end <= window.start else day
    return _instant(day, window.start, tz), _instant(end_day, window.end, tz)


def _local_day(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def _span_containing(window: TimeWindow, at: datetime) -> tuple[date, datetime] | None:
    """If `window` is in force at `at`: the start day and end of the occurrence containing it."""
    tz = ZoneInfo(window.timezone)
    today = _local_day(at, tz)
    for day in (today - timedelta(days=1), today):  # an occurrence lasts at most a day
        if _runs_on(window, day):
            start, end = _occurrence(window, day, tz)
            if start <= at < end:
                return day, end
    return None


def _span_end(window: TimeWindow, day: date, end: datetime) -> datetime | None:
    """Join back-to-back occurrences; None if the window never stops (all day, every day)."""
    tz = ZoneInfo(window.timezone)
    for k in range(1, 9):
        nxt = day + timedelta(days=k)
        if not _runs_on(window, nxt):
            return end
        start, nxt_end = _occurrence(window, nxt, tz)
        if start > end:
            return end
        end = max(end, nxt_end)
    return None


def _next_start(window: TimeWindow, after: datetime) -> datetime | None:
    tz = ZoneInfo(window.timezone)
    today = _local_day(after, tz)
    for k in range(-1, 9):
        day = today + timedelta(days=k)
        if _runs_on(window, day):
            start, end = _occurrence(window, day, tz)
            if start > after and end > start:
                return start
    return None


def _check_at(at: datetime) -> None:
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise TypeError("at: a timezone-aware datetime is required")


def window_in_force(windows: Sequence[TimeWindow], at: datetime) -> tuple[TimeWindow | None, datetime | None]:
    """The time-of-day window that applies at `at` (the first in force, in sequence order) and the
    next moment it stops applying (UTC; None when it never does). (None, None) when none applies."""
    _check_at(at)
    windows = tuple(windows)
    for index, window in enumerate(windows):
        if not isinstance(window, TimeWindow):
            raise TypeError("windows: expected TimeWindow items")
        span = _span_containing(window, at)
        if span is None:
            continue
        ends = _span_end(window, *span)
        for earlier in windows[:index]:  # a window listed before this one takes over when it starts
            starts = _next_start(earlier, at)
            if starts is not None and (ends is None or starts < ends):
                ends = starts
        return window, ends
    return None, None


# --- the quote --------------------------------------------------------------------------------


def _num(d: Decimal) -> str:
    """A quantity or multiplier for a label: exact, no exponent, thousands separated."""
    return f"{_canon(d):,f}"


def _credits(d: Decimal) -> str:
    """Money for a label: at least three places (4 -> 4.000), more only if the figure has them."""
    d = _canon(d)
    if d.as_tuple().exponent >= -3:
        d = d.quantize(CREDIT_QUANTUM, context=_WIDE)
    return f"{d:,f}"


def _plan_multiplier(value: Any) -> Decimal:
    return _spec_figure(value, "plan_multiplier")


def _band_label(lower: Decimal, upper: Decimal | None, mbs: Decimal, rate: Decimal, factor: Decimal) -> str:
    priced = f"{_num(mbs)} MB x {_credits(rate)} credits"
    if lower == 0:
        return f"first {_num(upper)} MB: {priced}" if upper is not None else priced
    if factor < 1:
        change = f" {_num((1 - factor) * 100)}% cheaper"
    elif factor > 1:
        change = f" {_num((factor - 1) * 100)}% dearer"
    else:
        change = ""
    return f"files above {_num(lower)} MB{change}: {priced}"


def clock_text(t: time) -> str:
    """"18:00", or "18:00:30" (and any fraction) when the time has them: a window's times exactly
    as published, so they are stored, shown and priced as accepted (never cut to the minute)."""
    return t.strftime("%H:%M") if not (t.second or t.microsecond) else t.isoformat()


def _window_label(window: TimeWindow) -> str:
    label = f"{window.name} {clock_text(window.start)}-{clock_text(window.end)} {window.timezone}"
    if window.weekdays is not None and len(window.weekdays) < 7:
        label += " " + ",".join(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[d] for d in sorted(window.weekdays))
    return f"{label} x{_num(window.multiplier)}"


def quote(
    spec: PriceSpec,
    parameters: Mapping[str, Any],
    *,
    at: datetime,
    windows: Sequence[TimeWindow] = (),
    plan_multiplier: Decimal = Decimal(1),
    open_ended_max: bool = False,
) -> Quote:
    """What one generation costs: the exact line items and the total rounded once, up to 0.001
    credit (see the module docstring). Raises `ValidationFailed` for bad parameters (see
    `normalize`) or a negative plan multiplier; `TypeError` for a naive `at` or a float price.

    Hold and capture: `startGeneration` holds `quote(spec, params, at=now, open_ended_max=True)`;
    `completeGeneration` captures `quote(same spec, reported usage, at=the generation's start,
    same windows and plan multiplier)`. Same `at` means the same time-of-day window, and since the
    price is monotone in every numeric parameter, usage within the held parameters never costs
    more than the hold. (Reported usage above the model's limits is refused like any request.)"""
    _check_at(at)
    plan = _plan_multiplier(plan_multiplier)
    params = normalize(spec, parameters, open_ended_max=open_ended_max)
    window, window_ends_at = window_in_force(windows, at)

    items: list[LineItem] = [LineItem(LineKind.BASE, "base charge per generation", Decimal(1), spec.base, spec.base)]

    def add(kind: LineKind, label: str, quantity: Decimal, rate: Decimal) -> None:
        amount = _EXACT.multiply(quantity, rate)
        if amount != 0:
            items.append(LineItem(kind, label, _canon(quantity), rate, _canon(amount)))

    for kind, key, rate, noun in (
        (LineKind.INPUT_TOKENS, "input_tokens", spec.per_1k_input_tokens, "input"),
        (LineKind.OUTPUT_TOKENS, "output_tokens", spec.per_1k_output_tokens, "output"),
    ):
        if rate is not None:
            tokens = params[key]
            add(kind, f"{_num(tokens)} {noun} tokens x {_credits(rate)} credits per 1k",
                _EXACT.divide(tokens, Decimal(1000)), rate)
    if spec.per_megapixel is not None:
        mp = params["megapixels"]
        add(LineKind.MEGAPIXELS, f"{_num(mp)} MP x {_credits(spec.per_megapixel)} credits", mp, spec.per_megapixel)
    if spec.per_second is not None:
        seconds = params["seconds"]
        add(LineKind.SECONDS, f"{_num(seconds)} s x {_credits(spec.per_second)} credits", seconds, spec.per_second)
    if spec.per_extra_step is not None:
        extra = max(Decimal(0), _EXACT.subtract(params["steps"], Decimal(spec.included_steps)))
        add(LineKind.STEPS, f"{_num(extra)} steps above {spec.included_steps} included x "
                            f"{_credits(spec.per_extra_step)} credits", extra, spec.per_extra_step)
    if spec.per_mb is not None:
        size = params["file_mb"]
        bands = [(Decimal(0), Decimal(1))] + [(t.above_mb, t.rate_factor) for t in spec.file_tiers]
        for i, (lower, factor) in enumerate(bands):
            upper = bands[i + 1][0] if i + 1 < len(bands) else None
            mbs = _EXACT.subtract(size if upper is None else min(size, upper), lower)
            if mbs <= 0:
                continue
            rate = _EXACT.multiply(spec.per_mb, factor)
            add(LineKind.FILE_SIZE, _band_label(lower, upper, mbs, rate, factor), mbs, rate)

    running = Decimal(0)
    for item in items:
        running = _EXACT.add(running, item.amount)

    multipliers: list[tuple[LineKind, str, Decimal]] = []
    if spec.resolution_tiers is not None:
        tier = params["resolution"]
        multipliers.append((LineKind.RESOLUTION, f"{tier} x{_num(spec.resolution_tiers[tier])}", spec.resolution_tiers[tier]))
    if spec.input_type_multipliers is not None:
        kind_name = params["input_type"]
        m = spec.input_type_multipliers[kind_name]
        multipliers.append((LineKind.INPUT_TYPE, f"{kind_name} x{_num(m)}", m))
    if window is not None:
        multipliers.append((LineKind.TIME_OF_DAY, _window_label(window), window.multiplier))
    if plan != 1:
        multipliers.append((LineKind.PLAN, f"plan price x{_num(plan)}", plan))
    for kind, label, m in multipliers:
        amount = _EXACT.multiply(running, _EXACT.subtract(m, Decimal(1)))
        if amount != 0:
            items.append(LineItem(kind, label, _canon(running), m, _canon(amount)))
            running = _EXACT.add(running, amount)

    if running < spec.minimum:
        items.append(LineItem(LineKind.MINIMUM, f"minimum charge {_credits(spec.minimum)} credits", _canon(running),
                              spec.minimum, _canon(_EXACT.subtract(spec.minimum, running))))
        running = spec.minimum

    total = running.quantize(CREDIT_QUANTUM, context=_CEILING)  # THE rounding, the only one
    if total > MAX_CREDITS:
        # Each figure is bounded, their product is not (10^9 s at 10^9 a second): a price no
        # generation can hold (a BIGINT column holds ~9.2 x 10^15 credits), nor any movement of
        # credits may carry (`money.MAX_CREDITS`, as an explicit actual cost). Refused here, so a
        # quote, a start and a completion's usage all answer it alike.
        raise ValidationFailed("parameters", f"price {_credits(total)} credits is above the most one generation "
                                             f"may cost, {_credits(MAX_CREDITS)} credits")
    rounding = _EXACT.subtract(total, running)
    if rounding != 0:
        items.append(LineItem(LineKind.ROUNDING, f"rounded up to {CREDIT_QUANTUM} credit", None, None, _canon(rounding)))

    check = Decimal(0)
    for item in items:
        check = _EXACT.add(check, item.amount)
    assert check == total, "line items must sum to the total"
    units = int(_EXACT.multiply(total, Decimal(UNITS_PER_CREDIT)))
    return Quote(total=total, units=units, line_items=tuple(items), window=window,
                 window_ends_at=window_ends_at, parameters=params)


def default_hold(
    spec: PriceSpec,
    *,
    at: datetime,
    windows: Sequence[TimeWindow] = (),
    plan_multiplier: Decimal = Decimal(1),
) -> Quote:
    """What a start with no parameters holds (and its completion captures unless the worker
    reports less): the default parameters, with open-ended usage at the model's limit, as
    `startGeneration` prices it. A model with no limit for an open-ended parameter refuses such a
    start (its request must state the most it may use); its plain default quote stands instead."""
    metered = metered_parameters(spec)
    bounded = all(key in spec.limits for key in OPEN_ENDED_PARAMETERS if key in metered)
    return quote(spec, {}, at=at, windows=windows, plan_multiplier=plan_multiplier, open_ended_max=bounded)


def generations_covered(
    spec: PriceSpec,
    balance: Decimal,
    *,
    at: datetime,
    windows: Sequence[TimeWindow] = (),
    plan_multiplier: Decimal = Decimal(1),
) -> int:
    """How many generations started with no parameters `balance` (credits) pays for, now:
    floor(balance / hold), with `default_hold`'s hold (open-ended usage at the model's limit, not
    its typical default: a count by the list price at the defaults promised starts the balance
    refuses), counted in whole units (a fraction of a unit pays for nothing). 0 for a zero or
    negative balance. -1 for a free model (price 0): "unlimited", not a count; show it as such.
    Uses the time-of-day window in force at `at`, like a quote at that moment."""
    if isinstance(balance, (bool, float)) or not isinstance(balance, (Decimal, int)):
        raise TypeError("balance: use Decimal credits, never float")
    balance = Decimal(balance)
    if not balance.is_finite():
        raise ValidationFailed("balance", "must be a finite number")
    price = default_hold(spec, at=at, windows=windows, plan_multiplier=plan_multiplier)
    return covered_by(price.units, int(_WIDE.multiply(balance, Decimal(UNITS_PER_CREDIT)).to_integral_value(ROUND_FLOOR)))


def covered_by(price_units: int, balance_units: int) -> int:
    """Generations of `price_units` each that `balance_units` pays for; -1 when free."""
    if price_units == 0:
        return -1
    if balance_units <= 0:
        return 0
    return balance_units // price_units
