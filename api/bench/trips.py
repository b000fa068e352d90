"""Statements per request: with `log_statement = 'all'` for a moment, one request at a time
between two marker statements, the server's statements are read back from PostgreSQL's log.
Every statement is at least one round trip between the app and the database (BEGIN and COMMIT
included). Only on the embedded PostgreSQL, whose log file the benchmark can read."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg

from api.bench.load import BALANCE, COMPLETE, START, post
from api.bench.seed import MODEL_KEY
from api.bench.system import libpq_url

_LINE = re.compile(r"^\S+ \S+ \S+ \[(?P<pid>\d+)\] (?:\S+ )?LOG:\s+(?:statement|execute [^:]*):\s?(?P<sql>.*)$")


_PREFIX = re.compile(r"^\S+ \S+ \S+ \[\d+\] ")


def _kind(sql: str) -> str:
    word = sql.strip().split(None, 1)[0].upper() if sql.strip() else ";"
    if word == "SELECT" and "pg_notify" in sql:
        return "SELECT pg_notify"
    return word.rstrip(";") or ";"


def _statements(lines: list[str], skip_pid: int) -> list[str]:
    """The logged statements, each with its continuation lines joined (a statement written over
    several lines logs its first line, often empty, then the rest as plain lines)."""
    out: list[str] = []
    current: list[str] | None = None
    for line in lines:
        m = _LINE.match(line)
        if m or _PREFIX.match(line):  # a new log line (another statement, a DETAIL, ...)
            current = None
        if m:
            if int(m.group("pid")) != skip_pid:
                current = [m.group("sql")]
                out.append("")
        elif current is not None:
            current.append(line.strip())
        if current is not None:
            out[-1] = " ".join(x for x in current if x)
    return out


async def count_statements(url: str, log_file: Path, graphql_url: str, ws_id: str, creator_token: str,
                           worker_token: str, owner_token: str) -> tuple[dict[str, dict], dict[str, int]]:
    """Statements the app sends for one startGeneration, one completeGeneration and one balance
    query (after two warm-up cycles, so prepared statements and the token's last-used stamp are
    in their steady state)."""
    conn = await asyncpg.connect(libpq_url(url))
    marks: list[str] = []
    results: dict[str, dict] = {}
    made = {"started": 0, "completed": 0}  # generations this made, for the cross-check
    try:
        me = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute("ALTER SYSTEM SET log_statement = 'all'")
        await conn.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)
        h = lambda t: {"Authorization": f"Bearer {t}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            async def start():
                out = await post(session, graphql_url, h(creator_token), START,
                                 {"ws": ws_id, "model": MODEL_KEY, "key": uuid.uuid4().hex}, "startGeneration")
                made["started"] += out.kind == "ok"
                return out

            async def complete(gid):
                out = await post(session, graphql_url, h(worker_token), COMPLETE,
                                 {"g": gid, "key": uuid.uuid4().hex}, "completeGeneration")
                made["completed"] += out.kind == "ok"
                return out

            for _ in range(2):
                out = await start()
                if out.kind == "ok":
                    await complete(out.data["id"])
                await post(session, graphql_url, h(owner_token), BALANCE, {"ws": ws_id}, "balance")
            for name in ("startGeneration", "completeGeneration", "balance"):
                mark = f"bench-mark-{uuid.uuid4().hex}"
                marks.append(mark)
                await conn.execute(f"SELECT '{mark}'")
                if name == "startGeneration":
                    out = await start()
                    gid = out.data["id"] if out.kind == "ok" else None
                elif name == "completeGeneration" and gid:
                    out = await complete(gid)
                else:
                    out = await post(session, graphql_url, h(owner_token), BALANCE, {"ws": ws_id}, "balance")
                results[name] = {"ok": out.kind == "ok"}
            mark = f"bench-mark-{uuid.uuid4().hex}"
            marks.append(mark)
            await conn.execute(f"SELECT '{mark}'")
    finally:
        await conn.execute("ALTER SYSTEM RESET log_statement")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
    await asyncio.sleep(0.3)  # let the log writes land
    lines = log_file.read_text(errors="replace").splitlines()
    positions = []
    for mark in marks:
        idx = next((i for i, line in enumerate(lines) if mark in line), None)
        if idx is None:
            return {}, made
        positions.append(idx)
    for (name, res), a, b in zip(results.items(), positions, positions[1:]):
        sql = _statements(lines[a + 1:b], me)
        kinds = Counter(_kind(q) for q in sql)
        # SQLAlchemy's pool_pre_ping on asyncpg: BEGIN; ';'; ROLLBACK, where the empty ';' is not
        # logged. Every BEGIN directly followed by a ROLLBACK is one such ping.
        pings = sum(1 for x, y in itertools.pairwise(sql) if _kind(x) == "BEGIN" and _kind(y) == "ROLLBACK")
        res["statements"] = len(sql)
        res["pre_pings"] = pings
        res["round_trips"] = len(sql) + pings
        res["transactions"] = kinds.get("BEGIN", 0) - pings
        res["by_kind"] = dict(kinds.most_common())
        res["sql"] = [q[:160] for q in sql]
    return results, made
