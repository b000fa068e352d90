"""Live balances and workspace events over graphql-transport-ws, within and across processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import websockets
from gql.transport.exceptions import TransportQueryError

from tests.conftest import free_port, ws_client
from tests.test_api_ledger import ADD, BALANCE, COMPLETE, START, grant, key, make_team

BALANCES = """
subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available held viewerSpendable asOf } }"""
EVENTS = """
subscription($ws: ID!) { workspaceEvents(workspaceId: $ws) { kind payload at } }"""


async def next_within(agen, seconds: float):
    return await asyncio.wait_for(agen.__anext__(), seconds)


async def last_balance(agen, expected: dict, seconds: float = 10) -> dict:
    """Read updates until one equals `expected` (coalescing may skip intermediate ones)."""
    deadline = time.monotonic() + seconds
    seen = None
    while time.monotonic() < deadline:
        seen = (await next_within(agen, deadline - time.monotonic()))["balanceChanged"]
        if {k: seen[k] for k in expected} == expected:
            return seen
    raise AssertionError(f"never saw {expected}, last {seen}")


async def test_each_billing_group_has_its_own_scope_in_the_balance_and_the_stream(db, live_server, client):
    # Two groups' credits used to be summed into one GROUP row with no group named: a team could
    # not tell how much each client project had left.
    from tests.test_periods import GROUP, TO_GROUP

    team = await make_team(db, client, creators=0)
    await grant(client, team, "100")
    async with client(team.owner) as api:
        groups = [(await api(GROUP, ws=team.ws))["createBillingGroup"]["id"] for _ in range(2)]
        for g, amount in zip(groups, ("30", "5")):
            assert (await api(TO_GROUP, ws=team.ws, g=g, a=amount, k=key()))["transferCredits"] == {"__typename": "Transfer"}
        scopes = (await api("query($ws: ID!) { balance(workspaceId: $ws) { scopes { scope memberId billingGroupId "
                            "available } } }", ws=team.ws))["balance"]["scopes"]
    expected = {("WORKSPACE", None, None, "65.000"), ("GROUP", None, groups[0], "30.000"),
                ("GROUP", None, groups[1], "5.000")}
    assert {(s["scope"], s["memberId"], s["billingGroupId"], s["available"]) for s in scopes} == expected
    async with ws_client(live_server, team.owner) as ws:
        stream = ws.subscribe("subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { scopes { scope memberId "
                              "billingGroupId available } } }", ws=team.ws)
        live = (await next_within(stream, 5))["balanceChanged"]["scopes"]
        await stream.aclose()
    assert {(s["scope"], s["memberId"], s["billingGroupId"], s["available"]) for s in live} == expected


async def test_a_subscriber_sees_the_balance_now_and_after_each_change(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with ws_client(live_server, token) as ws:
        stream = ws.subscribe(BALANCES, ws=team.ws)
        first = (await next_within(stream, 5))["balanceChanged"]
        assert (first["available"], first["held"], first["viewerSpendable"]) == ("100.000", "0.000", "100.000")
        async with client(token) as api:
            gen = (await api(START, ws=team.ws, model="dalle-3", key=key()))["startGeneration"]
        await last_balance(stream, {"available": "90.000", "held": "10.000", "viewerSpendable": "90.000"})
        async with client(team.worker) as api:
            await api(COMPLETE, g=gen["id"], key=key(), cost="4")
        await last_balance(stream, {"available": "96.000", "held": "0.000"})
        async with client(token) as api:  # the query and the stream agree on the spendable amount
            assert (await api(BALANCE, ws=team.ws))["balance"]["viewerSpendable"] == "96.000"
        await stream.aclose()


async def test_workspace_events_arrive_in_order(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with ws_client(live_server, team.owner) as ws:
        stream = ws.subscribe(EVENTS, ws=team.ws)
        listening = asyncio.ensure_future(next_within(stream, 10))
        await asyncio.sleep(0.3)  # the subscription is live before anything happens
        async with client(token) as api:
            gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        async with client(team.worker) as api:
            await api(COMPLETE, g=gen["id"], key=key())
        async with client(team.owner) as api:
            await api(ADD, ws=team.ws, email=f"late-{key()}@example.test", role="MEMBER", seat="STANDARD")
        got = [(await listening)["workspaceEvents"]]
        while len(got) < 3:
            got.append((await next_within(stream, 5))["workspaceEvents"])
        await stream.aclose()
    assert [e["kind"] for e in got] == ["GENERATION_STARTED", "GENERATION_SETTLED", "MEMBER_CHANGED"]
    assert got[0]["payload"]["generationId"] == got[1]["payload"]["generationId"] == gen["id"]
    assert got[1]["payload"]["status"] == "COMPLETED" and got[2]["payload"]["change"] == "ADDED"


async def test_after_200_concurrent_spends_the_last_balance_each_subscriber_got_is_the_committed_one(
    db, live_server, client
):
    team = await make_team(db, client, creators=4)
    await grant(client, team, "1000")
    watchers = [team.owner] + [t for t, _ in team.creators]
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for token in watchers:
            ws = await stack.enter_async_context(ws_client(live_server, token))
            stream = ws.subscribe(BALANCES, ws=team.ws)
            await next_within(stream, 5)
            streams.append(stream)

        async def spend(i: int):
            token, _ = team.creators[i % 4]
            async with client(token) as api:
                return (await api(START, ws=team.ws, model="test-three", key=key()))["startGeneration"]["__typename"]

        kinds = await asyncio.gather(*(spend(i) for i in range(200)))
        assert kinds.count("Generation") == 200
        async with client(team.owner) as api:
            committed = (await api(BALANCE, ws=team.ws))["balance"]
        assert committed["held"] == "600.000"
        want = {"available": committed["available"], "held": committed["held"]}
        for stream in streams:
            await last_balance(stream, want)
            # ...and nothing older arrives after it: whatever else comes is the committed balance too.
            with contextlib.suppress(TimeoutError):
                while True:
                    later = (await next_within(stream, 1))["balanceChanged"]
                    assert {k: later[k] for k in want} == want
        for s in streams:
            await s.aclose()


async def test_500_concurrent_subscribers_all_receive_the_final_balance(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for _ in range(100):  # 100 connections with 5 subscriptions each
            ws = await stack.enter_async_context(ws_client(live_server, team.owner))
            streams += [ws.subscribe(BALANCES, ws=team.ws) for _ in range(5)]
        firsts = await asyncio.gather(*(next_within(s, 30) for s in streams))
        assert {f["balanceChanged"]["available"] for f in firsts} == {"100.000"}
        async with client(token) as api:
            await api(START, ws=team.ws, model="video-standard", key=key())
        finals = await asyncio.gather(*(last_balance(s, {"available": "50.000", "held": "50.000"}, 30)
                                        for s in streams))
        assert len(finals) == 500
        for s in streams:
            await s.aclose()


async def test_a_subscription_to_another_workspace_is_refused_like_an_unknown_id(db, live_server, client):
    a = await make_team(db, client, creators=0)
    b = await make_team(db, client, creators=0)
    async with ws_client(live_server, a.owner) as ws:
        answers = []
        for ws_id in (b.ws, "00000000-0000-4000-8000-000000000000"):
            for query in (BALANCES, EVENTS):
                with pytest.raises(TransportQueryError) as err:
                    await next_within(ws.subscribe(query, ws=ws_id), 5)
                answers.append((err.value.errors[0]["message"], err.value.errors[0]["extensions"]))
        # The connection stays usable for the workspaces the caller may see.
        ok = await next_within(ws.subscribe(BALANCES, ws=a.ws), 5)
    assert answers == [("workspace not found", {"code": "NOT_FOUND"})] * 4
    assert ok["balanceChanged"]["available"] == "0.000"


async def test_a_removed_members_stream_ends(db, live_server, client):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with ws_client(live_server, token) as ws:
        stream = ws.subscribe(BALANCES, ws=team.ws)
        await next_within(stream, 5)
        async with client(team.owner) as api:
            await api("mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }", m=member)
        started = time.monotonic()
        with pytest.raises(TransportQueryError) as err:
            while True:
                await next_within(stream, 5)
    assert time.monotonic() - started < 3
    assert err.value.errors[0]["extensions"]["code"] == "NOT_FOUND"


async def test_a_revoked_tokens_stream_ends(db, live_server, client):
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        created = (await api('mutation { createApiToken(input: {name: "dash"}) { ... on CreatedApiToken '
                             '{ secret token { id } } } }'))["createApiToken"]
    async with ws_client(live_server, created["secret"]) as ws:
        stream = ws.subscribe(EVENTS, ws=team.ws)
        pending = asyncio.ensure_future(next_within(stream, 10))
        await asyncio.sleep(0.2)
        async with client(team.owner) as api:
            await api("mutation($id: ID!) { revokeApiToken(input: {tokenId: $id}) { __typename } }",
                      id=created["token"]["id"])
        with pytest.raises(TransportQueryError) as err:
            await pending
    assert err.value.errors[0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_revoking_your_other_tokens_ends_their_streams_and_keeps_yours(db, live_server, client):
    # Revoking every other token ends their streams within the recheck interval, as a single
    # revocation does; the stream of the token that asked goes on.
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        leaked = (await api('mutation { createApiToken(input: {name: "leaked"}) { ... on CreatedApiToken '
                            '{ secret } } }'))["createApiToken"]["secret"]
    async with ws_client(live_server, leaked) as theirs, ws_client(live_server, team.owner) as mine:
        their_stream, my_stream = theirs.subscribe(BALANCES, ws=team.ws), mine.subscribe(BALANCES, ws=team.ws)
        await next_within(their_stream, 5)
        await next_within(my_stream, 5)
        revoked = (await mine("mutation { revokeOtherApiTokens { name revokedAt } }"))["revokeOtherApiTokens"]
        assert [t["name"] for t in revoked] == ["leaked"] and revoked[0]["revokedAt"]
        started = time.monotonic()
        with pytest.raises(TransportQueryError) as err:
            while True:
                await next_within(their_stream, 5)
        assert time.monotonic() - started < 3
        assert err.value.errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
        await grant(client, team, "1")  # the asking token's stream goes on
        assert (await next_within(my_stream, 5))["balanceChanged"]["available"]
        await my_stream.aclose()


# --- across processes ------------------------------------------------------------------------

def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("creditpool")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "api.cli"]


@contextlib.asynccontextmanager
async def served(database_url: str, log: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITPOOL_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=database_url, CREDITPOOL_PORT=str(port), CREDITPOOL_BROADCAST_URL="postgres",
               CREDITPOOL_LOG_LEVEL="warning")
    with open(log, "w") as out:
        proc = subprocess.Popen([*_cli(), "serve"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_a_subscriber_on_process_a_sees_a_generation_started_through_process_b(db, database_url, client, tmp_path):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with served(database_url, tmp_path / "a.log") as port_a, served(database_url, tmp_path / "b.log") as port_b:
        async with ws_client(f"ws://127.0.0.1:{port_a}/graphql", team.owner) as ws, \
                ws_client(f"ws://127.0.0.1:{port_b}/graphql", team.owner) as ws_b:
            balances = ws.subscribe(BALANCES, ws=team.ws)
            events_ = ws.subscribe(EVENTS, ws=team.ws)
            balances_b = ws_b.subscribe(BALANCES, ws=team.ws)  # a second dashboard, on process B
            assert (await next_within(balances, 5))["balanceChanged"]["held"] == "0.000"
            assert (await next_within(balances_b, 5))["balanceChanged"]["held"] == "0.000"
            pending_event = asyncio.ensure_future(next_within(events_, 10))
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as http:
                body = {"query": START, "variables": {"ws": team.ws, "model": "dalle-3", "key": key()}}
                sent = time.monotonic()
                async with http.post(f"http://127.0.0.1:{port_b}/graphql", json=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    assert json.loads(await r.text())["data"]["startGeneration"]["__typename"] == "Generation"
            update = await last_balance(balances, {"held": "10.000"}, seconds=1)
            event = (await pending_event)["workspaceEvents"]
            assert time.monotonic() - sent < 1.0
            assert update["available"] == "90.000" and event["kind"] == "GENERATION_STARTED"
            assert (await last_balance(balances_b, {"held": "10.000"}, seconds=1))["available"] == "90.000"
            for stream in (balances, events_, balances_b):
                await stream.aclose()


async def test_the_legacy_protocol_and_unauthenticated_connections_get_close_codes(live_server):
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-ws"]) as legacy:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(legacy.recv(), 5)
    assert closed.value.rcvd.code == 4406
    async with websockets.connect(live_server.ws_url, subprotocols=["graphql-transport-ws"]) as anon:
        await anon.send(json.dumps({"type": "connection_init", "payload": {}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(anon.recv(), 5)
    assert closed.value.rcvd.code == 4403


REDIS_ENV = "CREDITPOOL_TEST_REDIS_URL"


@pytest.mark.skipif(not os.environ.get(REDIS_ENV), reason=f"{REDIS_ENV} names no Redis (.ci/run sets it when one answers)")
async def test_two_servers_share_live_updates_through_redis(db, database_url, client):
    from tests.conftest import LiveServer, http_client

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    servers = [LiveServer(database_url, broadcast_url=os.environ[REDIS_ENV]) for _ in range(2)]
    for s in servers:
        s.start()
    try:
        async with ws_client(servers[0], team.owner) as ws:
            stream = ws.subscribe(BALANCES, ws=team.ws)
            assert (await next_within(stream, 5))["balanceChanged"]["held"] == "0.000"
            async with http_client(servers[1], token) as api:
                await api(START, ws=team.ws, model="sdxl", key=key())
            assert (await last_balance(stream, {"held": "5.000"}, seconds=2))["available"] == "95.000"
            await stream.aclose()
    finally:
        for s in servers:
            s.stop()


# --- who sees which workspace event ------------------------------------------------------------

ROLE = 'mutation($m: ID!, $r: Role!) { changeMemberRole(input: {memberId: $m, role: $r}) { __typename } }'
OVERAGE = """
mutation($ws: ID!, $amount: String!, $reason: String!) {
  requestOverage(input: {workspaceId: $ws, amount: $amount, reason: $reason, modelKey: "video-standard"}) {
    __typename ... on OverageRequest { id status } ... on Error { code message }
  }
}"""
MEMBER_LIMIT = """
mutation($ws: ID!, $member: ID!) {
  setSpendLimit(input: {workspaceId: $ws, scope: MEMBER, period: MONTH, amount: "10", action: REQUIRE_APPROVAL,
                        memberId: $member}) { __typename }
}"""
DECIDE_OVERAGE = ('mutation($id: ID!) { decideOverage(input: {requestId: $id, approve: false, reason: "no"}) '
                  '{ __typename } }')


async def events_until_member_added(stream, seconds: float = 10) -> list[dict]:
    """Events up to and including a MEMBER_CHANGED ADDED, the marker a test commits last: events
    arrive in commit order, so everything committed before it has been filtered by then."""
    got: list[dict] = []
    deadline = time.monotonic() + seconds
    while not got or (got[-1]["kind"], got[-1]["payload"].get("change")) != ("MEMBER_CHANGED", "ADDED"):
        got.append((await next_within(stream, deadline - time.monotonic()))["workspaceEvents"])
    return got


def test_every_workspace_event_kind_names_who_may_see_it():
    from domain import events

    kinds = {v for k, v in vars(events).items() if k.isupper() and isinstance(v, str) and k == v}
    assert kinds - {events.BALANCE_CHANGED} == set(events.AUDIENCE)


async def test_workspace_events_do_not_show_a_member_what_the_queries_refuse_them(db, live_server, client):
    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (watcher, watcher_member), (other, other_member) = team.creators
    async with client(team.owner) as api:
        assert (await api(MEMBER_LIMIT, ws=team.ws, member=other_member))["setSpendLimit"]["__typename"] == "SpendLimit"
    async with ws_client(live_server, watcher) as ws, ws_client(live_server, team.owner) as ws_owner:
        mine, owners = ws.subscribe(EVENTS, ws=team.ws), ws_owner.subscribe(EVENTS, ws=team.ws)
        pending = [asyncio.ensure_future(next_within(s, 10)) for s in (mine, owners)]
        await asyncio.sleep(0.3)  # both subscriptions are live before anything happens
        async with client(watcher) as api:
            own = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        async with client(other) as api:
            gen = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
            req = (await api(OVERAGE, ws=team.ws, amount="500", reason="a private client pitch"))["requestOverage"]
        assert req["status"] == "PENDING"
        async with client(team.owner) as api:
            assert (await api(DECIDE_OVERAGE, id=req["id"]))["decideOverage"]["__typename"] == "OverageRequest"
            await api(ADD, ws=team.ws, email=f"late-{key()}@example.test", role="MEMBER", seat="STANDARD")
        watched = [(await pending[0])["workspaceEvents"]] + await events_until_member_added(mine)
        seen_by_owner = [(await pending[1])["workspaceEvents"]] + await events_until_member_added(owners)
        for s in (mine, owners):
            await s.aclose()
    # What the watcher may read through queries: not the other member's generation, overage
    # request or decision, nor the workspace's alerts.
    async with client(watcher) as api:
        assert (await api("query($id: ID!) { generation(id: $id) { id } }", id=gen["id"]))["generation"] is None
        assert (await api("query($ws: ID!) { overageRequests(workspaceId: $ws) { id } }",
                          ws=team.ws))["overageRequests"] == []
        with pytest.raises(TransportQueryError) as err:
            await api("query($ws: ID!) { alerts(workspaceId: $ws) { id } }", ws=team.ws)
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    leaked = [e for e in watched if gen["id"] in str(e["payload"]) or req["id"] in str(e["payload"])
              or e["kind"] == "ALERT"]
    assert leaked == [], [(e["kind"], e["payload"]) for e in leaked]
    # ...while their own generation still reaches them, and the owner still sees everything.
    assert [e["kind"] for e in watched] == ["GENERATION_STARTED", "MEMBER_CHANGED"]
    assert watched[0]["payload"] == {"generationId": own["id"], "memberId": watcher_member, "modelKey": "sdxl",
                                     "cost": "5.000"}
    assert {"GENERATION_STARTED", "OVERAGE_REQUESTED", "OVERAGE_DECIDED", "ALERT"} <= {e["kind"] for e in seen_by_owner}
    assert gen["id"] in str(seen_by_owner) and req["id"] in str(seen_by_owner)


async def test_a_requester_sees_the_decision_on_their_own_overage_request(db, live_server, client):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with client(team.owner) as api:
        assert (await api(MEMBER_LIMIT, ws=team.ws, member=member))["setSpendLimit"]["__typename"] == "SpendLimit"
    async with ws_client(live_server, token) as ws:
        stream = ws.subscribe(EVENTS, ws=team.ws)
        pending = asyncio.ensure_future(next_within(stream, 10))
        await asyncio.sleep(0.3)
        async with client(token) as api:
            req = (await api(OVERAGE, ws=team.ws, amount="5", reason="one more"))["requestOverage"]
        async with client(team.owner) as api:
            await api(DECIDE_OVERAGE, id=req["id"])
            await api(ADD, ws=team.ws, email=f"late-{key()}@example.test", role="MEMBER", seat="STANDARD")
        got = [(await pending)["workspaceEvents"]] + await events_until_member_added(stream)
        await stream.aclose()
    assert [(e["kind"], e["payload"].get("requestId")) for e in got[:2]] == [
        ("OVERAGE_REQUESTED", req["id"]), ("OVERAGE_DECIDED", req["id"])]
    assert got[1]["payload"]["status"] == "DENIED"


async def test_a_lapse_reaches_the_requester_and_the_approvers_as_a_decision_and_no_one_else(
        db, live_server, client):
    # Approvals and denials went out as OVERAGE_DECIDED; a lapse went out as nothing, so the
    # requester's dashboard kept showing a pending request that nobody could decide any more.
    from datetime import timedelta

    team = await make_team(db, client, creators=2)
    (token, member), (other, _) = team.creators
    async with client(team.owner) as api:
        assert (await api(MEMBER_LIMIT, ws=team.ws, member=member))["setSpendLimit"]["__typename"] == "SpendLimit"
    async with ws_client(live_server, token) as mine, ws_client(live_server, other) as theirs, \
            ws_client(live_server, team.owner) as owners:
        streams = [c.subscribe(EVENTS, ws=team.ws) for c in (mine, theirs, owners)]
        pending = [asyncio.ensure_future(next_within(s, 10)) for s in streams]
        await asyncio.sleep(0.3)
        async with client(token) as api:
            req = (await api(OVERAGE, ws=team.ws, amount="5", reason="one more"))["requestOverage"]
        try:
            live_server.clock.offset = timedelta(hours=25)  # past its deadline: the decision finds it lapsed
            async with client(team.owner) as api:
                assert (await api(DECIDE_OVERAGE, id=req["id"]))["decideOverage"]["__typename"] == "OverageNotPending"
        finally:
            live_server.clock.offset = timedelta(0)
        async with client(team.owner) as api:
            await api(ADD, ws=team.ws, email=f"late-{key()}@example.test", role="MEMBER", seat="STANDARD")
        got = []
        for first, s in zip(pending, streams):
            e = (await first)["workspaceEvents"]
            added = (e["kind"], e["payload"].get("change")) == ("MEMBER_CHANGED", "ADDED")  # the bystander's first
            got.append([e] + ([] if added else await events_until_member_added(s)))
        for s in streams:
            await s.aclose()
    requester, bystander, owner = ([(e["kind"], e["payload"]) for e in g if e["kind"].startswith("OVERAGE")]
                                   for g in got)
    lapsed = ("OVERAGE_DECIDED", {"requestId": req["id"], "memberId": member, "status": "LAPSED"})
    assert requester == [("OVERAGE_REQUESTED", {"requestId": req["id"], "memberId": member, "amount": "5.000"}),
                         lapsed]
    assert lapsed in owner
    assert bystander == []  # another member's request: not theirs to see, lapsed or not


async def test_a_removal_lapses_the_request_live_for_the_approvers_after_the_removed_members_stream_ends(
        db, live_server, client):
    team = await make_team(db, client, creators=1)
    token, member = team.creators[0]
    async with client(team.owner) as api:
        assert (await api(MEMBER_LIMIT, ws=team.ws, member=member))["setSpendLimit"]["__typename"] == "SpendLimit"
    async with client(token) as api:
        req = (await api(OVERAGE, ws=team.ws, amount="5", reason="one more"))["requestOverage"]
    async with ws_client(live_server, token) as mine, ws_client(live_server, team.owner) as owners:
        theirs, approvers = mine.subscribe(EVENTS, ws=team.ws), owners.subscribe(EVENTS, ws=team.ws)
        pending = [asyncio.ensure_future(next_within(s, 10)) for s in (theirs, approvers)]
        await asyncio.sleep(0.3)
        async with client(team.owner) as api:
            await api("mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }", m=member)
        seen_by_owner = [(await pending[1])["workspaceEvents"]]
        while len(seen_by_owner) < 2:
            seen_by_owner.append((await next_within(approvers, 10))["workspaceEvents"])
        seen_by_them = []
        with pytest.raises(TransportQueryError) as err:  # their stream ends on their own removal
            seen_by_them.append((await pending[0])["workspaceEvents"])
            while True:
                seen_by_them.append((await next_within(theirs, 5))["workspaceEvents"])
        await approvers.aclose()
    assert err.value.errors[0]["extensions"]["code"] == "NOT_FOUND"
    assert [(e["kind"], e["payload"].get("change") or e["payload"].get("status")) for e in seen_by_owner] == [
        ("MEMBER_CHANGED", "REMOVED"), ("OVERAGE_DECIDED", "LAPSED")]
    assert seen_by_owner[1]["payload"] == {"requestId": req["id"], "memberId": member, "status": "LAPSED"}
    # They are no longer a member when it lapses: what their queries refuse, their stream does not show.
    assert [e["kind"] for e in seen_by_them] == ["MEMBER_CHANGED"]


@pytest.fixture(scope="module")
def quiet_server(database_url: str):
    """A server whose periodic re-check is far away, so what a stream shows right after a change
    comes from the change's own events, not from a re-check that happened to fall in between.
    Its broadcast is in-process: every mutation a test watches through it must go through it."""
    from tests.conftest import LiveServer

    server = LiveServer(database_url, live_recheck_seconds=30)
    server.start()
    yield server
    server.stop()


async def test_a_demoted_admins_event_stream_stops_showing_other_members_generations_at_once(
        db, client, quiet_server):
    from tests.conftest import http_client

    team = await make_team(db, client, creators=2)
    await grant(client, team, "1000")
    (admin, admin_member), (other, _) = team.creators
    async with client(team.owner) as api:
        assert (await api(ROLE, m=admin_member, r="ADMIN"))["changeMemberRole"]["__typename"] == "Member"
    async with ws_client(quiet_server, admin) as ws:
        stream = ws.subscribe(EVENTS, ws=team.ws)
        pending = asyncio.ensure_future(next_within(stream, 10))
        await asyncio.sleep(0.3)
        async with http_client(quiet_server, other) as api:
            before = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        async with http_client(quiet_server, team.owner) as api:
            assert (await api(ROLE, m=admin_member, r="MEMBER"))["changeMemberRole"]["__typename"] == "Member"
        async with http_client(quiet_server, other) as api:
            after = (await api(START, ws=team.ws, model="sdxl", key=key()))["startGeneration"]
        async with http_client(quiet_server, team.owner) as api:
            await api(ADD, ws=team.ws, email=f"late-{key()}@example.test", role="MEMBER", seat="STANDARD")
        got = [(await pending)["workspaceEvents"]] + await events_until_member_added(stream)
        await stream.aclose()
    assert [(e["kind"], e["payload"].get("generationId") or e["payload"].get("change")) for e in got] == [
        ("GENERATION_STARTED", before["id"]), ("MEMBER_CHANGED", "ROLE_CHANGED"), ("MEMBER_CHANGED", "ADDED")]
    assert after["id"] not in str(got)


# --- the spendable amount follows the subscriber's membership ------------------------------------

SEAT = 'mutation($m: ID!, $s: Seat!) { changeMemberSeat(input: {memberId: $m, seat: $s}) { __typename } }'


async def settled(stream, seconds: float) -> dict | None:
    """The last update a stream sends within `seconds` (None if it sends none)."""
    last, deadline = None, time.monotonic() + seconds
    with contextlib.suppress(TimeoutError):
        while True:
            last = (await next_within(stream, deadline - time.monotonic()))["balanceChanged"]
    return last


async def test_after_a_seat_change_the_stream_settles_on_the_new_spendable_amount(db, client, quiet_server):
    from tests.conftest import http_client

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with ws_client(quiet_server, token) as ws:
        stream = ws.subscribe(BALANCES, ws=team.ws)
        assert (await next_within(stream, 5))["balanceChanged"]["viewerSpendable"] == "100.000"
        async with http_client(quiet_server, team.owner) as api:  # no longer a creator: may spend nothing
            assert (await api(SEAT, m=member, s="STANDARD"))["changeMemberSeat"]["__typename"] == "Member"
        last = await settled(stream, 2)
        await stream.aclose()
    async with client(token) as api:
        assert (await api(BALANCE, ws=team.ws))["balance"]["viewerSpendable"] == "0.000"
    assert last is not None and last["viewerSpendable"] == "0.000", last


async def test_after_joining_a_billing_group_the_stream_shows_the_groups_credits_as_spendable(
        db, client, quiet_server):
    from tests.conftest import http_client
    from tests.test_governance_review import ASSIGN, GROUP, TO_GROUP

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with client(team.owner) as api:
        g = (await api(GROUP, ws=team.ws))["createBillingGroup"]["id"]
        assert (await api(TO_GROUP, ws=team.ws, g=g, a="30", k=key()))["transferCredits"]["__typename"] == "Transfer"
    async with ws_client(quiet_server, token) as ws:
        stream = ws.subscribe(BALANCES, ws=team.ws)
        assert (await next_within(stream, 5))["balanceChanged"]["viewerSpendable"] == "70.000"
        async with http_client(quiet_server, team.owner) as api:  # the group's 30 now come first
            assert (await api(ASSIGN, m=member, g=g))["assignBillingGroup"]["__typename"] == "Member"
        last = await settled(stream, 2)
        await stream.aclose()
    async with client(token) as api:
        assert (await api(BALANCE, ws=team.ws))["balance"]["viewerSpendable"] == "100.000"
    assert last is not None and last["viewerSpendable"] == "100.000", last


async def test_a_membership_change_without_an_event_reaches_the_stream_at_the_next_re_check(
        db, live_server, client):
    from sqlalchemy import text

    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, member = team.creators[0]
    async with ws_client(live_server, token) as ws:
        stream = ws.subscribe(BALANCES, ws=team.ws)
        assert (await next_within(stream, 5))["balanceChanged"]["viewerSpendable"] == "100.000"
        # Behind the services' back (no event, no balance signal): only the re-check can see it.
        await db.transaction(lambda s: s.execute(text("UPDATE members SET seat = 'standard' WHERE id = :m"),
                                                 {"m": member}))
        last = await settled(stream, 2)  # live_server re-checks every 0.5 s
        await stream.aclose()
    assert last is not None and last["viewerSpendable"] == "0.000", last
