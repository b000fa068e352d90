"""The load driver: C simulated clients over HTTP GraphQL, one aiohttp session each, the same
query strings every time (so the server's parser and validation caches hit), latencies measured
per request around the HTTP round trip."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from api.bench.seed import MODEL_KEY

START = """mutation Start($ws: ID!, $model: String!, $key: String!) {
  startGeneration(input: {workspaceId: $ws, modelKey: $model, idempotencyKey: $key}) {
    __typename
    ... on Generation { id status cost holds { held grant { id } } }
    ... on InsufficientCredits { needed available }
    ... on Error { code message }
  }
}"""

COMPLETE = """mutation Complete($g: ID!, $key: String!) {
  completeGeneration(input: {generationId: $g, idempotencyKey: $key}) {
    __typename
    ... on Generation { id status captured released }
    ... on Error { code message }
  }
}"""

BALANCE = """query Balance($ws: ID!) {
  balance(workspaceId: $ws) {
    available held viewerSpendable
    scopes { scope memberId available held }
    grants { id scope source amount remaining held expiresAt }
    expiringSoon { credits grants { id remaining expiresAt } }
  }
}"""


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class OpStats:
    """One operation's outcomes. `latencies` (seconds) and the counters cover the measured
    window; `total_ok` counts successes over the whole phase (warm-up and drain included), for
    the cross-check against the database."""

    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    typed: Counter = field(default_factory=Counter)  # expected-failure results: InsufficientCredits, ...
    graphql: Counter = field(default_factory=Counter)  # top-level GraphQL errors, by code
    transport: Counter = field(default_factory=Counter)  # HTTP status other than 200, connection errors
    total_ok: int = 0
    total_errors: int = 0  # any failure, in or out of the window (a run with one is not clean)

    @property
    def errors(self) -> int:
        return sum(self.typed.values()) + sum(self.graphql.values()) + sum(self.transport.values())

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ms = lambda v: None if v is None else round(v * 1000, 2)
        return {
            "count": len(lat), "ok": self.ok, "p50_ms": ms(percentile(lat, 50)), "p95_ms": ms(percentile(lat, 95)),
            "p99_ms": ms(percentile(lat, 99)), "max_ms": ms(lat[-1] if lat else None),
            "mean_ms": ms(sum(lat) / len(lat) if lat else None), "typed_errors": dict(self.typed),
            "graphql_errors": dict(self.graphql), "transport_errors": dict(self.transport),
        }


@dataclass
class PhaseResult:
    seconds: float
    start: OpStats = field(default_factory=OpStats)
    complete: OpStats = field(default_factory=OpStats)
    cycle: OpStats = field(default_factory=OpStats)  # start + complete, as one client sees it
    samples: dict[str, Any] = field(default_factory=dict)  # CPU figures etc., filled by the caller

    @property
    def cycles_per_s(self) -> float:
        return self.cycle.ok / self.seconds

    @property
    def reservations_per_s(self) -> float:
        return self.start.ok / self.seconds


class Outcome:
    __slots__ = ("data", "detail", "kind")

    def __init__(self, kind: str, detail: str = "", data: Any = None) -> None:
        self.kind = kind  # ok, typed, graphql, transport
        self.detail = detail
        self.data = data


async def post(session: aiohttp.ClientSession, url: str, headers: dict[str, str], query: str,
               variables: dict[str, Any], field_name: str) -> Outcome:
    try:
        async with session.post(url, data=json.dumps({"query": query, "variables": variables}),
                                headers=headers) as resp:
            body = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Outcome("transport", type(exc).__name__)
    if status != 200:
        return Outcome("transport", f"HTTP {status}")
    try:
        doc = json.loads(body)
    except ValueError:
        return Outcome("transport", "invalid JSON")
    if doc.get("errors"):
        err = doc["errors"][0]
        return Outcome("graphql", (err.get("extensions") or {}).get("code") or err.get("message", "?")[:60])
    result = (doc.get("data") or {}).get(field_name)
    if not isinstance(result, dict):
        return Outcome("graphql", "null result")
    if result.get("__typename") == "Generation" or field_name == "balance":
        return Outcome("ok", data=result)
    return Outcome("typed", result.get("__typename", "?"), result)


def _record(stats: OpStats, outcome: Outcome, t0: float, t1: float, window: tuple[float, float]) -> None:
    if outcome.kind == "ok":
        stats.total_ok += 1
    else:
        stats.total_errors += 1
    if not window[0] <= t1 <= window[1]:
        return
    if outcome.kind == "ok":
        stats.ok += 1
        stats.latencies.append(t1 - t0)
    elif outcome.kind == "typed":
        stats.typed[outcome.detail] += 1
    elif outcome.kind == "graphql":
        stats.graphql[outcome.detail] += 1
    else:
        stats.transport[outcome.detail] += 1


# Picks the (workspace id, creator token) of client `i`'s `k`-th cycle.
Plan = Callable[[int, int], tuple[str, str]]


async def drive(
    url: str, plan: Plan, worker_token: str, *, clients: int, warmup: float, seconds: float,
    rate: float | None = None, on_window: Callable[[str], Any] | None = None,
) -> PhaseResult:
    """Run start+complete cycles with `clients` clients: `warmup` seconds unmeasured, then
    `seconds` measured. No cycle starts after the window; one already started is completed (so
    no hold is left behind) but not counted. `rate`: cycles per second in total, paced per client
    (open loop up to the client count), instead of as fast as possible. `on_window("start"/"end")`
    is called at the window's edges (CPU snapshots, the profiler)."""
    result = PhaseResult(seconds=seconds)
    begin = time.perf_counter()
    window = (begin + warmup, begin + warmup + seconds)
    worker_headers = {"Authorization": f"Bearer {worker_token}", "Content-Type": "application/json"}
    headers_by_token: dict[str, dict[str, str]] = {}
    interval = clients / rate if rate else 0.0

    async def client(i: int) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            k = 0
            # Paced clients start staggered so the arrivals spread over each interval.
            next_at = begin + (interval * i / clients if interval else 0.0)
            while True:
                now = time.perf_counter()
                if now >= window[1]:
                    return
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at + interval, time.perf_counter() - interval)
                ws, token = plan(i, k)
                k += 1
                headers = headers_by_token.get(token)
                if headers is None:
                    headers = headers_by_token[token] = {"Authorization": f"Bearer {token}",
                                                         "Content-Type": "application/json"}
                t0 = time.perf_counter()
                started = await post(session, url, headers, START,
                                     {"ws": ws, "model": MODEL_KEY, "key": uuid.uuid4().hex},
                                     "startGeneration")
                t1 = time.perf_counter()
                _record(result.start, started, t0, t1, window)
                if started.kind != "ok":
                    continue
                done = await post(session, url, worker_headers, COMPLETE,
                                  {"g": started.data["id"], "key": uuid.uuid4().hex}, "completeGeneration")
                t2 = time.perf_counter()
                _record(result.complete, done, t1, t2, window)
                _record(result.cycle, done, t0, t2, window)

    async def edges() -> None:
        if on_window is None:
            return
        await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
        on_window("start")
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        on_window("end")

    await asyncio.gather(edges(), *(client(i) for i in range(clients)))
    return result



async def balance_latencies(url: str, targets: list[tuple[str, str]], *, warmup: int, requests: int) -> list[OpStats]:
    """Sequential balance queries, interleaved across `targets` (workspace id, token) so drift
    in the machine's load hits them alike; one OpStats per target."""
    stats = [OpStats() for _ in targets]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        for n in range(warmup + requests):
            for (ws, token), s in zip(targets, stats):
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                t0 = time.perf_counter()
                out = await post(session, url, headers, BALANCE, {"ws": ws}, "balance")
                t1 = time.perf_counter()
                window = (t0, t1) if n >= warmup else (t1 + 1, t1 + 1)
                _record(s, out, t0, t1, window)
    return stats
