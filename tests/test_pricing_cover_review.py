"""Pricing review: what the cost table promises against what starts hold, and prices too large
to store."""

from __future__ import annotations

import pytest

from tests.test_api_ledger import START, grant, key, make_team
from tests.test_api_pricing import CATALOG, QUOTE

COMPLETE_USAGE = """
mutation($g: ID!, $key: String!, $usage: JSON) {
  completeGeneration(input: {generationId: $g, idempotencyKey: $key, usage: $usage}) {
    __typename ... on Generation { captured } ... on ValidationError { field message }
  }
}"""


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


async def test_a_price_too_large_to_store_is_a_validation_error_for_quote_and_start(db, client):
    from domain.pricing import Modality
    from tests.conftest import publish_test_catalog

    # Every figure is within its bound (10^9), but their product is 10^18 credits: 10^21 units,
    # beyond what a BIGINT column holds.
    await publish_test_catalog(db, {"test-huge": (Modality.VIDEO, {"per_second": "1000000000"})})
    try:
        team = await make_team(db, client, creators=1)
        await grant(client, team, "500")
        token, _ = team.creators[0]
        params = {"seconds": 1_000_000_000}
        async with client(token) as api:
            quoted = (await api(QUOTE, ws=team.ws, model="test-huge", params=params))["quote"]
            started = (await api(START, ws=team.ws, model="test-huge", key=key(), params=params))["startGeneration"]
            fits = (await api(START, ws=team.ws, model="test-huge", key=key(), params={"seconds": "0.0000001"}))
        async with client(team.worker) as api:  # usage reported past any price that can be captured
            done = (await api(COMPLETE_USAGE, g=fits["startGeneration"]["id"], key=key(), usage=params))
    finally:
        await publish_test_catalog(db)
    assert (quoted["__typename"], quoted["field"]) == ("ValidationError", "parameters")
    assert (started["__typename"], started["field"] if "field" in started else started["code"]) == \
        ("ValidationError", "VALIDATION")
    assert fits["startGeneration"]["cost"] == "100.000"
    assert (done["completeGeneration"]["__typename"], done["completeGeneration"]["field"]) == \
        ("ValidationError", "parameters")


async def test_a_model_whose_default_price_is_too_large_is_refused_when_published(db, client):
    from tests.test_api_pricing import PUBLISH

    team = await make_team(db, client, creators=0)
    model = {"modelKey": "pub-huge", "displayName": "Huge", "vendor": "test", "modality": "VIDEO",
             "perSecond": "1000000", "defaults": {"seconds": 1000}, "limits": {"seconds": 2000}}
    async with client(team.operator) as api:
        before = (await api("{ priceLists { version } }"))["priceLists"][0]["version"]
        # 10^6 a second x 1,000 s = 10^9 credits: the most, allowed... but held at the 2,000 s limit.
        held = (await api(PUBLISH, input={"models": [model]}))["publishPriceList"]
        surge = (await api(PUBLISH, input={"models": [{**model, "limits": None}], "timeWindows": [
            {"name": "surge", "start": "00:00", "end": "00:00", "multiplier": "1.5", "timezone": "UTC"}]}))
        after = (await api("{ priceLists { version } }"))["priceLists"][0]["version"]
    assert (held["__typename"], held["field"]) == ("ValidationError", "models.pub-huge")
    assert surge["publishPriceList"]["field"] == "models.pub-huge"
    assert after == before  # nothing published


@pytest.mark.parametrize(("change", "field"), [
    ({"resolutionTiers": [{"name": "1024", "multiplier": "1"}, {"name": "1024", "multiplier": "2"}]},
     "models.pub-dup.resolution_tiers"),
    ({"inputTypeMultipliers": [{"name": "edit", "multiplier": "1"}, {"name": "edit", "multiplier": "0.5"}],
      "defaults": {"resolution": "1024", "input_type": "edit"}},
     "models.pub-dup.input_type_multipliers"),
    ({"planMultipliers": [{"planKey": "enterprise", "multiplier": "0.5"},
                          {"planKey": "enterprise", "multiplier": "0.9"}]}, "planMultipliers"),
])
async def test_a_price_given_twice_is_refused_not_silently_dropped(db, client, change, field):
    from tests.test_api_pricing import PUBLISH

    team = await make_team(db, client, creators=0)
    model = {"modelKey": "pub-dup", "displayName": "Dup", "vendor": "test", "modality": "IMAGE", "base": "4",
             "resolutionTiers": [{"name": "1024", "multiplier": "1"}], "defaults": {"resolution": "1024"}}
    plans = change.pop("planMultipliers", None)
    async with client(team.operator) as api:
        before = (await api("{ priceLists { version } }"))["priceLists"][0]["version"]
        out = (await api(PUBLISH, input={"models": [{**model, **change}], "planMultipliers": plans}))["publishPriceList"]
        after = (await api("{ priceLists { version } }"))["priceLists"][0]["version"]
    assert (out["__typename"], out.get("field")) == ("ValidationError", field)
    assert after == before
