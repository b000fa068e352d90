"""Cursor pagination shared by the lists (ledger, generations, audit log)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
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


def page_size(first: int) -> int:
    if not 1 <= first <= MAX_PAGE:
        raise ValidationFailed("first", f"must be between 1 and {MAX_PAGE}")
    return first


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    cursors: list[str]
    has_next_page: bool


