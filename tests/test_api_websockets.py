"""The same endpoint over websockets: graphql-transport-ws only, authenticated from the
connection_init payload."""

from __future__ import annotations

import asyncio
import json

import aiohttp

import pytest
import websockets
from gql import gql
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


@pytest.mark.parametrize("where", ["$ws", "$note"])
async def test_a_subscription_with_text_no_column_can_store_is_refused_before_it_starts(db, live_server, where):
    # Over HTTP, and for queries and mutations over a socket, a NUL (or a lone surrogate) in a
    # variable refuses the operation before anything runs. A subscription ran all the same: its
    # resolver looked the text up (a NUL id: "workspace not found"), or, with the text in a
    # variable it does not use, it started and sent the balance.
    _, token = await new_user(db)
    async with ws_client(live_server, token) as api:
        ws = (await api('mutation { createWorkspace(input: {name: "Live"}) { ... on Workspace { id } } }'))[
            "createWorkspace"]["id"]
        variables = {"ws": "a\x00b"} if where == "$ws" else {"ws": ws, "note": "a\x00b"}
        request = gql("subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available } }")
        request.variable_values = variables

        async def first():
            async for result in api.session.subscribe(request):
                return result

        with pytest.raises(TransportQueryError) as err:
            await asyncio.wait_for(first(), 5)
    message = f"{where}: text may not contain NUL characters or unpaired surrogates"
    assert err.value.errors == [{"message": message, "extensions": {"code": "VALIDATION", "field": where}}]
    # On the wire: an `error` message, which ends the operation (not a `next` of a running one).
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-transport-ws"]) as raw:
        await raw.send(json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}))
        assert json.loads(await asyncio.wait_for(raw.recv(), 5))["type"] == "connection_ack"
        await raw.send(json.dumps({"id": "1", "type": "subscribe", "payload": {
            "query": "subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available } }",
            "variables": variables}}))
        answer = json.loads(await asyncio.wait_for(raw.recv(), 5))
    assert (answer["type"], answer["id"], answer["payload"][0]["message"]) == ("error", "1", message)


@pytest.mark.parametrize("accept", [None, "multipart/mixed;subscriptionSpec=1.0, application/json"])
async def test_a_subscription_posted_over_http_is_refused_with_a_typed_error(db, live_server, accept):
    """Subscriptions are served over websockets only. Posted over HTTP (with or without the
    multipart subscription Accept header) one is refused as a request that cannot run (400,
    code VALIDATION, saying where subscriptions are served), not answered INTERNAL."""
    _, token = await new_user(db)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    if accept:
        headers["Accept"] = accept
    body = {"query": "subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available } }",
            "variables": {"ws": "00000000-0000-0000-0000-000000000000"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(live_server.http_url, json=body, headers=headers) as resp:
            status, answer = resp.status, json.loads(await resp.text())
    assert status == 400, answer
    [error] = answer["errors"]
    assert error["extensions"]["code"] == "VALIDATION" and "websocket" in error["message"], error
    assert answer.get("data") is None
