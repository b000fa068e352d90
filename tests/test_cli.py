"""The `creditpool` command, run as real subprocesses: `serve` (embedded PostgreSQL with
`--demo`, and an external database that must be migrated first), `migrate`, `create-user`,
`create-service-token`, and settings validation. HTTP checks go over a real loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

import migrations
from domain import demo
from domain.db import Database
from domain.identity import Actor, UserKind, authenticate_secret
from tests.conftest import asyncpg_dsn, free_port, with_database

ROOT = Path(__file__).resolve().parents[1]
DEMO_KEYS = ["owner", "admin", "creator1", "creator2", "standard", "operator", "worker"]
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)
CLI_TIMEOUT = 120  # one short command (may start the embedded PostgreSQL)
EMBEDDED_STARTUP = 120  # initdb on a fresh data dir
EXTERNAL_STARTUP = 45


def _cli() -> list[str]:
    """The console script of the interpreter running the tests, else the one on PATH, else
    the module: works from /tmp/venv and from the project's own .venv."""
    beside = Path(sys.executable).with_name("creditpool")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("creditpool")
    return [found] if found else [sys.executable, "-m", "api.cli"]


CLI = _cli()


def child_env(**extra: str) -> dict[str, str]:
    """The test environment without any database or creditpool configuration."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("CREDITPOOL_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None,
              timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one command to completion (killed after `timeout`)."""
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], cwd=ROOT, env=env or child_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def one_token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cp_") and len(lines[0]) > 30, result.stdout
    return lines[0]


# --- a served process ------------------------------------------------------------------

@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    out: Path
    err: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def graphql_url(self) -> str:
        return f"{self.base_url}/graphql"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


async def wait_healthy(server: Served, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                pytest.fail(f"serve exited with {server.proc.returncode}:\n{server.stderr()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(f"{server.base_url}/healthz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    pytest.fail(f"serve did not answer /healthz within {timeout}s:\n{server.stderr()}")


async def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Send `sig`, wait; kill when it does not exit in time. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
    return proc.returncode


@contextlib.asynccontextmanager
async def serving(*args: str, logs: Path, env: dict[str, str] | None = None,
                  startup: float = EXTERNAL_STARTUP) -> AsyncIterator[Served]:
    """`creditpool serve --host 127.0.0.1 --port <free> *args`, healthy; always stopped on exit."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"serve-{port}.out", logs / f"serve-{port}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, env=env or child_env(), stdout=o, stderr=e,
        )
    server = Served(proc, port, out, err)
    try:
        await wait_healthy(server, startup)
        yield server
    finally:
        await stop(proc)


def postmaster_pid(data_dir: Path) -> int | None:
    """The embedded server's pid while its postmaster.pid names a running postgres."""
    pgdata = data_dir / "pgdata"
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if str(pgdata) in cmdline or str(pgdata.resolve()) in cmdline else None


async def wait_postgres_stopped(data_dir: Path, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while postmaster_pid(data_dir) is not None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def stop_embedded_postgres(data_dir: Path) -> None:
    """Test cleanup: stop an embedded PostgreSQL a `serve` left behind (fast shutdown, then kill)."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- HTTP ------------------------------------------------------------------------------

async def get(server: Served, path: str, **headers: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.get(f"{server.base_url}{path}", headers=headers) as r:
            return r.status, r.headers.get("content-type", ""), await r.text()


async def graphql(server: Served, token: str, query: str, **variables) -> dict:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(
            server.graphql_url, json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            body = await r.json()
            assert r.status == 200 and not body.get("errors"), (r.status, body)
            return body["data"]


async def assert_ready(server: Served) -> None:
    status, _, body = await get(server, "/readyz")
    assert status == 200, body
    assert json.loads(body) == {"status": "ok", "database": "ok", "schema": migrations.head_revision()}


VIEWER = "{ viewer { email kind isOperator } }"
MEMBERS = "query($id: ID!) { workspace(id: $id) { id members { id } } }"


# --- 1. serve --demo on the embedded PostgreSQL --------------------------------------------

def demo_file(data_dir: Path) -> dict:
    return json.loads((data_dir / "demo-tokens.json").read_text())


def tokens_of(payload: dict) -> dict[str, str]:
    return {i["key"]: i["token"] for i in payload["identities"]}


def assert_demo_output(server: Served, data_dir: Path) -> dict:
    """The data-dir log line, the printed tokens and URL, and demo-tokens.json agree."""
    data_lines = [line for line in server.stderr().splitlines() if "embedded PostgreSQL: data in" in line]
    assert len(data_lines) == 1, server.stderr()
    assert str((data_dir / "pgdata").resolve()) in data_lines[0]

    path = data_dir / "demo-tokens.json"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds secrets
    payload = demo_file(data_dir)
    assert [i["key"] for i in payload["identities"]] == DEMO_KEYS
    assert payload["workspace_id"] == str(demo.DEMO_WORKSPACE_ID)
    assert payload["graphql_url"] == server.graphql_url

    out = server.stdout()
    assert f"GraphiQL at {server.graphql_url}" in out
    rows = [line.split() for line in out.splitlines()]
    printed = {row[0]: row[-1] for row in rows if row and row[0] in DEMO_KEYS}  # "  owner  <email> ... <token>"
    assert printed == tokens_of(payload)
    assert all(t.startswith("cp_") for t in printed.values())
    return payload


async def test_serve_demo_on_embedded_postgres_and_restart(tmp_path):
    data_dir = tmp_path / "data"
    env = child_env()  # no DATABASE_URL: the embedded PostgreSQL in the data dir
    try:
        async with serving("--demo", "--data-dir", str(data_dir), logs=tmp_path, env=env,
                           startup=EMBEDDED_STARTUP) as server:
            first = assert_demo_output(server, data_dir)
            tokens = tokens_of(first)

            status, _, body = await get(server, "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            await assert_ready(server)

            status, content_type, html = await get(server, "/graphql", Accept="text/html")
            assert status == 200 and content_type.startswith("text/html")
            assert "graphiql" in html.lower()

            identities = {i["key"]: i for i in first["identities"]}
            for key, ident in identities.items():
                viewer = (await graphql(server, ident["token"], VIEWER))["viewer"]
                assert viewer["email"] == ident["email"]
                assert viewer["kind"] == ("SERVICE" if key == "worker" else "HUMAN")
                assert viewer["isOperator"] is (key == "operator")
            assert identities["owner"]["email"] == f"owner@{demo.DEMO_DOMAIN}"

            ws = (await graphql(server, tokens["owner"], MEMBERS, id=first["workspace_id"]))["workspace"]
            assert len(ws["members"]) == 5

            # Ctrl+C: exits on its own (not killed after the grace period), stopping PostgreSQL too.
            assert await stop(server.proc, signal.SIGINT) in (0, 130, -signal.SIGINT)
            assert await wait_postgres_stopped(data_dir), "Ctrl+C left the embedded PostgreSQL running"

        # Restart on the same data dir: no new demo data, the same tokens.
        async with serving("--demo", "--data-dir", str(data_dir), logs=tmp_path, env=env,
                           startup=EMBEDDED_STARTUP) as server:
            second = assert_demo_output(server, data_dir)
            assert tokens_of(second) == tokens
            assert (await graphql(server, tokens["owner"], VIEWER))["viewer"]["email"] == f"owner@{demo.DEMO_DOMAIN}"
            ws = (await graphql(server, tokens["owner"], MEMBERS, id=second["workspace_id"]))["workspace"]
            assert ws["id"] == first["workspace_id"] and len(ws["members"]) == 5
            await assert_ready(server)
    finally:
        stop_embedded_postgres(data_dir)


async def test_serve_demo_reuses_a_generation_worker_account_the_operator_made_first(pg_server, tmp_path):
    # An operator ran `create-service-token --name generation-worker` (and `create-user` for a demo
    # email) before trying the demo: service account names and emails are unique, so the demo
    # takes those accounts over instead of failing to insert its own, and restarts stay the same.
    url = await pg_server.create_database("creditpool_demo_taken")
    await asyncio.to_thread(migrations.upgrade, url)
    worker = one_token(await cli("create-service-token", "--name", "generation-worker", "--database-url", url))
    owner = one_token(await cli("create-user", "--email", f"owner@{demo.DEMO_DOMAIN}", "--database-url", url))
    worker_actor, owner_actor = await authenticate(url, worker, owner)
    data_dir = tmp_path / "data"
    args = ("--demo", "--database-url", url, "--data-dir", str(data_dir))
    async with serving(*args, logs=tmp_path / "first") as server:
        tokens = tokens_of(demo_file(data_dir))
        assert list(tokens) == DEMO_KEYS
        assert (await graphql(server, tokens["worker"], VIEWER))["viewer"] == {
            "email": None, "kind": "SERVICE", "isOperator": False}
        assert (await graphql(server, tokens["operator"], VIEWER))["viewer"]["isOperator"] is True
        ws = (await graphql(server, tokens["owner"], MEMBERS, id=str(demo.DEMO_WORKSPACE_ID)))["workspace"]
        assert len(ws["members"]) == 5
        demo_worker, demo_owner = await authenticate(url, tokens["worker"], tokens["owner"])
        assert demo_worker.user_id == worker_actor.user_id and demo_owner.user_id == owner_actor.user_id
        assert (await authenticate(url, worker))[0] is not None  # the operator's own token still works
    async with serving(*args, logs=tmp_path / "second") as server:
        assert tokens_of(demo_file(data_dir)) == tokens  # restarting prints the same tokens
        ws = (await graphql(server, tokens["owner"], MEMBERS, id=str(demo.DEMO_WORKSPACE_ID)))["workspace"]
        assert len(ws["members"]) == 5
    check = await cli("check-ledger", "--database-url", url)
    assert check.returncode == 0, check.stdout + check.stderr
    accounts = await asyncpg.connect(asyncpg_dsn(url))
    try:
        assert await accounts.fetchval("SELECT count(*) FROM users WHERE name = 'generation-worker'") == 1
    finally:
        await accounts.close()


async def test_sigterm_stops_the_embedded_postgres(tmp_path):
    data_dir = tmp_path / "data"
    try:
        async with serving("--data-dir", str(data_dir), logs=tmp_path, startup=EMBEDDED_STARTUP) as server:
            assert postmaster_pid(data_dir) is not None
            await stop(server.proc, signal.SIGTERM)
            assert await wait_postgres_stopped(data_dir, timeout=5), "SIGTERM left the embedded PostgreSQL running"
    finally:
        stop_embedded_postgres(data_dir)


# --- 2. an external database must be migrated first -----------------------------------------

async def test_serve_refuses_an_unmigrated_database_until_migrate(pg_server, tmp_path):
    url = await pg_server.create_database()
    head = migrations.head_revision()

    refused = await cli("serve", "--database-url", url, "--port", str(free_port()), timeout=60)
    assert refused.returncode != 0
    assert "creditpool migrate" in refused.stderr and head in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    # The other commands that need the schema refuse the same way (and create nothing).
    refused = await cli("create-user", "--email", "early@example.test", "--database-url", url)
    assert refused.returncode != 0 and "creditpool migrate" in refused.stderr, refused.stderr
    assert refused.stdout == ""

    for _ in range(2):  # idempotent
        migrated = await cli("migrate", "--database-url", url)
        assert migrated.returncode == 0, migrated.stderr
        assert f"database schema at {head}" in migrated.stdout

    async with serving("--database-url", url, logs=tmp_path) as server:
        await assert_ready(server)
        # The schema moving away from head while serving: not ready, still alive.
        await asyncio.to_thread(migrations.downgrade, url, "base")
        status, _, body = await get(server, "/readyz")
        assert status == 503
        assert json.loads(body) == {"status": "unavailable", "database": "ok", "schema": None, "expected": head}
        status, _, _ = await get(server, "/healthz")
        assert status == 200


# --- 3. create-user and create-service-token ------------------------------------------------

async def authenticate(url: str, *secrets: str) -> list[Actor | None]:
    db = Database(url, pool_size=1)
    try:
        return [await authenticate_secret(db, s) for s in secrets]
    finally:
        await db.dispose()


async def test_create_user_prints_a_working_operator_token(database_url):
    email = f"cli-{uuid.uuid4().hex[:10]}@example.test"
    token = one_token(await cli("create-user", "--email", email, "--operator", "--database-url", database_url))
    again = one_token(await cli("create-user", "--email", email, "--database-url", database_url))
    assert again != token

    actor, actor_again = await authenticate(database_url, token, again)
    assert actor is not None and actor.kind is UserKind.HUMAN and actor.is_operator
    assert actor_again is not None and actor_again.user_id == actor.user_id  # found, not duplicated


async def test_create_user_rejects_an_invalid_email(database_url):
    result = await cli("create-user", "--email", "not-an-email", "--database-url", database_url)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "email" in result.stderr and "not a valid email address" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_create_service_token_reuses_the_service_account(database_url):
    name = f"worker-x-{uuid.uuid4().hex[:8]}"
    first = one_token(await cli("create-service-token", "--name", name, "--database-url", database_url))
    second = one_token(await cli("create-service-token", "--name", name, "--database-url", database_url))
    other = one_token(await cli("create-service-token", "--name", f"{name}-2", "--database-url", database_url))
    assert len({first, second, other}) == 3

    a, b, c = await authenticate(database_url, first, second, other)
    assert a is not None and b is not None and c is not None
    assert a.kind is UserKind.SERVICE and not a.is_operator
    assert a.user_id == b.user_id  # same name, same service account
    assert c.user_id != a.user_id


async def test_concurrent_create_service_token_runs_for_a_new_name_share_one_account(database_url):
    # Two operators (or a deploy script run twice) racing on the same new name: both get a token,
    # of one service account, never two accounts of the same name.
    name = f"worker-race-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    watcher = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            # No user can be written meanwhile: both runs look for the name and find none (or try
            # to create it) before either can write, so released they race at the same point.
            await conn.execute("LOCK TABLE users IN SHARE MODE")
            runs = [asyncio.ensure_future(cli("create-service-token", "--name", name, "--database-url", database_url))
                    for _ in range(2)]
            async with asyncio.timeout(CLI_TIMEOUT):
                while await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                             "AND datname = current_database()") < 2:
                    assert not any(r.done() for r in runs), [r.result() for r in runs if r.done()]
                    await asyncio.sleep(0.05)
        first, second = [one_token(await r) for r in runs]
        accounts = await watcher.fetch("SELECT id FROM users WHERE kind = 'service' AND name = $1", name)
    finally:
        await conn.close()
        await watcher.close()
    a, b = await authenticate(database_url, first, second)
    assert a is not None and b is not None and first != second
    assert [r["id"] for r in accounts] == [a.user_id] and b.user_id == a.user_id


async def graphql_errors(server: Served, token: str, query: str) -> list[dict]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(server.graphql_url, json={"query": query},
                             headers={"Authorization": f"Bearer {token}"}) as r:
            return (await r.json()).get("errors") or []


async def test_revoke_tokens_revokes_every_live_token_of_a_service_account_or_a_person(database_url, tmp_path):
    # Incident response: the worker's token leaked. The worker cannot revoke its own tokens
    # without a live one (and createApiToken refuses service accounts), so the operator does.
    from gql.transport.exceptions import TransportQueryError

    from tests.conftest import ws_client

    name = f"worker-leak-{uuid.uuid4().hex[:8]}"
    leaked, second = [one_token(await cli("create-service-token", "--name", name, "--database-url", database_url))
                      for _ in range(2)]
    bystander = one_token(await cli("create-service-token", "--name", f"{name}-other", "--database-url", database_url))
    email = f"leak-{uuid.uuid4().hex[:8]}@example.test"
    person = one_token(await cli("create-user", "--email", email, "--database-url", database_url))

    env = child_env(CREDITPOOL_LIVE_RECHECK_SECONDS="0.5")
    async with serving("--database-url", database_url, logs=tmp_path, env=env) as server:
        assert (await graphql(server, leaked, VIEWER))["viewer"]["kind"] == "SERVICE"
        ws_id = (await graphql(server, person, 'mutation { createWorkspace(input: {name: "Leaky"}) '
                                               '{ ... on Workspace { id } } }'))["createWorkspace"]["id"]
        ws_url = server.graphql_url.replace("http://", "ws://")
        async with ws_client(ws_url, person) as ws:
            stream = ws.subscribe("subscription($ws: ID!) { balanceChanged(workspaceId: $ws) { available } }",
                                  ws=ws_id)
            await asyncio.wait_for(stream.__anext__(), 10)  # the stream is open

            revoked = await cli("revoke-tokens", "--service", name, "--database-url", database_url)
            assert revoked.returncode == 0, revoked.stderr
            assert revoked.stdout.splitlines() == [f"revoked 2 token(s) of service account {name!r}"]
            for token in (leaked, second):
                errors = await graphql_errors(server, token, VIEWER)
                assert [e["extensions"] for e in errors] == [{"code": "UNAUTHENTICATED"}], errors
            assert (await graphql(server, bystander, VIEWER))["viewer"]["kind"] == "SERVICE"  # another account

            revoked = await cli("revoke-tokens", "--email", email.upper(), "--database-url", database_url)
            assert revoked.returncode == 0, revoked.stderr
            assert revoked.stdout.splitlines() == [f"revoked 1 token(s) of {email}"]
            # The person's open stream ends at its next re-check, as after any revocation.
            with pytest.raises(TransportQueryError) as ended:
                while True:
                    await asyncio.wait_for(stream.__anext__(), 10)
            assert ended.value.errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
            assert [e["extensions"] for e in await graphql_errors(server, person, VIEWER)] == [
                {"code": "UNAUTHENTICATED"}]

    # Again: nothing left to revoke. A fresh token works (the way back for the worker).
    again = await cli("revoke-tokens", "--service", name, "--database-url", database_url)
    assert again.returncode == 0 and again.stdout.splitlines() == [f"revoked 0 token(s) of service account {name!r}"]
    fresh = one_token(await cli("create-service-token", "--name", name, "--database-url", database_url))
    (actor,) = await authenticate(database_url, fresh)
    assert actor is not None and actor.kind is UserKind.SERVICE

    # Unknown names and emails, a person's email given as a service name, a bad email: one line.
    assert_refused(await cli("revoke-tokens", "--service", f"{name}-nobody", "--database-url", database_url),
                   "no service account named")
    assert_refused(await cli("revoke-tokens", "--service", email, "--database-url", database_url),
                   "no service account named")
    assert_refused(await cli("revoke-tokens", "--email", f"nobody-{email}", "--database-url", database_url),
                   "no user with email")
    assert_refused(await cli("revoke-tokens", "--email", "not-an-email", "--database-url", database_url),
                   "not a valid email address")
    both = await cli("revoke-tokens", "--service", name, "--email", email, "--database-url", database_url)
    assert both.returncode != 0 and "not allowed with" in both.stderr
    neither = await cli("revoke-tokens", "--database-url", database_url)
    assert neither.returncode != 0 and "one of the arguments" in neither.stderr


# --- 4. settings validation -------------------------------------------------------------------

UNREACHABLE = "postgresql://creditpool@127.0.0.1:1/nowhere"  # never reached when validation works


@pytest.mark.parametrize(
    ("env", "args", "names"),
    [
        ({"CREDITPOOL_PORT": "abc"}, ["--database-url", UNREACHABLE], ["CREDITPOOL_PORT", "--port"]),
        ({}, ["--port", "0", "--database-url", UNREACHABLE], ["CREDITPOOL_PORT", "--port"]),
        ({"DATABASE_URL": "mysql://x"}, [], ["DATABASE_URL"]),
        ({}, ["--database-url", "mysql://x"], ["--database-url"]),
        ({"CREDITPOOL_LOG_LEVEL": "verbose"}, ["--database-url", UNREACHABLE], ["CREDITPOOL_LOG_LEVEL"]),
    ],
    ids=["env-port-not-a-number", "flag-port-zero", "env-mysql-url", "flag-mysql-url", "env-log-level"],
)
async def test_serve_rejects_invalid_settings_naming_the_variable(tmp_path, env, args, names):
    result = await cli("serve", "--data-dir", str(tmp_path), *args, env=child_env(**env))
    assert result.returncode != 0
    assert "invalid configuration" in result.stderr, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pgdata").exists()  # failed before touching anything


async def test_check_ledger_reports_a_grant_its_entries_do_not_explain(pg_server):
    url = await pg_server.create_database("creditpool_check")
    await asyncio.to_thread(migrations.upgrade, url)
    ok = await cli("check-ledger", "--database-url", url)
    assert ok.returncode == 0 and "ledger consistent" in ok.stdout, ok.stderr
    # A grant with credits but no GRANT entry: money created outside the ledger.
    db = Database(url, pool_size=1)
    try:
        async def forge(session):
            from sqlalchemy import text
            await session.execute(text(
                "WITH w AS (INSERT INTO workspaces (id, name, plan_id, billing_anchor, period_start, next_renewal_at) "
                "  VALUES (gen_random_uuid(), 'forged', (SELECT id FROM plans WHERE key = 'starter'), now(), now(), "
                "          now() + interval '1 month') RETURNING id) "
                "INSERT INTO grants (id, workspace_id, scope, source, effective_at, amount, remaining) "
                "SELECT gen_random_uuid(), w.id, 'WORKSPACE', 'PROMOTION', now(), 5000, 5000 FROM w"))
        await db.transaction(forge)
    finally:
        await db.dispose()
    bad = await cli("check-ledger", "--database-url", url)
    assert bad.returncode != 0
    assert "1 ledger violation" in bad.stderr and "granted=None" in bad.stdout


async def test_tick_runs_what_is_due_once_and_exits(pg_server):
    from datetime import timedelta

    from domain.access import Caller
    from domain.clock import OffsetClock
    from domain.identity import authenticate_secret
    from domain.plans import Plan
    from domain.workspaces.models import AllocationMode
    from domain.workspaces.service import create_workspace
    from policies import Authorizer

    url = await pg_server.create_database("creditpool_tick")
    await asyncio.to_thread(migrations.upgrade, url)
    db = Database(url, pool_size=2)
    try:
        async def monthly_plan(session):
            session.add(Plan(key="monthly", name="Monthly", seat_cap=5, free_creator_seats=1, included_units=7000))

        await db.transaction(monthly_plan)
        token = one_token(await cli("create-user", "--email", "ticker@example.test", "--database-url", url))
        actor = await authenticate_secret(db, token)
        past = OffsetClock()
        past.offset = -timedelta(days=40)  # the workspace was opened 40 days ago: one renewal is due
        await create_workspace(db, Caller(actor, Authorizer(), past), name="Old", plan_key="monthly",
                               allocation_mode=AllocationMode.POOLED)
    finally:
        await db.dispose()
    first = await cli("tick", "--database-url", url)
    assert first.returncode == 0, first.stderr
    assert "periods closed: 1," in first.stdout
    second = await cli("tick", "--database-url", url)
    assert "periods closed: 0," in second.stdout
    check = await cli("check-ledger", "--database-url", url)
    assert check.returncode == 0, check.stdout


# --- 5. bad arguments and an unusable environment: one line naming it, no traceback ----------

def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


async def test_check_ledger_refuses_a_malformed_or_unknown_workspace(pg_server):
    url = await pg_server.create_database("creditpool_check_ws")
    await asyncio.to_thread(migrations.upgrade, url)
    assert_refused(await cli("check-ledger", "--workspace", "garbage", "--database-url", url), "--workspace")
    # An id naming no workspace proves nothing: it must not pass as "ledger consistent".
    unknown = await cli("check-ledger", "--workspace", str(uuid.uuid4()), "--database-url", url)
    assert_refused(unknown, "workspace not found")
    assert "ledger consistent" not in unknown.stdout


@pytest.mark.parametrize("command", [
    ["create-user", "--email", "someone@example.test"], ["create-service-token", "--name", "w"],
    ["migrate"], ["tick"], ["check-ledger"], ["serve"],
])
async def test_commands_name_a_database_they_cannot_reach(pg_server, tmp_path, command):
    refused = "postgresql://creditpool:s3cret@127.0.0.1:1/nowhere"  # nothing listens on port 1
    missing = with_database(pg_server.admin_url, f"nosuch_{uuid.uuid4().hex[:8]}")  # a server, no such database
    for url in (refused, missing):
        result = await cli(*command, "--database-url", url, "--data-dir", str(tmp_path))
        assert_refused(result, "cannot use the database")
        assert "s3cret" not in result.stderr  # the password is never printed
    assert not (tmp_path / "pgdata").exists()


async def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for command in (["create-user", "--email", "someone@example.test"], ["serve"]):
        assert_refused(await cli(*command, "--data-dir", str(not_a_dir)), "data directory", str(not_a_dir))


async def test_a_token_in_graphiqls_url_is_not_written_to_the_access_log(pg_server, tmp_path):
    """The README lets a browser user put the token in GraphiQL's URL (`?headers=...`); the
    server's access log (on at the default level, `info`) must not keep the secret, with one
    worker or several."""
    url = await pg_server.create_database("creditpool_access_log")
    await asyncio.to_thread(migrations.upgrade, url)
    token = one_token(await cli("create-user", "--email", "browser@example.test", "--database-url", url))
    headers = json.dumps({"Authorization": f"Bearer {token}"})
    for workers in ("1", "2"):
        async with serving("--database-url", url, "--workers", workers, logs=tmp_path / workers) as server:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
                async with http.get(server.graphql_url, params={"headers": headers},
                                    headers={"Accept": "text/html"}) as r:
                    assert r.status == 200
                async with http.get(server.graphql_url, params={"query": "{ viewer { kind } }", "token": token},
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status in (200, 400)
            await asyncio.sleep(0.5)  # the access line is written after the response
            await stop(server.proc)
            logged = server.stdout() + server.stderr()
            assert "GET /graphql?" in logged, logged  # the access log is on...
            assert token not in logged and token[3:] not in logged  # ...without the secret
