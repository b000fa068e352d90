"""The edge of the whole API, fuzzed from the executable schema: bad input gets a clear, typed
error and changes nothing.

Every Query, Mutation and Subscription field of the schema the app serves is called with a valid
baseline input (argument types drive the values; ids come from a real team, so the valid paths
run too), then with one input value at a time replaced by a bad one from a fixed catalogue per
GraphQL type: malformed, empty, huge, unknown and foreign ids, NUL and lone surrogates, 1 MB
strings, numbers no amount is, clock times and time zones that are none, edge Ints, DateTimes at
the ends of time, JSON of the wrong shape (and each key of a JSON object given a value of the wrong
kind), tampered pagination cursors, unknown enum values, input objects and lists that are empty,
null or 5,000 items long. The field's own caller sends all of them; the other identities (owner,
operator, worker, creator, standard seat) a rotating sample.

Every answer: no HTTP 5xx and no error with code INTERNAL. A mutation that was refused (a top-level
error or an `Error` member of its result union) changed nothing: mutations run one at a time, and a
refused one must leave PostgreSQL's next transaction id where it was or, when something took one
(a row lock), every row of every table as it was. A mutation given an id that names nothing (empty,
a word, the nil uuid, another kind's id) is refused, never read as no id. Queries write nothing.
Each baseline succeeds (sent last, so that no valid call consumes what the bad ones should reach;
a baseline whose target a bad-but-accepted value already consumed, such as a member removed under
an upper-case id, counts as the valid path having run). Then the scheduler ticks a period later
and the ledger invariants hold.

A field added to the schema later is fuzzed with no change here; a required ID argument of a new
name needs its baseline in the `world` fixture (the test says which). Deterministic: a fixed
catalogue, no randomness, unique keys from a counter. Its own database and server, so nothing it
creates reaches another module's tests."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Self

import aiohttp
import asyncpg
import pytest
from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError, TransportServerError
from graphql import (
    GraphQLEnumType,
    GraphQLObjectType,
    get_named_type,
    is_input_object_type,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    is_required_argument,
)
from graphql.language import Lexer, Source, TokenKind, print_ast
from graphql.pyutils import Undefined
from graphql.utilities import ast_from_value, coerce_input_value

from api.schema import build_schema, unstorable_text
from api.settings import Settings
from domain.db import Database
from domain.ledger.invariants import check_ledger
from domain.periods.service import tick
from tests.conftest import (
    LiveServer,
    asyncpg_dsn,
    http_client,
    own_database,
    ws_client,
)
from tests.test_api_ledger import grant, make_team

SCHEMA = build_schema()._schema  # the graphql-core schema the app serves
ROOTS = {"query": SCHEMA.query_type, "mutation": SCHEMA.mutation_type, "subscription": SCHEMA.subscription_type}
MAX_TOKENS = Settings.model_fields["max_tokens"].default
ERROR_TYPES = frozenset(t.name for t in SCHEMA.get_implementations(SCHEMA.get_type("Error")).objects)
CONCURRENCY = 8
SUBSCRIPTION_WAIT = 1.0  # seconds a subscription may stay silent: it was accepted and is open

# Fields that cannot be fuzzed generically, and why. Keep it tiny.
EXCLUDED: dict[str, str] = {}

# Who calls each field (anyone else is mostly refused before the input is read). Default: the owner.
CALLER = {
    "quote": "creator", "startGeneration": "creator", "requestOverage": "creator",
    "completeGeneration": "worker", "failGeneration": "worker",
    "grantCredits": "operator", "createCreditPack": "operator", "setCreditPackActive": "operator",
    "publishPriceList": "operator", "createPlan": "operator",
}


# --- the bad-value catalogue --------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    label: str
    value: Any  # or a function (world, the valid value here) -> value
    heavy: bool = False  # costly to send: once per field and family, not at every place
    refused: bool = False  # a mutation must refuse it (where it may not be refused before running)


HUGE = "x" * 1_000_000
NIL_UUID = "00000000-0000-0000-0000-000000000000"


def _other_kind(world: World, value: Any) -> str:
    # A real id of another kind: the workspace's where something else is expected, else a member's.
    return world.member_id if value == world.ws else world.ws


def _respelled(world: World, value: Any) -> str:
    # The same uuid in braces and upper case: the same row, or refused; never INTERNAL.
    return "{" + (value if isinstance(value, str) and value else NIL_UUID).upper() + "}"


IDS = [
    Bad("empty", "", refused=True), Bad("blank", " ", refused=True), Bad("word", "not-an-id", refused=True),
    Bad("nil-uuid", NIL_UUID, refused=True), Bad("other-kind", _other_kind, refused=True),
    Bad("past-bigint", "9" * 30, refused=True), Bad("int", 12345678901234567890, refused=True),
    Bad("negative-int", -1, refused=True), Bad("respelled", _respelled), Bad("nul", "a\x00b"),
    Bad("lone-surrogate", "\udfff"), Bad("wrong-type", True), Bad("1MB", HUGE, heavy=True),
]
TEXT = [
    Bad("empty", ""), Bad("blank", "   "), Bad("nul", "a\x00b"), Bad("lone-surrogate", "a\ud800b"),
    Bad("controls", "\x01\x1f\x7f\r\n\t"), Bad("unicode", "é🙂\u202e\u200b"), Bad("10k", "y" * 10_000),
    Bad("wrong-type", {"a": 1}), Bad("1MB", HUGE, heavy=True),
]
# Where the valid value is a number (amounts, prices, multipliers).
NUMERIC_TEXT = [
    Bad("negative", "-1"), Bad("zero", "0"), Bad("exponent", "1e3"), Bad("nan", "NaN"), Bad("infinity", "Infinity"),
    Bad("too-precise", "0.0001"), Bad("past-bigint", "9" * 40), Bad("arabic-digits", "١٢"), Bad("underscore", "1_0"),
    Bad("hex", "0x10"), Bad("padded", " 1 "), Bad("plus", "+1"), Bad("number-not-text", 1),
]
# Where it is a clock time ("09:00"), or a time zone.
CLOCK_TEXT = [Bad("hour-24", "24:00"), Bad("minute-60", "09:60"), Bad("no-minutes", "9"), Bad("negative", "-01:00")]
ZONE_TEXT = [Bad("unknown-zone", "Mars/Olympus"), Bad("path", "../../../etc/passwd"), Bad("absolute", "/etc/localtime"),
             Bad("long-zone", "Europe/" + "z" * 300), Bad("lowercase", "utc")]
ZONES = {"UTC", "Europe/Berlin"}
INTS = [Bad("zero", 0), Bad("negative", -1), Bad("int-max", 2**31 - 1), Bad("int-min", -(2**31)),
        Bad("past-int32", 2**31), Bad("float", 1.5), Bad("text", "1")]
BOOLEANS = [Bad("text", "true"), Bad("number", 1)]
DATETIMES = [
    Bad("epoch", "1970-01-01T00:00:00Z"), Bad("first-instant", "0001-01-01T00:00:00Z"),
    Bad("near-first", "0001-01-01T00:00:00.000001Z"), Bad("last-instant", "9999-12-31T23:59:59.999999Z"),
    Bad("near-last", "9999-12-31T23:59:59Z"), Bad("far-offset", "2030-01-01T00:00:00+23:59"),
    Bad("no-zone", "2030-01-01T00:00:00"), Bad("date-only", "2030-01-01"), Bad("before-year-1", "0001-01-01T00:00:00+14:00"),
    Bad("no-such-day", "2030-02-30T00:00:00Z"), Bad("word", "tomorrow"), Bad("empty", ""), Bad("epoch-number", 1700000000),
]


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


JSONS = [
    Bad("list", [1, 2]), Bad("text", "text"), Bad("empty-text", ""), Bad("number", 7), Bad("true", True),
    Bad("empty-object", {}), Bad("nul-key", {"a\x00": 1}), Bad("deep", {"seconds": _deep(500)}, heavy=True),
    Bad("wide", {f"k{i}": i for i in range(5000)}, heavy=True),
]
# Where the valid value is a JSON object: each of its keys given a value of the wrong kind.
JSON_VALUES = [
    Bad("negative", -1), Bad("huge", 10**40), Bad("float", 1e308), Bad("nan", float("nan")), Bad("infinity", float("inf")),
    Bad("text", "many"), Bad("null", None), Bad("list", [1]), Bad("object", {"a": 1}), Bad("bool", True),
]
ENUMS = [Bad("unknown", "NOT_A_VALUE"), Bad("lowercase", lambda world, value: str(value or "x").lower()),
         Bad("number", 1)]
OBJECTS = [Bad("empty", {}), Bad("unknown-field", {"notAField": 1}), Bad("text", "text")]
LISTS = [Bad("empty", []), Bad("null-item", [None]),
         Bad("5000-items", lambda world, value: (value or [None]) * 5000, heavy=True)]
NULL = Bad("null", None)
SCALARS = {"ID": IDS, "Int": INTS, "Boolean": BOOLEANS, "DateTime": DATETIMES}


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def _cursor_text(value: Any) -> str | None:
    """The text inside a real cursor of a list ("entry:42", "generation:<time>|<uuid>"), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        text = base64.urlsafe_b64decode(value.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return text if re.fullmatch(r"[a-z]+:.+", text) else None


def _tampered_cursors(text: str) -> list[Bad]:
    """A cursor is base64 a client can rewrite: each part of its value replaced in turn."""
    kind, _, value = text.partition(":")
    parts = value.split("|")
    out = [Bad("cursor-other-kind", _cursor(f"other:{value}")), Bad("cursor-no-value", _cursor(f"{kind}:")),
           Bad("cursor-not-base64", "!!not base64!!"), Bad("cursor-not-utf8", base64.urlsafe_b64encode(b"\xff\xfe").decode())]
    for i in range(len(parts)):
        for label, bad in (("word", "xyz"), ("past-bigint", "9" * 30), ("negative", "-1"), ("exponent", "1e3"),
                           ("empty", ""), ("before-year-1", "0001-01-01T00:00:00+14:00"),
                           ("first-instant", "0001-01-01T00:00:00+00:00"), ("no-zone", "2025-01-01T00:00:00")):
            changed = [*parts[:i], bad, *parts[i + 1:]]
            out.append(Bad(f"cursor-part{i}-{label}", _cursor(f"{kind}:{'|'.join(changed)}")))
    return out


def _looks_numeric(value: Any) -> bool:
    try:
        Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        return False
    return True


def _with_key(key: str, bad: Any):
    return lambda world, valid: {**valid, key: bad}


def catalogue(type_: Any, value: Any) -> tuple[str, list[Bad]]:
    """The bad values relevant at an input place of `type_` whose valid value is `value`: the
    family they belong to, and the values."""
    named = get_named_type(type_)
    nullable = [NULL] if is_non_null_type(type_) else []  # null where a value is required
    inner = type_.of_type if is_non_null_type(type_) else type_
    if is_list_type(inner):
        return "list", LISTS + nullable
    if is_input_object_type(named):
        return "object", OBJECTS + nullable
    if isinstance(named, GraphQLEnumType):
        return "enum", ENUMS + nullable
    if named.name == "String":
        if _cursor_text(value):
            return "cursor", TEXT + _tampered_cursors(_cursor_text(value)) + nullable
        if isinstance(value, str) and re.fullmatch(r"\d\d:\d\d", value):
            return "clock", TEXT + CLOCK_TEXT + nullable
        if value in ZONES:
            return "zone", TEXT + ZONE_TEXT + nullable
        if isinstance(value, str) and _looks_numeric(value):
            return "numeric", TEXT + NUMERIC_TEXT + nullable
        return "text", TEXT + nullable
    if named.name == "JSON":
        keyed = [Bad(f"{key}:{bad.label}", _with_key(key, bad.value))
                 for key in (value if isinstance(value, dict) else {}) for bad in JSON_VALUES]
        return "json", JSONS + keyed
    if named.name in SCALARS:
        return named.name, SCALARS[named.name] + nullable
    raise AssertionError(f"no bad values for the input type {named.name}: add them to the catalogue")


# --- baselines: a valid input for every field ----------------------------------------------------

@dataclass
class World:
    server: LiveServer
    db: Database
    dsn: str
    ws: str
    member_id: str  # a creator's member id: the target of the member mutations
    tokens: dict[str, str]  # owner, operator, worker, creator, standard
    ids: dict[str, str] = field(default_factory=dict)  # "field.argument" or "argument" -> id
    cursors: dict[str, str] = field(default_factory=dict)  # list field -> a real cursor of it
    counter: int = 0

    def unique(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def id_for(self, field_name: str, arg: str) -> str:
        for name in (f"{field_name}.{arg}", arg):
            if name in self.ids:
                return self.ids[name]
        raise AssertionError(f"{field_name}: no baseline id for the required argument {arg!r}; name one in the "
                             f"world fixture (World.ids)")


class Unique:
    """A baseline string that must be new on every call (keys, references, emails)."""

    def __init__(self, prefix: str, suffix: str = "") -> None:
        self.prefix, self.suffix = prefix, suffix


STRINGS = {
    "idempotencyKey": Unique("key"), "paymentReference": Unique("pay"), "key": Unique("plan"),
    "email": Unique("fuzz", "@example.test"), "modelKey": "test-video", "planKey": "starter", "amount": "1",
    "credits": "10", "threshold": "10", "monthlyMaxCredits": "100", "multiplier": "1.5", "rateFactor": "0.5",
    "aboveMb": "10", "start": "09:00", "end": "17:00", "timezone": "UTC", "currency": "USD", "reason": "fuzz",
    "perSecond": "1", "perMb": "0.1", "name": "Fuzz",
}
INTS_BY_NAME = {"seatCap": 10, "priceMinor": 500, "monthlyMaxPurchases": 3, "first": 10, "periodsBack": 12}
ENUMS_BY_NAME = {"role": "MEMBER", "seat": "CREATOR", "source": "PROMOTION", "kind": "TECHNICAL", "modality": "VIDEO",
                 "scope": "MEMBER", "period": "MONTH", "action": "REQUIRE_APPROVAL"}
JSON_BY_NAME = {
    "parameters": {"seconds": 5, "resolution": "720p", "input_type": "text-to-video"}, "usage": {"seconds": 4},
    "defaults": {"seconds": 5, "resolution": "720p", "input_type": "text-to-video"}, "limits": {"seconds": 10},
}
DATETIMES_BY_NAME = {"since": "2020-01-01T00:00:00Z", "until": "2999-01-01T00:00:00+02:00"}
FUTURE = "2998-06-01T12:00:00Z"  # a price list effective then never prices anything here

# What the types alone do not make valid: {field: {argument path: value, or a function of the world}}.
OVERRIDES: dict[str, dict[str, Any]] = {
    "publishPriceList": {
        "input.models": lambda world: [{
            "modelKey": world.unique("fuzz-model"), "displayName": "Fuzz", "vendor": "fuzz", "modality": "VIDEO",
            "perSecond": "1", "perMb": "0.1", "resolutionTiers": [{"name": "720p", "multiplier": "1"}],
            "inputTypeMultipliers": [{"name": "text-to-video", "multiplier": "1"}],
            "fileTiers": [{"aboveMb": "10", "rateFactor": "0.5"}], "defaults": JSON_BY_NAME["defaults"],
            "limits": JSON_BY_NAME["limits"]}],
        "input.timeWindows": [{"name": "w", "start": "09:00", "end": "17:00", "multiplier": "1.5",
                               "timezone": "Europe/Berlin", "weekdays": [1, 2]}],
        "input.planMultipliers": [{"planKey": "starter", "multiplier": "1"}],
        "input.effectiveAt": FUTURE,
    },
    "setSpendLimit": {"input.memberId": lambda world: world.member_id},
    "transferCredits": {"input.amount": "1", "input.toMemberId": lambda world: world.member_id},
}


def baseline(world: World, field_name: str, args: dict) -> dict:
    """Required arguments, and optional input objects and lists (so that what is inside them is
    fuzzed too); optional scalars stay unset. A list's `after` is a real cursor of it."""
    values = {}
    for name, arg in args.items():
        if is_required_argument(arg) or _is_container(arg.type):
            values[name] = _value(world, field_name, name, name, arg.type)
    if "after" in args and field_name in world.cursors:
        values["after"] = world.cursors[field_name]
    for path, value in OVERRIDES.get(field_name, {}).items():
        _set(values, path.split("."), value(world) if callable(value) else copy.deepcopy(value))
    return values


def _is_container(type_: Any) -> bool:
    inner = type_.of_type if is_non_null_type(type_) else type_
    return is_list_type(inner) or is_input_object_type(inner)


def _value(world: World, field_name: str, path: str, name: str, type_: Any) -> Any:
    inner = type_.of_type if is_non_null_type(type_) else type_
    if is_list_type(inner):
        return [_value(world, field_name, path, name, inner.of_type)]
    if is_input_object_type(inner):
        return {fname: _value(world, field_name, f"{path}.{fname}", fname, f.type) for fname, f in inner.fields.items()
                if (is_non_null_type(f.type) and f.default_value is Undefined) or _is_container(f.type)}
    if isinstance(inner, GraphQLEnumType):
        return ENUMS_BY_NAME.get(name, next(iter(inner.values)))
    kind = inner.name
    if kind == "ID":
        return world.id_for(field_name, name)
    if kind == "String":
        return STRINGS.get(name, "fuzz")
    if kind == "Int":
        return INTS_BY_NAME.get(name, 1)
    if kind == "Boolean":
        return True
    if kind == "DateTime":
        return DATETIMES_BY_NAME.get(name, FUTURE)
    if kind == "JSON":
        return copy.deepcopy(JSON_BY_NAME.get(name, {}))
    raise AssertionError(f"{field_name}.{path}: no baseline for the type {kind}")


def _set(values: Any, path: list, value: Any) -> None:
    for step in path[:-1]:
        values = values[step]
    values[path[-1]] = value


def _get(values: Any, path: list) -> Any:
    for step in path:
        if isinstance(values, dict):
            values = values.get(step)
        elif isinstance(values, list) and isinstance(step, int) and step < len(values):
            values = values[step]
        else:
            return None
    return values


def places(args: dict, base: dict) -> list[tuple[list, Any]]:
    """Every input place of a field: each argument, each field of an input object (at any depth),
    each list and its first item. (path, type)."""
    out: list[tuple[list, Any]] = []

    def walk(path: list, type_: Any) -> None:
        out.append((path, type_))
        inner = type_.of_type if is_non_null_type(type_) else type_
        if is_list_type(inner) and isinstance(_get(base, path), list) and _get(base, path):
            walk([*path, 0], inner.of_type)
        elif is_input_object_type(inner) and isinstance(_get(base, path), dict):
            for fname, f in inner.fields.items():
                walk([*path, fname], f.type)

    for name, arg in args.items():
        walk([name], arg.type)
    return out


def materialize(world: World, value: Any) -> Any:
    """New unique strings for this call."""
    if isinstance(value, Unique):
        return world.unique(value.prefix) + value.suffix
    if isinstance(value, dict):
        return {k: materialize(world, v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(world, v) for v in value]
    return value


# --- documents ----------------------------------------------------------------------------------

def selection(type_: Any, depth: int, aliased: frozenset[str] | set[str] = frozenset()) -> str:
    """Every field that needs no argument, `depth` levels of objects deep."""
    named = get_named_type(type_)
    if is_leaf_type(named):
        return ""
    if isinstance(named, GraphQLObjectType):
        parts = ["__typename"]
        for name, f in named.fields.items():
            if any(is_required_argument(a) for a in f.args.values()):
                continue
            shown = f"{name}{named.name}: {name}" if name in aliased else name
            if is_leaf_type(get_named_type(f.type)):
                parts.append(shown)
            elif depth > 0:
                parts.append(f"{shown} {selection(f.type, depth - 1)}")
        return "{ " + " ".join(parts) + " }"
    # Members of a union may answer one name with different types (Generation.status and
    # GenerationAlreadySettled.status): those get an alias each.
    members = SCHEMA.get_possible_types(named)
    types: dict[str, set[str]] = {}
    for member in members:
        for name, f in member.fields.items():
            types.setdefault(name, set()).add(str(f.type))
    clashing = {name for name, seen in types.items() if len(seen) > 1}
    return "{ " + " ".join(["__typename"] + [f"... on {m.name} {selection(m, depth, clashing)}" for m in members]) + " }"


def _tokens(text: str) -> int:
    lexer, count = Lexer(Source(text)), 0
    while lexer.advance().kind != TokenKind.EOF:
        count += 1
    return count


def document(operation: str, field_name: str) -> str:
    """`operation($a: T! = default, ...) { field(a: $a) { what it answers, a few levels deep } }`,
    as deep as the token limit allows."""
    gql_field = ROOTS[operation].fields[field_name]
    defs = ", ".join(f"${n}: {a.type}" + ("" if a.default_value is Undefined else
                                          f" = {print_ast(ast_from_value(a.default_value, a.type))}")
                     for n, a in gql_field.args.items())
    call = ", ".join(f"{n}: ${n}" for n in gql_field.args)
    head = f"{operation}{f'({defs})' if defs else ''} {{ {field_name}{f'({call})' if call else ''} "
    for depth in (3, 2, 1, 0):
        text = head + selection(gql_field.type, depth) + " }"
        if _tokens(text) <= MAX_TOKENS:
            return text
    raise AssertionError(f"{field_name}: no selection fits the token limit")


def refused_before_running(variables: dict, args: dict) -> bool:
    """Whether the server refuses these variables before any resolver runs: they do not coerce
    to the argument types (the same graphql-core coercion, the same scalars), or they carry text
    no column can store (RequestRules)."""
    for name, arg in args.items():
        if name in variables:
            if coerce_input_value(variables[name], arg.type) is Undefined:
                return True
        elif is_non_null_type(arg.type) and arg.default_value is Undefined:
            return True
    return unstorable_text(variables) is not None


# --- calls and answers --------------------------------------------------------------------------

@dataclass
class Call:
    operation: str
    field: str
    who: str
    label: str  # "baseline", or "path=bad value"
    variables: dict
    early: bool  # refused before running (predicted)
    must_refuse: bool = False

    def __str__(self) -> str:
        shown = json.dumps(self.variables, default=str)
        return f"{self.operation} {self.field} as {self.who}, {self.label}: {shown[:300]}"


@dataclass
class Answer:
    data: Any
    errors: list
    status: str  # ok, refused, request-error (nothing ran), server-error

    @property
    def internal(self) -> bool:
        return self.status == "server-error" or any(
            (e.get("extensions") or {}).get("code") == "INTERNAL" or e.get("message") == "Unexpected error."
            for e in self.errors)


def classify(call: Call, data: Any, errors: list) -> Answer:
    if data is None:
        return Answer(None, errors, "request-error" if all(not e.get("path") for e in errors) else "refused")
    value = data.get(call.field)
    refused = (any(e.get("path") == [call.field] for e in errors)
               or (isinstance(value, dict) and value.get("__typename") in ERROR_TYPES))
    return Answer(data, errors, "refused" if refused else "ok")


def plan(world: World, operation: str, field_name: str, *, everyone: bool = True) -> list[Call]:
    """The field's caller: every relevant bad value at every place; a heavy one (1 MB, 5,000
    items, deep JSON) once per family, at rotating places. Then (`everyone`) the same values from
    every other identity: a rotating sample, about one per place each."""
    args = ROOTS[operation].fields[field_name].args
    who = CALLER.get(field_name, "owner")
    base = baseline(world, field_name, args)
    by_family: dict[str, list[tuple[list, list[Bad]]]] = {}
    for path, type_ in places(args, base):
        family, bads = catalogue(type_, _get(base, path))
        by_family.setdefault(family, []).append((path, bads))
    calls = []
    for spots in by_family.values():
        for path, bads in spots:
            calls += [_mutated(world, operation, field_name, who, base, path, bad) for bad in bads if not bad.heavy]
        heavy = {b.label: b for _, bads in spots for b in bads if b.heavy}
        for turn, bad in enumerate(heavy.values()):
            candidates = [path for path, bads in spots if bad in bads]
            calls.append(_mutated(world, operation, field_name, who, base, candidates[turn % len(candidates)], bad))
    return calls + (_others(world, calls, sum(len(spots) for spots in by_family.values())) if everyone else [])


def _mutated(world: World, operation: str, field_name: str, who: str, base: dict, path: list, bad: Bad) -> Call:
    variables = materialize(world, copy.deepcopy(base))
    value = bad.value(world, _get(variables, path)) if callable(bad.value) else bad.value
    _set(variables, path, value)
    args = ROOTS[operation].fields[field_name].args
    return Call(operation, field_name, who, ".".join(map(str, path)) + "=" + bad.label, variables,
                refused_before_running(variables, args), must_refuse=bad.refused and operation == "mutation")


def baseline_call(world: World, operation: str, field_name: str, who: str | None = None) -> Call:
    args = ROOTS[operation].fields[field_name].args
    variables = materialize(world, baseline(world, field_name, args))
    return Call(operation, field_name, who or CALLER.get(field_name, "owner"), "baseline", variables,
                refused_before_running(variables, args))


def _others(world: World, calls: list[Call], spots: int) -> list[Call]:
    ran = [c for c in calls if not c.early]  # the others are refused before anyone is asked
    stride = max(1, len(ran) // max(spots, 1))
    out = []
    for turn, who in enumerate(w for w in world.tokens if ran and w != ran[0].who):
        out += [Call(c.operation, c.field, who, c.label, c.variables, c.early, c.must_refuse)
                for c in ran[turn % stride::stride]]
    return out


class Sessions:
    """One gql session over HTTP per identity, and the HTTP status of every answer."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.statuses: Counter[int] = Counter()
        self.requests: dict[str, Any] = {}
        self.clients: list[Client] = []
        self.sessions: dict[str, Any] = {}

    async def __aenter__(self) -> Self:
        async def count(_session, _context, params) -> None:
            self.statuses[params.response.status] += 1

        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(count)
        for who, token in self.world.tokens.items():
            transport = AIOHTTPTransport(url=self.world.server.http_url, headers={"Authorization": f"Bearer {token}"},
                                         ssl=False, client_session_args={"trace_configs": [trace]})
            client = Client(transport=transport, fetch_schema_from_transport=False, execute_timeout=120)
            self.sessions[who] = await client.connect_async()
            self.clients.append(client)
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.close_async()

    async def send(self, call: Call, text: str) -> Answer:
        if text not in self.requests:
            self.requests[text] = gql(text)  # parsed once per document
        request = copy.copy(self.requests[text])
        request.variable_values = call.variables
        try:
            data, errors = await self.sessions[call.who].execute(request), []
        except TransportQueryError as e:
            data, errors = e.data, list(e.errors or [])
        except TransportServerError as e:
            return Answer(None, [{"message": str(e), "status": e.code}], "server-error")
        return classify(call, data, errors)


async def subscribe(api: Any, call: Call, text: str) -> Answer:
    """The first message of a subscription; silence for a while means it was accepted and is open."""
    request = gql(text)
    request.variable_values = call.variables

    async def first() -> Any:
        async for result in api.session.subscribe(request):
            return result

    try:
        return classify(call, await asyncio.wait_for(first(), SUBSCRIPTION_WAIT), [])
    except TimeoutError:
        return Answer({call.field: "open"}, [], "ok")
    except TransportQueryError as e:
        return classify(call, e.data, list(e.errors or []))


# --- what changed -------------------------------------------------------------------------------

class Fingerprint:
    """PostgreSQL's next transaction id (a request that took none wrote nothing), and every row of
    every table (but a token's last use, which any request may refresh)."""

    def __init__(self, conn: asyncpg.Connection, tables: list[str]) -> None:
        self.conn, self.tables = conn, tables
        self.sql = "SELECT ARRAY[" + ", ".join(
            f"(SELECT count(*) || ':' || coalesce(sum(hashtext((to_jsonb(t) - 'last_used_at')::text)), 0) FROM {name} t)"
            for name in tables) + "]"

    @classmethod
    async def open(cls, dsn: str) -> Fingerprint:
        conn = await asyncpg.connect(dsn)
        tables = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                                  "AND table_type = 'BASE TABLE' AND table_name <> 'alembic_version' ORDER BY 1")
        return cls(conn, [r["table_name"] for r in tables])

    async def xid(self) -> str:
        return await self.conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")

    async def rows(self) -> dict[str, str]:
        return dict(zip(self.tables, await self.conn.fetchval(self.sql), strict=True))


class Unchanged:
    """Runs mutations one at a time and names the tables a refused one changed."""

    def __init__(self, fingerprint: Fingerprint) -> None:
        self.fingerprint = fingerprint
        self.known: tuple[str, dict[str, str]] = ("", {})

    async def around(self, send) -> tuple[Answer, list[str]]:
        xid = await self.fingerprint.xid()
        if xid != self.known[0]:
            self.known = (xid, await self.fingerprint.rows())
        answer = await send()
        after = await self.fingerprint.xid()
        if after == xid:
            return answer, []
        rows = await self.fingerprint.rows()
        changed = [t for t in rows if rows[t] != self.known[1][t]]
        self.known = (after, rows)
        return answer, changed


# --- the world: one real team and everything the baselines point at -----------------------------

@pytest.fixture(scope="module")
async def world(pg_server):
    async with own_database(pg_server, "creditpool_fuzz") as (url, db):
        server = LiveServer(url, db_pool_size=5)
        server.start()
        try:
            yield await _populate(server, db, asyncpg_dsn(url))
        finally:
            server.stop()


async def _populate(server: LiveServer, db: Database, dsn: str) -> World:
    def client(token):
        return http_client(server, token)

    team = await make_team(db, client, creators=3)
    (creator, _), (_, removed), (_, changed) = team.creators
    await grant(client, team, "100000")
    world = World(server, db, dsn, team.ws, changed, {
        "owner": team.owner, "operator": team.operator, "worker": team.worker, "creator": creator,
        "standard": team.standard[0]})

    async def ask(who: str, text: str, **variables) -> str:
        async with client(world.tokens[who]) as api:
            out = await api(text, ws=team.ws, **variables) if "$ws" in text else await api(text, **variables)
        [value] = out.values()
        while isinstance(value, dict) and "id" not in value:
            [value] = value.values()
        return value["id"] if isinstance(value, dict) else value

    pack = await ask("operator", 'mutation { createCreditPack(input: {name: "Fuzz", credits: "100", priceMinor: 500}) '
                                 '{ ... on CreditPack { id } } }')
    group, archived = [await ask("owner", 'mutation($ws: ID!, $n: String!) { createBillingGroup(input: {workspaceId: $ws, '
                                          'name: $n}) { ... on BillingGroup { id } } }', n=n) for n in ("Kept", "Archived")]
    token = await ask("owner", 'mutation { createApiToken(input: {name: "fuzz"}) { ... on CreatedApiToken { token { id } } } }')
    limit = await ask("owner", 'mutation($ws: ID!, $g: ID!) { setSpendLimit(input: {workspaceId: $ws, scope: GROUP, '
                               'billingGroupId: $g, period: DAY, amount: "5"}) { ... on SpendLimit { id } } }', g=group)
    await ask("owner", 'mutation($ws: ID!) { setSpendLimit(input: {workspaceId: $ws, scope: WORKSPACE, period: MONTH, '
                       'amount: "100000", action: REQUIRE_APPROVAL}) { __typename } }')
    await ask("owner", 'mutation($ws: ID!, $p: ID!) { setAutoTopUp(input: {workspaceId: $ws, enabled: false, threshold: "1", '
                       'packId: $p, monthlyMaxPurchases: 1, monthlyMaxCredits: "100"}) { __typename } }',
              p=pack)
    # A low-balance threshold above the balance: the first spend opens an alert.
    await ask("owner", 'mutation($ws: ID!) { setAlertSettings(input: {workspaceId: $ws, lowBalanceThreshold: "1000000"}) '
                       '{ __typename } }')
    request = await ask("creator", 'mutation($ws: ID!) { requestOverage(input: {workspaceId: $ws, amount: "10", '
                                   'reason: "fuzz"}) { ... on OverageRequest { id } } }')
    generations = [await ask("creator", 'mutation($ws: ID!, $k: String!) { startGeneration(input: {workspaceId: $ws, '
                                        'modelKey: "test-video", idempotencyKey: $k}) { ... on Generation { id } } }',
                             k=f"setup-{i}") for i in range(3)]
    alert = await ask("owner", 'query($ws: ID!) { alerts(workspaceId: $ws) { id } }')
    world.ids.update({
        "workspaceId": team.ws, "id": team.ws, "generation.id": generations[0], "memberId": changed,
        "removeMember.memberId": removed, "packId": pack, "groupId": group, "archiveBillingGroup.groupId": archived,
        "tokenId": token, "limitId": limit, "requestId": request, "alertId": alert[0]["id"],
        "completeGeneration.generationId": generations[1], "failGeneration.generationId": generations[2],
    })
    # A real cursor of every list that pages.
    for name, f in ROOTS["query"].fields.items():
        if "after" in f.args:
            variables = baseline(world, name, f.args)
            async with client(team.owner) as api:
                page = (await api(f"query($ws: ID!) {{ {name}(workspaceId: $ws, first: 1) {{ pageInfo {{ endCursor }} }} }}",
                                  ws=variables["workspaceId"]))[name]
            assert page["pageInfo"]["endCursor"], f"{name}: an empty first page has no cursor to tamper with"
            world.cursors[name] = page["pageInfo"]["endCursor"]
    return world


# --- the test -----------------------------------------------------------------------------------

def fields(operation: str) -> list[str]:
    return [name for name in ROOTS[operation].fields if name not in EXCLUDED]


async def test_every_field_refuses_bad_input_cleanly_and_changes_nothing(world):
    started = time.monotonic()
    failures: list[str] = []
    outcomes: Counter[str] = Counter()
    fingerprint = await Fingerprint.open(world.dsn)
    unchanged = Unchanged(fingerprint)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    def check(call: Call, answer: Answer, changed: list[str] = ()) -> None:
        outcomes[answer.status] += 1
        if answer.internal:
            failures.append(f"INTERNAL: {call}\n    -> {answer.errors}")
        elif call.early and answer.status != "request-error":
            failures.append(f"ran although its variables do not coerce: {call}\n    -> {answer.data} {answer.errors}")
        elif call.must_refuse and answer.status == "ok":
            failures.append(f"accepted an id that names nothing: {call}\n    -> {answer.data}")
        if changed and answer.status != "ok":
            failures.append(f"refused, yet changed {changed}: {call}\n    -> {answer.data} {answer.errors}")

    async def at_once(calls: list[tuple[Call, str]], sessions: Sessions) -> list[Answer]:
        async def one(call: Call, text: str) -> Answer:
            async with semaphore:
                answer = await sessions.send(call, text)
            check(call, answer)
            return answer

        return await asyncio.gather(*(one(c, t) for c, t in calls))

    try:
        async with Sessions(world) as sessions:
            # 1. Queries, all at once; together they write nothing. Each field's baseline as
            # every identity (its own caller's must answer without an error).
            before = await fingerprint.rows()
            calls: list[tuple[Call, str]] = []
            for name in fields("query"):
                text = document("query", name)
                calls += [(baseline_call(world, "query", name, who), text) for who in world.tokens]
                calls += [(c, text) for c in plan(world, "query", name)]
            answers = await at_once(calls, sessions)
            for (call, _), answer in zip(calls, answers, strict=True):
                if call.label == "baseline" and call.who == CALLER.get(call.field, "owner") and (
                        answer.status != "ok" or answer.errors):
                    failures.append(f"baseline refused: {call}\n    -> {answer.data} {answer.errors}")
            after = await fingerprint.rows()
            if before != after:
                failures.append(f"queries changed {[t for t in before if before[t] != after[t]]}")
            print(f"queries: {len(calls)} calls, {time.monotonic() - started:.1f}s")

            # 2. Subscriptions over one websocket, all at once.
            async with ws_client(world.server, world.tokens["owner"]) as api:
                calls = [(c, document("subscription", name)) for name in fields("subscription")
                         for c in [baseline_call(world, "subscription", name),
                                   *plan(world, "subscription", name, everyone=False)]]
                answers = await asyncio.gather(*(subscribe(api, c, t) for c, t in calls))
            for (call, _), answer in zip(calls, answers, strict=True):
                check(call, answer)
                if call.label == "baseline" and answer.status != "ok":
                    failures.append(f"baseline refused: {call}\n    -> {answer.data} {answer.errors}")
            print(f"subscriptions: {len(calls)} calls, {time.monotonic() - started:.1f}s")

            # 3. Mutations with bad values: those refused before running all at once, the others
            # one at a time, each checked for what it changed.
            accepted: dict[str, list[str]] = {}
            count = 0
            for name in fields("mutation"):
                text = document("mutation", name)
                planned = plan(world, "mutation", name)
                count += len(planned)
                await at_once([(c, text) for c in planned if c.early], sessions)
                for call in (c for c in planned if not c.early):
                    answer, changed = await unchanged.around(lambda: sessions.send(call, text))  # noqa: B023
                    check(call, answer, changed)
                    if answer.status == "ok":
                        accepted.setdefault(name, []).append(f"{call.who}: {call.label}")
            print(f"mutations: {count} calls, {time.monotonic() - started:.1f}s")

            # 4. The baselines, last, each in its own caller's name. One refused because a bad
            # value that was accepted consumed its target first (a member removed under an
            # upper-case id, a request approved) still had its valid path run.
            for name in fields("mutation"):
                call = baseline_call(world, "mutation", name)
                answer, _ = await unchanged.around(lambda: sessions.send(call, document("mutation", name)))  # noqa: B023
                check(call, answer)
                if answer.status != "ok" and name not in accepted:
                    failures.append(f"baseline refused: {call}\n    -> {answer.data} {answer.errors}")
            server_errors = {status: n for status, n in sessions.statuses.items() if status >= 500}
            if server_errors:
                failures.append(f"HTTP 5xx answers: {server_errors}")
    finally:
        await fingerprint.conn.close()

    # What was accepted still works: the scheduler a period later, and the ledger adds up.
    world.server.clock.offset = timedelta(days=40)
    try:
        await tick(world.db, world.server.clock, hold_ttl=timedelta(hours=1))
    finally:
        world.server.clock.offset = timedelta(0)
    assert await check_ledger(world.db) == []
    print(f"{dict(outcomes)}, {time.monotonic() - started:.1f}s")
    for name, labels in accepted.items():  # worth a look when something fails
        print(f"accepted by {name}: {', '.join(labels)}")
    kinds = Counter(f.split(":")[0] for f in failures)
    shown = [f for kind in kinds for f in [f for f in failures if f.startswith(kind)][:10]]
    assert not failures, f"{len(failures)} failures {dict(kinds)}, the first of each kind:\n" + "\n".join(shown)
