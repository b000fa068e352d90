import asyncio, random
from tests.test_api_ledger import *
from tests.test_api_ledger import _ensure_price
from tests.test_ledger_review import review_prices

async def test_probe(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    token, _ = team.creators[0]
    async with client(token) as api:
        gen = (await api(START, ws=team.ws, model="video-standard", key=key()))["startGeneration"]
    async def complete(tok):
        async with client(tok) as api:
            return (await api(COMPLETE, g=gen["id"], key=key(), cost="20"))["completeGeneration"]
    async def fail(tok):
        async with client(tok) as api:
            return (await api(FAIL, g=gen["id"], key=key(), kind="TECHNICAL"))["failGeneration"]
    calls = [complete(team.worker), fail(team.operator)] * 5
    results = await asyncio.gather(*calls)
    for r in results: print(r.get("__typename"), r.get("status"), r.get("captured"), r.get("released"), r.get("message"))
    print(await balance(client, team.owner, team.ws))
    from domain.ledger.invariants import check_ledger
    print(await check_ledger(db, uuid.UUID(team.ws)))
    async with client(team.owner) as api:
        e = await api('query($ws: ID!) { ledger(workspaceId: $ws) { edges { node { kind amount generationId idempotencyKey actorId } } } }', ws=team.ws)
    for x in e["ledger"]["edges"]: print(x["node"])
