"""Cursor pagination, and the ids that filter them, shared by the lists (ledger, generations,
audit log)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from domain.errors import ValidationFailed

MAX_PAGE = 200


def encode_cursor(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode()


def decode_cursor(cursor: str | None, kind: str) -> str | None:
    if cursor is None:
        return None
    try:
        prefix, _, value = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("after", "not a cursor from this list") from None
    if prefix != kind or not value:
        raise ValidationFailed("after", "not a cursor from this list")
    return value


def _not_ours() -> ValidationFailed:
    return ValidationFailed("after", "not a cursor from this list")


def decode_id_cursor(cursor: str | None, kind: str) -> int | None:
    """A cursor over a bigint id. Decoded before any query: a tampered value (not a number, or
    past bigint) is the same refusal as a foreign cursor, not an error from the database."""
    value = decode_cursor(cursor, kind)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > 2**63 - 1:
        raise _not_ours()
    return int(value)


def decode_time_cursor(cursor: str | None, kind: str) -> tuple[datetime, uuid.UUID] | None:
    """A cursor over (an aware time, a uuid), as `encode_cursor(kind, f"{at.isoformat()}|{id}")`."""
    value = decode_cursor(cursor, kind)
    if value is None:
        return None
    at_text, _, id_text = value.partition("|")
    try:
        at, row_id = datetime.fromisoformat(at_text), uuid.UUID(id_text)
        if at.tzinfo is None:
            raise ValueError("naive")
        at.astimezone(UTC)  # an instant outside the years PostgreSQL and Python share
    except (ValueError, OverflowError):
        raise _not_ours() from None
    return at, row_id


def parse_filter_id(value: str | None, argument: str) -> uuid.UUID | None:
    """An id that narrows a list (a member, an actor, a generation), absent when None. A malformed
    one is bad input, refused naming the argument: read as an unknown id (`access.parse_id`), its
    NotFound answered the whole list null, as for a workspace the caller may not see. A well-formed
    id that names nothing here narrows the list to nothing, and so says nothing about other
    workspaces."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValidationFailed(argument, "not a well-formed id") from None


def page_size(first: int) -> int:
    if not 1 <= first <= MAX_PAGE:
        raise ValidationFailed("first", f"must be between 1 and {MAX_PAGE}")
    return first


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    cursors: list[str]
    has_next_page: bool


