"""Coalescing: concurrent one-statement writes for the same key go to the database together.

A busy pool's grant row takes one commit per reservation otherwise, and a commit on one row is
the ceiling issue 8 measures (DESIGN.md: ~2,800 reservations/s one by one, ~24,000 holds/s ten
to a commit). This is natural batching, with no timer: while one batch for a key is being
written, the items that arrive for that key queue; when it returns, the first of them writes
the queue as the next batch, on its own connection. At low load a batch is one item and waits for
nothing; under load a batch is whatever arrived during the previous write.

The batch is written by one caller-supplied function, as ONE statement: it commits whole or not at
all. When it fails, the leader gets the exception and every other item `BatchFailed`, and each
caller decides what that means (the generation hot path answers each item on its own through
the transaction path).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")


class BatchFailed(Exception):
    """The batch an item was written in failed (its cause is the leader's exception, which may be
    about another item, or the leader's request being cancelled). Nothing of the batch was
    written, unless the statement committed just before a cancellation: answer the item on its
    own (idempotency keys make that safe either way)."""


@dataclass(slots=True)
class _Waiting(Generic[I]):
    item: I
    # Resolves to the item's result, or to a `_Lead` (write the batch yourself), or fails with the
    # batch's exception.
    turn: asyncio.Future


@dataclass(slots=True)
class _Lead(Generic[I]):
    batch: list[_Waiting[I]]


class Coalescer(Generic[I, R]):
    """Batches per key; `write(conn, items)` returns one result per item, in order."""

    def __init__(self, write: Callable[[Any, list[I]], Awaitable[list[R]]], *, max_batch: int = 64) -> None:
        self._write = write
        self._max_batch = max_batch
        # key -> the items waiting for the batch being written (present while one is)
        self._queues: dict[Hashable, list[_Waiting[I]]] = {}
        self.batches = 0  # written so far, and how many items they carried (for tests and the bench)
        self.items = 0

    async def submit(self, key: Hashable, conn: Any, item: I) -> R:
        """Write `item` in a batch for `key`; `conn` is the caller's, used if it leads a batch."""
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = []
            mine = _Waiting(item, asyncio.get_running_loop().create_future())
            return await self._lead(key, conn, [mine])
        mine = _Waiting(item, asyncio.get_running_loop().create_future())
        queue.append(mine)
        try:
            turn = await mine.turn
        except asyncio.CancelledError:
            # Cancelled while waiting. If the lead had just been handed to us, pass it on, or the
            # key's queue would wait forever.
            if mine.turn.done() and not mine.turn.cancelled() and isinstance(mine.turn.result(), _Lead):
                self._give_lead(key, [w for w in mine.turn.result().batch if w is not mine])
            raise
        if isinstance(turn, _Lead):
            return await self._lead(key, conn, turn.batch)
        return turn

    async def _lead(self, key: Hashable, conn: Any, batch: list[_Waiting[I]]) -> R:
        # The leader is the first of its batch.
        try:
            results = await self._write(conn, [w.item for w in batch])
        except BaseException as exc:
            for w in batch[1:]:
                if not w.turn.done():
                    failed = BatchFailed()
                    failed.__cause__ = exc
                    w.turn.set_exception(failed)
            raise
        finally:
            self._give_lead(key, [])
        self.batches += 1
        self.items += len(batch)
        for w, result in zip(batch[1:], results[1:]):
            if not w.turn.done():
                w.turn.set_result(result)
        return results[0]

    def _give_lead(self, key: Hashable, batch: list[_Waiting[I]]) -> None:
        """The lead moves on: to the first of `batch` still waiting, else to the queue (what
        arrived during the last write becomes the next batch), else nobody leads `key`."""
        batch = [w for w in batch if not w.turn.done()]  # cancelled while waiting: not written
        if not batch:
            queue = [w for w in self._queues.pop(key) if not w.turn.done()]
            if not queue:
                return
            batch, rest = queue[: self._max_batch], queue[self._max_batch:]
            self._queues[key] = rest
        batch[0].turn.set_result(_Lead(batch))
