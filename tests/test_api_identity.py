"""Tokens, authentication, and the HTTP edge: bad tokens, malformed requests, limits, masking."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import asyncpg
import pytest
import strawberry
from sqlalchemy import select
from gql.transport.exceptions import TransportQueryError

from api.schema import RequestRules, build_schema
from domain import identity
from domain.errors import Forbidden
from tests.conftest import HeldLock, asyncpg_dsn, new_service_token, new_user

CREATE_TOKEN = """
mutation($name: String!) {
  createApiToken(input: {name: $name}) {
    __typename
    ... on CreatedApiToken { secret token { id name revokedAt } }
    ... on ValidationError { field code }
  }
}"""
CREATE_TOKEN_CAPPED = """
mutation($name: String!) {
  createApiToken(input: {name: $name}) {
    __typename
    ... on CreatedApiToken { token { id } }
    ... on ValidationError { field code message }
  }
}"""
REVOKE = """
mutation($id: ID!) {
  revokeApiToken(input: {tokenId: $id}) { __typename ... on ApiToken { id revokedAt } ... on Error { code } }
}"""


async def post(live_server, body, *, token=None, content_type="application/json", raw=None):
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(live_server.http_url, json=None if raw is not None else body, data=raw,
                             headers=headers) as resp:
            text = await resp.text()
            return resp.status, text


async def test_viewer_is_the_token_owner(db, client):
    email, token = await new_user(db)
    async with client(token) as api:
        viewer = (await api("{ viewer { email kind isOperator } }"))["viewer"]
    assert viewer == {"email": email, "kind": "HUMAN", "isOperator": False}


async def test_a_user_creates_and_revokes_own_tokens(db, client):
    _, token = await new_user(db)
    async with client(token) as api:
        created = (await api(CREATE_TOKEN, name="laptop"))["createApiToken"]
        assert created["__typename"] == "CreatedApiToken" and created["secret"].startswith("cp_")
        bad = (await api(CREATE_TOKEN, name="  "))["createApiToken"]
        assert bad == {"__typename": "ValidationError", "field": "name", "code": "VALIDATION"}
    async with client(created["secret"]) as second:
        assert (await second("{ viewer { apiTokens { name lastUsedAt } } }"))["viewer"]["apiTokens"][1]["lastUsedAt"]
        revoked = (await second(REVOKE, id=created["token"]["id"]))["revokeApiToken"]
        assert revoked["__typename"] == "ApiToken" and revoked["revokedAt"] is not None
        with pytest.raises(TransportQueryError) as err:
            await second("{ viewer { email } }")
        assert err.value.errors[0]["extensions"] == {"code": "UNAUTHENTICATED"}
    # The secret is stored only as a hash.
    stored = await db.read(lambda s: s.execute(select(identity.ApiToken.token_hash)))
    hashes = set(stored.scalars())
    assert identity.hash_token(created["secret"]) in hashes
    assert not any(created["secret"].encode() in h for h in hashes)
    # The first token still works.
    async with client(token) as api:
        assert (await api("{ viewer { kind } }"))["viewer"]["kind"] == "HUMAN"


async def test_nobody_revokes_anothers_token(db, client):
    _, mine = await new_user(db)
    _, theirs = await new_user(db)
    async with client(theirs) as api:
        their_token_id = (await api("{ viewer { apiTokens { id } } }"))["viewer"]["apiTokens"][0]["id"]
    async with client(mine) as api:
        out = (await api(REVOKE, id=their_token_id))["revokeApiToken"]
        assert out == {"__typename": "NotFoundError", "code": "NOT_FOUND"}
        assert (await api(REVOKE, id="garbage"))["revokeApiToken"] == out
    async with client(theirs) as api:
        assert (await api("{ viewer { kind } }"))["viewer"]["kind"] == "HUMAN"


@pytest.mark.parametrize("token", ["cp_not-a-real-token", "garbage", "Bearer", ""])
async def test_invalid_tokens_get_a_plain_unauthenticated_error(live_server, token):
    status, text = await post(live_server, {"query": "{ viewer { email } }"}, token=token or None)
    assert status == 200
    [error] = json.loads(text)["errors"]
    assert (error["message"], error["extensions"]) == ("authentication required", {"code": "UNAUTHENTICATED"})


async def test_malformed_graphql_and_non_json_bodies_are_400(live_server):
    assert (await post(live_server, {"query": "{ viewer { "}))[0] == 400
    assert (await post(live_server, {"query": "{ noSuchField }"}))[0] == 400
    assert (await post(live_server, None, raw=b"{not json"))[0] == 400
    assert (await post(live_server, {"variables": {}}))[0] == 400


async def test_alias_and_token_limits_refuse_the_request(db, live_server):
    _, token = await new_user(db)
    assert (await post(live_server, {"query": "{ a: viewer { id } b: viewer { id } }"}, token=token))[0] == 200
    aliases = "{ " + " ".join(f"a{i}: viewer {{ id }}" for i in range(20)) + " }"
    status, text = await post(live_server, {"query": aliases}, token=token)
    assert status == 400 and "aliases" in text.lower()
    long_query = "{ viewer { " + " ".join(["id"] * 3000) + " } }"
    status, text = await post(live_server, {"query": long_query}, token=token)
    assert status == 400 and "token" in text.lower()


async def test_query_depth_is_limited():
    # The live schema has no cycles deep enough to hit the default limit (12), so check the
    # limiter on a schema built with a small one. Awaited: run synchronously, the shallow query's
    # async resolvers left a coroutine never awaited (a RuntimeWarning in every test run). With no
    # context its resolver fails, which is not what this checks: only that no depth error came.
    schema = build_schema(max_depth=3)
    shallow = await schema.execute("{ viewer { workspaces { role } } }")
    assert not any("depth" in e.message for e in shallow.errors or [])
    deep = await schema.execute("{ viewer { workspaces { workspace { plan { key } } } } }")
    assert any("exceeds maximum operation depth" in e.message for e in deep.errors)


async def test_service_accounts_are_identified_as_such(db, client):
    token = await new_service_token(db)
    async with client(token) as api:
        assert (await api("{ viewer { kind email } }"))["viewer"] == {"kind": "SERVICE", "email": None}
        with pytest.raises(TransportQueryError) as err:
            await api('mutation { createWorkspace(input: {name: "x"}) { __typename } }')
        assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"


async def test_a_service_account_cannot_mint_itself_tokens_through_the_api(db, client):
    # A leaked worker token must not be able to issue itself successors that outlive its
    # revocation: a service account's tokens come from the operator (`create-service-token`).
    token = await new_service_token(db)
    actor = await identity.authenticate_secret(db, token)
    async with client(token) as api:
        with pytest.raises(TransportQueryError) as err:
            await api(CREATE_TOKEN, name="successor")
    [error] = err.value.errors
    assert error["extensions"] == {"code": "FORBIDDEN"}
    assert "createApiToken" in error["message"] and "create-service-token" in error["message"], error["message"]
    tokens = await db.read(lambda s: identity.list_tokens(s, actor.user_id))
    assert [t.id for t in tokens] == [actor.token_id]  # nothing was written


async def waiting_on_locks(database_url: str, count: int) -> None:
    """Until `count` sessions of this database wait on a lock."""
    watcher = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with asyncio.timeout(20):
            while await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                         "AND datname = current_database()") < count:
                await asyncio.sleep(0.02)
    finally:
        await watcher.close()


async def live_token_count(db, user_id) -> int:
    return sum(t.revoked_at is None for t in await db.read(lambda s: identity.list_tokens(s, user_id)))


async def test_creates_racing_at_the_token_cap_let_exactly_one_through(db, client, database_url):
    _, token = await new_user(db)
    actor = await identity.authenticate_secret(db, token)  # also sets last_used_at: no write below

    async def fill(session):  # one short of the cap (the API would take 48 more round trips)
        for i in range(identity.MAX_ACTIVE_TOKENS - 2):
            await identity.issue_token(session, actor.user_id, f"t{i}")

    await db.transaction(fill)
    racers = 6
    # The user's row held FOR UPDATE: no token can be written (its foreign key check waits) and
    # no create can lock the row to count, so every racer is stopped with nothing written, the
    # authentication done and, counting without a lock, the cap already checked. Released, only
    # the creates that counted under the user's lock, one at a time, are told the truth.
    async with HeldLock(database_url, "users", actor.user_id) as held, client(token) as api:
        creates = [asyncio.ensure_future(api(CREATE_TOKEN_CAPPED, name=f"racer {i}")) for i in range(racers)]
        await waiting_on_locks(database_url, racers)
        await held.commit()
        async with asyncio.timeout(20):
            answers = [(await c)["createApiToken"] for c in creates]
    assert sorted(a["__typename"] for a in answers) == ["CreatedApiToken"] + ["ValidationError"] * (racers - 1)
    refused = next(a for a in answers if a["__typename"] == "ValidationError")
    assert refused["field"] == "apiTokens" and str(identity.MAX_ACTIVE_TOKENS) in refused["message"]
    assert await live_token_count(db, actor.user_id) == identity.MAX_ACTIVE_TOKENS

    # A revoked token no longer counts; the operator's CLI (the way back in) is never capped.
    async with client(token) as api:
        created = (await api(CREATE_TOKEN_CAPPED, name="one more"))["createApiToken"]
        assert created["__typename"] == "ValidationError"
        victim = (await api("{ viewer { apiTokens { id } } }"))["viewer"]["apiTokens"][-1]["id"]
        assert (await api(REVOKE, id=victim))["revokeApiToken"]["__typename"] == "ApiToken"
        assert (await api(CREATE_TOKEN_CAPPED, name="one more"))["createApiToken"]["__typename"] == "CreatedApiToken"
    email = (await identity.whoami(db, actor)).email
    assert await identity.cli_user_token(db, email, operator=False)
    assert await live_token_count(db, actor.user_id) == identity.MAX_ACTIVE_TOKENS + 1


REVOKE_OTHERS = "mutation { revokeOtherApiTokens { id name revokedAt } }"


async def test_revoking_your_other_tokens_keeps_only_the_one_asking(db, client):
    _, token = await new_user(db)
    _, bystander = await new_user(db)
    async with client(token) as api:
        laptop, phone = [(await api(CREATE_TOKEN, name=n))["createApiToken"] for n in ("laptop", "phone")]
        assert (await api(REVOKE, id=phone["token"]["id"]))["revokeApiToken"]["__typename"] == "ApiToken"
        before = {t["id"]: t["revokedAt"] for t in (await api("{ viewer { apiTokens { id revokedAt } } }"))[
            "viewer"]["apiTokens"]}
        revoked = (await api(REVOKE_OTHERS))["revokeOtherApiTokens"]
        assert [(t["id"], t["name"]) for t in revoked] == [(laptop["token"]["id"], "laptop")]  # phone was already
        assert revoked[0]["revokedAt"]
        after = {t["id"]: t["revokedAt"] for t in (await api("{ viewer { apiTokens { id revokedAt } } }"))[
            "viewer"]["apiTokens"]}
        assert after[phone["token"]["id"]] == before[phone["token"]["id"]]  # its revocation time is kept
        assert [i for i, at in after.items() if at is None] == [i for i, at in before.items() if at is None
                                                               and i != laptop["token"]["id"]]  # this one
        assert (await api(REVOKE_OTHERS))["revokeOtherApiTokens"] == []  # again: nothing left to revoke
    for secret in (laptop["secret"], phone["secret"]):
        async with client(secret) as api:
            with pytest.raises(TransportQueryError) as err:
                await api("{ viewer { email } }")
            assert err.value.errors[0]["extensions"] == {"code": "UNAUTHENTICATED"}
    async with client(bystander) as api:  # another user's tokens are untouched
        assert (await api("{ viewer { kind } }"))["viewer"]["kind"] == "HUMAN"


async def test_a_token_revoked_while_its_request_waited_mints_nothing_and_revokes_nothing(db, client, database_url):
    # Revoking every other token must leave no survivor: a create (or a revoke-all) sent with a
    # token that another revoke-all revokes while it waits for the user's lock is refused as an
    # unknown token would be, not let through on its authentication of a moment before.
    _, token = await new_user(db)
    actor = await identity.authenticate_secret(db, token)
    async with client(token) as api:
        leaked = (await api(CREATE_TOKEN, name="leaked"))["createApiToken"]
    attacker = await identity.authenticate_secret(db, leaked["secret"])  # last_used_at set: no write below
    async with HeldLock(database_url, "users", actor.user_id) as held, client(leaked["secret"]) as api:
        create = asyncio.ensure_future(api(CREATE_TOKEN, name="successor"))
        revoke_all = asyncio.ensure_future(api(REVOKE_OTHERS))
        await waiting_on_locks(database_url, 2)
        await held.conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = $1", attacker.token_id)
        await held.commit()
        for call in (create, revoke_all):
            with pytest.raises(TransportQueryError) as err:
                await asyncio.wait_for(call, 20)
            assert err.value.errors[0]["extensions"] == {"code": "UNAUTHENTICATED"}
    tokens = await db.read(lambda s: identity.list_tokens(s, actor.user_id))
    assert [(t.name, t.revoked_at is None) for t in tokens] == [("cli", True), ("leaked", False)]


async def test_two_tokens_revoking_each_other_at_once_leave_exactly_one(db, client, database_url):
    _, token = await new_user(db)
    actor = await identity.authenticate_secret(db, token)
    async with client(token) as api:
        other = (await api(CREATE_TOKEN, name="other"))["createApiToken"]["secret"]
    await identity.authenticate_secret(db, other)
    async with HeldLock(database_url, "users", actor.user_id) as held, client(token) as a, client(other) as b:
        calls = [asyncio.ensure_future(api(REVOKE_OTHERS)) for api in (a, b)]
        await waiting_on_locks(database_url, 2)
        await held.commit()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
    [won] = [o for o in outcomes if isinstance(o, dict)]
    [lost] = [o for o in outcomes if isinstance(o, TransportQueryError)]
    assert len(won["revokeOtherApiTokens"]) == 1 and lost.errors[0]["extensions"] == {"code": "UNAUTHENTICATED"}
    assert await live_token_count(db, actor.user_id) == 1  # never both: the user is not locked out


def test_unexpected_errors_are_masked_and_auth_errors_keep_their_code():
    @strawberry.type
    class Query:
        @strawberry.field
        def boom(self) -> str:
            raise RuntimeError('relation "secret_table" does not exist')

        @strawberry.field
        def denied(self) -> str:
            raise Forbidden("members.manage")

    schema = strawberry.Schema(query=Query, extensions=[lambda: RequestRules(max_tokens=2000, rules=())])
    result = schema.execute_sync("{ boom }")
    assert [e.message for e in result.errors] == ["Unexpected error."]
    assert result.errors[0].extensions == {"code": "INTERNAL"}
    assert "secret_table" not in str(result.errors[0].formatted)
    result = schema.execute_sync("{ denied }")
    assert result.errors[0].message == "not allowed: members.manage"
    assert result.errors[0].extensions == {"code": "FORBIDDEN"}
    result = schema.execute_sync("{ nope }")
    assert "Cannot query field" in result.errors[0].message  # request errors pass through


async def test_repeated_queries_hit_the_parser_and_validation_caches(db, live_server):
    # Parsing and validation are most of a small request's cost; the caches must actually hit
    # (a limiter that builds new rule classes per request silently defeats the validation cache).
    from strawberry.extensions.parser_cache import _get_parse_cache
    from strawberry.extensions.validation_cache import _get_validate_cache

    _, token = await new_user(db)
    query = {"query": "{ viewer { id kind } }"}
    await post(live_server, query, token=token)
    parse_hits = _get_parse_cache(256).cache_info().hits
    validate_hits = _get_validate_cache(256).cache_info().hits
    for _ in range(3):
        status, _ = await post(live_server, query, token=token)
        assert status == 200
    assert _get_parse_cache(256).cache_info().hits >= parse_hits + 3
    assert _get_validate_cache(256).cache_info().hits >= validate_hits + 3


# --- revocations in the audit log -----------------------------------------------------------------

AUDIT_TOKENS = """query($ws: ID!, $action: String!) {
  auditLog(workspaceId: $ws, action: $action) { edges { node { action actorId targetType targetId before after } } }
}"""
NEW_WORKSPACE = 'mutation($name: String!) { createWorkspace(input: {name: $name}) { ... on Workspace { id } } }'


async def token_entries(client, token: str, ws: str, action: str = "apitoken.revoked") -> list[dict]:
    async with client(token) as api:
        return [e["node"] for e in (await api(AUDIT_TOKENS, ws=ws, action=action))["auditLog"]["edges"]]


async def test_revoking_a_token_is_audited_in_every_workspace_its_owner_is_a_member_of(db, client):
    # A token is a person's, not a workspace's: it acts in every workspace they belong to, and
    # revoking one (a lost laptop, a leaked secret) wrote no audit entry in any of them.
    from tests.test_api_ledger import ADD

    _, owner = await new_user(db)
    email, member = await new_user(db, prefix="member")
    async with client(owner) as api:
        first = (await api(NEW_WORKSPACE, name="First"))["createWorkspace"]["id"]
        second = (await api(NEW_WORKSPACE, name="Second"))["createWorkspace"]["id"]
        for ws in (first, second):
            assert (await api(ADD, ws=ws, email=email, role="MEMBER", seat="STANDARD"))["addMember"]["id"]
    _, outsider = await new_user(db)
    async with client(outsider) as api:
        elsewhere = (await api(NEW_WORKSPACE, name="Elsewhere"))["createWorkspace"]["id"]
    async with client(member) as api:
        viewer = (await api("{ viewer { id } }"))["viewer"]["id"]
        laptop = (await api(CREATE_TOKEN, name="laptop"))["createApiToken"]["token"]["id"]
        revoked = (await api(REVOKE, id=laptop))["revokeApiToken"]
        assert (await api(REVOKE, id=laptop))["revokeApiToken"] == revoked  # again: harmless, and not audited again
    entry = {"action": "apitoken.revoked", "actorId": viewer, "targetType": "api_token", "targetId": laptop,
             "before": {"userId": viewer, "revokedAt": None},
             "after": {"userId": viewer, "revokedAt": revoked["revokedAt"]}}
    for ws in (first, second):
        assert await token_entries(client, owner, ws) == [entry]
    assert await token_entries(client, outsider, elsewhere) == []


async def team_of_two(db, client) -> tuple[str, str, str, str]:
    """A workspace with its owner and a STANDARD member: (owner's token, member's email, member's
    token, workspace id)."""
    from tests.test_api_ledger import ADD

    _, owner = await new_user(db)
    email, member = await new_user(db, prefix="member")
    async with client(owner) as api:
        ws = (await api(NEW_WORKSPACE, name="Team"))["createWorkspace"]["id"]
        assert (await api(ADD, ws=ws, email=email, role="MEMBER", seat="STANDARD"))["addMember"]["id"]
    return owner, email, member, ws


async def test_revoking_every_other_token_and_the_operators_revoke_tokens_are_audited(db, client):
    owner, email, member, ws = await team_of_two(db, client)
    async with client(member) as api:
        viewer = (await api("{ viewer { id } }"))["viewer"]["id"]
        made = [(await api(CREATE_TOKEN, name=name))["createApiToken"]["token"]["id"] for name in ("a", "b")]
        others = sorted(t["id"] for t in (await api(REVOKE_OTHERS))["revokeOtherApiTokens"])
    assert others == sorted(made)
    entries = await token_entries(client, owner, ws)
    assert sorted(e["targetId"] for e in entries) == others
    assert {(e["actorId"], e["after"]["userId"]) for e in entries} == {(viewer, viewer)}
    # Incident response: the operator's CLI revokes the one left, with no actor in the request.
    _, [last] = await identity.cli_revoke_tokens(db, email=email)
    [entry, *_] = await token_entries(client, owner, ws)
    assert (entry["targetId"], entry["actorId"], entry["after"]["userId"]) == (str(last.id), None, viewer)
    assert entry["after"]["revokedAt"] is not None


async def test_issuing_a_token_is_audited_in_every_workspace_its_owner_is_a_member_of(db, client):
    # Its revocation was, its issue was not: a workspace's log showed tokens stop that it never saw start.
    owner, email, member, ws = await team_of_two(db, client)
    async with client(member) as api:
        viewer = (await api("{ viewer { id } }"))["viewer"]["id"]
        made = (await api(CREATE_TOKEN, name="laptop"))["createApiToken"]["token"]
    await identity.cli_user_token(db, email, operator=False)  # the operator's CLI: no actor
    async with client(member) as api:
        by_cli = (await api("{ viewer { apiTokens { id createdAt } } }"))["viewer"]["apiTokens"][-1]
    entries = await token_entries(client, owner, ws, "apitoken.created")
    assert [(e["targetId"], e["actorId"], e["before"], e["after"]["userId"]) for e in entries] == [
        (by_cli["id"], None, None, viewer), (made["id"], viewer, None, viewer)]
    assert entries[0]["after"]["createdAt"] == by_cli["createdAt"]


async def test_a_revoked_token_waiting_to_revoke_its_owners_last_token_revokes_nothing(db, client, database_url):
    # A leaked token (revoked by its owner's revokeOtherApiTokens while its own revokeApiToken
    # waited) must not revoke the token that cleaned up after it: the owner would be left with no
    # live token at all, locked out until an operator issued one, by a token already revoked.
    _, token = await new_user(db)
    actor = await identity.authenticate_secret(db, token)
    async with client(token) as api:
        leaked = (await api(CREATE_TOKEN, name="leaked"))["createApiToken"]["secret"]
    attacker = await identity.authenticate_secret(db, leaked)  # last_used_at set: no write below
    # Held as a revoke-all holds them (the user's row), and the owner's token row too: whichever
    # the revocation waits for, it waits until the leaked token is revoked.
    async with HeldLock(database_url, "users", actor.user_id) as held, client(leaked) as api:
        await held.conn.execute("SELECT 1 FROM api_tokens WHERE id = $1 FOR UPDATE", actor.token_id)
        revoke = asyncio.ensure_future(api(REVOKE, id=str(actor.token_id)))
        await waiting_on_locks(database_url, 1)
        await held.conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = $1", attacker.token_id)
        await held.commit()
        with pytest.raises(TransportQueryError) as err:
            await asyncio.wait_for(revoke, 20)
    assert err.value.errors[0]["extensions"] == {"code": "UNAUTHENTICATED"}
    tokens = await db.read(lambda s: identity.list_tokens(s, actor.user_id))
    assert [(t.name, t.revoked_at is None) for t in tokens] == [("cli", True), ("leaked", False)]
