"""The coalescer's batching and hand-over (domain/coalescing.py), driven by a writer that waits
for the test: which items go together, and that a cancelled waiter never stalls a key. And the
time-ordered ids the coalesced inserts append with (domain/ids.py)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from domain.coalescing import BatchFailed, Coalescer
from domain.ids import time_ordered_id


class Writer:
    """Records each batch and finishes it when the test says so."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release: list[asyncio.Event] = []
        self.fail_next: Exception | None = None

    async def __call__(self, conn, items):
        self.batches.append(list(items))
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return [f"{item} by {conn}" for item in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def one_writing_two_waiting(c: Coalescer):
    """Item a's batch being written on connection 1; b and d queued behind it."""
    a = asyncio.ensure_future(c.submit("w", 1, "a"))
    await settle()
    b, d = asyncio.ensure_future(c.submit("w", 2, "b")), asyncio.ensure_future(c.submit("w", 3, "d"))
    await settle()
    return a, b, d


async def written_at_once(c: Coalescer, write: Writer, item: str) -> None:
    """Nobody leads "w": a new item is written alone, at once, on its own connection."""
    done = asyncio.ensure_future(c.submit("w", 9, item))
    await settle()
    assert write.batches[-1] == [item]
    write.release[-1].set()
    assert await done == f"{item} by 9"


async def test_items_that_arrive_during_a_write_go_together_led_by_the_first_and_keys_do_not_mix():
    write = Writer()
    c = Coalescer(write)
    a = asyncio.ensure_future(c.submit("w1", "conn-a", "a"))
    await settle()
    b, d = asyncio.ensure_future(c.submit("w1", "conn-b", "b")), asyncio.ensure_future(c.submit("w1", "conn-d", "d"))
    other = asyncio.ensure_future(c.submit("w2", "conn-x", "x"))  # another key: its own batch at once
    await settle()
    assert write.batches == [["a"], ["x"]]
    write.release[0].set()
    assert await a == "a by conn-a"
    await settle()
    assert write.batches[2] == ["b", "d"]  # the queue, written on the first waiter's connection
    write.release[2].set()
    write.release[1].set()
    assert (await b, await d, await other) == ("b by conn-b", "d by conn-b", "x by conn-x")
    assert (c.batches, c.items) == (3, 4)
    # Nobody leads now: the next item is written at once.
    e = asyncio.ensure_future(c.submit("w1", "conn-e", "e"))
    await settle()
    write.release[3].set()
    assert await e == "e by conn-e"


async def test_a_failed_batch_fails_the_leader_with_its_error_and_the_others_with_batch_failed():
    write = Writer()
    c = Coalescer(write)
    a, b, d = await one_writing_two_waiting(c)
    write.release[0].set()
    await a
    await settle()
    write.fail_next = ValueError("a grant's CHECK")
    write.release[1].set()
    with pytest.raises(ValueError):
        await b
    with pytest.raises(BatchFailed) as failed:
        await d
    assert isinstance(failed.value.__cause__, ValueError)
    await written_at_once(c, write, "f")  # the key is free again


async def test_a_waiter_cancelled_in_the_queue_is_not_written():
    write = Writer()
    c = Coalescer(write)
    a, b, d = await one_writing_two_waiting(c)
    b.cancel()
    await settle()
    write.release[0].set()
    await a
    await settle()
    assert write.batches[1] == ["d"]  # d leads the next batch, alone
    write.release[1].set()
    assert await d == "d by 3"
    assert b.cancelled()


class CancelledOnHandOver(Coalescer):
    """Cancels a chosen task right after the lead is handed to it, before it can run."""

    victim: asyncio.Task | None = None

    def _give_lead(self, key, batch):
        super()._give_lead(key, batch)
        if self.victim is not None:
            self.victim.cancel()
            self.victim = None


async def test_a_waiter_cancelled_just_after_being_handed_the_lead_passes_it_on():
    write = Writer()
    c = CancelledOnHandOver(write)
    a, b, d = await one_writing_two_waiting(c)
    c.victim = b
    write.release[0].set()
    await a
    await settle()
    assert b.cancelled()
    assert write.batches[1] == ["d"]  # the lead went on to d, with only its own item
    write.release[1].set()
    assert await d == "d by 3"
    await written_at_once(c, write, "e")  # and the key is not stalled afterwards


async def test_generation_ids_are_uuid7_ordered_by_their_millisecond():
    ids = [time_ordered_id() for _ in range(1000)]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == 1000
    assert abs((ids[0].int >> 80) - time.time() * 1000) < 5_000  # the leading 48 bits: Unix ms
    await asyncio.sleep(0.002)
    later = time_ordered_id()
    assert all(i < later for i in ids)  # a later millisecond sorts after, in PostgreSQL too
