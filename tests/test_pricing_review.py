"""Review of pricing, quotes and identity: a token revoked while its websocket is open, and
what a generation is quoted, held and charged (regressions found in review)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from gql.transport.exceptions import TransportQueryError

from domain.pricing import rules
from domain.pricing import service as prices
from tests.conftest import publish_test_catalog, ws_client
from tests.test_api_ledger import START, balance, grant, key, make_team

REVOKE = "mutation($id: ID!) { revokeApiToken(input: {tokenId: $id}) { __typename } }"


async def test_a_token_revoked_while_its_websocket_is_open_stops_working_on_it(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with ws_client(live_server, token) as api:
        token_id = (await api("{ viewer { apiTokens { id } } }"))["viewer"]["apiTokens"][0]["id"]
        assert (await api(REVOKE, id=token_id))["revokeApiToken"]["__typename"] == "ApiToken"
        # The connection was authenticated at connection_init; every later operation on it must
        # see the revocation, as an HTTP request would: no read, and above all no spend.
        with pytest.raises(TransportQueryError) as read:
            await api("{ viewer { email } }")
        assert read.value.errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
        with pytest.raises(TransportQueryError) as spend:
            await api(START, ws=team.ws, model="sdxl", key=key())
        assert spend.value.errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert (await balance(client, team.owner, team.ws))["held"] == "0.000"


USAGE = """
mutation($g: ID!, $key: String!, $usage: JSON) {
  completeGeneration(input: {generationId: $g, idempotencyKey: $key, usage: $usage}) {
    __typename
    ... on Generation { captured released shortfall }
    ... on Error { code message }
  }
}"""


async def test_a_usage_figure_reported_as_null_keeps_the_started_value_not_the_default(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="test-text", key=key(),
                         params={"input_tokens": 3000, "output_tokens": 2000}))["startGeneration"]
        files = (await api(START, ws=team.ws, model="test-files", key=key(),
                           params={"file_mb": 10}))["startGeneration"]
    assert (gen["cost"], files["cost"]) == ("11.000", "1.000")  # 3 + 2,000 x 4 / 1,000; 10 MB x 0.1
    async with client(team.worker) as api:
        refused = (await api(USAGE, g=gen["id"], key=key(), usage={"steps": None}))["completeGeneration"]
        assert refused["__typename"] == "ValidationError"  # a key the model does not meter, even null
        # A worker that measured the output but not the input says so with null (as absent):
        # the input is what the generation started with (3,000 tokens), not the model's default
        # (1,000), and a file size not reported is the one held, not 0 MB (a free generation).
        done = (await api(USAGE, g=gen["id"], key=key(),
                          usage={"input_tokens": None, "output_tokens": 500}))["completeGeneration"]
        other = (await api(USAGE, g=files["id"], key=key(), usage={"file_mb": None}))["completeGeneration"]
    assert (done["captured"], done["released"]) == ("5.000", "6.000")  # 3 + 500 x 4 / 1,000
    assert (other["captured"], other["released"]) == ("1.000", "0.000")


@pytest.fixture
async def restore_catalog(db):
    """Tests that publish unusual versions leave the plain test catalog in force afterwards."""
    yield
    await publish_test_catalog(db)


PUBLISH = """
mutation($input: PublishPriceListInput!) {
  publishPriceList(input: $input) {
    __typename
    ... on PriceList { version timeWindows { name start end } }
    ... on ValidationError { field message }
  }
}"""


async def test_a_time_window_is_stored_to_the_second_it_was_published_with(db, client, restore_catalog):
    team = await make_team(db, client, creators=0)
    later = (datetime.now(UTC) + timedelta(hours=12)).replace(second=30, microsecond=0)  # surely not in force now
    start, end = later.time(), (later + timedelta(minutes=1, seconds=15)).time()
    model = {"modelKey": "window-image", "displayName": "Window image", "vendor": "test", "modality": "IMAGE",
             "base": "10"}
    async with client(team.operator) as api:
        out = (await api(PUBLISH, input={"models": [model], "timeWindows": [
            {"name": "surge", "start": start.isoformat(), "end": end.isoformat(), "multiplier": "2",
             "timezone": "UTC"}]}))["publishPriceList"]
    assert out["__typename"] == "PriceList"
    # Accepted to the second, so stored and priced to the second: not cut to 18:00 when given 18:00:30.
    assert out["timeWindows"] == [{"name": "surge", "start": start.isoformat(), "end": end.isoformat()}]
    catalog = await db.read(lambda s: prices.catalog_at(s, datetime.now(UTC)))
    [model_price] = catalog.models
    before = rules.quote(model_price.spec, {}, at=later - timedelta(seconds=20), windows=catalog.windows)
    inside = rules.quote(model_price.spec, {}, at=later + timedelta(seconds=10), windows=catalog.windows)
    assert (before.total, inside.total) == (10, 20)


async def test_a_limit_given_as_a_json_number_or_boolean_is_validated_not_an_internal_error(db, client, restore_catalog):
    team = await make_team(db, client, creators=0)
    model = {"modelKey": "limit-video", "displayName": "Limit video", "vendor": "test", "modality": "VIDEO",
             "perSecond": "2"}
    async with client(team.operator) as api:
        # A limit is a quantity, read like every quantity: a JSON 7.5 is the number as typed.
        ok = (await api(PUBLISH, input={"models": [{**model, "limits": {"seconds": 7.5}}]}))["publishPriceList"]
        bad = (await api(PUBLISH, input={"models": [{**model, "limits": {"seconds": True}}]}))["publishPriceList"]
    assert ok["__typename"] == "PriceList"
    assert bad["__typename"] == "ValidationError" and bad["field"] == "models.limit-video.limits.seconds"
    catalog = await db.read(lambda s: prices.catalog_at(s, datetime.now(UTC)))
    [video] = catalog.models
    assert video.spec.limits == {"seconds": Decimal("7.5")}


QUOTE_ITEMS = """
query($ws: ID!, $model: String!, $params: JSON) {
  quote(workspaceId: $ws, modelKey: $model, parameters: $params) { ... on Quote { lineItems { kind label quantity rate amount } } }
}"""
GENERATION_QUOTE = """
query($ws: ID!) { generations(workspaceId: $ws, first: 1) { edges { node {
  quote { kind quantity rate amount } } } } }"""


async def test_tiny_figures_are_plain_decimal_strings_never_exponent_notation(db, client, restore_catalog):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    # A rate with nine places (the most a price may have), for one token: the line item is
    # 0.001 x 0.000000005 = 0.000000000005 credits. Python's str(Decimal) writes that "5E-12",
    # which a client parsing decimal strings (or a spreadsheet) does not read as a number.
    model = {"modelKey": "tiny-text", "displayName": "Tiny text", "vendor": "test", "modality": "TEXT",
             "base": "1", "per1kInputTokens": "0.000000005", "defaults": {"input_tokens": 1}}
    async with client(team.operator) as api:
        published = (await api(PUBLISH, input={"models": [model]}))["publishPriceList"]
        assert published["__typename"] == "PriceList", published
        price = (await api("{ modelPrices { models { modelKey price } } }"))["modelPrices"]["models"]
    [tiny] = [m for m in price if m["modelKey"] == "tiny-text"]
    assert tiny["price"]["per_1k_input_tokens"] == "0.000000005"
    token, _ = team.creators[0]
    async with client(token) as api:
        quoted = (await api(QUOTE_ITEMS, ws=team.ws, model="tiny-text", params={"input_tokens": 1}))["quote"]
        started = (await api(START, ws=team.ws, model="tiny-text", key=key(), params={"input_tokens": 1}))
    assert started["startGeneration"]["cost"] == "1.001"  # rounded up once, to 0.001
    tokens = [i for i in quoted["lineItems"] if i["kind"] == "INPUT_TOKENS"]
    assert tokens == [{"kind": "INPUT_TOKENS", "label": "1 input tokens x 0.000000005 credits per 1k",
                       "quantity": "0.001", "rate": "0.000000005", "amount": "0.000000000005"}]
    async with client(team.owner) as api:
        stored = (await api(GENERATION_QUOTE, ws=team.ws))["generations"]["edges"][0]["node"]["quote"]
    assert {"kind": "INPUT_TOKENS", "quantity": "0.001", "rate": "0.000000005", "amount": "0.000000000005"} in stored
    for item in quoted["lineItems"] + stored:
        for figure in (item["quantity"], item["rate"], item["amount"]):
            assert figure is None or "E" not in figure.upper(), item
