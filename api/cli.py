"""The `creditpool` command: serve, migrate, create-user, create-service-token, revoke-tokens, tick, check-ledger,
bench, export-schema."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

import migrations
from api.embedded import start_embedded_postgres
from api.settings import ENV_NAMES, Settings, load_settings
from domain import demo, identity
from domain.db import Database
from domain.errors import NotFound
from domain.ledger.invariants import check_ledger

log = logging.getLogger("creditpool")
DEMO_TOKENS_FILE = "demo-tokens.json"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="PostgreSQL URL (env DATABASE_URL); unset: embedded PostgreSQL")
    p.add_argument("--data-dir", type=Path, help="data directory (env CREDITPOOL_DATA_DIR)")
    p.add_argument("--log-level", help="debug, info, warning, error (env CREDITPOOL_LOG_LEVEL)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the GraphQL service")
    _add_common(serve)
    serve.add_argument("--host", help="bind address (env CREDITPOOL_HOST)")
    serve.add_argument("--port", help="port (env CREDITPOOL_PORT)")
    serve.add_argument("--workers", help="worker processes (env CREDITPOOL_WORKERS)")
    serve.add_argument("--demo", action="store_true", help="load demo data once and print demo tokens")

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest version")
    _add_common(migrate)

    user = sub.add_parser("create-user", help="create (or find) a user and print a new API token")
    _add_common(user)
    user.add_argument("--email", required=True)
    user.add_argument("--operator", action="store_true", help="make the user a platform operator")

    svc = sub.add_parser("create-service-token", help="create a service account (if new) and print a token")
    _add_common(svc)
    svc.add_argument("--name", required=True)

    revoke = sub.add_parser("revoke-tokens", help="revoke every live token of a service account or a person")
    _add_common(revoke)
    whose = revoke.add_mutually_exclusive_group(required=True)
    whose.add_argument("--service", metavar="NAME", help="the service account of this name (create-service-token --name)")
    whose.add_argument("--email", help="the person with this email")

    tick = sub.add_parser("tick", help="run whatever is due once (period closes, expiry, hold timeouts) and exit")
    _add_common(tick)

    check = sub.add_parser("check-ledger", help="prove every grant's figures equal its ledger entries")
    _add_common(check)
    check.add_argument("--workspace", help="only this workspace id")

    from api import bench  # light: the benchmark imports its machinery when it runs

    bench.add_arguments(sub.add_parser("bench", help="load benchmark next to the raw PostgreSQL ceiling (BENCHMARKS.md)"))

    schema = sub.add_parser("export-schema", help="write the GraphQL SDL (default: api/schema.graphql)")
    schema.add_argument("--output", type=Path)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k, None) for k in ("database_url", "data_dir", "log_level", "host", "port", "workers")}
    settings = load_settings(**flags)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("casbin", "pgserver", "alembic"):  # they narrate every step at INFO
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


def _embedded(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL in the data directory; one line naming the
    directory, not a traceback, when it cannot be used (a file, no permission, a full disk)."""
    try:
        url = start_embedded_postgres(settings.data_dir)
    except OSError as exc:
        raise SystemExit(f"error: cannot use the data directory {settings.data_dir} "
                         f"(CREDITPOOL_DATA_DIR / --data-dir): {exc}") from None
    log.info("embedded PostgreSQL: data in %s", (settings.data_dir / "pgdata").resolve())
    return url


# What connecting to a bad DATABASE_URL raises: refused, no such host, no such database or role,
# a wrong password (OSError, asyncpg's errors wrapped by SQLAlchemy), or a URL asyncpg cannot
# use (a port that is no number: ValueError; an unknown query option: TypeError).
_UNREACHABLE = (OSError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TypeError)


def _reachable_revision(url: str) -> str | None:
    """The external database's schema revision; one line naming the database (never its
    password) and why, not a traceback, when it cannot be reached."""
    try:
        return asyncio.run(_current_revision(url))
    except _UNREACHABLE as exc:
        reason = getattr(exc, "orig", None) or exc
        raise SystemExit(f"error: cannot use the database {_shown(url)} (DATABASE_URL / --database-url): "
                         f"{str(reason).splitlines()[0] if str(reason) else type(reason).__name__}") from None


def _shown(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ValueError, TypeError, ArgumentError):
        return "(unparsable URL)"


def _database(settings: Settings) -> str:
    """The embedded server is started and upgraded to head; an external one must already be at
    head (`creditpool migrate`), so an old process never runs on a schema it does not know."""
    if settings.database_url is None:
        url = _embedded(settings)
        migrations.upgrade(url)
        return url
    current = _reachable_revision(settings.database_url)
    head = migrations.head_revision()
    if current != head:
        raise SystemExit(
            f"the database schema is at {current or 'nothing (empty database)'} but this version needs {head}: "
            "run `creditpool migrate` first"
        )
    return settings.database_url


async def _current_revision(url: str) -> str | None:
    db = Database(url, pool_size=1)
    try:
        async with db.engine.connect() as conn:
            return await migrations.current_revision(conn)
    finally:
        await db.dispose()


async def _with_db(url: str, fn):
    db = Database(url, pool_size=2)
    try:
        return await fn(db)
    finally:
        await db.dispose()


# How long an idle HTTP keep-alive connection stays open (uvicorn's default is 5 s). Longer than
# the idle timeouts of clients and proxies in front (aiohttp 15 s, AWS ALB 60 s), so that they
# close idle connections first: a server closing one just as a client reuses it breaks that
# request (a broken pipe, and a POST is not retried), the classic intermittent 502 behind a
# load balancer.
KEEP_ALIVE_SECONDS = 75


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = _settings(args)
    url = _database(settings)
    graphql_url = f"http://{settings.host}:{settings.port}/graphql"
    if args.demo:
        _load_demo(settings, url, graphql_url)
    # Worker processes read their settings from the environment: hand everything down.
    for field, env in ENV_NAMES.items():
        value = getattr(settings, field)
        if value is not None:
            os.environ[env] = str(value)
    os.environ["DATABASE_URL"] = url
    log.info("GraphQL (and GraphiQL in a browser) at %s", graphql_url)
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process without
    # running exit handlers, leaving the embedded PostgreSQL running. Exit normally instead.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    uvicorn.run(
        "api.app:app_from_env", factory=True, host=settings.host, port=settings.port,
        workers=settings.workers, log_level=settings.log_level, ws="websockets-sansio", log_config=_log_config(),
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


class RedactSecrets(logging.Filter):
    """Blanks API token secrets in access log lines: a browser user may put the token in
    GraphiQL's URL (`/graphql?headers={"Authorization": "Bearer cp_..."}`), and the request line
    would otherwise keep it in the log. (A secret's characters are URL-safe: encoding leaves them.)"""

    SECRET = re.compile(re.escape(identity.TOKEN_PREFIX) + r"[A-Za-z0-9_-]{8,}")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.SECRET.sub(identity.TOKEN_PREFIX + "[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def _log_config() -> dict:
    """uvicorn's own logging configuration with `RedactSecrets` on the access log. Passed to
    uvicorn (not installed here), so that every worker process applies it as it starts."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": "api.cli.RedactSecrets"}
    config["handlers"]["access"]["filters"] = ["redact_secrets"]
    return config


def _load_demo(settings: Settings, url: str, graphql_url: str) -> None:
    path = settings.data_dir / DEMO_TOKENS_FILE
    known: dict[str, str] = {}
    if path.exists():
        try:
            known = {i["key"]: i["token"] for i in json.loads(path.read_text())["identities"]}
        except (ValueError, KeyError, TypeError):
            known = {}
    identities = asyncio.run(_with_db(url, lambda db: demo.load_demo(db, known)))
    payload = {
        "graphql_url": graphql_url,
        "workspace_id": str(demo.DEMO_WORKSPACE_ID),
        "identities": [i.__dict__ for i in identities],
    }
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Tokens are secrets: the file is created readable by its owner only, never briefly wider.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(payload, indent=2) + "\n")
    path.chmod(0o600)  # an older file keeps its mode on O_TRUNC
    print(f"\ncreditpool demo: GraphiQL at {graphql_url}  (workspace {demo.DEMO_WORKSPACE_ID})")
    print("Paste a token into GraphiQL's headers as {\"Authorization\": \"Bearer <token>\"}:")
    for i in identities:
        who = i.email or "(service account)"
        what = f"{i.role}, {i.seat} seat" if i.role else ("platform operator" if i.key == "operator" else "settles generations")
        print(f"  {i.key:<9} {who:<32} {what:<28} {i.token}")
    print(f"The same, as JSON: {path}\n", flush=True)


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if settings.database_url is None:
        url = _embedded(settings)
    else:
        url = settings.database_url
        _reachable_revision(url)  # a bad URL is named in one line before Alembic runs
    migrations.upgrade(url)
    print(f"database schema at {migrations.head_revision()}")


def cmd_create_user(args: argparse.Namespace) -> None:
    settings = _settings(args)
    url = _database(settings)
    _print_secret(url, lambda db: identity.cli_user_token(db, args.email, operator=args.operator))


def cmd_create_service_token(args: argparse.Namespace) -> None:
    settings = _settings(args)
    url = _database(settings)
    _print_secret(url, lambda db: identity.cli_service_token(db, args.name))


def cmd_revoke_tokens(args: argparse.Namespace) -> None:
    settings = _settings(args)
    url = _database(settings)
    try:
        user, revoked = asyncio.run(_with_db(url, lambda db: identity.cli_revoke_tokens(db, service=args.service,
                                                                                  email=args.email)))
    except identity.ValidationFailed as exc:
        raise SystemExit(f"error: {exc.message}") from None
    except NotFound:
        who = f"no service account named {args.service!r}" if args.service is not None else f"no user with email {args.email!r}"
        raise SystemExit(f"error: {who}") from None
    whose = f"service account {user.name!r}" if user.kind is identity.UserKind.SERVICE else user.email
    print(f"revoked {len(revoked)} token(s) of {whose}")


def _print_secret(url: str, fn) -> None:
    try:
        print(asyncio.run(_with_db(url, fn)))
    except identity.ValidationFailed as exc:
        raise SystemExit(f"error: {exc.message}") from None


def cmd_tick(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from domain.clock import SYSTEM_CLOCK
    from domain.events import NotifyOutlet
    from domain.periods.service import tick

    settings = _settings(args)
    url = _database(settings)
    async def run(db: Database):
        # Servers listening through PostgreSQL (CREDITPOOL_BROADCAST_URL=postgres, or several
        # workers) pass the tick's events on to their subscribers.
        db.events = NotifyOutlet()
        # No payment provider: the servers' may be one plugged into `create_app`, and asking
        # another (the trusted-reference default) would grant credits for auto top-ups nobody
        # paid for. Servers' schedulers and spends buy those.
        return await tick(db, SYSTEM_CLOCK, hold_ttl=timedelta(seconds=settings.hold_ttl_seconds))

    report = asyncio.run(_with_db(url, run))
    print(f"periods closed: {report.periods_closed}, daily grants: {report.daily_issued}, "
          f"grants expired: {report.grants_expired}, holds timed out: {report.holds_timed_out}")
    if report.failures:
        # The rest was done; what failed was rolled back and is due again at the next tick.
        for failure in report.failures:
            print(f"failed: {failure}", file=sys.stderr)
        raise SystemExit(f"{len(report.failures)} unit(s) failed; the next tick retries them")


def cmd_check_ledger(args: argparse.Namespace) -> None:
    import uuid

    settings = _settings(args)
    try:
        ws = uuid.UUID(args.workspace) if args.workspace else None
    except ValueError:
        raise SystemExit(f"error: --workspace: {args.workspace!r} is not a workspace id") from None
    url = _database(settings)
    try:
        violations = asyncio.run(_with_db(url, lambda db: check_ledger(db, ws)))
    except NotFound as exc:  # an id naming no workspace proves nothing: never "consistent"
        raise SystemExit(f"error: {exc.message}: {ws}") from None
    for v in violations:
        print(f"grant {v.grant_id}: {v.detail}")
    if violations:
        raise SystemExit(f"{len(violations)} ledger violation(s)")
    print("ledger consistent: every grant equals the sum of its entries")


def cmd_export_schema(args: argparse.Namespace) -> None:
    from api.schema import SDL_PATH, sdl

    out = args.output or SDL_PATH
    out.write_text(sdl())
    print(f"wrote {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    from api.bench import main as bench_main

    bench_main(args)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    handler = {
        "serve": cmd_serve,
        "migrate": cmd_migrate,
        "create-user": cmd_create_user,
        "create-service-token": cmd_create_service_token,
        "revoke-tokens": cmd_revoke_tokens,
        "check-ledger": cmd_check_ledger,
        "tick": cmd_tick,
        "export-schema": cmd_export_schema,
        "bench": cmd_bench,
    }[args.command]
    handler(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
