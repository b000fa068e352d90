"""Pricing review: what the cost table promises against what starts hold, and prices too large
to store."""

from __future__ import annotations

from tests.test_api_ledger import START, grant, key, make_team
from tests.test_api_pricing import CATALOG, QUOTE


async def test_generations_covered_counts_the_starts_the_balance_really_pays_for(db, client):
    # test-video: seconds default 5, limit 10. A start with no parameters holds the most its
    # open-ended usage allows (10 s: 100 credits), and completes at that unless the worker
    # reports less: 500 credits start 5 of them, not the 10 a 50-credit list price suggests.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "500")
    token, _ = team.creators[0]
    async with client(token) as api:
        models = {m["modelKey"]: m for m in (await api(CATALOG, ws=team.ws))["modelPrices"]["models"]}
        quoted = (await api(QUOTE, ws=team.ws, model="test-video", params=None))["quote"]
        started = [(await api(START, ws=team.ws, model="test-video", key=key(), params=None))["startGeneration"]
                   for _ in range(models["test-video"]["generationsCovered"] + 1)]
    assert [s["__typename"] for s in started[:-1]] == ["Generation"] * (len(started) - 1)
    assert started[-1]["__typename"] == "InsufficientCredits"  # one more than it covers: refused
    assert quoted["total"] == started[0]["cost"] == "100.000"
    assert models["test-video"]["generationsCovered"] == 5
    assert models["test-text"]["generationsCovered"] == 500 // 33  # 1 for 1,000 input tokens + 8,000 out at 4


def test_the_count_divides_by_the_hold_not_by_the_typical_default():
    from datetime import UTC, datetime
    from decimal import Decimal as D

    from domain.pricing.rules import PriceSpec, default_hold, generations_covered, quote

    at = datetime(2025, 1, 15, 12, tzinfo=UTC)
    chat = PriceSpec("chat", per_1k_output_tokens=D(1), limits={"output_tokens": 4000},
                     defaults={"output_tokens": 1000})
    assert quote(chat, {}, at=at).total == 1 and default_hold(chat, at=at).total == 4
    assert generations_covered(chat, D(10), at=at) == 2  # two holds of 4, not ten generations of 1
    unbounded = PriceSpec("chat-unbounded", base=D(1), per_1k_output_tokens=D(1), defaults={"output_tokens": 1000})
    # No limit: a start must state its output tokens; the count falls back to the defaults' price.
    assert default_hold(unbounded, at=at).total == 2 and generations_covered(unbounded, D(10), at=at) == 5
