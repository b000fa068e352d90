"""The Strawberry schema: merged per-concept types plus the extensions every request runs."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dateutil.parser
import strawberry
from graphql import ExecutionResult, GraphQLError, StringValueNode
from graphql.validation import ASTValidationRule, ValidationRule
from strawberry.extensions import (
    MaxAliasesLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.types.base_scalars import wrap_parser
from strawberry.types.scalar import ScalarDefinition
from strawberry.tools import merge_types
from strawberry.types.execution import PreExecutionError
from strawberry.types.graphql import OperationType

from api.catalog import CatalogMutation, CatalogQuery
from api.context import Context
from api.identity import IdentityMutation, IdentityQuery
from api.ledger import LedgerMutation, LedgerQuery
from api.governance import GovernanceMutation, GovernanceQuery
from api.live import Subscription
from api.periods import PeriodsMutation, PeriodsQuery
from api.workspaces import WorkspaceMutation, WorkspaceQuery
from domain.errors import DomainError, TopLevelError, ValidationFailed

SDL_PATH = Path(__file__).resolve().parent / "schema.graphql"
log = logging.getLogger("creditpool.graphql")

Query = merge_types(
    "Query", (IdentityQuery, WorkspaceQuery, CatalogQuery, LedgerQuery, PeriodsQuery, GovernanceQuery)
)
Mutation = merge_types(
    "Mutation",
    (IdentityMutation, WorkspaceMutation, LedgerMutation, CatalogMutation, PeriodsMutation, GovernanceMutation),
)


def _instant(value: str) -> datetime:
    # The parser Strawberry's own DateTime scalar uses (python-dateutil is its dependency, and
    # Strawberry is pinned), so every value it accepted with a zone is read the same.
    at = dateutil.parser.isoparse(value)
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("it needs a time zone: Z or an offset such as +02:00")
    utc = at.astimezone(UTC)  # OverflowError: outside the years Python (and so the driver) can hold in UTC
    if utc.replace(tzinfo=None) in (datetime.min, datetime.max):
        # asyncpg writes the first and the last microsecond of those years as PostgreSQL's
        # -infinity and infinity, and reads them back as naive datetimes.
        raise OverflowError("the first and the last microsecond of years 1..9999 are not stored as instants")
    return at


# Every DateTime input is an instant. A value without a zone was read in the server's own zone
# by the driver (a ledger or audit filter moved with the host's TZ), and one whose UTC time falls
# outside year 1..9999 (0001-01-01T00:00+14:00) failed in the driver as INTERNAL: both are refused
# where the value is parsed, like any other value that is no DateTime. So are the two ends of
# those years (0001-01-01T00:00Z, 9999-12-31T23:59:59.999999Z): stored as -infinity/infinity and
# read back naive, a grant expiring then made every later spend of its workspace INTERNAL.
AWARE_DATETIME = ScalarDefinition(
    name="DateTime", description="Date with time (isoformat), with a time zone (Z or an offset).",
    specified_by_url=None, serialize=datetime.isoformat,
    parse_value=wrap_parser(_instant, "DateTime", exceptions=(ValueError, OverflowError)), parse_literal=None,
    origin=datetime,
)


# What no text column can hold: PostgreSQL refuses NUL in text (and \u0000 in jsonb), and an
# unpaired surrogate is no Unicode character at all (asyncpg cannot even encode it).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_UNSTORABLE_MESSAGE = "text may not contain NUL characters or unpaired surrogates"


def unstorable_text(variables: dict[str, Any] | None) -> str | None:
    """The path of the first string in the variables (at any depth, JSON values and their keys
    included) that no text column can store, or None."""
    stack: list[tuple[str, Any]] = [(f"${name}", value) for name, value in (variables or {}).items()]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and _UNSTORABLE.search(k):
                    return path
                stack.append((f"{path}.{k}", v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def unstorable_refusal(variables: dict[str, Any] | None) -> GraphQLError | None:
    """The error refusing an operation whose variables carry text no column can store, or None."""
    where = unstorable_text(variables)
    if where is None:
        return None
    return GraphQLError(f"{where}: {_UNSTORABLE_MESSAGE}", extensions={"code": "VALIDATION", "field": where})


class StorableTextLiterals(ValidationRule):
    """The same refusal for string literals written in the document itself."""

    def enter_string_value(self, node: StringValueNode, *_args: Any) -> None:
        if _UNSTORABLE.search(node.value):
            self.report_error(GraphQLError(f"string literal: {_UNSTORABLE_MESSAGE}", node,
                                           extensions={"code": "VALIDATION"}))


class RequestRules(SchemaExtension):
    """What every operation gets besides the two caches, in one extension: Strawberry sets up
    every extension's hooks per request, which cost more than the work they do here (measured:
    BENCHMARKS.md).

    - Limits: the parser stops at `max_tokens` (as `MaxTokensLimiter` does), and validation adds
      the depth and alias rules (as `AddValidationRules` does).
    - Over a websocket, each operation runs on its own copy of the connection's context, which
      authenticates the token again: a token revoked while the socket is open stops working.
    - Public errors: authentication and authorization failures, an overloaded service, and
      expected domain failures raised where a field has no result union (a bad cursor in a
      query), become top-level errors with a `code` extension; any other exception from a
      resolver is masked (no SQL or stack text reaches a client) and logged. Request errors
      (syntax, validation, limits) pass through unchanged.
    - Text that no column can store (a NUL character, an unpaired surrogate), in a variable or a
      literal, refuses the whole operation before anything runs (code VALIDATION, HTTP 400):
      PostgreSQL would refuse it halfway through a transaction, which surfaced as INTERNAL. Over
      a websocket the variables are refused earlier still (`CreditpoolSchema.stream`).
    - A subscription posted over HTTP is refused the same way: they are served over websockets."""

    def __init__(self, max_tokens: int, rules: tuple[type[ASTValidationRule], ...]) -> None:
        self.max_tokens = max_tokens
        self.rules = rules

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        if isinstance(context.context, Context) and context.context.connection_params is not None:
            # Over a websocket, one context lives as long as the connection: authenticate anew.
            context.context = context.context.for_operation()
        context.parse_options["max_tokens"] = self.max_tokens
        # The same tuple for the same rules: the validation cache's key.
        context.validation_rules = context.validation_rules + self.rules
        refusal = unstorable_refusal(context.variables)
        if refusal is not None:
            # A result already set is what Strawberry returns instead of executing a query or a
            # mutation; a subscription ignores it, and is refused before this (`CreditpoolSchema.stream`).
            context.result = ExecutionResult(data=None, errors=[refusal])
        yield
        self._rewrite(context.result)

    def on_execute(self) -> Iterator[None]:
        # A subscription posted over HTTP would run its resolver as a plain field, which answers
        # INTERNAL: refused instead, as a request that cannot run (400), saying where they are served.
        context = self.execution_context
        if (context.operation_type is OperationType.SUBSCRIPTION and isinstance(context.context, Context)
                and context.context.connection_params is None):
            context.result = ExecutionResult(data=None, errors=[GraphQLError(
                "subscriptions are served over websockets (graphql-transport-ws), not over HTTP",
                extensions={"code": "VALIDATION"})])
        yield

    def on_stream_result(self, result) -> Iterator[None]:
        # Subscriptions (and operations over websockets) deliver results one by one.
        self._rewrite(result)
        yield None

    def _rewrite(self, result) -> None:
        if result is None or not getattr(result, "errors", None):
            return
        result.errors = [self._public(e) for e in result.errors]

    @staticmethod
    def _public(error: GraphQLError) -> GraphQLError:
        original = error.original_error
        if original is None or isinstance(original, GraphQLError):
            return error
        if isinstance(original, (TopLevelError, DomainError)):
            code, message = original.code, str(original)
        else:
            code, message = "INTERNAL", "Unexpected error."
        extensions = {"code": code}
        if isinstance(original, ValidationFailed):  # the argument it names, as the unstorable-text refusal gives it
            extensions["field"] = original.field
        return GraphQLError(
            message, nodes=error.nodes, source=error.source, positions=error.positions, path=error.path,
            original_error=None, extensions=extensions,
        )


class CreditpoolSchema(strawberry.Schema):
    async def stream(self, query: str | None, variable_values: dict[str, Any] | None = None, *args: Any,
                     **kwargs: Any) -> Any:
        # Every operation over a websocket comes here. Strawberry runs a subscription whatever
        # result an extension set before it (`RequestRules` refuses unstorable variables so), and
        # it ran: its resolver looked a NUL id up ("not found"), or one with the text in a
        # variable it does not use started streaming. Refused here first, as a pre-execution
        # error: the client gets an `error` message for the operation, and nothing starts.
        refusal = unstorable_refusal(variable_values)
        if refusal is None:
            return await super().stream(query, variable_values, *args, **kwargs)
        return _refused(refusal)

    def process_errors(self, errors: list[GraphQLError], execution_context=None) -> None:
        # Refused credentials and permissions are expected traffic, not server errors to log.
        expected = (TopLevelError, DomainError)
        super().process_errors([e for e in errors if not isinstance(e.original_error, expected)], execution_context)


async def _refused(error: GraphQLError) -> AsyncIterator[PreExecutionError]:
    yield PreExecutionError(data=None, errors=[error])


def build_schema(*, max_depth: int = 12, max_aliases: int = 15, max_tokens: int = 2000) -> strawberry.Schema:
    # The limiters' rule classes are built once: the validation cache is keyed by the rule
    # classes too, so fresh ones per request (the limiters' own factories) would never hit it.
    limit_rules = (
        *QueryDepthLimiter(max_depth=max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=max_aliases).validation_rules,
        StorableTextLiterals,
    )
    return CreditpoolSchema(
        scalar_overrides={datetime: AWARE_DATETIME},
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[
            # Factories: a fresh extension per request, sharing module-level caches
            # (parsing and validation are most of a small request's cost, measured).
            lambda: ParserCache(maxsize=256),
            lambda: ValidationCache(maxsize=256),
            lambda: RequestRules(max_tokens, limit_rules),
        ],
    )


def sdl() -> str:
    return build_schema().as_str() + "\n"
