"""Review of the edge of the API: bad input gets a clear, typed error and changes nothing. Each
test here first failed on the code it was written against (an INTERNAL error, or an input that
was quietly read as something else)."""

from __future__ import annotations

import pytest
from gql.transport.exceptions import TransportQueryError

from tests.test_api_ledger import GRANT, START, balance, grant, key, make_team

WORKSPACES = "{ viewer { workspaces { workspace { id name } } } }"


async def _refused(api, query: str, **variables) -> dict:
    with pytest.raises(TransportQueryError) as err:
        await api(query, **variables)
    [error] = err.value.errors
    return error


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800b"], ids=["nul", "lone-surrogate"])
async def test_text_no_column_can_store_is_refused_as_validation_and_writes_nothing(db, client, bad):
    # PostgreSQL refuses NUL in text and asyncpg cannot encode an unpaired surrogate: a name,
    # reason, note or idempotency key carrying one reached the database mid-transaction and the
    # caller got INTERNAL (createWorkspace, grantCredits, startGeneration, publishPriceList, ...).
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    creator, _ = team.creators[0]
    async with client(team.owner) as api:
        before = (await api(WORKSPACES))["viewer"]
        error = await _refused(api, 'mutation($n: String!) { createWorkspace(input: {name: $n}) { __typename } }',
                               n=bad)
        assert error["extensions"]["code"] == "VALIDATION", error
        assert error["message"] == "$n: text may not contain NUL characters or unpaired surrogates"
        assert (await api(WORKSPACES))["viewer"] == before
    async with client(team.operator) as api:
        error = await _refused(api, GRANT, ws=team.ws, amount="5", key=bad, source="PROMOTION", priority=100)
        assert error["extensions"] == {"code": "VALIDATION", "field": "$key"}
    async with client(creator) as api:
        # Inside a JSON value, as a key: jsonb refuses \u0000 too.
        error = await _refused(api, START, ws=team.ws, model="sdxl", key=key(), params={"seconds": 1, bad: "x"})
        assert error["extensions"]["code"] == "VALIDATION"
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("100.000", "0.000")


async def test_a_nul_written_into_the_document_is_refused_too(db, client):
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        error = await _refused(api, 'mutation { createWorkspace(input: {name: "a\\u0000b"}) { __typename } }')
    assert error["extensions"]["code"] == "VALIDATION", error
