"""`creditpool bench` step 6, its money checks, held to what BENCHMARKS.md says they do: a clean
ledger after real generations passes with the counts the clients saw, and each check fails when
what it guards is broken. And the latency percentile the report prints.

No server and no load here: the ledger is seeded once through the domain layer (the benchmark's
own `Seeder`, and `start_generation` / `complete_generation` / `fail_generation`) into a database
of this module's own, and every test gets a copy of it (`CREATE DATABASE ... TEMPLATE`), tampers
with its copy through SQL, commits (the checks read on connections of their own), and runs
`money_checks` on it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest

from api.bench.checks import money_checks
from api.bench.load import percentile
from api.bench.seed import MODEL_UNITS, Seeder
from domain.db import Database
from domain.ledger import service as ledger
from domain.ledger.models import FailureKind, GrantSource
from domain.workspaces.models import AllocationMode
from tests.conftest import asyncpg_dsn, own_database, with_database


# --- percentile ------------------------------------------------------------------------------------

def test_percentile_is_the_nearest_rank_of_a_sorted_list():
    ten = [float(v) for v in range(1, 11)]
    assert [percentile(ten, p) for p in (50, 95, 99)] == [5.0, 10.0, 10.0]
    hundred = list(range(1, 101))
    assert [percentile(hundred, p) for p in (50, 95, 99)] == [50, 95, 99]
    # Nearest rank, never interpolated: a value of the list (the mean of 2 and 3 would be 2.5).
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([0.010, 0.012, 0.250], 50) == 0.012
    assert percentile([0.010, 0.012, 0.250], 95) == 0.250
    # One value is every percentile; the ends clamp to the list.
    assert [percentile([7.5], p) for p in (0, 50, 95, 99, 100)] == [7.5] * 5
    assert percentile(hundred, 0) == 1 and percentile(hundred, 100) == 100


def test_percentile_of_no_values_is_none():
    assert percentile([], 50) is None
    assert percentile([], 99) is None


# --- the seeded ledger -----------------------------------------------------------------------------

@dataclass
class Seeded:
    template: str  # the database every test copies
    hot: str  # workspace ids
    spread: list[str]
    gens: dict[str, str]  # generation ids by what happened to them
    promo: str  # the hot workspace's promotion grant (it pays first: it holds the open holds)
    allowance: str  # the hot workspace's other grant (untouched by any generation)
    expected: dict[str, tuple[list[str], int, int]]  # as the clients counted: the run's `expected`


@pytest.fixture(scope="module")
async def seeded(pg_server) -> Seeded:
    """Two scenarios, as a run has them: "hot" (one pooled workspace, two creators, two pool
    grants) with six generations started: completed at the held cost, completed below it (the
    rest released), failed technically (all released), failed for a policy violation (a fee
    captured, the rest released), and two still open; "spread" (two workspaces, one generation
    each: one completed, one open)."""
    async with own_database(pg_server, "bench_checks", pool_size=2, catalog=False) as (url, db):
        seeder = Seeder(db, uuid.uuid4().hex[:8])
        await seeder.setup()
        hot = await seeder.team(mode=AllocationMode.POOLED, creators=2, name="checks hot")
        promo = await seeder.grant(hot, "1000", GrantSource.PROMOTION, expires_in_days=30)
        allowance = await seeder.grant(hot, "1000", GrantSource.PLAN_ALLOWANCE)
        spread = [await seeder.team(mode=AllocationMode.POOLED, creators=0, name=f"checks spread {i}")
                  for i in range(2)]
        for team in spread:
            await seeder.grant(team, "1000", GrantSource.ENTERPRISE_COMMIT)
        worker = await seeder.caller(seeder.worker_token)

        async def start(team, creator: int = 0) -> str:
            who = await seeder.caller(team.creators[creator][0])
            r = await ledger.start_generation(db, who, workspace_id=team.workspace_id, model_key="bench-image",
                                              idempotency_key=uuid.uuid4().hex, hold_ttl=timedelta(hours=1))
            return str(r.generation.id)

        async def complete(gid: str, actual_cost: str | None = None) -> None:
            await ledger.complete_generation(db, worker, generation_id=gid, idempotency_key=uuid.uuid4().hex,
                                             actual_cost=actual_cost)

        async def fail(gid: str, kind: FailureKind) -> None:
            await ledger.fail_generation(db, worker, ledger.LedgerRules(), generation_id=gid, kind=kind,
                                         idempotency_key=uuid.uuid4().hex)

        gens = {name: await start(hot, i % 2) for i, name in enumerate(
            ("completed", "completed_below", "failed", "policy", "open", "open_2"))}
        await complete(gens["completed"])
        await complete(gens["completed_below"], actual_cost="3")
        await fail(gens["failed"], FailureKind.TECHNICAL)
        await fail(gens["policy"], FailureKind.POLICY_VIOLATION)
        gens["spread_completed"] = await start(spread[0])
        await complete(gens["spread_completed"])
        gens["spread_open"] = await start(spread[1])
    # `own_database` has closed its pools: nobody is connected to the template, so it can be copied.
    return Seeded(
        template=urlsplit(url).path.lstrip("/"), hot=hot.workspace_id, spread=[t.workspace_id for t in spread],
        gens=gens, promo=promo, allowance=allowance,
        expected={"hot": ([hot.workspace_id], 6, 2), "spread": ([t.workspace_id for t in spread], 2, 1)},
    )


@dataclass
class Copy:
    db: Database
    conn: asyncpg.Connection  # for tampering: each statement commits unless in a transaction


@pytest.fixture
async def ledger_copy(pg_server, seeded):
    name = f"bench_checks_copy_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(pg_server.admin_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{seeded.template}"')
    finally:
        await admin.close()
    pg_server.created.append(name)  # dropped with the session's other databases
    url = with_database(pg_server.admin_url, name)
    db = Database(url, pool_size=2)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        yield Copy(db, conn)
    finally:
        await conn.close()
        await db.dispose()


def gid(seeded: Seeded, name: str) -> uuid.UUID:
    return uuid.UUID(seeded.gens[name])


HELD_OPEN = 3 * MODEL_UNITS  # hot's two open generations and spread's one, 5 credits each


# --- a clean ledger passes --------------------------------------------------------------------------

async def test_a_clean_ledger_after_real_generations_passes_with_the_clients_counts(seeded, ledger_copy):
    conn = ledger_copy.conn
    # The generations are what the checks are about: settled with both figures in play.
    figures = {str(r["id"]): (r["status"], r["captured_units"], r["released_units"]) for r in await conn.fetch(
        "SELECT id, status, captured_units, released_units FROM generations")}
    assert figures == {
        seeded.gens["completed"]: ("COMPLETED", 5000, 0),
        seeded.gens["completed_below"]: ("COMPLETED", 3000, 2000),
        seeded.gens["failed"]: ("FAILED", 0, 5000),
        seeded.gens["policy"]: ("FAILED", 500, 4500),
        seeded.gens["open"]: ("STARTED", 0, 0),
        seeded.gens["open_2"]: ("STARTED", 0, 0),
        seeded.gens["spread_completed"]: ("COMPLETED", 5000, 0),
        seeded.gens["spread_open"]: ("STARTED", 0, 0),
    }
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.problems == [] and r.ok
    assert r.facts == {
        "invariant_violations": 0, "overdrawn_grants": 0,
        "grants_held": HELD_OPEN, "entries_held": HELD_OPEN,
        "settled_still_holding": 0, "started_not_holding_quote": 0, "figures_not_entries": 0,
        "open_generations": 3,
        # Each scenario counts its own workspaces' generations only.
        "hot_generations": {"COMPLETED": 2, "FAILED": 2, "STARTED": 2},
        "spread_generations": {"COMPLETED": 1, "STARTED": 1},
    }


# --- each check fails when what it guards is broken ---------------------------------------------------

async def test_a_grants_held_figure_off_the_open_generations_holds_fails(seeded, ledger_copy):
    # One unit of the promotion's held figure back to remaining (the grant's sum still conserved,
    # so the schema's CHECK allows it): the grants hold less than the open generations' entries.
    await ledger_copy.conn.execute(
        "UPDATE grants SET held = held - 1, remaining = remaining + 1 WHERE id = $1", uuid.UUID(seeded.promo))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert not r.ok
    assert (r.facts["grants_held"], r.facts["entries_held"]) == (HELD_OPEN - 1, HELD_OPEN)
    assert r.problems[1:] == [f"holds: grants hold {HELD_OPEN - 1} units, generations' entries {HELD_OPEN}"]
    # The grant no longer equals its own entries either: the invariant checker says so first.
    assert len(r.problems) == 2 and r.problems[0].startswith(f"invariant: grant {seeded.promo}: ")


async def test_a_hold_that_no_generation_made_fails_the_holds_check_though_the_ledger_adds_up(seeded, ledger_copy):
    # A HOLD entry with no generation (ledger_entries is append-only: an INSERT is allowed), with
    # the grant's figures moved to match: every grant still equals its entries, so only the holds
    # check sees that the grants hold credits no generation holds.
    async with ledger_copy.conn.transaction():
        await ledger_copy.conn.execute(
            "INSERT INTO ledger_entries (workspace_id, grant_id, kind, amount, cause) "
            "VALUES ($1, $2, 'HOLD', 1000, 'ADJUSTMENT')", uuid.UUID(seeded.hot), uuid.UUID(seeded.allowance))
        await ledger_copy.conn.execute(
            "UPDATE grants SET held = held + 1000, remaining = remaining - 1000 WHERE id = $1",
            uuid.UUID(seeded.allowance))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.facts["invariant_violations"] == 0
    assert r.problems == [f"holds: grants hold {HELD_OPEN + 1000} units, generations' entries {HELD_OPEN}"]


async def test_a_settled_generation_that_still_holds_fails(seeded, ledger_copy):
    # An open generation marked failed with no settlement entries: its hold is still on the grant.
    # (FAILED, not COMPLETED: the completions the clients saw stay right, so this check alone fails.)
    await ledger_copy.conn.execute(
        "UPDATE generations SET status = 'FAILED', failure_kind = 'TECHNICAL', settled_at = now() WHERE id = $1",
        gid(seeded, "open"))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.problems == ["holds: 1 generation(s) settled still holding"]
    assert r.facts["open_generations"] == 2


async def test_an_open_generation_not_holding_its_quote_fails(seeded, ledger_copy):
    await ledger_copy.conn.execute(
        "UPDATE generations SET quoted_units = quoted_units + 1 WHERE id = $1", gid(seeded, "spread_open"))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.problems == ["holds: 1 generation(s) started not holding quote"]


@pytest.mark.parametrize("name, change", [
    # A unit recorded as released that the entries captured (the total still the hold).
    ("completed_below", "captured_units = captured_units - 1, released_units = released_units + 1"),
    ("policy", "captured_units = captured_units + 1"),  # captured differs alone
    ("failed", "released_units = released_units - 1"),  # released differs alone
    ("completed", "released_units = 1"),  # a figure where the entries have none (coalesce to 0)
])
async def test_a_settled_generation_whose_figures_differ_from_its_entries_fails(seeded, ledger_copy, name, change):
    await ledger_copy.conn.execute(f"UPDATE generations SET {change} WHERE id = $1", gid(seeded, name))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.problems == ["holds: 1 generation(s) figures not entries"]


@pytest.mark.parametrize("tamper", ["figure", "entry"])
async def test_a_grant_not_equal_to_its_entries_is_an_invariant_violation(seeded, ledger_copy, tamper):
    grant = uuid.UUID(seeded.allowance)
    if tamper == "figure":
        # A unit moved from remaining to captured on the grant alone (still conserved, so the
        # CHECK allows it; `held` untouched, so the holds checks see nothing).
        await ledger_copy.conn.execute(
            "UPDATE grants SET remaining = remaining - 1, captured = captured + 1 WHERE id = $1", grant)
    else:
        # A second GRANT entry for credits the grant never received (an INSERT: append-only allows it).
        await ledger_copy.conn.execute(
            "INSERT INTO ledger_entries (workspace_id, grant_id, kind, amount, cause) "
            "VALUES ($1, $2, 'GRANT', 1000, 'ADJUSTMENT')", uuid.UUID(seeded.hot), grant)
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.facts["invariant_violations"] == 1
    assert len(r.problems) == 1 and r.problems[0].startswith(f"invariant: grant {grant}: grant figures ")


@pytest.mark.parametrize("column, other", [("remaining", "expired"), ("held", "remaining")])
async def test_an_overdrawn_grant_fails(seeded, ledger_copy, column, other):
    conn, grant = ledger_copy.conn, uuid.UUID(seeded.allowance)
    # Figures that still add up to the amount, but one of them below zero.
    overdraw = f"UPDATE grants SET {other} = {other} + {column} + 1, {column} = -1 WHERE id = $1"
    # The schema refuses an overdraft itself (ck_grants_figures_not_negative)...
    with pytest.raises(asyncpg.CheckViolationError, match="ck_grants_figures_not_negative"):
        await conn.execute(overdraw, grant)
    # ... so to show that the check would see one, this test drops that constraint in its own
    # copy of the database (DDL is transactional: dropped and overdrawn in one commit).
    async with conn.transaction():
        await conn.execute("ALTER TABLE grants DROP CONSTRAINT ck_grants_figures_not_negative")
        await conn.execute(overdraw, grant)
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.facts["overdrawn_grants"] == 1
    assert "overdraft: 1 grant(s) with remaining < 0 or held < 0" in r.problems
    # The grant no longer equals its entries (the invariant checker reports it too), and a
    # negative `held` also takes the grants' total held below the open generations' entries.
    assert r.facts["invariant_violations"] == 1
    assert len(r.problems) == (3 if column == "held" else 2)


async def test_starts_and_completions_other_than_the_clients_saw_fail(seeded, ledger_copy):
    (hot_ws, starts, completes), spread = seeded.expected["hot"], seeded.expected["spread"]
    r = await money_checks(ledger_copy.db, {"hot": (hot_ws, starts + 1, completes), "spread": spread})
    assert r.problems == [f"hot: clients saw {starts + 1} generations start, the database has {starts}"]
    r = await money_checks(ledger_copy.db, {"hot": (hot_ws, starts, completes - 1), "spread": spread})
    assert r.problems == [f"hot: clients saw {completes - 1} completions, the database has {completes}"]


async def test_a_completion_in_the_database_that_the_clients_saw_fail_fails(seeded, ledger_copy):
    # The technically failed generation recorded as completed: its figures still match its entries
    # (nothing captured, all released), so only the count of completions tells.
    await ledger_copy.conn.execute(
        "UPDATE generations SET status = 'COMPLETED', failure_kind = NULL WHERE id = $1", gid(seeded, "failed"))
    r = await money_checks(ledger_copy.db, seeded.expected)
    assert r.problems == ["hot: clients saw 2 completions, the database has 3"]
    assert r.facts["hot_generations"] == {"COMPLETED": 3, "FAILED": 1, "STARTED": 2}
