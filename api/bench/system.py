"""Processes around the benchmark: the served app (`creditpool serve` in a subprocess), CPU
accounting per process tree, pgbench for the raw ceiling, py-spy, and what the machine is."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil  # a dependency of pgserver

from domain.db import dsn_url

# --- the served app ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def creditpool_command() -> list[str]:
    """The `creditpool` console script next to this interpreter, else the same entry point via -m."""
    script = Path(sys.executable).with_name("creditpool")
    return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli"]


class Server:
    """`creditpool serve` on a loopback port against `url` (already migrated)."""

    def __init__(self, url: str, *, port: int, workers: int, log_path: Path) -> None:
        self.url = url
        self.port = port
        self.workers = workers
        self.log_path = log_path
        self.graphql_url = f"http://127.0.0.1:{port}/graphql"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [*creditpool_command(), "serve", "--database-url", self.url, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        ready_url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"creditpool serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"creditpool serve not ready after {timeout:.0f} s:\n{self.log_tail()}")
        if self.workers > 1:  # /readyz answered from one worker; give the others a moment
            deadline = time.monotonic() + 30
            while len(self.tree_pids()) < self.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)

    def tree_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- CPU accounting --------------------------------------------------------------------------------


def tree_cpu(root_pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of a process and its descendants, by pid."""
    if root_pid is None:
        return {}
    out = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """Processes that appeared count in full; ones that ended in between are lost (the app's
    pooled connections and workers live for the whole window, so little is)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def machine_busy() -> float:
    """CPU seconds the whole machine spent running something, summed over cores (guest time is
    already inside user time; steal is the hypervisor's, not ours)."""
    t = psutil.cpu_times()
    skip = ("idle", "iowait", "steal", "guest", "guest_nice")
    return sum(getattr(t, f) for f in t._fields if f not in skip)


@dataclass
class CpuSnapshot:
    at: float
    server: dict[int, float]
    postgres: dict[int, float]
    client: float
    machine: float


def snapshot(server_pids_root: int | None, postmaster_pid: int | None) -> CpuSnapshot:
    me = psutil.Process().cpu_times()
    return CpuSnapshot(time.perf_counter(), tree_cpu(server_pids_root), tree_cpu(postmaster_pid),
                       me.user + me.system, machine_busy())


def cpu_report(a: CpuSnapshot, b: CpuSnapshot, cycles: int) -> dict[str, float]:
    """Per window: cores used by each party, and milliseconds of CPU per completed cycle."""
    wall = b.at - a.at
    server = cpu_delta(a.server, b.server)
    pg = cpu_delta(a.postgres, b.postgres)
    client = b.client - a.client
    busy = b.machine - a.machine
    other = max(0.0, busy - server - pg - client)
    per = (lambda v: round(v * 1000 / cycles, 3)) if cycles else (lambda v: None)
    return {
        "wall_s": round(wall, 3), "cores": psutil.cpu_count(),
        "server_cores": round(server / wall, 3), "postgres_cores": round(pg / wall, 3),
        "client_cores": round(client / wall, 3), "other_cores": round(other / wall, 3),
        "machine_busy_cores": round(busy / wall, 3),
        "server_ms_per_cycle": per(server), "postgres_ms_per_cycle": per(pg), "client_ms_per_cycle": per(client),
    }


def quiet_check(seconds: float = 2.0) -> float:
    """Cores busy on this machine right now (before we load it): other work skews the figures."""
    a = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - a) / seconds


def postmaster_pid(data_directory: str | None) -> int | None:
    if not data_directory:
        return None
    try:
        return int((Path(data_directory) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- pgbench ------------------------------------------------------------------------------------


def find_pgbench(prefer_embedded: bool) -> str | None:
    embedded = None
    try:
        import pgserver

        candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        embedded = str(candidate) if candidate.exists() else None
    except ImportError:
        pass
    system = shutil.which("pgbench")
    return (embedded or system) if prefer_embedded else (system or embedded)


def libpq_url(url: str) -> str:
    """For asyncpg.connect() and pgbench: libpq's spelling (`sslmode`, not SQLAlchemy's `ssl`)."""
    return dsn_url(url)


# The minimum SQL of one reservation, on scratch tables: the conditional balance update and the
# hold row, as one statement (one round trip, one commit), and as the explicit transaction an
# application that checks the update's row count before inserting would send.
CEILING_TABLES = """
CREATE TABLE bench_ceiling_balance (id int PRIMARY KEY, remaining bigint NOT NULL CHECK (remaining >= 0),
                                    held bigint NOT NULL CHECK (held >= 0));
CREATE TABLE bench_ceiling_hold (id bigserial PRIMARY KEY, balance_id int NOT NULL, amount bigint NOT NULL,
                                 created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO bench_ceiling_balance SELECT g, 1000000000000, 0 FROM generate_series(1, {rows}) AS g;
"""
DROP_CEILING_TABLES = "DROP TABLE IF EXISTS bench_ceiling_hold, bench_ceiling_balance"
CEILING_SCRIPTS = {
    "statement": (
        "WITH u AS (UPDATE bench_ceiling_balance SET remaining = remaining - 1, held = held + 1 "
        "WHERE id = :id AND remaining >= 1 RETURNING id) "
        "INSERT INTO bench_ceiling_hold (balance_id, amount) SELECT id, 1 FROM u;\n"
    ),
    "transaction": (
        "BEGIN;\n"
        "UPDATE bench_ceiling_balance SET remaining = remaining - 1, held = held + 1 WHERE id = :id AND remaining >= 1;\n"
        "INSERT INTO bench_ceiling_hold (balance_id, amount) VALUES (:id, 1);\n"
        "COMMIT;\n"
    ),
}
# Which balance row a pgbench client updates, per scenario: the one hot row; a random one of the
# spread workspaces; each client its own row (a seat nobody else spends from).
CEILING_ROW = {"hot": "1", "spread": "random(1, {rows})", "per-seat": ":client_id + 1"}


def run_pgbench(pgbench: str, url: str, *, script: str, row_expr: str, clients: int, seconds: float,
                workdir: Path, postmaster: int | None = None) -> dict[str, float]:
    """One pgbench run; with `postmaster`, PostgreSQL's CPU is also measured over the middle of
    the run (pgbench's backends exit with it, so they are sampled while it runs)."""
    path = workdir / f"ceiling-{abs(hash((script, row_expr)))}.sql"
    path.write_text(f"\\set id {row_expr}\n{script}")
    threads = max(1, min(clients, os.cpu_count() or 1))
    duration = max(1, round(seconds))
    cmd = [pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads), "-T", str(duration),
           "-f", str(path), libpq_url(url)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pg_cores = None
    if postmaster and duration >= 3:
        time.sleep(1.0)
        a = snapshot(None, postmaster)
        time.sleep(duration - 2.0)
        b = snapshot(None, postmaster)
        pg_cores = cpu_delta(a.postgres, b.postgres) / (b.at - a.at)
    stdout, stderr = proc.communicate(timeout=seconds + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {stderr.strip()[-500:]}")
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", stdout)
    lat = re.search(r"latency average = ([0-9.]+) ms", stdout)
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    if not tps:
        raise RuntimeError(f"could not read pgbench's output:\n{stdout[-800:]}")
    out = {"tps": round(float(tps.group(1)), 1), "latency_ms": float(lat.group(1)) if lat else None,
           "failed": int(failed.group(1)) if failed else 0}
    if pg_cores is not None and out["tps"]:
        out["postgres_cores"] = round(pg_cores, 3)
        out["postgres_ms_per_tx"] = round(1000 * pg_cores / out["tps"], 3)
    return out


# --- py-spy --------------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start_profiler(py_spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Sample the served app (and its worker processes) without pausing it (--nonblocking), at
    200 Hz, idle threads excluded: where its CPU goes."""
    cmd = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200",
           "--duration", str(max(1, round(seconds))), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Where a sampled frame's code lives, by path fragment (first match wins).
AREAS = [
    ("/sqlalchemy/", "SQLAlchemy"), ("/asyncpg/", "asyncpg"), ("/strawberry/", "Strawberry"),
    ("/graphql/", "graphql-core"), ("/starlette/", "Starlette"), ("/uvicorn/", "uvicorn"),
    ("/casbin/", "Casbin"), ("/tenacity/", "tenacity"), ("/broadcaster/", "broadcaster"),
    ("/pydantic", "pydantic"), ("/httptools/", "httptools"), ("/uvloop/", "uvloop"),
    ("/domain/", "creditpool domain/"), ("/api/", "creditpool api/"), ("/policies/", "creditpool policies/"),
    ("/greenlet/", "greenlet"), ("/asyncio/", "asyncio"), ("/json/", "json"), ("/uuid.py", "uuid"), ("/decimal.py", "decimal"),
]


# The request's outer frames, common to every stack: not informative as "inclusive time".
_OUTER = ("api/cli.py:", "api/app.py:CreditpoolGraphQL.execute_single", "api/errors.py:result")
# Library entry points worth naming (inclusive time, as far as stacks reach them).
STAGES = [
    ("GraphQL validation (graphql-core validate)", "graphql/validation/validate.py:validate"),
    ("GraphQL parsing", "graphql/language/parser.py:parse"),
    ("authentication (domain/identity.py:authenticate_secret)", "domain/identity.py:authenticate_secret"),
    ("SQLAlchemy pool pre-ping (asyncpg _async_ping)",
     "sqlalchemy/dialects/postgresql/asyncpg.py:AsyncAdapt_asyncpg_connection._async_ping"),
    ("tenacity retry wrapper (Database.transaction)", "tenacity/asyncio/__init__.py:AsyncRetrying.__anext__"),
    ("re-reading the result (domain/ledger/service.py:generation_result)",
     "domain/ledger/service.py:generation_result"),
    ("pricing (domain/pricing/service.py:price_request)", "domain/pricing/service.py:price_request"),
    ("Casbin (policies/__init__.py:Authorizer.allows)", "policies/__init__.py:Authorizer.allows"),
    ("events after commit (domain/db.py:Database._after_commit)", "domain/db.py:Database._after_commit"),
]


def _area(path: str) -> str:
    path = "/" + path  # py-spy shortens paths to the package: "sqlalchemy/orm/session.py"
    for fragment, name in AREAS:
        if fragment in path:
            return name
    return "other (stdlib, interpreter)"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarize_profile(raw: Path, top: int = 25) -> dict:
    """From py-spy's collapsed stacks: total samples, self time by area (library), and the
    functions with the most inclusive time (each counted once per stack) and self time."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    areas: Counter = Counter()
    area_inclusive: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for part in stack.split(";"):
            m = _FRAME.match(part)
            if m and not part.startswith(("process ", "thread ")):
                frames.append((m.group("fn"), m.group("file")))
        if not frames:
            continue
        seen = set()
        seen_areas = set()
        for fn, path in frames:
            key = f"{_short(path)}:{fn}"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
            a = _area(path)
            if a not in seen_areas:
                seen_areas.add(a)
                area_inclusive[a] += n
        fn, path = frames[-1]
        own[f"{_short(path)}:{fn}"] += n
        areas[_area(path)] += n
    pct = lambda v: round(100 * v / total, 1) if total else 0.0
    ours = [(k, pct(v)) for k, v in inclusive.most_common()
            if k.startswith(("domain/", "api/", "policies/")) and not k.startswith(_OUTER)][:top]
    stages = [(label, pct(max((v for k, v in inclusive.items() if k.endswith(fn)), default=0)))
              for label, fn in STAGES]
    return {
        "samples": total,
        "inclusive_creditpool": ours,
        "stages": sorted(stages, key=lambda x: -x[1]),
        "self_by_area": [(a, pct(v)) for a, v in areas.most_common()],
        "inclusive_by_area": [(a, pct(v)) for a, v in area_inclusive.most_common()],
        "inclusive": [(k, pct(v)) for k, v in inclusive.most_common(top)],
        "self": [(k, pct(v)) for k, v in own.most_common(top)],
    }


# --- the machine ---------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("strawberry-graphql", "starlette", "uvicorn", "sqlalchemy", "asyncpg", "aiohttp"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = "?"
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "cpus": str(os.cpu_count()), "cpu_model": model or platform.processor() or "?",
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}", "python": platform.python_version(),
        "platform": platform.platform(), "event_loop": loop,
        **{f"{k}_version": v for k, v in versions.items()},
    }
