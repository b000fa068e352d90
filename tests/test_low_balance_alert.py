"""The low-balance alert follows the balance however it moves, not only when someone spends: a
threshold set above what is left fires at once, and credits that expire (or a close that drops an
allowance) with nobody generating fire it at the scheduler's round. Each test here failed on the
code it was written against."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.periods.service import tick
from tests.test_api_ledger import grant, make_team
from tests.test_spend_governance_review import open_alerts_of

SETTINGS = ('mutation($ws: ID!, $t: String) { setAlertSettings(input: {workspaceId: $ws, lowBalanceThreshold: $t}) '
            '{ __typename } }')


async def set_threshold(client, team, threshold: str | None) -> None:
    async with client(team.owner) as api:
        assert (await api(SETTINGS, ws=team.ws, t=threshold))["setAlertSettings"]["__typename"] == "Workspace"


async def test_a_threshold_set_above_the_balance_fires_at_once_and_follows_each_change(db, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    await set_threshold(client, team, "150")  # 100 left: under it now, with no spend to come
    assert await open_alerts_of(client, team, "LOW_BALANCE") == ["workspace"]
    await set_threshold(client, team, "150")  # the same condition: still one alert
    assert await open_alerts_of(client, team, "LOW_BALANCE") == ["workspace"]
    await set_threshold(client, team, "50")  # 100 is not under 50 any more
    assert await open_alerts_of(client, team, "LOW_BALANCE") == []
    await set_threshold(client, team, "150")
    assert await open_alerts_of(client, team, "LOW_BALANCE") == ["workspace"]
    await set_threshold(client, team, None)  # no threshold, nothing to be under
    assert await open_alerts_of(client, team, "LOW_BALANCE") == []


async def test_credits_expiring_under_the_threshold_fire_the_alert_at_the_schedulers_round(db, live_server, client):
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    await grant(client, team, "300", expires=datetime.now(UTC) + timedelta(days=2))
    await set_threshold(client, team, "150")  # 400 available
    assert await open_alerts_of(client, team, "LOW_BALANCE") == []
    try:
        live_server.clock.offset = timedelta(days=3)  # the 300 expire: 100 left, and nobody generates
        await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))
        assert await open_alerts_of(client, team, "LOW_BALANCE") == ["workspace"]
        await tick(db, live_server.clock, hold_ttl=timedelta(hours=1))  # once per crossing
        async with client(team.owner) as api:
            lows = [a for a in (await api("query($ws: ID!) { alerts(workspaceId: $ws) { kind } }", ws=team.ws))["alerts"]
                    if a["kind"] == "LOW_BALANCE"]
        assert len(lows) == 1
    finally:
        live_server.clock.offset = timedelta(0)
