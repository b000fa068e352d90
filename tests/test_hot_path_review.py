"""Review of the generation hot path's money rules: starts, settlements and their replays under
retries, concurrency and changes made between a request and its retry (startGeneration,
completeGeneration, failGeneration through the real gql client)."""

from __future__ import annotations

import pytest
from gql.transport.exceptions import TransportQueryError

from tests.test_api_ledger import START, assert_ledger_clean, balance, grant, key, make_team

REMOVE = 'mutation($m: ID!) { removeMember(input: {memberId: $m}) { __typename } }'
SEAT = 'mutation($m: ID!, $s: Seat!) { changeMemberSeat(input: {memberId: $m, seat: $s}) { __typename } }'


@pytest.mark.parametrize("change", ["removed", "made standard"])
async def test_a_start_for_a_member_replayed_after_the_member_changed_returns_the_first_generation(
    db, client, change
):
    """Money rule 3: the same key with the same input returns the first result. The worker
    starts a generation for a creator and retries the request (say its connection dropped); if
    the creator was removed or made a standard seat in between, the retry answered NotFound or
    FORBIDDEN, telling the worker the start never happened while its hold stays in place. The
    target was checked before the key was looked up (transfers had the same bug, fixed)."""
    team = await make_team(db, client, creators=1)
    await grant(client, team, "100")
    _, creator = team.creators[0]
    k = key()
    async with client(team.worker) as api:
        first = (await api(START, ws=team.ws, model="sdxl", key=k, **{"for": creator}))["startGeneration"]
    assert first["__typename"] == "Generation", first
    async with client(team.owner) as api:
        if change == "removed":
            assert (await api(REMOVE, m=creator))["removeMember"]["__typename"] == "Member"
        else:
            assert (await api(SEAT, m=creator, s="STANDARD"))["changeMemberSeat"]["__typename"] == "Member"
    async with client(team.worker) as api:
        replay = (await api(START, ws=team.ws, model="sdxl", key=k, **{"for": creator}))["startGeneration"]
        assert replay == first, replay
        # A new start for that member is still refused.
        if change == "removed":
            out = (await api(START, ws=team.ws, model="sdxl", key=key(), **{"for": creator}))["startGeneration"]
            assert out["__typename"] == "NotFoundError", out
        else:
            with pytest.raises(TransportQueryError) as err:
                await api(START, ws=team.ws, model="sdxl", key=key(), **{"for": creator})
            assert err.value.errors[0]["extensions"]["code"] == "FORBIDDEN"
    b = await balance(client, team.owner, team.ws)
    assert (b["available"], b["held"]) == ("95.000", "5.000")  # held once
    await assert_ledger_clean(db, team.ws)
