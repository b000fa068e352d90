"""Orchestration and the printed report of `creditpool bench` (see api/bench/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

import migrations
from api.bench import SCENARIOS, system
from api.bench.checks import money_checks
from api.bench.load import OpStats, PhaseResult, balance_latencies, drive
from api.bench.seed import Seeder, Team
from api.bench.trips import count_statements
from api.embedded import start_embedded_postgres
from domain.db import Database

DESCRIBE = {
    "hot": "one POOLED workspace, {creators} creators, every hold on the same pool grants",
    "spread": "{workspaces} POOLED workspaces, each cycle on a random one",
    "per-seat": "one PER_SEAT workspace, {creators} creators, each spending its own seat grant",
}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.seconds <= 0 or args.warmup < 0 or args.workers < 1:
        raise SystemExit("--clients and --workers must be at least 1, --seconds positive, --warmup not negative")
    if not 1 <= args.creators <= 400:
        raise SystemExit("--creators must be between 1 and 400 (the enterprise plan's seat cap is 500)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("casbin", "pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    scenarios = list(SCENARIOS) if args.scenario == "all" else [s for s in SCENARIOS if s == args.scenario]
    do_balance = args.scenario in ("all", "balance")
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "creditpool bench " + " ".join(_argv(args)),
        "machine": system.machine_info(),
    }
    m = report["machine"]
    say(f"creditpool bench: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']}, "
        f"{m['event_loop']}")
    busy = system.quiet_check()
    report["busy_cores_before"] = round(busy, 2)
    if busy > 0.25:
        say(f"WARNING: {busy:.2f} cores were already busy before the run: other work on this machine skews "
            "every figure below")

    workdir = Path(tempfile.mkdtemp(prefix="creditpool-bench-"))
    embedded = None
    scratch_db = None
    try:
        if args.database_url:
            scratch_db = asyncio.run(_create_scratch_database(args.database_url))
            url = scratch_db[1]
            say(f"database: scratch database {scratch_db[0]} on the given server")
        else:
            url = start_embedded_postgres(workdir)
            import pgserver

            embedded = pgserver.get_server(workdir / "pgdata")
            say(f"database: embedded PostgreSQL in {workdir / 'pgdata'}")
        migrations.upgrade(url)
        return asyncio.run(_main(args, url, workdir, scenarios, do_balance, report, embedded is not None))
    finally:
        if embedded is not None:
            embedded.cleanup()  # stops it (cleanup mode "stop")
        if scratch_db is not None and not args.keep:
            asyncio.run(_drop_scratch_database(args.database_url, scratch_db[0]))
        if args.keep:
            say(f"kept: {workdir}" + (f" and database {scratch_db[0]}" if scratch_db else ""))
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("clients", "seconds", "scenario", "workers"):
        out += [f"--{name}", str(getattr(args, name))]
    if args.database_url:
        out += ["--database-url", "<url>"]
    defaults = {"warmup": 3.0, "creators": 50, "spread_workspaces": 1000, "pgbench_seconds": 10.0,
                "balance_entries": 1_000_000, "balance_requests": 300}
    for name, default in defaults.items():
        if getattr(args, name) != default:
            out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.no_half_rate:
        out.append("--no-half-rate")
    if args.profile:
        out += ["--profile", str(args.profile)]
    return out


async def _create_scratch_database(admin_url: str) -> tuple[str, str]:
    from urllib.parse import urlsplit, urlunsplit

    name = f"creditpool_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(system.libpq_url(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.PostgresError as exc:
        raise SystemExit(f"cannot create a scratch database on that server ({exc}); the benchmark never writes "
                         "into an existing database") from None
    finally:
        await conn.close()
    parts = urlsplit(system.libpq_url(admin_url))
    return name, urlunsplit(parts._replace(path=f"/{name}"))


async def _drop_scratch_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(system.libpq_url(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _admin(url: str, *statements: str, ignore_errors: bool = False) -> list[Any]:
    """Statements outside a transaction (VACUUM, CHECKPOINT), one connection."""
    conn = await asyncpg.connect(system.libpq_url(url))
    out = []
    try:
        for sql in statements:
            try:
                if sql.lstrip().upper().startswith(("SHOW", "SELECT")):
                    out.append(await conn.fetch(sql))
                else:
                    out.append(await conn.execute(sql))
            except asyncpg.PostgresError:
                if not ignore_errors:
                    raise
                out.append(None)
    finally:
        await conn.close()
    return out


async def _settle_database(url: str) -> None:
    """Vacuum and analyze what seeding wrote and checkpoint, so autovacuum and a checkpoint are
    less likely to land inside a measurement (CHECKPOINT needs a superuser; skipped otherwise)."""
    await _admin(url, "VACUUM ANALYZE")
    await _admin(url, "CHECKPOINT", ignore_errors=True)


async def _main(args, url: str, workdir: Path, scenarios: list[str], do_balance: bool, report: dict,
                embedded: bool) -> int:
    db = Database(url, pool_size=10)
    server = None
    ok = True
    try:
        settings = await _admin(url, *(f"SHOW {s}" for s in (
            "server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "max_connections",
            "data_directory")), ignore_errors=True)
        names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers",
                 "max_connections", "data_directory")
        pg = {n: (rows[0][0] if rows else "?") for n, rows in zip(names, settings)}
        report["postgres"] = {k: v for k, v in pg.items() if k != "data_directory"}
        say("PostgreSQL {server_version}: fsync={fsync}, synchronous_commit={synchronous_commit}, "
            "wal_sync_method={wal_sync_method}, shared_buffers={shared_buffers}".format(**pg))

        t = time.perf_counter()
        seeder = Seeder(db, uuid.uuid4().hex[:6])
        await seeder.setup()
        teams: dict[str, list[Team]] = {}
        if "hot" in scenarios:
            teams["hot"] = [await seeder.hot(args.creators)]
        if "per-seat" in scenarios:
            teams["per-seat"] = [await seeder.per_seat(args.creators)]
        if "spread" in scenarios:
            teams["spread"] = await seeder.spread(
                args.spread_workspaces, progress=lambda n: say(f"  seeded {n}/{args.spread_workspaces} workspaces"))
        # The ledger's history goes in before anything is measured, then VACUUM ANALYZE: a running
        # service has a long ledger and statistics that say so. Measured on an empty, freshly
        # analysed ledger, the planner keeps sequential scans of `ledger_entries` and `generations`
        # (cached generic plans, and the foreign keys' checks) that grow with every cycle until
        # autovacuum next analyses them.
        balance_teams = [await seeder.balance_team("bench balance small"),
                         await seeder.balance_team("bench balance large")]
        (small, small_grant), (large, large_grant) = balance_teams
        # Each workspace already has 3 GRANT entries; completed generations add a HOLD and a CAPTURE.
        await seeder.history(small, small_grant, max(0, (1000 - 3) // 2))
        await seeder.history(large, large_grant, max(0, (args.balance_entries - 3) // 2))
        await _settle_database(url)
        say(f"seeded through the domain layer, with {args.balance_entries:,} ledger entries of history, in "
            f"{time.perf_counter() - t:.1f} s")

        port = args.port or system.free_port()
        server = system.Server(url, port=port, workers=args.workers, log_path=workdir / "server.log")
        server.start()
        say(f"serving: creditpool serve --workers {args.workers} on {server.graphql_url} (pid {server.proc.pid})")
        postmaster = system.postmaster_pid(pg.get("data_directory")) if pg.get("data_directory") else None
        pgbench = system.find_pgbench(prefer_embedded=embedded)
        report["pgbench"] = pgbench
        ceiling_rows = max(args.spread_workspaces, args.clients + 1)
        if pgbench and scenarios:
            await _admin(url, system.DROP_CEILING_TABLES, system.CEILING_TABLES.format(rows=ceiling_rows))
        elif scenarios:
            say("WARNING: no pgbench found: the ceiling is not measured")

        report["scenarios"] = {}
        expected: dict[str, tuple[list[str], int, int]] = {}
        for name in scenarios:
            out = await _scenario(args, name, teams[name], seeder.worker_token, server, postmaster, pgbench, url,
                                  workdir, ceiling_rows)
            report["scenarios"][name] = out["report"]
            ws_ids = [team.workspace_id for team in teams[name]]
            expected[name] = (ws_ids, out["starts"], out["completes"])
            ok &= out["clean"]

        if scenarios and embedded and pg.get("data_directory"):
            team = teams[scenarios[0]][0]
            trips, made = await count_statements(url, Path(pg["data_directory"]) / "log", server.graphql_url,
                                           team.workspace_id, team.creators[0][0], seeder.worker_token,
                                           team.owner_token)
            report["statements_per_request"] = trips
            ws_ids, starts, completes = expected[scenarios[0]]
            expected[scenarios[0]] = (ws_ids, starts + made["started"], completes + made["completed"])
            say()
            say(f"== statements the app sends per request (PostgreSQL's statement log, {scenarios[0]} workspace, "
                "one request at a time; every statement is at least one round trip):")
            for op, r in trips.items():
                say(f"  {op:<19} {r.get('round_trips', '?'):>3} round trips: {r.get('transactions', '?')} "
                    f"transaction(s), {r.get('pre_pings', '?')} pool pre-ping(s) (BEGIN; ';'; ROLLBACK), statements "
                    f"{r.get('by_kind')}")

        if do_balance:
            report["balance"] = await _balance(args, balance_teams, server, url)
            ok &= report["balance"]["clean"]

        server.stop()
        if pgbench and scenarios:
            await _admin(url, system.DROP_CEILING_TABLES)
        say()
        say("money checks (after the load):")
        checks = await money_checks(db, expected)
        report["checks"] = {"ok": checks.ok, "problems": checks.problems,
                            "facts": {k: v for k, v in checks.facts.items()}}
        say(f"  invariant checker: {checks.facts['invariant_violations']} violation(s); overdrawn grants: "
            f"{checks.facts['overdrawn_grants']}; held by grants {checks.facts['grants_held']} units = held by "
            f"open generations' entries {checks.facts['entries_held']} units "
            f"({checks.facts['open_generations']} open generation(s))")
        for name in expected:
            say(f"  {name}: generations in the database by status {checks.facts[f'{name}_generations']}; "
                f"the clients saw {expected[name][1]} starts and {expected[name][2]} completions")
        for p in checks.problems:
            say(f"  PROBLEM: {p}")
        ok &= checks.ok
    finally:
        if server is not None:
            server.stop()
        await db.dispose()
    report["ok"] = ok
    _print_summary(report)
    say()
    say("RESULT: " + ("clean: no failed request, every money check holds" if ok else
                      "NOT CLEAN: see the errors and problems above"))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"figures written to {args.json}")
    return 0 if ok else 1


def _print_summary(report: dict) -> None:
    say()
    say("summary against the targets of issue 8:")
    for name, rep in report.get("scenarios", {}).items():
        ceiling = (rep.get("ceiling") or {}).get("statement", {}).get("tps")
        line = (f"  {name:<9} {rep['reservations_per_s']:>8,.1f} reservations/s, ceiling {ceiling or '-':>8} tx/s, "
                f"ratio {rep.get('ratio_reservations_to_ceiling', '-')}")
        target = {"hot": "target >= 0.5, aim > 1.0", "spread": "target >= 0.5", "per-seat": "no target"}[name]
        say(f"{line}  ({target})" + ("  [profiled]" if rep.get("profiled") else ""))
        if "half_rate" in rep:
            h = rep["half_rate"]
            say(f"  {'':<9} at half rate ({h['cycles_per_s']:,.1f} cycles/s): p99 startGeneration "
                f"{_fmt_ms(h['startGeneration']['p99_ms'])} ms, completeGeneration "
                f"{_fmt_ms(h['completeGeneration']['p99_ms'])} ms  (target < 25 ms)")
    if "balance" in report:
        b = report["balance"]
        say(f"  balance   p50 {_fmt_ms(b['small']['p50_ms'])} ms with {b['entries'][0]:,} entries, "
            f"{_fmt_ms(b['large']['p50_ms'])} ms with {b['entries'][1]:,}: ratio {b['ratio_p50']}  (target <= 1.2)")


def _plan(name: str, teams: list[Team], clients: int):
    if name == "spread":
        rngs = [random.Random(i) for i in range(clients)]

        def spread(i: int, k: int) -> tuple[str, str]:
            team = teams[rngs[i].randrange(len(teams))]
            return team.workspace_id, team.creators[0][0]

        return spread
    team = teams[0]
    n = len(team.creators)

    def rotate(i: int, k: int) -> tuple[str, str]:
        # Client i takes creators i, i+C, i+2C, ... (mod n): every creator is used, and two clients
        # sometimes act for the same creator at once, as a busy creator's parallel jobs would.
        return team.workspace_id, team.creators[(i + k * clients) % n][0]

    return rotate


# What the app's database connections are doing, sampled during a measurement.
_ACTIVITY = """
SELECT CASE
    WHEN state = 'active' AND wait_event_type = 'Lock' THEN 'waiting for a row lock'
    WHEN state = 'active' AND wait_event IN ('WALSync', 'WALWrite', 'WalSync', 'WalWrite') THEN 'flushing WAL (commit)'
    WHEN state = 'active' THEN 'running a statement'
    WHEN state LIKE 'idle in transaction%' THEN 'in a transaction, waiting for the app'
    ELSE 'idle' END AS what, count(*)
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1
"""


async def _sample_activity(url: str, stop: asyncio.Event, every: float = 0.1) -> dict[str, float]:
    """Average number of connections in each state over the window (idle ones are left out:
    the benchmark's own pool sits there too)."""
    conn = await asyncpg.connect(system.libpq_url(url))
    totals: dict[str, int] = {}
    samples = 0
    try:
        while not stop.is_set():
            for what, n in await conn.fetch(_ACTIVITY):
                totals[what] = totals.get(what, 0) + n
            samples += 1
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass
    finally:
        await conn.close()
    return {k: round(v / samples, 2) for k, v in sorted(totals.items()) if k != "idle"} if samples else {}


async def _phase(args, name: str, plan, worker_token: str, server, postmaster, url: str, *,
                 rate: float | None = None, profile_to: Path | None = None) -> tuple[PhaseResult, dict]:
    snaps: dict[str, system.CpuSnapshot] = {}
    profiler = {}
    py_spy = system.find_py_spy() if profile_to else None
    stop = asyncio.Event()
    sampler: dict[str, asyncio.Task] = {}

    def edge(which: str) -> None:
        if which == "start" and py_spy:
            profiler["proc"] = system.start_profiler(py_spy, server.proc.pid, args.seconds, profile_to)
        if which == "start":
            sampler["task"] = asyncio.get_running_loop().create_task(_sample_activity(url, stop))
        else:
            stop.set()
        snaps[which] = system.snapshot(server.proc.pid, postmaster)

    result = await drive(server.graphql_url, plan, worker_token, clients=args.clients, warmup=args.warmup,
                         seconds=args.seconds, rate=rate, on_window=edge)
    cpu = system.cpu_report(snaps["start"], snaps["end"], result.cycle.ok)
    activity = await sampler["task"] if "task" in sampler else {}
    profile = None
    if profile_to and not py_spy:
        say("  profiler: py-spy not found (pip install py-spy into this environment); not profiled")
    if "proc" in profiler:
        proc = profiler["proc"]
        try:
            output, _ = await asyncio.to_thread(proc.communicate, timeout=args.seconds + 60)
        except Exception:  # noqa: BLE001
            proc.kill()
            output = b""
        if proc.returncode == 0 and profile_to.exists():
            profile = system.summarize_profile(profile_to)
        else:
            say(f"  profiler failed ({proc.returncode}): {output.decode(errors='replace')[-400:]}")
    return result, {"cpu": cpu, "profile": profile, "activity": activity}


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _op_line(label: str, s: OpStats) -> str:
    d = s.summary()
    errs = []
    for kind, key in (("typed", "typed_errors"), ("graphql", "graphql_errors"), ("transport", "transport_errors")):
        if d[key]:
            errs.append(f"{kind} {d[key]}")
    return (f"  {label:<19} p50 {_fmt_ms(d['p50_ms']):>6}  p95 {_fmt_ms(d['p95_ms']):>6}  p99 {_fmt_ms(d['p99_ms']):>6}"
            f"  max {_fmt_ms(d['max_ms']):>6} ms   ok {d['ok']:>6}   errors: {', '.join(errs) or 'none'}")


def _phase_report(result: PhaseResult, extra: dict) -> dict:
    return {
        "cycles_per_s": round(result.cycles_per_s, 1), "reservations_per_s": round(result.reservations_per_s, 1),
        "transactions_per_s": round((result.start.ok + result.complete.ok) / result.seconds, 1),
        "startGeneration": result.start.summary(), "completeGeneration": result.complete.summary(),
        "cycle": result.cycle.summary(), "cpu": extra["cpu"], "db_connections": extra["activity"],
    }


def _print_phase(title: str, result: PhaseResult, extra: dict) -> None:
    c = extra["cpu"]
    say(f"  {title}: {result.cycles_per_s:,.1f} cycles/s, {result.reservations_per_s:,.1f} reservations/s "
        f"({(result.start.ok + result.complete.ok) / result.seconds:,.1f} credit-moving transactions/s)")
    say(_op_line("startGeneration", result.start))
    say(_op_line("completeGeneration", result.complete))
    say(_op_line("cycle (both)", result.cycle))
    say(f"  CPU (cores of {c['cores']}): server {c['server_cores']}, PostgreSQL {c['postgres_cores']}, "
        f"this client {c['client_cores']}, other processes {c['other_cores']}; per cycle: server "
        f"{c['server_ms_per_cycle']} ms, PostgreSQL {c['postgres_ms_per_cycle']} ms, client "
        f"{c['client_ms_per_cycle']} ms")
    if extra["activity"]:
        say("  app's database connections, average over the window: "
            + ", ".join(f"{v} {k}" for k, v in extra["activity"].items()))
    if c["other_cores"] > 0.2:
        say(f"  WARNING: other processes kept {c['other_cores']} cores busy in this window: these figures are skewed")


async def _scenario(args, name: str, teams: list[Team], worker_token: str, server, postmaster, pgbench, url: str,
                    workdir: Path, ceiling_rows: int) -> dict:
    desc = DESCRIBE[name].format(creators=args.creators, workspaces=len(teams))
    say()
    say(f"== {name}: {desc}; {args.clients} clients, {args.seconds:g} s measured after {args.warmup:g} s warm-up")
    plan = _plan(name, teams, args.clients)
    profile_to = args.profile if (args.profile and name == "hot") else None
    result, extra = await _phase(args, name, plan, worker_token, server, postmaster, url, profile_to=profile_to)
    _print_phase("closed loop, as fast as the clients go" + (" (PROFILED: py-spy running)" if profile_to else ""),
                 result, extra)
    rep = _phase_report(result, extra)
    rep["profiled"] = bool(profile_to)
    starts = result.start.total_ok
    completes = result.complete.total_ok
    errors = result.start.total_errors + result.complete.total_errors
    if extra["profile"]:
        rep["profile"] = extra["profile"]
        _print_profile(extra["profile"], args.profile)

    if name == "spread" and not args.no_half_rate and result.cycles_per_s > 0:
        rate = result.cycles_per_s / 2
        half, half_extra = await _phase(args, name, plan, worker_token, server, postmaster, url, rate=rate)
        _print_phase(f"paced at half that ({rate:,.1f} cycles/s offered)", half, half_extra)
        rep["half_rate"] = {"offered_cycles_per_s": round(rate, 1), **_phase_report(half, half_extra)}
        starts += half.start.total_ok
        completes += half.complete.total_ok
        errors += half.start.total_errors + half.complete.total_errors

    if pgbench:
        row = system.CEILING_ROW[name].format(rows=min(len(teams), ceiling_rows) if name == "spread" else 0)
        forms = ("statement", "transaction") if name == "hot" else ("statement",)
        rep["ceiling"] = {}
        for form in forms:
            await _admin(url, "TRUNCATE bench_ceiling_hold", "VACUUM ANALYZE bench_ceiling_balance")
            rep["ceiling"][form] = await asyncio.to_thread(
                system.run_pgbench, pgbench, url, script=system.CEILING_SCRIPTS[form], row_expr=row,
                clients=args.clients, seconds=args.pgbench_seconds, workdir=workdir, postmaster=postmaster)
        ceiling = rep["ceiling"]["statement"]["tps"]
        rep["ratio_reservations_to_ceiling"] = round(result.reservations_per_s / ceiling, 3) if ceiling else None
        rep["ratio_transactions_to_ceiling"] = round(rep["transactions_per_s"] / ceiling, 3) if ceiling else None
        where = {"hot": "one row", "spread": f"a random row of {len(teams)}", "per-seat": "a row per client"}[name]
        say(f"  pgbench ceiling, same PostgreSQL, {args.clients} clients, {args.pgbench_seconds:g} s, {where}:")
        for form, figures in rep["ceiling"].items():
            text = {"statement": "UPDATE ... WHERE remaining >= 1 + INSERT hold, one statement",
                    "transaction": "BEGIN; UPDATE; INSERT; COMMIT (4 round trips)"}[form]
            cpu = (f", PostgreSQL {figures['postgres_cores']} cores, {figures['postgres_ms_per_tx']} ms CPU per tx"
                   if "postgres_cores" in figures else "")
            say(f"    {text}: {figures['tps']:,.1f} tx/s, latency {figures['latency_ms']} ms{cpu}")
        say(f"  our reservations/s / ceiling = {rep['ratio_reservations_to_ceiling']}   "
            f"(credit-moving transactions/s / ceiling = {rep['ratio_transactions_to_ceiling']})")
    clean = errors == 0
    rep["errors_total"] = errors
    if not clean:
        say(f"  FAILED REQUESTS: {errors} (the workspaces are funded far beyond the run: every failure is a bug)")
    return {"report": rep, "starts": starts, "completes": completes, "clean": clean}


def _print_profile(p: dict, path: Path) -> None:
    say(f"  profile: {p['samples']} samples of the server's non-idle threads; collapsed stacks in {path}")
    say("    self time by library: " + ", ".join(f"{a} {v}%" for a, v in p["self_by_area"][:10]))
    say("    named stages (inclusive):")
    for k, v in p["stages"]:
        say(f"      {v:5.1f}%  {k}")
    say("    creditpool functions (inclusive; SQLAlchemy runs the ORM in greenlets, whose stacks do not reach")
    say("    back to the caller, so ORM time mostly shows as library self time, not under these):")
    for k, v in p["inclusive_creditpool"][:15]:
        say(f"      {v:5.1f}%  {k}")
    say("    most self time:")
    for k, v in p["self"][:12]:
        say(f"      {v:5.1f}%  {k}")


async def _balance(args, teams: list[tuple[Team, str]], server, url: str) -> dict:
    say()
    say(f"== balance reads: the balance query with ~1,000 and ~{args.balance_entries:,} ledger entries "
        "in the workspace")
    (small, _), (large, _) = teams
    counts = await _admin(url, *(f"SELECT count(*) FROM ledger_entries WHERE workspace_id = '{team.workspace_id}'"
                                 for team in (small, large)))
    n_small, n_large = (rows[0][0] for rows in counts)
    say(f"  {n_small:,} and {n_large:,} entries (inserted before the scenarios)")
    stats = await balance_latencies(server.graphql_url, [(small.workspace_id, small.owner_token),
                                                         (large.workspace_id, large.owner_token)],
                                    warmup=30, requests=args.balance_requests)
    out = {"entries": [n_small, n_large]}
    for label, s in zip(("small", "large"), stats):
        out[label] = s.summary()
        say(f"  {n_small if label == 'small' else n_large:>9,} entries:" + _op_line("", s)[2:])
    a, b = out["small"], out["large"]
    ratio = lambda key: round(b[key] / a[key], 3) if a[key] and b[key] else None
    out["ratio_p50"], out["ratio_p95"], out["ratio_mean"] = ratio("p50_ms"), ratio("p95_ms"), ratio("mean_ms")
    say(f"  ratio large/small: p50 {out['ratio_p50']}, p95 {out['ratio_p95']}, mean {out['ratio_mean']} "
        f"(target: at most 1.2)")
    out["clean"] = all(s.total_errors == 0 for s in stats)
    return out
