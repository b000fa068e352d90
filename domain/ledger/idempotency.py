"""Exactly-once for credit-moving mutations (money rule 3).

The key row is inserted in the same transaction as the movement, with the id the result will
have. `INSERT ... ON CONFLICT DO NOTHING` makes a concurrent duplicate wait on the unique key
until the first transaction ends: if it committed, the duplicate reads its result; if it rolled
back (an expected failure such as insufficient credits, where nothing moved), the duplicate
runs afresh. Keys are scoped to (workspace, caller).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from domain.db import Sql, as_sql
from domain.errors import IdempotencyKeyReused, ValidationFailed

MAX_KEY = 200


def _canonical(value: Any) -> str:
    # A moment is the same request whatever offset it was written with ("...T01:00+01:00" is
    # "...T00:00Z"): in UTC, whose text is what hashes stored before this normalization used.
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return str(value)


def request_hash(operation: str, request: dict[str, Any]) -> bytes:
    canonical = json.dumps({"op": operation, **request}, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(canonical.encode()).digest()


def check_key(key: str) -> str:
    """A client's key. (Auto top-up claims none: its purchases are the system's, found by their
    payment reference, whose `auto-topup:` prefix `purchaseCredits` reserves.)"""
    key = key.strip()
    if not key or len(key) > MAX_KEY:
        raise ValidationFailed("idempotencyKey", f"must be 1 to {MAX_KEY} characters")
    return key


_FIRST = """
SELECT operation, request_hash, result_id FROM idempotency_keys
WHERE workspace_id = $1 AND actor_id = $2 AND key = $3
"""
_CLAIM = """
INSERT INTO idempotency_keys (workspace_id, actor_id, key, operation, request_hash, result_id)
VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING key
"""


def claim_sql(first: int, guard: str = "true") -> str:
    """Claims as part of a one-statement unit (`Database.autocommit`): six array parameters
    numbered from `$first` (the columns of `claim_args` rows), inserted only when `guard` holds.
    No ON CONFLICT: a used key aborts the whole statement with a unique violation, and the caller
    falls back to `claim` in a transaction, which answers the replay or refuses the reuse."""
    p = [f"${first + i}" for i in range(6)]
    return f"""INSERT INTO idempotency_keys (workspace_id, actor_id, key, operation, request_hash, result_id)
    SELECT c.* FROM unnest({p[0]}::uuid[], {p[1]}::uuid[], {p[2]}::text[], {p[3]}::text[], {p[4]}::bytea[],
                           {p[5]}::uuid[]) AS c
    WHERE {guard}
    RETURNING key"""


def claim_args(*, workspace_id: uuid.UUID, actor_id: uuid.UUID, key: str, operation: str, request: dict[str, Any],
               result_id: uuid.UUID) -> tuple:
    """One claim as a row of `claim_sql`'s columns."""
    return workspace_id, actor_id, key, operation, request_hash(operation, request), result_id


async def first_result(
    tx: AsyncSession | Sql, *, workspace_id: uuid.UUID, actor_id: uuid.UUID, key: str, operation: str,
    request: dict[str, Any],
) -> uuid.UUID | None:
    """Read-only look-up before any side effect (a payment provider call, a catalog check): the
    first result's id when this exact request already ran, None when the key is unused.
    Raises IdempotencyKeyReused when the key ran with a different request."""
    first = await as_sql(tx).fetchrow(_FIRST, workspace_id, actor_id, key)
    if first is None:
        return None
    if first["operation"] != operation or bytes(first["request_hash"]) != request_hash(operation, request):
        raise IdempotencyKeyReused()
    return first["result_id"]


async def claim(
    tx: AsyncSession | Sql,
    *,
    workspace_id: uuid.UUID,
    actor_id: uuid.UUID,
    key: str,
    operation: str,
    request: dict[str, Any],
    result_id: uuid.UUID,
) -> uuid.UUID | None:
    """Claim `key` for a new result `result_id`. Returns None when claimed (go ahead and do the
    work), or the first result's id when this exact request already ran. Raises
    IdempotencyKeyReused when the key ran with a different request."""
    sql = as_sql(tx)
    digest = request_hash(operation, request)
    if await sql.fetchrow(_CLAIM, workspace_id, actor_id, key, operation, digest, result_id) is not None:
        return None
    # The key exists: it committed before us, or we waited on its transaction until it did.
    return await first_result(sql, workspace_id=workspace_id, actor_id=actor_id, key=key, operation=operation,
                              request=request)
