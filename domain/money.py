"""Credits are stored as integer units (1 credit = 1000 units) and shown as decimal strings."""

from __future__ import annotations

import re
from decimal import Decimal

UNITS_PER_CREDIT = 1000


def format_credits(units: int) -> str:
    """Exact decimal string, always with three places: 1500 -> '1.500', -5 -> '-0.005'. Integer
    arithmetic only (no Decimal context to round anything): every figure of every response
    passes through here."""
    whole, part = divmod(abs(units), UNITS_PER_CREDIT)
    return f"{'-' if units < 0 else ''}{whole}.{part:03d}"


def decimal_text(d: Decimal) -> str:
    """A Decimal as a plain decimal string: 0.000000005, never str()'s "5E-9" (which str() writes
    for any figure below 10^-6), and 1000, never "1E+3". Prices, quantities and line items go out
    as these, in the API and in the documents stored for a generation."""
    return format(d, "f")


MAX_CREDITS = Decimal("1000000000")  # one billion credits in one movement is surely a typo
# Plain decimal notation with ASCII digits only: no exponent, no separators, no other scripts.
# Parsed by hand into integer units, so no Decimal context can round anything.
_CREDITS_RE = re.compile(r"\+?([0-9]+)(?:\.([0-9]+))?")


def parse_credits(value: str, field: str, *, allow_zero: bool = False) -> int:
    """A decimal string from a client ("12.5") to units. At most 3 significant decimal places,
    positive (or zero where `allow_zero`), at most MAX_CREDITS; anything else is a validation
    error, never rounded."""
    from domain.errors import ValidationFailed

    match = _CREDITS_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValidationFailed(field, "must be a decimal number of credits, e.g. \"12.5\"")
    whole, fraction = match.group(1), match.group(2) or ""
    if fraction[3:].strip("0"):
        raise ValidationFailed(field, "has more than 3 decimal places (1 unit = 0.001 credit)")
    if len(whole.lstrip("0")) > len(str(int(MAX_CREDITS))):
        raise ValidationFailed(field, f"must be at most {MAX_CREDITS} credits")
    units = int(whole) * UNITS_PER_CREDIT + int(fraction[:3].ljust(3, "0"))
    if units > MAX_CREDITS * UNITS_PER_CREDIT:
        raise ValidationFailed(field, f"must be at most {MAX_CREDITS} credits")
    if units == 0 and not allow_zero:
        raise ValidationFailed(field, "must be a positive number of credits")
    return units
