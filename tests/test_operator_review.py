"""The operator's front door, held to what the README says: its configuration table is the
settings (names and defaults), its command-line table is the parser, and its GraphiQL
walk-through runs, word for word, against `serve --demo`'s data through the real API."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from pathlib import Path

import pytest
from gql.transport.exceptions import TransportQueryError
from graphql import OperationDefinitionNode, build_schema, parse, print_ast, validate

import migrations
from api import cli
from api.schema import SDL_PATH
from api.settings import ENV_NAMES, Settings
from domain import demo
from domain.db import Database
from tests.conftest import LiveServer, http_client, ws_client

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table under `## heading`, as cells."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


def ticked(cell: str) -> str:
    return cell.strip().strip("`")


# --- the configuration table -------------------------------------------------------------------

def test_the_configuration_table_is_every_setting_with_its_default():
    rows = {ticked(r[0]): r for r in table("Configuration") if not ticked(r[0]).startswith("CREDITPOOL_TEST_")}
    assert set(rows) == set(ENV_NAMES.values())
    for field, env in ENV_NAMES.items():
        default = Settings.model_fields[field].get_default(call_default_factory=False)
        shown = ticked(rows[env][2])
        if field == "database_url":
            assert default is None and shown == "unset"
        elif field == "data_dir":
            assert shown.startswith("$XDG_DATA_HOME/creditpool")
        elif isinstance(default, bool):
            assert shown == str(default).lower(), env
        elif isinstance(default, (int, float, Decimal)):
            assert Decimal(shown) == Decimal(str(default)), env
        else:
            assert shown == str(default), env
        # A flag is shown exactly when `serve` takes one.
        flag = ticked(rows[env][1])
        assert (flag or None) == (f"--{field.replace('_', '-')}" if field in (
            "database_url", "host", "port", "data_dir", "log_level", "workers") else None), env


# --- the command-line table --------------------------------------------------------------------

def test_every_command_and_option_in_the_command_line_table_exists():
    parser = cli._parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    listed = set()
    for cells in table("The command line"):
        usage = ticked(cells[0])
        words = usage.replace("[", " ").replace("]", " ").split()
        assert words[0] == "creditpool", usage
        name = words[1]
        listed.add(name)
        assert name in commands, usage
        options = {s for a in commands[name]._actions for s in a.option_strings}  # noqa: SLF001
        for word in words[2:]:
            for option in word.split("\\|"):
                if option.startswith("--"):
                    assert option in options, (usage, option)
    assert listed == set(commands)


# --- the GraphiQL walk-through ------------------------------------------------------------------

def walkthrough() -> list[str]:
    """Every operation of the README's GraphQL blocks, each on its own, in order."""
    ops = []
    for block in re.findall(r"```graphql\n(.*?)```", README, re.S):
        for definition in parse(block).definitions:
            assert isinstance(definition, OperationDefinitionNode)
            ops.append(print_ast(definition))
    return ops


def test_the_readme_examples_are_valid_against_the_schema():
    schema = build_schema(SDL_PATH.read_text())
    ops = walkthrough()
    assert len(ops) == 8
    for op in ops:
        assert validate(schema, parse(op)) == [], op


@pytest.fixture(scope="module")
async def demo_world(pg_server):
    url = await pg_server.create_database("creditpool_readme")
    await asyncio.to_thread(migrations.upgrade, url)
    db = Database(url, pool_size=2)
    try:
        tokens = {i.key: i.token for i in await demo.load_demo(db, {})}
    finally:
        await db.dispose()
    server = LiveServer(url)
    server.start()
    yield server, tokens
    server.stop()


async def test_the_walkthrough_runs_as_written_on_the_demo_data(demo_world):
    server, tokens = demo_world
    (packs, purchase, prices_and_quote, start, complete, balance_and_ledger, balances, events) = walkthrough()
    assert str(demo.DEMO_WORKSPACE_ID) in README

    # 1. The owner sees the packs and buys the one the README names.
    async with http_client(server, tokens["owner"]) as owner:
        on_sale = {p["id"]: p for p in (await owner(packs))["creditPacks"]}
        bought = (await owner(purchase))["purchaseCredits"]
    assert bought["__typename"] == "Purchase", bought
    pack_id = re.search(r'packId: "([^"]+)"', purchase).group(1)
    assert Decimal(bought["credits"]) == Decimal(on_sale[pack_id]["credits"])

    # 2. creator1 reads the cost table and a quote for the README's model and parameters.
    async with http_client(server, tokens["creator1"]) as creator:
        read = await creator(prices_and_quote)
        quote = read["quote"]
        assert "total" in quote and quote["canAfford"] is True, quote  # a Quote, not an Error
        assert "video-standard" in {m["modelKey"] for m in read["modelPrices"]["models"]}

        # 3. The start holds exactly the quoted price; the promotion (expiring soonest) pays first.
        started = (await creator(start))["startGeneration"]
        assert started["__typename"] == "Generation", started
        assert started["cost"] == quote["total"]
        assert started["holds"][0]["grant"]["source"] == "PROMOTION"

        # A creator calling completeGeneration is refused.
        settle = complete.replace("<id from step 3>", started["id"])
        with pytest.raises(TransportQueryError) as refused:
            await creator(settle)
        assert refused.value.errors[0]["extensions"]["code"] == "FORBIDDEN"

    # 4. The worker completes it with the reported usage.
    async with http_client(server, tokens["worker"]) as worker:
        done = (await worker(settle))["completeGeneration"]
    assert done["__typename"] == "Generation" and done["status"] == "COMPLETED", done
    assert Decimal(done["captured"]) + Decimal(done["released"]) == Decimal(started["cost"])

    # 5. The owner reads the balance and the ledger.
    async with http_client(server, tokens["owner"]) as owner:
        seen = await owner(balance_and_ledger)
    assert seen["balance"]["held"] == "0.000"
    assert {e["node"]["kind"] for e in seen["ledger"]["edges"]} >= {"GRANT", "HOLD", "CAPTURE"}

    # 6. The balance subscription sends the balance at once.
    async with ws_client(server, tokens["owner"]) as ws:
        first = await asyncio.wait_for(anext(aiter(ws.subscribe(balances))), 15)
    assert first["balanceChanged"]["available"] == seen["balance"]["available"]
    assert "workspaceEvents" in events


# --- DATABASE_URL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["sslmode=disable", "ssl=disable"])
async def test_a_database_url_with_a_tls_mode_works_for_every_connection(pg_server, option):
    """Managed PostgreSQL hands out libpq URLs (`?sslmode=require`); SQLAlchemy's asyncpg dialect
    wants `?ssl=require`. Either spelling must reach every connection the service opens: Alembic,
    the ORM pool, the hot path's asyncpg pool, and the LISTEN connection of several workers."""
    from sqlalchemy import text

    from api.live import _Postgres, broadcast_url

    url = await pg_server.create_database("creditpool_tls")
    url += ("&" if "?" in url else "?") + option
    await asyncio.to_thread(migrations.upgrade, url)
    db = Database(url, pool_size=1)
    try:
        assert await db.read(lambda s: s.scalar(text("SELECT version_num FROM alembic_version"))) == \
            migrations.head_revision()
        assert (await db.fetchrow("SELECT 1 AS one"))["one"] == 1
        listener = _Postgres(broadcast_url("postgres", db.url, workers=2))
        await listener.connect()
        await listener.disconnect()
    finally:
        await db.dispose()
