"""Review of pricing, quotes and identity: a token revoked while its websocket is open, and
what a generation is quoted, held and charged (regressions found in review)."""

from __future__ import annotations

import pytest
from gql.transport.exceptions import TransportQueryError

from tests.conftest import ws_client
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
