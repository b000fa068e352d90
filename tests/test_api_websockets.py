"""The same endpoint over websockets: graphql-transport-ws only, authenticated from the
connection_init payload."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from gql.transport.exceptions import TransportConnectionFailed, TransportQueryError

from tests.conftest import new_user, ws_client


async def test_queries_and_mutations_run_over_websockets(db, live_server):
    email, token = await new_user(db)
    async with ws_client(live_server, token) as api:
        assert (await api("{ viewer { email } }"))["viewer"]["email"] == email
        out = await api('mutation { createWorkspace(input: {name: "Over WS"}) { __typename ... on Workspace { name } } }')
        assert out["createWorkspace"] == {"__typename": "Workspace", "name": "Over WS"}
        with pytest.raises(TransportQueryError) as err:
            await api('{ workspace(id: "x") { members { user { nope } } } }')
        assert "Cannot query field" in err.value.errors[0]["message"]


@pytest.mark.parametrize("payload", [{}, {"Authorization": "Bearer cp_wrong"}, {"Authorization": "Basic abc"}])
async def test_connection_init_without_a_valid_token_is_refused_with_4403(live_server, payload):
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd.code == 4403


async def test_gql_client_sees_the_refusal(live_server):
    with pytest.raises(TransportConnectionFailed) as err:
        async with ws_client(live_server, "cp_wrong") as api:
            await api("{ viewer { email } }")
    assert err.value.__cause__.rcvd.code == 4403


async def test_the_legacy_graphql_ws_protocol_is_refused(live_server):
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-ws"]) as ws:
        assert ws.subprotocol is None  # not negotiated
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd.code == 4406


async def test_a_revoked_token_cannot_open_a_new_connection(db, live_server, client):
    _, token = await new_user(db)
    async with ws_client(live_server, token) as api:
        token_id = (await api("{ viewer { apiTokens { id } } }"))["viewer"]["apiTokens"][0]["id"]
        out = await api("mutation($id: ID!) { revokeApiToken(input: {tokenId: $id}) { __typename } }", id=token_id)
        assert out["revokeApiToken"]["__typename"] == "ApiToken"
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send('{"type": "connection_init", "payload": {"Authorization": "Bearer %s"}}' % token)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd.code == 4403
