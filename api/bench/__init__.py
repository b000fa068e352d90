"""`creditpool bench`: the hot path under load, next to the raw PostgreSQL ceiling in the same run.

It starts its own PostgreSQL (the embedded one, in a temporary directory) or creates a scratch
database on `--database-url`, seeds data through the domain layer, serves the real app with
`creditpool serve` in a subprocess, and drives `startGeneration` + `completeGeneration` cycles over
HTTP GraphQL with C concurrent clients for T seconds per scenario:

- hot: one POOLED workspace, many creators, every reservation on the same pool grants;
- spread: 1,000 workspaces, each cycle on a random one;
- per-seat: one PER_SEAT workspace, each creator spending its own seat grant.

After each scenario `pgbench` measures the raw ceiling on the same server with the same client
count (a conditional UPDATE of a balance row plus the INSERT of a hold row, on scratch tables).
Then balance-read latency with ~1,000 and ~1,000,000 ledger entries in a workspace, then the
invariant checker. It exits non-zero when a request failed or a money check did not hold.

Never part of the test suite: it takes minutes and wants the machine to itself. See BENCHMARKS.md.
The heavy imports (aiohttp, the domain) happen in `main`, so registering the command costs nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCENARIOS = ("hot", "spread", "per-seat")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="a PostgreSQL server to create a scratch database on (needs CREATEDB); "
                                          "default: the embedded PostgreSQL in a temporary directory")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per scenario (default 15)")
    p.add_argument("--scenario", choices=(*SCENARIOS, "balance", "all"), default="all",
                   help="which scenario to run (default all: the three, then balance reads)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the served app (default 1)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each measurement (default 3)")
    p.add_argument("--creators", type=int, default=50, help="creators in the hot and per-seat workspaces (default 50)")
    p.add_argument("--spread-workspaces", type=int, default=1000, help="workspaces in the spread scenario (default 1000)")
    p.add_argument("--pgbench-seconds", type=float, default=10.0, help="seconds per pgbench ceiling run (default 10)")
    p.add_argument("--balance-entries", type=int, default=1_000_000,
                   help="ledger entries of history, inserted before anything is measured, in the big workspace "
                        "of the balance-read check (default 1000000)")
    p.add_argument("--balance-requests", type=int, default=300,
                   help="measured balance queries per workspace (default 300)")
    p.add_argument("--no-half-rate", action="store_true",
                   help="skip the spread scenario's second pass at half its measured throughput")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="run py-spy (must be installed) on the server during the hot scenario; collapsed stacks "
                        "go to FILE and a summary is printed. Profiling costs CPU: do not quote those figures")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--port", type=int, help="port for the served app (default: a free one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directory / scratch database")


def main(args: argparse.Namespace) -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit("creditpool bench drives the API with aiohttp: pip install -e '.[test]'") from None
    from api.bench.run import run

    raise SystemExit(run(args))
