"""Credits are stored as integer units (1 credit = 1000 units) and shown as decimal strings."""

from __future__ import annotations

from decimal import Decimal

UNITS_PER_CREDIT = 1000
_QUANTUM = Decimal("0.001")


def units_to_credits(units: int) -> Decimal:
    return (Decimal(units) / UNITS_PER_CREDIT).quantize(_QUANTUM)


def format_credits(units: int) -> str:
    """Exact decimal string, always with three places: 1500 -> '1.500'."""
    return str(units_to_credits(units))

MAX_CREDITS = Decimal("1000000000")  # one billion credits in one movement is surely a typo


def parse_credits(value: str, field: str) -> int:
    """A decimal string from a client ("12.5") to units. At most 3 decimal places, positive,
    finite, and below MAX_CREDITS; anything else is a validation error, never rounded."""
    from decimal import InvalidOperation

    from domain.errors import ValidationFailed

    try:
        credits = Decimal(value.strip())
    except (InvalidOperation, AttributeError):
        raise ValidationFailed(field, "must be a decimal number of credits, e.g. \"12.5\"") from None
    if not credits.is_finite() or credits <= 0:
        raise ValidationFailed(field, "must be a positive number of credits")
    if credits > MAX_CREDITS:
        raise ValidationFailed(field, f"must be at most {MAX_CREDITS} credits")
    units = credits * UNITS_PER_CREDIT
    if units != units.to_integral_value():
        raise ValidationFailed(field, "has more than 3 decimal places (1 unit = 0.001 credit)")
    return int(units)
