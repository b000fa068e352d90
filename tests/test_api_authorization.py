"""The API enforces the policy field by field (money rule 7, "authorization follows the data").

tests/test_policy_matrix.py pins the role-to-action matrix at the policy level. This module
proves the API asks it: every Mutation and Query field of the executable schema is classified in
`TABLE`, either by the policy `Action` it must require or by a category with its reason (a field
added to the schema fails the test until it is classified here). Every entry that an action
governs is called over HTTP with the real `gql` client, with a valid input (test_edge_fuzz's
baseline builders on its `world`: one real team), as each identity of the team, the platform
operator, the generation worker's service token and an outsider who owns another workspace. It
must be allowed exactly when `Authorizer().allows(...)` says so for the roles the identity holds
there, read from the API itself (`viewer.workspaces`, `isOperator`, `kind`): the expectation is
derived from the real policy files, never written by hand. "Refused" is FORBIDDEN, a
NotFoundError or, for a query, null; a business refusal after authorization (insufficient
credits, a seat cap, a spend limit) counts as allowed. The outsider's answer for the team's real
id is the very answer for a random id, and so is their answer in their own workspace naming one of
the team's rows (a member, a group) instead of a random id.

Runs in a few seconds: fresh targets for the calls that consume them (a member removed, a
generation settled, a request decided) are made first, then every call runs at once.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from graphql import GraphQLUnionType, get_named_type, is_leaf_type

from policies import PLATFORM_DOMAIN, Action, Authorizer
from tests.conftest import http_client, new_user
from tests.test_edge_fuzz import ROOTS, SCHEMA, World, baseline, materialize
from tests.test_edge_fuzz import world  # noqa: F401  (the fixture: one real team and the ids it names)

CONCURRENCY = 8

# --- the table ------------------------------------------------------------------------------------

SELF, ANY, PLATFORM = "self", "any signed-in user", "platform"


@dataclass(frozen=True)
class Rule:
    """What a field requires: `action` in the workspace its `key` argument leads to (for PLATFORM,
    in the platform domain, from platform roles alone), or a category that no action governs."""

    action: Action | None = None
    category: str | None = None
    reason: str = ""
    key: str | None = None  # the id the authorization follows: the outsider's random-id twin replaces it
    fresh: str | None = None  # a new target per call (the call consumes it): see `Fresh`
    variables: dict[str, Any] = field(default_factory=dict)  # on top of the baseline
    also: tuple[Action, ...] = ()  # any of these allows too
    own: bool = False  # the row's own member (the creator, who started it) is allowed too
    note: str = ""  # a deliberate, documented rule beyond the action


def ws(action: Action, key: str = "input.workspaceId", **kw) -> Rule:
    return Rule(action=action, key=key, **kw)


VIEW_OWN_ONLY = ("rows filtered, not refused: without ledger.view a member sees only their own generations "
                 "(README, `generations`' description); the filtering is test_api_ledger's")

TABLE: dict[tuple[str, str], Rule] = {
    # Queries.
    ("query", "viewer"): Rule(category=SELF, reason="your own identity, tokens and memberships"),
    ("query", "workspace"): ws(Action.VIEW_WORKSPACE, "id"),
    ("query", "plans"): Rule(category=ANY, reason="the plans on offer, public to every signed-in user"),
    ("query", "modelPrices"): ws(Action.VIEW_BALANCE, "workspaceId", variables={"workspaceId": "$ws"},
                                 note="without a workspace: any signed-in user (public prices)"),
    ("query", "priceLists"): Rule(category=ANY, reason="every price list version, public"),
    ("query", "quote"): ws(Action.VIEW_BALANCE, "workspaceId",
                           note="a price look-up that holds nothing: whoever sees the balance may ask (canAfford "
                                "answers whether they could spend it); startGeneration needs `generate`"),
    ("query", "balance"): ws(Action.VIEW_BALANCE, "workspaceId"),
    ("query", "ledger"): ws(Action.VIEW_LEDGER, "workspaceId"),
    ("query", "generations"): ws(Action.VIEW_WORKSPACE, "workspaceId", note=VIEW_OWN_ONLY),
    ("query", "generation"): ws(Action.VIEW_LEDGER, "id", also=(Action.SETTLE_GENERATIONS,), own=True,
                                note="ledger viewers see any generation, a member their own (README); the "
                                     "generation worker reads what it settles"),
    ("query", "creditPacks"): Rule(category=ANY, reason="the packs on sale, public"),
    ("query", "creditSchedule"): ws(Action.VIEW_BALANCE, "workspaceId"),
    ("query", "billingGroups"): ws(Action.VIEW_WORKSPACE, "workspaceId"),
    ("query", "spendLimits"): ws(Action.VIEW_BALANCE, "workspaceId"),
    ("query", "overageRequests"): ws(Action.VIEW_WORKSPACE, "workspaceId",
                                     note="rows filtered: approvers see every request, anyone else their own"),
    ("query", "notifications"): Rule(category=SELF, reason="your own notifications"),
    ("query", "autoTopUp"): ws(Action.VIEW_LEDGER, "workspaceId"),
    ("query", "alerts"): ws(Action.VIEW_LEDGER, "workspaceId"),
    ("query", "auditLog"): ws(Action.VIEW_AUDIT_LOG, "workspaceId"),
    # Mutations.
    ("mutation", "createApiToken"): Rule(category=SELF, reason="your own tokens (service accounts refused)"),
    ("mutation", "revokeApiToken"): Rule(category=SELF, reason="your own tokens"),
    ("mutation", "revokeOtherApiTokens"): Rule(category=SELF, reason="your own tokens"),
    ("mutation", "createWorkspace"): Rule(category=ANY, reason="a new workspace, whose owner the caller becomes"),
    ("mutation", "updateWorkspace"): ws(Action.MANAGE_WORKSPACE),
    ("mutation", "addMember"): ws(Action.MANAGE_MEMBERS),
    ("mutation", "changeMemberRole"): ws(Action.MANAGE_MEMBERS, "input.memberId", fresh="member"),
    ("mutation", "changeMemberSeat"): ws(Action.MANAGE_MEMBERS, "input.memberId", fresh="creator"),
    ("mutation", "removeMember"): ws(Action.MANAGE_MEMBERS, "input.memberId", fresh="member"),
    ("mutation", "purchaseCredits"): ws(Action.PURCHASE_CREDITS),
    ("mutation", "grantCredits"): ws(Action.GRANT_CREDITS),
    ("mutation", "transferCredits"): ws(Action.TRANSFER_CREDITS),
    ("mutation", "startGeneration"): ws(Action.GENERATE),
    ("mutation", "completeGeneration"): ws(Action.SETTLE_GENERATIONS, "input.generationId", fresh="generation"),
    ("mutation", "failGeneration"): ws(Action.SETTLE_GENERATIONS, "input.generationId", fresh="generation"),
    ("mutation", "createCreditPack"): Rule(action=Action.MANAGE_CATALOG, category=PLATFORM, reason="operators only"),
    ("mutation", "setCreditPackActive"): Rule(action=Action.MANAGE_CATALOG, category=PLATFORM, reason="operators only"),
    ("mutation", "publishPriceList"): Rule(action=Action.MANAGE_CATALOG, category=PLATFORM, reason="operators only"),
    ("mutation", "createPlan"): Rule(action=Action.MANAGE_CATALOG, category=PLATFORM, reason="operators only"),
    ("mutation", "cancelSubscription"): ws(Action.MANAGE_WORKSPACE),
    ("mutation", "createBillingGroup"): ws(Action.MANAGE_BILLING_GROUPS),
    ("mutation", "renameBillingGroup"): ws(Action.MANAGE_BILLING_GROUPS, "input.groupId"),
    ("mutation", "archiveBillingGroup"): ws(Action.MANAGE_BILLING_GROUPS, "input.groupId", fresh="group"),
    ("mutation", "assignBillingGroup"): ws(Action.MANAGE_BILLING_GROUPS, "input.memberId"),
    ("mutation", "setSpendLimit"): ws(Action.SET_SPEND_LIMITS),
    ("mutation", "removeSpendLimit"): ws(Action.SET_SPEND_LIMITS, "input.limitId", fresh="limit"),
    ("mutation", "requestOverage"): ws(Action.REQUEST_OVERAGE),
    ("mutation", "decideOverage"): ws(Action.APPROVE_OVERAGES, "input.requestId", fresh="request"),
    ("mutation", "setAutoTopUp"): ws(Action.MANAGE_AUTO_TOPUP),
    ("mutation", "setAlertSettings"): ws(Action.MANAGE_WORKSPACE),
    ("mutation", "acknowledgeAlert"): ws(Action.VIEW_LEDGER, "input.alertId",
                                         note="alerts are shown to ledger viewers, who may acknowledge them"),
    ("mutation", "markNotificationsRead"): Rule(category=SELF, reason="your own notifications"),
}

# The same field once more, where an input changes what it requires: {label: (field, rule)}.
VARIANTS: dict[str, tuple[tuple[str, str], Rule]] = {
    "changeMemberRole to OWNER": (("mutation", "changeMemberRole"), ws(
        Action.MANAGE_OWNERS, "input.memberId", fresh="member", variables={"input": {"role": "OWNER"}})),
    "startGeneration on behalf of a member": (("mutation", "startGeneration"), ws(
        Action.START_FOR_MEMBER, variables={"input": {"onBehalfOfMemberId": "$member"}})),
    "setAutoTopUp turning it off": (("mutation", "setAutoTopUp"), ws(
        Action.DISABLE_AUTO_TOPUP, variables={"input": {"enabled": False}},
        note="stopping charges is for any governor: admins too (turning it on is not)")),
}

IDENTITIES = ["owner", "admin", "bm_creator", "bm_standard", "creator", "standard", "operator", "worker", "outsider"]


# --- calling --------------------------------------------------------------------------------------

def document(operation: str, name: str, variables: dict) -> str:
    """The field with the arguments given, answering only its type name (nested fields would ask
    checks of their own)."""
    f = ROOTS[operation].fields[name]
    given = [n for n in f.args if n in variables]
    defs = ", ".join(f"${n}: {f.args[n].type}" for n in given)
    call = ", ".join(f"{n}: ${n}" for n in given)
    named = get_named_type(f.type)
    selection = "" if is_leaf_type(named) else " { __typename }"
    if isinstance(named, GraphQLUnionType):  # an expected failure says what it is about
        members = {t.name for t in SCHEMA.get_possible_types(named)}
        selection = (" { __typename ... on Error { code message }"
                     + (" ... on NotFoundError { what }" if "NotFoundError" in members else "") + " }")
    return (f"{operation}{f'({defs})' if defs else ''} {{ {name}{f'({call})' if call else ''}{selection} }}")


@dataclass
class Answer:
    data: Any
    errors: list

    def refusal(self, name: str) -> str | None:
        """FORBIDDEN or NOT_FOUND when refused for authorization; None when allowed; anything
        else (another top-level error) is returned as is and fails the test."""
        codes = [(e.get("extensions") or {}).get("code") for e in self.errors]
        if "FORBIDDEN" in codes or "NOT_FOUND" in codes:
            return "FORBIDDEN" if "FORBIDDEN" in codes else "NOT_FOUND"
        if self.errors:
            return f"unexpected errors {self.errors}"
        value = (self.data or {}).get(name)
        if value is None:
            return "NOT_FOUND"  # a query's null: unknown, or not visible to the caller
        if isinstance(value, dict) and value.get("__typename") == "NotFoundError":
            return "NOT_FOUND"
        return None

    def shown(self) -> Any:
        return self.data, [{k: v for k, v in e.items() if k != "locations"} for e in self.errors]


class Caller:
    def __init__(self, server, token: str) -> None:
        transport = AIOHTTPTransport(url=server.http_url, headers={"Authorization": f"Bearer {token}"}, ssl=False)
        self.client = Client(transport=transport, fetch_schema_from_transport=False, execute_timeout=60)

    async def __aenter__(self) -> Caller:
        self.session = await self.client.connect_async()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close_async()

    async def __call__(self, text: str, variables: dict) -> Answer:
        request = gql(text)
        request.variable_values = variables
        try:
            return Answer(await self.session.execute(request), [])
        except TransportQueryError as e:
            return Answer(e.data, list(e.errors or []))


def _set(values: dict, path: str, value: Any) -> None:
    *steps, last = path.split(".")
    for step in steps:
        values = values[step]
    values[last] = value


def _paths(values: Any, wanted: set[str], at: str = "") -> list[str]:
    """Where `values` holds one of the `wanted` strings."""
    if isinstance(values, dict):
        return [p for k, v in values.items() for p in _paths(v, wanted, f"{at}.{k}" if at else k)]
    return [at] if isinstance(values, str) and values in wanted else []


def _merge(values: dict, extra: dict, subst: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict):
            _merge(values.setdefault(k, {}), v, subst)
        else:
            values[k] = subst.get(v, v) if isinstance(v, str) else v


# --- the team -------------------------------------------------------------------------------------

@dataclass
class Team:
    world: World
    tokens: dict[str, str]
    roles: dict[str, frozenset[str]]  # in the team's workspace: membership role and seat, and platform roles
    platform: dict[str, frozenset[str]]  # platform roles alone
    own: set[str]  # identities whose row the `own` entries touch (the creator started it)
    elsewhere: str  # the outsider's own workspace


async def _one(w: World, who: str, text: str, **variables) -> Any:
    async with http_client(w.server, w.tokens[who]) as api:
        out = await api(text, **variables)
    [value] = out.values()
    return value


ADD = ('mutation($ws: ID!, $email: String!, $role: Role!, $seat: Seat!) { addMember(input: {workspaceId: $ws, '
       'email: $email, role: $role, seat: $seat}) { __typename ... on Member { id } } }')
START = ('mutation($ws: ID!, $k: String!) { startGeneration(input: {workspaceId: $ws, modelKey: "test-video", '
         'idempotencyKey: $k}) { __typename ... on Generation { id } } }')


async def _team(w: World) -> Team:
    tokens = {"owner": w.tokens["owner"], "creator": w.tokens["creator"],
              "standard": w.tokens["standard"], "operator": w.tokens["operator"],
              "worker": w.tokens["worker"]}
    for who, role, seat in (("admin", "ADMIN", "STANDARD"), ("bm_creator", "BILLING_MANAGER", "CREATOR"),
                            ("bm_standard", "BILLING_MANAGER", "STANDARD")):
        email, tokens[who] = await new_user(w.db, prefix=who)
        added = await _one(w, "owner", ADD, ws=w.ws, email=email, role=role, seat=seat)
        assert added["__typename"] == "Member", added
    _, tokens["outsider"] = await new_user(w.db, prefix="outsider")
    async with http_client(w.server, tokens["outsider"]) as api:
        other = (await api('mutation { createWorkspace(input: {name: "Elsewhere", planKey: "starter"}) '
                           '{ __typename ... on Workspace { id } } }'))["createWorkspace"]
    assert other["__typename"] == "Workspace", other
    # Who holds what, as the API itself reports it.
    roles, platform = {}, {}
    for who, token in tokens.items():
        async with http_client(w.server, token) as api:
            me = (await api("{ viewer { kind isOperator workspaces { workspace { id } role seat } } }"))["viewer"]
        held = {"platform:operator"} if me["isOperator"] else set()
        held |= {"platform:service"} if me["kind"] == "SERVICE" else set()
        platform[who] = frozenset(held)
        for m in me["workspaces"]:
            if m["workspace"]["id"] == w.ws:
                held |= {f"role:{m['role'].lower()}", f"seat:{m['seat'].lower()}"}
        roles[who] = frozenset(held)
    assert roles["outsider"] == frozenset() and roles["worker"] == {"platform:service"}
    assert roles["bm_creator"] == {"role:billing_manager", "seat:creator"}
    return Team(w, tokens, roles, platform, {"creator"}, other["id"])


class Fresh:
    """A new target for a call that consumes it, made by the team's owner (or creator)."""

    def __init__(self, w: World) -> None:
        self.world = w

    async def __call__(self, kind: str) -> str:
        w = self.world
        if kind in ("member", "creator"):
            email, _ = await new_user(w.db, prefix="target")
            out = await _one(w, "owner", ADD, ws=w.ws, email=email, role="MEMBER",
                             seat="CREATOR" if kind == "creator" else "STANDARD")
        elif kind == "group":
            out = await _one(w, "owner", 'mutation($ws: ID!, $n: String!) { createBillingGroup(input: {workspaceId: '
                             '$ws, name: $n}) { __typename ... on BillingGroup { id } } }', ws=w.ws, n=w.unique("g"))
        elif kind == "limit":
            group = await self("group")
            out = await _one(w, "owner", 'mutation($ws: ID!, $g: ID!) { setSpendLimit(input: {workspaceId: $ws, '
                             'scope: GROUP, billingGroupId: $g, period: DAY, amount: "5"}) '
                             '{ __typename ... on SpendLimit { id } } }', ws=w.ws, g=group)
        elif kind == "request":
            out = await _one(w, "creator", 'mutation($ws: ID!) { requestOverage(input: {workspaceId: $ws, '
                             'amount: "10", reason: "authz"}) { __typename ... on OverageRequest { id } } }', ws=w.ws)
        elif kind == "generation":
            out = await _one(w, "creator", START, ws=w.ws, k=w.unique("authz"))
        else:
            raise AssertionError(kind)
        assert "id" in out, (kind, out)
        return out["id"]


# --- the test -------------------------------------------------------------------------------------

def test_every_mutation_and_query_field_is_classified():
    fields = {(op, name) for op in ("query", "mutation") for name in ROOTS[op].fields}
    assert sorted(fields - TABLE.keys()) == [], "classify the new field in TABLE (an Action, or a category)"
    assert sorted(TABLE.keys() - fields) == [], "TABLE names a field the schema no longer has"
    for (op, name), rule in TABLE.items():
        assert rule.action or rule.category, name
        assert rule.category in (None, SELF, ANY, PLATFORM), name
        assert rule.category is None or rule.reason, f"{name}: a category needs its reason"
        assert (rule.category is None) == (rule.key is not None), f"{name}: a workspace entry names its key"


@dataclass
class Planned:
    label: str
    operation: str
    name: str
    rule: Rule
    who: str
    variables: dict
    text: str
    twin: dict | None = None  # the outsider's call with a random id in place of the key
    # The outsider naming their own workspace and one of the team's rows (a member, a group...):
    # (that call, the same with a random id in place of the team's).
    crossed: list[tuple[dict, dict]] = field(default_factory=list)


async def test_the_api_allows_exactly_what_the_policy_allows(world):  # noqa: F811
    started = time.monotonic()
    team = await _team(world)
    authorizer = Authorizer()
    fresh = Fresh(world)
    subst = {"$ws": world.ws, "$member": world.member_id}
    # The team's own rows (not the workspace itself, nor the platform's packs or a user's token).
    team_rows = {v for k, v in world.ids.items() if k not in ("workspaceId", "id", "packId", "tokenId")}

    entries = [(f"{op} {name}", (op, name), rule) for (op, name), rule in TABLE.items()
               if rule.category in (None, PLATFORM)]
    entries += [(label, key, rule) for label, (key, rule) in VARIANTS.items()]

    async def plan(label: str, key: tuple[str, str], rule: Rule, who: str) -> Planned:
        op, name = key
        variables = materialize(world, baseline(world, name, ROOTS[op].fields[name].args))
        _merge(variables, copy.deepcopy(rule.variables), subst)
        if rule.fresh:
            _set(variables, rule.key, await fresh(rule.fresh))
        call = Planned(label, op, name, rule, who, variables, document(op, name, variables))
        if who == "outsider" and rule.key:
            twin = copy.deepcopy(call.variables)
            _set(twin, rule.key, str(uuid.uuid4()))
            call.twin = twin
            if rule.key.endswith("workspaceId"):
                for path in _paths(call.variables, team_rows):
                    mine = copy.deepcopy(call.variables)
                    _set(mine, rule.key, team.elsewhere)
                    unknown = copy.deepcopy(mine)
                    _set(unknown, path, str(uuid.uuid4()))
                    call.crossed.append((mine, unknown))
        return call

    # The fresh targets first (each made by the owner or the creator), then every call at once.
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(make: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await make()

    calls: list[Planned] = await asyncio.gather(*(
        gated(lambda e=e, who=who: plan(*e, who)) for e in entries for who in IDENTITIES))
    prepared = time.monotonic() - started

    def expected(call: Planned) -> bool:
        rule = call.rule
        if rule.category == PLATFORM:
            return authorizer.allows(call.who, team.platform[call.who], PLATFORM_DOMAIN, rule.action)
        roles = team.roles[call.who]
        if not roles:
            return False  # no relation to the workspace at all
        allowed = any(authorizer.allows(call.who, roles, world.ws, a) for a in (rule.action, *rule.also))
        if rule.own and call.who in team.own:
            allowed = allowed or authorizer.allows(call.who, roles, world.ws, Action.VIEW_WORKSPACE)
        return allowed

    failures: list[str] = []
    crossings: dict[str, Any] = {}
    outcomes: dict[str, int] = {}
    async with (Caller(world.server, team.tokens["owner"]) as c0, Caller(world.server, team.tokens["admin"]) as c1,
                Caller(world.server, team.tokens["bm_creator"]) as c2,
                Caller(world.server, team.tokens["bm_standard"]) as c3,
                Caller(world.server, team.tokens["creator"]) as c4, Caller(world.server, team.tokens["standard"]) as c5,
                Caller(world.server, team.tokens["operator"]) as c6, Caller(world.server, team.tokens["worker"]) as c7,
                Caller(world.server, team.tokens["outsider"]) as c8):
        callers = dict(zip(IDENTITIES, (c0, c1, c2, c3, c4, c5, c6, c7, c8), strict=True))

        async def run(call: Planned) -> None:
            answer = await gated(lambda: callers[call.who](call.text, call.variables))
            refusal = answer.refusal(call.name)
            want = expected(call)
            outcomes[f"{'allowed' if refusal is None else refusal}"] = outcomes.get(
                "allowed" if refusal is None else refusal, 0) + 1
            action = call.rule.action.value
            if refusal is not None and refusal not in ("FORBIDDEN", "NOT_FOUND"):
                failures.append(f"{call.label} as {call.who}: {refusal}")
            elif want and refusal is not None:
                failures.append(f"{call.label} as {call.who}: refused ({refusal}) although the policy allows "
                                f"{action} to {sorted(team.roles[call.who])}; {answer.shown()}")
            elif not want and refusal is None:
                failures.append(f"{call.label} as {call.who}: allowed although the policy refuses {action} to "
                                f"{sorted(team.roles[call.who])}; {answer.data}")
            if call.twin is not None:
                random_id = await gated(lambda: callers[call.who](call.text, call.twin))
                if answer.shown() != random_id.shown():
                    failures.append(f"{call.label} as the outsider: the team's id answers {answer.shown()}, "
                                    f"a random id {random_id.shown()}")
            for mine, unknown in call.crossed:
                crossed, random_id = [await gated(lambda v=v: callers[call.who](call.text, v)) for v in (mine, unknown)]
                if crossed.shown() != random_id.shown():
                    failures.append(f"{call.label} as the outsider in their own workspace, naming the team's row: "
                                    f"{crossed.shown()}, a random id {random_id.shown()}")
                crossings[call.label] = crossed.shown()

        await asyncio.gather(*(run(c) for c in calls))
    print(f"{len(entries)} entries x {len(IDENTITIES)} identities: {outcomes}; prepared in {prepared:.1f}s, "
          f"all in {time.monotonic() - started:.1f}s")
    for label, shown in sorted(crossings.items()):
        print(f"  crossed {label}: {shown}")
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(sorted(failures))
