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
