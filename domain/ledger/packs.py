"""Credit packs, managed by operators: credits for a price, optionally expiring after N days."""

from __future__ import annotations

import re
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from domain.access import Caller, parse_id
from domain.db import Database
from domain.errors import NotFound, ValidationFailed
from domain.identity import clean_name
from domain.ledger.models import CreditPack
from domain.money import UNITS_PER_CREDIT, parse_credits
from domain.pricing.service import require_catalog_manager

CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
# ISO 4217's minor units where they are not 2: a pack's price is stored in minor units, and 500
# minor units are 5.00 USD but 500 JPY and 0.500 KWD.
MINOR_DIGITS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
                     "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    "CLF": 4, "UYW": 4,
}


MAX_PRICE_MINOR = 2**31 - 1  # the largest GraphQL Int


def price_per_credit(pack: CreditPack) -> Decimal:
    """What one credit costs, in the currency's major units, to four places: 45.00 USD for 500
    credits is 0.0900; 1000 JPY for 500 credits is 2.0000. For display: charges use `price_minor`."""
    major = Decimal(pack.price_minor).scaleb(-MINOR_DIGITS.get(pack.currency, 2))
    return (major * UNITS_PER_CREDIT / pack.units).quantize(Decimal("0.0001"))


async def create_pack(
    db: Database, caller: Caller, *, name: str, credits: str, price_minor: int, currency: str,
    expires_after_days: int | None = None,
) -> CreditPack:
    require_catalog_manager(caller)
    name = clean_name(name)
    units = parse_credits(credits, "credits")
    # The API carries priceMinor as a GraphQL Int (32 bits, signed): the bound is the largest one.
    if not 0 <= price_minor <= MAX_PRICE_MINOR:
        raise ValidationFailed("priceMinor", f"must be between 0 and {MAX_PRICE_MINOR} minor units")
    currency = currency.strip().upper()
    if not CURRENCY_RE.match(currency):
        raise ValidationFailed("currency", "must be a three-letter ISO 4217 code")
    if expires_after_days is not None and not 1 <= expires_after_days <= 36600:
        raise ValidationFailed("expiresAfterDays", "must be between 1 and 36600, or absent for never")

    async def work(session: AsyncSession) -> CreditPack:
        pack = CreditPack(name=name, units=units, price_minor=price_minor, currency=currency,
                          expires_after_days=expires_after_days)
        session.add(pack)
        await session.flush()
        await session.refresh(pack)
        return pack

    return await db.transaction(work)


async def set_pack_active(db: Database, caller: Caller, *, pack_id: str, active: bool) -> CreditPack:
    require_catalog_manager(caller)
    pid = parse_id(pack_id, "credit pack")

    async def work(session: AsyncSession) -> CreditPack:
        pack = await session.get(CreditPack, pid, with_for_update=True)
        if pack is None:
            raise NotFound("credit pack")
        pack.is_active = active
        await session.flush()
        return pack

    return await db.transaction(work)
