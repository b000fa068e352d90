"""Review of the edge of the API: bad input gets a clear, typed error and changes nothing. Each
test here first failed on the code it was written against (an INTERNAL error, or an input that
was quietly read as something else)."""

from __future__ import annotations

import base64

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


ASSIGN = """
mutation($m: ID!, $g: ID) {
  assignBillingGroup(input: {memberId: $m, groupId: $g}) { __typename ... on Member { billingGroupId } ... on Error { code message } }
}"""


async def test_an_empty_id_is_an_unknown_id_never_a_missing_one(db, client):
    # Optional ids were passed on only when truthy: "" (a client's unset text field) read as
    # null. A grant meant for a seat landed in the pool, an assignment took the member out of
    # its group, a creator's start "on behalf of" someone started for themselves.
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    creator, member = team.creators[0]
    async with client(team.operator) as api:
        out = (await api(GRANT, ws=team.ws, amount="5", key=key(), source="PROMOTION", priority=100,
                         member=""))["grantCredits"]
    assert (out["__typename"], out["message"]) == ("NotFoundError", "member not found"), out
    async with client(team.owner) as api:
        group = (await api('mutation($ws: ID!) { createBillingGroup(input: {workspaceId: $ws, name: "G"}) '
                           '{ ... on BillingGroup { id } } }', ws=team.ws))["createBillingGroup"]["id"]
        assert (await api(ASSIGN, m=member, g=group))["assignBillingGroup"]["billingGroupId"] == group
        out = (await api(ASSIGN, m=member, g=""))["assignBillingGroup"]
        assert (out["__typename"], out["message"]) == ("NotFoundError", "billing group not found"), out
        out = (await api(TRANSFER_TO, ws=team.ws, amount="1", key=key(), to=""))["transferCredits"]
        assert (out["__typename"], out["message"]) == ("NotFoundError", "member not found"), out
    async with client(creator) as api:
        out = (await api(START, ws=team.ws, model="sdxl", key=key(), **{"for": ""}))["startGeneration"]
    assert (out["__typename"], out["message"]) == ("NotFoundError", "member not found"), out
    async with client(team.owner) as api:
        members = (await api('query($ws: ID!) { workspace(id: $ws) { members { id billingGroupId } } }',
                             ws=team.ws))["workspace"]["members"]
    assert {m["id"]: m["billingGroupId"] for m in members}[member] == group
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"], len(b["grants"])) == ("100.000", "0.000", 1)


TRANSFER_TO = """
mutation($ws: ID!, $amount: String!, $key: String!, $to: ID) {
  transferCredits(input: {workspaceId: $ws, amount: $amount, idempotencyKey: $key, toMemberId: $to}) {
    __typename ... on Error { message code }
  }
}"""


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(("field", "cursor"), [
    ("auditLog", "audit:xyz"),
    ("auditLog", "audit:1e3"),
    ("ledger", "entry:99999999999999999999"),
    ("generations", "generation:0001-01-01T00:00:00+14:00|00000000-0000-0000-0000-000000000000"),
    ("generations", "generation:2025-01-01T00:00:00|00000000-0000-0000-0000-000000000000"),
])
async def test_a_tampered_cursor_is_refused_like_a_foreign_one(db, client, field, cursor):
    # A cursor is base64 the client can rewrite: its value went into int() or fromisoformat()
    # inside the query, and what slipped past (a word in an audit cursor, a number past bigint,
    # a time outside the years PostgreSQL shares with Python) answered INTERNAL.
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        error = await _refused(api, f'query($ws: ID!, $after: String) {{ {field}(workspaceId: $ws, after: $after) '
                                    '{ pageInfo { hasNextPage } } }', ws=team.ws, after=_cursor(cursor))
    assert (error["extensions"]["code"], error["message"]) == ("VALIDATION", "after: not a cursor from this list")


@pytest.mark.parametrize(("at", "why"), [
    ("0001-01-01T00:00:00+14:00", "year"), ("9999-12-31T23:59:59-14:00", "year"),
    ("2030-01-01T00:00:00", "time zone"), ("2030-01-01", "time zone"),
    ("0001-01-01T00:00:00Z", "-infinity"), ("9999-12-31T23:59:59.999999Z", "infinity"),
    ("9999-12-31T21:59:59.999999-02:00", "infinity"),
])
async def test_a_datetime_without_a_zone_or_outside_the_years_is_refused_where_it_is_parsed(db, client, at, why):
    # A DateTime whose UTC time falls outside year 1..9999 failed in the driver (INTERNAL, for
    # grantCredits, publishPriceList, and the ledger and audit filters); one without a zone was
    # read by the driver in the server's own time zone (a filter moved with the host's TZ).
    # The two ends of those years are written by the driver as -infinity and infinity and read
    # back naive: a grant expiring at the last microsecond made every later spend of its
    # workspace INTERNAL (test_edge_fuzz found it).
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        error = await _refused(api, 'query($ws: ID!, $at: DateTime) { ledger(workspaceId: $ws, filter: {since: $at}) '
                                    '{ pageInfo { hasNextPage } } }', ws=team.ws, at=at)
        assert "Value cannot represent a DateTime" in error["message"], error
        error = await _refused(api, 'query($ws: ID!, $at: DateTime) { auditLog(workspaceId: $ws, until: $at) '
                                    '{ pageInfo { hasNextPage } } }', ws=team.ws, at=at)
        assert "Value cannot represent a DateTime" in error["message"], error
    async with client(team.operator) as api:
        error = await _refused(api, GRANT, ws=team.ws, amount="5", key=key(), source="PROMOTION", priority=100,
                               expires=at)
        assert "Value cannot represent a DateTime" in error["message"], error
    assert (await balance(client, team.owner, team.ws))["grants"] == []


PUBLISH = """
mutation($input: PublishPriceListInput!) {
  publishPriceList(input: $input) { __typename ... on PriceList { version } ... on ValidationError { field message } }
}"""
PRICE_LISTS = "{ priceLists { version } }"


@pytest.mark.parametrize("spec", [{"limits": [1, 2]}, {"limits": "seconds"}, {"defaults": 5}, {"defaults": [0]},
                                  {"defaults": ""}],
                         ids=["list", "text", "number", "list-defaults", "empty-text"])
async def test_price_list_defaults_and_limits_that_are_no_object_are_refused(db, client, spec):
    # A model's defaults and limits are JSON: a list, a string or a number answered INTERNAL
    # (dict() of it), and a falsy one ("", 0, []) was silently dropped.
    team = await make_team(db, client, creators=0)
    model = {"modelKey": "edge-test", "displayName": "Edge", "vendor": "t", "modality": "VIDEO", "perSecond": "1",
             "defaults": {"seconds": 5}, "limits": {"seconds": 10}, **spec}
    async with client(team.operator) as api:
        before = (await api(PRICE_LISTS))["priceLists"][0]
        out = (await api(PUBLISH, input={"models": [model]}))["publishPriceList"]
        assert out["__typename"] == "ValidationError", out
        assert out["field"] == f"models.edge-test.{next(iter(spec))}", out
        assert (await api(PRICE_LISTS))["priceLists"][0] == before


@pytest.mark.parametrize("limit", [None, [10], {"max": 10}], ids=["null", "list", "object"])
async def test_a_price_list_limit_that_is_no_number_is_refused(db, client, limit):
    # A limit of null, a list or an object reached the money path's figure check, whose
    # TypeError (meant for a programming error) answered INTERNAL (test_edge_fuzz found it).
    team = await make_team(db, client, creators=0)
    model = {"modelKey": "edge-limit", "displayName": "Edge", "vendor": "t", "modality": "VIDEO", "perSecond": "1",
             "defaults": {"seconds": 5}, "limits": {"seconds": limit}}
    async with client(team.operator) as api:
        before = (await api(PRICE_LISTS))["priceLists"][0]
        out = (await api(PUBLISH, input={"models": [model]}))["publishPriceList"]
        assert (out["__typename"], out["field"]) == ("ValidationError", "models.edge-limit.limits.seconds"), out
        assert (await api(PRICE_LISTS))["priceLists"][0] == before


@pytest.mark.parametrize("where", ["workspace", "time window"])
async def test_a_timezone_name_too_long_for_a_file_is_an_unknown_timezone(db, client, where):
    # zoneinfo looks the name up as a file: one longer than a file name raised OSError, which
    # neither check caught (INTERNAL).
    team = await make_team(db, client, creators=0)
    zone = "Europe/" + "x" * 300
    if where == "workspace":
        async with client(team.owner) as api:
            out = (await api('mutation($ws: ID!, $tz: String) { updateWorkspace(input: {workspaceId: $ws, timezone: $tz}) '
                             '{ __typename ... on ValidationError { field message } } }', ws=team.ws, tz=zone))
        out = out["updateWorkspace"]
    else:
        window = {"name": "w", "start": "09:00", "end": "17:00", "multiplier": "2", "timezone": zone}
        model = {"modelKey": "edge-tz", "displayName": "Edge", "vendor": "t", "modality": "IMAGE", "base": "1"}
        async with client(team.operator) as api:
            out = (await api(PUBLISH, input={"models": [model], "timeWindows": [window]}))["publishPriceList"]
    assert (out["__typename"], out["field"]) == ("ValidationError", "timezone"), out


@pytest.mark.parametrize("periods_back", [0, -1, 121])
async def test_a_schedule_asked_for_periods_out_of_range_is_refused_not_clamped(db, client, periods_back):
    # It was answered as 1 (or 120) periods without a word, unlike every other range argument.
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        error = await _refused(api, 'query($ws: ID!, $n: Int!) { creditSchedule(workspaceId: $ws, periodsBack: $n) '
                                    '{ nextRenewalAt } }', ws=team.ws, n=periods_back)
        ok = await api('query($ws: ID!) { creditSchedule(workspaceId: $ws, periodsBack: 120) { breakage { expired } } }',
                       ws=team.ws)
    assert (error["extensions"]["code"], error["message"]) == ("VALIDATION", "periodsBack: must be between 1 and 120")
    assert ok["creditSchedule"]["breakage"] == []


CREATE = """
mutation($n: String!) { createWorkspace(input: {name: $n}) { __typename ... on ValidationError { field message } } }"""
GRANT_WITH_REASON = """
mutation($ws: ID!, $reason: String!, $key: String!) {
  grantCredits(input: {workspaceId: $ws, amount: "5", source: PROMOTION, reason: $reason, idempotencyKey: $key}) {
    __typename ... on Grant { reason } ... on ValidationError { field message } }
}"""


@pytest.mark.parametrize("hidden", ["\u202e", "\u2066", "\x1b[2J", "\x07"], ids=["rlo", "isolate", "escape", "bell"])
async def test_a_name_or_reason_that_would_display_as_something_else_is_refused(db, client, hidden):
    # "Invoice\u202egnp.exe" shows as "Invoiceexe.png" in a dashboard or an audit log: a name
    # or a reason people read must not reorder or hide what follows it.
    team = await make_team(db, client, creators=0)
    async with client(team.owner) as api:
        before = (await api(WORKSPACES))["viewer"]
        refused = (await api(CREATE, n=f"Invoice{hidden}gnp.exe"))["createWorkspace"]
        assert refused == {"__typename": "ValidationError", "field": "name",
                           "message": "name: must not contain control characters or bidirectional overrides"}
        assert (await api(WORKSPACES))["viewer"] == before
    async with client(team.operator) as api:
        refused = (await api(GRANT_WITH_REASON, ws=team.ws, reason=f"goodwill{hidden}", key=key()))["grantCredits"]
        assert (refused["__typename"], refused["field"]) == ("ValidationError", "reason")
        # A reason may still run over lines.
        kept = (await api(GRANT_WITH_REASON, ws=team.ws, reason="goodwill\nticket 42", key=key()))["grantCredits"]
        assert kept == {"__typename": "Grant", "reason": "goodwill\nticket 42"}
    assert (await balance(client, team.owner, team.ws))["available"] == "5.000"
