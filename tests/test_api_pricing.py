"""The price catalog through gql: the published cost table, quotes with line items, holds at the
quoted price, completion priced under the generation's own version, publishing versions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from gql.transport.exceptions import TransportQueryError

from domain.pricing import Modality
from domain.pricing.rules import TimeWindow
from tests.conftest import publish_test_catalog
from tests.test_api_ledger import START, balance, grant, key, make_team

QUOTE = """
query($ws: ID!, $model: String!, $params: JSON) {
  quote(workspaceId: $ws, modelKey: $model, parameters: $params) {
    __typename
    ... on Quote { total priceListVersion canAfford spendable parameters
                   lineItems { kind label quantity rate amount }
                   multiplier { window { name multiplier } endsAt } }
    ... on ValidationError { field message }
    ... on Error { code }
  }
}"""
CATALOG = """
query($ws: ID) {
  modelPrices(workspaceId: $ws) {
    version
    models { modelKey modality price meteredParameters defaultCost generationsCovered active }
  }
}"""
PUBLISH = """
mutation($input: PublishPriceListInput!) {
  publishPriceList(input: $input) {
    __typename
    ... on PriceList { version effectiveAt models { modelKey defaultCost } timeWindows { name } }
    ... on ValidationError { field message }
  }
}"""


@pytest.fixture
async def restore_catalog(db):
    """Tests that publish unusual versions leave the plain test catalog in force afterwards."""
    yield
    await publish_test_catalog(db)


def items(quote: dict) -> dict[str, str]:
    return {i["kind"]: i["amount"] for i in quote["lineItems"]}


async def test_every_signed_in_user_sees_the_cost_table_and_what_their_balance_covers(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "500")
    token, _ = team.creators[0]
    async with client(token) as api:
        plain = (await api(CATALOG))["modelPrices"]
        models = {m["modelKey"]: m for m in plain["models"]}
        video = models["test-video"]
        assert video["defaultCost"] == "50.000" and video["modality"] == "VIDEO"
        assert video["price"]["per_second"] == "10" and video["price"]["limits"] == {"seconds": "10"}
        assert set(video["meteredParameters"]) == {"seconds", "resolution", "input_type"}
        assert video["generationsCovered"] is None
        mine = {m["modelKey"]: m for m in (await api(CATALOG, ws=team.ws))["modelPrices"]["models"]}
    # 500 credits = 5 videos: a start with no parameters holds its 10-second limit, 100 credits
    assert mine["test-video"]["generationsCovered"] == 5
    assert mine["test-six"]["generationsCovered"] == 83  # or about 83 images at 6
    assert mine["test-free"]["generationsCovered"] == -1  # free: no limit from the balance


async def test_a_quote_itemizes_dimensions_and_multipliers_and_moves_nothing(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "130")
    token, _ = team.creators[0]
    params = {"seconds": 10, "resolution": "1080p", "input_type": "image-to-video"}
    async with client(token) as api:
        q = (await api(QUOTE, ws=team.ws, model="test-video", params=params))["quote"]
    assert q["__typename"] == "Quote"
    # 10 s x 10 = 100; 1080p x1.5 adds 50; image-to-video x0.8 takes 30: 120 credits.
    assert q["total"] == "120.000"
    assert items(q) == {"BASE": "0", "SECONDS": "100", "RESOLUTION": "50", "INPUT_TYPE": "-30"}
    assert (q["canAfford"], q["spendable"], q["multiplier"]) == (True, "130.000", None)
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"
    async with client(token) as api:
        too_much = (await api(QUOTE, ws=team.ws, model="test-video", params={"seconds": 10, "resolution": "1080p"}))
    assert too_much["quote"]["total"] == "150.000" and too_much["quote"]["canAfford"] is False


async def test_file_size_tiers_show_up_as_line_items(db, client):
    team = await make_team(db, client, creators=1)
    token, _ = team.creators[0]
    async with client(token) as api:
        q = (await api(QUOTE, ws=team.ws, model="test-files", params={"file_mb": 25}))["quote"]
    # The first 10 MB at 0.1 = 1.0, the next 15 MB 30% cheaper at 0.07 = 1.05.
    assert q["total"] == "2.050"
    bands = [i for i in q["lineItems"] if i["kind"] == "FILE_SIZE"]
    assert [b["amount"] for b in bands] == ["1", "1.05"]


async def test_a_surge_window_shows_up_with_its_end(db, client, restore_catalog):
    now = datetime.now(UTC)
    start, end = (now - timedelta(hours=1)).time().replace(second=0, microsecond=0), \
        (now + timedelta(hours=1)).time().replace(second=0, microsecond=0)
    await publish_test_catalog(db, windows=[TimeWindow("surge", start, end, "1.5", "UTC")])
    team = await make_team(db, client, creators=1)
    token, _ = team.creators[0]
    async with client(token) as api:
        q = (await api(QUOTE, ws=team.ws, model="test-video", params={"seconds": 4}))["quote"]
    assert q["total"] == "60.000" and items(q)["TIME_OF_DAY"] == "20"
    assert q["multiplier"]["window"] == {"name": "surge", "multiplier": "1.5"}
    ends = datetime.fromisoformat(q["multiplier"]["endsAt"])
    assert timedelta(minutes=58) < ends - now <= timedelta(hours=1)


@pytest.mark.parametrize(("model", "params", "field"), [
    ("no-such-model", {}, "modelKey"),
    ("test-video", {"steps": 20}, "steps"),  # a dimension the model does not meter
    ("test-video", {"seconds": -1}, "seconds"),
    ("test-video", {"seconds": 36000}, "seconds"),  # a 10-hour video on a 10-second model
    ("test-video", {"seconds": "NaN"}, "seconds"),
    ("test-video", {"resolution": "8K"}, "resolution"),
    ("test-video", {"seconds": 4, "note": "x" * 20_000}, "parameters"),  # above the size a start accepts
])
async def test_bad_parameters_are_typed_validation_errors_and_nothing_is_held(db, client, model, params, field):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "1000")
    token, _ = team.creators[0]
    async with client(token) as api:
        q = (await api(QUOTE, ws=team.ws, model=model, params=params))["quote"]
        start = (await api(START, ws=team.ws, model=model, key=key(), params=params))["startGeneration"]
    assert q["__typename"] == "ValidationError" and q["field"] == field
    assert start["__typename"] == "ValidationError"
    if field == "steps":
        assert "accepted" in q["message"] and "seconds" in q["message"]
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"


async def test_a_generation_holds_exactly_the_quote_and_a_later_price_change_does_not_alter_it(
    db, client, restore_catalog
):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "500")
    token, _ = team.creators[0]
    params = {"seconds": 8, "resolution": "1080p"}
    async with client(token) as api:
        q = (await api(QUOTE, ws=team.ws, model="test-video", params=params))["quote"]
        gen = (await api(START, ws=team.ws, model="test-video", key=key(), params=params))["startGeneration"]
    assert gen["cost"] == q["total"] == "120.000"
    newer = await publish_test_catalog(db, {"test-video": (Modality.VIDEO, {
        "per_second": "20", "resolution_tiers": {"480p": "0.5", "720p": "1", "1080p": "1.5"},
        "input_type_multipliers": {"text-to-video": "1", "image-to-video": "0.8"},
        "defaults": {"seconds": 5, "resolution": "720p", "input_type": "text-to-video"}, "limits": {"seconds": 10}})})
    async with client(token) as api:
        requote = (await api(QUOTE, ws=team.ws, model="test-video", params=params))["quote"]
    assert requote["total"] == "240.000" and requote["priceListVersion"] == newer.price_list.version
    async with client(team.worker) as api:
        done = (await api(
            "mutation($g: ID!, $key: String!, $usage: JSON) { completeGeneration(input: {generationId: $g, "
            "idempotencyKey: $key, usage: $usage}) { __typename ... on Generation { captured released "
            "priceListVersion } ... on Error { message } } }", g=gen["id"], key=key(), usage={"seconds": 6}))
    done = done["completeGeneration"]
    # 6 s under the generation's own version: 6 x 10 x 1.5 = 90, not 180 under the new one.
    assert (done["captured"], done["released"]) == ("90.000", "30.000")
    assert done["priceListVersion"] == q["priceListVersion"] != newer.price_list.version


async def test_open_ended_usage_holds_the_maximum_and_captures_what_was_used(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="test-text", key=key(), params={"input_tokens": 1000}))
    gen = gen["startGeneration"]
    assert gen["cost"] == "33.000"  # 1 for the input, plus the 8,000-token output limit at 4 per 1,000
    async with client(team.worker) as api:
        done = (await api(
            "mutation($g: ID!, $key: String!, $usage: JSON) { completeGeneration(input: {generationId: $g, "
            "idempotencyKey: $key, usage: $usage}) { ... on Generation { captured released } } }",
            g=gen["id"], key=key(), usage={"output_tokens": 250}))["completeGeneration"]
    assert (done["captured"], done["released"]) == ("2.000", "31.000")
    async with client(team.worker) as api:
        bad = (await api(
            "mutation($g: ID!, $key: String!, $usage: JSON) { completeGeneration(input: {generationId: $g, "
            "idempotencyKey: $key, usage: $usage, actualCost: \"3\"}) { __typename } }",
            g=gen["id"], key=key(), usage={"output_tokens": 1}))["completeGeneration"]
    assert bad["__typename"] == "ValidationError"


async def test_operators_publish_versions_and_old_versions_stay_readable(db, client, restore_catalog):
    team = await make_team(db, client, creators=0)
    model = {"modelKey": "pub-image", "displayName": "Published image", "vendor": "test", "modality": "IMAGE",
             "base": "7", "resolutionTiers": [{"name": "1024", "multiplier": "1"}, {"name": "2048", "multiplier": "2"}],
             "defaults": {"resolution": "1024"}}
    async with client(team.owner) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(PUBLISH, input={"models": [model]})
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    async with client(team.operator) as api:
        bad = (await api(PUBLISH, input={"models": [{**model, "base": "-1"}]}))["publishPriceList"]
        assert bad["__typename"] == "ValidationError" and "base" in bad["field"]
        past = (await api(PUBLISH, input={"models": [model], "effectiveAt": "2020-01-01T00:00:00+00:00"}))
        assert past["publishPriceList"]["__typename"] == "ValidationError"
        no_default = {**model, "defaults": None}
        assert (await api(PUBLISH, input={"models": [no_default]}))["publishPriceList"]["__typename"] == "ValidationError"
        later = datetime.now(UTC) + timedelta(hours=12)  # a window surely not in force during the test
        published = (await api(PUBLISH, input={
            "models": [model], "note": "one model",
            "timeWindows": [{"name": "off-peak", "start": later.strftime("%H:%M"),
                             "end": (later + timedelta(minutes=1)).strftime("%H:%M"), "multiplier": "0.8",
                             "timezone": "UTC"}],
            "planMultipliers": [{"planKey": "enterprise", "multiplier": "0.5"}],
        }))["publishPriceList"]
        assert published["__typename"] == "PriceList"
        assert published["models"] == [{"modelKey": "pub-image", "defaultCost": "7.000"}]
        assert published["timeWindows"] == [{"name": "off-peak"}]
        versions = (await api("{ priceLists { version models { modelKey } } }"))["priceLists"]
    assert versions[0]["version"] == published["version"]
    assert any("test-video" in {m["modelKey"] for m in v["models"]} for v in versions[1:])
    async with client(team.owner) as api:  # enterprise plan: half price; the viewer sees it
        mine = (await api(CATALOG, ws=team.ws))["modelPrices"]
        q = (await api(QUOTE, ws=team.ws, model="pub-image", params={"resolution": "2048"}))["quote"]
    assert mine["version"] == published["version"] and mine["models"][0]["defaultCost"] == "3.500"
    assert items(q) == {"BASE": "7", "RESOLUTION": "7", "PLAN": "-7"} and q["total"] == "7.000"


async def test_a_cached_price_list_survives_the_rollback_of_the_request_that_loaded_it(db, client):
    # The first request to load a price list caches it; if that request then fails (its
    # transaction rolls back), later requests must still price with it.
    from domain.pricing import service as prices

    team = await make_team(db, client, creators=1)
    token, _ = team.creators[0]
    prices._CATALOGS.clear()
    async with client(token) as api:
        broke = (await api(START, ws=team.ws, model="test-video", key=key()))["startGeneration"]
        assert broke["__typename"] == "InsufficientCredits"  # priced, cached, rolled back
    await grant(client, team, "200")
    async with client(token) as api:
        ok = (await api(START, ws=team.ws, model="test-video", key=key()))["startGeneration"]
    assert ok["__typename"] == "Generation" and ok["cost"] == "100.000"  # open-ended: the 10 s limit
