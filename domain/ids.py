"""Ids for rows the hot path inserts all the time (generations)."""

from __future__ import annotations

import os
import time
import uuid


def time_ordered_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562 section 5.7): 48 bits of Unix time in milliseconds, then random bits.

    Why not uuid4: a random key lands on a random leaf page of every index on it (the
    generations' primary key, the ledger's generation index). On a large table each insert then
    dirties a page nobody touched since the last checkpoint, which costs a full-page image in the
    WAL; time-ordered ids append at the right edge instead. Issue 8's benchmark measured the
    difference. (Python's own `uuid.uuid7` arrives in 3.14.)"""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC variant (0b10)
    return uuid.UUID(int=value)
