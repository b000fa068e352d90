"""Database access: the engine, and the one place that commits.

Every service that writes calls `Database.transaction(work)`. It opens a session, runs `work`
inside one transaction, commits, and retries the whole unit on a serialization failure or a
deadlock (bounded, with jitter). Nothing else in the code base commits.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from domain.events import EventOutlet, NoOutlet

T = TypeVar("T")
log = logging.getLogger("creditpool.db")

# SQLSTATEs worth retrying a whole transaction for: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def is_retryable(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return sqlstate in RETRYABLE_SQLSTATES


def async_url(url: str) -> str:
    """Accept the usual `postgresql://` and `postgres://` spellings; SQLAlchemy needs the driver."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


class Database:
    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20, attempts: int = 5) -> None:
        self.url = async_url(url)
        self.engine: AsyncEngine = create_async_engine(
            # No pre-ping: it costs a round trip per checkout on the hot path. A dead connection
            # fails its statement, is discarded by the pool, and the request reports an error.
            self.url, pool_size=pool_size, max_overflow=max_overflow, pool_recycle=1800
        )
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=True)
        self._attempts = attempts
        self.events: EventOutlet = NoOutlet()  # the app plugs its broadcaster in

    async def transaction(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` in one transaction and commit it: the one place that commits."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=0.005, max=0.2),
            reraise=True,
        ):
            with attempt:
                async with self._sessions() as session:
                    async with session.begin():
                        value = await work(session)
                        events = session.info.pop("events", [])
                        if events:
                            await self.events.before_commit(session, events)
                    if events:
                        await self._after_commit(events)
                    return value
        raise AssertionError("unreachable")  # pragma: no cover

    async def _after_commit(self, events) -> None:
        # The transaction is committed whatever happens here: a failed publish must not turn a
        # success into an error. Balance subscribers re-read on their own schedule as well.
        try:
            await self.events.after_commit(events)
        except Exception:  # noqa: BLE001
            log.warning("publishing %d events after commit failed", len(events), exc_info=True)

    async def read(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run `work` without committing: closing the session rolls the connection back (and,
        unlike `rollback()`, leaves the loaded objects readable)."""
        async with self._sessions() as session:
            return await work(session)

    async def dispose(self) -> None:
        await self.engine.dispose()
